"""The merge methods, element range by element range, with merging-eval's exact arithmetic.

merging-eval (the oracle) computes with whole-model tensors in the load dtype; every function here performs
the same torch operations in the same order and dtypes on a slice of one tensor, so results agree bit for
bit. Where merging-eval crashes or misbehaves we deviate on purpose (documented in the README):
  * a magnitude mask with k = 0 selected values keeps everything (merging-eval calls kthvalue(k=0) and fails);
  * random masks come from a seeded generator per (seed, model, tensor, block), so they are reproducible;
  * inputs are never modified in place; integer scaling coefficients are accepted.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from functools import partial

import torch

from modelmerge_engine.safetensors_io import SafetensorsModel
from modelmerge_engine.select import bits_to_value, kth_magnitude_bits, magnitude_bits

RNG_BLOCK = 1 << 16  # random masks are drawn per block of this many elements, so chunking can't change them


@dataclass
class Compute:
    """Where and in which dtype the arithmetic happens, and how many elements one step handles."""

    dtype: torch.dtype
    device: torch.device
    chunk: int  # elements per input per step (a multiple of RNG_BLOCK)

    def load(self, model: SafetensorsModel, name: str, start: int, stop: int) -> torch.Tensor:
        # Same-dtype CPU loads are views of the mapped file: never modify them in place.
        return model.flat(name)[start:stop].to(device=self.device, dtype=self.dtype)

    def ranges(self, numel: int) -> list[tuple[int, int]]:
        return [(start, min(start + self.chunk, numel)) for start in range(0, numel, self.chunk)] or [(0, 0)]


class Input:
    """A fine-tuned model as the merge method sees it."""

    def values(self, name: str, start: int, stop: int) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class RawInput(Input):
    model: SafetensorsModel
    compute: Compute

    def values(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.compute.load(self.model, name, start, stop)


@dataclass
class MaskedInput(Input):
    """mask_merging's first step: drop a fraction of the delta (or of the weights), rescale, re-add the base."""

    raw: RawInput
    base: RawInput
    rate: float
    strategy: str  # "random" | "magnitude"
    rescale: bool
    weight_format: str  # "delta_weight" | "finetuned_weight"
    seed: int
    index: int
    _thresholds: dict[str, int | None] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def values(self, name: str, start: int, stop: int) -> torch.Tensor:
        base = self.base.values(name, start, stop) if self.weight_format == "delta_weight" else None
        weights = self._weights(name, start, stop, base)
        masked = weights * ~self._drop_mask(name, start, stop, weights)
        if self.rescale and self.rate != 1.0:
            masked = torch.div(input=masked, other=1 - self.rate)
        return masked if base is None else base + 1.0 * masked

    def _weights(self, name: str, start: int, stop: int, base: torch.Tensor | None) -> torch.Tensor:
        raw = self.raw.values(name, start, stop)
        return raw if base is None else raw - base

    def _drop_mask(self, name: str, start: int, stop: int, weights: torch.Tensor) -> torch.Tensor:
        if self.strategy == "random":
            return self._random_mask(name, start, stop, weights.device)
        threshold = self._threshold(name)
        if threshold is None:
            return torch.zeros_like(weights, dtype=torch.bool)
        return magnitude_bits(weights) <= threshold

    def _threshold(self, name: str) -> int | None:
        with self._lock:  # one pass per tensor, even when several worker threads ask at once
            if name not in self._thresholds:
                self._thresholds[name] = self._compute_threshold(name)
            return self._thresholds[name]

    def _compute_threshold(self, name: str) -> int | None:
        """k-th smallest |weights| of the whole tensor (runs inside a worker, so sequentially)."""
        compute = self.raw.compute
        numel = self.raw.model.tensors[name].numel

        def step(start: int, stop: int) -> list[torch.Tensor]:
            base = self.base.values(name, start, stop) if self.weight_format == "delta_weight" else None
            return [self._weights(name, start, stop, base)]

        steps = lambda: (partial(step, start, stop) for start, stop in compute.ranges(numel))  # noqa: E731
        return kth_magnitude_bits(steps, [int(numel * self.rate)], compute.dtype)[0]

    def _random_mask(self, name: str, start: int, stop: int, device: torch.device) -> torch.Tensor:
        parts = []
        for block_start in range(start - start % RNG_BLOCK, stop, RNG_BLOCK):
            block = block_start // RNG_BLOCK
            generator = torch.Generator(device=device).manual_seed(self._block_seed(name, block))
            draws = torch.rand(RNG_BLOCK, generator=generator, device=device)
            lo, hi = max(start, block_start) - block_start, min(stop, block_start + RNG_BLOCK) - block_start
            parts.append(draws[lo:hi] < self.rate)
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _block_seed(self, name: str, block: int) -> int:
        digest = hashlib.blake2b(f"{self.seed}/{self.index}/{name}/{block}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") & ((1 << 63) - 1)


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


def trim(task_vector: torch.Tensor, threshold: int | None) -> torch.Tensor:
    """TIES' trim step, widened to float32 (exact): keep values whose magnitude is at least the threshold.

    The remaining TIES arithmetic runs on float32 and rounds exactly where merging-eval's 16-bit tensors
    round; float32 comparisons and selects are several times faster than 16-bit ones on CPU."""
    wide = task_vector.to(torch.float32, copy=True)
    if threshold is not None:
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


def dare_trim(base: torch.Tensor, inputs: list[torch.Tensor], thresholds: list[int | None]) -> list[torch.Tensor]:
    """ties_merging_dare's trim: `flattened * (|flattened| >= kth)` per model (widened to float32)."""
    return [trim(values - base, threshold) for values, threshold in zip(inputs, thresholds, strict=True)]


def dare_signs(trimmed: list[torch.Tensor]) -> torch.Tensor:
    """`sign(stack(trimmed).sum(dim=0))`: a float32 sum; rounding it to 16 bits cannot change its sign."""
    return torch.sign(float_sum(trimmed))


def dare_disjoint(base: torch.Tensor, trimmed: list[torch.Tensor], signs: torch.Tensor,
                  majority: float, scaling: float) -> torch.Tensor:
    """merging-eval's ties_merging_dare on one range, given the global majority sign. Its
    `torch.sum(dim=0)` accumulates in float32 and rounds once to the 16-bit dtype."""
    if majority:
        signs.masked_fill_(signs == 0, majority)
    rnd = rounder(base.dtype)
    return _disjoint_mean(base, trimmed, signs, lambda values: rnd(float_sum(values)), scaling)


def threshold_value(bits: int | None, dtype: torch.dtype) -> float | None:
    return None if bits is None else float(bits_to_value(bits, dtype))
