"""mask_merging with mask_strategy random (DARE): merging-eval draws unseeded masks, so it cannot be an oracle
here; instead the drop fraction is checked statistically, the rescale exactly, and masks are reproducible."""

from __future__ import annotations

import math

import pytest
import torch

from modelmerge.contract import MergeRequest
from modelmerge_engine.run import run_merge
from tests.helpers.models import make_family, read_state_dict


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("masks"), n=2, dtype=torch.float32, vocab=512, hidden=96,
                       intermediate=256, layers=2, heads=4, kv_heads=2)


def merge(base, models, out, **fields):
    request = MergeRequest(base_model=str(base), models_to_merge=[str(m) for m in models], output_dir=str(out),
                           merge_method="mask_merging", mask_strategy="random", dtype="float32", **fields)
    assert run_merge(request, progress="none") == 0
    return read_state_dict(out)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_drop_fraction_and_exact_rescale(family, tmp_path, rate):
    base, fts = family
    merged = merge(base, fts[:1], tmp_path / "out", weight_mask_rates=[rate], seed=3)
    b, f = read_state_dict(base), read_state_dict(fts[0])
    dropped = total = 0
    for name, values in merged.items():
        delta = f[name] - b[name]
        kept = values != b[name]
        expected_kept = b[name] + torch.div(delta, 1 - rate)
        assert torch.equal(values[kept], expected_kept[kept]), name
        assert torch.equal(values[~kept], b[name][~kept]), name
        dropped += int((~kept).sum())
        total += values.numel()
    sigma = math.sqrt(total * rate * (1 - rate))
    assert abs(dropped - rate * total) < 6 * sigma, (dropped / total, rate)


def test_finetuned_weight_format_without_rescale(family, tmp_path):
    base, fts = family
    merged = merge(base, fts[:1], tmp_path / "out", weight_mask_rates=[0.4], weight_format="finetuned_weight",
                   use_weight_rescale=False)
    f = read_state_dict(fts[0])
    zeros = sum(int((v == 0).sum()) for v in merged.values())
    total = sum(v.numel() for v in merged.values())
    assert abs(zeros / total - 0.4) < 0.01
    for name, values in merged.items():
        kept = values != 0
        assert torch.equal(values[kept], f[name][kept])


def test_masks_are_reproducible_with_a_seed(family, tmp_path):
    base, fts = family
    first = merge(base, fts, tmp_path / "a", weight_mask_rates=[0.5, 0.3], seed=42)
    again = merge(base, fts, tmp_path / "b", weight_mask_rates=[0.5, 0.3], seed=42)
    other = merge(base, fts, tmp_path / "c", weight_mask_rates=[0.5, 0.3], seed=43)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


# --- the drop pattern is random: spread over every part of every tensor, independent of everything else ---

BLOCKS = 8  # each large tensor is checked in this many contiguous blocks
LARGE = 4096  # tensors with at least this many elements are checked block by block
SIGMAS = 6


