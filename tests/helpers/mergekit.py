"""mergekit as the test oracle for mergekit's methods: in its own virtualenv outside the repository
(~/.cache/modelmerge-mergekit/<key>/, MODELMERGE_MERGEKIT_CACHE overrides the folder), made on first use with
`pip install mergekit==MERGEKIT_VERSION` and reused afterwards, by these tests and by bench/bench_engine.py. It
shares the main virtualenv's torch and transformers through a .pth file, so it installs only mergekit and its
small dependencies. Where it cannot be made (no package index), tests that need it are skipped, unless
REQUIRE_MERGEKIT=1 (CI), which makes that a failure."""

from __future__ import annotations

import atexit
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


# The oracle's driver: one mergekit process per interpreter for the whole test session, running mergekit-yaml's
# own entry point once per job, as `mergekit-yaml CONFIG OUT` would. Importing torch and mergekit is most of what a
# process per merge costs, so the tests pay it once. Each job's stdout and stderr go to its own log file; mergekit's
# caches of loaded models are emptied after each, so no job sees another's inputs. The protocol is one JSON line
# each way over pipes of the driver's own (fd 1 is pointed at the job's log, so mergekit cannot write into it).
_DRIVER = r"""
import json, os, sys, traceback
protocol = os.fdopen(os.dup(1), "w", buffering=1)
from mergekit.scripts.run_yaml import main
from mergekit.io.tasks import LoaderCache
from mergekit.architecture import auto
protocol.write("ready\n")
for line in sys.stdin:
    job = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    with open(job["log"], "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            main([job["config"], job["out"]], standalone_mode=False)
            ok = True
        except BaseException:
            traceback.print_exc()
            ok = False
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            LoaderCache().flush_all()
            LoaderCache.loaders.clear()
            auto.infer_architecture_info.cache_clear()
    protocol.write(json.dumps({"ok": ok}) + "\n")
"""


class _Driver:
    """One mergekit process (see _DRIVER) for `python`."""

    def __init__(self, python: Path):
        self.process = subprocess.Popen([str(python), "-c", _DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        ready = self.process.stdout.readline()
        if ready != "ready\n":
            self.close()
            raise RuntimeError(f"mergekit's driver did not start (read {ready!r})")

    def run(self, config_path: Path, out: Path, log: Path) -> bool | None:
        """Whether mergekit-yaml succeeded on the job; None where the process ended (it is then closed)."""
        try:
            self.process.stdin.write(json.dumps({"config": str(config_path), "out": str(out), "log": str(log)}) + "\n")
            self.process.stdin.flush()
            reply = self.process.stdout.readline()
        except BrokenPipeError:
            reply = ""
        if not reply:
            self.close()
            return None
        return json.loads(reply)["ok"]

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.close()
                self.process.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()


_drivers: dict[Path, _Driver] = {}


@atexit.register
def _close_drivers() -> None:
    while _drivers:
        _drivers.popitem()[1].close()


def mergekit_run(python: Path, config: dict, out: Path) -> tuple[bool, str]:
    """Runs mergekit-yaml on `config` (written as JSON, which is YAML) into `out` in the session's mergekit process
    for `python` (started on first use): whether it succeeded, and what it wrote to stdout and stderr."""
    out.parent.mkdir(parents=True, exist_ok=True)
    config_path, log = out.with_suffix(".yml"), out.with_suffix(".log")
    config_path.write_text(json.dumps(config))
    driver = _drivers.get(python)
    if driver is None or driver.process.poll() is not None:
        driver = _drivers[python] = _Driver(python)
    ok = driver.run(config_path, out, log)
    text = log.read_text() if log.exists() else ""
    if ok is None:
        _drivers.pop(python, None)
        return False, text + f"\nmergekit's process ended (exit status {driver.process.returncode})"
    return ok, text


def mergekit_merge(python: Path, config: dict, out: Path) -> dict:
    """Runs mergekit-yaml on `config` into `out` (mergekit_run) and reads back what it saved."""
    ok, log = mergekit_run(python, config, out)
    assert ok, f"mergekit failed on {config}:\n{log[-4000:]}"
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
