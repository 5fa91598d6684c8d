"""The checks of lab 06, low-rank keys (06_lab_low_rank_keys.ipynb): ShadowKV's rank-r SVD of the pre-RoPE
keys, numbered as the lab numbers its exercises:

1. check_factorise: RoPE undone, one SVD over all KV heads, rank r kept (kvcache.LowRankKeys.build);
2. check_rebuild: the selected rows' keys rebuilt from the factors and RoPE'd again
   (kvcache.LowRankKeys.selected).

How a check works, and the real K/V it ends on: checks_common.py.
"""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import kvcache  # noqa: E402
from checks_common import (  # noqa: E402
    Case,
    NotYet,
    budget,
    check,
    compare,
    describe,
    expect_pair,
    expect_tensor,
    oracle_rows,
    real_case,
    seeded,
)
from policy import BudgetSplit  # noqa: E402

# ---------------------------------------------------------------------------------------------------
# The project's code, as each exercise's signature asks for it (the solutions, and the checks' reference)
# ---------------------------------------------------------------------------------------------------


def ref_factorise(k, rope, rank):
    low = kvcache.LowRankKeys.build(k, rope, rank)
    return low.u, low.sv


def ref_rebuild(u, sv, rows, rope):
    T, S = u.shape[0], rows.shape[1]
    split = BudgetSplit(prompt_len=T, sink=0, local=0, chunk=1, n_chunks=T, selected=S)
    return kvcache.LowRankKeys(u, sv).selected({}, rows, split, rope, u.dtype)


# ---------------------------------------------------------------------------------------------------
# Exercise 1: the factors
# ---------------------------------------------------------------------------------------------------


class _NoRope:
    """A RoPE that rotates nothing: a probe with it isolates the SVD from the rotation."""

    def apply(self, x, pos):
        return x.clone()

    def invert(self, x, pos):
        return x.clone()


def _rank_probe(case: Case, T=48):
    """Pre-RoPE keys [H, T, d] whose [T, H*d] matrix has the singular values 10, then 3 down to 0.5 (random
    orthonormal singular vectors): its best rank-1 approximation is the first term, its worst the last.
    Returns the keys and those two terms ([T, H*d] each)."""
    H, d = case.H, case.d
    gen = seeded(7)
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
    u, sv = expect_pair(out, "factorise", f"u [T, r] = [{T}, {r}] and sv [r, H*d] = [{r}, {H * d}]")
    for x, what in ((u, "u"), (sv, "sv")):
        if not isinstance(x, torch.Tensor):
            raise NotYet(f"{what} should be a tensor, got {describe(x)}")
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


@check
def check_factorise(fn):
    case = real_case()
    H, d, T = case.H, case.d, 48
    pre, top, low = _rank_probe(case, T)
    pos = torch.arange(T)
    # 1. without RoPE: the SVD of all heads side by side, its largest singular value kept
    u, sv = _factor_pair(fn(pre, _NoRope(), 1), T, H, d, 1)
    compare(
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
    compare(
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
        compare(
            u.double() @ sv.double(),
            ru.double() @ rsv.double(),
            f"real keys of layer {layer} at rank {r}: u @ sv against kvcache.LowRankKeys.build's",
            tol=1e-3,
        )
    return (
        f"your rank-{r} factors rebuild the same pre-RoPE keys as kvcache.LowRankKeys.build on the real keys of "
        f"layers {list(case.layers)}"
    )


# ---------------------------------------------------------------------------------------------------
# Exercise 2: rebuilding the selected keys
# ---------------------------------------------------------------------------------------------------


@check
def check_rebuild(fn):
    case = real_case()
    H, d, T, r = case.H, case.d, 48, 4
    gen = seeded(8)
    u, sv = torch.randn(T, r, generator=gen), torch.randn(r, H * d, generator=gen)
    rows = torch.stack([torch.randperm(T, generator=gen)[:5] for _ in range(H)])  # [H, 5]
    S = rows.shape[1]
    per_head = sv.view(r, H, d).permute(1, 0, 2)  # [H, r, d] head h's columns of sv
    pre = u[rows] @ per_head  # [H, S, d] the pre-RoPE keys of the rows
    # 1. without RoPE: head h's rows of u, times head h's columns of sv
    out = expect_tensor(fn(u, sv, rows, _NoRope()), "rebuild", (H, S, d), "[H, S, d]")
    compare(
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
    compare(
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
        rows = oracle_rows(case, layer, budget(case))
        want = ref_rebuild(ru, rsv, rows, rope)
        compare(
            fn(ru, rsv, rows, rope),
            want,
            f"real factors of layer {layer}, the {rows.shape[1]} tokens per head exact selection picks",
        )
        exact = case.k[layer].gather(1, rows[..., None].expand(-1, -1, d))
        errors.append(((want - exact).pow(2).sum() / exact.pow(2).sum()).item())
    return (
        "your rebuilt keys equal kvcache.LowRankKeys.selected on the real keys; at rank "
        f"{rank} the {budget(case)} tokens per head that exact selection picks come back with a relative "
        f"squared error of {', '.join(f'{e:.3f}' for e in errors)} (layers {list(case.layers)})"
    )
