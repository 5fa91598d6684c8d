"""InfiniGen's skewing matrices and channel masks, fitted once per model on a fixed calibration text.

InfiniGen (PAPER.md "InfiniGen") scores layer L's prompt tokens at a decode step before layer L runs:
from layer L - 1's attention input it computes layer L's query, rotates the query and the keys by a
per-head orthogonal "skewing" matrix A that gathers each head's energy into a few channels, and keeps
only those channels. A and the channels come from one calibration pass per model, offline:

  - the model reads a fixed text: `calibration.txt` beside this file, prose written for this project
    (never an evaluation sample), its first CALIBRATION_TOKENS tokens, no chat template (the authors:
    the first 2048 tokens of a PG19 book, which is not ours to ship);
  - per layer and query head, the SVD of the head's post-RoPE queries Q = U S_q V^T and the singular
    values S_k of its KV head's keys; A is V with its columns placed in the order of S_q * S_k, as the
    authors place them (any order of V's columns is orthogonal, so (q A) . (k A) = q . k);
  - the mask: the `channels` share of head_dim with the largest sum |Q A| over the tokens, united with
    the share with the largest sum |K A| (the authors: 20% each).

`calibration(model, tokenizer)` caches the result under the project's cache folder like the
quantization grids, keyed by a fingerprint of the model (its config and a few weight rows) and the
settings, with a checksum: a damaged file is refitted, never used. kvcache.from_prefill takes it.
"""

import hashlib
import os
import sys
import tempfile
from pathlib import Path

import torch

import kvcache
from files import cache_dir

CALIBRATION_TEXT = Path(__file__).resolve().with_name("calibration.txt")
CALIBRATION_TOKENS = 2048  # the authors' length


def fingerprint(model) -> str:
    """A short hash of the model: its config and the first row of every layer's q and k projection
    (what the skews are fitted to), so a calibration is never used with another model; and the engine
    whose forward fits it when not model.py's (hf.Engine: transformers'), so that each engine's runs
    reproduce their own numbers whichever engine calibrated the weights first."""
    h = hashlib.sha256(repr(model.config).encode())
    if getattr(model, "engine", None):
        h.update(model.engine.encode())
    for layer in model.layers:
        for w in (layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight):
            h.update(w[0].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.inference_mode()
def fit(model, ids, channels: float = 0.2) -> dict:
    """The skews [L, n_heads, d, d] and channel masks [L, n_heads, d] (bool) of `model`, from one forward
    pass over ids (a list of token ids). Float32, on the CPU."""
    full = kvcache.FullCache(model.config.n_layers, keep_queries=True)
    model(torch.tensor([ids], device=model.embed_tokens.weight.device), full, last_only=True)
    layers = [fit_layer(q[0], k[0], channels) for q, k in zip(full.q, full.k)]
    return dict(skew=torch.stack([s for s, _ in layers]), mask=torch.stack([m for _, m in layers]))


def fit_layer(q, k, channels: float = 0.2):
    """One layer's skews [P, d, d] and masks [P, d] from its post-RoPE queries q [P, T, d] (P query heads)
    and keys k [H, T, d] (each KV head's keys serve its P / H query heads)."""
    q = q.float().cpu()  # [P, T, d]
    P, T, d = q.shape
    k = k.float().cpu().repeat_interleave(P // k.shape[0], dim=0)  # [P, T, d]
    _, s_q, vh = torch.linalg.svd(q, full_matrices=False)  # [P, d], [P, d, d]
    s_k = torch.linalg.svdvals(k)  # [P, d]
    order = (s_q * s_k).argsort(dim=-1)  # [P, d]: column j of V goes to place order[j]
    skew = torch.empty(P, d, d).scatter_(2, order[:, None].expand(-1, d, -1), vh.transpose(1, 2))  # [P, d, d]
    n = int(d * channels)  # the authors' int(head_dim * ratio)
    by_q = (q @ skew).abs().sum(1).topk(n, dim=-1).indices  # [P, n]
    by_k = (k @ skew).abs().sum(1).topk(n, dim=-1).indices
    mask = torch.zeros(P, d, dtype=torch.bool).scatter_(1, by_q, True).scatter_(1, by_k, True)  # [P, d]
    return skew, mask


def calibration(model, tokenizer, channels: float = 0.2) -> dict:
    """fit() on the calibration text, cached on disk (see the module docstring); dict(skew, mask)."""
    name = f"{fingerprint(model)}_c{channels:g}_t{CALIBRATION_TOKENS}.pt"
    path = cache_dir() / "infinigen" / name
    cal = _load(path)
    if cal is None:
        ids = tokenizer.encode(CALIBRATION_TEXT.read_text(encoding="utf-8"))[:CALIBRATION_TOKENS]
        cal = fit(model, ids, channels)
        _save(path, cal)
    return cal


def _checksum(cal: dict) -> str:
    return hashlib.sha256(cal["skew"].numpy().tobytes() + cal["mask"].numpy().tobytes()).hexdigest()


def _load(path: Path) -> dict | None:
    """The cached calibration, or None when there is none or it is damaged (then it is said, and refitted)."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, weights_only=True)
        cal = dict(skew=saved["skew"], mask=saved["mask"])
        if saved["checksum"] == _checksum(cal):
            return cal
    except Exception:  # any unreadable file: torch.load raises many kinds
        pass
    print(f"warning: {path} is damaged: fitting InfiniGen's calibration again", file=sys.stderr)
    return None


def _save(path: Path, cal: dict):
    """Write atomically, so that a concurrent process never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save(dict(cal, checksum=_checksum(cal)), tmp)
    os.replace(tmp, path)
