"""Inputs are read ahead of the kernels (safetensors_io.SafetensorsModel._read_ahead): each byte of a file asked
for once (madvise WILLNEED) about READ_AHEAD bytes before the reads reach it, again from where a new pass starts;
an input read through it gives the same values."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

from modelmerge_engine.precompile import write_checkpoint
from modelmerge_engine.safetensors_io import READ_AHEAD, SafetensorsModel


class FakeMap:
    def __init__(self, size: int):
        self.size = size
        self.advised: list[tuple[int, int]] = []

    def __len__(self) -> int:
        return self.size

    def madvise(self, option: int, start: int, length: int) -> None:
        assert option == mmap.MADV_WILLNEED and start % mmap.PAGESIZE == 0
        self.advised.append((start, length))


def test_each_byte_is_asked_for_once_ahead_of_the_reads_and_again_for_a_new_pass(tmp_path):
    model = SafetensorsModel.__new__(SafetensorsModel)
    model._prefetched = {}
    size = 5 * READ_AHEAD + 12345
    mapped = FakeMap(size)
    file = Path("f")
    for offset in range(1000, size, READ_AHEAD // 7):  # one pass through the file
        model._read_ahead(file, mapped, offset)
        assert model._prefetched[file] >= min(size, offset + READ_AHEAD // 2)  # always ahead of the reads
    ends = [start + length for start, length in mapped.advised]
    assert [start for start, _ in mapped.advised] == [0, *ends[:-1]]  # contiguous: each byte once
    assert ends[-1] == size
    mapped.advised.clear()
    model._read_ahead(file, mapped, 0)  # a second pass starts over
    assert mapped.advised == [(0, READ_AHEAD)]


def test_reads_are_unchanged(tmp_path):
    path = write_checkpoint(tmp_path / "m", "bfloat16", seed=3)
    model = SafetensorsModel(path, "model")
    name = "model.embed_tokens.weight"
    whole = model.read(name, 0, 512).copy()
    parts = np.concatenate([model.read(name, start, start + 37) for start in range(0, 512, 37)])
    assert np.array_equal(whole, parts)
    model.close()
