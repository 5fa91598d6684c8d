"""RULER's synthetic tasks (ruler.py): each generator deterministic under its seed and placing every
needle, value and word where it says; the gold values' tokens found by character offsets; RULER's
scorers on golden cases; and the tasks through evaluate.py (a tiny model), results.py and claims.py."""

import json
import re
from collections import Counter

import pytest

import evaluate
import results
import ruler
from conftest import make_tiny_checkpoint
from files import data_dir

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread
ESSAYS = data_dir() / "needlebench" / "PaulGrahamEssays.jsonl"
needs_essays = pytest.mark.skipif(
    not ESSAYS.is_file(), reason=f"Paul Graham essays not found at {ESSAYS} (set KVOFFLOAD_DATA)"
)
LINE_TASKS = [t for t, s in ruler.TASKS.items() if s["kind"] == "niah" and s["haystack"] != "essay"]
ESSAY_TASKS = [t for t, s in ruler.TASKS.items() if s.get("haystack") == "essay"]


class PieceTokenizer:
    """Stand-in tokenizer: a token is a run of letters, of digits, of spaces, or one other character.
    Its offsets are exact, so lengths and fact tokens can be checked without the model's files."""

    def encode_offsets(self, text):
        spans = [m.span() for m in re.finditer(r"[A-Za-z]+|[0-9]+| +|.", text, re.S)]
        return list(range(len(spans))), spans

    def encode(self, text):
        return self.encode_offsets(text)[0]


TOK = PieceTokenizer()


def gen(task, n=1, tokens=2048, seed=0):
    return ruler.generate(task, n, tokens, TOK, seed=seed, template_tokens=20)


def tasks_for(kinds):
    return [pytest.param(t, marks=needs_essays) if t in ESSAY_TASKS else t for t in kinds]


# ------------------------------------------------------------------------------------ generators
@pytest.mark.parametrize("task", tasks_for(ruler.TASKS))
def test_generators_are_deterministic_and_fill_the_length(task):
    a, b = gen(task, 2), gen(task, 2)
    assert a == b  # the same seed, the same samples
    assert gen(task, 1)[0] == a[0]  # a sample does not depend on how many are drawn
    other = gen(task, 1, seed=1)[0]
    assert other["problem"] != a[0]["problem"] and other["values"] != a[0]["values"]
    for s in a:
        assert s["id"] == f"{task}/{a.index(s)}" and s["task"] == task
        assert s["new_cap"] == ruler.KINDS[ruler.TASKS[task]["kind"]]["tokens_to_generate"]
        counted = 20 + len(TOK.encode(s["problem"])) + len(TOK.encode(s["answer_prefix"])) + s["new_cap"]
        assert s["n_tokens"] == counted <= 2048  # RULER's length: prompt, prefix and answer
        assert s["n_tokens"] > 0.9 * 2048  # the largest haystack that fits, not a small one


@pytest.mark.parametrize("task", tasks_for([t for t, s in ruler.TASKS.items() if s["kind"] == "niah"]))
def test_niah_needles_keys_and_values(task):
    spec = ruler.TASKS[task]
    for s in gen(task, 3):
        inserted = spec["keys"] * spec["values"] if spec["queries"] == 1 else spec["queries"] * spec["values"]
        assert len(s["needles"]) == inserted
        keys = [nd["key"] for nd in s["needles"]]
        assert len(set(keys)) == max(spec["keys"], spec["queries"])  # one key per needle but multivalue
        assert len({nd["value"] for nd in s["needles"]}) == len(s["needles"])  # values never repeat
        for nd in s["needles"]:
            assert nd["text"] == f"One of the special magic {spec['v']} for {nd['key']} is: {nd['value']}."
            assert s["problem"][nd["position"] : nd["position"] + len(nd["text"])] == nd["text"]
            assert s["problem"].count(nd["text"]) == 1
        # the question names the queried keys; the gold is their values, in the question's order
        question = s["problem"].rsplit("\n", 1)[1]
        asked = [k for k in dict.fromkeys(keys) if k in question]
        assert len(asked) == spec["queries"]
        asked.sort(key=question.index)
        per_key = spec["values"]  # the gold: each asked key's values, key after key, in text order
        for j, k in enumerate(asked):
            mine = s["values"][j * per_key : (j + 1) * per_key]
            in_text = sorted((nd["position"], nd["value"]) for nd in s["needles"] if nd["key"] == k)
            assert mine == [v for _, v in in_text]
        assert len(s["values"]) == len(asked) * per_key
        assert s["answer_prefix"].startswith(" The special magic") and question.endswith("text?")
        single = spec["queries"] * spec["values"] == 1
        assert s["problem"].startswith("A special magic" if single else "Some special magic")
        assert s["answer_prefix"].endswith(" is" if single else " are")
        if spec["haystack"] == "needle":  # every haystack line is another needle, keys and values new
            lines = s["problem"].split("\n")[1:-1]
            assert len(lines) == s["n_units"] + len(s["needles"])
            found = [re.fullmatch(r"One of the special magic \S+ for (\S+) is: (\S+)\.", x) for x in lines]
            assert all(found)
            assert len({m[1] for m in found}) == len(lines) and len({m[2] for m in found}) == len(lines)


