"""The paper's other benchmarks: NeedleBench v2 parallel retrieval and LongProc HTML->TSV.

Multi-needle retrieval is the *easy* case for sparse KV selection: each answer needs one sentence
of the prompt. LongProc HTML->TSV is context-intensive like Text2JSON: every row of a web page must
be copied out. The paper contrasts the two (near-lossless on the first, large drops on the second).

    samples = needle_samples(NEEDLE_DIR, 4096, tokenizer, seed=0, n=5)   # the paper's 11 needles
    r = score_needles(prediction, samples[0])      # {"score", "per_depth", "found"}
    tasks = load_longproc(LONGPROC_DIR, "8k")      # 120 tasks: "problem", "gt", ...
    task = cut_page(tasks[0], 8000, tokenizer)     # the page's end cut so the prompt fits 8000 tokens
    m = score_tsv(prediction, task["gt"])          # {"precision", "recall", "f1", "extracted"}

Data is never bundled: every loader takes the directory of the user's copy (layout and field names:
the README's "Data" section); NEEDLE_DIR and LONGPROC_DIR are only convenience defaults.
"""

import csv
import json
import random
import re
import string
from pathlib import Path

import yaml

from files import data_dir, read_jsonl
from text2json import span_tokens

_SHARED = data_dir()
NEEDLE_DIR = _SHARED / "needlebench"  # a convenience default only
LONGPROC_DIR = _SHARED / "longproc_html_to_tsv"  # a convenience default only

N_NEEDLES = 11  # PAPER.md "Benchmarks": NeedleBench v2 parallel retrieval, 11 needles at depths 0-100%
PAPER_LENGTH_BUFFER = 3000  # the paper's haystack: 128000 - 3000 - needle tokens


def _read_jsonl(path):
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} not found (point the loader at your copy of the data)")
    return read_jsonl(path)


# ----------------------------------------------------------------------------- multi-needle


def load_needles(data_dir=NEEDLE_DIR, language="English"):
    """The needles of one language from `needles.jsonl`, in file order (fields `needle`,
    `retrieval_question`, `gold_standard_answer`, `arg1`, `arg2`, ...)."""
    needles = [r for r in _read_jsonl(Path(data_dir) / "needles.jsonl") if r.get("language") == language]
    if not needles:
        raise ValueError(f"no {language} needles in {Path(data_dir) / 'needles.jsonl'}")
    return needles


def load_essays(data_dir=NEEDLE_DIR):
    """The Paul Graham essays' texts, as stored (the haystack is their concatenation)."""
    return [e["text"] for e in _read_jsonl(Path(data_dir) / "PaulGrahamEssays.jsonl")]


def paper_needles(needles, n=N_NEEDLES):
    """The paper's needle set: the first `n` needles in file order whose question subject (`arg1`)
    and keyword (`arg2`) are both new, so no two needles contradict each other or share a keyword
    (PAPER.md, "Confirmed against the authors' code": always the same 11, only their order changes)."""
    picked, subjects, keywords = [], set(), set()
    for nd in needles:
        if nd["arg1"] not in subjects and nd["arg2"] not in keywords:
            picked.append(nd)
            subjects.add(nd["arg1"])
            keywords.add(nd["arg2"])
            if len(picked) == n:
                return picked
    raise ValueError(f"only {len(picked)} needles with distinct questions and keywords exist; asked for {n}")


def needle_depths(n_needles):
    """Evenly spaced depths in percent, first at 0 and last at 100 (a single needle sits
    at 50): 0, 10, ..., 100 for the paper's 11 needles."""
    if n_needles == 1:
        return [50.0]
    return [100.0 * i / (n_needles - 1) for i in range(n_needles)]


def _question(needle):
    """The question part of a needle's `retrieval_question` (it goes on with an answer format)."""
    q = needle["retrieval_question"]
    return q[: q.index("?") + 1] if "?" in q else q


def _answer_format(needle):
    """The answer template quoted in a needle's `retrieval_question` ('The ... was____'), or ''."""
    parts = needle["retrieval_question"].split("'")
    return parts[1].split(".")[0] if len(parts) > 2 else ""


def needle_prompt(document, needles):
    """The user turn: the paper's structure in our own words: the document between tags, then every
    question at once, then the answer format they ask for."""
    questions = " ".join(f"{i}. {_question(nd)}" for i, nd in enumerate(needles, 1))
    formats = "; ".join(f for f in map(_answer_format, needles) if f)
    return (
        "Below is a long document between <Document> tags. Read all of it, then answer the questions "
        "that follow from what it says.\n\n"
        f"<Document>\n{document}\n</Document>\n\n"
        f"Using only the document above, answer these {len(needles)} questions: {questions}\n"
        f"Reply in this format: '{formats}'"
    )


