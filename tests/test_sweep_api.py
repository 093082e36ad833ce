"""Sweeps through the REST API's local backend, on a real uvicorn server (in a thread, or `modelmerge serve` as a
subprocess where a test kills it): a grid finds the best trial, parallelism holds, a trial that fails does not fail
the sweep, early stopping, keep=best, cancel, a restart mid-sweep, and invalid sweeps refused naming the field with
nothing created. A stand-in engine scores each trial from its parameters (so many trials run fast); one sweep runs
the real engine, merging and evaluating tiny chat models."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import sys
from pathlib import Path

import pytest
import requests

from modelmerge.contract import MergeRequest
from modelmerge_api.app import create_app
from modelmerge_api.local import INTERRUPTED, LocalBackend
from tests.helpers.rest_api import FINAL, ServerProcess, job, serve_in_thread, wait_for

DATA = ["eval/a.json", "eval/b.json"]  # the stand-in engine reports these two files, a and b
ACTIVE = ("pending", "running")
# Stands in for `modelmerge merge` with an evaluation: same flags and summary contract. It logs when each trial's
# merge starts and ends (to $SWEEP_EVENTS), sleeps $SWEEP_TRIAL_SECONDS (base_model slow/model: a hundred times
# longer) and scores the trial from its parameters on two data files, a and b: scaling_coefficient >= 1.5 fails the
# merge, 1.2 fails the evaluation.
FAKE_ENGINE = r'''
import argparse, hashlib, json, math, os, signal, sys, time
parser = argparse.ArgumentParser()
parser.add_argument("command")
parser.add_argument("--spec"); parser.add_argument("--output-dir"); parser.add_argument("--summary-file")
parser.add_argument("--progress")
args = parser.parse_known_args()[0]
spec = json.load(open(args.spec))
trial = os.path.basename(args.output_dir)
def event(what):
    if "SWEEP_EVENTS" in os.environ:
        with open(os.environ["SWEEP_EVENTS"], "a") as events:
            events.write(f"{what} {trial}\n")
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
event("start")
try:
    pause = float(os.environ.get("SWEEP_TRIAL_SECONDS", "0.3"))
    time.sleep(pause * (100 if spec["base_model"] == "slow/model" else 1))
finally:
    event("end")
def summary(status, **fields):
    line = json.dumps({"status": status, "output_dir": args.output_dir, **fields})
    open(args.summary_file, "w").write(line); print(line, flush=True)
scale = spec["scaling_coefficient"]
if scale >= 1.5:
    summary("failed", error="base_model: the merge failed (stand-in engine)"); sys.exit(1)
rate = spec["param_value_mask_rate"] if spec["merge_method"] == "ties_merging" else 0.65
a = 1.0 + (scale - 0.6) ** 2 + abs(rate - 0.7)
b = 2.0 + (scale - 1.0) ** 2
overall = (30 * a + 10 * b) / 40
evaluation = {"state": "Succeeded", "overall": {"ce": overall, "ppl": math.exp(overall), "tokens": 40, "records": 4},
              "files": [{"name": "a", "ce": a, "ppl": math.exp(a), "tokens": 30, "records": 2},
                        {"name": "b", "ce": b, "ppl": math.exp(b), "tokens": 10, "records": 2}]}
if abs(scale - 1.2) < 1e-9:
    evaluation = {"state": "Failed", "message": "evaluation: out of memory (stand-in engine)"}
os.makedirs(args.output_dir)
open(os.path.join(args.output_dir, "config.json"), "w").write("{}")
token = hashlib.sha256(os.environ.get("HF_TOKEN", "").encode()).hexdigest()
open(os.path.join(args.output_dir, "token.sha256"), "w").write(token)
report = {"evaluation": {"state": evaluation["state"], "merged": {k: evaluation.get(k) for k in ("overall", "files")}}}
open(os.path.join(args.output_dir, "merge_report.json"), "w").write(json.dumps(report))  # the engine's layout
summary("succeeded", evaluation=evaluation)
'''


def template(**changes) -> dict:
    return {"base_model": "test/base", "models_to_merge": ["test/ft-a", "test/ft-b"],
            "merge_method": "task_arithmetic", "evaluation": {"data": DATA}, **changes}


@pytest.fixture(scope="module")
def fake_engine(tmp_path_factory) -> list[str]:
    path = tmp_path_factory.mktemp("engine") / "fake_engine.py"
    path.write_text(FAKE_ENGINE)
    return [sys.executable, str(path)]


@pytest.fixture
def events(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "events.log"
    path.touch()
    monkeypatch.setenv("SWEEP_EVENTS", str(path))
    return path


def data_dir_with_data(root: Path) -> Path:
    """A local backend's data dir whose output root (the data root) holds the evaluation data."""
    for name in DATA:
        data = root / "output" / name
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text(json.dumps([{"instruction": "1 + 1", "output": "2"}]))
    return root


