# ruff: noqa: F811  (a lab source defines each exercise's function twice: the stub, then its solution)
# %% [markdown]
# # Lab 5. Attention in two parts, merged by their log-sum-exps
#
# *Exercises for notebook 1. Write each function in its cell ("your code here"), then run the check cell
# under it: it prints `pass`, or the first way your function differs from the project's, with a hint.
# The checks run your function on small hand-made cases, each built to isolate one rule, and then on the
# real keys, values and queries of the default model against the project's own code.*
#
# A sparse decode step does not attend to one set of keys. The tokens kept exact on the device (the local
# window, the generated tokens, ShadowKV's outlier chunks) can be attended at once, while the selected
# prompt rows are still on their way from CPU memory; the selected rows are attended when they arrive
# (PAPER.md "ShadowKV, precisely", decode step 3: attention reads the chosen tokens, the outlier and
# local-window tokens, and all generated tokens). The result must be the one softmax over all of them, not
# two softmaxes averaged. Two numbers per query make that exact: each part's **log-sum-exp**.
# `kvcache.SparseCache.attend` does this at every layer and step (its steps 3 and 4).
#
# You write:
# 1. `attention_lse`: attention over one set of keys, and the log-sum-exp of its scores;
# 2. `merge`: the outputs of two parts combined into the attention over both.

# %%
import sys
sys.path.insert(0, "..")  # the repo root: model.py, kvcache.py, landmarks.py, ...
import math  # noqa: F401  (for your code: math.sqrt)
import torch
torch.set_num_threads(2)

import checks_05_attention_in_two_parts as checks  # this lab's check cells
from checks_common import real_case, show_source  # what the four labs' checks share
import kvcache

case = real_case()  # the default model's K/V and queries on a Text2JSON prompt (one prefill: ~15 s)
case

# %% [markdown]
# `case.k[layer]` and `case.v[layer]` are `[H, T, d]` (3 KV heads of 64 channels here), `case.q[layer]` is
# `[H, G, A, d]`: the G = 3 query heads that read each KV head, at A answer steps. Try your functions on
# them as you go, e.g. `attention_lse(case.q[14].reshape(3, -1, 64), case.k[14], case.v[14])`.
#
# ## Exercise 1: attention, and the log-sum-exp of its scores
#
# For a query q and keys k_1 … k_L, the scores are s_j = q·k_j / √d, the output is
# out = Σ_j softmax(s)_j v_j, and the log-sum-exp is lse = log Σ_j exp(s_j): the log of the softmax's
# denominator Z. Scores of a long prompt can be large: exp(s) overflows float32 above s ≈ 88, so compute
# the log-sum-exp without forming exp(s) of the raw scores (`torch.logsumexp` subtracts the largest score
# first; so does `torch.softmax`).
#
# Queries come per KV head: for grouped-query attention the G query heads that read KV head h are simply
# more rows of `q[h]`.

# %% tags=["exercise"]
def attention_lse(q, k, v):
    """Softmax attention of Q queries over L keys, per KV head, and the log-sum-exp of its scores.

    q:     [H, Q, d] queries (the G query heads of a GQA group and their positions, as rows)
    k, v:  [H, L, d] keys and values
    returns out [H, Q, d] = softmax(q k^T / sqrt(d)) v  (softmax over the L keys)
            lse [H, Q]    = log(sum over the L keys of exp(q k^T / sqrt(d)))
    """
    raise NotImplementedError  # your code here

# %% tags=["solution"]
# Solution: the project's own code, kvcache.attention_lse (its source is printed below).
attention_lse = kvcache.attention_lse
show_source(kvcache.attention_lse)

# %% tags=["check"]
checks.check_attention_lse(attention_lse)

# %% [markdown]
# ## Exercise 2: merging two parts
#
# Split the keys into two disjoint sets A (say the local window) and B (the selected rows). Over A ∪ B the
# softmax denominator is Z = Z_A + Z_B, with Z_A = exp(lse_A), and the output over both is a weighted mean
# of the two parts' outputs:
#
# out = (Z_A · out_A + Z_B · out_B) / (Z_A + Z_B).
#
# Write it from the two log-sum-exps, without ever computing exp(lse) itself: on a long prompt an lse of a
# few hundred is ordinary, and exp(300) is `inf` in float32. Only the difference lse_A − lse_B matters.

# %% tags=["exercise"]
def merge(out_a, lse_a, out_b, lse_b):
    """Attention over the keys of two disjoint parts, from each part's attention and log-sum-exp.

    out_a, out_b: [H, Q, d] attention output over part A, over part B
    lse_a, lse_b: [H, Q]    log-sum-exp of the scores of part A, of part B
    returns [H, Q, d], the attention output over the keys of both parts
    """
    raise NotImplementedError  # your code here

# %% tags=["solution"]
# Solution: the project's own code, kvcache.merge_attention (its source is printed below).
merge = kvcache.merge_attention
show_source(kvcache.merge_attention)

# %% tags=["check"]
checks.check_merge(merge)

# %% [markdown]
# **What the check's last step shows.** On the real layers it merges the attention over the 64-token local
# window with the attention over the 3.125% of prompt tokens exact selection picks, and compares with one
# softmax over both sets together: the same to float rounding. This is why a policy's decode step can
# attend the exact tokens while the selected ones are still being fetched, and why the order and grouping
# of the parts never change the result.
