"""offload.py on a CUDA device: gather bandwidth against a plain pinned copy, and copy/compute overlap.

1. Bandwidth: fetch the rows a decode step selects (Llama-3.1-8B shapes: 8 KV heads x 128, bf16,
   3.125% of a 128K prompt) through `OffloadStore.fetch`, and compare with a plain pinned-host to
   device copy of the same number of bytes. Target: at least 50% of the plain copy.
2. Overlap: time (a) a fetch alone, (b) an on-device matmul workload alone, (c) the fetch started
   first, the workload launched while it is in flight, then the wait, as kvcache.py does. If the
   copy overlaps the compute, (c) is close to max(a, b) rather than a + b.

Needs a CUDA GPU; on a CPU-only machine it says so and exits (the CPU path of offload.py is covered
by tests/test_kvcache.py). Runs in well under 5 minutes.

    python benchmarks/offload_bandwidth.py
"""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from offload import OffloadStore  # noqa: E402


def cuda_time(fn, repeats=20):
    """Median wall time of fn() with the device synchronised before and after each call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    if not torch.cuda.is_available():
        print(
            "no CUDA device: this benchmark measures host-to-GPU copies; nothing to do on a CPU-only machine"
        )
        return 0
    dev = torch.device("cuda")
    H, T, d = 8, 131072, 128
    k = round(0.03125 * T)  # selected tokens per KV head
    store = OffloadStore(dev, offload=True)
    g = torch.Generator().manual_seed(0)
    store.put(0, "v", torch.randn(H, T, d, generator=g).bfloat16())  # [H, T, d] pinned host memory
    idx = torch.stack([torch.randperm(T, generator=g)[:k].sort().values for _ in range(H)]).to(dev)  # [H, k]
    nbytes = H * k * d * 2

    fetch = lambda: store.fetch(0, ("v",), idx).wait()
    t_fetch = cuda_time(fetch)
    src = torch.empty(H, k, d, dtype=torch.bfloat16, pin_memory=True)
    dst = torch.empty(H, k, d, dtype=torch.bfloat16, device=dev)
    t_copy = cuda_time(lambda: dst.copy_(src, non_blocking=True))
    print(f"rows fetched per step: {H} heads x {k} tokens x {d} bf16 = {nbytes / 2**20:.1f} MiB")
    print(f"plain pinned copy : {1e3 * t_copy:.3f} ms  {nbytes / t_copy / 1e9:.2f} GB/s")
    print(
        f"offload.fetch     : {1e3 * t_fetch:.3f} ms  {nbytes / t_fetch / 1e9:.2f} GB/s "
        f"({100 * t_copy / t_fetch:.0f}% of the plain copy; target >= 50%)"
    )

    a = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    work = lambda: [a @ a for _ in range(8)]
    t_work = cuda_time(work)

    def both():
        f = store.fetch(0, ("v",), idx)  # gather on the CPU, copy on the side stream
        work()  # launched on the compute stream while the copy is in flight
        f.wait()

    t_both = cuda_time(both)
    print(
        f"compute alone {1e3 * t_work:.3f} ms, fetch alone {1e3 * t_fetch:.3f} ms, "
        f"both {1e3 * t_both:.3f} ms (serial would be {1e3 * (t_work + t_fetch):.3f} ms, "
        f"perfect overlap {1e3 * max(t_work, t_fetch):.3f} ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
