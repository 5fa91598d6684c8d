"""The results folder of evaluate.py: samples.jsonl, the summary, the table, the plots, and merge.

A results folder holds run.json (the settings every result shares), samples.jsonl (one line per
configuration and sample), summary.json and summary.md (rebuilt from samples.jsonl, so a merge of
shards is a concatenation) and PNG plots. Every file is written atomically: an interruption leaves
the old version or the new one.
"""

import json
import math
import os
from pathlib import Path

import torch

from files import read_jsonl
from kvcache import POLICIES

BITS = ("1", "2", "3", "4", "8", "fp8", "nvfp4")  # landmark formats of the paper's ablation
# summary.json: the configuration, then the metrics (every row has every key; None = not defined)
CONFIG_FIELDS = ("method", "label", "budget", "chunk_size", "rank", "bits", "residual", "kv_bits")
METRICS = ("score", "text2json_score", "field_recall", "agreement", "kl", "oracle_recall", "attention_mass",
           "device_kv_fraction", "bytes_per_step", "landmark_error", "key_error", "sparse_share")
# run.json settings that must agree for a resumed (or merged) run: they change every result
RUN_FIELDS = ("task", "model", "data", "tokens", "seed", "dtype", "max_new_tokens", "free_run")


# ============================================================================ results folder

def read_rows(out):
    """The finished (configuration, sample) rows of a results folder ([] for a new folder)."""
    path = Path(out) / "samples.jsonl"
    if not path.is_file():
        return []
    try:
        return read_jsonl(path)
    except ValueError as err:
        raise ValueError(f"{err}: delete the line to redo it") from None


def write_atomic(path, text):
    """Write a file so that an interruption leaves the old or the new version, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_rows(out, rows):
    write_atomic(Path(out) / "samples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _mean_lists(lists):
    """Element-wise mean of equal-length lists (per-layer statistics over samples); None if none."""
    lists = [x for x in lists if x is not None]
    return [sum(col) / len(col) for col in zip(*lists)] if lists else None


def _order(row):
    """Table order: policies as in kvcache.POLICIES, then budget, chunk size, rank, bits."""
    bits = row["bits"]
    return (POLICIES.index(row["method"]), row["budget"] or 0, row["chunk_size"] or 0, row["rank"] or 0,
            -1 if bits is None else BITS.index(bits) if bits in BITS else len(BITS), row["residual"] or 0)


def summarize(rows):
    """One summary row per configuration: the means over its samples (scores x 100, as the paper),
    keys in the order CONFIG_FIELDS, METRICS, then the per-layer statistics for the heatmap."""
    groups = {}
    for r in rows:
        groups.setdefault(r["key"], []).append(r)
    summary = []
    for key, rs in groups.items():
        task, score, recall = rs[0]["task"], _mean(r["score"] for r in rs), _mean(r["field_recall"] for r in rs)
        metrics = {m: _mean(r[m] for r in rs) for m in ("agreement", "kl", "oracle_recall", "attention_mass",
                                                         "device_kv_fraction", "bytes_per_step", "landmark_error",
                                                         "key_error")}
        metrics.update(score=None if score is None else 100 * score,
                       text2json_score=None if score is None or task != "text2json" else 100 * score,
                       field_recall=None if recall is None else 100 * recall,
                       sparse_share=None if rs[0]["method"] == "full" else _mean(float(r["sparse"]) for r in rs))
        summary.append(dict(key=key, task=task, **{f: rs[0].get(f) for f in CONFIG_FIELDS}, n=len(rs),
                            **{m: metrics[m] for m in METRICS},
                            recall_per_layer=_mean_lists(r["recall_per_layer"] for r in rs),
                            mass_per_layer=_mean_lists(r["mass_per_layer"] for r in rs)))
    return sorted(summary, key=_order)


def _fmt(x, spec):
    return "–" if x is None else format(x, spec)


def _bytes(x):
    if x is None:
        return "–"
    for unit in ("B", "KiB", "MiB"):
        if x < 1024:
            return f"{x:.0f} {unit}"
        x /= 1024
    return f"{x:.1f} GiB"


def markdown_table(summary, task):
    """The comparison table: the task score, fidelity, selection quality and memory of each configuration."""
    score_name = {"text2json": "Text2JSON score", "needle": "needle score", "longproc": "F1"}[task]
    t2j = task == "text2json"
    head = ["policy", "budget", score_name] + (["field recall"] if t2j else []) + [
        "agreement", "KL", "oracle recall", "attention mass", "device KV", "bytes/step", "n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary:
        cells = [r["label"], "–" if r["budget"] is None else f"{100 * r['budget']:.3g}%", _fmt(r["score"], ".1f")]
        cells += [_fmt(r["field_recall"], ".1f")] if t2j else []
        cells += [_fmt(r["agreement"], ".3f"), _fmt(r["kl"], ".3f"), _fmt(r["oracle_recall"], ".3f"),
                  _fmt(r["attention_mass"], ".3f"),
                  "–" if r["device_kv_fraction"] is None else f"{100 * r['device_kv_fraction']:.1f}%",
                  _bytes(r["bytes_per_step"]), str(r["n"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- plots

def _pyplot():
    """matplotlib, imported only when a plot is drawn, on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


