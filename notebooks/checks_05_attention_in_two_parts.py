"""The checks of lab 05, attention in two parts (05_lab_attention_in_two_parts.ipynb), numbered as the lab
numbers its exercises:

1. check_attention_lse: attention over one set of keys and the log-sum-exp of its scores
   (kvcache.attention_lse);
2. check_merge: two parts' outputs merged by their log-sum-exps into the attention over both
   (kvcache.merge_attention).

How a check works, and the real K/V it ends on: checks_common.py.
"""

import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import kvcache  # noqa: E402
from checks_common import (  # noqa: E402
    NotYet,
    budget,
    check,
    compare,
    expect_pair,
    expect_tensor,
    oracle_rows,
    real_case,
    seeded,
)

# ---------------------------------------------------------------------------------------------------
# The project's code, as each exercise's signature asks for it (the solutions, and the checks' reference)
# ---------------------------------------------------------------------------------------------------


def ref_attention_lse(q, k, v):
    return kvcache.attention_lse(q, k, v)


def ref_merge(out_a, lse_a, out_b, lse_b):
    return kvcache.merge_attention(out_a, lse_a, out_b, lse_b)


# ---------------------------------------------------------------------------------------------------
# Exercise 1: attention, and the log-sum-exp of its scores
# ---------------------------------------------------------------------------------------------------


@check
def check_attention_lse(fn):
    gen = seeded(9)
    H, Q, L, d = 2, 3, 5, 16
    q, k, v = (torch.randn(H, n, d, generator=gen) for n in (Q, L, L))
    res = fn(q, k, v)
    if isinstance(res, torch.Tensor):
        raise NotYet("attention_lse should return two tensors, (out, lse); got one tensor")
    out, lse = expect_pair(res, "attention_lse", "out [H, Q, d] and lse [H, Q]")
    expect_tensor(out, "attention_lse's out", (H, Q, d), "[H, Q, d]")
    expect_tensor(
        lse,
        "attention_lse's lse",
        (H, Q),
        "[H, Q]",
        shapes=[((H, Q, 1), "one log-sum-exp per head and query: drop the last axis (keepdim=False)")],
    )
    raw = q.double() @ k.double().transpose(1, 2)  # [H, Q, L]
    s = raw / math.sqrt(d)
    compare(
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
    compare(
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
    got_out, got_lse = expect_pair(fn(qb, k, v), "attention_lse", "(out, lse)")
    overflow = (
        "overflow: exp of a large score is inf in float32: use torch.logsumexp (and a softmax), which "
        "subtract the largest score first",
        None,
    )
    compare(got_lse, sb.logsumexp(-1), "large scores (q x 40)", [overflow])
    compare(got_out, sb.softmax(-1) @ v.double(), "large scores (q x 40)", [overflow])
    case = real_case()
    for layer in case.layers:
        qr = case.q[layer].reshape(case.H, -1, case.d)  # [H, G*A, d]
        want_out, want_lse = ref_attention_lse(qr, case.k[layer], case.v[layer])
        got_out, got_lse = expect_pair(fn(qr, case.k[layer], case.v[layer]), "attention_lse", "(out, lse)")
        compare(got_out, want_out, f"real queries of layer {layer} over the whole prompt: out")
        compare(got_lse, want_lse, f"real queries of layer {layer} over the whole prompt: lse")
    return f"your attention and log-sum-exp equal kvcache.attention_lse on the real K/V of layers {list(case.layers)}"


# ---------------------------------------------------------------------------------------------------
# Exercise 2: merging two parts
# ---------------------------------------------------------------------------------------------------


@check
def check_merge(fn):
    gen = seeded(10)
    H, Q, d = 2, 3, 4
    a, b = torch.randn(H, Q, d, generator=gen), torch.randn(H, Q, d, generator=gen)
    full = lambda x: torch.full((H, Q), x)  # noqa: E731
    out = expect_tensor(fn(a, full(0.7), b, full(0.7)), "merge", (H, Q, d), "[H, Q, d]")
    compare(
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
    compare(
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
    compare(
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
        rows = oracle_rows(case, layer, budget(case))  # [H, S] middle tokens exact selection picks
        take = lambda x: x.gather(1, rows[..., None].expand(-1, -1, case.d))  # noqa: E731
        out_a, lse_a = ref_attention_lse(qr, k[:, -case.local :], v[:, -case.local :])  # the local window
        out_b, lse_b = ref_attention_lse(qr, take(k), take(v))  # the selected tokens
        got = fn(out_a, lse_a, out_b, lse_b)
        compare(
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
        f"merging the local window ({case.local} tokens) with the {budget(case)} selected tokens equals "
        f"attention over both at once (largest difference {worst:.1e})"
    )
