"""What a policy IS: the three parts that decide what a decode step attends to, their presets, and the
budget split. What a policy DOES, step by step, is kvcache.py.

A policy is its three parts, each a small dataclass that owns its parameters and their checks:

    Select   what selection scores: the landmark kind (landmarks.KINDS) and its own parameters, the chunk
             size, the scoring rule, the budget
    Keys     which keys attention reads: exact (offloaded, maybe quantized) or rank-r SVD rebuilds
    Exact    which tokens stay exact on the device: sink, local window, ShadowKV's outlier chunks

and every name is a preset of them (PRESETS, the same table as the README):

    name        what selection scores                 keys attention reads          always exact
    full        -- (no selection)                     exact, all                    --
    oracle      every exact key (chunk 1)             exact                         local 64
    mean        mean of each chunk of 8 exact keys    exact                         local 64
    svd         every exact key (chunk 1)             rank-r SVD rebuild            local 64
    shadowkv    mean of each chunk of 8 keys          rank-r SVD rebuild            local 32, 48 outlier chunks
    quantized   every key, quantized (2 bits)         exact                         local 64
    paper       every key, quantized (2 bits)         4-bit K/V (pre-RoPE keys)     local 64
    paper_fast  every key, 2 bits, mean-query rule    fp8 K/V                       sink and local 0.625% each
    quest       min / max of each chunk of 16 keys    exact                         local 64
    arkvale     a cuboid per page of 16 keys          exact, pages kept resident    2 + 5 pages
    lrqk        per query head, a low-rank Q/K proxy  exact, per query head, resident  local 64
    infinigen   per query head, skewed partial keys,  exact, per query head         layers 0, 1 dense
                scored with a query speculated one layer ahead

so `mean` isolates the landmark failure, `svd` the low-rank failure, `shadowkv` has both, `quantized`
is the paper's fix (token-level landmarks made cheap by quantization) with exact K/V, `paper` the
paper's full configuration as evaluated (its K/V stored 4-bit as well), `paper_fast` the authors'
fast GPU path, `quest` the canonical query-aware page-selection baseline, and `arkvale`, `lrqk`,
`infinigen` the paper's other baselines as their authors run them (PAPER.md "The paper's other
baselines"). A policy built by hand from its three parts, under a name of its own, works wherever a
preset does (tests/test_policy.py). One budget accounting for all (`BudgetSplit`).
"""

import math
import typing
from dataclasses import dataclass, field, fields, replace

import landmarks
import quantize

KEY_SOURCES = ("exact", "low_rank")
SWEEP_AXES = ("budget", "chunk_size", "landmark_bits", "residual", "rank")  # evaluate.py's sweep options


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_count(x) -> bool:
    """A token count: an int >= 0, or a share of the prompt in [0, 1)."""
    return _is_int(x) and x >= 0 or isinstance(x, float) and 0 <= x < 1


