"""`modelmerge eval` as users run it (a real subprocess): progress lines, the JSON summary, the report file,
exit codes, Hugging Face repo ids through a filled cache offline; and a deliberately broken merge measured
against its inputs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest

from modelmerge.contract import MergeRequest, parse_progress
from modelmerge_engine.evaluation.data import load_data_files
from modelmerge_engine.evaluation.options import EvalOptions
from modelmerge_engine.evaluation.scoring import evaluate
from modelmerge_engine.run import run_merge
from tests.helpers.eval_data import (
    CHAT_VOCAB,
    make_chat_finetune,
    make_chat_model,
    make_records,
    train_on,
    write_records,
)
from tests.helpers.models import fill_hf_cache

SIZE = {"hidden": 64, "intermediate": 128}


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return make_chat_model(tmp_path_factory.mktemp("eval-cli") / "model", **SIZE)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-cli-data")
    write_records(root / "code.json", make_records(12, seed=5))
    write_records(root / "algebra.jsonl", make_records(7, seed=6, layout=("problem", "solution")), jsonl=True)
    return root


def run_eval_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modelmerge.cli", "eval", "--progress", "lines", *args],
                          capture_output=True, text=True, env={**os.environ, **(env or {})})


def summary_of(result: subprocess.CompletedProcess) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_eval_prints_progress_and_summary_and_writes_the_report(chat_model, data_dir, tmp_path):
    report_path = tmp_path / "report.json"
    summary_path = tmp_path / "summary.json"
    result = run_eval_cli("--model", str(chat_model), "--data", str(data_dir / "code.json"),
                          str(data_dir / "algebra.jsonl"), "--batch-size", "3", "--max-length", "100",
                          "--output", str(report_path), "--summary-file", str(summary_path))
    assert result.returncode == 0, result.stderr
    summary = summary_of(result)
    report = json.loads(report_path.read_text())
    assert json.loads(summary_path.read_text()) == summary
    assert summary["status"] == "succeeded" and summary["output"] == str(report_path)
    assert summary["ce"] == report["overall"]["ce"] and summary["tokens"] == report["overall"]["tokens"] > 0
    assert summary["files"] == {"code": report["files"][0]["ce"], "algebra": report["files"][1]["ce"]}
    assert (summary["dtype"], summary["device"], report["max_length"], report["batch_size"]) == \
        ("float32", "cpu", 100, 3)
    progress = parse_progress(result.stderr)
    assert progress is not None
    assert (progress.step, progress.stepIndex, progress.steps, progress.percent) == ("eval", 1, 1, 100.0)
    assert "Loading weights" not in result.stderr
    expected = evaluate(str(chat_model), load_data_files([data_dir / "code.json", data_dir / "algebra.jsonl"]),
                        EvalOptions(max_length=100, batch_size=3))
    assert report["overall"]["ce"] == pytest.approx(expected["overall"]["ce"], rel=1e-6)


def test_bad_data_is_refused_before_the_model_is_looked_at(data_dir, tmp_path):
    bad = write_records(tmp_path / "bad.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "a"}],
                        jsonl=True)
    report_path = tmp_path / "report.json"
    result = run_eval_cli("--model", str(tmp_path / "no-such-model"), "--data", str(data_dir), str(bad),
                          "--output", str(report_path))
    assert result.returncode == 2, result.stderr
    assert summary_of(result) == {"status": "failed", "seconds": summary_of(result)["seconds"],
                                  "error": f"data file {bad}: record 1: missing 'output' (a record with "
                                           "'instruction' needs 'output')"}
    assert f"error: data file {bad}: record 1" in result.stderr
    assert not report_path.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


@pytest.mark.parametrize(("flags", "message"), [
    (["--batch-size", "0"], "batch_size: must be at least 1, got 0"),
    (["--dtype", "int8"], "dtype: must be one of bfloat16, float16, float32, got 'int8'"),
    (["--output", "/nonexistent-dir/report.json"], "output: directory /nonexistent-dir does not exist"),
])
def test_bad_options_exit_2_naming_the_field(chat_model, data_dir, flags, message):
    result = run_eval_cli("--model", str(chat_model), "--data", str(data_dir), *flags)
    assert result.returncode == 2, result.stderr
    assert summary_of(result)["error"] == message


def test_repo_id_through_a_filled_cache_offline(chat_model, data_dir, tmp_path):
    hf_home = tmp_path / "hf"
    commit = fill_hf_cache(hf_home, "tiny-org/tiny-chat", chat_model)
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_secret_never_shown"}
    report_path = tmp_path / "report.json"
    result = run_eval_cli("--model", "tiny-org/tiny-chat", "--data", str(data_dir / "code.json"),
                          "--output", str(report_path), env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    assert report["model"]["source"] == "huggingface" and report["model"]["revision"] == commit
    local = evaluate(str(chat_model), load_data_files([data_dir / "code.json"]), EvalOptions())
    assert report["overall"]["ce"] == pytest.approx(local["overall"]["ce"], rel=1e-6)
    assert "hf_secret_never_shown" not in result.stdout + result.stderr + report_path.read_text()

    fill_hf_cache(hf_home, "tiny-org/evals", data_dir, repo_type="dataset")
    from_dataset = run_eval_cli("--model", "tiny-org/tiny-chat", "--data", "hf://datasets/tiny-org/evals/code.json",
                                "--output", str(report_path), env=env)
    assert from_dataset.returncode == 0, from_dataset.stderr
    assert json.loads(report_path.read_text())["overall"] == report["overall"]

    missing = run_eval_cli("--model", "tiny-org/absent", "--data", str(data_dir / "code.json"), env=env)
    assert missing.returncode == 1
    assert summary_of(missing)["error"].startswith(
        "model: cannot load tiny-org/absent: HF_HUB_OFFLINE is set and it is not in the cache")


def test_a_broken_merge_is_far_worse_than_its_inputs(tmp_path):
    """task_arithmetic with scaling coefficient 25 of fine-tunes close to their base: the merge 'succeeds', and
    only the evaluation shows it is broken; a sensible merge of the same inputs stays with them. The base has
    learnt the data first (a random model sits at log(vocab), where nothing gets much worse)."""
    records = make_records(12, seed=5)
    files = load_data_files([write_records(tmp_path / "data" / "code.json", records)])
    base = train_on(make_chat_model(tmp_path / "base", **SIZE), records, steps=30, max_length=128)
    finetunes = [make_chat_finetune(base, tmp_path / f"ft{i}", seed=40 + i) for i in range(2)]
    merged = {}
    for name, coefficient in (("sensible", 0.5), ("broken", 25)):
        request = MergeRequest(base_model=str(base), models_to_merge=[str(p) for p in finetunes],
                               merge_method="task_arithmetic", scaling_coefficient=coefficient,
                               output_dir=str(tmp_path / name))
        assert run_merge(request, progress="none") == 0
        merged[name] = tmp_path / name
    ce = {name: evaluate(str(path), files, EvalOptions(batch_size=8))["overall"]["ce"]
          for name, path in {"base": base, "ft0": finetunes[0], "ft1": finetunes[1], **merged}.items()}
    inputs = [ce["base"], ce["ft0"], ce["ft1"]]
    assert max(inputs) < 0.5 * math.log(CHAT_VOCAB), ce  # the inputs know the data
    assert abs(ce["sensible"] - min(inputs)) < 0.1 * min(inputs), ce
    assert ce["broken"] > 2 * max(inputs), ce


def test_sigterm_during_the_evaluation_reports_and_leaves_no_report(chat_model, tmp_path):
    data = write_records(tmp_path / "many.json", make_records(400, seed=8))
    report_path = tmp_path / "out" / "report.json"
    report_path.parent.mkdir()
    process = subprocess.Popen([sys.executable, "-m", "modelmerge.cli", "eval", "--progress", "lines",
                                "--model", str(chat_model), "--data", str(data), "--batch-size", "1",
                                "--output", str(report_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    for line in process.stderr:
        if line.startswith("[eval 1/1]"):  # the evaluation has begun
            process.send_signal(signal.SIGTERM)
            break
    stdout, _ = process.communicate()
    assert process.returncode == 128 + signal.SIGTERM
    assert json.loads(stdout.strip().splitlines()[-1])["error"] == "interrupted by SIGTERM"
    assert list(report_path.parent.iterdir()) == []


def test_without_torch_the_evaluation_says_what_is_missing(chat_model, data_dir):
    """The CPU merge image has no torch: `modelmerge eval` there fails with a message, not a traceback."""
    code = ("import sys\nsys.modules['torch'] = None  # unimportable, as in the CPU merge image\n"
            "from modelmerge.cli import main\n"
            f"sys.exit(main(['eval', '--model', {str(chat_model)!r}, '--data', {str(data_dir)!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    assert summary_of(result)["error"] == ("evaluation needs torch and transformers, and this installation lacks "
                                           "torch (the CPU merge image and the 'engine' extra carry neither): "
                                           "install the 'eval' extra (pip install 'modelmerge[eval]') or use the "
                                           "GPU merge image")
    assert "Traceback" not in result.stderr
