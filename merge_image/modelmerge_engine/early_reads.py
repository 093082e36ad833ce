"""The inputs' first bytes asked of the disk while the engine starts.

A merge pod starts with a cold page cache and spends about a second before its first read of an input: the
interpreter, numpy, numba and llvmlite load from disk and the compiled kernels are read from their cache.
Measured here (0.5B-shaped model, 2 fine-tunes, mask merging, page cache dropped): 1.1-1.4 s from exec to the
first read, then 4.1-4.4 s of merging, the disk's floor for those 3 GB in and 1 GB out. So, as soon as the models'
headers are read and before the engine's imports, the first bytes of every input file are asked for
(posix_fadvise WILLNEED, from a thread per file: the calls wait when the disk's queue is full), and the merge
reads those bytes from the page cache (SafetensorsModel.read) and the rest as before. Measured here, 10 cold runs
each, alternated: median 5.93 s (5.28-7.12) against 6.51 s (5.67-8.01) without.

Linux reads at most max(read_ahead_kb, max_sectors_kb) per WILLNEED (8 MiB here; 128 KiB on many disks), so the
advice goes in ADVICE_BYTES steps. Measured here, 3 x 512 MiB from a dropped page cache, 3 runs each: 128 KiB
advices 1.07-1.20 s, 2 MiB 1.72-2.21 s, 8 MiB 1.22-1.63 s; O_DIRECT reads of 2 MiB by 3 threads per file
(direct_read.py) 1.46-1.65 s.

Half of the budget is asked for as the headers are read, for every merge. The other half is asked for when the
engine has started, only by a merge that reads its inputs once (around the page cache: its readers then begin
after the early bytes), which consumes the early bytes from the page cache while its readers would otherwise wait
on nothing. Measured here, cold mask merging (that case), 10 alternated runs each, the whole budget asked for at
the headers: 512 MiB median 4.58 s (4.02-5.78), 1 GiB 4.23 s (3.94-4.88), and 1.5 GiB no better than 1 GiB (8 runs
each); cold TIES (statistics passes over mapped inputs) was slower with 1 GiB than with 512 MiB in 11 alternated
runs (medians 4.78 against 5.23 s, then 5.71 against 5.93 s), so it is asked for half.

The bytes asked for are page cache charged to the pod's memory cgroup. Clean and reclaimable, they never make a
merge fail, but pages reclaimed before they are read are read twice; so the budget is at most a quarter of
what the memory limit leaves free (`budget_bytes`), and PREFETCH_BYTES where there is no limit.
MODELMERGE_ENGINE_EARLY_READ_BYTES sets another total (0: none), still capped by the memory limit."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

from modelmerge_engine.errors import MergeError

EARLY_READ_BYTES_ENV = "MODELMERGE_ENGINE_EARLY_READ_BYTES"
PREFETCH_BYTES = 1 << 30  # all the inputs together, for a merge that reads them once (half for the others)
LIMIT_SHARE = 4  # at most 1/LIMIT_SHARE of what the memory limit leaves free
NO_LIMIT = 1 << 60  # cgroup v1 reports "no limit" as a page-rounded 2**63 - 1
ADVICE_BYTES = 128 << 10  # bytes per WILLNEED: Linux reads at most max(read_ahead_kb, max_sectors_kb) per call


def memory_headroom(*, proc_cgroup: Path = Path("/proc/self/cgroup"),
                    mountinfo: Path = Path("/proc/self/mountinfo")) -> int | None:
    """Bytes this process's memory cgroup (and every one above it that is mounted here) can still charge: the least
    of their limits less their usage (cgroup v2 memory.max / memory.current, v1 memory.limit_in_bytes /
    memory.usage_in_bytes). The hierarchies are found where they are mounted (`mountinfo`), so a v1 memory
    controller mounted with others (`cpu,memory`) and a container's view of its own cgroup are read too. None
    where no limit applies or none can be read."""
    try:
        lines = proc_cgroup.read_text().splitlines()
        mounts = _cgroup_mounts(mountinfo.read_text())
    except OSError:
        return None
    least = None
    for line in lines:
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            kind, limit_name, usage_name = "cgroup2", "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            kind, limit_name, usage_name = "memory", "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        for mount_root, mount_point in mounts.get(kind, []):
            inside = _below(path, mount_root)
            if inside is None:
                continue
            for depth in range(len(inside), -1, -1):  # the process's cgroup, then each one above it
                group = mount_point.joinpath(*inside[:depth])
                free = _free_bytes(group / limit_name, group / usage_name)
                if free is not None:
                    least = free if least is None else min(least, free)
            break
    return least


def _cgroup_mounts(text: str) -> dict[str, list[tuple[str, Path]]]:
    """The cgroup hierarchies of a mountinfo file: "cgroup2" and "memory" (the v1 hierarchy holding the memory
    controller), each as (the hierarchy's folder that is mounted, where it is mounted)."""
    mounts: dict[str, list[tuple[str, Path]]] = {}
    for line in text.splitlines():
        fields, _, tail = line.partition(" - ")
        fields, tail = fields.split(), tail.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        root, point = (_unescape(field) for field in fields[3:5])
        if tail[0] == "cgroup2":
            mounts.setdefault("cgroup2", []).append((root, Path(point)))
        elif tail[0] == "cgroup" and "memory" in tail[2].split(","):
            mounts.setdefault("memory", []).append((root, Path(point)))
    return mounts


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes (\\040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _below(path: str, root: str) -> list[str] | None:
    """`path`'s parts below `root` (both hierarchy paths), or None when it is not inside it."""
    parts, root_parts = [p for p in path.split("/") if p], [p for p in root.split("/") if p]
    return parts[len(root_parts):] if parts[:len(root_parts)] == root_parts else None


def _free_bytes(limit_file: Path, usage_file: Path) -> int | None:
    try:
        text = limit_file.read_text().strip()
        if text == "max" or int(text) >= NO_LIMIT:
            return None
        return max(0, int(text) - int(usage_file.read_text().strip()))
    except (OSError, ValueError):
        return None


def budget_bytes(headroom: int | None) -> int:
    """How many bytes of the inputs to ask for early (MODELMERGE_ENGINE_EARLY_READ_BYTES, else PREFETCH_BYTES),
    with `headroom` bytes left under the memory limit (None: no limit)."""
    text = os.environ.get(EARLY_READ_BYTES_ENV, "").strip()
    if text and not text.isdigit():
        raise MergeError(f"{EARLY_READ_BYTES_ENV} must be a number of bytes (0: no early reads), got {text!r}")
    wanted = int(text) if text else PREFETCH_BYTES
    return wanted if headroom is None else min(wanted, headroom // LIMIT_SHARE)


def ask_shared(models, budget: int) -> None:
    """Asks each of `models` (SafetensorsModel.ask_early) for the first bytes of its tensor data, `budget` shared
    equally: the merge reads them at the same pace. Models that open the same files (a mergekit config's base that
    is also one of its inputs) are asked once, as the last of them (a fine-tune: the one that reads them around
    the page cache when the base's values are not read). A larger budget later extends what each was asked for."""
    distinct = list({tuple(model.files): model for model in models}.values())
    for model in distinct:
        model.ask_early(budget // max(1, len(distinct)))


def ask(path: Path, start: int, stop: int) -> threading.Thread | None:
    """Asks the kernel to read bytes [start, stop) of `path` into the page cache, from a daemon thread (returned;
    None when there is nothing to ask). Advisory: a file that cannot be opened or advised is left alone, and the
    merge reads it as it would have."""
    if stop <= start or not hasattr(os, "posix_fadvise"):
        return None

    def advise() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            for offset in range(start, stop, ADVICE_BYTES):
                os.posix_fadvise(fd, offset, min(ADVICE_BYTES, stop - offset), os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)

    thread = threading.Thread(target=advise, name=f"early reads {path.name}", daemon=True)
    thread.start()
    return thread