class Served:
    def __init__(self, url: str, backend: LocalBackend) -> None:
        self.url, self.backend = url, backend

    def post(self, body: dict, **kwargs) -> requests.Response:
        return requests.post(self.url + "/api/sweeps", json=body, timeout=30, **kwargs)

    def start(self, body: dict) -> str:
        response = self.post(body)
        assert response.status_code == 202, response.text
        created = response.json()
        assert created["status"] == "pending" and response.headers["Location"] == created["check_status"]
        return created["sweep_id"]

    def sweep(self, sweep_id: str) -> dict:
        return sweep_of(self.url, sweep_id)

    def wait(self, sweep_id: str, statuses=FINAL, timeout: float = 180) -> dict:
        return wait_sweep(self.url, sweep_id, statuses, timeout)


def sweep_of(url: str, sweep_id: str) -> dict:
    response = requests.get(f"{url}/api/sweeps/{sweep_id}", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def wait_sweep(url: str, sweep_id: str, statuses=FINAL, timeout: float = 180) -> dict:
    def reached() -> dict | None:
        view = sweep_of(url, sweep_id)
        return view if view["status"] in statuses else None

    return wait_for(reached, timeout, f"sweep {sweep_id} to reach {statuses}",
                    context=lambda: json.dumps(sweep_of(url, sweep_id), indent=1))


def sweep_jobs(url: str, sweep_id: str, **params) -> list[dict]:
    """The jobs of one sweep, as GET /api/jobs?sweep_id= filters them (checked against the unfiltered list)."""
    listed = requests.get(url + "/api/jobs", params={"limit": 1000, "sweep_id": sweep_id, **params}, timeout=10)
    assert listed.status_code == 200, listed.text
    jobs = listed.json()["jobs"]
    everything = requests.get(url + "/api/jobs", params={"limit": 1000, **params}, timeout=10).json()["jobs"]
    assert jobs == [j for j in everything if j["sweep_id"] == sweep_id] and listed.json()["total"] == len(jobs)
    return jobs


def reported_ce(output: Path) -> float:
    """The overall cross-entropy of a merged model, from its merge_report.json."""
    return json.loads((output / "merge_report.json").read_text())["evaluation"]["merged"]["overall"]["ce"]


def max_concurrent(events: Path) -> int:
    """The most merges that ran at once, from the order in which they logged their start and end."""
    running = most = 0
    for line in events.read_text().splitlines():
        running += 1 if line.startswith("start ") else -1
        most = max(most, running)
    return most


@pytest.fixture
def make_server(tmp_path, fake_engine):
    contexts = []

    def start(workers: int = 3, engine: list[str] | None = fake_engine) -> Served:
        backend = LocalBackend(data_dir_with_data(tmp_path / f"data{len(contexts)}"), workers=workers,
                               engine_command=engine)
        context = serve_in_thread(create_app(backend))
        contexts.append(context)
        return Served(context.__enter__(), backend)

    yield start
    for context in reversed(contexts):
        context.__exit__(None, None, None)


def test_a_grid_sweep_finds_the_best_trial_within_parallelism(make_server, events):
    server = make_server(workers=3)
    body = {"template": template(), "parallelism": 2,
            "space": {"merge_method": {"values": ["task_arithmetic", "ties_merging"]},
                      "scaling_coefficient": {"start": 0.2, "stop": 1.0, "step": 0.4},
                      "param_value_mask_rate": {"values": [0.5, 0.7]}}}
    response = server.post(body)
    assert response.status_code == 202 and response.json()["trials"] == 3 + 3 * 2, response.text
    sweep_id = response.json()["sweep_id"]
    final = server.wait(sweep_id)
    assert final["status"] == "completed" and final["reason"] == "Completed", final
    assert final["counts"] == {"total": 9, "created": 9, "active": 0, "succeeded": 9, "failed": 0, "cancelled": 0,
                               "skipped": 0}
    assert final["progress"] == "9/9" and final["started_at"] and final["completed_at"]
    trials = final["trials"]
    assert [t["index"] for t in trials] == list(range(9))
    assert [t["parameters"]["merge_method"] for t in trials] == ["task_arithmetic"] * 3 + ["ties_merging"] * 6
    assert {(t["parameters"]["scaling_coefficient"], t["parameters"].get("param_value_mask_rate")) for t in trials} \
        == {(s, r) for s in (0.2, 0.6, 1.0) for r in (None,)} | {(s, r) for s in (0.2, 0.6, 1.0) for r in (0.5, 0.7)}

    # Each trial is a merge job of the sweep with the template and the trial's values, evaluated as the template
    # asks; the best trial, from the trials' own reports, is the sweep's best.
    output = server.backend.output_root / sweep_id
    scores = {}
    for trial in trials:
        merge = job(server.url, trial["job_id"])
        assert merge["status"] == "completed" and merge["sweep_id"] == sweep_id, merge
        assert merge["params"]["base_model"] == "test/base" and merge["params"]["evaluation"]["data"] == DATA
        assert {k: merge["params"][k] for k in trial["parameters"]} == trial["parameters"]
        assert merge["output_path"] == str(output / trial["name"])
        scores[trial["index"]] = reported_ce(output / trial["name"])
        assert trial["status"] == "completed" and trial["ce"] == scores[trial["index"]] == \
            merge["evaluation"]["overall"]["ce"]
    best = min(scores, key=lambda index: (scores[index], index))
    assert final["best"] == {"index": best, "name": trials[best]["name"], "job_id": trials[best]["job_id"],
                             "parameters": trials[best]["parameters"], "ce": scores[best],
                             "output_path": str(output / trials[best]["name"])}
    assert trials[best]["parameters"] == {"merge_method": "ties_merging", "scaling_coefficient": 0.6,
                                          "param_value_mask_rate": 0.7}
    assert len(sweep_jobs(server.url, sweep_id)) == 9

    # Never more than parallelism merges at once, and that many when there was work for them.
    assert max_concurrent(events) == 2
    assert sorted(line.split()[1] for line in events.read_text().splitlines() if line.startswith("start")) == \
        sorted(t["name"] for t in trials)

    listed = requests.get(server.url + "/api/sweeps", timeout=10).json()
    assert listed["total"] == 1 and listed["next_offset"] is None
    (summary,) = listed["sweeps"]
    assert "trials" not in summary and summary["best"] == final["best"] and summary["status"] == "completed"
    assert summary["spec"]["template"]["output_dir"] == sweep_id and "output" not in summary["spec"]["template"]
    assert summary["spec"]["parallelism"] == 2
    assert summary["spec"]["space"]["param_value_mask_rate"]["values"] == [0.5, 0.7]


def test_a_data_file_objective_keep_best_and_trials_that_fail(make_server, events):
    server = make_server(workers=2)
    sweep_id = server.start({"template": template(output_dir="searches/ta"), "parallelism": 2, "keep": "best",
                             "objective": {"dataFile": "b"},
                             "space": {"scaling_coefficient": {"values": [0.2, 0.6, 1.0, 1.2, 1.6]}}})
    final = server.wait(sweep_id)
    assert final["status"] == "completed", final
    by_scale = {t["parameters"]["scaling_coefficient"]: t for t in final["trials"]}
    failed, unscored = by_scale[1.6], by_scale[1.2]
    assert failed["status"] == "failed" and failed["ce"] is None
    assert failed["message"] == "base_model: the merge failed (stand-in engine)"
    assert job(server.url, failed["job_id"])["status"] == "failed"
    assert unscored["status"] == "completed" and unscored["ce"] is None
    assert unscored["message"] == "evaluation failed: evaluation: out of memory (stand-in engine)"
    # The objective is data file b's cross-entropy (lowest at scaling 1.0), not the overall one (lowest at 0.6).
    b_scores = {scale: next(f["ce"] for f in job(server.url, t["job_id"])["evaluation"]["files"] if f["name"] == "b")
                for scale, t in by_scale.items() if t["ce"] is not None}
    assert final["best"]["ce"] == min(b_scores.values()) == b_scores[1.0] == by_scale[1.0]["ce"]
    assert final["best"]["index"] == by_scale[1.0]["index"]
    assert final["counts"]["succeeded"] == 4 and final["counts"]["failed"] == 1
    # keep=best: only the best trial's output is left; the others' jobs and scores stay.
    folder = server.backend.output_root / "searches" / "ta"
    assert [p.name for p in folder.iterdir()] == [final["best"]["name"]]
    assert final["best"]["output_path"] == str(folder / final["best"]["name"])
    assert job(server.url, by_scale[0.6]["job_id"])["status"] == "completed"
    gone = requests.get(f"{server.url}/api/download/{by_scale[0.6]['job_id']}", timeout=10)
    assert gone.status_code == 404 and "does not exist" in gone.json()["error"]


def test_early_stopping_skips_the_rest(make_server, events):
    """Overall CE of scaling 0.6, 0.2, 1.0, 0.7: 1.3275, 1.5675, 1.4075, 1.3175. With patience 2 the sweep stops
    after the third trial, before the one that would have been best."""
    server = make_server(workers=2)
    sweep_id = server.start({"template": template(), "earlyStopping": {"patience": 2},
                             "space": {"scaling_coefficient": {"values": [0.6, 0.2, 1.0, 0.7]}}})
    final = server.wait(sweep_id)
    assert (final["status"], final["reason"]) == ("completed", "EarlyStopped"), final
    assert final["message"] == (f"stopped early after 2 trials in a row did not improve; best: trial 0 "
                                f"({final['trials'][0]['name']}) with cross-entropy 1.3275; 3 succeeded, 0 failed, "
                                "0 cancelled, 1 skipped of 4")
    assert [t["status"] for t in final["trials"]] == ["completed"] * 3 + ["skipped"]
    assert final["trials"][3]["job_id"] is None and final["best"]["index"] == 0
    assert final["counts"]["skipped"] == 1 and len(sweep_jobs(server.url, sweep_id)) == 3


@pytest.mark.parametrize(("scales", "reason", "message"), [
    ([1.6, 1.7], "AllTrialsFailed", "every trial failed (0 succeeded, 2 failed, 0 cancelled, 0 skipped of 2): "
     "trial 0: base_model: the merge failed (stand-in engine); trial 1: base_model: the merge failed (stand-in "
     "engine)"),
    ([1.2, 1.6], "NoTrialScored", "no succeeded trial has a cross-entropy for the objective (1 succeeded, 1 failed, "
     "0 cancelled, 0 skipped of 2): trial 0: evaluation failed: evaluation: out of memory (stand-in engine); "
     "trial 1: base_model: the merge failed (stand-in engine)"),
], ids=["all-failed", "none-scored"])
def test_a_sweep_without_a_scored_trial_fails_saying_why(make_server, events, scales, reason, message):
    server = make_server(workers=2)
    sweep_id = server.start({"template": template(), "space": {"scaling_coefficient": {"values": scales}}})
    final = server.wait(sweep_id)
    assert (final["status"], final["reason"], final["message"], final["best"]) == ("failed", reason, message, None)


def test_cancel_stops_new_trials_and_cancels_the_running_ones(make_server, events):
    server = make_server(workers=3)
    sweep_id = server.start({"template": template(base_model="slow/model"), "parallelism": 2,
                             "space": {"scaling_coefficient": {"values": [0.1, 0.2, 0.3, 0.4, 0.5]}}})
    wait_for(lambda: [t["status"] for t in server.sweep(sweep_id)["trials"]][:2] == ["running"] * 2
             and events.read_text().count("start ") == 2, 60, "two trials' merges running")
    response = requests.delete(f"{server.url}/api/sweeps/{sweep_id}", timeout=30)
    assert response.status_code == 200 and response.json()["message"] == "cancellation requested", response.text
    final = server.wait(sweep_id)
    assert (final["status"], final["reason"]) == ("cancelled", "Cancelled"), final
    assert [t["status"] for t in final["trials"]] == ["cancelled"] * 2 + ["skipped"] * 3
    assert final["best"] is None
    merges = sweep_jobs(server.url, sweep_id)
    assert sorted(m["job_id"] for m in merges) == sorted(t["job_id"] for t in final["trials"][:2])
    assert {m["status"] for m in merges} == {"cancelled"}
    wait_for(lambda: max_concurrent(events) == 2 and events.read_text().count("end ") == 2, 30,
             "the two running merges to be stopped")
    again = requests.delete(f"{server.url}/api/sweeps/{sweep_id}", timeout=30)
    assert again.status_code == 409 and "already cancelled" in again.json()["error"]
    for method in ("get", "delete"):
        missing = requests.request(method, f"{server.url}/api/sweeps/no-such-sweep", timeout=10)
        assert missing.status_code == 404 and missing.json()["error"] == "sweep 'no-such-sweep' not found"


class KilledMidSweep:
    """`modelmerge serve` as a subprocess running a six-trial sweep (parallelism 2, 1.5 s a trial), killed with
    SIGKILL once a trial completed and two run; `restart()` serves the same data dir again."""

    def __init__(self, fake_engine: list[str], tmp_path: Path, headers: dict | None = None, **changes) -> None:
        self.env = {**os.environ, "SWEEP_EVENTS": str(tmp_path / "events.log"), "SWEEP_TRIAL_SECONDS": "1.5"}
        self.env.pop("MODELMERGE_API_TOKEN", None)
        self.data_dir = data_dir_with_data(tmp_path / "data")
        self.args = ["--data-dir", str(self.data_dir), "--workers", "2", "--engine-command", " ".join(fake_engine)]
        self.log = tmp_path / "server.log"
        server = ServerProcess(self.args, self.env, self.log)
        try:
            response = requests.post(server.url + "/api/sweeps", timeout=30, json={
                "template": template(), "parallelism": 2,
                "space": {"scaling_coefficient": {"values": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]}}, **changes},
                headers=headers)
            self.sweep_id = response.json()["sweep_id"]

            def mid_sweep() -> bool:
                statuses = [t["status"] for t in sweep_of(server.url, self.sweep_id)["trials"]]
                return "completed" in statuses and statuses.count("running") == 2

            wait_for(mid_sweep, 120, "a trial completed and two running")
        finally:
            server.kill(signal.SIGKILL)
        self.interrupted = [t for t in sweep_of_db(self.data_dir, self.sweep_id) if t[1] is None]
        assert self.interrupted, "the server was killed with trials running"

    def restart(self) -> ServerProcess:
        return ServerProcess(self.args, self.env, self.log)


