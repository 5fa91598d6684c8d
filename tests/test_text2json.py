"""Text2JSON: the paper's scoring rules on hand-made cases, the loader, and the generator."""

import json
import re

import pytest

import text2json
from text2json import aggregate, field_recall, generate, load, score

GOLD = [
    {"name": "Anna Kowal", "profession": "nurse", "city": "Oslo"},
    {"name": "Omar Haddad", "profession": "pilot", "city": "Lyon"},
]
A, B = GOLD
ANNA_NO_CITY = {"name": "Anna Kowal", "profession": "nurse"}


def dumps(objs):
    return json.dumps(objs)


class WordTokenizer:
    """Stand-in tokenizer: one token per word or punctuation mark (~1.3 per word)."""

    def encode(self, text):
        return [len(t) for t in re.findall(r"\w+|[^\w\s]", text)]


@pytest.fixture(scope="module")
def real_tokenizer():
    try:
        from model import load_tokenizer

        return load_tokenizer()
    except Exception as e:  # the default model's files are not on this machine
        pytest.skip(f"default model tokenizer unavailable: {e}")


# ----------------------------------------------------------------------------- scorer rules


def test_exact_match_scores_one_from_string_or_list():
    assert score(dumps(GOLD), dumps(GOLD)) == 1.0
    assert score("Here is the list:\n" + dumps(GOLD) + "\nDone.", GOLD) == 1.0
    assert score(dumps([B, A]), GOLD) == 1.0  # order does not matter, names key the records


def test_missing_key_loses_half():
    assert score(dumps([ANNA_NO_CITY, B]), GOLD) == pytest.approx((0.5 + 1) / 2)


def test_null_value_loses_half():
    assert score(dumps([dict(A, city=None), B]), GOLD) == pytest.approx((0.5 + 1) / 2)


def test_wrong_value_loses_quarter():
    assert score(dumps([dict(A, city="Bergen"), B]), GOLD) == pytest.approx((0.75 + 1) / 2)
    both_wrong = dict(A, city="Bergen", profession="chef")
    assert score(dumps([both_wrong]), GOLD) == pytest.approx(0.5 / 2)  # B missing: 0 of 2
    assert score(dumps([dict(ANNA_NO_CITY, profession=None)]), GOLD) == 0.0  # 1 - 0.5 - 0.5


def test_int_value_equal_as_string():
    gold = [{"name": "The Quiet Tide", "year": "1999", "genre": "drama"}]
    assert score('[{"name": "The Quiet Tide", "year": 1999, "genre": "drama"}]', gold) == 1.0
    assert score('[{"name": "The Quiet Tide", "year": 1998, "genre": "drama"}]', gold) == 0.75


def test_extra_object_adds_to_denominator():
    extra = {"name": "Nobody Here", "profession": "chef", "city": "Cork"}
    assert score(dumps(GOLD + [extra]), GOLD) == pytest.approx(2 / 3)
    # objects without a usable name are extras too
    assert score(dumps(GOLD + [{"profession": "chef"}]), GOLD) == pytest.approx(2 / 3)
    assert score(dumps(GOLD + [dict(A, name=7)]), GOLD) == pytest.approx(2 / 3)
    assert score(dumps(GOLD + ["Anna Kowal"]), GOLD) == pytest.approx(2 / 3)


def test_repeated_predicted_name_counts_as_extra():
    assert score(dumps([A, A, B]), GOLD) == pytest.approx(2 / 3)
    # the first occurrence is the one matched: a worse repeat does not lower the match
    assert score(dumps([A, dict(A, city="Cork"), B]), GOLD) == pytest.approx(2 / 3)


def test_unparseable_list_scores_zero():
    assert score('[{"name": "Anna Kowal", "profession": "nurse",}]', GOLD) == 0.0
    assert score("no list at all", GOLD) == 0.0
    assert score(dumps(GOLD)[:-1], GOLD) == 0.0  # never closed


def test_two_open_brackets_score_zero():
    assert score(dumps(GOLD) + " and [", GOLD) == 0.0
    # a bracket inside a value also breaks the format rule, as in the paper
    assert score(dumps([dict(A, city="Oslo [NO]"), B]), GOLD) == 0.0


def test_close_before_open_scores_zero():
    assert score("] " + dumps(GOLD)[1:-1] + " [", GOLD) == 0.0


