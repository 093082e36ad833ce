"""Write-behind for the weights files: the disk writes while the engine computes.

A merge appends the weights in order and fsyncs each file once it is complete (output.py: a published output
never holds a file the disk lost). Left alone, the kernel keeps most of what was written dirty in the page cache
until that fsync, which then waits for the whole file (a second or more per GB here) after the arithmetic is
done. Instead, every WINDOW bytes, the writer asks the kernel to start writing the window just completed
(sync_file_range SYNC_FILE_RANGE_WRITE, which returns at once) after waiting for the window before it to be on
disk (SYNC_FILE_RANGE_WAIT_BEFORE | WRITE | WAIT_AFTER). The disk then works while the next window is computed,
the final fsync has about two windows left to wait for, and the file's dirty pages stay below two windows: a
pod's memory cgroup counts page cache, and dirty pages are the ones it cannot reclaim without waiting for the
disk. The written pages stay cached (clean, reclaimable), so an evaluation that reads the output right after
finds them. Durability still comes from the fsync alone. Linux only; where sync_file_range is missing or
refused, nothing is done and the fsync waits for everything, as before."""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable

WINDOW = 64 << 20  # bytes per write-behind step
WAIT_BEFORE, WRITE, WAIT_AFTER = 1, 2, 4  # linux/fs.h SYNC_FILE_RANGE_*
SyncFileRange = Callable[[int, int, int, int], None]  # (fd, offset, nbytes, flags); OSError when refused


def _libc_sync_file_range() -> SyncFileRange | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int

    def sync_file_range(fd: int, offset: int, nbytes: int, flags: int) -> None:
        if function(fd, offset, nbytes, flags) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    return sync_file_range


_SYNC_FILE_RANGE = _libc_sync_file_range()


class WriteBehind:
    """Tracks how much of one file was handed to the kernel and keeps the disk writing behind it."""

    def __init__(self, fd: int, *, window: int = WINDOW, sync_file_range: SyncFileRange | None = _SYNC_FILE_RANGE):
        self.fd = fd
        self.window = window
        self._sync = sync_file_range
        self._started = 0  # bytes [0, started) were handed to the disk
        self._waited = 0  # bytes [0, waited) are on disk

    def due(self, position: int) -> bool:
        """Whether `position` (bytes written so far) completes a window; the caller flushes its buffer first."""
        return self._sync is not None and position - self._started >= self.window

    def advance(self, position: int) -> None:
        """The file holds `position` bytes (all flushed to the kernel): wait for the window before the last one,
        start the disk on everything since."""
        if self._sync is None or position <= self._started:
            return
        try:
            if self._started > self._waited:
                self._sync(self.fd, self._waited, self._started - self._waited, WAIT_BEFORE | WRITE | WAIT_AFTER)
                self._waited = self._started
            self._sync(self.fd, self._started, position - self._started, WRITE)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EIO, errno.EDQUOT):
                raise  # the disk's own failure: the merge must fail, as its fsync would
            self._sync = None  # refused here (e.g. a filesystem without it): the final fsync does everything
            return
        self._started = position
