"""Reproduce the paper's comparisons: every KV selection policy against full attention, as tables and plots.

    python evaluate.py                       # default model, 6 Text2JSON samples of ~2K tokens, 5 policies
    python evaluate.py --budgets 0.01,0.03125,0.1 --methods full,oracle,mean --chunk-sizes 1,2,4,8
    python evaluate.py --methods full,oracle,quantized --bits 1,2,4,fp8,nvfp4
    python evaluate.py --task needle --tokens 4096      # or --task longproc (real data, ../shared/data)
    python evaluate.py --model DIR --data text2json.jsonl --device cuda --dtype bfloat16 --n 500

What it measures (PAPER.md "The paper's method", "Benchmarks the paper uses"), per policy and
configuration: the facts recovered (gold-forced `fact_accuracy`, `field_accuracy`, `fact_nll`,
`retention` against full attention, and fact accuracy against the record's depth in the prompt),
the task score (Text2JSON: the paper's rule, plus field recall; free-running), fidelity to full
attention (gold-forced top-1 `agreement` and mean `kl`), selection quality against exact top-k
(`oracle_recall`, `attention_mass`, also per layer), and memory (`device_kv_fraction` of a full bf16
cache, `bytes_per_step` fetched from CPU memory).

The decoding plan (PAPER.md "Benchmarks": the task needs many facts from all over the prompt):
  1. each prompt is prefilled ONCE, with full attention; every configuration's cache is built from
     that prefill (`KVCache.from_prefill`), and the first answer token is predicted from the prefill
     logits, so it is exact for every configuration;
  2. gold-forced rows: full attention and every configuration are fed the gold answer (written as
     the model is asked to write it, `text2json.answer_text`), one token per decode step, so every
     policy selects at every step exactly as when writing that answer. At each step a row records
     its top-1 token and the gold token's log-probability: `fact_accuracy` (the share of the answer's
     fact tokens, the tokens of the field values, predicted top-1), `field_accuracy`, `fact_nll`; and,
     against the full-attention row on the same path, `agreement` and `kl`, with the selection
     statistics. A small model that cannot plan the whole list can still look up each fact when it
     is shown the answer so far, which is what a sparse policy can take away;
  3. free-running rows (--free-run; on by default except for Text2JSON on the embedded default
     model, which writes no valid list with any policy, full attention included): every
     configuration's own greedy answer, scored with the task's rule.
  All rows decode in one step loop, in forwards of exactly ROWS_PER_FORWARD rows (padded with idle
  rows), with DECODE_THREADS torch threads: torch's CPU matmul rounds a row differently at another
  batch size or thread count (but not with other rows beside it), so with fixed shapes a sample's
  numbers are the same however a run is split (resumed, sharded, one or two workers), and the
  weights are still read once per step for up to ROWS_PER_FORWARD rows. The
  summary adds 95% intervals from a paired bootstrap over samples (results.bootstrap).

Results folder (--out): samples.jsonl (one line per configuration and sample, with the prediction),
summary.json (one row per configuration), summary.md (the table), run.json (the settings), PNG plots.
Re-running with the same --out skips finished (configuration, sample) pairs; samples.jsonl is
rewritten atomically after every sample, and the summary and plots are rebuilt from it at the end.

Several GPUs (e.g. the 500-sample Text2JSON set): split the samples with --shard i/n, one process per
GPU, then merge the folders:

    for i in 0 1 2 3 4 5 6 7; do
      CUDA_VISIBLE_DEVICES=$i python evaluate.py --model DIR --data text2json.jsonl --n 500 \\
          --device cuda --dtype bfloat16 --shard $i/8 --out results/t2j-$i &
    done; wait
    python evaluate.py merge results/t2j-* --out results/t2j

Under torchrun (or a job array that sets RANK and WORLD_SIZE) --shard defaults to RANK/WORLD_SIZE and
--device cuda means cuda:LOCAL_RANK:  torchrun --nproc-per-node 8 evaluate.py --device cuda ...
"""

import argparse
import json
import math
import multiprocessing
import os
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from itertools import product
from pathlib import Path

import torch

import results
import tasks
import text2json
from kvcache import POLICIES, KVCache, StackedCache, make_policy
from model import DTYPES, load_model, load_tokenizer
from results import (
    BITS,
    check_resume,
    read_rows,
    write_atomic,
    write_rows,
    write_summary,
)

