"""The checks of the lab notebooks (notebooks/NN_lab_*.ipynb): does a student's function do what the project does?

Each exercise of a lab asks for one small function (its stub gives the signature and tensor shapes), and a
check cell grades it:

    checks.check_chunk_means(chunk_means)   # -> pass: ...   or   not yet: <the first difference, with a hint>

A check runs the student's function in steps, and stops at the first one that differs:
1. what it returns: a tensor (or a tuple) of the right shape and kind;
2. hand-made cases, each built to isolate one rule of the mechanism (the 1/sqrt(d) scale, the axis of the
   softmax, the max over the GQA group, RoPE undone before the SVD, ...). When the answer differs, the
   check computes what the usual mistakes would have returned on that case (mean instead of max, wrong
   axis, RoPE not undone, ...); if the student's answer is one of them, the hint names that mistake,
   otherwise it gives the first element that differs;
3. the default model's real K/V and queries (`real_case`), against the project's own implementation
   (`landmarks.py`, `kvcache.py`, `quantize.py`): the reference of every check is the project's code.

A check returns a `Verdict`: true or false, and one line (its repr, so a check cell shows it) that starts
with "pass", "not yet" or "not done yet" (the stub still raises NotImplementedError). An exception raised
by the student's function is reported in one line (its type, message and the line of the student's code
where it happened), never as a traceback; so is a result of another dtype (float16 where the project
computes float32), and a function that runs for more than TIME_LIMIT seconds in one check, which is
stopped. When the default model cannot be loaded, a check says "cannot check yet" and why, without
blaming the student's function, and the labs' first cell (`real_case()`) shows that one line too.
"""

import functools
import inspect
import math
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import kvcache  # noqa: E402
import lab  # noqa: E402
import landmarks  # noqa: E402
import quantize  # noqa: E402
from model import load_model  # noqa: E402

TOL = 1e-4  # relative to the largest |value| expected: float32 sums in another order differ by ~1e-6
TIME_LIMIT = 60.0  # seconds the student's function may run in one check, all its calls together

# ---------------------------------------------------------------------------------------------------
# The machinery: verdicts, calling the student's function, comparing
# ---------------------------------------------------------------------------------------------------


class Verdict:
    """What a check found: true when the function passed, and the one line that says so or says how not."""

    def __init__(self, ok: bool, message: str):
        self.ok, self.message = ok, message

    def __bool__(self):
        return self.ok

    def __repr__(self):
        return self.message

    __str__ = __repr__


class NotYet(Exception):
    """One step of a check found a difference: its message is the hint."""


class _NotDone(Exception):
    """The student's function still raises NotImplementedError (the stub)."""


class NoModel(RuntimeError):
    """The default model could not be loaded, so the real-K/V step of a check cannot run: not the student's
    fault. In a notebook it shows as its one line (`_render_traceback_`, which IPython asks for), not as
    a traceback."""

    def _render_traceback_(self):
        return [f"NoModel: {self}"]


class _TooLong(BaseException):
    """Raised in the student's function when its time is up (a BaseException: its `except Exception`
    cannot swallow it)."""


def _time_up(signum, frame):
    raise _TooLong


def _here(frame) -> bool:
    """A traceback frame that is not the student's code: this file, torch, the standard library."""
    name = frame.filename
    return Path(name).resolve() == Path(__file__).resolve() or any(
        part in name for part in ("site-packages", "/torch/", "/lib/python")
    )


def _one_line(exc: BaseException, name: str) -> str:
    """'your f raised ValueError: <first line of the message> (line 4: `k.view(...)`)'."""
    text = (str(exc).strip().splitlines() or [""])[0]
    if len(text) > 200:
        text = text[:197] + "..."
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not _here(f)]
    where = f" (line {frames[-1].lineno}: `{frames[-1].line.strip()}`)" if frames and frames[-1].line else ""
    return f"your {name} raised {type(exc).__name__}: {text}{where}"


class _Student:
    """The student's function, called on copies of the inputs (it may change them in place), every
    exception turned into a one-line NotYet, and stopped once its calls in this check have run for
    TIME_LIMIT seconds (a SIGALRM timer, where there is one: the main thread of a Unix process)."""

    def __init__(self, fn):
        self.fn = fn
        self.name = getattr(fn, "__name__", "function")
        self.used = 0.0  # seconds its calls took so far in this check

    def __call__(self, *args):
        args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        left = TIME_LIMIT - self.used
        timed = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGALRM, _time_up) if timed else None
        start = time.perf_counter()
        outer = (0.0, 0.0)  # a timer someone else had set (a test's deadline): set again afterwards
        try:
            if timed:
                outer = signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3))
            with torch.no_grad():
                return self.fn(*args)
        except _TooLong:
            raise NotYet(
                f"{self.name} ran for more than {TIME_LIMIT:g} s in this check and was stopped: a Python "
                "loop over tokens or channels? work on whole tensors (the project's code takes well under "
                "a second here)"
            ) from None
        except NotImplementedError:
            raise _NotDone from None
        except Exception as exc:  # a student's bug: one line, not a traceback
            raise NotYet(_one_line(exc, self.name)) from None
        finally:
            took = time.perf_counter() - start
            if timed:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
                if outer[0]:
                    signal.setitimer(signal.ITIMER_REAL, max(outer[0] - took, 1e-3), outer[1])
            self.used += took


def _check(body):
    """Make `body(student)` (which returns a summary, or raises NotYet) a check: fn -> Verdict."""

    @functools.wraps(body)
    def run(fn) -> Verdict:
        if not callable(fn):
            return Verdict(False, f"not done yet: give the check your function (got a {type(fn).__name__})")
        student = _Student(fn)
        try:
            summary = body(student)
        except _NotDone:
            return Verdict(
                False, f"not done yet: {student.name} still raises NotImplementedError (write its body above)"
            )
        except NotYet as exc:
            return Verdict(False, f"not yet: {exc}")
        except NoModel as exc:  # the check's own input is missing: say so, never blame the function
            return Verdict(False, f"cannot check yet: {exc}")
        except Exception as exc:  # what the student's function returned broke a step: still one line
            text = (str(exc).strip().splitlines() or [""])[0][:200]
            return Verdict(
                False,
                f"not yet: the check could not use what {student.name} returned ({type(exc).__name__}: {text}); "
                "compare it with the shapes its docstring asks for",
            )
        return Verdict(True, f"pass: {summary}")

    return run


def _isclose(got, want, tol, rtol):
    got, want = got.detach().double(), want.detach().double()
    finite = want[want.isfinite()]
    scale = finite.abs().max().item() if finite.numel() else 1.0
    return torch.isclose(got, want, rtol=rtol, atol=tol * max(scale, 1e-30))


def _close(got, want, tol=TOL, rtol=0.0) -> bool:
    """got ≈ want: a tensor of the same shape, every element within tol x the largest finite |want| (plus
    rtol x its own |want|); an infinite element only matches itself."""
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(want.shape):
        return False
    return bool(_isclose(got, want, tol, rtol).all())


def _first_difference(got, want, tol=TOL, rtol=0.0) -> str:
    """'first difference at [0, 2, 1]: expected 0.25, got 0.5' (in index order)."""
    idx = tuple((~_isclose(got, want, tol, rtol)).nonzero()[0].tolist())
    return f"first difference at {list(idx)}: expected {want[idx].item():.6g}, got {got[idx].item():.6g}"


