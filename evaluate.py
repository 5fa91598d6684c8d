"""Reproduce the paper's comparisons: every KV selection policy against full attention, as tables and plots.

    python evaluate.py                       # default model, 12 Text2JSON samples of ~2K tokens, 6 policies
    python evaluate.py --budgets 0.01,0.03125,0.1 --methods full,oracle,mean --chunk-sizes 1,2,4,8
    python evaluate.py --methods full,oracle,quantized --bits 1,2,4,fp8,nvfp4
    python evaluate.py --task needle --tokens 4096      # or --task longproc (real data: files.data_dir())
    python evaluate.py --task ruler --tokens 4096       # RULER's 11 synthetic tasks; ruler:niah_single_2 for one
    python evaluate.py --model DIR --data text2json.jsonl --device cuda --dtype bfloat16 --n 500
    python evaluate.py --engine transformers --n 2     # the same run inside the transformers model (hf.py)

What it measures (PAPER.md "The paper's method", "Benchmarks"), per policy and
configuration: the facts recovered (gold-forced `fact_accuracy`, `field_accuracy`, `fact_nll`,
`retention` against full attention, and fact accuracy against the record's depth in the prompt),
the task score (Text2JSON: the paper's rule, plus field recall; free-running), fidelity to full
attention (gold-forced top-1 `agreement` and mean `kl`), selection quality against exact top-k
(`oracle_recall`, `attention_mass`, also per layer), and memory (`device_kv_fraction` of a full bf16
cache, `bytes_per_step` fetched from CPU memory).

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
     records which, `gold_path`). At each position a
     row records its top-1 token and the gold token's log-probability: `fact_accuracy` (the share of
     the answer's fact tokens, the tokens of the field values, predicted top-1), `field_accuracy`,
     `fact_nll`; and, against the full-attention row on the same path, `agreement` and `kl`, with the
     selection statistics. A small model that cannot plan the whole list can still look up each fact
     when it is shown the answer so far, which is what a sparse policy can take away;
  3. free-running rows (--free-run; on by default except for Text2JSON on the embedded default
     model, which writes no valid list with any policy, full attention included): every
     configuration's own greedy answer, scored with the task's rule.
  Every sample runs with DECODE_THREADS torch threads, and every forward has a fixed shape: a
  configuration's teacher-forced blocks (forced_block: from the model, the prompt and the policy), and
  the decode loop's forwards of exactly ROWS_PER_FORWARD rows (padded with idle rows). torch's CPU
  matmul rounds a row differently at another batch size or thread count (but not with other rows
  beside it), so a sample's numbers are the same however a run is split (resumed, sharded, one or two
  workers). The summary adds 95% intervals from a paired bootstrap over samples (results.bootstrap).

Results folder (--out): samples.jsonl (one line per configuration and sample, with the prediction),
summary.json (one row per configuration), summary.md (the table), run.json (the settings), PNG plots.
Re-running with the same --out skips finished (configuration, sample) pairs; samples.jsonl is
rewritten atomically after every sample, and the summary and plots are rebuilt from it at the end.
A resume (or merge) uses a folder only when every row is a whole, valid row of its run and run.json is
readable (results.check_rows, row_check): else it stops before any work, naming the file and line;
run.json records the checkpoint's fingerprint, so weights replaced in place are not resumed.
Ctrl-C stops the run (exit code 130; SIGTERM 143, SIGHUP 129) and says how many samples are saved;
the same command resumes. A full disk says the same, and leaves no temporary file; so does a worker
process that dies mid-sample (the OOM killer), after the samples before its own are saved.
A folder has one writer at a time (results.locked): a second run on it is refused at its start. A
sample whose prompt does not fit the model is skipped, and a configuration whose budget exceeds a
prompt runs it with full attention: summary.json counts both (`skipped`, `fell_back`) and summary.md
says so under the table; a run in which no sample fits is an error.

Several GPUs (e.g. the 500-sample Text2JSON set): split the samples with --shard i/n, one process per
GPU, then merge the folders:

    for i in 0 1 2 3 4 5 6 7; do
      CUDA_VISIBLE_DEVICES=$i python evaluate.py --model DIR --data text2json.jsonl --n 500 \\
          --device cuda --dtype bfloat16 --shard $i/8 --out results/t2j-$i &
    done; wait
    python evaluate.py merge results/t2j-* --out results/t2j

Under torchrun (or a job array that sets RANK and WORLD_SIZE) --shard defaults to RANK/WORLD_SIZE and
--device cuda means cuda:LOCAL_RANK:  torchrun --nproc-per-node 8 evaluate.py --device cuda ...
Each rank then writes its own folder, --out (default results/<task>) plus -shard{RANK}of{WORLD_SIZE},
so that one --out given to every rank is never shared:  merge DIR-shard*of8 --out DIR.
"""

import argparse
import contextlib
import errno
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import sys
import threading
import warnings
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

import torch
from tqdm import tqdm

import claims
import hf
import kvcache
import results
import ruler
import skew
import tasks
import text2json
from files import check_cache_dir
from kvcache import (
    POLICIES,
    PRESETS,
    SWEEP_AXES,
    SparseCache,
    StackedCache,
    TeacherForced,
    from_prefill,
    make_policy,
    oracle_of,
    override,
)
from model import (
    DTYPES,
    checkpoint_fingerprint,
    default_model_dir,
    default_model_path,
    load_config,
    load_model,
    load_tokenizer,
    prefill,
)
from results import (
    BITS,
    check_resume,
    locked,
    read_rows,
    skip_record,
    token_span,
    write_atomic,
    write_rows,
    write_summary,
)

DEFAULT_METHODS = ",".join(
    ("full", "oracle", "shadowkv", "mean", "quantized", "paper")
)  # the default run's policies
DEFAULT_N = (
    12  # samples of the default run: 6 rounds of 2 workers, within 7 minutes from a fresh clone (README)
)
# samples per task of `python evaluate.py claims` (RULER: a third of it per task, claims.ruler_n): within 15
# minutes on 2 cores after the default run (README)
DEFAULT_CLAIMS_N = 12
DECODE_THREADS = 1  # torch threads per sample, whatever the worker count: the same numbers either way
ROWS_PER_FORWARD = 8  # every decode forward has exactly this many rows (padded): the same shapes in every run
DEFAULT_BUDGET = 0.03125  # PAPER.md "The paper's method": 3.125% of the prompt
N_NEEDLES = 11  # PAPER.md "Benchmarks": NeedleBench v2 parallel retrieval, 11 needles
MAX_NEW_CAP = 1024  # PAPER.md "Benchmarks": Text2JSON decodes up to 1024 new tokens
TASKS = ("text2json", "needle", "longproc", "ruler")  # and ruler:NAME[,NAME...] (ruler.task_names)
ENGINES = ("model.py", "transformers")  # whose forward the policies run in: model.py, or hf.Engine's


