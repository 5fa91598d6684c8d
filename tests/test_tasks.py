"""NeedleBench v2 parallel retrieval and LongProc HTML->TSV: the construction and the scorers' rules
(hand-made cases), and the loaders on the shared real data (skipped without it)."""

import json
import random
import shutil

import pytest

import tasks
from files import data_dir

DATA = data_dir()
NEEDLES = DATA / "needlebench"
LONGPROC = DATA / "longproc_html_to_tsv"
needs_needles = pytest.mark.skipif(
    not NEEDLES.is_dir(), reason=f"NeedleBench data not found at {NEEDLES} (set KVOFFLOAD_DATA)"
)
needs_longproc = pytest.mark.skipif(
    not LONGPROC.is_dir(), reason=f"LongProc data not found at {LONGPROC} (set KVOFFLOAD_DATA)"
)


class CharTokenizer:
    """Stand-in tokenizer, one token per character: encode and decode are exact inverses, so a token
    offset is a character offset and every construction rule can be checked exactly."""

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))


@pytest.fixture(scope="module")
def model_tokenizer():
    try:
        from model import load_tokenizer

        return load_tokenizer()
    except Exception as e:  # the default model's files are not on this machine
        pytest.skip(f"default model tokenizer unavailable: {e}")


# ----------------------------------------------------------------------------- multi-needle

PAPER_KEYWORDS = [
    "Virtual Rocket Band",
    "Interstellar Flight Band",
    "Galaxy Melody Band",
    "Intelligent Robot Zambot",
    "Cosmic Ruler Starshine",
    "Guardian of Time Lightspeed",
    "Voyager of the Stars",
    "Poseidon of the North Sea",
    "Orion the Hunter",
    "Counterclockwise Crystal",
    "Eternal Flame",
]


@needs_needles
def test_paper_needle_set_is_the_first_eleven_distinct():
    english = tasks.load_needles(NEEDLES)
    chosen = tasks.paper_needles(english)
    assert [nd["arg2"] for nd in chosen] == PAPER_KEYWORDS
    assert len({nd["arg1"] for nd in chosen}) == 11 and all(nd["language"] == "English" for nd in chosen)
    # each one is the first English needle whose subject and keyword were both still unused
    for nd in chosen:
        i = english.index(nd)
        earlier = english[:i]
        assert all(
            e["arg1"] in {c["arg1"] for c in chosen[: chosen.index(nd)]}
            or e["arg2"] in {c["arg2"] for c in chosen[: chosen.index(nd)]}
            for e in earlier
        )
    with pytest.raises(ValueError, match="distinct"):
        tasks.paper_needles(english, 100)


@needs_needles
def test_every_prompt_has_the_same_needles_in_a_shuffled_order():
    samples = tasks.needle_samples(NEEDLES, 6000, CharTokenizer(), seed=0, n=4)
    orders = [[nd["arg2"] for nd in s["needles"]] for s in samples]
    assert all(sorted(o) == sorted(PAPER_KEYWORDS) for o in orders)
    assert len({tuple(o) for o in orders}) == 4  # only the order changes
    assert len({s["problem"] for s in samples}) == 4
    # repeat r of seed 0 shuffles needles and essays with random.Random(r), as the paper's code does
    essays, chosen = tasks.load_essays(NEEDLES), tasks.paper_needles(tasks.load_needles(NEEDLES))
    for r, s in enumerate(samples):
        order, needles = list(essays), list(chosen)
        random.Random(r).shuffle(order)
        random.Random(r).shuffle(needles)
        assert orders[r] == [nd["arg2"] for nd in needles]
        first = "\n" + needles[0]["needle"] + "\n"  # depth 0: the first needle opens the document
        start = s["document_span"][0]
        assert s["problem"][start:].startswith(first + order[0][:200])
    assert tasks.needle_samples(NEEDLES, 6000, CharTokenizer(), seed=0, n=2) == samples[:2]
    other_seed = tasks.needle_samples(NEEDLES, 6000, CharTokenizer(), seed=1, n=1)[0]
    assert other_seed["problem"] != samples[0]["problem"]


def test_needle_depths():
    assert tasks.needle_depths(11) == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 100.0]
    assert tasks.needle_depths(3) == [0.0, 50.0, 100.0] and tasks.needle_depths(1) == [50.0]


