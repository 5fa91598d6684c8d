"""The science of a run: one sample, prefilled once, decoded under every configuration, and the
samples.jsonl rows that it gives (`evaluate_sample`).

evaluate.py (the command line, the results folder, resume) calls it once per sample, in worker processes
(workers.py); notebooks/lab.py and benchmarks/ call the same functions. Nothing here starts a process,
handles a signal or writes a file.

The decoding plan (PAPER.md "Benchmarks": the task needs many facts from all over the prompt):
  1. each prompt is prefilled ONCE, with full attention; every configuration's cache is built from
     that prefill (`kvcache.from_prefill`), and the first answer token is predicted from the prefill
     logits, so it is exact for every configuration;
  2. gold-forced rows: full attention and every configuration are fed the gold answer (written as
     the model is asked to write it, `text2json.answer_text`), so that at every answer position a
     policy selects exactly as its decode step would when writing that answer. By default each
     configuration's whole answer goes through the model at once, in blocks of positions (the
     teacher-forced pass, `forced_logits`, PAPER.md "Gold-forced rows": every position selects on its
     own; LRQK's, whose selection depends on the last step, one after the other inside it); --decode-loop
     feeds every row one token per decode step (the reference the pass is tested against; run.json
     records which, `gold_path`). At each position a row records its top-1 token and the gold token's
     log-probability: `fact_accuracy` (the share of the answer's fact tokens, the tokens of the field
     values, predicted top-1), `field_accuracy`, `fact_nll`; and, against the full-attention row on the
     same path, `agreement` and `kl`, with the selection statistics. A small model that cannot plan the whole list can still look up each fact
     when it is shown the answer so far, which is what a sparse policy can take away;
  3. free-running rows (--free-run; on by default except for Text2JSON on the embedded default
     model, which writes no valid list with any policy, full attention included): every
     configuration's own greedy answer, scored with the task's rule.
  Every sample runs with DECODE_THREADS torch threads, and every forward has a fixed shape: a
  configuration's teacher-forced blocks (forced_block: from the model, the prompt and the policy), and
  the decode loop's forwards of exactly ROWS_PER_FORWARD rows (padded with idle rows). torch's CPU
  matmul rounds a row differently at another batch size or thread count (but not with other rows
  beside it), so a sample's numbers are the same however a run is split (resumed, sharded, one or two
  workers).
"""

import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

import ruler
import skew
import tasks
import text2json
from kvcache import SparseCache, StackedCache, TeacherForced, from_prefill
from model import prefill
from policy import POLICIES, PRESETS, oracle_of, override

DECODE_THREADS = 1  # torch threads per sample, whatever the worker count: the same numbers either way
ROWS_PER_FORWARD = 8  # every decode forward has exactly this many rows (padded): the same shapes in every run
N_NEEDLES = 11  # PAPER.md "Benchmarks": NeedleBench v2 parallel retrieval, 11 needles
MAX_NEW_CAP = 1024  # PAPER.md "Benchmarks": Text2JSON decodes up to 1024 new tokens


# ============================================================================ samples


class NoData(FileNotFoundError):
    """A task's data is not there (check_data): `claims` goes on without the claim that needs it."""


class NoSampleFits(ValueError):
    """No sample of the run can be made at --tokens (NeedleBench: too short for its needles), or none fits
    the model's positions: `claims` goes on without the claim that needs it."""


def check_data(task, data):
    """The data a task reads must exist (text2json without --data generates its samples)."""
    if task == "text2json":
        if data is not None and not Path(data).is_file():
            raise NoData(f"Text2JSON file not found: {data} (pass the path to the released JSONL)")
        return
    if ruler.is_spec(task):  # generated; the essay haystack reads the essays
        essays = Path(data or ruler.ESSAY_DIR) / "PaulGrahamEssays.jsonl"
        if ruler.needs_essays(task) and not essays.is_file():
            raise NoData(f"{essays} not found: RULER's essay haystack needs it (point --data at its folder)")
        return
    folder = Path(data) if data else (tasks.NEEDLE_DIR if task == "needle" else tasks.LONGPROC_DIR)
    needed = ("needles.jsonl", "PaulGrahamEssays.jsonl") if task == "needle" else ("prompts.yaml",)
    for name in needed:
        if not (folder / name).is_file():
            raise NoData(f"{folder / name} not found: point --data at your {task} data folder")
    if task == "longproc" and not any(folder.glob("html_to_tsv_*.json")):
        raise NoData(f"no html_to_tsv_<group>.json in {folder}: point --data at your LongProc folder")


