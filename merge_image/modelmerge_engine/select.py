"""Exact k-th smallest magnitude without holding the values: a radix select over IEEE bit patterns.

For non-negative floats, the order of the bit patterns (sign bit cleared) is the order of the values, so a
histogram of the patterns finds `torch.kthvalue(x.abs(), k)` exactly. 16-bit formats need one pass with
2^15 bins; float32 needs two: 2^15 bins of the high 16 bits, then 2^16 bins of the low 16 bits inside the
chosen bucket. Counts are integers, so the result does not depend on how the passes are split or ordered.
Thresholds are magnitude bit patterns; the kernels compare patterns too.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

NO_THRESHOLD = -1
# histogram_pass(shift, bins, bucket) -> counts[bin] over every value of one stream (bucket: see below)
HistogramPass = Callable[[int, int, int], np.ndarray]


def _kth_bin(counts: np.ndarray, k: int) -> tuple[int, int]:
    """The bin holding the k-th (1-based) value, and how many values lie in the bins before it."""
    cumulative = np.cumsum(counts)
    index = int(np.searchsorted(cumulative, k))
    return index, int(cumulative[index - 1]) if index else 0


def kth_magnitude(histogram_pass: HistogramPass, k: int, *, wide: bool) -> int:
    """The k-th smallest magnitude of one stream as a bit pattern (NO_THRESHOLD where k = 0).

    `wide` is True for float32: a first pass counts the high 16 bits (shift 16), a second counts the low 16
    bits of the values whose high bits equal `bucket`; 16-bit formats need the first pass only (shift 0).
    One stream at a time, so memory does not grow with the number of models."""
    if not k:
        return NO_THRESHOLD
    if not wide:
        return _kth_bin(histogram_pass(0, 1 << 15, NO_THRESHOLD), k)[0]
    bucket, before = _kth_bin(histogram_pass(16, 1 << 15, NO_THRESHOLD), k)
    return (bucket << 16) | _kth_bin(histogram_pass(0, 1 << 16, bucket), k - before)[0]