# (haystack length, needle lengths, depths, expected offsets): int(L * depth / 100) of the haystack,
# shifted by the needles already inserted
INSERTIONS = [
    (100, [1, 2, 1], [0, 50, 100], [0, 51, 103]),
    (10, [3, 3], [0, 0], [0, 3]),
    (7, [1, 1, 1], [33.3, 66.7, 99.9], [2, 5, 8]),  # int() rounds down: 2.331 -> 2, 4.669 -> 4, 6.993 -> 6
    (0, [2, 2], [0, 100], [0, 2]),
]


@pytest.mark.parametrize("length, sizes, depths, expected", INSERTIONS)
def test_needles_are_inserted_at_token_offsets(length, sizes, depths, expected):
    haystack = list(range(length))
    needle_ids = [[-(i + 1)] * k for i, k in enumerate(sizes)]
    tokens, offsets = tasks.insert_needles(haystack, needle_ids, depths)
    assert offsets == expected
    assert len(tokens) == length + sum(sizes) and [t for t in tokens if t >= 0] == haystack
    for ids, o in zip(needle_ids, offsets):
        assert tokens[o : o + len(ids)] == ids


@needs_needles
def test_needle_prompt_construction_in_tokens():
    target = 8000
    s = tasks.needle_samples(NEEDLES, target, CharTokenizer(), seed=0)[0]
    problem, (start, end) = s["problem"], s["document_span"]
    assert len(problem) == s["n_tokens"] == target  # the fixed part is measured: the user turn fits exactly
    document = problem[start:end]
    assert problem[:start].endswith("<Document>\n") and problem[end:].startswith("\n</Document>")
    wrapped = ["\n" + nd["needle"] + "\n" for nd in s["needles"]]
    hay = len(document) - sum(map(len, wrapped))
    shift = 0
    for nd, w in zip(s["needles"], wrapped):
        assert nd["token_offset"] == int(hay * nd["depth"] / 100) + shift  # char tokens: exact
        assert document[nd["token_offset"] : nd["token_offset"] + len(w)] == w
        assert problem[nd["position"] : nd["position"] + len(nd["needle"])] == nd["needle"]
        assert problem.count(nd["needle"]) == 1
        shift += len(w)
    assert [nd["depth"] for nd in s["needles"]] == tasks.needle_depths(11)
    assert document.endswith(wrapped[-1])  # depth 100: after the last haystack token
    # all questions at once after the document, and the answer format asked for
    tail = problem[end:]
    for i, nd in enumerate(s["needles"], 1):
        assert f"{i}. {nd['retrieval_question'].split('?')[0]}?" in tail
        assert nd["retrieval_question"].split("'")[1].split(".")[0] in tail
    # the paper's length rule: haystack = target - buffer - needle tokens
    paper = tasks.needle_samples(NEEDLES, target, CharTokenizer(), seed=0, length_buffer=3000)[0]
    assert paper["document_span"][1] - paper["document_span"][0] == target - 3000


@needs_needles
def test_needle_lengths_in_the_model_tokens(model_tokenizer):
    for target in (1024, 4096):
        s = tasks.needle_samples(NEEDLES, target, model_tokenizer, seed=0)[0]
        assert abs(len(model_tokenizer.encode(s["problem"])) - target) <= 0.01 * target
        start, _ = s["document_span"]
        for nd in s["needles"]:
            before = len(model_tokenizer.encode(s["problem"][start : nd["position"] - 1]))
            assert abs(before - nd["token_offset"]) <= 3, (nd["depth"], before, nd["token_offset"])


@needs_needles
def test_needle_scorer_is_case_sensitive_and_per_depth():
    sample = tasks.needle_samples(NEEDLES, 3000, CharTokenizer(), seed=0)[0]
    nds = sample["needles"]
    answer = "; ".join(
        f"It is {nd['arg2']}" if i % 2 == 0 else f"It is {nd['arg2'].lower()}" for i, nd in enumerate(nds)
    )
    r = tasks.score_needles(answer, sample)
    assert r["found"] == [i % 2 == 0 for i in range(11)]  # the lowercased keywords do not count
    assert r["score"] == pytest.approx(6 / 11)
    assert r["per_depth"] == {nd["depth"]: float(i % 2 == 0) for i, nd in enumerate(nds)}
    assert tasks.score_needles(answer.upper(), sample)["score"] == 0.0
    full = tasks.score_needles(" ".join(nd["arg2"] for nd in nds), sample)
    none = tasks.score_needles(None, sample)
    assert full["score"] == 1.0 and none["score"] == 0.0 and not any(none["found"])
    agg = tasks.aggregate_needles([r, full, none])
    assert agg["score"] == pytest.approx(100 * (6 / 11 + 1 + 0) / 3)
    assert agg["per_depth"][0.0] == pytest.approx(200 / 3)
    assert agg["per_depth"][10.0] == pytest.approx(100 / 3)
    with pytest.raises(ValueError, match="needs the sample"):
        tasks.score_needles("x", None)


