"""How long one sample of the default run takes through the teacher-forced pass and through the decode loop.

Times `experiment.evaluate_sample` on one generated Text2JSON sample: the gold-forced rows of the default
configurations, on one torch thread, as a worker of `python evaluate.py` runs it (the model's loading is
not timed), once with the gold rows through the teacher-forced pass (the default, PAPER.md "Gold-forced
rows") and once step by step through the decode loop (`--decode-loop`). Each measurement is a fresh
process; the two paths alternate which goes first, so a slow phase of the machine falls on both. Prints
per prompt length the medians, their ratio, the peak resident memory of each path's process (the model's
weights included), and the largest difference between the two paths' rows (every figure of every row).

    python benchmarks/eval_speed.py [--tokens 2048 [4096 6912]] [--sample 0] [--repeats 3] [--methods full]

6912 is about the longest prompt the default model's 8,192 positions hold with every sample's whole gold
answer (at 7680 the answers are cut, and the two paths would time different work).

--methods full times the floor: full attention's row alone (the model's forwards and nothing else).
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PATHS = {"pass": [], "loop": ["--decode-loop"]}  # evaluate.py's options for each path


def child(path, tokens, sample, methods):
    """In a fresh process: time one sample through `path`; print {seconds, peak_mib, rows} as JSON."""
    import torch

    import evaluate
    import experiment
    import model

    argv = ["--tokens", str(tokens)] + (["--methods", methods] if methods else []) + PATHS[path]
    args = evaluate.build_parser().parse_args(argv)  # the default run otherwise
    policies = evaluate.check_inputs(args)
    m, tok = model.load_model(None)
    samples, _ = experiment.load_samples(args, tok)
    if sample >= len(samples):
        raise SystemExit(f"error: --sample {sample}: the default run has {len(samples)} samples")
    max_new = experiment.auto_max_new_tokens(samples, tok)  # over the run's samples, as the run does
    calibration = experiment.calibrations(m, tok, policies)
    torch.set_num_threads(experiment.DECODE_THREADS)
    t0, c0 = time.perf_counter(), time.process_time()
    rows = experiment.evaluate_sample(
        m,
        tok,
        samples[sample],
        policies,
        max_new,
        args.task,
        False,
        evaluate.free_running(args),
        not args.decode_loop,
        calibration,
    )
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    if not rows:  # evaluate_sample skipped it (its warning says why)
        raise SystemExit(
            f"error: the sample of --tokens {tokens} does not fit the model's {m.config.max_positions} "
            "positions: give fewer --tokens"
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    print(json.dumps(dict(seconds=seconds, cpu=cpu, peak_mib=peak, rows=rows)))


def measure(path, tokens, sample, methods):
    """(seconds, CPU seconds, peak MiB, rows) of one sample through `path`, timed in a fresh process."""
    cmd = [sys.executable, __file__, "--child", path, "--tokens", str(tokens), "--sample", str(sample)]
    cmd += ["--methods", methods] if methods else []
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        raise SystemExit(f"error: timing the {path} failed:\n{done.stderr.strip()}")
    got = json.loads(done.stdout.strip().splitlines()[-1])
    return got["seconds"], got["cpu"], got["peak_mib"], got["rows"]


def largest_difference(a, b):
    """(field, label, |difference|) of the two paths' rows that differ most in one number; the fields
    that are not numbers (labels, the prediction) must be equal."""
    worst = ("-", "-", 0.0)
    for x, y in zip(a, b, strict=True):
        for f, u in x.items():
            us, vs = (u, y[f]) if isinstance(u, list) else ([u], [y[f]])
            for s, t in zip(us, vs, strict=True):
                if isinstance(s, float) or isinstance(t, float):
                    if abs(s - t) > worst[2]:
                        worst = (f, x["label"], abs(s - t))
                elif isinstance(s, dict):  # per_record: its tokens and hits
                    if s != t:
                        worst = max(worst, (f, x["label"], float("inf")), key=lambda w: w[2])
                elif s != t and f not in ("steps",):
                    raise SystemExit(f"error: {x['label']}: {f} differs between the paths ({s!r} and {t!r})")
    return worst


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[2048], help="prompt lengths (default 2048)")
    p.add_argument("--sample", type=int, default=0, help="which sample of the default run (default 0)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", help="evaluate.py's --methods (default: the default run's)")
    p.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.tokens[0], args.sample, args.methods)

    print(f"one sample (#{args.sample}) of the default run, methods {args.methods or 'default'}, 1 thread")
    print(
        "| prompt tokens | answer positions | loop (s) | pass (s) | loop / pass | CPU time loop / pass | "
        "peak MiB loop | peak MiB pass | largest row difference |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for tokens in args.tokens:
        (times, cpus, peaks), rows = ({"loop": [], "pass": []} for _ in range(3)), {}
        for r in range(args.repeats):
            order = ["loop", "pass"] if r % 2 == 0 else ["pass", "loop"]
            for path in order:
                seconds, cpu, peak, rows[path] = measure(path, tokens, args.sample, args.methods)
                times[path].append(seconds)
                cpus[path].append(cpu)
                peaks[path].append(peak)
                print(
                    f"  {tokens} tokens, repeat {r + 1}, {path}: {seconds:.1f} s ({cpu:.1f} s CPU), {peak:.0f} MiB",
                    file=sys.stderr,
                )
        f, label, diff = largest_difference(rows["loop"], rows["pass"])
        loop, forced = statistics.median(times["loop"]), statistics.median(times["pass"])
        cpu = statistics.median(cpus["loop"]) / statistics.median(cpus["pass"])
        first = rows["pass"][0]
        print(
            f"| {first['prompt_tokens']} | {first['gold_tokens']} | {loop:.1f} | {forced:.1f} | "
            f"{loop / forced:.2f}x | {cpu:.2f}x | {max(peaks['loop']):.0f} | {max(peaks['pass']):.0f} | "
            f"{f} of {label}: {diff:.1e} |"
        )


if __name__ == "__main__":
    main()
