"""Decode-step attention time per layer against prompt length, and the cost of building each cache.

Part 1 (issue target: every sparse policy's decode step no slower than `full` from 16K tokens on):
a stack of layers with the default model's attention shapes (9 query heads, 3 KV heads x 64), each
with its own random prompt K/V of 4K, 16K and 64K tokens; the time of `cache.attend` per layer of a
decode step (all layers in turn, as a model runs them), median over steps, per policy.
  - Several layers, not one: between two visits of a layer the others run, so its K/V are no longer
    in the CPU caches (8 layers of 16K tokens are 200 MB, the development machine's L3 32 MiB), while
    the code of the ops stays warm, as in a real decode step. (Timing one layer over and over, the
    K/V of a 16K prompt, 25 MB, could stay in the L3 from one step to the next.)
  - Round robin: each repeat runs one decode step of every policy in turn, so a slow spell of the
    machine hits all policies alike and the ratios to `full` are measured side by side.

Part 2 (issue target: scoring 2-bit landmarks within 6x of its streaming bound at 64K): the
landmark scoring of the 2-bit `quantized` caches of part 1 alone (`landmarks.score`, every layer in
turn), against the time it takes to read their packed codes and scales once at the machine's
measured read bandwidth (a sum over 256 MiB, median of 5): bytes read per step / bandwidth.

Part 3 (issue target: 2-bit `quantized` build overhead at most 10% of the prefill forward): the
default model prefills an 8K-token prompt once (timed), then every policy builds its summary from
that prefill (`kvcache.from_prefill`: SVD, landmarks, quantization), timed, as a share of it.

    python benchmarks/decode_speed.py [--lengths 4096 16384 65536] [--layers 8] [--repeats 30] [--skip-build]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import landmarks  # noqa: E402
from kvcache import FullCache, from_kv, from_prefill  # noqa: E402
from model import ModelConfig, Rope, load_model  # noqa: E402
from policy import make_policy  # noqa: E402

POLICIES = [
    ("full", {}),
    ("oracle", {}),
    ("mean", dict(chunk_size=8)),
    ("svd", {}),
    ("shadowkv", {}),
    ("quantized", dict(landmark_bits="2")),
    ("quantized", dict(landmark_bits="4")),
]


@torch.inference_mode()
def decode_attention(lengths, repeats, layers):
    cfg = ModelConfig(
        arch="LlamaForCausalLM",
        vocab_size=49152,
        dim=576,
        n_layers=layers,
        n_heads=9,
        n_kv_heads=3,
        head_dim=64,
        ffn_dim=1536,
        norm_eps=1e-5,
        rope_theta=100000.0,
        rope_scaling=None,
        max_positions=1 << 20,
        tie_embeddings=True,
        qkv_bias=False,
        qk_norm=False,
        bos_id=1,
        eos_ids=[2],
    )
    rope = Rope(cfg)
    print(
        f"## Decode-step attention time per layer (ms; {layers} layers, median of {repeats} steps, round robin)\n"
    )
    print("| policy | " + " | ".join(f"{T // 1024}K" for T in lengths) + " |")
    print("|---|" + "---:|" * len(lengths))
    rows = {}
    scoring = []  # per length: (landmark bytes per layer, median scoring ms per layer) of 2-bit quantized
    for T in lengths:
        g = torch.Generator().manual_seed(T)
        ks = [
            torch.randn(1, 3, T, 64, generator=g) * torch.linspace(0.3, 3.0, 64) for _ in range(layers)
        ]  # [1, H, T, d]
        vs = [torch.randn(1, 3, T, 64, generator=g) for _ in range(layers)]  # [1, H, T, d]
        full = from_kv(ks, vs)
        q = torch.randn(1, 9, 1, 64, generator=g)  # [1, n_heads, 1, d]
        k1, v1 = torch.randn(1, 3, 1, 64, generator=g), torch.randn(1, 3, 1, 64, generator=g)
        pos = torch.tensor([T])
        caches = {}
        for name, kw in POLICIES:
            cache = from_prefill(full, make_policy(name, **kw), rope)
            caches[cache.policy.label()] = cache
        times = {label: [] for label in caches}
        for rep in range(repeats + 3):
            for label, cache in caches.items():
                t0 = time.perf_counter()
                for layer in range(layers):
                    cache.attend(layer, q, k1, v1, pos)
                if rep >= 3:  # the first steps warm up
                    times[label].append((time.perf_counter() - t0) / layers)
        for label, ts in times.items():
            rows.setdefault(label, []).append(1e3 * statistics.median(ts))
        scoring.append(score_time(caches["quantized 2b"], q, repeats, layers))
        del caches, full
    for label, times in rows.items():
        ratio = (
            ""
            if label == "full"
            else " (" + ", ".join(f"{t / f:.2f}x" for t, f in zip(times, rows["full"])) + " of full)"
        )
        print(f"| {label} | " + " | ".join(f"{t:.2f}" for t in times) + f" |{ratio}")
    print()
    return scoring


@torch.inference_mode()
def score_time(cache, q, repeats, layers):
    """(bytes of landmarks per layer, median ms per layer) of scoring a cache's landmarks alone."""
    select = cache.policy.select
    qg = q[0].view(3, 3, 1, 64)  # [H, G, Tq, d]
    times = []
    for rep in range(repeats + 3):
        t0 = time.perf_counter()
        for layer in range(layers):
            landmarks.score(qg, cache.layers[layer].marks, select.score_rule, select.per)  # [H, N]
        if rep >= 3:
            times.append((time.perf_counter() - t0) / layers)
    nbytes = statistics.mean(cache.layers[layer].marks.nbytes(None) for layer in range(layers))
    return nbytes, 1e3 * statistics.median(times)