@needs_needles
def test_needle_samples_errors():
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="too short"):
        tasks.needle_samples(NEEDLES, 1500, tok, seed=0)
    with pytest.raises(ValueError, match="longer than the whole haystack"):
        tasks.needle_samples(NEEDLES, 3_000_000, tok, seed=0)
    with pytest.raises(FileNotFoundError, match="needles.jsonl"):
        tasks.needle_samples(DATA / "nowhere", 4000, tok, seed=0)


# ----------------------------------------------------------------------------- LongProc rules

GOLD = "Name\tCity\nBlue Bar\tOslo\nRed Cafe\tLyon\n"
FULL = {"precision": 1.0, "recall": 1.0, "f1": 1.0, "extracted": 1.0}
NONE = {"precision": 0.0, "recall": 0.0, "f1": 0.0, "extracted": 0.0}


def prf(p, r):
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0, "extracted": 1.0}


# (rule, prediction, gold, expected scores): one row per rule of LongProc's evaluator
TSV_RULES = [
    (
        "fence: first ```tsv to the LAST ``` (greedy)",
        "Sure:\n```tsv\nName\tCity\nBlue Bar\tOslo\n```\nand\n```\nRed Cafe\tLyon\n```",
        GOLD,
        prf(2 / 5, 1.0),
    ),  # the inner ```, "and", ``` lines are three rows of N/A
    (
        "fence: an unclosed ```tsv keeps what follows",
        "```tsv\nName\tCity\nBlue Bar\tOslo\nRed Cafe\tLyon",
        GOLD,
        FULL,
    ),
    ("fence: no ```tsv keeps the whole answer", "Name\tCity\nRed Cafe\tLyon", GOLD, prf(1.0, 0.5)),
    (
        "fence: a bare ``` line becomes the header (width 1: nothing comparable)",
        "```\nName\tCity\nBlue Bar\tOslo\nRed Cafe\tLyon\n```",
        GOLD,
        NONE,
    ),
    (
        "strip: outer blank lines and spaces go",
        "\n\n  Name\tCity\nBlue Bar\tOslo\nRed Cafe\tLyon\n\n  ",
        GOLD,
        FULL,
    ),
    (
        "csv reader: a quoted cell may hold a tab",
        'Name\tCity\n"Blue\tBar"\tOslo',
        'Name\tCity\n"Blue\tBar"\tOslo',
        FULL,
    ),
    (
        "csv reader: quotes around a cell are not part of it",
        'Name\tCity\n"Blue Bar"\tOslo\nRed Cafe\t"Lyon"',
        GOLD,
        FULL,
    ),
    ("a blank line is a row of N/A", "Name\tCity\nBlue Bar\tOslo\n\nRed Cafe\tLyon", GOLD, prf(2 / 3, 1.0)),
    (
        "a row of the wrong width is a row of N/A",
        "Name\tCity\nBlue Bar\nRed Cafe\tLyon\n",
        GOLD,
        prf(0.5, 0.5),
    ),
    (
        "a row with an extra cell is a row of N/A",
        "Name\tCity\nBlue Bar\tOslo\tx\nRed Cafe\tLyon",
        GOLD,
        prf(0.5, 0.5),
    ),
    (
        "N/A rows equal each other and a written N/A row",
        "Name\tCity\nBlue Bar\nRed Cafe\tLyon",
        "Name\tCity\nn/a\tN/A\nRed Cafe\tLyon",
        FULL,
    ),
    (
        "set matching: a repeated right row counts each time",
        "Name\tCity\nBlue Bar\tOslo\nBlue Bar\tOslo",
        GOLD,
        prf(1.0, 0.5),
    ),
    (
        "set matching: a repeated gold row is found by one prediction",
        "Name\tCity\nBlue Bar\tOslo",
        "Name\tCity\nBlue Bar\tOslo\nBlue Bar\tOslo\nRed Cafe\tLyon",
        prf(1.0, 2 / 3),
    ),
    ("row order does not matter", "Name\tCity\nRed Cafe\tLyon\nBlue Bar\tOslo", GOLD, FULL),
    ("an incomplete last row is dropped", "Name\tCity\nBlue Bar\tOslo\nRed Cafe", GOLD, prf(1.0, 0.5)),
    ("only the last incomplete row is dropped", "Name\tCity\nBlue Bar\tOslo\nRed\nCafe", GOLD, prf(0.5, 0.5)),
    (
        "a closing remark is an incomplete last row",
        "Name\tCity\nBlue Bar\tOslo\nRed Cafe\tLyon\nHope this helps!",
        GOLD,
        FULL,
    ),
    (
        "cells: lowercase, ASCII punctuation removed",
        "Name\tCity\nBLUE BAR!\t(Oslo.)\nRed Cafe\tLyon",
        GOLD,
        FULL,
    ),
    ("cells: a removed hyphen leaves no space", "Name\tCity\nBlue-Bar\tOslo\nRed Cafe\tLyon", GOLD, FULL),
    ("cells: other punctuation stays", "Name\tCity\nBlue Bar\t«Oslo»\nRed Cafe\tLyon", GOLD, prf(0.5, 0.5)),
    ("cells: articles a / an / the go", "Name\tCity\nThe Blue Bar\tOslo\nA Red Cafe\tAn Lyon", GOLD, FULL),
    (
        "cells: an article that is no whole word stays",
        "Name\tCity\nThe-Blue Bar\tOslo\nRed Cafe\tLyonThe",
        GOLD,
        prf(0.0, 0.0),
    ),  # punctuation goes first: "theblue bar" keeps its "the"
    ("cells: doubled spaces collapse", "Name\tCity\nBlue  Bar\tOslo\nRed   Cafe\t Lyon ", GOLD, FULL),
    ("cells: removed spaces do not matter", "Name\tCity\nBlueBar\tOslo\nRedCafe\tLyon", GOLD, FULL),
    ("cells: accents stay", "Name\tCity\nBlue Bar\tOslo\nRed Café\tLyon", GOLD, prf(0.5, 0.5)),
    ("header names do not matter, its width does", "A\tB\nBlue Bar\tOslo\nRed Cafe\tLyon", GOLD, FULL),
    ("a header of another width: not extracted", "Name\tCity\tX\nBlue Bar\tOslo\tx", GOLD, NONE),
    ("a header alone: not extracted", "```tsv\nName\tCity\n```", GOLD, NONE),
    ("no row left after the incomplete one: not extracted", "Name\tCity\nBlue Bar", GOLD, NONE),
    ("a header naming a column twice: not extracted", "Name\tName\nBlue Bar\tOslo", GOLD, NONE),
    (
        "a header naming a column twice: not extracted, however right its rows",
        "Name\tName\nBlue Bar\tOslo\nRed Cafe\tLyon",
        GOLD,
        NONE,
    ),
    (
        "header cells are not normalised: Name and name are two columns",
        "Name\tname\nBlue Bar\tOslo\nRed Cafe\tLyon",
        GOLD,
        FULL,
    ),
    ("an empty answer: not extracted", "", GOLD, NONE),
    ("no answer (None): not extracted", None, GOLD, NONE),
    ("all rows wrong: extracted, F1 0", "Name\tCity\nGreen Pub\tRome", GOLD, prf(0.0, 0.0)),
]


