"""The KV cache: what a policy DOES at every decode step (what a policy IS: policy.py).

The model (model.py) calls, in every layer, the one method every cache has (the `Cache` protocol below):

    out = cache.attend(layer, q, k, v, pos, **asked)
        q:    [B, n_heads, T, head_dim]     post-RoPE queries of the T new tokens
        k, v: [B, n_kv_heads, T, head_dim]  post-RoPE keys and values of the T new tokens
        pos:  [T] int64                     their absolute positions
        asked: what the cache's `asks` names besides (InfiniGen: "next_query", the next layer's query)
        out:  [B, n_heads, T, head_dim]     attention output (before o_proj)

and never needs to know which policy runs. There are two caches:

    FullCache    every token's K/V, exact causal attention: the prefill, and the reference
    SparseCache  built from a prefilled FullCache for a policy (`from_prefill`, `from_kv`): each decode
                 step attends to the tokens kept exact plus the prompt tokens the policy selects

A decode step of a SparseCache (`SparseCache.attend`) is the same for every policy (PAPER.md
"ShadowKV, precisely"):

    1. score the landmarks against the query, keep the top-k chunks per KV head   (landmarks.py)
    2. start fetching the selected rows' values (and keys) from CPU memory        (offload.py)
    3. meanwhile attend to the tokens kept exact on the device                     (ExactTokens)
    4. get the selected keys (fetched, or rebuilt from low-rank factors), attend,  (OffloadedKeys,
       and merge the two softmaxes                                                  LowRankKeys)

To watch one step in a debugger, break in `SparseCache.attend` and run model.prefill and model.decode
with one policy (README, "Step through one decode step").

The letters of the shape comments:
    H   KV heads (n_kv_heads)              G   query heads per KV head (n_heads = H * G)
    P   selecting heads: H, or H * G when each query head selects its own tokens (Select.per)
    T   prompt tokens                      M   the prompt's middle: the tokens the landmarks stand for
    N   landmarks per head (M / chunk)     S   selected middle rows per head at a step
    F   prompt tokens kept exact (sink, outlier chunks, local window)
    Tg  generated tokens                   Tq  new tokens of one call (1 at a decode step)
    R   rows on the device a query is fitted to (LRQK)
    d   head_dim                           r   a rank (ShadowKV's SVD, LRQK's factors)
"""

import math
import typing
import warnings
from dataclasses import dataclass, replace

import torch

import landmarks
import quantize
import tracking
from landmarks import LayerPrefill
from offload import OffloadStore
from policy import PRESETS, BudgetSplit, Policy, split_budget


@typing.runtime_checkable
class Cache(typing.Protocol):
    """What model.Transformer.forward needs of a cache, and all it needs. Every cache here (FullCache,
    SparseCache, StackedCache, TeacherForced), the evaluation's padding rows and the transformers
    adapter's (hf.py) implement it with this one signature.

    asks:    what the cache needs from the model besides q, k, v, handed to `attend` by name (above);
             model.Transformer.forward computes it only when asked
    seq_len: the tokens cached so far (prompt and generated): the next token's position
    attend:  the attention output of the new tokens (shapes above); writes them into the cache"""

    asks: tuple

    @property
    def seq_len(self) -> int: ...

    def attend(self, layer: int, q, k, v, pos, **asked) -> torch.Tensor: ...


# --------------------------------------------------------------------------------- the exact tokens
@dataclass
class ExactTokens:
    """The tokens every decode step attends exactly, kept on the device: the prompt's sink, outlier
    chunks and local window (`n_prompt` of them, per KV head), then every generated token."""

    k: torch.Tensor  # [H, F + Tg, d] post-RoPE keys: sink, outliers, local, then generated
    v: torch.Tensor  # [H, F + Tg, d]
    prompt_pos: torch.Tensor  # [H, F] positions of the F prompt tokens among them
    kbuf: torch.Tensor | None = None  # the buffers k / v grow in (see append)
    vbuf: torch.Tensor | None = None

    @classmethod
    def build(cls, k, v, split: BudgetSplit, outlier_chunks) -> "ExactTokens":
        """k, v: [H, T, d] exact prompt K/V; outlier_chunks: [H, n_out] middle chunk indices."""
        H, T, d = k.shape
        s, c = split.sink, split.chunk
        ar = torch.arange(T, device=k.device)
        out_tok = (outlier_chunks[:, :, None] * c + torch.arange(c, device=k.device)).flatten(
            1
        )  # [H, n_out*c]
        pos = torch.cat(
            [ar[:s].expand(H, -1), out_tok + s, ar[split.middle.stop :].expand(H, -1)], dim=1
        )  # [H, F]
        rows = pos[..., None].expand(-1, -1, d)  # [H, F, d]
        return cls(k.gather(1, rows), v.gather(1, rows), pos)

    @property
    def n_prompt(self) -> int:
        return self.prompt_pos.shape[1]

    def append(self, k, v):
        """Add the new tokens' k, v [H, Tq, d]: generated tokens are always attended exactly."""
        self.kbuf, self.k = append(self.kbuf, self.k, k)  # [H, F + Tg, d]
        self.vbuf, self.v = append(self.vbuf, self.v, v)


def outlier_chunks(min_cos, n_out: int) -> torch.Tensor:
    """ShadowKV's outliers: the n_out chunks whose mean represents its keys worst (lowest minimum
    cosine min_cos [H, N]), per KV head: [H, n_out] int64. The caller keeps them exact and takes them
    out of the landmarks (SparseCache.build_layer)."""
    if n_out == 0:
        return torch.empty(min_cos.shape[0], 0, dtype=torch.long, device=min_cos.device)
    return landmarks.select_topk(-min_cos, n_out)  # [H, n_out]


# ----------------------------------------------------------------------------------- the key sources
@dataclass
class OffloadedKeys:
    """The keys, kept in the offload store beside the values and fetched with them: exact, or (the
    paper's configuration) quantized before RoPE, with RoPE applied to the fetched rows."""

    pre_rope: bool = False
    fetched = ("k", "v")  # what a decode step reads from the store

    def device_bytes(self, exact_bytes) -> int:
        return 0

    def selected(self, got: dict, idx, split: BudgetSplit, rope, dtype) -> torch.Tensor:
        if not self.pre_rope:
            return got["k"]  # [H, S, d] post-RoPE
        H, S, d = got["k"].shape
        pos = (idx + split.sink).flatten()  # [H*S] prompt positions
        return rope.apply(got["k"].to(dtype).reshape(1, -1, d), pos).view(H, S, d)  # post-RoPE