# ============================================================================ command line


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is a ValueError: main() prints it as one `error:` line."""

    def error(self, message):
        raise ValueError(message)


def build_parser():
    p = _Parser(
        prog="evaluate.py",
        description="Compare KV selection policies against full attention "
        "(python evaluate.py merge DIR... --out DIR combines shard folders).",
    )
    p.add_argument(
        "--model",
        help="checkpoint folder (config.json, *.safetensors, tokenizer.json); default: SmolLM2-135M-Instruct",
    )
    p.add_argument(
        "--task",
        default="text2json",
        help=f"{', '.join(TASKS)} (all eleven RULER tasks), or ruler:NAME[,NAME...] for some: "
        f"{', '.join(ruler.TASKS)}",
    )
    p.add_argument(
        "--data",
        help="text2json: the released JSONL (default: generated samples); "
        "needle / longproc: the data folder (default: files.data_dir(): $KVOFFLOAD_DATA, else shared/data beside the repository); "
        "ruler: the folder of PaulGrahamEssays.jsonl (default: files.data_dir()/needlebench)",
    )
    p.add_argument("--n", type=int, default=DEFAULT_N, help="number of samples (the first n of --data)")
    p.add_argument(
        "--tokens",
        type=int,
        default=2048,
        help="prompt length in the model's tokens: text2json (generated samples) and needle: the "
        "length of the user turn built; ruler: RULER's sequence length (the chat-formatted prompt, "
        "the answer prefix and the task's tokens to generate); longproc: a cap: the end of each HTML page is cut so "
        "the user turn fits (8k prompts are 11K-107K tokens of the default model; the rows "
        "listed in the cut part are missing from the prompt but stay in the gold table); "
        "text2json --data: unused",
    )
    p.add_argument(
        "--group",
        default="8k",
        choices=tasks.LONGPROC_GROUPS,
        help="longproc: the output-length group (default 8k, the paper's; its prompts are huge, "
        "see --tokens)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma list of {', '.join(POLICIES)}")
    p.add_argument(
        "--budgets", default=str(DEFAULT_BUDGET), help="comma list of shares of the prompt in (0, 1]"
    )
    p.add_argument(
        "--chunk-sizes", help="comma list; sweeps mean and quantized (default: their presets, 8 and 1)"
    )
    p.add_argument(
        "--ranks", help="comma list of SVD ranks (int, or share of channels < 1); sweeps svd, shadowkv"
    )
    p.add_argument(
        "--bits", help=f"comma list of landmark formats for quantized: {', '.join(BITS)} (default 2)"
    )
    p.add_argument(
        "--residual", type=int, default=0, help="meta-chunk size of residual landmark quantization"
    )
    p.add_argument(
        "--kv-bits",
        help="quantize the offloaded K/V of every sparse policy with this format "
        "(e.g. 4, int4; default: each preset's: exact, paper 4-bit)",
    )
    p.add_argument(
        "--score-rule",
        choices=("softmax_max", "mean_query"),
        help="selection score of every sparse policy (default: each preset's; softmax_max is "
        "ShadowKV's and the paper's as evaluated, mean_query the authors' fast path)",
    )
    p.add_argument(
        "--outliers",
        help="ShadowKV's outlier chunks: an int, a share of the prompt below 1, or "
        "'budget' (default: 48; on generated short Text2JSON prompts 1.9%% of the "
        "prompt, ShadowKV's 384 tokens per 20.1K)",
    )
    p.add_argument("--no-chat", action="store_true", help="plain prompts, no chat template (base models)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        help="default: 1024/905 x the longest gold answer (the paper's ratio), at most 1024",
    )
    p.add_argument(
        "--engine",
        default="model.py",
        choices=ENGINES,
        help="the forward the policies run inside: model.py (default), or the transformers model of the same "
        "checkpoint folder (hf.py; needs the transformers package)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument(
        "--out",
        help="results folder (default: results/<task>; a shard suffix is added when the "
        "shard comes from RANK/WORLD_SIZE or --out is not given); one run at a time per folder",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="CPU only: samples decoded in parallel, one process and one thread each (default: 2)",
    )
    p.add_argument(
        "--free-run",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also decode each configuration's own answer for the task score (default: on, except "
        "Text2JSON on the embedded default model)",
    )
    p.add_argument(
        "--decode-loop",
        action="store_true",
        help="decode the gold-forced rows step by step too, one token per forward, instead of the "
        "teacher-forced pass (the reference the pass is tested against; about 4x slower)",
    )
    p.add_argument(
        "--shard", help="i/n: run samples i, i+n, i+2n, ... (default under torchrun: RANK/WORLD_SIZE)"
    )
    return p


def parse_list(text, convert, what, hint="give a comma-separated list"):
    """'a,b,c' -> [convert(a), ...], with a one-line error naming the option and the bad item."""
    items = []
    for x in (x.strip() for x in text.split(",")):
        if not x:
            continue
        try:
            items.append(convert(x))
        except ValueError:
            raise ValueError(f"bad {what} value {x!r}: {hint}") from None
    if not items:
        raise ValueError(f"{what} is empty")
    return items


RANK_HINT = "a rank is an int >= 1 or a share of the key channels in (0, 1)"


def parse_rank(text):
    """An SVD rank: an int (160) or a share of the channels in (0, 1) (0.15625, ShadowKV's 160/1024).
    Anything else (1.5, 0, 1.0, -3) is a ValueError: a fractional rank above 1 would silently run as
    its integer part. Whether an int rank fits the model is checked once its config is read."""
    try:
        rank = int(text)
    except ValueError:
        share = float(text)  # not a number at all: a ValueError too
        if not 0 < share < 1:
            raise ValueError(RANK_HINT) from None
        return share
    if rank < 1:
        raise ValueError(RANK_HINT)
    return rank


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


SWEEP_OPTIONS = (  # the options that sweep a part's field (budgets apply to every sparse policy)
    ("chunk_size", "--chunk-sizes"),
    ("rank", "--ranks"),
    ("landmark_bits", "--bits"),
    ("residual", "--residual"),
)


def configurations(args):
    """Every policy configuration of the sweep (PAPER.md "The problem": the ablations over budget, chunk size,
    SVD rank and landmark precision). An axis applies to the policies whose parts declare it
    (`Policy.axes`, see kvcache.PRESETS): the budget to every sparse policy, the chunk size to `mean`,
    `quantized` and `quest`, the rank to `svd`, bits and residual to `quantized`; the systems
    (`shadowkv`, `paper`, `paper_fast`, `arkvale`, `lrqk`, `infinigen`) keep their authors' structure
    and sweep only their budget.
    --kv-bits and --score-rule (one value, not a sweep) apply to every sparse policy, --outliers to
    the policies that keep outlier chunks (and, like a sweep, is refused where no method keeps them);
    `full` has one configuration. make_policy raises a one-line ValueError on any bad value."""
    methods = parse_list(args.methods, str, "--methods")
    bits = parse_list(args.bits, str, "--bits") if args.bits else [None]
    for b in bits:
        if b is not None and b not in BITS:
            raise ValueError(f"bad --bits {b!r}: choose from {', '.join(BITS)}")
    sweep = dict(  # axis (a field of a policy's parts) -> the values this run gives it
        budget=parse_list(args.budgets, float, "--budgets"),
        chunk_size=parse_list(args.chunk_sizes, int, "--chunk-sizes") if args.chunk_sizes else [None],
        rank=parse_list(args.ranks, parse_rank, "--ranks", RANK_HINT) if args.ranks else [None],
        landmark_bits=bits,
        residual=[args.residual or None],
    )
    for method in methods:
        if method not in PRESETS:
            raise ValueError(f"unknown method {method!r}: choose from {', '.join(POLICIES)}")
    for axis, option in SWEEP_OPTIONS:  # a sweep that no method of the run takes is a mistake, not a no-op
        takers = [m for m in POLICIES if axis in PRESETS[m].axes]
        if getattr(args, option.strip("-").replace("-", "_")) and not set(takers) & set(methods):
            raise ValueError(
                f"{option} sweeps the {axis} of {', '.join(takers)}, and no method of --methods "
                f"{args.methods} has it: add one of them"
            )
    keeps_outliers = [m for m in POLICIES if PRESETS[m].sparse and PRESETS[m].exact.outliers]
    if args.outliers is not None and not set(keeps_outliers) & set(methods):
        raise ValueError(
            f"--outliers sets the outlier chunks of {', '.join(keeps_outliers)}, and no method of --methods "
            f"{args.methods} keeps them: add one of them"
        )
    outliers = shadowkv_outliers(args)
    policies = {}
    for method in methods:
        preset = PRESETS[method]
        if not preset.sparse:
            policies[preset.key()] = preset
            continue
        fixed = dict(
            kv_bits=args.kv_bits,
            score_rule=args.score_rule,
            outliers=outliers if preset.exact.outliers else None,
        )
        axes = [axis for axis in SWEEP_AXES if axis in preset.axes]
        for values in product(*(sweep[axis] for axis in axes)):
            p = make_policy(method, **fixed, **dict(zip(axes, values)))
            policies.setdefault(p.key(), p)
    return list(policies.values())


def shadowkv_outliers(args):
    """ShadowKV's outlier chunks for this run: --outliers (an int count, a share of the prompt below 1,
    or 'budget'); by default the preset's 48, except on the generated short Text2JSON prompts (no
    --data, --tokens below the paper's mean prompt of 20.1K), where 48 chunks would keep 18% of a 2K
    prompt exact: there ShadowKV's 384 tokens per 20.1K are scaled to the prompt (kvcache.OUTLIER_SHARE,
    PAPER.md "What this project does differently, and why"). The budget line says which."""
    if args.outliers is not None:
        text = args.outliers.strip()
        if text == "budget":
            return text
        try:
            value = float(text)
        except ValueError:
            value = -1
        if math.isfinite(value) and value >= 1 and value == int(value):
            return int(value)
        if 0 <= value < 1:
            return value if value else 0
        raise ValueError(
            f"bad --outliers {args.outliers!r}: an int count of chunks, a share of the prompt "
            "below 1, or 'budget'"
        )
    generated = args.task == "text2json" and args.data is None or ruler.is_spec(args.task)
    if generated and args.tokens < 20100:
        return kvcache.OUTLIER_SHARE
    return None


def check_inputs(args):
    """Every check that needs no model: runs before any loading or work (bad input -> ValueError)."""
    if args.task not in TASKS[:3] and not ruler.is_spec(args.task):
        raise ValueError(
            f"unknown --task {args.task!r}: choose from {', '.join(TASKS)} or ruler:NAME[,NAME...]"
        )
    if ruler.is_spec(args.task):
        ruler.task_names(args.task)  # an unknown RULER task: one line that names them
    if args.n < 1:
        raise ValueError(f"--n {args.n} must be >= 1")
    if args.workers < 1:
        raise ValueError(f"--workers {args.workers} must be >= 1")
    check_out_option(args.out)
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
    if args.engine == "transformers" and not hf.available():
        raise ValueError("--engine transformers needs the transformers package: pip install transformers")
    check_data(args.task, args.data)
    check_cache_dir()  # the converted default model and fitted grids are written there
    return configurations(args)


def check_out_option(out, option="--out"):
    """An empty --out (an unset shell variable: --out $OUT) would put the results folder, lock included,
    into the current folder: refused."""
    if out is not None and not out.strip():
        raise ValueError(
            f"{option} {out!r} is empty: give a results folder path (is the variable you passed unset?)"
        )


def check_model_dir(path):
    """A checkpoint folder must hold config.json, tokenizer.json and weights (model.py loads them)."""
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    for name in ("config.json", "tokenizer.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} not found: the model folder needs it")
    if not ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()):
        raise FileNotFoundError(
            f"no weights in {path}: expected model.safetensors or model.safetensors.index.json"
        )


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


# ============================================================================ samples


def load_samples(args, tok):
    """All samples of the run as dicts: `id`, `problem`, `gold` (the reference answer text), `new_cap`
    (the paper's new-token limit for the task) and what the task's scorer needs. Sharding happens
    later, so every shard sees the same set. Bad data fails here, before the model loads: the loaders
    check every row (text2json.load, tasks.load_longproc), and ids must be distinct.

    Returns (samples, known): `known` is the set of every sample id of the data file, whatever --n
    (a results folder may hold samples of a larger --n), or None where the samples are generated and
    numbered 0, 1, ... (see row_check)."""
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
    other inside it, kvcache.Select.steps_only); forced=False: every gold row steps through the decode
    loop, one token per step (the reference the pass is tested against). Free rows (free=True): each
    configuration's own greedy answer, up to max_new tokens or a stop token, always in the loop.

    calibration: {channels: skew.calibration} for the policies that need one (InfiniGen).

    Returns (gold, free): {configuration key: row}, both holding full attention's; free is {} when
    free is False.
    """
    device = model.embed_tokens.weight.device
    queries = any(p.select.needs_queries for p in policies)  # LRQK builds from the prompt's queries
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
            cal = calibration[p.select.channels] if p.sparse and p.select.needs_calibration else None
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
    `key` (the identity: kvcache.Policy.key, every parameter), `config` (the same as a dict),
    the columns of the tables (None where an axis does not apply), the sweep axes the policy takes
    part in with the legend of each plot line (`legends`: the label without that axis), its place in
    the tables (`order`: its preset's line in kvcache.PRESETS) and the key of the oracle it is
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
        bits=select and select.landmark_bits,
        residual=select and select.residual or None,
        kv_bits=p.keys.kv_bits,
        axes=list(p.axes),
        legends={axis: p.label(without=axis) for axis in p.axes},
        order=POLICIES.index(p.name),
        oracle_key=oracle_of(p).key() if p.sparse else None,
    )


# ============================================================================ the run

INDEX = re.compile(r"0|[1-9][0-9]*")  # the id of a generated sample: its index
# the fields of a row that say what was computed (its identity, its oracle, every column of its
# configuration but the display label): a row's must be what its `config` gives (config_complaint)
IDENTITY = ("key", "config", "oracle_key") + tuple(f for f in results.CONFIG_FIELDS if f != "label")


def row_check(args=None, known=None):
    """check_row for results.check_rows (resume and merge): what is wrong with a row's sample or
    configuration in a run of the settings `run` (run.json), or None.

    The sample must be one of the run's data: an id of the data file (`known`, load_samples), or for
    generated samples an index 0, 1, ... (whatever --n: a folder may hold a larger run's samples);
    merge loads no data (args None) and leaves the sample unchecked. The configuration must be one
    this evaluate.py makes with the run's settings: its `config` rebuilds a policy (its preset with
    those fields), whose key and parameter columns (config_fields) are the row's, and whose
    score_rule and outliers are the run's (as `configurations` sets them). The display fields (label,
    legends, axes, order) are not compared: they do not change a number. Each configuration is
    checked once."""
    checked = {}
    config_row = ("key",) + results.CONFIG_FIELDS + results.ROW_CONFIG

    def check(row, run):
        sample = row["sample"]
        if args is not None and not generated_sample(args.task, sample, known):
            if known is not None:
                where = f"no sample of {args.data or f'the {args.group} tasks'} has that id"
            elif ruler.is_spec(args.task):
                where = f"the samples of {args.task} are named TASK/0, TASK/1, ... for each of its tasks"
            else:
                where = f"the {args.task} samples of these settings are numbered 0, 1, ..."
            return f"sample {sample!r} is not a sample of this run ({where})"
        config = json.dumps([row[f] for f in config_row], sort_keys=True)
        if config not in checked:
            checked[config] = config_complaint(row, run)
        return checked[config]

    return check


def generated_sample(task, sample, known):
    """Whether `sample` is a sample id of the run: one of the data file's (`known`), else a generated
    one: an index, or for RULER TASK/index with TASK one of the run's (ruler.is_sample_id)."""
    if known is not None:
        return sample in known
    return ruler.is_sample_id(sample, task) if ruler.is_spec(task) else INDEX.fullmatch(sample) is not None


def config_complaint(row, run):
    """What is wrong with a row's configuration in a run of the settings `run`, or None (row_check)."""
    config = row["config"]
    if config.get("name") not in PRESETS:
        return f"its config names no method of evaluate.py ({config.get('name')!r})"
    try:
        p = override(PRESETS[config["name"]], **{k: v for k, v in config.items() if k != "name"})
        want = config_fields(p)
    except Exception as err:  # an unknown field, a value out of range or of another kind: no policy
        return f"its config is no configuration of evaluate.py ({' '.join(str(err).split())})"
    for f in IDENTITY:
        if row[f] != want[f]:
            shown = "" if f in ("key", "config") else f" ({row[f]!r}, its config gives {want[f]!r})"
            return f"its {f} does not match its config{shown}"
    if p.sparse:
        keeps_outliers = PRESETS[p.name].exact.outliers
        try:
            ref = make_policy(
                p.name, score_rule=run["score_rule"], outliers=run["outliers"] if keeps_outliers else None
            )
        except ValueError:
            ref = None
        for name, mine, run_value in (
            ("score_rule", p.select.score_rule, ref and ref.select.score_rule),
            ("outliers", p.exact.outliers, ref and ref.exact.outliers),
        ):
            if mine != run_value:
                return f"made with {name}={mine!r}, not the {name} of run.json ({run[name]!r})"
    return None


def run_settings(args, max_new):
    """The settings that every result of a results folder shares (run.json), each in one spelling,
    so that a resume compares meanings: `fp32` is float32, and the default model's own folder given
    as --model is the default model. `checkpoint` (model.checkpoint_fingerprint) is what the folder
    holds, so that weights replaced in the same folder between a run and its resume are not mixed."""
    model = "default" if is_default_model(args.model) else str(Path(args.model).resolve())
    if args.engine != "model.py":  # another forward, other last digits: a folder holds one engine's results
        model += f" ({args.engine})"
    return dict(
        format=results.RESULTS_FORMAT,
        task=args.task,
        model=model,
        checkpoint=checkpoint_fingerprint(args.model or default_model_dir()),  # the files, not their path
        data=str(Path(args.data).resolve()) if args.data else None,
        tokens=args.tokens,
        seed=args.seed,
        dtype=str(DTYPES[args.dtype]).removeprefix("torch."),
        max_new_tokens=max_new,
        free_run=free_running(args),
        gold_path="loop" if args.decode_loop else "pass",
        group=args.group if args.task == "longproc" else None,
        outliers=shadowkv_outliers(args),
        score_rule=args.score_rule,
        chat=not args.no_chat,
        command="python evaluate.py " + " ".join(args.argv),
    )


def progress(done, total, what="samples"):
    """A tqdm bar on stderr: samples done, elapsed time and the ETA from this run's pace (samples done
    before this run, `done`, do not count towards the pace). On a terminal it redraws one line; in a
    log file (stderr not a terminal) every sample gets a line of its own (`_Lines`)."""
    tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=done,
        unit=what[:-1],
        desc=what,
        file=sys.stderr if tty else _Lines(sys.stderr),
        mininterval=0.1 if tty else 0,
        dynamic_ncols=tty,
        ncols=None if tty else 80,
        leave=tty,  # a log already has the last line; a terminal keeps the bar
    )


