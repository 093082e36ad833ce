"""Evaluation as part of a merge (`modelmerge merge --eval-data ...`, `evaluation` in --spec), as users and the
operator run it: a real subprocess over tiny chat models made on the fly (a base that has learnt the data, so a
broken merge has something to lose), real data files, a filled Hugging Face cache offline."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from modelmerge.contract import MAX_SUMMARY_BYTES, MergeProgress, MergeSummary, parse_progress
from modelmerge_engine.evaluation.data import load_data_files
from modelmerge_engine.evaluation.options import EvalOptions
from modelmerge_engine.evaluation.scoring import evaluate
from tests.helpers.eval_data import (
    CHAT_VOCAB,
    make_chat_finetune,
    make_chat_model,
    make_records,
    train_on,
    write_records,
)
from tests.helpers.models import fill_hf_cache
from tests.helpers.tokenizers import CORPUS_WORDS

SIZE = {"hidden": 64, "intermediate": 128}
MAX_LENGTH = 100
CODE_RECORDS = make_records(12, seed=5)
# A prompt longer than MAX_LENGTH tokens: its answer is cut away entirely (counted, named, no tokens).
LONG_PROMPT = {"instruction": " ".join(CORPUS_WORDS * 4), "output": "the answer"}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A base that has learnt the code records and two fine-tunes close to it, with the chat tokenizer."""
    root = tmp_path_factory.mktemp("eval-merge")
    base = train_on(make_chat_model(root / "base", **SIZE), CODE_RECORDS, steps=30, max_length=128)
    return base, [make_chat_finetune(base, root / f"ft{i}", seed=40 + i) for i in range(2)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-merge-data")
    write_records(root / "code.json", [*CODE_RECORDS, LONG_PROMPT])
    write_records(root / "algebra.jsonl", make_records(7, seed=6, layout=("problem", "solution")), jsonl=True)
    return root


def merge_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modelmerge.cli", "merge", "--progress", "lines", *args],
                          capture_output=True, text=True, env={**os.environ, **(env or {})})


def inputs_flags(base: Path, finetunes: list[Path], method: str | None = "average_merging") -> list[str]:
    """The inputs, and the method unless it comes from elsewhere (None)."""
    return ["--base-model", str(base), "--models-to-merge", ",".join(map(str, finetunes)),
            *(["--merge-method", method] if method else [])]


def summary_of(result: subprocess.CompletedProcess) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


def progress_lines(stderr: str) -> list[tuple[MergeProgress, str]]:
    """The progress lines among what else goes to stderr (transformers' load report of a model it cannot load)."""
    parsed = ((parse_progress(line), line) for line in stderr.splitlines())
    return [(progress, line) for progress, line in parsed if progress is not None]


def assert_progress(stderr: str, steps: list[str]) -> None:
    """Every line plans all the steps (the evaluation's from the first line on), in order; the overall percent
    never goes down and ends at 100; each evaluation step's last line counts the tokens it planned."""
    parsed = progress_lines(stderr)
    assert parsed, stderr
    assert {p.steps for p, _ in parsed} == {len(steps)}
    assert [p.step for p, _ in parsed] == sorted((p.step for p, _ in parsed), key=steps.index)
    assert {p.step for p, _ in parsed} == set(steps)
    percents = [p.percent for p, _ in parsed]
    assert all(a <= b for a, b in zip(percents, percents[1:], strict=False)), percents
    assert percents[-1] == 100.0
    for step in steps[1:]:
        done, planned = map(int, re.search(r" (\d+)/(\d+) tokens", [line for p, line in parsed
                                                                   if p.step == step][-1]).groups())
        assert done == planned > 0, step


def assert_nothing_written(parent: Path, name: str) -> None:
    assert not parent.exists() or [p.name for p in parent.iterdir() if name in p.name] == []


