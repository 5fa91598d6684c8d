"""The paper's claims, each decided by a rule written before any run: `python evaluate.py claims`.

A reproduction is judged claim by claim. evaluate.py runs every configuration the claims need, once
each (Text2JSON, NeedleBench and RULER for the retrieval claims), and this module reads their rows and decides
each claim on the gold-forced fact accuracy (evaluate.py's `fact_accuracy`: the share of the answer's
fact tokens predicted top-1), with 95% paired-bootstrap intervals (results.resample_index): every
difference is taken over the same resampled samples.

Every claim below is a function whose code is its rule, with the rule in words above it (RULE_*). The
rules use one margin, MARGIN, fixed here before any run: a difference of fact accuracy whose interval
stays within MARGIN of 0 is "within noise", one whose interval ends beyond it is a real loss. A verdict
is "reproduced", "not reproduced" or "inconclusive" (the interval allows both, or a configuration
could not be measured: no NeedleBench data, prompts that do not fit the model, fewer than
results.MIN_SAMPLES samples, which no interval rests on); inconclusive verdicts say why. `write` puts
claims.md, claims.json and one figure per claim in the results folder, and beside the claims, without a
verdict, ShadowKV's and the paper's method's loss on each RULER task group.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure

import ruler
from policy import OUTLIER_SHARE, make_policy
from results import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    MIN_SAMPLES,
    bootstrap_means,
    counted,
    interval,
    per_sample,
    resample_index,
    write_atomic,
)

MARGIN = 0.03  # of fact accuracy (3 points): "within noise" / "a real loss", for every rule below
BUDGET = 0.03125  # PAPER.md "The paper's method": 3.125% of the prompt
CHUNKS = (1, 2, 4, 8, 16)  # claim 4's chunk sizes (chunk 1: the oracle, which selects as mean c1 does)
BASELINES = ("arkvale", "lrqk", "infinigen")
METRIC = "fact_accuracy"
# the RULER run of the claims: the single-needle tasks (claim 9) and one task of each other group, at
# ruler_n(--n) samples each (a third of the other runs' count, at least MIN_SAMPLES); the retrieval
# group is represented by its single-needle tasks
RULER_TASKS = ruler.SINGLE_NEEDLE + ("vt", "cwe", "fwe")
TASK_SPECS = {"ruler": "ruler:" + ",".join(RULER_TASKS)}  # the --task of each run whose name differs
# the parts of the RULER run the claims read, each bootstrapped over its own samples (Evidence)
RULER_PARTS = {
    "ruler single-needle": ruler.SINGLE_NEEDLE,
    **{f"ruler {g}": tuple(t for t in RULER_TASKS if t in tasks) for g, tasks in ruler.GROUPS.items()},
}
GROUP_METHODS = ("shadowkv", "paper")  # whose loss on each RULER group is reported (no verdict)


def ruler_n(n: int) -> int:
    """Samples of each RULER task in a claims run of n samples a task: claim 9 pools the three
    single-needle tasks, so a third of n each gives it as many samples as the other tasks have (at
    least MIN_SAMPLES each, which the per-group report needs)."""
    return max(MIN_SAMPLES, -(-n // len(ruler.SINGLE_NEEDLE)))


REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"


def configurations(outliers=OUTLIER_SHARE) -> dict:
    """{task: {name: policy}}: every configuration the claims compare, each once. outliers: ShadowKV's,
    the same in both tasks (the run's --outliers; by default scaled to short prompts, policy.OUTLIER_SHARE),
    so that its loss on the two tasks is measured at the same budget."""
    shadowkv = dict(outliers=outliers)
    text2json = {
        "full": make_policy("full"),
        "oracle": make_policy("oracle"),
        "shadowkv": make_policy("shadowkv", **shadowkv),
        "shadowkv x10": make_policy("shadowkv", budget=10 * BUDGET, **shadowkv),
        "svd": make_policy("svd"),
        **{f"mean c{c}": make_policy("mean", chunk_size=c) for c in CHUNKS if c > 1},
        "quantized 2b": make_policy("quantized"),
        "quantized 4b": make_policy("quantized", landmark_bits="4"),
        "paper": make_policy("paper"),
        **{name: make_policy(name) for name in BASELINES},
    }
    needle = {"full": text2json["full"], "shadowkv": text2json["shadowkv"]}
    rulers = {name: text2json[name] for name in ("full", *GROUP_METHODS)}
    return {"text2json": text2json, "needle": needle, "ruler": rulers}


# ------------------------------------------------------------------------------------------- evidence
class Evidence:
    """The rows of the claims' runs, by task and configuration name, and their bootstrap statistics."""

    def __init__(self, rows: dict, configs: dict, missing: dict | None = None, dropped: dict | None = None):
        """rows: {task: samples.jsonl rows}; configs: configurations(); missing: {task: why it has no rows};
        dropped: {task: {name: why that configuration cannot run on the model}} (experiment.unfit). The RULER
        run is also read as its parts (RULER_PARTS: its rows of those tasks), after the tasks."""
        self.missing = dict(missing or {})
        self.dropped = dict(dropped or {})
        rows, configs = dict(rows), dict(configs)
        if "ruler" in configs:
            for part, names in RULER_PARTS.items():
                rows[part] = [r for r in rows.get("ruler", []) if ruler.subtask(r["sample"]) in names]
                configs[part] = configs["ruler"]
                if "ruler" in self.missing:
                    self.missing[part] = self.missing["ruler"]
        self.values = {}  # {task: {name: [n] per-sample fact accuracy}}
        self.index = {}  # {task: [R, n] resampled sample indices}
        self.cut = {}  # {task: (max_new_tokens, fact tokens left out)} of rows whose gold answers were cut
        for seed, (task, policies) in enumerate(configs.items()):
            by_key = {}
            for r in rows.get(task, []):
                by_key.setdefault(r["key"], []).append(r)
            cut = {  # sample -> (max_new_tokens, fact tokens cut), where the gold answer was cut
                r["sample"]: (r["max_new_tokens"], r["fact_tokens_cut"])
                for rs in by_key.values()
                for r in rs
                if r.get("fact_tokens_cut")
            }
            if cut:
                self.cut[task] = (max(m for m, _ in cut.values()), sum(c for _, c in cut.values()))
            samples = sorted({r["sample"] for rs in by_key.values() for r in rs})
            if not samples:
                self.missing.setdefault(task, f"no {task} results")
                continue
            # independent tasks resample independently (claim 7 compares the two)
            self.index[task] = resample_index(len(samples), seed=BOOTSTRAP_SEED + seed)
            self.values[task] = {
                name: per_sample(by_key[p.key()], samples, METRIC)
                for name, p in policies.items()
                if p.key() in by_key
            }

    def absent(self, task, *names):
        """Why these configurations cannot be compared (a line), or None: no result for one of them (left
        out as unfit for the model, or every fact token cut by max_new_tokens), or fewer than MIN_SAMPLES
        samples with a result for all of them (no interval rests on fewer)."""
        if task in self.missing:
            return self.missing[task]
        unfit = [f"{n}: {self.dropped[task][n]}" for n in names if n in self.dropped.get(task, {})]
        if unfit:
            return f"left out of the {task} run, as this model cannot run it ({'; '.join(unfit)})"
        lost = [
            n for n in names if n not in self.values.get(task, {}) or bool(self.values[task][n].isnan().all())
        ]
        if lost and task in self.cut and all(n in self.values.get(task, {}) for n in lost):
            max_new, left_out = self.cut[task]
            return (
                f"the {task} rows of {', '.join(lost)} score no fact token: the gold answers were cut at "
                f"max_new_tokens={max_new}, leaving out {left_out} fact tokens (give a larger "
                "--max-new-tokens)"
            )
        if lost:
            return f"no {task} result for {', '.join(lost)}"
        n = counted(sum(self.values[task][name] for name in names))  # NaN where one of them lacks it
        if n < MIN_SAMPLES:
            return (
                f"{n} {task} sample{'s' * (n != 1)} with a result for {', '.join(names)}: a claim needs at "
                f"least {MIN_SAMPLES} (run more with --n)"
            )
        return None

    def paired(self, task, *names) -> int:
        """How many samples have a result for every one of these configurations."""
        return counted(sum(self.values[task][name] for name in names))

    def resampled(self, task, name, minus=None) -> torch.Tensor:
        """[R] bootstrap means of a configuration's fact accuracy, or of its paired difference to `minus`."""
        v = self.values[task][name]
        return bootstrap_means(v if minus is None else v - self.values[task][minus], self.index[task])

    def estimate(self, task, name, minus=None) -> list:
        """[mean, lo, hi]: the fact accuracy (or paired difference) over the samples, with its interval."""
        v = self.values[task][name] if minus is None else self.values[task][name] - self.values[task][minus]
        return [
            float(v.nanmean()),
            *(interval(self.resampled(task, name, minus), counted(v)) or [math.nan] * 2),
        ]


@dataclass
class Finding:
    """One claim's outcome: its verdict, the figures it rests on ({label: [mean, lo, hi]}), why (when
    inconclusive), and what the figure draws."""

    verdict: str
    figures: dict
    reason: str = ""
    decided: tuple = ()  # the labels of `figures` the rule decides on: what the claim's figure draws
    rule: str = (
        "loss"  # which lines the figure marks: "loss" (0 and -MARGIN), "close" (+-MARGIN), "above" (0)
    )


# --------------------------------------------------------------------------------------------- rules
# every rule's last words: the samples it needs (Evidence.absent checks them before any rule runs)
RULE_SAMPLES = (
    f"; inconclusive too with fewer than {MIN_SAMPLES} samples that have a result for every configuration "
    "compared (below that the interval is the range of the samples, and one sample's has zero width)"
)
RULE_LOSS = (
    "reproduced if the difference's 95% interval lies below 0; not reproduced if its lower end is above "
    f"-{MARGIN} (no loss as large as {MARGIN}); inconclusive otherwise" + RULE_SAMPLES
)
RULE_CLOSE = (
    f"reproduced if the difference's 95% interval lies within (-{MARGIN}, +{MARGIN}); not reproduced if "
    f"it lies entirely below -{MARGIN} or above +{MARGIN}; inconclusive otherwise" + RULE_SAMPLES
)


def loses(d) -> str:
    """RULE_LOSS on a difference [mean, lo, hi] (a configuration minus its reference)."""
    if d[2] < 0:
        return REPRODUCED
    if d[1] > -MARGIN:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def close(d) -> str:
    """RULE_CLOSE on a difference [mean, lo, hi]."""
    if -MARGIN < d[1] and d[2] < MARGIN:
        return REPRODUCED
    if d[2] < -MARGIN or d[1] > MARGIN:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def all_of(verdicts) -> str:
    """Several parts: reproduced if every part is, not reproduced if any part is not, else inconclusive."""
    if all(v == REPRODUCED for v in verdicts):
        return REPRODUCED
    return NOT_REPRODUCED if NOT_REPRODUCED in verdicts else INCONCLUSIVE


def compare(ev, name, ref, rule, task="text2json") -> Finding:
    """A finding from one paired difference (name - ref) decided by `rule` (loses or close)."""
    why = ev.absent(task, name, ref)
    if why:
        return Finding(INCONCLUSIVE, {}, why)
    d = ev.estimate(task, name, ref)
    figures = {name: ev.estimate(task, name), ref: ev.estimate(task, ref), f"{name} - {ref}": d}
    return Finding(rule(d), figures, decided=(f"{name} - {ref}",), rule="close" if rule is close else "loss")


# ------------------------------------------------------------------------------------------- claims
def claim_shadowkv_loses(ev):
    """1. ShadowKV loses facts that full attention keeps: shadowkv - full, RULE_LOSS."""
    return compare(ev, "shadowkv", "full", loses)


def claim_budget_does_not_help(ev):
    """2. Raising ShadowKV's budget tenfold (3.125% to 31.25%) does not bring it to the oracle at 3.125%:
    shadowkv x10 - oracle, RULE_LOSS (reproduced: still below the oracle)."""
    return compare(ev, "shadowkv x10", "oracle", loses)


def claim_low_rank_loses(ev):
    """3. Low-rank keys alone lose facts: svd (oracle selection, rank-r keys attended) - oracle, RULE_LOSS."""
    return compare(ev, "svd", "oracle", loses)


RULE_TREND = (
    "reproduced if mean c8 - oracle has a 95% interval below 0 and so has the least-squares slope of fact "
    "accuracy against log2(chunk size) over chunks 1, 2, 4, 8, 16 (chunk 1 = the oracle); not reproduced if "
    f"the lower end of mean c8 - oracle is above -{MARGIN} or the slope's interval lies above 0; "
    "inconclusive otherwise" + RULE_SAMPLES
)


def claim_chunks_lose(ev):
    """4. Chunk landmarks alone lose facts (mean c8 - oracle, RULE_LOSS), and smaller chunks help: fact
    accuracy falls from chunk 1 to 16 (RULE_TREND: the slope against log2 chunk, with its interval)."""
    names = ["oracle"] + [f"mean c{c}" for c in CHUNKS[1:]]
    why = ev.absent("text2json", *names)
    if why:
        return Finding(INCONCLUSIVE, {}, why)
    c8 = compare(ev, "mean c8", "oracle", loses)
    x = torch.tensor([math.log2(c) for c in CHUNKS], dtype=torch.float64)  # [5]
    x = x - x.mean()
    means = torch.stack([ev.resampled("text2json", n) for n in names], dim=1)  # [R, 5]
    slopes = (means - means.mean(1, keepdim=True)) @ x / (x @ x)  # [R] per resample
    point = torch.stack([ev.values["text2json"][n].nanmean() for n in names])  # [5]
    n = ev.paired("text2json", *names)
    slope = [float((point - point.mean()) @ x / (x @ x)), *(interval(slopes, n) or [math.nan] * 2)]
    trend = REPRODUCED if slope[2] < 0 else NOT_REPRODUCED if slope[1] > 0 else INCONCLUSIVE
    verdict = all_of([c8.verdict, trend])
    figures = {**c8.figures, **{n: ev.estimate("text2json", n) for n in names}, "slope per doubling": slope}
    return Finding(verdict, figures, decided=(*c8.decided, "slope per doubling"))


def claim_quantized_close(ev):
    """5. 2-bit and 4-bit token landmarks are within noise of the oracle: quantized 2b - oracle and
    quantized 4b - oracle, each RULE_CLOSE, both needed."""
    parts = [compare(ev, f"quantized {b}b", "oracle", close) for b in (2, 4)]
    why = "; ".join(p.reason for p in parts if p.reason)
    figures = {k: v for p in parts for k, v in p.figures.items()}
    decided = tuple(d for p in parts for d in p.decided)
    return Finding(all_of([p.verdict for p in parts]), figures, why, decided, rule="close")


def claim_kv4_close(ev):
    """6. The paper's full configuration (4-bit K/V) stays close to `quantized` alone: paper - quantized 2b,
    RULE_CLOSE."""
    return compare(ev, "paper", "quantized 2b", close)


RULE_RETRIEVAL = (
    "with L = the loss of fact accuracy of shadowkv against full (full - shadowkv) on each task, "
    "bootstrapped over each task's own samples: reproduced if L(Text2JSON) has a 95% interval above 0 and "
    "L(Text2JSON) - 2 L(NeedleBench) has one above 0 (the retrieval loss under half the Text2JSON loss); "
    "not reproduced if L(Text2JSON) - 2 L(NeedleBench) has one below 0; inconclusive otherwise" + RULE_SAMPLES
)


def claim_retrieval_hides_the_loss(ev):
    """7. The paper's thesis: retrieval hides the loss. ShadowKV's loss against full attention on
    NeedleBench retrieval (gold-forced on the needles' answers, their keywords as the facts) is much
    smaller than on Text2JSON at the same budget (RULE_RETRIEVAL)."""
    return retrieval_gap(ev, "needle", "NeedleBench")


def retrieval_gap(ev, task, name) -> Finding:
    """RULE_RETRIEVAL with the retrieval task `task` (its display name `name`): ShadowKV's loss on it
    against its loss on Text2JSON, each bootstrapped over its own task's samples."""
    why = ev.absent("text2json", "shadowkv", "full") or ev.absent(task, "shadowkv", "full")
    if why:
        return Finding(INCONCLUSIVE, {}, why)
    loss = {t: ev.resampled(t, "full", "shadowkv") for t in ("text2json", task)}  # [R] each
    point = {t: ev.estimate(t, "full", "shadowkv")[0] for t in loss}
    gap = loss["text2json"] - 2 * loss[task]  # independent resamples, taken together
    figures = {
        "loss on Text2JSON": ev.estimate("text2json", "full", "shadowkv"),
        f"loss on {name}": ev.estimate(task, "full", "shadowkv"),
        f"L(Text2JSON) - 2 L({name})": [
            point["text2json"] - 2 * point[task],
            *(interval(gap, min(ev.paired(t, "full", "shadowkv") for t in loss)) or [math.nan] * 2),
        ],
    }
    t2j, g = figures["loss on Text2JSON"], figures[f"L(Text2JSON) - 2 L({name})"]
    verdict = REPRODUCED if t2j[1] > 0 and g[1] > 0 else NOT_REPRODUCED if g[2] < 0 else INCONCLUSIVE
    return Finding(
        verdict, figures, decided=("loss on Text2JSON", f"L(Text2JSON) - 2 L({name})"), rule="above"
    )


def claim_baselines_fall_below(ev):
    """8. Each other baseline (ArkVale, LRQK, InfiniGen) falls below the paper's method: baseline - paper,
    each RULE_LOSS, all three needed."""
    parts = [compare(ev, b, "paper", loses) for b in BASELINES]
    why = "; ".join(p.reason for p in parts if p.reason)
    figures = {k: v for p in parts for k, v in p.figures.items()}
    decided = tuple(d for p in parts for d in p.decided)
    return Finding(all_of([p.verdict for p in parts]), figures, why, decided)


RULE_RULER = (
    "with L = the loss of fact accuracy of shadowkv against full (full - shadowkv) on each task, "
    "bootstrapped over each task's own samples (RULER: the samples of its three single-needle tasks, "
    "niah_single_1, 2 and 3, together): reproduced if L(Text2JSON) has a 95% interval above 0 and "
    "L(Text2JSON) - 2 L(RULER single-needle) has one above 0 (the RULER loss under half the Text2JSON "
    "loss); not reproduced if L(Text2JSON) - 2 L(RULER single-needle) has one below 0; inconclusive otherwise"
    + RULE_SAMPLES
)


def claim_ruler_hides_the_loss(ev):
    """9. The contrast the paper starts from, where it was made: ShadowKV loses much less on RULER's
    single-needle retrieval (gold-forced on the needle's value) than on Text2JSON (RULE_RULER)."""
    return retrieval_gap(ev, "ruler single-needle", "RULER single-needle")


def ruler_groups(ev) -> dict:
    """{group: {method: [mean, lo, hi] loss of fact accuracy against full attention}} on each RULER
    task group of the claims' RULER run, or {group: why not} (no verdict: where the loss begins)."""
    out = {}
    for part in RULER_PARTS:
        if part == "ruler single-needle":
            continue
        why = ev.absent(part, "full", *GROUP_METHODS)
        out[part.removeprefix("ruler ")] = why or {m: ev.estimate(part, "full", m) for m in GROUP_METHODS}
    return out


@dataclass(frozen=True)
class Claim:
    number: int
    statement: str
    section: str  # its PAPER.md section
    compared: str
    rule: str
    decide: object  # Evidence -> Finding


CLAIMS = (
    Claim(1, "ShadowKV loses facts that full attention keeps", "The problem", "shadowkv vs full", RULE_LOSS,
          claim_shadowkv_loses),
    Claim(2, "Raising ShadowKV's budget tenfold (3.125% to 31.25%) does not bring it to the oracle at 3.125%",
          "The problem", "shadowkv x10 vs oracle", RULE_LOSS, claim_budget_does_not_help),
    Claim(3, "Low-rank keys alone lose facts", "The problem", "svd vs oracle", RULE_LOSS, claim_low_rank_loses),
    Claim(4, "Chunk landmarks alone lose facts, and smaller chunks help", "The problem",
          "mean c8 vs oracle; mean c1 (= oracle), c2, c4, c8, c16", RULE_TREND, claim_chunks_lose),
    Claim(5, "2-bit and 4-bit token landmarks are within noise of the oracle", "The paper's method",
          "quantized 2b, quantized 4b vs oracle", RULE_CLOSE, claim_quantized_close),
    Claim(6, "The paper's full configuration (4-bit K/V) stays close to quantized landmarks alone",
          "The paper's method", "paper vs quantized 2b", RULE_CLOSE, claim_kv4_close),
    Claim(7, "Retrieval hides the loss: ShadowKV loses much less on NeedleBench retrieval than on Text2JSON",
          "The problem", "full vs shadowkv on NeedleBench and on Text2JSON", RULE_RETRIEVAL,
          claim_retrieval_hides_the_loss),
    Claim(8, "Each other baseline (ArkVale, LRQK, InfiniGen) falls below the paper's method",
          "The paper's other baselines", "arkvale, lrqk, infinigen vs paper", RULE_LOSS,
          claim_baselines_fall_below),
    Claim(9, "ShadowKV loses much less on RULER's single-needle retrieval than on Text2JSON", "The problem",
          "full vs shadowkv on RULER niah_single_1/2/3 and on Text2JSON", RULE_RULER, claim_ruler_hides_the_loss),
)  # fmt: skip


# ------------------------------------------------------------------------------------------- output
def decide(ev) -> list:
    """[(claim, finding)] for every claim."""
    return [(c, c.decide(ev)) for c in CLAIMS]


def _fmt(label, triple) -> str:
    """'0.370 [0.320, 0.416]', or signed for a difference or a slope: '-0.318 [-0.356, -0.277]'."""
    spec = "+.3f" if " - " in label or label.startswith("slope") else ".3f"
    mean, lo, hi = triple
    return f"{mean:{spec}} [{lo:{spec}}, {hi:{spec}}]"


def plot(claim, finding, path) -> bool:
    """The claim's figure: what its rule decides on (`Finding.decided`: paired differences, claim 4's slope,
    claims 7 and 9's losses), each with its 95% interval, against the lines of the rule: 0 and the margin. A
    "close" rule shades the band within +-MARGIN (within noise); a "loss" rule the band from -MARGIN to 0
    (a loss smaller than the margin: not a real loss, not ruled out). False: nothing to draw."""
    points = [(label, finding.figures[label]) for label in finding.decided if label in finding.figures]
    if not points:
        return False
    fig = Figure(figsize=(6.0, 1.2 + 0.45 * len(points)))
    ax = fig.subplots()
    y = range(len(points))[::-1]  # the first decided quantity on top
    ax.errorbar([p[0] for _, p in points], y, xerr=_err([p for _, p in points]), fmt="o", capsize=4)
    ax.set_yticks(list(y), [label for label, _ in points], fontsize=8)
    ax.axvline(0, color="black", lw=0.8)
    if finding.rule == "close":
        ax.axvspan(-MARGIN, MARGIN, color="#9bc59d", alpha=0.35, label=f"within noise (+-{MARGIN})")
    elif finding.rule == "loss":
        ax.axvspan(-MARGIN, 0, color="#e0b07a", alpha=0.35, label=f"a loss under the margin ({MARGIN})")
    if finding.rule != "above":
        ax.legend(fontsize=7, loc="best")
    ax.set_ylim(-0.7, len(points) - 0.3)
    ax.set_xlabel("difference of fact accuracy (95% interval)", fontsize=8)
    ax.set_title(f"claim {claim.number}: {finding.verdict}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def _err(points):
    """matplotlib's xerr [2, n] from [mean, lo, hi] triples."""
    return [[p[0] - p[1] for p in points], [p[2] - p[0] for p in points]]


def write(out, ev, settings: dict) -> str:
    """claims.md, claims.json and claimN.png in the folder `out`; returns claims.md's text."""
    out = Path(out)
    found = decide(ev)
    lines = [
        "# The paper's claims, each checked by a rule written before the run",
        "",
        f"`{settings.get('command', '')}`",
        "",
        f"Model {settings.get('model')}; "
        + "; ".join(f"{t}: {n} samples" for t, n in settings.get("samples", {}).items())
        + f". Gold-forced fact accuracy, 95% intervals of a paired bootstrap ({BOOTSTRAP_RESAMPLES} resamples, seed "
        f"{BOOTSTRAP_SEED}); margin {MARGIN} of fact accuracy. The rules are in claims.py, next to each claim.",
        "",
        "| # | claim | verdict |",
        "|---|---|---|",
        *[f"| {c.number} | {c.statement} | **{f.verdict}** |" for c, f in found],
    ]
    records = []
    for c, f in found:
        figure = f"claim{c.number}.png" if plot(c, f, out / f"claim{c.number}.png") else None
        lines += [
            "",
            f"## {c.number}. {c.statement}",
            "",
            f'PAPER.md "{c.section}". Compared: {c.compared}.',
            "",
        ]
        lines += [f"- {label}: {_fmt(label, v)}" for label, v in f.figures.items()]
        lines += [
            "",
            f"Rule: {c.rule}.",
            "",
            f"Verdict: **{f.verdict}**" + (f" ({f.reason})" if f.reason else ""),
        ]
        if figure:
            lines += ["", f"![claim {c.number}]({figure})"]
        records.append(
            dict(number=c.number, statement=c.statement, section=c.section, compared=c.compared, rule=c.rule,
                 verdict=f.verdict, reason=f.reason, figures=f.figures, figure=figure)
        )  # fmt: skip
    groups = ruler_groups(ev)
    lines += group_lines(groups)
    text = "\n".join(lines) + "\n"
    write_atomic(out / "claims.md", text)
    write_atomic(
        out / "claims.json",
        json.dumps(dict(settings, margin=MARGIN, claims=records, ruler_groups=groups), indent=1) + "\n",
    )
    return text


def group_lines(groups) -> list:
    """claims.md's section on the RULER task groups (ruler_groups): a table, no verdict."""
    lines = [
        "",
        "## RULER by task group (no verdict)",
        "",
        "Where the loss begins: the loss of gold-forced fact accuracy against full attention (full - method), "
        "with its 95% interval over the group's samples, on each RULER task group of the claims' RULER run. "
        "Retrieval is its single-needle tasks; aggregation (common and frequent words) is the "
        "context-intensive end of RULER.",
        "",
        "| group | tasks | " + " | ".join(f"{m} loss" for m in GROUP_METHODS) + " |",
        "|---|---|" + "---|" * len(GROUP_METHODS),
    ]
    for group, losses in groups.items():
        names = ", ".join(RULER_PARTS[f"ruler {group}"])
        if isinstance(losses, str):
            lines.append(
                f"| {group} | {names} | " + " | ".join(["–"] * len(GROUP_METHODS)) + f" ({losses}) |"
            )
            continue
        cells = [f"{v[0]:+.3f} [{v[1]:+.3f}, {v[2]:+.3f}]" for v in (losses[m] for m in GROUP_METHODS)]
        lines.append(f"| {group} | {names} | " + " | ".join(cells) + " |")
    return lines
