"""Device vs offloaded memory per policy, for Llama-3.1-8B shapes (PAPER.md "Memory accounting").

Builds one layer's cache for every policy from random bf16 keys/values of a 32K-token prompt
(8 KV heads x 128 channels = 1024, as in Llama-3.1-8B) and reads the bytes off the real tensors
(`memory()` of each cache: packed codes and scales, not dequantized copies). The paper's numbers to
reproduce: ShadowKV's U + chunk-8 landmarks are about 14% of the bf16 KV (plus outliers and the
local window); 2-bit quantized landmarks are about 6.6%.

    python benchmarks/memory_table.py [--tokens 32768]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kvcache import from_kv, from_prefill, make_policy  # noqa: E402
from model import ModelConfig, Rope  # noqa: E402

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
    ("svd", dict(rank=160)),
    ("shadowkv", dict(rank=160)),
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
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768)
    args = ap.parse_args()
    T, cfg = args.tokens, LLAMA_8B
    one_layer = ModelConfig(**{**cfg.__dict__, "n_layers": 1})
    g = torch.Generator().manual_seed(0)
    # keys with a few strong channels, like real keys; values plain Gaussian
    k = (torch.randn(1, 8, T, 128, generator=g) * torch.linspace(0.3, 3.0, 128)).bfloat16()  # [1, H, T, d]
    v = torch.randn(1, 8, T, 128, generator=g).bfloat16()  # [1, H, T, d]
    full, rope = from_kv([k], [v]), Rope(one_layer)
    bf16_per_token = 2 * 8 * 128 * 2  # K and V, bf16, per token per layer
    print(
        f"Llama-3.1-8B shapes, {T} prompt tokens, {cfg.n_layers} layers; bf16 KV = "
        f"{bf16_per_token} B/token/layer, {bf16_per_token * T * cfg.n_layers / 2**30:.2f} GiB in all\n"
    )
    print(
        "| policy | budget | device B/token/layer | offloaded B/token/layer | device share of bf16 KV "
        "| of which landmarks + factors | of which exact tokens | device GiB (32 layers) | offloaded GiB |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, kw in POLICIES:
        cache = from_prefill(full, make_policy(name, **kw), rope)
        m = cache.memory()
        label = cache.policy.label()
        budget = "all" if name == "full" else cache.budget_line().split(" = ")[1].split(" of ")[0]
        print(
            f"| {label} | {budget} | {m['device'] / T:.1f} | {m['offloaded'] / T:.1f} | "
            f"{100 * m['device_fraction']:.2f}% | {100 * m['summary_fraction']:.2f}% | "
            f"{100 * m['exact_fraction']:.2f}% | {m['device'] * cfg.n_layers / 2**30:.3f} | "
            f"{m['offloaded'] * cfg.n_layers / 2**30:.3f} |",
            flush=True,
        )
    print(
        "\nDevice share counts landmarks, low-rank factors, and the exact sink/local/outlier tokens;"
        " oracle/mean/svd keep exact (bf16) scoring keys on the device, by construction."
    )


if __name__ == "__main__":
    main()
