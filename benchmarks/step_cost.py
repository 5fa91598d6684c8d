"""Where the decode time of a default sample goes, and how much faster the known levers could make it.

Decodes one sample of the default run (the prompt and gold answer `eval_speed.py` times) for --steps
gold-forced steps, on one torch thread as a worker of `python evaluate.py` runs it: every step one
forward of ROWS_PER_FORWARD rows (full attention's and the default policies' caches, padded), each
cache's `attend` timed inside it (all layers). Twice, side by side in one run, alternating:

    tracked     as the run decodes its gold rows: with the selection statistics (oracle recall,
                attention mass), which need an exact scoring pass per policy, layer and step
    untracked   the same rows without them

and once more under torch's profiler, to count the aten operator calls of each policy's layer step
(the step is a few hundred small ops; on one CPU thread each costs microseconds whatever its size).

Prints, per decode step (all layers, medians over the steps): each policy's attend, tracked and
untracked; the forward in all; what is left beside the policies (the model's layers for every row,
full attention's row: the floor no policy change removes); and two upper bounds on the sample's
speed-up at byte-identical numbers, from the levers found so far:
    - tracking free: the statistics cost nothing at all (they cost at least one exact pass per row:
      sharing one pass between the rows would need one product of all rows' queries to give each
      row's logits bit for bit, which the last line checks on the sample's keys);
    - and the floor halved: two samples' rows share each forward, so the weights are read once per
      two samples (forwards of 2 to 15 rows round a row alike: experiment.forward_rows) and everything
      else beside the policies is halved as well (more than pairing could save).

    python benchmarks/step_cost.py [--tokens 2048] [--sample 0] [--steps 40] [--rounds 3]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import evaluate  # noqa: E402
import experiment  # noqa: E402
import model  # noqa: E402
from kvcache import from_prefill  # noqa: E402
from policy import PRESETS, override  # noqa: E402


class Timed:
    """A cache that times its own `attend` calls (every layer of every step)."""

    def __init__(self, cache):
        self.cache, self.seconds = cache, 0.0
        self.asks = cache.asks  # a kvcache.Cache like the one it wraps

    @property
    def seq_len(self):
        return self.cache.seq_len

    def attend(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.cache.attend(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        return out


def decode(m, prefilled, policies, gold, steps, tracked):
    """Decode `steps` gold-forced steps of full attention and `policies` from one prefill, through the
    run's own forwards (experiment.forward_rows, padded to ROWS_PER_FORWARD rows; experiment.GoldRow).
    Returns (per step the forward's seconds, per policy name per step its attend's seconds)."""
    configs = [PRESETS["full"], *policies]
    rows = [
        experiment.GoldRow(
            p, Timed(from_prefill(prefilled, override(p, track=tracked and p.sparse), m.rope)), gold
        )
        for p in configs
    ]
    forward, spent = [], {p.name: [] for p in policies}
    for _ in range(steps):
        before = [r.cache.seconds for r in rows]
        t0 = time.perf_counter()
        logits = experiment.forward_rows(m, rows, m.embed_tokens.weight.device)  # [len(rows), vocab]
        forward.append(time.perf_counter() - t0)
        # as the run does: each row against full attention's (row 0); the next step feeds the next gold token
        ref = logits[:1]  # [1, vocab]
        ref_logp, ref_top = torch.log_softmax(ref, dim=-1), ref.argmax(dim=-1)  # [1, vocab], [1]
        for r, row_logits in zip(rows, logits):
            r.observe(row_logits[None], ref_logp, ref_top)
        for p, r, b in zip(policies, rows[1:], before[1:]):
            spent[p.name].append(r.cache.seconds - b)
    return forward, spent


class Labelled(Timed):
    """A cache whose `attend` calls are one labelled range each in torch's profiler."""

    def attend(self, *args, **kwargs):
        with torch.profiler.record_function("policy attend"):
            return self.cache.attend(*args, **kwargs)


def op_counts(m, prefilled, policies, gold, steps=3):
    """Per policy: aten operators called directly by its tracked `attend`, per layer step (a matmul
    counts once, not with the kernels it calls), under torch.profiler over `steps` steps."""
    counts = {}
    for p in policies:
        row = experiment.GoldRow(p, Labelled(from_prefill(prefilled, override(p, track=True), m.rope)), gold)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                logits = experiment.forward_rows(m, [row], m.embed_tokens.weight.device)  # [1, vocab]
                # no reference row here: the row is its own; the next step feeds the next gold token
                row.observe(logits, torch.log_softmax(logits, dim=-1), logits.argmax(dim=-1))
        direct = [
            e
            for e in prof.events()
            if e.name.startswith("aten::")
            and e.cpu_parent is not None
            and e.cpu_parent.name == "policy attend"
        ]
        counts[p.name] = round(len(direct) / (steps * m.config.n_layers))
    return counts


