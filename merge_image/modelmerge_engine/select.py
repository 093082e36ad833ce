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
# histogram_pass(shift, bins, buckets) -> counts[stream, bin], summed over every value of every stream
HistogramPass = Callable[[int, int, np.ndarray], np.ndarray]


def _kth_bin(counts: np.ndarray, k: int) -> tuple[int, int]:
    """The bin holding the k-th (1-based) value, and how many values lie in the bins before it."""
    cumulative = np.cumsum(counts)
    index = int(np.searchsorted(cumulative, k))
    return index, int(cumulative[index - 1]) if index else 0


def kth_magnitudes(histogram_pass: HistogramPass, ks: list[int], wide: bool) -> np.ndarray:
    """The k-th smallest magnitude of each stream as a bit pattern (NO_THRESHOLD where k = 0).

    `wide` is True for float32 (two passes), False for 16-bit formats (one pass)."""
    streams = len(ks)
    result = np.full(streams, NO_THRESHOLD, dtype=np.int64)
    if not any(ks):
        return result
    no_bucket = np.full(streams, NO_THRESHOLD, dtype=np.int64)
    if not wide:
        counts = histogram_pass(0, 1 << 15, no_bucket)
        for i, k in enumerate(ks):
            if k:
                result[i] = _kth_bin(counts[i], k)[0]
        return result
    high = histogram_pass(16, 1 << 15, no_bucket)
    buckets, before = no_bucket.copy(), np.zeros(streams, dtype=np.int64)
    for i, k in enumerate(ks):
        if k:
            buckets[i], before[i] = _kth_bin(high[i], k)
    low = histogram_pass(0, 1 << 16, buckets)
    for i, k in enumerate(ks):
        if k:
            result[i] = (buckets[i] << 16) | _kth_bin(low[i], k - before[i])[0]
    return result
