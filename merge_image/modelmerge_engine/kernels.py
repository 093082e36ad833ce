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
from dataclasses import dataclass, field

import torch

from modelmerge_engine.safetensors_io import SafetensorsModel
from modelmerge_engine.select import bits_to_value, kth_magnitude_bits, magnitude_bits

RNG_BLOCK = 1 << 18  # random masks are drawn per block of this many elements, so chunking can't change them


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
        if name not in self._thresholds:
            compute = self.raw.compute
            numel = self.raw.model.tensors[name].numel
            k = int(numel * self.rate)

            def chunks():
                for start, stop in compute.ranges(numel):
                    base = self.base.values(name, start, stop) if self.weight_format == "delta_weight" else None
                    yield [self._weights(name, start, stop, base)]

            self._thresholds[name] = kth_magnitude_bits(chunks, [k], compute.dtype)[0]
        return self._thresholds[name]

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


def average(inputs: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(inputs, dim=0).mean(dim=0)


def task_arithmetic(base: torch.Tensor, inputs: list[torch.Tensor], scaling: float) -> torch.Tensor:
    merged = None
    for values in inputs:
        task_vector = values - base
        merged = task_vector if merged is None else merged + task_vector
    return base + scaling * merged


def trim(task_vector: torch.Tensor, threshold: int | None) -> torch.Tensor:
    """Keep values whose magnitude is at least the threshold (TIES' trim step)."""
    if threshold is None:
        return task_vector
    return task_vector * (magnitude_bits(task_vector) >= threshold).to(task_vector.dtype)


def ties(base: torch.Tensor, trimmed: list[torch.Tensor], scaling: float) -> torch.Tensor:
    """merging-eval's ties_merging on one range: elect signs, disjoint mean, scale, add to base."""
    summed = sum(trimmed)
    signs = torch.sign(summed)
    signs[signs == 0] = 1.0
    preserved = [values * (((signs > 0) & (values > 0)) | ((signs < 0) & (values < 0))).to(values.dtype)
                 for values in trimmed]
    count = sum([(values != 0).float() for values in preserved])
    merged = sum(preserved) / torch.clamp(count, min=1.0)
    return base + scaling * merged


def dare_signs(stacked_trimmed: torch.Tensor) -> torch.Tensor:
    return torch.sign(stacked_trimmed.sum(dim=0))


def dare_disjoint(base: torch.Tensor, stacked_trimmed: torch.Tensor, signs: torch.Tensor,
                  majority: torch.Tensor, scaling: float) -> torch.Tensor:
    """merging-eval's ties_merging_dare on one range, given the global majority sign."""
    signs[signs == 0] = majority
    keep = ((signs.unsqueeze(dim=0) > 0) & (stacked_trimmed > 0)) | (
        (signs.unsqueeze(dim=0) < 0) & (stacked_trimmed < 0))
    preserved = stacked_trimmed * keep
    count = (preserved != 0).sum(dim=0).float()
    merged = torch.sum(preserved, dim=0) / torch.clamp(count, min=1.0)
    return base + scaling * merged


def stack_trimmed(base: torch.Tensor, inputs: list[torch.Tensor], thresholds: list[int | None]) -> torch.Tensor:
    """ties_merging_dare's trim: `flattened * (|flattened| >= kth)` per model, stacked."""
    trimmed = []
    for values, threshold in zip(inputs, thresholds, strict=True):
        task_vector = values - base
        trimmed.append(task_vector if threshold is None else task_vector * (magnitude_bits(task_vector) >= threshold))
    return torch.stack(trimmed, dim=0)


def threshold_value(bits: int | None, dtype: torch.dtype) -> float | None:
    return None if bits is None else float(bits_to_value(bits, dtype))
