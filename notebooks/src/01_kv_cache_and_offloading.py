# %% [markdown]
# # 1. The KV cache, and what offloading moves
#
# Every generated token attends to every prompt token, so a model keeps the keys and values (K/V)
# of all past tokens: the **KV cache**. With long prompts it is larger than the model itself, and
# reading it all at every decode step is what makes decoding slow (PAPER.md, "The problem").
# **KV offloading** keeps the full cache in CPU memory and, at each decode step and layer, brings
# only a few selected prompt tokens to the GPU; a small *summary* of the keys stays on the GPU to
# decide which ones.
#
# This notebook looks at:
# 1. what the cache holds, per layer, on the course's default model (SmolLM2-135M-Instruct);
# 2. the memory arithmetic of Llama-3.1-8B at 128K tokens, the paper's setting;
# 3. what each selection policy keeps on the device and moves per decode step;
# 4. the same on the real model, and (section 5) inside the transformers model you may already have.
#
# Everything runs on a laptop CPU; the code lives in the project's modules (`model.py`,
# `kvcache.py`, `offload.py`), the notebook only calls them.

# %%
import sys
sys.path.insert(0, "..")  # the repo root: model.py, kvcache.py, landmarks.py, ...
import torch
import matplotlib.pyplot as plt
torch.set_num_threads(2)

import lab
from model import load_model, ModelConfig, Rope
from kvcache import SparseCache, from_kv, from_prefill
from policy import make_policy, POLICIES, OUTLIER_SHARE
import skew

model, tok = load_model()  # SmolLM2-135M-Instruct, converted once into ~/.cache/kvoffload
cfg = model.config
print(f"{cfg.n_layers} layers, {cfg.n_heads} query heads, {cfg.n_kv_heads} KV heads x {cfg.head_dim} channels")

# %% [markdown]
# ## 1. What the cache holds
#
# We take one synthetic Text2JSON prompt (`text2json.generate`: records of people hidden in filler
# prose, the paper's context-intensive task) of about 1K tokens and run the *prefill*: one forward
# pass over the whole prompt with full attention. Each layer hands its post-RoPE keys and values to
# the cache (`cache.attend`), which stores them as `[batch, kv_heads, tokens, head_dim]`.

# %%
sample, prompt_ids, gold = lab.text2json_sample(tok)
full, logits = lab.prefill(model, prompt_ids)
T = len(prompt_ids)
print(f"prompt: {T} tokens;", full.budget_line())
for layer in (0, 1, cfg.n_layers - 1):
    print(f"layer {layer:2d}: k {tuple(full.k[layer].shape)} v {tuple(full.v[layer].shape)} {full.k[layer].dtype}")

# %% [markdown]
# Every layer holds the same amount: 2 (K and V) x kv_heads x head_dim numbers per token. Grouped-query
# attention (GQA) is why it is only 3 KV heads for 9 query heads here: each KV head serves a group of
# 3 query heads. Summed over the layers, per token and in total:

# %%
per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim  # numbers per token
real = sum(t.numel() * t.element_size() for t in full.k + full.v)
print(f"{per_token} numbers per token = {per_token * 2} bytes in bf16 ({per_token * 4} in float32, as here)")
print(f"this prompt: {real / 2**20:.1f} MiB in float32; memory() counts bf16: {full.memory()['device'] / 2**20:.1f} MiB")

# %% [markdown]
# The keys are not all alike. Left: the norm of each key, per token, for three layers (KV head 0): the first
# token (the "attention sink") stands out. Right: how similar a key is to the key d tokens later (mean cosine
# similarity): neighbours are more alike than distant tokens, which is what chunk landmarks (notebook 3)
# rely on, and, as notebook 3 shows, not enough.

# %%
fig, ax = plt.subplots(1, 2, figsize=(11, 3))
gaps = [1, 2, 4, 8, 16, 32, 64, 128]
for layer in (2, 15, 28):
    k = full.k[layer][0, 0]  # [T, head_dim]
    ax[0].plot(k.norm(dim=-1), lw=0.7, label=f"layer {layer}")
    cos = [torch.nn.functional.cosine_similarity(k[:-g], k[g:], dim=-1).mean().item() for g in gaps]
    ax[1].plot(gaps, cos, "o-", label=f"layer {layer}")
