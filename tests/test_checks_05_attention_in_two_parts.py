"""The checks of lab 05, attention in two parts (notebooks/checks_05_attention_in_two_parts.py).

Each passes the project's own implementation and a written-out solution, and fails plausible wrong ones
with a hint that names the mistake: the tests every lab's checks pass (LabChecks, in
tests/test_checks_common.py), on this lab's solutions and mistakes.
"""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "notebooks"))
import checks_05_attention_in_two_parts as checks  # noqa: E402
from test_checks_common import LabChecks  # noqa: E402

pytestmark = pytest.mark.slow  # the default model's prefill (~15 s on two busy cores), once per session


def attention_parts(q, k, v, scale=True, stable=True):
    s = q @ k.transpose(1, 2) / (math.sqrt(q.shape[-1]) if scale else 1.0)
    if stable:
        return s.softmax(-1) @ v, s.logsumexp(-1)
    e = s.exp()
    return (e / e.sum(-1, keepdim=True)) @ v, e.sum(-1).log()


# (check, the mistake in words, the wrong function, what the hint must say)
WRONG = [
    # exercise 1: attention and its log-sum-exp
    ("attention_lse", "no 1/sqrt(d)", lambda q, k, v: attention_parts(q, k, v, scale=False), "not scaled by 1/sqrt(d)"),
    ("attention_lse", "exp of raw scores", lambda q, k, v: attention_parts(q, k, v, stable=False), "overflow"),
    ("attention_lse", "log-sum-exp of the probabilities", lambda q, k, v: (attention_parts(q, k, v)[0], attention_parts(q, k, v)[0].new_zeros(q.shape[:2]) + (q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).softmax(-1).sum(-1).log()), "of the probabilities"),
    # exercise 2: merging two parts
    ("merge", "plain average", lambda a, la, b, lb: (a + b) / 2, "plain average"),
    ("merge", "weights swapped", lambda a, la, b, lb: torch.lerp(a, b, torch.sigmoid(la - lb)[..., None]), "weights swapped"),
    ("merge", "exp of the log-sum-exps", lambda a, la, b, lb: (la.exp()[..., None] * a + lb.exp()[..., None] * b) / (la.exp() + lb.exp())[..., None], "overflow"),
    ("merge", "weights from the log-sum-exps themselves", lambda a, la, b, lb: (la[..., None] * a + lb[..., None] * b) / (la + lb)[..., None], "weights from the log-sum-exps themselves"),
]  # fmt: skip


# Correct solutions written out the way a student would (no project code): the checks must pass them
# too, not only the project's own functions (no check may insist on one way of writing the rule).


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


class TestLab05Checks(LabChecks):
    module = checks
    solutions = {"attention_lse": checks.ref_attention_lse, "merge": checks.ref_merge}
    written = {"attention_lse": attention_lse, "merge": merge}
    wrong = WRONG
