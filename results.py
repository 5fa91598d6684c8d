"""The results folder of evaluate.py: samples.jsonl, the summary, the table, the plots, and merge.

A results folder holds run.json (the settings every result shares), samples.jsonl (one line per
configuration and sample), summary.json and summary.md (rebuilt from samples.jsonl, so a merge of
shards is a concatenation) and PNG plots. Every file is written atomically: an interruption leaves
the old version or the new one, and a failed write (a full disk) leaves no temporary file.

A folder is read only as a whole (check_resume, merge): run.json must be readable whenever there are
rows, and every row must be a whole, valid row of that run (ROW_FIELDS, check_rows); anything else is
a one-line error naming the file and line, before any work.

A results folder has one writer at a time: `locked(out)` holds an exclusive flock on `out/.lock`
for the whole run (or merge), and a second process on the same folder is refused at its start
instead of overwriting the first one's samples. The kernel releases the lock when the process
ends, however it ends (kill -9 included), so a crash never leaves a folder locked.
"""

import contextlib
import fcntl
import io
import json
import math
import os
from pathlib import Path

import torch
from matplotlib.figure import Figure

import ruler
from files import read_jsonl

BITS = ("0.5", "1", "2", "3", "4", "8", "fp8", "nvfp4")  # landmark formats of the paper's ablation
# summary.json: the configuration, then the metrics (every row has every key; None = not defined)
CONFIG_FIELDS = ("method", "label", "budget", "chunk_size", "rank", "bits", "residual", "kv_bits")
# what a row carries about its configuration besides the columns, so that this module needs no policy:
# its identity (`config`, every parameter, written out in `key`), its sweep axes with a legend for each,
# its place in the tables and the key of the oracle it is compared with (experiment.config_fields)
ROW_CONFIG = ("config", "axes", "legends", "order", "oracle_key")
RESULTS_FORMAT = 3  # run.json "format"; what each older one lacks, said when a folder of it is refused:
OLD_FORMATS = {
    1: "rows keyed by their labels, not by their configurations",
    2: "no fingerprint of the checkpoint, so a resume cannot tell whether its weights changed",
}
METRICS = (
    "fact_accuracy",
    "field_accuracy",
    "fact_nll",
    "retention",
    "score",
    "text2json_score",
    "field_recall",
    "precision",
    "recall",
    "extraction_rate",
    "agreement",
    "kl",
    "oracle_recall",
    "attention_mass",
    "device_kv_fraction",
    "bytes_per_step",
    "landmark_error",
    "key_error",
    "hit_rate",
    "sparse_share",
)
# the metrics with a value per sample (samples.jsonl): each gets a bootstrap interval in the summary
SAMPLE_METRICS = (
    "fact_accuracy",
    "field_accuracy",
    "fact_nll",
    "score",
    "field_recall",
    "agreement",
    "kl",
    "oracle_recall",
    "attention_mass",
    "device_kv_fraction",
    "bytes_per_step",
    "landmark_error",
    "key_error",
    "hit_rate",
)
BOOTSTRAP_RESAMPLES = 2000  # resamples of the paired bootstrap over samples
BOOTSTRAP_SEED = 0
# The fewest samples a 95% interval rests on, and with it a `*` or a claim's verdict (claims.py). Below
# it a percentile bootstrap's interval is the range of the samples themselves (a resample repeating one
# sample n times has probability n^-n, above 2.5% for n <= 3): one sample gives an interval of zero
# width around it, which would mark any difference as not noise.
MIN_SAMPLES = 4
DEPTH_BINS = 10  # fact accuracy against depth: 10 equal shares of the prompt
# run.json settings that must agree for a resumed (or merged) run: they change every result
RUN_FIELDS = (
    "task",
    "model",
    "checkpoint",
    "data",
    "tokens",
    "seed",
    "dtype",
    "max_new_tokens",
    "free_run",
    "gold_path",
    "group",
    "outliers",
    "score_rule",
    "chat",
)
# what a setting's difference means, where its value does not say it (a hash)
CHANGED = {
    "checkpoint": " (another model's files: its weights, config.json or tokenizer.json changed in place, "
    "or the folder holds another checkpoint)"
}
# A samples.jsonl row has exactly these fields, in the order experiment.evaluate_sample writes them, each
# holding (checked wherever a results folder is read, `check_rows`): str, int, num (a finite number),
# bool, dict, strs (a list of strings), nums (a list of finite numbers), records (per gold record its
# depth, tokens and hits); "?" = or null. A task's own scores add TASK_ROW_FIELDS.
# fmt: off
ROW_FIELDS = {
    # the configuration (experiment.config_fields)
    "key": "str", "config": "dict", "method": "str", "label": "str", "budget": "num?", "chunk_size": "int?",
    "rank": "num?", "bits": "str?", "residual": "int?", "kv_bits": "str?", "axes": "strs", "legends": "dict",
    "order": "int", "oracle_key": "str?",
    # the sample
    "sample": "str", "task": "str", "prompt_tokens": "int", "max_new_tokens": "int", "gold_tokens": "int",
    # the gold-forced facts (experiment.fact_record)
    "fact_accuracy": "num?", "field_accuracy": "num?", "fact_nll": "num?", "fact_tokens": "int?",
    "fact_tokens_cut": "int?", "per_record": "records?",
    # the task score (experiment.score_sample)
    "score": "num?", "field_recall": "num?",
    # fidelity, selection and memory (experiment.policy_record), then the free-running answer
    "new_tokens": "int?", "steps": "int", "sparse": "bool", "agreement": "num?", "kl": "num?",
    "oracle_recall": "num?", "attention_mass": "num?", "landmark_error": "num?", "key_error": "num?",
    "recall_per_layer": "nums?", "mass_per_layer": "nums?", "hit_rate": "num?", "device_kv_fraction": "num",
    "bytes_per_step": "num?", "prediction": "str?",
}
TASK_ROW_FIELDS = {"longproc": {"precision": "num?", "recall": "num?", "extracted": "num?"}}
# run.json: these settings (RUN_FIELDS and the format) always, the others when present
RUN_KINDS = {
    "format": "int", "task": "task", "model": "str", "checkpoint": "str", "data": "str?", "tokens": "int",
    "seed": "int", "dtype": "str", "max_new_tokens": "int", "free_run": "bool", "gold_path": "path", "group": "str?",
    "outliers": "scalar?", "score_rule": "str?", "chat": "bool", "command": "str", "max_positions": "int?",
    "skipped": "counts",
}
# fmt: on
ROW_FIX = "delete the line to redo it, or rerun into a fresh --out"
RUN_FIX = "restore it, or rerun into a fresh --out"


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
    """A results folder path must not name a file, nor pass through a symbolic link to nothing (mkdir
    would say only "File exists"): a one-line error instead of a traceback or a riddle later."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a results folder: give --out a folder path")
    for path in (out, *out.parents):
        if path.is_symlink() and not path.exists():
            raise ValueError(
                f"{path} is a symbolic link to {os.readlink(path)}, which does not exist: create that "
                f"folder, or give --out another path"
            )
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
        with contextlib.suppress(OSError):  # the pid only names the holder; a full disk says so later
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
        raise ValueError(
            f"{folder} is in use by another evaluate.py process{holder}: wait for it to end, "
            "or give another --out"
        ) from None
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
    """The rows of a results folder's samples.jsonl as they are ([] without one): for tests and for
    re-reading what this process wrote. Whatever reads a folder it did not just write uses
    `read_lines` + `check_rows` (resume, merge), which take a row only if it is whole and of the run."""
    return [row for _, row in read_lines(out)]


def read_lines(out):
    """[(line number, object)] of a results folder's samples.jsonl ([] for a new folder); a line that
    is no JSON is a one-line ValueError naming the file and line."""
    path = Path(out) / "samples.jsonl"
    if not path.exists():
        return []
    try:
        return read_jsonl(path, numbered=True)
    except ValueError as err:
        raise ValueError(f"{err}: {ROW_FIX}") from None


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_task(x):
    """A task of run.json: text2json, needle, longproc, or RULER's (ruler, ruler:NAME[,NAME...])."""
    if x in ("text2json", "needle", "longproc"):
        return True
    try:
        return bool(ruler.is_spec(x) and ruler.task_names(x))
    except ValueError:
        return False


