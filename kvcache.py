"""The KV cache, and the selection policies that decide what each decode step attends to.

The model (model.py) calls, in every layer,

    out = cache.attend(layer, q, k, v, pos)
        q:    [B, n_heads, T, head_dim]     post-RoPE queries of the T new tokens
        k, v: [B, n_kv_heads, T, head_dim]  post-RoPE keys and values of the T new tokens
        pos:  [T] int64                     their absolute positions
        out:  [B, n_heads, T, head_dim]     attention output (before o_proj)

and never needs to know which policy runs. There are two caches:

    FullCache    every token's K/V, exact causal attention: the prefill, and the reference
    SparseCache  built from a prefilled FullCache for a policy (`from_prefill`, `from_kv`): each decode
                 step attends to the tokens kept exact plus the prompt tokens the policy selects

A decode step of a SparseCache (`SparseCache.attend`) is the same for every policy (PAPER.md
"ShadowKV, precisely"):

    1. score the landmarks against the query, keep the top-k chunks per KV head   (landmarks.py)
    2. start fetching the selected rows' values (and keys) from CPU memory        (offload.py)
    3. meanwhile attend to the tokens kept exact on the device                     (ExactTokens)
    4. get the selected keys (fetched, or rebuilt from low-rank factors), attend,  (OffloadedKeys,
       and merge the two softmaxes                                                  LowRankKeys)

A policy is its three parts, each a small dataclass that owns its parameters and their checks:

    Select   what selection scores: the landmark kind, its chunk size and bits, the scoring rule, the budget
    Keys     which keys attention reads: exact (offloaded, maybe quantized) or rank-r SVD rebuilds
    Exact    which tokens stay exact on the device: sink, local window, ShadowKV's outlier chunks

and every name is a preset of them (PRESETS, the same table as the README):

    name        what selection scores                 keys attention reads          always exact
    full        -- (no selection)                     exact, all                    --
    oracle      every exact key (chunk 1)             exact                         local 64
    mean        mean of each chunk of 8 exact keys    exact                         local 64
    svd         every exact key (chunk 1)             rank-r SVD rebuild            local 64
    shadowkv    mean of each chunk of 8 keys          rank-r SVD rebuild            local 32, 48 outlier chunks
    quantized   every key, quantized (2 bits)         exact                         local 64
    paper       every key, quantized (2 bits)         4-bit K/V (pre-RoPE keys)     local 64
    paper_fast  every key, 2 bits, mean-query rule    fp8 K/V                       sink and local 0.625% each
    quest       min / max of each chunk of 16 keys    exact                         local 64
    arkvale     a cuboid per page of 16 keys          exact, pages kept resident    2 + 5 pages
    lrqk        per query head, a low-rank Q/K proxy  exact, per query head, resident  local 64
    infinigen   per query head, skewed partial keys,  exact, per query head         layers 0, 1 dense
                scored with a query speculated one layer ahead

so `mean` isolates the landmark failure, `svd` the low-rank failure, `shadowkv` has both, `quantized`
is the paper's fix (token-level landmarks made cheap by quantization) with exact K/V, `paper` the
paper's full configuration as evaluated (its K/V stored 4-bit as well), `paper_fast` the authors'
fast GPU path (with `arkvale` the only presets with sink tokens), `quest` the canonical query-aware
page-selection baseline, and `arkvale`, `lrqk`, `infinigen` the paper's other baselines as their
authors run them (PAPER.md "The paper's other baselines"). One budget accounting for all (`BudgetSplit`).
"""

import math
import typing
import warnings
from dataclasses import dataclass, field, fields, replace

import torch

import landmarks
import quantize
from offload import OffloadStore

# landmarks.py: TokenKeys, ChunkMeans, QuantizedKeys, QuestBounds, PageCuboids, LowRankQK, SkewedKeys
LANDMARK_KINDS = ("keys", "mean", "quantized", "quest", "pages", "lowrank_qk", "skewed")
CHUNKED_KINDS = ("mean", "quest", "pages")  # one landmark per chunk by nature: the label names the chunk
PER_QUERY_HEAD_KINDS = ("lowrank_qk", "skewed")  # landmarks kept per query head: they select per query head
KEY_SOURCES = ("exact", "low_rank")
SWEEP_AXES = ("budget", "chunk_size", "landmark_bits", "residual", "rank")  # evaluate.py's sweep options


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_count(x) -> bool:
    """A token count: an int >= 0, or a share of the prompt in [0, 1)."""
    return _is_int(x) and x >= 0 or isinstance(x, float) and 0 <= x < 1


