"""An opt-in cache of work that several merges over the same inputs share (the trials of a sweep):
`modelmerge merge --work-cache DIR`, or the environment variable MODELMERGE_WORK_CACHE (what a sweep's trial
runner sets; the flag wins).

What it holds, each entry keyed by everything its value depends on:
- `ties_merging_dare`'s global statistics (each model's threshold over all merged parameters and the majority
  sign), which depend on the inputs, the merged tensors (hence the exclude regexes), the compute dtype and every
  parameter but `scaling_coefficient`: a trial that differs only in scaling_coefficient skips both passes;
- the baselines' evaluation reports (the base and each fine-tune on the same data with the same options), so
  only the first trial of a sweep evaluates them.

An input's identity is its resolved directory and the name, size and modification time (ns) of every file in it
(a Hugging Face snapshot's links followed to their blobs): a model rewritten in place misses. An entry is one JSON
file named by the SHA-256 of its key and holding the key itself, which a read compares in full, so a digest
collision or a file copied from elsewhere is never trusted. Entries are written to a temporary file in the
same directory and renamed into place: concurrent trials each write a complete entry (the last rename wins,
both equal) and a reader never sees half of one. An unreadable or malformed entry is ignored with a warning
(the work is done again and the entry rewritten); a cache that cannot be written only warns."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelmerge import __version__

WORK_CACHE_ENV = "MODELMERGE_WORK_CACHE"
FORMAT = 1


def work_cache_directory(flag: str | None) -> Path | None:
    """The cache directory the merge uses: the flag's, else the environment's, else none."""
    chosen = flag or os.environ.get(WORK_CACHE_ENV) or None
    return Path(chosen).expanduser() if chosen else None


def model_identity(directory: str | Path) -> dict[str, Any]:
    """A model directory as the cache keys it: its resolved path and each file's name, size and mtime."""
    root = Path(directory).resolve()
    files = []
    for entry in sorted(root.iterdir()):
        try:
            stat = entry.stat()  # follows a snapshot's links to their blobs
        except OSError:
            continue
        if entry.is_file():
            files.append([entry.name, stat.st_size, stat.st_mtime_ns])
    return {"path": str(root), "files": files}


def file_identity(path: str | Path) -> list[Any]:
    stat = Path(path).stat()
    return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]


def statistics_key(merge, *, independent_of: tuple[str, ...]) -> dict[str, Any]:
    """The key of a whole-input statistics pass of `merge` (a StreamingMerge) whose result does not depend on
    the parameters `independent_of`: the engine version, the method and its other parameters, the exclude
    regexes, the compute dtype, the inputs' identities and the merged tensors (names, shapes, sources)."""
    request = merge.request
    parameters = {k: v for k, v in request.merge_params().items() if k not in independent_of}
    tensors = [[p.name, list(p.shape), list(p.sources), p.inputs_from, p.base_source, list(p.fused_group)]
               for p in merge.plans if p.merged]
    return {
        "engine_version": __version__,
        "method": request.merge_method,
        "parameters": parameters,
        "exclude_param_names_regex": list(request.exclude_param_names_regex or []),
        "dtype": request.dtype,
        "base_model": model_identity(merge.base.directory),
        "models_to_merge": [model_identity(model.directory) for model in merge.finetunes],
        "merged_tensors": hashlib.sha256(_canonical(tensors).encode()).hexdigest(),
    }


def evaluation_key(prepared, files, options, *, device: str, role: str) -> dict[str, Any]:
    """The key of one model's evaluation report (evaluation/scoring.py's `score`): the model's identity and
    reference, the data files' identities and record counts, the options and the device."""
    resolved = prepared.source.resolved
    return {
        "engine_version": __version__,
        "model": {"ref": resolved.ref, "role": role, **model_identity(resolved.path)},
        "data": [[data.name, *file_identity(data.path), len(data.records)] for data in files],
        "options": {"max_length": options.max_length, "batch_size": options.batch_size, "limit": options.limit,
                    "dtype": options.compute_dtype},
        "device": device,
    }


class WorkCache:
    """Entries of one cache directory; `log` takes the lines saying what was reused (the merge's progress)."""

    def __init__(self, directory: Path, log=None):
        self.directory = Path(directory)
        self._log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self.reused_work: list[str] = []  # what this merge took from the cache, for its report

    def path(self, kind: str, key: dict[str, Any]) -> Path:
        digest = hashlib.sha256(_canonical({"kind": kind, "key": key}).encode()).hexdigest()
        return self.directory / f"{kind}-{digest}.json"

    def load(self, kind: str, key: dict[str, Any], parse: Callable[[Any], Any] = lambda value: value) -> Any | None:
        """The value stored for `key` as `parse` returns it, or None (absent, or ignored with a warning when
        unreadable, malformed, stored for another key, or refused by `parse` with ValueError, TypeError or
        KeyError)."""
        path = self.path(kind, key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self.warn(f"cannot read work cache entry {path}: {exc.strerror or exc}; doing the work again")
            return None
        try:
            entry = json.loads(data)  # bytes that are not UTF-8 are a ValueError too
            if not isinstance(entry, dict) or entry.get("format") != FORMAT or entry.get("kind") != kind:
                raise ValueError("not an entry of this kind and format")
            if _canonical(entry.get("key")) != _canonical(key):
                raise ValueError("stored for different inputs")
            return parse(entry["value"])
        except (ValueError, TypeError, KeyError) as exc:
            self.warn(f"ignoring corrupt work cache entry {path}: {exc}; doing the work again")
            return None

    def store(self, kind: str, key: dict[str, Any], value: Any) -> None:
        """Writes the entry atomically (temporary file, fsync, rename); a failure only warns."""
        path = self.path(kind, key)
        text = json.dumps({"format": FORMAT, "kind": kind, "key": key, "value": value}, sort_keys=True)
        temporary = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=self.directory)
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, path)
            temporary = None
        except OSError as exc:
            self.warn(f"cannot write work cache entry {path}: {exc.strerror or exc}")
        finally:
            if temporary is not None:
                Path(temporary).unlink(missing_ok=True)

    def reused(self, what: str) -> None:
        self.reused_work.append(what)
        self._log(f"work cache: reused {what} from {self.directory}")

    def warn(self, text: str) -> None:
        print(f"warning: {text}", file=sys.stderr, flush=True)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
