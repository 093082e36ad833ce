"""merging-eval as the test oracle: merge with its MergingMethod exactly as its CLI does (bf16 load), save
with save_pretrained, and read back what it saved. Also the element-wise comparison used by the tests."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch

from tests.helpers.models import read_state_dict


def oracle_merge(base: Path, finetunes: list[Path], out: Path, *, merge_method: str,
                 exclude_param_names_regex: list[str] | None = None, **params) -> dict[str, torch.Tensor]:
    from merge import MergingMethod
    from transformers import AutoModelForCausalLM

    def load(path: Path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)

    if "scaling_coefficient" in params:
        params["scaling_coefficient"] = float(params["scaling_coefficient"])  # merging-eval asserts float
    merged = load(base)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        merged = MergingMethod(merging_method_name=merge_method).get_merged_model(
            merged_model=merged, models_to_merge=[load(p) for p in finetunes],
            exclude_param_names_regex=exclude_param_names_regex or [], **params)
    merged.to(torch.bfloat16).save_pretrained(out)
    return read_state_dict(out)


def ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """Map bf16/f16/f32 bit patterns to integers whose difference counts ulps (+0 and -0 coincide)."""
    view = {2: torch.int16, 4: torch.int32}[x.element_size()]
    bits = x.view(view).to(torch.int64)
    sign_mask = (1 << (8 * x.element_size() - 1)) - 1
    return torch.where(bits < 0, -(bits & sign_mask), bits)


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Fraction of bit-identical elements (±0 equal) and the largest distance in ulps, over all tensors."""
    assert set(ours) == set(theirs), f"tensor names differ: {sorted(set(ours) ^ set(theirs))}"
    equal = total = 0
    max_ulps = 0
    for name, expected in theirs.items():
        actual = ours[name]
        assert actual.shape == expected.shape, name
        assert actual.dtype == expected.dtype, f"{name}: {actual.dtype} vs {expected.dtype}"
        distance = (ordered_bits(actual) - ordered_bits(expected)).abs()
        equal += int((distance == 0).sum())
        total += distance.numel()
        max_ulps = max(max_ulps, int(distance.max()) if distance.numel() else 0)
    return {"equal_fraction": equal / max(total, 1), "max_ulps": max_ulps, "elements": total}