@pytest.mark.parametrize("rule, prediction, gold, expected", TSV_RULES, ids=[r[0] for r in TSV_RULES])
def test_longproc_scorer_rules(rule, prediction, gold, expected):
    assert tasks.score_tsv(prediction, gold) == pytest.approx(expected)


def test_longproc_cell_normalisation():
    """LongProc's `_normalize_answer`: lowercase, ASCII punctuation, whole-word articles, all spaces."""
    assert tasks.normalize_cell("The Blue-Bar  Inc.") == "bluebarinc"
    assert tasks.normalize_cell(" an\tApple a\u00a0day ") == "appleday"  # tabs and Unicode spaces too
    assert tasks.normalize_cell("Theatre Anna") == "theatreanna"  # articles only as whole words
    assert tasks.normalize_cell("Café «Été»") == "café«été»"  # non-ASCII punctuation and accents stay


def test_longproc_scorer_bad_gold_and_aggregate():
    for gold in (None, "Name\tCity", "Name\tCity\nBlue Bar", ""):
        with pytest.raises(ValueError, match="gold TSV"):
            tasks.score_tsv("x", gold)
    with pytest.raises(ValueError, match="prediction must be a string"):
        tasks.score_tsv(3, GOLD)
    results = [tasks.score_tsv(p, GOLD) for p in (GOLD, "Name\tCity\nRed Cafe\tLyon", "no table")]
    agg = tasks.aggregate_tsv(results)
    assert agg == pytest.approx(
        {
            "precision": 200 / 3,
            "recall": 50.0,
            "f1": 100 * (1 + 2 / 3) / 3,
            "extraction_rate": 200 / 3,
            "n": 3,
        }
    )


