"""Quantizers: HIGGS (Hadamard rotation + EDEN grids), plain integer, FP8 and NVFP4, as packed tensors.

They serve two purposes in this project (PAPER.md "The paper's method"): the paper's landmarks are
prompt keys quantized to ~2 bits per value, and its offloaded K/V are stored at 4 bits with one scale
group of all kv_heads x head_dim channels of a token (':gall'). HIGGS: per group of channels, the L2
norm is the scale; a Walsh-Hadamard rotation (`hadamard`, in power-of-2 blocks for a group that is not
one: `_rotate_group`) makes the normalised entries close to N(0, 1); every d-dimensional piece is
replaced by the index of the nearest point of an "EDEN" grid, a stochastic Lloyd fit of n points to
the d-dimensional standard Gaussian (`fit_grid`). Integer, FP8 and NVFP4 formats are the comparison
points, residual (meta-chunk) quantization with a 0.5-bit residual the paper's option
(`residual_quantize`). The packed codes and scales are the real stored tensors, so
`nbytes` is the true memory cost, and `quantized_dot` scores a query against quantized rows without
dequantizing them.
"""

import concurrent.futures
import contextlib
import math
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from files import cache_dir  # $KVOFFLOAD_CACHE or ~/.cache/kvoffload, shared with the converted model

# ---------------------------------------------------------------------------------------------------
# Walsh-Hadamard transform
# ---------------------------------------------------------------------------------------------------


def _check_power_of_two(n: int, what: str):
    if n < 1 or n & (n - 1):
        raise ValueError(f"{what} must be a power of 2 for the Walsh-Hadamard transform, got {n}")


