"""mergekit's sce (brief M4) against mergekit 0.1.5 (the oracle, tests/helpers/mergekit.py) on the tiny random
Qwen2- and Llama-shaped families of tests/helpers/oracle.py: bf16 and fp32 checkpoints, tied embeddings, sharded
inputs, 2 and 4 fine-tunes; both kernel sets with every tensor split into several ranges; compute in bfloat16,
float16 and float32. The variances, torch's top-k selection (ties at the boundary included) and the weights'
sums are reproduced, so every element is mergekit's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from modelmerge.contract import MergeRequest
from modelmerge_engine.engine import RANGE_ELEMENTS_ENV
from modelmerge_engine.kernels import KERNEL_SET_NAMES, KERNELS_ENV
from modelmerge_engine.methods.sce_kernels import top_k
from tests import test_mergekit_oracle
from tests.helpers.mergekit import assert_agrees_with_mergekit
from tests.helpers.oracle import FAMILIES, compare, engine_merge

DTYPES = ("bfloat16", "float16", "float32")
families, mergekit = test_mergekit_oracle.families, test_mergekit_oracle.mergekit


def sce_config(base: Path, finetunes: list[Path], *, select_topk: float, dtype: str) -> dict:
    return {"merge_method": "sce", "base_model": str(base), "dtype": dtype,
            "parameters": {"select_topk": select_topk},
            "models": [{"model": str(base)}, *({"model": str(path)} for path in finetunes)]}


@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.01, 0.0])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sce_matches_mergekit(families, mergekit, tmp_path, family, select_topk):
    base, finetunes = families[family]
    ours = engine_merge(base, finetunes, tmp_path / "ours", merge_method="sce", select_topk=select_topk)
    theirs = mergekit(sce_config(base, finetunes, select_topk=select_topk, dtype="bfloat16"))
    assert_agrees_with_mergekit(ours, theirs)


@pytest.mark.parametrize("kernels", KERNEL_SET_NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sce_in_every_compute_dtype_split_ranges_and_both_kernel_sets_match_mergekit(
        families, mergekit, tmp_path, monkeypatch, dtype, kernels):
    monkeypatch.setenv(KERNELS_ENV, kernels)
    monkeypatch.setenv(RANGE_ELEMENTS_ENV, "37")
    base, finetunes = families["qwen2-fp32-4-tied"]
    ours = engine_merge(base, finetunes[:3], tmp_path / "ours", dtype=dtype, merge_method="sce", select_topk=0.3)
    theirs = mergekit(sce_config(base, finetunes[:3], select_topk=0.3, dtype=dtype))
    assert_agrees_with_mergekit(ours, theirs)


def test_sce_streams_tensors_longer_than_a_segment(families, tmp_path, monkeypatch):
    """Statistics reduced segment by segment give the same merge."""
    from modelmerge_engine.methods import sce

    base, finetunes = families["llama-bf16-4-sharded"]
    whole = engine_merge(base, finetunes, tmp_path / "whole", merge_method="sce", select_topk=0.4)
    monkeypatch.setattr(sce, "SEGMENT", 64)
    streamed = engine_merge(base, finetunes, tmp_path / "streamed", merge_method="sce", select_topk=0.4)
    assert compare(whole, streamed)["equal_fraction"] == 1.0


@pytest.mark.parametrize("size", [5, 17, 100, 1000, 5000])
@pytest.mark.parametrize("fraction", [0.01, 0.3, 0.9])
def test_top_k_picks_torchs_indices_among_ties(size, fraction):
    """Many equal keys (bfloat16 variances): the positions [0, k) hold torch.topk's indices, ties at the boundary
    included, through both of its algorithms (partial_sort for small k, nth_element otherwise)."""
    generator = torch.Generator().manual_seed(size)
    keys = torch.randint(0, 7, (size,), generator=generator).to(torch.float32)
    k = max(1, int(size * fraction))
    order = np.full(size, -1, np.int32)
    top_k(keys.numpy().copy(), order, k)
    assert sorted(order[:k]) == sorted(torch.topk(keys, k, largest=True).indices.tolist())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("fraction", [0.003, 0.3, 0.9])
def test_each_ranges_keep_flags_are_torchs_top_k_of_the_variances(dtype, fraction):
    """The selection sce keeps instead of per-element flags (window_selection of the top-k's positions) gives, range
    by range from the inputs' values, exactly the elements torch.topk picks from torch.var of the task vectors:
    every tie at the boundary (small integer values: few distinct variances) decided as torch decides it."""
    from modelmerge_engine.dtype_codes import BF16, F16, F32
    from modelmerge_engine.methods.gta_kernels import window_selection
    from modelmerge_engine.methods.sce_kernels import selection_mask, variances
    from modelmerge_engine.methods.torch_reductions import task_vectors

    size, code = 5003, {torch.bfloat16: BF16, torch.float16: F16, torch.float32: F32}[dtype]
    generator = torch.Generator().manual_seed(7)
    base, *models = (torch.randint(-4, 5, (size,), generator=generator).to(dtype) for _ in range(4))
    wide = [tensor.to(torch.float32).numpy() for tensor in (base, *models)]
    stored = base.view(torch.int16).numpy().view(np.uint16) if dtype != torch.float32 else wide[0]
    raws = [model.view(torch.int16).numpy().view(np.uint16) if dtype != torch.float32 else model.numpy()
            for model in models]
    vectors = np.empty((len(models), size), np.float32)
    task_vectors(code, stored, tuple(raws), vectors)  # the inputs as stored, as sce's statistics read them
    keys = np.empty(size, np.float32)
    variances(vectors, code, keys)
    expected_keys = torch.var(torch.stack([model - base for model in models]), dim=0, unbiased=False)
    assert np.array_equal(keys, expected_keys.to(torch.float32).numpy())
    k = int(np.count_nonzero(keys) * fraction)
    expected = np.zeros(size, np.bool_)
    expected[torch.topk(expected_keys, k, largest=True).indices.numpy()] = True
    order = np.empty(size, np.int32)
    top_k(keys, order, k)
    selection = window_selection(keys.view(np.uint32), order, 0, k)
    for values in ((stored, raws), (wide[0], wide[1:])):  # bit patterns (CPU ranges), host values (GPU ranges)
        keep = np.ones(size, np.bool_)
        for start in range(0, size, 1000):
            stop = min(start + 1000, size)
            selection_mask(code, values[0][start:stop], [raw[start:stop] for raw in values[1]], start, selection,
                           keep[start:stop])
        assert (keep == expected).all()
    assert 0 < int(expected.sum()) < size


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_sce_select_topk_is_validated_naming_the_field(value):
    with pytest.raises(ValidationError, match="select_topk"):
        MergeRequest(base_model="base", models_to_merge=["a", "b"], merge_method="sce", select_topk=value)


def test_sce_progress_counts_the_selection_pass(monkeypatch, tmp_path):
    """With select_topk < 1 the variance pass is planned and reported too: the CLI's last progress line counts
    exactly the planned work."""
    from tests import test_engine_progress as progress
    from tests.helpers.models import make_family

    base, finetunes = make_family(tmp_path / "family", n=3, dtype=torch.bfloat16, **progress.SIZE)
    monkeypatch.setitem(progress.CASES, "sce-selecting", {"select_topk": 0.5})
    result = progress.merge_with_progress(base, finetunes, tmp_path / "out", "sce-selecting", "bfloat16")
    assert result.returncode == 0, result.stderr
    progress.assert_progress_of_one_merge(progress.progress_lines(result.stderr), ["merge"])


# --- multislerp -------------------------------------------------------------------------------------------------


def multislerp_config(base: Path, finetunes: list[Path], weights: list[float], *, dtype: str,
                      normalize_weights: bool = True) -> dict:
    return {"merge_method": "multislerp", "base_model": str(base), "dtype": dtype,
            "parameters": {"normalize_weights": normalize_weights},
            "models": [{"model": str(base)},
                       *({"model": str(path), "parameters": {"weight": weight}}
                         for path, weight in zip(finetunes, weights, strict=True))]}


def multislerp_merge(base, finetunes, out, weights, **fields):
    return engine_merge(base, finetunes, out, merge_method="multislerp",
                        model_parameters=[{"weight": weight} for weight in weights], **fields)


@pytest.mark.parametrize("normalize_weights", [True, False], ids=["normalized", "raw"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_multislerp_matches_mergekit(families, mergekit, tmp_path, family, normalize_weights):
    base, finetunes = families[family]
    weights = [0.7, 0.2, 0.5, 0.4][:len(finetunes)]
    ours = multislerp_merge(base, finetunes, tmp_path / "ours", weights, normalize_weights=normalize_weights)
    theirs = mergekit(multislerp_config(base, finetunes, weights, dtype="bfloat16",
                                        normalize_weights=normalize_weights))
    assert_agrees_with_mergekit(ours, theirs)


@pytest.mark.parametrize("kernels", KERNEL_SET_NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_multislerp_in_every_compute_dtype_split_ranges_and_both_kernel_sets_match_mergekit(
        families, mergekit, tmp_path, monkeypatch, dtype, kernels):
    monkeypatch.setenv(KERNELS_ENV, kernels)
    monkeypatch.setenv(RANGE_ELEMENTS_ENV, "37")
    base, finetunes = families["qwen2-fp32-4-tied"]
    ours = multislerp_merge(base, finetunes[:3], tmp_path / "ours", [1.0, 2.0, 3.0], dtype=dtype)
    theirs = mergekit(multislerp_config(base, finetunes[:3], [1.0, 2.0, 3.0], dtype=dtype))
    assert_agrees_with_mergekit(ours, theirs)


def test_multislerp_streams_and_both_kernel_sets_give_the_same_bytes(families, tmp_path, monkeypatch):
    from modelmerge_engine.methods import multislerp

    base, finetunes = families["llama-fp32-2"]
    results = []
    for kernels in KERNEL_SET_NAMES:
        monkeypatch.setenv(KERNELS_ENV, kernels)
        results.append(multislerp_merge(base, finetunes, tmp_path / kernels, [0.3, 0.6], dtype="float32"))
    monkeypatch.setattr(multislerp, "SEGMENT", 64)
    results.append(multislerp_merge(base, finetunes, tmp_path / "streamed", [0.3, 0.6], dtype="float32"))
    assert compare(results[0], results[1])["equal_fraction"] == 1.0
    assert compare(results[0], results[2])["equal_fraction"] == 1.0


def test_multislerp_of_one_model_is_that_model_as_in_mergekit(families, mergekit, tmp_path):
    base, finetunes = families["qwen2-bf16-2"]
    ours = multislerp_merge(base, finetunes[:1], tmp_path / "ours", [0.5])
    assert_agrees_with_mergekit(ours, mergekit(multislerp_config(base, finetunes[:1], [0.5], dtype="bfloat16")))


@pytest.mark.parametrize("value", [0.0, -1e-8, 1.0])
def test_multislerp_eps_is_validated_naming_the_field(value):
    with pytest.raises(ValidationError, match="eps"):
        MergeRequest(base_model="base", models_to_merge=["a", "b"], merge_method="multislerp", eps=value)