class _Lines:
    """A file for tqdm that turns each redraw of the bar ('\\r' + text) into a line of its own."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        text = text.strip("\r\n").rstrip()
        if text:
            self.stream.write(text + "\n")

    def flush(self):
        self.stream.flush()


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


def prompt_ids(tok, sample):
    """A sample's prompt ids: its user turn, chat-formatted, then its answer prefix if it has one (RULER
    puts its answer prefix after the chat template: the model's first token is the answer's first)."""
    ids = tok.chat([{"role": "user", "content": sample["problem"]}])
    return ids + tok.encode(sample["answer_prefix"]) if sample.get("answer_prefix") else ids


def free_running(args):
    """Whether the run decodes free-running rows (the task score): --free-run / --no-free-run, else on
    except for Text2JSON on the embedded default model, which cannot write the list on its own (its
    score is 0 for every policy, full attention included: the gold-forced fact accuracy measures it)."""
    if args.free_run is not None:
        return args.free_run
    return args.task != "text2json" or not is_default_model(args.model)


def is_default_model(path):
    """Whether --model names the embedded default model (not given, or its own converted folder)."""
    return path is None or Path(path).resolve() == default_model_path().resolve()


class WorkerLost(RuntimeError):
    """A worker process ended without sending its sample's rows (the OOM killer, a kill -9)."""


