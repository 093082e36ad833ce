"""Outputs that survive anything: `--overwrite` swaps the new output in atomically, a SIGKILL at any point
leaves the old output or the new one, everything is fsynced, and what killed merges leave behind is removed
by the next merge into the same parent, never what a live merge is writing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from modelmerge.contract import MergeRequest
from modelmerge_engine import output as output_module
from modelmerge_engine.run import run_merge
from tests.helpers.models import make_family, read_state_dict

SMALL = {"vocab": 256, "hidden": 64, "intermediate": 160, "layers": 2}
# Big enough that a merge is far from done when its first progress line appears.
BIG = {"vocab": 32000, "hidden": 256, "intermediate": 704, "layers": 4, "heads": 4, "kv_heads": 2}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("small"), n=2, **SMALL)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("big"), n=2, **BIG)


def merge_args(family, out: Path, *extra: str) -> list[str]:
    base, fts = family
    return [sys.executable, "-m", "modelmerge.cli", "merge", "--progress", "lines", "--base-model", str(base),
            "--models-to-merge", ",".join(str(p) for p in fts), "--output-dir", str(out), *extra]


def run_cli(family, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(merge_args(family, out, *extra), capture_output=True, text=True)


def start_and_wait_for_progress(family, out: Path, *extra: str) -> subprocess.Popen:
    """A merge running in the background, returned once its first progress line (`[step ...`) is out: its
    staging directory exists and most of the work is still ahead."""
    return started_until_progress(merge_args(family, out, "--merge-method", "ties_merging_dare", "--dtype",
                                             "float32", *extra))


def started_until_progress(command: list[str]) -> subprocess.Popen:
    """`command` (a merge with --progress lines) started, returned once its first progress line is out."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if line.startswith("["):
            return process
    raise AssertionError(f"the merge ended without a progress line: {process.wait()} {process.stdout.read()}")


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def staging_entries(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}.partial-"))


def test_sigkill_during_overwrite_leaves_the_old_output_whole(small, big, tmp_path):
    out = tmp_path / "models" / "out"
    first = run_cli(small, out, "--merge-method", "task_arithmetic", "--scaling-coefficient", "0.3")
    assert first.returncode == 0, first.stderr
    old = snapshot(out)

    process = start_and_wait_for_progress(big, out, "--overwrite")
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stdout.close()
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert snapshot(out) == old  # byte for byte, file for file
    left = staging_entries(out.parent, "out")
    assert len(left) == 2 and left[1] == left[0] + ".lock", left  # the dead merge's staging dir and lock

    again = run_cli(small, out, "--merge-method", "average_merging", "--overwrite")
    assert again.returncode == 0, again.stderr
    assert f"removed what killed merges left in {out.parent}: {', '.join(left)}" in again.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]
    assert json.loads((out / "merge_report.json").read_text())["method"] == "average_merging"
    assert set(read_state_dict(out)) == set(read_state_dict(small[0]))


def operator_pod_command(family, volumes: Path) -> list[str]:
    """The merge container's command line in the operator's Job for a ModelMerge of `family` (every retry of
    the Job is a new pod running it), with the pod's mounts (the spec ConfigMap, the output claim, the
    termination log) mapped to folders under `volumes`."""
    from modelmerge.contract import ModelMergeSpec
    from modelmerge_operator import manifests
    from modelmerge_operator.config import OperatorConfig

    base, fts = family
    body = {"apiVersion": "modelmerge.io/v1alpha1", "kind": "ModelMerge",
            "metadata": {"name": "big-merge", "namespace": "team-a", "uid": "uid-1", "generation": 1},
            "spec": {"base_model": str(base), "models_to_merge": [str(p) for p in fts],
                     "merge_method": "ties_merging_dare", "dtype": "float32", "output": {"pvc": "models"},
                     "output_dir": "runs/merged"}}
    spec = ModelMergeSpec.model_validate(body["spec"])
    container = manifests.container(body, spec, OperatorConfig(merge_command=(sys.executable, "-m", "modelmerge.cli")))
    (volumes / "spec").mkdir(parents=True)
    (volumes / "spec" / manifests.SPEC_FILE).write_text(manifests.config_map(body, spec)["data"][manifests.SPEC_FILE])
    mounts = {manifests.SPEC_DIR: volumes / "spec", manifests.OUTPUT_MOUNT: volumes / "output",
              manifests.TERMINATION_LOG: volumes / "termination-log"}

    def local(arg: str) -> str:
        for mount, folder in mounts.items():
            if arg == mount or arg.startswith(mount + "/"):
                return str(folder) + arg[len(mount):]
        return arg

    return [*container["command"], *map(local, container["args"])]


