"""The KV cache, and the selection policies that decide what each decode step attends to.

The model (model.py) calls, in every layer,

    out = cache.attend(layer, q, k, v, pos)
        q:    [B, n_heads, T, head_dim]     post-RoPE queries of the T new tokens
        k, v: [B, n_kv_heads, T, head_dim]  post-RoPE keys and values of the T new tokens
        pos:  [T] int64                     their absolute positions
        out:  [B, n_heads, T, head_dim]     attention output (before o_proj)

and never needs to know which policy runs. The first call for a layer is the *prefill*:
exact causal attention over the whole prompt, after which the policy builds its summary of
the prompt's keys. Every later call is a *decode* step (`KVCache._decode`), the same for every
policy (PAPER.md "ShadowKV, precisely"):

    1. score the landmarks against the query, keep the top-k chunks per KV head   (landmarks.py)
    2. start fetching the selected rows' values (and keys) from CPU memory        (offload.py)
    3. meanwhile attend to the tokens kept exact on the device                     (ExactTokens)
    4. get the selected keys (fetched, or rebuilt from low-rank factors), attend,  (OffloadedKeys,
       and merge the two softmaxes                                                  LowRankKeys)

A policy is three choices, and every name is a preset of them (PRESETS, the same table as the README):

    name        landmarks (what selection scores)    keys attended                always exact
    full        -- (no selection)                    exact, all                   --
    oracle      every exact key (chunk 1)            exact                        local 64
    mean        mean of each chunk of 8 exact keys   exact                        local 64
    svd         every exact key (chunk 1)            rank-r SVD rebuild           local 64
    shadowkv    mean of each chunk of 8 keys         rank-r SVD rebuild           local 32, 48 outlier chunks
    quantized   every key, quantized (2 bits)        exact                        local 64
    paper       every key, quantized (2 bits)        4-bit K/V (pre-RoPE keys)    local 64
    paper_fast  every key, 2 bits, mean-query rule   fp8 K/V                      prefix, suffix 0.625%
    quest       min / max of each chunk of 16 keys   exact                        local 64

so `mean` isolates the landmark failure, `svd` the low-rank failure, `shadowkv` has both, `quantized`
is the paper's fix (token-level landmarks made cheap by quantization) with exact K/V, `paper` the
paper's full configuration as evaluated (its K/V stored 4-bit as well), `paper_fast` the authors'
fast GPU path, and `quest` the canonical query-aware page-selection baseline. One budget accounting
for all (`BudgetSplit`).
"""

import math
import warnings
from dataclasses import dataclass, replace

import torch

import landmarks
import quantize
from offload import OffloadStore

# --------------------------------------------------------------------------------------- the presets
# One line per policy: the three choices (landmarks, keys, always-exact tokens) and their parameters.
# Every field not named keeps the Policy default below.
# (PAPER.md "ShadowKV, precisely", "The paper's method", "Confirmed against the authors' code"; Quest:
# PAPER.md "Quest".) No preset attends sink tokens: the first tokens compete through their landmarks.
# fmt: off
PRESETS = {
    "full":       dict(landmarks=None),
    "oracle":     dict(landmarks="keys", chunk_size=1, keys="exact", local=64),
    "mean":       dict(landmarks="mean", chunk_size=8, keys="exact", local=64),
    "svd":        dict(landmarks="keys", chunk_size=1, keys="low_rank", rank=0.15625, local=64),
    "shadowkv":   dict(landmarks="mean", chunk_size=8, keys="low_rank", rank=0.15625, local=32, outliers=48),
    "quantized":  dict(landmarks="quantized", chunk_size=1, keys="exact", landmark_bits="2", local=64),
    "paper":      dict(landmarks="quantized", chunk_size=1, keys="exact", landmark_bits="2", local=64,
                       kv_bits="4", kv_group="token", kv_pre_rope=True),
    "paper_fast": dict(landmarks="quantized", chunk_size=1, keys="exact", landmark_bits="2", local=0.00625,
                       sink=0.00625, budget=0.015625, score_rule="mean_query", kv_bits="fp8", min_prompt=512),
    "quest":      dict(landmarks="quest", chunk_size=16, keys="exact", local=64),
}
# fmt: on
POLICIES = tuple(PRESETS)  # every generic test runs over this list
# ShadowKV's 48 outlier chunks (384 tokens) are sized for long prompts: at the mean Text2JSON prompt of
# 20.1K tokens they are 1.9% of it (PAPER.md "Benchmarks"). On short prompts (the default run's ~2K
# tokens, where 384 tokens would be 18% of the prompt kept exact) pass outliers=OUTLIER_SHARE instead.
OUTLIER_SHARE = 48 * 8 / 20100
KEY_SOURCES = ("exact", "low_rank")


