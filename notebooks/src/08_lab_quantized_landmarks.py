# ruff: noqa: F811  (a lab source defines each exercise's function twice: the stub, then its solution)
# %% [markdown]
# # Lab 8. HIGGS: quantizing keys to 2 bits by hand
#
# *Exercises for notebook 4. Write each function in its cell ("your code here"), then run the check cell
# under it: it prints `pass`, or the first way your function differs from the project's, with a hint.
# The checks run your function on small hand-made rows and then on the real keys of the default model
# against the project's own code.*
#
# The paper's fix keeps one landmark per token and makes it cheap by quantizing it to about 2 bits per
# value, with HIGGS (PAPER.md "The paper's method"; "HIGGS"): per token and group of channels,
# 1. the scale is the group's L2 norm;
# 2. a Walsh-Hadamard transform, divided by the norm (and multiplied by √C, C the group's channels), makes
#    the entries close to N(0, 1) even when a few channels dominate the key;
# 3. each consecutive piece of g values is replaced by the index of the nearest point of a fixed grid of n
#    points fitted to the g-dimensional standard Gaussian (PAPER.md "EDEN grids");
# 4. dequantizing is the way back: grid point × norm / √C, then the Hadamard transform again (it is its
#    own inverse).
#
# The 2-bit format: g = 4 values per piece, n = 256 points, so one 8-bit code per 4 values. Here a group
# is one key of one KV head, C = d = 64 channels (the project's default group is min(128, channels)).
#
# You write `higgs_quantize` (rows to codes and scales) and `higgs_dequantize` (back). The project's
# version is `quantize.quantize` / `quantize.dequantize` (which also pack the codes into bytes).

# %%
import sys
sys.path.insert(0, "..")  # the repo root: model.py, kvcache.py, landmarks.py, ...
import math  # noqa: F401  (for your code: math.sqrt)
import torch
torch.set_num_threads(2)

import checks_08_quantized_landmarks as checks  # this lab's check cells
from checks_common import real_case, show_source  # what the four labs' checks share
import quantize

case = real_case()  # the default model's K/V and queries on a Text2JSON prompt (one prefill: ~15 s)
grid = checks.higgs_grid()  # [256, 4]: the 2-bit format's grid (quantize.fit_grid, cached on disk)
case

# %% [markdown]
# `case.k[layer]` is `[H, T, d]`; `case.k[14].reshape(-1, 64)` gives every key of layer 14 as a row.
# `quantize.hadamard(x)` is the orthonormal Walsh-Hadamard transform of the last axis of x (a power of 2
# long): it keeps the norm, and applying it twice gives x back.
#
# ## Exercise 1: quantize
#
# Rows of C channels to one scale and C / g codes each. The project stores the scale as float16 (the check
# accepts the float32 norm too: the few pieces whose code the rounding changes sit halfway between two
# grid points).

# %% tags=["exercise"]
def higgs_quantize(x, grid):
    """HIGGS-quantize each row of x.

    x:     [M, C] rows (C a power of 2: one scale group per row)
    grid:  [n, g] grid points (here 256 points in g = 4 dims)
    returns codes [M, C // g] int64: piece i of a row is its rotated, normalised values i*g ... i*g + g - 1,
                  and its code is the index of the nearest grid point
            scales [M]: each row's L2 norm
    """
    raise NotImplementedError  # your code here

# %% tags=["solution"]
# Solution: the project's own code, quantize.quantize (with _quantize_higgs; printed below), its codes
# unpacked from the bytes it stores them in. Its grid is the 2-bit format's, the one passed in here.
def higgs_quantize(x, grid):
    fmt = quantize.parse_format("2")
    qx = quantize.quantize(x, fmt)
    codes = quantize.unpack_bits(qx.codes, fmt.code_bits, x.shape[1] // fmt.d).long()  # [M, C/g]
    return codes, qx.scales[:, 0].float()  # the float16 norm


show_source(quantize.quantize, quantize._quantize_higgs)

# %% tags=["check"]
checks.check_higgs_quantize(higgs_quantize)

# %% [markdown]
# ## Exercise 2: dequantize
#
# Back from codes and scales to rows: each code's grid point, the pieces side by side, times norm / √C,
# then the Hadamard transform.

# %% tags=["exercise"]
def higgs_dequantize(codes, scales, grid):
    """Rows rebuilt from their HIGGS codes.

    codes:  [M, C // g] int64 grid indices
    scales: [M] each row's norm
    grid:   [n, g]
    returns [M, C]
    """
    raise NotImplementedError  # your code here

# %% tags=["solution"]
# Solution: the project's own code, quantize.dequantize (printed below), given the codes packed as it
# stores them.
def higgs_dequantize(codes, scales, grid):
    fmt = quantize.parse_format("2")
    C = codes.shape[1] * fmt.d
    qx = quantize.Quantized(
        codes=quantize.pack_bits(codes, fmt.code_bits), scales=scales.half()[:, None], zeros=None,
        fmt=fmt, channels=C, group=C,
    )
    return quantize.dequantize(qx)


show_source(quantize.dequantize)

# %% tags=["check"]
checks.check_higgs_dequantize(higgs_dequantize)

# %% [markdown]
# **What the check's last step shows.** The round trip of the real keys loses about 9% of their squared
# norm, close to the grid's error on Gaussian data (0.0964 per dimension, PAPER.md "EDEN grids"): the
# rotation made real keys, outlier channel and all, look Gaussian to the grid. That copy is coarser than
# ShadowKV's rank-30 keys (lab 6), but it plays another part: it only chooses which tokens to read, and
# attention then reads their exact keys. In the README's table 2-bit token landmarks are level with exact
# top-k selection in fact accuracy, where chunk means are not: one landmark per token keeps every token's
# own score, where a chunk mean averages it away (lab 7). Notebook 4 measures recall against the bits.
