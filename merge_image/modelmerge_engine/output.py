"""The output directory, written so that a crash at any point leaves either the old output or the new one.

Everything is written into a hidden staging sibling `.<name>.partial-<token>`, fsynced, and put into place
only when complete: renamed when nothing is there, or swapped in with one atomic rename-exchange (Linux
renameat2 RENAME_EXCHANGE) when `--overwrite` replaces an existing output, which is removed afterwards.
Where the filesystem cannot exchange, the old output is first renamed to `.<name>.partial-<token>.old`; a
crash between the two renames leaves it there and the next merge into the same parent puts it back.

A live merge holds an flock on `.<name>.partial-<token>.lock`, created (and checked to be the one at that
path) before the staging directory and removed after everything else. Every merge first removes the
leftovers of dead ones (SIGKILL, OOM kill, node loss) in its parent: those whose lock it can take, or whose
lock is gone. So a retried merge (the operator's Job retries) cleans up after the attempt before it."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

from modelmerge_engine.errors import MergeError
from modelmerge_engine.evaluation.card import evaluation_card

# Files taken from the base model besides the weights: never code (no trust_remote_code, ever).
AUX_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# What one merge leaves in the parent while it runs: the staging directory, its lock, and (fallback
# replace only) the old output moved aside.
STAGING_ENTRY = re.compile(r"^\.(?P<name>.+)\.partial-(?P<token>[0-9a-f]{12})(?P<kind>|\.lock|\.old)$")
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_NO_EXCHANGE = (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV)


def write_synced(path: Path, data: str | bytes) -> None:
    """Write a whole file and fsync it, so that a published output never holds a file the disk lost."""
    with open(path, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
        handle.flush()
        os.fsync(handle.fileno())


def copy_synced(source: Path, target: Path) -> None:
    with open(source, "rb") as reader, open(target, "wb") as writer:
        shutil.copyfileobj(reader, writer, 1 << 20)
        writer.flush()
        os.fsync(writer.fileno())


def fsync_directory(path: Path) -> None:
    """Make the directory's entries (created, renamed, removed files) durable."""
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE); False where the platform or the filesystem
    cannot, so the caller falls back to two renames."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # a libc older than glibc 2.28
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """SIGTERM/SIGINT are ignored while the complete output is put in place (milliseconds): the merge has
    done its work, so it then ends as succeeded rather than half-published by our own handlers. SIGKILL is
    covered by the crash-safe order of the steps."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class StagingLock:
    """The flock a live merge holds on `<staging>.lock`; whoever can take it knows the merge is dead."""

    def __init__(self, path: Path, descriptor: int):
        self.path = path
        self._descriptor: int | None = descriptor

    @classmethod
    def create(cls, path: Path) -> StagingLock | None:
        """A new lock file at `path`, locked by us; None when a cleaner took it in between (try again)."""
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        lock = cls(path, descriptor)
        if lock._take() and lock._still_at_path():
            return lock
        os.close(descriptor)
        return None

    @classmethod
    def take_if_dead(cls, path: Path) -> StagingLock | None:
        """The lock of a merge that is no longer running, or None if a live process holds it (or it is
        gone: then whoever removed it cleaned up already, or not ours to open: another user's merge)."""
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except (FileNotFoundError, PermissionError):
            return None
        lock = cls(path, descriptor)
        if lock._take() and lock._still_at_path():
            return lock
        os.close(descriptor)
        return None

    def _take(self) -> bool:
        try:
            fcntl.flock(self._descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _still_at_path(self) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(self._descriptor).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        """Remove the lock file, then let go of the lock (in this order: nobody may take a lock whose
        staging entries are still being removed)."""
        if self._descriptor is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._descriptor)
        self._descriptor = None


def remove_stale_staging(parent: Path) -> list[str]:
    """Remove what dead merges left in `parent` (see the module docstring); returns the names removed.
    An old output moved aside by an interrupted fallback replace is put back when nothing replaced it."""
    try:
        entries = list(parent.iterdir())
    except OSError:
        return []
    merges = sorted({(m["name"], m["token"]) for m in map(STAGING_ENTRY.match, (e.name for e in entries)) if m})
    removed = []
    for name, token in merges:
        stem = parent / f".{name}.partial-{token}"
        lock_path = Path(f"{stem}.lock")  # looked at again: a listing can miss what is created meanwhile
        lock = StagingLock.take_if_dead(lock_path)
        if lock is None and lock_path.exists():
            continue  # a live merge
        old, final = Path(f"{stem}.old"), parent / name
        if old.exists() and not final.exists():
            with contextlib.suppress(FileNotFoundError):
                old.rename(final)  # the crash came between the fallback's two renames: the old output wins
        for leftover in (stem, old):
            if leftover.exists() or leftover.is_symlink():
                _remove(leftover)
                removed.append(leftover.name)
        if lock is not None:
            lock.release()
            removed.append(lock.path.name)
    if removed:
        fsync_directory(parent)
    return removed


class OutputDir:
    def __init__(self, path: str | None, *, overwrite: bool):
        if not path:
            raise MergeError("output_dir: required (where the merged model is written)")
        self.final = Path(path).expanduser().absolute()
        self.overwrite = overwrite
        self._check_replaceable()
        self._created_root: Path | None = None
        self._lock: StagingLock | None = None
        self.staging: Path | None = None
        self.removed_stale: list[str] = []

    def _check_replaceable(self) -> None:
        if self.final.exists():
            if not self.final.is_dir():
                raise MergeError(f"output_dir: {self.final} exists and is not a directory")
            if any(self.final.iterdir()) and not self.overwrite:
                raise MergeError(f"output_dir: {self.final} exists and is not empty (pass --overwrite to "
                                 "replace it)")

    def create_staging(self) -> Path:
        parent = self.final.parent
        missing = [p for p in [parent, *parent.parents] if not p.exists()]
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self._created_root = missing[-1] if missing else None
            while self._lock is None:
                stem = parent / f".{self.final.name}.partial-{uuid.uuid4().hex[:12]}"
                self._lock = StagingLock.create(Path(f"{stem}.lock"))
            self.removed_stale = remove_stale_staging(parent)
            self._check_replaceable()  # the cleanup may have put back an output a killed merge moved aside
            stem.mkdir()
            self.staging = stem
        except OSError as exc:
            raise MergeError(f"output_dir: cannot create a staging directory in {parent}: "
                             f"{exc.strerror or exc}") from None
        return self.staging

    def commit(self) -> None:
        """Put the complete staging directory in place: the old output (if any) stays whole until the
        new one is in its place, and a crash at any point leaves one of the two."""
        staging, parent = self.staging, self.final.parent
        self._check_replaceable()  # another process may have written there meanwhile
        fsync_directory(staging)
        with _signals_ignored():
            replaced = None
            if not (self.final.exists() or self.final.is_symlink()):
                staging.rename(self.final)
            elif _exchange(staging, self.final):
                replaced = staging  # the old output now lies where the staging directory was
            else:
                replaced = Path(f"{staging}.old")
                self.final.rename(replaced)  # a crash now: the next merge renames it back
                staging.rename(self.final)
            fsync_directory(parent)
            self.staging = self._created_root = None  # published: nothing of ours to discard any more
            if replaced is not None:
                _remove(replaced)
            self._release_lock()
            fsync_directory(parent)

    def discard(self) -> None:
        if self.staging is not None:
            _remove(self.staging)
            self.staging = None
        self._release_lock()
        if self._created_root is not None:
            shutil.rmtree(self._created_root, ignore_errors=True)
            self._created_root = None

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def copy_aux_files(base_dir: Path, staging: Path, dtype_name: str) -> list[str]:
    copied = []
    for name in AUX_FILES:
        source = base_dir / name
        if not source.is_file():
            continue
        if name == "config.json":
            config = json.loads(source.read_text())
            for key in ("torch_dtype", "dtype"):
                if key in config or key == "torch_dtype":
                    config[key] = dtype_name
            config.pop("auto_map", None)  # would point at remote code we do not copy
            write_synced(staging / name, json.dumps(config, indent=2, sort_keys=True) + "\n")
        else:
            copy_synced(source, staging / name)
        copied.append(name)
    return copied


def disk_error(exc: OSError, where: Path) -> MergeError:
    if exc.errno in DISK_FULL:
        return MergeError(f"output_dir: disk full while writing {where} ({os.strerror(exc.errno)}); "
                          "nothing was left behind")
    return MergeError(f"output_dir: cannot write {where}: {exc.strerror or exc}")


def model_card(report: dict) -> str:
    """A README with YAML front matter (as the Hub expects) and the merge report."""
    inputs = report["inputs"]
    lines = [
        "---",
        f"base_model: {json.dumps(inputs['base_model']['ref'])}",
        "library_name: transformers",
        "tags:",
        "- merge",
        "- modelmerge",
        f"- {report['method']}",
        "---",
        "",
        f"# Merged model ({report['method']})",
        "",
        f"Made by ModelMerge {report['engine_version']} with `{report['method']}` on {report['finished_at']}.",
        "",
        "## Inputs",
        "",
        "| role | reference | source | revision |",
        "| --- | --- | --- | --- |",
    ]
    roles = [("base", inputs["base_model"])] + [
        (f"fine-tune {i + 1}", model) for i, model in enumerate(inputs["models_to_merge"])]
    for role, model in roles:
        lines.append(f"| {role} | `{model['ref']}` | {model['source']} | {model['revision'] or '-'} |")
    lines += ["", "## Parameters", "", "```json", json.dumps(report["parameters"], indent=2), "```", "",
              "## Timings (seconds)", ""]
    lines += [f"- {phase}: {seconds:.2f}" for phase, seconds in report["timings"].items()]
    lines += ["", f"Tensors: {report['tensors']} ({report['merged_tensors']} merged). "
              f"Output dtype: {report['dtype']}. Files: {', '.join(report['files'])}.", ""]
    if "evaluation" in report:
        lines += evaluation_card(report["evaluation"])
    return "\n".join(lines)
