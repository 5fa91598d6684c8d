"""The results folder of evaluate.py: samples.jsonl, the summary, the table, the plots, and merge.

A results folder holds run.json (the settings every result shares), samples.jsonl (one line per
configuration and sample), summary.json and summary.md (rebuilt from samples.jsonl, so a merge of
shards is a concatenation) and PNG plots. Every file is written atomically: an interruption leaves
the old version or the new one.

A results folder has one writer at a time: `locked(out)` holds an exclusive flock on `out/.lock`
for the whole run (or merge), and a second process on the same folder is refused at its start
instead of overwriting the first one's samples. The kernel releases the lock when the process
ends, however it ends (kill -9 included), so a crash never leaves a folder locked.
"""

import contextlib
import fcntl
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
METRICS = ("score", "text2json_score", "field_recall", "precision", "recall", "extraction_rate", "agreement", "kl",
           "oracle_recall", "attention_mass", "device_kv_fraction", "bytes_per_step", "landmark_error", "key_error",
           "sparse_share")
# run.json settings that must agree for a resumed (or merged) run: they change every result
RUN_FIELDS = ("task", "model", "data", "tokens", "seed", "dtype", "max_new_tokens")


LOCK_NAME = ".lock"  # in every results folder; holds the pid of its last writer
_HELD = {}  # file descriptor of one of this process's locks -> its folder


def _close_held_in_child():
    """A forked worker must not keep its parent's locks: if the parent is killed, the folder is free."""
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


# ============================================================================ results folder