def test_typographic_apostrophe_is_normalised():
    gold = [{"name": "Liam O’Brien", "profession": "baker", "city": "Cork"}]
    assert score('[{"name": "Liam O\'Brien", "profession": "baker", "city": "Cork"}]', gold) == 1.0
    assert score('[{"name": "Liam O’Brien", "profession": "baker", "city": "Cork"}]', json.dumps(gold)) == 1.0
    gold_value = [{"name": "X", "profession": "baker’s aide", "city": "Cork"}]
    assert score('[{"name": "X", "profession": "baker\'s aide", "city": "Cork"}]', gold_value) == 1.0


def test_apostrophe_written_as_json_escape_scores_like_the_character():
    gold = [
        {"name": "Liam O’Brien", "profession": "baker’s aide", "city": "Cork"},
        {"name": "Ana D’Souza", "profession": "pilot", "city": "Oslo"},
    ]
    escaped = json.dumps(gold)  # ensure_ascii: every ’ written as \u2019
    assert "\\u2019" in escaped and "’" not in escaped
    assert score(escaped, gold) == 1.0  # the raw-text-only normalisation scored 1/3 here
    assert score(escaped, escaped) == 1.0 and score(json.dumps(gold, ensure_ascii=False), escaped) == 1.0
    assert field_recall(escaped, gold) == 1.0
    # the [ ... ] slice is still taken from the raw text: an escaped bracket is not a bracket
    city = json.dumps([dict(gold[0], city="Cork (1)"), gold[1]]).replace("(1)", r"\u005b1\u005d")
    assert "[" not in city[1:-1]
    assert score(city, gold) == pytest.approx((0.75 + 1) / 2)  # one list, and the city "Cork [1]" differs


# (prediction objects, gold records, score): values that are not strings compare as their JSON text
VALUE_TYPES = [
    ([{"name": "N", "a": 1.5, "b": "x"}], [{"name": "N", "a": "1.5", "b": "x"}], 1.0),
    ([{"name": "N", "a": 2.0, "b": "x"}], [{"name": "N", "a": "2", "b": "x"}], 0.75),  # 2.0 is "2.0"
    ([{"name": "N", "a": True, "b": "x"}], [{"name": "N", "a": "true", "b": "x"}], 1.0),
    ([{"name": "N", "a": True, "b": "x"}], [{"name": "N", "a": "True", "b": "x"}], 0.75),
    ([{"name": "N", "a": False, "b": "x"}], [{"name": "N", "a": "x", "b": "x"}], 0.75),  # false is a value
    # a list value writes a second "[": the format rule (exactly one) gives the whole answer 0
    ([{"name": "N", "a": ["p", "q"], "b": "x"}], [{"name": "N", "a": '["p", "q"]', "b": "x"}], 0.0),
    ([{"name": "N", "a": {"k": 1}, "b": "x"}], [{"name": "N", "a": {"k": 1}, "b": "x"}], 1.0),
    ([{"name": "N", "a": {"k": 1}, "b": "x"}], [{"name": "N", "a": '{"k": 1}', "b": "x"}], 1.0),
    ([{"name": "N", "a": {"k": 1}, "b": "x"}], [{"name": "N", "a": "k: 1", "b": "x"}], 0.75),
    ([{"name": "N", "a": "p, q", "b": "x"}], [{"name": "N", "a": ["p", "q"], "b": "x"}], 0.75),  # gold list
    ([{"name": "N", "a": "1999", "b": "x"}], [{"name": "N", "a": 1999, "b": "x"}], 1.0),  # gold int
    ([{"name": "N", "a": {}, "b": None}], [{"name": "N", "a": "x", "b": "x"}], 0.25),  # {} differs, null -0.5
    ([{"name": "N", "a": "x", "b": "x", "extra": 7}], [{"name": "N", "a": "x", "b": "x"}], 1.0),
    (["N", 3, None, True, {"name": "N", "a": "x", "b": "x"}], [{"name": "N", "a": "x", "b": "x"}], 1 / 5),
    ([{"name": {"n": "N"}, "a": "x", "b": "x"}], [{"name": "N", "a": "x", "b": "x"}], 0.0),  # not a name
    ([], [], 1.0),  # empty gold, empty list: nothing to miss
    ([{"name": "N", "a": "x", "b": "x"}], [], 0.0),  # empty gold: every object is an extra
]