DEFAULT_METHODS = ",".join(("full", "oracle", "shadowkv", "mean", "quantized"))  # the default run's policies
DEFAULT_N = 6  # samples of the default run: 3 rounds of 2 workers, ~146 s each measured on 2 cores
DECODE_THREADS = 1  # torch threads per sample, whatever the worker count: the same numbers either way
ROWS_PER_FORWARD = 8  # every decode forward has exactly this many rows (padded): the same shapes in every run
DEFAULT_BUDGET = 0.03125  # PAPER.md "The paper's method": 3.125% of the prompt
N_NEEDLES = 11  # PAPER.md "Benchmarks": NeedleBench v2 parallel retrieval, 11 needles
MAX_NEW_CAP = 1024  # PAPER.md "Benchmarks": Text2JSON decodes up to 1024 new tokens
TASKS = ("text2json", "needle", "longproc")


# ============================================================================ command line

class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is a ValueError: main() prints it as one `error:` line."""

    def error(self, message):
        raise ValueError(message)


def build_parser():
    p = _Parser(prog="evaluate.py", description="Compare KV selection policies against full attention "
                "(python evaluate.py merge DIR... --out DIR combines shard folders).")
    p.add_argument("--model", help="checkpoint folder (config.json, *.safetensors, tokenizer.json); "
                   "default: SmolLM2-135M-Instruct")
    p.add_argument("--task", default="text2json", choices=TASKS)
    p.add_argument("--data", help="text2json: the released JSONL (default: generated samples); "
                   "needle / longproc: the data folder (default: ../shared/data/...)")
    p.add_argument("--n", type=int, default=DEFAULT_N, help="number of samples (the first n of --data)")
    p.add_argument("--tokens", type=int, default=2048, help="prompt length of generated samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma list of {', '.join(POLICIES)}")
    p.add_argument("--budgets", default=str(DEFAULT_BUDGET), help="comma list of shares of the prompt in (0, 1]")
    p.add_argument("--chunk-sizes", help="comma list; sweeps mean and quantized (default: their presets, 8 and 1)")
    p.add_argument("--ranks", help="comma list of SVD ranks (int, or share of channels < 1); sweeps svd, shadowkv")
    p.add_argument("--bits", help=f"comma list of landmark formats for quantized: {', '.join(BITS)} (default 2)")
    p.add_argument("--residual", type=int, default=0, help="meta-chunk size of residual landmark quantization")
    p.add_argument("--kv-bits", help="quantize the offloaded K/V of every sparse policy with this format "
                                     "(e.g. 4, int4; default: exact)")
    p.add_argument("--max-new-tokens", type=int, help="default: 1024/905 x the longest gold answer (the paper's ratio), at most 1024")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--out", help="results folder (default: results/<task>, with a shard suffix)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="CPU only: samples decoded in parallel, one process and one thread each (default: 2)")
    p.add_argument("--free-run", action=argparse.BooleanOptionalAction, default=None,
                   help="also decode each configuration's own answer for the task score (default: on, except "
                        "Text2JSON on the embedded default model)")
    p.add_argument("--shard", help="i/n: run samples i, i+n, i+2n, ... (default under torchrun: RANK/WORLD_SIZE)")
    return p


def parse_list(text, convert, what):
    """'a,b,c' -> [convert(a), ...], with a one-line error naming the option."""
    try:
        items = [convert(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"bad {what} {text!r}: give a comma-separated list") from None
    if not items:
        raise ValueError(f"{what} is empty")
    return items


def parse_rank(text):
    """An SVD rank: an int (160) or a share of the channels below 1 (0.15625, ShadowKV's 160/1024)."""
    value = float(text)
    return int(value) if value >= 1 and value == int(value) else value


def parse_shard(text):
    """'i/n' -> (i, n) with 0 <= i < n; None -> RANK/WORLD_SIZE under torchrun, else (0, 1)."""
    if text is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return (int(os.environ.get("RANK", "0")), world) if world > 1 else (0, 1)
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"bad --shard {text!r}: write i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise ValueError(f"bad --shard {text!r}: need 0 <= i < n")
    return i, n


def configurations(args):
    """Every policy configuration of the sweep (PAPER.md: the ablations over budget, chunk size,
    SVD rank and landmark precision). An axis applies to the policies it changes: chunk size to
    `mean` and `quantized` (oracle and svd are token-level by definition, shadowkv is the fixed
    baseline preset), rank to `svd` and `shadowkv`, bits and residual to `quantized`, and --kv-bits
    (one format, not a sweep) to every sparse policy; `full` has one configuration. make_policy raises
    a one-line ValueError on any bad value."""
    methods = parse_list(args.methods, str, "--methods")
    budgets = parse_list(args.budgets, float, "--budgets")
    chunks = parse_list(args.chunk_sizes, int, "--chunk-sizes") if args.chunk_sizes else [None]
    ranks = parse_list(args.ranks, parse_rank, "--ranks") if args.ranks else [None]
    bits = parse_list(args.bits, str, "--bits") if args.bits else [None]
    for b in bits:
        if b is not None and b not in BITS:
            raise ValueError(f"bad --bits {b!r}: choose from {', '.join(BITS)}")
    for b in budgets:
        if not 0 < b <= 1:
            raise ValueError(f"budget {b} is out of range: give a share of the prompt in (0, 1]")
    if args.residual < 0:
        raise ValueError(f"--residual {args.residual} must be >= 0 (0 = off)")
    policies = {}
    for method in methods:
        if method not in POLICIES:
            raise ValueError(f"unknown method {method!r}: choose from {', '.join(POLICIES)}")
        if method == "full":
            policies["full"] = make_policy("full", budget=1.0)
            continue
        axes = (budgets,
                chunks if method in ("mean", "quantized") else [None],
                ranks if method in ("svd", "shadowkv") else [None],
                bits if method == "quantized" else [None])
        for budget, chunk, rank, bit in product(*axes):
            p = make_policy(method, budget=budget, chunk_size=chunk, rank=rank, landmark_bits=bit,
                            residual=args.residual if method == "quantized" else None, kv_bits=args.kv_bits)
            policies.setdefault(config_key(p), p)
    return list(policies.values())


def config_label(p):
    """Policy.label(), plus the rank when a ShadowKV sweep changes it."""
    label = p.label()
    if p.name == "shadowkv" and p.rank != make_policy("shadowkv").rank:
        label += f" r{p.rank:g}"
    return label


def config_key(p):
    """The resume unit's configuration part: 'quantized 2b @0.03125' (full attention: 'full')."""
    return "full" if p.name == "full" else f"{config_label(p)} @{p.budget:g}"


def check_inputs(args):
    """Every check that needs no model: runs before any loading or work (bad input -> ValueError)."""
    if args.n < 1:
        raise ValueError(f"--n {args.n} must be >= 1")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    if args.dtype not in DTYPES:
        raise ValueError(f"unsupported --dtype {args.dtype!r}: use float32, bfloat16 or float16")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"unknown --device {args.device!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA GPU is available: use --device cpu")
    if args.task == "text2json" and args.data is None and args.tokens < 256:
        raise ValueError(f"--tokens {args.tokens} is too short for a Text2JSON prompt (use >= 256)")
    if args.model is not None:
        check_model_dir(Path(args.model))
    check_data(args.task, args.data)
    return configurations(args)


