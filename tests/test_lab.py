"""The course notebooks' shared helpers (notebooks/lab.py) score and select as the project's code does."""

import sys
from pathlib import Path

import torch

import landmarks

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "notebooks"))
import lab  # noqa: E402  notebooks/lab.py


def test_step_scores_is_landmarks_score_step_by_step_with_removed_landmarks():
    """Each answer step scored as a decode step of that one position scores it (landmarks.score, Tq = 1):
    removed landmarks (ShadowKV's outlier chunks) leave before the softmax, so the landmarks left share all
    of each query head's probability, and score -inf."""
    gen = torch.Generator().manual_seed(0)
    H, G, A, d, c, N = 2, 3, 5, 16, 4, 6
    q = torch.randn(H * G, A, d, generator=gen)  # [n_heads, A, d]
    marks = landmarks.ChunkMeans.build(3 * torch.randn(H, N * c, d, generator=gen), c)
    marks.removed = torch.zeros(H, N, dtype=torch.bool)  # [H, N]
    marks.removed[0, 1] = marks.removed[1, 4] = marks.removed[1, 5] = True
    got = lab.step_scores(q, marks)  # [A, H, N]
    grouped = q.view(H, G, A, d)  # [H, G, A, d]: the query heads of each KV head's group
    want = torch.stack([landmarks.score(grouped[:, :, a : a + 1], marks) for a in range(A)])  # [A, H, N]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert bool(torch.isneginf(got[:, marks.removed]).all())
    one_head = lab.step_scores(q[:H], marks)  # [A, H, N]: one query head per KV head, no max over a group
    left = one_head.masked_fill(marks.removed, 0.0).sum(-1)  # [A, H]
    torch.testing.assert_close(left, torch.ones(A, H))
