"""The radix select of thresholds (select.kth_magnitudes) on its own: exact k-th smallest magnitude bit patterns
for several streams at once, one histogram pass over all of them (two for float32), k = 0 streams left out."""

from __future__ import annotations

import numpy as np
import pytest

from modelmerge_engine.select import NO_THRESHOLD, kth_magnitudes


def _passes_over(patterns: list[np.ndarray]):
    """A histogram_pass over magnitude bit patterns held in memory, recording each call's streams."""
    calls = []

    def histogram_pass(streams, shift, bins, buckets):
        calls.append(list(streams))
        counts = np.zeros((len(streams), bins), dtype=np.int64)
        for row, (i, bucket) in enumerate(zip(streams, buckets, strict=True)):
            bits = patterns[i]
            if bucket >= 0:
                bits = bits[(bits >> 16) == bucket] & 0xFFFF
            np.add.at(counts[row], bits >> shift, 1)
        return counts

    return histogram_pass, calls


@pytest.mark.parametrize("wide", [False, True], ids=["16-bit", "float32"])
def test_every_stream_exact_in_one_pass_each(wide):
    rng = np.random.default_rng(7)
    values = [rng.standard_normal(5000).astype(np.float32) * scale for scale in (1.0, 1e-3, 50.0, 1.0)]
    if wide:
        patterns = [v.view(np.uint32).astype(np.int64) & 0x7FFFFFFF for v in values]
    else:  # bfloat16's magnitude bits (truncation is enough here: any 15-bit patterns will do)
        patterns = [(v.view(np.uint32).astype(np.int64) >> 16) & 0x7FFF for v in values]
    ks = [1, 2500, 0, 5000]
    histogram_pass, calls = _passes_over(patterns)
    found = kth_magnitudes(histogram_pass, ks, wide=wide)
    expected = [int(np.sort(p)[k - 1]) if k else NO_THRESHOLD for p, k in zip(patterns, ks, strict=True)]
    assert found == expected
    assert calls == [[0, 1, 3]] * (2 if wide else 1)  # every stream that needs one, together; k = 0 left out


def test_no_pass_when_no_stream_needs_a_threshold():
    histogram_pass, calls = _passes_over([np.arange(10), np.arange(10)])
    assert kth_magnitudes(histogram_pass, [0, 0], wide=True) == [NO_THRESHOLD, NO_THRESHOLD]
    assert calls == []
