"""Landmarks: how decode-time attention finds the prompt tokens that matter without reading all keys.

A landmark is a small stand-in for one or more prompt keys, kept on the device and scored against the
query at every decode step (PAPER.md "The problem"). Each kind below is one small dataclass that
builds itself from a layer's exact post-RoPE prompt keys (`build`), gives the query's logit for every
landmark (`logits`), and counts the bytes it keeps on the device (`nbytes`):

    kind            one landmark per     stands for                             used by
    TokenKeys       token                the exact key                          oracle, svd
    ChunkMeans      chunk of c tokens    the mean of the chunk's keys           mean, shadowkv
    QuantizedKeys   token (or chunk)     the key (or mean) quantized, ~2 bits   quantized, paper
    QuestBounds     chunk of c tokens    the element-wise min and max of keys   quest

`score` turns the logits into one score per landmark and KV head (ShadowKV's softmax / sum / max rule,
or the authors' fast mean-query rule), and `select_topk` keeps the best ones.
"""

import math
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


def scores_from_logits(logits: Tensor) -> Tensor:
    """[H_kv, G, Tq, N] logits -> [H_kv, N]: softmax over N, sum over positions, max over the group."""
    probs = logits.softmax(dim=-1)  # [H, G, Tq, N]
    per_head = probs[:, :, 0] if probs.shape[2] == 1 else probs.sum(dim=2)  # [H, G, N] (one position: no sum)
    return per_head.amax(dim=1)  # [H, N]


def select_topk(scores: Tensor, k: int) -> Tensor:
    """The k best indices per row of scores [H, N], sorted ascending; [H, k] int64.

    Ties are deterministic: among equal scores the lower index wins. (Found without sorting the N
    scores, which a decode step would pay at every layer: the k-th largest value, found by a
    selection pass, is a threshold; everything above it is in, the ties at it are taken lowest index
    first, and reading the mask in order gives the indices already sorted.)
    """
    if scores.dim() != 2:
        raise ValueError(f"select_topk: expected scores [H, N], got shape {tuple(scores.shape)}")
    N = scores.shape[1]
    if not 0 <= k <= N:
        raise ValueError(f"select_topk: k={k} must be between 0 and the number of candidates N={N}")
    H = scores.shape[0]
    if k == 0:
        return torch.empty(H, 0, dtype=torch.int64, device=scores.device)
    kth = scores.kthvalue(N - k + 1, dim=1, keepdim=True).values  # [H, 1] the k-th largest score
    keep = scores >= kth  # [H, N]
    counts = keep.sum(dim=1)  # [H] k, or more when scores tie the k-th (a nan is never kept)
    has_nan = scores.isnan().any()
    if bool((counts != k).any() | has_nan):  # the rare cases, behind one check (one GPU sync)
        if bool(has_nan):
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


@dataclass
class Landmarks:
    """What every kind has: N landmarks per KV head, some of which may be taken out of selection
    (`removed`: ShadowKV's outlier chunks, kept exact instead), the relative squared error of the
    landmarks against what they stand for (`error`: quantized kinds), and their bytes on the device.

    A kind adds its tensors, `build` (from a layer's exact post-RoPE prompt keys and the kind's own
    parameters), `logits` (q.L / sqrt(d) per query head, position and landmark) and `shape`."""

    removed: Tensor | None = field(default=None, kw_only=True)  # [H, N] bool
    error: float | None = field(default=None, kw_only=True)

    def tensors(self) -> list:
        """The tensors this kind keeps on the device."""
        raise NotImplementedError

    def nbytes(self, exact_bytes: int | None) -> int:
        """Bytes on the device: `exact_bytes` per value (2 = bf16, the paper's accounting), None = as stored."""
        return sum(t.numel() * (exact_bytes or t.element_size()) for t in self.tensors())


@dataclass
class TokenKeys(Landmarks):
    """Every exact prompt key is its own landmark: exact top-k selection, the oracle (PAPER.md "The
    paper's method", oracle). The keys stay on the device in full precision, which no deployable
    system would pay: it is the ceiling the other kinds are measured against."""

    keys: Tensor  # [H, N, d] exact post-RoPE keys, N = M tokens

    @property
    def shape(self) -> tuple:
        return tuple(self.keys.shape)  # [H, N, d]

    @classmethod
    def build(cls, k: Tensor) -> "TokenKeys":
        return cls(k)  # k: [H, M, d]

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

    @property
    def shape(self) -> tuple:
        return tuple(self.means.shape)  # [H, N, d]

    @classmethod
    def build(cls, k: Tensor, chunk: int) -> "ChunkMeans":
        return cls(*chunk_landmarks(k, chunk))

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
        H, G, Tq, d = q.shape
        qs = q.float().reshape(H, G * Tq, d) / math.sqrt(d)  # [H, G*Tq, d]
        # max(q*lo, q*hi) per channel = q*hi where q > 0, q*lo where q < 0: two matmuls
        bound = qs.clamp(min=0) @ self.hi.float().transpose(1, 2) + qs.clamp(
            max=0
        ) @ self.lo.float().transpose(1, 2)
        return bound.view(H, G, Tq, -1)  # [H, G, Tq, N]


# ---------------------------------------------------------------------------------------------------
# The scoring rule
# ---------------------------------------------------------------------------------------------------

SCORE_RULES = ("softmax_max", "mean_query")


def score(q: Tensor, marks, rule: str = "softmax_max") -> Tensor:
    """One score per landmark and KV head: [H_kv, N] float32. q: [H_kv, G, Tq, d], the queries of the G
    query heads of each KV head's GQA group.

    "softmax_max" (ShadowKV's rule, and the paper's as evaluated: PAPER.md "ShadowKV, precisely"): per
    query head and position, softmax over the N landmarks of q.L / sqrt(d); sum over the Tq positions;
    max over the G heads, so a landmark that matters to any one head of the group is kept (all heads
    of a group read the same selected keys). "mean_query" (the authors' fast GPU path, PAPER.md "The
    paper's method"): the dot product of each landmark with the mean of the group's queries, no
    softmax, no scaling.

    Landmarks in `marks.removed` (ShadowKV's outlier chunks, already attended exactly) leave before the
    softmax, so they take no share of any head's sum, and score -inf, so they are never selected:
    masking the logits alone is not enough, since when every other probability underflows to 0 the
    tie at 0 would be broken by index and could pick a removed landmark.
    """
    H, N, d = marks.shape
    if q.dim() != 4 or q.shape[0] != H or q.shape[3] != d:
        raise ValueError(
            f"score: landmarks {marks.shape} do not match q {tuple(q.shape)} "
            f"(need q [H_kv={H}, G, Tq, d={d}])"
        )
    if rule == "mean_query":
        qm = q.float().mean(dim=1, keepdim=True)  # [H, 1, Tq, d]
        scores = marks.logits(qm).sum(dim=2)[:, 0] * math.sqrt(q.shape[-1])  # [H, N], the 1/sqrt(d) undone
    else:
        logits = marks.logits(q)  # [H, G, Tq, N]
        if marks.removed is not None:  # out before the softmax
            logits = logits.masked_fill(marks.removed[:, None, None], float("-inf"))
        scores = scores_from_logits(logits)  # [H, N]
    if marks.removed is not None:  # and never selected, whatever the rule
        scores = scores.masked_fill(marks.removed, float("-inf"))
    return scores
