"""mergekit's slerp family and the other methods of brief M2 against mergekit 0.1.5 (the oracle,
tests/helpers/mergekit.py) on the tiny random Qwen2- and Llama-shaped families of tests/helpers/oracle.py: bf16 and
fp32 checkpoints, tied embeddings, sharded inputs; both kernel sets with every tensor split into several ranges;
compute in bfloat16, float16 and float32.

Whole-tensor statistics are reduced in torch's CPU order (methods/torch_reductions.py, checked here against torch
itself), so they are mergekit's to the bit on tensors of up to 32768 elements (all of these models'), and the angle
functions of those scalars are torch's (torch_reductions.scalar_function: SLEEF's as torch's kernels take them for
bfloat16 and float16, reproduced without torch by methods/sleef.py; torch's own, MKL's, for float32), so every
element is identical to mergekit's in every compute dtype. Without torch (the CPU merge image) float32 scalars are
SLEEF's, which differ from MKL's in the last bit for a few percent of arguments.

nuslerp and multislerp also run from a mergekit config without base_model (mergekit's base is optional for them):
the models' weights interpolated themselves, nothing added back, every bit (the sign of zero too) mergekit's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from modelmerge.contract import MergeRequest
from modelmerge_engine.engine import RANGE_ELEMENTS_ENV
from modelmerge_engine.kernels import KERNEL_SET_NAMES, KERNELS_ENV
from modelmerge_engine.methods.torch_reductions import (
    column_norm_add,
    column_norm_finish,
    column_sum_begin,
    column_sum_finish,
    column_sum_rows,
    row_norm,
    row_sum,
)
from tests import test_mergekit_oracle
from tests.helpers.mergekit import assert_agrees_with_mergekit
from tests.helpers.oracle import FAMILIES, assert_identical, compare, engine_merge, read_state_dict
from tests.test_images import merge_without_torch

DTYPES = ("bfloat16", "float16", "float32")
# the oracle tests' fixtures: the tiny families, and mergekit's output per config (once per module)
families, mergekit = test_mergekit_oracle.families, test_mergekit_oracle.mergekit


def slerp_config(base: Path, model: Path, *, t: float, dtype: str) -> dict:
    return {"merge_method": "slerp", "base_model": str(base), "dtype": dtype, "parameters": {"t": t},
            "models": [{"model": str(base)}, {"model": str(model)}]}


@pytest.mark.parametrize("t", [0.3, 1.5], ids=["t0.3", "extrapolated"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_slerp_matches_mergekit(families, mergekit, tmp_path, family, t):
    base, finetunes = families[family]
    ours = engine_merge(base, finetunes[:1], tmp_path / "ours", merge_method="slerp", t=t)
    theirs = mergekit(slerp_config(base, finetunes[0], t=t, dtype="bfloat16"))
    assert_agrees_with_mergekit(ours, theirs)


@pytest.mark.parametrize("range_elements", [1000, 37])
@pytest.mark.parametrize("kernels", KERNEL_SET_NAMES)
def test_slerp_split_ranges_and_both_kernel_sets_match_mergekit(families, mergekit, tmp_path, monkeypatch, kernels,
                                                                 range_elements):
    monkeypatch.setenv(KERNELS_ENV, kernels)
    monkeypatch.setenv(RANGE_ELEMENTS_ENV, str(range_elements))
    base, finetunes = families["llama-bf16-4-sharded"]
    ours = engine_merge(base, finetunes[1:2], tmp_path / "ours", max_shard_size="40KB", merge_method="slerp", t=0.6)
    theirs = mergekit(slerp_config(base, finetunes[1], t=0.6, dtype="bfloat16"))
    assert_agrees_with_mergekit(ours, theirs)


@pytest.mark.parametrize("kernels", KERNEL_SET_NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_slerp_in_every_compute_dtype_matches_mergekit(families, mergekit, tmp_path, monkeypatch, dtype, kernels):
    monkeypatch.setenv(KERNELS_ENV, kernels)
    base, finetunes = families["qwen2-fp32-4-tied"]
    ours = engine_merge(base, finetunes[:1], tmp_path / "ours", dtype=dtype, merge_method="slerp", t=0.3)
    theirs = mergekit(slerp_config(base, finetunes[0], t=0.3, dtype=dtype))
    assert_agrees_with_mergekit(ours, theirs)


def test_slerp_of_parallel_endpoints_is_lerp_as_in_mergekit(families, mergekit, tmp_path):
    """A model equal to the base: |dot| = 1 > 0.9995, so mergekit falls back to (1 - t) · base + t · model."""
    base, _ = families["qwen2-bf16-2"]
    same = tmp_path / "same"
    shutil.copytree(base, same)
    ours = engine_merge(base, [same], tmp_path / "ours", merge_method="slerp", t=0.25)
    assert_agrees_with_mergekit(ours, mergekit(slerp_config(base, same, t=0.25, dtype="bfloat16")))


def test_both_kernel_sets_give_the_same_bytes(families, tmp_path, monkeypatch):
    base, finetunes = families["llama-fp32-2"]
    results = []
    for kernels in KERNEL_SET_NAMES:
        monkeypatch.setenv(KERNELS_ENV, kernels)
        results.append(engine_merge(base, finetunes[:1], tmp_path / kernels, merge_method="slerp", t=0.7,
                                    dtype="float32"))
    assert compare(*results)["equal_fraction"] == 1.0


@pytest.mark.parametrize(("fields", "message"), [
    ({"models_to_merge": ["a", "b"], "t": 0.5},
     "models_to_merge: slerp takes exactly 1 model(s) besides base_model (the base model is the other endpoint): "
     "got 2"),
    ({"models_to_merge": ["a"]}, "t is required for slerp"),
    ({"models_to_merge": ["a"], "t": float("nan")}, "t"),
])
def test_slerp_requests_are_validated_naming_the_field(fields, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MergeRequest(base_model="base", merge_method="slerp", **fields)


SIZES = [*range(1, 140), 255, 256, 257, 1000, 4095, 4096, 16384, 16385, 30000, 32768, 100_000, 1 << 20, 3 << 20]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_statistics_are_reduced_in_torchs_order(dtype):
    """row_sum and row_norm equal torch's sum and 2-norm of a row bit for bit (16-bit rows: once rounded to their
    dtype, as torch stores them), for every size up to a few vector rows, around the cascade's blocks and beyond
    (torch on one thread: with more it splits sums of over 32768 elements between them). torch's float16 2-norm
    takes its generic reduction, which agrees up to 100000 elements and not on the largest rows here. Rows in a
    strided view take the scalar loops instead of the vectorised ones (torch_reductions._unit_stride): the same
    bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = torch.Generator().manual_seed(0)
        for size in SIZES if dtype != torch.float16 else [size for size in SIZES if size <= 100_000]:
            values = (torch.randn(1, size, generator=generator) * 0.05).to(dtype)
            flat = values.to(torch.float32).numpy().reshape(-1)
            packed = dtype != torch.float32
            ours = torch.tensor([row_sum(flat, packed), row_norm(flat, packed)]).to(dtype)
            theirs = torch.cat([values.sum(dim=1), torch.linalg.vector_norm(values, dim=1)])
            assert torch.equal(ours, theirs), (size, ours, theirs)
            if size <= 100_000:  # the same values in a strided view: the scalar loops, not the LLVM vectors
                spread = np.zeros(2 * size, np.float32)
                spread[::2] = flat
                scalar = torch.tensor([row_sum(spread[::2], packed), row_norm(spread[::2], packed)]).to(dtype)
                assert torch.equal(scalar, theirs), (size, scalar, theirs)
    finally:
        torch.set_num_threads(threads)


