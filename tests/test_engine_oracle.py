"""The engine against merging-eval (the oracle) on tiny random Qwen2- and Llama-shaped models.

The engine performs merging-eval's operations in the same order and dtypes, so every element of every tensor
is bit-identical (+0 and -0 counted equal); that is what these tests assert, so any regression fails.

Methods and their parameters come from the contract's registry (METHODS of merging-eval's origin,
MaskApplyMethod). Combinations,
chosen so each dimension is covered without the full cross product:
- every method x every family (bf16/fp32 checkpoints, 2/4 fine-tunes, tied embeddings, sharded inputs) x
  with/without exclude regexes, with the default range size (one range per tiny tensor);
- every method (mask_merging by magnitude) x both kernel sets (compiled, torch) x two small range sizes that
  split every tensor into several ranges (1000 elements, and 37 so that even the 64-element norms split),
  on the sharded 4-fine-tune family, written as sharded outputs compared tensor by tensor;
- every method x float16 and float32 compute (merging-eval loading in that dtype) x both kernel sets;
- mask_merging by magnitude with every mask_apply_method, both weight formats with and without rescale, and
  exclude regexes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modelmerge.contract import MERGING_EVAL, METHODS, MaskApplyMethod, MergeRequest
from modelmerge_engine.engine import RANGE_ELEMENTS_ENV
from modelmerge_engine.kernels import KERNEL_SET_NAMES, KERNELS_ENV
from modelmerge_engine.run import run_merge
from tests.helpers.models import read_state_dict
from tests.helpers.oracle import FAMILIES, assert_identical, compare, engine_merge, make_families, oracle_merge

EXCLUDES = {"none": [], "regex": [r".*embed_tokens.*", r"model\.layers\.1\.mlp\..*"]}
SPLIT_RANGES = {"1000": 1000, "37": 37}  # elements per range; the smallest tensors hold 64
COMPUTE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
MASK_RATES = [0.3, 0.6, 0.5, 0.9]

# A value for every numeric parameter a method takes, away from the defaults so a parameter that is ignored
# shows; which parameters a method takes is the registry's.
PARAMETER_VALUES = {"scaling_coefficient": 0.7, "param_value_mask_rate": 0.6}
MASKING = "mask_merging"
# merging-eval's methods (mergekit's are checked against mergekit: tests/test_mergekit_oracle.py)
DIRECT_METHODS = sorted(m for m, spec in METHODS.items() if spec.origin == MERGING_EVAL and m != MASKING)
APPLY_METHODS = sorted(m.value for m in MaskApplyMethod)


def method_fields(method: str, finetunes: list[Path], **mask_fields) -> dict:
    """The request fields of `method` (for mask_merging: by magnitude, with `mask_fields`)."""
    fields = {name: value for name, value in PARAMETER_VALUES.items() if name in METHODS[method].parameters}
    if method == MASKING:
        fields.update(mask_strategy="magnitude", weight_mask_rates=MASK_RATES[: len(finetunes)], **mask_fields)
    return {"merge_method": method, **fields}


MASK_CASES = {f"magnitude-{apply}": {"mask_apply_method": apply} for apply in APPLY_METHODS} | {
    "magnitude-finetuned-rescale": {"weight_format": "finetuned_weight", "use_weight_rescale": True},
    "magnitude-finetuned-norescale": {"weight_format": "finetuned_weight", "use_weight_rescale": False},
    "magnitude-delta-norescale": {"weight_format": "delta_weight", "use_weight_rescale": False},
    "magnitude-ties-excluded": {"mask_apply_method": "ties_merging", "exclude_param_names_regex": EXCLUDES["regex"]},
}
ALL_METHODS = {**{m: {} for m in DIRECT_METHODS}, MASKING: {"mask_apply_method": "ties_merging"}}


@pytest.fixture(scope="session")
def families(tmp_path_factory) -> dict[str, tuple[Path, list[Path]]]:
    return make_families(tmp_path_factory.mktemp("families"))


@pytest.fixture(scope="session")
def oracle(tmp_path_factory):
    """merging-eval's output for (family, load dtype, request fields), computed once per session: it does not
    depend on the engine's range size or kernel set."""
    root = tmp_path_factory.mktemp("oracle")
    done: dict[str, dict[str, torch.Tensor]] = {}

    def merged(base: Path, finetunes: list[Path], *, dtype: torch.dtype = torch.bfloat16, **fields):
        key = json.dumps([str(base), str(dtype), fields], sort_keys=True)
        if key not in done:
            done[key] = oracle_merge(base, finetunes, root / str(len(done)), dtype=dtype, **fields)
        return done[key]

    return merged