def test_extract_tsv_fences():
    assert tasks.extract_tsv("a ```tsv\nx\n``` b ``` c") == "x\n``` b"
    assert tasks.extract_tsv("```tsv``` ") == "" and tasks.extract_tsv("``` x ```") == "``` x ```"
    assert tasks.extract_tsv("```tsv\n\tx\n") == "x"


def test_longproc_metrics_reach_the_summary_table():
    """experiment.score_sample -> samples.jsonl fields -> results.summarize -> the table's columns."""
    import experiment
    import results

    config = dict(
        key="full",
        task="longproc",
        method="full",
        label="full",
        budget=None,
        chunk_size=None,
        rank=None,
        bits=None,
        residual=None,
        kv_bits=None,
        sparse=False,
        agreement=1.0,
        kl=0.0,
        oracle_recall=None,
        attention_mass=None,
        device_kv_fraction=1.0,
        bytes_per_step=0.0,
        landmark_error=None,
        key_error=None,
        recall_per_layer=None,
        mass_per_layer=None,
    )
    preds = [GOLD, "Name\tCity\nRed Cafe\tLyon\nGreen Pub\tRome", "no table"]
    rows = [
        dict(config, sample=str(i), **experiment.score_sample("longproc", p, {"gold": GOLD}))
        for i, p in enumerate(preds)
    ]
    (summary,) = results.summarize(rows)
    assert summary["score"] == pytest.approx(100 * (1 + 0.5) / 3)  # F1
    assert summary["precision"] == pytest.approx(100 * 1.5 / 3) and summary["recall"] == pytest.approx(50.0)
    assert summary["extraction_rate"] == pytest.approx(200 / 3) and summary["field_recall"] is None
    table = results.markdown_table([summary], "longproc")
    assert "| F1 | precision | recall | extraction |" in table
    assert "| full | – | 50.0 | 50.0 | 50.0 | 66.7 |" in table


def test_auto_max_new_tokens_uses_the_task_limit():
    from experiment import auto_max_new_tokens

    tok = CharTokenizer()
    with pytest.raises(ValueError, match="no samples"):
        auto_max_new_tokens([], tok)
    assert auto_max_new_tokens([{"gold": "x" * 905, "new_cap": 9216}], tok) == 1024  # 1024/905 x
    assert auto_max_new_tokens([{"gold": "x" * 20000, "new_cap": 9216}], tok) == 9216  # LongProc 8k
    assert auto_max_new_tokens([{"gold": "x" * 20000, "new_cap": 1024}], tok) == 1024
    assert tasks.LONGPROC_MAX_NEW == {"0.5k": 1024, "2k": 3072, "8k": 9216}


# ----------------------------------------------------------------------------- LongProc data


