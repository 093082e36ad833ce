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
# histogram_pass(streams, shift, bins, buckets) -> counts[len(streams), bins]: one pass over the values of the
# streams at those positions together (buckets: one per stream, see below)
HistogramPass = Callable[[list[int], int, int, np.ndarray], np.ndarray]


def _kth_bin(counts: np.ndarray, k: int) -> tuple[int, int]:
    """The bin holding the k-th (1-based) value, and how many values lie in the bins before it."""
    cumulative = np.cumsum(counts)
    index = int(np.searchsorted(cumulative, k))
    return index, int(cumulative[index - 1]) if index else 0


def kth_magnitudes(histogram_pass: HistogramPass, ks: list[int], *, wide: bool) -> list[int]:
    """For each stream i, the ks[i]-th smallest magnitude as a bit pattern (NO_THRESHOLD where ks[i] = 0).

    `wide` is True for float32: a first pass counts the high 16 bits (shift 16), a second counts the low 16
    bits of the values whose high bits equal each stream's `bucket`; 16-bit formats need the first pass only
    (shift 0). Every stream that needs a threshold is counted in the same pass, so the inputs are read once per
    pass however many models there are (the counts, 2^16 integers per stream, are all that grows)."""
    found = [NO_THRESHOLD] * len(ks)
    streams = [i for i, k in enumerate(ks) if k]
    if not streams:
        return found
    anywhere = np.full(len(streams), NO_THRESHOLD, dtype=np.int64)
    if not wide:
        counts = histogram_pass(streams, 0, 1 << 15, anywhere)
        for row, i in enumerate(streams):
            found[i] = _kth_bin(counts[row], ks[i])[0]
        return found
    counts = histogram_pass(streams, 16, 1 << 15, anywhere)
    high = [_kth_bin(counts[row], ks[i]) for row, i in enumerate(streams)]
    buckets = np.array([bucket for bucket, _ in high], dtype=np.int64)
    counts = histogram_pass(streams, 0, 1 << 16, buckets)
    for row, (i, (bucket, before)) in enumerate(zip(streams, high, strict=True)):
        found[i] = (bucket << 16) | _kth_bin(counts[row], ks[i] - before)[0]
    return found
