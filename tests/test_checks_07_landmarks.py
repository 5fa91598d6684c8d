"""The checks of lab 07, landmarks and the selection rule (notebooks/checks_07_landmarks.py).

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
import checks_07_landmarks as checks  # noqa: E402
from test_checks_common import LabChecks  # noqa: E402

pytestmark = pytest.mark.slow  # the default model's prefill (~15 s on two busy cores), once per session


def softmax_rule(logits):
    """[H, G, Tq, N] -> [H, N]: softmax over the landmarks, sum over positions, max over the group."""
    return logits.softmax(-1).sum(2).amax(1)


def logits_of(q, marks):
    return q @ marks[:, None].transpose(-1, -2) / math.sqrt(q.shape[-1])  # [H, G, Tq, N]


# (check, the mistake in words, the wrong function, what the hint must say)
WRONG = [
    # exercise 1: chunk-mean landmarks
    ("chunk_means", "sum instead of mean", lambda k, c: k.view(k.shape[0], -1, c, k.shape[2]).sum(2), "sum instead of mean"),
    ("chunk_means", "every N-th token instead of consecutive ones", lambda k, c: k.view(k.shape[0], c, -1, k.shape[2]).mean(1), "strided chunks"),
    ("chunk_means", "first key of each chunk", lambda k, c: k[:, ::c], "one key per chunk"),
    ("chunk_logits", "max over the chunk instead of mean", lambda L, c: L.view(*L.shape[:-1], -1, c).amax(-1), "max over the chunk instead of the mean"),
    ("chunk_logits", "sum over the chunk instead of mean", lambda L, c: L.view(*L.shape[:-1], -1, c).sum(-1), "sum over the chunk instead of the mean"),
    ("chunk_logits", "every N-th token instead of consecutive ones", lambda L, c: L.view(*L.shape[:-1], c, -1).mean(-2), "strided chunks"),
    # exercise 2: the selection rule
    ("selection_scores", "no 1/sqrt(d)", lambda q, m: (q @ m[:, None].transpose(-1, -2)).softmax(-1).sum(2).amax(1), "not scaled by 1/sqrt(d)"),
    ("selection_scores", "mean over the group instead of max", lambda q, m: logits_of(q, m).softmax(-1).sum(2).mean(1), "mean over the group instead of max"),
    ("selection_scores", "mean over positions instead of sum", lambda q, m: logits_of(q, m).softmax(-1).mean(2).amax(1), "mean over the query positions instead of the sum"),
    ("selection_scores", "max over the group before the sum over positions", lambda q, m: logits_of(q, m).softmax(-1).amax(1).sum(1), "max over the group before the sum over positions"),
    ("selection_scores", "max over the group of the logits", lambda q, m: logits_of(q, m).amax(1).softmax(-1).sum(1), "max over the group taken on the logits"),
    ("select", "the k lowest", lambda s, k: s.topk(k, dim=1, largest=False).indices.sort(dim=1).values, "LOWEST"),
    ("select", "indices left in score order", lambda s, k: s.topk(k, dim=1).indices, "sort the indices ascending"),
    ("select", "torch.topk's ties", lambda s, k: s.topk(k, dim=1).indices.sort(dim=1).values, "ties: among equal scores take the LOWER index"),
    # exercise 3: ShadowKV's outlier chunks
    ("min_cosine", "max instead of min", lambda k, c: torch.nn.functional.cosine_similarity(k.view(k.shape[0], -1, c, k.shape[2]), k.view(k.shape[0], -1, c, k.shape[2]).mean(2, keepdim=True), dim=-1).amax(-1), "max instead of min"),
    ("min_cosine", "dot product instead of cosine", lambda k, c: (k.view(k.shape[0], -1, c, k.shape[2]) * k.view(k.shape[0], -1, c, k.shape[2]).mean(2, keepdim=True)).sum(-1).amin(-1), "a dot product, not a cosine"),
    ("min_cosine", "mean cosine", lambda k, c: torch.nn.functional.cosine_similarity(k.view(k.shape[0], -1, c, k.shape[2]), k.view(k.shape[0], -1, c, k.shape[2]).mean(2, keepdim=True), dim=-1).mean(-1), "mean cosine instead of the min"),
    ("outlier_chunks", "highest instead of lowest", lambda m, n: m.topk(n, dim=1).indices.sort(dim=1).values, "HIGHEST minimum cosine"),
    ("outlier_chunks", "indices left in score order", lambda m, n: m.topk(n, dim=1, largest=False).indices, "wrong order"),
    ("scores_without_outliers", "removed after the softmax", lambda q, m, r: softmax_rule(logits_of(q, m)).masked_fill(r, float("-inf")), "removed after the softmax"),
    ("scores_without_outliers", "removed chunks left in", lambda q, m, r: softmax_rule(logits_of(q, m)), "must score -inf"),
    ("scores_without_outliers", "removed chunks set to 0 after the softmax", lambda q, m, r: softmax_rule(logits_of(q, m)).masked_fill(r, 0.0), "must score -inf"),
]  # fmt: skip


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


class TestLab07Checks(LabChecks):
    module = checks
    solutions = {
        "chunk_means": checks.ref_chunk_means,
        "chunk_logits": checks.ref_chunk_logits,
        "selection_scores": checks.ref_selection_scores,
        "select": checks.ref_select,
        "min_cosine": checks.ref_min_cosine,
        "outlier_chunks": checks.ref_outlier_chunks,
        "scores_without_outliers": checks.ref_scores_without_outliers,
    }
    written = {
        "chunk_means": chunk_means,
        "chunk_logits": chunk_logits,
        "selection_scores": selection_scores,
        "select": select,
        "min_cosine": min_cosine,
        "outlier_chunks": outlier_chunks,
        "scores_without_outliers": scores_without_outliers,
    }
    wrong = WRONG
