"""evaluate.py end to end on a tiny random-weight model: files, schema, the lockstep decode against
plain per-policy decoding, resume, shard + merge, and one-line errors on bad input."""

import json
import shutil

import matplotlib
import pytest
import torch

import evaluate
import results
import text2json
import workers
from conftest import make_tiny_checkpoint
from kvcache import FullCache, from_prefill
from model import generate, load_model
from policy import OUTLIER_SHARE, POLICIES, Exact, Keys, Policy, Select, from_params, make_policy

ISSUE_METRICS = (
    "text2json_score",
    "field_recall",
    "agreement",
    "kl",
    "oracle_recall",
    "attention_mass",
    "device_kv_fraction",
    "bytes_per_step",
)
N, TOKENS, MAX_NEW = 2, 2048, 6
FULL = make_policy("full").key()  # full attention's configuration key
# every policy, two budgets, two chunk sizes and two landmark formats: each plot axis but rank is swept
SVD_KEY = "svd r0.15625 @0.0625"  # ShadowKV's rank share, 160 of 1024 channels
SWEEP = [
    "--n",
    str(N),
    "--tokens",
    str(TOKENS),
    "--max-new-tokens",
    str(MAX_NEW),
    "--methods",
    "full,oracle,shadowkv,mean,quantized,svd",
    "--budgets",
    "0.03125,0.0625",
    "--chunk-sizes",
    "1,8",
    "--bits",
    "2,4",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from threads, and on a shared, busy machine OpenMP threads that
    wait for each other make every small op slow (measured: 7 minutes instead of 40 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # byte-level tokenizer: a 2048-token prompt is ~2048 bytes; room for prompt + chat format
    path, _ = make_tiny_checkpoint(
        "LlamaForCausalLM", tmp_path_factory.mktemp("ckpt") / "llama", max_position_embeddings=4096
    )
    return path


def run_main(argv, capsys):
    rc = evaluate.main([str(a) for a in argv])
    err = capsys.readouterr().err
    return rc, err


@pytest.fixture(scope="module")
def base(ckpt, tmp_path_factory):
    """One unsharded run of the sweep; the other tests compare against its folder."""
    out = tmp_path_factory.mktemp("runs") / "base"
    assert evaluate.main(["--model", str(ckpt), *SWEEP, "--out", str(out)]) == 0
    return out


@pytest.fixture
def no_plots(monkeypatch):
    """Plots are checked once (test_files_and_schema); elsewhere they only cost time."""
    monkeypatch.setattr(results, "make_plots", lambda out, summary: [])


def name_of(r):
    """A row of samples.jsonl or summary.json by its label and budget: 'mean c8 @0.03125', or 'full'."""
    return r["label"] if r["budget"] is None else f"{r['label']} @{r['budget']:g}"


def policy_name(p):
    return p.label() if not p.sparse else f"{p.label()} @{p.select.budget:g}"


def rows_by_key(out):
    return {(name_of(r), r["sample"]): r for r in results.read_rows(out)}


def test_files_and_schema(base, ckpt):
    for name in (
        "samples.jsonl",
        "summary.json",
        "summary.md",
        "run.json",
        "vs_budget.png",
        "vs_chunk_size.png",
        "vs_bits.png",
        "recall_per_layer.png",
    ):
        assert (base / name).is_file(), name
    assert not (base / "vs_rank.png").exists()  # one rank only: skipped, and the summary says so
    assert "vs_rank.png: skipped" in (base / "summary.md").read_text()

    summary = json.loads((base / "summary.json").read_text())
    keys = [r["key"] for r in summary]
    # full 1, oracle 2 budgets, shadowkv 2, svd 2, mean 2 chunks x 2, quantized 2 chunks x 2 bits x 2
    assert len(keys) == len(set(keys)) == 1 + 2 + 2 + 2 + 4 + 8
    rows = results.read_rows(base)
    assert len(rows) == len(keys) * N and len({(r["key"], r["sample"]) for r in rows}) == len(rows)
    n_layers = json.loads((ckpt / "config.json").read_text())["num_hidden_layers"]
    for r in summary:
        for f in results.CONFIG_FIELDS + ISSUE_METRICS:
            assert f in r, (r["key"], f)
        assert r["n"] == N and r["text2json_score"] == r["score"] and 0 <= r["score"] <= 100
        if r["method"] == "full":
            assert r["agreement"] == 1.0 and r["kl"] == 0.0 and r["bytes_per_step"] == 0.0
            continue
        assert r["sparse_share"] == 1.0, "the prompts are long enough for every budget: no fallback"
        assert 0 <= r["agreement"] <= 1 and r["kl"] >= 0
        assert 0 <= r["oracle_recall"] <= 1 and 0 < r["attention_mass"] <= 1 + 1e-6
        assert len(r["recall_per_layer"]) == n_layers and r["bytes_per_step"] > 0
    by = {name_of(r): r for r in summary}
    for b in ("0.03125", "0.0625"):
        # the oracle selects the exact top-k, so its recall is 1 by construction (stats wired to the forced row)
        assert by[f"oracle @{b}"]["oracle_recall"] == pytest.approx(1.0)
        # 2-bit landmarks take less device memory than 4-bit ones, which take less than exact keys
        assert (
            by[f"quantized 2b @{b}"]["device_kv_fraction"]
            < by[f"quantized 4b @{b}"]["device_kv_fraction"]
            < by[f"oracle @{b}"]["device_kv_fraction"]
        )
    assert (
        by["oracle @0.0625"]["bytes_per_step"] > by["oracle @0.03125"]["bytes_per_step"]
    )  # twice the selection
    table = (base / "summary.md").read_text()
    assert all(f"| {r['label']} |" in table for r in summary)


def test_kv_bits_run(base, ckpt, tmp_path, capsys, no_plots):
    """--kv-bits: the same policies with their offloaded K/V quantized, as their own table rows."""
    out = tmp_path / "kv4"
    argv = [
        "--model",
        ckpt,
        "--n",
        1,
        "--tokens",
        TOKENS,
        "--max-new-tokens",
        MAX_NEW,
        "--methods",
        "full,oracle",
        "--kv-bits",
        "4",
        "--out",
        out,
    ]
    assert run_main(argv, capsys)[0] == 0
    by = {name_of(r): r for r in json.loads((out / "summary.json").read_text())}
    assert set(by) == {"full", "oracle kv4 @0.03125"} and by["oracle kv4 @0.03125"]["kv_bits"] == "4"
    (row,) = [r for r in results.read_rows(out) if r["method"] == "oracle"]
    exact = rows_by_key(base)["oracle @0.03125", row["sample"]]  # the same sample, K/V offloaded exact
    # per row of 16 channels: 4-bit codes (8 bytes) + a 16-bit scale instead of 16 float32 values (64 bytes)
    assert exact["bytes_per_step"] / row["bytes_per_step"] == pytest.approx(64 / 10)


@torch.inference_mode()
def test_lockstep_decode_matches_one_policy_at_a_time(base, ckpt):
    """The step loop (one prefill, every configuration from it) against plain decoding of each policy on
    its own: same full-attention output, same free-run predictions, same gold-forced agreement and KL."""
    model, tok = load_model(ckpt)
    rows = rows_by_key(base)
    for i, sample in enumerate(text2json.generate(N, TOKENS, tok, seed=0)):
        ids = tok.chat([{"role": "user", "content": sample["problem"]}])
        ref = generate(model, ids, MAX_NEW, stop_ids=tok.stop_ids)
        assert rows[("full", str(i))]["prediction"] == tok.decode(ref)
        gold = text2json.fact_tokens(sample["answer"], tok)[0][:MAX_NEW]
        for key in ("mean c8 @0.03125", "quantized 2b @0.0625", "shadowkv @0.03125"):
            name = key.split()[0]
            kw = (
                dict(chunk_size=8)
                if name == "mean"
                else dict(landmark_bits="2")
                if name == "quantized"
                else {}
            )
            if name == "shadowkv":  # generated short prompts: evaluate scales ShadowKV's 48 outlier chunks
                kw = dict(outliers=OUTLIER_SHARE)
            policy = make_policy(name, budget=float(key.split("@")[1]), **kw)
            free = generate(model, ids, MAX_NEW, stop_ids=tok.stop_ids, policy=policy)
            assert rows[(key, str(i))]["prediction"] == tok.decode(free), (key, i)
            # gold forcing: both fed the gold answer, one decode step per gold token but the last
            prefill = FullCache(model.config.n_layers)
            model(torch.tensor([ids]), prefill, last_only=True)
            caches = [from_prefill(prefill, p, model.rope) for p in (make_policy("full"), policy)]
            hits, kl = 0, 0.0
            for x in gold[:-1]:
                p_full, p_pol = (torch.log_softmax(model(torch.tensor([[x]]), c)[0, -1], -1) for c in caches)
                hits += int(p_full.argmax()) == int(p_pol.argmax())
                kl += float((p_full.exp() * (p_full - p_pol)).sum())
            steps = len(gold) - 1
            assert rows[(key, str(i))]["steps"] == steps
            assert rows[(key, str(i))]["agreement"] == pytest.approx(hits / steps), (key, i)
            assert rows[(key, str(i))]["kl"] == pytest.approx(kl / steps, rel=1e-3, abs=1e-6), (key, i)


def test_resume_skips_finished_work(base, ckpt, tmp_path, capsys, monkeypatch, no_plots):
    out = tmp_path / "resumed"
    shutil.copytree(base, out)
    before = (out / "samples.jsonl").read_bytes()
    mtime = (out / "samples.jsonl").stat().st_mtime_ns

    def no_model(*a, **k):
        raise AssertionError("a finished run must not load the model")

    real_load = evaluate.load_model
    monkeypatch.setattr(evaluate, "load_model", no_model)
    rc, err = run_main(["--model", ckpt, *SWEEP, "--out", out], capsys)
    assert rc == 0 and f"skipped {N} of {N} samples" in err
    assert (out / "samples.jsonl").read_bytes() == before and (
        out / "samples.jsonl"
    ).stat().st_mtime_ns == mtime
    monkeypatch.setattr(evaluate, "load_model", real_load)

    # an interrupted run: sample 1 missing entirely, one configuration of sample 0 missing
    kept = [
        r
        for r in results.read_rows(out)
        if r["sample"] != "1" and (name_of(r), r["sample"]) != (SVD_KEY, "0")
    ]
    results.write_rows(out, kept)
    calls = []
    real = workers.evaluate_sample  # what a worker calls for each sample
    monkeypatch.setattr(
        workers,
        "evaluate_sample",
        lambda model, tok, s, ps, *a, **k: (
            calls.append((s["id"], [policy_name(p) for p in ps])) or real(model, tok, s, ps, *a, **k)
        ),
    )
    # one in-process worker, so the calls are seen here; the base run used two worker processes, so
    # the comparison below also checks that a sample's results do not depend on the worker
    rc, err = run_main(["--model", ckpt, *SWEEP, "--out", out, "--workers", "1"], capsys)
    assert rc == 0 and "skipped" not in err  # both samples have work left: sample 0 one configuration
    assert calls == [("0", [SVD_KEY]), ("1", list(calls[1][1]))] and len(calls[1][1]) == 19
    got, want = rows_by_key(out), rows_by_key(base)
    assert got.keys() == want.keys()
    # every row is its own forward, with one thread: identical results whatever else runs, even the svd
    # configuration of sample 0, decoded this time with full attention alone
    assert got == want

    # a resumed folder refuses other settings instead of mixing results
    rc, err = run_main(["--model", ckpt, *SWEEP, "--seed", "1", "--out", out], capsys)
    assert rc == 2 and "seed" in err and len(err.strip().splitlines()) == 1


def test_shards_merge_to_the_unsharded_run(base, ckpt, tmp_path, capsys, no_plots):
    for i in range(2):
        rc, _ = run_main(["--model", ckpt, *SWEEP, "--shard", f"{i}/2", "--out", tmp_path / f"s{i}"], capsys)
        assert rc == 0
    assert {r["sample"] for r in results.read_rows(tmp_path / "s0")} == {"0"}
    assert {r["sample"] for r in results.read_rows(tmp_path / "s1")} == {"1"}
    assert (
        evaluate.main(["merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "m")])
        == 0
    )
    assert rows_by_key(tmp_path / "m") == rows_by_key(base)
    merged = json.loads((tmp_path / "m" / "summary.json").read_text())
    want = json.loads((base / "summary.json").read_text())
    assert [r["key"] for r in merged] == [r["key"] for r in want]
    for r, b in zip(merged, want):  # the same rows, averaged in another order
        for m in ISSUE_METRICS + ("score", "n"):
            assert r[m] == pytest.approx(b[m]), (r["key"], m)


@pytest.mark.parametrize(
    "bad",
    [
        ["--methods", "full,foo"],
        ["--budgets", "0"],
        ["--budgets", "0.03125,1.5"],
        ["--data", "MISSING/text2json.jsonl"],
        ["--model", "NOWEIGHTS"],
        ["--bits", "2,5"],
        ["--kv-bits", "5"],
        ["--shard", "2/2"],
        ["--shard", "half"],
        ["--task", "nope"],
        ["merge", "NOWEIGHTS", "--out", "OUT"],
    ],
)
def test_bad_input_is_one_line_before_any_work(bad, ckpt, tmp_path, capsys, monkeypatch):
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(ckpt / name, no_weights / name)

    def forbidden(*a, **k):
        raise AssertionError("bad input must stop before any loading")

    monkeypatch.setattr(evaluate, "load_model", forbidden)
    monkeypatch.setattr(evaluate, "load_tokenizer", forbidden)
    out = tmp_path / "out"
    argv = [
        str(a)
        .replace("NOWEIGHTS", str(no_weights))
        .replace("MISSING", str(tmp_path / "missing"))
        .replace("OUT", str(out))
        for a in bad
    ]
    if argv[0] != "merge":
        argv = ["--model", str(ckpt), "--out", str(out)] + argv
    rc, err = run_main(argv, capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert not out.exists()


# ============================================================================ gold-forced decoding
# bootstrap intervals, split invariance (issue 11; issue 15 "the same numbers however a run is split"); the
# gold-forced rows themselves and their fact tokens: tests/test_experiment.py

GOLD_RUN = [
    "--n",
    "2",
    "--tokens",
    "2048",
    "--max-new-tokens",
    "40",
    "--methods",
    "full,oracle,mean,quantized",
]


def synthetic_rows(full, policy, name="mean"):
    """samples.jsonl-like rows of full attention and one policy with the given per-sample fact accuracies."""
    rows = []
    for key, method, values in (("full", "full", full), (f"{name} @0.03125", name, policy)):
        for i, v in enumerate(values):
            rows.append(
                dict(
                    key=key,
                    config=dict(name=method),
                    axes=[],
                    legends={},
                    order=0 if method == "full" else 1,
                    oracle_key=None,
                    sample=str(i),
                    task="text2json",
                    method=method,
                    label=method,
                    budget=None if method == "full" else 0.03125,
                    chunk_size=None,
                    rank=None,
                    bits=None,
                    residual=None,
                    kv_bits=None,
                    sparse=method != "full",
                    fact_accuracy=v,
                    recall_per_layer=None,
                    mass_per_layer=None,
                )
            )
    return rows


def test_bootstrap_is_seeded_and_covers_the_estimate():
    """Same seed, same intervals (byte for byte); another seed, other intervals; every interval holds its
    point estimate; a constant paired difference has a zero-width interval that excludes 0 (marked *),
    and a difference that changes sign across samples does not."""
    gen = torch.Generator().manual_seed(1)
    full = (0.6 + 0.3 * torch.rand(12, generator=gen)).tolist()
    lower = [v - 0.1 for v in full]
    a, b = results.summarize(synthetic_rows(full, lower)), results.summarize(synthetic_rows(full, lower))
    assert json.dumps(a) == json.dumps(b)
    c = results.summarize(synthetic_rows(full, lower), seed=1)
    assert c[0]["ci"]["fact_accuracy"] != a[0]["ci"]["fact_accuracy"]
    assert torch.equal(results.resample_index(12, 1000, 0), results.resample_index(12, 1000, 0))
    for r in a:
        lo, hi = r["ci"]["fact_accuracy"]
        assert lo <= r["fact_accuracy"] <= hi and lo < hi
    pol = a[1]
    d, lo, hi = pol["vs_full"]["fact_accuracy"]
    assert d == pytest.approx(-0.1) and lo == pytest.approx(-0.1) and hi == pytest.approx(-0.1)
    assert results._vs(pol, "vs_full", "fact_accuracy", ".3f").endswith(" *")
    assert pol["retention"] == pytest.approx(sum(lower) / sum(full))
    lo, hi = pol["ci"]["retention"]
    assert lo <= pol["retention"] <= hi
    noisy = [v + (0.05 if i % 2 else -0.05) for i, v in enumerate(full)]
    d, lo, hi = results.summarize(synthetic_rows(full, noisy))[1]["vs_full"]["fact_accuracy"]
    assert lo < 0 < hi
    assert not results._vs(
        results.summarize(synthetic_rows(full, noisy))[1], "vs_full", "fact_accuracy", ".3f"
    ).endswith("*")


def test_fact_vs_depth_has_a_band_per_configuration(tmp_path, monkeypatch):
    """fact_vs_depth.png draws each configuration's 95% interval per depth bin as a band: from the run's
    paired bootstrap, each resample pooling the facts of its samples; a bin whose facts come from fewer
    than results.MIN_SAMPLES samples gets none."""
    full, low = [0.8, 0.6, 0.7, 0.9], [0.3, 0.6, 0.2, 0.5]
    rows = synthetic_rows(full, low)
    for r in rows:  # two records a sample: depth 5% (every sample), depth 95% (sample 0 only)
        hits = round(10 * r["fact_accuracy"])
        r["per_record"] = [dict(depth=5.0, tokens=10, hits=hits)]
        if r["sample"] == "0":
            r["per_record"].append(dict(depth=95.0, tokens=4, hits=2))
    summary = results.summarize(rows)
    for s, values in zip(summary, (full, low)):
        first, last = s["depth_ci"][0], s["depth_ci"][-1]
        assert s["depth_accuracy"][0] == pytest.approx(sum(round(10 * v) for v in values) / 40)
        assert first[0] < s["depth_accuracy"][0] < first[1]  # 4 samples: a real band
        assert s["depth_ci"][1:-1] == [None] * (results.DEPTH_BINS - 2)  # no fact there
        assert last is None and s["depth_accuracy"][-1] == 0.5  # one sample's facts: no interval
    drawn = {}
    real = results.Figure
    monkeypatch.setattr(results, "Figure", lambda *a, **kw: drawn.setdefault("fig", real(*a, **kw)))
    assert results.plot_depth(summary, tmp_path / "depth.png")
    ax = drawn["fig"].axes[0]
    assert len(ax.lines) == len(ax.collections) == 2  # a line and a band per configuration
    for line, band in zip(ax.lines, ax.collections):
        assert tuple(band.get_facecolor()[0][:3]) == pytest.approx(matplotlib.colors.to_rgb(line.get_color()))


def test_summary_does_not_depend_on_row_order():
    full = [0.5, 0.7, 0.9, 0.6]
    rows = synthetic_rows(full, [0.4, 0.7, 0.5, 0.6])
    assert json.dumps(results.summarize(rows)) == json.dumps(results.summarize(rows[::-1]))


@pytest.fixture(scope="module")
def gold_run(ckpt, tmp_path_factory):
    """One uninterrupted run with two worker processes: the reference of the split-invariance tests."""
    out = tmp_path_factory.mktemp("gold") / "w2"
    assert evaluate.main(["--model", str(ckpt), *GOLD_RUN, "--workers", "2", "--out", str(out)]) == 0
    return out


def same_files(a, b):
    for name in ("samples.jsonl", "summary.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.slow
def test_gold_run_records(gold_run):
    """The gold-forced fields are there, the fact metrics are in range, the table leads with them."""
    rows = results.read_rows(gold_run)
    for r in rows:
        assert 0 <= r["fact_accuracy"] <= 1 and 0 <= r["field_accuracy"] <= 1 and r["fact_nll"] >= 0
        assert r["gold_tokens"] == 40 and r["steps"] == 39 and r["fact_tokens"] > 0
        assert r["score"] is not None  # --model given: the free-running score is on by default
        assert sum(x["tokens"] for x in r["per_record"]) == r["fact_tokens"]
    summary = json.loads((gold_run / "summary.json").read_text())
    assert summary[0]["method"] == "full" and summary[0]["vs_full"]["fact_nll"] is None
    # the random tiny model predicts no fact right, so retention (a ratio to full's accuracy) is undefined
    assert summary[0]["fact_accuracy"] == 0.0 and all(r["retention"] is None for r in summary)
    # two samples: no interval (results.MIN_SAMPLES), the differences without one
    assert all(r["ci"]["fact_nll"] is None and r["vs_oracle"] is not None for r in summary)
    table = (gold_run / "summary.md").read_text()
    assert "| policy | budget | fact accuracy | vs full | vs oracle |" in table
    assert (gold_run / "fact_vs_depth.png").is_file()


@pytest.mark.slow
def test_workers_1_equals_workers_2(gold_run, ckpt, tmp_path, no_plots):
    """One in-process worker, called with 2 torch threads, gives the bytes of two worker processes."""
    torch.set_num_threads(2)
    try:
        argv = ["--model", str(ckpt), *GOLD_RUN, "--workers", "1", "--out", str(tmp_path / "w1")]
        assert evaluate.main(argv) == 0
    finally:
        torch.set_num_threads(1)
    same_files(tmp_path / "w1", gold_run)


@pytest.mark.slow
def test_resumed_equals_uninterrupted(gold_run, ckpt, tmp_path, no_plots):
    """Interrupted after sample 0, then resumed: the same bytes. One configuration of a sample missing
    (decoded alone with its full-attention reference): the same numbers, in the same summary."""
    out = tmp_path / "resumed"
    shutil.copytree(gold_run, out)
    results.write_rows(out, [r for r in results.read_rows(out) if r["sample"] == "0"])
    assert evaluate.main(["--model", str(ckpt), *GOLD_RUN, "--workers", "1", "--out", str(out)]) == 0
    same_files(out, gold_run)
    key = "mean c8 @0.03125"
    results.write_rows(out, [r for r in results.read_rows(out) if (name_of(r), r["sample"]) != (key, "1")])
    assert evaluate.main(["--model", str(ckpt), *GOLD_RUN, "--workers", "1", "--out", str(out)]) == 0
    assert (out / "summary.json").read_bytes() == (gold_run / "summary.json").read_bytes()
    lines = lambda d: sorted((d / "samples.jsonl").read_text().splitlines())
    assert lines(out) == lines(gold_run)  # the redone row comes last


@pytest.mark.slow
def test_shards_merged_equal_one_run(gold_run, ckpt, tmp_path, no_plots):
    for i in range(2):
        assert (
            evaluate.main(
                [
                    "--model",
                    str(ckpt),
                    *GOLD_RUN,
                    "--shard",
                    f"{i}/2",
                    "--workers",
                    "1",
                    "--out",
                    str(tmp_path / f"s{i}"),
                ]
            )
            == 0
        )
    merged = ["merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "m")]
    assert evaluate.main(merged) == 0
    same_files(tmp_path / "m", gold_run)


def test_a_results_folder_records_its_path_and_never_mixes_them(ckpt, tmp_path, capsys, no_plots):
    """run.json says which path made the gold rows (gold_path: pass, or loop with --decode-loop); a
    resume or a merge with the other path is one line, before any work, and so is a run.json that does
    not say its path."""
    tiny = [
        "--model",
        ckpt,
        "--n",
        "1",
        "--tokens",
        "2048",
        "--max-new-tokens",
        "8",
        "--methods",
        "full,oracle",
    ]
    forced, loop = tmp_path / "pass", tmp_path / "loop"
    assert run_main([*tiny, "--out", forced], capsys)[0] == 0
    assert run_main([*tiny, "--decode-loop", "--out", loop], capsys)[0] == 0
    assert json.loads((forced / "run.json").read_text())["gold_path"] == "pass"
    assert json.loads((loop / "run.json").read_text())["gold_path"] == "loop"
    before = (forced / "samples.jsonl").read_bytes()
    rc, err = run_main([*tiny, "--n", "2", "--decode-loop", "--out", forced], capsys)
    assert rc == 2 and "gold_path='pass', not 'loop'" in err and len(err.strip().splitlines()) == 1
    assert (forced / "samples.jsonl").read_bytes() == before
    rc, err = run_main(["merge", forced, loop, "--out", tmp_path / "both"], capsys)
    assert rc == 2 and "gold_path='loop'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "both" / "samples.jsonl").exists()
    damaged = json.loads((loop / "run.json").read_text())
    del damaged["gold_path"]  # a run.json that does not say its path: the rows' path is unknown
    (loop / "run.json").write_text(json.dumps(damaged))
    rc, err = run_main([*tiny, "--n", "2", "--decode-loop", "--out", loop], capsys)
    assert rc == 2 and "run.json: not a whole run.json: no gold_path" in err
    (loop / "run.json").write_text(json.dumps(dict(damaged, gold_path="loop")))
    assert run_main([*tiny, "--n", "2", "--decode-loop", "--out", loop], capsys)[0] == 0


def test_a_policy_built_by_hand_runs_resumes_and_merges(ckpt, tmp_path, no_plots):
    """evaluate.run takes policies built in Python from their three parts (no PRESETS entry): their rows
    are written with their label and identity, a rerun resumes them (each row rebuilt from its config,
    policy.from_params) and merge accepts them."""
    mine = Policy(
        "mine",
        Select("quantized", chunk_size=2, kind_params=dict(landmark_bits="4"), sweep=("chunk_size",)),
        Keys(kv_bits="8"),
        Exact(local=16),
    )
    out = tmp_path / "mine"
    argv = ["--model", str(ckpt), *GOLD_RUN[:6], "--out", str(out)]
    policies = [make_policy("full"), make_policy("oracle", kv_bits="8"), mine]
    assert evaluate.run(evaluate.parse_args(argv), policies) == 0
    rows = results.read_rows(out)
    assert {r["label"] for r in rows} == {"full", "oracle kv8", "mine c2"}
    assert {r["key"] for r in rows if r["method"] == "mine"} == {mine.key()}
    assert {r["order"] for r in rows if r["method"] == "mine"} == {len(POLICIES)}  # after the presets
    before = (out / "samples.jsonl").read_text()
    assert evaluate.run(evaluate.parse_args(argv), policies) == 0  # resumed: nothing to do, nothing changed
    assert (out / "samples.jsonl").read_text() == before
    assert evaluate.main(["merge", str(out), "--out", str(tmp_path / "merged")]) == 0
    assert from_params(mine.params()) == mine  # the parts, rebuilt from the row's config