# ---------------------------------------------------------------------------------------- the parts
@dataclass(frozen=True)
class Select:
    """What selection scores, and how much it selects (PAPER.md "ShadowKV, precisely", "The paper's method").

    landmarks:    the landmark kind, a name in landmarks.KINDS: "keys" (every exact key: the oracle),
                  "mean" (ShadowKV's chunk means), "quantized" (the paper's), "quest" (min / max bounds),
                  "pages" (ArkVale's cuboids), "lowrank_qk" (LRQK), "skewed" (InfiniGen)
    chunk_size:   tokens per landmark (ShadowKV: 8; the paper's fix: 1)
    score_rule:   landmarks.SCORE_RULES: "softmax_max" (ShadowKV's, the paper's as evaluated),
                  "mean_query" (the authors' fast path) or "dot" (ArkVale, LRQK, InfiniGen)
    per:          "kv_head": each KV head selects for its query heads (the paper, ShadowKV, ArkVale);
                  "query_head": each query head selects its own tokens (LRQK, InfiniGen)
    budget:       selected prompt tokens as a share of the prompt (the paper: 3.125%)
    min_prompt:   prompts shorter than this are not pruned at all (the fast path: 512)
    round_up:     select ceil(budget * T / chunk) whole chunks (ArkVale's pages, as its authors count
                  them); False: int(budget * T) tokens rounded down to whole chunks (the paper, ShadowKV)
    dense_layers: the first layers attend to every token, selecting nothing (InfiniGen: 2)
    kind_params:  the kind's own parameters, name -> value (given as a dict; held as the kind's
                  canonical pairs, every one of them, its defaults filled in): "quantized" takes
                  landmark_bits ("2", "fp8", ...: a quantize.parse_format spec), residual and
                  residual_bits; "lowrank_qk" qk_rank and iterations; "skewed" channels (each kind
                  declares them: landmarks.Landmarks.params)
    sweep:        the fields an evaluation sweep may vary for this preset besides the budget (its
                  axes, e.g. ("chunk_size",) for `mean`); not part of the configuration

    What the kind needs (the prefill's queries, a calibration, the next layer's query, the state of the
    last step) the kind says (`kind`): nothing here compares a kind's name.
    """

    landmarks: str
    chunk_size: int = 1
    score_rule: str = "softmax_max"
    per: str = "kv_head"
    budget: float = 0.03125
    min_prompt: int = 0
    round_up: bool = False
    dense_layers: int = 0
    kind_params: tuple = ()
    sweep: tuple = field(default=(), compare=False, repr=False)

    def __post_init__(self):
        """kind_params as given (a dict, or pairs), completed with the kind's defaults: ((name, value), ...).
        A name the kind does not declare stays, for `check` to refuse in one line."""
        given = dict(self.kind_params)
        kind = landmarks.KINDS.get(self.landmarks)
        declared = {p.name: given.pop(p.name, p.default) for p in kind.params} if kind else {}
        object.__setattr__(self, "kind_params", tuple(declared.items()) + tuple(given.items()))

    @property
    def kind(self) -> type:
        """The landmark kind (a landmarks.Landmarks class): what it is built from and what it needs."""
        return landmarks.KINDS[self.landmarks]

    def param(self, name: str):
        """The value of the kind's parameter `name`, or None when the kind has no such parameter."""
        return dict(self.kind_params).get(name)

    @property
    def axes(self) -> tuple:
        return ("budget",) + self.sweep  # every sparse policy sweeps its budget

    @property
    def is_exact_top_k(self) -> bool:
        """Whether this is the oracle's own rule: every exact key a landmark, scored softmax_max per KV
        head. Its selection is then the one the tracking pass computes as the oracle's
        (SparseCache.attend)."""
        return self.kind.exact and (self.chunk_size, self.score_rule, self.per) == (
            1,
            "softmax_max",
            "kv_head",
        )

    def check(self):
        if self.landmarks not in landmarks.KINDS:
            raise ValueError(
                f"unknown landmarks {self.landmarks!r}: choose from {', '.join(landmarks.KINDS)}"
            )
        if not 0 < self.budget <= 1:
            raise ValueError(f"budget {self.budget} is out of range: give a share of the prompt in (0, 1]")
        if not _is_int(self.chunk_size) or self.chunk_size < 1:
            raise ValueError(f"chunk_size {self.chunk_size!r} must be an int >= 1")
        for name in ("min_prompt", "dense_layers"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} {getattr(self, name)!r} must be an int >= 0")
        if self.per not in landmarks.GRANULARITIES:
            raise ValueError(f"unknown per {self.per!r}: choose from {', '.join(landmarks.GRANULARITIES)}")
        kind = self.kind
        if kind.per_token and self.chunk_size != 1:
            raise ValueError(f"{self.landmarks} landmarks are one per token: chunk_size must be 1")
        if kind.per_query_head and self.per != "query_head":
            raise ValueError(
                f"{self.landmarks} landmarks are kept per query head: they need per='query_head'"
            )
        if self.score_rule == "mean_query" and self.per != "kv_head":
            raise ValueError("the mean_query rule scores with a group's mean query: it needs per='kv_head'")
        if self.score_rule not in landmarks.SCORE_RULES:
            raise ValueError(
                f"unknown score_rule {self.score_rule!r}: choose from {', '.join(landmarks.SCORE_RULES)}"
            )
        declared = [p.name for p in kind.params]
        for name, value in self.kind_params:
            if name not in declared:
                takes = f"its parameters are {', '.join(declared)}" if declared else "it takes none"
                raise ValueError(f"{name} is not a parameter of {self.landmarks} landmarks: {takes}")
        for p in kind.params:
            check_type(p.name, self.param(p.name), p.types)
        kind.check_params(dict(self.kind_params))

    def params(self) -> dict:
        """The fields that change what is selected, each only where it applies (the canonical form)."""
        p = dict(landmarks=self.landmarks, chunk_size=self.chunk_size) | self.kind.canonical(
            dict(self.kind_params)
        )
        p.update(score_rule=self.score_rule)
        if self.per != "kv_head":
            p.update(per=self.per)
        p.update(budget=self.budget, min_prompt=self.min_prompt)
        p |= dict(round_up=True) if self.round_up else {}
        return p | (dict(dense_layers=self.dense_layers) if self.dense_layers else {})

    def label(self, preset: "Select", without=None) -> list:
        """Label pieces: the preset's sweep axes, and whatever differs from the preset ('2b', 'c8');
        never the field `without` (a plot's legend names a line without the axis it sweeps). A kind
        parameter the preset's kind lacks is compared with its default."""
        mine = dict(self.kind_params)
        theirs = {p.name: dict(preset.kind_params).get(p.name, p.default) for p in self.kind.params}
        value = lambda s, f, kp: kp[f] if f in kp else getattr(s, f)
        named = set(self.sweep) | {
            f for f in self.params() if value(self, f, mine) != value(preset, f, theirs)
        }
        named.discard(without)
        pieces = [self.landmarks] if "landmarks" in named else []
        pieces += self.kind.label(mine, named)
        if "chunk_size" in named and (self.chunk_size != 1 or self.kind.chunked):
            pieces.append(f"c{self.chunk_size}")
        if "score_rule" in named:
            pieces.append(self.score_rule)
        if "min_prompt" in named:
            pieces.append(f"min{self.min_prompt}")
        if "dense_layers" in named:
            pieces.append(f"dense{self.dense_layers:g}")
        if "per" in named:
            pieces.append(f"per-{self.per.replace('_', '-')}")
        return pieces  # the budget has its own column and its own place in a configuration's key

    def build(self, k_mid, prefill: landmarks.LayerPrefill) -> landmarks.Landmarks:
        """The landmarks of one layer's middle keys k_mid [H, M, d] (post-RoPE): N per KV head (or per
        query head); LRQK and InfiniGen read more of the prefill (`LayerPrefill`)."""
        return self.kind.from_prefill(k_mid, self.chunk_size, dict(self.kind_params), prefill)