def test_a_restart_mid_sweep_creates_no_duplicate_and_loses_no_trial(fake_engine, tmp_path):
    """kill -9 the server while two trials run: after a restart on the same data dir the sweep goes on; the
    interrupted trials run again (as new attempts), the others exactly once."""
    killed = KilledMidSweep(fake_engine, tmp_path)
    sweep_id, data_dir, interrupted = killed.sweep_id, killed.data_dir, killed.interrupted
    server = killed.restart()
    try:
        final = wait_sweep(server.url, sweep_id, timeout=180)
        merges = sweep_jobs(server.url, sweep_id)
    finally:
        server.kill(signal.SIGTERM)
    assert final["status"] == "completed" and final["counts"]["succeeded"] == 6, final
    assert [t["index"] for t in final["trials"]] == list(range(6))
    completed = sorted(m["job_id"] for m in merges if m["status"] == "completed")
    assert completed == sorted(t["job_id"] for t in final["trials"])  # one completed merge per trial
    retried = {t["name"] for t in final["trials"] if t["job_id"].endswith("-retry1")}
    assert retried == {name for _, _, name in interrupted}
    assert {m["job_id"] for m in merges if m["status"] == "failed"} == retried
    assert all(m["error_message"] == INTERRUPTED for m in merges if m["status"] == "failed")
    assert sorted(p.name for p in (data_dir / "output" / sweep_id).iterdir()) == sorted(
        t["name"] for t in final["trials"])
    best = min(final["trials"], key=lambda t: (t["ce"], t["index"]))
    assert final["best"]["index"] == best["index"] and best["parameters"]["scaling_coefficient"] == 0.6