def load_samples(args, tok):
    """All samples of the run as dicts: `id`, `problem`, `gold` (the reference answer text), `new_cap`
    (the paper's new-token limit for the task) and what the task's scorer needs. Sharding happens
    later, so every shard sees the same set. Bad data fails here, before the model loads: the loaders
    check every row (text2json.load, tasks.load_longproc), and ids must be distinct.

    Returns (samples, known): `known` is the set of every sample id of the data file, whatever --n
    (a results folder may hold samples of a larger --n), or None where the samples are generated and
    numbered 0, 1, ... (see evaluate.row_check)."""
    known = None
    if args.task == "text2json":
        if args.data:
            rows = text2json.load(args.data)
            known = {text2json.sample_id(r, i) for i, r in enumerate(rows)}
            rows = rows[: args.n]
        else:
            try:
                rows = text2json.generate(args.n, args.tokens, tok, seed=args.seed)
            except ValueError as err:  # said in terms of the prompt's length: the option that sets it
                raise ValueError(f"--tokens {args.tokens}: {err}") from None
        samples = [
            dict(r, id=text2json.sample_id(r, i), gold=r["answer"], new_cap=MAX_NEW_CAP)
            for i, r in enumerate(rows)
        ]
    elif args.task == "needle":
        try:
            rows = tasks.needle_samples(
                args.data, args.tokens, tok, seed=args.seed, n=args.n, n_needles=N_NEEDLES
            )
        except tasks.BadLength as err:  # said in terms of the option that sets the length
            raise NoSampleFits(f"--tokens {args.tokens}: {err}") from None
        samples = [
            dict(
                r,
                id=str(i),
                new_cap=MAX_NEW_CAP,
                gold=tasks.needle_answer(r["needles"]),
            )
            for i, r in enumerate(rows)
        ]
    elif ruler.is_spec(args.task):  # RULER counts the chat format's tokens in its sequence length
        template = len(tok.chat([{"role": "user", "content": ""}]))
        samples = ruler.generate_all(args.task, args.n, args.tokens, tok, args.seed, template, args.data)
    else:
        rows = tasks.load_longproc(args.data, args.group)
        known = {str(r["task_id"]) for r in rows}
        rows = [tasks.cut_page(r, args.tokens, tok) for r in rows[: args.n]]
        samples = [
            dict(r, id=str(r["task_id"]), gold=r["gt"], new_cap=tasks.LONGPROC_MAX_NEW[args.group])
            for r in rows
        ]
    seen = set()
    for s in samples:
        if s["id"] in seen:
            raise ValueError(
                f"duplicate sample id {s['id']!r} in the {args.task} data: every sample needs its own id"
            )
        seen.add(s["id"])
    return samples, known


def auto_max_new_tokens(samples, tok):
    """The paper's headroom over the longest gold answer, at most the task's limit (PAPER.md
    "Benchmarks": Text2JSON decodes up to 1024 new tokens, its longest gold answer being ~905, so
    1024/905 = 1.13x; needle: up to 1024; LongProc 8k: up to 9216, `tasks.LONGPROC_MAX_NEW`). On the
    default generated samples (~2K tokens, 10 records) the longest gold is 274 tokens: 311 new tokens."""
    if not samples:
        raise ValueError("no samples to run: check --data and --n")
    if all(s.get("task") in ruler.TASKS for s in samples):
        return max(s["new_cap"] for s in samples)  # RULER's own tokens to generate (PAPER.md "RULER")
    longest = max(len(tok.encode(s["gold"])) for s in samples)
    cap = max(s.get("new_cap", MAX_NEW_CAP) for s in samples)
    return min(cap, math.ceil(longest * MAX_NEW_CAP / 905))


def prompt_ids(tok, sample):
    """A sample's prompt ids: its user turn, chat-formatted, then its answer prefix if it has one (RULER
    puts its answer prefix after the chat template: the model's first token is the answer's first)."""
    ids = tok.chat([{"role": "user", "content": sample["problem"]}])
    return ids + tok.encode(sample["answer_prefix"]) if sample.get("answer_prefix") else ids


