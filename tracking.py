"""Selection statistics against the oracle (PAPER.md "The paper's method", the oracle): at every decode
step of a tracked policy (Policy.track), an exact pass over the middle keys gives the oracle's own
selection and the exact attention weights, against which the policy's selection is measured: its recall
of the oracle's rows, the attention mass it captures, and (low-rank keys) how far its rebuilt keys are
from the exact ones. kvcache.SparseCache calls `exact_pass` and `track`; `Stats` keeps the running means.
"""

import torch

import landmarks


class Stats:
    """Per-layer running means of the selection statistics (PAPER.md "The paper's method", the oracle)."""

    def __init__(self, n_layers, device="cpu"):
        # The sums stay on the cache's device, a step adding 0-d tensors in place: reading each
        # statistic out with .item() would make every tracked layer of every step wait for the GPU.
        self.recall = torch.zeros(n_layers, device=device)  # [n_layers] sum over steps of the head mean
        self.mass = torch.zeros(n_layers, device=device)
        self.key_err = torch.zeros(n_layers, device=device)
        self.steps = torch.zeros(n_layers, device=device)
        self.landmark_error = [None] * n_layers  # relative squared error of quantized landmarks
        self.hits = 0  # Keys.resident: selected rows that were on the device already ...
        self.selected = 0  # ... of all the rows selected

    def add_hits(self, hits, selected):
        self.hits += hits
        self.selected += selected

    def add(self, layer, recall, mass, key_err=None):
        """Ts decode positions of one layer: recall and mass per head and position ([H, Ts] each), key_err
        per position ([Ts]) or None. Each position counts once, as one decode step: the mean over the
        heads of a position, summed over the positions."""
        self.recall[layer] += recall.mean(0).sum()
        self.mass[layer] += mass.mean(0).sum()
        if key_err is not None:
            self.key_err[layer] += key_err.sum()
        self.steps[layer] += recall.shape[1]

    def summary(self):
        n = self.steps.clamp(min=1)
        errs = [e for e in self.landmark_error if e is not None]
        return dict(
            oracle_recall=(self.recall / n).mean().item(),
            attention_mass=(self.mass / n).mean().item(),
            key_error=(self.key_err / n).mean().item(),
            landmark_error=sum(errs) / len(errs) if errs else 0.0,
            recall_per_layer=(self.recall / n).tolist(),
            mass_per_layer=(self.mass / n).tolist(),
            hit_rate=self.hits / self.selected if self.selected else None,
        )


def exact_pass(k_mid, qg, selected: int, each_position=False):
    """The tracking pass: the softmax of the queries qg [H, G, Tq, d] over every exact middle key k_mid
    [H, M, d], probs [H, G, Tq, M], with its log-sum-exp [H, G, Tq, 1] (for the attention mass, `track`),
    and the oracle's selection from them at the policy's budget of `selected` rows, [H, S] (PAPER.md "The
    paper's method", the oracle), or each position's, [H, Tq, S]."""
    logits = landmarks.landmark_logits(qg, k_mid)  # [H, G, Tq, M]
    probs = logits.softmax(dim=-1)  # [H, G, Tq, M]
    # the largest probability is exp(max logit - lse): the lse without another pass over the logits
    lse = logits.amax(dim=-1, keepdim=True) - probs.amax(dim=-1, keepdim=True).log()  # [H, G, Tq, 1]
    scores = landmarks.softmax_max(probs, each_position)  # [H, (Tq,) M]
    oracle = landmarks.select_topk(scores.flatten(0, -2), selected)  # [H (* Tq), S]
    return probs, lse, oracle.view(*scores.shape[:-1], -1)  # ..., [H, (Tq,) S]


