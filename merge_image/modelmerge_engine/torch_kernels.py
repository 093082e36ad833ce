"""The merge methods as torch operations on one range of one tensor: the GPU path (`use_gpu`).

merging-eval (the oracle) computes with whole-model tensors in the load dtype; these functions perform the
same torch operations in the same order and dtypes on a slice, so results agree bit for bit (checked on CPU
by the oracle tests, on CUDA by bench/gpu_check.py). cpu_kernels.py is the same arithmetic compiled for CPU.
"""

from __future__ import annotations

import torch

_INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    """|x| as an integer tensor whose order is the order of |x| (see select.py)."""
    view = _INT_VIEW[x.dtype]
    return (x.view(view) & (0x7FFF if view == torch.int16 else 0x7FFFFFFF)).to(torch.int64)


def histogram(base: torch.Tensor, inputs: list[torch.Tensor], *, task_vectors: bool, shift: int, bins: int,
              buckets: list[int]) -> list[torch.Tensor]:
    counts = []
    for values, bucket in zip(inputs, buckets, strict=True):
        bits = magnitude_bits(values - base if task_vectors else values)
        if bucket >= 0:
            bits = bits[(bits >> 16) == bucket] & 0xFFFF
        counts.append(torch.bincount(bits >> shift, minlength=bins))
    return counts


def mask(base: torch.Tensor, raw: torch.Tensor, *, delta: bool, threshold: int, draws: torch.Tensor | None,
         rate: float, rescale: bool) -> torch.Tensor:
    """merging-eval's mask_input_with_mask_rate + re-adding the base (mask_model_weights)."""
    values = raw - base if delta else raw
    if threshold >= 0:
        values = values * ~(magnitude_bits(values) <= threshold)
    elif draws is not None:
        values = values * (draws >= rate)
    if rescale and rate != 1.0:
        values = torch.div(input=values, other=1 - rate)
    return base + 1.0 * values if delta else values


# --- per-range arithmetic of each method ---------------------------------------------------------------


def float_sum(inputs: list[torch.Tensor]) -> torch.Tensor:
    """What torch's `stack(inputs).sum(dim=0)` accumulates for 16-bit inputs: a float32 running sum
    (without materialising the stack, whose outer-dimension reduction is slow on CPU)."""
    total = inputs[0].to(torch.float32, copy=True)
    for values in inputs[1:]:
        total += values
    return total


def average(inputs: list[torch.Tensor]) -> torch.Tensor:
    """`torch.stack(inputs).mean(dim=0)`: float32 sum, float32 division, one rounding."""
    return float_sum(inputs).div_(len(inputs)).to(inputs[0].dtype)


def task_arithmetic(base: torch.Tensor, inputs: list[torch.Tensor], scaling: float) -> torch.Tensor:
    merged = None
    for values in inputs:
        task_vector = values - base
        merged = task_vector if merged is None else merged + task_vector
    return base + scaling * merged


def rounder(dtype: torch.dtype):
    """Rounds float32 values to `dtype` and back: where merging-eval's 16-bit arithmetic rounds."""
    if dtype == torch.float32:
        return lambda x: x
    return lambda x: x.to(dtype).to(torch.float32)


def trim(task_vector: torch.Tensor, threshold: int) -> torch.Tensor:
    """TIES' trim step, widened to float32 (exact): keep values whose magnitude is at least the threshold.

    The remaining TIES arithmetic runs on float32 and rounds exactly where merging-eval's 16-bit tensors
    round; float32 comparisons and selects are several times faster than 16-bit ones on CPU."""
    wide = task_vector.to(torch.float32, copy=True)
    if threshold >= 0:
        wide.masked_fill_(magnitude_bits(task_vector) < threshold, 0.0)
    return wide


def _disjoint_mean(base: torch.Tensor, trimmed: list[torch.Tensor], elected: torch.Tensor,
                   summed_preserved, scaling: float) -> torch.Tensor:
    """Keep each value whose sign is the elected one, average the kept values per element, scale, add to
    the base. Returns float32; the caller's cast to the output dtype is merging-eval's final rounding."""
    count = None
    for values in trimmed:
        keep = (values * elected) > 0  # same sign as elected, and non-zero
        values.masked_fill_(~keep, 0.0)
        count = keep.to(torch.float32) if count is None else count.add_(keep)
    merged = summed_preserved(trimmed).div_(count.clamp_(min=1.0))
    return base.to(torch.float32).add_(merged.mul_(scaling))


def ties(base: torch.Tensor, trimmed: list[torch.Tensor], scaling: float) -> torch.Tensor:
    """merging-eval's ties_merging on one range. Its `sum(list)` adds in the 16-bit dtype, rounding after
    each addition; its elected sign is sign(sum) with 0 taken as +1."""
    rnd = rounder(base.dtype)

    def sequential_sum(values: list[torch.Tensor]) -> torch.Tensor:
        total = values[0].clone()
        for item in values[1:]:
            total = rnd(total.add_(item))
        return total

    elected = torch.where(sequential_sum(trimmed) < 0, -1.0, 1.0)
    return _disjoint_mean(base, trimmed, elected, sequential_sum, scaling)


def trim_task_vectors(base: torch.Tensor, inputs: list[torch.Tensor], thresholds: list[int]) -> list[torch.Tensor]:
    """Each model's task vector trimmed at its threshold (per tensor for ties_merging, one global threshold
    per model for ties_merging_dare): `tv * (|tv| >= kth)`, widened to float32."""
    return [trim(values - base, threshold) for values, threshold in zip(inputs, thresholds, strict=True)]


def elected_signs(trimmed: list[torch.Tensor]) -> torch.Tensor:
    """`sign(stack(trimmed).sum(dim=0))`: a float32 sum; rounding it to 16 bits cannot change its sign."""
    return torch.sign(float_sum(trimmed))


def global_ties_sign_balance(base: torch.Tensor, inputs: list[torch.Tensor], thresholds: list[int]) -> int:
    """Σ sign(Σ_i trimmed_i) over the range: what decides ties_merging_dare's majority sign."""
    signs = elected_signs(trim_task_vectors(base, inputs, thresholds))
    return int((signs > 0).sum()) - int((signs < 0).sum())


def global_ties(base: torch.Tensor, trimmed: list[torch.Tensor], signs: torch.Tensor,
                majority: float, scaling: float) -> torch.Tensor:
    """merging-eval's ties_merging_dare (TIES with one global threshold per model) on one range, given the
    global majority sign. Its
    `torch.sum(dim=0)` accumulates in float32 and rounds once to the 16-bit dtype."""
    if majority:
        signs.masked_fill_(signs == 0, majority)
    rnd = rounder(base.dtype)
    return _disjoint_mean(base, trimmed, signs, lambda values: rnd(float_sum(values)), scaling)


# --- mergekit's methods ----------------------------------------------------------------------------------


def linear(inputs: list[torch.Tensor], weights: list[float], denominator: float, *, normalize: bool) -> torch.Tensor:
    """mergekit's linear: Σ_i weight_i * x_i into a float32 accumulator with `addcmul_` (a fused multiply-add,
    as the compiled kernels do), / Σ weights with normalize."""
    total = torch.zeros(inputs[0].shape, dtype=torch.float32, device=inputs[0].device)
    for values, weight in zip(inputs, weights, strict=True):
        total.addcmul_(values, torch.tensor(weight, dtype=torch.float32, device=values.device))
    return total.div_(denominator) if normalize else total
