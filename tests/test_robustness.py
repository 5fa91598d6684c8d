"""evaluate.py never loses a finished result, never shows a traceback, and never accepts an input it
then runs wrongly: the results folder's one-writer lock, merge's refusals, Ctrl-C, SIGTERM and SIGHUP,
damaged results folders, a full disk, the paths and environment it writes to, and the one-line errors
(first words, exit code 2, no traceback), on a tiny random-weight model.

Where signals and exit codes matter (Ctrl-C, two processes at once, a lock holder killed with -9)
the CLI runs as a subprocess."""

import contextlib
import errno
import json
import math
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import claims
import convert_gguf
import evaluate
import experiment
import model
import results
import skew
import tasks
import text2json
import workers
from conftest import make_tiny_checkpoint
from model import default_model_path, load_tokenizer
from policy import make_policy, split_budget

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, OMP_NUM_THREADS="1")
# 2 samples of ~2.1K byte tokens, 4 new tokens: a few seconds per run
QUICK = ["--n", "2", "--tokens", "2048", "--max-new-tokens", "4", "--methods", "full,oracle"]
# at --tokens 4075 sample 0's prompt (4090 tokens) fits the 4096 positions, sample 1's (4172) does not
LONG = ["--n", "2", "--tokens", "4075", "--max-new-tokens", "4"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """As in test_evaluate: the tiny model gains nothing from threads on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path, _ = make_tiny_checkpoint(
        "LlamaForCausalLM", tmp_path_factory.mktemp("ckpt") / "llama", max_position_embeddings=4096
    )
    return path


@pytest.fixture(scope="module")
def base(ckpt, tmp_path_factory):
    """One finished run of QUICK; tests copy it."""
    out = tmp_path_factory.mktemp("runs") / "base"
    assert evaluate.main(["--model", str(ckpt), *QUICK, "--out", str(out)]) == 0
    return out


def run_main(argv, capsys):
    rc = evaluate.main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def cli(*argv, timeout=120):
    """evaluate.py as a subprocess: (exit code, stdout, stderr)."""
    p = subprocess.run(
        [sys.executable, "evaluate.py", *map(str, argv)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return p.returncode, p.stdout, p.stderr


def one_line_error(rc, err, first_words):
    assert rc == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " + first_words), err


def copy_with_rows(base, path, keep):
    """A copy of the results folder `base` holding only its rows for which keep(row) is true."""
    shutil.copytree(base, path)
    results.write_rows(path, [r for r in results.read_rows(base) if keep(r)])
    return path


def hold_lock(folder):
    """A separate process holding `folder`'s lock (as a running evaluate.py does), once it holds it."""
    code = (
        f"import results, time\nwith results.locked({str(folder)!r}):\n"
        "    print('held', flush=True)\n    time.sleep(120)"
    )
    p = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


# ---------------------------------------------------------------------------- one-line errors


@pytest.mark.parametrize(
    "bad, first_words",
    [
        (["--methods", "svd", "--ranks", "1.5"], "bad --ranks value '1.5': a rank is an int >= 1 or a share"),
        (["--methods", "svd", "--ranks", "0"], "bad --ranks value '0': a rank is an int >= 1"),
        (["--methods", "svd", "--ranks", "100000"], "--ranks 100000 is above the model's 32 key channels"),
        (["--methods", "svd", "--ranks", "0.001"], "--ranks 0.001 keeps none of the model's 32 key"),
        (["--methods", "shadowkv", "--ranks", "0.1"], "--ranks sweeps the rank of svd, and no method of"),
        (["--methods", "full,oracle", "--chunk-sizes", "4"], "--chunk-sizes sweeps the chunk_size of mean,"),
        (["--shard", "-1/2"], "bad --shard '-1/2': need 0 <= i < n"),
        (["--n", "2", "--shard", "3/4"], "shard 3/4 has no sample: the run has 2 samples"),
        (["--out", "FILE"], "FILE is a file, not a results folder"),
        (["--out", "FILE/sub"], "FILE is a file: --out FILE/sub cannot be a folder inside it"),
        (["--tokens", "100000"], "--tokens 100000 does not fit the model's 4096 positions"),
        ([*LONG, "--shard", "1/2"], "no sample fits the model: every prompt (4172 tokens with the chat"),
        (["merge", "BASE", "--out", "FILE"], "FILE is a file, not a results folder"),
        (
            ["merge", "BASE", "--out", "OTHER"],
            "OTHER already holds results and is not one of the merged folders",
        ),
    ],
)
def test_one_line_errors(bad, first_words, ckpt, base, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder\n")
    other = copy_with_rows(base, tmp_path / "other", lambda r: r["sample"] == "0")
    before = (other / "samples.jsonl").read_bytes()
    names = {"FILE": tmp_path / "file", "BASE": base, "OTHER": other}

    def fill(text):  # the placeholders FILE, BASE, OTHER -> this test's paths
        for name, path in names.items():
            text = text.replace(name, str(path))
        return text

    argv, first_words = [fill(a) for a in bad], fill(first_words)
    if argv[0] != "merge":
        argv = ["--model", ckpt, *QUICK, "--out", tmp_path / "out", *argv]
    rc, err = run_main(argv, capsys)
    one_line_error(rc, err, first_words)
    assert (other / "samples.jsonl").read_bytes() == before  # merge left the foreign folder alone


def test_shard_value_with_a_dash_reaches_its_own_check_on_the_command_line(ckpt, tmp_path):
    """argparse alone says "expected one argument" for `--shard -1/2`, before main() can help."""
    rc, _, err = cli("--model", ckpt, "--shard", "-1/2", "--out", tmp_path / "out")
    one_line_error(rc, err, "bad --shard '-1/2'")


# ---------------------------------------------------------------------------- merge


def test_merge_keeps_identical_duplicates_and_refuses_conflicting_ones(base, tmp_path, capsys):
    a = copy_with_rows(base, tmp_path / "a", lambda r: True)  # both samples
    b = copy_with_rows(base, tmp_path / "b", lambda r: r["sample"] == "1")  # sample 1 again, identical
    rc, err = run_main(["merge", a, b, "--out", tmp_path / "m"], capsys)
    assert rc == 0, err
    assert results.read_rows(tmp_path / "m") == results.read_rows(base)

    rows = results.read_rows(b)
    rows[0] = dict(rows[0], kl=rows[0]["kl"] + 1e-6)  # same (configuration, sample), another value
    results.write_rows(b, rows)
    rc, err = run_main(["merge", a, b, "--out", tmp_path / "m2"], capsys)
    one_line_error(rc, err, f"sample '1' of {rows[0]['key']!r} differs between {a} and {b} (kl:")
    assert not (tmp_path / "m2" / "samples.jsonl").exists()


def test_merge_into_one_of_its_inputs(base, tmp_path, capsys):
    a = copy_with_rows(base, tmp_path / "a", lambda r: r["sample"] == "0")
    b = copy_with_rows(base, tmp_path / "b", lambda r: r["sample"] == "1")
    rc, err = run_main(["merge", a, b, "--out", a], capsys)
    assert rc == 0, err
    key = lambda r: (r["key"], r["sample"])
    assert sorted(results.read_rows(a), key=key) == sorted(results.read_rows(base), key=key)


# ---------------------------------------------------------------------------- one writer per folder


@pytest.mark.slow
def test_a_busy_folder_is_refused_until_its_holder_dies(base, ckpt, tmp_path, capsys):
    out = copy_with_rows(base, tmp_path / "busy", lambda r: True)
    holder = hold_lock(out)
    try:
        rc, err = run_main(["--model", ckpt, *QUICK, "--out", out], capsys)
        one_line_error(rc, err, f"{out} is in use by another evaluate.py process (pid {holder.pid})")
        rc, err = run_main(["merge", base, "--out", out], capsys)
        one_line_error(rc, err, f"{out} is in use by another evaluate.py process (pid {holder.pid})")
        rc, err = run_main(["merge", out, "--out", tmp_path / "merged"], capsys)  # a folder being written
        one_line_error(rc, err, f"{out} is in use by another evaluate.py process (pid {holder.pid})")
    finally:
        holder.kill()  # -9: no clean-up runs, the kernel drops the lock
        holder.wait()
    rc, err = run_main(["--model", ckpt, *QUICK, "--out", out], capsys)
    assert rc == 0 and "skipped 2 of 2 samples: finished" in err, err


@pytest.mark.slow
def test_two_processes_on_one_folder_never_lose_a_sample(ckpt, tmp_path):
    """Shards 0/2 and 1/2 started at once on one --out: either the second is refused at its start with
    a clear message, or (the first already done) it adds its sample; a finished sample is never lost."""
    out = tmp_path / "shared"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "evaluate.py",
                "--model",
                str(ckpt),
                *QUICK,
                "--workers",
                "1",
                "--shard",
                f"{i}/2",
                "--out",
                str(out),
            ],
            cwd=REPO,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    ends = [p.communicate(timeout=300) for p in procs]
    ok = []
    for i, (p, (_, err)) in enumerate(zip(procs, ends)):
        assert "Traceback" not in err, err
        if p.returncode == 0:
            ok.append(str(i))
        else:
            one_line_error(p.returncode, err, f"{out} is in use by another evaluate.py process (pid ")
    assert ok, "one of the two must have run"
    saved = {(r["key"], r["sample"]) for r in results.read_rows(out)}
    keys = [make_policy("full").key(), make_policy("oracle").key()]
    assert saved == {(k, s) for k in keys for s in ok}


def test_torchrun_ranks_with_one_out_get_a_folder_each(ckpt, tmp_path, capsys, monkeypatch):
    """RANK/WORLD_SIZE set (torchrun) and the same --out for every rank: each rank writes --out with its
    shard suffix, so no rank's samples overwrite another's (merge the folders afterwards)."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc, err = run_main(["--model", ckpt, *QUICK, "--workers", "1", "--out", tmp_path / "t2j"], capsys)
    assert rc == 0, err
    assert not (tmp_path / "t2j").exists()
    assert {r["sample"] for r in results.read_rows(tmp_path / "t2j-shard1of2")} == {"1"}


@pytest.mark.slow
def test_a_run_killed_with_9_leaves_its_folder_free(ckpt, tmp_path):
    """kill -9 of the parent while its two workers decode: the workers do not keep the folder locked
    (they close the lock inherited through fork), so the next run takes over at once."""
    out = tmp_path / "killed"
    argv = [
        sys.executable,
        "evaluate.py",
        "--model",
        str(ckpt),
        "--n",
        "4",
        "--tokens",
        "2048",
        "--max-new-tokens",
        "64",
        "--methods",
        "full,oracle",
        "--workers",
        "2",
        "--out",
        str(out),
    ]
    p = subprocess.Popen(
        argv, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.time() + 240
        while not (out / "samples.jsonl").exists() and p.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert p.poll() is None, "the run ended before the first sample was saved: make it longer"
        p.kill()
        p.wait()
        rc, _, err = cli(
            "--model",
            ckpt,
            "--n",
            "1",
            "--tokens",
            "2048",
            "--max-new-tokens",
            "64",
            "--methods",
            "full,oracle",
            "--out",
            out,
        )
        assert rc == 0 and "skipped 1 of 1 samples: finished" in err, err
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)  # the orphaned workers


# ---------------------------------------------------------------------------- Ctrl-C


@pytest.mark.slow
def test_ctrl_c_saves_finished_samples_and_a_rerun_resumes(ckpt, tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) with two worker processes:
    no traceback from the parent or any worker, exit code 130, what is saved and how to resume."""
    out = tmp_path / "int"
    argv = [
        sys.executable,
        "evaluate.py",
        "--model",
        str(ckpt),
        "--n",
        "4",
        "--tokens",
        "2048",
        "--max-new-tokens",
        "64",
        "--methods",
        "full,oracle",
        "--workers",
        "2",
        "--out",
        str(out),
    ]
    p = subprocess.Popen(
        argv,
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while not (out / "samples.jsonl").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert p.poll() is None, "the run ended before the first sample was saved: make it longer"
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err, err
    last = err.strip().splitlines()[-1]
    saved = len({r["sample"] for r in results.read_rows(out)})
    assert 1 <= saved < 4
    assert last.startswith(
        f"interrupted: {saved} of 4 samples are saved in {out} ({saved} by this run); "
        "run the same command again to resume"
    ), err

    p = subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert f"skipped {saved} of 4 samples: finished in {out}" in p.stderr
    assert len({r["sample"] for r in results.read_rows(out)}) == 4


# ---------------------------------------------------------------------------- said, not silent


def test_skipped_and_fallen_back_samples_are_in_the_summary(ckpt, tmp_path, capsys):
    """A prompt longer than the model's positions is skipped, a chunk longer than the prompt falls back
    to full attention: both are counted in summary.json and said under the table of summary.md."""
    out = tmp_path / "long"
    argv = [
        "--model",
        ckpt,
        *LONG,
        "--methods",
        "full,mean",
        "--chunk-sizes",
        "8,4096",
        "--workers",
        "1",
        "--out",
        out,
    ]
    rc, err = run_main(argv, capsys)
    assert rc == 0 and "warning: skipping 1 of 2 samples" in err, err
    assert json.loads((out / "run.json").read_text())["skipped"] == {"1": 4172}
    by = {(r["label"], r["budget"]): r for r in json.loads((out / "summary.json").read_text())}
    assert {k: (r["skipped"], r["fell_back"]) for k, r in by.items()} == {
        ("full", None): (1, None),
        ("mean c8", 0.03125): (1, 0),
        ("mean c4096", 0.03125): (1, 1),
    }
    md = (out / "summary.md").read_text()
    table_end = md.index("\n\n", md.index("| policy"))
    notes = md[table_end:]
    assert (
        "- 1 of 2 samples skipped, no result in any configuration: their prompts (4172 tokens with the "
        "chat template) do not fit the model's 4096 positions (ids 1)"
    ) in notes
    assert "- mean c4096 @0.03125: 1 of 1 samples fell back to full attention" in notes
    assert "mean c8 @0.03125: " not in notes

    rc, err = run_main(argv, capsys)  # resumed: nothing to do, the notes stay
    assert rc == 0 and "skipped 1 of 2 samples: finished" in err
    assert (out / "summary.md").read_text() == md


# ---------------------------------------------------------------------------- resume


def test_resume_compares_meanings_not_spellings(base, ckpt, tmp_path, capsys, monkeypatch):
    out = copy_with_rows(base, tmp_path / "r", lambda r: True)
    rc, err = run_main(["--model", ckpt, *QUICK, "--dtype", "fp32", "--out", out], capsys)
    assert rc == 0 and "skipped 2 of 2 samples: finished" in err, err
    args = lambda model: Namespace(
        task="text2json",
        model=model,
        data=None,
        tokens=2048,
        seed=0,
        dtype="fp32",
        argv=[],
        free_run=None,
        group="8k",
        outliers=None,
        score_rule=None,
        no_chat=False,
        decode_loop=False,
        engine="model.py",
    )
    assert evaluate.run_settings(args(None), 4) == evaluate.run_settings(args(str(default_model_path())), 4)
    assert evaluate.run_settings(args(None), 4)["dtype"] == "float32"


def test_a_folder_without_results_is_not_bound_to_its_settings(base, ckpt, tmp_path, capsys):
    out = copy_with_rows(base, tmp_path / "empty", lambda r: False)  # run.json, no sample
    rc, err = run_main(["--model", ckpt, *QUICK, "--seed", "1", "--workers", "1", "--out", out], capsys)
    assert rc == 0, err
    assert json.loads((out / "run.json").read_text())["seed"] == 1
    rc, err = run_main(["--model", ckpt, *QUICK, "--seed", "2", "--out", out], capsys)  # now it has results
    one_line_error(rc, err, f"{out} holds results made with seed=1, not 2")


# ---------------------------------------------------------------------------- a folder is trusted only when whole
# issue 19: a row is used only if it is a whole, valid row of this run, and run.json is readable whenever
# rows are; otherwise resume and merge stop before any work with one line naming the file, the line and
# what to do, and leave the folder as it was (samples.jsonl byte for byte).


def test_a_row_has_exactly_the_fields_evaluate_sample_writes(base):
    """results.ROW_FIELDS is the one list of a row's fields (check_rows reads by it): evaluate_sample's
    rows have exactly those, in that order, and a LongProc row adds exactly TASK_ROW_FIELDS["longproc"]."""
    for row in results.read_rows(base):
        assert list(row) == list(results.ROW_FIELDS)
    longproc = experiment.score_sample("longproc", "x", {"gold": "a\tb\n1\t2\n"})
    text2json = experiment.score_sample("text2json", "x", {"gold": '[{"name": "a"}]'})
    assert set(longproc) - set(text2json) == set(results.TASK_ROW_FIELDS["longproc"])
    assert set(text2json) <= set(results.ROW_FIELDS)


def edit_row(n, **changes):
    """Damage: line n of samples.jsonl with fields changed (None: the field removed)."""

    def damage(folder):
        lines = (folder / "samples.jsonl").read_text().splitlines()
        row = json.loads(lines[n - 1])
        for k, v in changes.items():
            row.pop(k) if v is None else row.__setitem__(k, v)
        lines[n - 1] = json.dumps(row, ensure_ascii=False)  # NaN and Infinity as Python writes them
        (folder / "samples.jsonl").write_text("\n".join(lines) + "\n")

    return damage


def append_line(n=None, text=None, **changes):
    """Damage: a copy of line n (with fields changed), or the line `text`, added at the end."""

    def damage(folder):
        lines = (folder / "samples.jsonl").read_text().splitlines()
        if text is None:
            row = dict(json.loads(lines[n - 1]), **changes)
            lines.append(json.dumps(row, ensure_ascii=False))
        else:
            lines.append(text)
        (folder / "samples.jsonl").write_text("\n".join(lines) + "\n")

    return damage


def write_file(name, text):
    def damage(folder):
        (folder / name).write_text(text)

    return damage


def edit_run(**changes):
    """Damage: run.json with fields changed (None: the field removed)."""

    def damage(folder):
        run = json.loads((folder / "run.json").read_text())
        for k, v in changes.items():
            run.pop(k) if v is None else run.__setitem__(k, v)
        (folder / "run.json").write_text(json.dumps(run, indent=1) + "\n")

    return damage


def delete(name):
    return lambda folder: (folder / name).unlink()


def cut_last_line(folder):
    text = (folder / "samples.jsonl").read_text()
    (folder / "samples.jsonl").write_text(text[: len(text) - 40])


ROWS = "DIR/samples.jsonl"
FIX = "delete the line to redo it, or rerun into a fresh --out"
RUN_FIX = "restore it, or rerun into a fresh --out"
# the base folder's lines: 1 full/0, 2 oracle/0, 3 full/1, 4 oracle/1 (QUICK: 2 samples x full, oracle)
DAMAGED = [
    # (issue case: the damage, the command on the damaged folder DIR, its one line)
    ("2: a row without key", edit_row(1, key=None), "run", f"{ROWS}:1: not a whole row: no key: {FIX}"),
    ("2: a row without key", edit_row(1, key=None), "merge", f"{ROWS}:1: not a whole row: no key: {FIX}"),
    (
        "2: a line [1,2,3]",
        append_line(text="[1,2,3]"),
        "run",
        f"{ROWS}:5: a JSON list, not a row (a JSON object): {FIX}",
    ),
    (
        "2: a line [1,2,3]",
        append_line(text="[1,2,3]"),
        "merge",
        f"{ROWS}:5: a JSON list, not a row (a JSON object): {FIX}",
    ),
    (
        "2: run.json holds a JSON list",
        write_file("run.json", "[1, 2]\n"),
        "run",
        f"DIR/run.json: a JSON list, not the settings of a run (a JSON object): {RUN_FIX}",
    ),
    (
        "2: run.json holds a JSON list",
        write_file("run.json", "[1, 2]\n"),
        "merge",
        f"DIR/run.json: a JSON list, not the settings of a run (a JSON object): {RUN_FIX}",
    ),
    (
        "5: a duplicated row, identical",
        append_line(1),
        "run",
        f"{ROWS}:5: a second row of sample '0' for full (the first is line 1): delete one of the two "
        "lines (both, to redo it), or rerun into a fresh --out",
    ),
    (
        "5: a duplicated row, another value",
        append_line(2, kl=0.5),
        "run",
        f"{ROWS}:5: a second row of sample '0' for oracle @0.03125 (the first is line 2): delete one",
    ),
    (
        "5: a duplicated row, identical",
        append_line(1),
        "merge",
        f"{ROWS}:5: a second row of sample '0' for full (the first is line 1): delete one",
    ),
    (
        "6: fact_accuracy NaN",
        edit_row(2, fact_accuracy=math.nan),
        "run",
        f"{ROWS}:2: fact_accuracy is NaN, not a finite number: {FIX}",
    ),
    (
        "6: fact_accuracy NaN",
        edit_row(2, fact_accuracy=math.nan),
        "merge",
        f"{ROWS}:2: fact_accuracy is NaN, not a finite number: {FIX}",
    ),
    (
        "6: an infinite number",
        edit_row(4, bytes_per_step=-math.inf),
        "run",
        f"{ROWS}:4: bytes_per_step is -Infinity, not a finite number: {FIX}",
    ),
    (
        "7: a row for sample zzz, not in the run",
        append_line(2, sample="zzz"),
        "run",
        f"{ROWS}:5: sample 'zzz' is not a sample of this run (the text2json samples of these settings "
        f"are numbered 0, 1, ...): {FIX}",
    ),
    (
        "8: run.json deleted, rows present",
        delete("run.json"),
        "run --max-new-tokens 7",
        f"{ROWS} holds results but DIR/run.json is missing, so the settings they were made with are "
        "unknown: restore run.json, or rerun into a fresh --out",
    ),
    (
        "8: run.json deleted, rows present",
        delete("run.json"),
        "merge",
        "DIR is not a results folder (no run.json / samples.jsonl)",
    ),
    (
        "11: run.json is not JSON",
        write_file("run.json", "not json\n"),
        "run",
        f"DIR/run.json: not valid JSON (Expecting value, line 1 column 1): {RUN_FIX}",
    ),
    (
        "11: run.json is not JSON",
        write_file("run.json", "not json\n"),
        "merge",
        f"DIR/run.json: not valid JSON (Expecting value, line 1 column 1): {RUN_FIX}",
    ),
    # the smaller ones: each way a row or run.json can be other than this version writes it
    ("a line cut short", cut_last_line, "run", f"{ROWS}:4: not valid JSON ("),
    ("a number as text", edit_row(1, kl="0"), "run", f'{ROWS}:1: kl is "0", not a number or null: {FIX}'),
    ("a field no row has", edit_row(3, note="checked"), "run", f"{ROWS}:3: 'note' is a field no row has"),
    (
        "a row of another task",
        edit_row(3, task="needle"),
        "run",
        f"{ROWS}:3: a needle row, in a folder of text2json results (run.json): {FIX}",
    ),
    (
        "a row of another max_new_tokens",
        edit_row(3, max_new_tokens=89),
        "run",
        f"{ROWS}:3: made with max_new_tokens=89, where run.json says 4: {FIX}",
    ),
    (
        "a budget edited in the row",
        edit_row(2, budget=0.5),
        "run",
        f"{ROWS}:2: its budget does not match its config (0.5, its config gives 0.03125): {FIX}",
    ),
    (
        "a budget edited in the config",
        edit_row(2, config=dict(make_policy("oracle").params(), budget=0.5)),
        "merge",
        f"{ROWS}:2: its key does not match its config: {FIX}",
    ),
    (
        "a config of no method",
        edit_row(1, config={"name": "magic"}),
        "run",
        f"{ROWS}:1: its config names no method of evaluate.py ('magic'): {FIX}",
    ),
    (
        "a config another run's settings make",
        edit_row(
            2,
            key=make_policy("oracle", score_rule="mean_query").key(),
            config=make_policy("oracle", score_rule="mean_query").params(),
            oracle_key=make_policy("oracle", score_rule="mean_query").key(),
        ),
        "run",
        f"{ROWS}:2: made with score_rule='mean_query', not the score_rule of run.json (None): {FIX}",
    ),
    (
        "run.json without max_new_tokens",
        edit_run(max_new_tokens=None),
        "run",
        f"DIR/run.json: not a whole run.json: no max_new_tokens: {RUN_FIX}",
    ),
    (
        "run.json with a number as text",
        edit_run(seed="0"),
        "merge",
        f'DIR/run.json: seed is "0", not an integer: {RUN_FIX}',
    ),
    ("run.json of an older evaluate.py", edit_run(format=None), "run", "DIR holds results of an older"),
]


@pytest.mark.parametrize(
    "case, damage, command, line", DAMAGED, ids=[f"{c[0]} ({c[2].split()[0]})" for c in DAMAGED]
)
def test_a_damaged_folder_is_refused_in_one_line_and_left_as_it_was(
    case, damage, command, line, base, ckpt, tmp_path, capsys, monkeypatch
):
    folder = copy_with_rows(base, tmp_path / "dir", lambda r: True)
    damage(folder)
    files = lambda: {f.name: f.read_bytes() for f in folder.iterdir() if f.name != results.LOCK_NAME}
    before = files()

    def forbidden(*a, **k):
        raise AssertionError("a damaged folder must stop the run before any work")

    monkeypatch.setattr(evaluate, "load_model", forbidden)
    if command.startswith("run"):
        argv = ["--model", ckpt, *QUICK, *command.split()[1:], "--out", folder]
    else:
        argv = ["merge", folder, "--out", tmp_path / "merged"]
    rc, err = run_main(argv, capsys)
    one_line_error(rc, err, line.replace("DIR", str(folder)))
    assert files() == before  # samples.jsonl byte for byte, run.json too, and no file added
    assert not (tmp_path / "merged" / "samples.jsonl").exists()


# ---------------------------------------------------------------------------- checked at the start
# issue 19: every path and environment variable the program writes to, and every option, is checked
# before any work: one line each.

REFUSED_AT_START = [
    # (issue case, options after `--model CKPT QUICK --out OUT` (or a merge), environment, the one line)
    (
        "1: --outliers inf",
        ["--methods", "full,shadowkv", "--outliers", "inf"],
        {},
        "bad --outliers 'inf': an int count of chunks, a share of the prompt below 1, or 'budget'",
    ),
    (
        "1: --outliers 1e400",
        ["--methods", "full,shadowkv", "--outliers", "1e400"],
        {},
        "bad --outliers '1e400'",
    ),
    (
        "3: KVOFFLOAD_CACHE is a file",
        [],
        {"KVOFFLOAD_CACHE": "FILE"},
        "KVOFFLOAD_CACHE=FILE is a file, not a folder: set KVOFFLOAD_CACHE to a writable folder",
    ),
    (
        "3: KVOFFLOAD_CACHE is inside a file",
        [],
        {"KVOFFLOAD_CACHE": "FILE/cache"},
        "KVOFFLOAD_CACHE=FILE/cache cannot be created (Not a directory): set KVOFFLOAD_CACHE to a writable",
    ),
    (
        "9: --out '' (an unset $OUT)",
        ["--out", ""],
        {},
        "--out '' is empty: give a results folder path (is the variable you passed unset?)",
    ),
    (
        "9: merge --out ''",
        ["merge", "BASE", "--out", ""],
        {},
        "--out '' is empty: give a results folder path",
    ),
    ("9: merge ''", ["merge", "", "--out", "OUT"], {}, "merge DIR '' is empty: give a results folder path"),
    (
        "12: HOME unusable, no KVOFFLOAD_CACHE",
        [],
        {"HOME": "/proc/self", "KVOFFLOAD_CACHE": None},
        "the cache folder /proc/self/.cache/kvoffload (~/.cache/kvoffload with HOME=/proc/self; "
        "KVOFFLOAD_CACHE is not set) cannot be created (No such file or directory): set KVOFFLOAD_CACHE "
        "to a writable folder",
    ),
    ("--workers -3", ["--workers", "-3"], {}, "--workers -3 must be >= 1"),
    ("--workers 0", ["--workers", "0"], {}, "--workers 0 must be >= 1"),
]


@pytest.mark.parametrize("case, options, env, line", REFUSED_AT_START, ids=[c[0] for c in REFUSED_AT_START])
def test_paths_environment_and_options_are_checked_at_the_start(
    case, options, env, line, base, ckpt, tmp_path, capsys, monkeypatch
):
    (tmp_path / "file").write_text("not a folder\n")
    names = {"FILE": str(tmp_path / "file"), "BASE": str(base), "OUT": str(tmp_path / "out")}
    fill = lambda text: [text := text.replace(k, v) for k, v in names.items()][-1]
    for k, v in env.items():
        monkeypatch.delenv(k, raising=False) if v is None else monkeypatch.setenv(k, fill(v))
    cwd = tmp_path / "cwd"  # where an empty --out would have written the folder
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    def forbidden(*a, **k):
        raise AssertionError("a bad path or option must stop before any loading")

    monkeypatch.setattr(evaluate, "load_model", forbidden)
    monkeypatch.setattr(evaluate, "load_tokenizer", forbidden)
    argv = [fill(a) for a in options]
    if argv[:1] != ["merge"]:
        argv = ["--model", ckpt, *QUICK, "--out", tmp_path / "out", *argv]
    rc, err = run_main(argv, capsys)
    one_line_error(rc, err, fill(line))
    assert not (tmp_path / "out").exists() and list(cwd.iterdir()) == []


MODEL_CLI = [
    # (issue case, program, options, environment, the one line)
    (
        "10: model.py --max-new-tokens 0",
        model.main,
        ["--max-new-tokens", "0"],
        {},
        "--max-new-tokens 0 must be >= 1",
    ),
    (
        "10: model.py --max-new-tokens -1",
        model.main,
        ["--max-new-tokens", "-1"],
        {},
        "--max-new-tokens -1 must be",
    ),
    (
        "3: model.py, KVOFFLOAD_CACHE is a file",
        model.main,
        [],
        {"KVOFFLOAD_CACHE": "FILE"},
        "KVOFFLOAD_CACHE=FILE is a file, not a folder",
    ),
    (
        "3: convert_gguf.py, KVOFFLOAD_CACHE is a file",
        convert_gguf.main,
        None,
        {"KVOFFLOAD_CACHE": "FILE"},
        "KVOFFLOAD_CACHE=FILE is a file, not a folder",
    ),
    (
        "12: model.py, HOME unusable",
        model.main,
        [],
        {"HOME": "/proc/self", "KVOFFLOAD_CACHE": None},
        "the cache folder /proc/self/.cache/kvoffload (~/.cache/kvoffload with HOME=/proc/self;",
    ),
]


@pytest.mark.parametrize("case, program, options, env, line", MODEL_CLI, ids=[c[0] for c in MODEL_CLI])
def test_model_and_convert_refuse_as_evaluate_does(
    case, program, options, env, line, tmp_path, capsys, monkeypatch
):
    (tmp_path / "file").write_text("not a folder\n")
    for k, v in env.items():
        monkeypatch.delenv(k, raising=False) if v is None else monkeypatch.setenv(
            k, v.replace("FILE", str(tmp_path / "file"))
        )

    def forbidden(*a, **k):
        raise AssertionError("a bad option must stop before any loading")

    monkeypatch.setattr(model, "load_model", forbidden)
    monkeypatch.setattr(convert_gguf, "convert", forbidden)
    rc = program([] if options is None else ["--prompt", "hi", *options])
    one_line_error(rc, capsys.readouterr().err, line.replace("FILE", str(tmp_path / "file")))


def test_a_data_file_with_a_byte_order_mark_is_read(ckpt, tmp_path, capsys):
    """Some Windows editors start a UTF-8 file with a byte-order mark: it is read as the same file."""
    tok = load_tokenizer(ckpt)
    rows = text2json.generate(1, 2048, tok, seed=0)
    data = tmp_path / "bom.jsonl"
    data.write_text(
        "".join(json.dumps(dict(problem=r["problem"], answer=r["answer"])) + "\n" for r in rows), "utf-8-sig"
    )
    assert data.read_bytes()[:3] == b"\xef\xbb\xbf"
    out = tmp_path / "out"
    argv = ["--model", ckpt, *QUICK, "--n", "1", "--workers", "1", "--data", data, "--out", out]
    rc, err = run_main(argv, capsys)
    assert rc == 0 and "Traceback" not in err, err
    assert {r["sample"] for r in results.read_rows(out)} == {"0"}


# ---------------------------------------------------------------------------- a full disk


@contextlib.contextmanager
def small_disk(path, size="256k"):
    """A tmpfs of `size` at path (True), or a plain folder where it cannot be mounted (False: not root)."""
    path.mkdir()
    try:
        mounted = (
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
            ).returncode
            == 0
        )
    except OSError:
        mounted = False
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=True)


