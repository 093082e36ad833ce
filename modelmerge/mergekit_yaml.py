"""mergekit YAML text to the object MergeRequest's `config` validates: what `modelmerge merge --config` and POST
/api/merge's `mergekit_config` (as YAML text) share. Safe loading only (plain data, no Python tags)."""

from __future__ import annotations

from typing import Any

import yaml

MAX_CONFIG_BYTES = 1 << 20


def parse_config_text(text: str, *, where: str) -> dict[str, Any]:
    """The mapping a mergekit YAML config holds; ValueError naming `where` (the flag or field) and the line."""
    if len(text.encode("utf-8", "replace")) > MAX_CONFIG_BYTES:
        raise ValueError(f"{where}: a mergekit config of more than {MAX_CONFIG_BYTES} bytes")
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        reason = getattr(exc, "problem", None) or str(exc)
        raise ValueError(f"{where}: not valid YAML{at}: {reason}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{where}: a mergekit config is a YAML mapping (merge_method, models or slices, ...), "
                         f"got {type(loaded).__name__}")
    return loaded


def read_config_file(path: str) -> dict[str, Any]:
    """The mergekit config in YAML file `path` (for --config)."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"--config {path}: cannot read it: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"--config {path}: not UTF-8 text") from None
    return parse_config_text(text, where=f"--config {path}")