@pytest.mark.parametrize("pred, gold, expected", VALUE_TYPES)
def test_value_types_and_items_have_defined_scores(pred, gold, expected):
    assert score(json.dumps(pred), gold) == pytest.approx(expected)
    assert score(json.dumps(pred), json.dumps(gold)) == pytest.approx(expected)


def test_empty_gold_text_without_a_list_scores_zero():
    assert score("I found nothing.", []) == 0.0
    assert field_recall("I found nothing.", []) == 1.0  # nothing to recall


def test_none_prediction_scores_zero_and_none_gold_is_an_error():
    for gold in (GOLD, dumps(GOLD), []):
        assert score(None, gold) == 0.0 and field_recall(None, gold) == 0.0
    assert aggregate([None], [GOLD])["score"] == 0.0
    for fn in (score, field_recall):
        with pytest.raises(ValueError, match="gold answer is None"):
            fn("[]", None)
        with pytest.raises(ValueError, match="prediction must be a string"):
            fn(42, GOLD)
    with pytest.raises(ValueError, match="gold answer is None"):
        text2json.has_duplicate_names(None)


def test_empty_prediction_list_scores_zero():
    assert score("[]", GOLD) == 0.0


def test_aggregate_excludes_duplicate_gold_names():
    dup = [A, dict(A, city="Bergen"), B]
    assert text2json.has_duplicate_names(dup) and not text2json.has_duplicate_names(GOLD)
    preds = [dumps(GOLD), dumps([A]), dumps(dup)]
    agg = aggregate(preds, [dumps(GOLD), GOLD, dup])
    assert agg["n"] == 2 and agg["excluded"] == 1
    assert agg["score"] == pytest.approx(100 * (1.0 + 0.5) / 2)
    assert agg["per_sample"] == [1.0, 0.5, None]
    with pytest.raises(ValueError, match="predictions"):
        aggregate(preds[:2], [GOLD] * 3)


def test_field_recall_credits_a_truncated_list():
    gold = GOLD + [{"name": "Ivan Berg", "profession": "tailor", "city": "Perth"}]
    truncated = dumps(gold)[:-30]  # the third object is cut mid-way, no closing bracket
    assert score(truncated, gold) == 0.0
    assert field_recall(truncated, gold) == pytest.approx(6 / 9)
    assert field_recall(dumps([dict(A, city="Cork"), B]), gold) == pytest.approx(5 / 9)
    assert field_recall(dumps(gold) + " [extra [brackets]", gold) == 1.0
    assert field_recall("I could not find any.", gold) == 0.0


def test_bad_gold_is_a_clear_error():
    with pytest.raises(ValueError, match="gold answer is not valid JSON"):
        score("[]", "not json")
    for bad in ([{"city": "Oslo"}], [{"name": 3}], {"name": "x"}, ["x"]):
        with pytest.raises(ValueError, match="gold answer must be a JSON list of objects"):
            score("[]", bad)


# ----------------------------------------------------------------------------- loader


def test_load_keeps_fields_and_names_bad_lines(tmp_path):
    good = tmp_path / "t.jsonl"
    good.write_text(json.dumps({"problem": "p", "answer": dumps(GOLD), "id": 3}) + "\n\n")
    assert load(good) == [{"problem": "p", "answer": dumps(GOLD), "id": 3}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "p", "answer": "[]"}) + "\n{broken\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        load(bad)
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"problem": "p"}) + "\n")
    with pytest.raises(ValueError, match=r"missing\.jsonl:1.*answer"):
        load(missing)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load(tmp_path / "nowhere.jsonl")


def row(problem="p", answer=None, **extra):
    return json.dumps({"problem": problem, "answer": dumps(GOLD) if answer is None else answer, **extra})


# (file content, the error message's first words): every bad --data is refused at load time
BAD_DATA = [
    (row(answer=GOLD) + "\n", "t.jsonl:1: sample '0': 'answer' must be a JSON string"),
    (row(problem=None) + "\n", "t.jsonl:1: sample '0': 'problem' must be a non-empty string"),
    (row(problem="  ") + "\n", "t.jsonl:1: sample '0': 'problem' must be a non-empty string"),
    (row(id=7) + "\n" + row(id=7) + "\n", "t.jsonl:2: duplicate sample id '7'"),
    (row(id="1") + "\n" + row() + "\n", "t.jsonl:2: duplicate sample id '1'"),  # row 2's id is its index
    ("", "t.jsonl holds no samples"),
    ("\n\n", "t.jsonl holds no samples"),
    (row() + "\n" + row(answer="[{broken") + "\n", "t.jsonl:2: sample '1': gold answer is not valid JSON"),
    (
        row(answer='[{"city": "Oslo"}]', id="x9") + "\n",
        "t.jsonl:1: sample 'x9': gold answer must be a JSON list of objects",
    ),
    (b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary", "t.jsonl:1: not UTF-8 text"),
]


class CharTokenizer:
    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))