@dataclass
class LowRankKeys:
    """ShadowKV's keys (PAPER.md "ShadowKV, precisely"): the pre-RoPE keys of all KV heads as one
    [M, H*d] matrix, factorised by SVD; U [M, r] and S V^T [r, H*d] stay on the device and the
    selected keys are rebuilt from them and RoPE'd at their positions. Only the values are fetched."""

    u: torch.Tensor  # [T, r] one row per prompt token
    sv: torch.Tensor  # [r, H * d]
    fetched = ("v",)

    @classmethod
    def build(cls, k, rope, rank) -> "LowRankKeys":
        """k: [H, T, d] post-RoPE keys of the WHOLE prompt, as ShadowKV factorises them (the rows of
        the sink and the local window are never rebuilt, but shape the basis); RoPE is undone first."""
        pos = torch.arange(k.shape[1], device=k.device)  # [T]
        return cls(*low_rank_keys(rope.invert(k, pos), rank))

    def device_bytes(self, exact_bytes) -> int:
        return sum(t.numel() * (exact_bytes or t.element_size()) for t in (self.u, self.sv))

    def selected(self, got: dict, idx, split: BudgetSplit, rope, dtype) -> torch.Tensor:
        """The selected keys [H, S, d], post-RoPE. A teacher-forced block asks for every position's rows,
        more than the middle holds: then every middle row is rebuilt once and each position reads its
        own (the same keys for fewer flops)."""
        H, S = idx.shape
        d = self.sv.shape[1] // H
        M = split.n_chunks * split.chunk
        if S > M:
            every = self.selected(got, torch.arange(M, device=idx.device).expand(H, -1), split, rope, dtype)
            return every.gather(1, idx[..., None].expand(-1, -1, d))  # [H, S, d]
        pos = idx + split.sink  # [H, S] prompt positions of the selected middle rows
        pre = rebuild_keys(self.u, self.sv, pos, H, d).to(dtype)  # [H, S, d] pre-RoPE
        return rope.apply(pre.reshape(1, -1, d), pos.flatten()).view(H, S, d)  # post-RoPE


@dataclass
class LayerState:
    """What a sparse policy keeps for one layer after the prefill (batch of one). A dense layer
    (Select.dense_layers) has no landmarks: every prompt token is among its exact tokens."""

    marks: landmarks.Landmarks | None  # [H, N] landmarks (or [H * G, N], per query head)
    keys: OffloadedKeys | LowRankKeys | None
    exact: ExactTokens
    resident: "Resident | None" = None  # Keys.resident: the rows selected at the last step, on the device
    step_state: object = None  # a stateful kind's state from step to step (LRQK: landmarks.QKState)
    exact_k: torch.Tensor | None = None  # [H, M, d] Policy.track: the exact middle keys the statistics read
    key_err: torch.Tensor | None = None  # [2, H, M] Policy.track, low-rank keys: per middle row its rebuilt
    # key's squared error and its exact key's squared norm (a row's rebuild is the same at every step)


@dataclass
class Resident:
    """The selected rows kept on the device from one decode step to the next (Keys.resident): the next
    step fetches only the rows it selects that are not here (ArkVale's pages, LRQK's cache)."""

    idx: torch.Tensor  # [P, S] sorted middle rows per selecting head (KV head, or query head)
    rows: dict  # name ("k", "v") -> [P, S, d] their fetched values