def _serve(conn, inherited, model, tok, calibration):
    """A worker process (run_jobs): decode each job the parent sends on `conn`, send back its rows (or
    its exception), until the parent closes the pipe. Ctrl-C reaches every process of the terminal:
    a worker ignores it and the parent ends it. SIGTERM and SIGHUP end it at once (not the parent's
    handler, Stop): mid-sample, a worker has nothing to save."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_DFL)
    for c in inherited:  # the parent's ends of the earlier workers' pipes: theirs to close, not ours
        c.close()
    torch.set_num_threads(DECODE_THREADS)
    while True:
        try:
            job = conn.recv()
        except EOFError:  # the run is over, or the parent is gone
            return
        try:
            reply = (True, evaluate_sample(model, tok, *job, calibration=calibration))
        except Exception as err:  # raised again in the parent, as if the sample ran there
            reply = (False, err)
        try:
            conn.send(reply)
        except BrokenPipeError:  # the parent is gone (kill -9): nobody wants the rows
            return


def run_jobs(model, tok, jobs, workers, calibration=None):
    """Yield each job's rows in order. Several CPU workers: one sample per process.

    Every sample is computed with DECODE_THREADS torch threads, in a worker or in this process, so its
    numbers do not depend on the worker count (torch's CPU kernels split a reduction differently with
    another thread count). A decode step is a few thousand small torch calls, bound by Python
    overhead and memory traffic rather than arithmetic, so a second core does more as a second process
    on the next sample than as a second thread in the same one (measured: 73 s per sample with 1
    thread, 75 s with 2).

    Each worker is a forked process (it shares the loaded weights copy-on-write) with a pipe of its own
    and one job at a time. Not multiprocessing.Pool: its workers share one job queue behind a lock,
    and a worker killed while it waits on that queue (SIGHUP from a closed terminal reaches the whole
    process group) keeps the lock forever, so the pool's own shutdown then waits forever. Here a
    worker that ends at any point only closes its own pipe: the parent raises WorkerLost, or, when
    the run is stopped, ends the other workers and returns.
    """
    if workers <= 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(DECODE_THREADS)
        try:
            for job in jobs:
                yield evaluate_sample(model, tok, *job, calibration=calibration)
        finally:
            torch.set_num_threads(threads)
        return
    ctx = multiprocessing.get_context("fork")
    pool = {}  # the parent's end of each worker's pipe -> its process
    try:
        for _ in range(workers):
            mine, theirs = ctx.Pipe()
            args = (theirs, list(pool), model, tok, calibration)
            worker = ctx.Process(target=_serve, args=args, daemon=True)
            worker.start()
            theirs.close()  # the worker holds the only copy of its end: its pipe ends when it does
            pool[mine] = worker
        yield from _in_order(pool, jobs)
    finally:
        for conn, worker in pool.items():
            worker.terminate()  # SIGTERM; one that has already ended is left as it is
            worker.join()
            conn.close()


def _in_order(pool, jobs):
    """Hand each idle worker of `pool` the next job, and yield the jobs' rows in the jobs' order (a
    sample that finishes early waits in `ahead` for the ones before it). A sample that fails (its
    exception, or its worker lost) is raised in its turn, so the samples before it are still yielded
    (and saved); no job is handed out after it. A worker ended by SIGTERM or SIGHUP stops the run at
    once, as the parent's own handler does (Stop)."""
    todo = iter(enumerate(jobs))
    busy = {}  # conn -> the index of the job its worker decodes
    ahead = {}  # job index -> (True, its rows) or (False, the exception to raise), before its turn
    following = 0  # the index of the next job to yield

    def hand_out(conn):
        i, job = next(todo, (None, None))
        if job is not None:
            busy[conn] = i
            with contextlib.suppress(BrokenPipeError):  # a worker that has ended: wait() below says so
                conn.send(job)

    for conn in pool:
        hand_out(conn)
    while busy:
        for conn in multiprocessing.connection.wait(list(busy)):
            i = busy.pop(conn)
            try:
                ahead[i] = conn.recv()  # (True, the sample's rows) or (False, its exception)
            except (EOFError, OSError):  # the worker ended mid-sample, or mid-reply
                worker = pool[conn]
                worker.join()
                if -worker.exitcode in STOP_SIGNALS:
                    raise Stop(-worker.exitcode) from None
                lost = f"the worker process decoding sample {jobs[i][0]['id']} ended"
                ahead[i] = (False, WorkerLost(f"{lost} ({exit_reason(worker.exitcode)}) without its rows"))
            if all(ok for ok, _ in ahead.values()):
                hand_out(conn)
        while following in ahead:
            ok, reply = ahead.pop(following)
            if not ok:
                raise reply
            yield reply
            following += 1


