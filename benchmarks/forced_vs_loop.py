"""The teacher-forced pass against the decode loop on the default model: per configuration, how far apart.

Decodes one sample of the default run (its gold-forced rows) twice, through the decode loop (one token per
step, `--decode-loop`) and through the teacher-forced pass (the default, PAPER.md "Gold-forced rows"),
watching both (the logits every gold row observes, the rows every cache selects at every position and
layer), and prints per configuration: the largest logit difference, the share of identical selections
(per position, layer and selecting head), each row figure of both paths, and the fact tokens whose top-1
differs between them, with the gap between their two best logits.

    python benchmarks/forced_vs_loop.py [--tokens 2048] [--sample 0] [--methods full,oracle,...]
"""

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import evaluate  # noqa: E402
import experiment  # noqa: E402
import kvcache  # noqa: E402
import model  # noqa: E402

FIGURES = (
    "fact_accuracy",
    "field_accuracy",
    "fact_nll",
    "agreement",
    "kl",
    "oracle_recall",
    "attention_mass",
    "key_error",
    "hit_rate",
    "bytes_per_step",
)


def watched(path, m, tok, sample, policies, max_new, args):
    """evaluate_sample through `path` ("loop" or "pass"), recording what each gold row sees: its rows,
    {key: [n, vocab] logits} and {key: {layer: [n, P, S] selected positions}}; and the seconds it took."""
    logits, picks = defaultdict(list), defaultdict(lambda: defaultdict(list))
    observe, attend, forced = (
        experiment.GoldRow.observe,
        kvcache.SparseCache.attend,
        kvcache.SparseCache.attend_forced,
    )

    def spy_observe(row, step_logits, *refs):
        logits[row.policy.key()].append(step_logits.detach().clone())  # [n, vocab]
        return observe(row, step_logits, *refs)

    def spy(method, each):
        def call(cache, layer, *a, **kw):
            out = method(cache, layer, *a, **kw)
            if cache.policy.track and cache.last_selected[layer] is not None:  # a gold row's cache
                sel = cache.last_selected[layer]  # [P, S] a step, [P, Tq, S] a forced block
                picks[cache.policy.key()][layer].append(sel.transpose(0, 1) if each else sel[None])
            return out

        return call

    experiment.GoldRow.observe = spy_observe
    kvcache.SparseCache.attend, kvcache.SparseCache.attend_forced = spy(attend, False), spy(forced, True)
    try:
        t0 = time.perf_counter()
        rows = experiment.evaluate_sample(
            m, tok, sample, policies, max_new, "text2json", False, False, path == "pass", {}
        )
        seconds = time.perf_counter() - t0
    finally:
        experiment.GoldRow.observe = observe
        kvcache.SparseCache.attend, kvcache.SparseCache.attend_forced = attend, forced
    logits = {k: torch.cat(v) for k, v in logits.items()}  # [n, vocab]
    picks = {k: {layer: torch.cat(s) for layer, s in by.items()} for k, by in picks.items()}  # [n, P, S]
    return {r["key"]: r for r in rows}, logits, picks, seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--sample", type=int, default=0)
    p.add_argument("--methods", default=evaluate.DEFAULT_METHODS)
    args = p.parse_args()
    run = evaluate.build_parser().parse_args(["--tokens", str(args.tokens), "--methods", args.methods])
    policies = evaluate.check_inputs(run)
    if any(p.sparse and p.select.kind.needs_calibration for p in policies):
        raise SystemExit("error: InfiniGen needs its calibration: leave it out of --methods here")
    m, tok = model.load_model(None)
    samples, _ = experiment.load_samples(run, tok)
    sample = samples[args.sample]
    max_new = experiment.auto_max_new_tokens(samples, tok)
    torch.set_num_threads(experiment.DECODE_THREADS)
    loop = watched("loop", m, tok, sample, policies, max_new, args)
    forced = watched("pass", m, tok, sample, policies, max_new, args)
    gold_ids, _, _ = experiment.gold_tokens("text2json", sample, tok)
    print(
        f"sample {sample['id']}: {loop[0][policies[0].key()]['prompt_tokens']} prompt tokens, "
        f"{loop[0][policies[0].key()]['gold_tokens']} answer positions; decode loop {loop[3]:.1f} s, "
        f"teacher-forced pass {forced[3]:.1f} s (one thread)\n"
    )
    print("| configuration | max logit diff | identical selections | " + " | ".join(FIGURES) + " |")
    print("|---|---:|---:|" + "---|" * len(FIGURES))
    flips = []
    for p in policies:
        key = p.key()
        a, b = loop[1][key], forced[1][key]  # [n, vocab] each
        diff = float((a - b).abs().max())
        same = total = 0
        for layer, sel in loop[2].get(key, {}).items():
            other = forced[2][key][layer]  # [n, P, S]
            equal = (sel == other).all(dim=-1)  # [n, P]
            same, total = same + int(equal.sum()), total + equal.numel()
        shared = f"{same / total:.4%} of {total}" if total else "-"
        figures = []
        for f in FIGURES:
            x, y = loop[0][key][f], forced[0][key][f]
            figures.append("-" if x is None else f"{x:.6g} / {y:.6g}")
        print(f"| {p.label()} | {diff:.2e} | {shared} | " + " | ".join(figures) + " |")
        for i in (a.argmax(-1) != b.argmax(-1)).nonzero()[:, 0].tolist():  # position i predicts gold i + 1
            top2 = a[i].topk(2).values
            flips.append(
                f"{p.label()}: answer position {i + 1} ({tok.decode([gold_ids[i + 1]])!r}), "
                f"its two best logits {float(top2[0] - top2[1]):.2e} apart"
            )
    print("\n(each figure: decode loop / teacher-forced pass)")
    print("top-1 flips between the paths:" + ("".join(f"\n- {f}" for f in flips) if flips else " none"))


if __name__ == "__main__":
    main()
