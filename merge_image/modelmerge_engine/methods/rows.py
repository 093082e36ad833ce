"""Per-row values of a tensor (one per row of `width` elements; the whole tensor is one row) spread over the
elements of one range, for combine steps whose coefficients differ by row (model_stock's filter_wise ratio,
nuslerp's per-row angle). A method's `inputs` hook appends the result to the fine-tunes, so the combine step,
which sees no range position, gets each element's row values."""

from __future__ import annotations

import numpy as np


def per_element(rows: np.ndarray, width: int, start: int, stop: int) -> np.ndarray:
    """rows[i] (a value, or a row of values) for each element start..stop-1, whose row is element // width."""
    first, last = start // width, max(start, stop - 1) // width
    bounds = np.arange(first, last + 2, dtype=np.int64) * width
    counts = np.maximum(np.minimum(bounds[1:], stop) - np.maximum(bounds[:-1], start), 0)
    return np.ascontiguousarray(np.repeat(rows[first:last + 1], counts, axis=0))


def to_kernels(values: np.ndarray, kernels):
    """`values` where the kernel set computes: as they are for the compiled set, a tensor on its device for torch."""
    if not hasattr(kernels, "torch"):
        return values
    return kernels.torch.from_numpy(values).to(kernels.device)
