"""Offloading: prompt keys and values kept in CPU memory, selected rows fetched to the device.

Why: the KV cache of a long prompt does not fit in GPU memory (Llama-3.1-8B at 128K tokens:
16 GiB in bf16), but a decode step only reads the few tokens the selection policy picked
(PAPER_NOTES "The problem"). So the bulk of K/V lives in host memory and each decode step
copies just the selected rows over PCIe.

On a CUDA device:
  - the host tensors are *pinned* (page-locked), so copies are real DMA and can be async;
  - a fetch gathers the selected rows on the CPU into a pinned staging buffer and copies it
    on a separate CUDA stream; an event marks the end of the copy;
  - the caller launches its on-device work (rebuilding low-rank keys, attention over the
    tokens that stay on the device) *before* waiting for the event, so copy and compute
    overlap. The next layer's fetch can only start once its selection is known, which
    needs this layer's output: selection is redone at every layer (PAPER_NOTES, ShadowKV).
On a CPU the same code runs: no pinning, no stream, the gather is the fetch.

The store counts the bytes it moves per decode step (the PCIe traffic a real system pays).
"""

from contextlib import nullcontext

import torch


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
        """Move x to its home (pinned host memory when the device is a GPU)."""
        x = x.to(self.home)
        if self.cuda:
            x = x.pin_memory()
        self.tensors[(layer, name)] = x

    def get(self, layer, name):
        return self.tensors[(layer, name)]

    def fetch(self, layer, name, idx):
        """Start copying rows idx of tensor (layer, name) to the device; returns a Fetch.

        idx: [H, k] int64 row indices per head (on any device). The result, once waited for,
        is [H, k, ...] on the device.
        """
        x = self.tensors[(layer, name)]  # [H, M, ...]
        idx = idx.to(self.home)  # a GPU -> CPU copy of the indices: the one sync point per fetch
        rows = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:])
        if self.cuda:
            staging = torch.empty(rows.shape, dtype=x.dtype, pin_memory=True)  # [H, k, ...]
            torch.gather(x, 1, rows, out=staging)
        else:
            staging = torch.gather(x, 1, rows)  # [H, k, ...]
        if self.offload:  # on a CPU-only machine: the bytes a GPU system would move
            self.bytes_moved += staging.numel() * staging.element_size()
        ctx = torch.cuda.stream(self.stream) if self.cuda else nullcontext()
        with ctx:
            out = staging.to(self.device, non_blocking=self.cuda)
            event = torch.cuda.Event() if self.cuda else None
            if event is not None:
                event.record(self.stream)
        return Fetch(out, event, staging)

    def nbytes(self):
        return sum(x.numel() * x.element_size() for x in self.tensors.values())


class Fetch:
    """A copy in flight. wait() makes the current stream wait for it and returns the tensor."""

    def __init__(self, out, event, staging):
        self.out, self.event, self.staging = out, event, staging  # keep staging alive until the copy ends

    def wait(self):
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)
            self.out.record_stream(torch.cuda.current_stream())
        return self.out
