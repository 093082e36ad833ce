"""Where evaluation data comes from: a local file or directory, or `hf://datasets/<owner>/<name>[@revision][/<path>]`,
a file or folder of a Hugging Face dataset repo read through huggingface_hub's cache (HF_HOME), with HF_TOKEN
and offline mode (HF_HUB_OFFLINE=1) as model references have them. Only JSON and JSON Lines files are fetched;
the token is never shown."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from modelmerge.contract import DATA_REPO_PREFIX
from modelmerge_engine.evaluation.data import DATA_SUFFIXES, DataFile, load_data_files
from modelmerge_engine.evaluation.options import EvalInputError
from modelmerge_engine.refs import hub_snapshot

_DATASET_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[^/@\s]+))?(?:/(?P<path>.*))?$")


@dataclass(frozen=True)
class DataSource:
    ref: str  # as the request names it
    path: Path  # the local file or directory
    source: str  # "local" | "huggingface"
    revision: str | None = None  # the commit a dataset reference resolved to

    def describe(self) -> dict[str, str | None]:
        return {"ref": self.ref, "source": self.source, "path": str(self.path), "revision": self.revision}


def resolve_data(refs: Sequence[str]) -> list[DataSource]:
    """Each data reference as a local path (hf:// ones through the cache), in the order given."""
    return [_from_hub(ref) if ref.startswith("hf://") else _local(ref) for ref in refs]


def _local(ref: str) -> DataSource:
    return DataSource(ref, Path(ref).expanduser().absolute(), "local")


def load_data(sources: Sequence[DataSource], *, limit: int | None = None) -> list[DataFile]:
    """The data files of `sources`, read and checked (load_data_files)."""
    return load_data_files([source.path for source in sources], limit=limit)


def _from_hub(ref: str) -> DataSource:
    match = _DATASET_REF.match(ref.removeprefix(DATA_REPO_PREFIX)) if ref.startswith(DATA_REPO_PREFIX) else None
    inside = (match["path"] or "").strip("/") if match else ""
    if match is None or ".." in inside.split("/"):
        raise EvalInputError(f"data: {ref!r} is not hf://datasets/<owner>/<name>[@revision][/<path>]")
    repo_id = match["repo"]
    patterns = [f"*{suffix}" for suffix in DATA_SUFFIXES]
    if inside:
        patterns = [inside, *(f"{inside}/{pattern}" for pattern in patterns)]
    folder = hub_snapshot(repo_id, match["revision"], field="data", allow_patterns=patterns, repo_type="dataset")
    path = folder / inside if inside else folder
    if not path.exists():
        raise EvalInputError(f"data: {ref}: the dataset (revision {folder.name}) has no JSON or JSON Lines file "
                             f"or folder {inside or '/'}")
    return DataSource(ref, path, "huggingface", revision=folder.name)