@needs_longproc
@pytest.mark.parametrize("group, count", [("0.5k", 70), ("2k", 189), ("8k", 120)])
def test_longproc_groups_load_with_filled_prompt_and_perfect_gold(group, count):
    loaded = tasks.load_longproc(LONGPROC, group)
    assert len(loaded) == count and all(t["output_length_group"] == group for t in loaded)
    for t in loaded:
        html = (LONGPROC / t["html_path"]).read_text(encoding="utf-8")
        assert t["html"] == html and html in t["problem"]
        assert t["tsv_header"] + "\n{Your TSV output}" in t["problem"]
        assert t["task_description"] in t["problem"]
        for placeholder in ("{html_str}", "{task_topic}", "{task_description}", "{tsv_header}"):
            assert placeholder not in t["problem"].replace(html, "")
        assert t["gt"].startswith(t["tsv_header"])
        assert tasks.score_tsv(t["gt"], t["gt"]) == FULL, t["task_id"]
        assert tasks.score_tsv("Here you go:\n```tsv\n" + t["gt"] + "```\nHope this helps.", t["gt"]) == FULL


@needs_longproc
def test_longproc_default_group_is_the_papers_and_errors(tmp_path):
    assert len(tasks.load_longproc(LONGPROC)) == 120
    with pytest.raises(ValueError, match="unknown LongProc group"):
        tasks.load_longproc(LONGPROC, "4k")
    with pytest.raises(FileNotFoundError, match="html_to_tsv_8k.json"):
        tasks.load_longproc(tmp_path)
    # a gold table that cannot be read fails at load time, naming its task
    shutil.copy(LONGPROC / "prompts.yaml", tmp_path / "prompts.yaml")
    (tmp_path / "page.html").write_text("<p>x</p>")
    task = dict(
        task_id="T1",
        html_path="page.html",
        task_topic="t",
        task_description="d",
        filtering_instruction="",
        tsv_header="Name\tCity",
        gt="Name\tCity\n",
    )
    (tmp_path / "html_to_tsv_2k.json").write_text(json.dumps([task]))
    with pytest.raises(ValueError, match="task T1: the gold table cannot be read"):
        tasks.load_longproc(tmp_path, "2k")
    (tmp_path / "html_to_tsv_2k.json").write_text(json.dumps([]))
    with pytest.raises(ValueError, match="holds no tasks"):
        tasks.load_longproc(tmp_path, "2k")


@needs_longproc
def test_cut_page_keeps_the_instructions_and_the_start_of_the_page():
    tok = CharTokenizer()
    t = tasks.load_longproc(LONGPROC, "0.5k")[0]
    cut = tasks.cut_page(t, 3000, tok)
    assert len(cut["problem"]) == 3000 and cut["page_tokens"] == len(t["html"])
    at = t["problem"].index(t["html"])
    kept = cut["page_tokens_kept"]
    assert cut["problem"] == t["problem"][:at] + t["html"][:kept] + t["problem"][at + len(t["html"]) :]
    assert cut["gt"] == t["gt"]  # the gold keeps every row
    same = tasks.cut_page(t, len(t["problem"]), tok)
    assert same["problem"] == t["problem"] and same["page_tokens_kept"] == same["page_tokens"]
    with pytest.raises(ValueError, match="leaves no room for the page"):
        tasks.cut_page(t, 500, tok)


@needs_longproc
def test_cut_page_fits_the_model_tokens(model_tokenizer):
    t = max(tasks.load_longproc(LONGPROC, "8k")[:4], key=lambda t: len(t["html"]))
    for limit in (2048, 8000):
        cut = tasks.cut_page(t, limit, model_tokenizer)
        n = len(model_tokenizer.encode(cut["problem"]))
        assert limit - 8 <= n <= limit and cut["page_tokens_kept"] < cut["page_tokens"]


def test_prompts_yaml_reader_blocks_and_errors(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("# c\nA: |-\n  one\n\n    two\nB: |\n  x\nC: plain\n")
    assert tasks.read_prompts_yaml(p) == {"A": "one\n\n  two", "B": "x\n", "C": "plain"}
    p.write_text("- a list\n")
    with pytest.raises(ValueError, match="p.yaml: expected templates by name"):
        tasks.read_prompts_yaml(p)
    p.write_text("A: [unclosed\n")
    with pytest.raises(ValueError, match="p.yaml: not valid YAML"):
        tasks.read_prompts_yaml(p)


@needs_longproc
def test_prompts_yaml_reader_matches_pyyaml():
    yaml = pytest.importorskip("yaml")
    path = LONGPROC / "prompts.yaml"
    assert tasks.read_prompts_yaml(path) == yaml.safe_load(path.read_text(encoding="utf-8"))