def test_a_sweep_with_an_hf_token_fails_after_a_restart_asking_to_resubmit_it(fake_engine, tmp_path):
    from modelmerge_api.local_sweeps import TOKEN_LOST

    killed = KilledMidSweep(fake_engine, tmp_path, headers={"X-HF-Token": "hf_RESTARTsecret0123456789"},
                            keep="best")
    server = killed.restart()
    try:
        final = wait_sweep(server.url, killed.sweep_id, timeout=60)
        merges = sweep_jobs(server.url, killed.sweep_id)
    finally:
        server.kill(signal.SIGTERM)
    assert (final["status"], final["reason"], final["message"]) == ("failed", "TokenLost", TOKEN_LOST), final
    assert final["counts"]["succeeded"] >= 1 and final["counts"]["skipped"] >= 1
    assert len(merges) == len([t for t in final["trials"] if t["job_id"]])  # nothing ran after the restart
    assert {m["status"] for m in merges} <= {"completed", "failed"}
    outputs = sorted(p.name for p in (killed.data_dir / "output" / killed.sweep_id).iterdir())
    assert outputs == sorted(t["name"] for t in final["trials"] if t["status"] == "completed")  # keep=best: only
    # once a sweep completed


def sweep_of_db(data_dir: Path, sweep_id: str) -> list[tuple[int, str | None, str]]:
    """(index, final status, name) of each trial row in the local backend's tables."""
    import sqlite3

    with sqlite3.connect(data_dir / "jobs.db") as db:
        return db.execute("SELECT idx, status, name FROM sweep_trials WHERE sweep_id = ? ORDER BY idx",
                          (sweep_id,)).fetchall()


