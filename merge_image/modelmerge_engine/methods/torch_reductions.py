"""Whole-tensor statistics of mergekit's methods (norms, dot products), reduced in the order torch's CPU kernels
reduce, so the scalars a method derives from them (slerp's angle, ...) are mergekit's to the bit.

mergekit (the oracle) computes these with torch on CPU: `torch.linalg.vector_norm(x, dim=-1)` and
`x.sum(dim=-1)` over float32 rows. torch reduces a contiguous row with 8-lane float32 vectors (its vectorised
kernels at the width its reductions use on x86-64), in a fixed order:

- the 2-norm (ReduceOpsKernel's last-dimension path): lane l accumulates x[8i + l]² (a multiply, then an add),
  the lanes are added in order, then the leftover elements' squares one by one (as the compiler built torch's
  scalar loop: groups of four squared apart and added, the last up to three with a fused multiply-add), then
  one square root;
- the sum (SumKernel's cascade sum): rows of 4 vectors are accumulated into 4 levels of partial sums that are
  folded together every 2^p rows (p = max(4, ceil(log2(rows)) // 4)), then the partials, the leftover vectors
  and the leftover elements are added in a fixed order. Rows shorter than one vector take the same path with
  one lane.

The kernels run on host arrays of float32 values whatever the kernel set, so the compiled and torch paths (and
CUDA) get the same statistics. torch splits a sum of more than 32768 elements between its threads (the split
depends on how many it has); these kernels reduce as one thread does (mergekit with OMP_NUM_THREADS=1), which
only the last bits of a statistic of a large tensor can tell apart.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from modelmerge_engine.cpu_kernels import _fma, convert
from modelmerge_engine.dtype_codes import F32

LANES = 8  # float32 lanes of torch's reduction vectors
ILP = 4  # vectors per row of the cascade sum
LEVELS = 4  # partial-sum levels of the cascade sum


def host_values(merge, model, name: str, start: int, stop: int) -> np.ndarray:
    """Elements [start, stop) of tensor `name` of `model` (merge.base or one of merge.finetunes) as float32 host
    values of the compute dtype: rounded to it first, as mergekit loads every input in the config's dtype."""
    raw = model.read(name, start, stop)
    stored = model.tensors[name].dtype
    compute = merge.dtype
    if stored.code is None:  # float64 checkpoints: numpy narrows to float32 first
        raw, stored_code = raw.astype(np.float32), F32
    else:
        stored_code = stored.code
    if stored_code != compute.code:
        rounded = np.empty(raw.shape[0], compute.storage)
        convert(raw, stored_code, rounded, compute.code)
        raw, stored_code = rounded, compute.code
    if stored_code == F32:
        return raw
    wide = np.empty(raw.shape[0], np.float32)
    convert(raw, stored_code, wide, F32)
    return wide


@njit(nogil=True, cache=True)
def _ceil_log2(value):
    if value <= 2:
        return 1
    bits = 0
    value -= 1
    while value > 0:
        value >>= 1
        bits += 1
    return bits


@njit(nogil=True, cache=True)
def row_sum(values):
    """`values.sum(dim=-1)` of one contiguous float32 row, in torch's cascade order."""
    n = values.shape[0]
    lanes = LANES if n >= LANES else 1
    vectors = n // lanes
    rows = vectors // ILP
    level_power = max(4, _ceil_log2(rows) // LEVELS)
    level_step = 1 << level_power
    level_mask = level_step - 1
    full_blocks = rows // level_step * level_step
    acc = np.zeros((LEVELS, ILP, lanes), np.float32)
    for i in range(rows):
        for k in range(ILP):
            base = (i * ILP + k) * lanes
            for lane in range(lanes):
                acc[0, k, lane] += values[base + lane]
        done = i + 1
        if done % level_step == 0 and done <= full_blocks:
            for j in range(1, LEVELS):
                for k in range(ILP):
                    for lane in range(lanes):
                        acc[j, k, lane] += acc[j - 1, k, lane]
                        acc[j - 1, k, lane] = 0.0
                if done & (level_mask << (j * level_power)):
                    break
    for j in range(1, LEVELS):
        for k in range(ILP):
            for lane in range(lanes):
                acc[0, k, lane] += acc[j, k, lane]
    for v in range(rows * ILP, vectors):
        for lane in range(lanes):
            acc[0, 0, lane] += values[v * lanes + lane]
    for k in range(1, ILP):
        for lane in range(lanes):
            acc[0, 0, lane] += acc[0, k, lane]
    total = np.float32(0.0)
    for e in range(vectors * lanes, n):
        total += values[e]
    for lane in range(lanes):
        total += acc[0, 0, lane]
    return np.float32(np.float32(0.0) + total)  # accumulated into the zero-filled output


@njit(nogil=True, cache=True)
def row_norm(values):
    """`torch.linalg.vector_norm(values, dim=-1)` of one contiguous float32 row, in torch's order."""
    n = values.shape[0]
    acc = np.zeros(LANES, np.float32)
    whole = n - n % LANES
    for d in range(0, whole, LANES):
        for lane in range(LANES):
            square = values[d + lane] * values[d + lane]
            acc[lane] += square
    total = acc[0]
    for lane in range(1, LANES):
        total += acc[lane]
    grouped = whole + (n - whole) // 4 * 4
    for d in range(whole, grouped):
        square = values[d] * values[d]
        total += square
    for d in range(grouped, n):
        total = _fma(values[d], values[d], total)
    return np.float32(np.sqrt(total))


@njit(nogil=True, cache=True)
def scaled_products(a, b, scale_a, scale_b, out):
    """out = (a / scale_a) * (b / scale_b), each operation rounded to float32 (mergekit normalises before it
    multiplies)."""
    for e in range(out.shape[0]):
        out[e] = (a[e] / scale_a) * (b[e] / scale_b)
