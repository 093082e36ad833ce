"""A cgroup v1 memory cgroup per command: a memory limit as a pod's, the peak the kernel charged, and whether the
OOM killer struck. Used by tests/test_engine_memory_limit.py and bench/bench_engine.py.

What a memory cgroup charges: anonymous memory, and page cache (file pages read or written, mmapped or not) to
the cgroup that first brought the page in. Page cache is reclaimable: at the limit the kernel drops clean pages
and writes back dirty ones before it OOM-kills. So a process that streams inputs larger than its limit runs
under it; one that holds them in anonymous memory is killed. Pages already cached by someone else are not
charged again, hence `evict_page_cache` before a measured run."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

ROOT = Path("/sys/fs/cgroup/memory")


def unavailable_reason() -> str | None:
    """None when memory cgroups (v1) can be created here, otherwise why not."""
    if not (ROOT / "memory.limit_in_bytes").exists():
        return f"no cgroup v1 memory controller at {ROOT}"
    probe = ROOT / f"modelmerge-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
        (probe / "memory.limit_in_bytes").write_text(str(64 << 20))
    except OSError as exc:
        return f"cannot create a memory cgroup under {ROOT}: {exc.strerror}"
    finally:
        if probe.exists():
            probe.rmdir()
    return None


def evict_page_cache(paths: list[Path]) -> None:
    """Drops the clean cached pages of these files (only theirs: POSIX_FADV_DONTNEED), so the next reader pays,
    and is charged for, reading them."""
    for path in paths:
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        for file in files:
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


class MemoryCgroup:
    """A fresh child memory cgroup; commands started with `popen` run inside it from their first instruction.
    Leaving the `with` block kills whatever still runs in it and removes it."""

    def __init__(self, label: str, *, limit_bytes: int | None = None):
        self.path = ROOT / f"modelmerge-{label}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.limit_bytes = limit_bytes

    def __enter__(self) -> MemoryCgroup:
        self.path.mkdir()
        try:
            if self.limit_bytes is not None:
                (self.path / "memory.limit_in_bytes").write_text(str(self.limit_bytes))
                swap = self.path / "memory.memsw.limit_in_bytes"
                if swap.exists():  # memory + swap: a limit swap cannot stretch (as a pod without swap)
                    swap.write_text(str(self.limit_bytes))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def popen(self, command: list[str], **kwargs) -> subprocess.Popen:
        """Starts `command` inside the cgroup: a shell joins it, then execs the command (same pid)."""
        join = 'echo $$ > "$0" && exec "$@"'
        return subprocess.Popen(["/bin/sh", "-c", join, str(self.path / "cgroup.procs"), *command], **kwargs)

    def _read(self, name: str) -> str:
        return (self.path / name).read_text()

    def pids(self) -> list[int]:
        return [int(p) for p in self._read("cgroup.procs").split()]

    def stats(self) -> dict[str, int]:
        """peak_bytes (max_usage_in_bytes: anon + page cache), failcnt (times the limit was hit and reclaim ran),
        oom_kills, and memory.stat's counters (rss, cache, mapped_file, pgpgin, ... in bytes or pages)."""
        stat = dict(line.split() for line in self._read("memory.stat").splitlines())
        oom = dict(line.split() for line in self._read("memory.oom_control").splitlines())
        return {"peak_bytes": int(self._read("memory.max_usage_in_bytes")),
                "failcnt": int(self._read("memory.failcnt")), "oom_kills": int(oom.get("oom_kill", 0)),
                **{k: int(v) for k, v in stat.items()}}

    def remove(self) -> None:
        if not self.path.exists():
            return
        deadline = time.monotonic() + 30
        while True:
            pids = self.pids()
            if not pids:
                break
            for pid in pids:  # only processes this cgroup's commands started
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes {pids} in {self.path} did not exit")
            time.sleep(0.05)
        while True:
            try:
                self.path.rmdir()
                return
            except OSError:  # the last task is still being torn down
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