@dataclass(frozen=True)
class Keys:
    """Which keys attention reads (PAPER.md "ShadowKV, precisely", "Confirmed against the authors' code").

    source:      "exact": offloaded with the values and fetched with them; "low_rank": ShadowKV's rank-r
                 SVD factors of the pre-RoPE keys on the device, the selected keys rebuilt and re-RoPE'd
    rank:        rank of "low_rank" keys, an int or a share (< 1) of kv_heads * head_dim (ShadowKV: 160
                 of 1024 = 0.15625)
    kv_bits:     None = the offloaded K/V are kept exact; else a quantize.parse_format spec ("4",
                 "int4", "fp8", ...): stored quantized, fetched packed, dequantized on the device
    kv_group:    "head": each KV head's row of a token is quantized on its own; "token": all
                 kv_heads * head_dim channels of a token form one row and one scale group (the paper)
    kv_pre_rope: store the keys before RoPE (the paper: quantize pre-RoPE keys, RoPE the fetched rows)
    resident:    keep the rows selected at a step on the device and fetch, at the next step, only the
                 selected rows not already there (ArkVale's pages, LRQK's per-query-head cache: hits and
                 misses); False fetches every selected row at every step
    sweep:       the fields a sweep may vary for this preset (("rank",) for `svd`); not part of the
                 configuration
    """

    source: str = "exact"
    rank: float | None = None
    kv_bits: str | None = None
    kv_group: str = "head"
    kv_pre_rope: bool = False
    resident: bool = False
    sweep: tuple = field(default=(), compare=False, repr=False)

    @property
    def axes(self) -> tuple:
        return self.sweep

    def check(self):
        if self.source not in KEY_SOURCES:
            raise ValueError(f"unknown keys source {self.source!r}: choose from {', '.join(KEY_SOURCES)}")
        if self.source == "low_rank":
            r = self.rank
            if r is None or isinstance(r, bool) or r <= 0 or (r >= 1 and r != int(r)):
                raise ValueError(f"rank {r!r} must be an int >= 1 or a share of the channels in (0, 1)")
        if self.kv_group not in ("head", "token"):
            raise ValueError(f"kv_group {self.kv_group!r} must be 'head' or 'token'")
        if (self.kv_group == "token" or self.kv_pre_rope) and self.kv_bits is None:
            raise ValueError("kv_group='token' and kv_pre_rope describe quantized K/V: give kv_bits too")
        if self.kv_bits is not None:
            quantize.parse_format(self.kv_bits)  # raises on an unknown format
        if self.resident and self.kv_group == "token":
            raise ValueError(
                "a resident set keeps rows per head: it cannot hold whole-token rows (kv_group='token')"
            )

    def params(self) -> dict:
        p = dict(source=self.source)
        if self.source == "low_rank":
            p.update(rank=self.rank)
        p.update(kv_bits=self.kv_bits)
        if self.kv_bits is not None:
            p.update(kv_group=self.kv_group, kv_pre_rope=self.kv_pre_rope)
        return p | (dict(resident=True) if self.resident else {})

    def label(self, preset: "Keys", without=None) -> list:
        """Label pieces: 'r0.15625' (the rank, where swept), 'kv4' (K/V bits other than the preset's)."""
        named = set(self.sweep) | {f for f in self.params() if getattr(self, f) != getattr(preset, f)}
        named.discard(without)
        pieces = [self.source] if "source" in named else []
        if "rank" in named and self.rank is not None:
            pieces.append(f"r{self.rank:g}")
        if "kv_bits" in named:
            pieces.append(f"kv{self.kv_bits or 'exact'}")
        if "kv_group" in named:
            pieces.append(f"g{self.kv_group}")
        if "kv_pre_rope" in named:
            pieces.append("pre-rope" if self.kv_pre_rope else "post-rope")
        if "resident" in named:
            pieces.append("resident" if self.resident else "refetch")
        return pieces


