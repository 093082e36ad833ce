"""Correctness edges against merging-eval (the oracle): a tied base with a fine-tune that stores its own head,
and Mixtral-style MoE checkpoints (one tensor per expert on disk, fused expert parameters in transformers 5),
where per-tensor thresholds must cover what merging-eval's fused parameters cover."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from modelmerge.contract import MergeRequest
from modelmerge_engine.run import run_merge
from tests.helpers.models import make_family, make_finetune, make_model, read_state_dict, untie_head
from tests.helpers.oracle import compare, oracle_merge

SIZE = {"vocab": 256, "hidden": 64, "intermediate": 160, "layers": 2}
MOE_SIZE = {"vocab": 128, "hidden": 32, "intermediate": 48, "layers": 2, "heads": 4, "kv_heads": 2, "experts": 4}

CASES = {
    "average_merging": {"merge_method": "average_merging"},
    "task_arithmetic": {"merge_method": "task_arithmetic", "scaling_coefficient": 0.5},
    "ties_merging": {"merge_method": "ties_merging", "scaling_coefficient": 0.7, "param_value_mask_rate": 0.8},
    "ties_merging_dare": {"merge_method": "ties_merging_dare", "param_value_mask_rate": 0.6},
    "mask_merging-magnitude-ties": {"merge_method": "mask_merging", "weight_mask_rates": [0.3, 0.6, 0.5],
                                    "mask_strategy": "magnitude", "mask_apply_method": "ties_merging",
                                    "param_value_mask_rate": 0.5},
    "mask_merging-magnitude-finetuned": {"merge_method": "mask_merging", "weight_mask_rates": [0.5, 0.2, 0.7],
                                         "mask_strategy": "magnitude", "weight_format": "finetuned_weight",
                                         "mask_apply_method": "task_arithmetic"},
}


def engine_merge(base: Path, finetunes: list[Path], out: Path, **fields) -> dict[str, torch.Tensor]:
    request = MergeRequest(base_model=str(base), models_to_merge=[str(p) for p in finetunes],
                           output_dir=str(out), **fields)
    assert run_merge(request, progress="none") == 0
    return read_state_dict(out)


def case_fields(case: str, finetunes: list[Path]) -> dict:
    """The request fields of a case, with one mask rate per fine-tune."""
    fields = dict(CASES[case])
    if "weight_mask_rates" in fields:
        fields["weight_mask_rates"] = fields["weight_mask_rates"][: len(finetunes)]
    return fields


def oracle_and_engine(base: Path, finetunes: list[Path], out: Path, **fields) -> dict[str, float]:
    """Merge with merging-eval and with the engine; the comparison of the two (see helpers.oracle.compare)."""
    theirs = oracle_merge(base, finetunes, out / "oracle", **fields)
    ours = engine_merge(base, finetunes, out / "ours", **fields)
    return compare(ours, theirs)


@pytest.fixture(scope="module")
def tied_base_untied_finetune(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A base with tied embeddings (no lm_head.weight stored) and three fine-tunes, the second of which
    trained its head separately (stores lm_head.weight, untied in its config)."""
    root = tmp_path_factory.mktemp("tied")
    base, finetunes = make_family(root, n=3, tie=True, **SIZE)
    untie_head(finetunes[1], seed=5)
    assert "lm_head.weight" not in read_state_dict(base)
    assert "lm_head.weight" in read_state_dict(finetunes[1])
    return base, finetunes


@pytest.mark.parametrize("case", sorted(CASES))
def test_tied_base_with_an_untied_finetune_merges_like_merging_eval(tied_base_untied_finetune, tmp_path, case):
    base, finetunes = tied_base_untied_finetune
    result = oracle_and_engine(base, finetunes, tmp_path, **case_fields(case, finetunes))
    assert result["equal_fraction"] == 1.0, result
    # the fine-tune's head is ignored, as merging-eval ignores it
    assert "lm_head.weight" not in read_state_dict(tmp_path / "ours")


# One tensor per expert on disk, in each MoE layout the engine groups as transformers fuses it.
EXPERT_TENSOR = {"mixtral": "model.layers.1.block_sparse_moe.experts.3.w2.weight",
                 "qwen2_moe": "model.layers.1.mlp.experts.3.up_proj.weight"}


def make_moe_family(root: Path, arch: str) -> tuple[Path, list[Path]]:
    base = make_model(root / "base", arch=arch, **MOE_SIZE)
    finetunes = [make_finetune(base, root / f"ft{i}", seed=200 + i) for i in range(3)]
    assert EXPERT_TENSOR[arch] in read_state_dict(base)
    return base, finetunes