def stacking_changes_bits(prefilled, n_rows, group, middle, generator):
    """Whether one product for all rows gives each row's exact-pass logits bit for bit: the lever a
    shared tracking pass would need. The rows' queries (random, the default model's shapes) against
    layer 0's prompt keys [H, M, d], each row alone ([H, G, d] @ [H, d, M], as SparseCache._exact_pass
    computes them) and all rows stacked ([H, R*G, d] @ [H, d, M]). Returns (elements that differ, of)."""
    k = prefilled.k[0][0, :, middle].float()  # [H, M, d]
    H, M, d = k.shape
    qs = [torch.randn(H, group, d, generator=generator) / d**0.5 for _ in range(n_rows)]  # [H, G, d] each
    alone = torch.cat([q @ k.transpose(1, 2) for q in qs], dim=1)  # [H, R*G, M]
    stacked = torch.cat(qs, dim=1) @ k.transpose(1, 2)  # [H, R*G, M]
    return int((alone != stacked).sum()), alone.numel()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="prompt length of the sample (default 2048)")
    p.add_argument("--sample", type=int, default=0, help="which sample of the default run (default 0)")
    p.add_argument("--steps", type=int, default=40, help="decode steps per round (default 40)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of (tracked, untracked), alternating")
    args = p.parse_args()

    run = evaluate.build_parser().parse_args(["--tokens", str(args.tokens)])  # the default run otherwise
    policies = [q for q in evaluate.check_inputs(run) if q.sparse]
    m, tok = model.load_model(None)
    samples, _ = experiment.load_samples(run, tok)
    if args.sample >= len(samples):
        raise SystemExit(f"error: --sample {args.sample}: the default run has {len(samples)} samples")
    sample = samples[args.sample]
    ids = tok.chat([{"role": "user", "content": sample["problem"]}])
    gold, _, _ = experiment.gold_tokens(run.task, sample, tok)
    n_gold = min(len(gold), experiment.auto_max_new_tokens(samples, tok))
    if args.steps > len(gold) or len(ids) + args.steps > m.config.max_positions:
        raise SystemExit(f"error: --steps {args.steps}: the sample has {len(gold)} gold tokens; give fewer")
    torch.set_num_threads(experiment.DECODE_THREADS)
    with torch.inference_mode():
        prefilled, _ = model.prefill(m, ids)
        runs = {
            "tracked": ([], {q.name: [] for q in policies}),
            "untracked": ([], {q.name: [] for q in policies}),
        }
        for r in range(args.rounds):
            order = ["tracked", "untracked"] if r % 2 == 0 else ["untracked", "tracked"]
            for name in order:
                forward, spent = decode(m, prefilled, policies, gold, args.steps, name == "tracked")
                runs[name][0].extend(forward[2:])  # the first steps warm up buffers and caches
                for q in policies:
                    runs[name][1][q.name].extend(spent[q.name][2:])
                print(
                    f"  round {r + 1} {name}: {statistics.median(forward) * 1e3:.0f} ms a step",
                    file=sys.stderr,
                )
        ops = op_counts(m, prefilled, policies, gold)
        differ, of = stacking_changes_bits(
            prefilled,
            len(policies),
            m.config.n_heads // m.config.n_kv_heads,
            slice(0, len(ids) - 64),
            torch.Generator().manual_seed(0),
        )

    ms = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
    n_layers = m.config.n_layers
    print(
        f"sample #{args.sample} of the default run: {len(ids)} prompt tokens, {n_gold} gold steps; "
        f"{args.rounds} x {args.steps} steps, 1 thread, ms per decode step (all {n_layers} layers), medians"
    )
    print("| policy | tracked | untracked | tracking's share | aten calls per layer step |")
    print("|---|---:|---:|---:|---:|")
    tracked = {q.name: ms(runs["tracked"][1][q.name]) for q in policies}
    untracked = {q.name: ms(runs["untracked"][1][q.name]) for q in policies}
    for q in policies:
        t, u = tracked[q.name], untracked[q.name]
        print(f"| {q.name} | {t:.1f} | {u:.1f} | {1 - u / t:.0%} | {ops[q.name]} |")
    forward = ms(runs["tracked"][0])
    pol_t, pol_u = sum(tracked.values()), sum(untracked.values())
    floor = forward - pol_t
    print(f"| all policies | {pol_t:.1f} | {pol_u:.1f} | {1 - pol_u / pol_t:.0%} | |")
    print(
        f"\nthe forward, tracked: {forward:.1f} ms a step = policies {pol_t:.1f} "
        f"+ the rest (the floor) {floor:.1f}"
    )
    print(
        f"per sample ({n_gold} steps): {forward * n_gold / 1e3:.1f} s, "
        f"policies {pol_t * n_gold / 1e3:.1f} s of it"
    )
    free = forward - (pol_t - pol_u)
    print(f"upper bound, tracking free:                      {forward / free:.2f}x")
    print(f"upper bound, tracking free and the floor halved: {forward / (free - floor / 2):.2f}x")
    need = forward / 2 - floor
    print(
        f"2x would need the {len(policies)} policies at {need:.1f} ms a step ({need / pol_t:.0%} of today's)"
    )
    shared = "a shared pass would change the numbers" if differ else "a shared pass keeps every bit"
    print(
        f"one product for the {len(policies)} rows' exact passes (layer 0's keys): {differ} of {of} logits "
        f"differ in their bits from each row's own product: {shared}"
    )


if __name__ == "__main__":
    main()