@dataclass(frozen=True)
class Exact:
    """Which prompt tokens every decode step attends exactly, on the device, besides the selection.

    sink, local: the first `sink` and last `local` prompt tokens: an int, or a share of the prompt
                 below 1 (the paper: no sink, local window 64; ShadowKV: local 32)
    outliers:    ShadowKV's outlier chunks (the chunks whose mean stands worst for their keys, removed
                 from the landmarks): an int count (ShadowKV: 48), a share of the prompt's tokens below 1
                 (to scale the count to short prompts), or "budget" = 48 chunks per 2048 selected tokens

    Its tokens take no place in a label: the budget line printed with every result states them.
    """

    sink: int | float = 0
    local: int | float = 64
    outliers: int | float | str = 0

    def check(self):
        for name in ("sink", "local"):
            if not _is_count(getattr(self, name)):
                raise ValueError(
                    f"{name} {getattr(self, name)!r} must be an int >= 0 or a share of the prompt in [0, 1)"
                )
        if not (_is_count(self.outliers) or self.outliers == "budget"):
            raise ValueError(
                f"outliers {self.outliers!r} must be an int >= 0 or a share of the prompt in [0, 1) or 'budget'"
            )

    def params(self) -> dict:
        return dict(sink=self.sink, local=self.local, outliers=self.outliers)


