"""The weights writer keeps the disk writing behind it (write_behind.py): every window is handed to the disk once
it is complete, the window before it waited for, in order, each byte once; the file's bytes are unchanged; a
filesystem that refuses sync_file_range leaves the final fsync to do everything, and a disk error fails."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from modelmerge_engine.safetensors_io import DTYPES, PlannedTensor, ShardedWriter
from modelmerge_engine.write_behind import WAIT_AFTER, WAIT_BEFORE, WRITE, WriteBehind, _libc_sync_file_range


class Recorder:
    def __init__(self, *, fail_with: int | None = None):
        self.calls: list[tuple[int, int, int]] = []
        self.fail_with = fail_with

    def __call__(self, fd: int, offset: int, nbytes: int, flags: int) -> None:
        if self.fail_with is not None:
            raise OSError(self.fail_with, os.strerror(self.fail_with))
        self.calls.append((offset, nbytes, flags))


def test_windows_are_started_in_order_and_the_one_before_waited_for(tmp_path):
    recorder = Recorder()
    with open(tmp_path / "f", "wb") as handle:
        behind = WriteBehind(handle.fileno(), window=100, sync_file_range=recorder)
        for position in (40, 99, 100, 150, 230, 260, 330, 345):
            if behind.due(position):
                behind.advance(position)
    assert recorder.calls == [(0, 100, WRITE),
                              (0, 100, WAIT_BEFORE | WRITE | WAIT_AFTER), (100, 130, WRITE),
                              (100, 130, WAIT_BEFORE | WRITE | WAIT_AFTER), (230, 100, WRITE)]
    started = [(offset, nbytes) for offset, nbytes, flags in recorder.calls if flags == WRITE]
    assert [offset for offset, _ in started] == [0, 100, 230]  # contiguous, each byte once
    assert all(a + n == b for (a, n), (b, _) in zip(started, started[1:], strict=False))


def test_a_refusing_filesystem_turns_it_off_and_a_disk_error_fails(tmp_path):
    with open(tmp_path / "f", "wb") as handle:
        refused = WriteBehind(handle.fileno(), window=10, sync_file_range=Recorder(fail_with=errno.EINVAL))
        refused.advance(20)
        assert not refused.due(1000)  # off: the final fsync does everything
        full = WriteBehind(handle.fileno(), window=10, sync_file_range=Recorder(fail_with=errno.ENOSPC))
        with pytest.raises(OSError) as raised:
            full.advance(20)
        assert raised.value.errno == errno.ENOSPC


def test_the_real_call_works_here_and_the_writer_output_is_unchanged(tmp_path, monkeypatch):
    sync = _libc_sync_file_range()
    assert sync is not None  # Linux
    calls = Recorder()

    def recording(fd, offset, nbytes, flags):
        calls(fd, offset, nbytes, flags)
        sync(fd, offset, nbytes, flags)

    monkeypatch.setattr("modelmerge_engine.safetensors_io.WriteBehind",
                        lambda fd: WriteBehind(fd, window=1 << 16, sync_file_range=recording))
    values = np.arange(1 << 17, dtype=np.float32)
    tensor = PlannedTensor("a.weight", DTYPES["F32"], (values.size,))
    writer = ShardedWriter(tmp_path, [tensor], max_shard_bytes=1 << 30)
    writer.begin_tensor("a.weight")
    for chunk in np.array_split(values, 37):
        writer.write(chunk)
    writer.finish()
    assert len([c for c in calls.calls if c[2] == WRITE]) >= 6
    data = (tmp_path / "model.safetensors").read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert np.array_equal(np.frombuffer(data[8 + header:], dtype=np.float32), values)
