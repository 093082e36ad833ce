"""The weights files are written around the page cache by a writer thread (direct_write.py): the bytes are exactly
the ones given, whatever the chunking and however the length falls against the buffers and the alignment; the
written file is not in the page cache (so a pod's memory cgroup is not charged for the output); a filesystem that
refuses O_DIRECT gets the same bytes through the page cache; a full disk raises ENOSPC and leaks nothing."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import threading

import numpy as np
import pytest
from safetensors.numpy import load_file

from modelmerge_engine import direct_write
from modelmerge_engine.direct_write import ALIGNMENT, DirectFile
from modelmerge_engine.safetensors_io import DTYPES, PlannedTensor, ShardedWriter
from tests.helpers.refused_o_direct import refuse_o_direct_at_open
from tests.helpers.small_disk import small_tmpfs

BUFFER = 2 * ALIGNMENT


def _write(path, chunks, **kwargs) -> DirectFile:
    file = DirectFile(path, buffer_bytes=BUFFER, **kwargs)
    for chunk in chunks:
        file.write(chunk)
    file.close()
    return file


@pytest.mark.parametrize("length", [0, 1, ALIGNMENT - 1, ALIGNMENT, ALIGNMENT + 1, BUFFER, 2 * BUFFER,
                                    3 * BUFFER + 5, 7 * BUFFER - 3])
@pytest.mark.parametrize("chunking", ["one", "bytes-of-prime-size", "random"])
def test_the_file_holds_exactly_the_bytes_written(tmp_path, length, chunking):
    rng = np.random.default_rng(length)
    data = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
    if chunking == "one":
        cuts = [0, length]
    elif chunking == "bytes-of-prime-size":
        cuts = [*range(0, length, 1021), length]
    else:
        cuts = sorted({0, length, *rng.integers(0, length + 1, 12).tolist()})
    file = _write(tmp_path / "f", [data[a:b] for a, b in zip(cuts, cuts[1:], strict=False)])
    assert file.direct  # this machine's filesystems accept O_DIRECT
    assert (tmp_path / "f").read_bytes() == data


def _resident_pages(path) -> int:
    """How many of the file's pages are in the page cache: mincore over a private mapping, which faults nothing
    in (and reports the file's cached pages while nothing is written through it)."""
    size = os.path.getsize(path)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    vector = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_COPY) as mapped:
        first = ctypes.c_char.from_buffer(mapped)
        failed = libc.mincore(ctypes.addressof(first), size, vector)
        del first  # the mapping cannot close while a ctypes object holds its buffer
    if failed:
        raise OSError(ctypes.get_errno(), "mincore")
    return sum(byte & 1 for byte in vector)


def test_the_output_does_not_fill_the_page_cache_and_buffered_writes_do(tmp_path, monkeypatch):
    data = np.arange(4 << 20, dtype=np.uint32)  # 16 MiB
    around = DirectFile(tmp_path / "direct", buffer_bytes=1 << 20)
    around.write(data)
    around.close()
    assert around.direct
    total = data.nbytes // mmap.PAGESIZE
    assert _resident_pages(tmp_path / "direct") <= total // 16

    refuse_o_direct_at_open(monkeypatch)  # the control: the same bytes through the page cache stay cached
    through = DirectFile(tmp_path / "buffered", buffer_bytes=1 << 20)
    through.write(data)
    through.close()
    assert not through.direct
    assert _resident_pages(tmp_path / "buffered") >= total // 2
    assert (tmp_path / "buffered").read_bytes() == (tmp_path / "direct").read_bytes() == data.tobytes()


def test_a_filesystem_refusing_o_direct_at_open_gets_the_same_bytes(tmp_path, monkeypatch):
    refuse_o_direct_at_open(monkeypatch)
    data = bytes(range(256)) * 100 + b"tail"
    file = _write(tmp_path / "f", [data[:3], data[3:]])
    assert not file.direct
    assert (tmp_path / "f").read_bytes() == data


def test_einval_at_the_first_direct_write_falls_back_to_the_page_cache(tmp_path, monkeypatch):
    real_pwrite = os.pwrite
    refused = []

    def refusing_pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refusing_pwrite)
    data = np.random.default_rng(1).integers(0, 256, 3 * BUFFER + 17, dtype=np.uint8).tobytes()
    file = _write(tmp_path / "f", [data])
    assert refused == [0] and not file.direct
    assert (tmp_path / "f").read_bytes() == data


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_full_disk_raises_enospc_and_leaks_no_thread_or_descriptor(tmp_path):
    with small_tmpfs(tmp_path / "small", size="64k") as mount:
        fds, threads = _open_fds(), threading.active_count()
        file = DirectFile(mount / "f", buffer_bytes=BUFFER)
        with pytest.raises(OSError) as raised:
            for _ in range(64):
                file.write(bytes(BUFFER))
            file.close()
        assert raised.value.errno == errno.ENOSPC
        file.abort()  # what ShardedWriter.abort does after the error: nothing raised, nothing left open
        assert _open_fds() == fds and threading.active_count() == threads


def test_sharded_writer_output_is_byte_exact_across_shards(tmp_path):
    values = [np.arange(n, dtype=np.float32) * (i + 1) for i, n in enumerate((5, 70_000, 3, 33_333))]
    tensors = [PlannedTensor(f"t{i}", DTYPES["F32"], (v.size,)) for i, v in enumerate(values)]
    writer = ShardedWriter(tmp_path, tensors, max_shard_bytes=200_000)
    for tensor, value in zip(tensors, values, strict=True):
        writer.begin_tensor(tensor.name)
        for chunk in np.array_split(value, 7):
            writer.write(chunk)
    names = writer.finish()
    assert len(names) == 3  # t1 alone is over the limit: a shard of its own
    loaded = {}
    for name in names:
        loaded.update(load_file(tmp_path / name))
    for tensor, value in zip(tensors, values, strict=True):
        assert np.array_equal(loaded[tensor.name], value)
    assert direct_write.BUFFER % ALIGNMENT == 0
