# %% [markdown]
# # 2. Low-rank keys: the first failure mode
#
# ShadowKV does not keep the prompt's keys at all. At prefill it takes the *pre-RoPE* keys of all KV
# heads of a layer, a `[T, kv_heads x head_dim]` matrix, and keeps a rank-r SVD factorisation of it:
# a `[T, r]` factor U on the GPU and `S V^T` (`[r, channels]`). At decode time the selected keys are
# rebuilt from U, rotated to their positions, and attended (PAPER.md "ShadowKV, precisely"; default
# r = 160 of 1024 channels, 15.6%). The paper's first finding is that this projection loses information
# context-intensive tasks need.
#
# This notebook measures, on real text and the default model:
# 1. the singular-value spectra of pre- and post-RoPE keys, per layer;
# 2. the reconstruction error against the rank;
# 3. how that error changes which tokens look important to the query.

# %%
import sys
sys.path.insert(0, "..")  # the repo root: model.py, kvcache.py, landmarks.py, ...
import torch
import matplotlib.pyplot as plt
torch.set_num_threads(2)

import lab
from model import load_model
from kvcache import low_rank_keys, rebuild_keys
from policy import make_policy

model, tok = load_model()
cfg = model.config
H, d = cfg.n_kv_heads, cfg.head_dim
C = H * d  # channels of one layer's keys: 3 x 64 = 192 here

# %% [markdown]
# We read a ~1K-token Text2JSON prompt followed by its correct answer (teacher forcing: one forward pass
# with full attention). That gives us every layer's exact keys and, for each answer token, the queries
# the model uses to write it (`lab.forced_queries`).

# %%
sample, prompt_ids, gold = lab.text2json_sample(tok)
answer_ids = tok.encode(sample["answer"])
full, queries, _ = lab.forced_queries(model, prompt_ids, answer_ids)
T, A = len(prompt_ids), len(answer_ids)
post = [full.k[layer][0, :, :T] for layer in range(cfg.n_layers)]  # per layer [H, T, d] post-RoPE prompt keys
pre = [model.rope.invert(k, torch.arange(T)) for k in post]  # [H, T, d] before the rotation
print(f"prompt {T} tokens, answer {A} tokens; rope round trip error {(model.rope.apply(pre[5], torch.arange(T)) - post[5]).abs().max():.1e}")

# %% [markdown]
# ## 1. Spectra
#
# Concatenate the heads (`[T, 192]`, as ShadowKV does) and look at the singular values. A matrix that is
# "low rank" has a few large singular values and a fast-decaying tail. RoPE rotates each key by an angle
# that grows with its position, so post-RoPE keys spread over more directions: this is why ShadowKV
# factorises the keys *before* RoPE.

# %%
def as_matrix(k):
    return k.transpose(0, 1).reshape(k.shape[1], -1)  # [H, T, d] -> [T, H*d], heads side by side

spec_pre = torch.stack([torch.linalg.svdvals(as_matrix(k)) for k in pre])  # [layers, 192]
spec_post = torch.stack([torch.linalg.svdvals(as_matrix(k)) for k in post])

fig, ax = plt.subplots(1, 2, figsize=(11, 3.5))
for layer, color in zip((1, 8, 16, 24), ("C0", "C1", "C2", "C3")):
    ax[0].plot(spec_pre[layer] / spec_pre[layer, 0], color=color, label=f"layer {layer} pre-RoPE")
    ax[0].plot(spec_post[layer] / spec_post[layer, 0], color=color, ls="--", label=f"layer {layer} post-RoPE")
ax[0].set_yscale("log"); ax[0].set_xlabel("index"); ax[0].set_ylabel("singular value / largest")
ax[0].legend(fontsize=7, ncol=2); ax[0].set_title("key spectra")
r = round(0.15625 * C)  # ShadowKV's share of the channels: 160 of 1024 -> 30 of 192
energy = lambda s: (s[:, :r] ** 2).sum(1) / (s ** 2).sum(1)
ax[1].plot(energy(spec_pre), "o-", label="pre-RoPE"); ax[1].plot(energy(spec_post), "s--", label="post-RoPE")
ax[1].set_xlabel("layer"); ax[1].set_ylabel(f"energy in the top {r}"); ax[1].legend(); ax[1].set_title(f"share of ||K||² kept at rank {r}")
plt.tight_layout(); plt.show()
print(f"rank {r}: pre-RoPE keeps {energy(spec_pre).mean():.1%} of the energy on average, post-RoPE {energy(spec_post).mean():.1%}")

# %% [markdown]
# ## 2. Reconstruction error against rank
#
# Now the real thing, with the project's functions: `kvcache.low_rank_keys` factorises the pre-RoPE keys
# of the whole prompt, as ShadowKV does, and `kvcache.rebuild_keys` rebuilds rows from the factors. We
# measure the error on the rows a policy rebuilds: every prompt token before the 64-token local window
# (kept exact; the `svd` and `shadowkv` presets keep no sink tokens). Relative error = ||K - K_r||² / ||K||².

# %%
local = 64
mid = torch.arange(T - local)  # positions of the middle: every prompt token before the local window
M = len(mid)
ranks = [4, 8, 16, 30, 48, 64, 96, 128, 192]


def rebuilt(u, sv, rank):
    """Post-RoPE keys of the middle rebuilt from the first `rank` factors: [H, M, d]."""
    k = rebuild_keys(u[:, :rank], sv[:rank], mid.expand(H, -1), H, d)  # [H, M, d] pre-RoPE
    return model.rope.apply(k, mid)


def rel_err(a, b):
    return ((a - b) ** 2).sum().item() / (b ** 2).sum().item()


