"""The paper's other benchmarks: multi-needle retrieval and LongProc HTML->TSV.

Multi-needle retrieval (NeedleBench v2, parallel retrieval) is the *easy* case for sparse
KV selection: each answer needs one sentence of the prompt. LongProc HTML->TSV is
context-intensive like Text2JSON: every row of a web page must be copied out. The paper
contrasts the two (near-lossless on the first, large drops on the second).

    samples = needle_samples("../shared/data/needlebench", 5, 4096, tokenizer, seed=0)
    r = score_needles(prediction, samples[0])      # {"score", "per_depth", "found"}
    tasks = load_longproc("../shared/data/longproc_html_to_tsv")   # 70 tasks, "problem", "gt"
    m = score_tsv(prediction, tasks[0]["gt"])      # {"precision", "recall", "f1"}

Data is never bundled: every loader takes the directory of the user's copy (layout and
field names in ../shared/data/README.md).
"""

import bisect
import json
import random
import re
import unicodedata
from pathlib import Path

from files import data_dir, read_jsonl

_SHARED = data_dir()
NEEDLE_DIR = _SHARED / "needlebench"            # a convenience default only
LONGPROC_DIR = _SHARED / "longproc_html_to_tsv"  # a convenience default only


def _read_jsonl(path):
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} not found (point the loader at your copy of the data)")
    return read_jsonl(path)


# ----------------------------------------------------------------------------- multi-needle

def load_needles(data_dir=NEEDLE_DIR, language="English"):
    """The needles of one language from `needles.jsonl` (fields `needle`,
    `retrieval_question`, `arg1`, `arg2`, ...)."""
    needles = [r for r in _read_jsonl(Path(data_dir) / "needles.jsonl") if r.get("language") == language]
    if not needles:
        raise ValueError(f"no {language} needles in {Path(data_dir) / 'needles.jsonl'}")
    return needles


def load_haystack(data_dir=NEEDLE_DIR):
    """The Paul Graham essays' texts, runs of blank lines squeezed to one."""
    essays = _read_jsonl(Path(data_dir) / "PaulGrahamEssays.jsonl")
    return [re.sub(r"\n{3,}", "\n\n", e["text"]).strip() for e in essays]


def _pick_needles(needles, n, rng):
    """`n` needles with distinct questions (`arg1`) and distinct keywords (`arg2`): two
    needles sharing a question would contradict each other, two sharing a keyword could
    not be scored apart."""
    pool = list(needles)
    rng.shuffle(pool)
    picked, questions, keywords = [], set(), set()
    for nd in pool:
        if nd["arg1"] not in questions and nd["arg2"].lower() not in keywords:
            picked.append(nd)
            questions.add(nd["arg1"])
            keywords.add(nd["arg2"].lower())
            if len(picked) == n:
                return picked
    raise ValueError(f"only {len(picked)} needles with distinct questions and keywords exist; asked for {n}")


def needle_depths(n_needles):
    """Evenly spaced depths in percent, first at 0 and last at 100 (a single needle sits
    at 50), as in NeedleBench's parallel retrieval."""
    if n_needles == 1:
        return [50.0]
    return [100.0 * i / (n_needles - 1) for i in range(n_needles)]


def _needle_prompt(document, needles):
    questions = "\n".join(f"{i}. {nd['retrieval_question']}" for i, nd in enumerate(needles, 1))
    return (
        "Below is a long document. A few sentences hidden in it answer the questions "
        "that follow it.\n\n"
        f"Document:\n{document}\n\n"
        f"Using only the document above, answer each of these {len(needles)} questions. "
        f"Number your answers like the questions.\n{questions}"
    )


def _insert_needles(haystack, cut, needles, depths, starts):
    """The document: haystack[:cut] with needle i put at the sentence start nearest to
    depth_i percent of the *final* document (needles included), so depth 0 is the first
    sentence and depth 100 the last. Returns (document, char offset of each needle)."""
    starts = starts[:bisect.bisect_left(starts, cut)] + [cut]  # sentence starts, then the end
    lengths = [len(nd["needle"]) + 1 for nd in needles]           # needle + one space
    total = cut + sum(lengths)
    places = []
    for i, d in enumerate(depths):
        want = d / 100.0 * (total - lengths[i]) - sum(lengths[:i])  # in haystack coordinates
        j = bisect.bisect_left(starts, want)
        cands = [starts[k] for k in (j - 1, j) if 0 <= k < len(starts)]
        places.append(min(cands, key=lambda p: abs(p - want)))
    places = [max(places[:i + 1]) for i in range(len(places))]      # keep the needles in order
    pieces, offsets, prev, shift = [], [], 0, 0
    for nd, p in zip(needles, places):
        pieces.append(haystack[prev:p])
        shift += p - prev
        text = (nd["needle"] + " ") if p < cut else (" " + nd["needle"])
        offsets.append(shift + (0 if p < cut else 1))
        pieces.append(text)
        shift += len(text)
        prev = p
    pieces.append(haystack[prev:cut])
    return "".join(pieces), offsets


