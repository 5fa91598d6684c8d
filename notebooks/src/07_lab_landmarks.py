# ruff: noqa: F811  (a lab source defines each exercise's function twice: the stub, then its solution)
# %% [markdown]
# # Lab 7. Landmarks and the selection rule
#
# *Exercises for notebook 3. Write each function in its cell ("your code here"), then run the check cell
# under it: it prints `pass`, or the first way your function differs from the project's, with a hint.
# The checks run your function on small hand-made cases, each built to isolate one rule, and then on the
# real keys and queries of the default model against the project's own code.*
#
# To choose which prompt tokens a decode step reads, the device keeps **landmarks**, a compact summary of
# the keys, and scores the query against them (PAPER.md "The problem"). This lab writes the three pieces
# of ShadowKV's selection (PAPER.md "ShadowKV, precisely"):
# 1. chunk-mean landmarks, and why a chunk's logit is the *mean* of its tokens' logits (`chunk_means`,
#    `chunk_logits`);
# 2. the selection rule: softmax over the landmarks, sum over the query positions, max over the GQA group,
#    top-k (`selection_scores`, `select`);
# 3. ShadowKV's outlier chunks: the chunks whose mean fits its keys worst, kept exact and removed from the
#    landmarks before the softmax (`min_cosine`, `outlier_chunks`, `scores_without_outliers`).
#
# The project's version is in `landmarks.py` (`chunk_landmarks`, `landmark_logits`, `score`,
# `select_topk`) and `kvcache.outlier_chunks`.

# %%
import sys
sys.path.insert(0, "..")  # the repo root: model.py, kvcache.py, landmarks.py, ...
import math  # noqa: F401  (for your code: math.sqrt)
import torch
torch.set_num_threads(2)

import checks_07_landmarks as checks  # this lab's check cells
from checks_common import real_case, show_source  # what the four labs' checks share
import kvcache
import landmarks

case = real_case()  # the default model's K/V and queries on a Text2JSON prompt (one prefill: ~15 s)
case

# %% [markdown]
# `case.k[layer]` is `[H, T, d]` (post-RoPE keys), `case.q[layer]` is `[H, G, A, d]`: the G query heads of
# each KV head at A answer steps. `case.middle(layer, 8)` is the part of the prompt that landmarks
# summarise (all but the 64-token local window), cut to whole chunks of 8.
#
# ## Exercise 1: chunk-mean landmarks
#
# ShadowKV cuts the prompt (minus the local window) into chunks of 8 consecutive tokens and keeps, per KV
# head, the mean of each chunk's post-RoPE keys: one landmark per chunk, 8 times fewer than keys (PAPER.md
# "ShadowKV, precisely", at prefill: landmarks). Chunk n holds tokens n·c … n·c + c − 1.

# %% tags=["exercise"]
def chunk_means(k, chunk):
    """Chunk-mean landmarks of one layer's keys.

    k:      [H, T, d] post-RoPE keys (T a multiple of chunk)
    chunk:  c, tokens per chunk (ShadowKV: 8)
    returns [H, N, d], N = T // c: landmark n of head h = the mean of keys n*c ... n*c + c - 1 of head h
    """
    raise NotImplementedError  # your code here

# %% tags=["solution"]
# Solution: the project's own code, landmarks.chunk_landmarks (printed below; it also returns each chunk's
# minimum cosine, exercise 3).
def chunk_means(k, chunk):
    means, _min_cos = landmarks.chunk_landmarks(k, chunk)
    return means


show_source(landmarks.chunk_landmarks)

# %% tags=["check"]
checks.check_chunk_means(chunk_means)

# %% [markdown]
# A landmark is scored like a key: its logit for a query q is q·L / √d (`landmarks.landmark_logits`).
# Since q·mean(k_1 … k_c) = mean(q·k_1, …, q·k_c), a chunk-mean landmark's logit is exactly the **mean** of
# its tokens' logits, while selection would need the **largest** of them: one token the answer needs,
# among seven that do not matter, is averaged away. That is the paper's second failure mode (PAPER.md
# "The problem"; notebook 3 measures it).
#
# Write the chunk logits from the tokens' logits, without building a landmark. The check feeds it the real
# tokens' logits and compares with the logits of the project's chunk-mean landmarks: if they agree, you
# have verified the identity on the model's keys.

# %% tags=["exercise"]
def chunk_logits(token_logits, chunk):
    """The logit each chunk-mean landmark gets, from the logits of the chunk's tokens.

    token_logits: [H, G, Tq, T] q.k / sqrt(d) of every query head, position and token (T a multiple of chunk)
    chunk:        c, tokens per chunk
    returns [H, G, Tq, N], N = T // c
    """
    raise NotImplementedError  # your code here