def too_long(samples, tok, max_positions):
    """{sample id: prompt tokens} of the samples whose prompt (chat template included) does not fit
    the model's positions: they get no result, and the summary says so."""
    sizes = {s["id"]: len(prompt_ids(tok, s)) for s in samples}
    return {i: n for i, n in sizes.items() if n >= max_positions}


def gold_tokens(task, sample, tok):
    """(gold ids, fact fields, record depths) of a sample, the facts found by the tokenizer's character
    offsets: Text2JSON, the answer as the model would write it and its field values
    (text2json.fact_tokens), each record at the depth of its sentence; NeedleBench, the needles'
    keywords in their answer lines (tasks.needle_fact_tokens), each at its needle's depth; LongProc,
    the cells of the gold table (tasks.tsv_fact_tokens), no depths."""
    if task == "needle":
        ids, fields = tasks.needle_fact_tokens(sample["needles"], tok)
        return ids, fields, [nd["depth"] for nd in sample["needles"]]
    if ruler.is_spec(task):
        ids, fields = ruler.fact_tokens(sample, tok)
        return ids, fields, sample["depths"]
    if task == "longproc":
        ids, fields = tasks.tsv_fact_tokens(sample["gold"], tok)
        return ids, fields, [None] * (max((f["record"] for f in fields), default=-1) + 1)
    try:
        ids, fields = text2json.fact_tokens(sample["gold"], tok)
    except (ValueError, TypeError) as err:
        raise ValueError(f"sample {sample['id']}: bad gold answer: {err}") from None
    return ids, fields, text2json.record_depths(sample["problem"], sample["gold"])


def score_sample(task, prediction, sample):
    """The task's per-sample numbers, in [0, 1]: `score` (None = excluded from the mean) and, for
    Text2JSON, `field_recall`. Text2JSON: the paper's rule (samples whose gold repeats a name are
    excluded, rule 1); needle: share of needle keywords found (case-sensitive); longproc: row-level
    F1, plus `precision`, `recall` and `extracted` (1 when a table could be read from the answer)."""
    if task == "text2json":
        if text2json.has_duplicate_names(sample["gold"]):
            return dict(score=None, field_recall=None)
        return dict(
            score=text2json.score(prediction, sample["gold"]),
            field_recall=text2json.field_recall(prediction, sample["gold"]),
        )
    if task == "needle":
        return dict(score=tasks.score_needles(prediction, sample)["score"], field_recall=None)
    if ruler.is_spec(task):
        return dict(score=ruler.score(prediction, sample), field_recall=None)
    m = tasks.score_tsv(prediction, sample["gold"])
    return dict(
        score=m["f1"],
        field_recall=None,
        precision=m["precision"],
        recall=m["recall"],
        extracted=m["extracted"],
    )


# ============================================================================ decoding


@dataclass(eq=False)
class GoldRow:
    """A configuration fed the gold answer, one token per decode step (the decoding plan, step 2)."""

    policy: object
    cache: object
    gold: list  # the gold answer's ids, the same for every gold row
    out: list = field(default_factory=list)  # top-1 at each answer position
    gold_logp: list = field(default_factory=list)  # log-prob of the gold token, per answer position
    steps: int = 0  # decode steps taken (forward passes after the prefill)
    matches: int = 0  # decode steps whose top-1 equals the full-attention row's
    kl: float = 0.0  # sum over decode steps of KL(full || this row)
    done: bool = False

    def next_input(self) -> int:
        return self.gold[self.steps]  # the gold token after the `steps` positions predicted so far

    def observe(self, logits, ref_logp, ref_top):
        """The logits [n, vocab] of the next n answer positions (a decode step: n = 1; a teacher-forced
        block: more), against full attention's on the same gold path (log-probs ref_logp [n, vocab] and
        top-1 ref_top [n])."""
        n = logits.shape[0]
        top = logits.argmax(dim=-1)  # [n]
        logp = torch.log_softmax(logits, dim=-1)  # [n, vocab]
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(dim=-1)  # [n] KL(full || this row)
        following = torch.tensor(self.gold[self.steps + 1 : self.steps + 1 + n], device=logits.device)  # [n]
        self.matches += int((top == ref_top).sum())
        for x in kl.tolist():  # one position at a time, as the decode loop adds them
            self.kl += x
        self.out += top.tolist()
        self.gold_logp += logp.gather(1, following[:, None])[:, 0].tolist()
        self.steps += n
        self.done = self.steps + 1 >= len(self.gold)