def check_model_dir(path):
    """A checkpoint folder must hold config.json, tokenizer.json and weights (model.py loads them)."""
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    for name in ("config.json", "tokenizer.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} not found: the model folder needs it")
    if not ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()):
        raise FileNotFoundError(f"no weights in {path}: expected model.safetensors or model.safetensors.index.json")


def check_data(task, data):
    """The data a task reads must exist (text2json without --data generates its samples)."""
    if task == "text2json":
        if data is not None and not Path(data).is_file():
            raise FileNotFoundError(f"Text2JSON file not found: {data} (pass the path to the released JSONL)")
        return
    folder = Path(data) if data else (tasks.NEEDLE_DIR if task == "needle" else tasks.LONGPROC_DIR)
    needed = ("needles.jsonl", "PaulGrahamEssays.jsonl") if task == "needle" else ("html_to_tsv_0.5k.json",
                                                                                   "prompts.yaml")
    for name in needed:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found: point --data at your {task} data folder")


# ============================================================================ samples

def load_samples(args, tok):
    """All samples of the run as dicts: `id`, `problem`, `gold` (the reference answer text), and what
    the task's scorer needs. Sharding happens later, so every shard sees the same set."""
    if args.task == "text2json":
        if args.data:
            rows = text2json.load(args.data)[:args.n]
        else:
            rows = text2json.generate(args.n, args.tokens, tok, seed=args.seed)
        return [dict(r, id=str(r.get("id", i)), gold=r["answer"]) for i, r in enumerate(rows)]
    if args.task == "needle":
        rows = tasks.needle_samples(args.data, N_NEEDLES, args.tokens, tok, seed=args.seed, n=args.n)
        return [dict(r, id=str(i), gold="\n".join(f"{j}. {nd['gold_standard_answer']}"
                                                  for j, nd in enumerate(r["needles"], 1)))
                for i, r in enumerate(rows)]
    rows = tasks.load_longproc(args.data)[:args.n]
    return [dict(r, id=str(r["task_id"]), gold=r["gt"]) for r in rows]


