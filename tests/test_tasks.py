"""Multi-needle retrieval and LongProc HTML->TSV on the shared real data (skipped without it)."""

import random
import re
from pathlib import Path

import pytest

import tasks
from files import data_dir

DATA = data_dir()
NEEDLES = DATA / "needlebench"
LONGPROC = DATA / "longproc_html_to_tsv"
needs_needles = pytest.mark.skipif(not NEEDLES.is_dir(), reason=f"NeedleBench data not found at {NEEDLES} (set KVOFFLOAD_DATA)")
needs_longproc = pytest.mark.skipif(not LONGPROC.is_dir(), reason=f"LongProc data not found at {LONGPROC} (set KVOFFLOAD_DATA)")


class WordTokenizer:
    """Stand-in tokenizer: one token per word or punctuation mark."""

    def encode(self, text):
        return [len(t) for t in re.findall(r"\w+|[^\w\s]", text)]


@pytest.fixture(scope="module")
def tokenizer():
    """The default model's tokenizer when its files are here, else the stand-in: the depth
    and length properties hold for any tokenizer."""
    try:
        from model import load_tokenizer
        return load_tokenizer()
    except Exception:
        return WordTokenizer()


@pytest.fixture(scope="module")
def needle_sample(tokenizer):
    return tasks.needle_samples(NEEDLES, 5, 4096, tokenizer, seed=0)[0]


# ----------------------------------------------------------------------------- multi-needle

@needs_needles
def test_needles_sit_at_their_depths(tokenizer, needle_sample):
    s = needle_sample
    assert abs(len(tokenizer.encode(s["problem"])) - 4096) <= 0.05 * 4096
    assert [nd["depth"] for nd in s["needles"]] == [0.0, 25.0, 50.0, 75.0, 100.0]
    start, end = s["document_span"]
    doc_tokens = len(tokenizer.encode(s["problem"][start:end]))
    for nd in s["needles"]:
        pos = nd["position"]
        assert s["problem"][pos:pos + len(nd["needle"])] == nd["needle"]
        assert s["problem"].count(nd["needle"]) == 1
        token_depth = 100 * len(tokenizer.encode(s["problem"][start:pos])) / doc_tokens
        assert abs(token_depth - nd["depth"]) <= 3, (nd["depth"], token_depth)
    # every question is asked once, after the document; keywords tell the needles apart
    questions = s["problem"][end:]
    assert all(questions.count(nd["retrieval_question"]) == 1 for nd in s["needles"])
    assert len({nd["arg2"].lower() for nd in s["needles"]}) == 5
    assert len({nd["arg1"] for nd in s["needles"]}) == 5


@needs_needles
def test_needle_scorer_counts_keywords_per_depth(needle_sample):
    nds = needle_sample["needles"]
    answer = "\n".join(f"{i}. It is the {nd['arg2'].upper()}." for i, nd in enumerate(nds) if i % 2 == 0)
    r = tasks.score_needles(answer, needle_sample)
    assert r["score"] == pytest.approx(3 / 5)
    assert r["per_depth"] == {0.0: 1.0, 25.0: 0.0, 50.0: 1.0, 75.0: 0.0, 100.0: 1.0}
    full = tasks.score_needles(" ".join(nd["arg2"] for nd in nds), needle_sample)
    none = tasks.score_needles("I don't know.", needle_sample)
    assert full["score"] == 1.0 and none["score"] == 0.0
    agg = tasks.aggregate_needles([r, full, none])
    assert agg["score"] == pytest.approx(100 * (0.6 + 1 + 0) / 3)
    assert agg["per_depth"][0.0] == pytest.approx(200 / 3) and agg["per_depth"][25.0] == pytest.approx(100 / 3)


@needs_needles
def test_needle_samples_deterministic_and_checked():
    tok = WordTokenizer()
    a = tasks.needle_samples(NEEDLES, 3, 1024, tok, seed=7, n=2)
    assert a == tasks.needle_samples(NEEDLES, 3, 1024, tok, seed=7, n=2)
    assert a[0]["problem"] != a[1]["problem"]
    assert tasks.needle_depths(1) == [50.0] and tasks.needle_depths(3) == [0.0, 50.0, 100.0]
    with pytest.raises(ValueError, match="distinct"):
        tasks.needle_samples(NEEDLES, 40, 8192, tok, seed=0)
    with pytest.raises(ValueError, match="too short"):
        tasks.needle_samples(NEEDLES, 11, 300, tok, seed=0)
    with pytest.raises(FileNotFoundError, match="needles.jsonl"):
        tasks.needle_samples(DATA / "nowhere", 3, 1024, tok, seed=0)


# ----------------------------------------------------------------------------- LongProc