# ---------------------------------------------------------------------------------------- the parts
@dataclass(frozen=True)
class Select:
    """What selection scores, and how much it selects (PAPER.md "ShadowKV, precisely", "The paper's method").

    landmarks:     the landmark kind (LANDMARK_KINDS): "keys" (every exact key: the oracle), "mean"
                   (ShadowKV's chunk means), "quantized" (the paper's), "quest" (min / max bounds)
    chunk_size:    tokens per landmark (ShadowKV: 8; the paper's fix: 1)
    landmark_bits: the quantize.parse_format spec of "quantized" landmarks ("2", "fp8", ...)
    residual:      meta-chunk size m of residual landmark quantization (0 = off), the residuals
                   quantized with `residual_bits`
    score_rule:    landmarks.SCORE_RULES: "softmax_max" (ShadowKV's, the paper's as evaluated),
                   "mean_query" (the authors' fast path) or "dot" (ArkVale, LRQK, InfiniGen)
    per:           "kv_head": each KV head selects for its query heads (the paper, ShadowKV, ArkVale);
                   "query_head": each query head selects its own tokens (LRQK, InfiniGen)
    budget:        selected prompt tokens as a share of the prompt (the paper: 3.125%)
    round_up:      select ceil(budget * T / chunk) whole chunks (ArkVale's pages, as its authors count
                   them); False: int(budget * T) tokens rounded down to whole chunks (the paper, ShadowKV)
    min_prompt:    prompts shorter than this are not pruned at all (the fast path: 512)
    qk_rank:       "lowrank_qk" (LRQK): the rank of the joint factorisation, a share of head_dim or an int;
                   None (the preset) = the authors' share for the model's architecture (QK_RANK: 16 of 128
                   for Llama, 32 of 128 for Qwen3; `rank`), and `iterations` of each of its alternating
                   solves (the authors: 2)
    channels:      "skewed" (InfiniGen): the share of head_dim its mask keeps by the queries' and by the
                   keys' magnitude (the two united; the authors: 20% each)
    dense_layers:  the first layers attend to every token, selecting nothing (InfiniGen: 2)
    sweep:         the fields an evaluation sweep may vary for this preset besides the budget (its
                   axes, e.g. ("chunk_size",) for `mean`); not part of the configuration
    """

    landmarks: str
    chunk_size: int = 1
    landmark_bits: str | None = None
    residual: int = 0
    residual_bits: str = quantize.DEFAULT_RESIDUAL_BITS  # "0.5", the paper's
    score_rule: str = "softmax_max"
    per: str = "kv_head"
    budget: float = 0.03125
    min_prompt: int = 0
    round_up: bool = False
    qk_rank: float | None = None
    iterations: int = 2
    channels: float = 0.2
    dense_layers: int = 0
    sweep: tuple = field(default=(), compare=False, repr=False)

    @property
    def axes(self) -> tuple:
        return ("budget",) + self.sweep  # every sparse policy sweeps its budget

    @property
    def needs_queries(self) -> bool:
        """Whether the landmarks are built from the prefill's queries too (LRQK): the prefill keeps them."""
        return self.landmarks == "lowrank_qk"

    @property
    def asks(self) -> tuple:
        """What selection needs from the model at a decode step besides q, k, v: InfiniGen scores layer
        L with a query speculated from layer L - 1's input ("next_query"; model.Transformer.forward)."""
        return ("next_query",) if self.landmarks == "skewed" else ()

    @property
    def needs_calibration(self) -> bool:
        """Whether the landmarks need a calibration of the model (InfiniGen's skews, skew.py)."""
        return self.landmarks == "skewed"

    @property
    def steps_only(self) -> bool:
        """Whether selection depends on the state the last decode step left: LRQK fits each new query to
        the rows resident from the last step, and updates its factors (LowRankQK.step). Such a policy
        cannot select every position of a known answer at once: a teacher-forced block
        (SparseCache.attend_forced) selects its positions one after the other, as the decode loop does.
        Its updates amplify last-bit differences (the loop's and the pass's products round apart), so
        its rows through the two paths agree at the start of an answer and drift apart later (README,
        "The teacher-forced pass")."""
        return self.landmarks == "lowrank_qk"

    @property
    def is_exact_top_k(self) -> bool:
        """Whether this is the oracle's own rule: every exact key a landmark, scored softmax_max per KV
        head. Its selection is then the one the tracking pass computes as the oracle's
        (SparseCache.attend)."""
        return (self.landmarks, self.chunk_size, self.score_rule, self.per) == (
            "keys",
            1,
            "softmax_max",
            "kv_head",
        )

    def check(self):
        if self.landmarks not in LANDMARK_KINDS:
            raise ValueError(f"unknown landmarks {self.landmarks!r}: choose from {', '.join(LANDMARK_KINDS)}")
        if not 0 < self.budget <= 1:
            raise ValueError(f"budget {self.budget} is out of range: give a share of the prompt in (0, 1]")
        if not _is_int(self.chunk_size) or self.chunk_size < 1:
            raise ValueError(f"chunk_size {self.chunk_size!r} must be an int >= 1")
        for name in ("residual", "min_prompt", "dense_layers"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} {getattr(self, name)!r} must be an int >= 0")
        if self.per not in landmarks.GRANULARITIES:
            raise ValueError(f"unknown per {self.per!r}: choose from {', '.join(landmarks.GRANULARITIES)}")
        if self.landmarks in PER_QUERY_HEAD_KINDS and self.per != "query_head":
            raise ValueError(
                f"{self.landmarks} landmarks are kept per query head: they need per='query_head'"
            )
        if self.score_rule == "mean_query" and self.per != "kv_head":
            raise ValueError("the mean_query rule scores with a group's mean query: it needs per='kv_head'")
        if self.landmarks == "lowrank_qk":
            r = self.qk_rank
            if r is not None and (r <= 0 or (r > 1 and r != int(r))):
                raise ValueError(f"qk_rank {r!r} must be an int >= 1 or a share of head_dim in (0, 1]")
            if not _is_int(self.iterations) or self.iterations < 1:
                raise ValueError(f"iterations {self.iterations!r} must be an int >= 1")
        if self.landmarks == "skewed" and not (
            isinstance(self.channels, int | float)
            and not isinstance(self.channels, bool)
            and 0 < self.channels <= 1
        ):
            raise ValueError(f"channels {self.channels!r} must be a share of head_dim in (0, 1]")
        if self.score_rule not in landmarks.SCORE_RULES:
            raise ValueError(
                f"unknown score_rule {self.score_rule!r}: choose from {', '.join(landmarks.SCORE_RULES)}"
            )
        if self.landmarks == "quantized":
            if self.landmark_bits is None:
                raise ValueError("quantized landmarks need landmark_bits (e.g. '2')")
            quantize.parse_format(self.landmark_bits)  # raises on an unknown format
            if self.residual:
                quantize.parse_format(self.residual_bits)

    def params(self) -> dict:
        """The fields that change what is selected, each only where it applies (the canonical form)."""
        p = dict(landmarks=self.landmarks, chunk_size=self.chunk_size)
        if self.landmarks == "quantized":
            p.update(landmark_bits=self.landmark_bits, residual=self.residual)
            if self.residual:
                p.update(residual_bits=self.residual_bits)
        if self.landmarks == "lowrank_qk":
            p.update(qk_rank=self.qk_rank, iterations=self.iterations)
        if self.landmarks == "skewed":
            p.update(channels=self.channels)
        p.update(score_rule=self.score_rule)
        if self.per != "kv_head":
            p.update(per=self.per)
        p.update(budget=self.budget, min_prompt=self.min_prompt)
        p |= dict(round_up=True) if self.round_up else {}
        return p | (dict(dense_layers=self.dense_layers) if self.dense_layers else {})

    def label(self, preset: "Select", without=None) -> list:
        """Label pieces: the preset's sweep axes, and whatever differs from the preset ('2b', 'c8');
        never the field `without` (a plot's legend names a line without the axis it sweeps)."""
        named = set(self.sweep) | {f for f in self.params() if getattr(self, f) != getattr(preset, f)}
        named.discard(without)
        pieces = [self.landmarks] if "landmarks" in named else []
        if "landmark_bits" in named and self.landmark_bits is not None:
            bits = self.landmark_bits
            pieces.append(f"{bits}b" if bits.isdigit() else bits)
        if "chunk_size" in named and (self.chunk_size != 1 or self.landmarks in CHUNKED_KINDS):
            pieces.append(f"c{self.chunk_size}")
        if named & {"residual", "residual_bits"} and self.residual:
            pieces.append(f"res{self.residual}x{self.residual_bits}")
        if "score_rule" in named:
            pieces.append(self.score_rule)
        if "min_prompt" in named:
            pieces.append(f"min{self.min_prompt}")
        for name, short in (
            ("qk_rank", "r"),
            ("iterations", "it"),
            ("channels", "ch"),
            ("dense_layers", "dense"),
        ):
            if name in named:
                pieces.append(f"{short}{getattr(self, name):g}")
        if "per" in named:
            pieces.append(f"per-{self.per.replace('_', '-')}")
        return pieces  # the budget has its own column and its own place in a configuration's key

    def qk_share(self, arch=None) -> float:
        """LRQK's rank as given (a share of head_dim, or an int), or the authors' share for the model's
        architecture `arch` (config.json's `architectures`; QK_RANK) when the policy leaves it to them."""
        return self.qk_rank if self.qk_rank is not None else QK_RANK.get(arch, QK_RANK_DEFAULT)

    def rank(self, head_dim: int, arch=None) -> int:
        """LRQK's rank on a model of this head_dim and architecture (it may round to 0: see check_fit)."""
        share = self.qk_share(arch)
        return round(share * head_dim) if share <= 1 else int(share)

    def build(self, k_mid, prefill: "LayerPrefill") -> landmarks.Landmarks:
        """The landmarks of one layer's middle keys k_mid [H, M, d] (post-RoPE): N per KV head (or per
        query head); LRQK and InfiniGen read more of the prefill (`LayerPrefill`)."""
        if self.landmarks == "keys":
            return landmarks.TokenKeys.build(k_mid)
        if self.landmarks == "mean":
            return landmarks.ChunkMeans.build(k_mid, self.chunk_size)
        if self.landmarks == "quest":
            return landmarks.QuestBounds.build(k_mid, self.chunk_size)
        if self.landmarks == "pages":
            return landmarks.PageCuboids.build(k_mid, self.chunk_size)
        if self.landmarks == "lowrank_qk":
            d = k_mid.shape[-1]
            r = self.rank(d, prefill.arch)
            if not 1 <= r <= d:
                raise ValueError(
                    f"qk_rank {self.qk_share(prefill.arch):g} gives rank {r}: it must be 1 to head_dim = {d}"
                )
            return landmarks.LowRankQK.build(prefill.q, prefill.k, prefill.middle, r, self.iterations)
        if self.landmarks == "skewed":
            return landmarks.SkewedKeys.build(k_mid, prefill.skew, prefill.mask)
        return landmarks.QuantizedKeys.build(
            k_mid, self.chunk_size, self.landmark_bits, self.residual, self.residual_bits
        )


@dataclass(frozen=True)
class Keys:
    """Which keys attention reads (PAPER.md "ShadowKV, precisely", "Confirmed against the authors' code").

    source:      "exact": offloaded with the values and fetched with them; "low_rank": ShadowKV's rank-r
                 SVD factors of the pre-RoPE keys on the device, the selected keys rebuilt and re-RoPE'd
    rank:        rank of "low_rank" keys, an int or a share (< 1) of kv_heads * head_dim (ShadowKV: 160
                 of 1024 = 0.15625)
    kv_bits:     None = the offloaded K/V are kept exact; else a quantize.parse_format spec ("4",
                 "int4", "fp8", ...): stored quantized, fetched packed, dequantized on the device
    kv_group:    "head": each KV head's row of a token is quantized on its own; "token": all
                 kv_heads * head_dim channels of a token form one row and one scale group (the paper)
    kv_pre_rope: store the keys before RoPE (the paper: quantize pre-RoPE keys, RoPE the fetched rows)
    resident:    keep the rows selected at a step on the device and fetch, at the next step, only the
                 selected rows not already there (ArkVale's pages, LRQK's per-query-head cache: hits and
                 misses); False fetches every selected row at every step
    sweep:       the fields a sweep may vary for this preset (("rank",) for `svd`); not part of the
                 configuration
    """

    source: str = "exact"
    rank: float | None = None
    kv_bits: str | None = None
    kv_group: str = "head"
    kv_pre_rope: bool = False
    resident: bool = False
    sweep: tuple = field(default=(), compare=False, repr=False)

    @property
    def axes(self) -> tuple:
        return self.sweep

    def check(self):
        if self.source not in KEY_SOURCES:
            raise ValueError(f"unknown keys source {self.source!r}: choose from {', '.join(KEY_SOURCES)}")
        if self.source == "low_rank":
            r = self.rank
            if r is None or isinstance(r, bool) or r <= 0 or (r >= 1 and r != int(r)):
                raise ValueError(f"rank {r!r} must be an int >= 1 or a share of the channels in (0, 1)")
        if self.kv_group not in ("head", "token"):
            raise ValueError(f"kv_group {self.kv_group!r} must be 'head' or 'token'")
        if (self.kv_group == "token" or self.kv_pre_rope) and self.kv_bits is None:
            raise ValueError("kv_group='token' and kv_pre_rope describe quantized K/V: give kv_bits too")
        if self.kv_bits is not None:
            quantize.parse_format(self.kv_bits)  # raises on an unknown format
        if self.resident and self.kv_group == "token":
            raise ValueError(
                "a resident set keeps rows per head: it cannot hold whole-token rows (kv_group='token')"
            )

    def params(self) -> dict:
        p = dict(source=self.source)
        if self.source == "low_rank":
            p.update(rank=self.rank)
        p.update(kv_bits=self.kv_bits)
        if self.kv_bits is not None:
            p.update(kv_group=self.kv_group, kv_pre_rope=self.kv_pre_rope)
        return p | (dict(resident=True) if self.resident else {})

    def label(self, preset: "Keys", without=None) -> list:
        """Label pieces: 'r0.15625' (the rank, where swept), 'kv4' (K/V bits other than the preset's)."""
        named = set(self.sweep) | {f for f in self.params() if getattr(self, f) != getattr(preset, f)}
        named.discard(without)
        pieces = [self.source] if "source" in named else []
        if "rank" in named and self.rank is not None:
            pieces.append(f"r{self.rank:g}")
        if "kv_bits" in named:
            pieces.append(f"kv{self.kv_bits or 'exact'}")
        if "kv_group" in named:
            pieces.append(f"g{self.kv_group}")
        if "kv_pre_rope" in named:
            pieces.append("pre-rope" if self.kv_pre_rope else "post-rope")
        if "resident" in named:
            pieces.append("resident" if self.resident else "refetch")
        return pieces