@pytest.fixture(scope="module")
def moe_families(tmp_path_factory) -> dict[str, tuple[Path, list[Path]]]:
    return {arch: make_moe_family(tmp_path_factory.mktemp(arch), arch) for arch in sorted(EXPERT_TENSOR)}


@pytest.fixture(scope="module")
def mixtral(moe_families) -> tuple[Path, list[Path]]:
    return moe_families["mixtral"]


@pytest.mark.parametrize("kernels", ["compiled", "torch"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("arch", sorted(EXPERT_TENSOR))
def test_moe_merges_like_merging_eval(moe_families, tmp_path, monkeypatch, arch, case, kernels):
    """Element-wise methods and ties_merging_dare's global threshold are indifferent to how experts are
    stored; per-tensor thresholds are taken over each fused parameter's experts, as merging-eval does.
    Both kernel sets (the torch one is the CUDA path's, run on CPU here)."""
    monkeypatch.setenv("MODELMERGE_ENGINE_KERNELS", kernels)
    base, finetunes = moe_families[arch]
    result = oracle_and_engine(base, finetunes, tmp_path, **case_fields(case, finetunes))
    assert result["equal_fraction"] == 1.0, result


def _renamed_copy(source: Path, target: Path, old: str, new: str) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    save_file({name.replace(old, new): value for name, value in tensors.items()}, target / "model.safetensors",
              metadata={"format": "pt"})
    return target


def _failed_merge(capsys, base: Path, finetunes: list[Path], out: Path, **fields) -> str:
    request = MergeRequest(base_model=str(base), models_to_merge=[str(p) for p in finetunes],
                           output_dir=str(out), **fields)
    assert run_merge(request, progress="none") == 1
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"]


def test_expert_tensors_in_an_unknown_layout_are_refused_for_per_tensor_statistics(mixtral, tmp_path, capsys):
    base, finetunes = mixtral
    models = [_renamed_copy(p, tmp_path / p.name, ".w1.", ".fc_in.") for p in (base, *finetunes)]
    error = _failed_merge(capsys, models[0], models[1:], tmp_path / "out", merge_method="ties_merging")
    assert error.startswith("merge_method: ties_merging computes a statistic per tensor"), error
    assert "model.layers.0.block_sparse_moe.experts.0.fc_in.weight" in error and "(8 tensors)" in error
    error = _failed_merge(capsys, models[0], models[1:], tmp_path / "out", merge_method="mask_merging",
                          weight_mask_rates=[0.5] * 3, mask_strategy="magnitude")
    assert error.startswith("merge_method: mask_merging with mask_strategy magnitude computes"), error
    # element-wise methods do not care how experts are stored
    engine_merge(models[0], models[1:], tmp_path / "average", merge_method="average_merging")


def test_excluding_part_of_a_fused_expert_parameter_is_refused(mixtral, tmp_path, capsys):
    base, finetunes = mixtral
    regex = [r".*experts\.0\.w1\..*"]
    error = _failed_merge(capsys, base, finetunes, tmp_path / "out", merge_method="ties_merging",
                          exclude_param_names_regex=regex)
    assert error.startswith("exclude_param_names_regex: excludes model.layers.0.block_sparse_moe.experts.0.w1"
                            ".weight but not model.layers.0.block_sparse_moe.experts.0.w3.weight"), error
    assert "(model.layers.0.mlp.experts.gate_up_proj, 8 tensors)" in error
    whole = [r".*experts\.\d+\.w[13]\..*"]  # every tensor of the fused gate_up parameters: fine
    ours = engine_merge(base, finetunes, tmp_path / "ours", merge_method="ties_merging",
                        exclude_param_names_regex=whole)
    name = "model.layers.0.block_sparse_moe.experts.2.w3.weight"
    assert torch.equal(ours[name], read_state_dict(base)[name])


@pytest.mark.parametrize("case", ["ties_merging", "average_merging"])
def test_regexes_written_for_fused_expert_names_exclude_like_merging_eval(mixtral, tmp_path, case):
    """merging-eval matches exclude regexes against transformers' names (mlp.experts.gate_up_proj); they
    exclude the same per-expert checkpoint tensors here."""
    base, finetunes = mixtral
    regex = [r"model\.layers\.1\.mlp\.experts\.gate_up_proj", r".*\.0\.mlp\.experts\.down_proj"]
    result = oracle_and_engine(base, finetunes, tmp_path, **CASES[case], exclude_param_names_regex=regex)
    assert result["equal_fraction"] == 1.0, result
    ours, original = read_state_dict(tmp_path / "ours"), read_state_dict(base)
    for name in ("model.layers.1.block_sparse_moe.experts.3.w1.weight",
                 "model.layers.0.block_sparse_moe.experts.1.w2.weight"):
        assert torch.equal(ours[name], original[name]), name


def test_a_regex_naming_the_mixtral_router_as_merging_eval_sees_it_excludes_it_as_there(mixtral, tmp_path):
    """merging-eval matches exclude regexes against the names transformers loads; Mixtral's router
    (block_sparse_moe.gate in the checkpoint) is mlp.gate there. The engine matches that name too."""
    base, finetunes = mixtral
    result = oracle_and_engine(base, finetunes, tmp_path, **CASES["task_arithmetic"],
                               exclude_param_names_regex=[r"model\.layers\.\d+\.mlp\.gate\.weight"])
    assert result["equal_fraction"] == 1.0, result


def test_a_regex_naming_the_mixtral_router_by_its_checkpoint_name_excludes_it_too(mixtral, tmp_path):
    """As for experts, a regex may name the checkpoint's tensor (what the files list): the router is copied from
    the base (merging-eval, seeing only mlp.gate, would merge it: the README says so)."""
    base, finetunes = mixtral
    ours = engine_merge(base, finetunes, tmp_path / "ours", **CASES["task_arithmetic"],
                        exclude_param_names_regex=[r"model\.layers\.\d+\.block_sparse_moe\.gate\.weight"])
    original = read_state_dict(base)
    routers = [name for name in original if name.endswith("block_sparse_moe.gate.weight")]
    assert routers and all(torch.equal(ours[name], original[name]) for name in routers)
    assert any(not torch.equal(ours[name], original[name]) for name in original if name not in routers)


# --- safetensors headers --------------------------------------------------------------------------------------

def write_safetensors(path: Path, header: object, data: bytes, *, header_length: int | None = None) -> Path:
    """A safetensors file made by hand: the header exactly as given (valid or not), then `data`."""
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded) if header_length is None else header_length) + encoded + data)
    return path