def check_folder(out):
    """A results folder path must not name a file (a one-line error instead of a traceback later)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a results folder: give --out a folder path")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"{parent} is a file: --out {out} cannot be a folder inside it")


@contextlib.contextmanager
def locked(out, reads=()):
    """Be the only writer of the results folder `out` (created if missing) while the block runs, and
    make sure that no run writes the folders `reads` meanwhile (merge's inputs; `out` may be one).

    Non-blocking: a folder held by another process is a one-line ValueError naming it and the
    holder's pid. Readers share their lock (two merges may read one folder) and need no write
    access: a read-only folder, or one never run by this version (no lock file), is read unlocked.
    """
    out, held = Path(out), []
    try:
        check_folder(out)
        try:
            out.mkdir(parents=True, exist_ok=True)
            fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ValueError(f"cannot create the results folder {out}: {err.strerror}") from None
        _take(fd, out, fcntl.LOCK_EX, held)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        for d in map(Path, reads):
            if d.resolve() != out.resolve() and (d / LOCK_NAME).is_file():
                try:
                    fd = os.open(d / LOCK_NAME, os.O_RDONLY)
                except OSError:
                    continue
                _take(fd, d, fcntl.LOCK_SH, held)
        yield
    finally:
        for fd in held:
            _HELD.pop(fd, None)
            os.close(fd)  # closing the last descriptor releases the flock


def _take(fd, folder, mode, held):
    """flock(fd, mode) without waiting; held gets fd, or a ValueError says who holds the folder."""
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        holder = f" (pid {pid})" if pid.isdigit() else ""
        raise ValueError(f"{folder} is in use by another evaluate.py process{holder}: wait for it to end, "
                         "or give another --out") from None
    _HELD[fd] = folder
    held.append(fd)


def token_span(sizes):
    """'4122' or '4122-4180': the prompt lengths of skipped samples, for one-line messages."""
    lo, hi = min(sizes), max(sizes)
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def is_empty(out):
    """True for a missing folder or one holding nothing but its lock file (and leftover *.tmp)."""
    out = Path(out)
    return not out.exists() or all(p.name == LOCK_NAME or p.name.endswith(".tmp") for p in out.iterdir())


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
        for m, k in (("precision", "precision"), ("recall", "recall"), ("extraction_rate", "extracted")):  # longproc
            metrics[m] = None if _mean(r.get(k) for r in rs) is None else 100 * _mean(r.get(k) for r in rs)
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
    t2j, tsv = task == "text2json", task == "longproc"
    head = ["policy", "budget", score_name] + (["field recall"] if t2j else []) + (
        ["precision", "recall", "extraction"] if tsv else []) + [
        "agreement", "KL", "oracle recall", "attention mass", "device KV", "bytes/step", "n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary:
        cells = [r["label"], "–" if r["budget"] is None else f"{100 * r['budget']:.3g}%", _fmt(r["score"], ".1f")]
        cells += [_fmt(r["field_recall"], ".1f")] if t2j else []
        cells += [_fmt(r.get(m), ".1f") for m in ("precision", "recall", "extraction_rate")] if tsv else []
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
    sample_notes = annotate(summary, rows, run)
    write_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    notes = sample_notes + make_plots(out, summary)
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
    --max-new-tokens the folder's own value is kept (the automatic one depends on --n). A folder
    whose run left no sample (stopped before its first one) holds nothing to mix with: any settings
    may start it again. The samples an earlier run skipped (`skipped`) carry over."""
    path = out / "run.json"
    if not path.is_file() or not read_rows(out):
        return run
    old = json.loads(path.read_text())
    if adopt_max_new:
        run = dict(run, max_new_tokens=old["max_new_tokens"])
    for f in RUN_FIELDS:
        if old.get(f) != run[f]:
            raise ValueError(f"{out} holds results made with {f}={old.get(f)!r}, not {run[f]!r}: "
                             "use another --out or the same settings")
    return dict(run, skipped=dict(old.get("skipped") or {}, **run.get("skipped", {})))


def skip_record(skipped, rows):
    """run.json's `skipped` ({sample id: prompt tokens}) without the samples that now have results."""
    done = {r["sample"] for r in rows}
    return {s: n for s, n in skipped.items() if s not in done}


def annotate(summary, rows, run):
    """Add to each summary row what its mean leaves out, and return the lines that say it under
    the table: `skipped`, the run's samples with no result at all (their prompt does not fit the
    model), and `fell_back`, the samples this configuration ran with full attention because the
    prompt is shorter than its budget (kvcache: sink + local window + the selection)."""
    skipped = run.get("skipped") or {}
    for r in summary:
        share = r.get("sparse_share")
        r["skipped"] = len(skipped)
        r["fell_back"] = None if r["method"] == "full" or share is None else round(r["n"] * (1 - share))
    notes = []
    if skipped:
        ids = list(skipped)
        total = len({r["sample"] for r in rows} | set(ids))
        shown = ", ".join(ids[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
        notes.append(f"{len(ids)} of {total} samples skipped, no result in any configuration: their prompts "
                     f"({token_span(skipped.values())} tokens with the chat template) do not fit the model's "
                     f"{run.get('max_positions')} positions (ids {shown})")
    for r in summary:
        if r["fell_back"]:
            notes.append(f"{r['key']}: {r['fell_back']} of {r['n']} samples fell back to full attention "
                         "(prompt shorter than the policy's budget: sink + local window + selection)")
    return notes


def merge(args):
    """`python evaluate.py merge DIR... --out DIR` (args.dirs, args.out): concatenate the shards'
    samples and rebuild the summary.

    Nothing finished is lost: the target must be new, empty or one of the inputs; it is locked as a
    run locks its folder, and the inputs are read under a shared lock (no run writes them meanwhile);
    and a (configuration, sample) found in two inputs must be the same row in both (an identical copy,
    e.g. overlapping shards, is kept once; differing values are an error naming the sample).
    """
    dirs, out = [Path(d) for d in args.dirs], Path(args.out)
    for d in dirs:
        if not (d / "run.json").is_file() or not (d / "samples.jsonl").is_file():
            raise FileNotFoundError(f"{d} is not a results folder (no run.json / samples.jsonl)")
    check_folder(out)
    with locked(out, reads=dirs):
        if not is_empty(out) and out.resolve() not in {d.resolve() for d in dirs}:
            raise ValueError(f"{out} already holds results and is not one of the merged folders: "
                             "give a new or empty --out (or name it among the inputs)")
        runs, rows, seen, skipped = [], [], {}, {}
        for d in dirs:
            runs.append(json.loads((d / "run.json").read_text()))
            for f in RUN_FIELDS:
                if runs[-1].get(f) != runs[0].get(f):
                    raise ValueError(f"{d} was run with {f}={runs[-1].get(f)!r}, {args.dirs[0]} with "
                                     f"{runs[0].get(f)!r}")
            skipped.update(runs[-1].get("skipped") or {})
            for r in read_rows(d):
                k = (r["key"], r["sample"])
                if k not in seen:
                    seen[k] = (r, d)
                    rows.append(r)
                elif seen[k][0] != r:
                    prev, where = seen[k]
                    f = next(f for f in {**prev, **r} if prev.get(f) != r.get(f))
                    raise ValueError(f"sample {r['sample']!r} of {r['key']!r} differs between {where} and "
                                     f"{d} ({f}: {prev.get(f)!r} vs {r.get(f)!r}): merge only one of them")
        settings = dict(runs[0], command=f"python evaluate.py merge {' '.join(args.dirs)} --out {args.out}",
                        skipped=skip_record(skipped, rows))
        write_atomic(out / "run.json", json.dumps(settings, indent=1) + "\n")
        write_rows(out, rows)
        _, table, _ = write_summary(out, rows, settings)
    print(table)
    return 0
