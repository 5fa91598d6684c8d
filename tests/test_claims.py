"""claims.py's rules on hand-made results (each verdict reached, and each reason for an inconclusive one),
and `python evaluate.py claims` end to end on a tiny model: it resumes like a run, and its claims.md
does not depend on the worker count."""

import json
import shutil

import pytest

import claims
import evaluate
from claims import INCONCLUSIVE, MARGIN, NOT_REPRODUCED, REPRODUCED, Evidence
from conftest import make_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread
CONFIGS = claims.configurations()


def rows_of(task, values):
    """samples.jsonl-like rows: values {configuration name: per-sample fact accuracies}."""
    return [
        dict(key=CONFIGS[task][name].key(), sample=str(i), fact_accuracy=v)
        for name, vs in values.items()
        for i, v in enumerate(vs)
    ]


def shifted(base, delta, noise=0.0):
    """base + delta, with +-noise alternating over the samples (a difference that changes sign)."""
    return [b + delta + (noise if i % 2 else -noise) for i, b in enumerate(base)]


BASE = [0.55, 0.62, 0.70, 0.48, 0.66, 0.59, 0.73, 0.51]  # full attention's fact accuracy on 8 samples


def ruler_rows(values):
    """RULER rows: values {configuration name: {RULER task: per-sample fact accuracies}}."""
    return [
        dict(key=CONFIGS["ruler"][name].key(), sample=f"{task}/{i}", fact_accuracy=v)
        for name, by_task in values.items()
        for task, vs in by_task.items()
        for i, v in enumerate(vs)
    ]


def evidence(t2j, needle=None, missing=None, ruler=None):
    rows = {"text2json": rows_of("text2json", t2j)}
    if needle is not None:
        rows["needle"] = rows_of("needle", needle)
    if ruler is not None:
        rows["ruler"] = ruler_rows(ruler)
    return Evidence(rows, CONFIGS, missing)


@pytest.mark.parametrize(
    "delta, noise, verdict",
    [
        (-0.20, 0.0, REPRODUCED),  # a clear loss
        (-0.01, 0.0, REPRODUCED),  # a small loss, but a certain one: the interval excludes 0
        (0.0, 0.005, NOT_REPRODUCED),  # no loss: the interval holds 0 and ends above -MARGIN
        (-0.05, 0.15, INCONCLUSIVE),  # the interval allows both
    ],
)
def test_loss_rule(delta, noise, verdict):
    ev = evidence({"full": BASE, "shadowkv": shifted(BASE, delta, noise)})
    found = claims.claim_shadowkv_loses(ev)
    assert found.verdict == verdict, found.figures
    mean, lo, hi = found.figures["shadowkv - full"]
    assert lo <= mean <= hi and mean == pytest.approx(delta, abs=1e-9)


@pytest.mark.parametrize(
    "delta2, delta4, verdict",
    [
        (0.0, -0.01, REPRODUCED),  # both within the margin
        (-0.10, 0.0, NOT_REPRODUCED),  # 2-bit loses more than the margin: one part fails
        (0.0, 2 * MARGIN, NOT_REPRODUCED),  # 4-bit clearly above: not "within noise" either
    ],
)
def test_close_rule_needs_both_parts(delta2, delta4, verdict):
    ev = evidence(
        {"oracle": BASE, "quantized 2b": shifted(BASE, delta2), "quantized 4b": shifted(BASE, delta4)}
    )
    assert claims.claim_quantized_close(ev).verdict == verdict


def test_close_rule_inconclusive_when_the_interval_crosses_the_margin():
    ev = evidence({"paper": shifted(BASE, -0.03, 0.1), "quantized 2b": BASE})
    assert claims.claim_kv4_close(ev).verdict == INCONCLUSIVE


def test_chunk_trend():
    """Falling with the chunk size: reproduced; rising: not reproduced, whatever mean c8 does alone."""
    falling = {
        "oracle": BASE,
        **{f"mean c{c}": shifted(BASE, -0.05 * i) for i, c in enumerate((2, 4, 8, 16), 1)},
    }
    found = claims.claim_chunks_lose(evidence(falling))
    assert found.verdict == REPRODUCED and found.figures["slope per doubling"][2] < 0
    rising = {
        "oracle": BASE,
        **{f"mean c{c}": shifted(BASE, 0.02 * i) for i, c in enumerate((2, 4, 8, 16), 1)},
    }
    assert claims.claim_chunks_lose(evidence(rising)).verdict == NOT_REPRODUCED


