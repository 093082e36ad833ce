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


ChunkSource = Callable[[], Iterable[list[torch.Tensor]]]


def kth_magnitude_bits(chunks: ChunkSource, ks: list[int], dtype: torch.dtype) -> list[int | None]:
    """k-th smallest |x| (1-based k) of each of several streams at once, as magnitude bit patterns.

    `chunks()` yields, for each step, one tensor per stream (all of `dtype`); it is called once for 16-bit
    types and twice for float32. A k of 0 gives None (nothing to select)."""
    streams = len(ks)
    if dtype in (torch.bfloat16, torch.float16):
        counts = [torch.zeros(1 << 15, dtype=torch.int64) for _ in range(streams)]
        for step in chunks():
            for i, x in enumerate(step):
                if ks[i]:
                    counts[i] += _bincount(magnitude_bits(x), 1 << 15)
        return [_kth_bin(counts[i], k)[0] if k else None for i, k in enumerate(ks)]

    high = [torch.zeros(1 << 15, dtype=torch.int64) for _ in range(streams)]
    for step in chunks():
        for i, x in enumerate(step):
            if ks[i]:
                high[i] += _bincount(magnitude_bits(x) >> 16, 1 << 15)
    buckets = [_kth_bin(high[i], k) if k else (0, 0) for i, k in enumerate(ks)]
    low = [torch.zeros(1 << 16, dtype=torch.int64) for _ in range(streams)]
    for step in chunks():
        for i, x in enumerate(step):
            if ks[i]:
                bits = magnitude_bits(x)
                in_bucket = bits[(bits >> 16) == buckets[i][0]]
                low[i] += _bincount(in_bucket & 0xFFFF, 1 << 16)
    result: list[int | None] = []
    for i, k in enumerate(ks):
        if not k:
            result.append(None)
            continue
        bucket, before = buckets[i]
        result.append((bucket << 16) | _kth_bin(low[i], k - before)[0])
    return result


def _bincount(values: torch.Tensor, bins: int) -> torch.Tensor:
    values = values.reshape(-1)
    if values.is_cuda:
        return torch.bincount(values.to(torch.int32), minlength=bins).to("cpu", torch.int64)
    return torch.bincount(values.to(torch.int32), minlength=bins)