def test_merge_evaluates_the_written_model_and_its_inputs(family, data_dir, tmp_path):
    """--spec with evaluation and an --eval-* flag overriding it; the merged model's scores equal `modelmerge
    eval` of the written model, the baselines' equal evaluations of each input on their own, and the results
    are in the summary (the contract's MergeEvaluation), merge_report.json and the model card."""
    base, finetunes = family
    out = tmp_path / "merged"
    data = [str(data_dir / "code.json"), str(data_dir / "algebra.jsonl")]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"merge_method": "task_arithmetic", "scaling_coefficient": 0.5,
                                "evaluation": {"data": data, "max_length": MAX_LENGTH, "batch_size": 50,
                                               "baselines": True}}))
    summary_file = tmp_path / "summary.json"
    result = merge_cli("--spec", str(spec), *inputs_flags(base, finetunes, None), "--output-dir", str(out),
                       "--eval-batch-size", "3", "--summary-file", str(summary_file))
    assert result.returncode == 0, result.stderr
    summary = MergeSummary.model_validate(summary_of(result))
    assert summary_file.read_text() == result.stdout.strip().splitlines()[-1]
    evaluation = summary.evaluation
    assert evaluation.state == "Succeeded" and evaluation.message is None
    assert (evaluation.dtype, evaluation.device) == ("float32", "cpu")
    assert_progress(result.stderr, ["merge", "eval", "eval-base", "eval-finetune-1", "eval-finetune-2"])

    report = json.loads((out / "merge_report.json").read_text())["evaluation"]
    assert report["options"] == {"max_length": MAX_LENGTH, "batch_size": 3, "limit": None, "baselines": True}
    merged = report["merged"]
    assert merged["model"]["path"] == str(out)
    assert [f["answer_cut_away"] for f in merged["files"]] == [[len(CODE_RECORDS)], []]
    assert [(f.name, f.records, f.answerCutAway) for f in evaluation.files] == [("code", 13, 1), ("algebra", 7, 0)]
    assert evaluation.overall.ce == merged["overall"]["ce"] and evaluation.overall.tokens == merged["overall"]["tokens"]

    eval_report = tmp_path / "eval.json"
    alone = subprocess.run([sys.executable, "-m", "modelmerge.cli", "eval", "--progress", "none", "--model", str(out),
                            "--data", *data, "--max-length", str(MAX_LENGTH), "--batch-size", "3",
                            "--output", str(eval_report)], capture_output=True, text=True)
    assert alone.returncode == 0, alone.stderr
    expected = json.loads(eval_report.read_text())
    assert merged["overall"]["ce"] == pytest.approx(expected["overall"]["ce"], rel=1e-9)
    for ours, theirs in zip(merged["files"], expected["files"], strict=True):
        assert (ours["tokens"], ours["ce"]) == (theirs["tokens"], pytest.approx(theirs["ce"], rel=1e-9))

    files = load_data_files([Path(d) for d in data])
    options = EvalOptions(max_length=MAX_LENGTH, batch_size=3)
    assert [(b.model, b.role) for b in evaluation.baselines] == \
        [(str(base), "base"), (str(finetunes[0]), "finetuned"), (str(finetunes[1]), "finetuned")]
    for baseline, model in zip(evaluation.baselines, [base, *finetunes], strict=True):
        separate = evaluate(str(model), files, options)
        assert baseline.ce == pytest.approx(separate["overall"]["ce"], rel=1e-9)
        assert baseline.files == pytest.approx({f["name"]: f["ce"] for f in separate["files"]}, rel=1e-9)
    best = min(evaluation.baselines, key=lambda b: b.ce)
    assert (evaluation.bestInput, evaluation.bestInputCe) == (best.model, best.ce)

    card = (out / "README.md").read_text()
    assert "## Evaluation" in card and f"max_length {MAX_LENGTH}, batch size 3" in card
    assert "| model | role | CE | PPL | code CE | algebra CE |" in card
    assert f"| this merge | merged | {evaluation.overall.ce:.4f} |" in card
    assert f"| `{base}` | base | {evaluation.baselines[0].ce:.4f} |" in card
    assert f"| `{finetunes[1]}` | fine-tune 2 | {evaluation.baselines[2].ce:.4f} |" in card
    assert f"Best input: `{best.model}` with CE {best.ce:.4f}" in card
    code = evaluation.files[0]
    assert f"| code | {code.ce:.4f} | {code.ppl:.3f} | 13 | {code.tokens} | {len(CODE_RECORDS)} |" in card


