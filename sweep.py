"""The configurations of a run: the options that choose the policies (--methods, --budgets, the sweep
axes, --kv-bits, --score-rule, --outliers) and every configuration they make (PAPER.md "The problem":
the ablations over budget, chunk size, SVD rank and landmark precision).

A sweep axis applies to the methods whose parts declare it (`Policy.axes`, see policy.PRESETS), so the
options' help says what they sweep from the presets themselves (`sweep_help`).
"""

import math
from itertools import product

import ruler
from landmarks import SCORE_RULES
from policy import OUTLIER_SHARE, POLICIES, PRESETS, SWEEP_AXES, make_policy
from results import BITS

DEFAULT_METHODS = "full,oracle,shadowkv,mean,quantized,paper"  # the default run's policies
DEFAULT_BUDGET = 0.03125  # PAPER.md "The paper's method": 3.125% of the prompt


def add_policy_options(p):
    """The options that choose the configurations of a run (`configurations`)."""
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma list of {', '.join(POLICIES)}")
    p.add_argument(
        "--budgets", default=str(DEFAULT_BUDGET), help="comma list of shares of the prompt in (0, 1]"
    )
    p.add_argument("--chunk-sizes", help=sweep_help("chunk_size", "comma list of chunk sizes"))
    p.add_argument(
        "--ranks", help=sweep_help("rank", "comma list of SVD ranks (int, or share of channels < 1)")
    )
    p.add_argument(
        "--bits", help=sweep_help("landmark_bits", f"comma list of landmark formats: {', '.join(BITS)}")
    )
    p.add_argument(
        "--residual",
        type=int,
        default=0,
        help=sweep_help("residual", "meta-chunk size of residual landmark quantization, 0 for none"),
    )
    p.add_argument(
        "--kv-bits",
        help="quantize the offloaded K/V of every sparse policy with this format (e.g. 4, int4; default: "
        f"each preset's: {preset_values(lambda p: p.keys.kv_bits or 'exact')})",
    )
    p.add_argument(
        "--score-rule",
        choices=SCORE_RULES,
        help="selection score of every sparse policy (default: each preset's: "
        f"{preset_values(lambda p: p.select.score_rule)}; softmax_max is ShadowKV's and the paper's as "
        "evaluated, mean_query the authors' fast path; landmarks.score)",
    )
    p.add_argument(
        "--outliers",
        help="ShadowKV's outlier chunks: an int, a share of the prompt below 1, or "
        "'budget' (default: 48; on generated short Text2JSON prompts 1.9%% of the "
        "prompt, ShadowKV's 384 tokens per 20.1K)",
    )


def sweeps(axis):
    """The methods whose parts take the sweep axis `axis` (`Policy.axes`, see policy.PRESETS)."""
    return [m for m in POLICIES if axis in PRESETS[m].axes]


def sweep_help(axis, what):
    """The help of the option that sweeps `axis` (SWEEP_OPTIONS): the methods it sweeps and, as its
    default, each one's preset value."""
    presets = ", ".join(f"{m} {PRESETS[m].params()[axis]}" for m in sweeps(axis))
    return f"{what}; sweeps {', '.join(sweeps(axis))} (default: each preset's, {presets})"


def preset_values(get):
    """'A but m1 a1, m2 a2': `get` of every sparse preset, A the most common value (an option's default)."""
    values = {m: get(PRESETS[m]) for m in POLICIES if PRESETS[m].sparse}
    common = max(values.values(), key=list(values.values()).count)
    others = ", ".join(f"{m} {v}" for m, v in values.items() if v != common)
    return f"{common} but {others}" if others else str(common)


SWEEP_OPTIONS = (  # the options that sweep a part's field (budgets apply to every sparse policy)
    ("chunk_size", "--chunk-sizes"),
    ("rank", "--ranks"),
    ("landmark_bits", "--bits"),
    ("residual", "--residual"),
)


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


def configurations(args):
    """Every policy configuration of the sweep (PAPER.md "The problem": the ablations over budget, chunk size,
    SVD rank and landmark precision). An axis applies to the policies whose parts declare it
    (`Policy.axes`, see policy.PRESETS): the budget to every sparse policy, the chunk size to `mean`,
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
        takers = sweeps(axis)
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
    prompt exact: there ShadowKV's 384 tokens per 20.1K are scaled to the prompt (policy.OUTLIER_SHARE,
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
        return OUTLIER_SHARE
    return None
