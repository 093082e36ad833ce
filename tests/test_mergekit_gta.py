"""mergekit's generalized task arithmetic family (methods/generalized_task_arithmetic.py) against mergekit 0.1.5
(the oracle, tests/helpers/mergekit.py) on the tiny Qwen2- and Llama-shaped families of tests/helpers/oracle.py.

Deterministic methods (mergekit_task_arithmetic, ties, breadcrumbs, breadcrumbs_ties): the issue's tolerance
(>= 99.99% of elements bit-identical, none more than one ulp off), then what is reached: every element identical,
in bfloat16, float16 and float32, on both kernel sets with every tensor split into ranges. Random methods
(dare_*, della*): identical to mergekit at density 1, and statistically (drop fraction, L1 rescale, della's
rank-dependent keep probability) otherwise; seeded and identical on both kernel sets and any range split.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from modelmerge.contract import MergeRequest
from modelmerge_engine.dtype_codes import BF16, F32
from modelmerge_engine.engine import RANGE_ELEMENTS_ENV
from modelmerge_engine.kernels import KERNEL_SET_NAMES, KERNELS_ENV
from modelmerge_engine.methods import gta_kernels
from tests import test_mergekit_oracle
from tests.helpers.models import read_state_dict
from tests.helpers.oracle import FAMILIES, compare, engine_merge
from tests.test_engine_progress import assert_progress_of_one_merge, progress_lines
from tests.test_mergekit_oracle import assert_agrees

# The mergekit oracle's fixtures (its output per config, computed once per module; the tiny families)
mergekit = test_mergekit_oracle.mergekit
families = test_mergekit_oracle.families

WEIGHTS = [0.3, 0.7, -0.2, 1.3]  # uneven, one negative
DENSITIES = [0.5, 0.3, 0.7, 0.9]
DETERMINISTIC = ("mergekit_task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties")
RANDOM = ("dare_ties", "dare_linear", "della", "della_linear")
MERGEKIT_NAME = {"mergekit_task_arithmetic": "task_arithmetic"}
MERGEKIT_GLOBALS = ("normalize", "rescale", "lambda", "int8_mask")  # the rest are the engine's own fields


def per_model(count: int, *, density: list[float] | None = None, **extra) -> list[dict]:
    return [{"weight": WEIGHTS[i], "density": (density or DENSITIES)[i], **extra} for i in range(count)]


def ours_and_theirs(families, mergekit, tmp_path, method: str, family: str, *, dtype: str = "bfloat16",
                    models: list[dict] | None = None, **parameters):
    base, finetunes = families[family]
    models = models or per_model(len(finetunes))
    finetunes = finetunes[:len(models)]
    ours = engine_merge(base, finetunes, tmp_path / "ours", merge_method=method, model_parameters=models,
                        dtype=dtype, **parameters)
    config = {"merge_method": MERGEKIT_NAME.get(method, method), "base_model": str(base), "dtype": dtype,
              "parameters": {k: v for k, v in parameters.items() if k in MERGEKIT_GLOBALS},
              "models": [{"model": str(path), "parameters": entry} for path, entry in zip(finetunes, models,
                                                                                          strict=True)]}
    return ours, dict(mergekit(config)), FAMILIES[family].get("tie", False)


def agree(ours, theirs, tied: bool) -> dict:
    return assert_agrees(ours, theirs, tied=tied)


# --- the tie order of torch's CPU sort ------------------------------------------------------------------------


@pytest.mark.parametrize("descending", [True, False], ids=["descending", "ascending"])
def test_the_selection_keeps_the_elements_torchs_cpu_argsort_puts_in_the_window(descending):
    """Equal magnitudes abound in 16-bit task vectors; which of them a top-k keeps is what torch's (unstable)
    CPU sort leaves in the window, and sort_window must leave the same elements there."""
    rng = np.random.default_rng(7)
    for trial in range(120):
        n = int(rng.integers(1, 3000)) if trial < 100 else int(rng.integers(20_000, 120_000))
        keys = rng.integers(0, int(rng.integers(1, 50)), n).astype(np.int32)
        if trial % 5 == 0:
            keys = np.sort(keys)[:: 1 if trial % 10 else -1].copy()
        start = int(rng.integers(0, n + 1))
        stop = int(rng.integers(start, n + 1))
        reference = torch.argsort(torch.from_numpy(keys.astype(np.float32)), descending=descending).numpy()
        order = np.arange(n, dtype=np.int32)
        gta_kernels.sort_window(keys, order, start, stop, descending)
        assert set(order[start:stop].tolist()) == set(reference[start:stop].tolist()), (trial, n, start, stop)
    assert not np.array_equal(reference, np.argsort(keys.astype(np.float32) * (-1 if descending else 1),
                                                     kind="stable")), "torch's sort is not stable here"


# --- della's ranks -----------------------------------------------------------------------------------------


def stable_sort_ranks(keys: np.ndarray) -> np.ndarray:
    ranks = np.empty(keys.shape[0], dtype=np.int64)
    ranks[np.argsort(keys, kind="stable")] = np.arange(keys.shape[0])
    return ranks


@pytest.mark.parametrize("key_bits", [15, 31])
def test_della_ranks_are_a_stable_sorts(key_bits):
    """The radix ranking equals a stable sort's: equal keys in index order, keys over the whole range, keys that
    share their high digits (a pass skipped) or their low ones, and rows of 0, 1 and 2 elements."""
    rng = np.random.default_rng(key_bits)
    top = 2 ** key_bits
    for n in (0, 1, 2, 3, 255, 256, 896, 4864):
        for keys in (rng.integers(0, 4, n), rng.integers(0, top, n), top - 1 - rng.integers(0, 300, n),
                     rng.integers(0, 16, n) << (key_bits - 4), np.full(n, 7)):
            keys = keys.astype(np.int64)
            np.testing.assert_array_equal(gta_kernels.stable_ranks(keys, key_bits), stable_sort_ranks(keys))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_della_masks_follow_each_rows_stable_ranks(dtype):
    """ranked_mask with probabilities below 0 for the ranks under a cut and above 1 from it keeps exactly the
    elements a stable sort of each row's magnitudes ranks at the cut or later (ties by sign and repeated
    magnitudes included), in both key widths."""
    rng = np.random.default_rng(3)
    rows, columns, cut = 40, 64, 29
    magnitudes = rng.choice(np.array([1e-30, 0.001, 0.5, 3.0, 2.0 ** 60, 7.25], np.float32), rows * columns)
    values = magnitudes * rng.choice(np.array([-1.0, 1.0], np.float32), rows * columns)
    if dtype == "bfloat16":
        bits = (values.view(np.uint32) >> 16).astype(np.uint16)  # bfloat16 bit patterns (truncated)
        code, raw, base, keys = BF16, bits, np.zeros_like(bits), (bits & 0x7FFF).astype(np.int64)
    else:
        code, raw, base = F32, values, np.zeros_like(values)
        keys = (values.view(np.uint32) & 0x7FFFFFFF).astype(np.int64)
    span = 1e6  # probability = low + span * rank / (columns - 1): below 0 under the cut, far above 1 from it
    low = -span * (cut - 0.5) / (columns - 1)
    keep = np.empty(rows * columns, dtype=np.bool_)
    gta_kernels.ranked_mask(code, base, raw, 0, columns, 11, low + span / 2, span / 2, keep)
    expected = np.concatenate([stable_sort_ranks(keys[r * columns:(r + 1) * columns]) >= cut for r in range(rows)])
    np.testing.assert_array_equal(keep, expected)


# --- deterministic methods ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2-bf16-2", "llama-bf16-4-sharded", "qwen2-fp32-4-tied"])
@pytest.mark.parametrize("method", DETERMINISTIC)
def test_deterministic_methods_match_mergekit(families, mergekit, tmp_path, method, family):
    agree(*ours_and_theirs(families, mergekit, tmp_path, method, family))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_every_compute_dtype_matches_mergekit(families, mergekit, tmp_path, method, dtype):
    agree(*ours_and_theirs(families, mergekit, tmp_path, method, "qwen2-fp32-4-tied", dtype=dtype))


@pytest.mark.parametrize("kernels", KERNEL_SET_NAMES)
@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_split_ranges_and_both_kernel_sets_match_mergekit(families, mergekit, tmp_path, monkeypatch, method,
                                                          kernels):
    monkeypatch.setenv(KERNELS_ENV, kernels)
    monkeypatch.setenv(RANGE_ELEMENTS_ENV, "37")
    agree(*ours_and_theirs(families, mergekit, tmp_path, method, "llama-bf16-4-sharded",
                                   max_shard_size="40KB"))


def test_global_parameters_match_mergekit(families, mergekit, tmp_path):
    """normalize off for ties, lambda, rescale (L1), gamma and int8_mask (no effect) against mergekit."""
    models = per_model(2, gamma=0.05)
    agree(*ours_and_theirs(families, mergekit, tmp_path / "a", "ties", "qwen2-bf16-2", normalize=False,
                                   rescale=True, int8_mask=True, **{"lambda": 0.6}))
    agree(*ours_and_theirs(families, mergekit, tmp_path / "b", "breadcrumbs_ties", "qwen2-bf16-2",
                                   models=models, normalize=True, **{"lambda": 1.5}))


def test_densities_zero_and_one_match_mergekit(families, mergekit, tmp_path):
    models = per_model(4, density=[0.0, 1.0, 0.001, 0.999])
    agree(*ours_and_theirs(families, mergekit, tmp_path, "ties", "llama-bf16-4-sharded", models=models))


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "breadcrumbs_ties"])
def test_mergekit_configs_select_the_family_with_per_tensor_values(families, mergekit, tmp_path, method):
    """A mergekit config as written for mergekit (merge_method: task_arithmetic selects mergekit_task_arithmetic):
    weights as layer gradients, densities by filter, lambda and normalize global, the base listed in models."""
    base, finetunes = families["llama-bf16-4-sharded"]
    config = {"merge_method": method, "base_model": str(base), "dtype": "bfloat16",
              "parameters": {"normalize": True, "lambda": 0.8},
              "models": [{"model": str(base)}] + [
                  {"model": str(path), "parameters": {
                      "weight": [WEIGHTS[i], 1.0 - WEIGHTS[i]],
                      "density": [{"filter": "self_attn", "value": DENSITIES[i]}, {"value": 0.6}]}}
                  for i, path in enumerate(finetunes)]}
    ours = engine_merge(base, finetunes, tmp_path / "ours", config=config)
    agree(ours, dict(mergekit(config)), False)


# --- random methods ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", RANDOM)
def test_random_methods_at_density_one_match_mergekit(families, mergekit, tmp_path, method):
    models = per_model(4, density=[1.0] * 4, epsilon=0.0 if method.startswith("della") else 0.15)
    agree(*ours_and_theirs(families, mergekit, tmp_path, method, "llama-bf16-4-sharded", models=models))


def _kept(ours, base, finetune):
    """Per merged tensor: (task vector != 0, merged != base) of a one-model merge."""
    for name, merged in ours.items():
        if name not in finetune or merged.dim() == 0:
            continue
        delta = finetune[name].float() - base[name].float()
        yield name, delta != 0, merged.float() != base[name].float(), delta, merged.float() - base[name].float()


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_random_drop_fraction_and_rescale(families, tmp_path, method):
    """One model, weight 1, float32: an element survives iff merged != base. The kept fraction is the density
    (within 6σ), and with rescale the kept values are the task vector × |tv|₁ / |kept tv|₁ of their tensor."""
    base_dir, finetunes = families["llama-fp32-2"]
    density = 0.3
    models = [{"weight": 1.0, "density": density, "epsilon": 0.1}]
    ours = engine_merge(base_dir, finetunes[:1], tmp_path / "ours", merge_method=method, model_parameters=models,
                        dtype="float32", rescale=True, seed=11)
    base, finetune = read_state_dict(base_dir), read_state_dict(finetunes[0])
    kept = total = 0
    for name, nonzero, survived, delta, merged_delta in _kept(ours, base, finetune):
        kept += int((survived & nonzero).sum())
        total += int(nonzero.sum())
        scale = delta.abs().sum() / delta[survived].abs().sum()
        assert torch.allclose(merged_delta[survived], delta[survived] * scale, rtol=1e-5, atol=1e-7), name
    sigma = (density * (1 - density) / total) ** 0.5
    assert abs(kept / total - density) < 6 * sigma, (kept, total)


@pytest.mark.parametrize("code", [BF16, F32])
def test_rescale_norms_are_exact_sums_whatever_the_ranges(code):
    """l1_buckets: the L1 norms of a task vector and of its kept part, as exact sums (Fractions here), the same
    for any cut of the tensor into ranges (lengths not a multiple of its partial bucket sets), with magnitudes
    over 60 binary orders, zeros, subnormals and repeated exponents."""
    from fractions import Fraction

    rng = np.random.default_rng(7)
    n = 20011
    base = (rng.standard_normal(n) * np.exp2(rng.integers(-140, -80, n))).astype(np.float32)
    finetuned = base + (rng.standard_normal(n) * np.exp2(rng.integers(-140, -80, n))).astype(np.float32)
    finetuned[::13] = base[::13]  # zero task vectors
    if code == BF16:
        base, finetuned = [(x.view(np.uint32) >> 16).astype(np.uint16) for x in (base, finetuned)]
        widened = [(x.astype(np.uint32) << 16).view(np.float32) for x in (base, finetuned)]
    else:
        widened = [base, finetuned]
    deltas = torch.from_numpy(widened[1]) - torch.from_numpy(widened[0])
    if code == BF16:
        deltas = deltas.to(torch.bfloat16).to(torch.float32)
    keep = rng.random(n) < 0.4
    magnitudes = [Fraction(float(abs(d))) for d in deltas.tolist()]
    exact = [sum(magnitudes, Fraction(0)), sum((m for m, k in zip(magnitudes, keep, strict=True) if k), Fraction(0))]
    for cuts in ([0, n], [0, 1, 9, 4099, 13001, n]):
        before, after = np.zeros(256, np.int64), np.zeros(256, np.int64)
        for start, stop in itertools.pairwise(cuts):
            gta_kernels.l1_buckets(code, base[start:stop], finetuned[start:stop], keep[start:stop], before, after)
        assert [gta_kernels.exact_sum(b) for b in (before, after)] == [float(x) for x in exact], cuts


def test_della_keeps_larger_magnitudes_more_often(families, tmp_path):
    """della: keep probability (density − ε) + 2ε · (rank − 1) / (columns − 1) in each row: 0.15 for the
    smallest magnitudes, 0.85 for the largest (density 0.5, epsilon 0.35)."""
    base_dir, finetunes = families["llama-fp32-2"]
    ours = engine_merge(base_dir, finetunes[:1], tmp_path / "ours", merge_method="della_linear", dtype="float32",
                        model_parameters=[{"weight": 1.0, "density": 0.5, "epsilon": 0.35}], rescale=False)
    base, finetune = read_state_dict(base_dir), read_state_dict(finetunes[0])
    low = high = 0.0
    count = 0
    for _name, _, survived, delta, _ in _kept(ours, base, finetune):
        if delta.dim() != 2:
            continue
        ranks = delta.abs().argsort(dim=1, stable=True).argsort(dim=1).float() / (delta.shape[1] - 1)
        low += float(survived[ranks < 0.1].float().sum())
        high += float(survived[ranks > 0.9].float().sum())
        count += int((ranks < 0.1).sum())
    assert count > 1000
    assert abs(low / count - 0.185) < 0.03 and abs(high / count - 0.815) < 0.03, (low / count, high / count)


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_random_methods_are_seeded_and_equal_on_both_kernel_sets_and_any_split(families, tmp_path, monkeypatch,
                                                                             method):
    base, finetunes = families["qwen2-bf16-2"]
    models = per_model(2, epsilon=0.1)
    fields = {"merge_method": method, "model_parameters": models, "seed": 5, "rescale": True}
    reference = engine_merge(base, finetunes, tmp_path / "reference", **fields)
    for kernels, split in (("torch", "37"), ("compiled", "1000")):
        monkeypatch.setenv(KERNELS_ENV, kernels)
        monkeypatch.setenv(RANGE_ELEMENTS_ENV, split)
        again = engine_merge(base, finetunes, tmp_path / f"{kernels}-{split}", **fields)
        assert compare(again, reference)["equal_fraction"] == 1.0, (kernels, split)
    other = engine_merge(base, finetunes, tmp_path / "other-seed", **{**fields, "seed": 6})
    assert compare(other, reference)["equal_fraction"] < 0.99


def test_dare_keeps_exactly_the_draws_below_the_float32_density():
    """DARE's compiled mask compares each draw's 24 bits with an integer cut instead of the float draw with the
    density: it keeps exactly the elements whose draw (the torch kernel set's uniform_draws) is below the density
    in float32, with the density equal to a draw (that element dropped), just above it (kept), and in between."""
    from modelmerge_engine.cpu_kernels import uniform_draws

    key, start, count = 0x5DEECE66D, 12345, 1 << 16
    draws = np.empty(count, dtype=np.float32)
    uniform_draws(key, start, draws)
    at_a_draw = float(draws[7])
    for density in (at_a_draw, float(np.nextafter(draws[7], np.float32(1))), 1 / 3, 0.5, 0.99, 2.0**-24):
        keep = np.empty(count, dtype=np.bool_)
        gta_kernels.random_mask(key, start, density, keep)
        assert np.array_equal(keep, draws < np.float32(density)), density
        if density == at_a_draw:
            assert not keep[7]
        assert 0 < keep.sum() < count or density == 2.0**-24


def test_dare_drops_about_as_often_as_mergekit(families, mergekit, tmp_path):
    """mergekit draws with torch's unseeded generator, so the drops differ; their number agrees (6σ)."""
    base_dir, finetunes = families["llama-fp32-2"]
    models = [{"weight": 1.0, "density": 0.4}]
    ours, theirs, _ = ours_and_theirs(families, mergekit, tmp_path, "dare_linear", "llama-fp32-2", models=models,
                                   dtype="float32", rescale=False)
    base, finetune = read_state_dict(base_dir), read_state_dict(finetunes[0])
    counts = {}
    for label, merged in (("ours", ours), ("theirs", theirs)):
        kept = total = 0
        for _, nonzero, survived, _, _ in _kept(merged, base, finetune):
            kept += int((survived & nonzero).sum())
            total += int(nonzero.sum())
        counts[label] = kept / total
    sigma = (0.4 * 0.6 / total) ** 0.5
    assert abs(counts["ours"] - 0.4) < 6 * sigma and abs(counts["theirs"] - 0.4) < 6 * sigma, counts


@pytest.mark.parametrize("method", ["ties", "della_linear"])
def test_progress_counts_the_statistics_passes(families, tmp_path, method):
    """The merge step's planned work includes each sparsified model's selection and L1 passes (the CLI's flags:
    --model-parameters as JSON, --rescale a boolean flag)."""
    base, finetunes = families["qwen2-bf16-2"]
    result = subprocess.run(
        [sys.executable, "-m", "modelmerge.cli", "merge", "--progress", "lines", "--base-model", str(base),
         "--models-to-merge", ",".join(map(str, finetunes)), "--output-dir", str(tmp_path / "out"),
         "--merge-method", method, "--model-parameters", json.dumps(per_model(2, epsilon=0.1)), "--rescale"],
        capture_output=True, text=True, env={**os.environ, RANGE_ELEMENTS_ENV: "1000"})
    assert result.returncode == 0, result.stderr
    parsed = progress_lines(result.stderr)
    assert_progress_of_one_merge(parsed, ["merge"])
    numel = sum(t.numel() for name, t in read_state_dict(base).items() if "lm_head" not in name)
    planned = int(parsed[-1][1].split(" values")[0].rsplit("/", 1)[1])
    assert planned > numel * 2 * 2, "the statistics passes are planned on top of reading each input once"


# --- the request ---------------------------------------------------------------------------------------------


def test_per_method_defaults_and_errors_naming_the_field():
    request = {"base_model": "b", "models_to_merge": ["x", "y"]}
    ties = MergeRequest(**request, merge_method="ties")
    dare = MergeRequest(**request, merge_method="dare_ties")
    assert (ties.normalize, ties.rescale, dare.normalize, dare.rescale) == (True, False, False, True)
    assert MergeRequest(**request, merge_method="ties", normalize=False).normalize is False
    assert getattr(MergeRequest(**request, merge_method="ties", **{"lambda": 0.5}), "lambda") == 0.5
    with pytest.raises(ValidationError, match=r"model_parameters\[1\]\.epsilon: della needs density - epsilon > 0"):
        MergeRequest(**request, merge_method="della", model_parameters=[{}, {"density": 0.9, "epsilon": 0.15}])
    with pytest.raises(ValidationError, match=r"model_parameters\.0\.density\n.*less than or equal to 1"):
        MergeRequest(**request, merge_method="ties", model_parameters=[{"density": 1.5}, {}])
    with pytest.raises(ValidationError, match=r"lambda\n.*less than or equal to 100"):
        MergeRequest(**request, merge_method="ties", **{"lambda": 1000})
    report = MergeRequest(**request, merge_method="breadcrumbs", model_parameters=[{}, {"gamma": 0.1}]).merge_params()
    assert report["model_parameters"][1] == {"weight": 1.0, "gamma": 0.1}  # what is set