def test_a_broken_merge_is_far_worse_than_its_inputs_in_the_same_report(family, data_dir, tmp_path):
    """task_arithmetic with scaling coefficient 25 of fine-tunes close to their base 'succeeds' as a merge; its
    own evaluation report shows it far worse than every input."""
    base, finetunes = family
    out = tmp_path / "broken"
    result = merge_cli(*inputs_flags(base, finetunes, "task_arithmetic"), "--scaling-coefficient", "25",
                       "--output-dir", str(out), "--eval-data", str(data_dir / "code.json"), "--eval-baselines",
                       "--eval-batch-size", "8")
    assert result.returncode == 0, result.stderr
    evaluation = MergeSummary.model_validate(summary_of(result)).evaluation
    inputs = [b.ce for b in evaluation.baselines]
    assert len(inputs) == 3 and max(inputs) < 0.5 * math.log(CHAT_VOCAB), inputs  # the inputs know the data
    assert evaluation.overall.ce > 2 * max(inputs), (evaluation.overall.ce, inputs)
    assert evaluation.bestInputCe == min(inputs)
    report = json.loads((out / "merge_report.json").read_text())["evaluation"]
    assert report["merged"]["overall"]["ce"] == evaluation.overall.ce
    assert [b["report"]["overall"]["ce"] for b in report["baselines"]] == inputs


@pytest.mark.parametrize(("content", "message"), [
    ('[{"instruction": "a", "output": "b"}, {"instruction": "c"}]',
     "record 1: missing 'output' (a record with 'instruction' needs 'output')"),
    ("", "no records (an empty file or an empty array)"),
    ('{"instruction": "a", "output": "b"}\nnot json\n', "record 1 (line 2) is not valid JSON"),
])
def test_bad_data_exits_2_before_the_merge_and_writes_nothing(family, tmp_path, content, message):
    base, finetunes = family
    bad = tmp_path / "data" / "bad.jsonl"
    bad.parent.mkdir()
    bad.write_text(content)
    out = tmp_path / "new" / "parents" / "merged"
    result = merge_cli(*inputs_flags(base, finetunes), "--output-dir", str(out), "--eval-data", str(bad))
    assert result.returncode == 2, result.stderr
    error = summary_of(result)["error"]
    assert error.startswith(f"data file {bad}: {message}"), error
    assert not (tmp_path / "new").exists() and "[merge" not in result.stderr


def test_missing_data_and_an_invalid_evaluation_exit_2(family, tmp_path):
    base, finetunes = family
    out = tmp_path / "merged"
    missing = merge_cli(*inputs_flags(base, finetunes), "--output-dir", str(out),
                        "--eval-data", str(tmp_path / "absent.json"))
    assert missing.returncode == 2
    assert summary_of(missing)["error"] == f"data: {tmp_path / 'absent.json'} does not exist"
    invalid = merge_cli(*inputs_flags(base, finetunes), "--output-dir", str(out), "--eval-data", "x.json",
                        "--eval-batch-size", "0")
    assert invalid.returncode == 2 and "evaluation.batch_size" in summary_of(invalid)["error"]
    no_data = merge_cli(*inputs_flags(base, finetunes), "--output-dir", str(out), "--eval-baselines")
    assert no_data.returncode == 2 and "evaluation.data" in summary_of(no_data)["error"]
    assert_nothing_written(tmp_path, "merged")


def test_an_evaluation_failure_keeps_the_merged_model(family, data_dir, tmp_path):
    """A fine-tune whose config does not fit its weights merges (the merge reads tensors, not configs) but
    cannot be loaded for its baseline: the merge succeeds (exit 0, the model in place) and the evaluation is
    Failed with the reason, with what was evaluated before it."""
    base, finetunes = family
    odd = tmp_path / "odd-finetune"
    odd.mkdir()
    for file in finetunes[1].iterdir():
        (odd / file.name).write_bytes(file.read_bytes())
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "intermediate_size": SIZE["intermediate"] // 2}))
    out = tmp_path / "merged"
    result = merge_cli(*inputs_flags(base, [finetunes[0], odd]), "--output-dir", str(out),
                       "--eval-data", str(data_dir), "--eval-baselines")
    assert result.returncode == 0, result.stderr
    summary = MergeSummary.model_validate(summary_of(result))
    evaluation = summary.evaluation
    assert summary.status == "succeeded" and (out / "model.safetensors").is_file()
    assert evaluation.state == "Failed"
    assert evaluation.message.startswith(f"evaluating models_to_merge[1] {odd} failed: models_to_merge[1]: cannot "
                                         f"load {odd} as a causal language model"), evaluation.message
    assert evaluation.overall.ce is not None and [b.role for b in evaluation.baselines] == ["base", "finetuned"]
    report = json.loads((out / "merge_report.json").read_text())["evaluation"]
    assert (report["state"], report["message"]) == ("Failed", evaluation.message)
    assert f"**The evaluation failed** (the merged model was kept): {evaluation.message}" in \
        (out / "README.md").read_text()
    parsed = progress_lines(result.stderr)
    assert [p.percent for p, _ in parsed] == sorted(p.percent for p, _ in parsed)
    assert parsed[-1][0].percent == 100.0 and parsed[-1][0].step == "eval-finetune-2"


