"""Precompiled kernels: after `python -m modelmerge_engine.precompile`, a merge in a fresh process loads every
kernel from numba's cache and compiles nothing (no cache file is written, every dispatcher reports cache hits);
a cache built elsewhere and mounted read-only seeds numba's writable cache location.

The precompiles here are narrowed (one method, bfloat16, up to 2 fine-tunes) so that the test stays small; the
default run covers every method, mask flag combination, dtype and 1-8 fine-tunes the same way."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.models import make_family

NARROW = ["--methods", "task_arithmetic", "--dtypes", "bfloat16", "--max-models", "2"]
SEEDED = {"NUMBA_CACHE_LOCATOR_CLASSES": "modelmerge_engine.precompile.SeededCacheLocator"}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("NUMBA_") and k != "MODELMERGE_NUMBA_CACHE_SEED"}
    return {**env, **extra}


def precompile(*args: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, dict | None]:
    result = subprocess.run([sys.executable, "-m", "modelmerge_engine.precompile", *args], capture_output=True,
                            text=True, env=env)
    lines = result.stdout.strip().splitlines()
    return result, (json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("numba-cache")
    result, report = precompile(*NARROW, env=_env(NUMBA_CACHE_DIR=str(cache)))
    assert result.returncode == 0, result.stderr
    assert report["compiled"] > 0 and report["cache_hits"] == 0, report  # it started from an empty cache
    assert any(p.suffix == ".nbi" for p in cache.rglob("*")), snapshot(cache)
    return cache


def test_a_fresh_merge_after_precompile_compiles_nothing(built_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(built_cache, cache)
    before = snapshot(cache)
    base, finetunes = make_family(tmp_path / "models", n=2, vocab=256, hidden=64, intermediate=160, layers=2)
    merge = subprocess.run(
        [sys.executable, "-m", "modelmerge.cli", "merge", "--progress", "none", "--base-model", str(base),
         "--models-to-merge", ",".join(map(str, finetunes)), "--merge-method", "task_arithmetic",
         "--scaling-coefficient", "0.3", "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, env=_env(NUMBA_CACHE_DIR=str(cache), NUMBA_DEBUG_CACHE="1"))
    assert merge.returncode == 0, merge.stderr
    assert json.loads(merge.stdout.strip().splitlines()[-1])["status"] == "succeeded"
    debug = [line for line in merge.stdout.splitlines() if line.startswith("[cache]")]
    assert any("data loaded" in line for line in debug), debug
    assert not [line for line in debug if "saved" in line], debug
    assert snapshot(cache) == before

    result, report = precompile(*NARROW, "--verify", env=_env(NUMBA_CACHE_DIR=str(cache)))
    assert result.returncode == 0, result.stderr
    assert report["compiled"] == 0 and report["cache_hits"] > 0, report
    assert snapshot(cache) == before


def test_verify_fails_naming_the_kernels_that_were_not_cached(built_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(built_cache, cache)
    result, report = precompile("--methods", "ties_merging", "--dtypes", "bfloat16", "--max-models", "1",
                                "--verify", env=_env(NUMBA_CACHE_DIR=str(cache)))
    assert result.returncode == 1
    assert report["compiled"] > 0
    header, _, listing = result.stderr.partition("precompile --verify: compiled instead of loaded from the cache:\n")
    named = [line for line in listing.splitlines() if line.startswith("  ")]
    assert len(named) == report["compiled"] and all(line.strip().endswith(")") for line in named), result.stderr


def test_a_read_only_seed_fills_numbas_writable_cache(built_cache, tmp_path):
    seed = tmp_path / "seed"
    shutil.copytree(built_cache, seed)
    seeded_before = snapshot(seed)
    target = tmp_path / "writable"

    result, report = precompile(*NARROW, "--verify", env=_env(NUMBA_CACHE_DIR=str(target),
                                                             MODELMERGE_NUMBA_CACHE_SEED=str(seed), **SEEDED))
    assert result.returncode == 0, result.stderr
    assert report["compiled"] == 0 and report["cache_hits"] > 0, report
    assert snapshot(seed) == seeded_before
    assert set(snapshot(target)) == set(seeded_before)
    assert not [p for p in target.rglob("*.partial")]

    # The same run without the seed compiles: the seed, not a cache elsewhere, is what made it pass.
    result, report = precompile(*NARROW, "--verify", env=_env(NUMBA_CACHE_DIR=str(tmp_path / "empty"), **SEEDED))
    assert result.returncode == 1 and report["compiled"] > 0, result.stderr


@pytest.mark.parametrize("args, message", [
    (["--methods", "task_arithmetic,bogus"], "--methods: unknown method(s) bogus"),
    (["--dtypes", "int8"], "--dtypes: unknown dtype(s) int8"),
    (["--max-models", "0"], "--max-models must be at least 1, got 0"),
])
def test_bad_arguments_are_refused_naming_the_flag(args, message, tmp_path):
    result, _ = precompile(*args, env=_env(NUMBA_CACHE_DIR=str(tmp_path / "cache")))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "cache").exists()


def test_several_methods_compile_one_process_each_and_sum_their_reports(built_cache, tmp_path):
    """Each method compiles in a child process of its own (numba's labels grow with every kernel a process
    compiles); the parent's report sums the children's, and --verify across them passes once all are cached."""
    cache = tmp_path / "cache"
    shutil.copytree(built_cache, cache)
    both = ["--methods", "task_arithmetic,linear", "--dtypes", "bfloat16", "--max-models", "2"]
    alone, alone_report = precompile("--methods", "linear", "--dtypes", "bfloat16", "--max-models", "2", "--verify",
                                     env=_env(NUMBA_CACHE_DIR=str(tmp_path / "linear-only")))
    assert alone.returncode == 1 and alone_report["compiled"] > 0  # linear's kernels are not in built_cache

    result, report = precompile(*both, env=_env(NUMBA_CACHE_DIR=str(cache)))
    assert result.returncode == 0, result.stderr
    _, narrow = precompile(*NARROW, env=_env(NUMBA_CACHE_DIR=str(cache)))
    assert report["merges"] == narrow["merges"] + alone_report["merges"], (report, narrow, alone_report)
    assert report["compiled"] > 0 and report["cache_hits"] > 0, report  # linear compiled, task_arithmetic loaded

    result, report = precompile(*both, "--verify", env=_env(NUMBA_CACHE_DIR=str(cache)))
    assert result.returncode == 0 and report["compiled"] == 0, result.stderr


def test_a_specialised_kernels_cache_key_changes_with_any_engine_source(tmp_path):
    """numba keys a specialised kernel's cache on cpu_kernels.py's stamp and the closure's pickled contents, where
    a loop is only its name: the closure also holds the engine's source fingerprint, which any edit of any engine
    module (a method's loop, a helper it inlines) changes, so an edited loop never runs stale cached code."""
    import modelmerge_engine
    from modelmerge_engine import cpu_kernels

    kernel = cpu_kernels._specialised(cpu_kernels._histogram, 1)
    closure = [cell.cell_contents for cell in kernel.py_func.__closure__]
    assert cpu_kernels.engine_source_fingerprint() in closure

    tree = tmp_path / "modelmerge_engine"
    shutil.copytree(Path(modelmerge_engine.__file__).parent, tree, ignore=shutil.ignore_patterns("__pycache__"))
    before = cpu_kernels.source_fingerprint(tree)
    assert before == cpu_kernels.engine_source_fingerprint()
    method = tree / "methods" / "nuslerp.py"
    method.write_text(method.read_text().replace("NORM_FLOOR = 1e-7", "NORM_FLOOR = 1e-6"))
    assert cpu_kernels.source_fingerprint(tree) != before


def test_mask_merging_alone_precompiles(tmp_path):
    """A process given mask_merging alone (as each method gets its own) also compiles the conversion kernels,
    through another method: mask_merging's rates depend on the model count."""
    result, report = precompile("--methods", "mask_merging", "--dtypes", "bfloat16", "--max-models", "1",
                                env=_env(NUMBA_CACHE_DIR=str(tmp_path / "cache")))
    assert result.returncode == 0, result.stderr
    assert report["merges"] > 0 and report["compiled"] > 0, report


def test_compiling_a_kernel_does_not_double_numbas_block_labels():
    """numba numbers an inlined function's blocks after every label it has handed out in the process, so an
    inlined helper that itself inlines another (as rnd, store and mag once inlined _bf16_bits) doubles the process's
    highest label at each use: a test process compiling many kernels reached block names longer than LLVM accepts
    ("name is too long"). 40 uses of rnd, store and mag in one fresh function must add to it, not multiply it."""
    import numpy as np
    from numba import njit
    from numba.core import ir_utils

    from modelmerge_engine.cpu_kernels import mag, rnd, store

    body = "".join(f"    x = rnd(x * np.float32({1 + i / 64}), code)\n    store(out, {i}, x, code)\n"
                   f"    total += mag(x, code)\n" for i in range(40))
    namespace = {"np": np, "rnd": rnd, "store": store, "mag": mag}
    exec(f"def many(values, out, code):\n    x = values[0]\n    total = 0\n{body}    return total\n", namespace)
    kernel = njit(namespace["many"])
    before = ir_utils._the_max_label._value
    kernel(np.ones(1, np.float32), np.zeros(40, np.uint16), 0)
    after = ir_utils._the_max_label._value
    assert after < 4 * before + 100_000, (len(str(before)), len(str(after)))


@pytest.mark.parametrize("method", ["model_stock", "nuslerp"])
def test_tensors_longer_than_a_statistics_segment_compile_nothing_after_precompile(method, tmp_path):
    """Precompile merges tiny models; a model's large tensors stream their statistics a segment (1M values) at a
    time. The kernels they run must be the ones the tiny merges compiled: an embedding of 1.2M values merged in a
    fresh process loads everything from the cache (a separate kernel for long rows once compiled in every merge
    pod: 20 s with 8 fine-tunes)."""
    cache = tmp_path / "cache"
    result, _ = precompile("--methods", method, "--dtypes", "bfloat16", "--max-models", "2",
                           env=_env(NUMBA_CACHE_DIR=str(cache)))
    assert result.returncode == 0, result.stderr
    before = snapshot(cache)
    base, finetunes = make_family(tmp_path / "models", n=2, vocab=4096, hidden=288, intermediate=64, layers=1)
    config = tmp_path / "merge.yml"
    config.write_text(json.dumps({"merge_method": method, "base_model": str(base), "dtype": "bfloat16",
                                  "models": [{"model": str(f), "parameters": {"weight": 0.5}} for f in finetunes]}))
    merge = subprocess.run(
        [sys.executable, "-m", "modelmerge.cli", "merge", "--progress", "none", "--config", str(config),
         "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, env=_env(NUMBA_CACHE_DIR=str(cache), NUMBA_DEBUG_CACHE="1"))
    assert merge.returncode == 0, merge.stderr
    debug = [line for line in merge.stdout.splitlines() if line.startswith("[cache]")]
    assert not [line for line in debug if "saved" in line], debug
    assert snapshot(cache) == before