def _is_record(r):
    return (
        isinstance(r, dict)
        and r.keys() == {"depth", "tokens", "hits"}
        and (r["depth"] is None or _is_num(r["depth"]))
        and _is_int(r["tokens"])
        and _is_int(r["hits"])
    )


KINDS = {  # the kinds of ROW_FIELDS and RUN_KINDS: (in words, for the one-line errors; the test)
    "str": ("a string", lambda x: isinstance(x, str)),
    "int": ("an integer", _is_int),
    "num": ("a number", _is_num),
    "bool": ("true or false", lambda x: isinstance(x, bool)),
    "dict": ("an object", lambda x: isinstance(x, dict)),
    "strs": ("a list of strings", lambda x: isinstance(x, list) and all(isinstance(v, str) for v in x)),
    "nums": ("a list of numbers", lambda x: isinstance(x, list) and all(map(_is_num, x))),
    "records": ("a list of {depth, tokens, hits}", lambda x: isinstance(x, list) and all(map(_is_record, x))),
    "task": ("text2json, needle, longproc or ruler[:NAME,...]", _is_task),
    "scalar": ("a number or a string", lambda x: _is_num(x) or isinstance(x, str)),
    "path": ("pass or loop", lambda x: x in ("pass", "loop")),
    "counts": ("an object of integers", lambda x: isinstance(x, dict) and all(map(_is_int, x.values()))),
}


def _has_kind(x, kind):
    """Whether x is of the kind (KINDS; a trailing '?' allows null). Whether its numbers are finite
    is checked apart (`_not_finite`)."""
    return (kind.endswith("?") and x is None) or KINDS[kind.rstrip("?")][1](x)


def _not_finite(x):
    """The first NaN or infinity in x (a JSON value), or None: JSON readers of Python accept NaN and
    Infinity, strict ones do not, and no mean or interval survives one."""
    if isinstance(x, float) and not math.isfinite(x):
        return x
    values = x.values() if isinstance(x, dict) else x if isinstance(x, list) else ()
    return next((v for v in map(_not_finite, values) if v is not None), None)


def _kind_complaint(fields, obj, what):
    """What is wrong with the object `what` (a row, run.json) against {field: kind}, or None: a missing
    field, one not among them, a NaN or infinity, a value of another kind."""
    missing = [f for f in fields if f not in obj]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        return f"not a whole {what}: no {', '.join(missing[:3])}{more}"
    unknown = [f for f in obj if f not in fields]
    if unknown:
        return f"{unknown[0]!r} is a field no {what} has"
    for f, kind in fields.items():
        bad = _not_finite(obj[f])
        if bad is not None:
            return f"{f} is {json.dumps(bad)}, not a finite number"
        if not _has_kind(obj[f], kind):
            shown = json.dumps(obj[f], ensure_ascii=False)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            null = " or null" if kind.endswith("?") else ""
            return f"{f} is {shown}, not {KINDS[kind.rstrip('?')][0]}{null}"
    return None


