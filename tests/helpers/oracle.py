"""merging-eval as the test oracle: merge with its MergingMethod exactly as its CLI does (bf16 load; other
load dtypes for the engine's float16/float32 compute), save with save_pretrained, and read back what it
saved. Also what the oracle tests share (merging-eval's here, mergekit's in test_mergekit_oracle.py): the tiny
model families, the engine run, and the element-wise comparison."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch

from tests.helpers.models import make_family, read_state_dict

SIZE = {"vocab": 256, "hidden": 64, "intermediate": 160, "layers": 2}
FAMILIES = {
    "qwen2-bf16-2": {"arch": "qwen2", "dtype": torch.bfloat16, "n": 2},
    "llama-bf16-4-sharded": {"arch": "llama", "dtype": torch.bfloat16, "n": 4, "shard_size": "40KB"},
    "qwen2-fp32-4-tied": {"arch": "qwen2", "dtype": torch.float32, "n": 4, "tie": True},
    "llama-fp32-2": {"arch": "llama", "dtype": torch.float32, "n": 2},
}


def make_families(root: Path) -> dict[str, tuple[Path, list[Path]]]:
    """Each of FAMILIES (a base and its fine-tunes) under `root`."""
    made = {}
    for key, spec in FAMILIES.items():
        spec = dict(spec)
        n = spec.pop("n")
        made[key] = make_family(root / key, n=n, **spec, **SIZE)
    return made


def engine_merge(base: Path, finetunes: list[Path], out: Path, **fields) -> dict[str, torch.Tensor]:
    """The engine's merge of `fields` (request fields), read back."""
    from modelmerge.contract import MergeRequest
    from modelmerge_engine.run import run_merge

    request = MergeRequest(base_model=str(base), models_to_merge=[str(p) for p in finetunes],
                           output_dir=str(out), **fields)
    assert run_merge(request, progress="none") == 0
    return read_state_dict(out)


def oracle_merge(base: Path, finetunes: list[Path], out: Path, *, merge_method: str,
                 exclude_param_names_regex: list[str] | None = None, dtype: torch.dtype = torch.bfloat16,
                 **params) -> dict[str, torch.Tensor]:
    from merge import MergingMethod
    from transformers import AutoModelForCausalLM

    def load(path: Path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)

    if "scaling_coefficient" in params:
        params["scaling_coefficient"] = float(params["scaling_coefficient"])  # merging-eval asserts float
    merged = load(base)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        merged = MergingMethod(merging_method_name=merge_method).get_merged_model(
            merged_model=merged, models_to_merge=[load(p) for p in finetunes],
            exclude_param_names_regex=exclude_param_names_regex or [], **params)
    merged.to(dtype).save_pretrained(out)
    return read_state_dict(out)


def ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """Map bf16/f16/f32 bit patterns to integers whose difference counts ulps (+0 and -0 coincide)."""
    view = {2: torch.int16, 4: torch.int32}[x.element_size()]
    bits = x.view(view).to(torch.int64)
    sign_mask = (1 << (8 * x.element_size() - 1)) - 1
    return torch.where(bits < 0, -(bits & sign_mask), bits)


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict:
    """Fraction of bit-identical elements (±0 equal) and the largest distance in ulps, over all tensors, and
    for each tensor that differs: how many elements and by how many ulps at most."""
    assert set(ours) == set(theirs), f"tensor names differ: {sorted(set(ours) ^ set(theirs))}"
    equal = total = 0
    max_ulps = 0
    differing: dict[str, dict[str, int]] = {}
    for name, expected in theirs.items():
        actual = ours[name]
        assert actual.shape == expected.shape, name
        assert actual.dtype == expected.dtype, f"{name}: {actual.dtype} vs {expected.dtype}"
        distance = (ordered_bits(actual) - ordered_bits(expected)).abs()
        same = int((distance == 0).sum())
        worst = int(distance.max()) if distance.numel() else 0
        if same != distance.numel():
            differing[name] = {"elements": distance.numel() - same, "max_ulps": worst}
        equal += same
        total += distance.numel()
        max_ulps = max(max_ulps, worst)
    return {"equal_fraction": equal / max(total, 1), "max_ulps": max_ulps, "elements": total,
            "differing_tensors": differing}


def assert_identical(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict:
    """The equality the engine reaches: every element of every tensor bit-identical (+0 and -0 equal)."""
    result = compare(ours, theirs)
    assert result["elements"] > 0
    assert not result["differing_tensors"] and result["equal_fraction"] == 1.0, result
    return result
