"""The KV cache, and the selection policies that decide what each decode step attends to.

The model (model.py) calls, in every layer,

    out = cache.attend(layer, q, k, v, pos)
        q:    [B, n_heads, T, head_dim]     post-RoPE queries of the T new tokens
        k, v: [B, n_kv_heads, T, head_dim]  post-RoPE keys and values of the T new tokens
        pos:  [T] int64                     their absolute positions
        out:  [B, n_heads, T, head_dim]     attention output (before o_proj)

and never needs to know which policy runs. The first call for a layer is the *prefill*:
exact causal attention over the whole prompt, after which the policy builds its summary of
the prompt's keys. Every later call is a *decode* step, where the policy picks which prompt
tokens to read (PAPER.md "The problem").

Policies (PAPER.md "ShadowKV, precisely" and "The paper's method"). Every one of them is a
combination of three choices, and the names are presets of those choices:

    name        landmarks (what selection scores)    keys attended         extra exact tokens
    full        -- (no selection)                    exact                 --
    oracle      every exact key (chunk 1)            exact                 --
    mean        mean of each chunk of c exact keys   exact                 --
    svd         every exact key (chunk 1)            rank-r SVD rebuild    --
    shadowkv    mean of each chunk of 8 keys         rank-r SVD rebuild    outlier chunks
    quantized   every key, quantized (2 bits)        exact                 --

so `mean` isolates the landmark failure, `svd` isolates the low-rank failure, `shadowkv` has
both, and `quantized` is the paper's fix: token-level landmarks made cheap by quantization.

One budget accounting for all of them: `sink` first tokens and `local` last prompt tokens are
always attended exactly, plus `round(budget * prompt_len)` selected tokens (and, for ShadowKV,
its outlier chunks). Tokens generated after the prompt are always attended exactly.
"""

import math
import warnings
from dataclasses import dataclass, replace

import torch

import landmarks as lm
import quantize
from offload import OffloadStore

POLICIES = ("full", "oracle", "mean", "svd", "shadowkv", "quantized")


@dataclass
class Policy:
    """What a cache keeps and how it selects. Build one with `make_policy(name, ...)`.

    budget:      selected prompt tokens as a share of the prompt (paper: 3.125%)
    sink, local: first / last prompt tokens always attended exactly (paper: local window 64)
    chunk_size:  tokens per landmark (ShadowKV: 8; the paper's fix: 1)
    landmark_bits: None = landmarks kept exact, else a landmarks.parse_format spec ("2", "fp8", ...)
    residual:    meta-chunk size m for residual landmark quantization (0 = off); the residual is
                 quantized with `residual_bits`
    rank:        None = exact keys; else rank of the SVD of the pre-RoPE keys, as an int or as a
                 share (< 1) of kv_heads * head_dim (ShadowKV: 160 of 1024 = 0.15625)
    outliers:    ShadowKV outlier chunks kept exact; None = ShadowKV's ratio, 48 chunks per 2048
                 selected tokens, scaled to this budget
    offload:     keep the prompt's K/V in CPU memory (offload.py); False keeps all on the device
    kv_bits:     None = the offloaded K/V are kept exact; else a landmarks.parse_format spec ("4",
                 "int4", ...): they are stored quantized, fetched packed, dequantized on the device
    track:       record selection statistics against the oracle (costs an exact scoring pass)
    """

    name: str = "full"
    budget: float = 0.03125
    sink: int = 4
    local: int = 64
    chunk_size: int = 1
    landmark_bits: str | None = None
    residual: int = 0
    residual_bits: str = "1"
    rank: float | None = None
    outliers: int | None = 0
    offload: bool = True
    kv_bits: str | None = None
    track: bool = False

    def label(self):
        """Short name for tables: 'shadowkv', 'mean c8', 'quantized 2b', 'svd r0.16', 'oracle kv4'."""
        kv = f" kv{self.kv_bits}" if self.kv_bits else ""
        if self.name == "mean":
            return f"mean c{self.chunk_size}{kv}"
        if self.name == "quantized":
            res = f" res{self.residual}x{self.residual_bits}" if self.residual else ""
            chunk = f" c{self.chunk_size}" if self.chunk_size != 1 else ""
            bits = f"{self.landmark_bits}b" if str(self.landmark_bits).isdigit() else self.landmark_bits
            return f"quantized {bits}{chunk}{res}{kv}"
        if self.name == "svd":
            return f"svd r{self.rank:g}{kv}"
        return self.name + kv


