"""offload.py: fetching selected rows from the host store, whatever the stored tensor's layout."""

import pytest
import torch

from offload import OffloadStore


def layouts():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 50, 8, generator=g)  # [H, T, d] head-major prefill K
    tok = torch.randn(50, 3, 8, generator=g).transpose(
        0, 1
    )  # [H, T, d] over a [T, H, d] buffer (the model's)
    return {
        "contiguous": (base.clone(), True),
        "head-major slice": (base[:, 4:40], True),
        "token-major slice": (tok[:, 4:40], True),
        "pairs of rows": (torch.randn(3, 36, 2, 8, generator=g), True),  # [H, M, 2, d]
        "channel-strided": (base[:, 4:40, ::2], False),  # rows not contiguous: the store copies it
    }


def test_fetch_equals_indexing_for_every_layout():
    idx = torch.tensor([[0, 5, 35], [1, 2, 3], [35, 0, 17]])  # [H, k], any order
    for name, (x, shared) in layouts().items():
        store = OffloadStore("cpu")
        store.put(0, "k", x)
        (got,) = store.fetch(0, ("k",), idx).wait()
        want = x[torch.arange(3)[:, None], idx]  # [H, k, ...]
        assert torch.equal(got, want), name
        same_memory = store.get(0, "k").data_ptr() == x.data_ptr()
        assert same_memory == shared, name  # views of the prefill are kept, not copied
        assert store.bytes_moved == want.numel() * 4, name


def test_fetch_with_offload_off_moves_no_bytes():
    x, _ = layouts()["head-major slice"]
    store = OffloadStore("cpu", offload=False)
    store.put(0, "v", x)
    idx = torch.tensor([[3], [4], [5]])
    (got,) = store.fetch(0, ("v",), idx).wait()
    assert torch.equal(got, x[torch.arange(3)[:, None], idx])
    assert store.bytes_moved == 0


def test_fetch_keys_and_values_together():
    """Keys and values of one prefill (same layout) are fetched with one index; bytes add up."""
    buf = torch.randn(40, 2, 3, 8)  # [T, K/V, H, d]: one buffer holding both, token-major
    k, v = buf[:, 0].transpose(0, 1)[:, 4:36], buf[:, 1].transpose(0, 1)[:, 4:36]  # [H, 32, d] views
    store = OffloadStore("cpu")
    store.put(0, "k", k)
    store.put(0, "v", v)
    idx = torch.tensor([[0, 31], [7, 8], [30, 1]])
    got_k, got_v = store.fetch(0, ("k", "v"), idx).wait()
    rows = torch.arange(3)[:, None]
    assert torch.equal(got_k, k[rows, idx]) and torch.equal(got_v, v[rows, idx])
    assert store.bytes_moved == 2 * 3 * 2 * 8 * 4
    store.put(0, "c", k[:, :, :2].contiguous().to(torch.uint8))  # another layout and row size: own index
    got_k, got_c = store.fetch(0, ("k", "c"), idx).wait()
    assert torch.equal(got_k, k[rows, idx]) and torch.equal(got_c, store.get(0, "c")[rows, idx])
    store.put(0, "short", k[:, :5])
    with pytest.raises(ValueError, match="leading dims"):
        store.fetch(0, ("k", "short"), idx)