# ----------------------------------------------------------------------------------- the two caches
class FullCache:
    """Every token's keys and values and exact causal attention over them: the prefill of every
    policy, and the full-attention reference. A decode step writes one row per layer (see `append`).

    `policy` is full attention, or a sparse policy whose prompt was shorter than its budget (it then
    runs as full attention: `from_kv` says so with a warning). keep_queries: keep the prefill's
    queries too (`q`), for the policies whose landmarks need them (LRQK: its kind's needs_queries). arch:
    the architecture of the model that fills it (model.prefill sets it), for what a policy built from
    it sets by architecture (LRQK's rank, landmarks.LowRankQK.rank).
    """

    asks = ()  # nothing beyond q, k, v from the model (see SparseCache.asks)

    def __init__(self, n_layers: int, policy: Policy | None = None, keep_queries: bool = False, arch=None):
        self.policy = policy or PRESETS["full"]
        self.keep_queries = keep_queries
        self.arch = arch
        self.q = [None] * n_layers  # keep_queries: per layer the prefill's [B, n_heads, T, head_dim]
        self.k = [None] * n_layers  # per layer [B, n_kv_heads, S, head_dim]
        self.v = [None] * n_layers
        self.kbuf = [None] * n_layers  # the buffers self.k / self.v are views of (see append)
        self.vbuf = [None] * n_layers
        self.prompt_len = 0  # set by the first call (the prefill)
        self.stats = None  # no selection, nothing to inspect
        self.bytes_fetched = 0  # nothing is offloaded

    @property
    def seq_len(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def attend(self, layer, q, k, v, pos, **asked):
        if self.k[layer] is None:
            if layer == 0:
                self.prompt_len = k.shape[2]  # the first call is the prefill
            if self.keep_queries:
                self.q[layer] = q
            # The model hands k, v as transposed views of [B, T, n_kv_heads, d]. One head-major copy
            # here saves a strided read of the whole prompt at every later step: every policy built
            # from this prefill (from_prefill) scores, gathers and tracks on views of these tensors.
            k, v = k.contiguous(), v.contiguous()  # [B, n_kv_heads, T, d]
        self.kbuf[layer], self.k[layer] = append(self.kbuf[layer], self.k[layer], k)  # [B, n_kv_heads, S, d]
        self.vbuf[layer], self.v[layer] = append(self.vbuf[layer], self.v[layer], v)
        return full_attention(q, self.k[layer], self.v[layer])

    # teacher forcing (SparseCache.attend_forced): exact causal attention is already each position's own
    attend_forced = attend

    def budget_line(self) -> str:
        return f"budget = all {self.prompt_len} tokens (full attention)"

    def memory(self, exact_bytes=2) -> dict:
        """The prompt's K/V, all on the device (see SparseCache.memory for the accounting)."""
        T = self.prompt_len
        if self.k[0] is None:
            return _memory(0, 0, 0, 0)
        _, H, _, d = self.k[0].shape
        exact = sum(t[:, :, :T].numel() * (exact_bytes or t.element_size()) for t in self.k + self.v)
        return _memory(T * len(self.k) * 2 * H * d * 2, 0, exact, 0)


class SparseCache:
    """The cache of a sparse policy, built from a prefill (`from_prefill`, `from_kv`; batch of one):
    per layer the landmarks, the key source and the exact tokens on the device, and the prompt's
    middle K/V in the offload store. Every `attend` is a decode step (PAPER.md "ShadowKV, precisely").
    """

    def __init__(self, policy: Policy, rope, split: BudgetSplit, n_layers: int, device):
        self.policy, self.rope, self.split = policy, rope, split
        self.device = torch.device(device)
        self.store = OffloadStore(self.device, offload=policy.offload)
        self.layers = [None] * n_layers  # per layer a LayerState
        self.prompt_len = split.prompt_len
        # the paper's K/V: one stored row per token, all kv_heads x head_dim channels (Keys.kv_group)
        self.token_rows = policy.keys.kv_group == "token"
        # what the model hands this cache besides q, k, v (model.Transformer.forward): InfiniGen's
        # "next_query", layer L's query computed from layer L - 1's input, at layer L - 1's call ...
        self.asks = policy.select.kind.asks
        # ... and kept here until layer L's call scores with it (`_speculate`, `_selection_query`)
        self.speculated = [None] * n_layers  # per layer the query speculated for it [n_heads, Tq, d]
        self.stats = tracking.Stats(n_layers, self.device)
        self.last_selected = [None] * n_layers  # per layer [P, S] positions, last decode step

    @property
    def seq_len(self) -> int:
        ex = self.layers[0].exact
        return self.prompt_len + ex.k.shape[1] - ex.n_prompt

    @property
    def bytes_fetched(self) -> int:
        """Bytes moved from CPU memory to the device since the cache was built (the PCIe traffic)."""
        return self.store.bytes_moved

    def budget_line(self) -> str:
        """'budget = 4 sink + 64 local + 64 selected (+ 16 outliers) of 2048 tokens'."""
        dense = self.policy.select.dense_layers
        return self.split.line() + (f"; layers 0-{dense - 1} dense" if dense else "")

    # ---------------------------------------------------------------- prefill: build the summary
    def build_layer(self, layer, k, v, prefill: LayerPrefill) -> LayerState:
        """k, v: [H, T, d] exact post-RoPE prompt keys and values of one layer."""
        p, split = self.policy, self.split
        if layer < p.select.dense_layers:  # a dense layer: every prompt token exact, nothing selected
            every = torch.arange(k.shape[1], device=k.device).expand(k.shape[0], -1)  # [H, T]
            return LayerState(None, None, ExactTokens(k, v, every))
        k_mid, v_mid = k[:, split.middle], v[:, split.middle]  # [H, M, d]
        # 1. the landmarks, and (ShadowKV) the outlier chunks taken out of them
        marks = p.select.build(k_mid, prefill)  # N landmarks per KV head (or per query head)
        self.stats.landmark_error[layer] = marks.error
        outliers = torch.empty(k.shape[0], 0, dtype=torch.long, device=k.device)  # [H, n_out]
        if split.outlier_chunks:  # kept exact, and taken out of selection
            outliers = outlier_chunks(marks.min_cos, split.outlier_chunks)  # [H, n_out]
            removed = torch.zeros_like(marks.min_cos, dtype=torch.bool).scatter_(1, outliers, True)  # [H, N]
            marks = replace(marks, removed=removed)
        exact = ExactTokens.build(k, v, split, outliers)
        # 2. the middle goes to the offload store; low-rank keys keep only their factors on the device
        if p.keys.source == "low_rank":
            keys = LowRankKeys.build(k, self.rope, p.keys.rank)
        else:
            keys = OffloadedKeys(pre_rope=p.keys.kv_pre_rope)
            pos = torch.arange(split.middle.start, split.middle.stop, device=k.device)  # [M]
            self._offload(layer, "k", self.rope.invert(k_mid, pos) if p.keys.kv_pre_rope else k_mid)
        self._offload(layer, "v", v_mid)
        # the exact middle keys, for the recall / mass statistics only (a view, not counted)
        state = LayerState(marks, keys, exact, exact_k=k_mid if p.track else None)
        if p.track and p.keys.source == "low_rank":  # and how far each rebuilt key is from its exact one
            every = torch.arange(k_mid.shape[1], device=k.device).expand(k.shape[0], -1)  # [H, M]
            rebuilt = keys.selected({}, every, split, self.rope, k.dtype).float()  # [H, M, d]
            state.key_err = torch.stack(
                [(rebuilt - k_mid.float()).pow(2).sum(-1), k_mid.float().pow(2).sum(-1)]
            )
        if marks.stateful:  # LRQK: its state starts at the prefill, which selects with its last query's A_Q
            state.resident = self._first_selection(marks, k_mid, v_mid)
            state.step_state = marks.start()
        return state

    def _first_selection(self, marks, k_mid, v_mid) -> Resident:
        """LRQK's prefill selection (PAPER.md "LRQK"): each query head's top tokens by the last prompt
        query's coordinates, put on the device from the prefill's own K/V (nothing is fetched)."""
        H = k_mid.shape[0]
        P = marks.first.shape[0]
        q_first = marks.first.view(H, P // H, 1, -1)  # [H, G, 1, r]
        scores = landmarks.score(q_first, marks, "dot", "query_head")  # [P, M]
        idx = landmarks.select_topk(scores, self.split.selected)  # [P, S]
        head = torch.arange(P, device=idx.device)[:, None] // (P // H)  # [P, 1] each query head's KV head
        return Resident(idx, {"k": k_mid[head, idx], "v": v_mid[head, idx]})  # [P, S, d] each

    def _offload(self, layer, name, x):
        """Put x [H, M, d] in the store: as it is, or quantized with Keys.kv_bits (each row packed on
        its own, so the selected rows are fetched still packed: fewer bytes over PCIe). With
        kv_group "token" a row is all H * d channels of a token, one scale group (the paper's K/V)."""
        kv_bits = self.policy.keys.kv_bits
        if kv_bits is None:
            self.store.put(layer, name, x)
        elif not self.token_rows:
            self.store.put(layer, name, quantize.quantize(x, quantize.parse_format(kv_bits)))
        else:
            H, M, d = x.shape
            spec = kv_bits if ":" in kv_bits else f"{kv_bits}:g{H * d}"  # one group: the whole token
            rows = x.transpose(0, 1).reshape(1, M, H * d)  # [1, M, H*d] token-major
            self.store.put(layer, name, quantize.quantize(rows, quantize.parse_format(spec)))

    # ---------------------------------------------------------------- decode
    def select(self, layer, qg, each_position=False) -> torch.Tensor:
        """Step 1 of a decode step: the middle rows [P, S] (sorted, relative to the middle) that the
        selection query qg [H, G, Tq, d] reads: the landmarks' top-k chunks per KV head (P = H), or per
        query head (P = H * G, Select.per), expanded to tokens. each_position (the teacher-forced pass,
        `attend_forced`): every one of the Tq positions selects its own rows by the same rule, [P, Tq, S]."""
        split, select = self.split, self.policy.select
        marks = self.layers[layer].marks
        scores = landmarks.score(qg, marks, select.score_rule, select.per, each_position)  # [P, (Tq,) N]
        chunks = landmarks.select_topk(scores.flatten(0, -2), split.k_chunks)  # [P (* Tq), k_chunks]
        chunks = chunks.view(*scores.shape[:-1], -1)  # [P, (Tq,) k_chunks]
        if split.chunk == 1:
            return chunks
        return (chunks[..., None] * split.chunk + torch.arange(split.chunk, device=qg.device)).flatten(
            -2
        )  # [P, (Tq,) S]

    def _speculate(self, layer, asked):
        """Keep the query the model speculated for the NEXT layer (asked["next_query"], [1, n_heads, Tq, d],
        when `asks` names it: InfiniGen) until that layer's call scores with it."""
        if "next_query" in asked and layer + 1 < len(self.layers):
            self.speculated[layer + 1] = asked["next_query"][0]  # [n_heads, Tq, d]

    def attend(self, layer, q, k, v, pos, **asked):
        """One decode step of one layer: select, fetch, attend (PAPER.md "ShadowKV, precisely")."""
        st = self.layers[layer]
        B, n_heads, Tq, d = q.shape
        H = k.shape[1]
        G = n_heads // H
        self._speculate(layer, asked)
        qg = q[0].view(H, G, Tq, d)  # [H, G, Tq, d] the query heads of each KV head's group
        qf = qg.reshape(H, G * Tq, d)  # [H, G*Tq, d]
        q_select = self._selection_query(layer, st, qg, k) if st.marks is not None else None
        st.exact.append(k[0], v[0])  # the new tokens are attended exactly from now on
        mask = None
        if Tq > 1:  # new token i of Tq sees the prompt and the generated tokens up to itself
            L = st.exact.k.shape[1]
            mask = torch.ones(Tq, L, dtype=torch.bool, device=q.device).tril(L - Tq).repeat(G, 1)  # [G*Tq, L]
        if st.marks is None:  # a dense layer: every token is exact
            out, _ = attention_lse(qf, st.exact.k, st.exact.v, mask)
            if self.policy.track:
                every = torch.ones(H, 1, device=q.device)  # [H, 1] all attended, all of the mass
                self.stats.add(layer, every, every)
            return out.view(1, n_heads, Tq, d).to(q.dtype)

        # 1. Score the landmarks, keep the top-k chunks per KV head (or per query head).
        exact = tracking.exact_pass(st.exact_k, qg, self.split.selected) if self.policy.track else None
        if exact is not None and self.policy.select.is_exact_top_k and not self.split.outlier_chunks:
            # The speed-up of a tracked oracle: its selection is the tracking pass's oracle, token for
            # token (same logits, same rule, same budget), so the exact scores are computed once, not
            # once to select and again to track.
            idx = exact[2]  # [H, S] the oracle's selection
        else:
            idx = self.select(layer, q_select)  # [P, S] middle rows

        # 2. Start fetching the selected rows from CPU memory (async on a GPU) ...
        fetch = self._start_fetch(layer, st, idx)

        # 3. ... and meanwhile attend to the exact tokens on the device.
        out_a, lse_a = attention_lse(qf, st.exact.k, st.exact.v, mask)

        # 4. The selected keys (fetched, or rebuilt), attention over them, the two softmaxes merged.
        got = self._finish_fetch(st, idx, fetch, d)  # per name [P, S, d] (dequantized if stored packed)
        self._keep_resident(st, idx, got, fetch)
        sel_k = st.keys.selected(got, idx, self.split, self.rope, q.dtype)  # [P, S, d] post-RoPE
        if idx.shape[0] == H:
            out_b, lse_b = attention_lse(qf, sel_k, got["v"])
        else:  # each query head attends to its own selection
            out_b, lse_b = attention_lse(qg.reshape(H * G, Tq, d), sel_k, got["v"])  # [P, Tq, d], [P, Tq]
            out_b, lse_b = out_b.view(H, G * Tq, d), lse_b.view(H, G * Tq)
        out = merge_attention(out_a, lse_a, out_b, lse_b)  # [H, G*Tq, d]

        self.last_selected[layer] = idx + self.split.sink  # [P, S] absolute positions
        if self.policy.track:  # one selection for the step; its attention mass at its last position
            probs, lse, oracle = exact  # [H, G, Tq, M], [H, G, Tq, 1], [H, S]
            last = (probs[:, :, -1:], lse[:, :, -1:], oracle[:, None])  # ..., [H, 1, S]
            tracking.track(self.stats, layer, qg[:, :, -1:], idx[:, None], st, last, self.split)
        return out.view(1, n_heads, Tq, d).to(q.dtype)

    def attend_forced(self, layer, q, k, v, pos, **asked):
        """A teacher-forced block of one layer: the Tq new tokens are the next tokens of a known answer
        (the gold-forced rows of an evaluation, PAPER.md "Gold-forced rows"), and each selects, fetches
        and attends as its own decode step would (`attend` with one token): scores [P, Tq, N], the top-k
        of every position, its own rows, and the answer tokens up to itself. So one call does the work
        of Tq decode steps in a few large ops; only the shapes of the products change, so only the last
        bits may. A policy whose selection depends on the state the last step left (a `stateful`
        landmark kind: LRQK) selects its positions one after the other inside the block (`_step_selections`); its
        attention is batched like every other's.

        Unlike `attend` with Tq > 1 (one multi-token query step: the positions select once, together,
        their scores summed: PAPER.md "ShadowKV, precisely"), no position here sees a later one.
        """
        st = self.layers[layer]
        B, n_heads, Tq, d = q.shape
        H = k.shape[1]
        G = n_heads // H
        split = self.split
        self._speculate(layer, asked)
        qg = q[0].view(H, G, Tq, d)  # [H, G, Tq, d]
        qf = qg.reshape(H, G * Tq, d)  # [H, G*Tq, d]
        stepping = st.marks is not None and st.marks.stateful
        if stepping:  # LRQK: steps 1 and 2 position by position, each token joining after its selection
            idx, got = self._step_selections(layer, st, qg, k, v)  # [P, Tq, S], per name [P, Tq*S, d]
        else:
            q_select = self._selection_query(layer, st, qg, k) if st.marks is not None else None
            st.exact.append(k[0], v[0])  # the block's tokens: position i sees the prompt and the answer to i
        L = st.exact.k.shape[1]
        mask = torch.ones(Tq, L, dtype=torch.bool, device=q.device).tril(L - Tq).repeat(G, 1)  # [G*Tq, L]
        if st.marks is None:  # a dense layer: every token is exact
            out, _ = attention_lse(qf, st.exact.k, st.exact.v, mask)
            if self.policy.track:
                every = torch.ones(H, Tq, device=q.device)  # [H, Tq] all attended, all of the mass
                self.stats.add(layer, every, every)
            return out.view(1, n_heads, Tq, d).to(q.dtype)

        # 1. Each position scores the landmarks and keeps its own top-k chunks; 2. fetch every position's
        # rows (resident ones: only what the position before did not hold). (LRQK: done above.)
        exact = (
            tracking.exact_pass(st.exact_k, qg, split.selected, each_position=True)
            if self.policy.track
            else None
        )
        if not stepping:
            if exact is not None and self.policy.select.is_exact_top_k and not split.outlier_chunks:
                idx = exact[2]  # [H, Tq, S] the oracle's selections (see `attend`)
            else:
                idx = self.select(layer, q_select, each_position=True)  # [P, Tq, S] middle rows
            rows = idx.flatten(1)  # [P, Tq*S]
            if self.policy.keys.resident:
                got = self._fetch_resident_forced(layer, st, idx)  # per name [P, Tq*S, d]
            else:
                got = self._finish_fetch(st, rows, self._start_fetch(layer, st, rows), d)
        P, _, S = idx.shape

        # 3. Attention over the exact tokens, causal over the answer ...
        out_a, lse_a = attention_lse(qf, st.exact.k, st.exact.v, mask)  # [H, G*Tq, d], [H, G*Tq]

        # 4. ... and each position over its own selected rows: a batch of P * Tq attentions, merged.
        sel_k = st.keys.selected(got, idx.view(P, Tq * S), split, self.rope, q.dtype)  # [P, Tq*S, d]
        rows_k, rows_v = sel_k.reshape(P * Tq, S, d), got["v"].reshape(P * Tq, S, d)  # [P*Tq, S, d]
        if P == H:  # the G query heads of a KV head's group share its selection
            out_b, lse_b = attention_lse(qg.transpose(1, 2).reshape(H * Tq, G, d), rows_k, rows_v)
            out_b = out_b.view(H, Tq, G, d).transpose(1, 2).reshape(H, G * Tq, d)  # [H, G*Tq, d]
            lse_b = lse_b.view(H, Tq, G).transpose(1, 2).reshape(H, G * Tq)  # [H, G*Tq]
        else:  # each query head attends its own selection
            out_b, lse_b = attention_lse(qg.reshape(P * Tq, 1, d), rows_k, rows_v)  # [P*Tq, 1, d], [P*Tq, 1]
            out_b, lse_b = out_b.view(H, G * Tq, d), lse_b.view(H, G * Tq)
        out = merge_attention(out_a, lse_a, out_b, lse_b)  # [H, G*Tq, d]

        self.last_selected[layer] = idx + split.sink  # [P, Tq, S] absolute positions
        if self.policy.track:
            tracking.track(self.stats, layer, qg, idx, st, exact, split)
        return out.view(1, n_heads, Tq, d).to(q.dtype)

    def _step_selections(self, layer, st, qg, k, v):
        """Steps 1 and 2 of a teacher-forced block for a policy whose selection depends on the state the
        last step left (a stateful kind, LRQK: each new query is fitted to the rows resident from the
        last step, and its factors move with every step): one position after the other, as its decode
        steps would (`_selection_query`, `select`, the resident fetch), each position's token joining
        the exact tokens after its own selection. Returns idx [P, Tq, S] and per name the rows
        [P, Tq*S, d]; the attention over them is batched by the caller."""
        H, G, Tq, d = qg.shape
        idx, rows = [], {}
        for i in range(Tq):
            q_now = self._selection_query(layer, st, qg[:, :, i : i + 1], k[:, :, i : i + 1])  # [H, G, 1, r]
            st.exact.append(k[0, :, i : i + 1], v[0, :, i : i + 1])
            idx.append(self.select(layer, q_now))  # [P, S]
            fetch = self._start_fetch(layer, st, idx[-1])
            got = self._finish_fetch(st, idx[-1], fetch, d)  # [P, S, d] each
            self._keep_resident(st, idx[-1], got, fetch)
            for name, t in got.items():
                rows.setdefault(name, []).append(t)
        return torch.stack(idx, dim=1), {n: torch.stack(t, dim=1).flatten(1, 2) for n, t in rows.items()}

    def _fetch_resident_forced(self, layer, st, idx) -> dict:
        """The rows of a teacher-forced block for a policy that keeps them resident (Keys.resident:
        ArkVale's pages): position i finds on the device what position i - 1 selected (the block's first
        position: what the last call left, st.resident), as its decode step would, and only the other
        rows, the misses, are fetched and counted. A row selected again is the bytes fetched at the start
        of its run (or resident from the last call): every copy of a (head, row) is the same, so each
        selected row is read from any of them. Returns per name [P, Tq*S, d]; leaves st.resident as the
        block's last position has it, and counts the hits."""
        P, Tq, S = idx.shape
        H, M = st.exact.k.shape[0], self.split.n_chunks * self.split.chunk
        before = idx[:, :-1]  # [P, Tq - 1, S] the selection each later position finds on the device
        if st.resident is not None:
            before = torch.cat([st.resident.idx[:, None], before], dim=1)  # [P, Tq, S]
        after = idx[:, Tq - before.shape[1] :].contiguous()  # [P, T', S] the positions that have one
        slot = torch.searchsorted(before.contiguous(), after).clamp_(max=S - 1)  # [P, T', S]
        hit = torch.zeros_like(idx, dtype=torch.bool)  # [P, Tq, S]
        hit[:, Tq - before.shape[1] :] = before.gather(2, slot) == after
        miss = (~hit).nonzero(as_tuple=True)  # ([n], [n], [n]): head, position and place of each miss
        names = st.keys.fetched
        fetched = self.store.fetch(layer, names, idx[miss], heads=miss[0] // (P // H)).wait()  # [n, d] each
        head = torch.arange(P, device=idx.device)
        have = miss[0] * M + idx[miss]  # [n] (head, row) of each fetched copy
        sources = dict(zip(names, fetched))
        if st.resident is not None:  # the rows the last call left on the device
            have = torch.cat([(head[:, None] * M + st.resident.idx).flatten(), have])  # [P*S + n]
            sources = {n: torch.cat([st.resident.rows[n].flatten(0, 1), sources[n]]) for n in names}
        have, order = have.sort(stable=True)
        want = (head[:, None, None] * M + idx).flatten()  # [P*Tq*S]
        at = order[torch.searchsorted(have, want)]  # each selected row's copy
        rows = {n: sources[n][at].view(P, Tq * S, -1) for n in names}  # [P, Tq*S, d]
        st.resident = Resident(
            idx[:, -1], {n: r.view(P, Tq, S, -1)[:, -1].contiguous() for n, r in rows.items()}
        )
        self.stats.add_hits(int(hit.sum()), hit.numel())
        return rows

    def _selection_query(self, layer, st, qg, k) -> torch.Tensor:
        """The query step 1 scores the landmarks with, [H, G, Tq, d']: this step's own query; the one the
        model speculated one layer earlier (InfiniGen); or, for LRQK, its coordinates q^, fitted to the
        keys on the device before this step's token joins them (LowRankQK.step)."""
        H, G, Tq, d = qg.shape
        if "next_query" in self.asks:
            if self.speculated[layer] is None:
                raise ValueError(
                    f"layer {layer}: the model handed no next_query for it; decode through model.forward, "
                    "which hands a cache what its `asks` names"
                )
            return self.speculated[layer].view(H, G, Tq, d)
        if not st.marks.stateful:
            return qg
        if Tq != 1:
            raise ValueError("LRQK fits each new query on its own: decode one token per step")
        res = st.resident  # the rows selected at the last step, per query head [P, S, d]
        pos = torch.cat(
            [
                st.exact.prompt_pos,
                self.prompt_len
                + torch.arange(st.exact.k.shape[1] - st.exact.n_prompt, device=qg.device).expand(H, -1),
            ],
            dim=1,
        )  # [H, F + Tg]
        on_device = torch.cat([res.rows["k"], st.exact.k.repeat_interleave(G, dim=0)], dim=1)  # [P, R, d]
        pos = torch.cat([res.idx + self.split.sink, pos.repeat_interleave(G, dim=0)], dim=1)  # [P, R]
        q_new, k_new = qg.reshape(H * G, 1, d), k[0].repeat_interleave(G, dim=0)  # [P, 1, d] each
        q_hat, st.step_state = st.marks.step(st.step_state, q_new, k_new, on_device, pos)  # [P, 1, r]
        return q_hat.view(H, G, 1, -1)  # [H, G, 1, r]

    def _start_fetch(self, layer, st, idx):
        """Step 2: start copying the rows idx [P, S] selects from CPU memory; returns (plan, Fetch).
        A query head reads its KV head's rows. With Keys.resident only the rows not on the device from
        the last step are fetched (the misses); `plan` says where each row comes from."""
        names, (P, S), H = st.keys.fetched, idx.shape, st.exact.k.shape[0]
        if self.token_rows:  # the paper's K/V: whole tokens, one row each
            return None, self.store.fetch(layer, names, idx.reshape(1, -1))
        if not self.policy.keys.resident:
            return None, self.store.fetch(layer, names, idx.view(H, -1))  # [H, S] or [H, G*S] rows
        res = st.resident
        if res is None:  # the first step: nothing is on the device yet
            hit = torch.zeros(P, S, dtype=torch.bool, device=idx.device)
            slot = None
        else:
            slot = torch.searchsorted(res.idx, idx).clamp_(max=S - 1)  # [P, S] where each row would be
            hit = res.idx.gather(1, slot) == idx  # [P, S]
        miss = (~hit).nonzero(as_tuple=True)  # ([n], [n]): selecting head and place of each miss
        fetch = self.store.fetch(layer, names, idx[miss], heads=miss[0] // (P // H))  # [n, d] each
        return (hit, slot, miss), fetch

    def _finish_fetch(self, st, idx, pending, d) -> dict:
        """Step 4's input: wait for the fetch; per name the selected rows [P, S, d] (dequantized), the
        resident ones (Keys.resident) read from where they sat at the last step."""
        plan, fetch = pending
        names, (P, S), H = st.keys.fetched, idx.shape, st.exact.k.shape[0]
        got = fetch.wait()
        if self.token_rows:  # [1, H*S, H*d] whole tokens: keep head h's channels of the rows head h selected
            got = [t.view(H, -1, H, d).diagonal(dim1=0, dim2=2).permute(2, 0, 1) for t in got]  # [H, S, d]
            return dict(zip(names, got))
        if plan is None:
            return {name: t.view(P, S, -1) for name, t in zip(names, got)}  # [P, S, d]
        hit, slot, miss = plan
        rows = {}
        for name, fetched in zip(names, got):
            out = fetched.new_empty(P, S, fetched.shape[-1])  # [P, S, d]
            if slot is not None:  # the hits, from where they sat at the last step
                kept = st.resident.rows[name].gather(1, slot[..., None].expand(-1, -1, out.shape[-1]))
                out[hit] = kept[hit]
            out[miss] = fetched
            rows[name] = out
        return rows

    def _keep_resident(self, st, idx, rows, pending):
        """Keys.resident: the rows idx [P, S] just selected stay on the device for the next step, and the
        step's hits (selected rows that were there already) are counted."""
        plan, _ = pending
        if plan is not None:
            hit = plan[0]  # [P, S]
            st.resident = Resident(idx, rows)
            self.stats.add_hits(int(hit.sum()), hit.numel())

    # ---------------------------------------------------------------- memory accounting
    def memory(self, exact_bytes=2) -> dict:
        """Bytes on the device and offloaded, from the real tensors (packed codes, not copies).

        Counts the prompt's cache only (generated tokens are the same for every policy). Exact
        (unquantized) tensors count `exact_bytes` per value: 2 = bf16, the paper's accounting, in
        whatever dtype this run computes; None = their real size. `full_bf16` is the exact prompt
        K/V in bf16, the reference of every fraction; the device share splits into
        `summary_fraction` (landmarks, low-rank factors: what the paper's ~14% and ~6.6% count),
        `exact_fraction` (sink, local window and outlier tokens kept exact; every token of a dense
        layer) and `resident_fraction` (Keys.resident: the rows selected at the last step, kept on the
        device for the next one, one per selected token and selecting head; none before the first step).
        """

        def size(t):
            if isinstance(t, torch.Tensor):
                return t.numel() * (exact_bytes or t.element_size())
            return quantize.nbytes(t)  # quantized: the packed codes and scales as stored

        H, _, d = self.layers[0].exact.k.shape
        full_bf16 = self.prompt_len * len(self.layers) * 2 * H * d * 2
        sparse = [st for st in self.layers if st.marks is not None]
        summary = sum(st.marks.nbytes(exact_bytes) + st.keys.device_bytes(exact_bytes) for st in sparse)
        exact = sum(
            size(st.exact.k[:, : st.exact.n_prompt]) + size(st.exact.v[:, : st.exact.n_prompt])
            for st in self.layers
        )
        resident = sum(size(t) for st in sparse if st.resident is not None for t in st.resident.rows.values())
        off = sum(size(t) for t in self.store.tensors.values())
        if not self.policy.offload:  # the "store" is on the device
            return _memory(full_bf16, 0, exact, summary, resident, on_device=off)
        return _memory(full_bf16, off, exact, summary, resident)


def _memory(full_bf16, offloaded, exact, summary, resident=0, on_device=0) -> dict:
    dev = summary + exact + resident + on_device
    ref = max(full_bf16, 1)
    return dict(
        device=dev,
        offloaded=offloaded,
        full_bf16=full_bf16,
        device_fraction=dev / ref,
        summary_fraction=summary / ref,
        exact_fraction=exact / ref,
        resident_fraction=resident / ref,
    )


def from_kv(k, v, policy: Policy | None = None, rope=None, device=None, q=None, calibration=None, arch=None):
    """The cache of `policy` holding the prompt K/V given per layer ([1, n_kv_heads, T, head_dim] each,
    post-RoPE; `rope` is the model's, which low-rank and pre-RoPE keys need): the one way to make a
    cache from existing keys and values (an earlier prefill, or synthetic K/V for a benchmark).
    q: the prompt's queries per layer ([1, n_heads, T, head_dim]), for the policies whose landmarks
    need them (LRQK); calibration: InfiniGen's skews and masks (skew.calibration) for "skewed" ones;
    arch: the model's architecture (config.json's `architectures`), for LRQK's rank (landmarks.LowRankQK.rank).

    A SparseCache, or a FullCache for full attention and for a prompt shorter than the policy's
    budget (with a warning: it has nothing to select from).
    """
    policy = policy or PRESETS["full"]
    if not k or len(k) != len(v) or any(t is None for t in k + v):
        raise ValueError("from_kv: need the K and V of every layer")
    T = k[0].shape[2]
    split = split_budget(policy, T) if policy.sparse else None
    if split is None:
        if policy.sparse:
            warnings.warn(
                f"prompt of {T} tokens is shorter than the {policy.label()} budget: using full attention for it",
                stacklevel=2,
            )
        full = FullCache(len(k), policy)
        full.k, full.v, full.prompt_len = list(k), list(v), T
        return full
    if k[0].shape[0] != 1:
        raise ValueError(f"the {policy.name} policy holds one sequence; got a batch of {k[0].shape[0]}")
    if policy.select.kind.needs_queries and (q is None or any(t is None for t in q)):
        raise ValueError(
            f"the {policy.name} policy builds its landmarks from the prefill's queries too: prefill a "
            "FullCache(n_layers, keep_queries=True), or give q"
        )
    if policy.select.kind.needs_calibration:
        policy.select.kind.check_calibration(
            calibration, policy.name, policy.select.kind_params, len(k), k[0].shape[-1]
        )
    cache = SparseCache(policy, rope, split, len(k), device if device is not None else k[0].device)
    for layer in range(len(k)):
        prefill = LayerPrefill(k[layer][0], split.middle, q=None if q is None else q[layer][0], arch=arch)
        if calibration is not None:
            prefill.skew, prefill.mask = calibration["skew"][layer], calibration["mask"][layer]
        cache.layers[layer] = cache.build_layer(layer, k[layer][0], v[layer][0], prefill)
    return cache


def from_prefill(prefill: FullCache, policy: Policy, rope, row: int = 0, calibration=None):
    """The cache of `policy` built from the prompt K/V of row `row` of a prefilled FullCache: an
    evaluation prefills each prompt once and compares every policy on it (views, not copies). The
    prefill's queries, if it kept them, go along (LRQK needs them), and so does the architecture of the
    model that filled it (LRQK's rank); calibration: see from_kv."""
    if not isinstance(prefill, FullCache) or prefill.k[0] is None:
        raise ValueError("from_prefill: the cache holds no prompt K/V (prefill a FullCache first)")
    rows = lambda ts: None if ts[0] is None else [t[row : row + 1] for t in ts]
    k, v, q = rows(prefill.k), rows(prefill.v), rows(prefill.q)
    return from_kv(k, v, policy, rope, q=q, calibration=calibration, arch=prefill.arch)


class StackedCache:
    """Several caches behind one batch: row i of every call goes to caches[i].

    Lets an evaluation decode all policies as one batch, reading the weights once per step.
    """

    def __init__(self, caches):
        self.caches = caches
        self.asks = tuple(sorted({a for c in caches for a in c.asks}))

    @property
    def seq_len(self):
        lens = {c.seq_len for c in self.caches}
        if len(lens) != 1:
            raise ValueError(f"stacked caches disagree on the sequence length: {sorted(lens)}")
        return lens.pop()

    def attend(self, layer, q, k, v, pos, **asked):
        outs = []
        for i, c in enumerate(self.caches):
            q_i, k_i, v_i = q[i : i + 1], k[i : i + 1], v[i : i + 1]  # row i: [1, heads, T, head_dim]
            outs.append(c.attend(layer, q_i, k_i, v_i, pos, **{a: t[i : i + 1] for a, t in asked.items()}))
        return torch.cat(outs, dim=0)  # [B, n_heads, T, head_dim]


class TeacherForced:
    """A cache fed a known answer several tokens per call (teacher forcing: the gold-forced rows of an
    evaluation, PAPER.md "Gold-forced rows"): the model's `attend` calls go to the cache's
    `attend_forced`, where each new token selects, fetches and attends as its own decode step would.
    model(answer_ids, TeacherForced(cache)) is then the decode loop's arithmetic in one forward."""

    def __init__(self, cache):
        self.cache = cache
        self.asks = cache.asks

    @property
    def seq_len(self) -> int:
        return self.cache.seq_len

    def attend(self, layer, q, k, v, pos, **asked):
        return self.cache.attend_forced(layer, q, k, v, pos, **asked)


# -------------------------------------------------------------------- attention pieces
def append(buf, cached, new):
    """Write new [..., T, d] after cached [..., S, d] (or None); returns (buffer, view of S + T rows).

    buf is this cache's own buffer (None at first), with spare rows behind the cached ones and grown
    by a quarter when full, so a decode step writes one row instead of copying the whole cache (as
    torch.cat would). A cache never writes into a buffer it does not own (from_prefill shares views).
    """
    if cached is None:
        return None, new
    S, T = cached.shape[-2], new.shape[-2]
    if buf is None or buf.shape[-2] < S + T:
        buf = cached.new_empty(*cached.shape[:-2], S + T + max(64, S // 4), cached.shape[-1])  # [..., cap, d]
        buf[..., :S, :] = cached
    buf[..., S : S + T, :] = new
    return buf, buf[..., : S + T, :]


def full_attention(q, k, v):
    """Causal attention of T new queries over S cached keys (the last T of which are the new ones).

    q: [B, n_heads, T, d]; k, v: [B, n_kv_heads, S, d]. Query head h reads KV head h // group
    (grouped-query attention, without copying K/V per query head).
    """
    T, S = q.shape[2], k.shape[2]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if T == 1:
        return sdpa(q, k, v, enable_gqa=True)
    if T == S:
        return sdpa(q, k, v, is_causal=True, enable_gqa=True)
    # query i (absolute S - T + i) sees keys 0 .. S - T + i
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)  # [T, S]
    return sdpa(q, k, v, attn_mask=mask, enable_gqa=True)


def attention_lse(q, k, v, mask=None):
    """Softmax attention that also returns the log-sum-exp of the scores, so two parts merge exactly.

    q: [H, Q, d]; k, v: [H, L, d]; mask: [Q, L] bool (True = may attend) or None.
    returns out [H, Q, d] (float32), lse [H, Q].
    """
    s = (q.float() / math.sqrt(q.shape[-1])) @ k.float().transpose(1, 2)  # [H, Q, L]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s.softmax(dim=-1) @ v.float(), s.logsumexp(dim=-1)  # [H, Q, d], [H, Q]


def merge_attention(out_a, lse_a, out_b, lse_b):
    """Combine attention over two disjoint key sets: weight each part by its share of the softmax sum."""
    w_a = torch.sigmoid(lse_a - lse_b)[..., None]  # = e^lse_a / (e^lse_a + e^lse_b)
    return torch.lerp(out_b, out_a, w_a)  # out_a * w_a + out_b * (1 - w_a)


# -------------------------------------------------------------------- ShadowKV's low-rank keys
def low_rank_keys(k_pre, rank):
    """Rank-r SVD of the pre-RoPE keys of all KV heads together (ShadowKV).

    k_pre: [H, M, d]. The heads are concatenated into one [M, H*d] matrix and share one basis.
    rank: an int, or a share (< 1) of H*d (ShadowKV: 160 of 1024).
    returns u [M, r] and sv = S V^T [r, H*d], with k_pre ~= (u @ sv) split back into heads.
    """
    H, M, d = k_pre.shape
    r = round(rank * H * d) if rank < 1 else int(rank)
    r = max(1, min(r, H * d, M))
    mat = k_pre.transpose(0, 1).reshape(M, H * d).float()  # [M, H*d]
    U, S, Vh = torch.linalg.svd(mat, full_matrices=False)  # [M, C], [C], [C, H*d]
    # contiguous: LAPACK returns U column-major, and a decode step gathers rows of it
    return U[:, :r].to(k_pre.dtype).contiguous(), (S[:r, None] * Vh[:r]).to(k_pre.dtype)  # [M, r], [r, H*d]


def rebuild_keys(u, sv, idx, H, d):
    """Pre-RoPE keys of rows idx [H, S] of head h from the shared factors: u[idx] @ sv[:, head h]."""
    sv_heads = sv.view(-1, H, d).transpose(0, 1)  # [H, r, d]
    u_rows = u.index_select(0, idx.flatten()).view(*idx.shape, -1)  # [H, S, r]
    return u_rows @ sv_heads  # [H, S, r] @ [H, r, d] -> [H, S, d]