@dataclass
class Policy:
    """What a cache keeps and how it selects. Build one with `make_policy(name, ...)`.

    The three choices:
    landmarks:   what selection scores: a kind of landmarks.LANDMARKS ("keys", "mean", "quantized",
                 "quest"), None = no selection (full attention)
    keys:        which keys attention reads: "exact" (offloaded with the values, fetched with them) or
                 "low_rank" (ShadowKV: rank-r SVD factors of the pre-RoPE keys on the device, rebuilt
                 and re-RoPE'd)
    sink, local, outliers: the always-exact tokens: the first `sink` and last `local` prompt tokens
                 (an int, or a share of the prompt below 1; paper: no sink, local window 64), and
                 ShadowKV's outlier chunks: an int count (ShadowKV: 48), a share of the prompt's
                 tokens below 1 (to scale the count to short prompts), or "budget" = 48 chunks per
                 2048 selected tokens, scaled to this budget
    Their parameters:
    budget:      selected prompt tokens as a share of the prompt (paper: 3.125%)
    chunk_size:  tokens per landmark (ShadowKV: 8; the paper's fix: 1)
    landmark_bits: the quantize.parse_format spec of "quantized" landmarks ("2", "fp8", ...)
    residual:    meta-chunk size m for residual landmark quantization (0 = off), the residual
                 quantized with `residual_bits`
    rank:        rank of "low_rank" keys, an int or a share (< 1) of kv_heads * head_dim
                 (ShadowKV: 160 of 1024 = 0.15625)
    score_rule:  landmarks.SCORE_RULES: "softmax_max" (ShadowKV's, the paper's as evaluated) or
                 "mean_query" (the authors' fast path)
    kv_bits:     None = the offloaded K/V are kept exact; else a quantize.parse_format spec ("4",
                 "int4", ...): stored quantized, fetched packed, dequantized on the device
    kv_group:    "head": each KV head's row of a token is quantized on its own; "token": all
                 kv_heads * head_dim channels of a token form one row and one scale group (the paper)
    kv_pre_rope: store the keys before RoPE (the paper: quantize pre-RoPE keys, RoPE the fetched rows)
    min_prompt:  prompts shorter than this get full attention (the fast path: 512)
    offload:     keep the prompt's K/V in CPU memory (offload.py); False keeps all on the device
    track:       record selection statistics against the oracle (costs an exact scoring pass)
    """

    name: str = "full"
    landmarks: str | None = None
    keys: str = "exact"
    sink: int | float = 0
    local: int | float = 64
    outliers: int | float | str = 0
    budget: float = 0.03125
    chunk_size: int = 1
    landmark_bits: str | None = None
    residual: int = 0
    residual_bits: str = quantize.DEFAULT_RESIDUAL_BITS  # "0.5", the paper's
    rank: float | None = None
    score_rule: str = "softmax_max"
    kv_bits: str | None = None
    kv_group: str = "head"
    kv_pre_rope: bool = False
    min_prompt: int = 0
    offload: bool = True
    track: bool = False

    def label(self) -> str:
        """Short name for tables: 'shadowkv', 'mean c8', 'quantized 2b', 'svd r0.16', 'oracle kv4'."""
        kv = f" kv{self.kv_bits}" if self.kv_bits else ""
        if self.name in ("mean", "quest"):
            return f"{self.name} c{self.chunk_size}{kv}"
        if self.name == "quantized":
            res = f" res{self.residual}x{self.residual_bits}" if self.residual else ""
            chunk = f" c{self.chunk_size}" if self.chunk_size != 1 else ""
            bits = f"{self.landmark_bits}b" if str(self.landmark_bits).isdigit() else self.landmark_bits
            return f"quantized {bits}{chunk}{res}{kv}"
        if self.name == "svd":
            return f"svd r{self.rank:g}{kv}"
        if self.name in ("paper", "paper_fast") and (self.kv_bits, self.kv_group) == (
            PRESETS[self.name]["kv_bits"],
            PRESETS[self.name].get("kv_group", "head"),
        ):
            return self.name  # its own K/V format is part of the name
        return self.name + kv


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def make_policy(name: str, **overrides) -> Policy:
    """The preset for `name` (PRESETS), with any field overridden (None = keep the preset's value).

    Raises a one-line ValueError for an unknown name or an out-of-range value.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown method {name!r}: choose from {', '.join(POLICIES)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(overrides) - set(Policy.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown policy field(s) {', '.join(sorted(unknown))}")
    p = replace(Policy(name=name, **PRESETS[name]), **overrides)
    if not 0 < p.budget <= 1:
        raise ValueError(f"budget {p.budget} is out of range: give a share of the prompt in (0, 1]")
    if not _is_int(p.chunk_size) or p.chunk_size < 1:
        raise ValueError(f"chunk_size {p.chunk_size!r} must be an int >= 1")
    for field in ("residual", "min_prompt"):
        if not _is_int(getattr(p, field)) or getattr(p, field) < 0:
            raise ValueError(f"{field} {getattr(p, field)!r} must be an int >= 0")
    for field in ("sink", "local", "outliers"):
        x = getattr(p, field)
        if not (
            _is_int(x)
            and x >= 0
            or isinstance(x, float)
            and 0 <= x < 1
            or field == "outliers"
            and x == "budget"
        ):
            raise ValueError(
                f"{field} {x!r} must be an int >= 0 or a share of the prompt in [0, 1)"
                + (" or 'budget'" if field == "outliers" else "")
            )
    if p.kv_group not in ("head", "token"):
        raise ValueError(f"kv_group {p.kv_group!r} must be 'head' or 'token'")
    if (p.kv_group == "token" or p.kv_pre_rope) and p.kv_bits is None:
        raise ValueError("kv_group='token' and kv_pre_rope describe quantized K/V: give kv_bits too")
    if p.outliers and p.landmarks != "mean":
        raise ValueError("outlier chunks are ShadowKV's: they need chunk-mean landmarks (landmarks='mean')")
    if p.landmarks is not None and p.landmarks not in landmarks.LANDMARKS:
        raise ValueError(f"unknown landmarks {p.landmarks!r}: choose from {', '.join(landmarks.LANDMARKS)}")
    if p.keys not in KEY_SOURCES:
        raise ValueError(f"unknown keys {p.keys!r}: choose from {', '.join(KEY_SOURCES)}")
    if p.score_rule not in landmarks.SCORE_RULES:
        raise ValueError(
            f"unknown score_rule {p.score_rule!r}: choose from {', '.join(landmarks.SCORE_RULES)}"
        )
    if p.keys == "low_rank":
        if (
            p.rank is None
            or isinstance(p.rank, bool)
            or p.rank <= 0
            or (p.rank >= 1 and p.rank != int(p.rank))
        ):
            raise ValueError(f"rank {p.rank!r} must be an int >= 1 or a share of the channels in (0, 1)")
    if p.kv_bits is not None:
        if p.landmarks is None:
            raise ValueError(
                "kv_bits quantizes the offloaded K/V of a sparse policy; full attention has none"
            )
        quantize.parse_format(p.kv_bits)  # raises on an unknown format
    if p.landmarks == "quantized":
        if p.landmark_bits is None:
            raise ValueError("quantized landmarks need landmark_bits (e.g. '2')")
        quantize.parse_format(p.landmark_bits)
        if p.residual:
            quantize.parse_format(p.residual_bits)
    return p


# --------------------------------------------------------------------------------------- the budget
@dataclass(frozen=True)
class BudgetSplit:
    """How a prompt of `prompt_len` tokens is split: sink | middle (n_chunks chunks of `chunk`) | local.

    The middle is what the landmarks summarise and the offload store holds; `selected` of its tokens
    are read at each decode step, plus `outlier_chunks` chunks kept exact (ShadowKV).
    """

    prompt_len: int
    sink: int
    local: int
    chunk: int
    n_chunks: int
    selected: int  # tokens read from the middle at each decode step (a multiple of chunk)
    outlier_chunks: int = 0
    outliers_scaled: bool = False  # the outlier count was given as a share of the prompt

    @property
    def k_chunks(self) -> int:
        return self.selected // self.chunk

    @property
    def outlier_tokens(self) -> int:
        return self.outlier_chunks * self.chunk

    @property
    def middle(self) -> slice:
        return slice(self.sink, self.sink + self.n_chunks * self.chunk)

    def line(self) -> str:
        """'budget = 4 sink + 64 local + 64 selected (+ 16 outliers) of 2048 tokens'."""
        scaled = ": ShadowKV's 48 chunks scaled to the prompt" if self.outliers_scaled else ""
        out = f" (+ {self.outlier_tokens} outliers{scaled})" if self.outlier_chunks else ""
        return (
            f"budget = {self.sink} sink + {self.local} local + {self.selected} selected{out}"
            f" of {self.prompt_len} tokens"
        )


def split_budget(policy: Policy, T: int) -> BudgetSplit | None:
    """Split a prompt of T tokens for `policy`, and size the selection.

    The middle's length is cut to a multiple of the chunk size; the remainder joins the local
    window. Returns None when the selection (plus any outlier chunks) needs more tokens than the
    middle holds: such a prompt is shorter than the budget and gets full attention. (A selection
    of exactly the whole middle still runs the sparse path; the invariant tests use that.)
    """
    c = policy.chunk_size
    if T < policy.min_prompt:
        return None
    sink = min(_tokens(policy.sink, T), T)
    local = min(_tokens(policy.local, T), T - sink)
    n_chunks = (T - sink - local) // c
    local = T - sink - n_chunks * c
    selected = max(c, int(policy.budget * T) // c * c)  # the authors: int(0.03125 * T)
    if policy.outliers == "budget":  # 48 outlier chunks per 2048 selected tokens (ShadowKV's fast class)
        outliers = round(48 * selected / 2048)
    elif isinstance(policy.outliers, float):  # a share of the prompt's tokens, in whole chunks
        outliers = round(policy.outliers * T / c)
    else:
        outliers = policy.outliers
    if selected + outliers * c > n_chunks * c:
        return None
    return BudgetSplit(T, sink, local, c, n_chunks, selected, outliers, isinstance(policy.outliers, float))


def _tokens(count, T: int) -> int:
    """A token count given as an int, or as a share (float < 1) of a prompt of T tokens."""
    return round(count * T) if isinstance(count, float) else count


# --------------------------------------------------------------------------------- the exact tokens
@dataclass
class ExactTokens:
    """The tokens every decode step attends exactly, kept on the device: the prompt's sink, outlier
    chunks and local window (`n_prompt` of them, per KV head), then every generated token."""

    k: torch.Tensor  # [H, F + Tg, d] post-RoPE keys: sink, outliers, local, then generated
    v: torch.Tensor  # [H, F + Tg, d]
    prompt_pos: torch.Tensor  # [H, F] positions of the F prompt tokens among them
    kbuf: torch.Tensor | None = None  # the buffers k / v grow in (see append)
    vbuf: torch.Tensor | None = None

    @classmethod
    def build(cls, k, v, split: BudgetSplit, outlier_chunks) -> "ExactTokens":
        """k, v: [H, T, d] exact prompt K/V; outlier_chunks: [H, n_out] middle chunk indices."""
        H, T, d = k.shape
        s, c = split.sink, split.chunk
        ar = torch.arange(T, device=k.device)
        out_tok = (outlier_chunks[:, :, None] * c + torch.arange(c, device=k.device)).flatten(
            1
        )  # [H, n_out*c]
        pos = torch.cat(
            [ar[:s].expand(H, -1), out_tok + s, ar[split.middle.stop :].expand(H, -1)], dim=1
        )  # [H, F]
        rows = pos[..., None].expand(-1, -1, d)  # [H, F, d]
        return cls(k.gather(1, rows), v.gather(1, rows), pos)

    @property
    def n_prompt(self) -> int:
        return self.prompt_pos.shape[1]

    def append(self, k, v):
        """Add the new tokens' k, v [H, Tq, d]: generated tokens are always attended exactly."""
        self.kbuf, self.k = append(self.kbuf, self.k, k)  # [H, F + Tg, d]
        self.vbuf, self.v = append(self.vbuf, self.v, v)


