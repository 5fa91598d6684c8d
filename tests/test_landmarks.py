"""Tests for landmarks.py: chunk landmarks, ShadowKV scoring (exact and quantized landmarks), top-k."""

import math

import pytest
import torch

import landmarks as L
import quantize as Q


def gaussian(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- landmarks and scoring ---------------------------------------------------------------------------


def test_chunk_landmarks_chunk1_is_the_keys():
    k = gaussian(3, 16, 8)
    lm, min_cos = L.chunk_landmarks(k, 1)
    assert torch.equal(lm, k)
    assert torch.allclose(min_cos, torch.ones(3, 16))


def test_chunk_landmarks_hand_case():
    # head 0: chunk 0 = (1,0),(1,0),(1,0),(0,1): mean (.75,.25), worst key (0,1): cos = .25 / sqrt(.625)
    #         chunk 1 = four copies of (0,2): mean (0,2), cos 1
    k = torch.tensor([[[1.0, 0], [1, 0], [1, 0], [0, 1], [0, 2], [0, 2], [0, 2], [0, 2]]])  # [1, 8, 2]
    lm, min_cos = L.chunk_landmarks(k, 4)
    assert torch.allclose(lm, torch.tensor([[[0.75, 0.25], [0.0, 2.0]]]))
    assert torch.allclose(min_cos, torch.tensor([[0.25 / math.sqrt(0.625), 1.0]]), atol=1e-6)
    # chunk of opposite keys: mean 0 -> cos 0 (no nan)
    lm, min_cos = L.chunk_landmarks(torch.tensor([[[1.0, 0], [-1.0, 0]]]), 2)
    assert torch.equal(lm, torch.zeros(1, 1, 2)) and min_cos.item() == 0.0


def test_chunk_landmarks_means_and_errors():
    k = gaussian(2, 24, 16).to(torch.bfloat16)
    lm, min_cos = L.chunk_landmarks(k, 8)
    assert lm.dtype == torch.bfloat16 and lm.shape == (2, 3, 16) and min_cos.shape == (2, 3)
    assert torch.allclose(lm.float(), k.float().view(2, 3, 8, 16).mean(2), atol=1e-2)
    assert (min_cos <= 1 + 1e-6).all() and (min_cos >= -1).all()
    with pytest.raises(ValueError, match="multiple of chunk"):
        L.chunk_landmarks(k, 5)


def test_score_hand_computation():
    # one KV head, G = 2 query heads, Tq = 2 positions, d = 4, N = 2 landmarks
    lm = torch.tensor([[[2.0, 0, 0, 0], [0, 2.0, 0, 0]]])  # [1, 2, 4]
    q = torch.tensor(
        [
            [
                [[1.0, 0, 0, 0], [0, 0, 0, 0]],  # head 0: pos 0 likes landmark 0; pos 1 indifferent
                [[0, 3.0, 0, 0], [0, 3.0, 0, 0]],
            ]
        ]
    )  # head 1: likes landmark 1 twice
    # q.L / sqrt(4): head 0 pos 0 -> (1, 0); pos 1 -> (0, 0); head 1 -> (0, 3) twice
    s = lambda a, b: math.exp(a) / (math.exp(a) + math.exp(b))
    head0 = [s(1, 0) + 0.5, s(0, 1) + 0.5]
    head1 = [2 * s(0, 3), 2 * s(3, 0)]
    expect = torch.tensor([[max(head0[0], head1[0]), max(head0[1], head1[1])]])
    got = L.score(q, L.TokenKeys(lm))
    assert got.dtype == torch.float32 and got.shape == (1, 2)
    assert torch.allclose(got, expect, atol=1e-6)


def test_score_gqa_max_and_reference():
    q = gaussian(3, 4, 5, 16, seed=1)
    lm = gaussian(3, 40, 16, seed=2)
    per_head = torch.stack([L.score(q[:, g : g + 1], L.TokenKeys(lm)) for g in range(4)])  # [4, 3, 40]
    assert torch.allclose(L.score(q, L.TokenKeys(lm)), per_head.amax(0))
    # explicit loops over heads and positions
    ref = torch.zeros(3, 40)
    for h in range(3):
        for g in range(4):
            acc = torch.zeros(40)
            for t in range(5):
                acc += torch.softmax(lm[h] @ q[h, g, t] / 4.0, dim=0)
            ref[h] = torch.maximum(ref[h], acc)
    assert torch.allclose(L.score(q, L.TokenKeys(lm)), ref, atol=1e-5)
    with pytest.raises(ValueError, match="do not match"):
        L.score(q, L.TokenKeys(lm[:2]))


def test_select_topk_sorted_and_ties():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.5, 0.1], [0.0, 0.0, 0.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4, 0.5]])
    assert L.select_topk(scores, 2).tolist() == [[0, 1], [0, 1], [3, 4]]
    assert L.select_topk(scores, 3).tolist() == [[0, 1, 2], [0, 1, 2], [2, 3, 4]]
    assert L.select_topk(scores, 0).shape == (3, 0)
    out = L.select_topk(scores, 5)
    assert out.dtype == torch.int64 and out.tolist() == [list(range(5))] * 3
    x = gaussian(4, 300, seed=3)
    idx = L.select_topk(x, 17)
    assert torch.equal(idx, torch.topk(x, 17).indices.sort(1).values)  # no ties in random data
    with pytest.raises(ValueError, match="between 0"):
        L.select_topk(scores, 6)


def test_select_topk_ties_in_one_row_and_nan():
    """Ties at the k-th score in one row only; a nan anywhere is an error, not a silent selection."""
    x = gaussian(3, 200, seed=4)
    x[1, 150:] = x[1].max() + 1  # 50 equal best scores in row 1: take the first k of them
    assert L.select_topk(x, 20)[1].tolist() == list(range(150, 170))
    assert torch.equal(L.select_topk(x, 20)[[0, 2]], torch.topk(x[[0, 2]], 20).indices.sort(1).values)
    for where in (0, 199):  # a nan ranked inside or outside the top k
        y = x.clone()
        y[2, where] = float("nan")
        with pytest.raises(ValueError, match="nan"):
            L.select_topk(y, 20)
    y = torch.tensor([[float("nan"), 1.0, 1.0, 1.0, 0.0]])  # a nan next to ties that fill the k places
    with pytest.raises(ValueError, match="nan"):
        L.select_topk(y, 2)


def test_quantized_dot_residual_and_scores():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 30, 64, generator=g)  # [H, N, C], N not a multiple of the meta-chunk
    q = torch.randn(2, 3, 2, 64, generator=g)  # [H, G, Tq, C]
    rq = Q.residual_quantize(x, 4, "2", "1")
    ref = L.score(q, L.TokenKeys(Q.dequantize(rq)))
    assert torch.allclose(L.score(q, L.QuantizedKeys(rq)), ref, atol=1e-5)
