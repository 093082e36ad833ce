"""`modelmerge merge` as users and the operator run it: a real subprocess over real safetensors files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from modelmerge.contract import parse_progress
from tests.helpers.models import fill_hf_cache, make_family, make_finetune, make_model, read_state_dict
from tests.helpers.small_disk import small_tmpfs

SIZE = {"vocab": 256, "hidden": 64, "intermediate": 160, "layers": 2}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-family")
    base, fts = make_family(root, n=2, **SIZE)
    return base, fts


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modelmerge.cli", "merge", "--progress", "lines", *args],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout)


def summary_of(result: subprocess.CompletedProcess) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_nothing_left(parent: Path, name: str) -> None:
    leftovers = [p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")] \
        if parent.exists() else []
    assert leftovers == [], leftovers


def test_merge_writes_a_loadable_model_with_report_and_summary(family, tmp_path):
    base, fts = family
    out = tmp_path / "merged"
    summary_file = tmp_path / "summary.json"
    result = run_cli("--base-model", str(base), "--models-to-merge", f"{fts[0]},{fts[1]}",
                     "--merge-method", "ties_merging", "--scaling-coefficient", "0.5", "--output-dir", str(out),
                     "--max-shard-size", "64KB", "--summary-file", str(summary_file))
    assert result.returncode == 0, result.stderr
    summary = summary_of(result)
    assert summary["status"] == "succeeded" and summary["output_dir"] == str(out)
    assert json.loads(summary_file.read_text()) == summary
    progress = parse_progress(result.stderr)
    assert progress is not None and (progress.step, progress.percent, progress.stepIndex) == ("merge", 100.0, 1)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "merge_report.json").read_text())
    assert report["method"] == "ties_merging" and report["parameters"]["scaling_coefficient"] == 0.5
    assert report["inputs"]["models_to_merge"][1]["ref"] == str(fts[1])
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model:") and "ties_merging" in card

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out) is not None
    logits = model(torch.tensor([[1, 5, 6, 7]])).logits
    assert logits.shape[-1] == SIZE["vocab"] and torch.isfinite(logits).all()
    assert_nothing_left(tmp_path, "merged.partial")


def test_spec_file_with_flag_override(family, tmp_path):
    base, fts = family
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"base_model": str(base), "models_to_merge": [str(p) for p in fts],
                                "merge_method": "task_arithmetic", "scaling_coefficient": 0.3,
                                "output_dir": str(tmp_path / "ignored")}))
    result = run_cli("--spec", str(spec), "--output-dir", str(tmp_path / "out"), "--scaling-coefficient", "1")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["parameters"]["scaling_coefficient"] == 1.0
    assert not (tmp_path / "ignored").exists()


def test_hugging_face_repo_ids_resolve_from_a_filled_cache(family, tmp_path):
    base, fts = family
    hf_home = tmp_path / "hf"
    commit = fill_hf_cache(hf_home, "Qwen/Qwen2.5-0.5B", base)
    fill_hf_cache(hf_home, "InfiX-ai/Qwen-base-0.5B-code", fts[0])
    fill_hf_cache(hf_home, "InfiX-ai/Qwen-base-0.5B-algebra", fts[1])
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out"
    result = run_cli("--base-model", "Qwen/Qwen2.5-0.5B", "--models-to-merge",
                     "InfiX-ai/Qwen-base-0.5B-code,InfiX-ai/Qwen-base-0.5B-algebra",
                     "--merge-method", "task_arithmetic", "--scaling-coefficient", "0.3", "--output-dir", str(out),
                     env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "merge_report.json").read_text())
    assert report["inputs"]["base_model"] == {**report["inputs"]["base_model"], "source": "huggingface",
                                              "revision": commit}
    direct = tmp_path / "direct"
    assert run_cli("--base-model", str(base), "--models-to-merge", f"{fts[0]},{fts[1]}", "--merge-method",
                   "task_arithmetic", "--scaling-coefficient", "0.3", "--output-dir", str(direct)).returncode == 0
    ours, expected = read_state_dict(out), read_state_dict(direct)
    assert all(torch.equal(ours[k], expected[k]) for k in expected)

    missing = run_cli("--base-model", "Qwen/Qwen2.5-0.5B", "--models-to-merge", "InfiX-ai/not-cached",
                      "--merge-method", "average_merging", "--output-dir", str(tmp_path / "m"), env=env)
    assert missing.returncode == 1
    assert "models_to_merge[0]: cannot load InfiX-ai/not-cached: HF_HUB_OFFLINE is set" in summary_of(missing)["error"]
    assert_nothing_left(tmp_path, "m")


@pytest.fixture(scope="module")
def broken_models(family, tmp_path_factory):
    """Models that disagree with the family's base in the ways the engine must report."""
    root = tmp_path_factory.mktemp("broken")
    base, _ = family
    wider_vocab = make_model(root / "vocab", vocab=320, hidden=64, intermediate=160, layers=2, tokenizer=False)
    deeper = make_model(root / "deeper", vocab=256, hidden=64, intermediate=160, layers=3, tokenizer=False)
    empty = root / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    corrupt = make_finetune(base, root / "corrupt", seed=7)
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}")
    return {"vocab": wider_vocab, "deeper": deeper, "empty": empty, "corrupt": corrupt}


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("vocab", "shape mismatch for tensor lm_head.weight: base_model ({base}) has [256, 64], "
                  "models_to_merge[1] {model} has [320, 64]"),
        ("deeper", "tensor model.layers.2.input_layernorm.weight is in models_to_merge[1] {model} but missing "
                   "in base_model"),
        ("empty", "models_to_merge[1] {model}: no safetensors weights in"),
        ("corrupt", "cannot read safetensors header"),
        ("nowhere", "models_to_merge[1]: /nonexistent/model is neither an existing directory nor a Hugging Face "
                    "repo id"),
    ],
)
def test_model_errors_name_the_cause_and_leave_nothing(family, broken_models, tmp_path, case, expected):
    base, fts = family
    model = broken_models.get(case, "/nonexistent/model")
    out = tmp_path / "deep" / "out"
    result = run_cli("--base-model", str(base), "--models-to-merge", f"{fts[0]},{model}", "--merge-method",
                     "task_arithmetic", "--output-dir", str(out))
    assert result.returncode == 1
    error = summary_of(result)["error"]
    assert expected.format(base=f"base_model {base}", model=model) in error, error
    assert f"error: {error}" in result.stderr
    assert not (tmp_path / "deep").exists()


