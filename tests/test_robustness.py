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

import convert_gguf
import evaluate
import model
import results
import text2json
from conftest import make_tiny_checkpoint
from kvcache import make_policy
from model import default_model_path, load_tokenizer

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
    longproc = evaluate.score_sample("longproc", "x", {"gold": "a\tb\n1\t2\n"})
    text2json = evaluate.score_sample("text2json", "x", {"gold": '[{"name": "a"}]'})
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
import evaluate

def sample(model, tok, job, calibration=None):
    time.sleep(1.0 if job["id"] == "0" else 0.0)  # meanwhile the other worker ends samples 1 and 2
    return [job["id"]]

evaluate.evaluate_sample = sample
signal.signal(signal.{name}, evaluate._stop)  # as evaluate.main does
done = evaluate.run_jobs(None, None, [({{"id": str(i)}},) for i in range(3)], 2)
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
    "sig, raised", [(signal.SIGKILL, evaluate.WorkerLost), (signal.SIGTERM, evaluate.Stop)]
)
def test_a_worker_ended_mid_sample_is_said_not_waited_on(sig, raised, monkeypatch, deadline):
    """A worker killed mid-sample (the OOM killer's SIGKILL; a SIGTERM sent to it alone) ends run_jobs
    with WorkerLost naming the sample, or as a stop of the run, never a wait: no worker is left."""

    def sample(model, tok, job, calibration=None):
        if job["id"] == "1":
            os.kill(os.getpid(), sig)
        return [job["id"]]

    monkeypatch.setattr(evaluate, "evaluate_sample", sample)
    got = []
    with pytest.raises(raised) as err:
        for rows in evaluate.run_jobs(None, None, worker_jobs(3), 2):
            got += rows
    if raised is evaluate.Stop:  # at once, as the parent's own handler stops the run
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

    monkeypatch.setattr(evaluate, "evaluate_sample", sample)
    assert list(evaluate.run_jobs(None, None, worker_jobs(4), 2)) == [["0"], ["1"], ["2"], ["3"]]
    got = []
    with pytest.raises(ValueError, match="^sample 4 is malformed$"):
        for rows in evaluate.run_jobs(None, None, worker_jobs(5), 2):
            got += rows
    assert got == ["0", "1", "2", "3"] and multiprocessing.active_children() == []


def test_a_worker_killed_by_the_oom_killer_is_one_line_and_the_run_resumes(
    ckpt, tmp_path, capsys, monkeypatch, deadline
):
    """Sample 1's worker is killed (SIGKILL, as by the OOM killer) once sample 0 is saved: one line that
    names the sample, what is saved and what to do; the same command then finishes the run."""
    out = tmp_path / "oom"
    real = evaluate.evaluate_sample

    def sample(model, tok, job, *rest, **kw):
        if job["id"] == "1":
            while not (out / "samples.jsonl").exists():
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(model, tok, job, *rest, **kw)

    monkeypatch.setattr(evaluate, "evaluate_sample", sample)
    argv = ["--model", ckpt, *QUICK, "--workers", "2", "--out", out]
    rc, err = run_main(argv, capsys)
    assert rc == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (
        f"error: the worker process decoding sample 1 ended (killed by SIGKILL) without its rows: 1 of 2 "
        f"samples are saved in {out}; if the machine ran out of memory, give fewer --workers, then run the "
        "same command again"
    ), err
    monkeypatch.setattr(evaluate, "evaluate_sample", real)
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