def hadamard(x: Tensor) -> Tensor:
    """Orthonormal Walsh-Hadamard transform along the last dim (Sylvester order), H / sqrt(n).

    Why: HIGGS rotates each group before rounding so that any vector, even one dominated by a few
    outlier channels, turns into entries that look like i.i.d. N(0, norm^2 / n), which is what the
    Gaussian-fitted grid is built for. The orthonormal H is symmetric and its own inverse, so the same
    function undoes the rotation. Fast butterfly, O(n log n): log2(n) passes of (a, b) -> (a + b, a - b).
    """
    n = x.shape[-1]
    _check_power_of_two(n, "hadamard: size of the last dim")
    if not x.is_floating_point():
        raise ValueError(f"hadamard: expected a floating-point tensor, got {x.dtype}")
    y = x.reshape(-1, n).clone()  # [M, n], our own buffer: the passes below work in place
    h = 1
    while h < n:
        pairs = y.view(-1, n // (2 * h), 2, h)  # [M, blocks, 2, h]: element (s, j) of a block is s*h + j
        a, b = pairs[:, :, 0, :], pairs[:, :, 1, :]  # views into y, [M, blocks, h] each
        diff = a - b
        a.add_(b)
        b.copy_(diff)
        h *= 2
    return (y * n**-0.5).reshape(x.shape)


_HADAMARD_MATRICES: dict = {}


def _hadamard_matrix(n: int, device, dtype=torch.float32) -> Tensor:
    """The n x n orthonormal Hadamard matrix, built by the butterfly itself (H = hadamard(I)).

    For the small groups we quantize (64..1024 channels) one dense matmul beats log2(n) memory passes
    on CPU (about 4x at n = 64), and it is the same linear map, so quantize() uses this.
    """
    key = (n, str(device), dtype)
    if key not in _HADAMARD_MATRICES:
        _HADAMARD_MATRICES[key] = hadamard(torch.eye(n, dtype=torch.float64)).to(device, dtype)  # [n, n]
    return _HADAMARD_MATRICES[key]


def _rotate(x: Tensor) -> Tensor:
    """hadamard(x) via the cached matrix (H is symmetric, so x @ H == (H x^T)^T)."""
    n = x.shape[-1]
    if n > 1024:  # the dense matrix would cost more than the butterfly
        return hadamard(x)
    return x @ _hadamard_matrix(n, x.device, x.dtype)


def rotation_block(group: int) -> int:
    """The Hadamard size used for a scale group: the largest power of 2 that divides it."""
    return group & -group


def _rotate_group(x: Tensor) -> Tensor:
    """Rotate each group x [..., group]: one Hadamard transform when the group is a power of 2, else
    independent transforms of its consecutive blocks of rotation_block(group) channels.

    Why blocks: the Walsh-Hadamard transform exists only for power-of-2 sizes, and the paper's
    all-channel group is kv_heads x head_dim channels, e.g. 3 x 64 = 192 on SmolLM2-135M. A block-
    diagonal matrix of orthonormal Hadamard blocks is still orthonormal and symmetric, so it keeps the
    group's L2 norm (the one scale stays exact), is its own inverse (dequantize applies it again), and
    keeps q . x = (R q) . (R x), the identity quantized_dot scores by. What it gives up: an outlier
    spreads over its block only, not over the whole group.
    """
    group = x.shape[-1]
    block = rotation_block(group)
    if block == group:
        return _rotate(x)
    return _rotate(x.reshape(*x.shape[:-1], group // block, block)).reshape(x.shape)  # [..., group]


# ---------------------------------------------------------------------------------------------------
# EDEN grids: Lloyd / k-means fit of n points to a d-dimensional standard Gaussian
# ---------------------------------------------------------------------------------------------------

GRID_SAMPLES = 1 << 16  # fresh Gaussian samples drawn at every step of the fit (256 per point at n = 256)
GRID_STEPS = 200  # steps of the stochastic Lloyd fit: fixed, so the fit is deterministic and bounded in time
GRID_EXPLORE = 160  # steps at the over-relaxed rate GRID_RELAX before the rate shrinks
GRID_RELAX = 1.9  # over-relaxation of the exploring steps (1 = plain Lloyd; 2 = the stability limit)
GRID_SETTLE = 10.0  # after GRID_EXPLORE steps, the rate is GRID_RELAX / (1 + steps since / GRID_SETTLE)
_GRID_VERSION = 2  # bump when the fitting procedure changes: old disk caches are then ignored
_GRIDS: dict = {}  # (n, d, seed) -> [n, d] float32, CPU


def _grid_path(n: int, d: int, seed: int) -> Path:
    name = f"eden_n{n}_d{d}_seed{seed}_s{GRID_SAMPLES}_it{GRID_STEPS}_v{_GRID_VERSION}.pt"
    return cache_dir() / "grids" / name


def _cell_means(samples: Tensor, centers: Tensor) -> Tensor:
    """One Lloyd assignment: the mean of the samples nearest to each center ([S, d], [n, d] -> [n, d]).

    Assignment in float32 (fast), sums in float64 (so summation order cannot move the float32 grid).
    An empty cell keeps its center.
    """
    n, d = centers.shape
    idx = _nearest(samples, centers.float())  # [S]
    sums = torch.zeros(n, d, dtype=torch.float64).index_add_(0, idx, samples.double())  # [n, d]
    counts = torch.bincount(idx, minlength=n).to(torch.float64)  # [n]
    means = centers.clone()  # [n, d] float64
    filled = counts > 0
    means[filled] = sums[filled] / counts[filled, None]
    return means


def _grid_rate(step: int) -> float:
    """How far step `step` (0-based) of the fit moves each center towards its cell mean."""
    if step < GRID_EXPLORE:
        return GRID_RELAX
    return GRID_RELAX / (1 + (step - GRID_EXPLORE + 1) / GRID_SETTLE)


def fit_grid(n: int, d: int, seed: int = 0) -> Tensor:
    """An "EDEN"-style grid: n points in d dims fitted to the standard Gaussian N(0, I_d).

    Why: after HIGGS' normalisation the pieces to round are ≈ N(0, I_d), and the MSE-optimal codebook
    for a known distribution is a fixed point of Lloyd's algorithm on it (PAPER.md "The paper's
    method"). Our own fit is a stochastic, damped Lloyd iteration, the kind the paper's grids come from
    (PAPER.md "Confirmed against the authors' code"), made cheap enough for a first run:
    - fresh samples at every step (GRID_SAMPLES of them): plain Lloyd on one fixed sample set
      overfits it (the tail cells see a few samples each) and, in 2-d, converges very slowly (30
      plain iterations on 131K samples left the 4-bit grid 3.3% worse than the paper's, 300 still 1.1%);
    - the first GRID_EXPLORE steps over-relax, c <- c + 1.9 (mean - c): the move is nearly twice the
      plain Lloyd step, which speeds the slow drift of points between rings of the grid, and the noise
      of the fresh samples shakes it out of poor local optima (with a milder 1.5 the 3-bit 2-d grid
      ended 0.3 to 0.9% worse than the paper's depending on the seed);
    - the rate then shrinks like 1 / step, which averages the noise of the last steps away.
    With these settings every grid we ship that the paper also ships is within 0.3% of its
    quantization error, and the 1-, 2- and 0.5-bit ones are slightly better (tests/test_quantize.py
    measures it). Deterministic: one seeded generator draws the start and all
    samples. Returns [n, d] float32 on the CPU; cached in memory and on disk (written atomically, so
    concurrent processes never read a half-written file).
    """
    if n < 2 or d < 1:
        raise ValueError(f"fit_grid: need n >= 2 points and d >= 1 dims, got n={n}, d={d}")
    key = (n, d, seed)
    if key in _GRIDS:
        return _GRIDS[key]
    path = _grid_path(n, d, seed)
    grid = None
    if path.exists():
        try:
            grid = torch.load(path, weights_only=True)
        except Exception:  # a damaged cache file: refit and overwrite it
            grid = None
        if grid is not None and (not isinstance(grid, Tensor) or grid.shape != (n, d)):
            grid = None
    if grid is None:
        gen = torch.Generator().manual_seed(seed)
        # Start from the high-resolution optimum: the best point density for a density p is
        # proportional to p^(d/(d+2)), for a Gaussian that is N(0, (d+2)/d I). In 1-d its quantiles
        # start Lloyd next to the optimum (1-d Lloyd from a poor start converges very slowly).
        spread = math.sqrt((d + 2) / d)
        if d == 1:
            p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
            centers = spread * torch.special.ndtri(p)[:, None]  # [n, 1]
        else:
            centers = spread * torch.randn(n, d, generator=gen, dtype=torch.float64)  # [n, d]
        with _one_cpu_thread(torch.device("cpu")):  # small products: one thread is fastest (see there)
            for step in range(GRID_STEPS):
                samples = torch.randn(GRID_SAMPLES, d, generator=gen)  # [S, d] float32, fresh every step
                centers = centers + _grid_rate(step) * (_cell_means(samples, centers) - centers)  # [n, d]
        grid = centers.to(torch.float32)  # [n, d]
        if d == 1:
            grid = grid.sort(dim=0).values  # sorted, so 1-d rounding can use bucketize
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        torch.save(grid, tmp)
        os.replace(tmp, path)
    _GRIDS[key] = grid
    return grid


_DEVICE_GRIDS: dict = {}


def _grid_on(fmt, device) -> Tensor:
    key = (fmt.n, fmt.d, fmt.seed, str(device))
    if key not in _DEVICE_GRIDS:
        _DEVICE_GRIDS[key] = fit_grid(fmt.n, fmt.d, fmt.seed).to(device)
    return _DEVICE_GRIDS[key]


SCORE_BLOCK = 16384  # landmarks per block of quantized_dot: bounds its int32 index temporary
NEAREST_CHUNK = 2048  # pieces per block of the nearest-point search: a [2048, 256] float32 block = 2 MiB


@contextlib.contextmanager
def _one_cpu_thread(device):
    """Run the block with one torch CPU thread (restored afterwards); yields the previous count.

    The nearest-point search is thousands of small products ([2048, d] x [d, n], d <= 8): too small for
    OpenMP to pay off, and on a loaded machine every parallel region waits for a second core. We
    measured addmm 0.12 s with 1 thread against 0.17 s (idle) to 4.9 s (loaded) with 2. _nearest
    instead splits the rows over plain Python threads (torch and numpy release the GIL).
    """
    if device.type != "cpu":
        yield 1
        return
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield prev
    finally:
        torch.set_num_threads(prev)


def _nearest_rows(points: Tensor, grid_t: Tensor, bias: Tensor, out: Tensor, start: int, stop: int):
    """_nearest for rows start..stop, block by block: one addmm for the scores, then their argmax."""
    with torch.inference_mode(out.is_inference()):  # a worker thread does not inherit the caller's mode
        _nearest_block_rows(points, grid_t, bias, out, start, stop)


def _nearest_block_rows(points: Tensor, grid_t: Tensor, bias: Tensor, out: Tensor, start: int, stop: int):
    block = torch.empty(
        min(NEAREST_CHUNK, stop - start), grid_t.shape[1], dtype=points.dtype, device=points.device
    )  # [rows, n]
    for s in range(start, stop, NEAREST_CHUNK):
        e = min(s + NEAREST_CHUNK, stop)
        scores = block[: e - s]  # [rows, n]: x.g - |g|^2 / 2
        torch.addmm(bias, points[s:e], grid_t, out=scores)
        if points.device.type == "cpu":  # numpy's SIMD argmax is ~5x faster than torch's for rows of 256
            out[s:e] = torch.from_numpy(scores.numpy().argmax(axis=1))
        else:
            torch.argmax(scores, dim=1, out=out[s:e])


def _nearest(points: Tensor, grid: Tensor) -> Tensor:
    """Index of the nearest grid point for every row of points ([P, d] -> [P] int64).

    argmin |x - g|^2 = argmax (x.g - |g|^2 / 2), computed in blocks of NEAREST_CHUNK rows so memory stays
    bounded. Ties go to the lower grid index. A sorted 1-d grid (the 8-bit format) is a binary search.
    """
    P, d = points.shape
    if d == 1 and points.device.type == "cpu":
        g = grid[:, 0]
        if bool((g[1:] > g[:-1]).all()):  # sorted 1-d grid: rounding is a binary search over midpoints
            mid = (g[1:] + g[:-1]) / 2  # [n - 1]
            return torch.bucketize(points[:, 0].contiguous(), mid.to(points.dtype), right=False)
    out = torch.empty(P, dtype=torch.int64, device=points.device)  # [P]
    grid = grid.to(points.device, points.dtype)
    bias = -0.5 * (grid * grid).sum(dim=1)  # [n]
    grid_t = grid.t().contiguous()  # [d, n]
    with _one_cpu_thread(points.device) as threads:
        # CPU: one contiguous share of the rows per thread (results do not depend on the split)
        workers = min(threads, 8, -(-P // (16 * NEAREST_CHUNK))) if points.device.type == "cpu" else 1
        if workers <= 1:
            _nearest_rows(points, grid_t, bias, out, 0, P)
        else:
            share = -(-P // workers)
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                jobs = [
                    pool.submit(_nearest_rows, points, grid_t, bias, out, s, min(s + share, P))
                    for s in range(0, P, share)
                ]
                for job in jobs:
                    job.result()
    return out


# ---------------------------------------------------------------------------------------------------
# Bit packing: codes of w bits (1..8), packed per row so that rows (tokens) can be gathered
# ---------------------------------------------------------------------------------------------------


def packed_bytes(count: int, width: int) -> int:
    """Bytes that `count` codes of `width` bits take once packed (rounded up to a whole byte)."""
    return (count * width + 7) // 8


def _cycle(width: int) -> tuple[int, int, torch.dtype]:
    """The packing period: `codes` codes of `width` bits fill exactly `nbytes` bytes (e.g. 4 x 6 = 3 x 8).

    A period is at most 56 bits, so it fits one integer word (int32 up to 24 bits, else int64).
    """
    if not 1 <= width <= 8:
        raise ValueError(f"bit packing: width must be 1..8 bits, got {width}")
    nbytes = width // math.gcd(width, 8)
    codes = 8 * nbytes // width
    return codes, nbytes, torch.int32 if 8 * nbytes <= 24 else torch.int64


def pack_bits(codes: Tensor, width: int) -> Tensor:
    """Pack the last dim of codes (integers in [0, 2^width)) into uint8, LSB first: [..., K] -> [..., B].

    The bit stream is code 0's bits (lowest first), then code 1's, ...; byte j holds stream bits
    8j..8j+7. Every row is packed on its own and padded to a whole byte, so a token's row of codes stays
    a row of bytes that offload.py can gather. Works a period at a time: `per` codes are or-ed into one
    word, which is then cut into `nbytes` bytes.
    """
    per, nbytes, word_dtype = _cycle(width)
    *lead, K = codes.shape
    if width == 8:
        return codes.to(torch.uint8)
    pad = (-K) % per
    if pad:
        codes = torch.cat([codes, codes.new_zeros(*lead, pad)], dim=-1)
    periods = (K + pad) // per
    slots = codes.to(word_dtype).reshape(*lead, periods, per)  # [..., periods, per]
    word = slots[..., 0].clone()  # [..., periods]
    for i in range(1, per):
        word |= slots[..., i] << (i * width)
    out = torch.stack([(word >> (8 * j)) & 255 for j in range(nbytes)], dim=-1)  # [..., periods, nbytes]
    return out.to(torch.uint8).reshape(*lead, periods * nbytes)[..., : packed_bytes(K, width)]  # [..., B]


def unpack_bits(packed: Tensor, width: int, count: int) -> Tensor:
    """Inverse of pack_bits: [..., B] uint8 -> [..., count] int32 codes."""
    per, nbytes, word_dtype = _cycle(width)
    *lead, B = packed.shape
    if width == 8:
        return packed[..., :count].int()
    pad = (-B) % nbytes
    if pad:
        packed = torch.cat([packed, packed.new_zeros(*lead, pad)], dim=-1)
    periods = (B + pad) // nbytes
    chunks = packed.to(word_dtype).reshape(*lead, periods, nbytes)  # [..., periods, nbytes]
    word = chunks[..., 0].clone()  # [..., periods]
    for j in range(1, nbytes):
        word |= chunks[..., j] << (8 * j)
    mask = (1 << width) - 1
    codes = torch.stack([(word >> (i * width)) & mask for i in range(per)], dim=-1)  # [..., periods, per]
    return codes.reshape(*lead, periods * per)[..., :count].to(torch.int32)  # [..., count]


# ---------------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------------

# HIGGS bits per value offered on the CLI -> (d, n): bits per value = log2(n) / d. "0.5" is the paper's
# residual grid (PAPER.md "Confirmed against the authors' code"): 256 points in 16 dims, a byte per 16 values.
HIGGS_GRIDS = {"0.5": (16, 256), "1": (8, 256), "2": (4, 256), "3": (2, 64), "4": (2, 256), "8": (1, 256)}
DEFAULT_RESIDUAL_BITS = "0.5"  # the paper's residual format for residual landmarks (residual_quantize)
INT_BITS = (2, 4, 8)
DEFAULT_GROUP = 128  # channels per HIGGS / int scale; the paper uses 128 (landmarks) or all channels (K/V)
GROUP_ALL = "all"  # QFormat.group for one scale group of the whole row (':gall')
NVFP4_BLOCK = 16
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # the magnitudes NVFP4 can represent
E4M3_MAX = 448.0
VALID_SPECS = (
    "1, 2, 3, 4, 8 or 0.5 (HIGGS), int2, int4, int8, fp8, nvfp4; HIGGS/int take an optional "
    "':g<group>' (channels per scale) or ':gall' (one scale for the whole row, e.g. all "
    "kv_heads x head_dim channels of a token)"
)


@dataclass(frozen=True)
class QFormat:
    """A quantization format. `group` None means min(DEFAULT_GROUP, channels), GROUP_ALL the whole row;
    both are resolved at quantize time."""

    kind: str  # "higgs" | "int" | "fp8" | "nvfp4"
    bits: float  # nominal bits per value of the codes, scales excluded (0.5 for the 0.5-bit grid)
    d: int = 1  # HIGGS: dimension of the grid (values per code)
    n: int = 0  # HIGGS: number of grid points (a code has log2(n) bits)
    group: int | str | None = None  # channels sharing one scale (HIGGS, int), or GROUP_ALL; 16 for nvfp4
    seed: int = 0  # HIGGS: seed of the grid fit
    name: str = ""  # the spec it was parsed from, for tables

    @property
    def code_bits(self) -> int:
        """Bits of one stored code."""
        return int(math.log2(self.n)) if self.kind == "higgs" else int(self.bits)


def parse_format(spec) -> QFormat:
    """CLI spec -> QFormat: "2" (HIGGS 2-bit), "0.5", "4:g1024", "4:gall", "int4", "fp8", "nvfp4"; a QFormat
    passes through."""
    if isinstance(spec, QFormat):
        return spec
    text = str(spec).strip().lower()
    base, _, opt = text.partition(":")
    group = None
    if opt == "g" + GROUP_ALL:
        group = GROUP_ALL
    elif opt:
        if not (opt.startswith("g") and opt[1:].isdigit() and int(opt[1:]) > 0):
            raise ValueError(
                f"unknown quantization format {spec!r} (option: ':g<group>' or ':gall'); valid: {VALID_SPECS}"
            )
        group = int(opt[1:])
    if base in HIGGS_GRIDS:
        d, n = HIGGS_GRIDS[base]
        bits = math.log2(n) / d
        return QFormat("higgs", int(bits) if bits.is_integer() else bits, d=d, n=n, group=group, name=text)
    if base.startswith("int") and base[3:].isdigit() and int(base[3:]) in INT_BITS:
        return QFormat("int", int(base[3:]), group=group, name=text)
    if base in ("fp8", "nvfp4") and group is None:
        if base == "fp8":
            return QFormat("fp8", 8, name=text)
        return QFormat("nvfp4", 4, group=NVFP4_BLOCK, name=text)
    raise ValueError(f"unknown quantization format {spec!r}; valid: {VALID_SPECS}")


def _resolve_group(fmt: QFormat, channels: int) -> int:
    """The scale group size for `channels` channels, with a one-line error if it does not fit.

    A HIGGS group is a power of 2 (one Hadamard transform), or the whole row asked for explicitly
    (':gall' or ':g<channels>'), whatever its length: that one is rotated in power-of-2 blocks
    (`_rotate_group`). A default group that is not a power of 2 is an error rather than a silent
    block rotation.
    """
    if fmt.kind == "fp8":
        return channels
    if fmt.kind == "nvfp4":
        group = NVFP4_BLOCK
    elif fmt.group == GROUP_ALL:
        group = channels
    else:
        group = fmt.group if fmt.group is not None else min(DEFAULT_GROUP, channels)
    if channels % group:
        raise ValueError(
            f"format {fmt.name or fmt.kind}: {channels} channels are not a multiple of group {group}"
        )
    if fmt.kind == "higgs":
        whole_row = fmt.group is not None and group == channels
        if group & (group - 1) and not whole_row:
            fit = channels & -channels  # the largest power of 2 dividing channels
            base = fmt.name.split(":")[0]
            raise ValueError(
                f"format {fmt.name}: the HIGGS group ({group}) must be a power of 2 (the "
                f"Hadamard size) or the whole row; for {channels} channels use e.g. "
                f"'{base}:g{fit}' or '{base}:gall'"
            )
        if group % fmt.d:
            raise ValueError(
                f"format {fmt.name}: group {group} is not a multiple of the grid dimension {fmt.d}"
            )
    return group


def _row_bytes(fmt: QFormat, channels: int) -> tuple[int, int]:
    """(code bytes, scale bytes) that one row of `channels` values takes once quantized."""
    group = _resolve_group(fmt, channels)
    groups = channels // group
    if fmt.kind == "higgs":
        return packed_bytes(channels // fmt.d, fmt.code_bits), 2 * groups  # fp16 norm per group
    if fmt.kind == "int":
        return packed_bytes(channels, fmt.bits), 2 * 2 * groups  # fp16 min and step per group
    if fmt.kind == "nvfp4":
        return packed_bytes(channels, 4), groups  # one e4m3 byte per block
    return channels, 0  # fp8: a plain cast


def bits_per_value(fmt, channels: int) -> float:
    """Stored bits per value including the scales, for memory tables (equals 8 * nbytes / numel).

    HIGGS: log2(n) / d for the codes + 16 / group for the fp16 norm, e.g. "0.5" on 128 channels (group
    128) = 0.5 + 0.125 = 0.625, and "4:gall" on 1024 channels = 4 + 16 / 1024.
    """
    fmt = parse_format(fmt)
    codes, scales = _row_bytes(fmt, channels)
    return 8 * (codes + scales) / channels


# ---------------------------------------------------------------------------------------------------
# Quantize / dequantize
# ---------------------------------------------------------------------------------------------------


TENSOR_FIELDS = ("codes", "scales", "zeros")  # the stored tensors of a Quantized (scales, zeros may be None)


@dataclass
class Quantized:
    """The stored form of a tensor [..., C]: the real packed tensors, nothing dequantized.

    codes:  [..., code_bytes] uint8, each row packed on its own (rows can be gathered / offloaded)
    scales: [..., groups] float16 (HIGGS norm, int step), [..., blocks] uint8 = e4m3 bits (nvfp4), or None
    zeros:  [..., groups] float16 group minimum (int), else None
    """

    codes: Tensor
    scales: Tensor | None
    zeros: Tensor | None
    fmt: QFormat
    channels: int
    group: int

    @property
    def shape(self) -> tuple:
        return (*self.codes.shape[:-1], self.channels)

    def tensors(self) -> dict:
        """The stored tensors by field name: codes, and scales / zeros where the format has them. Code
        that moves them (offload.py) rebuilds the Quantized by these names: `replace(qx, **tensors)`."""
        return {name: t for name in TENSOR_FIELDS if (t := getattr(self, name)) is not None}


@dataclass
class ResidualQuantized:
    """Residual landmark quantization: quantized meta-chunk means + quantized residuals.

    mean:  Quantized [H, ceil(T / m), C]; resid: Quantized [H, T, C]; reconstruction = mean (each row
    repeated for its m rows) + resid.
    """

    mean: Quantized
    resid: Quantized
    meta_chunk: int
    length: int  # T

    @property
    def shape(self) -> tuple:
        return self.resid.shape


def map_tensors(qx: Quantized, fn) -> Quantized:
    """Apply fn to every stored tensor (codes, scales, zeros): gather rows, move, pin.

    e.g. map_tensors(qx, lambda t: t[:, idx]) keeps tokens idx of a [H, T, C] tensor; fn must leave the
    last dim alone.
    """
    return replace(qx, **{name: fn(t) for name, t in qx.tensors().items()})


@torch.no_grad()
def quantize(x: Tensor, fmt) -> Quantized:
    """Quantize x [..., C] along its last dim (each token's vector on its own) in format fmt."""
    fmt = parse_format(fmt)
    if not x.is_floating_point():
        raise ValueError(f"quantize: expected a floating-point tensor, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"quantize: expected a tensor [..., C] with C > 0, got shape {tuple(x.shape)}")
    lo, hi = torch.aminmax(x) if x.numel() else (x.new_zeros(()), x.new_zeros(()))  # nan/inf shows here
    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
        raise ValueError("quantize: input has inf or nan values")
    C = x.shape[-1]
    lead = x.shape[:-1]
    group = _resolve_group(fmt, C)
    x = x.reshape(-1, C).float()  # [M, C]
    if fmt.kind == "higgs":
        codes, scales, zeros = _quantize_higgs(x, fmt, group)
    elif fmt.kind == "int":
        codes, scales, zeros = _quantize_int(x, fmt.bits, group)
    elif fmt.kind == "nvfp4":
        codes, scales, zeros = _quantize_nvfp4(x)
    else:  # fp8: a saturating cast to e4m3, stored as its bit pattern
        codes = x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
        scales = zeros = None
    return Quantized(
        codes=codes.reshape(*lead, codes.shape[-1]),
        scales=None if scales is None else scales.reshape(*lead, scales.shape[-1]),
        zeros=None if zeros is None else zeros.reshape(*lead, zeros.shape[-1]),
        fmt=fmt,
        channels=C,
        group=group,
    )


def _quantize_higgs(x: Tensor, fmt: QFormat, group: int):
    """HIGGS (PAPER.md "The paper's method"): norm per group, rotate, round to the EDEN grid.

    After the rotation, a group of norm s has entries of variance s^2 / group; scaling by
    sqrt(group) / s makes them ≈ N(0, 1), the distribution the grid was fitted to.
    """
    M, C = x.shape
    G = C // group
    xg = x.view(M, G, group)  # [M, G, group]
    norms = torch.linalg.vector_norm(xg, dim=-1).to(torch.float16)  # [M, G], the stored scales
    if not bool(torch.isfinite(norms).all()):
        raise ValueError("quantize: a group norm overflows float16 (|x| too large for an fp16 scale)")
    n32 = norms.float()
    inv = torch.where(n32 > 0, math.sqrt(group) / n32, torch.zeros_like(n32))  # [M, G]; zero group -> 0
    y = _rotate_group(xg).mul_(inv[..., None])  # [M, G, group], ≈ N(0, 1)
    idx = _nearest(y.reshape(-1, fmt.d), _grid_on(fmt, x.device))  # [M*C/d]
    codes = pack_bits(idx.view(M, C // fmt.d), fmt.code_bits)  # [M, code_bytes]
    return codes, norms, None


def _quantize_int(x: Tensor, bits: int, group: int):
    """Uniform asymmetric integers: per group, step = (max - min) / (2^bits - 1), fp16 min and step.

    The codes are computed from the fp16-rounded min and step, i.e. the values dequantize will use.
    """
    M, C = x.shape
    G = C // group
    xg = x.view(M, G, group)  # [M, G, group]
    lo = xg.amin(dim=-1).to(torch.float16)  # [M, G]
    hi = xg.amax(dim=-1)
    levels = (1 << bits) - 1
    step = ((hi - lo.float()) / levels).to(torch.float16)  # [M, G]
    if not (bool(torch.isfinite(lo).all()) and bool(torch.isfinite(step).all())):
        raise ValueError("quantize: values too large for the fp16 min/step of an int format")
    s32 = step.float()
    safe = torch.where(s32 > 0, s32, torch.ones_like(s32))
    q = ((xg - lo.float()[..., None]) / safe[..., None]).round_().clamp_(0, levels)  # [M, G, group]
    return pack_bits(q.view(M, C), bits), step, lo


def _round_e2m1(v: Tensor) -> Tensor:
    """Index (0..7) of the nearest E2M1 magnitude for v >= 0 (v already clamped to <= 6)."""
    values = torch.tensor(E2M1_VALUES, device=v.device)
    mid = (values[1:] + values[:-1]) / 2  # [7]
    return torch.bucketize(v, mid, right=False, out_int32=True)  # a tie rounds down (smaller magnitude)


def _quantize_nvfp4(x: Tensor):
    """NVFP4: blocks of 16, scale = absmax / 6 cast to e4m3, values rounded to signed E2M1.

    The scale is rounded to e4m3 first and the values divided by the rounded scale (clamped at 6),
    so a block whose values are exactly E2M1 values times an e4m3 scale round-trips exactly.
    (NVIDIA's format adds a per-tensor fp32 scale; the paper's ≈4.5 bits/value counts only the block
    scales, and key magnitudes stay well inside e4m3's range, so we leave it out.)
    """
    M, C = x.shape
    xb = x.view(M, C // NVFP4_BLOCK, NVFP4_BLOCK)  # [M, blocks, 16]
    amax = xb.abs().amax(dim=-1)  # [M, blocks]
    scale8 = (amax / 6).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)  # [M, blocks]
    s32 = scale8.float()
    safe = torch.where(s32 > 0, s32, torch.ones_like(s32))
    mag = (xb.abs() / safe[..., None]).clamp_(max=6.0)  # [M, blocks, 16]
    code = _round_e2m1(mag) | ((xb < 0).to(torch.int32) << 3)  # [M, blocks, 16]: sign bit 3, magnitude 0..2
    return pack_bits(code.view(M, C), 4), scale8.view(torch.uint8), None


@torch.no_grad()
def dequantize(qx, dtype=torch.float32) -> Tensor:
    """Reconstruct [..., C] from a Quantized (or ResidualQuantized) in the given dtype."""
    if isinstance(qx, ResidualQuantized):
        mean = dequantize(qx.mean, torch.float32)  # [H, N_meta, C]
        mean = mean.repeat_interleave(qx.meta_chunk, dim=-2)[..., : qx.length, :]  # [H, T, C]
        return (mean + dequantize(qx.resid, torch.float32)).to(dtype)
    if not isinstance(qx, Quantized):
        raise ValueError(f"dequantize: expected a Quantized or ResidualQuantized, got {type(qx).__name__}")
    fmt, C, group = qx.fmt, qx.channels, qx.group
    lead = qx.codes.shape[:-1]
    codes = qx.codes.reshape(-1, qx.codes.shape[-1])  # [M, code_bytes]
    M = codes.shape[0]
    if fmt.kind == "higgs":
        idx = unpack_bits(codes, fmt.code_bits, C // fmt.d)  # [M, C/d]
        grid = _grid_on(fmt, codes.device)  # [n, d]
        y = grid.index_select(0, idx.view(-1)).view(M, C // group, group)  # [M, G, group]
        s = qx.scales.reshape(M, C // group).float() / math.sqrt(group)  # [M, G]
        x = _rotate_group(y.mul_(s[..., None]))  # [M, G, group]; the rotation is its own inverse
    elif fmt.kind == "int":
        q = unpack_bits(codes, fmt.bits, C).view(M, C // group, group).float()  # [M, G, group]
        step = qx.scales.reshape(M, C // group).float()[..., None]  # [M, G, 1]
        lo = qx.zeros.reshape(M, C // group).float()[..., None]
        x = q * step + lo
    elif fmt.kind == "nvfp4":
        code = unpack_bits(codes, 4, C).view(M, C // NVFP4_BLOCK, NVFP4_BLOCK)  # [M, blocks, 16]
        magnitudes = torch.tensor(E2M1_VALUES, device=codes.device)
        lut = torch.cat([magnitudes, -magnitudes])  # [16]: code = sign bit 3 | magnitude index
        scale = qx.scales.reshape(M, C // NVFP4_BLOCK).view(torch.float8_e4m3fn).float()  # [M, blocks]
        x = lut[code] * scale[..., None]
    else:
        x = codes.view(torch.float8_e4m3fn).float()  # [M, C]
    return x.reshape(*lead, C).to(dtype)


def nbytes(qx) -> int:
    """Bytes of the real stored tensors (packed codes + scales), no dequantized copy."""
    if isinstance(qx, ResidualQuantized):
        return nbytes(qx.mean) + nbytes(qx.resid)
    if not isinstance(qx, Quantized):
        raise ValueError(f"nbytes: expected a Quantized or ResidualQuantized, got {type(qx).__name__}")
    return sum(t.numel() * t.element_size() for t in (qx.codes, qx.scales, qx.zeros) if t is not None)


def meta_chunk_means(x: Tensor, meta_chunk: int, last: str = "repeat") -> Tensor:
    """The mean of each run of m = meta_chunk rows of x [H, T, C]: [H, ceil(T / m), C] float32.

    A last, shorter run (T not a multiple of m) is, with last="repeat" (the paper's code, PAPER.md
    "Confirmed against the authors' code"), padded to m rows by repeating the last row, so its mean
    weighs the last row m - r + 1 times among its r rows; with last="own" it is the mean of its own r
    rows (our earlier rule, kept as a variant).
    """
    if last not in ("repeat", "own"):
        raise ValueError(f"meta_chunk_means: last must be 'repeat' or 'own', got {last!r}")
    H, T, C = x.shape
    m = meta_chunk
    x = x.float()
    pad = -T % m
    if last == "repeat" or pad == 0:
        if pad:
            x = torch.cat([x, x[:, -1:].expand(H, pad, C)], dim=1)  # [H, ceil(T / m) * m, C]
        return x.reshape(H, -1, m, C).mean(dim=2)  # [H, ceil(T / m), C]
    full = T - (m - pad)
    head = x[:, :full].reshape(H, full // m, m, C).mean(dim=2)  # [H, T // m, C]
    return torch.cat([head, x[:, full:].mean(dim=1, keepdim=True)], dim=1)  # [H, ceil(T / m), C]


@torch.no_grad()
def residual_quantize(
    x: Tensor, meta_chunk: int, fmt_mean, fmt_resid=DEFAULT_RESIDUAL_BITS, last: str = "repeat"
) -> ResidualQuantized:
    """Residual landmark quantization (PAPER.md "The paper's method", option).

    x: [H, T, C]. Neighbouring keys are similar, so the mean of each run of m = meta_chunk rows carries
    their shared part; quantize it with fmt_mean, then quantize what is left of each row
    (x - dequantized mean) with the coarser fmt_resid (the paper's default: the 0.5-bit grid). The mean
    is stored once per m rows, so its cost per row is 1/m. A last, shorter run is padded by repeating
    the last row, as in the paper's code (`meta_chunk_means`; last="own" averages its own rows).
    """
    if x.dim() != 3:
        raise ValueError(f"residual_quantize: expected x [H, T, C], got shape {tuple(x.shape)}")
    if meta_chunk < 1:
        raise ValueError(f"residual_quantize: meta_chunk must be >= 1, got {meta_chunk}")
    T = x.shape[1]
    m = meta_chunk
    qmean = quantize(meta_chunk_means(x, m, last), fmt_mean)  # [H, ceil(T / m), C]
    back = dequantize(qmean).repeat_interleave(m, dim=1)[:, :T]  # [H, T, C]
    return ResidualQuantized(mean=qmean, resid=quantize(x.float() - back, fmt_resid), meta_chunk=m, length=T)


def quantized_dot(q: Tensor, qx) -> Tensor:
    """q . x for every row x of a quantized tensor, without building the dequantized copy.

    q: [H, Q, C]; qx: Quantized or ResidualQuantized of shape [H, N, C]. Returns [H, Q, N] float32.

    Why: a decode step scores the query against every landmark, and dequantizing them all at every
    step and layer would cost more than the attention it saves. HIGGS makes a lookup table possible:
    a row is x = R(grid[codes] * s / sqrt(g)) per group, and the rotation R (one Hadamard matrix, or
    Hadamard blocks for a group that is not a power of 2) is symmetric and orthonormal, so
    q . x = sum over groups of s / sqrt(g) * (R(q) . grid[codes]). The dot
    products of each rotated d-dim piece of q with all n grid points form a small table [C/d, n, Q];
    a landmark's score is then, per scale group, a sum of table entries picked by its codes (one
    `embedding_bag` call, reading one byte per code), times the group's scale. Other formats are
    dequantized (they are the comparison points).
    """
    if isinstance(qx, ResidualQuantized):
        mean = quantized_dot(q, qx.mean).repeat_interleave(qx.meta_chunk, dim=-1)  # [H, Q, N_meta * m]
        mean = mean[..., : qx.length]  # [H, Q, N]
        return mean + quantized_dot(q, qx.resid)
    if qx.fmt.kind != "higgs":
        return torch.einsum("hqc,hnc->hqn", q.float(), dequantize(qx))  # [H, Q, N]
    fmt, C, g = qx.fmt, qx.channels, qx.group
    H, Q, _ = q.shape
    N = qx.codes.shape[1]
    P, n, G = C // fmt.d, fmt.n, C // g  # pieces per row, grid points, scale groups per row
    grid = _grid_on(fmt, q.device)  # [n, d]
    q_rot = _rotate_group(q.float().reshape(H, Q, G, g)) / math.sqrt(g)  # [H, Q, G, g]: each group of q
    pieces = q_rot.reshape(H, Q, P, fmt.d).permute(0, 2, 3, 1)  # [H, P, d, Q]: piece p of every query
    # [H*P*n, Q]: row (h, p, j) holds piece p of every query . grid point j (/ sqrt(g)), for the bags
    table = (grid @ pieces).view(H * P * n, Q)
    # [H, P]: the table row of (h, p, grid point 0)
    offset = torch.arange(0, H * P * n, n, dtype=torch.int32, device=q.device).view(H, P)
    out = torch.empty(H, Q, N, device=q.device)  # [H, Q, N] float32
    for a in range(0, N, SCORE_BLOCK):  # blocks of rows keep the int32 index temporaries small
        b = min(a + SCORE_BLOCK, N)
        codes = unpack_bits(qx.codes[:, a:b], fmt.code_bits, P)  # [H, nb, P] int32, a new tensor
        rows = codes.add_(offset[:, None, :]).view(-1, P // G)  # [H*nb*G, P/G] table rows: a bag per group
        dots = F.embedding_bag(rows, table, mode="sum").view(H, b - a, G, Q)  # [H, nb, G, Q] sums of rows
        scale = qx.scales[:, a:b, :, None]  # [H, nb, G, 1] float16
        if G == 1:  # scale, write [H, nb, Q] transposed into [H, Q, nb] in one pass (softmax reads rows of N)
            torch.mul(dots[:, :, 0].transpose(1, 2), scale[:, :, 0].transpose(1, 2), out=out[:, :, a:b])
        else:
            out[:, :, a:b] = (dots * scale).sum(dim=2).transpose(1, 2)
    return out