@dataclass(eq=False)
class FreeRow:
    """A configuration fed its own greedy tokens (the decoding plan, step 3)."""

    policy: object
    cache: object
    stop: set  # token ids that end the answer
    limit: int  # at most this many new tokens
    out: list = field(default_factory=list)  # the generated ids
    steps: int = 0
    done: bool = False

    def next_input(self) -> int:
        return self.out[-1]

    def observe(self, logits):
        top = int(logits.argmax())
        self.steps += 1
        if top not in self.stop:
            self.out.append(top)
        self.done = top in self.stop or len(self.out) >= self.limit


class IdleRow:
    """A padding row of a decode forward: it attends to nothing and keeps nothing (its logits are
    dropped), so every forward has ROWS_PER_FORWARD rows whatever the number of configurations."""

    asks = ()  # nothing beyond q, k, v (kvcache.Cache)

    def __init__(self, seq_len):
        self.seq_len = seq_len

    def attend(self, layer, q, k, v, pos, **asked):
        return torch.zeros_like(q)  # [1, n_heads, T, head_dim]


def forward_rows(model, rows, device):
    """One decode step of `rows` (each feeds its `next_input()` through its cache): logits [len(rows), vocab].

    The rows go through the model in forwards of exactly ROWS_PER_FORWARD rows, the last one padded
    with IdleRow caches: torch's CPU matmul rounds a row differently at another batch size, not
    beside other rows, so a row's numbers do not depend on which other rows run (measured: a forward
    of batch 1 differs from batch 2-15, which agree), and the weights are read once per forward.
    """
    logits = []
    for i in range(0, len(rows), ROWS_PER_FORWARD):
        group = rows[i : i + ROWS_PER_FORWARD]
        pad = [IdleRow(group[0].cache.seq_len) for _ in range(ROWS_PER_FORWARD - len(group))]
        x = torch.tensor(
            [r.next_input() for r in group] + [0] * len(pad), device=device
        )  # [ROWS_PER_FORWARD]
        stacked = StackedCache([r.cache for r in group] + pad)
        logits.append(model(x[:, None], stacked)[: len(group), -1])  # [len(group), vocab]
    return torch.cat(logits)  # [len(rows), vocab]


FORCED_BLOCK_BYTES = 1 << 28  # a teacher-forced block's largest tensors stay within 256 MiB (forced_block)


