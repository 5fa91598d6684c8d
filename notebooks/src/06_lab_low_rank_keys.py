# ruff: noqa: F811  (a lab source defines each exercise's function twice: the stub, then its solution)
# %% [markdown]
# # Lab 6. Low-rank keys: ShadowKV's rank-r SVD, written by hand
#
# *Exercises for notebook 2. Write each function in its cell ("your code here"), then run the check cell
# under it: it prints `pass`, or the first way your function differs from the project's, with a hint.
# The checks run your function on small hand-made cases, each built to isolate one rule, and then on the
# real keys of the default model against the project's own code.*
#
# ShadowKV keeps no prompt keys. At prefill it factorises them (PAPER.md "ShadowKV, precisely", at
# prefill: keys): the **pre-RoPE** keys of the **whole prompt**, all KV heads side by side as one `[T, C]`
# matrix (C = H·d channels), by an SVD; it keeps U[:, :r] and (S·Vᵀ)[:r], one basis shared by all heads,
# with r = 0.15625·C (160 of 1024 channels; 30 of 192 on the default model). At each decode step the keys
# of the selected rows are rebuilt, U_sel·(S·Vᵀ), and rotated by RoPE to where they sit in the prompt
# (decode step 2). Notebook 2 measured what this loses; here you write it.
#
# You write:
# 1. `factorise`: undo RoPE, one SVD over all KV heads, keep rank r;
# 2. `rebuild`: the selected rows' keys from the factors, RoPE'd again.
#
# The project's version is `kvcache.LowRankKeys` (its `build` and `selected`), with `kvcache.low_rank_keys`
# and `kvcache.rebuild_keys`.

# %%
import sys
sys.path.insert(0, "..")  # the repo root: model.py, kvcache.py, landmarks.py, ...
import torch
torch.set_num_threads(2)

import checks_06_low_rank_keys as checks  # this lab's check cells
from checks_common import real_case, show_source  # what the four labs' checks share
import kvcache
import policy

case = real_case()  # the default model's K/V and queries on a Text2JSON prompt (one prefill: ~15 s)
rope = case.rope  # the model's RoPE
case

# %% [markdown]
# `case.k[layer]` is `[H, T, d]`: the post-RoPE keys of one layer, token t at position t. The model's RoPE
# rotates the last axis of a tensor `x [..., T, d]` to the positions `pos [T]` (int64):
# `rope.apply(x, pos)`, and `rope.invert(x, pos)` undoes exactly that rotation. For example
# `rope.invert(case.k[14], torch.arange(case.T))` gives layer 14's keys before RoPE.
#
# ## Exercise 1: the factors
#
# Why pre-RoPE: RoPE turns each key by angles that grow with its position, which spreads the keys over
# many more directions (notebook 2's spectra); before RoPE they are much closer to low rank. Why all heads
# in one matrix: one U serves every head, so the device keeps one `[T, r]` factor per layer.
#
# Row t of the `[T, H·d]` matrix is token t's keys of head 0, head 1, …, side by side (head h in columns
# h·d … (h+1)·d − 1). `torch.linalg.svd(m, full_matrices=False)` returns U, S, Vh with m = U·diag(S)·Vh and
# S in descending order; the best rank-r approximation keeps the first r of each.

# %% tags=["exercise"]
def factorise(k, rope, rank):
    """ShadowKV's low-rank keys of one layer.

    k:     [H, T, d] post-RoPE keys of the whole prompt (token t at position t)
    rope:  the model's RoPE (rope.invert(x, pos), x [..., T, d], pos [T] int64)
    rank:  r, an int
    returns u [T, r] and sv [r, H*d] with u @ sv ~= the PRE-RoPE keys as a [T, H*d] matrix
            (the best rank-r approximation: u = U[:, :r], sv = S[:r] * Vh[:r])
    """
    raise NotImplementedError  # your code here

# %% tags=["solution"]
# Solution: the project's own code. kvcache.LowRankKeys.build undoes RoPE and calls kvcache.low_rank_keys
# (both printed below).
def factorise(k, rope, rank):
    low = kvcache.LowRankKeys.build(k, rope, rank)
    return low.u, low.sv


show_source(kvcache.LowRankKeys.build, kvcache.low_rank_keys)

# %% tags=["check"]
checks.check_factorise(factorise)

# %% [markdown]
# ## Exercise 2: rebuilding the selected keys
#
# At a decode step each KV head h has selected its own prompt rows `rows[h]` (positions). Head h's key of
# row t is u[t] times head h's columns of sv, still before RoPE; attention compares it with a post-RoPE
# query, so rotate it to its position t. `rope.apply` takes one position per row of its `[..., T, d]`
# input: for a different set of positions per head, either loop over the heads or flatten
# (`rope.apply(x.reshape(1, H * S, d), rows.flatten()).view(H, S, d)`).

# %% tags=["exercise"]
def rebuild(u, sv, rows, rope):
    """The post-RoPE keys of the selected rows, rebuilt from the factors.

    u:     [T, r] and sv: [r, H*d], as factorise returns them
    rows:  [H, S] int64, the prompt positions each KV head selected
    rope:  the model's RoPE (rope.apply(x, pos), x [..., T, d], pos [T] int64)
    returns [H, S, d]: head h's key of token rows[h, i], rebuilt and rotated to position rows[h, i]
    """
    raise NotImplementedError  # your code here

# %% tags=["solution"]
# Solution: the project's own code, kvcache.LowRankKeys.selected (a decode step's keys, with
# kvcache.rebuild_keys; both printed below). Its `split.sink` is the offset of the selected rows in the
# prompt: 0 here, the rows are prompt positions.
def rebuild(u, sv, rows, rope):
    T, S = u.shape[0], rows.shape[1]
    split = policy.BudgetSplit(prompt_len=T, sink=0, local=0, chunk=1, n_chunks=T, selected=S)
    return kvcache.LowRankKeys(u, sv).selected({}, rows, split, rope, u.dtype)


show_source(kvcache.LowRankKeys.selected, kvcache.rebuild_keys)

# %% tags=["check"]
checks.check_rebuild(rebuild)

# %% [markdown]
# **What the check's last step shows.** It rebuilds, at ShadowKV's rank, the keys of the tokens exact
# selection picks for the first answer step (3.125% of the prompt per head), and reports their relative
# squared error against the exact keys. Those are the keys attention needs most, and they come back with
# a few percent of their energy wrong: with 30 of 192 channels' worth of basis, the directions that make a
# few tokens stand out for this query are partly lost. Notebook 2 shows what that does to the top-k.
