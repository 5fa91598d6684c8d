"""Landmarks: how decode-time attention finds the prompt tokens that matter without reading all keys.

A landmark is a small stand-in for one or more prompt keys, kept on the device and scored against the
query at every decode step (PAPER.md "The problem"). Each kind below is one small dataclass that
builds itself from a layer's exact post-RoPE prompt keys (`build`), gives the query's logit for every
landmark (`logits`), and counts the bytes it keeps on the device (`nbytes`):

    kind            one landmark per            stands for                                used by
    TokenKeys       token                       the exact key                             oracle, svd
    ChunkMeans      chunk of c tokens           the mean of the chunk's keys              mean, shadowkv
    QuantizedKeys   token (or chunk)            the key (or mean) quantized, ~2 bits      quantized, paper
    QuestBounds     chunk of c tokens           the element-wise min and max of keys      quest
    PageCuboids     page of c tokens            a cuboid around the page's keys           arkvale
    LowRankQK       token, per query head       r coordinates of a joint Q/K factorisation lrqk
    SkewedKeys      token, per query head       the key rotated by a skew, some channels  infinigen

`score` turns the logits into one score per landmark and KV head (ShadowKV's softmax / sum / max rule,
the authors' fast mean-query rule, or plain dot products averaged over the group), or per query head
for the kinds that select per query head, and `select_topk` keeps the best ones.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

import quantize
from quantize import quantized_dot

# ---------------------------------------------------------------------------------------------------
# Landmarks and scoring
# ---------------------------------------------------------------------------------------------------


def chunk_landmarks(k: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """ShadowKV's landmarks: the mean key of each chunk of `chunk` consecutive tokens, per KV head.

    k: [H, T, d] (post-RoPE keys). Returns landmarks [H, N, d] (k's dtype, mean computed in float32)
    and min_cos [H, N] float32, the lowest cosine similarity between a chunk's landmark and its keys:
    ShadowKV keeps the chunks with the lowest value exactly, as outliers, because their mean is a poor
    stand-in for their keys. With chunk 1 every key is its own landmark (the paper's setting).
    """
    if k.dim() != 3:
        raise ValueError(f"chunk_landmarks: expected keys [H, T, d], got shape {tuple(k.shape)}")
    H, T, d = k.shape
    if chunk < 1 or T % chunk:
        raise ValueError(
            f"chunk_landmarks: T={T} tokens must be a positive multiple of chunk={chunk}; "
            "trim or pad the keys"
        )
    kc = k.float().reshape(H, T // chunk, chunk, d)  # [H, N, chunk, d]
    means = kc.mean(dim=2)  # [H, N, d]
    if chunk == 1:
        return means.to(k.dtype), torch.ones(H, T, device=k.device)
    cos = torch.nn.functional.cosine_similarity(kc, means.unsqueeze(2), dim=-1, eps=1e-8)  # [H, N, chunk]
    return means.to(k.dtype), cos.amin(dim=-1)


def landmark_logits(q: Tensor, landmarks) -> Tensor:
    """q.L / sqrt(d) for every query head, position and landmark: [H_kv, G, Tq, N] float32."""
    H, G, Tq, d = q.shape
    q = q.float().reshape(H, G * Tq, d) / math.sqrt(
        d
    )  # [H, G*Tq, d]: scale the few queries, not the N logits
    if isinstance(landmarks, Tensor):  # a batched matmul reads the landmarks transposed, without a copy
        logits = q @ landmarks.float().transpose(1, 2)  # [H, G*Tq, N]
    else:
        logits = quantized_dot(q, landmarks)  # [H, G*Tq, N]
    return logits.view(H, G, Tq, -1)


def scores_from_logits(logits: Tensor, each_position: bool = False) -> Tensor:
    """[H_kv, G, Tq, N] logits -> [H_kv, N]: softmax over N, sum over the Tq positions, max over the group.
    each_position: no sum, one score row per position, [H_kv, Tq, N] (see `score`)."""
    return softmax_max(logits.softmax(dim=-1), each_position)


def softmax_max(probs: Tensor, each_position: bool = False) -> Tensor:
    """The rest of the rule, from the softmax probs [H_kv, G, Tq, N]: [H_kv, N] or [H_kv, Tq, N]."""
    if each_position:
        return probs.amax(dim=1)  # [H, Tq, N]
    per_head = probs[:, :, 0] if probs.shape[2] == 1 else probs.sum(dim=2)  # [H, G, N] (one position: no sum)
    return per_head.amax(dim=1)  # [H, N]


def select_topk(scores: Tensor, k: int) -> Tensor:
    """The k best indices per row of scores [H, N], sorted ascending; [H, k] int64.

    Ties are deterministic: among equal scores the lower index wins. (Found without sorting the N
    scores, which a decode step would pay at every layer: the k-th largest value is a threshold;
    everything above it is in, the ties at it are taken lowest index first, and reading the mask in
    order gives the indices already sorted. torch.topk finds that value, on one CPU thread faster
    than kthvalue, which copies and partitions the whole row: 21 against 26 us for 64 of 2,000
    scores per row, 49 against 101 us for 250 of 8,000, the same at 64,000. Its order among ties is
    never used, only the value.)
    """
    if scores.dim() != 2:
        raise ValueError(f"select_topk: expected scores [H, N], got shape {tuple(scores.shape)}")
    N = scores.shape[1]
    if not 0 <= k <= N:
        raise ValueError(f"select_topk: k={k} must be between 0 and the number of candidates N={N}")
    H = scores.shape[0]
    if k == 0:
        return torch.empty(H, 0, dtype=torch.int64, device=scores.device)
    kth = scores.topk(k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)  # [H, 1] the k-th largest
    keep = scores >= kth  # [H, N]
    counts = keep.sum(dim=1)  # [H] k, or more when scores tie the k-th
    # A nan ranks above every number in topk, so a row holding one has kth = nan, keeps nothing and
    # counts 0: the rare cases, behind one check (one GPU sync), include it.
    if bool((counts != k).any()):
        if bool(scores.isnan().any()):
            raise ValueError("select_topk: scores contain nan")
        # ties at the k-th score: take them lowest index first
        above = scores > kth  # [H, N]
        ties = keep & ~above  # [H, N]
        room = k - above.sum(dim=1, keepdim=True)  # [H, 1] places left for the tied scores
        keep = above | (ties & (ties.cumsum(dim=1) <= room))  # [H, N], exactly k per row
    return keep.nonzero()[:, 1].view(H, k)  # [H, k], ascending within each row


# ---------------------------------------------------------------------------------------------------
# The landmark kinds (one kind, one entry)
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One parameter of a landmark kind: a field of a policy that only this kind reads, given by name
    (policy.make_policy("lrqk", qk_rank=0.25), policy.Select's `kind_params`), part of the configuration's
    key, and of its label where it differs from the preset's."""

    name: str
    default: object
    types: tuple  # the types a value may take: (float, NoneType) for a float or None (policy.check_kinds)
    ok: Callable = lambda value: True  # whether a value of the right type is in range
    must: str = ""  # what `ok` asks, for the one-line error ("must be an int >= 1")
    short: str = ""  # the label piece, short + value ("r0.25", "it3"); "" = the kind writes its own


@dataclass
class Landmarks:
    """What every kind has: N landmarks per KV head (or per query head: `per_query_head`), some of which
    may be taken out of selection (`removed`: ShadowKV's outlier chunks, kept exact instead), the
    relative squared error of the landmarks against what they stand for (`error`: quantized kinds), and
    their bytes on the device.

    A kind adds its tensors, `from_prefill` (from a layer's middle keys, its chunk size, its own
    parameters and what else of the prefill it reads), `logits` (the query's logit for every landmark,
    per query head and position: for most kinds q.L / sqrt(d)) and `shape`, and declares, as class
    attributes, its name, its parameters and what it needs: the policy (policy.Select) asks the kind and
    never compares its name. Adding a kind is one class here and its line in KINDS (tests/test_policy.py
    adds one)."""

    removed: Tensor | None = field(default=None, kw_only=True)  # [H, N] bool
    error: float | None = field(default=None, kw_only=True)

    name = ""  # the kind's name in a policy (Select.landmarks) and in KINDS
    params = ()  # its own parameters (Param), besides the chunk size every kind is given
    per_token = False  # one landmark per token by nature: the chunk size must be 1
    chunked = False  # one landmark per chunk by nature: a label names the chunk size even at 1
    per_query_head = False  # kept per query head: each query head selects its own tokens (Select.per)
    needs_queries = False  # built from the prefill's queries too: the prefill keeps them (FullCache)
    needs_calibration = False  # built from a calibration of the model (skew.py)
    asks = ()  # what scoring needs from the model at a step besides q, k, v: ("next_query",)
    stateful = False  # selection reads the state the last step left, started at the prefill (`start`)
    needs_resident = False  # that state includes the rows selected at the last step (Keys.resident)
    outliers = False  # ranks its chunks by how badly their landmark stands for them (ShadowKV's outliers)
    exact = False  # every exact key is its own landmark: with the softmax_max rule, the oracle's selection

    @classmethod
    def check_params(cls, values: dict):
        """Raise a one-line ValueError for a parameter out of range (values: name -> value, every param)."""
        for p in cls.params:
            if not p.ok(values[p.name]):
                raise ValueError(f"{p.name} {values[p.name]!r} {p.must}")

    @classmethod
    def canonical(cls, values: dict) -> dict:
        """The parameters that change what is selected, in declaration order: the configuration's key."""
        return {p.name: values[p.name] for p in cls.params}

    @classmethod
    def label(cls, values: dict, named: set) -> list:
        """Label pieces for the parameters in `named` (those that differ from the preset, or are swept)."""
        return [
            f"{p.short}{values[p.name]:g}"
            for p in cls.params
            if p.name in named and values[p.name] is not None
        ]

    @classmethod
    def from_prefill(cls, k: Tensor, chunk: int, values: dict, prefill: "LayerPrefill") -> "Landmarks":
        """The landmarks of one layer's middle keys k [H, M, d] (post-RoPE)."""
        raise NotImplementedError

    @classmethod
    def cannot_run(cls, values: dict, head_dim: int, arch=None) -> str | None:
        """Why these parameters cannot run on a model of this head_dim and architecture (the end of a
        sentence that begins "the <policy> policy's "), or None: checked before any work."""
        return None

    def tensors(self) -> list:
        """The tensors this kind keeps on the device."""
        raise NotImplementedError

    def nbytes(self, exact_bytes: int | None) -> int:
        """Bytes on the device: `exact_bytes` per value (2 = bf16, the paper's accounting), None = as stored."""
        return sum(t.numel() * (exact_bytes or t.element_size()) for t in self.tensors())


@dataclass
class LayerPrefill:
    """What a layer's prefill hands the landmarks besides its middle keys: LRQK factorises the prompt's
    queries with its keys, InfiniGen rotates the keys by its calibration (skew.py)."""

    k: Tensor  # [H, T, d] the whole prompt's post-RoPE keys
    middle: slice  # the prompt rows the landmarks stand for
    q: Tensor | None = None  # [n_heads, T, d] the prompt's post-RoPE queries, when the prefill kept them
    skew: Tensor | None = None  # [n_heads, d, d] InfiniGen's skewing matrices of this layer
    mask: Tensor | None = None  # [n_heads, d] bool, its channel mask
    arch: str | None = None  # the model's architecture (LRQK's rank follows it: LowRankQK.rank)


@dataclass
class TokenKeys(Landmarks):
    """Every exact prompt key is its own landmark: exact top-k selection, the oracle (PAPER.md "The
    paper's method", oracle). The keys stay on the device in full precision, which no deployable
    system would pay: it is the ceiling the other kinds are measured against."""

    keys: Tensor  # [H, N, d] exact post-RoPE keys, N = M tokens
    name, per_token, exact = "keys", True, True

    @property
    def shape(self) -> tuple:
        return tuple(self.keys.shape)  # [H, N, d]

    @classmethod
    def build(cls, k: Tensor) -> "TokenKeys":
        return cls(k)  # k: [H, M, d]

    @classmethod
    def from_prefill(cls, k, chunk, values, prefill) -> "TokenKeys":
        return cls.build(k)

    def tensors(self) -> list:
        return [self.keys]

    def logits(self, q: Tensor) -> Tensor:
        return landmark_logits(q, self.keys)  # [H, G, Tq, N]


@dataclass
class ChunkMeans(Landmarks):
    """ShadowKV's landmark: the mean post-RoPE key of each chunk of c tokens (PAPER.md "ShadowKV,
    precisely"). `min_cos` [H, N] is the lowest cosine between a chunk's mean and its keys: the
    chunks where it is lowest are the outliers ShadowKV keeps exact."""

    means: Tensor  # [H, N, d]
    min_cos: Tensor  # [H, N] float32
    name, chunked, outliers = "mean", True, True

    @property
    def shape(self) -> tuple:
        return tuple(self.means.shape)  # [H, N, d]

    @classmethod
    def build(cls, k: Tensor, chunk: int) -> "ChunkMeans":
        return cls(*chunk_landmarks(k, chunk))

    @classmethod
    def from_prefill(cls, k, chunk, values, prefill) -> "ChunkMeans":
        return cls.build(k, chunk)

    def tensors(self) -> list:
        return [self.means]

    def logits(self, q: Tensor) -> Tensor:
        return landmark_logits(q, self.means)  # [H, G, Tq, N]


@dataclass
class QuantizedKeys(Landmarks):
    """The paper's fix: token-level landmarks (chunk 1) quantized to ~2 bits per value (PAPER.md "The
    paper's method"), scored as stored, without a dequantized copy (quantize.quantized_dot). With
    chunk c > 1 the chunk means are quantized; with `residual` = m, residual meta-chunks."""

    codes: object  # quantize.Quantized or ResidualQuantized of shape [H, N, d]
    name = "quantized"
    params = (
        Param("landmark_bits", None, (str, type(None))),  # the quantize.parse_format spec: "2", "fp8", ...
        Param("residual", 0, (int,), lambda m: m >= 0, "must be an int >= 0"),  # meta-chunk m, 0 = off
        Param("residual_bits", quantize.DEFAULT_RESIDUAL_BITS, (str,)),  # the residuals' format: the paper's
    )

    @classmethod
    def check_params(cls, values):
        super().check_params(values)
        if values["landmark_bits"] is None:
            raise ValueError("quantized landmarks need landmark_bits (e.g. '2')")
        quantize.parse_format(values["landmark_bits"])  # raises on an unknown format
        if values["residual"]:
            quantize.parse_format(values["residual_bits"])

    @classmethod
    def canonical(cls, values):
        """The residuals' format only where there are residuals."""
        p = super().canonical(values)
        return p if values["residual"] else {k: v for k, v in p.items() if k != "residual_bits"}

    @classmethod
    def label(cls, values, named):
        """'2b', 'fp8', 'res16x0.5'."""
        bits, m = values["landmark_bits"], values["residual"]
        pieces = [f"{bits}b" if bits.isdigit() else bits] if "landmark_bits" in named and bits else []
        return pieces + (
            [f"res{m}x{values['residual_bits']}"] if named & {"residual", "residual_bits"} and m else []
        )

    @classmethod
    def from_prefill(cls, k, chunk, values, prefill) -> "QuantizedKeys":
        return cls.build(k, chunk, values["landmark_bits"], values["residual"], values["residual_bits"])

    @property
    def shape(self) -> tuple:
        return tuple(self.codes.shape)  # [H, N, d]

    @classmethod
    def build(
        cls, k: Tensor, chunk: int, bits: str, residual: int = 0, residual_bits: str = ""
    ) -> "QuantizedKeys":
        """bits: the landmarks' quantize.parse_format spec; residual: the meta-chunk m (0 = off), whose
        residuals are quantized with `residual_bits` (PAPER.md "Residual landmarks")."""
        exact, _ = chunk_landmarks(k, chunk)  # [H, N, d]
        if residual:
            codes = quantize.residual_quantize(exact, residual, bits, residual_bits)
        else:
            codes = quantize.quantize(exact, quantize.parse_format(bits))
        exact = exact.float()
        err = (quantize.dequantize(codes) - exact).pow(2).sum() / exact.pow(2).sum()
        return cls(codes, error=err.item())

    def logits(self, q: Tensor) -> Tensor:
        return landmark_logits(q, self.codes)  # [H, G, Tq, N]

    def nbytes(self, exact_bytes: int | None) -> int:
        return quantize.nbytes(self.codes)  # the packed codes and scales, as stored


@dataclass
class QuestBounds(Landmarks):
    """Quest (Tang et al. 2024, PAPER.md "Quest"): per chunk, the element-wise min and max of its keys.

    For a query q, sum_d max(q_d * min_d, q_d * max_d) is the largest q . k any key of the chunk could
    have, so a chunk holding one strong key scores high even when its mean does not (the failure of
    ChunkMeans). With chunk 1, min = max = the key and the bound is q . k exactly: the oracle.
    """

    lo: Tensor  # [H, N, d] element-wise minimum of each chunk's keys
    hi: Tensor  # [H, N, d] element-wise maximum
    name, chunked = "quest", True

    @classmethod
    def from_prefill(cls, k, chunk, values, prefill) -> "QuestBounds":
        return cls.build(k, chunk)

    @property
    def shape(self) -> tuple:
        return tuple(self.lo.shape)  # [H, N, d]

    @classmethod
    def build(cls, k: Tensor, chunk: int) -> "QuestBounds":
        H, M, d = k.shape
        kc = k.reshape(H, M // chunk, chunk, d)  # [H, N, c, d]
        return cls(kc.amin(dim=2), kc.amax(dim=2))

    def tensors(self) -> list:
        return [self.lo, self.hi]

    def logits(self, q: Tensor) -> Tensor:
        return box_logits(q, self.hi, self.lo)  # [H, G, Tq, N]


def box_logits(q: Tensor, hi: Tensor, lo: Tensor) -> Tensor:
    """sum_c max(q_c * hi_c, q_c * lo_c) / sqrt(d) for boxes [H, N, d] with hi >= lo: the largest q . k / sqrt(d)
    of any key inside the box. q: [H, G, Tq, d]; returns [H, G, Tq, N] float32."""
    H, G, Tq, d = q.shape
    qs = q.float().reshape(H, G * Tq, d) / math.sqrt(d)  # [H, G*Tq, d]
    # max(q*lo, q*hi) per channel = q*hi where q > 0, q*lo where q < 0: two matmuls
    bound = qs.clamp(min=0) @ hi.float().transpose(1, 2) + qs.clamp(max=0) @ lo.float().transpose(1, 2)
    return bound.view(H, G, Tq, -1)  # [H, G, Tq, N]


@dataclass
class PageCuboids(Landmarks):
    """ArkVale's page digest (PAPER.md "ArkVale"): per page of c tokens and KV head, a cuboid around the
    page's post-RoPE keys: centre (max + min) / 2 per channel, half-width the mean over the page's
    tokens of |k - centre|, so a box tighter than Quest's min / max when one key is far out. A page's
    logit is the largest q . k / sqrt(d) inside the box (`box_logits`); ArkVale then averages the
    query heads of a group (the "dot" rule). With pages of 1 token the half-width is 0 and the logit
    is q . k / sqrt(d) exactly."""

    upper: Tensor  # [H, N, d] centre + half-width
    lower: Tensor  # [H, N, d] centre - half-width
    name, chunked = "pages", True

    @classmethod
    def from_prefill(cls, k, chunk, values, prefill) -> "PageCuboids":
        return cls.build(k, chunk)

    @property
    def shape(self) -> tuple:
        return tuple(self.upper.shape)  # [H, N, d]

    @classmethod
    def build(cls, k: Tensor, page: int) -> "PageCuboids":
        H, M, d = k.shape
        kc = k.float().reshape(H, M // page, page, d)  # [H, N, c, d]
        centre = (kc.amax(dim=2) + kc.amin(dim=2)) / 2  # [H, N, d]
        half = (kc - centre[:, :, None]).abs().mean(dim=2)  # [H, N, d], >= 0
        return cls((centre + half).to(k.dtype), (centre - half).to(k.dtype))

    def tensors(self) -> list:
        return [self.upper, self.lower]

    def logits(self, q: Tensor) -> Tensor:
        return box_logits(q, self.upper, self.lower)  # [H, G, Tq, N]


# LRQK's rank, a share of head_dim, by architecture, as the authors set it (PAPER.md "LRQK": 32 of 128 for
# the Qwen3 models, 16 of 128 for Llama-3.1-8B); other architectures, which the authors did not run, and
# K/V given without a model (kvcache.from_kv) get Llama's share.
QK_RANK = {"Qwen3ForCausalLM": 0.25, "Qwen3MoeForCausalLM": 0.25}
QK_RANK_DEFAULT = 0.125


@dataclass
class QKState:
    """LRQK's state from one decode step to the next: its factors B_Q, B_K, which every step moves by one
    gradient step, and the coordinates k^ of the tokens generated so far (`LowRankQK.step`). It starts as
    the prefill's factors (`LowRankQK.start`) and lives with the layer (kvcache.LayerState.step_state)."""

    b_q: Tensor  # [P, r, d]
    b_k: Tensor  # [P, r, d]
    a_k_new: Tensor | None = None  # [P, Tg, r] coordinates of the generated tokens


@dataclass
class LowRankQK(Landmarks):
    """LRQK's proxy (PAPER.md "LRQK"): per query head, the prompt's queries Q and keys K [T, d] (each KV
    head's keys repeated to its query heads) are factorised jointly at the prefill, Q ~ A_Q B_Q and
    K ~ A_K B_K with A_Q A_K^T ~ Q K^T (`lrqk_factorize`), and a token's landmark is its r coordinates
    A_K[j]. At each decode step the new query and key get coordinates q^, k^ (`lrqk_decode`, which also
    takes a gradient step on B_Q, B_K), a token's logit is q^ . A_K[j] (no scaling, no softmax) and each
    query head keeps its own top tokens. Generated tokens get their k^ appended: they are among the keys
    on the device that the next step's q^ is fitted to. What moves from step to step is a QKState; these
    landmarks, the prefill's, do not change."""

    a_k: Tensor  # [P, T, r] coordinates of every prompt token, P = query heads
    b_q: Tensor  # [P, r, d] the prefill's factors (a step's own: QKState)
    b_k: Tensor  # [P, r, d]
    middle: slice  # the prompt rows the landmarks are (selection reads a_k[:, middle])
    first: Tensor  # [P, 1, r] A_Q of the last prompt token: the prefill's own selection query
    iterations: int = 2
    name, per_token, per_query_head, needs_queries = "lowrank_qk", True, True, True
    stateful, needs_resident = True, True
    params = (
        # the rank of the joint factorisation: a share of head_dim or an int; None = the authors' share for
        # the model's architecture (QK_RANK)
        Param(
            "qk_rank",
            None,
            (float, type(None)),
            lambda r: r is None or not (r <= 0 or (r > 1 and r != int(r))),
            "must be an int >= 1 or a share of head_dim in (0, 1]",
            "r",
        ),
        # the alternating solves of the factorisation and of each step (the authors: 2)
        Param("iterations", 2, (int,), lambda n: n >= 1, "must be an int >= 1", "it"),
    )

    @staticmethod
    def share(qk_rank, arch=None) -> float:
        """The rank as given (a share of head_dim, or an int), or the authors' share for the model's
        architecture `arch` (config.json's `architectures`; QK_RANK) when the policy leaves it to them."""
        return qk_rank if qk_rank is not None else QK_RANK.get(arch, QK_RANK_DEFAULT)

    @classmethod
    def rank(cls, qk_rank, head_dim: int, arch=None) -> int:
        """The rank on a model of this head_dim and architecture (it may round to 0, or pass head_dim)."""
        share = cls.share(qk_rank, arch)
        return round(share * head_dim) if share <= 1 else int(share)

    @classmethod
    def cannot_run(cls, values, head_dim, arch=None):
        """The rank must be 1 to head_dim on this model (a share may round to 0 on a small head)."""
        share, r = cls.share(values["qk_rank"], arch), cls.rank(values["qk_rank"], head_dim, arch)
        if r > head_dim:
            return f"qk_rank {share:g} is above the model's head_dim {head_dim}: give at most {head_dim} or a share up to 1"
        if r < 1:
            least = next(n for n in range(1, 4096) if cls.rank(values["qk_rank"], n, arch))
            return f"rank, {share:g} of the model's head_dim {head_dim}, rounds to 0: LRQK needs a head_dim of at least {least}"
        return None

    @classmethod
    def from_prefill(cls, k, chunk, values, prefill) -> "LowRankQK":
        d = k.shape[-1]
        r = cls.rank(values["qk_rank"], d, prefill.arch)
        if not 1 <= r <= d:
            raise ValueError(
                f"qk_rank {cls.share(values['qk_rank'], prefill.arch):g} gives rank {r}: it must be 1 to "
                f"head_dim = {d}"
            )
        return cls.build(prefill.q, prefill.k, prefill.middle, r, values["iterations"])

    @property
    def shape(self) -> tuple:
        P, _, r = self.a_k.shape
        return (P, self.middle.stop - self.middle.start, r)

    @classmethod
    def build(cls, q: Tensor, k: Tensor, middle: slice, rank: int, iterations: int) -> "LowRankQK":
        """q: [P, T, d] the prompt's post-RoPE queries per query head; k: [H, T, d] its keys."""
        P, T, d = q.shape
        k = k.repeat_interleave(P // k.shape[0], dim=0)  # [P, T, d] each query head's keys
        a_q, b_q, a_k, b_k = lrqk_factorize(q.float(), k.float(), rank, iterations)
        return cls(a_k, b_q, b_k, middle, a_q[:, -1:], iterations)

    def tensors(self) -> list:
        return [self.a_k[:, self.middle], self.b_q, self.b_k]

    def logits(self, q_hat: Tensor) -> Tensor:
        """q_hat: [H, G, Tq, r] the step's query coordinates -> q^ . A_K[j] for the middle: [H, G, Tq, N]."""
        H, G, Tq, r = q_hat.shape
        marks = self.a_k[:, self.middle]  # [P, N, r]
        return (q_hat.reshape(H * G, Tq, r) @ marks.transpose(1, 2)).view(H, G, Tq, -1)

    def start(self) -> QKState:
        """The state the first decode step starts from: the prefill's factors, no generated token."""
        return QKState(self.b_q, self.b_k)

    def coordinates(self, state: QKState, pos: Tensor) -> Tensor:
        """A_K rows of absolute positions pos [P, R] (prompt tokens, then generated ones): [P, R, r]."""
        rows = self.a_k if state.a_k_new is None else torch.cat([self.a_k, state.a_k_new], dim=1)
        return rows.gather(1, pos[..., None].expand(-1, -1, rows.shape[2]))

    def step(self, state: QKState, q: Tensor, k: Tensor, keys: Tensor, pos: Tensor) -> tuple:
        """One decode step from `state`: q, k [P, 1, d] the new query and key per query head, keys [P, R, d]
        the keys on the device and pos [P, R] their positions. Returns q^ [P, 1, r] and the next state
        (B_Q, B_K moved, k^ appended)."""
        q_hat, k_hat, b_q, b_k = lrqk_decode(
            state.b_q,
            state.b_k,
            self.coordinates(state, pos),
            keys.float(),
            q.float(),
            k.float(),
            self.iterations,
        )
        a_k_new = k_hat if state.a_k_new is None else torch.cat([state.a_k_new, k_hat], dim=1)
        return q_hat, QKState(b_q, b_k, a_k_new)


LRQK_TOL = 1e-2  # the authors' tolerance of both alternating solves (PAPER.md "LRQK")


def _solve(lhs: Tensor, rhs: Tensor, left=True) -> Tensor:
    """lhs^-1 rhs (or rhs lhs^-1 with left=False), batched; a singular system is a one-line error."""
    x, info = torch.linalg.solve_ex(lhs, rhs, left=left)
    if bool((info != 0).any()):
        raise ValueError(
            "LRQK's least squares are singular: the rank is above what the prompt's queries and keys "
            "span; give a smaller rank"
        )
    return x


def lrqk_factorize(Q: Tensor, K: Tensor, r: int, iterations: int, tol: float | None = None):
    """min 1/2 |Q K^T - A_Q A_K^T|^2 + |Q - A_Q B_Q|^2 + |K - A_K B_K|^2 over A_Q, A_K [P, T, r] and B_Q,
    B_K [P, r, d], by alternating closed-form least squares from the "topcol" start (the r channels of
    largest sum |Q| + sum |K|), the authors' lambda = 1 variant (PAPER.md "LRQK"): B from A, then A_Q
    from A_K, then A_K from the new A_Q; stops after `iterations` or when both A move less than `tol`
    (mean squared; None: LRQK_TOL). Q K^T [T, T] is never formed: Q (K^T A_K) is. Q, K: [P, T, d] float32."""
    tol = LRQK_TOL if tol is None else tol
    P, T, d = Q.shape
    cols = (Q.abs().sum(1) + K.abs().sum(1)).topk(r, dim=-1).indices  # [P, r]
    a_q = Q.gather(2, cols[:, None].expand(-1, T, -1))  # [P, T, r]
    a_k = K.gather(2, cols[:, None].expand(-1, T, -1))  # [P, T, r]
    gram = lambda a: a.transpose(1, 2) @ a  # [P, r, r]
    for _ in range(iterations):
        b_q = _solve(gram(a_q), a_q.transpose(1, 2) @ Q)  # [P, r, d]
        b_k = _solve(gram(a_k), a_k.transpose(1, 2) @ K)
        rhs = K.transpose(1, 2) @ a_k + b_q.transpose(1, 2)  # [P, d, r]
        new_q = Q @ _solve(gram(a_k) + b_q @ b_q.transpose(1, 2), rhs, left=False)  # [P, T, r]
        rhs = Q.transpose(1, 2) @ new_q + b_k.transpose(1, 2)
        new_k = K @ _solve(gram(new_q) + b_k @ b_k.transpose(1, 2), rhs, left=False)
        delta = max(float((new_q - a_q).pow(2).mean()), float((new_k - a_k).pow(2).mean()))
        a_q, a_k = new_q, new_k
        if delta < tol:
            break
    b_q = _solve(gram(a_q), a_q.transpose(1, 2) @ Q)
    b_k = _solve(gram(a_k), a_k.transpose(1, 2) @ K)
    return a_q, b_q, a_k, b_k


def lrqk_decode(b_q, b_k, a_keys, keys, q, k, iterations: int, tol: float | None = None):
    """The coordinates q^, k^ [P, 1, r] of a new query q and key k [P, 1, d] (PAPER.md "LRQK"): alternating
    closed-form solves of q^ . k^ ~ q . k, q^ B_Q ~ q, k^ B_K ~ k and q^ A^T ~ q K^T over the keys on the
    device (keys [P, R, d], their coordinates a_keys [P, R, r]); then one gradient step on B_Q and B_K
    towards q and k, with the exact line-search step. Returns (q^, k^, B_Q, B_K)."""
    tol = LRQK_TOL if tol is None else tol
    t = lambda x: x.transpose(1, 2)
    k_bk, bk_bk = k @ t(b_k), b_k @ t(b_k)  # [P, 1, r], [P, r, r]
    q_target = q @ t(b_q) + (q @ t(keys)) @ a_keys  # [P, 1, r]
    q_gram = b_q @ t(b_q) + t(a_keys) @ a_keys  # [P, r, r]
    qk = q @ t(k)  # [P, 1, 1]
    k_hat = _solve(bk_bk, k_bk, left=False)  # [P, 1, r] the start: k^ B_K ~ k alone
    for _ in range(max(iterations, 1)):
        q_hat = _solve(q_gram + t(k_hat) @ k_hat, q_target + qk * k_hat, left=False)  # [P, 1, r]
        new_k = _solve(bk_bk + t(q_hat) @ q_hat, k_bk + qk * q_hat, left=False)
        delta = float((new_k - k_hat).pow(2).mean())
        k_hat = new_k
        if delta < tol:
            break

    def descend(b, hat, x):  # one step on |hat B - x|^2 along its gradient, exact step length
        grad = t(hat) @ (hat @ b - x)  # [P, r, d]
        rate = grad.pow(2).sum((1, 2), keepdim=True) / ((hat @ grad).pow(2).sum((1, 2), keepdim=True) + 1e-6)
        return b - rate * grad

    return q_hat, k_hat, descend(b_q, q_hat, q), descend(b_k, k_hat, k)


@dataclass
class SkewedKeys(Landmarks):
    """InfiniGen's partial keys (PAPER.md "InfiniGen"): per query head, the prompt's keys rotated by the
    head's skewing matrix A (orthogonal, so (q A) . (k A) = q . k, and the rotation gathers a head's
    energy into a few channels) and cut to the channels of its mask (the rest zeroed, and not counted).
    A token's logit is (q A)_mask . (k A)_mask / sqrt(d); the query is layer L's, speculated from layer
    L - 1's input (`asks`: the model hands it over), and each query head keeps its own top
    tokens."""

    keys: Tensor  # [P, N, d] skewed keys, channels outside the mask zeroed
    skew: Tensor  # [P, d, d]
    mask: Tensor  # [P, d] bool
    name, per_token, per_query_head, needs_calibration = "skewed", True, True, True
    asks = ("next_query",)  # scored with the query the model speculates one layer ahead
    # the share of head_dim its mask keeps by the queries' and by the keys' magnitude (the two united; the
    # authors: 20% each); the calibration's mask is chosen with it (skew.calibration)
    params = (
        Param("channels", 0.2, (float,), lambda c: 0 < c <= 1, "must be a share of head_dim in (0, 1]", "ch"),
    )

    @classmethod
    def from_prefill(cls, k, chunk, values, prefill) -> "SkewedKeys":
        return cls.build(k, prefill.skew, prefill.mask)

    @staticmethod
    def check_calibration(calibration, policy: str, values, n_layers: int, head_dim: int):
        """A calibration must be there, be of this model's shape ([n_layers, n_heads, d, d] skews), and be
        fitted with the policy's `channels` (its mask decides the channels: the field would do nothing)."""
        if calibration is None:
            raise ValueError(
                f"the {policy} policy needs its calibration of the model (skew.calibration(model, tokenizer)): "
                "pass calibration="
            )
        L, _, d, _ = calibration["skew"].shape
        if (L, d) != (n_layers, head_dim):
            raise ValueError(
                f"the calibration is of a model with {L} layers and head_dim {d}, not this one's {n_layers} and "
                f"{head_dim}: calibrate this model (skew.calibration)"
            )
        fitted = calibration.get("channels")  # the mask it holds was chosen with this share, not the policy's
        channels = dict(values)["channels"]
        if fitted != channels:
            raise ValueError(
                f"the {policy} policy asks for channels={channels!r}, and the calibration passed was fitted "
                f"with channels={fitted!r}, whose mask it would use instead: pass "
                f"skew.calibration(model, tokenizer, channels={channels!r})"
            )

    @property
    def shape(self) -> tuple:
        return tuple(self.keys.shape)  # [P, N, d]

    @classmethod
    def build(cls, k: Tensor, skew: Tensor, mask: Tensor) -> "SkewedKeys":
        """k: [H, M, d] post-RoPE middle keys; skew [P, d, d] and mask [P, d] per query head (skew.py)."""
        P = skew.shape[0]
        k = k.float().repeat_interleave(P // k.shape[0], dim=0)  # [P, M, d]
        return cls((k @ skew) * mask[:, None], skew, mask)

    def tensors(self) -> list:
        return [self.keys]

    def nbytes(self, exact_bytes: int | None) -> int:
        kept = int(self.mask.sum()) * self.keys.shape[1]  # the masked channels are not kept
        return kept * (exact_bytes or self.keys.element_size())

    def logits(self, q: Tensor) -> Tensor:
        H, G, Tq, d = q.shape
        qs = (q.float().reshape(H * G, Tq, d) @ self.skew) * self.mask[:, None] / math.sqrt(d)  # [P, Tq, d]
        return (qs @ self.keys.transpose(1, 2)).view(H, G, Tq, -1)  # [H, G, Tq, N]


KINDS = {
    kind.name: kind
    for kind in (TokenKeys, ChunkMeans, QuantizedKeys, QuestBounds, PageCuboids, LowRankQK, SkewedKeys)
}


# ---------------------------------------------------------------------------------------------------
# The scoring rule
# ---------------------------------------------------------------------------------------------------

SCORE_RULES = ("softmax_max", "mean_query", "dot")
GRANULARITIES = ("kv_head", "query_head")  # who selects: each KV head for its group, or each query head


def score(q: Tensor, marks, rule: str = "softmax_max", per: str = "kv_head", each_position=False) -> Tensor:
    """One score per landmark and KV head, [H_kv, N] float32, or per query head, [H_kv * G, N]. q: [H_kv, G,
    Tq, d], the queries of the G query heads of each KV head's GQA group (for LRQK its coordinates).

    "softmax_max" (ShadowKV's rule, and the paper's as evaluated: PAPER.md "ShadowKV, precisely"): per
    query head and position, softmax over the N landmarks of q.L / sqrt(d); sum over the Tq positions;
    max over the G heads, so a landmark that matters to any one head of the group is kept (all heads
    of a group read the same selected keys). "mean_query" (the authors' fast GPU path, PAPER.md "The
    paper's method"): the dot product of each landmark with the mean of the group's queries, no
    softmax, no scaling. "dot" (ArkVale, LRQK, InfiniGen): the logits themselves, summed over the
    positions, then averaged over the group (ArkVale, PAPER.md "ArkVale") or kept per query head.
    per="query_head" skips the group step: every query head selects its own landmarks.

    The Tq positions: a decode step of Tq new tokens selects once for all of them (the sum above:
    PAPER.md "ShadowKV, precisely", "summed over query positions"). each_position=True skips that sum
    and scores every position on its own, [P, Tq, N], exactly as a decode step of that one position
    would (Tq = 1): what a teacher-forced pass over a known answer needs (PAPER.md "Gold-forced rows").

    Landmarks in `marks.removed` (ShadowKV's outlier chunks, already attended exactly) leave before the
    softmax, so they take no share of any head's sum, and score -inf, so they are never selected:
    masking the logits alone is not enough, since when every other probability underflows to 0 the
    tie at 0 would be broken by index and could pick a removed landmark.
    """
    if q.dim() != 4:
        raise ValueError(f"score: expected q [H_kv, G, Tq, d], got shape {tuple(q.shape)}")
    H, G, Tq, _ = q.shape
    if marks.shape[0] not in (H, H * G) or marks.shape[2] != q.shape[3]:
        raise ValueError(
            f"score: landmarks {marks.shape} do not match q {tuple(q.shape)} (need q [H_kv, G, Tq, d] with "
            "one landmark set per KV head or per query head)"
        )
    sum_positions = (lambda x: x.sum(dim=2)) if not each_position else (lambda x: x)
    if rule == "mean_query":
        if per != "kv_head":
            raise ValueError("the mean_query rule scores with the group's mean query: it selects per KV head")
        qm = q.float().mean(dim=1, keepdim=True)  # [H, 1, Tq, d]
        scores = sum_positions(marks.logits(qm))[:, 0] * math.sqrt(
            q.shape[-1]
        )  # [H, (Tq,) N], 1/sqrt(d) undone
    else:
        logits = marks.logits(q)  # [H, G, Tq, N]
        if marks.removed is not None:  # out before the softmax
            logits = logits.masked_fill(marks.removed[:, None, None], float("-inf"))
        if rule == "dot":
            per_head = sum_positions(logits)  # [H, G, (Tq,) N]
            scores = per_head.flatten(0, 1) if per == "query_head" else per_head.mean(dim=1)
        elif per == "query_head":
            scores = sum_positions(logits.softmax(dim=-1)).flatten(0, 1)  # [H*G, (Tq,) N]
        else:
            scores = scores_from_logits(logits, each_position)  # [H, (Tq,) N]
    if marks.removed is not None:  # and never selected, whatever the rule
        removed = marks.removed if not each_position else marks.removed[:, None]  # [P, (1,) N]
        scores = scores.masked_fill(removed, float("-inf"))
    return scores