def exit_reason(code):
    """How a process ended, from its exit code: 'killed by SIGKILL' for -9, else 'exit code N'."""
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def calibrations(model, tok, policies):
    """{channels: InfiniGen's calibration of this model} for the policies that need one (skew.py), fitted
    (or read from the cache) once, in this process, before any worker starts."""
    shares = {p.select.channels for p in policies if p.sparse and p.select.needs_calibration}
    return {c: skew.calibration(model, tok, c) for c in sorted(shares)}


def results_folder(args, shard, n_shards):
    """--out, or results/<task>; with a -shard{i}of{n} suffix when the shard is not named on the
    command line, so that the processes of one torchrun (RANK/WORLD_SIZE) never share a folder
    even when they were all given the same --out. An explicit --shard writes --out as given (two
    processes on one folder: the second is refused, see results.locked)."""
    suffix = f"-shard{shard}of{n_shards}" if n_shards > 1 else ""
    if args.out is None:
        return Path(f"results/{args.task.replace(':', '-')}{suffix}")
    return Path(args.out + suffix if args.shard is None else args.out)


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


def unfit(p, config, tok):
    """Why the configuration p cannot run on this model as what it is named, or None: LRQK's rank (a
    share of head_dim, by architecture: kvcache.Select.rank) must be 1 to head_dim; a policy whose dense
    layers are every layer of the model (InfiniGen's first 2) would be full attention under another
    name; InfiniGen must be able to read its calibration text (skew.cannot_calibrate). A run refuses
    such a configuration before any work (`prepare`); `claims` leaves it out and says why."""
    if not p.sparse:
        return None
    select, d = p.select, config.head_dim
    if select.needs_queries:
        share, r = select.qk_share(config.arch), select.rank(d, config.arch)
        if r > d:
            return (
                f"the {p.name} policy's qk_rank {share:g} is above the model's head_dim {d}: give at most "
                f"{d} or a share up to 1"
            )
        if r < 1:
            least = next(n for n in range(1, 4096) if select.rank(n, config.arch))
            return (
                f"the {p.name} policy's rank, {share:g} of the model's head_dim {d}, rounds to 0: LRQK "
                f"needs a head_dim of at least {least}"
            )
    if select.dense_layers >= config.n_layers:
        return (
            f"the {p.name} policy attends every token in its first {select.dense_layers} layers, and the "
            f"model has {config.n_layers}: it would be full attention under another name"
        )
    if select.needs_calibration:
        return skew.cannot_calibrate(len(skew.calibration_ids(tok)), config.max_positions)
    return None