def insert_needles(haystack, needle_ids, depths):
    """Token lists: the haystack with needle i inserted at int(len(haystack) * depth_i / 100) tokens
    of the *haystack*, shifted by the needles inserted before it (the paper's rule: depth 0 is the
    first token, depth 100 the end). Returns (tokens, the token offset of each needle)."""
    points = [int(len(haystack) * d / 100) for d in depths]
    tokens, offsets, shift = list(haystack), [], 0
    for ids, p in zip(needle_ids, points):
        at = min(p + shift, len(tokens))
        tokens[at:at] = ids
        offsets.append(at)
        shift += len(ids)
    return tokens, offsets


class BadLength(ValueError):
    """No prompt of the length asked for can be made from the data (too short for the needles, longer
    than the haystack)."""


def needle_samples(data_dir, target_tokens, tokenizer, seed=0, n=1, n_needles=N_NEEDLES, length_buffer=None):
    """`n` parallel-retrieval prompts of about `target_tokens` tokens, built as the paper builds
    them (PAPER.md, "Confirmed against the authors' code", NeedleBench v2).

    Every prompt holds the same needles (`paper_needles`), only their order shuffled per prompt;
    the essays are shuffled per prompt, each tokenized and their tokens concatenated, and cut to
    `target_tokens - length_buffer - needle tokens`; needle i, wrapped in newlines, is inserted at
    the token offset of depth i (`needle_depths`, `insert_needles`) and the tokens are decoded back to
    the document. Prompt r of seed 0 shuffles with `random.Random(r)`, the paper's per-repeat seed.

    Tokens are the *model's* (`tokenizer`: anything with encode(text) -> ids and decode(ids) ->
    text): the paper counts GPT-4 (tiktoken) tokens, whose tokenizer cannot be loaded offline, so a
    depth or a length here is in the evaluated model's tokens. `length_buffer` None (default) is the
    prompt's own fixed part (instructions and questions), so the user turn is about `target_tokens`
    long; the paper's setting is target_tokens=128000, length_buffer=PAPER_LENGTH_BUFFER.

    Each sample: `problem`, `needles` (the needle records plus `depth` in percent, `token_offset` in
    the document's tokens and `position`, the char offset of the needle sentence in `problem`),
    `document_span` (char start, end of the document inside `problem`), `n_tokens` (of `problem`).
    """
    data_dir = data_dir or NEEDLE_DIR
    chosen, essays = paper_needles(load_needles(data_dir), n_needles), load_essays(data_dir)
    depths = needle_depths(n_needles)
    samples = []
    for s in range(n):
        rng_seed = s + 1_000_003 * seed
        order, needles = list(essays), list(chosen)
        random.Random(rng_seed).shuffle(order)
        random.Random(rng_seed).shuffle(needles)
        needle_ids = [tokenizer.encode("\n" + nd["needle"] + "\n") for nd in needles]
        buffer = len(tokenizer.encode(needle_prompt("", needles))) if length_buffer is None else length_buffer
        hay_len = target_tokens - buffer - sum(map(len, needle_ids))
        if hay_len < 10 * n_needles:
            raise BadLength(
                f"a {target_tokens}-token NeedleBench prompt is too short for {n_needles} needles and their "
                f"questions ({buffer} + {sum(map(len, needle_ids))} tokens before any haystack): ask for a "
                "longer prompt"
            )
        haystack = []
        for text in order:
            haystack += tokenizer.encode(text)
            if len(haystack) >= hay_len:
                break
        else:
            raise BadLength(
                f"a {target_tokens}-token NeedleBench prompt is longer than the whole haystack "
                f"({len(haystack)} tokens): ask for a shorter prompt"
            )
        tokens, offsets = insert_needles(haystack[:hay_len], needle_ids, depths)
        document = tokenizer.decode(tokens)
        problem = needle_prompt(document, needles)
        start = problem.index("<Document>\n") + len("<Document>\n")
        records, at = [], start
        for nd, d, o in zip(needles, depths, offsets):
            at = problem.find(nd["needle"], at)
            if at == -1:
                raise ValueError(
                    f"needle {nd['arg2']!r} changed when the document was decoded: the tokenizer "
                    "does not give back the text it encoded"
                )
            records.append(dict(nd, depth=d, token_offset=o, position=at))
        samples.append(
            {
                "problem": problem,
                "needles": records,
                "n_tokens": len(tokenizer.encode(problem)),
                "document_span": (start, start + len(document)),
            }
        )
    return samples