def test_retrieval_rule():
    t2j = {"full": BASE, "shadowkv": shifted(BASE, -0.30)}
    small = {"full": BASE[:6], "shadowkv": shifted(BASE[:6], -0.02)}  # needle: a small loss
    large = {"full": BASE[:6], "shadowkv": shifted(BASE[:6], -0.28)}  # as large as Text2JSON's
    assert claims.claim_retrieval_hides_the_loss(evidence(t2j, small)).verdict == REPRODUCED
    assert claims.claim_retrieval_hides_the_loss(evidence(t2j, large)).verdict == NOT_REPRODUCED
    noisy = {"full": BASE[:6], "shadowkv": shifted(BASE[:6], -0.13, 0.2)}
    assert claims.claim_retrieval_hides_the_loss(evidence(t2j, noisy)).verdict == INCONCLUSIVE


def test_missing_data_is_inconclusive_with_its_reason():
    ev = evidence({"full": BASE, "shadowkv": shifted(BASE, -0.3)}, missing={"needle": "no NeedleBench data"})
    found = claims.claim_retrieval_hides_the_loss(ev)
    assert found.verdict == INCONCLUSIVE and found.reason == "no NeedleBench data"
    found = claims.claim_baselines_fall_below(ev)
    assert found.verdict == INCONCLUSIVE and "no text2json result for arkvale, paper" in found.reason
    assert claims.claim_shadowkv_loses(ev).verdict == REPRODUCED  # the rest still stand


def per_task(values_by_group):
    """{RULER task of the claims' run: values} from {group or 'single': values} (each task its group's)."""
    out = {}
    for task in claims.RULER_TASKS:
        group = "single" if task in claims.ruler.SINGLE_NEEDLE else task
        out[task] = values_by_group[group]
    return out


def test_ruler_rule_reads_only_the_single_needle_tasks():
    t2j = {"full": BASE, "shadowkv": shifted(BASE, -0.30)}
    small, large = shifted(BASE[:4], -0.02), shifted(BASE[:4], -0.28)
    base = {"single": BASE[:4], "vt": BASE[:4], "cwe": BASE[:4], "fwe": BASE[:4]}
    # ShadowKV loses little on the single-needle tasks and much on aggregation: reproduced
    ruler = {"full": per_task(base), "shadowkv": per_task(dict(base, single=small, cwe=large, fwe=large))}
    found = claims.claim_ruler_hides_the_loss(evidence(t2j, ruler=ruler))
    assert found.verdict == REPRODUCED
    assert found.figures["loss on RULER single-needle"][0] == pytest.approx(0.02)
    # as much on the single-needle tasks as on Text2JSON: not reproduced, whatever the other groups do
    ruler["shadowkv"] = per_task(dict(base, single=large, cwe=small, fwe=small))
    assert claims.claim_ruler_hides_the_loss(evidence(t2j, ruler=ruler)).verdict == NOT_REPRODUCED
    # no RULER results: inconclusive with its reason, claim 7 unaffected
    ev = evidence(t2j, {"full": BASE[:6], "shadowkv": shifted(BASE[:6], -0.02)}, {"ruler": "no essays"})
    found = claims.claim_ruler_hides_the_loss(ev)
    assert found.verdict == INCONCLUSIVE and found.reason == "no essays"
    assert claims.claim_retrieval_hides_the_loss(ev).verdict == REPRODUCED


def test_every_rule_states_the_samples_it_needs():
    """Every claim's rule is decided only from MIN_SAMPLES samples on (Evidence.absent), and its text in
    claims.md says so (claim 9's said nothing of it)."""
    for claim in claims.CLAIMS:
        assert claim.rule.endswith(claims.RULE_SAMPLES), (
            f"claim {claim.number}'s rule omits the sample minimum"
        )
    t2j = {"full": BASE, "shadowkv": shifted(BASE, -0.30)}
    # one sample of each single-needle task: 3 pooled, below MIN_SAMPLES
    few = per_task({"single": BASE[:1], "vt": BASE[:1], "cwe": BASE[:1], "fwe": BASE[:1]})
    found = claims.claim_ruler_hides_the_loss(evidence(t2j, ruler={"full": few, "shadowkv": few}))
    assert found.verdict == INCONCLUSIVE and "at least" in found.reason


