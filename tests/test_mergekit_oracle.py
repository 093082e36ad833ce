"""mergekit's methods against mergekit (the oracle, tests/helpers/mergekit.py) on tiny random Qwen2- and
Llama-shaped models: bf16 and fp32 checkpoints, 2 and 4 fine-tunes, tied embeddings, sharded inputs; both kernel
sets, with every tensor split into several ranges; compute in bfloat16, float16 and float32.

The issue's tolerance is >= 99.99% of elements bit-identical and none more than one ulp of the output dtype off;
`assert_agrees` asserts that, and each test then asserts what is reached: every element identical (+0 == -0).

The request side: a flat request (merge_method linear, model_parameters with one weight per model, normalize)
against the mergekit config a mergekit user writes for the same merge.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modelmerge_engine.engine import RANGE_ELEMENTS_ENV
from modelmerge_engine.kernels import KERNEL_SET_NAMES, KERNELS_ENV
from tests.helpers.mergekit import memoized_merges
from tests.helpers.models import read_state_dict
from tests.helpers.oracle import FAMILIES, compare, engine_merge, make_families

WEIGHTS = [0.3, 0.7, -0.2, 1.3]  # uneven, one negative: a weight that is ignored or misplaced shows
DTYPES = ("bfloat16", "float16", "float32")


@pytest.fixture(scope="module")
def mergekit(tmp_path_factory):
    """mergekit's output for a config, computed once per module (in the session's one mergekit process)."""
    return memoized_merges(tmp_path_factory.mktemp("mergekit"))


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, tuple[Path, list[Path]]]:
    return make_families(tmp_path_factory.mktemp("families"))


def assert_agrees(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], *, tied: bool) -> dict:
    """The issue's tolerance, then what is reached: every element of every tensor identical (+0 == -0).
    A tied head is not stored by the engine (as merging-eval's models); mergekit stores one equal to the
    embeddings."""
    if tied and "lm_head.weight" in theirs:
        assert torch.equal(theirs.pop("lm_head.weight"), theirs["model.embed_tokens.weight"])
    result = compare(ours, theirs)
    assert result["elements"] > 0
    assert result["equal_fraction"] >= 0.9999 and result["max_ulps"] <= 1, result
    assert result["equal_fraction"] == 1.0 and not result["differing_tensors"], result
    return result


def linear_fields(count: int, *, normalize: bool) -> dict:
    return {"merge_method": "linear", "normalize": normalize,
            "model_parameters": [{"weight": weight} for weight in WEIGHTS[:count]]}


def linear_config(finetunes: list[Path], *, normalize: bool, dtype: str) -> dict:
    return {"merge_method": "linear", "dtype": dtype, "parameters": {"normalize": normalize},
            "models": [{"model": str(path), "parameters": {"weight": weight}}
                       for path, weight in zip(finetunes, WEIGHTS, strict=False)]}


@pytest.mark.parametrize("normalize", [True, False], ids=["normalize", "sum"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_linear_matches_mergekit(families, mergekit, tmp_path, family, normalize):
    base, finetunes = families[family]
    ours = engine_merge(base, finetunes, tmp_path / "ours", **linear_fields(len(finetunes), normalize=normalize))
    theirs = mergekit(linear_config(finetunes, normalize=normalize, dtype="bfloat16"))
    assert_agrees(ours, theirs, tied=FAMILIES[family].get("tie", False))


@pytest.mark.parametrize("range_elements", [1000, 37])
@pytest.mark.parametrize("kernels", KERNEL_SET_NAMES)
def test_linear_split_ranges_and_both_kernel_sets_match_mergekit(families, mergekit, tmp_path, monkeypatch, kernels,
                                                                  range_elements):
    monkeypatch.setenv(KERNELS_ENV, kernels)
    monkeypatch.setenv(RANGE_ELEMENTS_ENV, str(range_elements))
    base, finetunes = families["llama-bf16-4-sharded"]
    ours = engine_merge(base, finetunes, tmp_path / "ours", max_shard_size="40KB",
                  **linear_fields(len(finetunes), normalize=True))
    assert_agrees(ours, mergekit(linear_config(finetunes, normalize=True, dtype="bfloat16")), tied=False)


@pytest.mark.parametrize("kernels", KERNEL_SET_NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_in_every_compute_dtype_matches_mergekit(families, mergekit, tmp_path, monkeypatch, dtype, kernels):
    monkeypatch.setenv(KERNELS_ENV, kernels)
    base, finetunes = families["qwen2-fp32-4-tied"]
    ours = engine_merge(base, finetunes, tmp_path / "ours", dtype=dtype,
                        **linear_fields(len(finetunes), normalize=True))
    assert_agrees(ours, mergekit(linear_config(finetunes, normalize=True, dtype=dtype)), tied=True)


def test_linear_without_model_parameters_weighs_every_model_one(families, mergekit, tmp_path):
    """Unset model_parameters: weight 1.0 each (mergekit requires a weight; 1.0 each is its plain mean)."""
    base, finetunes = families["qwen2-bf16-2"]
    ours = engine_merge(base, finetunes, tmp_path / "ours", merge_method="linear")
    config = {"merge_method": "linear", "dtype": "bfloat16",
              "models": [{"model": str(path), "parameters": {"weight": 1.0}} for path in finetunes]}
    assert_agrees(ours, mergekit(config), tied=False)


def test_linear_excluded_tensors_are_the_base(families, tmp_path):
    base, finetunes = families["qwen2-bf16-2"]
    ours = engine_merge(base, finetunes, tmp_path / "ours", exclude_param_names_regex=[r".*norm.*"],
                  **linear_fields(2, normalize=True))
    base_tensors = read_state_dict(base)
    norms = [name for name in ours if "norm" in name]
    assert norms and all(torch.equal(ours[name], base_tensors[name]) for name in norms)


def test_one_differing_element_fails_the_comparison(families, mergekit, tmp_path):
    base, finetunes = families["qwen2-bf16-2"]
    ours = engine_merge(base, finetunes, tmp_path / "ours", **linear_fields(2, normalize=True))
    theirs = mergekit(linear_config(finetunes, normalize=True, dtype="bfloat16"))
    ours["model.layers.0.mlp.up_proj.weight"].view(torch.int16).view(-1)[3] += 1
    with pytest.raises(AssertionError, match="model.layers.0.mlp.up_proj.weight"):
        assert_agrees(ours, theirs, tied=False)