def full_disk_open(name):
    """open() for results.write_atomic as on a full disk: the temporary file of `name` is created, and
    writing it fails with ENOSPC (where no tmpfs can be mounted)."""
    real = open

    def fake(path, mode="r", *a, **k):
        f = real(path, mode, *a, **k)
        if Path(path).name == name + ".tmp":
            f.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return f

    return fake


FULL_DISK = [
    # (issue case, free bytes left once the finished folder is on the disk, the file that cannot be written)
    ("4: the disk fills while the summary is written", 4096, "summary.json"),
    ("4: the disk is full from the start", 0, "run.json"),
]


@pytest.mark.parametrize("case, room, name", FULL_DISK, ids=[c[0] for c in FULL_DISK])
def test_a_full_disk_says_what_is_saved_and_leaves_no_temporary_file(
    case, room, name, base, ckpt, tmp_path, capsys, monkeypatch
):
    """On a small tmpfs when it can be mounted (root), else with write_atomic's open() failing as on a
    full disk. The finished rows are there (a resume that only rewrites run.json and the summary):
    one page left holds the new run.json but not summary.json (over 4 KiB)."""
    assert (base / "summary.json").stat().st_size > 4096 and (base / "run.json").stat().st_size < 4096
    disk = tmp_path / "disk"
    with small_disk(disk) as mounted:
        out = disk / "out"
        out.mkdir()
        for f in ("run.json", "samples.jsonl", results.LOCK_NAME):
            shutil.copy(base / f, out / f)
        rows = (out / "samples.jsonl").read_bytes()
        if mounted:
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
            (disk / "filler").write_bytes(b"\0" * (free - room))
        else:
            monkeypatch.setattr(results, "open", full_disk_open(name), raising=False)
        rc, err = run_main(["--model", ckpt, *QUICK, "--out", out], capsys)
        one_line_error(
            rc,
            err.replace(f"skipped 2 of 2 samples: finished in {out}\n", ""),
            f"cannot write {out / name} (No space left on device): 2 of 2 samples are saved in {out}; "
            "free some space, then run the same command again",
        )
        assert [f.name for f in out.iterdir() if f.name.endswith(".tmp")] == []
        assert (out / "samples.jsonl").read_bytes() == rows