@dataclass(frozen=True)
class Policy:
    """What a cache keeps and how it selects: its three parts. Build one with `make_policy(name, ...)`.

    select: None = no selection: full attention. offload: keep the prompt's K/V in CPU memory
    (offload.py); False keeps all on the device (the reference the offloaded path is checked against).
    track: record selection statistics against the oracle (costs an exact scoring pass). Neither
    changes what is computed, so neither is part of the configuration (`key`).
    """

    name: str = "full"
    select: Select | None = None
    keys: Keys = Keys()
    exact: Exact = Exact()
    offload: bool = True
    track: bool = False

    @property
    def sparse(self) -> bool:
        return self.select is not None

    def parts(self) -> tuple:
        return (self.select, self.keys, self.exact) if self.sparse else ()

    @property
    def axes(self) -> tuple:
        """The sweep axes that apply to this policy (SWEEP_AXES), as its parts declare them."""
        return self.select.axes + self.keys.axes if self.sparse else ()

    def params(self) -> dict:
        """The canonical configuration: the name and every field that changes a result."""
        return dict(name=self.name) | {k: v for part in self.parts() for k, v in part.params().items()}

    def key(self) -> str:
        """The configuration's identity, written out: 'name=mean landmarks=mean chunk_size=8 ...'. Results
        are resumed and merged by it, never by the display label."""
        return " ".join(f"{k}={v}" for k, v in self.params().items())

    def label(self, without: str | None = None) -> str:
        """Short name for tables: 'shadowkv', 'mean c8', 'quantized 2b', 'svd r0.15625', 'oracle kv4': the
        name, the preset's sweep axes and whatever differs from the preset (but the field `without`). A
        policy built by hand under a name of its own is its name and its sweep axes."""
        if not self.sparse:
            return self.name
        preset = PRESETS.get(
            self.name, self
        )  # a policy built by hand names what differs from itself: nothing
        pieces = self.select.label(preset.select, without) + self.keys.label(preset.keys, without)
        return " ".join([self.name, *pieces])