def make_policy(name, **overrides):
    """The preset for `name` (see the module docstring), with any field overridden.

    Raises a one-line ValueError for an unknown name or an out-of-range value.
    """
    presets = {
        "full": dict(),
        "oracle": dict(chunk_size=1),
        "mean": dict(chunk_size=8),
        "svd": dict(chunk_size=1, rank=0.15625),
        "shadowkv": dict(chunk_size=8, rank=0.15625, outliers=None),
        "quantized": dict(chunk_size=1, landmark_bits="2"),
    }
    if name not in presets:
        raise ValueError(f"unknown method {name!r}: choose from {', '.join(POLICIES)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}  # None = keep the preset
    p = replace(Policy(name=name, **presets[name]), **overrides)
    if not 0 < p.budget <= 1:
        raise ValueError(f"budget {p.budget} is out of range: give a share of the prompt in (0, 1]")
    if p.chunk_size < 1 or p.sink < 0 or p.local < 0:
        raise ValueError("chunk_size must be >= 1 and sink, local >= 0")
    if p.rank is not None and p.rank <= 0:
        raise ValueError(f"rank {p.rank} must be > 0 (an int, or a share of the channels below 1)")
    if p.kv_bits is not None:
        if p.name == "full":
            raise ValueError("kv_bits quantizes the offloaded K/V of a sparse policy; full attention has none")
        quantize.parse_format(p.kv_bits)  # raises on an unknown format
    if p.landmark_bits is not None:
        quantize.parse_format(p.landmark_bits)  # raises on an unknown format
        if p.residual:
            quantize.parse_format(p.residual_bits)
    return p


@dataclass
class LayerState:
    """What a sparse policy keeps for one layer after the prefill (batch of one)."""

    exact_k: torch.Tensor  # [H, F + Tg, d] keys always attended: sink, local, outliers, then generated
    exact_v: torch.Tensor  # [H, F + Tg, d]
    fixed_pos: torch.Tensor  # [H, F] positions of the F prompt tokens among them
    landmarks: object  # [H, N, d] tensor, or a landmarks.Quantized of it
    masked: torch.Tensor | None  # [H, N] bool: chunks removed from selection (outliers)
    u: torch.Tensor | None = None  # [M, r] low-rank factor of the middle's pre-RoPE keys (on device)
    sv: torch.Tensor | None = None  # [r, H * d] S @ V^T
    kbuf: torch.Tensor | None = None  # the buffers exact_k / exact_v grow in (see append)
    vbuf: torch.Tensor | None = None

    @property
    def n_fixed(self):
        return self.fixed_pos.shape[1]


class KVCache:
    """Every layer's keys and values, and attention over them under a selection policy.

    Sparse policies hold a batch of one sequence (stack several with StackedCache).
    """

    def __init__(self, config, rope, policy=None, device="cpu"):
        self.config = config
        self.rope = rope
        self.policy = policy or Policy("full")
        self.device = torch.device(device)
        self.store = OffloadStore(self.device, offload=self.policy.offload)
        self.k = [None] * config.n_layers  # full attention: per layer [B, n_kv_heads, S, head_dim]
        self.v = [None] * config.n_layers
        self.kbuf = [None] * config.n_layers  # the buffers self.k / self.v are views of (see append)
        self.vbuf = [None] * config.n_layers
        self.layers = [None] * config.n_layers  # sparse policies: per layer a LayerState
        self.prompt_len = 0
        self.sparse = False  # becomes True once a sparse policy has built its summary
        self.plan = None  # the budget split, set at the prefill (see budget_line)
        self.stats = Stats(config.n_layers)
        self.kv_format = None  # (format, channels, group) of the offloaded K/V when policy.kv_bits is set
        self.last_selected = [None] * config.n_layers  # per layer [H, S] positions, last decode step

    # ---------------------------------------------------------------- bookkeeping
    @property
    def seq_len(self):
        if self.sparse:
            st = self.layers[0]
            return self.prompt_len + st.exact_k.shape[1] - st.n_fixed
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def budget_line(self):
        """'budget = 4 sink + 64 local + 64 selected (+ 16 outliers) of 2048 tokens'."""
        if self.plan is None:
            return f"budget = all {self.prompt_len} tokens (full attention)"
        p = self.plan
        out = f" (+ {p['outlier_tokens']} outliers)" if p["outlier_tokens"] else ""
        return (f"budget = {p['sink']} sink + {p['local']} local + {p['selected']} selected{out}"
                f" of {self.prompt_len} tokens")

    # ---------------------------------------------------------------- the model's entry point
    def attend(self, layer, q, k, v, pos):
        if self.sparse:
            return self._decode(layer, q, k, v)
        if self.k[layer] is None and layer == 0:
            self.prompt_len = k.shape[2]  # the first call is the prefill
        self.kbuf[layer], self.k[layer] = append(self.kbuf[layer], self.k[layer], k)  # [B, n_kv_heads, S, d]
        self.vbuf[layer], self.v[layer] = append(self.vbuf[layer], self.v[layer], v)
        out = full_attention(q, self.k[layer], self.v[layer])
        if self.policy.name != "full" and layer == self.config.n_layers - 1 and self.k[0].shape[2] == k.shape[2]:
            self.build()  # end of the prefill: the prompt is complete in every layer
        return out

    # ---------------------------------------------------------------- prefill: build the summary
    @classmethod
    def from_prefill(cls, cache, policy, row=0):
        """A new cache with `policy`, built from the prompt K/V of an already prefilled cache.

        Lets an evaluation prefill each prompt once and compare every policy on it.
        """
        new = cls(cache.config, cache.rope, policy, cache.device)
        new.k = [k[row:row + 1] for k in cache.k]
        new.v = [v[row:row + 1] for v in cache.v]
        new.prompt_len = cache.prompt_len
        if policy.name != "full":
            new.build()
        return new

    def plan_budget(self, T):
        """Split a prompt of T tokens into sink | middle (N chunks of c) | local, and size the selection.

        The middle's length is cut to a multiple of the chunk size; the remainder joins the local
        window. Returns None when the selection (plus any outlier chunks) needs more tokens than the
        middle holds: such a prompt is shorter than the budget and gets full attention. (A selection
        of exactly the whole middle still runs the sparse path; the invariant tests use that.)
        """
        p, c = self.policy, self.policy.chunk_size
        sink = min(p.sink, T)
        local = min(p.local, T - sink)
        n_chunks = (T - sink - local) // c
        local = T - sink - n_chunks * c
        selected = max(c, round(p.budget * T) // c * c)
        if p.outliers is None:  # ShadowKV: 48 outlier chunks per 2048 selected tokens
            outliers = round(48 * selected / 2048)
        else:
            outliers = p.outliers
        if selected + outliers * c > n_chunks * c:
            return None
        return dict(sink=sink, local=local, n_chunks=n_chunks, chunk=c, selected=selected,
                    k_chunks=selected // c, outliers=outliers, outlier_tokens=outliers * c)

    def build(self):
        """Turn the exact prompt K/V (self.k, self.v) into the policy's summary, layer by layer."""
        T = self.k[0].shape[2]
        if self.k[0].shape[0] != 1:
            raise ValueError(f"the {self.policy.name} policy holds one sequence; got a batch of {self.k[0].shape[0]}")
        self.prompt_len = T
        self.plan = self.plan_budget(T)
        if self.plan is None:
            warnings.warn(f"prompt of {T} tokens is shorter than the {self.policy.label()} budget: "
                          "using full attention for it", stacklevel=2)
            return
        for layer in range(self.config.n_layers):
            self.layers[layer] = self._build_layer(layer, self.k[layer][0], self.v[layer][0])
            self.k[layer] = self.v[layer] = None  # the exact prompt K/V now live in the store
        self.sparse = True

    def _build_layer(self, layer, k, v):
        """k, v: [H, T, d] exact post-RoPE prompt keys and values of one layer."""
        p, plan = self.policy, self.plan
        H, T, d = k.shape
        c, s, N = plan["chunk"], plan["sink"], plan["n_chunks"]
        M = N * c
        mid = slice(s, s + M)
        k_mid, v_mid = k[:, mid], v[:, mid]  # [H, M, d]

        # Landmarks: the mean of each chunk of c keys (chunk 1: the keys themselves).
        marks, min_cos = lm.chunk_landmarks(k_mid, c)  # [H, N, d], [H, N]
        # ShadowKV outliers: the chunks whose mean represents its keys worst (lowest min cosine)
        # are kept exact and removed from selection.
        masked, out_tok = None, torch.empty(H, 0, dtype=torch.long, device=k.device)
        if plan["outliers"]:
            out_chunks = lm.select_topk(-min_cos, plan["outliers"])  # [H, n_out]
            masked = torch.zeros(H, N, dtype=torch.bool, device=k.device)
            masked.scatter_(1, out_chunks, True)
            out_tok = (out_chunks[:, :, None] * c + torch.arange(c, device=k.device)).flatten(1)  # [H, n_out*c]
        if p.landmark_bits is not None:
            exact_marks = marks
            if p.residual:
                marks = quantize.residual_quantize(marks, p.residual, p.landmark_bits, p.residual_bits)
            else:
                marks = quantize.quantize(marks, quantize.parse_format(p.landmark_bits))
            err = (quantize.dequantize(marks) - exact_marks.float()).pow(2).sum() / exact_marks.float().pow(2).sum()
            self.stats.landmark_error[layer] = err.item()

        # Exact tokens that stay on the device: sink, local window, outliers.
        ar = torch.arange(T, device=k.device)
        fixed_pos = torch.cat([ar[:s].expand(H, -1), out_tok + s, ar[s + M:].expand(H, -1)], dim=1)  # [H, F]
        fixed_k = k.gather(1, fixed_pos[..., None].expand(-1, -1, d))  # [H, F, d]
        fixed_v = v.gather(1, fixed_pos[..., None].expand(-1, -1, d))  # [H, F, d]

        # The middle goes to the offload store; low-rank policies keep only U on the device.
        u = sv = None
        if p.rank is not None:
            u, sv = low_rank_keys(self.rope.invert(k_mid, torch.arange(s, s + M, device=k.device)), p.rank)
        else:
            self._offload(layer, "k", k_mid)
        self._offload(layer, "v", v_mid)
        if p.track:
            self.stats.exact_k[layer] = k_mid  # for recall / mass statistics only, not counted (a view)
        return LayerState(fixed_k, fixed_v, fixed_pos, marks, masked, u, sv)

    def _offload(self, layer, name, x):
        """Put x [H, M, d] in the store: as it is, or quantized with policy.kv_bits, as the packed
        tensors of a landmarks.Quantized ("k.codes", "k.scales", ...; each row packed on its own, so
        the selected rows are fetched still packed: fewer bytes over PCIe)."""
        if self.policy.kv_bits is None:
            self.store.put(layer, name, x)
            return
        qx = quantize.quantize(x, quantize.parse_format(self.policy.kv_bits))
        for part in quantize.TENSOR_FIELDS:
            if getattr(qx, part) is not None:
                self.store.put(layer, f"{name}.{part}", getattr(qx, part))  # [H, M, ...]
        self.kv_format = (qx.fmt, qx.channels, qx.group)

    def _fetch(self, layer, names, idx):
        """Start fetching rows idx [H, S] of the offloaded tensors `names`; returns a function that
        waits for them and returns each as [H, S, d] (dequantized on the device if stored quantized)."""
        if self.policy.kv_bits is None:
            return self.store.fetch(layer, names, idx).wait
        parts = [(n, part) for n in names for part in quantize.TENSOR_FIELDS
                 if (layer, f"{n}.{part}") in self.store.tensors]
        fetch = self.store.fetch(layer, [f"{n}.{part}" for n, part in parts], idx)

        def wait():
            got = dict(zip(parts, fetch.wait()))  # (name, part) -> [H, S, ...] packed rows
            fmt, channels, group = self.kv_format
            return [quantize.dequantize(quantize.Quantized(got[n, "codes"], got.get((n, "scales")), got.get((n, "zeros")),
                                               fmt, channels, group)) for n in names]  # each [H, S, d] float32
        return wait

    # ---------------------------------------------------------------- decode
    def _decode(self, layer, q, k, v):
        """One decode step of one layer: select, fetch, attend (PAPER.md "ShadowKV, precisely")."""
        st, plan, p = self.layers[layer], self.plan, self.policy
        B, n_heads, Tq, d = q.shape
        H = k.shape[1]
        G = n_heads // H
        s, c = plan["sink"], plan["chunk"]
        st.kbuf, st.exact_k = append(st.kbuf, st.exact_k, k[0])  # [H, F + Tg, d]
        st.vbuf, st.exact_v = append(st.vbuf, st.exact_v, v[0])
        qg = q[0].view(H, G, Tq, d)  # [H, G, Tq, d] the query heads of each KV head's group

        # 1. Score the landmarks, drop outlier chunks, keep the top-k chunks per KV head.
        scores = lm.landmark_scores(qg, st.landmarks)  # [H, N]; quantized landmarks are scored as stored
        if st.masked is not None:
            scores = scores.masked_fill(st.masked, float("-inf"))
        chunks = lm.select_topk(scores, plan["k_chunks"])  # [H, k_chunks]
        idx = chunks if c == 1 else (chunks[:, :, None] * c + torch.arange(c, device=q.device)).flatten(1)  # [H, S]

        # 2. Start fetching the selected rows from CPU memory (async on a GPU) ...
        wait = self._fetch(layer, ("v",) if p.rank is not None else ("k", "v"), idx)

        # 3. ... and meanwhile do the on-device work: rebuild low-rank keys, attend to exact tokens.
        if p.rank is not None:
            sel_k = rebuild_keys(st.u, st.sv, idx, H, d).to(q.dtype)  # [H, S, d] pre-RoPE
            sel_k = self.rope.apply(sel_k.reshape(1, -1, d), (idx + s).flatten()).view(H, -1, d)  # post-RoPE
        qf = qg.reshape(H, G * Tq, d)  # [H, G*Tq, d]
        mask = None
        if Tq > 1:  # new token i of Tq sees the prompt and the generated tokens up to itself
            L = st.exact_k.shape[1]
            mask = torch.ones(Tq, L, dtype=torch.bool, device=q.device).tril(L - Tq).repeat(G, 1)  # [G*Tq, L]
        out_a, lse_a = attention_lse(qf, st.exact_k, st.exact_v, mask)

        # 4. Wait for the copy, attend to the selected tokens, merge the two softmaxes.
        if p.rank is not None:
            (sel_v,) = wait()  # [H, S, d]
        else:
            sel_k, sel_v = wait()  # [H, S, d] each
        out_b, lse_b = attention_lse(qf, sel_k, sel_v)
        out = merge_attention(out_a, lse_a, out_b, lse_b)  # [H, G*Tq, d]

        self.last_selected[layer] = idx + s  # [H, S] absolute positions
        if p.track:
            self._track(layer, qg, idx, sel_k, st)
        return out.view(1, n_heads, Tq, d).to(q.dtype)

    def _track(self, layer, qg, idx, sel_k, st):
        """Selection recall against the oracle, attention mass captured, key rebuild error.

        One exact pass: the logits of the query against the exact middle keys give both the
        oracle's selection (same rule, same budget) and, with the fixed and generated tokens, the
        exact attention weights whose share on the attended tokens is the attention mass.
        """
        H, G, Tq, d = qg.shape
        s = self.plan["sink"]
        k_mid = self.stats.exact_k[layer]  # [H, M, d]
        logits = lm.landmark_logits(qg, k_mid)  # [H, G, Tq, M]
        oracle = lm.select_topk(lm.scores_from_logits(logits), self.plan["selected"])  # [H, S]
        attended = idx
        if st.masked is not None:  # ShadowKV also attends its outlier tokens exactly
            out_pos = st.fixed_pos[:, s:s + self.plan["outlier_tokens"]] - s  # [H, n_out*c] middle rows
            attended = torch.cat([idx, out_pos], dim=1)
        hit = torch.zeros(k_mid.shape[:2], dtype=torch.bool, device=k_mid.device).scatter_(1, attended, True)  # [H, M]
        recall = hit.gather(1, oracle).float().mean(1)  # [H]
        # exact attention weights of the last query position over prompt middle + fixed + generated
        q_last = qg[:, :, -1:]  # later generated tokens are masked for earlier queries: use the last one
        logits_rest = lm.landmark_logits(q_last, st.exact_k)  # [H, G, 1, F + Tg]
        lse = torch.logsumexp(torch.cat([logits[:, :, -1:], logits_rest], dim=-1), dim=-1, keepdim=True)
        mass = ((logits[:, :, -1:] - lse).exp() * hit[:, None, None]).sum(-1) + (logits_rest - lse).exp().sum(-1)
        key_err = None
        if self.policy.rank is not None:
            true_k = k_mid.gather(1, idx[..., None].expand(-1, -1, d)).float()
            key_err = ((sel_k.float() - true_k).pow(2).sum() / true_k.pow(2).sum()).item()
        self.stats.add(layer, recall, mass.mean((1, 2)), key_err)

    # ---------------------------------------------------------------- memory accounting
    def memory(self, exact_bytes=2):
        """Bytes on the device and offloaded, from the real tensors (packed codes, not copies).

        Counts the prompt's cache only (generated tokens are the same for every policy). Exact
        (unquantized) tensors count `exact_bytes` per value: 2 = bf16, the paper's accounting, in
        whatever dtype this run computes; None = their real size. `full_bf16` is the exact prompt
        K/V in bf16, the reference of every fraction; the device share splits into
        `summary_fraction` (landmarks, low-rank factors: what the paper's ~14% and ~6.6% count)
        and `exact_fraction` (sink, local window and outlier tokens kept exact).
        """
        def size(t):
            if t is None:
                return 0
            if isinstance(t, torch.Tensor):
                return t.numel() * (exact_bytes or t.element_size())
            return quantize.nbytes(t)  # quantized: the packed codes and scales as stored

        cfg = self.config
        T = self.prompt_len or (0 if self.k[0] is None else self.k[0].shape[2])  # K/V set by hand: all prompt
        full_bf16 = T * cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * 2
        if not self.sparse:
            exact = sum(size(t[:, :, :T]) for t in self.k + self.v if t is not None)
            summary, off = 0, 0
        else:
            summary = sum(size(st.landmarks) + size(st.u) + size(st.sv) for st in self.layers)
            exact = sum(size(st.exact_k[:, :st.n_fixed]) + size(st.exact_v[:, :st.n_fixed]) for st in self.layers)
            # parts of quantized K/V ("k.codes", ...) count as stored; exact ones at exact_bytes
            off = sum(t.numel() * t.element_size() if "." in name else size(t)
                      for (_, name), t in self.store.tensors.items())
        dev = summary + exact
        if self.sparse and not self.policy.offload:  # the "store" is on the device
            dev, off = dev + off, 0
        ref = max(full_bf16, 1)
        return dict(device=dev, offloaded=off, full_bf16=full_bf16, device_fraction=dev / ref,
                    summary_fraction=summary / ref, exact_fraction=exact / ref)


class Stats:
    """Per-layer running means of the selection statistics (PAPER.md: recall against the oracle)."""

    def __init__(self, n_layers):
        self.recall = torch.zeros(n_layers)  # sum over steps of the mean over KV heads
        self.mass = torch.zeros(n_layers)
        self.key_err = torch.zeros(n_layers)
        self.steps = torch.zeros(n_layers)
        self.landmark_error = [None] * n_layers  # relative squared error of quantized landmarks
        self.exact_k = [None] * n_layers

    def add(self, layer, recall, mass, key_err):
        self.recall[layer] += recall.mean().item()
        self.mass[layer] += mass.mean().item()
        self.key_err[layer] += key_err or 0.0
        self.steps[layer] += 1

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
        )


class StackedCache:
    """Several caches behind one batch: row i of every call goes to caches[i].

    Lets an evaluation decode all policies as one batch, reading the weights once per step.
    """

    def __init__(self, caches):
        self.caches = caches

    @property
    def seq_len(self):
        lens = {c.seq_len for c in self.caches}
        if len(lens) != 1:
            raise ValueError(f"stacked caches disagree on the sequence length: {sorted(lens)}")
        return lens.pop()

    def attend(self, layer, q, k, v, pos):
        outs = [c.attend(layer, q[i:i + 1], k[i:i + 1], v[i:i + 1], pos) for i, c in enumerate(self.caches)]
        return torch.cat(outs, dim=0)  # [B, n_heads, T, head_dim]


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
    buf[..., S:S + T, :] = new
    return buf, buf[..., :S + T, :]


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