PANELS = (("score", "task score"), ("agreement", "agreement with full"), ("oracle_recall", "oracle recall"))


def _sweep_name(r, axis):
    """Legend entry: the configuration without the swept axis."""
    budget = f" @{100 * r['budget']:.3g}%" if r["budget"] is not None else ""
    if axis == "budget":
        return r["label"]
    if axis == "chunk_size":
        return r["method"] + (f" {r['bits']}b" if r["bits"] else "") + budget
    if axis == "bits":
        return f"quantized c{r['chunk_size']}" + budget
    return r["method"] + budget  # rank


def plot_sweep(summary, axis, methods, path, xlabel):
    """Score, agreement and oracle recall against one sweep axis (PAPER.md: the paper's ablations),
    one line per configuration of the other axes. False (nothing drawn) when no configuration has
    more than one value on the axis."""
    groups = {}
    for r in summary:
        if r["method"] in methods and r[axis] is not None:
            groups.setdefault(_sweep_name(r, axis), []).append(r)
    groups = {k: v for k, v in groups.items() if len({r[axis] for r in v}) > 1}
    if not groups:
        if path.exists():
            path.unlink()  # a plot left from an earlier, wider sweep would now be wrong
        return False
    plt = _pyplot()

    categorical = axis == "bits"  # fp8 and nvfp4 are formats, not numbers: one tick per format
    ticks = sorted({r["bits"] for rs in groups.values() for r in rs}, key=BITS.index) if categorical else None
    full = next((r for r in summary if r["method"] == "full"), None)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.3 * len(PANELS), 3.6))
    for ax, (metric, title) in zip(axes, PANELS):
        for name, rs in groups.items():
            rs = sorted(rs, key=lambda r: ticks.index(r[axis]) if categorical else r[axis])
            xs = [ticks.index(r[axis]) if categorical else r[axis] for r in rs]
            ys = [math.nan if r[metric] is None else r[metric] for r in rs]
            ax.plot(xs, ys, marker="o", label=name)
        if full is not None and full[metric] is not None:
            ax.axhline(full[metric], color="gray", linestyle="--", label="full")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        if categorical:
            ax.set_xticks(range(len(ticks)), ticks)
        elif axis in ("budget", "chunk_size"):
            ax.set_xscale("log", base=2)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_recall_heatmap(summary, path):
    """Oracle recall per layer (policies x layers): where in the network the landmarks mislead."""
    rows = [r for r in summary if r["recall_per_layer"] is not None]
    if not rows:
        if path.exists():
            path.unlink()
        return False
    plt = _pyplot()

    matrix = torch.tensor([r["recall_per_layer"] for r in rows])  # [configs, layers]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * matrix.shape[1] + 3), 0.4 * len(rows) + 1.5))
    im = ax.imshow(matrix.numpy(), aspect="auto", vmin=0, vmax=1, cmap="viridis")
    ax.set_yticks(range(len(rows)), [r["key"] for r in rows])
    ax.set_xticks(range(0, matrix.shape[1], max(1, matrix.shape[1] // 15)))
    ax.set_xlabel("layer")
    ax.set_title("oracle recall per layer")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def make_plots(out, summary):
    """Every plot the sweep supports; returns one line per plot saying what was drawn or skipped."""
    notes = []
    for axis, methods, name, xlabel in (("budget", POLICIES, "vs_budget.png", "budget (share of the prompt)"),
                                        ("chunk_size", ("mean", "quantized"), "vs_chunk_size.png", "chunk size"),
                                        ("rank", ("svd", "shadowkv"), "vs_rank.png", "SVD rank"),
                                        ("bits", ("quantized",), "vs_bits.png", "landmark bits")):
        if plot_sweep(summary, axis, methods, out / name, xlabel):
            notes.append(f"{name}: score / agreement / oracle recall against {xlabel}")
        else:
            notes.append(f"{name}: skipped, the sweep has one value of {axis} per configuration")
    if plot_recall_heatmap(summary, out / "recall_per_layer.png"):
        notes.append("recall_per_layer.png: oracle recall per layer (policies x layers)")
    else:
        notes.append("recall_per_layer.png: skipped, no sparse policy took a decode step")
    return notes


def write_summary(out, rows, run):
    """Rebuild summary.json, summary.md and the plots from samples.jsonl (so a merge is a concatenation)."""
    summary = summarize(rows)
    write_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    notes = make_plots(out, summary)
    table = markdown_table(summary, run["task"])
    dtype_note = ("device KV: bytes kept on the device over a full bf16 cache of the prompt; exact tensors count "
                  "as bf16 whatever the run's dtype, quantized ones as their packed codes and scales")
    md = (f"# KV selection policies against full attention\n\n`{run.get('command', '')}`\n\n"
          f"task {run['task']}, model {run['model']}, {len({r['sample'] for r in rows})} samples, "
          f"dtype {run['dtype']}, up to {run['max_new_tokens']} new tokens\n\n{table}\n\n"
          + "".join(f"- {n}\n" for n in [dtype_note] + notes))
    write_atomic(out / "summary.md", md)
    return summary, table, notes


def check_resume(out, run, adopt_max_new):
    """A folder can only be continued with the settings it was made with. Without an explicit
    --max-new-tokens the folder's own value is kept (the automatic one depends on --n)."""
    path = out / "run.json"
    if not path.is_file():
        return run
    old = json.loads(path.read_text())
    if adopt_max_new:
        run = dict(run, max_new_tokens=old["max_new_tokens"])
    for f in RUN_FIELDS:
        if old.get(f) != run[f]:
            raise ValueError(f"{out} holds results made with {f}={old.get(f)!r}, not {run[f]!r}: "
                             "use another --out or the same settings")
    return run


def merge(args):
    """`python evaluate.py merge DIR... --out DIR` (args.dirs, args.out): concatenate the shards'
    samples and rebuild the summary."""
    runs, rows, seen = [], [], set()
    for d in map(Path, args.dirs):
        if not (d / "run.json").is_file() or not (d / "samples.jsonl").is_file():
            raise FileNotFoundError(f"{d} is not a results folder (no run.json / samples.jsonl)")
        runs.append(json.loads((d / "run.json").read_text()))
        for f in RUN_FIELDS:
            if runs[-1].get(f) != runs[0].get(f):
                raise ValueError(f"{d} was run with {f}={runs[-1].get(f)!r}, {args.dirs[0]} with {runs[0].get(f)!r}")
        for r in read_rows(d):
            if (r["key"], r["sample"]) not in seen:
                seen.add((r["key"], r["sample"]))
                rows.append(r)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(runs[0], command=f"python evaluate.py merge {' '.join(args.dirs)} --out {args.out}")
    write_atomic(out / "run.json", json.dumps(settings, indent=1) + "\n")
    write_rows(out, rows)
    _, table, _ = write_summary(out, rows, settings)
    print(table)
    return 0
