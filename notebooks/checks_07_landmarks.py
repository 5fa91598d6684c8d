"""The checks of lab 07, landmarks and the selection rule (07_lab_landmarks.ipynb), numbered as the lab
numbers its exercises:

1. chunk-mean landmarks: check_chunk_means (landmarks.chunk_landmarks) and check_chunk_logits (a chunk-mean
   landmark's logit is the mean of its tokens' logits);
2. the selection rule: check_selection_scores (landmarks.score) and check_select (landmarks.select_topk);
3. ShadowKV's outlier chunks: check_min_cosine, check_outlier_chunks (kvcache.outlier_chunks) and
   check_scores_without_outliers (landmarks.score with landmarks removed).

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
import landmarks  # noqa: E402
from checks_common import (  # noqa: E402
    NotYet,
    budget,
    check,
    compare,
    describe,
    expect_tensor,
    real_case,
    seeded,
)

# ---------------------------------------------------------------------------------------------------
# The project's code, as each exercise's signature asks for it (the solutions, and the checks' reference)
# ---------------------------------------------------------------------------------------------------


def ref_chunk_means(k, chunk):
    return landmarks.chunk_landmarks(k, chunk)[0]


def ref_chunk_logits(token_logits, chunk):
    """The one exercise the project has no function for: its chunk logits come from the landmarks
    (landmarks.landmark_logits of landmarks.chunk_landmarks), never from the tokens' logits. The identity
    q.mean(k) = mean(q.k) in one line."""
    *lead, T = token_logits.shape
    return token_logits.view(*lead, T // chunk, chunk).mean(-1)


def ref_selection_scores(q, marks):
    return landmarks.score(q, landmarks.TokenKeys(marks))


def ref_select(scores, k):
    return landmarks.select_topk(scores, k)


def ref_min_cosine(k, chunk):
    return landmarks.chunk_landmarks(k, chunk)[1]


def ref_outlier_chunks(min_cos, n_out):
    return kvcache.outlier_chunks(min_cos, n_out)


def ref_scores_without_outliers(q, means, removed):
    marks = landmarks.ChunkMeans(means, torch.zeros(removed.shape), removed=removed)
    return landmarks.score(q, marks)


# ---------------------------------------------------------------------------------------------------
# Exercise 1: chunk-mean landmarks, and a chunk's logit as the mean of its tokens' logits
# ---------------------------------------------------------------------------------------------------


@check
def check_chunk_means(fn):
    # 1. shape, on a ramp that tells chunks, heads and channels apart: k[h, t, j] = 100 h + t + j / 100
    H, T, d, c = 2, 24, 4, 4
    N = T // c
    ramp = 100.0 * torch.arange(H)[:, None, None] + torch.arange(T)[None, :, None] + torch.arange(d) / 100
    out = expect_tensor(
        fn(ramp, c),
        "chunk_means",
        (H, N, d),
        "[H, N, d]",
        shapes=[
            (
                (H, c, d),
                "you have `chunk` landmarks per head, i.e. you averaged over the N axis: reshape to "
                "[H, N, chunk, d] and average over the chunk axis (2)",
            ),
            (
                (N, d),
                "the heads are gone: every KV head has its own landmarks (average over the chunk axis only)",
            ),
            (
                (H, N),
                "the channels are gone: a landmark is a key, [d] channels (average over the chunk axis only)",
            ),
        ],
    )
    # 2. the ramp: chunk n of head h must be the mean of tokens n*c .. n*c + c - 1
    compare(
        out,
        ref_chunk_means(ramp, c),
        "on a hand-made ramp of keys",
        [
            (
                "sum instead of mean: a landmark is the MEAN key of its chunk (divide by the chunk size)",
                ramp.view(H, N, c, d).sum(2),
            ),
            (
                "strided chunks: chunk n must be the consecutive tokens n*chunk .. n*chunk + chunk - 1, i.e. "
                "k.view(H, N, chunk, d), not every N-th token (k.view(H, chunk, N, d))",
                ramp.view(H, c, N, d).mean(1),
            ),
            ("one key per chunk instead of the mean of its keys", ramp[:, ::c]),
            ("the last key of each chunk instead of the mean of its keys", ramp[:, c - 1 :: c]),
        ],
    )
    # 3. the real keys, against landmarks.chunk_landmarks
    case = real_case()
    for layer in case.layers:
        for chunk in (8, 1):
            k = case.middle(layer, chunk)
            compare(fn(k, chunk), ref_chunk_means(k, chunk), f"real keys of layer {layer}, chunks of {chunk}")
    return (
        f"your landmarks equal landmarks.chunk_landmarks on the real keys of layers {list(case.layers)} "
        "(chunks of 8 and 1)"
    )


@check
def check_chunk_logits(fn):
    H, G, Tq, T, c = 2, 3, 2, 16, 4
    N = T // c
    logits = 3 * torch.randn(H, G, Tq, T, generator=seeded(1))
    by_chunk = logits.view(H, G, Tq, N, c)
    out = expect_tensor(
        fn(logits, c),
        "chunk_logits",
        (H, G, Tq, N),
        "[H, G, Tq, N]",
        shapes=[
            ((H, G, Tq, c), "you averaged over the N axis: reshape to [..., N, chunk] and average the last")
        ],
    )
    compare(
        out,
        ref_chunk_logits(logits, c),
        "on hand-made logits",
        [
            (
                "max over the chunk instead of the mean: the best token's logit is what selection would "
                "need (Quest bounds it from above), but a chunk-MEAN landmark gets q.mean(k) = mean(q.k), "
                "the mean of its tokens' logits",
                by_chunk.amax(-1),
            ),
            ("sum over the chunk instead of the mean: q.mean(k) = sum(q.k) / chunk", by_chunk.sum(-1)),
            (
                "logsumexp over the chunk instead of the mean: q.mean(k) is linear in the keys",
                by_chunk.logsumexp(-1),
            ),
            (
                "strided chunks: chunk n is the consecutive tokens n*chunk .. n*chunk + chunk - 1 "
                "(view(..., N, chunk)), not every N-th token (view(..., chunk, N))",
                logits.view(H, G, Tq, c, N).mean(-2),
            ),
        ],
    )
    case = real_case()
    worst = 0.0
    for layer in case.layers:
        k = case.middle(layer, 8)
        token_logits = landmarks.landmark_logits(case.q[layer], k)  # [H, G, A, M]
        want = landmarks.landmark_logits(case.q[layer], landmarks.chunk_landmarks(k, 8)[0])  # [H, G, A, N]
        got = fn(token_logits, 8)
        compare(got, want, f"real queries and keys of layer {layer}: the logits of the chunk-mean landmarks")
        worst = max(worst, (got - want).abs().max().item())
    return (
        "the identity holds on the real keys: the mean of each chunk's token logits equals the logit of its "
        f"chunk-mean landmark (landmarks.landmark_logits of landmarks.chunk_landmarks; largest difference "
        f"{worst:.1e})"
    )


# ---------------------------------------------------------------------------------------------------
# Exercise 2: the selection rule
# ---------------------------------------------------------------------------------------------------


def _softmax_scores(q, marks):
    """The pieces of the rule, for the mistake catalogue: logits [H, G, Tq, N] and their scale."""
    d = q.shape[-1]
    raw = torch.einsum("hgtd,hnd->hgtn", q.double(), marks.double())
    return raw, raw / math.sqrt(d)


@check
def check_selection_scores(fn):
    d = 16
    gen = seeded(2)
    # 1. shape
    H, G, Tq, N = 2, 3, 2, 5
    q, marks = torch.randn(H, G, Tq, d, generator=gen), torch.randn(H, N, d, generator=gen)
    expect_tensor(
        fn(q, marks),
        "selection_scores",
        (H, N),
        "[H, N]",
        shapes=[
            ((H, G, N), "you kept the group axis: take the max over the G query heads (dim 1)"),
            ((H, Tq, N), "you kept the positions: sum over the Tq query positions"),
            (
                (H, G, Tq, N),
                "these are per head and position: sum over the positions, then max over the group",
            ),
        ],
    )
    # 2. one query head, one position: the scores are softmax(q.L / sqrt(d)) over the landmarks
    q1 = torch.randn(H, 1, 1, d, generator=gen)
    raw, scaled = _softmax_scores(q1, marks)
    compare(
        fn(q1, marks),
        scaled.softmax(-1)[:, 0, 0],
        "one query head and position (G = Tq = 1), where the score is softmax(q.L / sqrt(d))",
        [
            (
                'logits not scaled by 1/sqrt(d): the rule is a softmax of q.L / sqrt(d) (PAPER.md "ShadowKV, '
                'precisely", decode step 1), as attention itself scales them',
                raw.softmax(-1)[:, 0, 0],
            ),
            (
                "no softmax over the landmarks: each query head's logits become probabilities over the N "
                "landmarks before they are combined",
                scaled[:, 0, 0],
            ),
            (
                "no softmax and no 1/sqrt(d): the score is softmax(q.L / sqrt(d)) over the landmarks",
                raw[:, 0, 0],
            ),
            (
                "softmax over the KV heads instead of over the landmarks (the last axis)",
                scaled[:, 0, 0].softmax(0),
            ),
        ],
    )
    # 3. one query head, three positions: the probabilities are summed over the positions
    q3 = torch.randn(H, 1, 3, d, generator=gen)
    raw, scaled = _softmax_scores(q3, marks)
    p = scaled.softmax(-1)[:, 0]  # [H, 3, N]
    compare(
        fn(q3, marks),
        p.sum(1),
        "one query head and three query positions, where the score is the SUM over the positions",
        [
            ("mean over the query positions instead of the sum", p.mean(1)),
            ("max over the query positions instead of the sum", p.amax(1)),
            ("only the last query position: sum the probabilities over all Tq positions", p[:, -1]),
            ("only the first query position: sum the probabilities over all Tq positions", p[:, 0]),
            (
                "one softmax over positions and landmarks together: take a softmax over the landmarks for "
                "each position, then sum over the positions",
                scaled[:, 0].reshape(H, -1).softmax(-1).view(H, 3, -1).sum(1),
            ),
            (
                "softmax over the positions instead of over the landmarks",
                scaled[:, 0].softmax(1).sum(1),
            ),
        ],
    )
    # 4. three query heads that each want another landmark: the max over the group keeps all three
    marks5 = 4 * torch.eye(N, d).expand(H, N, d)  # landmark n = 4 e_n
    strength = torch.tensor([8.0, 6.0, 4.0])
    qg = (strength[:, None] * torch.eye(3, d)).expand(H, 3, d)[:, :, None]  # [H, 3, 1, d]: head g wants n = g
    raw, scaled = _softmax_scores(qg, marks5)
    p = scaled.softmax(-1)[:, :, 0]  # [H, 3, N]
    compare(
        fn(qg, marks5),
        p.amax(1),
        "three query heads of one GQA group, each wanting another landmark (the max keeps all three)",
        [
            (
                "mean over the group instead of max: a landmark that one query head needs is diluted by the "
                'heads that do not (PAPER.md "ShadowKV, precisely": max over the G query heads)',
                p.mean(1),
            ),
            ("sum over the group instead of max (PAPER.md: max over the G query heads)", p.sum(1)),
            ("only the first query head of the group: take the max over all G of them", p[:, 0]),
            (
                "max over the group taken on the logits, before the softmax: take each query head's softmax "
                "first, then the max of the probabilities",
                scaled[:, :, 0].amax(1).softmax(-1),
            ),
            ("softmax over the group axis instead of over the landmarks", scaled[:, :, 0].softmax(1).amax(1)),
        ],
    )
    # 5. both: the sum over positions comes before the max over the group
    q22 = 2 * torch.randn(H, 2, 2, d, generator=gen)
    raw, scaled = _softmax_scores(q22, marks)
    p = scaled.softmax(-1)  # [H, 2, 2, N]
    compare(
        fn(q22, marks),
        p.sum(2).amax(1),
        "two query heads and two positions",
        [
            (
                "max over the group before the sum over positions: sum each query head's probabilities over "
                "the positions, then take the max over the heads",
                p.amax(1).sum(1),
            ),
            ("mean over the group instead of max", p.sum(2).mean(1)),
        ],
    )
    # 6. the real queries, against landmarks.score, on chunk-mean landmarks and on every exact key
    case = real_case()
    for layer in case.layers:
        for name, marks_r in (
            ("chunk-8 means", ref_chunk_means(case.middle(layer, 8), 8)),
            ("keys", case.middle(layer)),
        ):
            for steps in (slice(0, 1), slice(0, case.A)):
                q_r = case.q[layer][:, :, steps]
                Tq = q_r.shape[2]
                compare(
                    fn(q_r, marks_r),
                    ref_selection_scores(q_r, marks_r),
                    f"real queries of layer {layer} ({Tq} position{'s' if Tq > 1 else ''}) against its {name}",
                )
    return f"your scores equal landmarks.score on the real queries and keys of layers {list(case.layers)}"


@check
def check_select(fn):
    gen = seeded(3)
    H, N, k = 2, 10, 3
    scores = torch.rand(H, N, generator=gen)
    want = ref_select(scores, k)
    out = fn(scores, k)
    if isinstance(out, torch.Tensor) and out.is_floating_point():
        raise NotYet(
            "your select returns floats: return the INDICES of the best landmarks (an int64 tensor, e.g. the "
            ".indices of torch.topk), not their scores"
        )
    out = expect_tensor(
        out, "select", (H, k), "[H, k]", shapes=[((k,), "select k per KV head (each row), [H, k]")]
    )
    if out.dtype != torch.int64:
        raise NotYet(f"indices must be int64 (torch.long), got {out.dtype}")
    if not torch.equal(out, want):
        if torch.equal(out.sort(1).values, ref_select(-scores, k)):
            raise NotYet("random scores: the k LOWEST scores instead of the highest")
        if torch.equal(out.sort(1).values, want):
            raise NotYet(
                "random scores: the right landmarks, in the wrong order: sort the indices ascending (the "
                "cache reads the selected rows in prompt order; landmarks.select_topk returns them sorted)"
            )
        raise NotYet(f"random scores: expected {want.tolist()}, got {out.tolist()}")
    ties = torch.tensor([[1.0, 5, 3, 3, 3, 0, 3, 3], [2, 2, 2, 2, 2, 2, 2, 2]])
    want = ref_select(ties, 3)
    out = fn(ties, 3)
    if not (isinstance(out, torch.Tensor) and torch.equal(out, want)):
        raise NotYet(
            f"scores with ties: expected {want.tolist()}, got {describe(out) if not isinstance(out, torch.Tensor) else out.tolist()}: "
            "ties: among equal scores take the LOWER index first, so the choice does not depend on the "
            "device or the sort algorithm (torch.topk breaks ties in no fixed order; a stable sort keeps "
            "them in index order: scores.argsort(dim=1, descending=True, stable=True))"
        )
    case = real_case()
    for layer in case.layers:
        for name, marks in (
            ("chunk-8 means", ref_chunk_means(case.middle(layer, 8), 8)),
            ("keys", case.middle(layer)),
        ):
            s = ref_selection_scores(case.q[layer], marks)
            for kk in (1, budget(case) // (8 if name.startswith("chunk") else 1)):
                got, want = fn(s, kk), ref_select(s, kk)
                if not (isinstance(got, torch.Tensor) and torch.equal(got, want)):
                    raise NotYet(
                        f"real scores of layer {layer} ({name}), k={kk}: expected {want.tolist()}, got "
                        f"{got.tolist() if isinstance(got, torch.Tensor) else describe(got)}"
                    )
    return f"your selection equals landmarks.select_topk on the real scores of layers {list(case.layers)}"


# ---------------------------------------------------------------------------------------------------
# Exercise 3: ShadowKV's outlier chunks
# ---------------------------------------------------------------------------------------------------


@check
def check_min_cosine(fn):
    H, T, d, c = 2, 16, 8, 4
    N = T // c
    k = torch.randn(H, T, d, generator=seeded(4)) + 1.0
    k[:, 5] *= 3  # one long key: a dot product and a cosine differ
    kc = k.view(H, N, c, d)
    mean = kc.mean(2, keepdim=True)  # [H, N, 1, d]
    cos = torch.nn.functional.cosine_similarity(kc, mean, dim=-1)  # [H, N, c]
    out = expect_tensor(
        fn(k, c),
        "min_cosine",
        (H, N),
        "[H, N]",
        shapes=[
            (
                (H, N, c),
                "one value per chunk: the MINIMUM over its tokens' cosines (amin over the chunk axis)",
            )
        ],
    )
    whole = k.mean(1, keepdim=True)  # [H, 1, d] the mean of the whole head
    compare(
        out,
        ref_min_cosine(k, c),
        "hand-made keys",
        [
            (
                "max instead of min: an outlier chunk is one whose mean stands badly for at least one of its "
                'keys, so the value is the LOWEST cosine over the chunk (PAPER.md "ShadowKV, precisely")',
                cos.amax(-1),
            ),
            ("mean cosine instead of the min over the chunk", cos.mean(-1)),
            (
                "a dot product, not a cosine: divide by both norms "
                "(torch.nn.functional.cosine_similarity(keys, mean, dim=-1))",
                (kc * mean).sum(-1).amin(-1),
            ),
            (
                "cosine against the mean of the whole head: each chunk is compared with its OWN mean key",
                torch.nn.functional.cosine_similarity(kc, whole[:, :, None], dim=-1).amin(-1),
            ),
        ],
    )
    case = real_case()
    for layer in case.layers:
        km = case.middle(layer, 8)
        compare(fn(km, 8), ref_min_cosine(km, 8), f"real keys of layer {layer}, chunks of 8")
    return f"your minimum cosines equal landmarks.chunk_landmarks' on the real keys of layers {list(case.layers)}"


@check
def check_outlier_chunks(fn):
    gen = seeded(5)
    H, N, n = 2, 10, 3
    min_cos = torch.rand(H, N, generator=gen)
    want = ref_outlier_chunks(min_cos, n)
    out = expect_tensor(fn(min_cos, n), "outlier_chunks", (H, n), "[H, n_out]")
    if out.dtype != torch.int64 or not torch.equal(out, want):
        if out.dtype == torch.int64 and torch.equal(out.sort(1).values, landmarks.select_topk(min_cos, n)):
            raise NotYet(
                "random values: the chunks with the HIGHEST minimum cosine: the outliers are the chunks whose "
                "mean fits its keys worst, the LOWEST minimum cosine"
            )
        if out.dtype == torch.int64 and torch.equal(out.sort(1).values, want):
            raise NotYet("random values: the right chunks in the wrong order: sort the indices ascending")
        if out.is_floating_point():
            raise NotYet("return the chunk INDICES (int64), not their values")
        raise NotYet(f"random values: expected {want.tolist()}, got {out.tolist()} ({out.dtype})")
    case = real_case()
    for layer in case.layers:
        mc = ref_min_cosine(case.middle(layer, 8), 8)
        got, want = fn(mc, 4), ref_outlier_chunks(mc, 4)
        if not (isinstance(got, torch.Tensor) and torch.equal(got, want)):
            raise NotYet(f"real keys of layer {layer}: expected chunks {want.tolist()}, got {got}")
    return f"your outliers equal kvcache.outlier_chunks on the real keys of layers {list(case.layers)}"


@check
def check_scores_without_outliers(fn):
    d = 16
    # 1. one head, one position; landmark 1 is removed, and its logit is far the largest
    means = torch.zeros(1, 4, d)
    means[0, :, 0] = torch.tensor([0.0, 20.0, 1.0, 2.0])  # q = 4 e_0 below: logits 0, 20, 1, 2
    q = torch.zeros(1, 1, 1, d)
    q[..., 0] = 4.0
    removed = torch.tensor([[False, True, False, False]])
    want = ref_scores_without_outliers(q, means, removed)
    out = expect_tensor(fn(q, means, removed), "scores_without_outliers", (1, 4), "[H, N]")
    if not bool(torch.isneginf(out[removed]).all()):
        raise NotYet(
            "one head, landmark 1 removed: a removed chunk must score -inf, so it is never selected (its "
            "tokens are attended exactly anyway): scores.masked_fill(removed, float('-inf'))"
        )
    logits = (q[0, 0, 0] @ means[0].T / math.sqrt(d)).double()  # [4]
    after = logits.softmax(-1).masked_fill(removed[0], float("-inf"))[None]
    compare(
        out,
        want,
        "one head, landmark 1 removed (the others' probabilities must sum to 1)",
        [
            (
                "removed after the softmax: the outliers' logits still took their share of the probability "
                'mass; mask the logits with -inf BEFORE the softmax (PAPER.md "ShadowKV, precisely": removed '
                "from the landmark set before the softmax)",
                after,
            ),
        ],
    )
    # 2. a group of query heads and positions: the rule of exercise 2 on the landmarks that are left
    gen = seeded(6)
    H, G, Tq, N = 2, 3, 2, 6
    q = torch.randn(H, G, Tq, d, generator=gen)
    means = torch.randn(H, N, d, generator=gen)
    removed = torch.zeros(H, N, dtype=torch.bool)
    removed[0, 2] = removed[1, 4] = removed[1, 0] = True
    logits = torch.einsum("hgtd,hnd->hgtn", q.double(), means.double()) / math.sqrt(d)
    after = logits.softmax(-1).sum(2).amax(1).masked_fill(removed, float("-inf"))
    compare(
        fn(q, means, removed),
        ref_scores_without_outliers(q, means, removed),
        "three query heads, two positions, some chunks removed (the rule of exercise 2 on the landmarks left)",
        [
            ("removed after the softmax: mask the logits with -inf BEFORE the softmax", after),
            (
                "mean over the group instead of max",
                logits.masked_fill(removed[:, None, None], float("-inf")).softmax(-1).sum(2).mean(1),
            ),
        ],
    )
    # 3. real chunk means, ShadowKV's outliers among them
    case = real_case()
    for layer in case.layers:
        km = case.middle(layer, 8)
        means, min_cos = landmarks.chunk_landmarks(km, 8)
        out_idx = ref_outlier_chunks(min_cos, 4)
        removed = torch.zeros_like(min_cos, dtype=torch.bool).scatter_(1, out_idx, True)
        compare(
            fn(case.q[layer], means, removed),
            ref_scores_without_outliers(case.q[layer], means, removed),
            f"real queries and chunk means of layer {layer}, its 4 outlier chunks removed",
        )
    return (
        "your scores equal landmarks.score with ShadowKV's outliers removed, on the real keys of layers "
        f"{list(case.layers)}"
    )