def test_ruler_groups_report_each_methods_loss_per_group():
    base = {"single": BASE[:4], "vt": BASE[:4], "cwe": BASE[:4], "fwe": BASE[:4]}
    ruler = {
        "full": per_task(base),
        "shadowkv": per_task(dict(base, single=shifted(BASE[:4], -0.01), vt=shifted(BASE[:4], -0.1),
                                  cwe=shifted(BASE[:4], -0.3), fwe=shifted(BASE[:4], -0.2))),
        "paper": per_task(dict(base, cwe=shifted(BASE[:4], -0.04))),
    }  # fmt: skip
    groups = claims.ruler_groups(evidence({"full": BASE}, ruler=ruler))
    assert list(groups) == ["retrieval", "multi-hop tracing", "aggregation"]
    assert groups["retrieval"]["shadowkv"][0] == pytest.approx(0.01)
    assert groups["multi-hop tracing"]["shadowkv"][0] == pytest.approx(0.1)
    assert groups["aggregation"]["shadowkv"][0] == pytest.approx(0.25)  # cwe and fwe samples together
    assert groups["aggregation"]["paper"][0] == pytest.approx(0.02)
    lines = "\n".join(claims.group_lines(groups))
    assert "| aggregation | cwe, fwe | +0.250 [" in lines and "no verdict" in lines
    missing = claims.ruler_groups(evidence({"full": BASE}, missing={"ruler": "no essays"}))
    assert missing == {g: "no essays" for g in ("retrieval", "multi-hop tracing", "aggregation")}


def test_baselines_all_needed():
    below = {"paper": BASE, **{b: shifted(BASE, -0.2) for b in claims.BASELINES}}
    assert claims.claim_baselines_fall_below(evidence(below)).verdict == REPRODUCED
    one_above = dict(below, lrqk=shifted(BASE, 0.05))
    assert claims.claim_baselines_fall_below(evidence(one_above)).verdict == NOT_REPRODUCED


def test_write_gives_a_verdict_a_rule_and_a_figure_per_claim(tmp_path):
    values = {name: shifted(BASE, -0.1 * (name != "full")) for name in CONFIGS["text2json"]}
    ruler = {name: {t: shifted(BASE[:3], -0.05 * (name != "full")) for t in claims.RULER_TASKS}
             for name in CONFIGS["ruler"]}  # fmt: skip
    ev = evidence(values, {"full": BASE, "shadowkv": BASE}, ruler=ruler)
    text = claims.write(tmp_path, ev, dict(command="x"))
    record = json.loads((tmp_path / "claims.json").read_text())
    assert [c["number"] for c in record["claims"]] == list(range(1, 10)) and record["margin"] == MARGIN
    assert record["ruler_groups"]["aggregation"]["paper"][0] == pytest.approx(0.05)
    assert "## RULER by task group (no verdict)" in text
    for c in record["claims"]:
        assert c["verdict"] in (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE) and c["rule"] in text
        assert (tmp_path / c["figure"]).is_file()


