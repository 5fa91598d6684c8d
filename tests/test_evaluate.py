"""evaluate.py end to end on a tiny random-weight model: files, schema, the lockstep decode against
plain per-policy decoding, resume, shard + merge, and one-line errors on bad input."""

import json
import shutil

import pytest
import torch

import evaluate
import results
import text2json
from conftest import make_tiny_checkpoint
from kvcache import KVCache, make_policy
from model import generate, load_model

ISSUE_METRICS = ("text2json_score", "field_recall", "agreement", "kl", "oracle_recall", "attention_mass",
                 "device_kv_fraction", "bytes_per_step")
N, TOKENS, MAX_NEW = 2, 2048, 6
# every policy, two budgets, two chunk sizes and two landmark formats: each plot axis but rank is swept
SVD_KEY = "svd r0.15625 @0.0625"  # ShadowKV's rank share, 160 of 1024 channels
SWEEP = ["--n", str(N), "--tokens", str(TOKENS), "--max-new-tokens", str(MAX_NEW),
         "--methods", "full,oracle,shadowkv,mean,quantized,svd", "--budgets", "0.03125,0.0625",
         "--chunk-sizes", "1,8", "--bits", "2,4"]


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
    path, _ = make_tiny_checkpoint("LlamaForCausalLM", tmp_path_factory.mktemp("ckpt") / "llama",
                                   max_position_embeddings=4096)
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


def rows_by_key(out):
    return {(r["key"], r["sample"]): r for r in results.read_rows(out)}


def test_files_and_schema(base, ckpt):
    for name in ("samples.jsonl", "summary.json", "summary.md", "run.json", "vs_budget.png", "vs_chunk_size.png",
                 "vs_bits.png", "recall_per_layer.png"):
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
    by = {r["key"]: r for r in summary}
    for b in ("0.03125", "0.0625"):
        # the oracle selects the exact top-k, so its recall is 1 by construction (stats wired to the forced row)
        assert by[f"oracle @{b}"]["oracle_recall"] == pytest.approx(1.0)
        # 2-bit landmarks take less device memory than 4-bit ones, which take less than exact keys
        assert by[f"quantized 2b @{b}"]["device_kv_fraction"] < by[f"quantized 4b @{b}"]["device_kv_fraction"] \
            < by[f"oracle @{b}"]["device_kv_fraction"]
    assert by["oracle @0.0625"]["bytes_per_step"] > by["oracle @0.03125"]["bytes_per_step"]  # twice the selection
    table = (base / "summary.md").read_text()
    assert all(f"| {r['label']} |" in table for r in summary)


def test_kv_bits_run(base, ckpt, tmp_path, capsys, no_plots):
    """--kv-bits: the same policies with their offloaded K/V quantized, as their own table rows."""
    out = tmp_path / "kv4"
    argv = ["--model", ckpt, "--n", 1, "--tokens", TOKENS, "--max-new-tokens", MAX_NEW,
            "--methods", "full,oracle", "--kv-bits", "4", "--out", out]
    assert run_main(argv, capsys)[0] == 0
    by = {r["key"]: r for r in json.loads((out / "summary.json").read_text())}
    assert set(by) == {"full", "oracle kv4 @0.03125"} and by["oracle kv4 @0.03125"]["kv_bits"] == "4"
    (row,) = [r for r in results.read_rows(out) if r["method"] == "oracle"]
    exact = rows_by_key(base)["oracle @0.03125", row["sample"]]  # the same sample, K/V offloaded exact
    # per row of 16 channels: 4-bit codes (8 bytes) + a 16-bit scale instead of 16 float32 values (64 bytes)
    assert exact["bytes_per_step"] / row["bytes_per_step"] == pytest.approx(64 / 10)