@dataclass(frozen=True)
class Exact:
    """Which prompt tokens every decode step attends exactly, on the device, besides the selection.

    sink, local: the first `sink` and last `local` prompt tokens: an int, or a share of the prompt
                 below 1 (the paper: no sink, local window 64; ShadowKV: local 32)
    outliers:    ShadowKV's outlier chunks (the chunks whose mean stands worst for their keys, removed
                 from the landmarks): an int count (ShadowKV: 48), a share of the prompt's tokens below 1
                 (to scale the count to short prompts), or "budget" = 48 chunks per 2048 selected tokens

    Its tokens take no place in a label: the budget line printed with every result states them.
    """

    sink: int | float = 0
    local: int | float = 64
    outliers: int | float | str = 0

    def check(self):
        for name in ("sink", "local"):
            if not _is_count(getattr(self, name)):
                raise ValueError(
                    f"{name} {getattr(self, name)!r} must be an int >= 0 or a share of the prompt in [0, 1)"
                )
        if not (_is_count(self.outliers) or self.outliers == "budget"):
            raise ValueError(
                f"outliers {self.outliers!r} must be an int >= 0 or a share of the prompt in [0, 1) or 'budget'"
            )

    def params(self) -> dict:
        return dict(sink=self.sink, local=self.local, outliers=self.outliers)


@dataclass(frozen=True)
class Policy:
    """What a cache keeps and how it selects: its three parts. Build one with `make_policy(name, ...)`.

    select: None = no selection: full attention. offload: keep the prompt's K/V in CPU memory
    (offload.py); False keeps all on the device (the reference the offloaded path is checked against).
    track: record selection statistics against the oracle (costs an exact scoring pass). Neither
    changes what is computed, so neither is part of the configuration (`key`).
    """

    name: str = "full"
    select: Select | None = None
    keys: Keys = Keys()
    exact: Exact = Exact()
    offload: bool = True
    track: bool = False

    @property
    def sparse(self) -> bool:
        return self.select is not None

    def parts(self) -> tuple:
        return (self.select, self.keys, self.exact) if self.sparse else ()

    @property
    def axes(self) -> tuple:
        """The sweep axes that apply to this policy (SWEEP_AXES), as its parts declare them."""
        return self.select.axes + self.keys.axes if self.sparse else ()

    def params(self) -> dict:
        """The canonical configuration: the name and every field that changes a result."""
        return dict(name=self.name) | {k: v for part in self.parts() for k, v in part.params().items()}

    def key(self) -> str:
        """The configuration's identity, written out: 'name=mean landmarks=mean chunk_size=8 ...'. Results
        are resumed and merged by it, never by the display label."""
        return " ".join(f"{k}={v}" for k, v in self.params().items())

    def label(self, without: str | None = None) -> str:
        """Short name for tables: 'shadowkv', 'mean c8', 'quantized 2b', 'svd r0.15625', 'oracle kv4': the
        name, the preset's sweep axes and whatever differs from the preset (but the field `without`)."""
        if not self.sparse:
            return self.name
        preset = PRESETS[self.name]
        pieces = self.select.label(preset.select, without) + self.keys.label(preset.keys, without)
        return " ".join([self.name, *pieces])


# --------------------------------------------------------------------------------------- the presets
# One line per policy: its three parts (PAPER.md "ShadowKV, precisely", "The paper's method",
# "Confirmed against the authors' code"; Quest: PAPER.md "Quest"). Every field not named keeps its
# default above. Only paper_fast attends sink tokens (its 0.625% prefix); elsewhere the first tokens
# compete through their landmarks, as in the paper.
CHUNK, RANK, LANDMARK_AXES = ("chunk_size",), ("rank",), ("chunk_size", "landmark_bits", "residual")
SVD = dict(source="low_rank", rank=0.15625)  # ShadowKV's rank: 160 of 1024 channels
Q2 = dict(landmark_bits="2")  # HIGGS 2-bit landmarks (d=4, n=256), the paper's
PAPER_KV = dict(kv_bits="4", kv_group="token", kv_pre_rope=True)  # 4-bit HIGGS over a whole token, pre-RoPE
FAST = dict(score_rule="mean_query", budget=0.015625, min_prompt=512)  # the fast path's rule and split
PER_Q = dict(score_rule="dot", per="query_head")  # LRQK, InfiniGen: each query head its own top tokens
# ArkVale: the dot rule (no softmax), its P pages counted up as its authors count them (PAPER.md "ArkVale")
PAGES = dict(score_rule="dot", round_up=True)
# LRQK's rank, a share of head_dim, by architecture, as the authors set it (PAPER.md "LRQK": 32 of 128 for
# the Qwen3 models, 16 of 128 for Llama-3.1-8B); other architectures, which the authors did not run, and
# K/V given without a model (from_kv) get Llama's share.
QK_RANK = {"Qwen3ForCausalLM": 0.25, "Qwen3MoeForCausalLM": 0.25}
QK_RANK_DEFAULT = 0.125
# ArkVale's sink and window are pages: the first 2 (32 tokens) and the last 5, a partial last page
# included; local=65 gives exactly that (split_budget adds the remainder of the middle to the window).
# fmt: off
PRESETS = {
    "full":       Policy("full"),
    "oracle":     Policy("oracle",     Select("keys"),                                Keys(),                  Exact(local=64)),
    "mean":       Policy("mean",       Select("mean", 8, sweep=CHUNK),                 Keys(),                  Exact(local=64)),
    "svd":        Policy("svd",        Select("keys"),                                Keys(**SVD, sweep=RANK), Exact(local=64)),
    "shadowkv":   Policy("shadowkv",   Select("mean", 8),                             Keys(**SVD),             Exact(local=32, outliers=48)),
    "quantized":  Policy("quantized",  Select("quantized", **Q2, sweep=LANDMARK_AXES), Keys(),                  Exact(local=64)),
    "paper":      Policy("paper",      Select("quantized", **Q2),                     Keys(**PAPER_KV),        Exact(local=64)),
    "paper_fast": Policy("paper_fast", Select("quantized", **Q2, **FAST),             Keys(kv_bits="fp8"),     Exact(sink=0.00625, local=0.00625)),
    "quest":      Policy("quest",      Select("quest", 16, sweep=CHUNK),               Keys(),                  Exact(local=64)),
    "arkvale":    Policy("arkvale",    Select("pages", 16, **PAGES),                   Keys(resident=True),     Exact(sink=32, local=65)),
    "lrqk":       Policy("lrqk",       Select("lowrank_qk", **PER_Q),                  Keys(resident=True),     Exact(local=64)),
    "infinigen":  Policy("infinigen",  Select("skewed", **PER_Q, dense_layers=2),      Keys(),                  Exact(local=0)),
}
# fmt: on
POLICIES = tuple(PRESETS)  # every generic test runs over this list
# ShadowKV's 48 outlier chunks (384 tokens) are sized for long prompts: at the mean Text2JSON prompt of
# 20.1K tokens they are 1.9% of it (PAPER.md "Benchmarks"). On short prompts (the default run's ~2K
# tokens, where 384 tokens would be 18% of the prompt kept exact) pass outliers=OUTLIER_SHARE instead.
OUTLIER_SHARE = 48 * 8 / 20100
_PART_OF = {f.name: part for part, cls in (("select", Select), ("keys", Keys), ("exact", Exact))
            for f in fields(cls) if f.name != "sweep"}  # fmt: skip