@pytest.mark.parametrize("content, message", BAD_DATA)
def test_bad_data_is_one_line_error_at_load_time(tmp_path, monkeypatch, capsys, content, message):
    import evaluate

    path = tmp_path / "t.jsonl"
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    with pytest.raises(ValueError) as e:
        load(path)
    assert str(e.value).startswith(f"{path.parent}/{message}") and "\n" not in str(e.value)
    # the same through the command line: one error line, exit 2, before any model is loaded
    monkeypatch.setattr(evaluate, "load_tokenizer", lambda *a, **k: CharTokenizer())
    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    rc = evaluate.main(["--data", str(path), "--n", "1", "--methods", "full", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: {path.parent}/{message}") and "Traceback" not in err
    assert err.count("\n") == 1


def test_load_ids_and_a_valid_file(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(row(id=5) + "\n" + row() + "\n" + row(id="a") + "\n")
    rows = load(path)
    assert [text2json.sample_id(r, i) for i, r in enumerate(rows)] == ["5", "1", "a"]


# ----------------------------------------------------------------------------- generator


def _text_of(problem):
    return problem.split("Text:\n", 1)[1].rsplit("\n\nList every", 1)[0]


def test_generator_is_deterministic_per_seed():
    tok = WordTokenizer()
    a, b = generate(4, 1024, tok, seed=3), generate(4, 1024, tok, seed=3)
    assert a == b
    c = generate(4, 1024, tok, seed=4)
    assert all(x["problem"] != y["problem"] for x, y in zip(a, c))


def test_generator_records_are_stated_and_score_one():
    samples = generate(8, 2048, WordTokenizer(), seed=0)
    assert {s["domain"] for s in samples} == set(text2json.DOMAINS) and len(text2json.DOMAINS) >= 4
    for s in samples:
        gold = json.loads(s["answer"])
        keys = text2json.DOMAINS[s["domain"]]["keys"]
        text = _text_of(s["problem"])
        sentences = re.split(r"(?<=\.)\s+", text)
        assert len(gold) == s["n_records"] >= 8
        assert len({r["name"] for r in gold}) == len(gold)  # names unique
        positions = []
        for r in gold:
            assert tuple(r) == keys and keys[0] == "name"
            assert all(isinstance(v, str) and 1 <= len(v.split()) <= 4 for v in r.values())
            stating = [x for x in sentences if r["name"] in x]
            assert len(stating) == 1, (r, stating)  # one sentence, holding all three fields
            assert all(v in stating[0] for v in r.values())
            positions.append(text.index(stating[0]))
        assert positions == sorted(positions)  # gold lists records in text order
        # non-records are named in the text but are not in the gold, and state no fields
        assert s["non_records"]
        for name in s["non_records"]:
            assert name in text and name not in s["answer"]
        assert s["problem"].endswith("Answer with only the JSON list.")
        assert score(s["answer"], s["answer"]) == 1.0
        assert field_recall(s["answer"], s["answer"]) == 1.0


@pytest.mark.parametrize("target", [1024, 4096, 16384, 32768])
def test_generator_length_stand_in_tokenizer(target):
    tok = WordTokenizer()
    for s in generate(4, target, tok, seed=1):
        n = len(tok.encode(s["problem"]))
        assert n == s["n_tokens"] and abs(n - target) <= 0.1 * target
        assert 150 <= n / s["n_records"] <= 250  # about one record per ~200 tokens


@pytest.mark.parametrize("target", [1024, 4096, 16384])
def test_generator_length_default_model_tokenizer(real_tokenizer, target):
    for s in generate(4, target, real_tokenizer, seed=0):
        n = len(real_tokenizer.encode(s["problem"]))
        assert abs(n - target) <= 0.1 * target, (s["domain"], n)


def test_generator_rejects_bad_arguments():
    with pytest.raises(ValueError, match="too short"):
        generate(1, 100, WordTokenizer(), seed=0)
    with pytest.raises(ValueError, match="unknown domain"):
        generate(1, 1024, WordTokenizer(), seed=0, domains=["recipes"])