def outlier_chunks(marks, n_out: int) -> torch.Tensor:
    """ShadowKV's outliers: the n_out chunks whose mean represents its keys worst (lowest minimum
    cosine), per KV head; they are kept exact and removed from the landmarks. [H, n_out] int64."""
    H = marks.min_cos.shape[0]
    if n_out == 0:
        return torch.empty(H, 0, dtype=torch.long, device=marks.min_cos.device)
    chunks = landmarks.select_topk(-marks.min_cos, n_out)  # [H, n_out]
    marks.removed = torch.zeros_like(marks.min_cos, dtype=torch.bool).scatter_(1, chunks, True)  # [H, N]
    return chunks


# ----------------------------------------------------------------------------------- the key sources
@dataclass
class OffloadedKeys:
    """The keys, kept in the offload store beside the values and fetched with them: exact, or (the
    paper's configuration) quantized before RoPE, with RoPE applied to the fetched rows."""

    pre_rope: bool = False
    fetched = ("k", "v")  # what a decode step reads from the store

    def device_bytes(self, exact_bytes) -> int:
        return 0

    def selected(self, got: dict, idx, split: BudgetSplit, rope, dtype) -> torch.Tensor:
        if not self.pre_rope:
            return got["k"]  # [H, S, d] post-RoPE
        H, S, d = got["k"].shape
        pos = (idx + split.sink).flatten()  # [H*S] prompt positions
        return rope.apply(got["k"].to(dtype).reshape(1, -1, d), pos).view(H, S, d)  # post-RoPE


