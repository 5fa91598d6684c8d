"""The checks of lab 08, HIGGS by hand (08_lab_quantized_landmarks.ipynb): keys quantized to 2 bits, numbered
as the lab numbers its exercises:

1. check_higgs_quantize: rows to codes and scales (quantize.quantize);
2. check_higgs_dequantize: back to rows (quantize.dequantize).

How a check works, and the real K/V it ends on: checks_common.py.
"""

import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import quantize  # noqa: E402
from checks_common import (  # noqa: E402
    NotYet,
    check,
    compare,
    expect_pair,
    expect_tensor,
    real_case,
    seeded,
)

# ---------------------------------------------------------------------------------------------------
# The project's code, as each exercise's signature asks for it (the solutions, and the checks' reference)
# ---------------------------------------------------------------------------------------------------


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
# Exercise 1: quantize
# ---------------------------------------------------------------------------------------------------


def _higgs_probe():
    """Rows of 64 channels with an outlier channel (as real keys have), scaled differently per row."""
    gen = seeded(11)
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


@check
def check_higgs_quantize(fn):
    grid = higgs_grid()
    x = _higgs_probe()
    M, C = x.shape
    g = grid.shape[1]
    res = fn(x, grid)
    if isinstance(res, torch.Tensor):
        raise NotYet("higgs_quantize should return two tensors, (codes, scales); got one tensor")
    codes, scales = expect_pair(res, "higgs_quantize", f"codes [M, C/{g}] and scales [M]")
    expect_tensor(
        scales,
        "higgs_quantize's scales",
        (M,),
        "[M]",
        shapes=[((M, 1), "one scale per row: [M], not [M, 1]")],
    )
    expect_tensor(
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
    compare(
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
        got_codes, got_scales = expect_pair(fn(xr, grid), "higgs_quantize", "(codes, scales)")
        want_codes, want_scales = ref_higgs_quantize(xr, grid)
        compare(got_scales, want_scales, f"scales of the real keys of layer {layer}", (), 0, 1e-3)
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


# ---------------------------------------------------------------------------------------------------
# Exercise 2: dequantize
# ---------------------------------------------------------------------------------------------------


@check
def check_higgs_dequantize(fn):
    grid = higgs_grid()
    x = _higgs_probe()
    M, C = x.shape
    g = grid.shape[1]
    codes, scales = ref_higgs_quantize(x, grid)
    want = ref_higgs_dequantize(codes, scales, grid)
    out = expect_tensor(fn(codes, scales, grid), "higgs_dequantize", (M, C), "[M, C]")
    y = grid[codes].reshape(M, C).double()  # the grid points, in the rotated and normalised space
    s = scales.double()[:, None]
    compare(
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
        compare(got, ref_higgs_dequantize(c, sc, grid), f"codes of the real keys of layer {layer}")
        errors.append(((got - xr).pow(2).sum() / xr.pow(2).sum()).item())
    return (
        f"your dequantized keys equal quantize.dequantize; the 2-bit round trip of the real keys has a "
        f"relative squared error of {', '.join(f'{e:.3f}' for e in errors)} (layers {list(case.layers)}; "
        'PAPER.md "EDEN grids": 0.0964 per dimension for this grid on Gaussian data)'
    )