def _json_kind(obj):
    """'a JSON list', 'a JSON string', ...: what a line holds instead of an object."""
    kind = {list: "list", str: "string", bool: "true or false", type(None): "null"}.get(type(obj), "number")
    return f"a JSON {kind}"


def read_run(out):
    """The settings of a results folder (run.json), checked; None if it has none. A file that is no
    JSON object of the settings this version writes (RUN_KINDS) is a one-line ValueError naming it."""
    path = Path(out) / "run.json"
    if not path.exists():
        return None
    try:
        run = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}: not valid JSON ({err.msg}, line {err.lineno} column {err.colno}): {RUN_FIX}"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text (a binary file?): {RUN_FIX}") from None
    except OSError as err:
        raise ValueError(f"{path}: cannot read it ({err.strerror}): {RUN_FIX}") from None
    if not isinstance(run, dict):
        raise ValueError(f"{path}: {_json_kind(run)}, not the settings of a run (a JSON object): {RUN_FIX}")
    if run.get("format") in OLD_FORMATS or ("format" not in run and "task" in run and "model" in run):
        check_format(out, run)  # a folder of an older evaluate.py: said as such, not as a damaged file
    fields = {f: k for f, k in RUN_KINDS.items() if f in RUN_FIELDS + ("format",) or f in run}
    complaint = _kind_complaint(fields, run, "run.json")
    if complaint:
        raise ValueError(f"{path}: {complaint}: {RUN_FIX}")
    check_format(out, run)
    return run


def check_rows(out, lines, run, check_row=None):
    """The rows of `lines` (read_lines), each checked to be a whole, valid row of the run `run` (its
    settings): an object with exactly the fields a row has (ROW_FIELDS, TASK_ROW_FIELDS), each of its
    kind, every number finite, of the run's task and max_new_tokens, of a sample and configuration the
    run's settings make (check_row(row, run): a complaint or None; evaluate.row_check), and one row
    per (configuration, sample). The first row that is not is a one-line ValueError naming the file,
    the line and what to do; nothing is used, so nothing half-right reaches a mean."""
    path = Path(out) / "samples.jsonl"
    fields = ROW_FIELDS | TASK_ROW_FIELDS.get(run["task"], {})
    seen = {}
    for lineno, row in lines:
        if not isinstance(row, dict):
            complaint = f"{_json_kind(row)}, not a row (a JSON object)"
        else:
            complaint = _kind_complaint(fields, row, "row")
        if not complaint and row["task"] != run["task"]:
            complaint = f"a {row['task']} row, in a folder of {run['task']} results (run.json)"
        if not complaint and row["max_new_tokens"] != run["max_new_tokens"]:
            complaint = f"made with max_new_tokens={row['max_new_tokens']}, where run.json says {run['max_new_tokens']}"
        if not complaint and check_row is not None:
            complaint = check_row(row, run)
        if complaint:
            raise ValueError(f"{path}:{lineno}: {complaint}: {ROW_FIX}")
        first = seen.setdefault((row["key"], row["sample"]), lineno)
        if first != lineno:
            raise ValueError(
                f"{path}:{lineno}: a second row of sample {row['sample']!r} for {_name(row)} (the first is "
                f"line {first}): delete one of the two lines (both, to redo it), or rerun into a fresh --out"
            )
    return [row for _, row in lines]


def write_atomic(path, data):
    """Write a file (text or bytes) so that an interruption leaves the old or the new version, never
    half of one. A failure (a full disk) removes the temporary file and raises OSError naming `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException as err:  # also Ctrl-C or SIGTERM in the middle
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError):
            raise OSError(err.errno, err.strerror, str(path)) from None
        raise


def strict_json(obj):
    """obj with every NaN or infinity as None (null: not defined), so that strict JSON readers read it."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


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
    """Table order: policies as in policy.PRESETS (the row's `order`), then budget, chunk size, rank, bits."""
    bits = row["bits"]
    return (
        row["order"],
        row["budget"] or 0,
        row["chunk_size"] or 0,
        row["rank"] or 0,
        -1 if bits is None else BITS.index(bits) if bits in BITS else len(BITS),
        row["residual"] or 0,
    )


# ---------------------------------------------------------------------------- paired bootstrap


def bootstrap_means(values, index):
    """Means of `values` [n] (float64, NaN = sample missing) over each resample of `index` [R, n]."""
    return values[index].nanmean(dim=1)  # [R]


