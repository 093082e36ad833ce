"""Evaluated merges through the REST API's local backend, on a real uvicorn server: the real engine merges tiny chat
models from a pre-filled HF cache and evaluates the result on data files under the output root (the local backend's
data root); the job view, the list and /metrics carry the evaluation, also after a restart. A stand-in engine plays
an evaluation that fails after the merge; bad evaluation input is refused naming the field, creating nothing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from modelmerge.contract import MergeEvaluation
from modelmerge_api.app import create_app
from modelmerge_api.local import LocalBackend
from tests.helpers.eval_data import (
    CHAT_VOCAB,
    make_chat_finetune,
    make_chat_model,
    make_records,
    train_on,
    write_records,
)
from tests.helpers.models import fill_hf_cache
from tests.helpers.rest_api import job, serve_in_thread, submit, wait_status

BASE, FINETUNES = "test/chat-base", ("test/chat-code", "test/chat-algebra")
DATA = "eval/algebra.json"
RECORDS = make_records(10, seed=5)  # the evaluation data, which the base model has learnt
EVAL_FAILURE = "evaluation: out of memory while scoring eval/algebra.json (stand-in engine)"
# Stands in for `modelmerge merge` where the real engine cannot fail this way: it merges (writes an output), keeps
# the request it was given and reports an evaluation that failed.
FAILING_EVALUATION_ENGINE = r'''
import json, os, sys
def arg(flag):
    return sys.argv[sys.argv.index(flag) + 1]
spec = json.load(open(arg("--spec")))
os.makedirs(arg("--output-dir"))
open(os.path.join(arg("--output-dir"), "request.json"), "w").write(json.dumps(spec))
summary = json.dumps({"status": "succeeded", "output_dir": arg("--output-dir"),
                      "evaluation": {"state": "Failed", "message": EVAL_FAILURE}})
open(arg("--summary-file"), "w").write(summary)
print(summary, flush=True)
'''.replace("EVAL_FAILURE", repr(EVAL_FAILURE))


@pytest.fixture(scope="module")
def chat_hub(tmp_path_factory):
    """Tiny chat models under repo ids in an HF cache the merges resolve offline: a base that has learnt the
    evaluation data (so that a broken merge has something to lose) and two fine-tunes close to it."""
    root = tmp_path_factory.mktemp("chat-hub")
    base = train_on(make_chat_model(root / "models" / "base", hidden=64, intermediate=128), RECORDS, steps=30,
                    max_length=128)
    fill_hf_cache(root / "hf", BASE, base)
    for seed, repo in enumerate(FINETUNES, start=1):
        fill_hf_cache(root / "hf", repo, make_chat_finetune(base, root / "models" / repo, seed=seed))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HOME", str(root / "hf"))
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield root


def _request(**changes) -> dict:
    return {"base_model": BASE, "models_to_merge": list(FINETUNES), "merge_method": "task_arithmetic",
            "scaling_coefficient": 0.5, "evaluation": {"data": [DATA], "batch_size": 4}, **changes}


def _data_dir(tmp_path: Path) -> Path:
    """A data dir whose output root holds the evaluation data."""
    write_records(tmp_path / "data" / "output" / DATA, RECORDS)
    return tmp_path / "data"


def _metric(metrics: str, sample: str) -> float:
    """The value of one sample of the Prometheus text, by its name and labels as printed."""
    (value,) = [line.split()[-1] for line in metrics.splitlines() if line.split(" ")[0] == sample]
    return float(value)


def test_an_evaluated_merge_shows_its_evaluation_in_the_job_the_list_and_metrics(chat_hub, tmp_path):
    data_dir = _data_dir(tmp_path)
    with serve_in_thread(create_app(LocalBackend(data_dir))) as url:
        job_id = submit(url, _request(evaluation={"data": [DATA], "batch_size": 4, "baselines": True}))
        final = wait_status(url, job_id, timeout=300)
        assert final["status"] == "completed", final
        evaluation = MergeEvaluation.model_validate(final["evaluation"])
        assert evaluation.state == "Succeeded" and (evaluation.device, evaluation.dtype) == ("cpu", "float32")
        ce = evaluation.overall.ce
        assert ce is not None and math.isfinite(ce) and evaluation.overall.records == 10
        assert [f.name for f in evaluation.files] == ["algebra"]
        assert [b.model for b in evaluation.baselines] == [BASE, *FINETUNES]
        assert evaluation.bestInputCe == min(b.ce for b in evaluation.baselines)
        assert final["params"]["evaluation"]["data"] == [DATA]  # as given, not the engine's absolute path
        listed = requests.get(url + "/api/jobs", timeout=10).json()["jobs"]
        assert [j["evaluation"] for j in listed if j["job_id"] == job_id] == [final["evaluation"]]
        metrics = requests.get(url + "/metrics", timeout=10).text
        assert _metric(metrics, 'modelmerge_evaluations{state="Succeeded"}') == 1.0
        assert _metric(metrics, 'modelmerge_evaluations{state="Failed"}') == 0.0
        assert _metric(metrics, "modelmerge_evaluation_cross_entropy_count") == 1.0
        assert math.isclose(_metric(metrics, "modelmerge_evaluation_cross_entropy_sum"), ce)
        output = Path(final["output_path"])
    # The same CE as `modelmerge eval` on the merged model and the same data.
    report = subprocess.run([sys.executable, "-m", "modelmerge.cli", "eval", "--model", str(output), "--data",
                             str(data_dir / "output" / DATA), "--batch-size", "4", "--progress", "none"],
                            capture_output=True, text=True, env=os.environ.copy())
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout.strip().splitlines()[-1])["ce"] == ce
    # A restarted server shows the finished job's evaluation (read from the merge's summary).
    with serve_in_thread(create_app(LocalBackend(data_dir))) as url:
        assert job(url, job_id)["evaluation"] == final["evaluation"]


def test_a_broken_merge_shows_a_far_worse_ce_than_its_inputs(chat_hub, tmp_path):
    with serve_in_thread(create_app(LocalBackend(_data_dir(tmp_path)))) as url:
        job_id = submit(url, _request(scaling_coefficient=25.0,
                                      evaluation={"data": [DATA], "batch_size": 4, "baselines": True}))
        final = wait_status(url, job_id, timeout=300)
    assert final["status"] == "completed", final
    evaluation = final["evaluation"]
    inputs = [baseline["ce"] for baseline in evaluation["baselines"]]
    assert evaluation["state"] == "Succeeded" and len(inputs) == 3
    assert max(inputs) < 0.5 * math.log(CHAT_VOCAB), inputs  # the inputs know the data
    assert evaluation["overall"]["ce"] > 2 * max(inputs), evaluation


def test_an_evaluation_failure_keeps_the_job_completed(tmp_path):
    engine = tmp_path / "engine.py"
    engine.write_text(FAILING_EVALUATION_ENGINE)
    data_dir = _data_dir(tmp_path)
    with serve_in_thread(create_app(LocalBackend(data_dir, engine_command=[sys.executable, str(engine)]))) as url:
        job_id = submit(url, _request())
        final = wait_status(url, job_id, timeout=60)
        metrics = requests.get(url + "/metrics", timeout=10).text
    assert final["status"] == "completed" and final["error_message"] is None
    assert final["evaluation"]["state"] == "Failed" and final["evaluation"]["message"] == EVAL_FAILURE
    assert _metric(metrics, 'modelmerge_evaluations{state="Failed"}') == 1.0
    assert _metric(metrics, "modelmerge_evaluation_cross_entropy_count") == 0.0
    # The engine got the data file as an absolute path under the output root (its data root).
    request = json.loads((Path(final["output_path"]) / "request.json").read_text())
    assert request["evaluation"]["data"] == [str((data_dir / "output" / DATA).resolve())]


@pytest.mark.parametrize("data, reason", [
    ("/etc/passwd", "relative to the output volume"),
    ("eval/../../secrets.json", "without '..'"),
    ("eval/missing.json", "no such file or folder under the data root"),
    ("outside/link.json", "leads out of the data root"),
    ("hf://models/org/x", "hf://datasets/<owner>/<name>"),
])
def test_bad_evaluation_data_is_refused_naming_the_field_and_nothing_is_created(tmp_path, data, reason):
    data_dir = _data_dir(tmp_path)
    outside = tmp_path / "elsewhere.json"
    write_records(outside, make_records(2))
    (data_dir / "output" / "outside").mkdir()
    (data_dir / "output" / "outside" / "link.json").symlink_to(outside)
    with serve_in_thread(create_app(LocalBackend(data_dir))) as url:
        before = sorted(p.name for p in (data_dir / "output").iterdir())
        response = requests.post(url + "/api/merge", json=_request(evaluation={"data": [DATA, data]}),
                                 timeout=10)
        assert response.status_code == 400, response.text
        body = response.json()
        assert body["error"].startswith(("evaluation.data: ", "invalid merge request: evaluation.data: "))
        assert reason in body["error"] and [d["field"] for d in body["details"]] == ["evaluation.data"]
        assert requests.get(url + "/api/jobs", timeout=10).json()["total"] == 0
        assert sorted(p.name for p in (data_dir / "output").iterdir()) == before
        assert not list((data_dir / "work").iterdir())