def _entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


BROKEN_HEADERS = {
    "bad-json": (b'{"a": {"dtype": "F32",', 16, "cannot read safetensors header: Expecting"),
    "not-an-object": ([1, 2], 0, "cannot read safetensors header: a JSON list, not an object"),
    "header-past-end": (None, 0, "cannot read safetensors header: it claims 4096 bytes but the file has"),
    "size-mismatch": ({"a.weight": _entry("F32", [2, 3], 0, 16)}, 24,
                      "tensor a.weight: data_offsets [0, 16] hold 16 bytes but shape [2, 3] of F32 needs 24"),
    "past-the-file": ({"a.weight": _entry("BF16", [8], 8, 24)}, 16,
                      "tensor a.weight: its data ends at byte"),
    "overlap": ({"a.weight": _entry("F32", [4], 0, 16), "b.weight": _entry("F32", [4], 8, 24)}, 24,
                "tensors a.weight (bytes 0-16) and b.weight (bytes 8-24) overlap"),
    "bad-shape": ({"a.weight": _entry("F32", [-1], 0, 0)}, 0,
                  "tensor a.weight: shape [-1] is not a list of non-negative integers"),
    "bad-offsets": ({"a.weight": _entry("F32", [2], 8, 0)}, 8,
                    "tensor a.weight: data_offsets [8, 0] is not [begin, end] with 0 <= begin <= end"),
    "not-an-entry": ({"a.weight": "F32"}, 0, "tensor a.weight: header entry is not an object"),
    "unknown-dtype": ({"a.weight": _entry("F4", [2], 0, 1)}, 1, "tensor a.weight has unsupported dtype F4"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_HEADERS))
def test_broken_safetensors_headers_are_refused_naming_file_and_tensor(tmp_path, case):
    from modelmerge_engine.errors import MergeError
    from modelmerge_engine.safetensors_io import SafetensorsModel

    header, data_bytes, expected = BROKEN_HEADERS[case]
    file = tmp_path / "model.safetensors"
    if header is None:
        write_safetensors(file, {}, b"", header_length=4096)
    else:
        write_safetensors(file, header, bytes(data_bytes))
    with pytest.raises(MergeError) as raised:
        SafetensorsModel(tmp_path, "models_to_merge[1] org/model")
    message = str(raised.value)
    assert message.startswith(f"models_to_merge[1] org/model: {file}: "), message
    assert expected in message, message