def forced_block(model, cache, n) -> int:
    """How many answer positions one forward of the teacher-forced pass takes, for a cache that will hold
    n more tokens: as many as keep the largest per-position tensors of a block (a query's exact scores
    over every token, its logits, its selected K/V rows) within FORCED_BLOCK_BYTES, so memory stays
    bounded at the longest prompts (the default model's whole answer is one block). It depends on the
    model, the prompt and the policy only, never on the machine, so a sample's numbers do not either."""
    c = model.config
    per_position = [c.n_heads * (cache.seq_len + n), c.vocab_size]  # float32 values
    if isinstance(cache, SparseCache):
        per_position.append(2 * c.n_heads * cache.split.selected * c.head_dim)
    return max(1, FORCED_BLOCK_BYTES // (4 * max(per_position)))


def forced_logits(model, row, device):
    """The teacher-forced pass of a gold row (PAPER.md "Gold-forced rows"): its whole answer through the
    model in blocks of positions (forced_block), each answer token selecting as its decode step would
    (kvcache.TeacherForced). Yields (a, logits [Tq, vocab]) per block, a = the block's first position."""
    inputs = row.gold[row.steps : len(row.gold) - 1]  # the gold tokens still to feed, one per position
    cache = TeacherForced(row.cache)
    block = forced_block(model, row.cache, len(inputs))
    for a in range(0, len(inputs), block):
        x = torch.tensor([inputs[a : a + block]], device=device)  # [1, Tq]
        yield a, model(x, cache)[0]  # [Tq, vocab]


@torch.inference_mode()
def decode_sample(
    model, ids, policies, gold_ids, max_new, stop_ids=(), free=True, calibration=None, forced=True
):
    """Prefill `ids` once, then decode every configuration from it (the module docstring's plan).

    Gold rows, one per configuration and always one for full attention (the reference): position 0
    is predicted from the prefill logits (exact for all), then every later position is fed the gold
    token before it, so a sparse policy selects at every position as it would when writing the answer
    itself (the first max_new gold tokens); each gold row's position is compared with the reference's.
    forced (the default): each gold row goes through the teacher-forced pass (`forced_logits`: one
    forward per configuration, every position selecting on its own; LRQK's positions one after the
    other inside it, a stateful landmark kind); forced=False: every gold row steps through the decode
    loop, one token per step (the reference the pass is tested against). Free rows (free=True): each
    configuration's own greedy answer, up to max_new tokens or a stop token, always in the loop.

    calibration: {channels: skew.calibration} for the policies that need one (InfiniGen).

    Returns (gold, free): {configuration key: row}, both holding full attention's; free is {} when
    free is False.
    """
    device = model.embed_tokens.weight.device
    queries = any(p.select.kind.needs_queries for p in policies)  # LRQK builds from the prompt's queries
    prefill_cache, logits = prefill(model, ids, keep_queries=queries)  # logits [vocab] at the last position
    first, logp0 = int(logits.argmax()), torch.log_softmax(logits, dim=-1)  # [vocab]
    full = PRESETS["full"]
    configs = {full.key(): full} | {p.key(): p for p in policies}
    n_gold = min(len(gold_ids), max_new, model.config.max_positions - len(ids) + 1)
    gold_ids = list(gold_ids[:n_gold])
    limit = min(max_new, model.config.max_positions - len(ids))  # positions left for new tokens
    stop = set(stop_ids)
    gold, rows = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a prompt shorter than the budget: recorded as sparse=False
        for key, p in configs.items():
            cal = (
                calibration[p.select.param("channels")]
                if p.sparse and p.select.kind.needs_calibration
                else None
            )
            tracked = override(p, track=p.sparse)  # selection statistics against the oracle
            gold[key] = GoldRow(
                p, from_prefill(prefill_cache, tracked, model.rope, calibration=cal), gold_ids
            )
            if free:
                rows[key] = FreeRow(
                    p, from_prefill(prefill_cache, p, model.rope, calibration=cal), stop, limit
                )
    for r in gold.values():
        if n_gold:
            r.out, r.gold_logp = [first], [float(logp0[gold_ids[0]])]
        r.done = n_gold <= 1
    for r in rows.values():
        r.out = [] if first in stop else [first]
        r.done = first in stop or limit <= 1
    ref = gold[full.key()]  # full attention on the gold path: what every gold row is compared with
    stepping = list(rows.values())  # the rows of the decode loop
    if forced:
        ref_logp, ref_top = [], []  # [n, vocab], [n]: the reference at every answer position
        for _, logits in forced_logits(model, ref, device):
            ref_logp.append(torch.log_softmax(logits, dim=-1))
            ref_top.append(logits.argmax(dim=-1))
            ref.observe(logits, ref_logp[-1], ref_top[-1])
        if ref_logp:
            ref_logp, ref_top = torch.cat(ref_logp), torch.cat(ref_top)
        for r in gold.values():
            if r is not ref and not r.done:
                for a, logits in forced_logits(model, r, device):
                    r.observe(logits, ref_logp[a : a + len(logits)], ref_top[a : a + len(logits)])
    else:
        stepping = [*gold.values(), *stepping]
    active = [r for r in stepping if not r.done]
    while active:
        logits = forward_rows(model, active, device)  # [len(active), vocab]
        if ref in active:  # the gold rows step together, so the reference steps whenever they do
            ref_logits = logits[active.index(ref)][None]  # [1, vocab]
            step_ref = torch.log_softmax(ref_logits, dim=-1), ref_logits.argmax(dim=-1)  # [1, vocab], [1]
        for r, row_logits in zip(active, logits):
            if isinstance(r, GoldRow):
                r.observe(row_logits[None], *step_ref)
            else:
                r.observe(row_logits)
        active = [r for r in active if not r.done]
    return gold, rows


# ============================================================================ the rows of samples.jsonl


def fact_record(row, gold_ids, fields, depths):
    """samples.jsonl fact fields of one gold row (None when the task has no fact tokens).

    fact_accuracy: share of the fact tokens (text2json.fact_tokens) predicted top-1; field_accuracy:
    share of gold fields whose every token is; fact_nll: mean negative log-probability of the fact
    tokens; per_record: per gold record its depth in the prompt (percent), fact tokens and hits.
    A field cut off by the new-token limit (or the model's positions) is left out whole, and
    fact_tokens_cut counts the fact tokens so left out: the summary says so (results.annotate).
    """
    if fields is None:
        names = (
            "fact_accuracy",
            "field_accuracy",
            "fact_nll",
            "fact_tokens",
            "fact_tokens_cut",
            "per_record",
        )
        return dict.fromkeys(names)  # each None
    hit = [p == g for p, g in zip(row.out, gold_ids)]
    every = {t for f in fields for t in f["tokens"]}
    fields = [f for f in fields if f["tokens"] and f["tokens"][-1] < len(hit)]
    tokens = sorted({t for f in fields for t in f["tokens"]})
    per_record = [dict(depth=d, tokens=0, hits=0) for d in depths]
    for f in fields:
        per_record[f["record"]]["tokens"] += len(f["tokens"])
        per_record[f["record"]]["hits"] += sum(hit[t] for t in f["tokens"])
    whole = [all(hit[t] for t in f["tokens"]) for f in fields]  # per field: every token predicted
    return dict(
        fact_accuracy=sum(hit[t] for t in tokens) / len(tokens) if tokens else None,
        field_accuracy=sum(whole) / len(whole) if whole else None,
        fact_nll=-sum(row.gold_logp[t] for t in tokens) / len(tokens) if tokens else None,
        fact_tokens=len(tokens),
        fact_tokens_cut=len(every) - len(tokens),
        per_record=per_record,
    )


def policy_record(gold, free, tok):
    """samples.jsonl fields of one configuration: fidelity to full attention and the selection statistics
    on the gold path (the gold row), memory and traffic from the gold row's cache (the selection size,
    so the bytes per step, do not depend on the tokens read), the prediction from the free row (None
    without one). For full attention agreement is 1 and KL 0 by construction."""
    sparse = isinstance(gold.cache, SparseCache)  # False: full attention, or a prompt shorter than the budget
    s = gold.cache.stats.summary() if sparse and float(gold.cache.stats.steps.sum()) > 0 else {}
    return dict(
        prediction=None if free is None else tok.decode(free.out),
        new_tokens=None if free is None else len(free.out),
        steps=gold.steps,
        sparse=sparse,
        agreement=gold.matches / gold.steps if gold.steps else None,
        kl=gold.kl / gold.steps if gold.steps else None,
        oracle_recall=s.get("oracle_recall"),
        attention_mass=s.get("attention_mass"),
        landmark_error=s.get("landmark_error"),
        key_error=s.get("key_error"),
        recall_per_layer=s.get("recall_per_layer"),
        mass_per_layer=s.get("mass_per_layer"),
        hit_rate=s.get("hit_rate"),
        device_kv_fraction=gold.cache.memory()["device_fraction"],
        bytes_per_step=gold.cache.bytes_fetched / gold.steps if gold.steps else None,
    )


def config_fields(p):
    """The configuration of a samples.jsonl row, as results.py needs it without knowing any policy:
    `key` (the identity: policy.Policy.key, every parameter), `config` (the same as a dict),
    the columns of the tables (None where an axis does not apply), the sweep axes the policy takes
    part in with the legend of each plot line (`legends`: the label without that axis), its place in
    the tables (`order`: its preset's line in policy.PRESETS; a policy built by hand comes after them) and the key of the oracle it is
    compared with (the oracle of the same budget and K/V format)."""
    select = p.select
    return dict(
        key=p.key(),
        config=p.params(),
        method=p.name,
        label=p.label(),
        budget=select and select.budget,
        chunk_size=select and select.chunk_size,
        rank=p.keys.rank if p.keys.source == "low_rank" else None,
        bits=select and select.param("landmark_bits"),
        residual=select and select.param("residual") or None,
        kv_bits=p.keys.kv_bits,
        axes=list(p.axes),
        legends={axis: p.label(without=axis) for axis in p.axes},
        order=POLICIES.index(p.name) if p.name in POLICIES else len(POLICIES),  # built by hand: after them
        oracle_key=oracle_of(p).key() if p.sparse else None,
    )


def evaluate_sample(
    model, tok, sample, policies, max_new, task, verbose, free_run=True, forced=True, calibration=None
):
    """Decode one sample under every configuration still to do; returns its samples.jsonl rows.
    free_run=False skips the free rows: no prediction, no task score. forced=False decodes the gold rows
    step by step too (decode_sample)."""
    ids = prompt_ids(tok, sample)
    if len(ids) >= model.config.max_positions:
        print(
            f"warning: sample {sample['id']}: prompt of {len(ids)} tokens does not fit the model's "
            f"{model.config.max_positions} positions: skipped",
            file=sys.stderr,
        )
        return []
    gold_ids, fields, depths = gold_tokens(task, sample, tok)
    sparse = [p for p in policies if p.sparse]
    limit = min(max_new, sample.get("new_cap", max_new))  # RULER: each task's own tokens to generate
    gold, free = decode_sample(
        model, ids, sparse, gold_ids, limit, tok.stop_ids, free_run, calibration, forced
    )
    if verbose:
        for p in sparse:
            print(f"{p.label()} @{p.select.budget:g}: {gold[p.key()].cache.budget_line()}")
    rows = []
    for p in policies:
        key = p.key()
        rec = policy_record(gold[key], free.get(key), tok)
        prediction = rec.pop("prediction")
        scores = score_sample(task, prediction, sample) if free_run else dict(score=None, field_recall=None)
        rows.append(
            dict(
                **config_fields(p),
                sample=sample["id"],
                task=task,
                prompt_tokens=len(ids),
                max_new_tokens=max_new,
                gold_tokens=len(gold[key].out),
                **fact_record(gold[key], gold_ids, fields, depths),
                **scores,
                **rec,
                prediction=prediction,
            )
        )
    return rows


# ============================================================================ what the model can run


def calibrations(model, tok, policies):
    """{channels: InfiniGen's calibration of this model} for the policies that need one (skew.py), fitted
    (or read from the cache) once, in this process, before any worker starts."""
    shares = {p.select.param("channels") for p in policies if p.sparse and p.select.kind.needs_calibration}
    return {c: skew.calibration(model, tok, c) for c in sorted(shares)}


def unfit(p, config, tok):
    """Why the configuration p cannot run on this model as what it is named, or None: LRQK's rank (a
    share of head_dim, by architecture: landmarks.LowRankQK.cannot_run) must be 1 to head_dim; a policy whose dense
    layers are every layer of the model (InfiniGen's first 2) would be full attention under another
    name; InfiniGen must be able to read its calibration text (skew.cannot_calibrate). A run refuses
    such a configuration before any work (evaluate.prepare); `claims` leaves it out and says why."""
    if not p.sparse:
        return None
    select, d = p.select, config.head_dim
    why = select.kind.cannot_run(dict(select.kind_params), d, config.arch)
    if why:
        return f"the {p.name} policy's {why}"
    if select.dense_layers >= config.n_layers:
        return (
            f"the {p.name} policy attends every token in its first {select.dense_layers} layers, and the "
            f"model has {config.n_layers}: it would be full attention under another name"
        )
    if select.kind.needs_calibration:
        return skew.cannot_calibrate(len(skew.calibration_ids(tok)), config.max_positions)
    return None


def check_fit(args, policies, config):
    """The checks that need the model's config, before any sample is made: an int SVD rank must not
    exceed the key channels it factorizes (kv_heads x head_dim: kvcache.low_rank_keys would clamp it,
    and report a larger cache than full attention), a share must keep at least one channel, and a
    generated prompt of --tokens must fit the model's positions. (Each configuration's own fit to the
    model: `unfit`.)"""
    channels = config.n_kv_heads * config.head_dim
    for rank in {p.keys.rank for p in policies if p.keys.source == "low_rank"}:
        if rank >= 1 and rank > channels:
            raise ValueError(
                f"--ranks {rank} is above the model's {channels} key channels (kv_heads "
                f"{config.n_kv_heads} x head_dim {config.head_dim}): give at most {channels} "
                "or a share below 1"
            )
        if rank < 1 and round(rank * channels) < 1:
            raise ValueError(
                f"--ranks {rank:g} keeps none of the model's {channels} key channels: "
                f"give a share of at least {1 / channels:.3g}"
            )
    room = ruler.is_spec(args.task)  # RULER's length already counts its answer: it may fill every position
    if uses_tokens(args) and args.tokens >= config.max_positions + room:
        raise ValueError(
            f"--tokens {args.tokens} does not fit the model's {config.max_positions} positions: "
            "use a smaller --tokens (the chat template and the answer need room too)"
        )


def uses_tokens(args):
    """Whether --tokens sets the prompt length (generated samples) or is ignored (files of fixed prompts)."""
    return (
        args.task == "needle" or ruler.is_spec(args.task) or (args.task == "text2json" and args.data is None)
    )