@pytest.fixture(scope="module")
def longproc():
    return tasks.load_longproc(LONGPROC)


@needs_longproc
def test_longproc_loads_all_tasks_with_filled_prompt(longproc):
    assert len(longproc) == 70
    for t in longproc:
        html = (LONGPROC / t["html_path"]).read_text(encoding="utf-8")
        assert html in t["problem"] and t["tsv_header"] + "\n{Your TSV output}" in t["problem"]
        assert t["task_description"] in t["problem"]
        for placeholder in ("{html_str}", "{task_topic}", "{task_description}", "{tsv_header}"):
            assert placeholder not in t["problem"].replace(html, "")
        assert t["gt"].startswith(t["tsv_header"])


@needs_longproc
def test_prompts_yaml_reader_matches_pyyaml():
    yaml = pytest.importorskip("yaml")
    path = LONGPROC / "prompts.yaml"
    assert tasks.read_prompts_yaml(path) == yaml.safe_load(path.read_text(encoding="utf-8"))


def test_prompts_yaml_reader_blocks_and_errors(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("# c\nA: |-\n  one\n\n    two\nB: |\n  x\nC: plain\n")
    assert tasks.read_prompts_yaml(p) == {"A": "one\n\n  two", "B": "x\n", "C": "plain"}
    p.write_text("- a list\n")
    with pytest.raises(ValueError, match="p.yaml:1"):
        tasks.read_prompts_yaml(p)


@needs_longproc
def test_gold_against_gold_is_perfect_on_all_tasks(longproc):
    for t in longproc:
        assert tasks.score_tsv(t["gt"], t["gt"]) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}, t["task_id"]
        fenced = "Here you go:\n```tsv\n" + t["gt"] + "```\nHope this helps."
        assert tasks.score_tsv(fenced, t["gt"])["f1"] == 1.0


def _rows(gt):
    header, *rows = [l for l in gt.split("\n") if l]
    return header, rows


@needs_longproc
def test_tsv_scorer_dropped_changed_shuffled(longproc):
    t = max(longproc, key=lambda t: len(_rows(t["gt"])[1]))
    header, rows = _rows(t["gt"])
    n = len(rows)
    assert n >= 5
    # a dropped row: everything predicted is right, one gold row is missed
    dropped = tasks.score_tsv("\n".join([header] + rows[:2] + rows[3:]), t["gt"])
    assert dropped["precision"] == 1.0 and dropped["recall"] == pytest.approx((n - 1) / n)
    # a changed cell: that row is wrong on both sides
    cells = rows[1].split("\t")
    cells[0] = "zz" + cells[0]
    changed = tasks.score_tsv("\n".join([header, rows[0], "\t".join(cells)] + rows[2:]), t["gt"])
    assert changed["precision"] == pytest.approx((n - 1) / n) and changed["recall"] == pytest.approx((n - 1) / n)
    assert changed["f1"] == pytest.approx((n - 1) / n)
    # a shuffled order: rows are matched as a set, so order alone costs nothing
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    assert shuffled != rows
    assert tasks.score_tsv("\n".join([header] + shuffled), t["gt"])["f1"] == 1.0
    # all three at once
    mixed = [r for r in shuffled if r != rows[2]]
    mixed[mixed.index(rows[1])] = "\t".join(cells)
    m = tasks.score_tsv("\n".join([header] + mixed), t["gt"])
    assert m["precision"] == pytest.approx((n - 2) / (n - 1)) and m["recall"] == pytest.approx((n - 2) / n)
    assert m["f1"] < dropped["f1"] < 1.0


def test_tsv_normalisation_and_duplicates():
    gold = "Name\tCity\nThe Red Cafe\tSan José, CA\nBlue Bar\tOslo\n"
    pred = "name\tcity\nred  café?\tsan josé ca\n  a Blue-Bar \t OSLO.\n"
    # case, punctuation, articles and whitespace are dropped; accents are not
    assert tasks.normalize_cell("  The  Blue-Bar, Inc. ") == "bluebarinc"
    r = tasks.score_tsv(pred, gold)
    assert r["precision"] == 0.5 and r["recall"] == 0.5  # "café" != "cafe"
    twice = tasks.score_tsv("Name\tCity\nBlue Bar\tOslo\nBlue Bar\tOslo\n", gold)
    assert twice["precision"] == 0.5 and twice["recall"] == 0.5
    assert tasks.score_tsv("", gold) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert tasks.score_tsv("Name\tCity\nBlue Bar\n", gold)["precision"] == 0.0  # a cell short


def test_longproc_missing_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="html_to_tsv_0.5k.json"):
        tasks.load_longproc(tmp_path)