ONE_POINT = {"scaling_coefficient": {"values": [0.5]}}
INVALID = [
    ({"template": {k: v for k, v in template().items() if k != "evaluation"}, "space": ONE_POINT},
     "template.evaluation", "field required"),
    ({"template": template(), "space": {}}, "space", "give at least one field to vary"),
    ({"template": template(), "space": {"param_value_mask_rate": {"values": [0.1]}}}, "space.param_value_mask_rate",
     "no chosen merge_method takes it"),
    ({"template": template(merge_method="ties_merging"),
      "space": {"scaling_coefficient": {"start": 0.0, "stop": 3.9, "step": 0.1},
                "param_value_mask_rate": {"start": 0.0, "stop": 0.9, "step": 0.03}}}, "space", "more than 1000"),
    ({"template": template(), "space": ONE_POINT, "parallelism": 0}, "parallelism",
     "greater than or equal to 1"),
    ({"template": template(resources={"cpu": 2}), "space": ONE_POINT}, "template.resources",
     "unknown field"),
    ({"template": template(output_dir="/etc/x"), "space": ONE_POINT}, "template.output_dir",
     "relative path"),
    ({"template": template(evaluation={"data": ["eval/missing.json"]}), "space": ONE_POINT},
     "template.evaluation.data", "no such file"),
    ({"template": template(), "space": ONE_POINT, "objective": {"dataFile": "c"}},
     "objective.dataFile", "none of template.evaluation.data's files"),
    ({"template": template(), "space": ONE_POINT, "strategy": "random"}, "trials",
     "strategy random needs the number of trials"),
    ({"template": template(), "space": ONE_POINT, "surprise": 1}, "surprise", "unknown field"),
    ({"template": template(), "space": ONE_POINT, "hf_token": 7}, "hf_token", "must be a string"),
]


@pytest.mark.parametrize(("body", "field", "message"), INVALID, ids=[case[1] for case in INVALID])
def test_an_invalid_sweep_is_refused_naming_the_field_and_nothing_is_created(make_server, events, body, field,
                                                                               message):
    server = make_server(workers=1)
    response = server.post(body)
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["error"].startswith(("invalid sweep: ", f"{field}: ")) and message in error["error"], error
    assert field in [d["field"] for d in error["details"]], error
    assert requests.get(server.url + "/api/sweeps", timeout=10).json()["total"] == 0
    assert requests.get(server.url + "/api/jobs", timeout=10).json()["total"] == 0
    assert [p.name for p in server.backend.output_root.iterdir()] == ["eval"]


def test_bodies_that_are_not_sweeps_and_a_taken_output_dir(make_server, events):
    server = make_server(workers=1)
    for body in (b"[1]", b"{not json"):
        response = requests.post(server.url + "/api/sweeps", data=body, timeout=10,
                                 headers={"Content-Type": "application/json"})
        assert response.status_code == 400 and response.json()["error"].startswith("request body"), response.text
    (server.backend.output_root / "taken").mkdir()
    response = server.post({"template": template(output_dir="taken"), "space": ONE_POINT})
    assert response.status_code == 409 and "'taken' already exists" in response.json()["error"], response.text
    assert requests.get(server.url + "/api/sweeps", timeout=10).json()["total"] == 0


