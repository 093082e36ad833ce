"""mergekit's karcher (methods/karcher.py) against mergekit 0.1.5 (the oracle, tests/helpers/mergekit.py) on tiny
random Llama- and Qwen2-shaped families: 2 and 3 inputs (mergekit's base_model is one more input, appended after
the listed models as mergekit does), compute in bfloat16 and float32, both kernel sets with every tensor split into
several ranges, and `modelmerge merge --config` on a mergekit YAML. The scalars come from torch's own reductions
and functions, and the elementwise replay rounds where torch does, so every element is mergekit's."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from modelmerge.contract import MergeRequest
from modelmerge_engine.engine import RANGE_ELEMENTS_ENV
from modelmerge_engine.kernels import KERNELS_ENV
from tests.helpers.mergekit import assert_agrees_with_mergekit, memoized_merges
from tests.helpers.models import make_family, read_state_dict, save_model
from tests.helpers.oracle import SIZE, compare, engine_merge

FAMILIES = {"llama": torch.bfloat16, "qwen2": torch.float32}  # architecture: checkpoint dtype


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, tuple[Path, list[Path]]]:
    root = tmp_path_factory.mktemp("karcher-families")
    return {arch: make_family(root / arch, n=2, arch=arch, dtype=dtype, **SIZE) for arch, dtype in FAMILIES.items()}


@pytest.fixture(scope="module")
def mergekit(tmp_path_factory):
    return memoized_merges(tmp_path_factory.mktemp("karcher-mergekit"))


def karcher_config(base: Path, finetunes: list[Path], *, dtype: str, **parameters) -> dict:
    """A mergekit config with the base as base_model only: mergekit appends it to the inputs."""
    config = {"merge_method": "karcher", "base_model": str(base), "dtype": dtype,
              "models": [{"model": str(path)} for path in finetunes]}
    if parameters:
        config["parameters"] = parameters
    return config


def karcher_merge(base: Path, finetunes: list[Path], out: Path, **fields) -> dict:
    """The engine's merge of the same inputs in mergekit's order (the fine-tunes, then the base)."""
    return engine_merge(base, [*finetunes, base], out, merge_method="karcher", **fields)


CASES = [("llama", "bfloat16", 3), ("llama", "float32", 2), ("qwen2", "bfloat16", 2), ("qwen2", "float32", 3)]


@pytest.mark.parametrize(("family", "dtype", "inputs"), CASES, ids=[f"{f}-{d}-{n}" for f, d, n in CASES])
def test_karcher_matches_mergekit(families, mergekit, tmp_path, family, dtype, inputs):
    base, finetunes = families[family]
    ours = karcher_merge(base, finetunes[:inputs - 1], tmp_path / "ours", dtype=dtype)
    theirs = mergekit(karcher_config(base, finetunes[:inputs - 1], dtype=dtype))
    assert_agrees_with_mergekit(ours, theirs)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_karcher_torch_kernels_over_split_ranges_match_mergekit(families, mergekit, tmp_path, monkeypatch, dtype):
    monkeypatch.setenv(KERNELS_ENV, "torch")
    monkeypatch.setenv(RANGE_ELEMENTS_ENV, "37")
    base, finetunes = families["qwen2"]
    ours = karcher_merge(base, finetunes, tmp_path / "ours", dtype=dtype, max_iter=3, tol=1e-4)
    theirs = mergekit(karcher_config(base, finetunes, dtype=dtype, max_iter=3, tol=1e-4))
    assert_agrees_with_mergekit(ours, theirs)


def test_modelmerge_merge_config_takes_a_mergekit_karcher_yaml(families, mergekit, tmp_path):
    base, finetunes = families["llama"]
    config = karcher_config(base, finetunes, dtype="bfloat16", max_iter=5)
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "modelmerge.cli", "merge", "--config", str(tmp_path / "merge.yml"),
                           "--output-dir", str(tmp_path / "ours"), "--progress", "none"],
                          capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["method"] == "karcher"
    assert_agrees_with_mergekit(read_state_dict(tmp_path / "ours"), mergekit(config))


def derived_model(source: Path, path: Path, change) -> Path:
    """A copy of `source` with each parameter i replaced by change(i, parameter)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
    with torch.no_grad():
        for index, parameter in enumerate(model.parameters()):
            parameter.copy_(change(index, parameter))
    save_model(model, path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, path / name)
    return path


def test_karcher_of_antipodal_and_of_zero_tensors_matches_mergekit(families, mergekit, tmp_path):
    """Tensors that are opposite in the two models (the weighted mean is zero: mergekit starts from the first
    model's unit vector, every angle is π) and tensors that are zero in both (mergekit writes zeros)."""
    _, (finetune, _) = families["llama"]
    first = derived_model(finetune, tmp_path / "first", lambda i, p: p * 0 if i % 2 else p)
    opposite = derived_model(first, tmp_path / "opposite", lambda i, p: -p)
    ours = engine_merge(first, [first, opposite], tmp_path / "ours", merge_method="karcher")
    config = {"merge_method": "karcher", "dtype": "bfloat16", "models": [{"model": str(first)},
                                                                          {"model": str(opposite)}]}
    assert_agrees_with_mergekit(ours, mergekit(config))


def test_karcher_of_one_model_is_that_model(families, tmp_path):
    base, finetunes = families["qwen2"]
    ours = engine_merge(base, finetunes[:1], tmp_path / "ours", merge_method="karcher", dtype="float32")
    assert compare(ours, read_state_dict(finetunes[0]))["equal_fraction"] == 1.0


@pytest.mark.parametrize(("field", "value"), [("max_iter", -1), ("max_iter", 1.5), ("tol", -1e-5), ("tol", 2.0)])
def test_karcher_parameters_are_validated_naming_the_field(field, value):
    with pytest.raises(ValidationError, match=field):
        MergeRequest(base_model="base", models_to_merge=["a", "b"], merge_method="karcher", **{field: value})
