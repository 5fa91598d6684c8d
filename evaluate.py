"""Reproduce the paper's comparisons: every KV selection policy against full attention, as tables and plots.

    python evaluate.py                       # default model, 12 Text2JSON samples of ~2K tokens, 6 policies
    python evaluate.py --budgets 0.01,0.03125,0.1 --methods full,oracle,mean --chunk-sizes 1,2,4,8
    python evaluate.py --methods full,oracle,quantized --bits 1,2,4,fp8,nvfp4
    python evaluate.py --task needle --tokens 4096      # or --task longproc (real data: files.data_dir())
    python evaluate.py --task ruler --tokens 4096       # RULER's 11 synthetic tasks; ruler:niah_single_2 for one
    python evaluate.py --model DIR --data text2json.jsonl --device cuda --dtype bfloat16 --n 500
    python evaluate.py --engine transformers --n 2     # the same run inside the transformers model (hf.py)
    python evaluate.py merge DIR... --out DIR          # the folders of one run split with --shard i/n
    python evaluate.py claims                          # the paper's claims, each decided by its rule

Here: the command line and its checks, which rows a results folder may hold to be resumed or merged
(row_check), and the drivers (a run: `prepare`, then `execute`; `merge`; `claims`). The configurations
that the options make: sweep.py; what a sample's decoding measures, and the decoding plan: experiment.py;
worker processes and stop signals: workers.py. The metrics, the results folder, resume, sharding over
GPUs and torchrun: README.md, "`evaluate.py`".
"""

import argparse
import contextlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import claims
import hf
import results
import ruler
import tasks
from experiment import (
    NoData,
    NoSampleFits,
    auto_max_new_tokens,
    calibrations,
    check_data,
    check_fit,
    config_fields,
    gold_tokens,
    load_samples,
    too_long,
    unfit,
    uses_tokens,
)
from files import check_cache_dir
from model import (
    DTYPES,
    checkpoint_fingerprint,
    default_model_dir,
    default_model_path,
    load_config,
    load_model,
    load_tokenizer,
)
from policy import PRESETS, from_params, make_policy
from results import check_resume, locked, skip_record, token_span, write_atomic, write_rows, write_summary
from sweep import DEFAULT_BUDGET, DEFAULT_METHODS, add_policy_options, configurations, shadowkv_outliers
from workers import (
    WorkerLost,
    interrupted,
    not_written,
    progress,
    run_jobs,
    saved_line,
    stop_code,
    stop_signals,
    stopped_by,
)

# samples of the default run: 6 rounds of 2 workers, within 7 minutes from a fresh clone (README)
DEFAULT_N = 12
# samples per task of `python evaluate.py claims` (RULER: a third of it per task, claims.ruler_n): within 15
# minutes on 2 cores after the default run (README)
DEFAULT_CLAIMS_N = 12
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
    add_data_options(p)
    add_policy_options(p)
    add_run_options(p)
    return p


def add_data_options(p):
    """What a run reads: the model, the task and its samples."""
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


def add_run_options(p):
    """How a run decodes, on what, and where it writes."""
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


# ============================================================================ the rows a folder may hold

INDEX = re.compile(r"0|[1-9][0-9]*")  # the id of a generated sample: its index
# the fields of a row that say what was computed (its identity, its oracle, every column of its
# configuration but the display label): a row's must be what its `config` gives (config_complaint)
IDENTITY = ("key", "config", "oracle_key") + tuple(f for f in results.CONFIG_FIELDS if f != "label")