def auto_max_new_tokens(samples, tok):
    """The paper's headroom over the longest gold answer, at most 1024 new tokens (PAPER.md
    "Benchmarks": the paper decodes up to 1024 new tokens, its longest gold answer being ~905, so
    1024/905 = 1.13x). On the default generated samples (~2K tokens, 10 records) the longest gold is
    274 tokens: 311 new tokens."""
    longest = max(len(tok.encode(s["gold"])) for s in samples)
    return min(MAX_NEW_CAP, math.ceil(longest * MAX_NEW_CAP / 905))


def score_sample(task, prediction, sample):
    """The task's per-sample numbers, in [0, 1]: `score` (None = excluded from the mean) and, for
    Text2JSON, `field_recall`. Text2JSON: the paper's rule (samples whose gold repeats a name are
    excluded, rule 1); needle: share of needle keywords found; longproc: row-level F1."""
    if task == "text2json":
        if text2json.has_duplicate_names(sample["gold"]):
            return dict(score=None, field_recall=None)
        return dict(score=text2json.score(prediction, sample["gold"]),
                    field_recall=text2json.field_recall(prediction, sample["gold"]))
    if task == "needle":
        return dict(score=tasks.score_needles(prediction, sample)["score"], field_recall=None)
    return dict(score=tasks.score_tsv(prediction, sample["gold"])["f1"], field_recall=None)


# ============================================================================ decoding

@dataclass
class Row:
    """One row of the step loop: a configuration fed the gold answer, or fed its own greedy tokens."""

    kind: str  # "gold" (fed the gold answer's tokens) or "free" (fed its own greedy tokens)
    policy: object
    cache: KVCache
    out: list = field(default_factory=list)  # gold rows: top-1 at each answer position; free: generated ids
    gold_logp: list = field(default_factory=list)  # gold rows: log-prob of the gold token, per position
    steps: int = 0  # decode steps taken (forward passes after the prefill)
    matches: int = 0  # gold rows: decode steps whose top-1 equals the full-attention gold row's
    kl: float = 0.0  # gold rows: sum over decode steps of KL(full || this row)
    done: bool = False


class IdleRow:
    """A padding row of a decode forward: it attends to nothing and keeps nothing (its logits are
    dropped), so every forward has ROWS_PER_FORWARD rows whatever the number of configurations."""

    def __init__(self, seq_len):
        self.seq_len = seq_len

    def attend(self, layer, q, k, v, pos):
        return torch.zeros_like(q)  # [1, n_heads, T, head_dim]


