"""The engine under a pod's memory limit: a merge whose inputs are several times larger than a cgroup v1 memory
limit runs inside a memory cgroup with that limit, and succeeds without the OOM killer.

The inputs' page cache is evicted first, so that the merge reads them again and the cgroup is charged for them
(pages cached by someone else are not charged twice): the limit is then really reached and the kernel reclaims
the merge's clean page cache instead of killing it, which is what a streaming merge relies on.
Skipped where memory cgroups cannot be created (not root, cgroup v2 only); REQUIRE_CGROUP=1 makes that a
failure (CI sets it). The cgroup is removed whatever happens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modelmerge_engine.engine import INPUT_READS_ENV
from modelmerge_engine.precompile import write_checkpoint
from tests.helpers.memory_cgroup import MemoryCgroup, evict_page_cache, unavailable_reason

LIMIT = 256 << 20
# ~384 MiB per bfloat16 checkpoint: ten 4096 x 4096 matrices, an embedding of 32M elements (its top-k selection
# needs 8 bytes an element: 1.0 x LIMIT) and a norm vector; base + 2 fine-tunes = 4.5 x LIMIT
SHAPES = {**{f"model.layers.{i}.mlp.weight": (4096, 4096) for i in range(10)},
          "model.embed_tokens.weight": (16384, 2048), "model.norm.weight": (4096,)}


@pytest.fixture(scope="module")
def cgroups_writable() -> None:
    reason = unavailable_reason()
    if reason is None:
        return
    if os.environ.get("REQUIRE_CGROUP") == "1":
        pytest.fail(f"REQUIRE_CGROUP=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def big_models(cgroups_writable, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("big-models")
    return [write_checkpoint(root / name, "bfloat16", seed, SHAPES) for seed, name in enumerate(["base", "a", "b"])]


@pytest.mark.parametrize(("method", "input_reads"), [("task_arithmetic", "mapped"), ("ties_merging_dare", "auto"),
                                                     ("task_arithmetic", "auto")])
def test_a_merge_of_inputs_larger_than_the_memory_limit_succeeds_under_it(method, input_reads, big_models, tmp_path,
                                                                          monkeypatch):
    """Mapped inputs (every method with statistics passes; any method with MODELMERGE_ENGINE_INPUT_READS=mapped)
    fill the limit with page cache, which the kernel reclaims; a merge that reads its inputs once reads them around
    the page cache, and stays far below the limit."""
    monkeypatch.setenv(INPUT_READS_ENV, input_reads)
    base, *finetunes = big_models
    out = tmp_path / "merged"
    stdout, stats, cgroup = _merge_under_the_limit(
        big_models, ["--base-model", str(base), "--models-to-merge", ",".join(map(str, finetunes)),
                     "--merge-method", method, "--output-dir", str(out)])
    assert json.loads(stdout.strip().splitlines()[-1])["status"] == "succeeded"
    direct_files = json.loads((out / "merge_report.json").read_text())["statistics"]["direct_read_files"]
    if method == "task_arithmetic" and input_reads == "auto":
        # read around the page cache: what is charged is the processes' memory and a little page cache
        assert direct_files == 3
        assert stats["peak_bytes"] < LIMIT * 0.75 and stats["cache"] < 32 << 20, stats
    else:
        # The limit bound the merge: its charge (anonymous memory + the page cache it read and wrote) reached the
        # limit, and the kernel reclaimed page cache rather than killing it.
        assert direct_files == 0
        assert LIMIT * 0.9 <= stats["peak_bytes"] <= LIMIT, stats
        assert stats["pgpgout"] > 0, stats
    with open(out / "model.safetensors", "rb") as merged:
        header = json.loads(merged.read(int.from_bytes(merged.read(8), "little")))
    assert {name: meta["shape"] for name, meta in header.items() if name != "__metadata__"} == \
        {name: list(shape) for name, shape in SHAPES.items()}
    assert not cgroup.path.exists()


def _merge_under_the_limit(models: list[Path], arguments: list[str]):
    """`modelmerge merge ARGUMENTS` in a fresh memory cgroup limited to LIMIT, the inputs' page cache evicted
    first; checks it was neither OOM-killed nor failed. Returns (stdout, the cgroup's stats, the cgroup)."""
    inputs = sum((p / "model.safetensors").stat().st_size for p in models)
    assert inputs >= 3 * LIMIT
    evict_page_cache(models)
    with MemoryCgroup("memory-limit-test", limit_bytes=LIMIT) as cgroup:
        merge = cgroup.popen([sys.executable, "-m", "modelmerge.cli", "merge", "--progress", "none", *arguments],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stdout, stderr = merge.communicate()
        stats = cgroup.stats()
    assert stats["oom_kills"] == 0, f"OOM-killed under {LIMIT >> 20} MiB: {stats}\n{stderr[-2000:]}"
    assert merge.returncode == 0, stderr[-2000:]
    return stdout, stats, cgroup


@pytest.mark.parametrize("config", [
    {"merge_method": "ties", "parameters": {"density": 0.2, "weight": 1.0}},
    {"merge_method": "breadcrumbs_ties", "parameters": {"density": 0.8, "gamma": 0.01, "weight": 1.0}},
    {"merge_method": "sce", "parameters": {"select_topk": 0.5}},
], ids=lambda config: config["merge_method"])
def test_top_k_selections_larger_than_the_memory_limit_succeed_under_it(config, big_models, tmp_path):
    """mergekit's selections by rank hold each tensor's keys and element order (8 bytes an element): the
    embedding's alone is the limit here, so in anonymous memory the merge is OOM-killed. As scratch arrays
    (scratch.py, a file in TMPDIR) they are page cache the kernel writes back under the limit, and the merge
    completes, with the bytes it writes without a limit."""
    base, *finetunes = big_models
    path = tmp_path / "merge.yml"
    path.write_text(json.dumps({**config, "base_model": str(base), "dtype": "bfloat16",
                                "models": [{"model": str(model)} for model in finetunes]}))
    limited, free = tmp_path / "limited", tmp_path / "free"
    stdout, stats, _ = _merge_under_the_limit(big_models, ["--config", str(path), "--output-dir", str(limited)])
    assert json.loads(stdout.strip().splitlines()[-1])["status"] == "succeeded"
    assert LIMIT * 0.9 <= stats["peak_bytes"] <= LIMIT, stats
    subprocess.run([sys.executable, "-m", "modelmerge.cli", "merge", "--progress", "none", "--config", str(path),
                    "--output-dir", str(free)], check=True, capture_output=True)
    assert (limited / "model.safetensors").read_bytes() == (free / "model.safetensors").read_bytes()