# %% tags=["solution"]
# Solution: the project has no function for this one: its chunk logits come from the landmarks themselves
# (landmarks.landmark_logits of landmarks.chunk_landmarks). The identity, in one line:
def chunk_logits(token_logits, chunk):
    *lead, T = token_logits.shape
    return token_logits.view(*lead, T // chunk, chunk).mean(-1)

# %% tags=["check"]
checks.check_chunk_logits(chunk_logits)

# %% [markdown]
# ## Exercise 2: the selection rule
#
# At every decode step, layer and KV head (PAPER.md "ShadowKV, precisely", decode step 1; the paper's
# method uses the same rule):
# - for every query head of the group and every query position, a softmax over the N landmarks of
#   q·L / √d;
# - the sum over the query positions (one position in a plain decode step, several when tokens are fed
#   together);
# - the **max over the G query heads** of the group: all heads of a group read the same selected keys, and
#   a landmark that matters to any one of them is kept;
# - the top k landmarks per KV head.
#
# `selection_scores` computes the score of every landmark, `select` the top k. Return the indices in
# ascending order (the cache reads the rows in prompt order) and, among equal scores, take the lower index
# first, so the choice never depends on the device or the sort algorithm.

# %% tags=["exercise"]
def selection_scores(q, marks):
    """The selection score of every landmark, per KV head.

    q:      [H, G, Tq, d] queries: the G query heads of each KV head, at Tq positions
    marks:  [H, N, d] landmarks (chunk means, or every key)
    returns [H, N]: softmax over the N landmarks of q.L / sqrt(d), summed over the Tq positions,
            max over the G heads
    """
    raise NotImplementedError  # your code here


def select(scores, k):
    """The k best landmarks per KV head.

    scores: [H, N]
    returns [H, k] int64 indices, ascending in each row; ties go to the lower index
    """
    raise NotImplementedError  # your code here

# %% tags=["solution"]
# Solution: the project's own code, landmarks.score (with landmarks.scores_from_logits) and
# landmarks.select_topk (printed below). score takes a landmark kind: TokenKeys wraps a plain tensor.
def selection_scores(q, marks):
    return landmarks.score(q, landmarks.TokenKeys(marks))


select = landmarks.select_topk
show_source(landmarks.score, landmarks.scores_from_logits, landmarks.select_topk)

# %% tags=["check"]
checks.check_selection_scores(selection_scores)

# %% tags=["check"]
checks.check_select(select)

# %% [markdown]
# ## Exercise 3: ShadowKV's outlier chunks
#
# Some chunks' mean stands badly for their keys: a chunk whose keys point in different directions has a
# mean that resembles none of them. ShadowKV measures it per chunk as the **minimum cosine** between the
# landmark and the chunk's keys, keeps the 48 chunks with the lowest value exact on the device (attended at
# every step), and **removes them from the landmark set before the softmax**, so they take no share of
# any head's probabilities and are never selected (PAPER.md "ShadowKV, precisely", at prefill: outlier
# chunks).
#
# Write the three steps: the minimum cosine of every chunk; the `n_out` chunks with the lowest value per
# KV head (ascending indices, ties to the lower index: your `select` can help); and the selection scores
# with the removed chunks left out of the softmax and scoring `-inf`.

# %% tags=["exercise"]
def min_cosine(k, chunk):
    """Per chunk, the lowest cosine similarity between its mean key and each of its keys.

    k:      [H, T, d] post-RoPE keys (T a multiple of chunk)
    chunk:  c, tokens per chunk
    returns [H, N] float
    """
    raise NotImplementedError  # your code here


def outlier_chunks(min_cos, n_out):
    """ShadowKV's outliers: the n_out chunks with the lowest minimum cosine, per KV head.

    min_cos: [H, N]
    returns  [H, n_out] int64 chunk indices, ascending in each row
    """
    raise NotImplementedError  # your code here


def scores_without_outliers(q, means, removed):
    """selection_scores with the removed chunks taken out before the softmax.

    q:        [H, G, Tq, d] queries
    means:    [H, N, d] chunk-mean landmarks
    removed:  [H, N] bool, True for the outlier chunks
    returns   [H, N]: the rule of exercise 2 over the landmarks left; -inf for the removed ones
    """
    raise NotImplementedError  # your code here

# %% tags=["solution"]
# Solution: the project's own code. landmarks.chunk_landmarks returns the minimum cosines beside the
# means; kvcache.outlier_chunks picks the outliers (SparseCache.build_layer then marks them removed in
# the landmarks);
# landmarks.score leaves the removed ones out before the softmax (printed in exercise 2).
def min_cosine(k, chunk):
    _means, min_cos = landmarks.chunk_landmarks(k, chunk)
    return min_cos


def outlier_chunks(min_cos, n_out):
    return kvcache.outlier_chunks(min_cos, n_out)


def scores_without_outliers(q, means, removed):
    marks = landmarks.ChunkMeans(means, torch.zeros(removed.shape), removed=removed)
    return landmarks.score(q, marks)


show_source(kvcache.outlier_chunks)

# %% tags=["check"]
checks.check_min_cosine(min_cosine)

# %% tags=["check"]
checks.check_outlier_chunks(outlier_chunks)

# %% tags=["check"]
checks.check_scores_without_outliers(scores_without_outliers)

# %% [markdown]
# **What you have written** is step 1 of ShadowKV's decode step. Notebook 3 measures what it costs: the
# chunks these scores pick hold only part of the tokens exact top-k would read (recall against the oracle),
# and the outlier chunks do not win it back. The paper's fix keeps your `selection_scores` and `select`
# and changes only the landmarks: one per token, quantized (lab 8).
