"""Exact k-th smallest magnitude without holding the values: a radix select over IEEE bit patterns.

For non-negative floats, the order of the bit patterns (sign bit cleared) is the order of the values, so a
histogram of the patterns finds `torch.kthvalue(x.abs(), k)` exactly. 16-bit types need one pass with 2^15
bins; float32 needs two passes of 2^16 bins (high half, then low half within the chosen bucket).
Thresholds are returned as magnitude bit patterns, and masks compare patterns too (`magnitude_bits`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

_INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    """|x| as an integer tensor whose order is the order of |x| (NaN patterns sort above +inf)."""
    view = _INT_VIEW.get(x.dtype)
    if view is None:
        raise TypeError(f"unsupported dtype {x.dtype}")
    mask = 0x7FFF if view == torch.int16 else 0x7FFFFFFF
    return x.view(view) & mask


def bits_to_value(bits: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor([bits], dtype=_INT_VIEW[dtype]).view(dtype)[0]


def _kth_bin(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """Index of the bin holding the k-th (1-based) element, and how many elements precede that bin."""
    cumulative = torch.cumsum(counts, 0)
    index = int(torch.searchsorted(cumulative, torch.tensor([k], dtype=cumulative.dtype)).item())
    before = int(cumulative[index - 1].item()) if index else 0
    return index, before


Step = Callable[[], list[torch.Tensor]]  # produces one tensor per stream when called
Mapper = Callable[[Callable, Iterable], Iterable]  # an ordered map, possibly over worker threads


def kth_magnitude_bits(steps: Callable[[], Iterable[Step]], ks: list[int], dtype: torch.dtype,
                       mapper: Mapper = map) -> list[int | None]:
    """k-th smallest |x| (1-based k) of each of several streams at once, as magnitude bit patterns.

    `steps()` yields callables, each producing one tensor per stream (all of `dtype`); it is iterated once
    for 16-bit types and twice for float32. Each step is histogrammed by `mapper` (e.g. a thread pool) and
    the integer counts are summed, so the result is exact and independent of the order. k = 0 gives None."""
    active = [i for i, k in enumerate(ks) if k]

    def histograms(step: Step, shift: int, bins: int, bucket: list[int] | None) -> list[torch.Tensor]:
        tensors = step()
        counts = []
        for i in active:
            bits = magnitude_bits(tensors[i])
            if bucket is not None:
                bits = bits[(bits >> 16) == bucket[i]] & 0xFFFF
            counts.append(_bincount(bits >> shift, bins))
        return counts

    def total(shift: int, bins: int, bucket: list[int] | None = None) -> dict[int, torch.Tensor]:
        sums = {i: torch.zeros(bins, dtype=torch.int64) for i in active}
        for counts in mapper(lambda step: histograms(step, shift, bins, bucket), steps()):
            for i, count in zip(active, counts, strict=True):
                sums[i] += count
        return sums

    result: list[int | None] = [None] * len(ks)
    if dtype in (torch.bfloat16, torch.float16):
        for i, counts in total(0, 1 << 15).items():
            result[i] = _kth_bin(counts, ks[i])[0]
        return result
    high = {i: _kth_bin(counts, ks[i]) for i, counts in total(16, 1 << 15).items()}
    buckets = [high[i][0] if i in high else -1 for i in range(len(ks))]
    for i, counts in total(0, 1 << 16, buckets).items():
        bucket, before = high[i]
        result[i] = (bucket << 16) | _kth_bin(counts, ks[i] - before)[0]
    return result


def _bincount(values: torch.Tensor, bins: int) -> torch.Tensor:
    values = values.reshape(-1)
    if values.is_cuda:
        return torch.bincount(values.to(torch.int32), minlength=bins).to("cpu", torch.int64)
    return torch.bincount(values.to(torch.int32), minlength=bins)