def needle_answer(needles):
    """The gold answer of a NeedleBench prompt: each needle's answer on its own numbered line, in the
    order of the questions."""
    return "\n".join(f"{j}. {nd['gold_standard_answer']}" for j, nd in enumerate(needles, 1))


def needle_fact_tokens(needles, tokenizer):
    """(ids of needle_answer(needles), fields): per needle its keyword (`arg2`, what the scorer looks
    for) in its answer line and the tokens that carry it, so a gold-forced decode can measure the
    needles' facts as Text2JSON's (text2json.fact_tokens). A keyword that its answer does not spell
    out gives no tokens. Fields: `record` (the needle), `key` "keyword", `value`, `span`, `tokens`."""
    text, fields = needle_answer(needles), []
    start = 0
    for j, nd in enumerate(needles):
        line = f"{j + 1}. {nd['gold_standard_answer']}"
        at = line.find(nd["arg2"])
        span = (start + at, start + at + len(nd["arg2"])) if at >= 0 else (0, 0)
        fields.append(dict(record=j, key="keyword", value=nd["arg2"], span=span))
        start += len(line) + 1
    return span_tokens(tokenizer, text, fields)


def tsv_fact_tokens(gold, tokenizer):
    """(ids of the gold table, fields): per cell of every row under the header, its characters and the
    tokens that carry them: LongProc's facts are the cells of the rows to extract. Fields: `record` (the
    row, 0 = the first under the header), `key` (its column), `value`, `span`, `tokens`."""
    lines, fields, start = gold.split("\n"), [], 0
    header = lines[0].split("\t")
    start = len(lines[0]) + 1
    for n, line in enumerate(lines[1:]):
        at = start
        for key, cell in zip(header, line.split("\t")):
            fields.append(dict(record=n, key=key, value=cell, span=(at, at + len(cell))))
            at += len(cell) + 1
        start += len(line) + 1
    return span_tokens(tokenizer, gold, fields)


def score_needles(prediction, sample):
    """A needle is found when its `arg2` keyword appears in the answer, case-sensitive, as the
    paper's evaluator counts it. Returns `score` (mean over needles, in [0, 1]), `per_depth`
    ({depth percent: 0.0 or 1.0}) and `found` (one bool per needle). A None prediction (no answer)
    finds nothing; a None sample is a ValueError."""
    if sample is None or not sample.get("needles"):
        raise ValueError("score_needles needs the sample with its needles (got none)")
    if prediction is not None and not isinstance(prediction, str):
        raise ValueError(f"a prediction must be a string (or None), not a {type(prediction).__name__}")
    found = [prediction is not None and nd["arg2"] in prediction for nd in sample["needles"]]
    return {
        "score": sum(found) / len(found),
        "per_depth": {nd["depth"]: float(f) for nd, f in zip(sample["needles"], found)},
        "found": found,
    }


def aggregate_needles(results):
    """Mean of `score_needles` results: `score` and `per_depth` as percentages."""
    per_depth = {}
    for r in results:
        for d, v in r["per_depth"].items():
            per_depth.setdefault(d, []).append(v)
    return {
        "score": 100.0 * sum(r["score"] for r in results) / len(results),
        "per_depth": {d: 100.0 * sum(v) / len(v) for d, v in sorted(per_depth.items())},
        "n": len(results),
    }


# ----------------------------------------------------------------------------- LongProc

LONGPROC_GROUPS = ("0.5k", "2k", "8k")
# new-token limits per output-length group: 8k is the paper's (PAPER.md "Confirmed against the authors'
# code"); 0.5k and 2k are LongProc's own settings (unconfirmed for the paper, which runs 8k only)
LONGPROC_MAX_NEW = {"0.5k": 1024, "2k": 3072, "8k": 9216}