def make_policy(name: str, **overrides) -> Policy:
    """The preset for `name` (PRESETS), with any field of its parts overridden (None = keep the
    preset's value), e.g. make_policy("mean", chunk_size=4, budget=0.1, track=True).

    Raises a one-line ValueError for an unknown name or field, or an out-of-range value.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown method {name!r}: choose from {', '.join(POLICIES)}")
    return override(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


def override(policy: Policy, **changes) -> Policy:
    """`policy` with fields of its parts (or offload, track) set to the given values, checked."""
    unknown = set(changes) - set(_PART_OF) - {"offload", "track"}
    if unknown:
        raise ValueError(f"unknown policy field(s) {', '.join(sorted(unknown))}")
    own = {k: changes.pop(k) for k in ("offload", "track") if k in changes}
    if changes and not policy.sparse:
        raise ValueError(
            f"{next(iter(changes))} is a field of a sparse policy; full attention has none (it keeps "
            "every token exact and offloads nothing)"
        )
    parts = {}
    for part in ("select", "keys", "exact"):
        mine = {k: v for k, v in changes.items() if _PART_OF[k] == part}
        if mine:
            parts[part] = replace(getattr(policy, part), **mine)
    p = replace(policy, **parts, **own)
    check(p)
    return p


def oracle_of(p: Policy) -> Policy:
    """The oracle a sparse policy is measured against (PAPER.md "The oracle"): exact top-k of the same
    budget, over the same offloaded K/V format, with the oracle's own scoring rule unless the policy's
    was changed from its preset's (then the oracle's is changed alike: --score-rule changes both)."""
    rule = p.select.score_rule if p.select.score_rule != PRESETS[p.name].select.score_rule else None
    return make_policy("oracle", budget=p.select.budget, score_rule=rule, kv_bits=p.keys.kv_bits)


KIND_WORDS = {
    int: "an int",
    float: "a finite number",
    str: "a string",
    bool: "True or False",
    type(None): "None",
}


def _has_kind(value, kind) -> bool:
    """Whether value is of a field's declared type `kind` (int, float, str, bool, None): an int is not a
    bool, a float is a finite int or float (no NaN, no infinity)."""
    if kind is float:
        return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)
    if kind is int:
        return _is_int(value)
    return value is None if kind is type(None) else isinstance(value, kind)


def check_kinds(obj):
    """Every field of a part (or of the policy) of its declared type (`float | None`...): so a NaN, an
    infinity or a number as text is one ValueError naming the field, not a TypeError deep inside a
    comparison or a NaN that passes every range check."""
    for f in fields(obj):
        if f.name == "sweep":
            continue
        kinds = typing.get_args(f.type) or (f.type,)  # float | None -> (float, NoneType)
        value = getattr(obj, f.name)
        if not any(_has_kind(value, k) for k in kinds):
            raise ValueError(f"{f.name} {value!r} must be {' or '.join(KIND_WORDS[k] for k in kinds)}")


def check(p: Policy):
    """The parts' own checks, and the ones that span two parts."""
    check_kinds(p)
    if not p.sparse:
        return
    for part in p.parts():
        check_kinds(part)
        part.check()
    select, keys = p.select, p.keys
    if p.exact.outliers and select.landmarks != "mean":
        raise ValueError("outlier chunks are ShadowKV's: they need chunk-mean landmarks (landmarks='mean')")
    if select.landmarks == "lowrank_qk" and not keys.resident:
        raise ValueError("LRQK fits its query to the keys on the device: it needs resident=True")
    if select.per == "query_head" and (keys.source == "low_rank" or keys.kv_group == "token"):
        raise ValueError(
            "per-query-head selection reads exact per-head rows: keys source 'exact', kv_group 'head'"
        )


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
    select, exact = policy.select, policy.exact
    c = select.chunk_size
    if T < select.min_prompt:
        return None
    sink = min(_tokens(exact.sink, T), T)
    local = min(_tokens(exact.local, T), T - sink)
    n_chunks = (T - sink - local) // c
    local = T - sink - n_chunks * c
    if select.round_up:  # ArkVale's authors: P = max(1, ceil(budget * T / page)) pages
        selected = max(1, math.ceil(select.budget * T / c)) * c
    else:  # the paper's authors: int(0.03125 * T) tokens, here in whole chunks
        selected = max(c, int(select.budget * T) // c * c)
    if exact.outliers == "budget":  # 48 outlier chunks per 2048 selected tokens (ShadowKV's fast class)
        outliers = round(48 * selected / 2048)
    elif isinstance(exact.outliers, float):  # a share of the prompt's tokens, in whole chunks
        outliers = round(exact.outliers * T / c)
    else:
        outliers = exact.outliers
    if selected + outliers * c > n_chunks * c:
        return None
    return BudgetSplit(T, sink, local, c, n_chunks, selected, outliers, isinstance(exact.outliers, float))


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
    def build(cls, k, rope, rank) -> "LowRankKeys":
        """k: [H, T, d] post-RoPE keys of the WHOLE prompt, as ShadowKV factorises them (the rows of
        the sink and the local window are never rebuilt, but shape the basis); RoPE is undone first."""
        pos = torch.arange(k.shape[1], device=k.device)  # [T]
        return cls(*low_rank_keys(rope.invert(k, pos), rank))

    def device_bytes(self, exact_bytes) -> int:
        return sum(t.numel() * (exact_bytes or t.element_size()) for t in (self.u, self.sv))

    def selected(self, got: dict, idx, split: BudgetSplit, rope, dtype) -> torch.Tensor:
        """The selected keys [H, S, d], post-RoPE. A teacher-forced block asks for every position's rows,
        more than the middle holds: then every middle row is rebuilt once and each position reads its
        own (the same keys for fewer flops)."""
        H, S = idx.shape
        d = self.sv.shape[1] // H
        M = split.n_chunks * split.chunk
        if S > M:
            every = self.selected(got, torch.arange(M, device=idx.device).expand(H, -1), split, rope, dtype)
            return every.gather(1, idx[..., None].expand(-1, -1, d))  # [H, S, d]
        pos = idx + split.sink  # [H, S] prompt positions of the selected middle rows
        pre = rebuild_keys(self.u, self.sv, pos, H, d).to(dtype)  # [H, S, d] pre-RoPE
        return rope.apply(pre.reshape(1, -1, d), pos.flatten()).view(H, S, d)  # post-RoPE


@dataclass
class LayerState:
    """What a sparse policy keeps for one layer after the prefill (batch of one). A dense layer
    (Select.dense_layers) has no landmarks: every prompt token is among its exact tokens."""

    marks: landmarks.Landmarks | None  # [H, N] landmarks (or [H * G, N], per query head)
    keys: OffloadedKeys | LowRankKeys | None
    exact: ExactTokens
    resident: "Resident | None" = None  # Keys.resident: the rows selected at the last step, on the device
    exact_k: torch.Tensor | None = None  # [H, M, d] Policy.track: the exact middle keys the statistics read
    key_err: torch.Tensor | None = None  # [2, H, M] Policy.track, low-rank keys: per middle row its rebuilt
    # key's squared error and its exact key's squared norm (a row's rebuild is the same at every step)


@dataclass
class Resident:
    """The selected rows kept on the device from one decode step to the next (Keys.resident): the next
    step fetches only the rows it selects that are not here (ArkVale's pages, LRQK's cache)."""

    idx: torch.Tensor  # [P, S] sorted middle rows per selecting head (KV head, or query head)
    rows: dict  # name ("k", "v") -> [P, S, d] their fetched values


@dataclass
class LayerPrefill:
    """What a layer's prefill hands the landmarks besides its middle keys: LRQK factorises the prompt's
    queries with its keys, InfiniGen rotates the keys by its calibration (skew.py)."""

    k: torch.Tensor  # [H, T, d] the whole prompt's post-RoPE keys
    middle: slice  # the prompt rows the landmarks stand for
    q: torch.Tensor | None = (
        None  # [n_heads, T, d] the prompt's post-RoPE queries, when the prefill kept them
    )
    skew: torch.Tensor | None = None  # [n_heads, d, d] InfiniGen's skewing matrices of this layer
    mask: torch.Tensor | None = None  # [n_heads, d] bool, its channel mask
    arch: str | None = None  # the model's architecture (LRQK's rank follows it: Select.rank)


# ----------------------------------------------------------------------------------- the two caches
class FullCache:
    """Every token's keys and values and exact causal attention over them: the prefill of every
    policy, and the full-attention reference. A decode step writes one row per layer (see `append`).

    `policy` is full attention, or a sparse policy whose prompt was shorter than its budget (it then
    runs as full attention: `from_kv` says so with a warning). keep_queries: keep the prefill's
    queries too (`q`), for the policies whose landmarks need them (LRQK, Select.needs_queries). arch:
    the architecture of the model that fills it (model.prefill sets it), for what a policy built from
    it sets by architecture (LRQK's rank, Select.rank).
    """

    asks = ()  # nothing beyond q, k, v from the model (see SparseCache.asks)

    def __init__(self, n_layers: int, policy: Policy | None = None, keep_queries: bool = False, arch=None):
        self.policy = policy or PRESETS["full"]
        self.keep_queries = keep_queries
        self.arch = arch
        self.q = [None] * n_layers  # keep_queries: per layer the prefill's [B, n_heads, T, head_dim]
        self.k = [None] * n_layers  # per layer [B, n_kv_heads, S, head_dim]
        self.v = [None] * n_layers
        self.kbuf = [None] * n_layers  # the buffers self.k / self.v are views of (see append)
        self.vbuf = [None] * n_layers
        self.prompt_len = 0  # set by the first call (the prefill)
        self.stats = None  # no selection, nothing to inspect
        self.bytes_fetched = 0  # nothing is offloaded

    @property
    def seq_len(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def attend(self, layer, q, k, v, pos, **asked):
        if self.k[layer] is None:
            if layer == 0:
                self.prompt_len = k.shape[2]  # the first call is the prefill
            if self.keep_queries:
                self.q[layer] = q
            # The model hands k, v as transposed views of [B, T, n_kv_heads, d]. One head-major copy
            # here saves a strided read of the whole prompt at every later step: every policy built
            # from this prefill (from_prefill) scores, gathers and tracks on views of these tensors.
            k, v = k.contiguous(), v.contiguous()  # [B, n_kv_heads, T, d]
        self.kbuf[layer], self.k[layer] = append(self.kbuf[layer], self.k[layer], k)  # [B, n_kv_heads, S, d]
        self.vbuf[layer], self.v[layer] = append(self.vbuf[layer], self.v[layer], v)
        return full_attention(q, self.k[layer], self.v[layer])

    # teacher forcing (SparseCache.attend_forced): exact causal attention is already each position's own
    attend_forced = attend

    def budget_line(self) -> str:
        return f"budget = all {self.prompt_len} tokens (full attention)"

    def memory(self, exact_bytes=2) -> dict:
        """The prompt's K/V, all on the device (see SparseCache.memory for the accounting)."""
        T = self.prompt_len
        if self.k[0] is None:
            return _memory(0, 0, 0, 0)
        _, H, _, d = self.k[0].shape
        exact = sum(t[:, :, :T].numel() * (exact_bytes or t.element_size()) for t in self.k + self.v)
        return _memory(T * len(self.k) * 2 * H * d * 2, 0, exact, 0)


class SparseCache:
    """The cache of a sparse policy, built from a prefill (`from_prefill`, `from_kv`; batch of one):
    per layer the landmarks, the key source and the exact tokens on the device, and the prompt's
    middle K/V in the offload store. Every `attend` is a decode step (PAPER.md "ShadowKV, precisely").
    """

    def __init__(self, policy: Policy, rope, split: BudgetSplit, n_layers: int, device):
        self.policy, self.rope, self.split = policy, rope, split
        self.device = torch.device(device)
        self.store = OffloadStore(self.device, offload=policy.offload)
        self.layers = [None] * n_layers  # per layer a LayerState
        self.prompt_len = split.prompt_len
        # the paper's K/V: one stored row per token, all kv_heads x head_dim channels (Keys.kv_group)
        self.token_rows = policy.keys.kv_group == "token"
        # what the model hands this cache besides q, k, v (model.Transformer.forward): InfiniGen's
        # "next_query", layer L's query computed from layer L - 1's input, at layer L - 1's call
        self.asks = policy.select.asks
        self.speculated = [None] * n_layers  # per layer the query speculated for it [n_heads, Tq, d]
        self.stats = Stats(n_layers, self.device)
        self.last_selected = [None] * n_layers  # per layer [P, S] positions, last decode step

    @property
    def seq_len(self) -> int:
        ex = self.layers[0].exact
        return self.prompt_len + ex.k.shape[1] - ex.n_prompt

    @property
    def bytes_fetched(self) -> int:
        """Bytes moved from CPU memory to the device since the cache was built (the PCIe traffic)."""
        return self.store.bytes_moved

    def budget_line(self) -> str:
        """'budget = 4 sink + 64 local + 64 selected (+ 16 outliers) of 2048 tokens'."""
        dense = self.policy.select.dense_layers
        return self.split.line() + (f"; layers 0-{dense - 1} dense" if dense else "")

    # ---------------------------------------------------------------- prefill: build the summary
    def build_layer(self, layer, k, v, prefill: LayerPrefill) -> LayerState:
        """k, v: [H, T, d] exact post-RoPE prompt keys and values of one layer."""
        p, split = self.policy, self.split
        if layer < p.select.dense_layers:  # a dense layer: every prompt token exact, nothing selected
            every = torch.arange(k.shape[1], device=k.device).expand(k.shape[0], -1)  # [H, T]
            return LayerState(None, None, ExactTokens(k, v, every))
        k_mid, v_mid = k[:, split.middle], v[:, split.middle]  # [H, M, d]
        # 1. the landmarks, and (ShadowKV) the outlier chunks taken out of them
        marks = p.select.build(k_mid, prefill)  # N landmarks per KV head (or per query head)
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
        if p.keys.source == "low_rank":
            keys = LowRankKeys.build(k, self.rope, p.keys.rank)
        else:
            keys = OffloadedKeys(pre_rope=p.keys.kv_pre_rope)
            pos = torch.arange(split.middle.start, split.middle.stop, device=k.device)  # [M]
            self._offload(layer, "k", self.rope.invert(k_mid, pos) if p.keys.kv_pre_rope else k_mid)
        self._offload(layer, "v", v_mid)
        # the exact middle keys, for the recall / mass statistics only (a view, not counted)
        state = LayerState(marks, keys, exact, exact_k=k_mid if p.track else None)
        if p.track and p.keys.source == "low_rank":  # and how far each rebuilt key is from its exact one
            every = torch.arange(k_mid.shape[1], device=k.device).expand(k.shape[0], -1)  # [H, M]
            rebuilt = keys.selected({}, every, split, self.rope, k.dtype).float()  # [H, M, d]
            state.key_err = torch.stack(
                [(rebuilt - k_mid.float()).pow(2).sum(-1), k_mid.float().pow(2).sum(-1)]
            )
        if isinstance(marks, landmarks.LowRankQK):  # LRQK's prefill selects with its last query's A_Q
            state.resident = self._first_selection(marks, k_mid, v_mid)
        return state

    def _first_selection(self, marks, k_mid, v_mid) -> Resident:
        """LRQK's prefill selection (PAPER.md "LRQK"): each query head's top tokens by the last prompt
        query's coordinates, put on the device from the prefill's own K/V (nothing is fetched)."""
        H = k_mid.shape[0]
        P = marks.first.shape[0]
        q_first = marks.first.view(H, P // H, 1, -1)  # [H, G, 1, r]
        scores = landmarks.score(q_first, marks, "dot", "query_head")  # [P, M]
        idx = landmarks.select_topk(scores, self.split.selected)  # [P, S]
        head = torch.arange(P, device=idx.device)[:, None] // (P // H)  # [P, 1] each query head's KV head
        return Resident(idx, {"k": k_mid[head, idx], "v": v_mid[head, idx]})  # [P, S, d] each

    def _offload(self, layer, name, x):
        """Put x [H, M, d] in the store: as it is, or quantized with Keys.kv_bits (each row packed on
        its own, so the selected rows are fetched still packed: fewer bytes over PCIe). With
        kv_group "token" a row is all H * d channels of a token, one scale group (the paper's K/V)."""
        kv_bits = self.policy.keys.kv_bits
        if kv_bits is None:
            self.store.put(layer, name, x)
        elif not self.token_rows:
            self.store.put(layer, name, quantize.quantize(x, quantize.parse_format(kv_bits)))
        else:
            H, M, d = x.shape
            spec = kv_bits if ":" in kv_bits else f"{kv_bits}:g{H * d}"  # one group: the whole token
            rows = x.transpose(0, 1).reshape(1, M, H * d)  # [1, M, H*d] token-major
            self.store.put(layer, name, quantize.quantize(rows, quantize.parse_format(spec)))

    # ---------------------------------------------------------------- decode
    def select(self, layer, qg, each_position=False) -> torch.Tensor:
        """Step 1 of a decode step: the middle rows [P, S] (sorted, relative to the middle) that the
        selection query qg [H, G, Tq, d] reads: the landmarks' top-k chunks per KV head (P = H), or per
        query head (P = H * G, Select.per), expanded to tokens. each_position (the teacher-forced pass,
        `attend_forced`): every one of the Tq positions selects its own rows by the same rule, [P, Tq, S]."""
        split, select = self.split, self.policy.select
        marks = self.layers[layer].marks
        scores = landmarks.score(qg, marks, select.score_rule, select.per, each_position)  # [P, (Tq,) N]
        chunks = landmarks.select_topk(scores.flatten(0, -2), split.k_chunks)  # [P (* Tq), k_chunks]
        chunks = chunks.view(*scores.shape[:-1], -1)  # [P, (Tq,) k_chunks]
        if split.chunk == 1:
            return chunks
        return (chunks[..., None] * split.chunk + torch.arange(split.chunk, device=qg.device)).flatten(
            -2
        )  # [P, (Tq,) S]

    def attend(self, layer, q, k, v, pos, next_query=None):
        """One decode step of one layer: select, fetch, attend (PAPER.md "ShadowKV, precisely").
        next_query [1, n_heads, Tq, d]: the model's speculation of the next layer's query, when asked."""
        st = self.layers[layer]
        B, n_heads, Tq, d = q.shape
        H = k.shape[1]
        G = n_heads // H
        if next_query is not None and layer + 1 < len(self.layers):
            self.speculated[layer + 1] = next_query[0]  # [n_heads, Tq, d]
        qg = q[0].view(H, G, Tq, d)  # [H, G, Tq, d] the query heads of each KV head's group
        qf = qg.reshape(H, G * Tq, d)  # [H, G*Tq, d]
        q_select = self._selection_query(layer, st, qg, k) if st.marks is not None else None
        st.exact.append(k[0], v[0])  # the new tokens are attended exactly from now on
        mask = None
        if Tq > 1:  # new token i of Tq sees the prompt and the generated tokens up to itself
            L = st.exact.k.shape[1]
            mask = torch.ones(Tq, L, dtype=torch.bool, device=q.device).tril(L - Tq).repeat(G, 1)  # [G*Tq, L]
        if st.marks is None:  # a dense layer: every token is exact
            out, _ = attention_lse(qf, st.exact.k, st.exact.v, mask)
            if self.policy.track:
                every = torch.ones(H, 1, device=q.device)  # [H, 1] all attended, all of the mass
                self.stats.add(layer, every, every)
            return out.view(1, n_heads, Tq, d).to(q.dtype)

        # 1. Score the landmarks, keep the top-k chunks per KV head (or per query head).
        exact = self._exact_pass(layer, qg) if self.policy.track else None
        if exact is not None and self.policy.select.is_exact_top_k and not self.split.outlier_chunks:
            # The speed-up of a tracked oracle: its selection is the tracking pass's oracle, token for
            # token (same logits, same rule, same budget), so the exact scores are computed once, not
            # once to select and again to track.
            idx = exact[2]  # [H, S] the oracle's selection
        else:
            idx = self.select(layer, q_select)  # [P, S] middle rows

        # 2. Start fetching the selected rows from CPU memory (async on a GPU) ...
        fetch = self._start_fetch(layer, st, idx)

        # 3. ... and meanwhile attend to the exact tokens on the device.
        out_a, lse_a = attention_lse(qf, st.exact.k, st.exact.v, mask)

        # 4. The selected keys (fetched, or rebuilt), attention over them, the two softmaxes merged.
        got = self._finish_fetch(st, idx, fetch, d)  # per name [P, S, d] (dequantized if stored packed)
        sel_k = st.keys.selected(got, idx, self.split, self.rope, q.dtype)  # [P, S, d] post-RoPE
        if idx.shape[0] == H:
            out_b, lse_b = attention_lse(qf, sel_k, got["v"])
        else:  # each query head attends to its own selection
            out_b, lse_b = attention_lse(qg.reshape(H * G, Tq, d), sel_k, got["v"])  # [P, Tq, d], [P, Tq]
            out_b, lse_b = out_b.view(H, G * Tq, d), lse_b.view(H, G * Tq)
        out = merge_attention(out_a, lse_a, out_b, lse_b)  # [H, G*Tq, d]

        self.last_selected[layer] = idx + self.split.sink  # [P, S] absolute positions
        if self.policy.track:  # one selection for the step; its attention mass at its last position
            probs, lse, oracle = exact  # [H, G, Tq, M], [H, G, Tq, 1], [H, S]
            last = (probs[:, :, -1:], lse[:, :, -1:], oracle[:, None])  # ..., [H, 1, S]
            self._track(layer, qg[:, :, -1:], idx[:, None], st, last)
        return out.view(1, n_heads, Tq, d).to(q.dtype)

    def attend_forced(self, layer, q, k, v, pos, next_query=None):
        """A teacher-forced block of one layer: the Tq new tokens are the next tokens of a known answer
        (the gold-forced rows of an evaluation, PAPER.md "Gold-forced rows"), and each selects, fetches
        and attends as its own decode step would (`attend` with one token): scores [P, Tq, N], the top-k
        of every position, its own rows, and the answer tokens up to itself. So one call does the work
        of Tq decode steps in a few large ops; only the shapes of the products change, so only the last
        bits may. A policy whose selection depends on the state the last step left (Select.steps_only:
        LRQK) selects its positions one after the other inside the block (`_step_selections`); its
        attention is batched like every other's.

        Unlike `attend` with Tq > 1 (one multi-token query step: the positions select once, together,
        their scores summed: PAPER.md "ShadowKV, precisely"), no position here sees a later one.
        """
        st = self.layers[layer]
        B, n_heads, Tq, d = q.shape
        H = k.shape[1]
        G = n_heads // H
        split = self.split
        if next_query is not None and layer + 1 < len(self.layers):
            self.speculated[layer + 1] = next_query[0]  # [n_heads, Tq, d]
        qg = q[0].view(H, G, Tq, d)  # [H, G, Tq, d]
        qf = qg.reshape(H, G * Tq, d)  # [H, G*Tq, d]
        stepping = st.marks is not None and self.policy.select.steps_only
        if stepping:  # LRQK: steps 1 and 2 position by position, each token joining after its selection
            idx, got = self._step_selections(layer, st, qg, k, v)  # [P, Tq, S], per name [P, Tq*S, d]
        else:
            q_select = self._selection_query(layer, st, qg, k) if st.marks is not None else None
            st.exact.append(k[0], v[0])  # the block's tokens: position i sees the prompt and the answer to i
        L = st.exact.k.shape[1]
        mask = torch.ones(Tq, L, dtype=torch.bool, device=q.device).tril(L - Tq).repeat(G, 1)  # [G*Tq, L]
        if st.marks is None:  # a dense layer: every token is exact
            out, _ = attention_lse(qf, st.exact.k, st.exact.v, mask)
            if self.policy.track:
                every = torch.ones(H, Tq, device=q.device)  # [H, Tq] all attended, all of the mass
                self.stats.add(layer, every, every)
            return out.view(1, n_heads, Tq, d).to(q.dtype)

        # 1. Each position scores the landmarks and keeps its own top-k chunks; 2. fetch every position's
        # rows (resident ones: only what the position before did not hold). (LRQK: done above.)
        exact = self._exact_pass(layer, qg, each_position=True) if self.policy.track else None
        if not stepping:
            if exact is not None and self.policy.select.is_exact_top_k and not split.outlier_chunks:
                idx = exact[2]  # [H, Tq, S] the oracle's selections (see `attend`)
            else:
                idx = self.select(layer, q_select, each_position=True)  # [P, Tq, S] middle rows
            rows = idx.flatten(1)  # [P, Tq*S]
            if self.policy.keys.resident:
                got = self._fetch_resident_forced(layer, st, idx)  # per name [P, Tq*S, d]
            else:
                got = self._finish_fetch(st, rows, self._start_fetch(layer, st, rows), d)
        P, _, S = idx.shape

        # 3. Attention over the exact tokens, causal over the answer ...
        out_a, lse_a = attention_lse(qf, st.exact.k, st.exact.v, mask)  # [H, G*Tq, d], [H, G*Tq]

        # 4. ... and each position over its own selected rows: a batch of P * Tq attentions, merged.
        sel_k = st.keys.selected(got, idx.view(P, Tq * S), split, self.rope, q.dtype)  # [P, Tq*S, d]
        rows_k, rows_v = sel_k.reshape(P * Tq, S, d), got["v"].reshape(P * Tq, S, d)  # [P*Tq, S, d]
        if P == H:  # the G query heads of a KV head's group share its selection
            out_b, lse_b = attention_lse(qg.transpose(1, 2).reshape(H * Tq, G, d), rows_k, rows_v)
            out_b = out_b.view(H, Tq, G, d).transpose(1, 2).reshape(H, G * Tq, d)  # [H, G*Tq, d]
            lse_b = lse_b.view(H, Tq, G).transpose(1, 2).reshape(H, G * Tq)  # [H, G*Tq]
        else:  # each query head attends its own selection
            out_b, lse_b = attention_lse(qg.reshape(P * Tq, 1, d), rows_k, rows_v)  # [P*Tq, 1, d], [P*Tq, 1]
            out_b, lse_b = out_b.view(H, G * Tq, d), lse_b.view(H, G * Tq)
        out = merge_attention(out_a, lse_a, out_b, lse_b)  # [H, G*Tq, d]

        self.last_selected[layer] = idx + split.sink  # [P, Tq, S] absolute positions
        if self.policy.track:
            self._track(layer, qg, idx, st, exact)
        return out.view(1, n_heads, Tq, d).to(q.dtype)

    def _step_selections(self, layer, st, qg, k, v):
        """Steps 1 and 2 of a teacher-forced block for a policy whose selection depends on the state the
        last step left (Select.steps_only, LRQK: each new query is fitted to the rows resident from the
        last step, and its factors move with every step): one position after the other, as its decode
        steps would (`_selection_query`, `select`, the resident fetch), each position's token joining
        the exact tokens after its own selection. Returns idx [P, Tq, S] and per name the rows
        [P, Tq*S, d]; the attention over them is batched by the caller."""
        H, G, Tq, d = qg.shape
        idx, rows = [], {}
        for i in range(Tq):
            q_now = self._selection_query(layer, st, qg[:, :, i : i + 1], k[:, :, i : i + 1])  # [H, G, 1, r]
            st.exact.append(k[0, :, i : i + 1], v[0, :, i : i + 1])
            idx.append(self.select(layer, q_now))  # [P, S]
            got = self._finish_fetch(st, idx[-1], self._start_fetch(layer, st, idx[-1]), d)  # [P, S, d] each
            for name, t in got.items():
                rows.setdefault(name, []).append(t)
        return torch.stack(idx, dim=1), {n: torch.stack(t, dim=1).flatten(1, 2) for n, t in rows.items()}

    def _fetch_resident_forced(self, layer, st, idx) -> dict:
        """The rows of a teacher-forced block for a policy that keeps them resident (Keys.resident:
        ArkVale's pages): position i finds on the device what position i - 1 selected (the block's first
        position: what the last call left, st.resident), as its decode step would, and only the other
        rows, the misses, are fetched and counted. A row selected again is the bytes fetched at the start
        of its run (or resident from the last call): every copy of a (head, row) is the same, so each
        selected row is read from any of them. Returns per name [P, Tq*S, d]; leaves st.resident as the
        block's last position has it, and counts the hits."""
        P, Tq, S = idx.shape
        H, M = st.exact.k.shape[0], self.split.n_chunks * self.split.chunk
        before = idx[:, :-1]  # [P, Tq - 1, S] the selection each later position finds on the device
        if st.resident is not None:
            before = torch.cat([st.resident.idx[:, None], before], dim=1)  # [P, Tq, S]
        after = idx[:, Tq - before.shape[1] :].contiguous()  # [P, T', S] the positions that have one
        slot = torch.searchsorted(before.contiguous(), after).clamp_(max=S - 1)  # [P, T', S]
        hit = torch.zeros_like(idx, dtype=torch.bool)  # [P, Tq, S]
        hit[:, Tq - before.shape[1] :] = before.gather(2, slot) == after
        miss = (~hit).nonzero(as_tuple=True)  # ([n], [n], [n]): head, position and place of each miss
        names = st.keys.fetched
        fetched = self.store.fetch(layer, names, idx[miss], heads=miss[0] // (P // H)).wait()  # [n, d] each
        head = torch.arange(P, device=idx.device)
        have = miss[0] * M + idx[miss]  # [n] (head, row) of each fetched copy
        sources = dict(zip(names, fetched))
        if st.resident is not None:  # the rows the last call left on the device
            have = torch.cat([(head[:, None] * M + st.resident.idx).flatten(), have])  # [P*S + n]
            sources = {n: torch.cat([st.resident.rows[n].flatten(0, 1), sources[n]]) for n in names}
        have, order = have.sort(stable=True)
        want = (head[:, None, None] * M + idx).flatten()  # [P*Tq*S]
        at = order[torch.searchsorted(have, want)]  # each selected row's copy
        rows = {n: sources[n][at].view(P, Tq * S, -1) for n in names}  # [P, Tq*S, d]
        st.resident = Resident(
            idx[:, -1], {n: r.view(P, Tq, S, -1)[:, -1].contiguous() for n, r in rows.items()}
        )
        self.stats.add_hits(int(hit.sum()), hit.numel())
        return rows

    def _selection_query(self, layer, st, qg, k) -> torch.Tensor:
        """The query step 1 scores the landmarks with, [H, G, Tq, d']: this step's own query; the one the
        model speculated one layer earlier (InfiniGen); or, for LRQK, its coordinates q^, fitted to the
        keys on the device before this step's token joins them (LowRankQK.step)."""
        H, G, Tq, d = qg.shape
        if "next_query" in self.asks:
            if self.speculated[layer] is None:
                raise ValueError(
                    f"layer {layer}: the model handed no next_query for it; decode through model.forward, "
                    "which hands a cache what its `asks` names"
                )
            return self.speculated[layer].view(H, G, Tq, d)
        if not isinstance(st.marks, landmarks.LowRankQK):
            return qg
        if Tq != 1:
            raise ValueError("LRQK fits each new query on its own: decode one token per step")
        res = st.resident  # the rows selected at the last step, per query head [P, S, d]
        pos = torch.cat(
            [
                st.exact.prompt_pos,
                self.prompt_len
                + torch.arange(st.exact.k.shape[1] - st.exact.n_prompt, device=qg.device).expand(H, -1),
            ],
            dim=1,
        )  # [H, F + Tg]
        on_device = torch.cat([res.rows["k"], st.exact.k.repeat_interleave(G, dim=0)], dim=1)  # [P, R, d]
        pos = torch.cat([res.idx + self.split.sink, pos.repeat_interleave(G, dim=0)], dim=1)  # [P, R]
        q_hat = st.marks.step(qg.reshape(H * G, 1, d), k[0].repeat_interleave(G, dim=0), on_device, pos)
        return q_hat.view(H, G, 1, -1)  # [H, G, 1, r]

    def _start_fetch(self, layer, st, idx):
        """Step 2: start copying the rows idx [P, S] selects from CPU memory; returns (plan, Fetch).
        A query head reads its KV head's rows. With Keys.resident only the rows not on the device from
        the last step are fetched (the misses); `plan` says where each row comes from."""
        names, (P, S), H = st.keys.fetched, idx.shape, st.exact.k.shape[0]
        if self.token_rows:  # the paper's K/V: whole tokens, one row each
            return None, self.store.fetch(layer, names, idx.reshape(1, -1))
        if not self.policy.keys.resident:
            return None, self.store.fetch(layer, names, idx.view(H, -1))  # [H, S] or [H, G*S] rows
        res = st.resident
        if res is None:  # the first step: nothing is on the device yet
            hit = torch.zeros(P, S, dtype=torch.bool, device=idx.device)
            slot = None
        else:
            slot = torch.searchsorted(res.idx, idx).clamp_(max=S - 1)  # [P, S] where each row would be
            hit = res.idx.gather(1, slot) == idx  # [P, S]
        miss = (~hit).nonzero(as_tuple=True)  # ([n], [n]): selecting head and place of each miss
        fetch = self.store.fetch(layer, names, idx[miss], heads=miss[0] // (P // H))  # [n, d] each
        return (hit, slot, miss), fetch

    def _finish_fetch(self, st, idx, pending, d) -> dict:
        """Step 4's input: wait for the fetch; per name the selected rows [P, S, d] (dequantized)."""
        plan, fetch = pending
        names, (P, S), H = st.keys.fetched, idx.shape, st.exact.k.shape[0]
        got = fetch.wait()
        if self.token_rows:  # [1, H*S, H*d] whole tokens: keep head h's channels of the rows head h selected
            got = [t.view(H, -1, H, d).diagonal(dim1=0, dim2=2).permute(2, 0, 1) for t in got]  # [H, S, d]
            return dict(zip(names, got))
        if plan is None:
            return {name: t.view(P, S, -1) for name, t in zip(names, got)}  # [P, S, d]
        hit, slot, miss = plan
        rows = {}
        for name, fetched in zip(names, got):
            out = fetched.new_empty(P, S, fetched.shape[-1])  # [P, S, d]
            if slot is not None:  # the hits, from where they sat at the last step
                kept = st.resident.rows[name].gather(1, slot[..., None].expand(-1, -1, out.shape[-1]))
                out[hit] = kept[hit]
            out[miss] = fetched
            rows[name] = out
        st.resident = Resident(idx, rows)
        self.stats.add_hits(int(hit.sum()), hit.numel())
        return rows

    def _exact_pass(self, layer, qg, each_position=False):
        """The tracking pass: the softmax of the queries qg [H, G, Tq, d] over every exact middle key,
        probs [H, G, Tq, M], with its log-sum-exp [H, G, Tq, 1] (for the attention mass, `_track`), and the
        oracle's selection from them at this policy's budget, [H, S] (PAPER.md "The paper's method", the
        oracle), or each position's, [H, Tq, S]."""
        logits = landmarks.landmark_logits(qg, self.layers[layer].exact_k)  # [H, G, Tq, M]
        probs = logits.softmax(dim=-1)  # [H, G, Tq, M]
        # the largest probability is exp(max logit - lse): the lse without another pass over the logits
        lse = logits.amax(dim=-1, keepdim=True) - probs.amax(dim=-1, keepdim=True).log()  # [H, G, Tq, 1]
        scores = landmarks.softmax_max(probs, each_position)  # [H, (Tq,) M]
        oracle = landmarks.select_topk(scores.flatten(0, -2), self.split.selected)  # [H (* Tq), S]
        return probs, lse, oracle.view(*scores.shape[:-1], -1)  # ..., [H, (Tq,) S]

    def _track(self, layer, qg, idx, st, exact):
        """Selection recall against the oracle, attention mass captured, key rebuild error, at Ts query
        positions: qg [H, G, Ts, d] their queries, idx [P, Ts, S] the middle rows each attends, exact =
        (probs [H, G, Ts, M], lse [H, G, Ts, 1], oracle [H, Ts, S]) from _exact_pass. A decode step
        tracks its one selection at its last position (Ts = 1); a teacher-forced block (`attend_forced`)
        each position's own (Ts = Tq), each position seeing the answer up to itself. The key error reads
        each selected row's from LayerState.key_err (low-rank keys: a row is rebuilt alike at every step).

        One exact pass: the softmax of the query over the exact middle keys gives both the oracle's
        selection (same rule, same budget) and, with the exact tokens, the exact attention weights whose
        share on the attended tokens is the attention mass: the weight on (selected + outlier) middle
        tokens + sink + local + generated, over the weight on every token, each counted once (ShadowKV's
        outlier tokens are middle tokens that also sit among the exact ones). A policy that selects per
        query head is scored per query head: its recall is the share of its KV head's oracle tokens each
        query head attends, its mass each query head's own.
        """
        H, G, Ts, d = qg.shape
        split = self.split
        k_mid = self.layers[layer].exact_k  # [H, M, d]
        probs, lse_mid, oracle = exact  # [H, G, Ts, M], [H, G, Ts, 1], [H, Ts, S]
        attended = idx
        if split.outlier_chunks:  # ShadowKV also attends its outlier tokens exactly
            out_pos = (
                st.exact.prompt_pos[:, split.sink : split.sink + split.outlier_tokens] - split.sink
            )  # [H, n_out*c]
            attended = torch.cat([idx, out_pos[:, None].expand(-1, Ts, -1)], dim=2)  # [H, Ts, S + n_out*c]
        P = idx.shape[0]
        hit = torch.zeros(P, Ts, k_mid.shape[1], dtype=torch.bool, device=k_mid.device).scatter_(
            2, attended, True
        )  # [P, Ts, M]
        if P == H:
            recall = hit.gather(2, oracle).float().mean(2)  # [H, Ts]
            attended = attended[:, None].expand(-1, G, -1, -1)  # [H, G, Ts, S'] each query head's rows
        else:  # per query head
            per_q = hit.view(H, G, Ts, -1)  # [H, G, Ts, M]
            recall = per_q.gather(3, oracle[:, None].expand(-1, G, -1, -1)).float().mean((1, 3))  # [H, Ts]
            attended = attended.view(H, G, Ts, -1)  # [H, G, Ts, S']
        # the exact softmax over prompt middle + exact tokens: the middle's weights are probs * e^(lse_mid - lse)
        rest = st.exact.k
        if split.outlier_chunks:  # the outlier tokens are in the middle already: count them once
            rest = torch.cat([rest[:, : split.sink], rest[:, split.sink + split.outlier_tokens :]], dim=1)
        logits_rest = landmarks.landmark_logits(qg, rest)  # [H, G, Ts, sink + local + Tg]
        if Ts > 1:  # position i of a forced block sees the answer up to itself (the last Ts exact tokens)
            R = rest.shape[1]
            sees = torch.ones(Ts, R, dtype=torch.bool, device=qg.device).tril(R - Ts)  # [Ts, R]
            logits_rest = logits_rest.masked_fill(~sees, float("-inf"))
        lse = torch.logaddexp(lse_mid, logits_rest.logsumexp(dim=-1, keepdim=True))  # [H, G, Ts, 1]
        middle = probs.gather(3, attended).sum(-1) * (lse_mid - lse)[..., 0].exp()  # [H, G, Ts]
        mass = middle + (logits_rest - lse).exp().sum(-1)  # [H, G, Ts]
        key_err = None
        if st.key_err is not None:  # low-rank keys: the selected rows' squared error over their norm
            err, norm = st.key_err.gather(2, idx.flatten(1).expand(2, -1, -1)).view(
                2, *idx.shape
            )  # [2, H, Ts, S]
            key_err = err.sum((0, 2)) / norm.sum((0, 2))  # [Ts]
        self.stats.add(layer, recall, mass.mean(1), key_err)

    # ---------------------------------------------------------------- memory accounting
    def memory(self, exact_bytes=2) -> dict:
        """Bytes on the device and offloaded, from the real tensors (packed codes, not copies).

        Counts the prompt's cache only (generated tokens are the same for every policy). Exact
        (unquantized) tensors count `exact_bytes` per value: 2 = bf16, the paper's accounting, in
        whatever dtype this run computes; None = their real size. `full_bf16` is the exact prompt
        K/V in bf16, the reference of every fraction; the device share splits into
        `summary_fraction` (landmarks, low-rank factors: what the paper's ~14% and ~6.6% count),
        `exact_fraction` (sink, local window and outlier tokens kept exact; every token of a dense
        layer) and `resident_fraction` (Keys.resident: the rows selected at the last step, kept on the
        device for the next one, one per selected token and selecting head; none before the first step).
        """

        def size(t):
            if isinstance(t, torch.Tensor):
                return t.numel() * (exact_bytes or t.element_size())
            return quantize.nbytes(t)  # quantized: the packed codes and scales as stored

        H, _, d = self.layers[0].exact.k.shape
        full_bf16 = self.prompt_len * len(self.layers) * 2 * H * d * 2
        sparse = [st for st in self.layers if st.marks is not None]
        summary = sum(st.marks.nbytes(exact_bytes) + st.keys.device_bytes(exact_bytes) for st in sparse)
        exact = sum(
            size(st.exact.k[:, : st.exact.n_prompt]) + size(st.exact.v[:, : st.exact.n_prompt])
            for st in self.layers
        )
        resident = sum(size(t) for st in sparse if st.resident is not None for t in st.resident.rows.values())
        off = sum(size(t) for t in self.store.tensors.values())
        if not self.policy.offload:  # the "store" is on the device
            return _memory(full_bf16, 0, exact, summary, resident, on_device=off)
        return _memory(full_bf16, off, exact, summary, resident)


def _memory(full_bf16, offloaded, exact, summary, resident=0, on_device=0) -> dict:
    dev = summary + exact + resident + on_device
    ref = max(full_bf16, 1)
    return dict(
        device=dev,
        offloaded=offloaded,
        full_bf16=full_bf16,
        device_fraction=dev / ref,
        summary_fraction=summary / ref,
        exact_fraction=exact / ref,
        resident_fraction=resident / ref,
    )


def from_kv(
    k: list,
    v: list,
    policy: Policy | None = None,
    rope=None,
    device=None,
    q=None,
    calibration=None,
    arch=None,
):
    """The cache of `policy` holding the prompt K/V given per layer ([1, n_kv_heads, T, head_dim] each,
    post-RoPE; `rope` is the model's, which low-rank and pre-RoPE keys need): the one way to make a
    cache from existing keys and values (an earlier prefill, or synthetic K/V for a benchmark).
    q: the prompt's queries per layer ([1, n_heads, T, head_dim]), for the policies whose landmarks
    need them (LRQK); calibration: InfiniGen's skews and masks (skew.calibration) for "skewed" ones;
    arch: the model's architecture (config.json's `architectures`), for LRQK's rank (Select.rank).

    A SparseCache, or a FullCache for full attention and for a prompt shorter than the policy's
    budget (with a warning: it has nothing to select from).
    """
    policy = policy or PRESETS["full"]
    if not k or len(k) != len(v) or any(t is None for t in k + v):
        raise ValueError("from_kv: need the K and V of every layer")
    T = k[0].shape[2]
    split = split_budget(policy, T) if policy.sparse else None
    if split is None:
        if policy.sparse:
            warnings.warn(
                f"prompt of {T} tokens is shorter than the {policy.label()} budget: using full attention for it",
                stacklevel=2,
            )
        full = FullCache(len(k), policy)
        full.k, full.v, full.prompt_len = list(k), list(v), T
        return full
    if k[0].shape[0] != 1:
        raise ValueError(f"the {policy.name} policy holds one sequence; got a batch of {k[0].shape[0]}")
    if policy.select.needs_queries and (q is None or any(t is None for t in q)):
        raise ValueError(
            f"the {policy.name} policy builds its landmarks from the prefill's queries too: prefill a "
            "FullCache(n_layers, keep_queries=True), or give q"
        )
    if policy.select.needs_calibration:
        _check_calibration(calibration, policy, len(k), k[0].shape[-1])
    cache = SparseCache(policy, rope, split, len(k), device if device is not None else k[0].device)
    for layer in range(len(k)):
        prefill = LayerPrefill(k[layer][0], split.middle, q=None if q is None else q[layer][0], arch=arch)
        if calibration is not None:
            prefill.skew, prefill.mask = calibration["skew"][layer], calibration["mask"][layer]
        cache.layers[layer] = cache.build_layer(layer, k[layer][0], v[layer][0], prefill)
    return cache


def _check_calibration(calibration, policy, n_layers, head_dim):
    """A calibration must be there, be of this model's shape ([n_layers, n_heads, d, d] skews), and be
    fitted with the policy's `channels` (its mask decides the channels: the field would do nothing)."""
    if calibration is None:
        raise ValueError(
            f"the {policy.name} policy needs its calibration of the model (skew.calibration(model, tokenizer)): "
            "pass calibration="
        )
    L, _, d, _ = calibration["skew"].shape
    if (L, d) != (n_layers, head_dim):
        raise ValueError(
            f"the calibration is of a model with {L} layers and head_dim {d}, not this one's {n_layers} and "
            f"{head_dim}: calibrate this model (skew.calibration)"
        )
    fitted = calibration.get("channels")  # the mask it holds was chosen with this share, not the policy's
    if fitted != policy.select.channels:
        raise ValueError(
            f"the {policy.name} policy asks for channels={policy.select.channels!r}, and the calibration "
            f"passed was fitted with channels={fitted!r}, whose mask it would use instead: pass "
            f"skew.calibration(model, tokenizer, channels={policy.select.channels!r})"
        )


def from_prefill(prefill: FullCache, policy: Policy, rope, row: int = 0, calibration=None):
    """The cache of `policy` built from the prompt K/V of row `row` of a prefilled FullCache: an
    evaluation prefills each prompt once and compares every policy on it (views, not copies). The
    prefill's queries, if it kept them, go along (LRQK needs them), and so does the architecture of the
    model that filled it (LRQK's rank); calibration: see from_kv."""
    if not isinstance(prefill, FullCache) or prefill.k[0] is None:
        raise ValueError("from_prefill: the cache holds no prompt K/V (prefill a FullCache first)")
    rows = lambda ts: None if ts[0] is None else [t[row : row + 1] for t in ts]
    return from_kv(
        rows(prefill.k),
        rows(prefill.v),
        policy,
        rope,
        q=rows(prefill.q),
        calibration=calibration,
        arch=prefill.arch,
    )


class Stats:
    """Per-layer running means of the selection statistics (PAPER.md "The paper's method", the oracle)."""

    def __init__(self, n_layers, device="cpu"):
        # The sums stay on the cache's device, a step adding 0-d tensors in place: reading each
        # statistic out with .item() would make every tracked layer of every step wait for the GPU.
        self.recall = torch.zeros(n_layers, device=device)  # [n_layers] sum over steps of the head mean
        self.mass = torch.zeros(n_layers, device=device)
        self.key_err = torch.zeros(n_layers, device=device)
        self.steps = torch.zeros(n_layers, device=device)
        self.landmark_error = [None] * n_layers  # relative squared error of quantized landmarks
        self.hits = 0  # Keys.resident: selected rows that were on the device already ...
        self.selected = 0  # ... of all the rows selected

    def add_hits(self, hits, selected):
        self.hits += hits
        self.selected += selected

    def add(self, layer, recall, mass, key_err=None):
        """Ts decode positions of one layer: recall and mass per head and position ([H, Ts] each), key_err
        per position ([Ts]) or None. Each position counts once, as one decode step: the mean over the
        heads of a position, summed over the positions."""
        self.recall[layer] += recall.mean(0).sum()
        self.mass[layer] += mass.mean(0).sum()
        if key_err is not None:
            self.key_err[layer] += key_err.sum()
        self.steps[layer] += recall.shape[1]

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
            hit_rate=self.hits / self.selected if self.selected else None,
        )


class StackedCache:
    """Several caches behind one batch: row i of every call goes to caches[i].

    Lets an evaluation decode all policies as one batch, reading the weights once per step.
    """

    def __init__(self, caches):
        self.caches = caches
        self.asks = tuple(sorted({a for c in caches for a in getattr(c, "asks", ())}))

    @property
    def seq_len(self):
        lens = {c.seq_len for c in self.caches}
        if len(lens) != 1:
            raise ValueError(f"stacked caches disagree on the sequence length: {sorted(lens)}")
        return lens.pop()

    def attend(self, layer, q, k, v, pos, **asked):
        outs = [
            c.attend(
                layer,
                q[i : i + 1],
                k[i : i + 1],
                v[i : i + 1],
                pos,
                **{a: t[i : i + 1] for a, t in asked.items()},
            )
            for i, c in enumerate(self.caches)
        ]
        return torch.cat(outs, dim=0)  # [B, n_heads, T, head_dim]


class TeacherForced:
    """A cache fed a known answer several tokens per call (teacher forcing: the gold-forced rows of an
    evaluation, PAPER.md "Gold-forced rows"): the model's `attend` calls go to the cache's
    `attend_forced`, where each new token selects, fetches and attends as its own decode step would.
    model(answer_ids, TeacherForced(cache)) is then the decode loop's arithmetic in one forward."""

    def __init__(self, cache):
        self.cache = cache
        self.asks = cache.asks

    @property
    def seq_len(self) -> int:
        return self.cache.seq_len

    def attend(self, layer, q, k, v, pos, **asked):
        return self.cache.attend_forced(layer, q, k, v, pos, **asked)


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