@torch.inference_mode()
def decode_sample(model, ids, policies, gold_ids, max_new, stop_ids=(), free=True):
    """Prefill `ids` once, then decode every configuration from it (the module docstring's plan).

    Gold rows, one per configuration and always one for full attention (the reference): position 0
    is predicted from the prefill logits (exact for all), then each decode step feeds the next gold
    token, one token per step, so a sparse policy selects at every step as it would when writing the
    answer itself (the first max_new gold tokens). Free rows (free=True): each configuration's own
    greedy answer, up to max_new tokens or a stop token. The rows go through the model in groups of
    exactly ROWS_PER_FORWARD (the last one padded with IdleRow caches): torch's CPU matmul rounds a
    row differently at another batch size, not beside other rows, so a row's numbers do not depend on
    which other rows run (measured: a forward of batch 1 differs from batch 2-15, which agree).

    Returns (gold, free): {config key: Row}, both holding "full"; free is {} when free is False.
    """
    device = model.embed_tokens.weight.device
    prefill = KVCache(model.config, model.rope, device=device)
    logits = model(torch.tensor([ids], device=device), prefill, last_only=True)[0, -1]  # [vocab]
    first, logp0 = int(logits.argmax()), torch.log_softmax(logits, dim=-1)  # [vocab]
    configs = {"full": make_policy("full")} | {config_key(p): p for p in policies}
    n_gold = min(len(gold_ids), max_new, model.config.max_positions - len(ids) + 1)
    gold_ids = list(gold_ids[:n_gold])
    gold, rows = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a prompt shorter than the budget: recorded as sparse=False
        for key, p in configs.items():
            gold[key] = Row("gold", p, KVCache.from_prefill(prefill, replace(p, track=p.name != "full")))
            if free:
                rows[key] = Row("free", p, KVCache.from_prefill(prefill, p))
    limit = min(max_new, model.config.max_positions - len(ids))  # positions left for new tokens
    stop = set(stop_ids)
    for r in gold.values():
        if n_gold:
            r.out, r.gold_logp = [first], [float(logp0[gold_ids[0]])]
        r.done = n_gold <= 1
    for r in rows.values():
        r.out = [] if first in stop else [first]
        r.done = first in stop or limit <= 1
    ref = gold["full"]  # first in the loop, so its step is done before the rows compared with it
    active = [r for r in [*gold.values(), *rows.values()] if not r.done]
    while active:
        for i in range(0, len(active), ROWS_PER_FORWARD):
            group = active[i:i + ROWS_PER_FORWARD]
            pad = [IdleRow(group[0].cache.seq_len) for _ in range(ROWS_PER_FORWARD - len(group))]
            x = [gold_ids[r.steps] if r.kind == "gold" else r.out[-1] for r in group] + [0] * len(pad)
            stacked = StackedCache([r.cache for r in group] + pad)
            logits = model(torch.tensor(x, device=device)[:, None], stacked)[:, -1]  # [ROWS_PER_FORWARD, vocab]
            for r, row_logits in zip(group, logits):
                top = int(row_logits.argmax())
                r.steps += 1
                if r.kind == "free":
                    if top not in stop:
                        r.out.append(top)
                    r.done = top in stop or len(r.out) >= limit
                    continue
                logp = torch.log_softmax(row_logits, dim=-1)  # [vocab]
                if r is ref:
                    ref_logp, ref_top = logp, top
                r.matches += top == ref_top
                r.kl += float((ref_logp.exp() * (ref_logp - logp)).sum())  # KL(full || this row)
                r.out.append(top)
                r.gold_logp.append(float(logp[gold_ids[r.steps]]))
                r.done = r.steps + 1 >= n_gold
        active = [r for r in active if not r.done]
    return gold, rows


def fact_record(row, gold_ids, fields, depths):
    """samples.jsonl fact fields of one gold row (None when the task has no fact tokens).

    fact_accuracy: share of the fact tokens (text2json.fact_tokens) predicted top-1; field_accuracy:
    share of gold fields whose every token is; fact_nll: mean negative log-probability of the fact
    tokens; per_record: per gold record its depth in the prompt (percent), fact tokens and hits.
    A field cut off by the new-token limit is left out whole.
    """
    if fields is None:
        return dict(fact_accuracy=None, field_accuracy=None, fact_nll=None, fact_tokens=None, per_record=None)
    hit = [p == g for p, g in zip(row.out, gold_ids)]
    fields = [f for f in fields if f["tokens"] and f["tokens"][-1] < len(hit)]
    tokens = sorted({t for f in fields for t in f["tokens"]})
    per_record = [dict(depth=d, tokens=0, hits=0) for d in depths]
    for f in fields:
        per_record[f["record"]]["tokens"] += len(f["tokens"])
        per_record[f["record"]]["hits"] += sum(hit[t] for t in f["tokens"])
    whole = [all(hit[t] for t in f["tokens"]) for f in fields]  # per field: every token predicted
    return dict(fact_accuracy=sum(hit[t] for t in tokens) / len(tokens) if tokens else None,
                field_accuracy=sum(whole) / len(whole) if whole else None,
                fact_nll=-sum(row.gold_logp[t] for t in tokens) / len(tokens) if tokens else None,
                fact_tokens=len(tokens), per_record=per_record)


