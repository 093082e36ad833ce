"""Evaluation data files: JSON arrays or JSON Lines of records with `instruction` + `output` or `problem` +
`solution` (merging-eval's two layouts; a record with `instruction` is read as the first). Everything is read
and checked here, before any model is loaded; every error names the file and the record."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from modelmerge_engine.evaluation.options import EvalInputError

DATA_SUFFIXES = (".json", ".jsonl")
LAYOUTS = (("instruction", "output"), ("problem", "solution"))


@dataclass(frozen=True)
class EvalRecord:
    index: int  # 0-based position in its file
    prompt: str  # the instruction or problem, stripped
    answer: str  # the output or solution, stripped


@dataclass(frozen=True)
class DataFile:
    name: str  # the file name without its suffix, as merging-eval names a result row
    path: Path
    records: tuple[EvalRecord, ...]
    classification: str | None  # the first record's `classification`, lower-cased, when it has one

    def first(self, limit: int | None) -> DataFile:
        """This file with only its first `limit` records (all with None)."""
        return self if limit is None else replace(self, records=self.records[:limit])


def load_data_files(paths: Sequence[str | Path], *, limit: int | None = None) -> list[DataFile]:
    """The data files at `paths` (files, or directories whose *.json and *.jsonl files are taken in name
    order), each cut to its first `limit` records."""
    if not paths:
        raise EvalInputError("data: at least one data file or directory is required")
    files = [file for path in paths for file in _expand(Path(path))]
    loaded = [read_data_file(file, limit=limit) for file in files]
    seen: dict[str, Path] = {}
    for data in loaded:
        if data.name in seen:
            raise EvalInputError(f"data: two data files are named {data.name!r} ({seen[data.name]} and "
                                 f"{data.path}); results are reported by file name")
        seen[data.name] = data.path
    return loaded


def _expand(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in DATA_SUFFIXES and p.is_file())
        if not files:
            raise EvalInputError(f"data: directory {path} has no .json or .jsonl files")
        return files
    if not path.is_file():
        raise EvalInputError(f"data: {path} does not exist")
    return [path]


def read_data_file(path: Path, *, limit: int | None = None) -> DataFile:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise EvalInputError(f"data file {path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise EvalInputError(f"data file {path}: cannot read it: {exc.strerror or exc}") from None
    items = _parse(path, text)
    if not items:
        raise EvalInputError(f"data file {path}: no records (an empty file or an empty array)")
    if limit is not None:
        items = items[:limit]
    records = tuple(_record(path, index, item) for index, item in enumerate(items))
    classification = items[0].get("classification")
    return DataFile(name=path.name.removesuffix(path.suffix) if path.suffix in DATA_SUFFIXES else path.name,
                    path=path, records=records,
                    classification=classification.lower() if isinstance(classification, str) else None)


def _parse(path: Path, text: str) -> list:
    """A JSON array when the text starts with `[`, else JSON Lines (one object a line, blank lines allowed)."""
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EvalInputError(f"data file {path}: not valid JSON: {exc.msg} at line {exc.lineno} column "
                                 f"{exc.colno}") from None
        return items
    if not text.strip():
        return []
    return list(_json_lines(path, text.splitlines()))


def _json_lines(path: Path, lines: Iterable[str]) -> Iterable:
    index = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalInputError(f"data file {path}: record {index} (line {number}) is not valid JSON: "
                                 f"{exc.msg} at column {exc.colno}; expected a JSON array or one JSON object "
                                 "per line") from None
        index += 1


def _record(path: Path, index: int, item: object) -> EvalRecord:
    where = f"data file {path}: record {index}"
    if not isinstance(item, dict):
        raise EvalInputError(f"{where}: expected an object with instruction+output or problem+solution, got "
                             f"{type(item).__name__}")
    layout = next((pair for pair in LAYOUTS if pair[0] in item), None)
    if layout is None:
        raise EvalInputError(f"{where}: missing 'instruction' or 'problem' (records need instruction+output "
                             f"or problem+solution; it has {', '.join(sorted(map(str, item))) or 'no fields'})")
    texts = []
    for field in layout:
        if field not in item:
            raise EvalInputError(f"{where}: missing {field!r} (a record with {layout[0]!r} needs {field!r})")
        value = item[field]
        if not isinstance(value, str):
            raise EvalInputError(f"{where}: {field!r} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise EvalInputError(f"{where}: {field!r} is empty")
        texts.append(value.strip())
    return EvalRecord(index=index, prompt=texts[0], answer=texts[1])