ax[0].set_xlabel("token position"); ax[0].set_ylabel("|key|"); ax[0].set_yscale("log"); ax[0].legend(); ax[0].set_title("key norms")
ax[1].set_xscale("log", base=2); ax[1].set_xlabel("distance d (tokens)"); ax[1].set_ylabel("mean cosine")
ax[1].legend(); ax[1].set_title("similarity of keys d tokens apart")
plt.tight_layout(); plt.show()

# %% [markdown]
# ## 2. Llama-3.1-8B at 128K tokens
#
# The paper's main model: 32 layers, 8 KV heads of 128 channels, bf16. Per token that is
# 2 x 32 x 8 x 128 values x 2 bytes = 128 KiB, so a 128K-token prompt needs **16 GiB** of KV cache, as
# much as the 8B weights in bf16 (16 GB). We check the arithmetic against the cache's `memory()` on a
# one-layer cache of random bf16 tensors of the right shape (no weights needed), times 32 layers.

# %%
llama = ModelConfig(arch="LlamaForCausalLM", vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                    head_dim=128, ffn_dim=14336, norm_eps=1e-5, rope_theta=500000.0, rope_scaling=None,
                    max_positions=131072, tie_embeddings=False, qkv_bias=False, qk_norm=False, bos_id=None)
one_layer = ModelConfig(**{**llama.__dict__, "n_layers": 1})


def random_cache(n_tokens, seed=0):
    """A full one-layer cache of random bf16 K/V with Llama-3.1-8B's shapes (memory does not depend on values)."""
    g = torch.Generator().manual_seed(seed)
    shape = (1, 8, n_tokens, 128)  # [1, kv_heads, T, head_dim]
    k = torch.empty(shape, dtype=torch.bfloat16).normal_(generator=g)
    v = torch.empty(shape, dtype=torch.bfloat16).normal_(generator=g)
    return from_kv([k], [v])


T_LONG = 128 * 1024
arithmetic = T_LONG * llama.n_layers * 2 * llama.n_kv_heads * llama.head_dim * 2  # bytes
measured = random_cache(T_LONG).memory()["device"] * llama.n_layers
print(f"arithmetic: {arithmetic / 2**30:.2f} GiB   memory() x 32 layers: {measured / 2**30:.2f} GiB")
assert arithmetic == measured