def track(stats: Stats, layer, qg, idx, st, exact, split):
    """Selection recall against the oracle, attention mass captured, key rebuild error, at Ts query
    positions: qg [H, G, Ts, d] their queries, idx [P, Ts, S] the middle rows each attends, exact =
    (probs [H, G, Ts, M], lse [H, G, Ts, 1], oracle [H, Ts, S]) from exact_pass, st the layer's
    kvcache.LayerState, split its policy's budget split; the result is added to `stats`. A decode step
    tracks its one selection at its last position (Ts = 1); a teacher-forced block (`attend_forced`)
    each position's own (Ts = Tq), each position seeing the answer up to itself. The key error reads
    each selected row's from LayerState.key_err (low-rank keys: a row is rebuilt alike at every step).

    One exact pass: the softmax of the query over the exact middle keys gives both the oracle's
    selection (same rule, same budget) and, with the exact tokens, the exact attention weights whose
    share on the attended tokens is the attention mass: the weight on (selected + outlier) middle
    tokens + sink + local + generated, over the weight on every token, each counted once (ShadowKV's
    outlier tokens are middle tokens that also sit among the exact ones). A policy that selects per
    query head is scored per query head: its recall is the share of its KV head's oracle tokens each
    query head attends, its mass each query head's own.
    """
    H, G, Ts, d = qg.shape
    k_mid = st.exact_k  # [H, M, d]
    probs, lse_mid, oracle = exact  # [H, G, Ts, M], [H, G, Ts, 1], [H, Ts, S]
    attended = idx
    if split.outlier_chunks:  # ShadowKV also attends its outlier tokens exactly
        out_pos = (
            st.exact.prompt_pos[:, split.sink : split.sink + split.outlier_tokens] - split.sink
        )  # [H, n_out*c]
        attended = torch.cat([idx, out_pos[:, None].expand(-1, Ts, -1)], dim=2)  # [H, Ts, S + n_out*c]
    P = idx.shape[0]
    hit = torch.zeros(P, Ts, k_mid.shape[1], dtype=torch.bool, device=k_mid.device).scatter_(
        2, attended, True
    )  # [P, Ts, M]
    if P == H:
        recall = hit.gather(2, oracle).float().mean(2)  # [H, Ts]
        attended = attended[:, None].expand(-1, G, -1, -1)  # [H, G, Ts, S'] each query head's rows
    else:  # per query head
        per_q = hit.view(H, G, Ts, -1)  # [H, G, Ts, M]
        recall = per_q.gather(3, oracle[:, None].expand(-1, G, -1, -1)).float().mean((1, 3))  # [H, Ts]
        attended = attended.view(H, G, Ts, -1)  # [H, G, Ts, S']
    # the exact softmax over prompt middle + exact tokens: the middle's weights are probs * e^(lse_mid - lse)
    rest = st.exact.k
    if split.outlier_chunks:  # the outlier tokens are in the middle already: count them once
        rest = torch.cat([rest[:, : split.sink], rest[:, split.sink + split.outlier_tokens :]], dim=1)
    logits_rest = landmarks.landmark_logits(qg, rest)  # [H, G, Ts, sink + local + Tg]
    if Ts > 1:  # position i of a forced block sees the answer up to itself (the last Ts exact tokens)
        R = rest.shape[1]
        sees = torch.ones(Ts, R, dtype=torch.bool, device=qg.device).tril(R - Ts)  # [Ts, R]
        logits_rest = logits_rest.masked_fill(~sees, float("-inf"))
    lse = torch.logaddexp(lse_mid, logits_rest.logsumexp(dim=-1, keepdim=True))  # [H, G, Ts, 1]
    middle = probs.gather(3, attended).sum(-1) * (lse_mid - lse)[..., 0].exp()  # [H, G, Ts]
    mass = middle + (logits_rest - lse).exp().sum(-1)  # [H, G, Ts]
    key_err = None
    if st.key_err is not None:  # low-rank keys: the selected rows' squared error over their norm
        err, norm = st.key_err.gather(2, idx.flatten(1).expand(2, -1, -1)).view(
            2, *idx.shape
        )  # [2, H, Ts, S]
        key_err = err.sum((0, 2)) / norm.sum((0, 2))  # [Ts]
    stats.add(layer, recall, mass.mean(1), key_err)
