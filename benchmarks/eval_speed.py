"""How long one sample of the default run takes, in this tree and in an older commit, side by side.

Times `evaluate.evaluate_sample` on one generated Text2JSON sample: the gold-forced decode of the
default configurations, on one torch thread, as a worker of `python evaluate.py` runs it (the model's
loading is not timed). Each measurement is a fresh process; the two trees alternate which goes first,
so a slow phase of the machine falls on both. Prints per prompt length the medians, their ratio, and
whether every samples.jsonl row is identical (compared as JSON text: every figure to the last digit).

    python benchmarks/eval_speed.py [--commit REV] [--tokens 2048 [4096 8192]] [--sample 0] [--repeats 3]
                                    [--methods full]

--methods full times the floor: the same gold-forced decode with full attention alone (the model's
forwards, still ROWS_PER_FORWARD rows each, and the reference row), the cost no policy can remove.

--commit defaults to BEFORE, main just before the speed-ups of the decode loop; the older tree is
checked out with `git worktree` into a temporary folder and removed afterwards.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BEFORE = "e98bb0f204f701bf85c4a360093195ac445d25f4"  # main before the decode loop's speed-ups


def child(tree, tokens, sample, methods):
    """In a fresh process: time one sample with the code of `tree`; print {seconds, rows} as JSON."""
    sys.path.insert(0, str(tree))
    import torch

    import evaluate
    import model

    argv = ["--tokens", str(tokens)] + (["--methods", methods] if methods else [])
    args = evaluate.build_parser().parse_args(argv)  # the default run otherwise
    policies = evaluate.check_inputs(args)
    m, tok = model.load_model(None)
    samples, _ = evaluate.load_samples(args, tok)
    if sample >= len(samples):
        raise SystemExit(f"error: --sample {sample}: the default run has {len(samples)} samples")
    max_new = evaluate.auto_max_new_tokens(samples, tok)  # over the run's samples, as the run does
    calibration = evaluate.calibrations(m, tok, policies)
    torch.set_num_threads(evaluate.DECODE_THREADS)
    t0 = time.perf_counter()
    rows = evaluate.evaluate_sample(
        m, tok, samples[sample], policies, max_new, args.task, False, evaluate.free_running(args), calibration
    )
    seconds = time.perf_counter() - t0
    if not rows:  # evaluate_sample skipped it (its warning says why)
        raise SystemExit(
            f"error: the sample of --tokens {tokens} does not fit the model's {m.config.max_positions} "
            "positions: give fewer --tokens"
        )
    print(json.dumps(dict(seconds=seconds, rows=rows)))


def measure(tree, tokens, sample, methods):
    """(seconds, rows as JSON text) of one sample, timed in a fresh process with `tree`'s code."""
    cmd = [sys.executable, __file__, "--child", str(tree), "--tokens", str(tokens), "--sample", str(sample)]
    cmd += ["--methods", methods] if methods else []
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tree)
    if done.returncode:
        raise SystemExit(f"error: timing in {tree} failed:\n{done.stderr.strip()}")
    got = json.loads(done.stdout.strip().splitlines()[-1])
    return got["seconds"], json.dumps(got["rows"], sort_keys=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--commit", default=BEFORE, help="the older commit to compare with (default: BEFORE)")
    p.add_argument("--tokens", type=int, nargs="+", default=[2048], help="prompt lengths (default 2048)")
    p.add_argument("--sample", type=int, default=0, help="which sample of the default run (default 0)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", help="evaluate.py's --methods (default: the default run's)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.tokens[0], args.sample, args.methods)

    rev = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", args.commit], capture_output=True, text=True
    )
    if rev.returncode:
        raise SystemExit(f"error: --commit {args.commit}: not a commit of {REPO}")
    differ = []
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "before"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "-q", "--detach", str(old), args.commit], check=True
        )
        try:
            print(
                f"one sample (#{args.sample}) of the default run, methods {args.methods or 'default'}, 1 thread; "
                f"before = {rev.stdout.strip()}, after = this tree"
            )
            print("| prompt tokens | before (s) | after (s) | before / after | rows |")
            print("|---:|---:|---:|---:|---|")
            for tokens in args.tokens:
                times = {"before": [], "after": []}
                rows = {}
                for r in range(args.repeats):
                    order = [("before", old), ("after", REPO)]
                    for name, tree in order if r % 2 == 0 else order[::-1]:
                        seconds, rows[name, r] = measure(tree, tokens, args.sample, args.methods)
                        times[name].append(seconds)
                        print(f"  {tokens} tokens, repeat {r + 1}, {name}: {seconds:.1f} s", file=sys.stderr)
                same = len(set(rows.values())) == 1  # every repeat of both trees
                if not same:
                    differ.append(tokens)
                b, a = statistics.median(times["before"]), statistics.median(times["after"])
                print(
                    f"| {tokens} | {b:.1f} | {a:.1f} | {b / a:.2f}x | {'identical' if same else 'DIFFERENT'} |"
                )
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old)], check=True)
    if differ:
        raise SystemExit(f"error: the rows differ at {differ} prompt tokens: the speed-ups changed a number")
    print("rows identical")


if __name__ == "__main__":
    main()