@dataclass
class LowRankKeys:
    """ShadowKV's keys (PAPER.md "ShadowKV, precisely"): the pre-RoPE keys of all KV heads as one
    [M, H*d] matrix, factorised by SVD; U [M, r] and S V^T [r, H*d] stay on the device and the
    selected keys are rebuilt from them and RoPE'd at their positions. Only the values are fetched."""

    u: torch.Tensor  # [T, r] one row per prompt token
    sv: torch.Tensor  # [r, H * d]
    fetched = ("v",)

    @classmethod
    def build(cls, k, split: BudgetSplit, rope, rank) -> "LowRankKeys":
        """k: [H, T, d] post-RoPE keys of the WHOLE prompt, as ShadowKV factorises them (the rows of
        the sink and the local window are never rebuilt, but shape the basis); RoPE is undone first."""
        pos = torch.arange(k.shape[1], device=k.device)  # [T]
        return cls(*low_rank_keys(rope.invert(k, pos), rank))

    def device_bytes(self, exact_bytes) -> int:
        return sum(t.numel() * (exact_bytes or t.element_size()) for t in (self.u, self.sv))

    def selected(self, got: dict, idx, split: BudgetSplit, rope, dtype) -> torch.Tensor:
        H, S = idx.shape
        d = self.sv.shape[1] // H
        pos = idx + split.sink  # [H, S] prompt positions of the selected middle rows
        pre = rebuild_keys(self.u, self.sv, pos, H, d).to(dtype)  # [H, S, d] pre-RoPE
        return rope.apply(pre.reshape(1, -1, d), pos.flatten()).view(H, S, d)  # post-RoPE


@dataclass
class LayerState:
    """What a sparse policy keeps for one layer after the prefill (batch of one)."""

    marks: object  # a landmarks.LANDMARKS kind: [H, N] landmarks
    keys: object  # OffloadedKeys or LowRankKeys
    exact: ExactTokens