# ---------------------------------------------------------------------------- SIGTERM, SIGHUP


STOPS = [
    # (how the run is stopped, to whom, exit code)
    ("SIGTERM", "the parent (kill PID)", 143),
    ("SIGHUP", "the process group (a closed terminal)", 129),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, target, code", STOPS, ids=[s[0] for s in STOPS])
def test_sigterm_and_sighup_stop_a_run_as_ctrl_c_does(name, target, code, ckpt, tmp_path):
    """As Ctrl-C (test above): the exit code 128 + the signal, no traceback from the parent or a worker,
    the last line says what is saved and how to resume, and no temporary file is left."""
    out = tmp_path / "stopped"
    argv = [sys.executable, "evaluate.py", "--model", ckpt, "--n", 4, "--tokens", 2048]
    argv += ["--max-new-tokens", 64, "--methods", "full,oracle", "--workers", 2, "--out", out]
    p = subprocess.Popen(
        list(map(str, argv)),
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 240
        while not (out / "samples.jsonl").exists() and p.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert p.poll() is None, "the run ended before the first sample was saved: make it longer"
        sig = getattr(signal, name)
        os.kill(p.pid, sig) if "parent" in target else os.killpg(p.pid, sig)
        _, err = p.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == code and "Traceback" not in err, err
    saved = len({r["sample"] for r in results.read_rows(out)})
    assert 1 <= saved < 4
    assert err.strip().splitlines()[-1] == (
        f"interrupted ({name}): {saved} of 4 samples are saved in {out} ({saved} by this run); "
        "run the same command again to resume"
    ), err
    assert [f.name for f in out.iterdir() if f.name.endswith(".tmp")] == []


# ---------------------------------------------------------------------------- the workers


@pytest.fixture
def deadline():
    """A hang (what these tests guard against) fails the test after 60 s instead of stalling the run."""

    def late(signum, frame):
        pytest.fail("still waiting after 60 s")

    previous = signal.signal(signal.SIGALRM, late)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def worker_jobs(n):
    """run_jobs' jobs as the fakes below read them: (the sample, ...)."""
    return [({"id": str(i)},) for i in range(n)]


IDLE_WORKERS = """
import multiprocessing, os, signal, time
import workers

def sample(model, tok, job, calibration=None):
    time.sleep(1.0 if job["id"] == "0" else 0.0)  # meanwhile the other worker ends samples 1 and 2
    return [job["id"]]

workers.evaluate_sample = sample
signal.signal(signal.{name}, workers._stop)  # as evaluate.main does (workers.stop_signals)
done = workers.run_jobs(None, None, [({{"id": str(i)}},) for i in range(3)], 2)
try:
    for rows in done:
        os.killpg(0, signal.{name})  # both workers wait for a job, and no job is left
        time.sleep(60)
except KeyboardInterrupt as stop:
    done.close()
    print(stop.code, len(multiprocessing.active_children()))
"""


@pytest.mark.parametrize("name, code", [("SIGHUP", 129), ("SIGTERM", 143)])
def test_a_stop_sent_to_the_group_while_the_workers_wait_for_a_job_ends_the_run(name, code):
    """A closed terminal (SIGHUP) or a scheduler (SIGTERM) signals every process of the group. A worker
    that it ends while it waits for a job must not leave the parent waiting on it: with
    multiprocessing.Pool it kept the job queue's lock, and the pool's shutdown waited forever (CI saw
    it once in the end-to-end test above; here the timing is fixed so that both workers wait)."""
    p = subprocess.run(
        [sys.executable, "-c", IDLE_WORKERS.format(name=name)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
    )
    assert p.returncode == 0 and p.stdout.split() == [str(code), "0"], p.stderr


@pytest.mark.parametrize(
    "sig, raised", [(signal.SIGKILL, workers.WorkerLost), (signal.SIGTERM, workers.Stop)]
)
def test_a_worker_ended_mid_sample_is_said_not_waited_on(sig, raised, monkeypatch, deadline):
    """A worker killed mid-sample (the OOM killer's SIGKILL; a SIGTERM sent to it alone) ends run_jobs
    with WorkerLost naming the sample, or as a stop of the run, never a wait: no worker is left."""

    def sample(model, tok, job, calibration=None):
        if job["id"] == "1":
            os.kill(os.getpid(), sig)
        return [job["id"]]

    monkeypatch.setattr(workers, "evaluate_sample", sample)
    got = []
    with pytest.raises(raised) as err:
        for rows in workers.run_jobs(None, None, worker_jobs(3), 2):
            got += rows
    if raised is workers.Stop:  # at once, as the parent's own handler stops the run
        assert got in ([], ["0"]) and err.value.code == 143
    else:  # in its turn: sample 0, before it, is yielded (and saved)
        assert got == ["0"]
        assert (
            str(err.value)
            == "the worker process decoding sample 1 ended (killed by SIGKILL) without its rows"
        )
    assert multiprocessing.active_children() == []


def test_workers_yield_in_job_order_and_raise_a_sample_s_exception(monkeypatch, deadline):
    """Later samples that finish first wait for the earlier ones; a worker's exception is raised in the
    parent in its turn (after the samples before it), with its type and text, as if it ran there."""

    def sample(model, tok, job, calibration=None):
        i = int(job["id"])
        time.sleep(0.1 * (4 - i))  # sample 3 first, sample 0 last
        if i == 4:
            raise ValueError("sample 4 is malformed")
        return [job["id"]]

    monkeypatch.setattr(workers, "evaluate_sample", sample)
    assert list(workers.run_jobs(None, None, worker_jobs(4), 2)) == [["0"], ["1"], ["2"], ["3"]]
    got = []
    with pytest.raises(ValueError, match="^sample 4 is malformed$"):
        for rows in workers.run_jobs(None, None, worker_jobs(5), 2):
            got += rows
    assert got == ["0", "1", "2", "3"] and multiprocessing.active_children() == []


def test_a_worker_killed_by_the_oom_killer_is_one_line_and_the_run_resumes(
    ckpt, tmp_path, capsys, monkeypatch, deadline
):
    """Sample 1's worker is killed (SIGKILL, as by the OOM killer) once sample 0 is saved: one line that
    names the sample, what is saved and what to do; the same command then finishes the run."""
    out = tmp_path / "oom"
    real = workers.evaluate_sample

    def sample(model, tok, job, *rest, **kw):
        if job["id"] == "1":
            while not (out / "samples.jsonl").exists():
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(model, tok, job, *rest, **kw)

    monkeypatch.setattr(workers, "evaluate_sample", sample)
    argv = ["--model", ckpt, *QUICK, "--workers", "2", "--out", out]
    rc, err = run_main(argv, capsys)
    assert rc == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (
        f"error: the worker process decoding sample 1 ended (killed by SIGKILL) without its rows: 1 of 2 "
        f"samples are saved in {out}; if the machine ran out of memory, give fewer --workers, then run the "
        "same command again"
    ), err
    monkeypatch.setattr(workers, "evaluate_sample", real)
    rc, err = run_main(argv, capsys)
    assert rc == 0 and "skipped 1 of 2 samples: finished" in err, err
    assert {r["sample"] for r in results.read_rows(out)} == {"0", "1"}


# ---------------------------------------------------------------------------- strict JSON


def test_summary_json_is_strict_json_when_a_configuration_shares_no_sample_with_full(base):
    """full attention on sample 0 only, the oracle on sample 1 only (a resumed run with other --methods):
    no retention (None), and summary.json holds no NaN that a strict JSON reader would refuse."""
    rows = [r for r in results.read_rows(base) if (r["method"] == "full") == (r["sample"] == "0")]
    summary = results.summarize([dict(r, fact_accuracy=0.5) for r in rows])
    assert [s["retention"] for s in summary] == [1.0, None]
    text = json.dumps(results.strict_json(summary), allow_nan=False)
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))


# ---------------------------------------------------------------------------- issue 30: no silently wrong number
# What looked right and was not: a checkpoint changed between a run and its resume, one sample called
# significant, a gold answer cut without a word, InfiniGen's calibration of another model, claims that
# went on past a damaged folder, options that did nothing, convert_gguf.py taking --help for a folder,
# messages that named the wrong thing, lab checks that blamed the student for a missing model.

SMALL_SAMPLE = {  # a Text2JSON sample short enough for a model of 1024 positions (byte-level tokenizer)
    "problem": "Alice is 30 and lives in Oslo. Bob is 41 and lives in Rome. List the people as JSON.",
    "answer": json.dumps(
        [dict(name="Alice", age="30", city="Oslo"), dict(name="Bob", age="41", city="Rome")]
    ),
}


@pytest.fixture(scope="module")
def models30(ckpt, tmp_path_factory):
    """The tiny checkpoints issue 30 needs besides `ckpt` (2 layers, head_dim 16, 4096 positions)."""
    root = tmp_path_factory.mktemp("models30")
    make = lambda name, **kw: make_tiny_checkpoint("LlamaForCausalLM", root / name, **kw)[0]
    return dict(
        deep=make("deep", num_hidden_layers=4, max_position_embeddings=4096),  # InfiniGen selects in 2 of 4
        short=make("short", num_hidden_layers=4, max_position_embeddings=1024),  # < its calibration text
        narrow=make("narrow", hidden_size=16, max_position_embeddings=4096),  # head_dim 4: LRQK's rank 0
        other=make("other", seed=1, max_position_embeddings=4096),  # ckpt's shapes, other weights
    )


@pytest.fixture(scope="module")
def swapped(ckpt, models30, tmp_path_factory):
    """A copy of ckpt in its own folder, run (shard 0/2 into `before`), then its weights replaced in place
    by another checkpoint's (same shapes) and run again (shard 1/2 into `after`): (folder, before, after)."""
    root = tmp_path_factory.mktemp("swapped")
    model_dir = shutil.copytree(ckpt, root / "model")
    run = lambda shard, out: evaluate.main(
        ["--model", str(model_dir), *QUICK, "--workers", "1", "--shard", shard, "--out", str(out)]
    )
    assert run("0/2", root / "before") == 0
    shutil.copy(models30["other"] / "model.safetensors", model_dir / "model.safetensors")
    assert run("1/2", root / "after") == 0
    return model_dir, root / "before", root / "after"


def needle_data():
    if not (tasks.NEEDLE_DIR / "needles.jsonl").is_file():
        pytest.skip(f"no NeedleBench data in {tasks.NEEDLE_DIR}")


def damaged_needle_folder(ctx):
    needle_data()
    (ctx.out / "needle").mkdir(parents=True)
    (ctx.out / "needle" / "samples.jsonl").write_text("not json\n")
    return ctx.claims


def busy_claims_folder(ctx):
    ctx.hold(ctx.out)  # a claims run that has started on OUT
    return ctx.claims


def busy_needle_folder(ctx):
    needle_data()
    ctx.hold(ctx.out / "needle")  # a run (or a claims run in its needle part) writing OUT/needle
    return ctx.claims


def no_calibration_text(ctx):
    ctx.monkeypatch.setattr(skew, "CALIBRATION_TEXT", ctx.tmp / "calibration.txt")
    return ["--model", ctx.models["deep"], *QUICK, "--methods", "full,infinigen"]


def empty_calibration_text(ctx):
    (ctx.tmp / "calibration.txt").write_text("")
    return no_calibration_text(ctx)


def bad_bytes_on_line_2(ctx):
    (ctx.tmp / "bad.jsonl").write_bytes(json.dumps(SMALL_SAMPLE).encode() + b'\n{"problem": "x\xff"}\n')
    return ["--model", ctx.ckpt, *QUICK, "--n", "1", "--data", ctx.tmp / "bad.jsonl"]


def dangling_out(ctx):
    ctx.out.symlink_to(ctx.tmp / "gone" / "results")
    return ["--model", ctx.ckpt, *QUICK]


def short_model_with_infinigen(ctx):
    (ctx.tmp / "small.jsonl").write_text(json.dumps(SMALL_SAMPLE) + "\n")
    argv = ["--model", ctx.models["short"], *QUICK, "--n", "1", "--data", ctx.tmp / "small.jsonl"]
    return argv + ["--methods", "full,infinigen"]


SILENTLY_WRONG = [
    # (issue item: the case, what the command is given (a list, or a function of the test's context),
    #  the one line it must print, the folder that must stay byte for byte as it was)
    (
        "1: weights replaced in the --model folder, then the run resumed",
        lambda ctx: ["--model", ctx.swapped[0], *QUICK, "--shard", "0/2", "--out", ctx.copy(ctx.swapped[1])],
        "OUT holds results made with checkpoint='",
        "OUT",
    ),
    (
        "1: merge of a run before and a run after the weights were replaced",
        lambda ctx: ["merge", ctx.swapped[1], ctx.swapped[2], "--out", ctx.out],
        "AFTER was run with checkpoint='",
        "AFTER",
    ),
    (
        "5: claims on a damaged NeedleBench folder",
        damaged_needle_folder,
        "OUT/needle/samples.jsonl:1: not valid JSON",
        "OUT",
    ),
    (
        "5: a second claims on the same --out",
        busy_claims_folder,
        "OUT is in use by another evaluate.py",
        "OUT",
    ),
    ("5: claims while a run writes OUT/needle", busy_needle_folder, "OUT/needle is in use by another", "OUT"),
    (
        "6: --outliers without a shadowkv method",
        ["--model", "CKPT", *QUICK, "--outliers", "48"],
        "--outliers sets the outlier chunks of shadowkv, and no method of --methods full,oracle keeps them",
        None,
    ),
    (
        "6: LRQK on head_dim 4, where its rank (1/8) rounds to 0",
        ["--model", "NARROW", *QUICK, "--methods", "full,lrqk"],
        "the lrqk policy's rank, 0.125 of the model's head_dim 4, rounds to 0: LRQK needs a head_dim of at "
        "least 5: drop lrqk from --methods",
        None,
    ),
    (
        "4: InfiniGen on a model whose every layer is dense",
        ["--model", "CKPT", *QUICK, "--methods", "full,infinigen"],
        "the infinigen policy attends every token in its first 2 layers, and the model has 2: it would be "
        "full attention under another name: drop infinigen from --methods",
        None,
    ),
    (
        "4: InfiniGen on a model of fewer positions than its calibration text",
        short_model_with_infinigen,
        "InfiniGen cannot calibrate this model: it reads 2048 tokens of its calibration text "
        "(calibration.txt, at most 2048), more than the model's 1024 positions: drop infinigen",
        None,
    ),
    (
        "4: calibration.txt missing",
        no_calibration_text,
        "InfiniGen's calibration text TMP/calibration.txt cannot be read (No such file or directory)",
        None,
    ),
    (
        "4: calibration.txt empty",
        empty_calibration_text,
        "InfiniGen's calibration text TMP/calibration.txt is empty",
        None,
    ),
    (
        "8: bad bytes on line 2 of --data",
        bad_bytes_on_line_2,
        "TMP/bad.jsonl:2: not UTF-8 text (a binary file?)",
        None,
    ),
    (
        "8: --out a symbolic link to nothing",
        dangling_out,
        "OUT is a symbolic link to TMP/gone/results, which does not exist: create that folder",
        None,
    ),
    (
        "8: --task needle --tokens 512, too short for the needles",
        lambda ctx: needle_data() or ["--model", ctx.ckpt, *QUICK, "--task", "needle", "--tokens", "512"],
        "--tokens 512: a 512-token NeedleBench prompt is too short for 11 needles and their questions (",
        None,
    ),
    (
        "8: --tokens 512, too short for the tokenizer's records",
        ["--model", "CKPT", *QUICK, "--tokens", "512"],
        "--tokens 512: a 512-token Text2JSON prompt is too short for this tokenizer: its 3 records and 2 other "
        "names alone take",
        None,
    ),
]


@pytest.mark.parametrize("case, given, line, watched", SILENTLY_WRONG, ids=[c[0] for c in SILENTLY_WRONG])
def test_what_looked_right_and_was_not_is_one_line_before_any_work(
    case, given, line, watched, ckpt, models30, swapped, tmp_path, capsys, monkeypatch
):
    """Each case stops before any model is loaded, with one line that names what to fix, and leaves
    every results folder it was given as it was."""
    holders = []
    ctx = Namespace(
        tmp=tmp_path,
        out=tmp_path / "out",
        ckpt=ckpt,
        models=models30,
        swapped=swapped,
        monkeypatch=monkeypatch,
        copy=lambda folder: shutil.copytree(folder, tmp_path / "out"),
        hold=lambda folder: holders.append(hold_lock(folder)),
        claims=[
            "claims",
            "--model",
            ckpt,
            "--n",
            "2",
            "--tokens",
            "3000",
            "--max-new-tokens",
            "4",
        ],  # needles fit
    )
    names = {"OUT": ctx.out, "TMP": tmp_path, "CKPT": ckpt, "NARROW": models30["narrow"], "AFTER": swapped[2]}
    fill = lambda text: [text := str(text).replace(k, str(v)) for k, v in names.items()][-1]
    try:
        argv = [fill(a) for a in (given(ctx) if callable(given) else given)]
        if argv[0] != "merge" and "--out" not in argv:
            argv += ["--out", ctx.out]
        folder = Path(fill(watched)) if watched else None
        files = lambda: {
            f: f.read_bytes() for f in folder.rglob("*") if f.is_file() and f.name != results.LOCK_NAME
        }
        before = files() if folder else None

        def forbidden(*a, **k):
            raise AssertionError("the case must stop before any model is loaded")

        monkeypatch.setattr(evaluate, "load_model", forbidden)
        rc, err = run_main(argv, capsys)
        if (
            argv[0] == "claims"
        ):  # claims says what it leaves out as it checks both runs: those lines, then the error
            said = err.strip().splitlines()
            assert all(x.startswith(("warning: ", "claims: ")) for x in said[:-1]), err
            err = said[-1] + "\n"
        one_line_error(rc, err, fill(line))
        if folder:
            assert files() == before
    finally:
        for p in holders:
            p.kill()
            p.wait()


def rows_of_samples(base, values):
    """samples.jsonl rows of `base`'s sample 0, one per configuration and sample: values {method: [fact
    accuracy per sample]} (the samples numbered 0, 1, ...)."""
    rows = [r for r in results.read_rows(base) if r["sample"] == "0"]
    return [dict(r, sample=str(i), fact_accuracy=v) for r in rows for i, v in enumerate(values[r["method"]])]


@pytest.mark.parametrize("n", [1, 3])
def test_too_few_samples_give_no_interval_and_no_star(n, base):
    """2: one sample made a 95% interval of zero width and marked any difference `*`; below MIN_SAMPLES a
    bootstrap interval is the range of the samples. Now no interval, no star, and the note says why."""
    rows = rows_of_samples(base, {"full": [0.5, 0.6, 0.7][:n], "oracle": [0.3, 0.4, 0.5][:n]})
    summary = results.summarize(rows)
    oracle = next(r for r in summary if r["method"] == "oracle")
    assert oracle["ci"]["fact_accuracy"] is None and oracle["ci"]["retention"] is None
    d, lo, hi = oracle["vs_full"]["fact_accuracy"]
    assert d == pytest.approx(-0.2) and lo is None and hi is None
    assert results._vs(oracle, "vs_full", "fact_accuracy", ".3f") == "-0.200"  # no interval, no *
    table = results.markdown_table(summary, "text2json")
    assert "*" not in table and "[" not in table
    notes = results.table_notes(summary, json.loads((base / "run.json").read_text()))
    assert notes[0].startswith(
        f"No 95% interval and no *: {n} sample{'s' * (n > 1)}, and a bootstrap interval needs"
    )


def test_a_claim_needs_at_least_min_samples(base):
    """2: `claims --n 1` decided claims from one sample; every rule now names the minimum, and a claim
    on fewer samples is inconclusive, saying why."""
    configs = claims.configurations()
    ev = claims.Evidence(
        {
            "text2json": [
                dict(key=configs["text2json"][m].key(), sample="0", fact_accuracy=v)
                for m, v in (("full", 0.7), ("shadowkv", 0.2))
            ]
        },  # fmt: skip
        configs,
    )
    found = claims.claim_shadowkv_loses(ev)
    assert found.verdict == claims.INCONCLUSIVE
    assert (
        found.reason
        == "1 text2json sample with a result for shadowkv, full: a claim needs at least 4 (run more with --n)"
    )
    for rule in (claims.RULE_LOSS, claims.RULE_CLOSE, claims.RULE_TREND, claims.RULE_RETRIEVAL):
        assert rule.endswith(f"inconclusive too with fewer than {results.MIN_SAMPLES} samples that have a result "
                             "for every configuration compared (below that the interval is the range of the "
                             "samples, and one sample's has zero width)")  # fmt: skip


def test_a_gold_answer_cut_by_max_new_tokens_is_said(ckpt, tmp_path, capsys):
    """3: --max-new-tokens shorter than the gold answer cut the gold-forced rows silently: the fact
    accuracy of a prefix, or no column at all. Now one line at the start, a note at the end and in
    summary.md with how many fact tokens were left out, and each row counts them."""
    out = tmp_path / "cut"
    rc, err = run_main(["--model", ckpt, *QUICK, "--n", "1", "--workers", "1", "--out", out], capsys)
    assert rc == 0, err
    rows = results.read_rows(out)
    cut = {r["fact_tokens_cut"] for r in rows}
    assert len(cut) == 1 and cut.pop() > 0 and {r["fact_tokens"] for r in rows} == {0}
    left_out = rows[0]["fact_tokens_cut"]
    lines = err.splitlines()
    assert lines[0].startswith("warning: max_new_tokens=4 is shorter than the longest gold answer (")
    note = (
        f"fact accuracy leaves out {left_out} of the {left_out} fact tokens of the gold answers (1 of 1 samples): "
        "the gold-forced rows stop after max_new_tokens=4 tokens"
    )
    assert any(line.startswith("note: " + note) for line in lines), err
    md = (out / "summary.md").read_text()
    assert f"- {note}" in md
    assert "- fact_vs_depth.png: skipped, no fact token was scored: max_new_tokens cut them all" in md


def test_claims_say_a_cut_answer_not_a_missing_result():
    """3: `claims` said "no needle result" where the needle rows existed and every fact was cut."""
    configs = claims.configurations()
    t2j = [dict(key=configs["text2json"][m].key(), sample=str(i), fact_accuracy=0.5) for m in ("full", "shadowkv")
           for i in range(4)]  # fmt: skip
    needle = [
        dict(key=configs["needle"][m].key(), sample=str(i), fact_accuracy=None, fact_tokens=0, fact_tokens_cut=11,
             max_new_tokens=4)
        for m in ("full", "shadowkv") for i in range(4)
    ]  # fmt: skip
    found = claims.claim_retrieval_hides_the_loss(
        claims.Evidence({"text2json": t2j, "needle": needle}, configs)
    )
    assert found.verdict == claims.INCONCLUSIVE
    assert found.reason == (
        "the needle rows of shadowkv, full score no fact token: the gold answers were cut at max_new_tokens=4, "
        "leaving out 44 fact tokens (give a larger --max-new-tokens)"
    )


@pytest.fixture
def calibrate(models30, ckpt, tmp_path, monkeypatch):
    """InfiniGen's calibration in a cache folder of its own (tmp_path/cache/infinigen):
    calibrate(name of a models30 checkpoint, or "ckpt", or a (model, tokenizer) pair) -> its dict."""
    monkeypatch.setenv("KVOFFLOAD_CACHE", str(tmp_path / "cache"))
    folders = dict(models30, ckpt=ckpt)

    def calibrate(m, channels=0.2):
        m, tok = model.load_model(folders[m]) if isinstance(m, str) else m
        return skew.calibration(m, tok, channels)

    return calibrate


def test_infinigen_calibration_is_keyed_by_every_weight(calibrate, models30, tmp_path):
    """4: the cache key (config and the first row of each q/k projection) missed a fine-tune of other
    weights, and the base model's skews were used. A change to layer 0's MLP changes every later layer's
    queries: a calibration of its own."""
    base_model, tok = model.load_model(models30["deep"])
    tuned, _ = model.load_model(models30["deep"])
    with torch.no_grad():
        tuned.layers[0].mlp.down_proj.weight.mul_(1.5)  # a fine-tune that leaves every q/k projection alone
    a, b = calibrate((base_model, tok)), calibrate((tuned, tok))
    assert len(list((tmp_path / "cache" / "infinigen").glob("*.pt"))) == 2
    assert not torch.equal(a["skew"][1:], b["skew"][1:])
    assert torch.equal(calibrate((base_model, tok))["skew"], a["skew"])  # read back from its own file


def test_a_folder_where_the_calibration_file_belongs_is_one_line(calibrate, tmp_path):
    """4: a folder at the cache file's place was taken for a damaged file, then failed deep in os.replace."""
    calibrate("deep")
    (path,) = (tmp_path / "cache" / "infinigen").glob("*.pt")
    path.unlink()
    path.mkdir()
    with pytest.raises(ValueError) as err:
        calibrate("deep")
    assert str(err.value).startswith(
        f"{path} is a folder, where InfiniGen's calibration of this model is cached"
    )
    assert "\n" not in str(err.value)


def test_another_models_calibration_file_is_said_and_refitted(calibrate, tmp_path, capsys):
    """4: a calibration file of another model's shapes (copied in, renamed) was used, and failed later in a
    worker naming no file. Now one line names it, and this model's calibration replaces it."""
    own = calibrate("deep")  # 4 layers
    (path,) = (tmp_path / "cache" / "infinigen").glob("*.pt")
    calibrate("ckpt")  # 2 layers
    (other,) = set((tmp_path / "cache" / "infinigen").glob("*.pt")) - {path}
    shutil.copy(other, path)
    capsys.readouterr()
    got = calibrate("deep")
    assert capsys.readouterr().err == (
        f"warning: {path} holds another model's calibration (skews [2, 4, 16, 16], this model's are "
        "[4, 4, 16, 16]): fitting this model's in its place\n"
    )
    assert torch.equal(got["skew"], own["skew"])


def test_a_calibration_decides_the_channels_it_was_fitted_with(calibrate, models30):
    """6: a parameter that a passed calibration overrides (`channels`) did nothing: the mask came from
    the calibration. Now a calibration of other channels is refused, naming both."""
    m, tok = model.load_model(models30["deep"])
    ids = tok.chat([{"role": "user", "content": "word " * 300}])
    cal = calibrate((m, tok))  # channels 0.2
    with pytest.raises(ValueError) as err:
        model.prefill(m, ids, make_policy("infinigen", channels=0.3), calibration=cal)
    assert str(err.value).startswith(
        "the infinigen policy asks for channels=0.3, and the calibration passed was fitted with channels=0.2"
    )


NAN, INF = math.nan, math.inf
BAD_VALUES = [
    # (method, field, value, the one ValueError's words): each was accepted, or a TypeError or
    # OverflowError from deep inside, on 42ddb2d
    ("oracle", "budget", "0.1", "budget '0.1' must be a finite number"),
    ("lrqk", "qk_rank", NAN, "qk_rank nan must be a finite number or None"),
    ("lrqk", "qk_rank", INF, "qk_rank inf must be a finite number or None"),
    ("svd", "rank", NAN, "rank nan must be a finite number or None"),
    ("svd", "rank", INF, "rank inf must be a finite number or None"),
    ("svd", "rank", "0.1", "rank '0.1' must be a finite number or None"),
    ("quantized", "landmark_bits", 2, "landmark_bits 2 must be a string or None"),
    ("oracle", "kv_bits", 4, "kv_bits 4 must be a string or None"),
    ("quantized", "residual_bits", 0.5, "residual_bits 0.5 must be a string"),
    ("arkvale", "resident", "no", "resident 'no' must be True or False"),
    ("paper", "kv_pre_rope", "yes", "kv_pre_rope 'yes' must be True or False"),
    ("oracle", "offload", "no", "offload 'no' must be True or False"),
    ("oracle", "track", 1, "track 1 must be True or False"),
]


@pytest.mark.parametrize(
    "method, name, value, words", BAD_VALUES, ids=[f"{r[1]}={r[2]!r}" for r in BAD_VALUES]
)
def test_make_policy_raises_one_value_error_for_every_bad_value(method, name, value, words):
    with pytest.raises(ValueError) as err:
        make_policy(method, **{name: value})
    assert str(err.value) == words


CONVERT_ARGS = [
    # (issue 30 item 7: what convert_gguf.py is given, its exit code, the first words of what it prints)
    (["--help"], 0, "usage: convert_gguf.py [-h] [OUT_DIR]"),
    (
        ["SmolLM2-135M-Instruct.Q4_1.gguf"],
        2,
        "error: OUT_DIR SmolLM2-135M-Instruct.Q4_1.gguf names a GGUF file",
    ),
    (["a", "b"], 2, "error: unrecognized arguments: b (usage: convert_gguf.py [-h] [OUT_DIR])"),
    (["--force"], 2, "error: unrecognized arguments: --force (usage: convert_gguf.py [-h] [OUT_DIR])"),
]


@pytest.mark.parametrize("argv, code, first", CONVERT_ARGS, ids=[" ".join(c[0]) for c in CONVERT_ARGS])
def test_convert_gguf_has_a_real_argument_parser(argv, code, first, tmp_path, capsys, monkeypatch):
    """7: `convert_gguf.py --help` converted the default model into a 517 MB folder named --help, and a
    .gguf argument was taken as the output folder. Nothing is converted, nothing is written."""
    monkeypatch.chdir(tmp_path)

    def forbidden(*a, **k):
        raise AssertionError("nothing may be converted")

    monkeypatch.setattr(convert_gguf, "convert", forbidden)
    monkeypatch.setattr(convert_gguf, "find_gguf", forbidden)
    assert convert_gguf.main(argv) == code
    printed = capsys.readouterr()
    text = printed.out if code == 0 else printed.err
    assert text.startswith(first) and "Traceback" not in printed.err, printed
    if code:
        assert printed.err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_model_py_says_when_the_answer_stops_at_the_models_positions(models30, capsys):
    """8: model.py stopped at the model's positions without a note."""
    rc = model.main(["--model", str(models30["short"]), "--prompt", "word " * 200, "--max-new-tokens", "100"])
    err = capsys.readouterr().err
    prompt = int(err.split("(a ")[-1].split("-token prompt)")[0]) if "-token prompt)" in err else None
    assert rc == 0 and prompt, err
    assert err == (
        f"note: the answer stopped after {1024 - prompt + 1} new tokens, at the model's 1024 positions "
        f"(a {prompt}-token prompt), before --max-new-tokens 100\n"
    )


# ---------------------------------------------------------------------------- issue 30 item 10: the authors' details


def test_arkvale_counts_its_pages_up():
    """ArkVale's fork selects P = max(1, ceil(budget * T / 16)) pages (PAPER.md "ArkVale"): at the default
    run's 2117-token prompts 3.125% is 66.2 tokens, 5 pages, where rounding down gave 4."""
    split = split_budget(make_policy("arkvale"), 2117)
    assert (split.selected, split.k_chunks) == (80, 5)
    assert split_budget(make_policy("mean"), 2117).selected == 64  # the others keep int(budget * T)


def test_lrqk_rank_follows_the_architecture(tmp_path):
    """The authors run LRQK at rank head_dim / 8 on Llama and head_dim / 4 on Qwen3 (PAPER.md "LRQK"):
    the tiny Llama has head_dim 16, the tiny Qwen3 32."""
    ranks = {}
    for arch in ("LlamaForCausalLM", "Qwen3ForCausalLM"):
        path, _ = make_tiny_checkpoint(arch, tmp_path / arch)
        m, tok = model.load_model(path)
        ids = tok.chat([{"role": "user", "content": "word " * 300}])
        cache, _ = model.prefill(m, ids, make_policy("lrqk"))
        ranks[arch] = {st.marks.shape[2] for st in cache.layers}
    assert ranks == {"LlamaForCausalLM": {16 // 8}, "Qwen3ForCausalLM": {32 // 4}}


def test_infinigen_calibration_text_is_what_skew_py_says():
    """skew.py said its calibration text is 2,048 tokens; it is 1,551 tokens of the default model, all read."""
    m, tok = model.load_model()
    ids = skew.calibration_ids(tok)
    assert len(ids) == 1551 < skew.CALIBRATION_TOKENS
    assert len(skew.cache_key(m, ids, 0.2)) == 16  # its embedding (28M values) sampled to the last one
    assert "1,551 tokens of the default model, so that model reads all of it" in " ".join(
        skew.__doc__.split()
    )