def needle_samples(data_dir, n_needles, target_tokens, tokenizer, seed=0, n=1):
    """`n` parallel-retrieval prompts of `target_tokens` tokens (+-2%) under `tokenizer`.

    Each prompt is a haystack of Paul Graham essays (shuffled per sample) cut at a sentence
    end to fit, with `n_needles` needles at evenly spaced depths and all their questions
    asked at once after it (PAPER.md: NeedleBench v2, parallel retrieval).
    Each sample: `problem`, `needles` (the needle records plus `depth` in percent and
    `position`, the needle's char offset in `problem`), `document_span` (char start, end
    of the document inside `problem`), `n_tokens`.
    """
    data_dir = data_dir or NEEDLE_DIR
    all_needles, essays = load_needles(data_dir), load_haystack(data_dir)
    count = lambda text: len(tokenizer.encode(text))
    depths = needle_depths(n_needles)
    samples = []
    for s in range(n):
        rng = random.Random(f"needles/{seed}/{s}")
        needles = _pick_needles(all_needles, n_needles, rng)
        order = list(range(len(essays)))
        rng.shuffle(order)
        haystack = "\n\n".join(essays[i] for i in order)
        # sentence starts: after ., ! or ? (maybe closed by a quote or bracket) and whitespace
        starts = [0] + [m.end() for m in re.finditer(r"[.!?][\"')\]]?\s+", haystack)]
        base = count(_needle_prompt("", needles)) + sum(count(" " + nd["needle"]) for nd in needles)
        budget = target_tokens - base
        if budget < 50:
            raise ValueError(f"target_tokens={target_tokens} is too short for {n_needles} needles and their questions")
        chars_per_token = len(haystack[:20000]) / count(haystack[:20000])
        cut, best = int(budget * chars_per_token), None
        for _ in range(8):  # fit the cut: measure, move by the missing tokens, keep the best
            if cut > len(haystack):
                raise ValueError(f"target_tokens={target_tokens} is longer than the whole haystack")
            j = bisect.bisect_left(starts, cut)  # end at the nearest sentence end
            cut = min((starts[k] for k in (j - 1, j) if 1 <= k < len(starts)), key=lambda p: abs(p - cut))
            end = len(haystack[:cut].rstrip())
            document, offsets = _insert_needles(haystack, end, needles, depths, starts)
            prompt = _needle_prompt(document, needles)
            n_tokens = count(prompt)
            if best is None or abs(n_tokens - target_tokens) < abs(best[0] - target_tokens):
                best = (n_tokens, prompt, document, offsets)
            if abs(n_tokens - target_tokens) <= 0.02 * target_tokens:
                break
            cut += int((target_tokens - n_tokens) * chars_per_token)
        n_tokens, prompt, document, offsets = best
        if abs(n_tokens - target_tokens) > 0.1 * target_tokens:
            raise ValueError(f"could not fit a {target_tokens}-token needle prompt (got {n_tokens})")
        doc_start = prompt.index("Document:\n") + len("Document:\n")
        records = [dict(nd, depth=d, position=doc_start + o) for nd, d, o in zip(needles, depths, offsets)]
        samples.append({"problem": prompt, "needles": records, "n_tokens": n_tokens,
                        "document_span": (doc_start, doc_start + len(document))})
    return samples


def score_needles(prediction, sample):
    """A needle is found when its `arg2` keyword appears in the answer (case-insensitive),
    as in NeedleBench. Returns `score` (mean over needles, in [0, 1]), `per_depth`
    ({depth percent: 0.0 or 1.0}) and `found` (one bool per needle)."""
    text = prediction.lower()
    found = [nd["arg2"].lower() in text for nd in sample["needles"]]
    return {"score": sum(found) / len(found),
            "per_depth": {nd["depth"]: float(f) for nd, f in zip(sample["needles"], found)},
            "found": found}