approx = {}
for layer in range(cfg.n_layers):
    # one full-rank factorisation per layer; its first r factors are the rank-r SVD (Eckart-Young)
    u, sv = low_rank_keys(pre[layer], C)  # [T, C], [C, C] the whole prompt's keys
    approx.update({(layer, rank): rebuilt(u, sv, rank) for rank in ranks})
err = torch.tensor([[rel_err(approx[layer, rank], post[layer][:, mid]) for rank in ranks]
                    for layer in range(cfg.n_layers)])  # [layers, ranks]
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(ranks, err.T, color="gray", lw=0.5, alpha=0.5)
ax.plot(ranks, err.mean(0), "ko-", label="mean over layers")
ax.axvline(r, color="C3", ls="--", label=f"ShadowKV's share (r={r})")
ax.set_xscale("log", base=2); ax.set_yscale("log"); ax.set_xlabel("rank"); ax.set_ylabel("relative error")
ax.legend(); ax.set_title("key reconstruction error (one line per layer)")
plt.show()
print("mean relative error by rank:", {rank: round(e, 4) for rank, e in zip(ranks, err.mean(0).tolist())})

# %% [markdown]
# ## 3. Which tokens does a query pick?
#
# A small error on average can still move a query's top scores: the important tokens are a few outliers
# whose keys align with the query, and those are exactly the directions a low-rank basis fitted to *all*
# tokens may drop. For every answer token (every decode step) and every layer we take the exact top-k
# prompt tokens (k = 3.125% of the prompt, the paper's budget: the *oracle*) and ask how many of them are
# still in the top k when the scores are computed with rank-r keys. The scoring rule is the policies' own
# (`lab.step_scores`: softmax over tokens, max over the query heads of a GQA group). To keep this quick we
# use every 4th answer token.

# %%
k_sel = round(0.03125 * T)


def topk(scores):  # [A, H, M] -> [A, H, k] middle positions
    A_, H_, M_ = scores.shape
    return torch.topk(scores.reshape(A_ * H_, M_), k_sel).indices.view(A_, H_, k_sel)


overlap = torch.zeros(cfg.n_layers, len(ranks))
for layer in range(cfg.n_layers):
    q = queries[layer][:, ::4]  # [n_heads, A/4, d]
    exact = topk(lab.step_scores(q, post[layer][:, mid]))  # [A/4, H, k]
    for j, rank in enumerate(ranks):
        low = topk(lab.step_scores(q, approx[layer, rank]))
        overlap[layer, j] = lab.recall(low, exact, M).mean()

fig, ax = plt.subplots(1, 2, figsize=(11, 3.5))
ax[0].plot(ranks, overlap.mean(0), "ko-"); ax[0].axvline(r, color="C3", ls="--")
ax[0].set_xscale("log", base=2); ax[0].set_xlabel("rank"); ax[0].set_ylabel("share of the oracle's top-k kept")
ax[0].set_title("top-k under rank-r keys (mean over layers)")
ax[1].bar(range(cfg.n_layers), overlap[:, ranks.index(r)])
ax[1].set_xlabel("layer"); ax[1].set_ylabel("share kept"); ax[1].set_title(f"per layer at rank {r}")
plt.tight_layout(); plt.show()
print(f"rank {r}: {overlap[:, ranks.index(r)].mean():.1%} of the oracle's top-{k_sel} tokens stay in the top {k_sel}; "
      f"rank 96: {overlap[:, ranks.index(96)].mean():.1%}")

# %% [markdown]
# ## 4. Inside the real cache
#
# The `svd` policy of `kvcache.py` isolates this failure: it *selects* with exact keys (so its choice is
# the oracle's) but *attends* over keys rebuilt from the rank-r factor, as ShadowKV does. Teacher-forcing
# the answer for a few steps, the cache's own statistics report the error of the keys it attended
# (`stats.summary()["key_error"]`), and comparing its next-token predictions with full attention shows
# what that does to the output.

# %%
steps = 12
policies = [make_policy("full"), make_policy("svd", rank=r), make_policy("svd", rank=96)]
caches, logits = lab.decode_policies(model, lab.cut_prompt(full, T), policies, steps, feed=answer_ids, track=True)
ref = logits[0].argmax(-1)  # full attention's predictions, [steps]
for p, cache, lg in zip(policies[1:], caches[1:], logits[1:]):
    s = cache.stats.summary()
    kl = torch.nn.functional.kl_div(lg.log_softmax(-1), logits[0].log_softmax(-1), log_target=True, reduction="batchmean")
    print(f"rank {p.keys.rank:3d}: error of the attended keys {s['key_error']:.3f} (offline above: "
          f"{err[:, ranks.index(p.keys.rank)].mean():.3f}), same next token as full attention "
          f"{(lg.argmax(-1) == ref).float().mean():.0%} of {steps} steps, KL {kl:.3f}")

# %% [markdown]
# **What the numbers show.** Pre-RoPE keys are clearly more compressible than post-RoPE keys, which is why
# ShadowKV factorises before RoPE. Still, at ShadowKV's share of the channels a noticeable part of the key
# energy is lost, and the query's top tokens change: a sizeable share of the oracle's top-k no longer ranks
# in the top-k under the rebuilt keys (the per-layer bars show where). On this 135M model the
# effect on the next token over a dozen steps is small (the top-1 prediction mostly survives), so read the
# top-k overlap as the mechanism rather than as a measured accuracy loss; the paper measures the loss on 3B-30B
# models over full Text2JSON answers. Notebook 3 turns to the second failure mode: chunk-mean landmarks.