@pytest.mark.parametrize("exclude", sorted(EXCLUDES))
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method", sorted(ALL_METHODS))
def test_methods_match_merging_eval(families, oracle, tmp_path, method, family, exclude):
    base, finetunes = families[family]
    fields = {**method_fields(method, finetunes, **ALL_METHODS[method]),
              "exclude_param_names_regex": EXCLUDES[exclude]}
    assert_identical(engine_merge(base, finetunes, tmp_path / "ours", **fields), oracle(base, finetunes, **fields))


@pytest.mark.parametrize("range_elements", sorted(SPLIT_RANGES))
@pytest.mark.parametrize("kernels", KERNEL_SET_NAMES)
@pytest.mark.parametrize("method", sorted(ALL_METHODS))
def test_split_ranges_and_both_kernel_sets_match_merging_eval(families, oracle, tmp_path, monkeypatch, method,
                                                              kernels, range_elements):
    """Every tensor in several ranges (thresholds, signs and masks across range boundaries), with the compiled
    kernels and the torch ones (the CUDA path's, run on CPU), into a sharded output compared tensor by tensor."""
    monkeypatch.setenv(KERNELS_ENV, kernels)
    monkeypatch.setenv(RANGE_ELEMENTS_ENV, str(SPLIT_RANGES[range_elements]))
    base, finetunes = families["llama-bf16-4-sharded"]
    fields = method_fields(method, finetunes, **ALL_METHODS[method])
    out = tmp_path / "ours"
    ours = engine_merge(base, finetunes, out, max_shard_size="40KB", **fields)
    assert len(set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())) > 2
    assert_identical(ours, oracle(base, finetunes, **fields))


@pytest.mark.parametrize("kernels", KERNEL_SET_NAMES)
@pytest.mark.parametrize("dtype", sorted(COMPUTE_DTYPES))
@pytest.mark.parametrize("method", sorted(ALL_METHODS))
def test_float16_and_float32_compute_match_merging_eval(families, oracle, tmp_path, monkeypatch, method, dtype,
                                                        kernels):
    """merging-eval loading the models in float16/float32 against the engine computing in that dtype."""
    monkeypatch.setenv(KERNELS_ENV, kernels)
    base, finetunes = families["qwen2-fp32-4-tied"]
    fields = method_fields(method, finetunes, **ALL_METHODS[method])
    ours = engine_merge(base, finetunes, tmp_path / "ours", dtype=dtype, **fields)
    assert_identical(ours, oracle(base, finetunes, dtype=COMPUTE_DTYPES[dtype], **fields))


@pytest.mark.parametrize("family", ["qwen2-bf16-2", "llama-bf16-4-sharded", "qwen2-fp32-4-tied"])
@pytest.mark.parametrize("case", sorted(MASK_CASES))
def test_magnitude_mask_merging_matches_merging_eval(families, oracle, tmp_path, case, family):
    base, finetunes = families[family]
    fields = method_fields(MASKING, finetunes, **MASK_CASES[case])
    assert_identical(engine_merge(base, finetunes, tmp_path / "ours", **fields), oracle(base, finetunes, **fields))


def test_a_single_differing_element_fails_the_comparison(families, oracle, tmp_path):
    """The assertion the tests rely on catches one element one ulp off, and names its tensor."""
    base, finetunes = families["qwen2-bf16-2"]
    fields = method_fields("task_arithmetic", finetunes)
    theirs = oracle(base, finetunes, **fields)
    ours = engine_merge(base, finetunes, tmp_path / "ours", **fields)
    name = "model.layers.1.mlp.down_proj.weight"
    ours[name].view(torch.int16).view(-1)[5] += 1
    with pytest.raises(AssertionError, match=name.replace(".", r"\.")):
        assert_identical(ours, theirs)