class KVCache:
    """Every layer's keys and values, and attention over them under a selection policy.

    Sparse policies hold a batch of one sequence (stack several with StackedCache).
    """

    def __init__(self, config, rope, policy: Policy | None = None, device="cpu"):
        self.config = config
        self.rope = rope
        self.policy = policy or Policy("full")
        self.device = torch.device(device)
        self.store = OffloadStore(self.device, offload=self.policy.offload)
        self.k = [None] * config.n_layers  # full attention: per layer [B, n_kv_heads, S, head_dim]
        self.v = [None] * config.n_layers
        self.kbuf = [None] * config.n_layers  # the buffers self.k / self.v are views of (see append)
        self.vbuf = [None] * config.n_layers
        self.layers = [None] * config.n_layers  # sparse policies: per layer a LayerState
        self.prompt_len = 0
        self.sparse = False  # becomes True once a sparse policy has built its summary
        self.split: BudgetSplit | None = None  # the budget split, set at the prefill
        self.stats = Stats(config.n_layers)
        self.last_selected = [None] * config.n_layers  # per layer [H, S] positions, last decode step

    # ---------------------------------------------------------------- bookkeeping
    @property
    def seq_len(self) -> int:
        if self.sparse:
            ex = self.layers[0].exact
            return self.prompt_len + ex.k.shape[1] - ex.n_prompt
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def budget_line(self) -> str:
        """'budget = 4 sink + 64 local + 64 selected (+ 16 outliers) of 2048 tokens'."""
        if self.split is None:
            return f"budget = all {self.prompt_len} tokens (full attention)"
        return self.split.line()

    # ---------------------------------------------------------------- the model's entry point
    def attend(self, layer, q, k, v, pos):
        if self.sparse:
            return self._decode(layer, q, k, v)
        if self.k[layer] is None and layer == 0:
            self.prompt_len = k.shape[2]  # the first call is the prefill
        self.kbuf[layer], self.k[layer] = append(self.kbuf[layer], self.k[layer], k)  # [B, n_kv_heads, S, d]
        self.vbuf[layer], self.v[layer] = append(self.vbuf[layer], self.v[layer], v)
        out = full_attention(q, self.k[layer], self.v[layer])
        last_layer = layer == self.config.n_layers - 1
        if self.policy.landmarks is not None and last_layer and self.k[0].shape[2] == k.shape[2]:
            self.build()  # end of the prefill: the prompt is complete in every layer
        return out

    # ---------------------------------------------------------------- prefill: build the summary
    @classmethod
    def from_kv(cls, config, rope, k: list, v: list, policy: Policy | None = None, device=None) -> "KVCache":
        """A cache holding the prompt K/V given per layer ([1, n_kv_heads, T, head_dim] each, post-RoPE),
        built for `policy`: the one way to make a cache from existing keys and values (an earlier
        prefill, or synthetic K/V for a benchmark)."""
        if len(k) != config.n_layers or len(v) != config.n_layers or any(t is None for t in k + v):
            raise ValueError(f"from_kv: need K and V for all {config.n_layers} layers")
        new = cls(config, rope, policy, device if device is not None else k[0].device)
        new.k, new.v = list(k), list(v)
        new.prompt_len = k[0].shape[2]
        if new.policy.landmarks is not None:
            new.build()
        return new

    @classmethod
    def from_prefill(cls, cache: "KVCache", policy: Policy, row: int = 0) -> "KVCache":
        """A new cache with `policy`, built from the prompt K/V of an already prefilled cache.

        Lets an evaluation prefill each prompt once and compare every policy on it.
        """
        if cache.sparse or cache.k[0] is None:
            raise ValueError(
                "from_prefill: the cache holds no prompt K/V (prefill it with full attention first)"
            )
        return cls.from_kv(
            cache.config,
            cache.rope,
            [k[row : row + 1] for k in cache.k],
            [v[row : row + 1] for v in cache.v],
            policy,
            cache.device,
        )

    def build(self):
        """Turn the exact prompt K/V (self.k, self.v) into the policy's summary, layer by layer."""
        T = self.k[0].shape[2]
        if self.k[0].shape[0] != 1:
            raise ValueError(
                f"the {self.policy.name} policy holds one sequence; got a batch of {self.k[0].shape[0]}"
            )
        self.prompt_len = T
        self.split = split_budget(self.policy, T)
        if self.split is None:
            warnings.warn(
                f"prompt of {T} tokens is shorter than the {self.policy.label()} budget: "
                "using full attention for it",
                stacklevel=2,
            )
            return
        for layer in range(self.config.n_layers):
            self.layers[layer] = self._build_layer(layer, self.k[layer][0], self.v[layer][0])
            self.k[layer] = self.v[layer] = None  # the exact prompt K/V now live in the store
        self.sparse = True

    def _build_layer(self, layer, k, v) -> LayerState:
        """k, v: [H, T, d] exact post-RoPE prompt keys and values of one layer."""
        p, split = self.policy, self.split
        k_mid, v_mid = k[:, split.middle], v[:, split.middle]  # [H, M, d]
        # 1. the landmarks, and (ShadowKV) the outlier chunks taken out of them
        marks = landmarks.LANDMARKS[p.landmarks].build(k_mid, p)  # N landmarks per KV head
        self.stats.landmark_error[layer] = marks.error
        exact = ExactTokens.build(
            k,
            v,
            split,
            outlier_chunks(marks, split.outlier_chunks)
            if split.outlier_chunks
            else torch.empty(k.shape[0], 0, dtype=torch.long, device=k.device),
        )
        # 2. the middle goes to the offload store; low-rank keys keep only their factors on the device
        if p.keys == "low_rank":
            keys = LowRankKeys.build(k, split, self.rope, p.rank)
        else:
            keys = OffloadedKeys(pre_rope=p.kv_pre_rope)
            pos = torch.arange(split.middle.start, split.middle.stop, device=k.device)  # [M]
            self._offload(layer, "k", self.rope.invert(k_mid, pos) if p.kv_pre_rope else k_mid)
        self._offload(layer, "v", v_mid)
        if p.track:
            self.stats.exact_k[layer] = k_mid  # for recall / mass statistics only, not counted (a view)
        return LayerState(marks, keys, exact)

    def _offload(self, layer, name, x):
        """Put x [H, M, d] in the store: as it is, or quantized with policy.kv_bits (each row packed on
        its own, so the selected rows are fetched still packed: fewer bytes over PCIe). With
        kv_group "token" a row is all H * d channels of a token, one scale group (the paper's K/V)."""
        p = self.policy
        if p.kv_bits is None:
            self.store.put(layer, name, x)
        elif p.kv_group == "head":
            self.store.put(layer, name, quantize.quantize(x, quantize.parse_format(p.kv_bits)))
        else:
            H, M, d = x.shape
            spec = p.kv_bits if ":" in p.kv_bits else f"{p.kv_bits}:g{H * d}"  # one group: the whole token
            rows = x.transpose(0, 1).reshape(1, M, H * d)  # [1, M, H*d] token-major
            self.store.put(layer, name, quantize.quantize(rows, quantize.parse_format(spec)))

    # ---------------------------------------------------------------- decode
    def select(self, layer, qg) -> torch.Tensor:
        """Step 1 of a decode step: the middle rows [H, S] (sorted, relative to the middle) that the
        queries qg [H, G, Tq, d] read: the landmarks' top-k chunks per KV head, expanded to tokens."""
        split = self.split
        scores = landmarks.score(qg, self.layers[layer].marks, self.policy.score_rule)  # [H, N]
        chunks = landmarks.select_topk(scores, split.k_chunks)  # [H, k_chunks]
        if split.chunk == 1:
            return chunks
        return (chunks[:, :, None] * split.chunk + torch.arange(split.chunk, device=qg.device)).flatten(
            1
        )  # [H, S]

    def _decode(self, layer, q, k, v):
        """One decode step of one layer: select, fetch, attend (PAPER.md "ShadowKV, precisely")."""
        st = self.layers[layer]
        B, n_heads, Tq, d = q.shape
        H = k.shape[1]
        G = n_heads // H
        st.exact.append(k[0], v[0])  # the new tokens are attended exactly from now on
        qg = q[0].view(H, G, Tq, d)  # [H, G, Tq, d] the query heads of each KV head's group

        # 1. Score the landmarks, keep the top-k chunks per KV head.
        idx = self.select(layer, qg)  # [H, S] middle rows

        # 2. Start fetching the selected rows from CPU memory (async on a GPU) ...
        token_rows = self.policy.kv_bits is not None and self.policy.kv_group == "token"
        fetch = self.store.fetch(layer, st.keys.fetched, idx.reshape(1, -1) if token_rows else idx)

        # 3. ... and meanwhile attend to the exact tokens on the device.
        qf = qg.reshape(H, G * Tq, d)  # [H, G*Tq, d]
        mask = None
        if Tq > 1:  # new token i of Tq sees the prompt and the generated tokens up to itself
            L = st.exact.k.shape[1]
            mask = torch.ones(Tq, L, dtype=torch.bool, device=q.device).tril(L - Tq).repeat(G, 1)  # [G*Tq, L]
        out_a, lse_a = attention_lse(qf, st.exact.k, st.exact.v, mask)

        # 4. The selected keys (fetched, or rebuilt), attention over them, the two softmaxes merged.
        got = fetch.wait()  # per name [H, S, d] (dequantized if stored packed)
        if token_rows:  # [1, H*S, H*d] whole tokens: keep head h's channels of the rows head h selected
            got = [t.view(H, -1, H, d).diagonal(dim1=0, dim2=2).permute(2, 0, 1) for t in got]  # [H, S, d]
        got = dict(zip(st.keys.fetched, got))
        sel_k = st.keys.selected(got, idx, self.split, self.rope, q.dtype)  # [H, S, d] post-RoPE
        out_b, lse_b = attention_lse(qf, sel_k, got["v"])
        out = merge_attention(out_a, lse_a, out_b, lse_b)  # [H, G*Tq, d]

        self.last_selected[layer] = idx + self.split.sink  # [H, S] absolute positions
        if self.policy.track:
            self._track(layer, qg, idx, sel_k, st)
        return out.view(1, n_heads, Tq, d).to(q.dtype)

    def _track(self, layer, qg, idx, sel_k, st):
        """Selection recall against the oracle, attention mass captured, key rebuild error.

        One exact pass: the logits of the query against the exact middle keys give both the
        oracle's selection (same rule, same budget) and, with the exact tokens, the exact attention
        weights whose share on the attended tokens is the attention mass.
        """
        H, G, Tq, d = qg.shape
        split = self.split
        k_mid = self.stats.exact_k[layer]  # [H, M, d]
        logits = landmarks.landmark_logits(qg, k_mid)  # [H, G, Tq, M]
        oracle = landmarks.select_topk(landmarks.scores_from_logits(logits), split.selected)  # [H, S]
        attended = idx
        if split.outlier_chunks:  # ShadowKV also attends its outlier tokens exactly
            out_pos = (
                st.exact.prompt_pos[:, split.sink : split.sink + split.outlier_tokens] - split.sink
            )  # [H, n_out*c]
            attended = torch.cat([idx, out_pos], dim=1)
        hit = torch.zeros(k_mid.shape[:2], dtype=torch.bool, device=k_mid.device).scatter_(
            1, attended, True
        )  # [H, M]
        recall = hit.gather(1, oracle).float().mean(1)  # [H]
        # exact attention weights of the last query position over prompt middle + exact tokens
        q_last = qg[:, :, -1:]  # later generated tokens are masked for earlier queries: use the last one
        logits_rest = landmarks.landmark_logits(q_last, st.exact.k)  # [H, G, 1, F + Tg]
        lse = torch.logsumexp(torch.cat([logits[:, :, -1:], logits_rest], dim=-1), dim=-1, keepdim=True)
        mass = ((logits[:, :, -1:] - lse).exp() * hit[:, None, None]).sum(-1) + (logits_rest - lse).exp().sum(
            -1
        )
        key_err = None
        if self.policy.keys == "low_rank":
            true_k = k_mid.gather(1, idx[..., None].expand(-1, -1, d)).float()
            key_err = ((sel_k.float() - true_k).pow(2).sum() / true_k.pow(2).sum()).item()
        self.stats.add(layer, recall, mass.mean((1, 2)), key_err)

    # ---------------------------------------------------------------- memory accounting
    def memory(self, exact_bytes=2) -> dict:
        """Bytes on the device and offloaded, from the real tensors (packed codes, not copies).

        Counts the prompt's cache only (generated tokens are the same for every policy). Exact
        (unquantized) tensors count `exact_bytes` per value: 2 = bf16, the paper's accounting, in
        whatever dtype this run computes; None = their real size. `full_bf16` is the exact prompt
        K/V in bf16, the reference of every fraction; the device share splits into
        `summary_fraction` (landmarks, low-rank factors: what the paper's ~14% and ~6.6% count)
        and `exact_fraction` (sink, local window and outlier tokens kept exact).
        """

        def size(t):
            if isinstance(t, torch.Tensor):
                return t.numel() * (exact_bytes or t.element_size())
            return quantize.nbytes(t)  # quantized: the packed codes and scales as stored

        cfg = self.config
        T = self.prompt_len or (0 if self.k[0] is None else self.k[0].shape[2])
        full_bf16 = T * cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * 2
        if not self.sparse:
            exact = sum(size(t[:, :, :T]) for t in self.k + self.v if t is not None)
            summary, off = 0, 0
        else:
            summary = sum(
                st.marks.nbytes(exact_bytes) + st.keys.device_bytes(exact_bytes) for st in self.layers
            )
            exact = sum(
                size(st.exact.k[:, : st.exact.n_prompt]) + size(st.exact.v[:, : st.exact.n_prompt])
                for st in self.layers
            )
            off = sum(size(t) for t in self.store.tensors.values())
        dev = summary + exact
        if self.sparse and not self.policy.offload:  # the "store" is on the device
            dev, off = dev + off, 0
        ref = max(full_bf16, 1)
        return dict(
            device=dev,
            offloaded=off,
            full_bf16=full_bf16,
            device_fraction=dev / ref,
            summary_fraction=summary / ref,
            exact_fraction=exact / ref,
        )