# %%
lengths = [4096 * 2**i for i in range(6)]  # 4K .. 128K
gib = [n * arithmetic / T_LONG / 2**30 for n in lengths]
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot([n // 1024 for n in lengths], gib, "o-", label="KV cache (bf16)")
ax.axhline(16e9 / 2**30, color="gray", ls="--", label="8B weights (bf16)")
ax.set_xlabel("prompt length (K tokens)"); ax.set_ylabel("GiB"); ax.set_xscale("log", base=2); ax.legend()
ax.set_title("Llama-3.1-8B: KV cache against weights")
plt.show()

# %% [markdown]
# ## 3. What each policy keeps on the device, and what a decode step moves
#
# The policies of `kvcache.py` (module docstring; PAPER.md "ShadowKV, precisely" and "The paper's
# method") share one budget accounting: the last 64 prompt tokens (the local window; ShadowKV: 32) are
# always attended exactly, no sink tokens are (the first tokens compete through their landmarks like any
# other; only `paper_fast` keeps the first and last 0.625% of the prompt exact), plus 3.125% of the prompt
# chosen at every decode step and layer. They differ in the *summary*
# kept on the device to make that choice, and in what they fetch:
#
# | policy | summary on the device | fetched from CPU per step |
# |---|---|---|
# | oracle | every exact key (the ceiling, not a practical method) | selected K and V |
# | mean | mean key of each chunk of 8 tokens | selected K and V |
# | svd | every exact key, plus a rank-r factor U of the keys | selected V (keys rebuilt from U) |
# | shadowkv | chunk means + U + 48 outlier chunks kept exact | selected V |
# | quantized | every key as its own landmark, 2-bit HIGGS codes | selected K and V |
# | paper | the same 2-bit landmarks | selected K and V, stored 4-bit (keys before RoPE) |
# | paper_fast | the same 2-bit landmarks, mean-query scoring | selected K and V in fp8 (budget 1.5625%) |
# | quest | min and max key of each chunk of 16 tokens | selected K and V |
#
# We build each policy on one random Llama-shaped layer of 16K tokens (a 128K SVD would take too long on a
# laptop; the shares barely depend on the length), run one decode step with a random query, and read
# `memory()` and the offload store's byte counter.

# %%
T_MID = 16 * 1024
base = random_cache(T_MID)
rows = []
for name in POLICIES:
    policy = make_policy(name)
    if policy.sparse and (policy.select.kind.needs_queries or policy.select.kind.needs_calibration):
        print(f"{name:10s} builds from the prefill's queries or a calibration: see benchmarks/memory_table.py")
        continue
    cache = from_prefill(base, policy, Rope(one_layer))
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 32, 1, 128, generator=g).bfloat16()  # [1, n_heads, 1, head_dim]
    kv = torch.randn(1, 8, 1, 128, generator=g).bfloat16()  # [1, kv_heads, 1, head_dim]
    cache.attend(0, q, kv, kv, torch.tensor([T_MID]))  # one decode step of this layer
    m = cache.memory()
    rows.append((name, m["summary_fraction"], m["exact_fraction"], m["device_fraction"], cache.bytes_fetched))
    print(f"{name:10s} {cache.budget_line()}")

# %%
print(f"{'policy':10s} {'summary':>8s} {'exact':>7s} {'device':>7s} {'device GiB at 128K':>19s} {'moved/step at 128K':>19s}")
for name, summ, exact, dev, moved in rows:
    scale = T_LONG / T_MID  # selected tokens grow with the prompt; the local window and outliers do not (negligible)
    print(f"{name:10s} {summ:8.1%} {exact:7.1%} {dev:7.1%} {dev * arithmetic / 2**30:19.2f} "
          f"{moved * llama.n_layers * scale / 2**20:16.0f} MiB")

# %% [markdown]
# Reading the table (shares of the full bf16 cache):
# - **full** keeps everything on the device (16 GiB) and moves nothing;
# - **ShadowKV** keeps about 14% (rank-160 factor U + 8-token chunk landmarks: PAPER.md "Memory
#   accounting" gives ≈14%), plus its 48 outlier chunks exact (384 tokens, 2.3% of this 16K prompt); it
#   fetches only values, since keys are rebuilt;
# - **quantized** (the paper's fix) keeps every key as a 2-bit landmark: 2 bits + a 16-bit scale per
#   128 channels = 2.125 bits per key value, 6.6% of the cache (PAPER.md "Memory accounting");
#   **paper** and **paper_fast** keep the same landmarks;
# - **mean** chunk-8 landmarks in bf16 cost 1/8 of the keys = 6.25%, about the same as 2-bit token
#   landmarks, which is the paper's point: at equal memory, token-level quantized landmarks beat chunk means
#   (notebooks 3 and 4); **quest**'s min and max of 16-token chunks cost the same 2/16 = 6.25%;
# - **oracle** and **svd** keep every exact key on the device: they are measuring instruments, not methods.
#
# Every sparse policy but `paper_fast` selects 3.125% of the prompt per layer and step: at 128K that is 4096
# tokens x 32 layers, 512 MiB of exact K+V (256 MiB for the low-rank policies, which fetch only V) per
# generated token, over PCIe. **paper** stores its K/V 4-bit with one scale group per token over all KV
# heads' channels, so each token a KV head selects is fetched whole, for all 8 heads: with 8 heads choosing
# mostly different tokens (as these random queries do) that is about 8 x 1/4 = 2x the bytes of exact
# per-head rows, the 1028 MiB above. **paper_fast** selects half as many tokens (1.5625%) and fetches them
# in fp8 per head: 128 MiB.

# %% [markdown]
# ## 4. The same on the real model
#
# Back to SmolLM2 and our 1K-token prompt: we decode 4 tokens with every policy at once (one batch,
# `kvcache.StackedCache`, see `lab.decode_policies`) and count what each fetched. The model runs in
# float32, so every exact fetched value is 4 bytes here; `paper` and `paper_fast` fetch their packed 4-bit /
# fp8 K/V instead (no exact count to check). ShadowKV's 48 outlier chunks (384 tokens) are sized for
# long prompts and would be over a third of this one, so here, as `evaluate.py`'s default run does, its
# outlier count is scaled to the prompt: `outliers=policy.OUTLIER_SHARE`, the 1.9% of the prompt that 48
# chunks are of the mean 20.1K-token Text2JSON prompt.

# %%
policies = [make_policy(name, outliers=OUTLIER_SHARE if name == "shadowkv" else None) for name in POLICIES]
first = int(logits.argmax())  # the prefill's prediction: exact for every policy
caches, _ = lab.decode_policies(model, full, policies, steps=4, first=first, calibration=skew.calibration(model, tok))
for p, cache in zip(policies, caches):
    m = cache.memory()
    sparse = isinstance(cache, SparseCache)
    sel = cache.split.selected if sparse else 0
    per_step = cache.bytes_fetched / 4
    heads = cfg.n_heads if sparse and p.select.per == "query_head" else cfg.n_kv_heads  # LRQK, InfiniGen: per query head
    layers = cfg.n_layers - (p.select.dense_layers if sparse else 0)  # InfiniGen's first 2 layers select nothing
    expected = sel * layers * heads * cfg.head_dim * 4 * (1 if p.keys.source == "low_rank" else 2)  # V only when keys are rebuilt
    check = (f"as {p.keys.kv_bits}" if p.keys.kv_bits else
             f"only the misses ({cache.stats.hits / cache.stats.selected:.0%} hits)" if p.keys.resident else per_step == expected)
    print(f"{p.label():15s} device {m['device_fraction']:6.1%} of bf16 KV, fetched {per_step / 1024:7.1f} KiB per step"
          f" = {sel} tokens x {layers} layers x {heads} heads x {'V' if p.keys.source == 'low_rank' else 'K+V'}: {check}")

# %% [markdown]
# On a 1K-token prompt the fixed 64-token local window is 6% of the prompt, so every sparse policy's
# device share is larger than at 128K; the per-token costs are the same as above. Notebook 2 looks at why
# ShadowKV's low-rank keys lose information, notebook 3 at why chunk-mean landmarks pick the wrong
# tokens, and notebook 4 at the quantized token-level landmarks that fix both.

# %% [markdown]
# ## 5. The same policy inside a transformers model
#
# If you hold your model as a transformers `AutoModelForCausalLM`, `hf.py` runs any policy inside it, with
# `generate`: `hf.policy_cache` gives a transformers `Cache` that keeps nothing itself and hands every layer's new
# q, k, v (through transformers' attention-function registry) to the policy's cache. The prompt's K/V sit in our
# offload store, and every decode step selects, fetches and attends through `kvcache.py`, as above. The same SmolLM2
# folder, read by transformers this time, the same prompt, 16 greedy tokens; then model.py's `generate` with the
# same policy, which must write the same tokens.

# %%
import warnings

# transformers imports tqdm's notebook bars, which warn (naming this machine's paths) without ipywidgets
warnings.filterwarnings("ignore", message="IProgress not found")
from transformers import AutoModelForCausalLM  # noqa: E402
import hf
from model import default_model_dir, generate

lm = AutoModelForCausalLM.from_pretrained(default_model_dir())  # transformers' own model of the same checkpoint
cache = hf.policy_cache(lm, make_policy("quantized", track=True))
ids = torch.tensor([prompt_ids])
out = lm.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=16, do_sample=False)
print(repr(tok.decode(out[0, T:].tolist())))
print(f"{cache.budget_line()}; oracle recall {cache.stats.summary()['oracle_recall']:.3f}; "
      f"{cache.bytes_fetched / 2**20:.1f} MiB fetched from the offload store")
same = out[0, T:].tolist() == generate(model, prompt_ids, 16, policy=make_policy("quantized"))
print("model.py writes the same tokens:", same)

