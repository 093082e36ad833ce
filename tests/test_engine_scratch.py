"""Scratch arrays (modelmerge_engine/scratch.py): small ones in anonymous memory (a thread's reused buffer where
asked), large ones in a file-backed mapping of an unlinked file in TMPDIR; and the merges whose top-k selections
hold their keys and element order there still equal mergekit's bytes. The memory limit they exist for is tested
in test_engine_memory_limit.py."""

from __future__ import annotations

import tempfile
import threading

import numpy as np
import pytest

from modelmerge_engine import scratch
from modelmerge_engine.errors import MergeError
from tests import test_mergekit_oracle
from tests.helpers.oracle import engine_merge
from tests.test_mergekit_gta import agree, ours_and_theirs
from tests.test_mergekit_more import sce_config

mergekit = test_mergekit_oracle.mergekit
families = test_mergekit_oracle.families


@pytest.fixture
def file_backed(monkeypatch, tmp_path) -> list[int]:
    """Every scratch request goes to a file in a TMPDIR of this test's; returns the sizes reserved, as they are."""
    monkeypatch.setattr(scratch, "IN_MEMORY_BYTES", 0)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmpdir"))
    (tmp_path / "tmpdir").mkdir()
    reserved: list[int] = []
    fallocate = scratch.os.posix_fallocate

    def recording(fd, offset, length):
        reserved.append(length)
        return fallocate(fd, offset, length)

    monkeypatch.setattr(scratch.os, "posix_fallocate", recording)
    return reserved


def test_small_arrays_are_anonymous_and_a_threads_buffer_is_reused():
    a, b = scratch.scratch_arrays([(np.int32, 1000), (np.float32, 10)], purpose="test")
    assert a.dtype == np.int32 and a.shape == (1000,) and b.dtype == np.float32 and b.shape == (10,)
    assert a.base is None and b.base is None  # their own allocations
    first, = scratch.scratch_arrays([(np.int32, 1000)], purpose="test", per_thread=True)
    again, = scratch.scratch_arrays([(np.int32, 500)], purpose="test", per_thread=True)
    assert np.shares_memory(first, again)
    elsewhere = []
    thread = threading.Thread(target=lambda: elsewhere.extend(
        scratch.scratch_arrays([(np.int32, 1000)], purpose="test", per_thread=True)))
    thread.start()
    thread.join()
    assert not np.shares_memory(first, elsewhere[0])


def test_large_arrays_share_an_unlinked_file_mapping_and_leave_nothing_behind(file_backed, tmp_path):
    keys, flags, order = scratch.scratch_arrays([(np.int32, 1001), (np.bool_, 3), (np.int64, 7)], purpose="test")
    assert file_backed == [4096 + 7 * 8]  # keys 0-4003, flags at 4032, order at 4096: 64-byte boundaries
    for array in (keys, flags, order):
        assert array.flags.writeable and array.flags.c_contiguous and array.ctypes.data % 64 == 0
    keys[:] = np.arange(1001)
    flags[:] = True
    order[:] = -1
    assert keys.sum() == 1000 * 1001 // 2 and flags.all() and (order == -1).all()  # no overlap
    assert list((tmp_path / "tmpdir").iterdir()) == []


def test_a_tmpdir_without_room_is_an_error_naming_it_and_the_purpose(file_backed, monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    with pytest.raises(MergeError, match=r"the selection of tensor x: cannot reserve 400 bytes of scratch space "
                                         r"in TMPDIR \(.*missing\)"):
        scratch.scratch_arrays([(np.int32, 100)], purpose="the selection of tensor x")


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_selections_in_scratch_files_match_mergekit(families, mergekit, tmp_path, file_backed, method):
    agree(*ours_and_theirs(families, mergekit, tmp_path, method, "qwen2-fp32-4-tied", rescale=True))
    assert file_backed  # every tensor's selection went through a file


def test_sce_selections_in_scratch_files_match_mergekit(families, mergekit, tmp_path, file_backed):
    base, finetunes = families["llama-bf16-4-sharded"]
    ours = engine_merge(base, finetunes, tmp_path / "ours", merge_method="sce", select_topk=0.3)
    agree(ours, dict(mergekit(sce_config(base, finetunes, select_topk=0.3, dtype="bfloat16"))), False)
    assert file_backed