def dropped_elements(merged, base, finetune) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per tensor of a one-model delta_weight merge without rescale: which elements were dropped (the merged
    value is the base's), and where that is decidable (base + delta differs from the base)."""
    found = {}
    for name, values in merged.items():
        b, f = base[name].flatten(), finetune[name].flatten()
        found[name] = (values.flatten() == b, (b + (f - b)) != b)
    return found


def off_by(count: int, trials: int, probability: float) -> float:
    """How many standard deviations a binomial count is from its expectation."""
    return abs(count - trials * probability) / math.sqrt(trials * probability * (1 - probability))


def pattern_problems(drops: dict[str, tuple[torch.Tensor, torch.Tensor]], rate: float) -> list[str]:
    """What a drop pattern at `rate` does that independent draws would not (beyond 6 sigma): a block of a
    tensor with too many or too few drops, or neighbouring elements dropped together too often or too rarely."""
    problems = []
    pairs = together = 0
    for name, (dropped, decidable) in drops.items():
        if dropped.numel() >= LARGE:
            for index, (d, ok) in enumerate(zip(dropped.chunk(BLOCKS), decidable.chunk(BLOCKS), strict=True)):
                if off_by(int(d[ok].sum()), int(ok.sum()), rate) > SIGMAS:
                    problems.append(f"{name} block {index}: drop fraction {float(d[ok].float().mean()):.3f}")
        both = decidable[1:] & decidable[:-1]
        pairs += int(both.sum())
        together += int((dropped[1:] & dropped[:-1])[both].sum())
    if off_by(together, pairs, rate * rate) > SIGMAS:
        problems.append(f"neighbours dropped together {together / pairs:.3f} of the time, not {rate * rate:.3f}")
    return problems


def joint_problems(first: torch.Tensor, second: torch.Tensor, decidable: torch.Tensor, rates: tuple[float, float],
                   what: str) -> list[str]:
    """Two drop masks over the same positions that are not independent (both-dropped count beyond 6 sigma)."""
    n = int(decidable.sum())
    both = int((first & second)[decidable].sum())
    if off_by(both, n, rates[0] * rates[1]) > SIGMAS:
        return [f"{what}: both dropped {both / n:.3f} of the time, not {rates[0] * rates[1]:.3f}"]
    return []


def one_model_drops(family, out, *, rate: float, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    base, fts = family
    merged = merge(base, fts[:1], out, weight_mask_rates=[rate], seed=seed, use_weight_rescale=False)
    return dropped_elements(merged, read_state_dict(base), read_state_dict(fts[0]))


@pytest.mark.parametrize("rate", [0.2, 0.5])
def test_random_drops_are_spread_over_every_part_of_every_tensor(family, tmp_path, rate):
    drops = one_model_drops(family, tmp_path / "out", rate=rate, seed=7)
    assert sum(d.numel() >= LARGE for d, _ in drops.values()) >= 5
    assert pattern_problems(drops, rate) == []
    # the check bites: the same drop fraction as a pattern (the first part of each tensor, every other element)
    first_part = {name: (torch.arange(d.numel()) < rate * d.numel(), ok) for name, (d, ok) in drops.items()}
    strided = {name: (torch.arange(d.numel()) % round(1 / rate) == 0, ok) for name, (d, ok) in drops.items()}
    assert any("block" in problem for problem in pattern_problems(first_part, rate))
    assert any("neighbours" in problem for problem in pattern_problems(strided, rate))


def test_masks_are_independent_between_seeds_tensors_and_models(family, tmp_path):
    rate = 0.5
    seeded = one_model_drops(family, tmp_path / "seed7", rate=rate, seed=7)
    reseeded = one_model_drops(family, tmp_path / "seed8", rate=rate, seed=8)
    problems = []
    for name, (dropped, decidable) in seeded.items():
        problems += joint_problems(dropped, reseeded[name][0], decidable & reseeded[name][1], (rate, rate),
                                   f"{name}, seeds 7 and 8")
    first, second = (seeded[f"model.layers.{i}.mlp.up_proj.weight"] for i in (0, 1))
    problems += joint_problems(first[0], second[0], first[1] & second[1], (rate, rate), "two tensors, one seed")
    assert problems == []
    # a mask that ignores the seed or the tensor would be caught by the same check
    dropped, decidable = seeded["model.layers.0.mlp.up_proj.weight"]
    assert joint_problems(dropped, dropped, decidable, (rate, rate), "same mask")

    # the same fine-tune at two positions: its two masks are independent draws (averaged without rescale,
    # an element is the base where both dropped, the fine-tune where both kept, half-way where one did)
    base, fts = family
    rates = (0.5, 0.3)
    merged = merge(base, [fts[0], fts[0]], tmp_path / "twice", weight_mask_rates=list(rates), seed=1,
                   use_weight_rescale=False)
    b, f = read_state_dict(base), read_state_dict(fts[0])
    counts = {"both dropped": 0, "both kept": 0, "elements": 0}
    for name, values in merged.items():
        delta = f[name] - b[name]
        decidable = (b[name] + delta / 2 != b[name]) & (b[name] + delta / 2 != b[name] + delta)
        counts["both dropped"] += int((values == b[name])[decidable].sum())
        counts["both kept"] += int((values == b[name] + delta)[decidable].sum())
        counts["elements"] += int(decidable.sum())
    n = counts["elements"]
    assert off_by(counts["both dropped"], n, rates[0] * rates[1]) < SIGMAS, counts
    assert off_by(counts["both kept"], n, (1 - rates[0]) * (1 - rates[1])) < SIGMAS, counts


@pytest.mark.parametrize("rate", [0.0, 2.0**-24, 0.1, 1 / 3, 0.5, 0.9883, 0.99, 1 - 2.0**-24, 1.0])
def test_the_integer_cut_keeps_exactly_the_draws_the_float_rate_keeps(rate):
    """The compiled mask compares each draw's 24 bits with draw_cut(rate) instead of the float draw with the rate:
    over every possible draw, both keep the same ones."""
    import numpy as np

    from modelmerge_engine.cpu_kernels import draw_cut

    bits = np.arange(1 << 24, dtype=np.uint64)
    draws = bits.astype(np.float32) * np.float32(1.0 / 16777216.0)  # cpu_kernels._uniform, exact
    assert np.array_equal(bits >= draw_cut(rate), draws.astype(np.float64) >= rate)
