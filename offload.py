"""Offloading: prompt keys and values kept in CPU memory, selected rows fetched to the device.

Why: the KV cache of a long prompt does not fit in GPU memory (Llama-3.1-8B at 128K tokens:
16 GiB in bf16), but a decode step only reads the few tokens the selection policy picked
(PAPER.md "The problem"). So the bulk of K/V lives in host memory and each decode step
copies just the selected rows over PCIe.

On a CUDA device:
  - the host tensors are *pinned* (page-locked), so copies are real DMA and can be async;
  - a fetch gathers the selected rows on the CPU into a pinned staging buffer and copies it
    on a separate CUDA stream; an event marks the end of the copy;
  - the caller launches its on-device work (rebuilding low-rank keys, attention over the
    tokens that stay on the device) *before* waiting for the event, so copy and compute
    overlap. The next layer's fetch can only start once its selection is known, which
    needs this layer's output: selection is redone at every layer (PAPER.md "ShadowKV, precisely").
On a CPU the same code runs: no pinning, no stream, the gather is the fetch.

A stored tensor may be a quantize.Quantized (the paper keeps its K/V at 4 bits): its packed rows are
fetched as they are, and dequantized on the device once they arrive. The store counts the bytes it
moves per decode step (the PCIe traffic a real system pays).
"""

from contextlib import nullcontext
from dataclasses import replace

import torch

import quantize


class OffloadStore:
    """Host-side home of per-layer tensors shaped [H, M, ...], fetched by row indices."""

    def __init__(self, device, offload=True):
        self.device = torch.device(device)
        # offload=False keeps everything on the device (the reference the offloaded path is checked against)
        self.offload = offload
        self.home = torch.device("cpu") if offload else self.device
        self.cuda = self.device.type == "cuda" and self.home.type == "cpu"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.tensors = {}  # (layer, name) -> tensor on self.home, [H, M, ...]
        self.bytes_moved = 0  # host -> device bytes, since the last reset

    def put(self, layer, name, x):
        """Keep x [H, M, ...] (a tensor, or a quantize.Quantized of one) at its home: pinned host memory
        when the device is a GPU. On a CPU a tensor is kept as given (copied only if its rows are not a
        table, see fetch): usually a view into the prefill's K/V, which all the caches built from one
        prefill then share instead of copying."""
        self.tensors[(layer, name)] = (
            quantize.map_tensors(x, self._home) if isinstance(x, quantize.Quantized) else self._home(x)
        )

    def _home(self, x):
        x = x.to(self.home)
        if self.cuda:
            x = x.pin_memory()
        return x if _rows_are_a_table(x) else x.contiguous()

    def get(self, layer, name):
        return self.tensors[(layer, name)]

    def fetch(self, layer, names, idx, heads=None):
        """Start copying rows idx of the tensors `names` of `layer` to the device; returns a Fetch.

        names: e.g. ("k", "v"), tensors [H, M, ...] with the same H and M. idx: [H, k] int64 row
        indices per head (on any device). Once waited for, each result is [H, k, ...] on the device
        (a quantized one dequantized there, [H, k, C] float32). With heads [n], idx is [n] rows of those
        heads (a different number per head: the misses of a resident set) and each result [n, ...].
        """
        stored = [self.tensors[(layer, name)] for name in names]
        parts = [_parts(x) for x in stored]  # per name its tensors by name: one, or a Quantized's codes, ...
        xs = [t for ts in parts for t in ts.values()]  # each [H, M, ...]
        H, M = xs[0].shape[:2]
        idx = idx.to(self.home)  # a GPU -> CPU copy of the indices: the one sync point per fetch
        if heads is not None:
            heads = heads.to(self.home)
        flats = {}  # table rows of idx, per stored layout (K and V of one prefill share theirs)
        staging = []
        for x in xs:
            if x.shape[:2] != (H, M):
                raise ValueError(f"fetch: {names} do not all have [H, M] = [{H}, {M}] leading dims")
            # Every row x[h, m] is a row of one 2-D table over x's memory: row h * per_head + m * per_row.
            # (x contiguous: per_head = M, per_row = 1. A view into the prefill's [T, H, d]-ordered
            # K/V: per_head = 1, per_row = H.) So one index_select reads the selected rows of all
            # heads, several times faster on a CPU than torch.gather with the index expanded.
            row = x[0, 0].numel()
            per_head, per_row = x.stride(0) // row, x.stride(1) // row
            if (per_head, per_row) not in flats:
                if heads is None:  # every head's row idx[h, j]
                    first = torch.arange(0, H * per_head, per_head, device=self.home)[:, None]  # [H, 1]
                else:  # row idx[i] of head heads[i]
                    first = heads * per_head  # [n]
                flats[per_head, per_row] = torch.add(first, idx, alpha=per_row).view(-1)  # [H*k] or [n]
            flat = flats[per_head, per_row]
            table = x.as_strided(
                ((H - 1) * per_head + (M - 1) * per_row + 1, row), (row, 1)
            )  # [R, row], no copy
            if self.cuda:
                rows = torch.empty(flat.shape[0], row, dtype=x.dtype, pin_memory=True)  # [H*k, row]
                torch.index_select(table, 0, flat, out=rows)
            else:
                rows = table.index_select(0, flat)  # [H*k, row]
            staging.append(rows.view(*idx.shape, *x.shape[2:]))  # [H, k, ...]
            if self.offload:  # on a CPU-only machine: the bytes a GPU system would move
                self.bytes_moved += rows.numel() * rows.element_size()
        ctx = torch.cuda.stream(self.stream) if self.cuda else nullcontext()
        with ctx:
            outs = [t.to(self.device, non_blocking=self.cuda) for t in staging]
            event = torch.cuda.Event() if self.cuda else None
            if event is not None:
                event.record(self.stream)
        rebuilt, i = [], 0
        for x, ts in zip(stored, parts):  # regroup the fetched parts of each entry, by their names
            got, i = dict(zip(ts, outs[i : i + len(ts)])), i + len(ts)
            rebuilt.append(got["tensor"] if isinstance(x, torch.Tensor) else replace(x, **got))
        return Fetch(rebuilt, event, staging, next(iter(flats.values())))


