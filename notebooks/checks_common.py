"""What the checks of the four labs share: the verdict, running the student's function, comparing, and
the default model's real K/V.

Each lab `NN_lab_X.ipynb` has its checks in `checks_NN_X.py` (`05_lab_attention_in_two_parts` in
`checks_05_attention_in_two_parts.py`, ...), numbered as the lab numbers its exercises. An exercise asks for
one or more small functions (each stub gives the signature and tensor shapes), and a check cell grades
each:

    checks.check_chunk_means(chunk_means)   # -> pass: ...   or   not yet: <the first difference, with a hint>

A check runs the student's function in steps, and stops at the first one that differs:
1. what it returns: a tensor (or a tuple) of the right shape and kind (`expect_tensor`, `expect_pair`);
2. hand-made cases, each built to isolate one rule of the mechanism (the 1/sqrt(d) scale, the axis of the
   softmax, the max over the GQA group, RoPE undone before the SVD, ...). When the answer differs, the
   check computes what the usual mistakes would have returned on that case (mean instead of max, wrong
   axis, RoPE not undone, ...); if the student's answer is one of them, the hint names that mistake,
   otherwise it gives the first element that differs (`compare`);
3. the default model's real K/V and queries (`real_case`), against the project's own implementation
   (`landmarks.py`, `kvcache.py`, `quantize.py`): the reference of every check is the project's code.

A check is a function `body(student)` made into one by `@check`: it returns a `Verdict`, true or false, and
one line (its repr, so a check cell shows it) that starts with "pass", "not yet" or "not done yet" (the stub
still raises NotImplementedError). An exception raised by the student's function is reported in one line
(its type, message and the line of the student's code where it happened), never as a traceback; so is a
result of another dtype (float16 where the project computes float32), and a function that runs for more
than TIME_LIMIT seconds in one check, which is stopped. When the default model cannot be loaded, a check
says "cannot check yet" and why, without blaming the student's function, and the labs' first cell
(`real_case()`) shows that one line too.
"""

import functools
import inspect
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

import lab  # noqa: E402
import landmarks  # noqa: E402
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


def check(body):
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


def expect_tensor(out, name: str, shape, dims: str, shapes=()):
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


def expect_pair(out, name: str, what: str):
    """out must be a tuple (or list) of two tensors."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        got = f"a {type(out).__name__}" + (f" of {len(out)}" if isinstance(out, (tuple, list)) else "")
        raise NotYet(f"{name} should return two tensors, {what}; got {got}")
    return out


def compare(got, want, step: str, mistakes=(), tol=TOL, rtol=0.0):
    """Raise NotYet unless got ≈ want. The hint is that of the first known mistake got matches: each a
    (hint, wrong answer) pair, the wrong answer a tensor, a function computing it, or None for "inf or nan
    where want is finite" (an overflow); else the first element that differs."""
    if _close(got, want, tol, rtol):
        return
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(want.shape):
        raise NotYet(f"{step}: expected a tensor of shape {list(want.shape)}, got {describe(got)}")
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


def describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {list(x.shape)}"
    return f"a {type(x).__name__}"


def seeded(seed: int) -> torch.Generator:
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


def oracle_rows(case: Case, layer: int, k: int, steps=slice(0, 1)):
    """The k middle tokens per KV head that exact selection picks for the first answer step: [H, k]."""
    scores = landmarks.score(case.q[layer][:, :, steps], landmarks.TokenKeys(case.middle(layer)))
    return landmarks.select_topk(scores, k)


def budget(case: Case) -> int:
    """The tokens per KV head a policy selects on the case's prompt."""
    return int(0.03125 * case.T)  # the paper's 3.125% of the prompt
