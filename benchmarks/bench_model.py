"""Speed of model.py against transformers on the default model: prefill 2048 tokens, decode 128.

Both run the same weights (the converted SmolLM2 folder), the same dtype and thread count,
side by side in one process, and the same protocol: prefill the prompt into a KV cache
(only the last position's logits), then 128 greedy steps, one token each. Prints the median
of a few repeats and model.py's speed as a multiple of transformers' (target: >= 1.0x).

    python benchmarks/bench_model.py [--prompt-len 2048] [--new-tokens 128] [--repeats 5] [--threads 2]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import kvcache  # noqa: E402
import model  # noqa: E402


@torch.inference_mode()
def run_ours(m, prompt, n_new):
    """(prefill seconds, decode seconds, tokens) for model.py with the full-attention cache."""
    cache = kvcache.FullCache(m.config.n_layers)
    t0 = time.perf_counter()
    logits = m(prompt, cache, last_only=True)  # [1, 1, vocab]
    t1 = time.perf_counter()
    tokens = [int(logits[0, -1].argmax())]
    for _ in range(n_new - 1):
        logits = m(torch.tensor([[tokens[-1]]]), cache)  # [1, 1, vocab]
        tokens.append(int(logits[0, -1].argmax()))
    return t1 - t0, time.perf_counter() - t1, tokens


@torch.inference_mode()
def run_hf(hf, prompt, n_new):
    """The same protocol for transformers (its DynamicCache, logits of the last position only)."""
    t0 = time.perf_counter()
    out = hf(prompt, use_cache=True, logits_to_keep=1)
    t1 = time.perf_counter()
    tokens = [int(out.logits[0, -1].argmax())]
    for _ in range(n_new - 1):
        out = hf(torch.tensor([[tokens[-1]]]), cache=out.cache, use_cache=True, logits_to_keep=1)
        tokens.append(int(out.logits[0, -1].argmax()))
    return t1 - t0, time.perf_counter() - t1, tokens


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()

    import transformers

    torch.set_num_threads(args.threads)
    path = Path(args.model) if args.model else model.default_model_dir()
    ours, tok = model.load_model(path, dtype=args.dtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=model._dtype(args.dtype), attn_implementation="sdpa"
    ).eval()
    # a deterministic prompt of real text, tiled to the wanted length
    text = " ".join(f"Record {i}: the city of Lyon lies on the Rhone, item {i * 7 % 13}." for i in range(400))
    ids = (tok.encode(text) * 4)[: args.prompt_len]
    if len(ids) < args.prompt_len:
        sys.exit(f"error: built only {len(ids)} prompt tokens")
    prompt = torch.tensor([ids])  # [1, prompt_len]

    print(
        f"{path.name}: prefill {args.prompt_len} tokens + decode {args.new_tokens}, {args.dtype}, "
        f"{args.threads} threads, torch {torch.__version__}, transformers {transformers.__version__}"
    )
    run_ours(ours, prompt[:, :64], 4), run_hf(hf, prompt[:, :64], 4)  # warm-up
    times = {"model.py": [], "transformers": []}
    both = [("model.py", run_ours, ours), ("transformers", run_hf, hf)]
    for r in range(args.repeats):  # alternate, and which goes first too, so machine noise hits both alike
        for name, fn, m in both if r % 2 == 0 else both[::-1]:
            pre, dec, tokens = fn(m, prompt, args.new_tokens)
            times[name].append((pre, dec, tokens))
            print(f"  repeat {r}: {name:12s} prefill {pre:6.2f}s  decode {dec:6.2f}s", flush=True)

    a, b = times["model.py"][0][2], times["transformers"][0][2]
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    print(f"greedy tokens identical for the first {same} of {len(a)} steps")
    rate = {}
    for name, rows in times.items():
        pre = statistics.median(r[0] for r in rows)
        dec = statistics.median(r[1] for r in rows)
        rate[name] = (args.prompt_len / pre, (args.new_tokens - 1) / dec)
        print(
            f"{name:12s} prefill {rate[name][0]:8.1f} tok/s   decode {rate[name][1]:6.2f} tok/s   (medians)"
        )
    print(
        f"model.py / transformers: prefill {rate['model.py'][0] / rate['transformers'][0]:.2f}x   "
        f"decode {rate['model.py'][1] / rate['transformers'][1]:.2f}x"
    )


if __name__ == "__main__":
    main()