def test_missing_tensor_in_a_finetune(family, tmp_path):
    base, fts = family
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    shutil.copytree(fts[0], partial)
    tensors = load_file(partial / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, partial / "model.safetensors", metadata={"format": "pt"})
    result = run_cli("--base-model", str(base), "--models-to-merge", f"{partial},{fts[1]}", "--merge-method",
                     "average_merging", "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 1
    assert ("tensor model.layers.1.mlp.down_proj.weight is in base_model "
            f"(base_model {base}) but missing in models_to_merge[0] {partial}") in summary_of(result)["error"]
    # excluded tensors need not agree
    ok = run_cli("--base-model", str(base), "--models-to-merge", f"{partial},{fts[1]}", "--merge-method",
                 "average_merging", "--exclude-param-names-regex", r".*down_proj.*", "--output-dir",
                 str(tmp_path / "ok"))
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--merge-method", "frankenmerge"], "merge_method: Input should be 'average_merging', 'task_arithmetic'"),
        (["--merge-method", "slerp"], "t is required for slerp"),
        (["--merge-method", "mask_merging", "--weight-mask-rates", "0.5"],
         "weight_mask_rates needs one rate per model: got 1 rates for 2 models_to_merge"),
        (["--merge-method", "mask_merging", "--weight-mask-rates", "0.5,1.0"],
         "weight_mask_rates[1]: Input should be less than 1"),
        (["--merge-method", "mask_merging"], "weight_mask_rates is required for mask_merging"),
        (["--merge-method", "ties_merging", "--param-value-mask-rate", "-0.1"],
         "param_value_mask_rate: Input should be greater than or equal to 0"),
        (["--merge-method", "task_arithmetic", "--exclude-param-names-regex", "model.(layers"],
         "exclude_param_names_regex: invalid regular expression 'model.(layers'"),
        (["--merge-method", "task_arithmetic", "--scaling-coefficient", "nan"],
         "scaling_coefficient: Input should be a finite number"),
    ],
)
def test_invalid_requests_are_rejected_before_anything_happens(family, tmp_path, flags, expected):
    base, fts = family
    out = tmp_path / "out"
    result = run_cli("--base-model", str(base), "--models-to-merge", f"{fts[0]},{fts[1]}", "--output-dir", str(out),
                     *flags)
    assert result.returncode == 2
    assert expected in summary_of(result)["error"], summary_of(result)["error"]
    assert not out.exists()


