"""Merge outputs on disk: the `output_dir` rule, containment checks, file listings with checksums, tar streams,
and the local evaluation data files a request names (relative to the output root, like a ModelMerge's to its volume).

Both backends read outputs from a local directory (the local backend's output root, or the output PVC mounted
read-only into the API pod), so this module serves both. Every path a client names is resolved and checked to
stay inside the job's output directory; symlinks that point outside are never followed."""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from modelmerge.contract import DATA_REPO_PREFIX, check_volume_data_refs
from modelmerge_api.errors import ApiError, Conflict, NotFound

_SEGMENT = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
MAX_DEPTH = 8
CHUNK = 1 << 20


def normalize_output_dir(value: str | None, default: str) -> str:
    """The request's `output_dir` as a clean relative path ('a/b'); `default` when it is empty."""
    if value is None or value.strip() in ("", ".", "./"):
        return default
    if value.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", value):
        raise _bad_output_dir(value, "must be a relative path under the output root, not an absolute path")
    parts = [p for p in PurePosixPath(value.replace("\\", "/")).parts if p != "."]
    if ".." in parts:
        raise _bad_output_dir(value, "must not contain '..'")
    if not parts or len(parts) > MAX_DEPTH:
        raise _bad_output_dir(value, f"must have 1 to {MAX_DEPTH} path segments")
    for part in parts:
        if not _SEGMENT.match(part) or part.startswith("."):
            raise _bad_output_dir(value, f"segment {part!r} may only use letters, digits, '.', '_' and '-' "
                                  "and must not start with '.'")
    return "/".join(parts)


def _bad_output_dir(value: str, reason: str) -> ApiError:
    message = f"output_dir: {reason} (got {value!r})"
    return ApiError(400, message, [{"field": "output_dir", "message": reason}])


def contained(root: Path, relative: str) -> Path:
    """`root/relative` resolved (symlinks followed), or an error when it lands outside `root`."""
    root = root.resolve()
    target = (root / relative).resolve()
    if target != root and not target.is_relative_to(root):
        raise ApiError(403, f"path {relative!r} escapes the output directory")
    return target


def ensure_free(root: Path, relative: str) -> Path:
    """The output target for a new job: inside the root and not existing yet."""
    target = contained(root, relative)
    if target.exists() or target.is_symlink():
        raise Conflict(f"output_dir: {relative!r} already exists under the output root; choose another name")
    return target


def evaluation_data(root: Path, refs: list[str]) -> list[str]:
    """A request's evaluation.data for the engine: local files (or folders), given relative to `root`, as absolute
    paths inside it that exist; hf://datasets/ refs unchanged. No absolute paths, no '..', no links out of it."""
    try:
        check_volume_data_refs(refs)
    except ValueError as exc:
        raise _bad_data(str(exc)) from None
    resolved = []
    for index, ref in enumerate(refs):
        if ref.startswith(DATA_REPO_PREFIX):
            resolved.append(ref)
            continue
        target = (root / ref).resolve()
        if not target.is_relative_to(root.resolve()):
            raise _bad_data(f"item {index} {ref!r}: leads out of the data root (the output root) through a link")
        if not target.exists():
            raise _bad_data(f"item {index} {ref!r}: no such file or folder under the data root (the output "
                            f"root, {root})")
        resolved.append(str(target))
    return resolved


def _bad_data(reason: str) -> ApiError:
    return ApiError(400, f"evaluation.data: {reason}", [{"field": "evaluation.data", "message": reason}])


def job_output(root: Path, relative: str | None) -> Path:
    """The finished output directory of a job, checked to be a directory inside the root."""
    if not relative:
        raise NotFound("the job has no output directory")
    target = contained(root, relative)
    if not target.is_dir():
        raise NotFound(f"output directory {relative!r} does not exist (deleted, or the volume is not mounted)")
    return target


def safe_file(output: Path, relative: str) -> Path:
    """One file of a job's output, by a client-supplied path: no absolute paths, no '..', no escaping links."""
    parts = PurePosixPath(relative).parts
    if not parts or relative.startswith("/") or ".." in parts or "\\" in relative:
        raise ApiError(400, f"invalid file path {relative!r}: use a relative path inside the output")
    target = contained(output, relative)
    if not target.is_file():
        raise NotFound(f"file {relative!r} not found in the job's output")
    return target


def iter_files(output: Path) -> Iterator[tuple[str, Path]]:
    """(relative name, resolved path) of every regular file under `output`, sorted, escaping links skipped."""
    root = output.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            resolved = path.resolve()
            if resolved.is_relative_to(root) and resolved.is_file():
                yield path.relative_to(root).as_posix(), resolved


class ChecksumCache:
    """sha256 per file, remembered by (path, size, mtime) so repeated listings of big shards stay cheap."""

    def __init__(self, max_entries: int = 4096) -> None:
        self._sums: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()
        self._max = max_entries

    def sha256(self, path: Path) -> tuple[int, str]:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key in self._sums:
                return stat.st_size, self._sums[key]
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(CHUNK):
                digest.update(block)
        with self._lock:
            if len(self._sums) >= self._max:
                self._sums.clear()
            self._sums[key] = digest.hexdigest()
        return stat.st_size, self._sums[key]

    def listing(self, output: Path) -> list[dict[str, object]]:
        files = []
        for name, path in iter_files(output):
            size, digest = self.sha256(path)
            files.append({"path": name, "size": size, "sha256": digest})
        return files


def tar_stream(output: Path, top: str) -> Iterator[bytes]:
    """An uncompressed tar of `output` under the folder name `top`, streamed file by file in 1 MiB chunks."""
    for name, path in iter_files(output):
        stat = path.stat()
        info = tarfile.TarInfo(f"{top}/{name}")
        info.size, info.mtime, info.mode = stat.st_size, int(stat.st_mtime), 0o644
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        yield from _file_blocks(path, stat.st_size)
    yield b"\0" * (2 * tarfile.BLOCKSIZE)


def _file_blocks(path: Path, size: int) -> Iterator[bytes]:
    """Exactly `size` bytes of the file (as the header announced), padded to the tar block size."""
    remaining = size
    with open(path, "rb") as handle:
        while remaining > 0:
            block = handle.read(min(CHUNK, remaining))
            if not block:
                raise OSError(f"{path.name} shrank while it was being archived")
            remaining -= len(block)
            yield block
    if size % tarfile.BLOCKSIZE:
        yield b"\0" * (tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE)