@pytest.mark.parametrize("task", LINE_TASKS)
def test_line_haystacks_place_needles_at_their_lines(task):
    for s in gen(task, 3):
        lines = s["problem"].split("\n")[1:-1]  # the haystack and its needles
        texts = [nd["text"] for nd in s["needles"]]
        for nd in s["needles"]:
            before = lines[: lines.index(nd["text"])]
            assert sum(x not in texts for x in before) == nd["at"]  # haystack lines before it
            assert nd["depth"] == pytest.approx(100 * nd["at"] / s["n_units"]) and 0 <= nd["depth"] < 100
        assert s["depths"] == [
            next(nd["depth"] for nd in s["needles"] if nd["value"] == v) for v in s["values"]
        ]


@needs_essays
@pytest.mark.parametrize("task", ESSAY_TASKS)
def test_essay_haystack_places_needles_at_ruler_depths(task):
    for s in gen(task, 3, tokens=3000):
        depths = [nd["depth"] for nd in s["needles"]]
        assert depths == sorted(depths) and len(set(depths)) == len(depths)
        assert set(depths) <= set(ruler.DEPTHS)
        context = s["problem"].split("\n")[1]
        for nd in s["needles"]:
            assert nd["at"] == int(s["n_units"] * nd["depth"] / 100)
            before = context[: context.index(nd["text"])]
            for other in s["needles"]:
                before = before.replace(other["text"], "")
            assert len(ruler._sentences(before)) == nd["at"]  # sentences of essay before the needle
        assert s["haystack_units"] > 300  # words of essay


def test_depths_are_rulers_forty_points():
    assert len(ruler.DEPTHS) == 40 and ruler.DEPTHS[:4] == [0, 3, 5, 8] and ruler.DEPTHS[-1] == 100


def test_variable_tracking_chain_and_example():
    for s in gen("vt", 3):
        names, value = s["values"], s["needles"][0]["value"]
        assert len(names) == 5 and len(set(names)) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
        chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(4)]
        assert [nd["text"] for nd in s["needles"]] == chain
        positions = [nd["position"] for nd in s["needles"]]
        assert positions == sorted(positions)  # the chain in order
        example, question = s["problem"].split("\n\nMemorize", 1)
        assert example.startswith("Memorize") and re.search(r"they are:  [A-Z]{3}( [A-Z]{3}){4}$", example)
        assert f"assigned the value {value} in the text above." in question
        assert s["answer_prefix"].endswith(f"5 variables are assigned the value {value}, they are: ")
        assert s["gold"] == " " + " ".join(names)
        assert all(nd["text"] in question for nd in s["needles"])


@pytest.mark.parametrize("tokens, repeats", [(2048, (6, 1)), (6000, (30, 3))])
def test_common_words_counts(tokens, repeats):
    for s in gen("cwe", 2, tokens):
        example, main = s["problem"].split("\nBelow is", 1)
        listed = re.findall(r"\d+\. (\S+)", main.split("\n")[1])
        assert [int(x) for x in re.findall(r"(\d+)\. ", main.split("\n")[1])] == list(
            range(1, len(listed) + 1)
        )
        counts = Counter(listed)
        assert len(counts) == s["haystack_units"]
        assert sorted(counts[w] for w in s["values"]) == [repeats[0]] * 10
        assert all(c == repeats[1] for w, c in counts.items() if w not in s["values"])
        assert s["gold"] == "".join(f" {i + 1}. {w}" for i, w in enumerate(s["values"]))
        assert "Answer: The top 10 words that appear most often in the list are: 1." in example