def aggregate_needles(results):
    """Mean of `score_needles` results: `score` and `per_depth` as percentages."""
    per_depth = {}
    for r in results:
        for d, v in r["per_depth"].items():
            per_depth.setdefault(d, []).append(v)
    return {"score": 100.0 * sum(r["score"] for r in results) / len(results),
            "per_depth": {d: 100.0 * sum(v) / len(v) for d, v in sorted(per_depth.items())},
            "n": len(results)}


# ----------------------------------------------------------------------------- LongProc

def read_prompts_yaml(path):
    """The templates of a prompts.yaml: top-level `KEY: |-` / `KEY: |` block scalars (or
    `KEY: plain text`). Just enough YAML for LongProc's file, without a YAML dependency;
    anything else is an error rather than a silently wrong prompt."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (point load_longproc at your LongProc copy)")
    out, key, block, style = {}, None, [], None

    def close():
        if key is not None and style is not None:
            indent = min((len(l) - len(l.lstrip(" ")) for l in block if l.strip()), default=0)
            text = "\n".join(l[indent:] for l in block).rstrip("\n")
            out[key] = text if style == "|-" else text + "\n"

    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if style is not None and (line.startswith((" ", "\t")) or not line.strip()):
            block.append(line)
            continue
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z_][\w-]*):\s*(.*)", line)
        if not m:
            raise ValueError(f"{path}:{lineno}: unsupported YAML (only top-level 'KEY: |-' blocks are read)")
        close()
        key, value, block = m.group(1), m.group(2).strip(), []
        if value in ("|", "|-"):
            style = value
        else:
            style = None
            out[key] = value.strip("\"'")
    close()
    return out


def load_longproc(data_dir=LONGPROC_DIR, group="0.5k"):
    """The HTML->TSV tasks of one output-length group, each task's fields plus `problem`:
    prompts.yaml's USER_PROMPT filled with the page's HTML and the task's fields."""
    data_dir = Path(data_dir or LONGPROC_DIR)
    tasks_path = data_dir / f"html_to_tsv_{group}.json"
    if not tasks_path.is_file():
        raise FileNotFoundError(f"{tasks_path} not found (point load_longproc at your LongProc copy)")
    try:
        tasks = json.loads(tasks_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{tasks_path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    template = read_prompts_yaml(data_dir / "prompts.yaml").get("USER_PROMPT")
    if template is None:
        raise ValueError(f"{data_dir / 'prompts.yaml'} has no USER_PROMPT")
    out = []
    for t in tasks:
        html_path = data_dir / t["html_path"]
        if not html_path.is_file():
            raise FileNotFoundError(f"{html_path} not found (task {t['task_id']})")
        problem = template.format(html_str=html_path.read_text(encoding="utf-8"),
                                  task_topic=t["task_topic"], task_description=t["task_description"],
                                  filtering_instruction=t["filtering_instruction"],
                                  tsv_header=t["tsv_header"])
        out.append(dict(t, problem=problem))
    return out


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_cell(cell):
    """Lowercase, drop punctuation (any Unicode P* character), articles and all whitespace
    (../shared/data/README.md), so formatting slips don't count as wrong cells."""
    cell = "".join(ch for ch in cell.lower() if not unicodedata.category(ch).startswith("P"))
    return "".join(_ARTICLES.sub(" ", cell).split())


def parse_tsv(text):
    """The data rows of a TSV answer as tuples of normalised cells. The content of the last
    ``` fence is used when there is one (the prompt asks for a ```tsv block); the first
    non-empty line is the header and is dropped."""
    blocks = re.findall(r"```[^\n]*\n(.*?)(?:```|$)", text, flags=re.S)
    if blocks:
        text = blocks[-1]
    lines = [l.rstrip("\r") for l in text.split("\n") if l.strip()]
    return [tuple(normalize_cell(c) for c in l.split("\t")) for l in lines[1:]]


def score_tsv(prediction, gold):
    """Row-level precision, recall and F1 (LongProc HTML->TSV): a row counts when all its
    normalised cells equal a gold row's. Rows are matched as a multiset, so a repeated row
    is found only as many times as the gold holds it; row order does not matter."""
    pred_rows, gold_rows = parse_tsv(prediction), parse_tsv(gold)
    remaining = {}
    for r in gold_rows:
        remaining[r] = remaining.get(r, 0) + 1
    hits = 0
    for r in pred_rows:
        if remaining.get(r, 0) > 0:
            remaining[r] -= 1
            hits += 1
    precision = hits / len(pred_rows) if pred_rows else float(not gold_rows)
    recall = hits / len(gold_rows) if gold_rows else float(not pred_rows)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}