# --------------------------------------------------------------------------------------- the presets
# One line per policy: its three parts (PAPER.md "ShadowKV, precisely", "The paper's method",
# "Confirmed against the authors' code"; Quest: PAPER.md "Quest"). Every field not named keeps its
# default above. paper_fast (its 0.625% prefix) and arkvale (its first 2 pages) attend sink tokens;
# elsewhere the first tokens compete through their landmarks, as in the paper.
CHUNK, RANK, LANDMARK_AXES = ("chunk_size",), ("rank",), ("chunk_size", "landmark_bits", "residual")
SVD = dict(source="low_rank", rank=0.15625)  # ShadowKV's rank: 160 of 1024 channels
Q2 = dict(landmark_bits="2")  # HIGGS 2-bit landmarks (d=4, n=256), the paper's
PAPER_KV = dict(kv_bits="4", kv_group="token", kv_pre_rope=True)  # 4-bit HIGGS over a whole token, pre-RoPE
FAST = dict(score_rule="mean_query", budget=0.015625, min_prompt=512)  # the fast path's rule and split
PER_Q = dict(score_rule="dot", per="query_head")  # LRQK, InfiniGen: each query head its own top tokens
# ArkVale: the dot rule (no softmax), its P pages counted up as its authors count them (PAPER.md "ArkVale")
PAGES = dict(score_rule="dot", round_up=True)
# ArkVale's sink and window are pages: the first 2 (32 tokens) and the last 5, a partial last page
# included; local=65 gives exactly that (split_budget adds the remainder of the middle to the window).
# fmt: off
PRESETS = {
    "full":       Policy("full"),
    "oracle":     Policy("oracle",     Select("keys"),                                Keys(),                  Exact(local=64)),
    "mean":       Policy("mean",       Select("mean", 8, sweep=CHUNK),                 Keys(),                  Exact(local=64)),
    "svd":        Policy("svd",        Select("keys"),                                Keys(**SVD, sweep=RANK), Exact(local=64)),
    "shadowkv":   Policy("shadowkv",   Select("mean", 8),                             Keys(**SVD),             Exact(local=32, outliers=48)),
    "quantized":  Policy("quantized",  Select("quantized", kind_params=Q2, sweep=LANDMARK_AXES), Keys(),                  Exact(local=64)),
    "paper":      Policy("paper",      Select("quantized", kind_params=Q2),           Keys(**PAPER_KV),        Exact(local=64)),
    "paper_fast": Policy("paper_fast", Select("quantized", **FAST, kind_params=Q2),   Keys(kv_bits="fp8"),     Exact(sink=0.00625, local=0.00625)),
    "quest":      Policy("quest",      Select("quest", 16, sweep=CHUNK),               Keys(),                  Exact(local=64)),
    "arkvale":    Policy("arkvale",    Select("pages", 16, **PAGES),                   Keys(resident=True),     Exact(sink=32, local=65)),
    "lrqk":       Policy("lrqk",       Select("lowrank_qk", **PER_Q),                  Keys(resident=True),     Exact(local=64)),
    "infinigen":  Policy("infinigen",  Select("skewed", **PER_Q, dense_layers=2),      Keys(),                  Exact(local=0)),
}
# fmt: on
POLICIES = tuple(PRESETS)  # every generic test runs over this list
# ShadowKV's 48 outlier chunks (384 tokens) are sized for long prompts: at the mean Text2JSON prompt of
# 20.1K tokens they are 1.9% of it (PAPER.md "Benchmarks"). On short prompts (the default run's ~2K
# tokens, where 384 tokens would be 18% of the prompt kept exact) pass outliers=OUTLIER_SHARE instead.
OUTLIER_SHARE = 48 * 8 / 20100