@torch.inference_mode()
def test_lockstep_decode_matches_one_policy_at_a_time(base, ckpt):
    """The batched plan (one prefill, all policies as one batch) against plain decoding of each policy
    on its own: same full-attention output, same free-run predictions, same teacher-forced agreement."""
    model, tok = load_model(ckpt)
    rows = rows_by_key(base)
    for i, sample in enumerate(text2json.generate(N, TOKENS, tok, seed=0)):
        ids = tok.chat([{"role": "user", "content": sample["problem"]}])
        ref = generate(model, ids, MAX_NEW, stop_ids=tok.stop_ids)
        assert rows[("full", str(i))]["prediction"] == tok.decode(ref)
        for key in ("mean c8 @0.03125", "quantized 2b @0.0625", "shadowkv @0.03125"):
            name = key.split()[0]
            kw = dict(chunk_size=8) if name == "mean" else dict(landmark_bits="2") if name == "quantized" else {}
            policy = make_policy(name, budget=float(key.split("@")[1]), **kw)
            free = generate(model, ids, MAX_NEW, stop_ids=tok.stop_ids, cache=KVCache(model.config, model.rope, policy))
            assert rows[(key, str(i))]["prediction"] == tok.decode(free), (key, i)
            # teacher forcing: both fed the full row's tokens; a step per full-row token that was not the last
            # allowed one (after it the full row either stopped or predicted a stop token)
            steps = len(ref) if len(ref) < MAX_NEW else len(ref) - 1
            caches = [KVCache(model.config, model.rope), KVCache(model.config, model.rope, policy)]
            for c in caches:
                model(torch.tensor([ids]), c, last_only=True)
            hits, kl = 0, 0.0
            for x in ref[:steps]:
                p_full, p_pol = (torch.log_softmax(model(torch.tensor([[x]]), c)[0, -1], -1) for c in caches)
                hits += int(p_full.argmax()) == int(p_pol.argmax())
                kl += float((p_full.exp() * (p_full - p_pol)).sum())
            assert rows[(key, str(i))]["steps"] == steps
            if steps:
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
    assert (out / "samples.jsonl").read_bytes() == before and (out / "samples.jsonl").stat().st_mtime_ns == mtime
    monkeypatch.setattr(evaluate, "load_model", real_load)

    # an interrupted run: sample 1 missing entirely, one configuration of sample 0 missing
    kept = [r for r in results.read_rows(out) if r["sample"] != "1" and (r["key"], r["sample"]) != (SVD_KEY, "0")]
    results.write_rows(out, kept)
    calls = []
    real = evaluate.evaluate_sample
    monkeypatch.setattr(evaluate, "evaluate_sample",
                        lambda model, tok, s, ps, *a, **k: calls.append((s["id"], [evaluate.config_key(p) for p in ps]))
                        or real(model, tok, s, ps, *a, **k))
    # one in-process worker, so the calls are seen here; the base run used two worker processes, so
    # the comparison below also checks that a sample's results do not depend on the worker
    rc, err = run_main(["--model", ckpt, *SWEEP, "--out", out, "--workers", "1"], capsys)
    assert rc == 0 and "skipped" not in err  # both samples have work left: sample 0 one configuration
    assert calls == [("0", [SVD_KEY]), ("1", list(calls[1][1]))] and len(calls[1][1]) == 19
    got, want = rows_by_key(out), rows_by_key(base)
    assert got.keys() == want.keys()
    for k in want:  # sample 1 decodes in the same batch as before: identical results
        if k[1] == "1":
            assert got[k] == want[k]
    assert got[(SVD_KEY, "0")]["prompt_tokens"] == want[(SVD_KEY, "0")]["prompt_tokens"]

    # a resumed folder refuses other settings instead of mixing results
    rc, err = run_main(["--model", ckpt, *SWEEP, "--seed", "1", "--out", out], capsys)
    assert rc == 2 and "seed" in err and len(err.strip().splitlines()) == 1


def test_shards_merge_to_the_unsharded_run(base, ckpt, tmp_path, capsys, no_plots):
    for i in range(2):
        rc, _ = run_main(["--model", ckpt, *SWEEP, "--shard", f"{i}/2", "--out", tmp_path / f"s{i}"], capsys)
        assert rc == 0
    assert {r["sample"] for r in results.read_rows(tmp_path / "s0")} == {"0"}
    assert {r["sample"] for r in results.read_rows(tmp_path / "s1")} == {"1"}
    assert evaluate.main(["merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "m")]) == 0
    assert rows_by_key(tmp_path / "m") == rows_by_key(base)
    merged = json.loads((tmp_path / "m" / "summary.json").read_text())
    want = json.loads((base / "summary.json").read_text())
    assert [r["key"] for r in merged] == [r["key"] for r in want]
    for r, b in zip(merged, want):  # the same rows, averaged in another order
        for m in ISSUE_METRICS + ("score", "n"):
            assert r[m] == pytest.approx(b[m]), (r["key"], m)


@pytest.mark.parametrize("bad", [
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
])
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
    argv = [str(a).replace("NOWEIGHTS", str(no_weights)).replace("MISSING", str(tmp_path / "missing"))
            .replace("OUT", str(out)) for a in bad]
    if argv[0] != "merge":
        argv = ["--model", str(ckpt), "--out", str(out)] + argv
    rc, err = run_main(argv, capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert not out.exists()
