"""Landmarks: how decode-time attention finds the prompt tokens that matter without reading all keys.

A landmark is a small stand-in for one or more prompt keys, kept on the device and scored against the
query at every decode step (PAPER.md "The problem"). ShadowKV takes the mean of the post-RoPE keys of
each chunk of 8 tokens and flags the chunks whose keys disagree most with their mean as outliers
(`chunk_landmarks`); the paper's fix keeps every key as its own landmark, quantized (quantize.py).
The scoring rule (`landmark_scores`, `select_topk`) is ShadowKV's: softmax over landmarks, summed
over query positions, max over the query heads of a GQA group.
"""

import math

import torch
from torch import Tensor

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
        raise ValueError(f"chunk_landmarks: T={T} tokens must be a positive multiple of chunk={chunk}; "
                         "trim or pad the keys")
    kc = k.float().reshape(H, T // chunk, chunk, d)  # [H, N, chunk, d]
    lm = kc.mean(dim=2)  # [H, N, d]
    if chunk == 1:
        return lm.to(k.dtype), torch.ones(H, T, device=k.device)
    cos = torch.nn.functional.cosine_similarity(kc, lm.unsqueeze(2), dim=-1, eps=1e-8)  # [H, N, chunk]
    return lm.to(k.dtype), cos.amin(dim=-1)


def landmark_scores(q: Tensor, landmarks) -> Tensor:
    """ShadowKV's chunk score (PAPER.md "ShadowKV, precisely"), per KV head.

    q: [H_kv, G, Tq, d] queries of the G query heads of each KV head's GQA group; landmarks: [H_kv, N, d],
    as a tensor or as the Quantized / ResidualQuantized form (scored without dequantizing, see
    `quantized_dot`). For each query head and position: softmax over the N landmarks of q.L / sqrt(d);
    sum over the Tq positions; max over the G heads, so a landmark that matters to any one head of the
    group is kept (all heads of a group read the same selected keys). Returns [H_kv, N] float32.
    """
    shape = tuple(landmarks.shape)
    if q.dim() != 4 or len(shape) != 3:
        raise ValueError(f"landmark_scores: expected q [H_kv, G, Tq, d] and landmarks [H_kv, N, d], "
                         f"got {tuple(q.shape)} and {shape}")
    H, G, Tq, d = q.shape
    if shape[0] != H or shape[2] != d:
        raise ValueError(f"landmark_scores: landmarks {shape} do not match q {tuple(q.shape)} "
                         f"(need [H_kv={H}, N, d={d}])")
    return scores_from_logits(landmark_logits(q, landmarks))


def landmark_logits(q: Tensor, landmarks) -> Tensor:
    """q.L / sqrt(d) for every query head, position and landmark: [H_kv, G, Tq, N] float32."""
    H, G, Tq, d = q.shape
    q = q.float().reshape(H, G * Tq, d) / math.sqrt(d)  # [H, G*Tq, d]: scale the few queries, not the N logits
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