def _tensor(out, name: str, shape, dims: str, shapes=()):
    """Check that out is a tensor of `shape` ([H, N] ... written out in `dims`); `shapes`: (wrong shape,
    hint) pairs of the usual shape mistakes."""
    if isinstance(out, (tuple, list)):
        raise NotYet(f"{name} should return one tensor {dims}, got a {type(out).__name__} of {len(out)}")
    if not isinstance(out, torch.Tensor):
        raise NotYet(f"{name} should return a torch tensor {dims}, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape):
        for wrong, hint in shapes:
            if tuple(out.shape) == tuple(wrong):
                raise NotYet(f"shape {list(out.shape)}, expected {dims} = {list(shape)}: {hint}")
        raise NotYet(f"wrong shape: {name} should return {dims} = {list(shape)}, got {list(out.shape)}")
    return out


def _pair(out, name: str, what: str):
    """out must be a tuple (or list) of two tensors."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        got = f"a {type(out).__name__}" + (f" of {len(out)}" if isinstance(out, (tuple, list)) else "")
        raise NotYet(f"{name} should return two tensors, {what}; got {got}")
    return out


def _compare(got, want, step: str, mistakes=(), tol=TOL, rtol=0.0):
    """Raise NotYet unless got ≈ want. The hint is that of the first known mistake got matches: each a
    (hint, wrong answer) pair, the wrong answer a tensor, a function computing it, or None for "inf or nan
    where want is finite" (an overflow); else the first element that differs."""
    if _close(got, want, tol, rtol):
        return
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(want.shape):
        raise NotYet(f"{step}: expected a tensor of shape {list(want.shape)}, got {_describe(got)}")
    if (
        got.is_floating_point()
        and want.is_floating_point()
        and torch.finfo(got.dtype).eps > max(torch.finfo(want.dtype).eps, 1e-6)
        and _close(got, want, tol=50 * torch.finfo(got.dtype).eps)
    ):  # right to the few digits its dtype keeps (float16, bfloat16): the dtype is the mistake
        name = str(got.dtype).removeprefix("torch.")
        raise NotYet(
            f"{step}: your result is {name}, right only to the few digits {name} keeps: compute in the "
            f"dtype of the inputs, without casting to {name}"
        )
    broken = not bool(torch.isfinite(got.detach()[want.isfinite()]).all())
    for hint, wrong in mistakes:
        if wrong is None:
            if broken:
                raise NotYet(f"{step}: {hint}")
        elif _close(got, wrong() if callable(wrong) else wrong, tol, rtol):
            raise NotYet(f"{step}: {hint}")
    raise NotYet(f"{step}: {_first_difference(got, want, tol, rtol)}")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {list(x.shape)}"
    return f"a {type(x).__name__}"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def show_source(*functions):
    """Print the project's source of each function: in a solved notebook, the solution to read."""
    for fn in functions:
        where = f"{fn.__module__}.py" if fn.__module__ else "?"
        print(f"# ---- {fn.__qualname__}, from {where}\n{inspect.getsource(fn)}")


# ---------------------------------------------------------------------------------------------------
# The default model's real K/V
# ---------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """Real K/V and queries of the default model (SmolLM2-135M-Instruct) on a Text2JSON prompt.

    k, v:  {layer: [H, T, d]} the exact post-RoPE keys and values of the T prompt tokens
    q:     {layer: [H, G, A, d]} the queries of the first A answer tokens (teacher-forced), grouped as a
           decode step groups them: the G query heads that read KV head h are q[layer][h]
    rope:  the model's RoPE (`rope.apply(x, pos)` / `rope.invert(x, pos)`, x [..., T, d], pos [T])
    """

    layers: tuple
    k: dict
    v: dict
    q: dict
    rope: object
    T: int
    H: int
    G: int
    d: int
    A: int
    local: int = 64  # the presets' local window: the prompt's last 64 tokens are attended exactly

    def middle(self, layer: int, chunk: int = 1):
        """The keys that landmarks summarise: the prompt minus the local window, cut to whole chunks [H, M, d]."""
        M = (self.T - self.local) // chunk * chunk
        return self.k[layer][:, :M]

    def __repr__(self):
        return (
            f"real K/V of the default model: layers {list(self.layers)}, a {self.T}-token Text2JSON prompt, "
            f"H={self.H} KV heads x d={self.d} channels, G={self.G} query heads per KV head, "
            f"queries of A={self.A} answer tokens"
        )


@functools.cache
def real_case(tokens: int = 512, layers: tuple = (2, 14, 26), steps: int = 8) -> Case:
    """The default model's K/V of a ~`tokens`-token Text2JSON prompt, and the queries of the first `steps`
    tokens of its gold answer (full attention, teacher-forced: lab.forced_queries). Cached: the checks of
    a notebook (and of a test session) share one prefill."""
    try:
        model, tok = load_model()
    except Exception as exc:  # no wheel offline, an unwritable cache...: one line, in the cell and the checks
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise NoModel(
            f"the default model (SmolLM2-135M-Instruct) could not be loaded ({reason}); the checks need its "
            "K/V, so fix that and run the first cell again (your functions are not at fault)"
        ) from None
    sample, prompt_ids, _ = lab.text2json_sample(tok, n_tokens=tokens, index=0)
    answer_ids = tok.encode(sample["answer"])[:steps]
    full, queries, _ = lab.forced_queries(model, prompt_ids, answer_ids)
    cfg, T = model.config, len(prompt_ids)
    H, G, d = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    # clone: tensors made under inference_mode cannot be changed in place outside it (a student may)
    return Case(
        layers=tuple(layers),
        k={i: full.k[i][0, :, :T].clone() for i in layers},
        v={i: full.v[i][0, :, :T].clone() for i in layers},
        q={i: queries[i].reshape(H, G, len(answer_ids), d).clone() for i in layers},
        rope=model.rope,
        T=T,
        H=H,
        G=G,
        d=d,
        A=len(answer_ids),
    )


class _NoRope:
    """A RoPE that rotates nothing: a probe with it isolates the SVD from the rotation."""

    def apply(self, x, pos):
        return x.clone()

    def invert(self, x, pos):
        return x.clone()


def _oracle_rows(case: Case, layer: int, k: int, steps=slice(0, 1)):
    """The k middle tokens per KV head that exact selection picks for the first answer step: [H, k]."""
    scores = landmarks.score(case.q[layer][:, :, steps], landmarks.TokenKeys(case.middle(layer)))
    return landmarks.select_topk(scores, k)


def _budget(case: Case) -> int:
    return int(0.03125 * case.T)  # the paper's 3.125% of the prompt


# ---------------------------------------------------------------------------------------------------
# The project's code, as each exercise's signature asks for it (the solutions, and the checks' reference)
# ---------------------------------------------------------------------------------------------------


def ref_chunk_means(k, chunk):
    return landmarks.chunk_landmarks(k, chunk)[0]


def ref_chunk_logits(token_logits, chunk):
    """The one exercise the project has no function for: its chunk logits come from the landmarks
    (landmarks.landmark_logits of landmarks.chunk_landmarks), never from the tokens' logits. The identity
    q.mean(k) = mean(q.k) in one line."""
    *lead, T = token_logits.shape
    return token_logits.view(*lead, T // chunk, chunk).mean(-1)


def ref_selection_scores(q, marks):
    return landmarks.score(q, landmarks.TokenKeys(marks))


def ref_select(scores, k):
    return landmarks.select_topk(scores, k)


def ref_min_cosine(k, chunk):
    return landmarks.chunk_landmarks(k, chunk)[1]


def ref_outlier_chunks(min_cos, n_out):
    marks = landmarks.ChunkMeans(min_cos.new_empty(*min_cos.shape, 0), min_cos)  # only min_cos is read
    return kvcache.outlier_chunks(marks, n_out)


def ref_scores_without_outliers(q, means, removed):
    marks = landmarks.ChunkMeans(means, torch.zeros(removed.shape), removed=removed)
    return landmarks.score(q, marks)


def ref_factorise(k, rope, rank):
    low = kvcache.LowRankKeys.build(k, rope, rank)
    return low.u, low.sv


def ref_rebuild(u, sv, rows, rope):
    T, S = u.shape[0], rows.shape[1]
    split = kvcache.BudgetSplit(prompt_len=T, sink=0, local=0, chunk=1, n_chunks=T, selected=S)
    return kvcache.LowRankKeys(u, sv).selected({}, rows, split, rope, u.dtype)


def ref_attention_lse(q, k, v):
    return kvcache.attention_lse(q, k, v)


def ref_merge(out_a, lse_a, out_b, lse_b):
    return kvcache.merge_attention(out_a, lse_a, out_b, lse_b)


HIGGS_BITS = "2"  # the paper's landmark format: HIGGS, 4-value pieces, a 256-point grid (8-bit codes)


def higgs_grid():
    """The grid of the 2-bit format: 256 points in 4 dims (quantize.fit_grid, cached on disk)."""
    fmt = quantize.parse_format(HIGGS_BITS)
    return quantize.fit_grid(fmt.n, fmt.d)


def ref_higgs_quantize(x, grid):
    fmt = quantize.parse_format(HIGGS_BITS)  # the grid is this format's: quantize.quantize fits the same one
    qx = quantize.quantize(x, fmt)  # one scale group per row when the row has <= 128 channels
    M, C = x.shape
    codes = quantize.unpack_bits(qx.codes, fmt.code_bits, C // fmt.d).long()  # [M, C/d]
    return codes, qx.scales[:, 0].float()  # [M]: the row's L2 norm, stored as float16


def ref_higgs_dequantize(codes, scales, grid):
    fmt = quantize.parse_format(HIGGS_BITS)
    C = codes.shape[1] * fmt.d
    qx = quantize.Quantized(
        codes=quantize.pack_bits(codes, fmt.code_bits),
        scales=scales.half()[:, None],
        zeros=None,
        fmt=fmt,
        channels=C,
        group=C,
    )
    return quantize.dequantize(qx)


# ---------------------------------------------------------------------------------------------------
# Exercise 1: chunk-mean landmarks, and a chunk's logit as the mean of its tokens' logits
# ---------------------------------------------------------------------------------------------------


@_check
def check_chunk_means(fn):
    # 1. shape, on a ramp that tells chunks, heads and channels apart: k[h, t, j] = 100 h + t + j / 100
    H, T, d, c = 2, 24, 4, 4
    N = T // c
    ramp = 100.0 * torch.arange(H)[:, None, None] + torch.arange(T)[None, :, None] + torch.arange(d) / 100
    out = _tensor(
        fn(ramp, c),
        "chunk_means",
        (H, N, d),
        "[H, N, d]",
        shapes=[
            (
                (H, c, d),
                "you have `chunk` landmarks per head, i.e. you averaged over the N axis: reshape to "
                "[H, N, chunk, d] and average over the chunk axis (2)",
            ),
            (
                (N, d),
                "the heads are gone: every KV head has its own landmarks (average over the chunk axis only)",
            ),
            (
                (H, N),
                "the channels are gone: a landmark is a key, [d] channels (average over the chunk axis only)",
            ),
        ],
    )
    # 2. the ramp: chunk n of head h must be the mean of tokens n*c .. n*c + c - 1
    _compare(
        out,
        ref_chunk_means(ramp, c),
        "on a hand-made ramp of keys",
        [
            (
                "sum instead of mean: a landmark is the MEAN key of its chunk (divide by the chunk size)",
                ramp.view(H, N, c, d).sum(2),
            ),
            (
                "strided chunks: chunk n must be the consecutive tokens n*chunk .. n*chunk + chunk - 1, i.e. "
                "k.view(H, N, chunk, d), not every N-th token (k.view(H, chunk, N, d))",
                ramp.view(H, c, N, d).mean(1),
            ),
            ("one key per chunk instead of the mean of its keys", ramp[:, ::c]),
            ("the last key of each chunk instead of the mean of its keys", ramp[:, c - 1 :: c]),
        ],
    )
    # 3. the real keys, against landmarks.chunk_landmarks
    case = real_case()
    for layer in case.layers:
        for chunk in (8, 1):
            k = case.middle(layer, chunk)
            _compare(
                fn(k, chunk), ref_chunk_means(k, chunk), f"real keys of layer {layer}, chunks of {chunk}"
            )
    return (
        f"your landmarks equal landmarks.chunk_landmarks on the real keys of layers {list(case.layers)} "
        "(chunks of 8 and 1)"
    )


@_check
def check_chunk_logits(fn):
    H, G, Tq, T, c = 2, 3, 2, 16, 4
    N = T // c
    logits = 3 * torch.randn(H, G, Tq, T, generator=_gen(1))
    by_chunk = logits.view(H, G, Tq, N, c)
    out = _tensor(
        fn(logits, c),
        "chunk_logits",
        (H, G, Tq, N),
        "[H, G, Tq, N]",
        shapes=[
            ((H, G, Tq, c), "you averaged over the N axis: reshape to [..., N, chunk] and average the last")
        ],
    )
    _compare(
        out,
        ref_chunk_logits(logits, c),
        "on hand-made logits",
        [
            (
                "max over the chunk instead of the mean: the best token's logit is what selection would "
                "need (Quest bounds it from above), but a chunk-MEAN landmark gets q.mean(k) = mean(q.k), "
                "the mean of its tokens' logits",
                by_chunk.amax(-1),
            ),
            ("sum over the chunk instead of the mean: q.mean(k) = sum(q.k) / chunk", by_chunk.sum(-1)),
            (
                "logsumexp over the chunk instead of the mean: q.mean(k) is linear in the keys",
                by_chunk.logsumexp(-1),
            ),
            (
                "strided chunks: chunk n is the consecutive tokens n*chunk .. n*chunk + chunk - 1 "
                "(view(..., N, chunk)), not every N-th token (view(..., chunk, N))",
                logits.view(H, G, Tq, c, N).mean(-2),
            ),
        ],
    )
    case = real_case()
    worst = 0.0
    for layer in case.layers:
        k = case.middle(layer, 8)
        token_logits = landmarks.landmark_logits(case.q[layer], k)  # [H, G, A, M]
        want = landmarks.landmark_logits(case.q[layer], landmarks.chunk_landmarks(k, 8)[0])  # [H, G, A, N]
        got = fn(token_logits, 8)
        _compare(got, want, f"real queries and keys of layer {layer}: the logits of the chunk-mean landmarks")
        worst = max(worst, (got - want).abs().max().item())
    return (
        "the identity holds on the real keys: the mean of each chunk's token logits equals the logit of its "
        f"chunk-mean landmark (landmarks.landmark_logits of landmarks.chunk_landmarks; largest difference "
        f"{worst:.1e})"
    )


# ---------------------------------------------------------------------------------------------------
# Exercise 5: the selection rule
# ---------------------------------------------------------------------------------------------------


def _softmax_scores(q, marks):
    """The pieces of the rule, for the mistake catalogue: logits [H, G, Tq, N] and their scale."""
    d = q.shape[-1]
    raw = torch.einsum("hgtd,hnd->hgtn", q.double(), marks.double())
    return raw, raw / math.sqrt(d)


@_check
def check_selection_scores(fn):
    d = 16
    gen = _gen(2)
    # 1. shape
    H, G, Tq, N = 2, 3, 2, 5
    q, marks = torch.randn(H, G, Tq, d, generator=gen), torch.randn(H, N, d, generator=gen)
    _tensor(
        fn(q, marks),
        "selection_scores",
        (H, N),
        "[H, N]",
        shapes=[
            ((H, G, N), "you kept the group axis: take the max over the G query heads (dim 1)"),
            ((H, Tq, N), "you kept the positions: sum over the Tq query positions"),
            (
                (H, G, Tq, N),
                "these are per head and position: sum over the positions, then max over the group",
            ),
        ],
    )
    # 2. one query head, one position: the scores are softmax(q.L / sqrt(d)) over the landmarks
    q1 = torch.randn(H, 1, 1, d, generator=gen)
    raw, scaled = _softmax_scores(q1, marks)
    _compare(
        fn(q1, marks),
        scaled.softmax(-1)[:, 0, 0],
        "one query head and position (G = Tq = 1), where the score is softmax(q.L / sqrt(d))",
        [
            (
                'logits not scaled by 1/sqrt(d): the rule is a softmax of q.L / sqrt(d) (PAPER.md "ShadowKV, '
                'precisely", decode step 1), as attention itself scales them',
                raw.softmax(-1)[:, 0, 0],
            ),
            (
                "no softmax over the landmarks: each query head's logits become probabilities over the N "
                "landmarks before they are combined",
                scaled[:, 0, 0],
            ),
            (
                "no softmax and no 1/sqrt(d): the score is softmax(q.L / sqrt(d)) over the landmarks",
                raw[:, 0, 0],
            ),
            (
                "softmax over the KV heads instead of over the landmarks (the last axis)",
                scaled[:, 0, 0].softmax(0),
            ),
        ],
    )
    # 3. one query head, three positions: the probabilities are summed over the positions
    q3 = torch.randn(H, 1, 3, d, generator=gen)
    raw, scaled = _softmax_scores(q3, marks)
    p = scaled.softmax(-1)[:, 0]  # [H, 3, N]
    _compare(
        fn(q3, marks),
        p.sum(1),
        "one query head and three query positions, where the score is the SUM over the positions",
        [
            ("mean over the query positions instead of the sum", p.mean(1)),
            ("max over the query positions instead of the sum", p.amax(1)),
            ("only the last query position: sum the probabilities over all Tq positions", p[:, -1]),
            ("only the first query position: sum the probabilities over all Tq positions", p[:, 0]),
            (
                "one softmax over positions and landmarks together: take a softmax over the landmarks for "
                "each position, then sum over the positions",
                scaled[:, 0].reshape(H, -1).softmax(-1).view(H, 3, -1).sum(1),
            ),
            (
                "softmax over the positions instead of over the landmarks",
                scaled[:, 0].softmax(1).sum(1),
            ),
        ],
    )
    # 4. three query heads that each want another landmark: the max over the group keeps all three
    marks5 = 4 * torch.eye(N, d).expand(H, N, d)  # landmark n = 4 e_n
    strength = torch.tensor([8.0, 6.0, 4.0])
    qg = (strength[:, None] * torch.eye(3, d)).expand(H, 3, d)[:, :, None]  # [H, 3, 1, d]: head g wants n = g
    raw, scaled = _softmax_scores(qg, marks5)
    p = scaled.softmax(-1)[:, :, 0]  # [H, 3, N]
    _compare(
        fn(qg, marks5),
        p.amax(1),
        "three query heads of one GQA group, each wanting another landmark (the max keeps all three)",
        [
            (
                "mean over the group instead of max: a landmark that one query head needs is diluted by the "
                'heads that do not (PAPER.md "ShadowKV, precisely": max over the G query heads)',
                p.mean(1),
            ),
            ("sum over the group instead of max (PAPER.md: max over the G query heads)", p.sum(1)),
            ("only the first query head of the group: take the max over all G of them", p[:, 0]),
            (
                "max over the group taken on the logits, before the softmax: take each query head's softmax "
                "first, then the max of the probabilities",
                scaled[:, :, 0].amax(1).softmax(-1),
            ),
            ("softmax over the group axis instead of over the landmarks", scaled[:, :, 0].softmax(1).amax(1)),
        ],
    )
    # 5. both: the sum over positions comes before the max over the group
    q22 = 2 * torch.randn(H, 2, 2, d, generator=gen)
    raw, scaled = _softmax_scores(q22, marks)
    p = scaled.softmax(-1)  # [H, 2, 2, N]
    _compare(
        fn(q22, marks),
        p.sum(2).amax(1),
        "two query heads and two positions",
        [
            (
                "max over the group before the sum over positions: sum each query head's probabilities over "
                "the positions, then take the max over the heads",
                p.amax(1).sum(1),
            ),
            ("mean over the group instead of max", p.sum(2).mean(1)),
        ],
    )
    # 6. the real queries, against landmarks.score, on chunk-mean landmarks and on every exact key
    case = real_case()
    for layer in case.layers:
        for name, marks_r in (
            ("chunk-8 means", ref_chunk_means(case.middle(layer, 8), 8)),
            ("keys", case.middle(layer)),
        ):
            for steps in (slice(0, 1), slice(0, case.A)):
                q_r = case.q[layer][:, :, steps]
                Tq = q_r.shape[2]
                _compare(
                    fn(q_r, marks_r),
                    ref_selection_scores(q_r, marks_r),
                    f"real queries of layer {layer} ({Tq} position{'s' if Tq > 1 else ''}) against its {name}",
                )
    return f"your scores equal landmarks.score on the real queries and keys of layers {list(case.layers)}"


@_check
def check_select(fn):
    gen = _gen(3)
    H, N, k = 2, 10, 3
    scores = torch.rand(H, N, generator=gen)
    want = ref_select(scores, k)
    out = fn(scores, k)
    if isinstance(out, torch.Tensor) and out.is_floating_point():
        raise NotYet(
            "your select returns floats: return the INDICES of the best landmarks (an int64 tensor, e.g. the "
            ".indices of torch.topk), not their scores"
        )
    out = _tensor(out, "select", (H, k), "[H, k]", shapes=[((k,), "select k per KV head (each row), [H, k]")])
    if out.dtype != torch.int64:
        raise NotYet(f"indices must be int64 (torch.long), got {out.dtype}")
    if not torch.equal(out, want):
        if torch.equal(out.sort(1).values, ref_select(-scores, k)):
            raise NotYet("random scores: the k LOWEST scores instead of the highest")
        if torch.equal(out.sort(1).values, want):
            raise NotYet(
                "random scores: the right landmarks, in the wrong order: sort the indices ascending (the "
                "cache reads the selected rows in prompt order; landmarks.select_topk returns them sorted)"
            )
        raise NotYet(f"random scores: expected {want.tolist()}, got {out.tolist()}")
    ties = torch.tensor([[1.0, 5, 3, 3, 3, 0, 3, 3], [2, 2, 2, 2, 2, 2, 2, 2]])
    want = ref_select(ties, 3)
    out = fn(ties, 3)
    if not (isinstance(out, torch.Tensor) and torch.equal(out, want)):
        raise NotYet(
            f"scores with ties: expected {want.tolist()}, got {_describe(out) if not isinstance(out, torch.Tensor) else out.tolist()}: "
            "ties: among equal scores take the LOWER index first, so the choice does not depend on the "
            "device or the sort algorithm (torch.topk breaks ties in no fixed order; a stable sort keeps "
            "them in index order: scores.argsort(dim=1, descending=True, stable=True))"
        )
    case = real_case()
    for layer in case.layers:
        for name, marks in (
            ("chunk-8 means", ref_chunk_means(case.middle(layer, 8), 8)),
            ("keys", case.middle(layer)),
        ):
            s = ref_selection_scores(case.q[layer], marks)
            for kk in (1, _budget(case) // (8 if name.startswith("chunk") else 1)):
                got, want = fn(s, kk), ref_select(s, kk)
                if not (isinstance(got, torch.Tensor) and torch.equal(got, want)):
                    raise NotYet(
                        f"real scores of layer {layer} ({name}), k={kk}: expected {want.tolist()}, got "
                        f"{got.tolist() if isinstance(got, torch.Tensor) else _describe(got)}"
                    )
    return f"your selection equals landmarks.select_topk on the real scores of layers {list(case.layers)}"


# ---------------------------------------------------------------------------------------------------
# Exercise 2: ShadowKV's outlier chunks
# ---------------------------------------------------------------------------------------------------


@_check
def check_min_cosine(fn):
    H, T, d, c = 2, 16, 8, 4
    N = T // c
    k = torch.randn(H, T, d, generator=_gen(4)) + 1.0
    k[:, 5] *= 3  # one long key: a dot product and a cosine differ
    kc = k.view(H, N, c, d)
    mean = kc.mean(2, keepdim=True)  # [H, N, 1, d]
    cos = torch.nn.functional.cosine_similarity(kc, mean, dim=-1)  # [H, N, c]
    out = _tensor(
        fn(k, c),
        "min_cosine",
        (H, N),
        "[H, N]",
        shapes=[
            (
                (H, N, c),
                "one value per chunk: the MINIMUM over its tokens' cosines (amin over the chunk axis)",
            )
        ],
    )
    whole = k.mean(1, keepdim=True)  # [H, 1, d] the mean of the whole head
    _compare(
        out,
        ref_min_cosine(k, c),
        "hand-made keys",
        [
            (
                "max instead of min: an outlier chunk is one whose mean stands badly for at least one of its "
                'keys, so the value is the LOWEST cosine over the chunk (PAPER.md "ShadowKV, precisely")',
                cos.amax(-1),
            ),
            ("mean cosine instead of the min over the chunk", cos.mean(-1)),
            (
                "a dot product, not a cosine: divide by both norms "
                "(torch.nn.functional.cosine_similarity(keys, mean, dim=-1))",
                (kc * mean).sum(-1).amin(-1),
            ),
            (
                "cosine against the mean of the whole head: each chunk is compared with its OWN mean key",
                torch.nn.functional.cosine_similarity(kc, whole[:, :, None], dim=-1).amin(-1),
            ),
        ],
    )
    case = real_case()
    for layer in case.layers:
        km = case.middle(layer, 8)
        _compare(fn(km, 8), ref_min_cosine(km, 8), f"real keys of layer {layer}, chunks of 8")
    return f"your minimum cosines equal landmarks.chunk_landmarks' on the real keys of layers {list(case.layers)}"


@_check
def check_outlier_chunks(fn):
    gen = _gen(5)
    H, N, n = 2, 10, 3
    min_cos = torch.rand(H, N, generator=gen)
    want = ref_outlier_chunks(min_cos, n)
    out = _tensor(fn(min_cos, n), "outlier_chunks", (H, n), "[H, n_out]")
    if out.dtype != torch.int64 or not torch.equal(out, want):
        if out.dtype == torch.int64 and torch.equal(out.sort(1).values, landmarks.select_topk(min_cos, n)):
            raise NotYet(
                "random values: the chunks with the HIGHEST minimum cosine: the outliers are the chunks whose "
                "mean fits its keys worst, the LOWEST minimum cosine"
            )
        if out.dtype == torch.int64 and torch.equal(out.sort(1).values, want):
            raise NotYet("random values: the right chunks in the wrong order: sort the indices ascending")
        if out.is_floating_point():
            raise NotYet("return the chunk INDICES (int64), not their values")
        raise NotYet(f"random values: expected {want.tolist()}, got {out.tolist()} ({out.dtype})")
    case = real_case()
    for layer in case.layers:
        mc = ref_min_cosine(case.middle(layer, 8), 8)
        got, want = fn(mc, 4), ref_outlier_chunks(mc, 4)
        if not (isinstance(got, torch.Tensor) and torch.equal(got, want)):
            raise NotYet(f"real keys of layer {layer}: expected chunks {want.tolist()}, got {got}")
    return f"your outliers equal kvcache.outlier_chunks on the real keys of layers {list(case.layers)}"


@_check
def check_scores_without_outliers(fn):
    d = 16
    # 1. one head, one position; landmark 1 is removed, and its logit is far the largest
    means = torch.zeros(1, 4, d)
    means[0, :, 0] = torch.tensor([0.0, 20.0, 1.0, 2.0])  # q = 4 e_0 below: logits 0, 20, 1, 2
    q = torch.zeros(1, 1, 1, d)
    q[..., 0] = 4.0
    removed = torch.tensor([[False, True, False, False]])
    want = ref_scores_without_outliers(q, means, removed)
    out = _tensor(fn(q, means, removed), "scores_without_outliers", (1, 4), "[H, N]")
    if not bool(torch.isneginf(out[removed]).all()):
        raise NotYet(
            "one head, landmark 1 removed: a removed chunk must score -inf, so it is never selected (its "
            "tokens are attended exactly anyway): scores.masked_fill(removed, float('-inf'))"
        )
    logits = (q[0, 0, 0] @ means[0].T / math.sqrt(d)).double()  # [4]
    after = logits.softmax(-1).masked_fill(removed[0], float("-inf"))[None]
    _compare(
        out,
        want,
        "one head, landmark 1 removed (the others' probabilities must sum to 1)",
        [
            (
                "removed after the softmax: the outliers' logits still took their share of the probability "
                'mass; mask the logits with -inf BEFORE the softmax (PAPER.md "ShadowKV, precisely": removed '
                "from the landmark set before the softmax)",
                after,
            ),
        ],
    )
    # 2. a group of query heads and positions: the rule of exercise 5 on the landmarks that are left
    gen = _gen(6)
    H, G, Tq, N = 2, 3, 2, 6
    q = torch.randn(H, G, Tq, d, generator=gen)
    means = torch.randn(H, N, d, generator=gen)
    removed = torch.zeros(H, N, dtype=torch.bool)
    removed[0, 2] = removed[1, 4] = removed[1, 0] = True
    logits = torch.einsum("hgtd,hnd->hgtn", q.double(), means.double()) / math.sqrt(d)
    after = logits.softmax(-1).sum(2).amax(1).masked_fill(removed, float("-inf"))
    _compare(
        fn(q, means, removed),
        ref_scores_without_outliers(q, means, removed),
        "three query heads, two positions, some chunks removed (the rule of exercise 5 on the landmarks left)",
        [
            ("removed after the softmax: mask the logits with -inf BEFORE the softmax", after),
            (
                "mean over the group instead of max",
                logits.masked_fill(removed[:, None, None], float("-inf")).softmax(-1).sum(2).mean(1),
            ),
        ],
    )
    # 3. real chunk means, ShadowKV's outliers among them
    case = real_case()
    for layer in case.layers:
        km = case.middle(layer, 8)
        means, min_cos = landmarks.chunk_landmarks(km, 8)
        out_idx = ref_outlier_chunks(min_cos, 4)
        removed = torch.zeros_like(min_cos, dtype=torch.bool).scatter_(1, out_idx, True)
        _compare(
            fn(case.q[layer], means, removed),
            ref_scores_without_outliers(case.q[layer], means, removed),
            f"real queries and chunk means of layer {layer}, its 4 outlier chunks removed",
        )
    return (
        "your scores equal landmarks.score with ShadowKV's outliers removed, on the real keys of layers "
        f"{list(case.layers)}"
    )


# ---------------------------------------------------------------------------------------------------
# Exercise 3: rank-r keys
# ---------------------------------------------------------------------------------------------------


def _rank_probe(case: Case, T=48):
    """Pre-RoPE keys [H, T, d] whose [T, H*d] matrix has the singular values 10, then 3 down to 0.5 (random
    orthonormal singular vectors): its best rank-1 approximation is the first term, its worst the last.
    Returns the keys and those two terms ([T, H*d] each)."""
    H, d = case.H, case.d
    gen = _gen(7)
    a = torch.linalg.qr(torch.randn(T, T, generator=gen, dtype=torch.float64)).Q  # [T, T]
    w = torch.linalg.qr(torch.randn(H * d, T, generator=gen, dtype=torch.float64)).Q  # [H*d, T]
    sigma = torch.cat([torch.tensor([10.0]), torch.linspace(3.0, 0.5, T - 1)]).double()  # [T]
    mat = (a * sigma) @ w.T  # [T, H*d]
    top, low = sigma[0] * a[:, :1] @ w[:, :1].T, sigma[-1] * a[:, -1:] @ w[:, -1:].T
    return mat.float().view(T, H, d).transpose(0, 1).contiguous(), top, low  # [H, T, d], [T, H*d] x2


def _as_matrix(k):
    """[H, T, d] -> [T, H*d]: token t's row is its keys of head 0, head 1, ... side by side."""
    return k.transpose(0, 1).reshape(k.shape[1], -1)


def _best_rank(mat, r):
    U, S, Vh = torch.linalg.svd(mat.double(), full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def _factor_pair(out, T, H, d, r):
    u, sv = _pair(out, "factorise", f"u [T, r] = [{T}, {r}] and sv [r, H*d] = [{r}, {H * d}]")
    for x, what in ((u, "u"), (sv, "sv")):
        if not isinstance(x, torch.Tensor):
            raise NotYet(f"{what} should be a tensor, got {_describe(x)}")
    if u.dim() == 3:
        raise NotYet(
            f"u has shape {list(u.shape)}: you factorised each head on its own; ShadowKV's SVD is over all KV "
            "heads at once, their keys side by side as one [T, H*d] matrix, one basis shared by all heads "
            '(PAPER.md "ShadowKV, precisely")'
        )
    if tuple(u.shape) != (T, r) or tuple(sv.shape) != (r, H * d):
        if u.shape[0] == T and sv.shape[-1] == H * d and u.shape[1] == sv.shape[0] != r:
            raise NotYet(
                f"rank {u.shape[1]} instead of {r}: keep only the first r columns of U and rows of S.Vh"
            )
        raise NotYet(
            f"u should be [T, r] = [{T}, {r}] and sv [r, H*d] = [{r}, {H * d}]; got u {list(u.shape)}, "
            f"sv {list(sv.shape)}"
        )
    return u, sv


@_check
def check_factorise(fn):
    case = real_case()
    H, d, T = case.H, case.d, 48
    pre, top, low = _rank_probe(case, T)
    pos = torch.arange(T)
    # 1. without RoPE: the SVD of all heads side by side, its largest singular value kept
    u, sv = _factor_pair(fn(pre, _NoRope(), 1), T, H, d, 1)
    _compare(
        u.double() @ sv.double(),
        top,
        "hand-made keys (RoPE left out), rank 1: u @ sv must be the best rank-1 approximation "
        "of the keys as a [T, H*d] matrix",
        [
            (
                "S.Vh without S: sv is S.Vh, the singular values multiplied into the rows of Vh "
                "(S[:r, None] * Vh[:r])",
                top / 10,
            ),
            (
                "kept the smallest singular values: torch.linalg.svd sorts them in descending order, keep the "
                "FIRST r",
                low,
            ),
            (
                "rows mix tokens and heads: k is [H, T, d]; k.reshape(T, H*d) reads it in memory order, so a "
                "row is not a token. Transpose to [T, H, d] first (k.transpose(0, 1).reshape(T, H*d))",
                lambda: _best_rank(pre.reshape(T, H * d), 1),
            ),
        ],
    )
    # 2. with the model's RoPE: the SVD is of the keys BEFORE RoPE
    post = case.rope.apply(pre, pos)
    u, sv = _factor_pair(fn(post, case.rope, 1), T, H, d, 1)
    _compare(
        u.double() @ sv.double(),
        top,
        "the same keys rotated by the model's RoPE, rank 1",
        [
            (
                "keys not un-RoPE'd before the SVD: ShadowKV factorises the PRE-RoPE keys, which are far "
                'closer to low rank (PAPER.md "ShadowKV, precisely"): rope.invert(k, torch.arange(T)) first',
                lambda: _best_rank(_as_matrix(post), 1),
            ),
            (
                "u @ sv must rebuild the PRE-RoPE keys: RoPE is applied when the selected rows are rebuilt "
                "(the next exercise), not here",
                lambda: _as_matrix(case.rope.apply(top.view(T, H, d).transpose(0, 1), pos)),
            ),
            (
                "rope.apply instead of rope.invert: apply rotates the keys further; invert undoes RoPE",
                lambda: _best_rank(_as_matrix(case.rope.apply(post, pos)), 1),
            ),
        ],
    )
    # 3. the real keys, against kvcache.LowRankKeys.build, at ShadowKV's share of the channels
    r = round(0.15625 * H * d)
    for layer in case.layers:
        k = case.k[layer]
        u, sv = _factor_pair(fn(k, case.rope, r), case.T, H, d, r)
        ru, rsv = ref_factorise(k, case.rope, r)
        _compare(
            u.double() @ sv.double(),
            ru.double() @ rsv.double(),
            f"real keys of layer {layer} at rank {r}: u @ sv against kvcache.LowRankKeys.build's",
            tol=1e-3,
        )
    return (
        f"your rank-{r} factors rebuild the same pre-RoPE keys as kvcache.LowRankKeys.build on the real keys of "
        f"layers {list(case.layers)}"
    )


@_check
def check_rebuild(fn):
    case = real_case()
    H, d, T, r = case.H, case.d, 48, 4
    gen = _gen(8)
    u, sv = torch.randn(T, r, generator=gen), torch.randn(r, H * d, generator=gen)
    rows = torch.stack([torch.randperm(T, generator=gen)[:5] for _ in range(H)])  # [H, 5]
    S = rows.shape[1]
    per_head = sv.view(r, H, d).permute(1, 0, 2)  # [H, r, d] head h's columns of sv
    pre = u[rows] @ per_head  # [H, S, d] the pre-RoPE keys of the rows
    # 1. without RoPE: head h's rows of u, times head h's columns of sv
    out = _tensor(fn(u, sv, rows, _NoRope()), "rebuild", (H, S, d), "[H, S, d]")
    _compare(
        out,
        pre,
        "hand-made factors (RoPE left out)",
        [
            (
                "head h's channels are columns h*d .. (h+1)*d - 1 of sv: sv.view(r, H, d)[:, h] (or "
                "sv[:, h*d:(h+1)*d]), not sv.view(H, r, d)[h]",
                u[rows] @ sv.view(H, r, d),
            ),
            (
                "each KV head rebuilds its own rows: rows[h] for head h, not rows[0] for all",
                u[rows[0]] @ per_head,
            ),
        ],
    )
    # 2. with the model's RoPE: each rebuilt key rotated to its own position
    rope = case.rope
    flat = lambda x: x.reshape(1, H * S, d)  # noqa: E731
    want = rope.apply(flat(pre), rows.flatten()).view(H, S, d)
    _compare(
        fn(u, sv, rows, rope),
        want,
        "hand-made factors, the model's RoPE",
        [
            (
                "rebuilt keys not re-RoPE'd: rotate each to its position with rope.apply; attention compares "
                'them with post-RoPE queries (PAPER.md "ShadowKV, precisely", decode step 2)',
                pre,
            ),
            (
                "RoPE'd at positions 0 .. S-1: rotate row i of head h to its own prompt position rows[h, i]",
                rope.apply(pre, torch.arange(S)),
            ),
            (
                "rope.invert instead of rope.apply: the factors hold pre-RoPE keys, which need the rotation",
                rope.invert(flat(pre), rows.flatten()).view(H, S, d),
            ),
            (
                "every head rotated to head 0's positions: row i of head h sits at rows[h, i]",
                rope.apply(pre, rows[0]),
            ),
        ],
    )
    # 3. the real factors, the tokens exact selection picks, against kvcache.LowRankKeys.selected
    rank = round(0.15625 * H * d)
    errors = []
    for layer in case.layers:
        ru, rsv = ref_factorise(case.k[layer], rope, rank)
        rows = _oracle_rows(case, layer, _budget(case))
        want = ref_rebuild(ru, rsv, rows, rope)
        _compare(
            fn(ru, rsv, rows, rope),
            want,
            f"real factors of layer {layer}, the {rows.shape[1]} tokens per head exact selection picks",
        )
        exact = case.k[layer].gather(1, rows[..., None].expand(-1, -1, d))
        errors.append(((want - exact).pow(2).sum() / exact.pow(2).sum()).item())
    return (
        "your rebuilt keys equal kvcache.LowRankKeys.selected on the real keys; at rank "
        f"{rank} the {_budget(case)} tokens per head that exact selection picks come back with a relative "
        f"squared error of {', '.join(f'{e:.3f}' for e in errors)} (layers {list(case.layers)})"
    )


# ---------------------------------------------------------------------------------------------------
# Exercise 6: attention in two parts, merged by their log-sum-exps
# ---------------------------------------------------------------------------------------------------


@_check
def check_attention_lse(fn):
    gen = _gen(9)
    H, Q, L, d = 2, 3, 5, 16
    q, k, v = (torch.randn(H, n, d, generator=gen) for n in (Q, L, L))
    res = fn(q, k, v)
    if isinstance(res, torch.Tensor):
        raise NotYet("attention_lse should return two tensors, (out, lse); got one tensor")
    out, lse = _pair(res, "attention_lse", "out [H, Q, d] and lse [H, Q]")
    _tensor(out, "attention_lse's out", (H, Q, d), "[H, Q, d]")
    _tensor(
        lse,
        "attention_lse's lse",
        (H, Q),
        "[H, Q]",
        shapes=[((H, Q, 1), "one log-sum-exp per head and query: drop the last axis (keepdim=False)")],
    )
    raw = q.double() @ k.double().transpose(1, 2)  # [H, Q, L]
    s = raw / math.sqrt(d)
    _compare(
        out,
        s.softmax(-1) @ v.double(),
        "random q, k, v: out = softmax(q.k / sqrt(d)) @ v",
        [
            (
                "scores not scaled by 1/sqrt(d): attention's scores are q.k / sqrt(d)",
                raw.softmax(-1) @ v.double(),
            ),
            ("softmax over the queries instead of over the keys (the last axis)", s.softmax(1) @ v.double()),
        ],
    )
    _compare(
        lse,
        s.logsumexp(-1),
        "random q, k, v: lse = log(sum(exp(q.k / sqrt(d)))) over the keys",
        [
            (
                "lse without the 1/sqrt(d): the log-sum-exp of the SAME scores the softmax used",
                raw.logsumexp(-1),
            ),
            (
                "the log-sum-exp of the probabilities, not of the scores (the probabilities sum to 1: log 1 = 0)",
                torch.zeros(H, Q, dtype=torch.float64),
            ),
            ("the sum of exp without the log: lse is its log", s.exp().sum(-1)),
            ("the largest score is not the log-sum-exp: log(sum(exp(scores)))", s.amax(-1)),
        ],
    )
    qb = 40 * q  # scores in the hundreds: exp overflows float32 above ~88
    sb = (qb.double() @ k.double().transpose(1, 2)) / math.sqrt(d)
    got_out, got_lse = _pair(fn(qb, k, v), "attention_lse", "(out, lse)")
    overflow = (
        "overflow: exp of a large score is inf in float32: use torch.logsumexp (and a softmax), which "
        "subtract the largest score first",
        None,
    )
    _compare(got_lse, sb.logsumexp(-1), "large scores (q x 40)", [overflow])
    _compare(got_out, sb.softmax(-1) @ v.double(), "large scores (q x 40)", [overflow])
    case = real_case()
    for layer in case.layers:
        qr = case.q[layer].reshape(case.H, -1, case.d)  # [H, G*A, d]
        want_out, want_lse = ref_attention_lse(qr, case.k[layer], case.v[layer])
        got_out, got_lse = _pair(fn(qr, case.k[layer], case.v[layer]), "attention_lse", "(out, lse)")
        _compare(got_out, want_out, f"real queries of layer {layer} over the whole prompt: out")
        _compare(got_lse, want_lse, f"real queries of layer {layer} over the whole prompt: lse")
    return f"your attention and log-sum-exp equal kvcache.attention_lse on the real K/V of layers {list(case.layers)}"


@_check
def check_merge(fn):
    gen = _gen(10)
    H, Q, d = 2, 3, 4
    a, b = torch.randn(H, Q, d, generator=gen), torch.randn(H, Q, d, generator=gen)
    full = lambda x: torch.full((H, Q), x)  # noqa: E731
    out = _tensor(fn(a, full(0.7), b, full(0.7)), "merge", (H, Q, d), "[H, Q, d]")
    _compare(
        out,
        (a + b) / 2,
        "two parts with equal softmax sums (lse_a = lse_b): the merge is their average",
        [
            ("only out_a: both parts count, each by its share of the softmax sum", a),
            ("only out_b: both parts count, each by its share of the softmax sum", b),
            (
                "not normalised: divide by the total exp(lse_a) + exp(lse_b) (the weights sum to 1)",
                math.exp(0.7) * (a + b),
            ),
            ("the sum of the parts: weight each by its share (they sum to 1)", a + b),
        ],
    )
    la, lb = math.log(6.0), math.log(2.0)  # part a holds 3/4 of the softmax sum
    _compare(
        fn(a, full(la), b, full(lb)),
        0.75 * a + 0.25 * b,
        "lse_a = log 6, lse_b = log 2: part a holds 3/4 of the softmax sum",
        [
            (
                "plain average of the two parts: weight each by its share of the softmax sum, "
                "exp(lse_a) / (exp(lse_a) + exp(lse_b))",
                (a + b) / 2,
            ),
            (
                "weights swapped: out_a's weight is exp(lse_a) / (exp(lse_a) + exp(lse_b))",
                0.25 * a + 0.75 * b,
            ),
            (
                "weights from the log-sum-exps themselves: an lse is a log; a part's softmax sum is exp(lse)",
                (la * a + lb * b) / (la + lb),
            ),
            ("not normalised: divide by exp(lse_a) + exp(lse_b)", 6 * a + 2 * b),
        ],
    )
    lse_a = torch.tensor([[1000.0, -1000.0, 0.0], [500.0, -500.0, 80.0]])
    lse_b = lse_a - 1
    w = torch.sigmoid(lse_a - lse_b)[..., None]
    _compare(
        fn(a, lse_a, b, lse_b),
        w * a + (1 - w) * b,
        "large log-sum-exps (+-1000, as long prompts give)",
        [
            (
                "overflow: exp(1000) is inf (and exp(-1000) is 0) in float32: weight by "
                "torch.sigmoid(lse_a - lse_b), or subtract the larger lse before the exp",
                None,
            )
        ],
    )
    case = real_case()
    worst = 0.0
    for layer in case.layers:
        qr = case.q[layer].reshape(case.H, -1, case.d)  # [H, G*A, d]
        k, v = case.k[layer], case.v[layer]
        rows = _oracle_rows(case, layer, _budget(case))  # [H, S] middle tokens exact selection picks
        take = lambda x: x.gather(1, rows[..., None].expand(-1, -1, case.d))  # noqa: E731
        out_a, lse_a = ref_attention_lse(qr, k[:, -case.local :], v[:, -case.local :])  # the local window
        out_b, lse_b = ref_attention_lse(qr, take(k), take(v))  # the selected tokens
        got = fn(out_a, lse_a, out_b, lse_b)
        _compare(
            got,
            ref_merge(out_a, lse_a, out_b, lse_b),
            f"real layer {layer}: the local window's attention merged with the selected tokens'",
        )
        both, _ = ref_attention_lse(
            qr, torch.cat([k[:, -case.local :], take(k)], 1), torch.cat([v[:, -case.local :], take(v)], 1)
        )
        worst = max(worst, (got - both).abs().max().item())
    return (
        f"your merge equals kvcache.merge_attention on the real K/V of layers {list(case.layers)}, and "
        f"merging the local window ({case.local} tokens) with the {_budget(case)} selected tokens equals "
        f"attention over both at once (largest difference {worst:.1e})"
    )


# ---------------------------------------------------------------------------------------------------
# Exercise 4: HIGGS
# ---------------------------------------------------------------------------------------------------


def _higgs_probe():
    """Rows of 64 channels with an outlier channel (as real keys have), scaled differently per row."""
    gen = _gen(11)
    x = torch.randn(6, 64, generator=gen)
    x[:, 5] *= 12
    return x * torch.tensor([0.5, 1, 2, 4, 8, 30])[:, None]


def _codes_of(y, grid, pieces="consecutive", nearest=True):
    """Nearest (or farthest) grid point of each piece of y [M, C]: the catalogue of HIGGS mistakes."""
    M, C = y.shape
    g = grid.shape[1]
    p = y.view(M, C // g, g) if pieces == "consecutive" else y.view(M, g, C // g).transpose(1, 2)
    dist = torch.cdist(p.reshape(-1, g).double(), grid.double())  # [M*C/g, n]
    idx = dist.argmin(1) if nearest else dist.argmax(1)
    return idx.view(M, C // g)


def _agreement(got, want) -> float:
    return (got == want).double().mean().item()


@_check
def check_higgs_quantize(fn):
    grid = higgs_grid()
    x = _higgs_probe()
    M, C = x.shape
    g = grid.shape[1]
    res = fn(x, grid)
    if isinstance(res, torch.Tensor):
        raise NotYet("higgs_quantize should return two tensors, (codes, scales); got one tensor")
    codes, scales = _pair(res, "higgs_quantize", f"codes [M, C/{g}] and scales [M]")
    _tensor(
        scales,
        "higgs_quantize's scales",
        (M,),
        "[M]",
        shapes=[((M, 1), "one scale per row: [M], not [M, 1]")],
    )
    _tensor(
        codes,
        "higgs_quantize's codes",
        (M, C // g),
        f"[M, C/{g}]",
        shapes=[((M, C), f"one code per piece of {g} values")],
    )
    if codes.is_floating_point():
        raise NotYet("codes are indices of grid points: an integer tensor (argmin returns int64)")
    norm = x.double().norm(dim=1)
    wrong_scales = [
        (
            "the scale is the row's L2 norm itself; the sqrt(C) goes into the normalisation, not the scale",
            norm / math.sqrt(C),
        ),
        (
            "store the norm, not its inverse (the normalisation multiplies by sqrt(C) / norm)",
            math.sqrt(C) / norm,
        ),
        ("the scale is the row's L2 norm, not its largest |value|", x.double().abs().amax(1)),
        ("the scale is the L2 norm, not its square", norm**2),
    ]
    _compare(
        scales,
        norm,
        'scales of hand-made rows: each row\'s L2 norm (PAPER.md "HIGGS")',
        wrong_scales,
        0,
        1e-3,
    )
    want, _ = ref_higgs_quantize(x, grid)
    s16 = x.norm(dim=1).half().float()[:, None]  # the stored fp16 scale
    rotated = quantize.hadamard(x)
    if _agreement(codes, want) < 0.95:
        catalogue = [
            (
                "no Hadamard rotation: rotate each row (quantize.hadamard) before rounding, so an outlier "
                'channel is spread over all channels and the entries are close to N(0, 1) (PAPER.md "HIGGS")',
                _codes_of(x / s16 * math.sqrt(C), grid),
            ),
            (
                "divided by the norm only: after the rotation the entries have variance norm^2 / C, so "
                "multiply by sqrt(C) / norm to make them N(0, 1), the distribution the grid was fitted to",
                _codes_of(rotated / s16, grid),
            ),
            (
                "not scaled: divide by the row's norm and multiply by sqrt(C) before rounding, so the entries "
                "are N(0, 1) like the grid",
                _codes_of(rotated, grid),
            ),
            (
                f"strided pieces: a piece is {g} CONSECUTIVE values of the rotated row, "
                f"y.view(M, C // {g}, {g})",
                _codes_of(rotated / s16 * math.sqrt(C), grid, pieces="strided"),
            ),
            (
                "the farthest grid point: a code is the index of the NEAREST point (argmin of the distance)",
                _codes_of(rotated / s16 * math.sqrt(C), grid, nearest=False),
            ),
        ]
        for hint, wrong in catalogue:
            if _agreement(codes, wrong) >= 0.95:
                raise NotYet(f"codes of hand-made rows: {hint}")
        raise NotYet(
            f"codes of hand-made rows: only {_agreement(codes, want):.0%} agree with quantize.quantize; "
            f"first difference at {(codes != want).nonzero()[0].tolist()}"
        )
    case = real_case()
    shares = []
    for layer in case.layers:
        xr = case.k[layer].reshape(-1, case.d)  # [H*T, d] every key of the layer
        got_codes, got_scales = _pair(fn(xr, grid), "higgs_quantize", "(codes, scales)")
        want_codes, want_scales = ref_higgs_quantize(xr, grid)
        _compare(got_scales, want_scales, f"scales of the real keys of layer {layer}", (), 0, 1e-3)
        share = _agreement(got_codes, want_codes) if got_codes.shape == want_codes.shape else 0.0
        if share < 0.995:
            raise NotYet(
                f"codes of the real keys of layer {layer}: only {share:.1%} agree with quantize.quantize"
            )
        shares.append(share)
    if min(shares) == 1.0:
        return (
            f"your codes and scales equal quantize.quantize's on the real keys of layers {list(case.layers)}"
        )
    return (
        f"your codes agree with quantize.quantize on {min(shares):.2%} or more of the {g}-value pieces of the "
        f"real keys of layers {list(case.layers)} (the others sit about halfway between two grid points: "
        "the float16 rounding of the scale decides them)"
    )


@_check
def check_higgs_dequantize(fn):
    grid = higgs_grid()
    x = _higgs_probe()
    M, C = x.shape
    g = grid.shape[1]
    codes, scales = ref_higgs_quantize(x, grid)
    want = ref_higgs_dequantize(codes, scales, grid)
    out = _tensor(fn(codes, scales, grid), "higgs_dequantize", (M, C), "[M, C]")
    y = grid[codes].reshape(M, C).double()  # the grid points, in the rotated and normalised space
    s = scales.double()[:, None]
    _compare(
        out,
        want,
        "hand-made codes",
        [
            (
                "not rotated back: after scaling, apply the Hadamard transform again (it is its own inverse)",
                y * s / math.sqrt(C),
            ),
            (
                "multiplied by the norm only: the grid's entries are N(0, 1), so multiply by norm / sqrt(C)",
                quantize.hadamard(y * s),
            ),
            (
                "not scaled: multiply the grid points by norm / sqrt(C) before rotating back",
                quantize.hadamard(y),
            ),
            (
                "scaled by sqrt(C) / norm: that is the quantizer's normalisation; undo it with norm / sqrt(C)",
                quantize.hadamard(y * math.sqrt(C) / s),
            ),
            (
                f"strided pieces: code i stands for values i*{g} .. i*{g} + {g - 1} of the rotated row",
                quantize.hadamard(grid[codes].transpose(1, 2).reshape(M, C).double() * s / math.sqrt(C)),
            ),
        ],
    )
    case = real_case()
    errors = []
    for layer in case.layers:
        xr = case.k[layer].reshape(-1, case.d)
        c, sc = ref_higgs_quantize(xr, grid)
        got = fn(c, sc, grid)
        _compare(got, ref_higgs_dequantize(c, sc, grid), f"codes of the real keys of layer {layer}")
        errors.append(((got - xr).pow(2).sum() / xr.pow(2).sum()).item())
    return (
        f"your dequantized keys equal quantize.dequantize; the 2-bit round trip of the real keys has a "
        f"relative squared error of {', '.join(f'{e:.3f}' for e in errors)} (layers {list(case.layers)}; "
        'PAPER.md "EDEN grids": 0.0964 per dimension for this grid on Gaussian data)'
    )