def test_the_summary_fits_a_termination_message_with_16_files_and_8_baselines(family, tmp_path):
    """16 data files and 8 baselines (the base and 7 fine-tunes): the summary line stays within
    MAX_SUMMARY_BYTES (the baselines' per-file scores give way first) and keeps the overall scores;
    merge_report.json keeps everything."""
    base, finetunes = family
    many = [*finetunes, *(make_chat_finetune(base, tmp_path / f"ft{i}", seed=70 + i) for i in range(5))]
    data = tmp_path / "data"
    for i in range(16):
        write_records(data / f"subject-{i:02d}-of-the-evaluation.json", make_records(2, seed=100 + i, max_words=6))
    out = tmp_path / "merged"
    summary_file = tmp_path / "summary.json"
    result = merge_cli(*inputs_flags(base, many, "ties_merging"), "--output-dir", str(out),
                       "--eval-data", str(data), "--eval-baselines", "--eval-batch-size", "32",
                       "--summary-file", str(summary_file))
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip().splitlines()[-1]
    assert len(line.encode()) <= MAX_SUMMARY_BYTES and summary_file.read_text() == line
    evaluation = MergeSummary.model_validate_json(line).evaluation
    assert evaluation.state == "Succeeded" and evaluation.overall.ce is not None
    assert len(evaluation.files) == 16 and len(evaluation.baselines) == 8
    assert all(b.ce is not None and b.files == {} for b in evaluation.baselines)
    assert evaluation.bestInput in {str(base), *map(str, many)}
    report = json.loads((out / "merge_report.json").read_text())["evaluation"]
    assert [len(b["report"]["files"]) for b in report["baselines"]] == [16] * 8


def test_summary_fitting_keeps_the_overall_scores():
    """When even the merged model's per-file scores do not fit, they go too; the overall scores never do."""
    from modelmerge_engine.run import _fitted_summary_line

    names = [f"{i:02d}" + "x" * 251 for i in range(16)]
    evaluation = {"state": "Succeeded", "overall": {"ce": 1.5, "tokens": 10},
                  "files": [{"name": name, "ce": 1.5, "ppl": 4.48, "tokens": 10, "records": 1} for name in names],
                  "baselines": [{"model": f"m{i}", "role": "finetuned", "ce": 2.0,
                                 "files": {name: 2.0 for name in names}} for i in range(8)]}
    line = _fitted_summary_line({"status": "succeeded", "files": names, "evaluation": evaluation})
    assert len(line.encode()) <= MAX_SUMMARY_BYTES
    fitted = json.loads(line)
    assert "files" not in fitted and "files" not in fitted["evaluation"]
    assert fitted["evaluation"]["overall"] == {"ce": 1.5, "tokens": 10}
    assert [b["ce"] for b in fitted["evaluation"]["baselines"]] == [2.0] * 8


def test_hf_dataset_through_a_filled_cache_offline(family, data_dir, tmp_path):
    base, finetunes = family
    hf_home = tmp_path / "hf"
    commit = fill_hf_cache(hf_home, "tiny-org/evals", data_dir, repo_type="dataset")
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_secret_never_shown"}
    out = tmp_path / "merged"
    result = merge_cli(*inputs_flags(base, finetunes), "--output-dir", str(out),
                       "--eval-data", "hf://datasets/tiny-org/evals@main/code.json", env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "merge_report.json").read_text())["evaluation"]
    (source,) = report["data"]
    assert (source["ref"], source["source"], source["revision"]) == \
        ("hf://datasets/tiny-org/evals@main/code.json", "huggingface", commit)
    local = evaluate(str(out), load_data_files([data_dir / "code.json"]), EvalOptions())
    assert report["merged"]["overall"]["ce"] == pytest.approx(local["overall"]["ce"], rel=1e-9)
    written = "".join(p.read_text() for p in (out / "README.md", out / "merge_report.json"))
    assert "hf_secret_never_shown" not in result.stdout + result.stderr + written

    absent = merge_cli(*inputs_flags(base, finetunes), "--output-dir", str(tmp_path / "other"),
                       "--eval-data", "hf://datasets/tiny-org/absent/code.json", env=env)
    assert absent.returncode == 1
    assert summary_of(absent)["error"].startswith("data: cannot load tiny-org/absent: HF_HUB_OFFLINE is set and it "
                                                  "is not in the cache")
    assert_nothing_written(tmp_path, "other")