class Stats:
    """Per-layer running means of the selection statistics (PAPER.md "The paper's method", the oracle)."""

    def __init__(self, n_layers):
        self.recall = torch.zeros(n_layers)  # sum over steps of the mean over KV heads
        self.mass = torch.zeros(n_layers)
        self.key_err = torch.zeros(n_layers)
        self.steps = torch.zeros(n_layers)
        self.landmark_error = [None] * n_layers  # relative squared error of quantized landmarks
        self.exact_k = [None] * n_layers

    def add(self, layer, recall, mass, key_err):
        self.recall[layer] += recall.mean().item()
        self.mass[layer] += mass.mean().item()
        self.key_err[layer] += key_err or 0.0
        self.steps[layer] += 1

    def summary(self):
        n = self.steps.clamp(min=1)
        errs = [e for e in self.landmark_error if e is not None]
        return dict(
            oracle_recall=(self.recall / n).mean().item(),
            attention_mass=(self.mass / n).mean().item(),
            key_error=(self.key_err / n).mean().item(),
            landmark_error=sum(errs) / len(errs) if errs else 0.0,
            recall_per_layer=(self.recall / n).tolist(),
            mass_per_layer=(self.mass / n).tolist(),
        )


class StackedCache:
    """Several caches behind one batch: row i of every call goes to caches[i].

    Lets an evaluation decode all policies as one batch, reading the weights once per step.
    """

    def __init__(self, caches):
        self.caches = caches

    @property
    def seq_len(self):
        lens = {c.seq_len for c in self.caches}
        if len(lens) != 1:
            raise ValueError(f"stacked caches disagree on the sequence length: {sorted(lens)}")
        return lens.pop()

    def attend(self, layer, q, k, v, pos):
        outs = [
            c.attend(layer, q[i : i + 1], k[i : i + 1], v[i : i + 1], pos) for i, c in enumerate(self.caches)
        ]
        return torch.cat(outs, dim=0)  # [B, n_heads, T, head_dim]