def make_policy(name: str, **overrides) -> Policy:
    """The preset for `name` (PRESETS), with any field of its parts overridden (None = keep the
    preset's value), e.g. make_policy("mean", chunk_size=4, budget=0.1, track=True).

    Raises a one-line ValueError for an unknown name or field, or an out-of-range value.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown method {name!r}: choose from {', '.join(POLICIES)}")
    return override(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


def _part_of(name: str) -> str | None:
    """Which part a field belongs to ("select", "keys", "exact"), or "kind" for a landmark kind's own
    parameter (held in Select's kind_params). None for a name no part has."""
    for part, cls in (("select", Select), ("keys", Keys), ("exact", Exact)):
        if name in {f.name for f in fields(cls)} - {"sweep", "kind_params"}:
            return part
    return "kind" if any(name in {p.name for p in k.params} for k in landmarks.KINDS.values()) else None


def override(policy: Policy, **changes) -> Policy:
    """`policy` with fields of its parts (or offload, track) set to the given values, checked. A landmark
    kind's parameter is given by its name (landmark_bits="4"); when the kind changes, the parameters the
    new kind lacks are dropped, unless given here (then `check` refuses them)."""
    unknown = {k for k in changes if _part_of(k) is None} - {"offload", "track"}
    if unknown:
        raise ValueError(f"unknown policy field(s) {', '.join(sorted(unknown))}")
    own = {k: changes.pop(k) for k in ("offload", "track") if k in changes}
    if changes and not policy.sparse:
        raise ValueError(
            f"{next(iter(changes))} is a field of a sparse policy; full attention has none (it keeps "
            "every token exact and offloads nothing)"
        )
    parts = {}
    given = {k: v for k, v in changes.items() if _part_of(k) == "kind"}  # the landmark kind's own
    for part in ("select", "keys", "exact"):
        mine = {k: v for k, v in changes.items() if _part_of(k) == part}
        if part == "select" and (mine or given):
            kind = landmarks.KINDS.get(mine.get("landmarks", policy.select.landmarks))
            declared = {p.name for p in kind.params} if kind else set()
            mine["kind_params"] = {k: v for k, v in policy.select.kind_params if k in declared} | given
        if mine:
            parts[part] = replace(getattr(policy, part), **mine)
    p = replace(policy, **parts, **own)
    check(p)
    return p


def from_params(params: dict) -> Policy:
    """The policy that canonical parameters describe (Policy.params, a results row's `config`): its preset
    with them, or, for a name that is no preset (a policy built by hand), one built from them alone.
    Raises a one-line ValueError when they name no preset and no landmarks, or for a bad field."""
    name, rest = params.get("name"), {k: v for k, v in params.items() if k != "name"}
    if name in PRESETS:
        return override(PRESETS[name], **rest)
    if not isinstance(name, str) or "landmarks" not in rest:
        raise ValueError(f"{name!r} is no preset, and its parameters name no landmarks to build it from")
    return override(Policy(name, Select(rest["landmarks"]), Keys(), Exact()), **rest)


def oracle_of(p: Policy) -> Policy:
    """The oracle a sparse policy is measured against (PAPER.md "The oracle"): exact top-k of the same
    budget, over the same offloaded K/V format, with the oracle's own scoring rule unless the policy's
    was changed from its preset's (then the oracle's is changed alike: --score-rule changes both). A
    policy built by hand has no preset: its oracle scores by the oracle's own rule."""
    preset = PRESETS.get(p.name)
    changed = preset is not None and preset.sparse and p.select.score_rule != preset.select.score_rule
    rule = p.select.score_rule if changed else None
    return make_policy("oracle", budget=p.select.budget, score_rule=rule, kv_bits=p.keys.kv_bits)


KIND_WORDS = {
    int: "an int",
    float: "a finite number",
    str: "a string",
    bool: "True or False",
    type(None): "None",
}


def _has_kind(value, kind) -> bool:
    """Whether value is of a field's declared type `kind` (int, float, str, bool, None): an int is not a
    bool, a float is a finite int or float (no NaN, no infinity)."""
    if kind is float:
        return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)
    if kind is int:
        return _is_int(value)
    return value is None if kind is type(None) else isinstance(value, kind)


def check_type(name: str, value, kinds: tuple):
    """value of one of the declared types `kinds` ((float, NoneType) for `float | None`): so a NaN, an
    infinity or a number as text is one ValueError naming the field, not a TypeError deep inside a
    comparison or a NaN that passes every range check."""
    if not any(_has_kind(value, k) for k in kinds):
        raise ValueError(f"{name} {value!r} must be {' or '.join(KIND_WORDS[k] for k in kinds)}")


def check_kinds(obj):
    """Every field of a part (or of the policy) of its declared type (a kind's own parameters: Select.check)."""
    for f in fields(obj):
        if f.name not in ("sweep", "kind_params"):
            check_type(f.name, getattr(obj, f.name), typing.get_args(f.type) or (f.type,))


