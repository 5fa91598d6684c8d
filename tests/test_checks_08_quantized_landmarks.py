"""The checks of lab 08, HIGGS by hand (notebooks/checks_08_quantized_landmarks.py).

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
import checks_08_quantized_landmarks as checks  # noqa: E402
from test_checks_common import LabChecks  # noqa: E402

pytestmark = pytest.mark.slow  # the default model's prefill (~15 s on two busy cores), once per session


def higgs_codes(x, grid, rotate=True, times_sqrt_c=True):
    M, C = x.shape
    norm = x.norm(dim=1, keepdim=True)
    y = checks.quantize.hadamard(x) if rotate else x
    y = y / norm * (math.sqrt(C) if times_sqrt_c else 1.0)
    pieces = y.reshape(-1, grid.shape[1])
    return torch.cdist(pieces, grid).argmin(1).view(M, -1), norm[:, 0]


# (check, the mistake in words, the wrong function, what the hint must say)
WRONG = [
    # exercise 1: quantize
    ("higgs_quantize", "no Hadamard rotation", lambda x, g: higgs_codes(x, g, rotate=False), "no Hadamard rotation"),
    ("higgs_quantize", "divided by the norm, no sqrt(C)", lambda x, g: higgs_codes(x, g, times_sqrt_c=False), "divided by the norm only"),
    ("higgs_quantize", "norm / sqrt(C) as the scale", lambda x, g: (higgs_codes(x, g)[0], x.norm(dim=1) / math.sqrt(x.shape[1])), "the sqrt(C) goes into the normalisation"),
    # exercise 2: dequantize
    ("higgs_dequantize", "not rotated back", lambda c, s, g: g[c].reshape(c.shape[0], -1) * s[:, None] / math.sqrt(c.shape[1] * g.shape[1]), "not rotated back"),
    ("higgs_dequantize", "multiplied by the norm only", lambda c, s, g: checks.quantize.hadamard(g[c].reshape(c.shape[0], -1) * s[:, None]), "multiplied by the norm only"),
]  # fmt: skip


# Correct solutions written out the way a student would (no project code): the checks must pass them
# too, not only the project's own functions (no check may insist on one way of writing the rule).


def higgs_quantize(x, grid):
    M, C = x.shape
    scales = x.norm(dim=1)  # float32: the check accepts it, not only the float16 the project stores
    y = checks.quantize.hadamard(x) / scales[:, None] * math.sqrt(C)
    codes = torch.cdist(y.reshape(-1, grid.shape[1]), grid).argmin(-1)
    return codes.view(M, -1), scales


def higgs_dequantize(codes, scales, grid):
    y = grid[codes].reshape(codes.shape[0], -1)
    return checks.quantize.hadamard(y * scales[:, None] / math.sqrt(y.shape[1]))


class TestLab08Checks(LabChecks):
    module = checks
    solutions = {"higgs_quantize": checks.ref_higgs_quantize, "higgs_dequantize": checks.ref_higgs_dequantize}
    written = {"higgs_quantize": higgs_quantize, "higgs_dequantize": higgs_dequantize}
    wrong = WRONG
