"""InfiniGen's skewing matrices and channel masks, fitted once per model on a fixed calibration text.

InfiniGen (PAPER.md "InfiniGen") scores layer L's prompt tokens at a decode step before layer L runs:
from layer L - 1's attention input it computes layer L's query, rotates the query and the keys by a
per-head orthogonal "skewing" matrix A that gathers each head's energy into a few channels, and keeps
only those channels. A and the channels come from one calibration pass per model, offline:

  - the model reads a fixed text: `calibration.txt` beside this file, prose written for this project
    (never an evaluation sample), no chat template, at most its first CALIBRATION_TOKENS tokens: it is
    1,551 tokens of the default model, so that model reads all of it (the authors: the first 2048
    tokens of a PG19 book, which is not ours to ship). One text serves both the skews and the channel
    mask (PAPER.md "InfiniGen": the authors fit them on two);
  - per layer and query head, the SVD of the head's post-RoPE queries Q = U S_q V^T and the singular
    values S_k of its KV head's keys; A is V with its columns placed in the order of S_q * S_k, as the
    authors place them (any order of V's columns is orthogonal, so (q A) . (k A) = q . k);
  - the mask: the `channels` share of head_dim with the largest sum |Q A| over the tokens, united with
    the share with the largest sum |K A| (the authors: 20% each).

`calibration(model, tokenizer)` caches the result under the project's cache folder like the
quantization grids, keyed by everything the fit depends on (`cache_key`: the model's config, dtype,
device type and a sample of every weight tensor; the calibration's token ids; the settings), with a
checksum: a damaged file, or one of other shapes, is refitted, never used. kvcache.from_prefill takes it.
A model with fewer positions than the calibration text cannot be calibrated (`cannot_calibrate`).
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
CALIBRATION_TOKENS = 2048  # at most this many tokens of the text are read: the authors' length
WEIGHT_SAMPLE = 256  # values of every weight tensor that the cache key reads (evenly spaced)


def calibration_ids(tokenizer) -> list:
    """The token ids the model reads to calibrate: the first CALIBRATION_TOKENS of calibration.txt. A
    missing, unreadable or empty text is a one-line ValueError naming the file."""
    try:
        text = CALIBRATION_TEXT.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        why = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise ValueError(
            f"InfiniGen's calibration text {CALIBRATION_TEXT} cannot be read ({why}): restore it from the "
            "repository"
        ) from None
    ids = tokenizer.encode(text)[:CALIBRATION_TOKENS]
    if not ids:
        raise ValueError(
            f"InfiniGen's calibration text {CALIBRATION_TEXT} is empty: restore it from the repository"
        )
    return ids


def cannot_calibrate(n_ids: int, max_positions: int) -> str | None:
    """Why a model of max_positions cannot read a calibration of n_ids tokens, or None."""
    if n_ids <= max_positions:
        return None
    return (
        f"InfiniGen cannot calibrate this model: it reads {n_ids} tokens of its calibration text "
        f"({CALIBRATION_TEXT.name}, at most {CALIBRATION_TOKENS}), more than the model's {max_positions} "
        "positions"
    )


def cache_key(model, ids, channels: float) -> str:
    """A short hash of what a calibration depends on: the model (its config, dtype, device type and
    WEIGHT_SAMPLE evenly spaced values of every weight tensor: a fine-tune changes nearly every value
    of each tensor it trains, so a change to any of them, not only to the q and k projections, is a
    new key), the token ids it reads (the text and the tokenizer) and the settings. Cheap for an 8B
    model: ~300 small gathers, no pass over the weights."""
    w = model.embed_tokens.weight
    h = hashlib.sha256(f"{model.config!r} {w.dtype} {w.device.type} {channels!r}".encode())
    if getattr(model, "engine", None):  # another engine's forward (hf.Engine: transformers') fits its own
        h.update(model.engine.encode())
    h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        k = min(WEIGHT_SAMPLE, flat.numel())
        at = torch.arange(k, device=flat.device) * (flat.numel() - 1) // max(k - 1, 1)  # [k] exact, in ints
        h.update(name.encode() + flat[at].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.inference_mode()
def fit(model, ids, channels: float = 0.2) -> dict:
    """The skews [L, n_heads, d, d] and channel masks [L, n_heads, d] (bool) of `model`, from one forward
    pass over ids (a list of token ids), and the `channels` share the masks keep. Float32, on the CPU."""
    full = kvcache.FullCache(model.config.n_layers, keep_queries=True)
    model(torch.tensor([ids], device=model.embed_tokens.weight.device), full, last_only=True)
    layers = [fit_layer(q[0], k[0], channels) for q, k in zip(full.q, full.k)]
    return dict(
        skew=torch.stack([s for s, _ in layers]), mask=torch.stack([m for _, m in layers]), channels=channels
    )


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
    """fit() on the calibration text, cached on disk (see the module docstring); dict(skew, mask, channels).
    A model that cannot read the whole text (cannot_calibrate), a missing or empty text, and a folder
    where the cache file belongs are each a one-line ValueError naming what to fix."""
    ids = calibration_ids(tokenizer)
    why = cannot_calibrate(len(ids), model.config.max_positions)
    if why:
        raise ValueError(why)
    c = model.config
    shapes = dict(
        skew=(c.n_layers, c.n_heads, c.head_dim, c.head_dim), mask=(c.n_layers, c.n_heads, c.head_dim)
    )
    path = cache_dir() / "infinigen" / f"{cache_key(model, ids, channels)}_c{channels:g}.pt"
    cal = _load(path, shapes)
    if cal is None:
        cal = fit(model, ids, channels)
        _save(path, cal)
    return cal


def _checksum(cal: dict) -> str:
    data = cal["skew"].numpy().tobytes() + cal["mask"].numpy().tobytes() + repr(cal["channels"]).encode()
    return hashlib.sha256(data).hexdigest()


def _load(path: Path, shapes: dict) -> dict | None:
    """The cached calibration, or None when there is none, or it is damaged or of other shapes than
    `shapes` (then it is said, and refitted). A folder at its place is a ValueError: it cannot be
    replaced by a file."""
    if path.is_dir():
        raise ValueError(
            f"{path} is a folder, where InfiniGen's calibration of this model is cached: remove it, or set "
            "KVOFFLOAD_CACHE to another cache folder"
        )
    if not path.exists():
        return None
    try:
        saved = torch.load(path, weights_only=True)
        cal = dict(skew=saved["skew"], mask=saved["mask"], channels=saved["channels"])
        damaged = saved["checksum"] != _checksum(cal)
    except Exception:  # any unreadable file: torch.load raises many kinds
        damaged = True
    if damaged:
        print(f"warning: {path} is damaged: fitting InfiniGen's calibration again", file=sys.stderr)
        return None
    got = {name: tuple(cal[name].shape) for name in shapes}
    if got != shapes:
        print(
            f"warning: {path} holds another model's calibration (skews {list(got['skew'])}, this model's "
            f"are {list(shapes['skew'])}): fitting this model's in its place",
            file=sys.stderr,
        )
        return None
    return cal


def _save(path: Path, cal: dict):
    """Write atomically, so that a concurrent process never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save(dict(cal, checksum=_checksum(cal)), tmp)
    os.replace(tmp, path)