def test_sigterm_during_the_evaluation_leaves_nothing(family, tmp_path):
    base, finetunes = family
    data = write_records(tmp_path / "many.json", make_records(400, seed=8))
    out = tmp_path / "merged"
    process = subprocess.Popen([sys.executable, "-m", "modelmerge.cli", "merge", "--progress", "lines",
                                *inputs_flags(base, finetunes), "--output-dir", str(out), "--eval-data", str(data),
                                "--eval-batch-size", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    for line in process.stderr:
        if line.startswith("[eval "):  # the merge is complete, its evaluation has begun
            process.send_signal(signal.SIGTERM)
            break
    stdout, _ = process.communicate()
    assert process.returncode == 128 + signal.SIGTERM
    assert json.loads(stdout.strip().splitlines()[-1])["error"] == "interrupted by SIGTERM"
    assert_nothing_written(tmp_path, "merged")


def test_without_torch_an_evaluated_merge_fails_before_merging(family, data_dir, tmp_path):
    """The CPU merge image has no torch: a request with evaluation fails at once naming what to use."""
    base, finetunes = family
    out = tmp_path / "merged"
    argv = ["merge", *inputs_flags(base, finetunes), "--output-dir", str(out), "--eval-data", str(data_dir)]
    code = ("import sys\nsys.modules['torch'] = None  # unimportable, as in the CPU merge image\n"
            f"from modelmerge.cli import main\nsys.exit(main({argv!r}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    assert "evaluation needs torch and transformers" in summary_of(result)["error"]
    assert "'eval' extra" in summary_of(result)["error"] and "Traceback" not in result.stderr
    assert_nothing_written(tmp_path, "merged")


def test_an_error_in_the_middle_of_the_evaluation_keeps_the_merged_model(family, data_dir, tmp_path, monkeypatch,
                                                                        capsys):
    """Any error while the merged model is scored (here one as CUDA running out of memory would raise, after
    the first batch) is the evaluation's failure: the merge is kept, the remaining steps are passed through to
    100%."""
    from modelmerge.contract import MergeRequest
    from modelmerge_engine.evaluation import metric
    from modelmerge_engine.run import run_merge

    real_score_records = metric.score_records

    def failing_after_one_batch(model, records, *, batch_size, on_batch):
        def one_batch_then_fail(tokens):
            on_batch(tokens)
            raise RuntimeError("CUDA out of memory (simulated)")

        return real_score_records(model, records, batch_size=batch_size, on_batch=one_batch_then_fail)

    monkeypatch.setattr(metric, "score_records", failing_after_one_batch)
    base, finetunes = family
    out = tmp_path / "merged"
    request = MergeRequest(base_model=str(base), models_to_merge=[str(p) for p in finetunes],
                           merge_method="average_merging", output_dir=str(out),
                           evaluation={"data": [str(data_dir)], "batch_size": 2, "baselines": True})
    assert run_merge(request, progress="lines") == 0
    captured = capsys.readouterr()
    evaluation = MergeSummary.model_validate_json(captured.out.strip().splitlines()[-1]).evaluation
    assert (evaluation.state, evaluation.message) == \
        ("Failed", "evaluating the merged model failed: RuntimeError: CUDA out of memory (simulated)")
    assert evaluation.overall is None and evaluation.baselines == [] and (out / "model.safetensors").is_file()
    report = json.loads((out / "merge_report.json").read_text())["evaluation"]
    assert (report["state"], report["merged"], report["baselines"]) == ("Failed", None, [])
    parsed = progress_lines(captured.err)
    assert [p.percent for p, _ in parsed] == sorted(p.percent for p, _ in parsed)
    assert (parsed[-1][0].percent, parsed[-1][0].step, parsed[-1][0].steps) == (100.0, "eval-finetune-2", 5)
