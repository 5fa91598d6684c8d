"""Device vs offloaded memory per policy, for Llama-3.1-8B shapes (PAPER.md "Memory accounting").

Builds one layer's cache for every policy from random bf16 keys/values of a 32K-token prompt
(8 KV heads x 128 channels = 1024, as in Llama-3.1-8B) and reads the bytes off the real tensors
(`memory()` of each cache: packed codes and scales, not dequantized copies). The paper's numbers to
reproduce: ShadowKV's U + chunk-8 landmarks are about 14% of the bf16 KV (plus outliers and the
local window); 2-bit quantized landmarks are about 6.6%.

The paper's other baselines (PAPER.md "ArkVale", "LRQK", "InfiniGen") keep other summaries: ArkVale a
cuboid (2 x head_dim values) per 16-token page and KV head, LRQK r coordinates per token and query head
(built from random queries here), InfiniGen its skewed partial keys per query head (a calibration of the
random queries and keys here, `skew.fit_layer`; its first 2 of 32 layers stay dense, added to its
share). After one decode step each cache also holds what it keeps between steps: ArkVale's and LRQK's
resident rows (the selected K/V of the last step, on the device). "fetched/step" is what one decode
step reads from CPU memory when nothing is resident (every selected row); with a resident set a step
fetches only its misses: the last column scales it by the hit rate measured on the default run
(MEASURED_HIT_RATES, from `python evaluate.py --methods full,oracle,shadowkv,arkvale,lrqk,infinigen,
quantized,paper`), random queries having no meaningful hits.

    python benchmarks/memory_table.py [--tokens 32768]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import skew  # noqa: E402
from kvcache import FullCache, SparseCache, from_prefill  # noqa: E402
from model import ModelConfig, Rope  # noqa: E402
from policy import make_policy, override  # noqa: E402

LLAMA_8B = ModelConfig(
    arch="LlamaForCausalLM",
    vocab_size=128256,
    dim=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=8,
    head_dim=128,
    ffn_dim=14336,
    norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling=None,
    max_positions=131072,
    tie_embeddings=False,
    qkv_bias=False,
    qk_norm=False,
    bos_id=128000,
    eos_ids=[128001],
)

POLICIES = [
    ("full", {}),
    ("oracle", {}),
    ("mean", dict(chunk_size=8)),
    ("svd", {}),  # rank 0.15625 of 1024 channels = 160, ShadowKV's
    ("shadowkv", {}),
    ("quantized", dict(landmark_bits="1")),
    ("quantized", dict(landmark_bits="2")),
    ("quantized", dict(landmark_bits="4")),
    ("quantized", dict(landmark_bits="2", residual=4, residual_bits="1")),
    ("quantized", dict(landmark_bits="nvfp4")),
    ("quantized", dict(landmark_bits="fp8")),
    ("paper", {}),  # 2-bit landmarks, K/V 4-bit HIGGS over all 1024 channels of a token, keys pre-RoPE
    ("paper_fast", {}),
    ("quest", dict(chunk_size=16)),
    ("quest", dict(chunk_size=8)),
    ("arkvale", {}),
    ("lrqk", {}),  # rank 16 of 128, the authors' for Llama
    ("infinigen", {}),
]
MEASURED_HIT_RATES = {
    "arkvale": 0.67,
    "lrqk": 0.33,
}  # the notes of the default model's comparison run (README)


def step(cache, g, T):
    """One decode step with a random query (so that resident sets are filled); the bytes it fetched."""
    if not isinstance(cache, SparseCache):
        return 0
    before = cache.bytes_fetched
    q = torch.randn(1, 32, 1, 128, generator=g).bfloat16()  # [1, n_heads, 1, d]
    kv = torch.randn(1, 8, 1, 128, generator=g).bfloat16()  # [1, n_kv_heads, 1, d]
    if "next_query" in cache.asks:  # InfiniGen: the query speculated for this one layer (a random one too)
        cache.speculated[0] = q[0]
    cache.attend(0, q, kv, kv, torch.tensor([T]))
    return cache.bytes_fetched - before


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768)
    args = ap.parse_args()
    T, cfg = args.tokens, LLAMA_8B
    one_layer = ModelConfig(**{**cfg.__dict__, "n_layers": 1})
    g = torch.Generator().manual_seed(0)
    # keys and queries with a few strong channels, like real ones; values plain Gaussian
    scale = torch.linspace(0.3, 3.0, 128)
    k = (torch.randn(1, 8, T, 128, generator=g) * scale).bfloat16()  # [1, H, T, d]
    v = torch.randn(1, 8, T, 128, generator=g).bfloat16()  # [1, H, T, d]
    q = (torch.randn(1, 32, T, 128, generator=g) * scale).bfloat16()  # [1, n_heads, T, d]
    full, rope = FullCache(1, keep_queries=True), Rope(one_layer)
    full.k, full.v, full.q, full.prompt_len = [k], [v], [q], T
    skews, masks = skew.fit_layer(q[0], k[0])
    calibration = dict(skew=skews[None], mask=masks[None], channels=0.2)  # fit_layer's default share
    bf16_per_token = 2 * 8 * 128 * 2  # K and V, bf16, per token per layer
    print(
        f"Llama-3.1-8B shapes, {T} prompt tokens, {cfg.n_layers} layers; bf16 KV = "
        f"{bf16_per_token} B/token/layer, {bf16_per_token * T * cfg.n_layers / 2**30:.2f} GiB in all\n"
    )
    print(
        "| policy | budget | device B/token/layer | offloaded B/token/layer | device share of bf16 KV "
        "| of which landmarks + factors | of which exact tokens | of which resident rows | device GiB (32 layers) "
        "| offloaded GiB | fetched/step (32 layers) | fetched/step at measured hits |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, kw in POLICIES:
        policy = make_policy(name, **kw)
        dense = (
            policy.select.dense_layers if policy.sparse else 0
        )  # InfiniGen's first layers: all on the device
        if dense:
            policy = override(
                policy, dense_layers=0
            )  # this one layer is a selecting one; the dense ones are added
        cache = from_prefill(full, policy, rope, calibration=calibration)
        fetched = step(cache, g, T)  # a resident set is filled by it: memory() counts its rows
        if cache.policy.keys.resident:  # what the step would fetch with nothing resident: every selected row
            row = 128 * cache.store.get(0, "v").element_size()  # bytes of one head's row
            fetched = cache.stats.selected * len(cache.layers[0].keys.fetched) * row
        m = cache.memory()
        share = lambda x: (dense + (cfg.n_layers - dense) * x) / cfg.n_layers  # noqa: E731
        device = share(m["device_fraction"]) * bf16_per_token  # B/token/layer, averaged over the layers
        offloaded = m["offloaded"] / T * (cfg.n_layers - dense) / cfg.n_layers
        rate = MEASURED_HIT_RATES.get(name)
        hits = "–" if rate is None else f"{fetched * (cfg.n_layers - dense) * (1 - rate) / 2**20:.0f} MiB"
        label = cache.policy.label() if not dense else f"{name} ({dense} of {cfg.n_layers} layers dense)"
        budget = "all" if name == "full" else cache.budget_line().split(" = ")[1].split(" of ")[0]
        print(
            f"| {label} | {budget} | {device:.1f} | {offloaded:.1f} | "
            f"{100 * share(m['device_fraction']):.2f}% | {100 * m['summary_fraction']:.2f}% | "
            f"{100 * m['exact_fraction']:.2f}% | {100 * m['resident_fraction']:.2f}% | "
            f"{device * T * cfg.n_layers / 2**30:.3f} | {offloaded * T * cfg.n_layers / 2**30:.3f} | "
            f"{fetched * (cfg.n_layers - dense) / 2**20:.0f} MiB | {hits} |",
            flush=True,
        )
    print(
        "\nDevice share counts landmarks, low-rank factors, and the exact sink/local/outlier tokens;"
        " oracle/mean/svd keep exact (bf16) scoring keys on the device, by construction. The split"
        " columns are of one selecting layer; InfiniGen's device share and GiB include its dense layers."
    )


if __name__ == "__main__":
    main()