# --- model_stock ------------------------------------------------------------------------------------------------


def model_stock_config(base: Path, finetunes: list[Path], *, filter_wise: bool, dtype: str) -> dict:
    return {"merge_method": "model_stock", "base_model": str(base), "dtype": dtype,
            "parameters": {"filter_wise": filter_wise},
            "models": [{"model": str(base)}, *({"model": str(path)} for path in finetunes)]}


@pytest.mark.parametrize("filter_wise", [False, True], ids=["whole", "filter_wise"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_model_stock_matches_mergekit(families, mergekit, tmp_path, family, filter_wise):
    base, finetunes = families[family]
    ours = engine_merge(base, finetunes, tmp_path / "ours", merge_method="model_stock", filter_wise=filter_wise)
    theirs = mergekit(model_stock_config(base, finetunes, filter_wise=filter_wise, dtype="bfloat16"))
    assert_agrees_with_mergekit(ours, theirs)


@pytest.mark.parametrize("filter_wise", [False, True], ids=["whole", "filter_wise"])
@pytest.mark.parametrize("kernels", KERNEL_SET_NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_model_stock_in_every_compute_dtype_split_ranges_and_both_kernel_sets_match_mergekit(
        families, mergekit, tmp_path, monkeypatch, dtype, kernels, filter_wise):
    monkeypatch.setenv(KERNELS_ENV, kernels)
    monkeypatch.setenv(RANGE_ELEMENTS_ENV, "37")
    base, finetunes = families["qwen2-fp32-4-tied"]
    ours = engine_merge(base, finetunes[:3], tmp_path / "ours", dtype=dtype, merge_method="model_stock",
                        filter_wise=filter_wise)
    theirs = mergekit(model_stock_config(base, finetunes[:3], filter_wise=filter_wise, dtype=dtype))
    assert_agrees_with_mergekit(ours, theirs)


def test_model_stock_streams_rows_longer_than_a_segment(families, tmp_path, monkeypatch):
    """A row longer than a statistics segment is reduced segment by segment with the same result."""
    from modelmerge_engine.methods import model_stock

    base, finetunes = families["llama-bf16-4-sharded"]
    whole = engine_merge(base, finetunes, tmp_path / "whole", merge_method="model_stock")
    monkeypatch.setattr(model_stock, "SEGMENT", 64)
    streamed = engine_merge(base, finetunes, tmp_path / "streamed", merge_method="model_stock")
    assert compare(whole, streamed)["equal_fraction"] == 1.0


def test_model_stock_needs_two_models():
    with pytest.raises(ValidationError, match="models_to_merge: model_stock takes at least 2 model"):
        MergeRequest(base_model="base", merge_method="model_stock", models_to_merge=["a"])


# --- nearswap ---------------------------------------------------------------------------------------------------


def nearswap_config(base: Path, model: Path, *, t: float, dtype: str) -> dict:
    return {"merge_method": "nearswap", "base_model": str(base), "dtype": dtype, "parameters": {"t": t},
            "models": [{"model": str(base)}, {"model": str(model)}]}


@pytest.mark.parametrize("t", [0.001, 0.01])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_nearswap_matches_mergekit(families, mergekit, tmp_path, family, t):
    base, finetunes = families[family]
    ours = engine_merge(base, finetunes[:1], tmp_path / "ours", merge_method="nearswap", t=t)
    theirs = mergekit(nearswap_config(base, finetunes[0], t=t, dtype="bfloat16"))
    assert_agrees_with_mergekit(ours, theirs)


@pytest.mark.parametrize("kernels", KERNEL_SET_NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nearswap_in_every_compute_dtype_split_ranges_and_both_kernel_sets_match_mergekit(
        families, mergekit, tmp_path, monkeypatch, dtype, kernels):
    monkeypatch.setenv(KERNELS_ENV, kernels)
    monkeypatch.setenv(RANGE_ELEMENTS_ENV, "37")
    base, finetunes = families["qwen2-fp32-4-tied"]
    ours = engine_merge(base, finetunes[2:3], tmp_path / "ours", dtype=dtype, merge_method="nearswap", t=0.004)
    assert_agrees_with_mergekit(ours, mergekit(nearswap_config(base, finetunes[2], t=0.004, dtype=dtype)))


@pytest.mark.parametrize(("fields", "message"), [
    ({"models_to_merge": ["a", "b"], "t": 0.5}, "models_to_merge: nearswap takes exactly 1 model"),
    ({"models_to_merge": ["a"]}, "t is required for nearswap"),
])
def test_nearswap_requests_are_validated_naming_the_field(fields, message):
    with pytest.raises(ValidationError, match=message):
        MergeRequest(base_model="base", merge_method="nearswap", **fields)


# --- nuslerp ----------------------------------------------------------------------------------------------------

NUSLERP_WEIGHTS = [0.3, 0.9]
NUSLERP_PARAMETERS = [{"weight": weight} for weight in NUSLERP_WEIGHTS]


def nuslerp_config(base: Path, finetunes: list[Path], *, flatten: bool, dtype: str, row_wise: bool = False) -> dict:
    return {"merge_method": "nuslerp", "base_model": str(base), "dtype": dtype,
            "parameters": {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise},
            "models": [{"model": str(path), "parameters": {"weight": weight}}
                       for path, weight in zip(finetunes, NUSLERP_WEIGHTS, strict=True)]}


def nuslerp_fields(*, flatten: bool, row_wise: bool = False) -> dict:
    return {"merge_method": "nuslerp", "nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise,
            "model_parameters": NUSLERP_PARAMETERS}


@pytest.mark.parametrize("flatten", [True, False], ids=["flatten", "rows"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_nuslerp_matches_mergekit(families, mergekit, tmp_path, family, flatten):
    base, finetunes = families[family]
    ours = engine_merge(base, finetunes[:2], tmp_path / "ours", **nuslerp_fields(flatten=flatten))
    theirs = mergekit(nuslerp_config(base, finetunes[:2], flatten=flatten, dtype="bfloat16"))
    assert_agrees_with_mergekit(ours, theirs)


@pytest.mark.parametrize("kernels", KERNEL_SET_NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nuslerp_in_every_compute_dtype_split_ranges_and_both_kernel_sets_match_mergekit(
        families, mergekit, tmp_path, monkeypatch, dtype, kernels):
    monkeypatch.setenv(KERNELS_ENV, kernels)
    monkeypatch.setenv(RANGE_ELEMENTS_ENV, "37")
    base, finetunes = families["qwen2-fp32-4-tied"]
    ours = engine_merge(base, finetunes[1:3], tmp_path / "ours", dtype=dtype, **nuslerp_fields(flatten=False))
    theirs = mergekit(nuslerp_config(base, finetunes[1:3], flatten=False, dtype=dtype))
    assert_agrees_with_mergekit(ours, theirs)


def test_nuslerp_in_float32_matches_mergekit(families, mergekit, tmp_path):
    base, finetunes = families["llama-fp32-2"]
    ours = engine_merge(base, finetunes, tmp_path / "ours", dtype="float32", **nuslerp_fields(flatten=True))
    theirs = mergekit(nuslerp_config(base, finetunes, flatten=True, dtype="float32"))
    assert_agrees_with_mergekit(ours, theirs)


@pytest.mark.parametrize(("family", "dtype", "kernels"), [
    ("llama-bf16-4-sharded", "bfloat16", "compiled"), ("llama-bf16-4-sharded", "float32", "torch"),
    ("qwen2-fp32-4-tied", "bfloat16", "torch"), ("qwen2-fp32-4-tied", "float32", "compiled")])
def test_nuslerp_row_wise_split_ranges_and_both_kernel_sets_match_mergekit(
        families, mergekit, tmp_path, monkeypatch, family, dtype, kernels):
    """nuslerp_row_wise: each column interpolated, its norms and dot reduced along the strided first dimension
    in torch's order: every element mergekit's."""
    monkeypatch.setenv(KERNELS_ENV, kernels)
    monkeypatch.setenv(RANGE_ELEMENTS_ENV, "37")
    base, finetunes = families[family]
    ours = engine_merge(base, finetunes[:2], tmp_path / "ours", dtype=dtype,
                        **nuslerp_fields(flatten=False, row_wise=True))
    theirs = mergekit(nuslerp_config(base, finetunes[:2], flatten=False, row_wise=True, dtype=dtype))
    assert_agrees_with_mergekit(ours, theirs)


COLUMN_SHAPES = [(1, 1), (1, 5), (5, 1), (3, 7), (7, 15), (9, 16), (17, 9), (16, 32), (64, 33), (100, 40),
                 (130, 70), (257, 64), (33, 100), (600, 37), (4097, 3), (70, 700)]


def test_column_statistics_are_reduced_in_torchs_order():
    """column_sum_* and column_norm_* (rows fed a few at a time) equal torch's sum and 2-norm along the strided
    last dimension of a transposed matrix (as mergekit's nuslerp_row_wise reduces) bit for bit, in every dtype,
    on each side of the column groups torch's outer reduction treats differently (torch on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = torch.Generator().manual_seed(0)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for rows, columns in COLUMN_SHAPES:
                values = (torch.randn(rows, columns, generator=generator) * 0.05).to(dtype)
                flat = values.to(torch.float32).numpy()
                acc, tail, state = column_sum_begin(rows, columns, dtype != torch.float32)
                squares = np.zeros(columns, np.float32)
                for first in range(0, rows, 7):
                    column_sum_rows(flat[first:first + 7], acc, tail, state)
                    column_norm_add(flat[first:first + 7], squares)
                ours = torch.from_numpy(np.concatenate([column_sum_finish(acc, tail, state),
                                                        column_norm_finish(squares)])).to(dtype)
                transposed = values.transpose(0, -1)
                theirs = torch.cat([transposed.sum(dim=-1), torch.norm(transposed, dim=-1)])
                assert torch.equal(ours, theirs), (dtype, rows, columns)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(("fields", "message"), [
    ({"models_to_merge": ["a", "b", "c"]}, "models_to_merge: nuslerp takes exactly 2 model"),
])
def test_nuslerp_requests_are_validated_naming_the_field(fields, message):
    with pytest.raises(ValidationError, match=message):
        MergeRequest(base_model="base", merge_method="nuslerp", **fields)


def test_nuslerp_row_wise_without_torch_agrees_with_the_torch_path(families, tmp_path):
    """Where torch is not installed (the CPU merge image) the column statistics are the same kernels, and acos and
    sin are SLEEF's (methods/sleef.py): torch's own for bfloat16, so bfloat16 merges are identical to the path with
    torch; torch's float32 ones are MKL's, from which SLEEF's differ in the last bit for a few percent of arguments,
    so float32 merges are within 2e-7 of each tensor's largest magnitude (where a coefficient's last bit
    differs)."""
    base, finetunes = families["qwen2-fp32-4-tied"]
    for dtype in ("bfloat16", "float32"):
        out = tmp_path / dtype
        with_torch = engine_merge(base, finetunes[:2], out / "torch", dtype=dtype,
                                  **nuslerp_fields(flatten=False, row_wise=True))
        result = merge_without_torch("--base-model", str(base), "--models-to-merge",
                                     ",".join(str(path) for path in finetunes[:2]), "--merge-method", "nuslerp",
                                     "--dtype", dtype, "--no-nuslerp-flatten", "--nuslerp-row-wise",
                                     "--model-parameters", json.dumps(NUSLERP_PARAMETERS),
                                     "--output-dir", str(out / "no-torch"))
        assert result.returncode == 0, result.stderr
        without_torch = read_state_dict(out / "no-torch")
        if dtype == "bfloat16":
            assert_identical(without_torch, with_torch)
        else:  # measured: within 7.9e-8 of each tensor's largest magnitude
            assert without_torch.keys() == with_torch.keys()
            for name, tensor in with_torch.items():
                assert (without_torch[name] - tensor).abs().max() <= 2e-7 * tensor.abs().max(), name


# --- nuslerp and multislerp without a base model (a mergekit config without base_model) ----------------------


def config_merge(config: dict, out: Path) -> dict[str, torch.Tensor]:
    """The engine's merge of a mergekit config as it is (base_model, models_to_merge and merge_method from it)."""
    from modelmerge_engine.run import run_merge

    request = MergeRequest.model_validate({"config": config, "output_dir": str(out)})
    assert run_merge(request, progress="none") == 0
    return read_state_dict(out)


def assert_same_bits(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    """mergekit's output to the bit (the sign of zero too), then the shared bar."""
    assert_agrees_with_mergekit(ours, theirs)
    for name, tensor in ours.items():
        view = {2: torch.int16, 4: torch.int32}[tensor.element_size()]
        assert torch.equal(tensor.view(view), theirs[name].view(view)), name


def no_base_config(method: str, models: list[Path], weights: list[float], *, dtype: str, **parameters) -> dict:
    return {"merge_method": method, "dtype": dtype, "parameters": parameters,
            "models": [{"model": str(path), "parameters": {"weight": weight}}
                       for path, weight in zip(models, weights, strict=True)]}


@pytest.mark.parametrize("kernels", KERNEL_SET_NAMES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("shape", ["flatten", "rows", "row_wise"])
def test_nuslerp_without_a_base_model_matches_mergekit(families, mergekit, tmp_path, monkeypatch, shape, dtype,
                                                       kernels):
    """No base_model: mergekit interpolates the two models' weights themselves and adds nothing; the first model
    gives the config, tokenizer and unmerged tensors."""
    monkeypatch.setenv(KERNELS_ENV, kernels)
    monkeypatch.setenv(RANGE_ELEMENTS_ENV, "37")
    base, finetunes = families["qwen2-fp32-4-tied"]
    config = no_base_config("nuslerp", [finetunes[1], base], NUSLERP_WEIGHTS, dtype=dtype,
                            nuslerp_flatten=shape == "flatten", nuslerp_row_wise=shape == "row_wise")
    request = MergeRequest.model_validate({"config": config})
    assert request.base_model == str(finetunes[1])
    assert request.models_to_merge == [str(finetunes[1]), str(base)]
    assert_same_bits(config_merge(config, tmp_path / "ours"), mergekit(config))


@pytest.mark.parametrize("kernels", KERNEL_SET_NAMES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("count", [2, 3])
def test_multislerp_without_a_base_model_matches_mergekit(families, mergekit, tmp_path, monkeypatch, count, dtype,
                                                          kernels):
    monkeypatch.setenv(KERNELS_ENV, kernels)
    monkeypatch.setenv(RANGE_ELEMENTS_ENV, "37")
    base, finetunes = families["llama-bf16-4-sharded"]
    models = [finetunes[2], base, finetunes[0]][:count]
    config = no_base_config("multislerp", models, [1.0, 2.0, 3.0][:count], dtype=dtype)
    assert MergeRequest.model_validate({"config": config}).models_to_merge == [str(path) for path in models]
    assert_same_bits(config_merge(config, tmp_path / "ours"), mergekit(config))


def test_multislerp_without_a_base_model_streams_with_the_same_bytes(families, tmp_path, monkeypatch):
    from modelmerge_engine.methods import multislerp

    base, finetunes = families["qwen2-bf16-2"]
    config = no_base_config("multislerp", [finetunes[0], finetunes[1], base], [0.3, 0.6, 0.1], dtype="float32")
    whole = config_merge(config, tmp_path / "whole")
    monkeypatch.setattr(multislerp, "SEGMENT", 64)
    assert_identical(config_merge(config, tmp_path / "streamed"), whole)


@pytest.mark.parametrize(("data", "message"), [
    ({"base_model": "base", "merge_method": "nuslerp", "models_to_merge": ["a"]},
     r"models_to_merge: nuslerp takes exactly 2 model\(s\) besides base_model"),
    ({"merge_method": "nuslerp", "models_to_merge": ["a", "b"]}, "base_model\n  Field required"),
    ({"config": {"merge_method": "nuslerp", "models": [{"model": "a"}, {"model": "b"}, {"model": "c"}]}},
     r"models: merge_method nuslerp takes exactly 2 model\(s\) \(without base_model every model is one\): got 3"),
    ({"config": {"merge_method": "nuslerp", "models": [{"model": "a"}]}},
     r"models: merge_method nuslerp takes exactly 2 model\(s\) \(without base_model every model is one\): got 1"),
    ({"config": {"merge_method": "nuslerp", "base_model": "base",
                 "models": [{"model": "base"}, {"model": "a"}, {"model": "b"}, {"model": "c"}]}},
     r"models: merge_method nuslerp takes exactly 2 model\(s\) besides base_model: got 3"),
    ({"config": {"merge_method": "nuslerp", "slices": [{"sources": [
        {"model": m, "layer_range": [0, 2]} for m in ("a", "b", "c")]}]}},
     r"slices\[0\].sources: merge_method nuslerp takes exactly 2 model\(s\)"),
])
def test_base_optional_methods_are_validated_naming_the_key(data, message):
    """A flat request keeps requiring a base; a config without one takes mergekit's model counts."""
    with pytest.raises(ValidationError, match=message):
        MergeRequest.model_validate(data)


def test_a_base_optional_config_without_base_model_takes_every_model_as_an_input():
    for method in ("nuslerp", "multislerp"):
        request = MergeRequest.model_validate({"config": {"merge_method": method, "models": [
            {"model": "a"}, {"model": "b"}]}})
        assert (request.base_model, request.models_to_merge) == ("a", ["a", "b"])
        with_base = MergeRequest.model_validate({"config": {"merge_method": method, "base_model": "a", "models": [
            {"model": "a"}, {"model": "b"}, {"model": "c"}]}})
        assert (with_base.base_model, with_base.models_to_merge) == ("a", ["b", "c"])


@pytest.mark.parametrize("method", ["nuslerp", "multislerp"])
def test_base_optional_slices_without_a_base_model_match_mergekit(families, mergekit, tmp_path, method):
    """A slices config without base_model: each slice's sources are the inputs, the first source the donor."""
    base, finetunes = families["llama-bf16-4-sharded"]
    models = [finetunes[3], finetunes[1]]
    config = {"merge_method": method, "dtype": "bfloat16", "slices": [
        {"sources": [{"model": str(path), "layer_range": [0, 2], "parameters": {"weight": weight}}
                     for path, weight in zip(models, NUSLERP_WEIGHTS, strict=True)]}]}
    assert_same_bits(config_merge(config, tmp_path / "ours"), mergekit(config))


def with_signed_zeros(model: Path, out: Path, signs: list[float]) -> Path:
    """A copy of `model` whose first tensor's first elements are zeros of the given signs (±0.0)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, out)
    weights = load_file(out / "model.safetensors")
    name = sorted(weights)[0]
    flat = weights[name].reshape(-1)
    flat[:len(signs)] = torch.tensor(signs, dtype=flat.dtype)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize(("method", "dtype", "kernels"), [
    ("nuslerp", "bfloat16", "compiled"), ("nuslerp", "float32", "torch"),
    ("multislerp", "float32", "compiled"), ("multislerp", "bfloat16", "torch")])
def test_base_optional_merges_without_a_base_model_keep_the_sign_of_zero(families, mergekit, tmp_path, monkeypatch,
                                                                          method, dtype, kernels):
    """Nothing is added back without a base, not even 0: −0 where mergekit writes −0."""
    monkeypatch.setenv(KERNELS_ENV, kernels)
    base, finetunes = families["qwen2-bf16-2"]
    models = [with_signed_zeros(finetunes[0], tmp_path / "a", [-0.0, -0.0, 0.0, -0.0, 0.0, 0.0]),
              with_signed_zeros(finetunes[1], tmp_path / "b", [-0.0, 0.0, -0.0, -0.0, 0.0, 0.0])]
    config = no_base_config(method, models, NUSLERP_WEIGHTS, dtype=dtype)
    theirs = mergekit(config)
    ours = config_merge(config, tmp_path / "ours")
    if method == "nuslerp":  # (multislerp's weighted sums start at +0, in mergekit's torch as here)
        assert sum(int(((t == 0) & torch.signbit(t)).sum()) for t in theirs.values()) == 2
    assert_same_bits(ours, theirs)