def test_frequent_words_zipf_counts():
    for s in gen("fwe", 2, 4096):
        text = s["problem"].split("coded words. ", 1)[1].split("\nQuestion", 1)[0]
        counts = Counter(text.split())
        ranked = [w for w, _ in counts.most_common()]
        assert ranked[0] == "..." and ranked[1:4] == s["values"]
        n = s["haystack_units"]
        assert counts["..."] == int(n / ruler.ZETA_2) and counts[s["values"][0]] == int(n / 4 / ruler.ZETA_2)
        assert all(re.fullmatch(r"[a-z]{6}", w) for w in counts if w != "...")


def test_too_short_a_length_is_one_line():
    with pytest.raises(ValueError, match=r"^--tokens 150 is too short for RULER's niah_single_1: ") as err:
        gen("niah_single_1", tokens=150)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unknown RULER task 'niah_single_9'"):
        gen("niah_single_9")


def test_task_names_and_sample_ids():
    assert ruler.task_names("ruler") == list(ruler.TASKS) and len(ruler.TASKS) == 11
    assert ruler.task_names("ruler:vt,cwe") == ["vt", "cwe"]
    for bad, why in [
        ("ruler:", "bad task"),
        ("ruler:qa_1", "unknown RULER task 'qa_1'"),
        ("ruler:vt,vt", "twice"),
    ]:
        with pytest.raises(ValueError, match=why):
            ruler.task_names(bad)
    assert ruler.is_sample_id("vt/3", "ruler") and not ruler.is_sample_id("vt/3", "ruler:cwe")
    assert not ruler.is_sample_id("vt/03", "ruler") and not ruler.is_sample_id("3", "ruler")
    assert ruler.subtask("niah_single_2/10") == "niah_single_2"
    assert results._is_task("ruler:vt,fwe") and not results._is_task("ruler:nope")


# ------------------------------------------------------------------------------------ facts and scores
@pytest.mark.parametrize("task", ["niah_multikey_3", "vt", "cwe", "fwe"])
def test_fact_tokens_are_the_values_tokens(task):
    s = gen(task)[0]
    ids, fields = ruler.fact_tokens(s, TOK)
    _, offsets = TOK.encode_offsets(s["gold"])
    assert len(ids) == len(offsets) and len(fields) == len(s["values"])
    for f, v in zip(fields, s["values"]):
        a, b = f["span"]
        assert s["gold"][a:b] == v == f["value"]
        covered = s["gold"][offsets[f["tokens"][0]][0] : offsets[f["tokens"][-1]][1]]
        assert covered == v  # PieceTokenizer splits at every boundary: exactly the value's tokens
        outside = [t for t in range(len(ids)) if t not in f["tokens"]]
        assert all(offsets[t][1] <= a or offsets[t][0] >= b for t in outside)


def test_fact_tokens_with_the_model_tokenizer():
    try:
        from model import load_tokenizer

        tok = load_tokenizer()
    except Exception as e:  # the default model's files are not on this machine
        pytest.skip(f"default model tokenizer unavailable: {e}")
    s = ruler.generate("niah_multikey_3", 1, 1024, tok)[0]
    ids, (field,) = ruler.fact_tokens(s, tok)
    assert ids == tok.encode(s["gold"])
    assert s["values"][0] in tok.decode([ids[t] for t in field["tokens"]])
    assert field["tokens"][0] <= 1 and field["tokens"][-1] >= len(ids) - 2  # all but the space and '.'


GOLDEN = [  # (prediction, references, string_match_all, string_match_part), RULER's rules
    ("1234567", ["1234567"], 1.0, 1.0),  # present
    (" The number is 7654321.", ["1234567"], 0.0, 0.0),  # absent
    ("1234567 and 2345678", ["1234567", "2345678", "3456789", "4567890"], 0.5, 1.0),  # partial
    ("1234567, 1234567, 1234567", ["1234567", "2345678"], 0.5, 1.0),  # duplicated: counts once
    ("ABCDE abcde", ["abcde"], 1.0, 1.0),  # case-insensitive
    ("Xabcde", ["ABCDE"], 1.0, 1.0),  # a substring anywhere counts, as in RULER
    ("", ["1234567"], 0.0, 0.0),  # nothing written
]


@pytest.mark.parametrize("prediction, refs, all_, part", GOLDEN)
def test_scorers_on_golden_cases(prediction, refs, all_, part):
    assert ruler.string_match_all(prediction, refs) == all_
    assert ruler.string_match_part(prediction, refs) == part


