"""The output directory: written into a hidden sibling and renamed into place only when complete, so a failed
or killed merge never leaves something that looks finished (nor any directory it created)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from pathlib import Path

from modelmerge_engine.errors import MergeError

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


class OutputDir:
    def __init__(self, path: str | None, overwrite: bool):
        if not path:
            raise MergeError("output_dir: required (where the merged model is written)")
        self.final = Path(path).expanduser().absolute()
        self.overwrite = overwrite
        if self.final.exists():
            if not self.final.is_dir():
                raise MergeError(f"output_dir: {self.final} exists and is not a directory")
            if any(self.final.iterdir()) and not overwrite:
                raise MergeError(f"output_dir: {self.final} exists and is not empty (pass --overwrite to "
                                 "replace it)")
        self._created_root: Path | None = None
        self.staging: Path | None = None

    def create_staging(self) -> Path:
        missing = [p for p in [self.final.parent, *self.final.parent.parents] if not p.exists()]
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self._created_root = missing[-1] if missing else None
            self.staging = self.final.parent / f".{self.final.name}.partial-{uuid.uuid4().hex[:8]}"
            self.staging.mkdir()
        except OSError as exc:
            raise MergeError(f"output_dir: cannot create {self.final.parent}: {exc.strerror}") from None
        return self.staging

    def commit(self) -> None:
        """Atomically put the staged directory in place (replacing the old one when overwriting)."""
        old = None
        if self.final.exists():
            old = self.final.parent / f".{self.final.name}.old-{uuid.uuid4().hex[:8]}"
            self.final.rename(old)
        self.staging.rename(self.final)
        self.staging = self._created_root = None  # published: nothing of ours to discard any more
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
        if self._created_root is not None:
            shutil.rmtree(self._created_root, ignore_errors=True)


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
            (staging / name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copyfile(source, staging / name)
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
    return "\n".join(lines)