def read_prompts_yaml(path):
    """The templates of LongProc's prompts.yaml ({name: text}), read with PyYAML's safe loader."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (point load_longproc at your LongProc copy)")
    try:
        prompts = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(prompts, dict):
        raise ValueError(
            f"{path}: expected templates by name (a YAML mapping), got a {type(prompts).__name__}"
        )
    return prompts


def load_longproc(data_dir=LONGPROC_DIR, group="8k"):
    """The HTML->TSV tasks of one output-length group (0.5k, 2k or 8k; the paper evaluates 8k), each
    task's fields plus `problem` (prompts.yaml's USER_PROMPT filled with the page and the task's
    fields) and `html` (the page). Every gold table is read here, so a bad one fails at load time
    with its task id."""
    if group not in LONGPROC_GROUPS:
        raise ValueError(f"unknown LongProc group {group!r}: choose from {', '.join(LONGPROC_GROUPS)}")
    data_dir = Path(data_dir or LONGPROC_DIR)
    tasks_path = data_dir / f"html_to_tsv_{group}.json"
    if not tasks_path.is_file():
        raise FileNotFoundError(f"{tasks_path} not found (point load_longproc at your LongProc copy)")
    try:
        tasks = json.loads(tasks_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        reason = getattr(e, "msg", type(e).__name__)
        raise ValueError(f"{tasks_path}: not valid JSON text ({reason})") from None
    template = read_prompts_yaml(data_dir / "prompts.yaml").get("USER_PROMPT")
    if template is None:
        raise ValueError(f"{data_dir / 'prompts.yaml'} has no USER_PROMPT")
    out = []
    for t in tasks:
        html_path = data_dir / t["html_path"]
        if not html_path.is_file():
            raise FileNotFoundError(f"{html_path} not found (task {t['task_id']})")
        if read_table(t["gt"]) is None:
            raise ValueError(
                f"{tasks_path}: task {t['task_id']}: the gold table cannot be read "
                "(it needs a header and at least one row of the header's width)"
            )
        html = html_path.read_text(encoding="utf-8")
        problem = template.format(
            html_str=html,
            task_topic=t["task_topic"],
            task_description=t["task_description"],
            filtering_instruction=t["filtering_instruction"],
            tsv_header=t["tsv_header"],
        )
        out.append(dict(t, problem=problem, html=html))
    if not out:
        raise ValueError(f"{tasks_path} holds no tasks")
    return out


def cut_page(task, max_tokens, tokenizer):
    """The task with its page cut at the end so that `problem` is at most `max_tokens` tokens
    (`tokenizer`: encode and decode). The instructions around the page are kept whole; what goes is
    the page's last tokens, so the rows listed there are missing from the prompt while the gold
    table keeps them (recall cannot reach 1). Adds `page_tokens` (the whole page) and
    `page_tokens_kept`. The paper truncates prompts only beyond 128K tokens (two 8k pages)."""
    problem, html = task["problem"], task["html"]
    if len(tokenizer.encode(problem)) <= max_tokens:
        n = len(tokenizer.encode(html))
        return dict(task, page_tokens=n, page_tokens_kept=n)
    at = problem.index(html)
    before, after = problem[:at], problem[at + len(html) :]
    ids = tokenizer.encode(html)
    keep = max_tokens - len(tokenizer.encode(before)) - len(tokenizer.encode(after))
    for _ in range(8):  # the joins may tokenize a little differently: shrink until it fits
        if keep <= 0:
            raise ValueError(
                f"--tokens {max_tokens} leaves no room for the page of task {task['task_id']}: "
                "its instructions alone are longer"
            )
        text = before + tokenizer.decode(ids[:keep]) + after
        over = len(tokenizer.encode(text)) - max_tokens
        if over <= 0:
            return dict(task, problem=text, page_tokens=len(ids), page_tokens_kept=keep)
        keep -= over
    raise ValueError(f"could not cut the page of task {task['task_id']} to fit {max_tokens} tokens")


def extract_tsv(answer):
    """The table text of an answer, by LongProc's rule: from the first ```tsv to the last ``` after
    it (greedy); an unclosed ```tsv keeps everything after it; with no ```tsv at all the whole
    answer is kept (so a bare ``` fence line becomes the header). Stripped of outer whitespace."""
    start = answer.find("```tsv")
    if start == -1:
        return answer.strip()
    end = answer.rfind("```")
    body = answer[start + 6 : end] if end >= start + 6 else answer[start + 6 :]
    return body.strip()


_PUNCTUATION = str.maketrans("", "", string.punctuation)  # ASCII punctuation only
_ARTICLES = re.compile(r"\b(a|an|the)\b")  # whole words; on a str pattern \b knows Unicode letters


def normalize_cell(cell):
    """A cell as LongProc's HTML->TSV evaluator compares it (its `_normalize_answer`; PAPER.md,
    "LongProc HTML→TSV"), step by step in its order: lowercase; drop every ASCII punctuation
    character (string.punctuation); replace the whole words a / an / the by a space; collapse
    whitespace; remove every space. So "The Blue-Bar  Inc." -> "bluebarinc": cells that differ only
    in case, ASCII punctuation, articles or spacing are equal; other characters stay ("café",
    "«Oslo»"). Punctuation goes before articles, so "The-Bar" is one word, "thebar", with no article
    left to drop."""
    text = cell.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    text = " ".join(text.split())  # every run of whitespace (tabs, Unicode spaces too) -> one space
    return text.replace(" ", "")


def names_a_column_twice(header):
    """Whether a header names a column twice, as written (header cells are not normalised: "Name"
    and "name" are two columns). Such a table is no table for LongProc's evaluator (PAPER.md,
    "LongProc HTML→TSV"): it builds a pandas DataFrame with the header as its columns and normalises
    the cells column by column, by name; a twice-named column selects two columns at once, the
    normalisation fails on them, and the evaluator scores the sample 0 whatever its rows."""
    return len(set(header)) != len(header)


def read_table(text):
    """(header, rows) of a TSV text by LongProc's rules, or None when its evaluator cannot build a
    table from it. The text is stripped and split at newlines, and each line read with Python's csv
    reader (tab delimiter, its default quoting); the first row is the header, kept as written. An
    incomplete last row (a width other than the header's: a cut-off line, a closing remark) is
    dropped; every other row of the wrong width, blank lines included, becomes a row of "N/A".
    Cells are normalised (`normalize_cell`), rows returned as tuples. None: no row left after the
    header, a header that names a column twice (`names_a_column_twice`), or a csv error."""
    try:
        parsed = list(csv.reader(text.strip().split("\n"), delimiter="\t"))
    except csv.Error:
        return None
    header, rows = parsed[0], parsed[1:]
    if rows and len(rows[-1]) != len(header):
        rows = rows[:-1]
    if not rows or names_a_column_twice(header):
        return None
    width = len(header)
    return header, [
        tuple(map(normalize_cell, r)) if len(r) == width else (normalize_cell("N/A"),) * width for r in rows
    ]


def score_tsv(prediction, gold):
    """Row-level precision, recall and F1 of one answer, and whether a table was extracted from it,
    by LongProc's HTML->TSV evaluator (PAPER.md, "Benchmarks"; the rules: `extract_tsv`, `read_table`).

    Rows are matched as a set: a predicted row counts when any gold row equals it cell by cell
    (after normalisation), so a repeated correct row counts each time; a gold row counts when any
    predicted row equals it. Precision = counted predicted rows / predicted rows, recall = counted
    gold rows / gold rows, F1 their harmonic mean (0 when both are 0).

    `extracted` is 1.0 when a table could be extracted from the answer, else 0.0 and all three
    scores are 0 (the extraction rate is its mean): extraction fails when `read_table` gives None
    for the answer's table text, or when its header's width differs from the gold's (the evaluator
    cannot compare rows of different widths). A None prediction (no answer) is not extracted; a
    None or unreadable gold is a ValueError."""
    if gold is None or read_table(gold) is None:
        raise ValueError("gold TSV is missing or unreadable: it needs a header and at least one row")
    if prediction is not None and not isinstance(prediction, str):
        raise ValueError(f"a prediction must be a string (or None), not a {type(prediction).__name__}")
    gold_header, gold_rows = read_table(gold)
    table = None if prediction is None else read_table(extract_tsv(prediction))
    if table is None or len(table[0]) != len(gold_header):
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0, "extracted": 0.0}
    pred_rows = table[1]
    gold_set, pred_set = set(gold_rows), set(pred_rows)
    precision = sum(r in gold_set for r in pred_rows) / len(pred_rows)
    recall = sum(r in pred_set for r in gold_rows) / len(gold_rows)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "extracted": 1.0}


def aggregate_tsv(results):
    """Means of `score_tsv` results as percentages: `precision`, `recall`, `f1` and
    `extraction_rate` (the share of answers a table was extracted from), and `n`."""
    mean = lambda key: 100.0 * sum(r[key] for r in results) / len(results)
    return {
        "precision": mean("precision"),
        "recall": mean("recall"),
        "f1": mean("f1"),
        "extraction_rate": mean("extracted"),
        "n": len(results),
    }
