"""The disk under a benchmark's inputs: how fast it reads and writes with the page cache out of the way.

A cold merge reads every input from disk and writes its output through to it, so no tool's cold time can beat
reading the inputs and writing the output at this disk's rates. Those rates differ between machines and, on
shared cloud disks, between days (this machine's disk read 3 GB in 1.6 s one day and in 3.1 s the next). The
engine benchmark probes the disk before and after its trials and records both probes with its rows (`disk` in
the results), so every cold figure can be read against the disk it ran on.

Reads: the given files all at once (one thread per file, as a merge reads its base and fine-tunes together),
O_DIRECT in 2 MiB blocks, so from the disk whatever the page cache holds. Writes: one file of the given size,
O_DIRECT in 2 MiB blocks, then fsync (as the engine writes its output), removed afterwards."""

from __future__ import annotations

import mmap
import os
import threading
import time
from pathlib import Path

BLOCK = 2 << 20  # bytes per request; a multiple of every logical block size in use (O_DIRECT's alignment)


def _rate(nbytes: int, seconds: float) -> dict:
    return {"bytes": nbytes, "seconds": seconds, "bytes_per_second": round(nbytes / seconds)}


def read_throughput(files: list[Path]) -> dict:
    """Reads `files` from disk at once, one O_DIRECT reader thread each."""
    totals = [0] * len(files)
    errors: list[BaseException] = []

    def read(index: int, path: Path) -> None:
        buffer = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT requires
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            try:
                offset = 0
                while count := os.preadv(fd, [buffer], offset):
                    offset += count
                    if count < BLOCK:
                        break
                totals[index] = offset
            finally:
                os.close(fd)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            errors.append(exc)
        finally:
            buffer.close()

    threads = [threading.Thread(target=read, args=(i, p)) for i, p in enumerate(files)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    if errors:
        raise errors[0]
    return {**_rate(sum(totals), seconds), "files": len(files)}


def write_throughput(folder: Path, nbytes: int) -> dict:
    """Writes `nbytes` (rounded up to a whole block) to a new file in `folder` with O_DIRECT, fsyncs it and
    removes it."""
    buffer = mmap.mmap(-1, BLOCK)
    buffer.write(os.urandom(BLOCK))  # incompressible, whatever the device does with zeros
    path = folder / f".disk-probe-{os.getpid()}"
    blocks = -(-nbytes // BLOCK)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
        try:
            started = time.perf_counter()
            for block in range(blocks):
                os.pwritev(fd, [buffer], block * BLOCK)
            os.fsync(fd)
            seconds = time.perf_counter() - started
        finally:
            os.close(fd)
    finally:
        path.unlink(missing_ok=True)
        buffer.close()
    return _rate(blocks * BLOCK, seconds)


def probe(files: list[Path], folder: Path, *, write_bytes: int) -> dict:
    """Read throughput over `files` together and write throughput of `write_bytes` into `folder`, or why the
    disk could not be probed (e.g. a file system without O_DIRECT)."""
    try:
        return {"read": read_throughput(files), "write": write_throughput(folder, write_bytes)}
    except OSError as exc:
        return {"unavailable": f"{type(exc).__name__}: {exc}"}


def describe(disk: dict) -> str:
    """One probe in words: its read and write rates, or why there are none."""
    if "read" not in disk:
        return f"not probed ({disk['unavailable']})" if "unavailable" in disk else "not probed"
    read, write = disk["read"]["bytes_per_second"], disk["write"]["bytes_per_second"]
    return f"reads {read / 1e9:.2f} GB/s, writes {write / 1e9:.2f} GB/s"


def io_floor_seconds(disk: dict, *, read_bytes: int, write_bytes: int) -> float | None:
    """The least time any tool needs to read `read_bytes` and write `write_bytes` at a probe's rates."""
    if "read" not in disk:
        return None
    return read_bytes / disk["read"]["bytes_per_second"] + write_bytes / disk["write"]["bytes_per_second"]