# -------------------------------------------------------------------- attention pieces
def append(buf, cached, new):
    """Write new [..., T, d] after cached [..., S, d] (or None); returns (buffer, view of S + T rows).

    buf is this cache's own buffer (None at first), with spare rows behind the cached ones and grown
    by a quarter when full, so a decode step writes one row instead of copying the whole cache (as
    torch.cat would). A cache never writes into a buffer it does not own (from_prefill shares views).
    """
    if cached is None:
        return None, new
    S, T = cached.shape[-2], new.shape[-2]
    if buf is None or buf.shape[-2] < S + T:
        buf = cached.new_empty(*cached.shape[:-2], S + T + max(64, S // 4), cached.shape[-1])  # [..., cap, d]
        buf[..., :S, :] = cached
    buf[..., S : S + T, :] = new
    return buf, buf[..., : S + T, :]


def full_attention(q, k, v):
    """Causal attention of T new queries over S cached keys (the last T of which are the new ones).

    q: [B, n_heads, T, d]; k, v: [B, n_kv_heads, S, d]. Query head h reads KV head h // group
    (grouped-query attention, without copying K/V per query head).
    """
    T, S = q.shape[2], k.shape[2]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if T == 1:
        return sdpa(q, k, v, enable_gqa=True)
    if T == S:
        return sdpa(q, k, v, is_causal=True, enable_gqa=True)
    # query i (absolute S - T + i) sees keys 0 .. S - T + i
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)  # [T, S]
    return sdpa(q, k, v, attn_mask=mask, enable_gqa=True)


def attention_lse(q, k, v, mask=None):
    """Softmax attention that also returns the log-sum-exp of the scores, so two parts merge exactly.

    q: [H, Q, d]; k, v: [H, L, d]; mask: [Q, L] bool (True = may attend) or None.
    returns out [H, Q, d] (float32), lse [H, Q].
    """
    s = (q.float() / math.sqrt(q.shape[-1])) @ k.float().transpose(1, 2)  # [H, Q, L]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s.softmax(dim=-1) @ v.float(), s.logsumexp(dim=-1)  # [H, Q, d], [H, Q]


def merge_attention(out_a, lse_a, out_b, lse_b):
    """Combine attention over two disjoint key sets: weight each part by its share of the softmax sum."""
    w_a = torch.sigmoid(lse_a - lse_b)[..., None]  # = e^lse_a / (e^lse_a + e^lse_b)
    return torch.lerp(out_b, out_a, w_a)  # out_a * w_a + out_b * (1 - w_a)


# -------------------------------------------------------------------- ShadowKV's low-rank keys
def low_rank_keys(k_pre, rank):
    """Rank-r SVD of the pre-RoPE keys of all KV heads together (ShadowKV).

    k_pre: [H, M, d]. The heads are concatenated into one [M, H*d] matrix and share one basis.
    rank: an int, or a share (< 1) of H*d (ShadowKV: 160 of 1024).
    returns u [M, r] and sv = S V^T [r, H*d], with k_pre ~= (u @ sv) split back into heads.
    """
    H, M, d = k_pre.shape
    r = round(rank * H * d) if rank < 1 else int(rank)
    r = max(1, min(r, H * d, M))
    mat = k_pre.transpose(0, 1).reshape(M, H * d).float()  # [M, H*d]
    U, S, Vh = torch.linalg.svd(mat, full_matrices=False)  # [M, C], [C], [C, H*d]
    # contiguous: LAPACK returns U column-major, and a decode step gathers rows of it
    return U[:, :r].to(k_pre.dtype).contiguous(), (S[:r, None] * Vh[:r]).to(k_pre.dtype)  # [M, r], [r, H*d]


def rebuild_keys(u, sv, idx, H, d):
    """Pre-RoPE keys of rows idx [H, S] of head h from the shared factors: u[idx] @ sv[:, head h]."""
    sv_heads = sv.view(-1, H, d).transpose(0, 1)  # [H, r, d]
    u_rows = u.index_select(0, idx.flatten()).view(*idx.shape, -1)  # [H, S, r]
    return u_rows @ sv_heads  # [H, S, r] @ [H, r, d] -> [H, S, d]