@pytest.mark.parametrize(("weight_map", "expected"), [
    ({"a.weight": "../outside.safetensors"}, "shard '../outside.safetensors' is outside the model directory"),
    ({"a.weight": "/etc/model.safetensors"}, "shard '/etc/model.safetensors' is outside the model directory"),
    (["model-00001-of-00001.safetensors"], "weight_map is not an object of tensor name to shard file name"),
])
def test_an_index_pointing_outside_the_model_or_malformed_is_refused(tmp_path, weight_map, expected):
    from modelmerge_engine.errors import MergeError
    from modelmerge_engine.safetensors_io import SafetensorsModel

    model = tmp_path / "model"
    model.mkdir()
    write_safetensors(tmp_path / "outside.safetensors", {"a.weight": _entry("F32", [1], 0, 4)}, bytes(4))
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(MergeError) as raised:
        SafetensorsModel(model, "base_model m")
    assert str(raised.value) == f"base_model m: model.safetensors.index.json: {expected}"


def test_a_broken_finetune_fails_the_merge_and_leaves_nothing(tied_base_untied_finetune, tmp_path, capsys):
    base, finetunes = tied_base_untied_finetune
    broken = tmp_path / "broken"
    shutil.copytree(finetunes[0], broken)
    raw = bytearray((broken / "model.safetensors").read_bytes())
    (broken / "model.safetensors").write_bytes(bytes(raw[: len(raw) // 2]))  # truncated
    error = _failed_merge(capsys, base, [broken, finetunes[1]], tmp_path / "out", merge_method="task_arithmetic")
    assert error.startswith(f"models_to_merge[0] {broken}: {broken / 'model.safetensors'}: tensor "), error
    assert "(truncated?)" in error


# --- unaligned tensors ------------------------------------------------------------------------------------------

def write_unaligned(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """The tensors after a 3-byte U8 tensor, so every other tensor's data is misaligned for its dtype."""
    odd = torch.tensor([7, 8, 9], dtype=torch.uint8)
    codes = {torch.bfloat16: "BF16", torch.float32: "F32", torch.uint8: "U8"}
    ordered = {"model.odd_buffer": odd, **tensors}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, tensor in ordered.items():
        blob = tensor.contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = _entry(codes[tensor.dtype], list(tensor.shape), offset, offset + len(blob))
        blobs.append(blob)
        offset += len(blob)
    path.mkdir(parents=True, exist_ok=True)
    return write_safetensors(path / "model.safetensors", header, b"".join(blobs)).parent


def test_unaligned_tensors_are_read_range_by_range_copying_each_byte_once(tmp_path):
    import tracemalloc

    from modelmerge_engine.safetensors_io import SafetensorsModel

    values = torch.arange(1 << 20, dtype=torch.float32)
    model = SafetensorsModel(write_unaligned(tmp_path / "m", {"w": values}), "base_model m")
    assert model.tensors["w"].offset % 4 == 3
    step = 1 << 14
    pieces = []
    tracemalloc.start()
    try:
        for start in range(0, values.numel(), step):
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            pieces.append(model.read("w", start, start + step))
            assert tracemalloc.get_traced_memory()[1] - before < 2 * step * 4  # this range, not the tensor
            assert pieces[-1].flags.aligned
    finally:
        tracemalloc.stop()
    assert np.array_equal(np.concatenate(pieces), values.numpy())
    model.close()


def test_a_merge_of_unaligned_checkpoints_equals_the_aligned_one(tmp_path):
    """Same tensors, once misaligned by an odd-sized buffer and once as safetensors lays them out."""
    from safetensors.torch import save_file

    base, finetunes = make_family(tmp_path / "aligned", n=2, **SIZE)
    unaligned = []
    for model in (base, *finetunes):
        tensors = read_state_dict(model)
        save_file({**tensors, "model.odd_buffer": torch.tensor([7, 8, 9], dtype=torch.uint8)},
                  model / "model.safetensors", metadata={"format": "pt"})
        target = write_unaligned(tmp_path / "unaligned" / model.name, tensors)
        shutil.copy(model / "config.json", target / "config.json")
        unaligned.append(target)
    fields = {"merge_method": "ties_merging", "param_value_mask_rate": 0.5}
    expected = engine_merge(base, finetunes, tmp_path / "from-aligned", **fields)
    ours = engine_merge(unaligned[0], unaligned[1:], tmp_path / "from-unaligned", **fields)
    assert set(ours) == set(expected) and "model.odd_buffer" in ours
    assert all(torch.equal(ours[name], expected[name]) for name in expected)