def read_bandwidth():
    """Bytes per second this machine reads from memory: a sum over 256 MiB, median of 5."""
    x = torch.ones(64 << 20)  # [64M] float32, 256 MiB: far beyond the CPU caches
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(times)


def scoring_bound(lengths, scoring):
    bw = read_bandwidth()
    print(f"## Scoring 2-bit landmarks against its streaming bound (read bandwidth {bw / 1e9:.1f} GB/s)\n")
    print(
        "| prompt | landmark bytes per layer | scoring (ms per layer) | streaming bound (ms) | x of bound |"
    )
    print("|---|---:|---:|---:|---:|")
    for T, (nbytes, ms) in zip(lengths, scoring):
        bound = 1e3 * nbytes / bw
        print(f"| {T // 1024}K | {nbytes / 2**20:.2f} MiB | {ms:.3f} | {bound:.3f} | {ms / bound:.1f}x |")
    print()


@torch.inference_mode()
def build_overhead(tokens):
    model, tok = load_model()
    ids = torch.randint(100, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    full = FullCache(model.config.n_layers)
    t0 = time.perf_counter()
    model(ids, full, last_only=True)
    prefill = time.perf_counter() - t0
    print(f"## Cache build time after an {tokens}-token prefill of the default model ({prefill:.2f} s)\n")
    print("| policy | build (s) | share of the prefill forward |")
    print("|---|---:|---:|")
    for name, kw in POLICIES[1:]:
        policy = make_policy(name, **kw)
        from_prefill(full, policy, model.rope)  # warm-up (grids are fitted once and cached on disk)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            from_prefill(full, policy, model.rope)
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        print(f"| {policy.label()} | {t:.3f} | {100 * t / prefill:.1f}% |", flush=True)
    print()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--build-tokens", type=int, default=8000)
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--layers", type=int, default=8, help="layers per decode step, each with its own K/V")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    scoring = decode_attention(args.lengths, args.repeats, args.layers)
    scoring_bound(args.lengths, scoring)
    if not args.skip_build:
        build_overhead(args.build_tokens)


if __name__ == "__main__":
    main()
