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


def test_models_get_independent_masks(family, tmp_path):
    """The same model twice with the same rate must not get the same mask (per-model streams)."""
    base, fts = family
    merged = merge(base, [fts[0], fts[0]], tmp_path / "out", weight_mask_rates=[0.5, 0.5], seed=1,
                   use_weight_rescale=False)
    b, f = read_state_dict(base), read_state_dict(fts[0])
    name = "model.layers.0.mlp.up_proj.weight"
    # average of two independently masked copies: kept by both, by one (half delta), or by none
    half = torch.isclose(merged[name], b[name] + (f[name] - b[name]) / 2, rtol=0, atol=1e-7)
    assert 0.4 < half.float().mean() < 0.6