def row_check(args=None, known=None):
    """check_row for results.check_rows (resume and merge): what is wrong with a row's sample or
    configuration in a run of the settings `run` (run.json), or None.

    The sample must be one of the run's data: an id of the data file (`known`, experiment.load_samples),
    or for generated samples an index 0, 1, ... (whatever --n: a folder may hold a larger run's samples);
    merge loads no data (args None) and leaves the sample unchecked. The configuration must be one
    this evaluate.py makes with the run's settings: its `config` rebuilds a policy (its preset with
    those fields), whose key and parameter columns (config_fields) are the row's, and whose
    score_rule and outliers are the run's (as sweep.configurations sets them). The display fields
    (label, legends, axes, order) are not compared: they do not change a number. Each configuration is
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
    if config.get("name") not in PRESETS and "landmarks" not in config:  # nor a policy built by hand
        return f"its config names no method of evaluate.py ({config.get('name')!r})"
    try:
        p = from_params(config)
        want = config_fields(p)
    except Exception as err:  # an unknown field, a value out of range or of another kind: no policy
        return f"its config is no configuration of evaluate.py ({' '.join(str(err).split())})"
    for f in IDENTITY:
        if row[f] != want[f]:
            shown = "" if f in ("key", "config") else f" ({row[f]!r}, its config gives {want[f]!r})"
            return f"its {f} does not match its config{shown}"
    if p.sparse and p.name in PRESETS:  # a run's --score-rule and --outliers apply to the presets
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


def results_folder(args, shard, n_shards):
    """--out, or results/<task>; with a -shard{i}of{n} suffix when the shard is not named on the
    command line, so that the processes of one torchrun (RANK/WORLD_SIZE) never share a folder
    even when they were all given the same --out. An explicit --shard writes --out as given (two
    processes on one folder: the second is refused, see results.locked)."""
    suffix = f"-shard{shard}of{n_shards}" if n_shards > 1 else ""
    if args.out is None:
        return Path(f"results/{args.task.replace(':', '-')}{suffix}")
    return Path(args.out + suffix if args.shard is None else args.out)


# ============================================================================ a run


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
    a configuration that cannot run on the model (experiment.unfit), unless drop_unfit: then it is left
    out, and the plan's `dropped` says why."""
    configs = check_inputs(args)
    policies = configs if policies is None else policies
    shard, n_shards = parse_shard(args.shard)
    device = run_device(args)
    out = results_folder(args, shard, n_shards)
    results.check_folder(out)

    config = load_config(args.model or default_model_dir())
    check_fit(args, policies, config)
    tok = load_tokenizer(args.model, config, chat_format="plain" if args.no_chat else None)
    policies, dropped = runnable(policies, config, tok, drop_unfit)
    samples, known = load_samples(args, tok)
    mine = shard_samples(samples, shard, n_shards)
    max_new = args.max_new_tokens or auto_max_new_tokens(samples, tok)
    skipped = too_long(mine, tok, config.max_positions)
    check_skipped(args, mine, skipped, config.max_positions, max_new)

    stack.enter_context(locked(out))  # the only writer of `out` from here on; a second process is refused
    settings, rows = check_resume(  # every row whole and of this run, else one line, nothing done
        out,
        dict(run_settings(args, max_new), max_positions=config.max_positions, skipped=skipped),
        adopt_max_new=args.max_new_tokens is None,
        check_row=row_check(args, known),
    )
    settings["skipped"] = skip_record(settings["skipped"], rows)
    fits = [s for s in mine if s["id"] not in skipped]
    todo = left_to_do(fits, policies, rows)
    check_cut_answers(args.task, todo, tok, settings["max_new_tokens"])
    return Plan(args, policies, out, device, mine, fits, todo, rows, settings, dropped)


def run_device(args):
    """--device; under torchrun, --device cuda is the process's own GPU, cuda:LOCAL_RANK."""
    if args.device == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return args.device


def runnable(policies, config, tok, drop_unfit):
    """(the policies that can run on the model, {key: why not} of the others: experiment.unfit); one
    that cannot is a ValueError, unless drop_unfit."""
    dropped = {p.key(): why for p in policies if (why := unfit(p, config, tok))}
    if dropped and not drop_unfit:
        p = next(p for p in policies if p.key() in dropped)
        raise ValueError(f"{dropped[p.key()]}: drop {p.name} from --methods")
    return [p for p in policies if p.key() not in dropped], dropped


def shard_samples(samples, shard, n_shards):
    """This shard's samples, i, i+n, i+2n, ... (--shard i/n); none is a ValueError."""
    mine = samples[shard::n_shards]
    if not mine:
        raise ValueError(
            f"shard {shard}/{n_shards} has no sample: the run has {len(samples)} samples; "
            "raise --n or use fewer shards"
        )
    return mine


def check_skipped(args, mine, skipped, max_positions, max_new):
    """The samples whose prompts do not fit the model (`skipped`, experiment.too_long) are said in one
    warning; when no sample fits, the run is an error (NoSampleFits)."""
    if len(skipped) == len(mine):
        raise NoSampleFits(no_fit_message(args, skipped, max_positions, max_new))
    if skipped:
        print(
            f"warning: skipping {len(skipped)} of {len(mine)} samples: their prompts "
            f"({token_span(skipped.values())} tokens with the chat template) do not fit the model's "
            f"{max_positions} positions (the summary says so)",
            file=sys.stderr,
        )


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


def left_to_do(fits, policies, rows):
    """[(sample, the configurations it still needs)]: the samples that fit, without the (configuration,
    sample) pairs already in the folder's `rows`."""
    finished = {(r["key"], r["sample"]) for r in rows}
    todo = [(s, [p for p in policies if (p.key(), s["id"]) not in finished]) for s in fits]
    return [(s, ps) for s, ps in todo if ps]


def check_cut_answers(task, todo, tok, max_new):
    """A warning when max_new cuts the longest gold answer still to decode (its facts are left out)."""
    longest = max((len(gold_tokens(task, s, tok)[0]) for s, _ in todo), default=0)
    if longest > max_new:
        print(
            f"warning: max_new_tokens={max_new} is shorter than the longest gold answer "
            f"({longest} tokens): the gold-forced rows stop there, so fact accuracy leaves out the facts "
            "after it (the summary counts them); a larger --max-new-tokens scores them",
            file=sys.stderr,
        )


def execute(plan: Plan) -> int:
    """Decode what `plan` has left to do, saving every sample as it ends, then the summary."""
    out, mine, policies = plan.out, plan.mine, plan.policies
    before = len(plan.fits) - len(plan.todo)
    try:
        write_atomic(out / "run.json", json.dumps(plan.settings, indent=1) + "\n")
        if before:
            print(f"skipped {before} of {len(mine)} samples: finished in {out}", file=sys.stderr)
        if plan.todo:
            decode_samples(plan, before)
        if not plan.rows:
            raise ValueError(f"the run gave no result in {out}: every sample was skipped (see the warnings)")
        _, table, notes = write_summary(out, plan.rows, plan.settings)
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
    print_results(out, table, notes)
    return 0


