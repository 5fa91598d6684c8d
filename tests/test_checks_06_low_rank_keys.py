"""The checks of lab 06, low-rank keys (notebooks/checks_06_low_rank_keys.py).

Each passes the project's own implementation and a written-out solution, and fails plausible wrong ones
with a hint that names the mistake: the tests every lab's checks pass (LabChecks, in
tests/test_checks_common.py), on this lab's solutions and mistakes.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "notebooks"))
import checks_06_low_rank_keys as checks  # noqa: E402
from test_checks_common import LabChecks  # noqa: E402

pytestmark = pytest.mark.slow  # the default model's prefill (~15 s on two busy cores), once per session


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


# (check, the mistake in words, the wrong function, what the hint must say)
WRONG = [
    # exercise 1: the factors
    ("factorise", "keys not un-RoPE'd before the SVD", lambda k, rope, r: truncated_svd(rows_of(k), r), "keys not un-RoPE'd before the SVD"),
    ("factorise", "heads concatenated by a plain reshape", lambda k, rope, r: truncated_svd(rope.invert(k, torch.arange(k.shape[1])).reshape(k.shape[1], -1), r), "rows mix tokens and heads"),
    ("factorise", "one SVD per head", lambda k, rope, r: torch.linalg.svd(rope.invert(k, torch.arange(k.shape[1])), full_matrices=False)[:2], "factorised each head on its own"),
    ("factorise", "S left out of sv", lambda k, rope, r: truncated_svd(rows_of(rope.invert(k, torch.arange(k.shape[1]))), r, keep_s=False), "S.Vh without S"),
    ("factorise", "the smallest singular values kept", lambda k, rope, r: truncated_svd(rows_of(rope.invert(k, torch.arange(k.shape[1]))), r, last=True), "kept the smallest singular values"),
    # exercise 2: rebuilding the selected keys
    ("rebuild", "rebuilt keys not re-RoPE'd", lambda u, sv, rows, rope: rebuild_pre(u, sv, rows), "not re-RoPE'd"),
    ("rebuild", "RoPE at positions 0..S-1", lambda u, sv, rows, rope: rope.apply(rebuild_pre(u, sv, rows), torch.arange(rows.shape[1])), "positions 0 .. S-1"),
    ("rebuild", "sv cut into heads the wrong way", lambda u, sv, rows, rope: rope_rows(rope, rebuild_pre(u, sv, rows, "wrong"), rows), "sv.view(r, H, d)"),
    ("rebuild", "rope.invert instead of rope.apply", lambda u, sv, rows, rope: rope.invert(rebuild_pre(u, sv, rows).reshape(1, -1, sv.shape[1] // rows.shape[0]), rows.flatten()).view(*rows.shape, -1), "rope.invert instead of rope.apply"),
]  # fmt: skip


# Correct solutions written out the way a student would (no project code): the checks must pass them
# too, not only the project's own functions (no check may insist on one way of writing the rule).


def factorise(k, rope, rank):
    H, T, d = k.shape
    pre = rope.invert(k, torch.arange(T)).permute(1, 0, 2).reshape(T, H * d)
    U, S, Vh = torch.linalg.svd(pre, full_matrices=False)
    return U[:, :rank] * S[:rank].sqrt(), S[:rank, None].sqrt() * Vh[:rank]  # S split between the two


def rebuild(u, sv, rows, rope):
    H, S = rows.shape
    d = sv.shape[1] // H
    return torch.stack([rope.apply(u[rows[h]] @ sv[:, h * d : (h + 1) * d], rows[h]) for h in range(H)])


class TestLab06Checks(LabChecks):
    module = checks
    solutions = {"factorise": checks.ref_factorise, "rebuild": checks.ref_rebuild}
    written = {"factorise": factorise, "rebuild": rebuild}
    wrong = WRONG
