"""mergekit as the test oracle for mergekit's methods: in its own virtualenv outside the repository
(~/.cache/modelmerge-mergekit/<key>/, MODELMERGE_MERGEKIT_CACHE overrides the folder), made on first use with
`pip install mergekit==MERGEKIT_VERSION` and reused afterwards, by these tests and by bench/bench_engine.py. It
shares the main virtualenv's torch and transformers through a .pth file, so it installs only mergekit and its
small dependencies. Where it cannot be made (no package index), tests that need it are skipped, unless
REQUIRE_MERGEKIT=1 (CI), which makes that a failure."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from tests.helpers.models import read_state_dict

MERGEKIT_VERSION = "0.1.5"  # the oracle and bench/bench_engine.py's peer
REQUIRE_ENV = "REQUIRE_MERGEKIT"
CACHE_ENV = "MODELMERGE_MERGEKIT_CACHE"


def _venv_folder() -> Path:
    purelib = sysconfig.get_paths()["purelib"]
    key = hashlib.sha256(f"{MERGEKIT_VERSION}|{sys.version}|{purelib}".encode()).hexdigest()[:16]
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "modelmerge-mergekit")
    return root / key


def _create(folder: Path) -> None:
    """Builds the virtualenv in a sibling folder and renames it into place when complete."""
    staging = folder.with_name(f".{folder.name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(staging)], check=True, capture_output=True, text=True)
        python = staging / "bin" / "python"
        theirs = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                check=True, capture_output=True, text=True).stdout.strip()
        Path(theirs, "modelmerge-main-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        f"mergekit=={MERGEKIT_VERSION}"], check=True, capture_output=True, text=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def mergekit_venv() -> Path:
    """The mergekit virtualenv (the oracle tests' and bench/'s), made if missing; RuntimeError where it cannot be."""
    folder = _venv_folder()
    if not (folder / "bin" / "python").exists():
        try:
            _create(folder)
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", None) or str(exc)
            raise RuntimeError(f"cannot make mergekit's virtualenv at {folder}: {detail.strip()[-2000:]}") from exc
    return folder


def mergekit_python() -> Path:
    """The mergekit virtualenv's interpreter; skips (fails with REQUIRE_MERGEKIT=1) where it cannot be made."""
    try:
        return mergekit_venv() / "bin" / "python"
    except RuntimeError as exc:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc))


def mergekit_merge(python: Path, config: dict, out: Path) -> dict:
    """Runs mergekit-yaml on `config` (written as JSON, which is YAML) into `out` and reads back what it saved."""
    out.parent.mkdir(parents=True, exist_ok=True)
    config_path = out.with_suffix(".yml")
    config_path.write_text(json.dumps(config))
    script = "import sys; from mergekit.scripts.run_yaml import main; sys.exit(main())"
    done = subprocess.run([str(python), "-c", script, str(config_path), str(out)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, f"mergekit failed on {config}:\n{done.stderr[-4000:]}"
    return read_state_dict(out)


def memoized_merges(root: Path):
    """`merged(config)`: mergekit's output for `config`, run once per distinct config under `root` (for a
    module-scoped fixture); skips (or fails) as mergekit_python does where mergekit cannot be had."""
    python = mergekit_python()
    done: dict[str, dict] = {}

    def merged(config: dict) -> dict:
        key = repr(config)
        if key not in done:
            done[key] = mergekit_merge(python, config, root / str(len(done)))
        return done[key]

    return merged


def assert_agrees_with_mergekit(ours: dict, theirs: dict, *, identical: bool = True) -> dict:
    """The issue's bar (>= 99.99% of elements bit-identical, none more than 1 ulp of the output dtype off), then,
    with `identical`, every element identical (+0 == -0). A head that the engine does not store (a tied base) is
    checked in mergekit's output to equal the embeddings, as mergekit stores it."""
    from tests.helpers.oracle import compare

    if "lm_head.weight" in theirs and "lm_head.weight" not in ours:
        theirs = dict(theirs)
        assert torch.equal(theirs.pop("lm_head.weight"), theirs["model.embed_tokens.weight"])
    result = compare(ours, theirs)
    assert result["elements"] > 0
    assert result["equal_fraction"] >= 0.9999 and result["max_ulps"] <= 1, result
    if identical:
        assert result["equal_fraction"] == 1.0 and not result["differing_tensors"], result
    return result