def decode_samples(plan: Plan, before):
    """Load the model and decode the samples left (plan.todo), in worker processes on a CPU; each
    sample's rows join plan.rows, written to samples.jsonl as the sample ends."""
    args, settings, device = plan.args, plan.settings, plan.device
    max_new = settings["max_new_tokens"]
    print(
        f"{len(plan.todo)} samples x {len(plan.policies)} configurations, up to {max_new} new tokens, "
        f"on {device}",
        file=sys.stderr,
    )
    load = hf.load_model if args.engine == "transformers" else load_model
    model, tok = load(
        args.model, dtype=args.dtype, device=device, chat_format="plain" if args.no_chat else None
    )
    bar = progress(before, len(plan.fits))
    forced = settings["gold_path"] == "pass"
    jobs = [
        (sample, ps, max_new, args.task, i == 0, settings["free_run"], forced)
        for i, (sample, ps) in enumerate(plan.todo)
    ]
    workers = min(args.workers, len(plan.todo)) if torch.device(device).type == "cpu" else 1
    done = run_jobs(model, tok, jobs, workers, calibrations(model, tok, plan.policies))
    try:
        for sample_rows in done:
            plan.rows += sample_rows
            write_rows(plan.out, plan.rows)  # after every sample: an interruption loses no finished sample
            bar.update(1)
    finally:
        done.close()  # stops the worker pool now, also on Ctrl-C
        bar.close()


def print_results(out, table, notes):
    """The table on stdout; the summary's notes but the skipped plots' on stderr; the files written."""
    print(table)
    for note in notes:
        if not note.split(":")[0].endswith(".png"):
            print(f"note: {note}", file=sys.stderr)
    files = ["samples.jsonl", "summary.json", "summary.md"] + sorted(f.name for f in out.glob("*.png"))
    print(f"results in {out}/: {', '.join(files)}")


def run(args, policies=None):
    """One run (the module docstring): `prepare`, then `execute`, the results folder locked throughout."""
    with contextlib.ExitStack() as stack:
        return execute(prepare(args, policies, stack))


# ============================================================================ claims

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
    rows, samples = {}, {}
    with contextlib.ExitStack() as stack:
        # one claims run per folder, refused at its start; both runs checked before either decodes, so a
        # damaged or busy folder of the second stops the command before any work, as it stops a run
        stack.enter_context(locked(out))
        plans, missing, dropped = prepare_claims(args, out, configs, outliers, stack)
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


def prepare_claims(args, out, configs, outliers, stack):
    """`prepare` each run of `claims` (configs: {task: {name: policy}}), its folder OUT/task locked on
    `stack`. Returns (plans, missing, dropped): {task: Plan}; {task: why it has no run} for a retrieval
    task without data or without a prompt that fits (Text2JSON's is an error: every claim but one
    needs it); {task: {name: why that configuration cannot run on the model}}."""
    plans, missing, dropped = {}, {}, {}
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
    return plans, missing, dropped


# ============================================================================ main


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


def run_merge(argv):
    """`python evaluate.py merge DIR... --out DIR` (argv: what follows `merge`): results.merge, every
    row checked (row_check), a full disk one line."""
    p = _Parser(prog="evaluate.py merge", description="Combine the results folders of several shards.")
    p.add_argument("dirs", nargs="+")
    p.add_argument("--out", required=True)
    margs = p.parse_args(join_dash_values(argv))
    for d in margs.dirs:
        check_out_option(d, "merge DIR")
    check_out_option(margs.out)
    try:
        return results.merge(margs, check_row=row_check())
    except OSError as err:  # a full disk: write_atomic names the file and leaves no temporary one
        if err.filename is None:
            raise
        raise ValueError(not_written(err, "the merge did not finish")) from None


def parse_args(argv):
    """The options of a run, or of `claims` (argv[0] == "claims": its own default --n); args.argv is
    argv, for run.json's command."""
    p = build_parser()
    if argv[:1] == ["claims"]:
        p.prog, p.description = (
            "evaluate.py claims",
            "Check the paper's claims, each by its rule (claims.py).",
        )
        p.set_defaults(n=DEFAULT_CLAIMS_N)
    args = p.parse_args(join_dash_values(argv[1:] if argv[:1] == ["claims"] else argv))
    args.argv = argv
    return args


@stop_signals()  # SIGTERM and SIGHUP stop it as Ctrl-C does (workers.Stop)
def main(argv=None):
    """Entry point; bad input is one `error: ...` line on stderr and exit code 2, Ctrl-C exit code 130,
    SIGTERM 143 and SIGHUP 129 (each says what is saved)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["merge"]:
            return run_merge(argv[1:])
        if argv[:1] == ["claims"]:
            return run_claims(parse_args(argv))
        return run(parse_args(argv))
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


if __name__ == "__main__":
    sys.exit(main())