def test_excluded_and_unmerged_tensors_are_the_base_exactly(families, tmp_path):
    base, finetunes = families["qwen2-bf16-2"]
    ours = engine_merge(base, finetunes, tmp_path / "ours", merge_method="task_arithmetic",
                  exclude_param_names_regex=[r".*norm.*"])
    base_tensors = read_state_dict(base)
    norms = [name for name in ours if "norm" in name]
    assert norms
    for name in norms:
        assert torch.equal(ours[name], base_tensors[name])
    assert not torch.equal(ours["model.layers.0.mlp.up_proj.weight"],
                           base_tensors["model.layers.0.mlp.up_proj.weight"])


def test_tied_embeddings_are_not_stored_twice(families, tmp_path):
    base, finetunes = families["qwen2-fp32-4-tied"]
    ours = engine_merge(base, finetunes, tmp_path / "ours", merge_method="average_merging")
    assert "lm_head.weight" not in ours and "model.embed_tokens.weight" in ours


def test_float32_output_is_float32_arithmetic(families, tmp_path):
    base, finetunes = families["llama-fp32-2"]
    ours = engine_merge(base, finetunes, tmp_path / "ours", merge_method="task_arithmetic",
                  scaling_coefficient=0.5, dtype="float32")
    b, f0, f1 = (read_state_dict(p) for p in (base, *finetunes))
    name = "model.layers.0.self_attn.q_proj.weight"
    expected = b[name] + 0.5 * ((f0[name] - b[name]) + (f1[name] - b[name]))
    assert ours[name].dtype == torch.float32
    assert torch.equal(ours[name], expected)


def test_integer_scaling_coefficient_is_accepted(families, tmp_path):
    """merging-eval asserts a float; we take 1 as 1.0 (a documented fix)."""
    base, finetunes = families["qwen2-bf16-2"]
    ours = engine_merge(base, finetunes, tmp_path / "int", merge_method="task_arithmetic", scaling_coefficient=1)
    again = engine_merge(base, finetunes, tmp_path / "float", merge_method="task_arithmetic", scaling_coefficient=1.0)
    assert all(torch.equal(ours[k], again[k]) for k in ours)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("method", sorted(ALL_METHODS))
def test_compiled_cpu_kernels_match_the_torch_kernels(families, tmp_path, monkeypatch, method, dtype):
    """The CPU path (numba) and the GPU path's torch kernels (run on CPU here) agree bit for bit in every
    compute dtype, random masks included (which merging-eval cannot check: its masks are unseeded)."""
    base, finetunes = families["llama-bf16-4-sharded"]
    fields = method_fields(method, finetunes, **ALL_METHODS[method])
    if method == MASKING:
        fields["mask_strategy"] = "random"
    monkeypatch.setenv(RANGE_ELEMENTS_ENV, "1000")
    outputs = {}
    for kernels in KERNEL_SET_NAMES:
        monkeypatch.setenv(KERNELS_ENV, kernels)
        outputs[kernels] = engine_merge(base, finetunes, tmp_path / kernels, dtype=dtype, **fields)
    assert_identical(*outputs.values())


@pytest.mark.parametrize(("variable", "value"), [(KERNELS_ENV, "fortran"), (RANGE_ELEMENTS_ENV, "0"),
                                               (RANGE_ELEMENTS_ENV, "4k")])
def test_a_bad_engine_setting_is_refused_naming_the_variable(families, tmp_path, monkeypatch, capsys, variable,
                                                            value):
    monkeypatch.setenv(variable, value)
    base, finetunes = families["qwen2-bf16-2"]
    request = MergeRequest(base_model=str(base), models_to_merge=[str(p) for p in finetunes],
                           output_dir=str(tmp_path / "out"), merge_method="average_merging")
    assert run_merge(request, progress="none") == 1
    error = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"]
    assert variable in error and repr(value) in error, error
    assert list(tmp_path.iterdir()) == []


def test_compare_counts_signed_zeros_as_equal():
    zeros = {"t": torch.tensor([0.0, -0.0], dtype=torch.bfloat16)}
    assert compare(zeros, {"t": torch.tensor([-0.0, 0.0], dtype=torch.bfloat16)})["equal_fraction"] == 1.0