def test_jobs_of_one_sweep_and_a_space_of_bare_lists(make_server, events):
    server = make_server(workers=2)
    first = server.start({"template": template(), "space": {"scaling_coefficient": [0.4, 1.6]}})
    second = server.start({"template": template(), "space": {"merge_method": ["task_arithmetic"],
                                                              "scaling_coefficient": [0.8]}})
    single = requests.post(server.url + "/api/merge", json=template(output_dir="alone"), timeout=30)
    assert single.status_code == 202, single.text
    finals = {sweep_id: server.wait(sweep_id) for sweep_id in (first, second)}
    # A bare list is {values: [...]}: the sweep ran its values and shows the list spelled out.
    assert finals[first]["spec"]["space"]["scaling_coefficient"]["values"] == [0.4, 1.6]
    assert [t["parameters"]["scaling_coefficient"] for t in finals[first]["trials"]] == [0.4, 1.6]
    assert finals[second]["spec"]["space"]["merge_method"] == {"values": ["task_arithmetic"]}
    for sweep_id, final in finals.items():
        jobs = sweep_jobs(server.url, sweep_id)
        assert sorted(j["job_id"] for j in jobs) == sorted(t["job_id"] for t in final["trials"])
        assert {j["sweep_id"] for j in jobs} == {sweep_id}
    assert [j["job_id"] for j in sweep_jobs(server.url, first, status="failed")] == \
        [finals[first]["trials"][1]["job_id"]]
    assert sweep_jobs(server.url, "no-such-sweep") == []
    assert requests.get(server.url + "/api/jobs", timeout=10).json()["total"] == 4
    empty = requests.get(server.url + "/api/jobs", params={"sweep_id": ""}, timeout=10)
    assert empty.status_code == 400 and "sweep_id" in empty.text, empty.text


