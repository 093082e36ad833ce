"""bench/disk.py: the disk probe recorded with the engine benchmark, and the floor the report derives from it."""

from __future__ import annotations

import os

import pytest

from bench import report
from bench.disk import BLOCK, io_floor_seconds, probe, read_throughput, write_throughput
from tests.helpers.refused_o_direct import refuse_o_direct_at_open


def _file(path, size: int):
    path.write_bytes(os.urandom(size))
    return path


def test_reads_every_byte_of_every_file_at_once(tmp_path):
    # a whole number of blocks, a partial last block, and a file smaller than one block
    sizes = [2 * BLOCK, 3 * BLOCK + 12345, 4096 * 3 + 7]
    files = [_file(tmp_path / f"model-{i}.safetensors", size) for i, size in enumerate(sizes)]
    read = read_throughput(files)
    assert read["bytes"] == sum(sizes)
    assert read["files"] == 3
    assert read["seconds"] > 0 and read["bytes_per_second"] == round(read["bytes"] / read["seconds"])


def test_writes_whole_blocks_and_leaves_nothing_behind(tmp_path):
    written = write_throughput(tmp_path, BLOCK + 1)
    assert written["bytes"] == 2 * BLOCK
    assert written["seconds"] > 0
    assert list(tmp_path.iterdir()) == []


def test_a_filesystem_without_o_direct_is_reported_not_measured(tmp_path, monkeypatch):
    files = [_file(tmp_path / "model.safetensors", BLOCK)]
    refuse_o_direct_at_open(monkeypatch)
    disk = probe(files, tmp_path, write_bytes=BLOCK)
    assert set(disk) == {"unavailable"}
    assert "Invalid argument" in disk["unavailable"]
    assert io_floor_seconds(disk, read_bytes=1, write_bytes=1) is None
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_the_floor_is_reading_the_inputs_plus_writing_the_output():
    disk = {"read": {"bytes_per_second": 1_000_000_000}, "write": {"bytes_per_second": 500_000_000}}
    assert io_floor_seconds(disk, read_bytes=3_000_000_000, write_bytes=1_000_000_000) == pytest.approx(5.0)


def _result(disk: dict | None) -> dict:
    result = {"settings": {"finetunes": [2, 8], "input_bytes": {"2": 3_000_000_000, "8": 9_000_000_000}}}
    if disk is not None:
        result["disk"] = disk
    return result


def test_the_report_states_the_disk_and_the_cold_floor():
    start = {"read": {"bytes_per_second": 1_000_000_000, "files": 3},
             "write": {"bytes_per_second": 500_000_000, "bytes": 1_000_000_000}}
    end = {"read": {"bytes_per_second": 2_000_000_000, "files": 3},
           "write": {"bytes_per_second": 1_500_000_000, "bytes": 1_000_000_000}}
    line = report._disk(_result({"start": start, "end": end}))
    assert "reads 1.00 GB/s, writes 0.50 GB/s at the start, reads 2.00 GB/s, writes 1.50 GB/s at the end" in line
    assert "inputs of 2 fine-tunes (3.00 GB)" in line
    assert "takes 5.00 s" in line


def test_the_report_says_when_the_disk_was_not_probed():
    assert "not probed" in report._disk(_result(None))
    unavailable = report._disk(_result({"start": {"unavailable": "OSError: [Errno 22] Invalid argument"}}))
    assert "could not be probed: OSError: [Errno 22] Invalid argument" in unavailable