def policy_record(gold, free, tok):
    """samples.jsonl fields of one configuration: fidelity to full attention and the selection statistics
    on the gold path (the gold row), memory and traffic from the gold row's cache (the selection size,
    so the bytes per step, do not depend on the tokens read), the prediction from the free row (None
    without one). For full attention agreement is 1 and KL 0 by construction."""
    stats = gold.cache.stats
    tracked = gold.cache.sparse and float(stats.steps.sum()) > 0
    s = stats.summary() if tracked else {}
    return dict(
        prediction=None if free is None else tok.decode(free.out),
        new_tokens=None if free is None else len(free.out),
        steps=gold.steps, sparse=gold.cache.sparse,
        agreement=gold.matches / gold.steps if gold.steps else None,
        kl=gold.kl / gold.steps if gold.steps else None,
        oracle_recall=s.get("oracle_recall"), attention_mass=s.get("attention_mass"),
        landmark_error=s.get("landmark_error"), key_error=s.get("key_error"),
        recall_per_layer=s.get("recall_per_layer"), mass_per_layer=s.get("mass_per_layer"),
        device_kv_fraction=gold.cache.memory()["device_fraction"],
        bytes_per_step=gold.cache.store.bytes_moved / gold.steps if gold.steps else None)


def config_fields(p):
    """The configuration columns of samples.jsonl and summary.json (None where an axis does not apply)."""
    full = p.name == "full"
    return dict(method=p.name, label=config_label(p), budget=None if full else p.budget,
                chunk_size=None if full else p.chunk_size, rank=p.rank, bits=p.landmark_bits,
                residual=p.residual or None, kv_bits=p.kv_bits)


# ============================================================================ the run

def run_settings(args, max_new):
    """The settings that every result of a results folder shares (run.json)."""
    return dict(task=args.task, model=str(Path(args.model).resolve()) if args.model else "default",
                data=str(Path(args.data).resolve()) if args.data else None, tokens=args.tokens, seed=args.seed,
                dtype=args.dtype, max_new_tokens=max_new, free_run=free_running(args),
                command="python evaluate.py " + " ".join(args.argv))


def progress(done, total, start, first):
    """One line on stderr: a bar, samples done, elapsed time and the ETA from this run's pace."""
    elapsed = time.time() - start
    eta = elapsed / (done - first) * (total - done) if done > first else float("nan")
    bar = "#" * round(20 * done / total) + "." * (20 - round(20 * done / total))
    clock = lambda s: "?" if math.isnan(s) else f"{int(s) // 60}m{int(s) % 60:02d}s"
    end = "\r" if sys.stderr.isatty() and done < total else "\n"
    print(f"[{bar}] {done}/{total} samples  elapsed {clock(elapsed)}  ETA {clock(eta)}", end=end, file=sys.stderr,
          flush=True)


def gold_tokens(task, sample, tok):
    """(gold ids, fact fields, record depths) of a sample: for Text2JSON the answer as the model would
    write it and its fact tokens (text2json.fact_tokens); for the other tasks the gold text, no facts."""
    if task != "text2json":
        return tok.encode(sample["gold"]), None, None
    try:
        ids, fields = text2json.fact_tokens(sample["gold"], tok)
    except (ValueError, TypeError) as err:
        raise ValueError(f"sample {sample['id']}: bad gold answer: {err}") from None
    return ids, fields, text2json.record_depths(sample["problem"], sample["gold"])


def evaluate_sample(model, tok, sample, policies, max_new, task, verbose, free_run=True):
    """Decode one sample under every configuration still to do; returns its samples.jsonl rows.
    free_run=False skips the free rows: no prediction, no task score."""
    ids = tok.chat([{"role": "user", "content": sample["problem"]}])
    if len(ids) >= model.config.max_positions:
        print(f"warning: sample {sample['id']}: prompt of {len(ids)} tokens does not fit the model's "
              f"{model.config.max_positions} positions: skipped", file=sys.stderr)
        return []
    gold_ids, fields, depths = gold_tokens(task, sample, tok)
    sparse = [p for p in policies if p.name != "full"]
    gold, free = decode_sample(model, ids, sparse, gold_ids, max_new, tok.stop_ids, free=free_run)
    if verbose:
        for p in sparse:
            print(f"{config_key(p)}: {gold[config_key(p)].cache.budget_line()}")
    rows = []
    for p in policies:
        key = config_key(p)
        rec = policy_record(gold[key], free.get(key), tok)
        prediction = rec.pop("prediction")
        scores = score_sample(task, prediction, sample) if free_run else dict(score=None, field_recall=None)
        rows.append(dict(key=key, sample=sample["id"], task=task, **config_fields(p), prompt_tokens=len(ids),
                         max_new_tokens=max_new, gold_tokens=len(gold[key].out),
                         **fact_record(gold[key], gold_ids, fields, depths), **scores, **rec,
                         prediction=prediction))
    return rows


