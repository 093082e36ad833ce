"""karcher's Gram path (methods/karcher.py, tensors of more than EXACT_NUMEL values): one streaming pass for the
Gram matrix of the inputs, mergekit's iteration in float64 on it, and the mean written as one weighted sum of the
inputs. Checked against mergekit's algorithm run in float64 over the whole tensors (its own arithmetic with
float64 inputs, written out here) and rounded once, on tiny families with EXACT_NUMEL lowered so that every tensor
takes the path; the compiled and torch kernels over split ranges give the same bytes; the iteration's edge cases
(antipodal, zero and identical inputs) are mergekit's."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from modelmerge_engine.dtype_codes import BF16, F32
from modelmerge_engine.engine import RANGE_ELEMENTS_ENV
from modelmerge_engine.kernels import KERNELS_ENV
from modelmerge_engine.methods import karcher
from tests.helpers.models import make_family, read_state_dict
from tests.helpers.oracle import SIZE, assert_identical, compare, engine_merge

FAMILIES = {"llama": torch.bfloat16, "qwen2": torch.float32}  # architecture: checkpoint dtype
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, tuple[Path, list[Path]]]:
    root = tmp_path_factory.mktemp("karcher-gram-families")
    return {arch: make_family(root / arch, n=3, arch=arch, dtype=dtype, **SIZE) for arch, dtype in FAMILIES.items()}


@pytest.fixture
def gram_everywhere(monkeypatch):
    monkeypatch.setattr(karcher, "EXACT_NUMEL", 0)


def float64_karcher(tensors: list[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """mergekit's karcher_merge_tensors (0.1.5) with float64 inputs: every step in float64."""
    norms = [torch.linalg.vector_norm(x) for x in tensors]
    units = [x / n if n > 0 else torch.zeros_like(x) for x, n in zip(tensors, norms, strict=True)]
    valid = [u for u, n in zip(units, norms, strict=True) if n > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    alpha = 1.0 / len(valid)
    mean = sum(alpha * u for u in valid)
    mean_norm = torch.linalg.vector_norm(mean)
    mean = valid[0].clone() if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for unit in valid:
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if tangent_norm < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if unit_norm > tol:
            mean = mean / unit_norm
    return sum(norms) / len(tensors) * mean


def expected_merge(finetunes: list[Path], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Each tensor's float64 Karcher mean of the inputs (loaded in the compute dtype), rounded once to it."""
    models = [read_state_dict(path) for path in finetunes]
    return {name: float64_karcher([m[name].to(dtype).double() for m in models]).to(dtype) for name in models[0]}


CASES = [("llama", "bfloat16", 2), ("llama", "float32", 3), ("qwen2", "bfloat16", 3), ("qwen2", "float32", 2)]


@pytest.mark.parametrize(("family", "dtype", "inputs"), CASES, ids=[f"{f}-{d}-{n}" for f, d, n in CASES])
def test_gram_path_is_the_float64_karcher_mean_rounded_once(families, gram_everywhere, tmp_path, family, dtype,
                                                            inputs):
    """bfloat16: every element the correctly rounded mean or its neighbour (the float32 weighted sum rounds
    once more); float32: within a few ulps of the float32 sum's own rounding, relative to the tensor."""
    _, finetunes = families[family]
    ours = engine_merge(finetunes[0], finetunes[:inputs], tmp_path / "ours", merge_method="karcher", dtype=dtype)
    expected = expected_merge(finetunes[:inputs], DTYPES[dtype])
    if dtype == "bfloat16":
        result = compare(ours, expected)
        assert result["max_ulps"] <= 1 and result["equal_fraction"] >= 0.999, result
    else:
        for name, reference in expected.items():
            error = (ours[name].double() - reference.double()).abs().max()
            assert error <= 8 * 2.0**-24 * reference.double().abs().max(), name


def test_gram_path_compiled_and_torch_kernels_over_split_ranges_agree(families, gram_everywhere, tmp_path,
                                                                       monkeypatch):
    _, finetunes = families["qwen2"]
    compiled = engine_merge(finetunes[0], finetunes, tmp_path / "compiled", merge_method="karcher",
                            dtype="bfloat16")
    monkeypatch.setenv(KERNELS_ENV, "torch")
    monkeypatch.setenv(RANGE_ELEMENTS_ENV, "37")
    split = engine_merge(finetunes[0], finetunes, tmp_path / "split", merge_method="karcher", dtype="bfloat16")
    assert_identical(split, compiled)


def gram_of(vectors: np.ndarray, code: int = F32) -> np.ndarray:
    gram = np.zeros((len(vectors), len(vectors)))
    karcher._gram_add(tuple(vectors), code, gram)
    return gram


def test_gram_kernel_is_the_float64_gram_matrix_over_blocks_and_stored_16_bit_values():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(3, 3 * karcher.GRAM_BLOCK + 5)).astype(np.float32)
    exact = values.astype(np.float64) @ values.T.astype(np.float64)
    assert np.allclose(np.tril(gram_of(values)), np.tril(exact), rtol=1e-12, atol=0)
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)  # truncated to bfloat16, stored as bits
    widened = (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    assert np.allclose(np.tril(gram_of(bits, BF16)), np.tril(widened @ widened.T), rtol=1e-12, atol=0)


@pytest.mark.parametrize("count", [2, 3, 8])
def test_karcher_weights_give_the_float64_iteration(count):
    rng = np.random.default_rng(count)
    base = rng.normal(size=20000)
    vectors = np.array([base + 0.05 * (i + 1) * rng.normal(size=base.size) for i in range(count)], np.float32)
    for max_iter in (0, 1, 10):
        weights = karcher.karcher_weights(gram_of(vectors), max_iter, 1e-5)
        ours = weights.astype(np.float64) @ vectors.astype(np.float64)
        reference = float64_karcher([torch.from_numpy(v.astype(np.float64)) for v in vectors], max_iter).numpy()
        assert np.abs(ours - reference).max() <= 1e-6 * np.abs(reference).max()


def test_karcher_weights_edge_cases_are_mergekits():
    x = np.array([3.0, 4.0], np.float32)
    # opposite inputs: the mean is zero, mergekit starts from the first unit vector and every angle is 0 or π
    weights = karcher.karcher_weights(gram_of(np.array([x, -x])), 10, 1e-5)
    assert weights @ np.array([x, -x]) == pytest.approx(x)
    assert karcher.karcher_weights(gram_of(np.zeros((2, 2), np.float32)), 10, 1e-5) is None
    # an input whose norm is <= tol is left out, but its norm is in the scale (1/N each)
    weights = karcher.karcher_weights(gram_of(np.array([x, np.zeros(2, np.float32)])), 10, 1e-5)
    assert weights.tolist() == pytest.approx([0.5, 0.0])
    # identical inputs: their mean is each of them
    weights = karcher.karcher_weights(gram_of(np.array([x, x, x])), 10, 1e-5)
    assert weights.sum() == pytest.approx(1.0) and math.isclose(weights[0], weights[2], rel_tol=1e-6)