def test_each_figure_draws_what_its_rule_decides_on(tmp_path, monkeypatch):
    """A claim's figure shows the quantities its rule decides on (paired differences, the slope, the
    losses), each with its interval, against 0 and the margin; not the configurations' own accuracies."""
    values = {name: shifted(BASE, -0.1 * (name != "full")) for name in CONFIGS["text2json"]}
    ruler = {name: {t: shifted(BASE[:4], -0.01 * (name != "full"), 0.01) for t in claims.RULER_TASKS}
             for name in CONFIGS["ruler"]}  # fmt: skip
    ev = evidence(values, {"full": BASE, "shadowkv": shifted(BASE, -0.02)}, ruler=ruler)
    drawn = {}
    real = claims.Figure

    def watch(*a, **kw):
        fig = real(*a, **kw)
        drawn["fig"] = fig
        return fig

    monkeypatch.setattr(claims, "Figure", watch)
    want = {
        1: ["shadowkv - full"],
        5: ["quantized 2b - oracle", "quantized 4b - oracle"],
        4: ["mean c8 - oracle", "slope per doubling"],
        7: ["loss on Text2JSON", "L(Text2JSON) - 2 L(NeedleBench)"],
        9: ["loss on Text2JSON", "L(Text2JSON) - 2 L(RULER single-needle)"],
        8: [f"{b} - paper" for b in claims.BASELINES],
    }
    for claim, finding in claims.decide(ev):
        assert claims.plot(claim, finding, tmp_path / f"c{claim.number}.png")
        ax = drawn["fig"].axes[0]
        labels = [t.get_text() for t in ax.get_yticklabels()]
        assert labels == list(finding.decided) and all(label in finding.figures for label in labels)
        if claim.number in want:
            assert labels == want[claim.number]
        lines = {round(x, 6) for line in ax.lines for x in line.get_xdata()}  # the errorbar and the 0 line
        assert 0.0 in lines and round(finding.figures[labels[0]][0], 6) in lines
        shaded = [p.get_x() for p in ax.patches]  # the margin band
        if finding.rule == "close":
            assert shaded == [pytest.approx(-MARGIN)] and ax.patches[0].get_width() == pytest.approx(
                2 * MARGIN
            )
        elif finding.rule == "loss":
            assert shaded == [pytest.approx(-MARGIN)] and ax.patches[0].get_width() == pytest.approx(MARGIN)


# ------------------------------------------------------------------------------------ end to end
TINY_CLAIMS = ["--tokens", "2048", "--n", "2", "--max-new-tokens", "6"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path, _ = make_tiny_checkpoint(
        "LlamaForCausalLM", tmp_path_factory.mktemp("ckpt") / "llama", max_position_embeddings=4096
    )
    return path


@pytest.mark.slow
def test_claims_resume_and_do_not_depend_on_the_workers(ckpt, tmp_path, monkeypatch):
    one = tmp_path / "one"
    assert (
        evaluate.main(["claims", "--model", str(ckpt), *TINY_CLAIMS, "--workers", "1", "--out", str(one)])
        == 0
    )
    two = tmp_path / "two"
    assert (
        evaluate.main(["claims", "--model", str(ckpt), *TINY_CLAIMS, "--workers", "2", "--out", str(two)])
        == 0
    )
    body = lambda d: (d / "claims.md").read_text().split("\n", 3)[3]  # the command line differs
    assert body(one) == body(two)
    assert (one / "ruler" / "samples.jsonl").is_file()  # the RULER run: generated, always there
    for task in ("text2json", "needle", "ruler"):
        if (one / task / "samples.jsonl").is_file():
            assert (one / task / "samples.jsonl").read_bytes() == (two / task / "samples.jsonl").read_bytes()
    # the same command again: nothing is decoded, the same claims are written
    before = (one / "claims.md").read_text()
    monkeypatch.setattr(
        evaluate, "load_model", lambda *a, **k: pytest.fail("a finished claims run loads no model")
    )
    assert (
        evaluate.main(["claims", "--model", str(ckpt), *TINY_CLAIMS, "--workers", "1", "--out", str(one)])
        == 0
    )
    assert (one / "claims.md").read_text() == before
    # an interrupted run (a configuration of a sample missing) resumes just that
    resumed = tmp_path / "resumed"
    shutil.copytree(one, resumed)
    rows = [json.loads(line) for line in (resumed / "text2json" / "samples.jsonl").read_text().splitlines()]
    drop = CONFIGS["text2json"]["lrqk"].key()
    kept = [r for r in rows if (r["key"], r["sample"]) != (drop, "1")]
    (resumed / "text2json" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    monkeypatch.undo()
    assert (
        evaluate.main(["claims", "--model", str(ckpt), *TINY_CLAIMS, "--workers", "1", "--out", str(resumed)])
        == 0
    )
    assert body(resumed) == body(one)


@pytest.mark.parametrize("bad", [["--methods", "full,oracle"], ["--budgets", "0.1"], ["--task", "needle"]])
def test_claims_refuse_options_that_choose_configurations(bad, capsys):
    assert evaluate.main(["claims", *bad]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: claims runs its own configurations and tasks: drop --")
        and err.count("\n") == 1
    )