def uses_tokens(args):
    """Whether --tokens sets the prompt length (generated samples) or is ignored (files of fixed prompts)."""
    return (
        args.task == "needle" or ruler.is_spec(args.task) or (args.task == "text2json" and args.data is None)
    )


def too_long(samples, tok, max_positions):
    """{sample id: prompt tokens} of the samples whose prompt (chat template included) does not fit
    the model's positions: they get no result, and the summary says so."""
    sizes = {s["id"]: len(prompt_ids(tok, s)) for s in samples}
    return {i: n for i, n in sizes.items() if n >= max_positions}


def no_fit_message(args, skipped, max_positions, max_new):
    """Why a run with no sample that fits gives nothing, and what to change."""
    sizes = skipped.values()
    fit = max(256, args.tokens * (max_positions - max_new) // max(sizes) // 64 * 64)  # longest + answer fit
    fix = (
        f"use a smaller --tokens (about {fit})"
        if uses_tokens(args)
        else "use shorter samples or a model with more positions"
    )
    return (
        f"no sample fits the model: every prompt ({token_span(sizes)} tokens with the chat template) is "
        f"at least its {max_positions} positions, so the run would give no result: {fix}"
    )


class Stop(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a job scheduler, a closed terminal): stops a run as Ctrl-C does, with the
    signal's exit code (128 + its number: 143, 129)."""

    def __init__(self, signum):
        self.signal = signal.Signals(signum).name
        self.code = 128 + signum
        super().__init__(self.signal)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _stop(signum, frame):
    for s in STOP_SIGNALS:  # once: a second signal does not break the clean-up of the first
        signal.signal(s, signal.SIG_IGN)
    raise Stop(signum)


def stop_code(stop):
    """The exit code of a run stopped by `stop` (a KeyboardInterrupt): 130 for Ctrl-C, 128 + signal."""
    return getattr(stop, "code", 130)


def stopped_by(stop):
    """'' for Ctrl-C, ' (SIGTERM)' or ' (SIGHUP)' for a Stop: what the interrupted line says."""
    return f" ({stop.signal})" if isinstance(stop, Stop) else ""


def saved_samples(out, mine, policies):
    """How many of the samples `mine` have a saved row for every configuration of `policies`."""
    keys = {p.key() for p in policies}
    rows = read_rows(out)
    done = {s["id"] for s in mine} & {r["sample"] for r in rows}
    return sum(keys <= {r["key"] for r in rows if r["sample"] == i} for i in done)


def saved_line(out, mine, policies):
    """'N of M samples are saved in OUT': what the one line of a run that failed midway says is kept."""
    return f"{saved_samples(out, mine, policies)} of {len(mine)} samples are saved in {out}"


def interrupted(out, mine, policies, before, stop):
    """Ctrl-C, SIGTERM, SIGHUP: what is saved (samples.jsonl is rewritten atomically after every
    sample) and how to go on; returns the exit code (stop_code)."""
    saved = saved_samples(out, mine, policies)
    if sys.stderr.isatty():
        print(file=sys.stderr)  # end the progress line
    print(
        f"interrupted{stopped_by(stop)}: {saved} of {len(mine)} samples are saved in {out} "
        f"({saved - before} by this run); run the same command again to resume",
        file=sys.stderr,
    )
    return stop_code(stop)


def not_written(err, saved):
    """The one line of a write that failed (a full disk): which file, why, what is saved, what to do."""
    fix = "free some space" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "fix that"
    return f"cannot write {err.filename} ({err.strerror}): {saved}; {fix}, then run the same command again"


@dataclass
class Plan:
    """A run checked and ready (`prepare`): its folder locked, its finished rows read, what is left to do."""

    args: argparse.Namespace
    policies: list
    out: Path
    device: str
    mine: list  # this shard's samples
    fits: list  # those whose prompt fits the model
    todo: list  # [(sample, the configurations it still needs)]
    rows: list  # the rows already in the folder
    settings: dict  # run.json
    dropped: dict  # {configuration key: why it cannot run on this model} (prepare's drop_unfit)


def prepare(args, policies, stack, drop_unfit=False) -> Plan:
    """Every check of a run and the reading of its folder, before any work: the configurations of the
    command line (or `policies` given: `python evaluate.py claims` gives its own), the model's config
    and tokenizer, the samples, and the results folder, locked (on `stack`, a contextlib.ExitStack,
    until the caller is done) and read whole (results.check_resume). Bad input is a ValueError; so is
    a configuration that cannot run on the model (`unfit`), unless drop_unfit: then it is left out, and
    the plan's `dropped` says why."""
    configs = check_inputs(args)
    policies = configs if policies is None else policies
    shard, n_shards = parse_shard(args.shard)
    device = args.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    out = results_folder(args, shard, n_shards)
    results.check_folder(out)

    config = load_config(args.model or default_model_dir())
    check_fit(args, policies, config)
    tok = load_tokenizer(args.model, config, chat_format="plain" if args.no_chat else None)
    dropped = {p.key(): why for p in policies if (why := unfit(p, config, tok))}
    if dropped and not drop_unfit:
        p = next(p for p in policies if p.key() in dropped)
        raise ValueError(f"{dropped[p.key()]}: drop {p.name} from --methods")
    policies = [p for p in policies if p.key() not in dropped]
    samples, known = load_samples(args, tok)
    mine = samples[shard::n_shards]
    if not mine:
        raise ValueError(
            f"shard {shard}/{n_shards} has no sample: the run has {len(samples)} samples; "
            "raise --n or use fewer shards"
        )
    max_new = args.max_new_tokens or auto_max_new_tokens(samples, tok)
    skipped = too_long(mine, tok, config.max_positions)
    if len(skipped) == len(mine):
        raise NoSampleFits(no_fit_message(args, skipped, config.max_positions, max_new))
    if skipped:
        print(
            f"warning: skipping {len(skipped)} of {len(mine)} samples: their prompts "
            f"({token_span(skipped.values())} tokens with the chat template) do not fit the model's "
            f"{config.max_positions} positions (the summary says so)",
            file=sys.stderr,
        )

    stack.enter_context(locked(out))  # the only writer of `out` from here on; a second process is refused
    settings, rows = check_resume(  # every row whole and of this run, else one line, nothing done
        out,
        dict(run_settings(args, max_new), max_positions=config.max_positions, skipped=skipped),
        adopt_max_new=args.max_new_tokens is None,
        check_row=row_check(args, known),
    )
    settings["skipped"] = skip_record(settings["skipped"], rows)
    finished = {(r["key"], r["sample"]) for r in rows}
    fits = [s for s in mine if s["id"] not in skipped]
    todo = [(s, [p for p in policies if (p.key(), s["id"]) not in finished]) for s in fits]
    todo = [(s, ps) for s, ps in todo if ps]
    longest = max((len(gold_tokens(args.task, s, tok)[0]) for s, _ in todo), default=0)
    if longest > settings["max_new_tokens"]:
        print(
            f"warning: max_new_tokens={settings['max_new_tokens']} is shorter than the longest gold answer "
            f"({longest} tokens): the gold-forced rows stop there, so fact accuracy leaves out the facts "
            "after it (the summary counts them); a larger --max-new-tokens scores them",
            file=sys.stderr,
        )
    return Plan(args, policies, out, device, mine, fits, todo, rows, settings, dropped)


def execute(plan: Plan) -> int:
    """Decode what `plan` has left to do, saving every sample as it ends, then the summary."""
    args, policies, out, device = plan.args, plan.policies, plan.out, plan.device
    mine, fits, todo, rows, settings = plan.mine, plan.fits, plan.todo, plan.rows, plan.settings
    max_new = settings["max_new_tokens"]
    before = len(fits) - len(todo)
    try:
        write_atomic(out / "run.json", json.dumps(settings, indent=1) + "\n")
        if before:
            print(f"skipped {before} of {len(mine)} samples: finished in {out}", file=sys.stderr)
        if todo:
            print(
                f"{len(todo)} samples x {len(policies)} configurations, up to {max_new} new tokens, "
                f"on {device}",
                file=sys.stderr,
            )
            load = hf.load_model if args.engine == "transformers" else load_model
            model, tok = load(
                args.model, dtype=args.dtype, device=device, chat_format="plain" if args.no_chat else None
            )
            bar = progress(before, len(fits))
            forced = settings["gold_path"] == "pass"
            jobs = [
                (sample, ps, max_new, args.task, i == 0, settings["free_run"], forced)
                for i, (sample, ps) in enumerate(todo)
            ]
            workers = min(args.workers, len(todo)) if torch.device(device).type == "cpu" else 1
            done = run_jobs(model, tok, jobs, workers, calibrations(model, tok, policies))
            try:
                for sample_rows in done:
                    rows += sample_rows
                    write_rows(out, rows)  # after every sample: an interruption loses no finished sample
                    bar.update(1)
            finally:
                done.close()  # stops the worker pool now, also on Ctrl-C
                bar.close()
        if not rows:
            raise ValueError(f"the run gave no result in {out}: every sample was skipped (see the warnings)")
        _, table, notes = write_summary(out, rows, settings)
    except KeyboardInterrupt as stop:  # Ctrl-C, SIGTERM, SIGHUP
        return interrupted(out, mine, policies, before, stop)
    except WorkerLost as err:  # e.g. the OOM killer: what is saved, and how to go on
        saved = saved_line(out, mine, policies)
        raise ValueError(
            f"{err}: {saved}; if the machine ran out of memory, give fewer --workers, then run the "
            "same command again"
        ) from None
    except OSError as err:  # a full disk: write_atomic names the file and leaves no temporary one
        if err.filename is None:
            raise
        saved = saved_line(out, mine, policies)
        raise ValueError(not_written(err, saved)) from None
    print(table)
    for note in notes:
        if not note.split(":")[0].endswith(".png"):
            print(f"note: {note}", file=sys.stderr)
    files = ["samples.jsonl", "summary.json", "summary.md"] + sorted(f.name for f in out.glob("*.png"))
    print(f"results in {out}/: {', '.join(files)}")
    return 0


def run(args, policies=None):
    """One run (the module docstring): `prepare`, then `execute`, the results folder locked throughout."""
    with contextlib.ExitStack() as stack:
        return execute(prepare(args, policies, stack))


CLAIM_OPTIONS = dict(  # a run's options that choose configurations: claims chooses its own
    task="text2json",
    methods=DEFAULT_METHODS,
    budgets=str(DEFAULT_BUDGET),
    chunk_sizes=None,
    ranks=None,
    bits=None,
    residual=0,
    kv_bits=None,
    score_rule=None,
)


def run_claims(args):
    """`python evaluate.py claims`: every configuration the paper's claims need (claims.configurations),
    once each, as three runs in one results folder, OUT/text2json, OUT/needle and OUT/ruler (RULER's tasks
    claims.RULER_TASKS; each resumable, shardable and mergeable like any run), then claims.md, claims.json
    and one figure per claim in OUT (claims.py decides each claim by its rule). The NeedleBench run needs
    its data and RULER's essay haystack the essays (files.data_dir()); without them, or when their prompts
    cannot be made or do not fit the model, that retrieval claim is inconclusive and the rest stand; a
    configuration the model cannot run (`unfit`) is left out, its claims inconclusive. OUT is locked for
    the whole command, and every run is prepared (checked, its folder locked and read) before any
    decodes: a second claims, or a damaged or busy run folder, stops it at its start.
    Only the gold-forced rows are decoded (the claims rest on fact accuracy) unless --free-run."""
    for name, default in CLAIM_OPTIONS.items():
        if getattr(args, name) != default:
            option = "--" + name.replace("_", "-")
            raise ValueError(f"claims runs its own configurations and tasks: drop {option}")
    out = Path(args.out or "results/claims")
    check_out_option(str(out))
    results.check_folder(out)
    outliers = shadowkv_outliers(args)  # the Text2JSON run's; the NeedleBench run uses the same
    configs = claims.configurations(outliers)
    if args.n < results.MIN_SAMPLES:
        print(
            f"warning: --n {args.n}: every claim needs at least {results.MIN_SAMPLES} samples (claims.py), "
            "so every one will be inconclusive",
            file=sys.stderr,
        )
    rows, missing, dropped, samples, plans = {}, {}, {}, {}, {}
    with contextlib.ExitStack() as stack:
        # one claims run per folder, refused at its start; both runs checked before either decodes, so a
        # damaged or busy folder of the second stops the command before any work, as it stops a run
        stack.enter_context(locked(out))
        for task, policies in configs.items():
            sub = argparse.Namespace(**vars(args))
            sub.task, sub.out, sub.shard = claims.TASK_SPECS.get(task, task), str(out / task), args.shard
            if task == "ruler":  # --n samples of each of its tasks: claim 9 pools three (claims.ruler_n)
                sub.n = claims.ruler_n(args.n)
            sub.data = args.data if task == "text2json" else None  # --data: the Text2JSON file
            sub.free_run = False if args.free_run is None else args.free_run
            sub.outliers = None if outliers is None else str(outliers)
            try:
                plans[task] = prepare(sub, list(policies.values()), stack, drop_unfit=True)
            except (NoData, NoSampleFits) as err:  # no data, prompts that do not fit: said, not fatal
                if task == "text2json":  # every claim but one needs it
                    raise
                missing[task] = (
                    f"no NeedleBench data in {tasks.NEEDLE_DIR}: set KVOFFLOAD_DATA to the folder holding "
                    "needlebench/"
                    if isinstance(err, NoData) and task == "needle"
                    else " ".join(str(err).split())
                )
                print(f"claims: no {task} results: {missing[task]}", file=sys.stderr)
                continue
            dropped[task] = {
                n: plans[task].dropped[p.key()] for n, p in policies.items() if p.key() in plans[task].dropped
            }
            for name, why in dropped[task].items():
                print(f"claims: {name} is left out of the {task} run: {why}", file=sys.stderr)
        for task, plan in plans.items():
            print(
                f"claims: the {task} run ({len(plan.policies)} configurations) into {plan.out}",
                file=sys.stderr,
            )
            code = execute(plan)
            if code != 0:
                return code  # interrupted: what is saved stays, the same command resumes
            rows[task] = results.read_rows(out / task)
            samples[task] = len({r["sample"] for r in rows[task]})
        settings = dict(
            command="python evaluate.py " + " ".join(args.argv),
            model="default" if is_default_model(args.model) else str(Path(args.model).resolve()),
            samples=samples,
        )
        text = claims.write(out, claims.Evidence(rows, configs, missing, dropped), settings)
    print(text.split("\n\n## ")[0])
    print(
        f"claims in {out}/: claims.md, claims.json, "
        + ", ".join(sorted(f.name for f in out.glob("claim*.png")))
    )
    return 0


def join_dash_values(argv):
    """`--shard -1/2` -> `--shard=-1/2`: argparse reads a value that starts with '-' as an option
    and says only "expected one argument"; joined, the value reaches the option's own check."""
    joined = []
    for a in argv:
        after_option = joined and joined[-1].startswith("--") and "=" not in joined[-1]
        if after_option and a[:1] == "-" and a[:2] != "--":
            joined[-1] += "=" + a
        else:
            joined.append(a)
    return joined


def main(argv=None):
    """Entry point; bad input is one `error: ...` line on stderr and exit code 2, Ctrl-C exit code 130,
    SIGTERM 143 and SIGHUP 129 (each says what is saved)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    previous = {}
    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
        previous = {s: signal.signal(s, _stop) for s in STOP_SIGNALS}
    try:
        if argv[:1] == ["merge"]:
            p = _Parser(
                prog="evaluate.py merge", description="Combine the results folders of several shards."
            )
            p.add_argument("dirs", nargs="+")
            p.add_argument("--out", required=True)
            margs = p.parse_args(join_dash_values(argv[1:]))
            for d in margs.dirs:
                check_out_option(d, "merge DIR")
            check_out_option(margs.out)
            try:
                return results.merge(margs, check_row=row_check())
            except OSError as err:  # a full disk: write_atomic names the file and leaves no temporary one
                if err.filename is None:
                    raise
                raise ValueError(not_written(err, "the merge did not finish")) from None
        if argv[:1] == ["claims"]:
            p = build_parser()
            p.prog, p.description = (
                "evaluate.py claims",
                "Check the paper's claims, each by its rule (claims.py).",
            )
            p.set_defaults(n=DEFAULT_CLAIMS_N)
            args = p.parse_args(join_dash_values(argv[1:]))
            args.argv = argv
            return run_claims(args)
        args = build_parser().parse_args(join_dash_values(argv))
        args.argv = argv
        return run(args)
    except (ValueError, FileNotFoundError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except OSError as e:  # anything else the system refused: one line, not a traceback
        print(f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        # before a run's first sample, or during a merge: nothing is half-written
        print(
            f"interrupted{stopped_by(stop)} before any result was written: run the same command again",
            file=sys.stderr,
        )
        return stop_code(stop)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())