def test_unknown_keys_in_a_spec_file_are_rejected(family, tmp_path):
    base, fts = family
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"base_model": str(base), "models_to_merge": [str(fts[0])],
                                "merge_method": "task_arithmetic", "scaling_coeficient": 0.3}))
    result = run_cli("--spec", str(spec), "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "scaling_coeficient: unknown field" in summary_of(result)["error"]
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(family, tmp_path):
    base, fts = family
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    args = ["--base-model", str(base), "--models-to-merge", str(fts[0]), "--merge-method", "average_merging",
            "--output-dir", str(out)]
    refused = run_cli(*args)
    assert refused.returncode == 1
    assert "exists and is not empty (pass --overwrite to replace it)" in summary_of(refused)["error"]
    assert (out / "precious.txt").read_text() == "keep me"
    replaced = run_cli(*args, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert not (out / "precious.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_use_gpu_without_cuda_fails_clearly(family, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the GPU path is exercised by the device check")
    base, fts = family
    result = run_cli("--base-model", str(base), "--models-to-merge", str(fts[0]), "--merge-method",
                     "average_merging", "--use-gpu", "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "use_gpu is set but CUDA is not available" in summary_of(result)["error"]
    assert not (tmp_path / "out").exists()


@pytest.fixture
def small_disk(tmp_path):
    with small_tmpfs(tmp_path / "small", size="160k") as mount:
        yield mount


def test_disk_full_is_reported_and_cleaned_up(family, small_disk):
    base, fts = family
    out = small_disk / "models" / "out"
    result = run_cli("--base-model", str(base), "--models-to-merge", f"{fts[0]},{fts[1]}", "--merge-method",
                     "task_arithmetic", "--output-dir", str(out), "--dtype", "float32")
    assert result.returncode == 1
    assert "output_dir: disk full while writing" in summary_of(result)["error"]
    assert list(small_disk.iterdir()) == []


def test_sigterm_mid_merge_leaves_nothing(tmp_path):
    """Large enough to still be running when the signal arrives; the staging directory must go too."""
    base, fts = make_family(tmp_path / "big", n=2, vocab=32000, hidden=256, intermediate=704, layers=4,
                            heads=4, kv_heads=2)
    out = tmp_path / "outs" / "out"
    process = subprocess.Popen([sys.executable, "-m", "modelmerge.cli", "merge", "--progress", "lines",
                                "--base-model", str(base), "--models-to-merge", f"{fts[0]},{fts[1]}",
                                "--merge-method", "ties_merging_dare", "--dtype", "float32",
                                "--output-dir", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".out.partial-") for p in out.parent.glob(".*")) if out.parent.exists() \
            else True:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert json.loads(stdout.strip().splitlines()[-1])["error"] == "interrupted by SIGTERM"
    assert not (tmp_path / "outs").exists()


def test_regexes_with_commas_survive_the_comma_separated_flag(family, tmp_path):
    base, fts = family
    out = tmp_path / "out"
    regexes = [r"model\.layers\.[0-9]{1,3}\.mlp\.(up|down)_proj\..*", r".*embed_tokens.*"]
    result = run_cli("--base-model", str(base), "--models-to-merge", f"{fts[0]},{fts[1]}", "--merge-method",
                     "task_arithmetic", "--exclude-param-names-regex", ",".join(regexes), "--output-dir", str(out))
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "merge_report.json").read_text())["parameters"]["exclude_param_names_regex"] == regexes
    merged, original = read_state_dict(out), read_state_dict(base)
    kept = [name for name in merged if "up_proj" in name or "down_proj" in name or "embed_tokens" in name]
    assert len(kept) == 5 and all(torch.equal(merged[name], original[name]) for name in kept)
    gate = "model.layers.0.mlp.gate_proj.weight"
    assert not torch.equal(merged[gate], original[gate])


def test_a_merge_imports_neither_the_web_framework_nor_the_operator(tmp_path):
    """The parser adds serve's and operator's options (which import FastAPI and kopf) only for those commands: a
    merge pod's start does not pay for them."""
    code = ("import sys, modelmerge.cli as cli\n"
            "try:\n    cli.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "heavy = {'fastapi', 'uvicorn', 'kopf', 'modelmerge_api', 'modelmerge_operator'} & set(sys.modules)\n"
            "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code, "merge", "--progress", "none", "--base-model",
                           str(tmp_path / "missing"), "--models-to-merge", str(tmp_path / "missing2"),
                           "--merge-method", "task_arithmetic", "--output-dir", str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "base_model" in done.stdout  # the merge ran (and failed on its missing input), not the parser
    serve = subprocess.run([sys.executable, "-m", "modelmerge.cli", "serve", "--help"], capture_output=True,
                           text=True, check=True)
    assert "--backend" in serve.stdout  # serve's own options are still there when serve runs


def console(*argv: str) -> subprocess.CompletedProcess:
    """The console script's entry (modelmerge.cli:console) with an exit handler that reports whether the
    interpreter's teardown ran. Its stdout is block-buffered, as a pod's is (no PYTHONUNBUFFERED)."""
    code = ("import atexit, sys\n"
            "atexit.register(lambda: sys.stderr.write('teardown ran\\n'))\n"
            "from modelmerge.cli import console\n"
            "sys.argv[0] = 'modelmerge'\n"
            "console()\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env)


def test_a_merge_ends_its_process_without_teardown_once_its_output_is_flushed(family, tmp_path):
    """The merge's summary (a pipe: block-buffered) and its outputs are complete, its exit code kept, and the
    interpreter's teardown (0.3-0.4 s of freeing modules and numba's kernels) skipped; other commands exit as
    usual."""
    base, fts = family
    out = tmp_path / "merged"
    merged = console("merge", "--progress", "none", "--base-model", str(base), "--models-to-merge", str(fts[0]),
                     "--merge-method", "task_arithmetic", "--output-dir", str(out))
    assert merged.returncode == 0, merged.stderr
    assert summary_of(merged)["status"] == "succeeded" and (out / "merge_report.json").is_file()
    assert "teardown ran" not in merged.stderr
    failed = console("merge", "--progress", "none", "--base-model", str(tmp_path / "missing"), "--models-to-merge",
                     str(fts[0]), "--merge-method", "task_arithmetic", "--output-dir", str(tmp_path / "out2"))
    assert failed.returncode == 1 and summary_of(failed)["status"] == "failed", failed.stderr
    assert "teardown ran" not in failed.stderr
    rejected = console("merge", "--progress", "none", "--base-model", str(base), "--models-to-merge", str(fts[0]),
                       "--merge-method", "slerp", "--output-dir", str(tmp_path / "out3"))
    assert rejected.returncode == 2 and "t is required for slerp" in summary_of(rejected)["error"], rejected.stderr
    assert "teardown ran" not in rejected.stderr
    methods = console("methods")
    assert methods.returncode == 0 and "teardown ran" in methods.stderr