def interval(resampled, n):
    """The 95% percentile interval [lo, hi] of resampled statistics [R] (NaN resamples ignored) of n
    samples; None when n is below MIN_SAMPLES (no interval is better than one of zero width)."""
    if n < MIN_SAMPLES:
        return None
    lo, hi = torch.nanquantile(resampled, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return None if math.isnan(lo) else [lo, hi]


def counted(values) -> int:
    """How many samples of values [n] (NaN = missing) have a value: what an interval of them rests on."""
    return int((~values.isnan()).sum())


def resample_index(n, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED):
    """[resamples, n] sample indices drawn with replacement from a seeded generator: one matrix for
    every configuration and metric of a summary, so each difference is paired (the same samples)."""
    return torch.randint(n, (resamples, n), generator=torch.Generator().manual_seed(seed))


def per_sample(rs, samples, metric):
    """[n] float64 of one configuration's per-sample values in the order of `samples` (NaN = none)."""
    by = {r["sample"]: r.get(metric) for r in rs}
    values = [math.nan if by.get(s) is None else float(by[s]) for s in samples]
    return torch.tensor(values, dtype=torch.float64)


def _compare(values, ref, index):
    """[diff, lo, hi] of mean(values - ref) over the samples both have (lo, hi None: too few samples for
    an interval, `interval`), or None when they have none in common."""
    d = values - ref  # NaN where either lacks the sample
    if bool(d.isnan().all()):
        return None
    return [float(d.nanmean()), *(interval(bootstrap_means(d, index), counted(d)) or (None, None))]


def _depth_accuracy(rs, samples, index):
    """Fact accuracy per depth bin (DEPTH_BINS equal shares of the prompt), pooled over samples, and its
    95% interval per bin from the run's paired bootstrap (`index`: each resample pools the facts of its
    samples; none for a bin whose facts come from fewer than MIN_SAMPLES samples): ([bins] accuracy or
    None, [bins] [lo, hi] or None), or (None, None) without fact tokens."""
    hits = torch.zeros(len(samples) + 1, DEPTH_BINS, dtype=torch.float64)  # [n + 1, bins]: + a row of 0s
    tokens = torch.zeros_like(hits)
    row_of = {s: i for i, s in enumerate(samples)}
    for r in rs:
        for rec in r.get("per_record") or []:
            if rec["depth"] is not None and rec["tokens"]:
                b = min(int(rec["depth"] * DEPTH_BINS / 100), DEPTH_BINS - 1)
                hits[row_of[r["sample"]], b] += rec["hits"]
                tokens[row_of[r["sample"]], b] += rec["tokens"]
    if not tokens.any():
        return None, None
    total = tokens.sum(0)  # [bins]
    accuracy = [float(h / t) if t else None for h, t in zip(hits.sum(0), total)]
    resampled = hits[index].sum(1) / tokens[index].sum(1)  # [R, bins], NaN where a resample has no fact
    with_facts = (tokens > 0).sum(0)  # [bins] the samples a bin's facts come from
    bands = [interval(resampled[:, b], int(with_facts[b])) for b in range(DEPTH_BINS)]
    return accuracy, bands


def summarize(rows, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED):
    """One summary row per configuration: the means over its samples (scores x 100, as the paper),
    keys in the order CONFIG_FIELDS, METRICS, then `ci` (95% interval per metric), `vs_full` and
    `vs_oracle` ([difference, lo, hi] per metric against full attention and against the oracle of the
    same budget and K/V format), `depth_accuracy` and the per-layer statistics for the heatmap.

    The intervals come from one paired bootstrap over the samples (`resample_index`, seeded): every
    configuration's means are taken over the same resampled samples, so a difference's interval
    measures the difference, not the spread between samples that all policies share. `retention` is
    fact_accuracy over full attention's, its interval the ratio of the resampled means. The rows are
    read in a fixed order (sample, configuration), so the numbers do not depend on the order of
    samples.jsonl (a merge, a resume)."""
    rows = sorted(rows, key=lambda r: (r["sample"], r["key"]))
    samples = sorted({r["sample"] for r in rows})
    index = resample_index(len(samples), resamples, seed) if samples else None
    groups = {}
    for r in rows:
        groups.setdefault(r["key"], []).append(r)
    summary = []
    for key, rs in groups.items():
        task = rs[0]["task"]
        metrics = {m: _mean(r.get(m) for r in rs) for m in SAMPLE_METRICS}
        for m in ("score", "field_recall"):  # scores x 100, as the paper
            metrics[m] = None if metrics[m] is None else 100 * metrics[m]
        metrics.update(
            text2json_score=metrics["score"] if task == "text2json" else None,
            sparse_share=None if rs[0]["method"] == "full" else _mean(float(r["sparse"]) for r in rs),
        )
        for m, k in (
            ("precision", "precision"),
            ("recall", "recall"),
            ("extraction_rate", "extracted"),
        ):  # longproc
            metrics[m] = None if _mean(r.get(k) for r in rs) is None else 100 * _mean(r.get(k) for r in rs)
        values = {m: per_sample(rs, samples, m) for m in SAMPLE_METRICS}
        summary.append(
            dict(
                key=key,
                task=task,
                **{f: rs[0].get(f) for f in CONFIG_FIELDS + ROW_CONFIG},
                n=len(rs),
                **{m: metrics.get(m) for m in METRICS},
                values=values,
            )
        )
    summary.sort(key=_order)
    full = next((s for s in summary if s["method"] == "full"), None)
    for s in summary:
        scale = {m: 100 if m in ("score", "field_recall") else 1 for m in SAMPLE_METRICS}
        s["ci"] = {
            m: None if s[m] is None else _scaled(interval(bootstrap_means(v, index), counted(v)), scale[m])
            for m, v in s["values"].items()
        }
        oracle = next((o for o in summary if o["key"] == s["oracle_key"]), None)
        for name, ref in (("vs_full", full), ("vs_oracle", oracle)):
            s[name] = {
                m: None
                if ref is None or ref is s
                else _scaled(_compare(v, ref["values"][m], index), scale[m])
                for m, v in s["values"].items()
            }
        s["retention"], s["ci"]["retention"] = None, None
        if full is not None and s["fact_accuracy"] is not None and full["fact_accuracy"]:
            mine, ref = s["values"]["fact_accuracy"], full["values"]["fact_accuracy"]
            both = ~(mine.isnan() | ref.isnan())  # the samples both have
            mine, ref = mine.where(both, math.nan), ref.where(both, math.nan)
            if both.any():  # else no sample in common with full attention: no retention
                s["retention"] = float(mine.nanmean() / ref.nanmean())
                ratio = bootstrap_means(mine, index) / bootstrap_means(ref, index)  # [R]
                s["ci"]["retention"] = interval(ratio, int(both.sum()))
    for s in summary:
        rs = groups[s["key"]]
        del s["values"]
        depth, depth_ci = _depth_accuracy(rs, samples, index)
        s.update(
            depth_accuracy=depth,
            depth_ci=depth_ci,
            recall_per_layer=_mean_lists(r["recall_per_layer"] for r in rs),
            mass_per_layer=_mean_lists(r["mass_per_layer"] for r in rs),
        )
    return summary


def _scaled(triple, scale):
    return None if triple is None else [None if x is None else scale * x for x in triple]


def _fmt(x, spec):
    return "–" if x is None else format(x, spec)


def _with_ci(r, m, spec):
    """'0.689 [0.650, 0.721]': the mean and its 95% bootstrap interval."""
    ci = r["ci"].get(m)
    return _fmt(r[m], spec) + ("" if ci is None else f" [{ci[0]:{spec}}, {ci[1]:{spec}}]")


def _vs(r, name, m, spec):
    """'-0.021 [-0.040, -0.002] *': a paired difference, * when its interval excludes 0 (not noise);
    '-0.021' alone for too few samples (MIN_SAMPLES): no interval, so no *."""
    d = r[name].get(m)
    if d is None:
        return "–"
    if d[1] is None:
        return f"{d[0]:+{spec}}"
    return f"{d[0]:+{spec}} [{d[1]:+{spec}}, {d[2]:+{spec}}]" + (" *" if d[1] > 0 or d[2] < 0 else "")


def _bytes(x):
    if x is None:
        return "–"
    for unit in ("B", "KiB", "MiB"):
        if x < 1024:
            return f"{x:.0f} {unit}"
        x /= 1024
    return f"{x:.1f} GiB"


def markdown_table(summary, task):
    """The comparison table: facts recovered on the gold path (when the task has fact tokens), the
    free-running task score (when it was decoded), fidelity, selection quality and memory of each
    configuration. Fact accuracy, its differences to full and to the oracle, field accuracy,
    agreement and KL carry their 95% interval."""
    names = {"text2json": "Text2JSON score", "needle": "needle score", "longproc": "F1"}
    score_name = "RULER score" if ruler.is_spec(task) else names[task]
    t2j, tsv = task == "text2json", task == "longproc"
    facts = any(r["fact_accuracy"] is not None for r in summary)
    scored = any(r["score"] is not None for r in summary)
    head = ["policy", "budget"]
    if facts:
        head += ["fact accuracy", "vs full", "vs oracle", "field accuracy", "fact NLL", "retention"]
    head += (
        (
            [score_name]
            + (["field recall"] if t2j else [])
            + (["precision", "recall", "extraction"] if tsv else [])
        )
        if scored
        else []
    )
    head += ["agreement", "KL", "oracle recall", "attention mass", "device KV", "bytes/step", "n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary:
        cells = [r["label"], "–" if r["budget"] is None else f"{100 * r['budget']:.3g}%"]
        if facts:
            cells += [
                _with_ci(r, "fact_accuracy", ".3f"),
                _vs(r, "vs_full", "fact_accuracy", ".3f"),
                _vs(r, "vs_oracle", "fact_accuracy", ".3f"),
                _with_ci(r, "field_accuracy", ".3f"),
                _fmt(r["fact_nll"], ".3f"),
                _fmt(r["retention"], ".3f"),
            ]
        if scored:
            cells += [_fmt(r["score"], ".1f")] + ([_fmt(r["field_recall"], ".1f")] if t2j else [])
            cells += (
                [_fmt(r.get(m), ".1f") for m in ("precision", "recall", "extraction_rate")] if tsv else []
            )
        cells += [
            _with_ci(r, "agreement", ".3f"),
            _with_ci(r, "kl", ".3f"),
            _fmt(r["oracle_recall"], ".3f"),
            _fmt(r["attention_mass"], ".3f"),
            "–" if r["device_kv_fraction"] is None else f"{100 * r['device_kv_fraction']:.1f}%",
            _bytes(r["bytes_per_step"]),
            str(r["n"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- plots


PANELS = (
    ("fact_accuracy", "fact accuracy (gold-forced)"),
    ("agreement", "agreement with full"),
    ("oracle_recall", "oracle recall"),
)  # the first panel is the task score when there are no facts


def _name(r):
    """A configuration in notes and plots: its label and budget, 'quantized 2b @0.03125' (or 'full')."""
    return r["label"] + (f" @{r['budget']:g}" if r["budget"] is not None else "")


def _sweep_name(r, axis):
    """Legend entry: the configuration without the swept axis (the row's `legends`), and its budget."""
    if axis == "budget":
        return r["legends"][axis]
    return r["legends"][axis] + (f" @{100 * r['budget']:.3g}%" if r["budget"] is not None else "")


def plot_sweep(summary, axis, column, path, xlabel):
    """Score, agreement and oracle recall against one sweep axis (PAPER.md "The problem": its ablations),
    one line per configuration of the other axes, for every configuration whose policy takes that
    axis (the row's `axes`); x is the row's `column`. False (nothing drawn) when no configuration has
    more than one value on the axis."""
    groups = {}
    for r in summary:
        if axis in (r["axes"] or ()):
            groups.setdefault(_sweep_name(r, axis), []).append(r)
    groups = {k: v for k, v in groups.items() if len({r[column] for r in v}) > 1}
    if not groups:
        if path.exists():
            path.unlink()  # a plot left from an earlier, wider sweep would now be wrong
        return False

    categorical = column == "bits"  # fp8 and nvfp4 are formats, not numbers: one tick per format
    ticks = sorted({r[column] for rs in groups.values() for r in rs}, key=BITS.index) if categorical else None
    full = next((r for r in summary if r["method"] == "full"), None)
    facts = any(r["fact_accuracy"] is not None for r in summary)
    panels = PANELS if facts else (("score", "task score"),) + PANELS[1:]
    fig = Figure(figsize=(4.3 * len(panels), 3.6))  # no pyplot: files only, whatever the backend
    axes = fig.subplots(1, len(panels))
    for ax, (metric, title) in zip(axes, panels):
        for name, rs in groups.items():
            rs = sorted(rs, key=lambda r: ticks.index(r[column]) if categorical else r[column])
            xs = [ticks.index(r[column]) if categorical else r[column] for r in rs]
            ys = [math.nan if r[metric] is None else r[metric] for r in rs]
            ax.plot(xs, ys, marker="o", label=name)
        if full is not None and full[metric] is not None:
            ax.axhline(full[metric], color="gray", linestyle="--", label="full")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        if categorical:
            ax.set_xticks(range(len(ticks)), ticks)
        elif column in ("budget", "chunk_size"):
            ax.set_xscale("log", base=2)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)
    return True


def save_png(fig, path):
    """A figure as a PNG file, written atomically (write_atomic): a full disk leaves no half image."""
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    write_atomic(path, png.getvalue())


def plot_depth(summary, path):
    """Fact accuracy against the depth of the record in the prompt, one line per configuration with its
    95% interval as a band (PAPER.md "The problem": whether a policy loses the facts of some part of the
    prompt; a dip whose band overlaps the others' is noise)."""
    rows = [r for r in summary if r["depth_accuracy"] is not None]
    if not rows:
        if path.exists():
            path.unlink()
        return False

    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    centres = [100 * (i + 0.5) / DEPTH_BINS for i in range(DEPTH_BINS)]
    for r in rows:
        ys = [math.nan if y is None else y for y in r["depth_accuracy"]]
        (line,) = ax.plot(
            centres, ys, marker="o", label=_name(r), linestyle="--" if r["method"] == "full" else "-"
        )
        lo, hi = ([math.nan if b is None else b[i] for b in r["depth_ci"]] for i in (0, 1))
        ax.fill_between(centres, lo, hi, color=line.get_color(), alpha=0.12, linewidth=0)
    ax.set_xlabel("depth of the record in the prompt (%)")
    ax.set_ylabel("fact accuracy (gold-forced)")
    ax.set_xlim(0, 100)
    ax.set_title("facts recovered against depth")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)
    return True


def plot_recall_heatmap(summary, path):
    """Oracle recall per layer (policies x layers): where in the network the landmarks mislead."""
    rows = [r for r in summary if r["recall_per_layer"] is not None]
    if not rows:
        if path.exists():
            path.unlink()
        return False

    matrix = torch.tensor([r["recall_per_layer"] for r in rows])  # [configs, layers]
    fig = Figure(figsize=(max(6.0, 0.25 * matrix.shape[1] + 3), 0.4 * len(rows) + 1.5))
    ax = fig.subplots()
    im = ax.imshow(matrix.numpy(), aspect="auto", vmin=0, vmax=1, cmap="viridis")
    ax.set_yticks(range(len(rows)), [_name(r) for r in rows])
    ax.set_xticks(range(0, matrix.shape[1], max(1, matrix.shape[1] // 15)))
    ax.set_xlabel("layer")
    ax.set_title("oracle recall per layer")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    save_png(fig, path)
    return True


SWEEP_PLOTS = (  # (sweep axis, the column that holds its value, file, x label); policy.SWEEP_AXES
    ("budget", "budget", "vs_budget.png", "budget (share of the prompt)"),
    ("chunk_size", "chunk_size", "vs_chunk_size.png", "chunk size"),
    ("rank", "rank", "vs_rank.png", "SVD rank"),
    ("landmark_bits", "bits", "vs_bits.png", "landmark bits"),
)


def make_plots(out, summary):
    """Every plot the sweep supports; returns one line per plot saying what was drawn or skipped."""
    notes = []
    for axis, column, name, xlabel in SWEEP_PLOTS:
        if plot_sweep(summary, axis, column, out / name, xlabel):
            notes.append(f"{name}: fact accuracy or score / agreement / oracle recall against {xlabel}")
        else:
            notes.append(f"{name}: skipped, the sweep has one value of {column} per configuration")
    if plot_depth(summary, out / "fact_vs_depth.png"):
        notes.append("fact_vs_depth.png: fact accuracy against the depth of the record in the prompt")
    elif all(r["fact_accuracy"] is None for r in summary) and any(r.get("fact_tokens_cut") for r in summary):
        notes.append("fact_vs_depth.png: skipped, no fact token was scored: max_new_tokens cut them all")
    else:
        notes.append("fact_vs_depth.png: skipped, the task has no fact tokens")
    if plot_recall_heatmap(summary, out / "recall_per_layer.png"):
        notes.append("recall_per_layer.png: oracle recall per layer (policies x layers)")
    else:
        notes.append("recall_per_layer.png: skipped, no sparse policy took a decode step")
    return notes


def table_notes(summary, run):
    """The lines printed under the table: how to read the intervals, and what the free-running score
    was when it is not a column (PAPER.md "Benchmarks": the paper's score needs the whole list)."""
    n = len({r["n"] for r in summary}) == 1 and summary[0]["n"]
    few = [_name(r) for r in summary if r["n"] < MIN_SAMPLES]
    facts = (
        " Fact accuracy: share of the gold answer's value tokens predicted top-1 with the gold answer so far "
        "as input."
    )
    lines = []
    if len(few) == len(summary):
        lines.append(
            f"No 95% interval and no *: {n or 'fewer than ' + str(MIN_SAMPLES)} sample{'s' * (n != 1)}, "
            f"and a bootstrap interval needs at least {MIN_SAMPLES} (with fewer its ends are the extreme samples "
            "themselves; one sample gives an interval of zero width): run more samples (--n) to tell a "
            "difference from noise." + (facts if any(r["fact_accuracy"] is not None for r in summary) else "")
        )
    elif any(r["fact_accuracy"] is not None for r in summary):
        lines.append(
            f"[a, b]: 95% interval of a paired bootstrap over the {n or ''} samples "
            f"({BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}); vs full / vs oracle: "
            "difference to full attention / to the oracle of the same budget, * where its interval "
            "excludes 0 (not noise)."
            + (
                f" No interval and no * for {', '.join(few)}: fewer than {MIN_SAMPLES} samples."
                if few
                else ""
            )
            + facts
        )
    if run["task"] == "text2json" and all(r["score"] is None for r in summary):
        lines.append(
            "Free-running Text2JSON score: not decoded (add --free-run). On the default "
            "SmolLM2-135M it is 0.0 for every policy, full attention included (8 samples, every "
            "prediction checked): the model cannot write the JSON list on its own, so that score measures the "
            "model, not the KV policy; fact accuracy measures what the policy keeps."
        )
    elif run["task"] == "text2json" and all(not r["score"] for r in summary):
        lines.append(
            "The Text2JSON score is 0 for every configuration, full attention included: this "
            "model does not write the JSON list on its own; read the gold-forced fact accuracy."
        )
    return lines


def ruler_tables(summary, rows):
    """RULER's own view of a RULER run: per configuration, the mean over each task's samples and the
    RULER average (the mean of the task means, as RULER averages its tasks), of the gold-forced fact
    accuracy and, when the answers were decoded, of RULER's score (x 100). Adds `per_task`
    ({task: {fact_accuracy, score, n}}) and `ruler_average` ({fact_accuracy, score}) to each summary
    row (summary.json); returns the tables in markdown, tasks in RULER's order."""
    by_task = {}
    for r in rows:
        by_task.setdefault(r["key"], {}).setdefault(ruler.subtask(r["sample"]), []).append(r)
    names = [t for t in ruler.TASKS if any(t in tasks for tasks in by_task.values())]
    for s in summary:
        mine = by_task.get(s["key"], {})
        s["per_task"] = {
            t: dict(
                fact_accuracy=_mean(r["fact_accuracy"] for r in mine[t]),
                score=_scaled_mean(r["score"] for r in mine[t]),
                n=len(mine[t]),
            )
            for t in names
            if t in mine
        }
        s["ruler_average"] = {  # only over every task of the run: a missing task would bias it
            m: None
            if len(s["per_task"]) < len(names) or any(v[m] is None for v in s["per_task"].values())
            else sum(v[m] for v in s["per_task"].values()) / len(names)
            for m in ("fact_accuracy", "score")
        }
    out = []
    for m, title, spec in (
        ("fact_accuracy", "fact accuracy (gold-forced)", ".3f"),
        ("score", "RULER score", ".1f"),
    ):
        if not any(v[m] is not None for s in summary for v in s["per_task"].values()):
            continue  # e.g. no answers decoded: no RULER score
        head = ["policy", "budget", *names, "average"]
        lines = [f"RULER by task: {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for s in summary:
            cells = [s["label"], "–" if s["budget"] is None else f"{100 * s['budget']:.3g}%"]
            cells += [_fmt(s["per_task"].get(t, {}).get(m), spec) for t in names]
            cells.append(_fmt(s["ruler_average"][m], spec))
            lines.append("| " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def _scaled_mean(values):
    """100 x the mean of the values that are not None (a score in percent), or None."""
    mean = _mean(values)
    return None if mean is None else 100 * mean


def write_summary(out, rows, run):
    """Rebuild summary.json, summary.md and the plots from samples.jsonl (so a merge is a concatenation).
    The returned table includes the lines under it (table_notes)."""
    summary = summarize(rows)
    sample_notes = annotate(summary, rows, run)
    tables = [ruler_tables(summary, rows)] if ruler.is_spec(run["task"]) else []
    write_atomic(out / "summary.json", json.dumps(strict_json(summary), indent=1, allow_nan=False) + "\n")
    notes = sample_notes + make_plots(out, summary)
    table = "\n\n".join([markdown_table(summary, run["task"])] + table_notes(summary, run) + tables)
    dtype_note = (
        "device KV: bytes kept on the device over a full bf16 cache of the prompt; exact tensors count "
        "as bf16 whatever the run's dtype, quantized ones as their packed codes and scales"
    )
    md = (
        f"# KV selection policies against full attention\n\n`{run.get('command', '')}`\n\n"
        f"task {run['task']}, model {run['model']}, {len({r['sample'] for r in rows})} samples, "
        f"dtype {run['dtype']}, up to {run['max_new_tokens']} new tokens\n\n{table}\n\n"
        + "".join(f"- {n}\n" for n in [dtype_note] + notes)
    )
    write_atomic(out / "summary.md", md)
    return summary, table, notes


def check_resume(out, run, adopt_max_new, check_row=None):
    """The settings and the rows of a run continued in `out`: (settings, rows).

    A folder can only be continued with the settings it was made with, and only if every row in it is a
    whole, valid row of them (check_rows): anything else stops the run before any work, with one line.
    Without an explicit --max-new-tokens the folder's own value is kept (the automatic one depends on
    --n). A folder whose run left no sample (stopped before its first one) holds nothing to mix with:
    any settings may start it again. Rows without run.json are refused: the settings they were made
    with are unknown. The samples an earlier run skipped (`skipped`) carry over."""
    lines = read_lines(out)
    if not lines:
        return run, []
    old = read_run(out)
    if old is None:
        raise ValueError(
            f"{out / 'samples.jsonl'} holds results but {out / 'run.json'} is missing, so the settings "
            "they were made with are unknown: restore run.json, or rerun into a fresh --out"
        )
    if adopt_max_new:
        run = dict(run, max_new_tokens=old["max_new_tokens"])
    for f in RUN_FIELDS:
        if old.get(f) != run[f]:
            raise ValueError(
                f"{out} holds results made with {f}={old.get(f)!r}, not {run[f]!r}{CHANGED.get(f, '')}: "
                "use another --out or the same settings"
            )
    rows = check_rows(out, lines, run, check_row)
    return dict(run, skipped=dict(old.get("skipped") or {}, **run.get("skipped", {}))), rows


def check_format(folder, run):
    """A folder written by an older evaluate.py (RESULTS_FORMAT, OLD_FORMATS) cannot be resumed or merged:
    its rows or its settings lack what this version compares (labels that do not say every parameter,
    no checkpoint fingerprint)."""
    old = run.get("format", 1)
    if old != RESULTS_FORMAT:
        what = OLD_FORMATS.get(old, "a format this version does not know")
        raise ValueError(
            f"{folder} holds results of an older evaluate.py (format {old}: {what}): give a new --out, or "
            f"delete {folder} to run it again"
        )


def skip_record(skipped, rows):
    """run.json's `skipped` ({sample id: prompt tokens}) without the samples that now have results."""
    done = {r["sample"] for r in rows}
    return {s: n for s, n in skipped.items() if s not in done}


def annotate(summary, rows, run):
    """Add to each summary row what its mean leaves out, and return the lines that say it under
    the table: `skipped`, the run's samples with no result at all (their prompt does not fit the
    model), `fell_back`, the samples this configuration ran with full attention because the
    prompt is shorter than its budget (kvcache: sink + local window + the selection), and
    `fact_tokens_cut`, the fact tokens of gold answers longer than max_new_tokens (or than the
    model's positions allow) that its fact accuracy does not score."""
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
        notes.append(
            f"{len(ids)} of {total} samples skipped, no result in any configuration: their prompts "
            f"({token_span(skipped.values())} tokens with the chat template) do not fit the model's "
            f"{run.get('max_positions')} positions (ids {shown})"
        )
    cut = {}  # sample -> (fact tokens scored, fact tokens cut): the same for every configuration
    for row in rows:
        if row.get("fact_tokens_cut") is not None:
            cut[row["sample"]] = max(
                cut.get(row["sample"], (0, 0)), (row["fact_tokens"], row["fact_tokens_cut"])
            )
    for r in summary:
        r["fact_tokens_cut"] = sum(
            cut[x["sample"]][1] for x in rows if x["key"] == r["key"] and x["sample"] in cut
        )
    left_out = sum(c for _, c in cut.values())
    if left_out:
        total = sum(a + c for a, c in cut.values())
        hit = sum(c > 0 for _, c in cut.values())
        notes.append(
            f"fact accuracy leaves out {left_out} of the {total} fact tokens of the gold answers ({hit} of "
            f"{len(cut)} samples): the gold-forced rows stop after max_new_tokens={run['max_new_tokens']} "
            "tokens (or at the model's positions), before the end of the longer answers; a larger "
            "--max-new-tokens scores them"
        )
    for r in summary:
        if r.get("hit_rate") is not None:
            notes.append(
                f"{_name(r)}: {100 * r['hit_rate']:.0f}% of the rows it selected were on the device from the "
                "step before (hits); bytes/step counts only the misses it fetched"
            )
    for r in summary:
        if r["fell_back"]:
            notes.append(
                f"{_name(r)}: {r['fell_back']} of {r['n']} samples fell back to full attention "
                "(prompt shorter than the policy's budget: sink + local window + selection)"
            )
    return notes


def merge(args, check_row=None):
    """`python evaluate.py merge DIR... --out DIR` (args.dirs, args.out): concatenate the shards'
    samples and rebuild the summary. Every input is read as a resume reads its folder: run.json must be
    readable and every row a whole, valid row of it (check_rows, with check_row), else nothing is written.

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
            raise ValueError(
                f"{out} already holds results and is not one of the merged folders: "
                "give a new or empty --out (or name it among the inputs)"
            )
        runs, rows, seen, skipped = [], [], {}, {}
        for d in dirs:
            lines = read_lines(d)
            runs.append(read_run(d))
            for f in RUN_FIELDS:
                if runs[-1].get(f) != runs[0].get(f):
                    raise ValueError(
                        f"{d} was run with {f}={runs[-1].get(f)!r}, {args.dirs[0]} with {runs[0].get(f)!r}"
                        f"{CHANGED.get(f, '')}: merge only folders of one run's settings"
                    )
            skipped.update(runs[-1].get("skipped") or {})
            for r in check_rows(d, lines, runs[-1], check_row):
                k = (r["key"], r["sample"])
                if k not in seen:
                    seen[k] = (r, d)
                    rows.append(r)
                elif seen[k][0] != r:
                    prev, where = seen[k]
                    f = next(f for f in {**prev, **r} if prev.get(f) != r.get(f))
                    raise ValueError(
                        f"sample {r['sample']!r} of {r['key']!r} differs between {where} and "
                        f"{d} ({f}: {prev.get(f)!r} vs {r.get(f)!r}): merge only one of them"
                    )
        settings = dict(
            runs[0],
            command=f"python evaluate.py merge {' '.join(args.dirs)} --out {args.out}",
            skipped=skip_record(skipped, rows),
        )
        write_atomic(out / "run.json", json.dumps(settings, indent=1) + "\n")
        write_rows(out, rows)
        _, table, _ = write_summary(out, rows, settings)
    print(table)
    return 0