def free_running(args):
    """Whether the run decodes free-running rows (the task score): --free-run / --no-free-run, else on
    except for Text2JSON on the embedded default model, which cannot write the list on its own (its
    score is 0 for every policy, full attention included: the gold-forced fact accuracy measures it)."""
    if args.free_run is not None:
        return args.free_run
    return args.task != "text2json" or args.model is not None


_WORKER = {}  # a worker process's model and tokenizer (inherited through fork, never pickled)


def _init_worker(model, tok):
    torch.set_num_threads(DECODE_THREADS)
    _WORKER.update(model=model, tok=tok)


def _work(job):
    return evaluate_sample(_WORKER["model"], _WORKER["tok"], *job)


def run_jobs(model, tok, jobs, workers):
    """Yield each job's rows in order. Several CPU workers: one sample per process.

    Every sample is computed with DECODE_THREADS torch threads, in a worker or in this process, so its
    numbers do not depend on the worker count (torch's CPU kernels split a reduction differently with
    another thread count). A decode step is a few thousand small torch calls, bound by Python
    overhead and memory traffic rather than arithmetic, so a second core does more as a second process
    on the next sample than as a second thread in the same one (measured: 73 s per sample with 1
    thread, 75 s with 2).
    """
    if workers <= 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(DECODE_THREADS)
        try:
            for job in jobs:
                yield evaluate_sample(model, tok, *job)
        finally:
            torch.set_num_threads(threads)
        return
    ctx = multiprocessing.get_context("fork")  # the workers share the loaded weights copy-on-write
    with ctx.Pool(workers, initializer=_init_worker, initargs=(model, tok)) as pool:
        yield from pool.imap(_work, jobs)


def run(args):
    policies = check_inputs(args)
    shard, n_shards = parse_shard(args.shard)
    device = args.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    out = Path(args.out or f"results/{args.task}" + (f"-shard{shard}of{n_shards}" if n_shards > 1 else ""))

    tok = load_tokenizer(args.model)
    samples = load_samples(args, tok)
    settings = check_resume(out, run_settings(args, args.max_new_tokens or auto_max_new_tokens(samples, tok)),
                            adopt_max_new=args.max_new_tokens is None)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "run.json", json.dumps(settings, indent=1) + "\n")
    max_new = settings["max_new_tokens"]

    mine = samples[shard::n_shards]
    rows = read_rows(out)
    finished = {(r["key"], r["sample"]) for r in rows}
    todo = [(s, [p for p in policies if (config_key(p), s["id"]) not in finished]) for s in mine]
    todo = [(s, ps) for s, ps in todo if ps]
    if len(todo) < len(mine):
        print(f"skipped {len(mine) - len(todo)} of {len(mine)} samples: finished in {out}", file=sys.stderr)
    if todo:
        print(f"{len(todo)} samples x {len(policies)} configurations, up to {max_new} new tokens, on {device}",
              file=sys.stderr)
        model, tok = load_model(args.model, dtype=args.dtype, device=device)
        start, first = time.time(), len(mine) - len(todo)
        progress(first, len(mine), start, first)
        jobs = [(sample, ps, max_new, args.task, i == 0, settings["free_run"])
                for i, (sample, ps) in enumerate(todo)]
        workers = min(args.workers, len(todo)) if torch.device(device).type == "cpu" else 1
        for i, sample_rows in enumerate(run_jobs(model, tok, jobs, workers)):
            rows += sample_rows
            write_rows(out, rows)  # after every sample: an interruption loses no finished sample
            progress(first + i + 1, len(mine), start, first)
    summary, table, notes = write_summary(out, rows, settings)
    print(table)
    files = ["samples.jsonl", "summary.json", "summary.md"] + [n.split(":")[0] for n in notes if "skipped" not in n]
    print(f"results in {out}/: {', '.join(files)}")
    return 0


def main(argv=None):
    """Entry point; bad input is one `error: ...` line on stderr and exit code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["merge"]:
            p = _Parser(prog="evaluate.py merge", description="Combine the results folders of several shards.")
            p.add_argument("dirs", nargs="+")
            p.add_argument("--out", required=True)
            return results.merge(p.parse_args(argv[1:]))
        args = build_parser().parse_args(argv)
        args.argv = argv
        return run(args)
    except (ValueError, FileNotFoundError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