def test_the_operators_retry_removes_what_the_killed_attempt_left(big, tmp_path):
    """A merge pod killed mid-merge (OOM kill, node loss) leaves its staging directory on the claim; the Job's
    retry, the same command in a new pod, removes it before it merges."""
    command = operator_pod_command(big, tmp_path)
    runs = tmp_path / "output" / "runs"
    killed = started_until_progress(command)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    killed.stdout.close()
    killed.stderr.close()
    left = staging_entries(runs, "merged")
    assert len(left) == 2 and left[1] == left[0] + ".lock", left

    retry = subprocess.run(command, capture_output=True, text=True)
    assert retry.returncode == 0, retry.stderr
    assert f"removed what killed merges left in {runs}: {', '.join(left)}" in retry.stderr
    assert sorted(p.name for p in runs.iterdir()) == ["merged"]
    assert json.loads((tmp_path / "termination-log").read_text())["status"] == "succeeded"


def test_a_live_merge_is_left_alone_and_finishes(small, big, tmp_path):
    parent = tmp_path / "outputs"
    running = start_and_wait_for_progress(big, parent / "a")
    running.send_signal(signal.SIGSTOP)  # alive, holding its lock, doing nothing: deterministic
    try:
        live = staging_entries(parent, "a")
        assert len(live) == 2, live
        other = run_cli(small, parent / "b", "--merge-method", "average_merging")
        assert other.returncode == 0, other.stderr
        assert "removed what killed merges" not in other.stderr
        assert staging_entries(parent, "a") == live
    finally:
        running.send_signal(signal.SIGCONT)
    stdout, stderr = running.communicate()
    assert running.returncode == 0, stderr
    assert json.loads(stdout.strip().splitlines()[-1])["status"] == "succeeded"
    assert sorted(p.name for p in parent.iterdir()) == ["a", "b"]
    assert set(read_state_dict(parent / "a")) == set(read_state_dict(big[0]))


def _request(family, out: Path, method: str = "task_arithmetic") -> MergeRequest:
    base, fts = family
    return MergeRequest(base_model=str(base), models_to_merge=[str(p) for p in fts], merge_method=method,
                        output_dir=str(out))


def test_overwrite_without_rename_exchange_falls_back_to_two_renames(small, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert run_merge(_request(small, out), progress="none") == 0
    monkeypatch.setattr(output_module, "_exchange", lambda first, second: False)
    assert run_merge(_request(small, out, "average_merging"), overwrite=True, progress="none") == 0
    assert json.loads((out / "merge_report.json").read_text())["method"] == "average_merging"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _killed_between_fallback_renames(small, parent: Path) -> dict[str, bytes]:
    """What a SIGKILL between the fallback's two renames leaves: the old output moved aside, the new one
    still staged, an unlocked lock. Returns the old output's files."""
    old_output = parent / "old"
    assert run_merge(_request(small, old_output), progress="none") == 0
    old = snapshot(old_output)
    stem = parent / ".out.partial-0123456789ab"
    old_output.rename(f"{stem}.old")
    stem.mkdir()
    (stem / "model.safetensors").write_bytes(b"half a model")
    Path(f"{stem}.lock").touch()
    return old


def test_the_next_merge_into_the_parent_puts_back_an_output_moved_aside(small, tmp_path):
    old = _killed_between_fallback_renames(small, tmp_path)
    assert run_merge(_request(small, tmp_path / "other"), progress="none") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "out"]
    assert snapshot(tmp_path / "out") == old


def test_an_output_put_back_is_not_replaced_without_overwrite(small, tmp_path, capsys):
    old = _killed_between_fallback_renames(small, tmp_path)
    assert run_merge(_request(small, tmp_path / "out", "average_merging"), progress="none") == 1
    error = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"]
    assert error == f"output_dir: {tmp_path / 'out'} exists and is not empty (pass --overwrite to replace it)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert snapshot(tmp_path / "out") == old


def test_leftovers_without_a_lock_are_stale_and_other_hidden_entries_are_kept(small, tmp_path):
    (tmp_path / ".out.partial-00000000000f").mkdir()  # its lock already removed when the kill came
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".out.partial-notatoken").mkdir()
    assert run_merge(_request(small, tmp_path / "merged"), progress="none") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache", ".out.partial-notatoken", "merged"]


def test_everything_published_was_fsynced_and_then_the_parent(small, tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(descriptor: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    out = tmp_path / "out"
    base, fts = small
    request = MergeRequest(base_model=str(base), models_to_merge=[str(p) for p in fts], output_dir=str(out),
                           merge_method="ties_merging", max_shard_size="64KB")
    assert run_merge(request, progress="none") == 0
    files = sorted(p.name for p in out.iterdir())
    assert {"model.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.json",
            "merge_report.json", "README.md"} <= set(files)
    staged = {Path(path).name for path in synced if Path(path).parent.name.startswith(".out.partial-")}
    assert staged >= set(files), sorted(set(files) - staged)
    assert any(Path(path).name.startswith(".out.partial-") for path in synced)  # the staging dir itself
    assert synced[-1] == str(tmp_path)  # the parent, after the rename