def check(p: Policy):
    """The parts' own checks, and the ones that span two parts."""
    check_kinds(p)
    if not p.sparse:
        return
    for part in p.parts():
        check_kinds(part)
        part.check()
    select, keys = p.select, p.keys
    if p.exact.outliers and not select.kind.outliers:
        need = ", ".join(repr(n) for n, kind in landmarks.KINDS.items() if kind.outliers)
        raise ValueError(f"outlier chunks are ShadowKV's: they need chunk-mean landmarks (landmarks={need})")
    if select.kind.needs_resident and not keys.resident:
        raise ValueError(
            f"{select.landmarks} landmarks fit each query to the keys on the device: they need resident=True"
        )
    if select.per == "query_head" and (keys.source == "low_rank" or keys.kv_group == "token"):
        raise ValueError(
            "per-query-head selection reads exact per-head rows: keys source 'exact', kv_group 'head'"
        )


# --------------------------------------------------------------------------------------- the budget
@dataclass(frozen=True)
class BudgetSplit:
    """How a prompt of `prompt_len` tokens is split: sink | middle (n_chunks chunks of `chunk`) | local.

    The middle is what the landmarks summarise and the offload store holds; `selected` of its tokens
    are read at each decode step, plus `outlier_chunks` chunks kept exact (ShadowKV).
    """

    prompt_len: int
    sink: int
    local: int
    chunk: int
    n_chunks: int
    selected: int  # tokens read from the middle at each decode step (a multiple of chunk)
    outlier_chunks: int = 0
    outliers_scaled: bool = False  # the outlier count was given as a share of the prompt

    @property
    def k_chunks(self) -> int:
        return self.selected // self.chunk

    @property
    def outlier_tokens(self) -> int:
        return self.outlier_chunks * self.chunk

    @property
    def middle(self) -> slice:
        return slice(self.sink, self.sink + self.n_chunks * self.chunk)

    def line(self) -> str:
        """'budget = 4 sink + 64 local + 64 selected (+ 16 outliers) of 2048 tokens'."""
        scaled = ": ShadowKV's 48 chunks scaled to the prompt" if self.outliers_scaled else ""
        out = f" (+ {self.outlier_tokens} outliers{scaled})" if self.outlier_chunks else ""
        return (
            f"budget = {self.sink} sink + {self.local} local + {self.selected} selected{out}"
            f" of {self.prompt_len} tokens"
        )


def split_budget(policy: Policy, T: int) -> BudgetSplit | None:
    """Split a prompt of T tokens for `policy`, and size the selection.

    The middle's length is cut to a multiple of the chunk size; the remainder joins the local
    window. Returns None when the selection (plus any outlier chunks) needs more tokens than the
    middle holds: such a prompt is shorter than the budget and gets full attention. (A selection
    of exactly the whole middle still runs the sparse path; the invariant tests use that.)
    """
    select, exact = policy.select, policy.exact
    c = select.chunk_size
    if T < select.min_prompt:
        return None
    sink = min(_tokens(exact.sink, T), T)
    local = min(_tokens(exact.local, T), T - sink)
    n_chunks = (T - sink - local) // c
    local = T - sink - n_chunks * c
    if select.round_up:  # ArkVale's authors: P = max(1, ceil(budget * T / page)) pages
        selected = max(1, math.ceil(select.budget * T / c)) * c
    else:  # the paper's authors: int(0.03125 * T) tokens, here in whole chunks
        selected = max(c, int(select.budget * T) // c * c)
    if exact.outliers == "budget":  # 48 outlier chunks per 2048 selected tokens (ShadowKV's fast class)
        outliers = round(48 * selected / 2048)
    elif isinstance(exact.outliers, float):  # a share of the prompt's tokens, in whole chunks
        outliers = round(exact.outliers * T / c)
    else:
        outliers = exact.outliers
    if selected + outliers * c > n_chunks * c:
        return None
    return BudgetSplit(T, sink, local, c, n_chunks, selected, outliers, isinstance(exact.outliers, float))


def _tokens(count, T: int) -> int:
    """A token count given as an int, or as a share (float < 1) of a prompt of T tokens."""
    return round(count * T) if isinstance(count, float) else count