def test_score_reads_the_answer_as_ruler_does():
    s = gen("niah_single_1")[0]
    value = s["values"][0]
    assert ruler.score(s["gold"], s) == 1.0
    assert ruler.score(s["answer_prefix"], s) == 0.0  # the prefix echoed gives nothing by itself
    assert ruler.score(s["answer_prefix"] + s["gold"], s) == 1.0
    assert ruler.score(None, s) == 0.0
    assert ruler.postprocess("  \x00 12\t34\x1f \n") == "12\n34"  # control characters become newlines
    assert ruler.score(f"{value[:3]}\t{value[3:]}", s) == 0.0  # a value split by a tab is not the value
    multi = dict(s, values=["1111111", "2222222", "3333333"])
    assert ruler.score("2222222 and 1111111", multi) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="a prediction must be a string"):
        ruler.score(7, s)


# ------------------------------------------------------------------------------------ evaluate.py
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path, _ = make_tiny_checkpoint("LlamaForCausalLM", tmp_path_factory.mktemp("ckpt") / "llama")
    return path  # 2048 positions, byte-level tokenizer


def test_evaluate_runs_ruler_tasks_resumes_and_tables_them(ckpt, tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["--model", str(ckpt), "--task", "ruler:niah_single_1,vt,cwe", "--tokens", "2048", "--n", "2"]
    argv += ["--methods", "full,quantized", "--workers", "1", "--max-new-tokens", "24", "--out", str(out)]
    assert evaluate.main(argv) == 0
    rows = results.read_rows(out)
    assert {r["sample"] for r in rows} == {f"{t}/{i}" for t in ("niah_single_1", "vt", "cwe") for i in (0, 1)}
    assert all(r["task"] == "ruler:niah_single_1,vt,cwe" and r["fact_tokens"] for r in rows)
    cap = lambda r: ruler.KINDS[ruler.TASKS[ruler.subtask(r["sample"])]["kind"]]["tokens_to_generate"]
    assert all(r["score"] is not None and 0.9 * 2048 < r["prompt_tokens"] + cap(r) <= 2048 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    full = next(s for s in summary if s["method"] == "full")
    assert list(full["per_task"]) == ["niah_single_1", "vt", "cwe"]
    mean = sum(v["fact_accuracy"] for v in full["per_task"].values()) / 3
    assert full["ruler_average"]["fact_accuracy"] == pytest.approx(mean)
    md = (out / "summary.md").read_text()
    assert "| policy | budget | niah_single_1 | vt | cwe | average |" in md and "RULER score" in md
    # two shards merged give the same rows and tables as the one run
    shards = [tmp_path / f"s{i}" for i in (0, 1)]
    for i, d in enumerate(shards):
        assert evaluate.main(argv[:-1] + [str(d), "--shard", f"{i}/2"]) == 0
    assert evaluate.main(["merge", *map(str, shards), "--out", str(tmp_path / "merged")]) == 0
    merged = results.read_rows(tmp_path / "merged")
    key = lambda r: (r["key"], r["sample"])
    assert sorted(merged, key=key) == sorted(rows, key=key)
    tables = lambda d: (d / "summary.md").read_text().split("\n\n", 3)[3]  # after the command line
    assert tables(tmp_path / "merged") == tables(out)
    capsys.readouterr()
    assert evaluate.main(argv) == 0  # resumed: nothing left to do
    assert "skipped 6 of 6 samples: finished" in capsys.readouterr().err
    # a row of a task this run does not have is refused on resume, with one line
    bad = dict(rows[0], sample="fwe/0")
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + [bad]))
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert "'fwe/0' is not a sample of this run" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "task, tokens, message",
    [
        ("ruler:niah_single_1", "2049", "--tokens 2049 does not fit the model's 2048 positions"),
        ("ruler:nope", "1024", "unknown RULER task 'nope'"),
        ("rulers", "1024", "unknown --task 'rulers': choose from text2json, needle, longproc, ruler or"),
        ("ruler:", "1024", "bad task 'ruler:': write ruler, or ruler:NAME"),
        ("ruler:niah_single_1", "150", "--tokens 150 is too short for RULER's niah_single_1"),
    ],
)
def test_evaluate_refuses_with_one_line(ckpt, task, tokens, message, capsys):
    assert evaluate.main(["--model", str(ckpt), "--task", task, "--tokens", tokens, "--n", "1"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1