def test_the_docs_show_the_sweep_body(make_server):
    server = make_server(workers=1)
    spec = requests.get(server.url + "/openapi.json", timeout=10).json()
    schemas = spec["components"]["schemas"]
    body = spec["paths"]["/api/sweeps"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ModelMergeSweepRequest"}
    sweep = schemas["ModelMergeSweepRequest"]
    assert {"template", "space", "strategy", "parallelism", "objective", "keep", "earlyStopping"} \
        <= set(sweep["properties"]) and sweep["properties"]["hf_token"]["writeOnly"] is True
    template_schema = schemas[sweep["properties"]["template"]["$ref"].rsplit("/", 1)[-1]]
    assert set(template_schema["properties"]) == set(MergeRequest.model_fields)
    assert "evaluation" in template_schema["required"] and "base_model" in template_schema["properties"]
    assert "bare list" in sweep["properties"]["space"]["description"]
    refs = {ref.rsplit("/", 1)[-1] for ref in re.findall(r'"\$ref": "([^"]+)"', json.dumps(spec))}
    assert refs <= set(schemas)
    assert schemas["MergeRequest"]["properties"]["hf_token"]["writeOnly"] is True  # /api/merge's, unchanged


def test_the_hf_token_reaches_the_trials_merges_only(make_server, events, tmp_path):
    secret = "hf_SWEEPsecretToken0123456789"
    server = make_server(workers=2)
    sweep_id = requests.post(server.url + "/api/sweeps", headers={"X-HF-Token": secret}, timeout=30, json={
        "template": template(), "space": {"scaling_coefficient": {"values": [0.4, 0.8]}}}).json()["sweep_id"]
    final = server.wait(sweep_id)
    assert final["status"] == "completed", final
    stored = b"".join(p.read_bytes() for p in server.backend.data_dir.rglob("*") if p.is_file())
    assert secret.encode() not in stored
    digest = hashlib.sha256(secret.encode()).hexdigest()
    for trial in final["trials"]:
        assert (Path(job(server.url, trial["job_id"])["output_path"]) / "token.sha256").read_text() == digest
    for path in (f"/api/sweeps/{sweep_id}", "/api/sweeps", "/api/jobs"):
        assert secret not in requests.get(server.url + path, timeout=10).text


def test_a_stored_sweep_that_the_contract_no_longer_takes_fails_saying_why(fake_engine, tmp_path):
    from modelmerge_api.local_sweeps import LOCAL_TEMPLATE_DEFAULTS
    from modelmerge_api.sweep_store import SweepRecord, SweepStore

    data_dir = data_dir_with_data(tmp_path / "data")
    store = SweepStore(data_dir / "jobs.db")
    store.insert(SweepRecord(sweep_id="old", status="running", created_at="2026-01-01T00:00:00.000Z",
                             output_rel="old", total=2,
                             spec={"template": {**LOCAL_TEMPLATE_DEFAULTS, **template()}, "space": {"retired": [1]}}))
    store.close()
    with serve_in_thread(create_app(LocalBackend(data_dir, engine_command=fake_engine))) as url:
        final = wait_sweep(url, "old", timeout=60)
    assert (final["status"], final["reason"]) == ("failed", "InvalidSpec"), final
    assert final["message"].startswith("the sweep's spec is no longer valid: space.retired: unknown field")


# ---- the real engine ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_models(tmp_path_factory):
    """A tiny chat base model and two fine-tunes in local folders."""
    from tests.helpers.eval_data import make_chat_finetune, make_chat_model

    root = tmp_path_factory.mktemp("chat-models")
    base = make_chat_model(root / "base")
    return base, [make_chat_finetune(base, root / f"ft{seed}", seed=seed, scale=0.05) for seed in (1, 2)]


def test_a_sweep_of_real_evaluated_merges(chat_models, tmp_path):
    """The real engine merges and evaluates each trial; the best is the trial whose merge_report.json has the lowest
    overall cross-entropy."""
    from tests.helpers.eval_data import make_records, write_records

    base, finetunes = chat_models
    data_dir = tmp_path / "data"
    write_records(data_dir / "output" / DATA[0], make_records(8, seed=3))
    with serve_in_thread(create_app(LocalBackend(data_dir, workers=2))) as url:
        response = requests.post(url + "/api/sweeps", timeout=30, json={
            "template": {"base_model": str(base), "models_to_merge": [str(f) for f in finetunes],
                         "merge_method": "task_arithmetic", "dtype": "float32",
                         "evaluation": {"data": DATA[:1], "batch_size": 4}},
            "space": {"scaling_coefficient": {"values": [0.3, 1.0, 3.0]}}, "parallelism": 2})
        assert response.status_code == 202, response.text
        final = wait_sweep(url, response.json()["sweep_id"], timeout=600)
        assert final["status"] == "completed", final
        reports = {}
        for trial in final["trials"]:
            merge = job(url, trial["job_id"])
            ce = reported_ce(Path(merge["output_path"]))
            assert trial["ce"] == ce == merge["evaluation"]["overall"]["ce"] and math.isfinite(ce)
            reports[trial["parameters"]["scaling_coefficient"]] = (ce, trial["index"])
    best_ce, best_index = min(reports.values())
    assert final["best"]["index"] == best_index and final["best"]["ce"] == best_ce
    assert len({ce for ce, _ in reports.values()}) == 3  # three different merged models


# ---- the Kubernetes backend ------------------------------------------------------------------------------------

OUTPUT_PVC = "merge-output"


class KubeServed:
    def __init__(self, url: str, api, namespace: str, output_root: Path) -> None:
        self.url, self.api, self.namespace, self.output_root = url, api, namespace, output_root

    def sweep_objects(self) -> dict[str, dict]:
        from kubernetes import client

        from modelmerge.contract import API_GROUP, API_VERSION
        from modelmerge.sweep import SWEEP_PLURAL

        listing = client.CustomObjectsApi(self.api).list_namespaced_custom_object(
            API_GROUP, API_VERSION, self.namespace, SWEEP_PLURAL)
        return {item["metadata"]["name"]: item for item in listing["items"]}


@pytest.fixture(scope="module")
def kube(control_plane, k8s_api, kubeconfig_path, tmp_path_factory, fake_engine):
    """The Kubernetes backend on the real control plane: both CRDs, the operator in this process (its merge pods
    run the stand-in engine through the test kubelet) and the API on a free port."""
    import uuid

    from modelmerge import crd, sweep_crd
    from modelmerge_api.kube import KubernetesBackend
    from tests.kube.fixtures import create_namespace, delete_namespace
    from tests.kube.kubelet import FakeKubelet
    from tests.test_api_kube import operator_in_process

    crd.install(k8s_api)
    crd.install(k8s_api, manifest=sweep_crd.sweep_crd())
    namespace = create_namespace(k8s_api, f"sweep-api-{uuid.uuid4().hex[:8]}")
    kubelet = FakeKubelet(k8s_api, namespace=namespace, root=tmp_path_factory.mktemp("kube-sweeps") / "kubelet")
    kubelet.start()
    backend = KubernetesBackend(control_plane.api_client(), namespace, kubelet.pvc_path(OUTPUT_PVC),
                                {"output": {"pvc": OUTPUT_PVC}})
    try:
        with operator_in_process(kubeconfig_path, namespace, fake_engine), \
                serve_in_thread(create_app(backend)) as url:
            yield KubeServed(url, k8s_api, namespace, backend.output_root)
    finally:
        kubelet.stop()
        delete_namespace(k8s_api, namespace)


@pytest.mark.integration
def test_kubernetes_a_sweep_is_a_model_merge_sweep_whose_trials_are_jobs(kube, events):
    response = requests.post(kube.url + "/api/sweeps", timeout=30, json={
        "template": template(), "parallelism": 2,
        "space": {"scaling_coefficient": {"values": [0.2, 0.6, 1.0]}}})
    assert response.status_code == 202 and response.json()["status"] == "pending", response.text
    sweep_id = response.json()["sweep_id"]
    obj = kube.sweep_objects()[sweep_id]
    assert obj["spec"]["template"]["output"] == {"pvc": OUTPUT_PVC}
    assert obj["spec"]["template"]["output_dir"] == sweep_id and obj["spec"]["parallelism"] == 2
    assert obj["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "modelmerge-api"}
    final = wait_sweep(kube.url, sweep_id, timeout=300)
    assert final["status"] == "completed" and final["counts"]["succeeded"] == 3, final
    scores = {}
    for trial in final["trials"]:
        assert trial["status"] == "completed" and trial["job_id"] == trial["name"], trial
        merge = job(kube.url, trial["job_id"])
        assert merge["status"] == "completed" and merge["sweep_id"] == sweep_id, merge
        assert merge["params"]["scaling_coefficient"] == trial["parameters"]["scaling_coefficient"]
        assert merge["output_path"] == f"pvc://{OUTPUT_PVC}/{sweep_id}/{trial['name']}"
        scores[trial["index"]] = merge["evaluation"]["overall"]["ce"]
        assert trial["ce"] == scores[trial["index"]]
    best = min(scores, key=lambda index: (scores[index], index))
    assert final["best"]["index"] == best and final["best"]["ce"] == scores[best]
    assert final["best"]["job_id"] == final["trials"][best]["name"]
    assert final["best"]["output_path"] == f"pvc://{OUTPUT_PVC}/{sweep_id}/{final['trials'][best]['name']}"
    assert final["spec"]["template"]["base_model"] == "test/base" and "output" not in final["spec"]["template"]
    assert max_concurrent(events) <= 2
    listed = requests.get(kube.url + "/api/sweeps", timeout=10).json()["sweeps"]
    assert [s["status"] for s in listed if s["sweep_id"] == sweep_id] == ["completed"]
    assert sorted(j["job_id"] for j in sweep_jobs(kube.url, sweep_id)) == sorted(t["name"] for t in final["trials"])
    assert sweep_jobs(kube.url, "no-such-sweep") == []


@pytest.mark.integration
def test_kubernetes_a_sweep_into_an_existing_folder_is_refused(kube):
    before = set(kube.sweep_objects())
    (kube.output_root / "taken-sweep").mkdir()
    response = requests.post(kube.url + "/api/sweeps", timeout=30, json={
        "template": template(output_dir="taken-sweep"), "space": ONE_POINT})
    assert response.status_code == 409 and "'taken-sweep' already exists" in response.json()["error"], response.text
    assert set(kube.sweep_objects()) == before


@pytest.mark.integration
def test_kubernetes_cancel_a_sweep_and_its_hf_token_secret(kube):
    from kubernetes import client

    secret = "hf_KUBEsweepToken0123456789"
    response = requests.post(kube.url + "/api/sweeps", headers={"X-HF-Token": secret}, timeout=30, json={
        "template": template(base_model="slow/model"), "parallelism": 1,
        "space": {"scaling_coefficient": {"values": [0.2, 0.6, 1.0]}}})
    assert response.status_code == 202, response.text
    sweep_id = response.json()["sweep_id"]
    obj = kube.sweep_objects()[sweep_id]
    assert obj["spec"]["template"]["hfTokenSecret"] == {"name": f"{sweep_id}-hf-token", "key": "token"}
    assert secret not in json.dumps(obj)
    stored = client.CoreV1Api(kube.api).read_namespaced_secret(f"{sweep_id}-hf-token", kube.namespace)
    assert stored.metadata.owner_references[0].kind == "ModelMergeSweep"
    assert stored.metadata.owner_references[0].uid == obj["metadata"]["uid"]
    wait_for(lambda: [t["status"] for t in sweep_of(kube.url, sweep_id)["trials"]][:1] == ["running"], 120,
             "the first trial running")
    response = requests.delete(f"{kube.url}/api/sweeps/{sweep_id}", timeout=30)
    assert response.status_code == 200 and response.json()["message"] == "cancellation requested", response.text
    assert kube.sweep_objects()[sweep_id]["spec"]["cancel"] is True
    final = wait_sweep(kube.url, sweep_id, timeout=120)
    assert final["status"] == "cancelled", final
    assert [t["status"] for t in final["trials"]] == ["cancelled", "skipped", "skipped"]
    for path in (f"/api/sweeps/{sweep_id}", "/api/sweeps", "/api/jobs"):
        assert secret not in requests.get(kube.url + path, timeout=10).text
    again = requests.delete(f"{kube.url}/api/sweeps/{sweep_id}", timeout=30)
    assert again.status_code == 409


@pytest.mark.integration
@pytest.mark.parametrize(("body", "field", "message"), INVALID[:7], ids=[case[1] for case in INVALID[:7]])
def test_kubernetes_an_invalid_sweep_creates_nothing(kube, body, field, message):
    before = set(kube.sweep_objects())
    response = requests.post(kube.url + "/api/sweeps", json=body, timeout=30)
    assert response.status_code == 400 and message in response.json()["error"], response.text
    assert field in [d["field"] for d in response.json()["details"]]
    assert set(kube.sweep_objects()) == before
    missing = requests.get(f"{kube.url}/api/sweeps/no-such-sweep", timeout=10)
    assert missing.status_code == 404