def _parts(x) -> dict:
    """The tensors a stored entry is made of, by name: {"tensor": x}, or a quantize.Quantized's own
    (codes, and scales / zeros: `Quantized.tensors`), which rebuild it by name after the fetch."""
    return {"tensor": x} if isinstance(x, torch.Tensor) else x.tensors()


def _rows_are_a_table(x):
    """Whether every row x[h, m] of x [H, M, ...] is contiguous and a whole number of rows from the
    next head's and the next token's: true of contiguous tensors and of the slices of the prefill's
    K/V (head-major or token-major) that the caches store."""
    if x.numel() == 0:
        return True
    row = x[0, 0].numel()
    return x[0, 0].is_contiguous() and x.stride(0) % row == 0 and x.stride(1) % row == 0


class Fetch:
    """Copies in flight. wait() makes the current stream wait for them and returns the tensors."""

    def __init__(self, outs, event, staging, rows):
        self.outs, self.event, self.staging = outs, event, staging  # keep staging alive until the copy ends
        self.rows = rows  # [n] which stored row each fetched row is (on the store's home)

    def wait(self):
        """The fetched rows, [H, k, ...] each; quantized entries dequantized on the device, each stored
        row once however often it was fetched (a token that several heads, or several positions of a
        teacher-forced block, select: the same bytes, so the same values)."""
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)
            for out in self.outs:
                for t in _parts(out).values():
                    t.record_stream(torch.cuda.current_stream())
        if all(isinstance(out, torch.Tensor) for out in self.outs):
            return self.outs
        distinct, where = torch.unique(self.rows, return_inverse=True)  # [U], [n]
        first = torch.empty_like(distinct).scatter_(0, where, torch.arange(len(where)))  # [U] one of each
        first, where = first.to(self.outs[0].codes.device), where.to(self.outs[0].codes.device)
        return [
            out if isinstance(out, torch.Tensor) else _dequantize_once(out, first, where) for out in self.outs
        ]


def _dequantize_once(qx, first, where):
    """qx [..., C] of n fetched rows (quantize.Quantized), dequantized: the rows `first` [U], once each,
    then spread to every fetched row (`where` [n]: which of them each is). [..., C] float32."""
    lead = qx.codes.shape[:-1]  # [..., n rows in all]
    rows = quantize.map_tensors(qx, lambda t: t.reshape(-1, t.shape[-1])[first])  # [U, ...]
    return quantize.dequantize(rows)[where].view(*lead, qx.channels)  # [..., C]
