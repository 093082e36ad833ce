"""ModelMergeSweeps on the real control plane: `modelmerge operator` as a subprocess against the envtest API server
(its Job and garbage-collector controllers), the test kubelet running the merge pods as local processes.

The merge pods run a stand-in engine (FAKE_ENGINE) that takes the request the operator hands every merge, writes an
output folder and reports an evaluation whose cross-entropies are a fixed function of the merge parameters, so
each test knows what every trial scores; its base model name sets how long a merge takes (`fake/sleep-<seconds>`)
and scaling_coefficient 0.25 makes a merge fail. The tests compute the best trial themselves from the children's
status.evaluation and compare it with the sweep's."""

from __future__ import annotations

import json
import shlex
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest

from modelmerge import crd, sweep_crd
from modelmerge.contract import API_GROUP, API_VERSION, PLURAL, TERMINAL_PHASES
from modelmerge.kubeclient import merge_patch, raw
from modelmerge.sweep import SWEEP_PLURAL, ModelMergeSweepSpec, sweep_trials, trial_name
from tests.helpers.waiting import wait_for
from tests.test_operator_integration import OperatorProcess

pytestmark = pytest.mark.integration

OUTPUT_PVC = "out"
FAILING_COEFFICIENT = 0.25
FAKE_ENGINE = r'''
import json, math, os, sys, time
def arg(flag):
    return sys.argv[sys.argv.index(flag) + 1]
spec = json.load(open(arg("--spec")))
out, summary_file = arg("--output-dir"), arg("--summary-file")
time.sleep(float(spec["base_model"].rsplit("-", 1)[1]))
method, coefficient = spec["merge_method"], spec["scaling_coefficient"]
if coefficient == FAILING:
    summary = {"status": "failed", "error": f"scaling_coefficient {coefficient} makes this stand-in fail"}
    open(summary_file, "w").write(json.dumps(summary))
    print(json.dumps(summary), flush=True)
    sys.exit(1)
algebra = 1.0 + (coefficient - 0.7) ** 2 + (0.3 * spec["param_value_mask_rate"] if method == "ties_merging" else 0.05)
code = 2.0 + (coefficient - 1.1) ** 2
overall = (30 * algebra + 10 * code) / 40
os.makedirs(out)
open(os.path.join(out, "config.json"), "w").write("{}")
files = [{"name": "algebra", "ce": algebra, "ppl": math.exp(algebra), "tokens": 30, "records": 3},
         {"name": "code", "ce": code, "ppl": math.exp(code), "tokens": 10, "records": 2}]
summary = {"status": "succeeded", "output_dir": out, "tensors": 3, "seconds": 0.1, "evaluation": {
    "state": "Succeeded", "device": "cpu", "dtype": "float32", "files": files,
    "overall": {"ce": overall, "ppl": math.exp(overall), "tokens": 40, "records": 5, "meanCe": (algebra + code) / 2}}}
open(summary_file, "w").write(json.dumps(summary))
print(json.dumps(summary), flush=True)
'''.replace("FAILING", repr(FAILING_COEFFICIENT))


# ---------------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crds_installed(k8s_api):
    crd.install(k8s_api)
    crd.install(k8s_api, manifest=sweep_crd.sweep_crd())


class Sweeps:
    """The sweeps, children, Jobs and events of one namespace, and the operator that runs them."""

    def __init__(self, k8s_api, namespace: str, kubeconfig: Path, tmp_path: Path, kubelet):
        from kubernetes import client

        self.custom = client.CustomObjectsApi(k8s_api)
        self.core = client.CoreV1Api(k8s_api)
        self.batch = client.BatchV1Api(k8s_api)
        self.ns, self.kubeconfig, self.tmp, self.kubelet = namespace, kubeconfig, tmp_path, kubelet
        engine = tmp_path / "fake_engine.py"
        engine.write_text(FAKE_ENGINE)
        self.merge_command = f"python {shlex.quote(str(engine))}"
        self.operators: list[OperatorProcess] = []

    def start_operator(self) -> OperatorProcess:
        op = OperatorProcess(self.kubeconfig, self.ns, self.tmp / f"operator-{len(self.operators)}.log",
                             self.merge_command).start()
        self.operators.append(op)
        return op

    def stop(self) -> None:
        for op in self.operators:
            op.stop()

    def create(self, spec: dict, name: str | None = None) -> str:
        name = name or f"sw-{uuid.uuid4().hex[:5]}"
        body = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "ModelMergeSweep", "metadata": {"name": name},
                "spec": spec}
        self.custom.create_namespaced_custom_object(API_GROUP, API_VERSION, self.ns, SWEEP_PLURAL, body,
                                                    _preload_content=False)
        return name

    def sweep(self, name: str) -> dict | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return raw(self.custom.get_namespaced_custom_object, API_GROUP, API_VERSION, self.ns, SWEEP_PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def status(self, name: str) -> dict:
        return (self.sweep(name) or {}).get("status") or {}

    def children(self, name: str | None = None) -> dict[str, dict]:
        items = raw(self.custom.list_namespaced_custom_object, API_GROUP, API_VERSION, self.ns, PLURAL)["items"]
        return {item["metadata"]["name"]: item for item in items
                if name is None or any(ref["name"] == name for ref in item["metadata"].get("ownerReferences") or [])}

    def patch(self, name: str, spec: dict) -> None:
        merge_patch(self.custom.patch_namespaced_custom_object, API_GROUP, API_VERSION, self.ns, SWEEP_PLURAL, name,
                    {"spec": spec})

    def events(self, name: str) -> list[tuple[str, str, str]]:
        items = raw(self.core.list_namespaced_event, self.ns, field_selector=f"involvedObject.name={name}")["items"]
        return [(e["type"], e["reason"], e.get("message", "")) for e in items]

    def printed(self, name: str) -> dict[str, object]:
        """What `kubectl get mms NAME` prints, from the API server's Table."""
        table = raw(self.custom.get_namespaced_custom_object, API_GROUP, API_VERSION, self.ns, SWEEP_PLURAL, name,
                    _headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"})
        (row,) = table["rows"]
        return {column["name"]: cell for column, cell in zip(table["columnDefinitions"], row["cells"], strict=True)}

    def context(self, name: str) -> str:
        children = {n: (c.get("status") or {}).get("phase") for n, c in self.children(name).items()}
        logs = "\n".join(op.tail(30) for op in self.operators)
        return f"sweep status: {json.dumps(self.status(name), indent=1)}\nchildren: {children}\noperator:\n{logs}"

    def wait_phase(self, name: str, phases: tuple[str, ...], timeout: float = 240) -> dict:
        wait_for(lambda: self.status(name).get("phase") in phases, timeout, f"sweep {name} to be one of {phases}",
                 context=lambda: self.context(name))
        return self.status(name)


@pytest.fixture
def sweeps(k8s_api, crds_installed, namespace, kubeconfig_path, tmp_path, kubelet):
    world = Sweeps(k8s_api, namespace, kubeconfig_path, tmp_path, kubelet)
    yield world
    world.stop()


class ChildWatch:
    """Watches the namespace's ModelMerges from before a sweep starts: every ADDED name and uid, and the most
    children unfinished at any moment."""

    def __init__(self, sweeps: Sweeps):
        from kubernetes import watch

        self.sweeps, self.stream = sweeps, watch.Watch()
        self.added: list[tuple[str, str]] = []
        self.unfinished: set[str] = set()
        self.most_unfinished = 0
        self.stopping, self.error = False, None
        self.lock = threading.Lock()
        listing = raw(sweeps.custom.list_namespaced_custom_object, API_GROUP, API_VERSION, sweeps.ns, PLURAL)
        assert listing["items"] == []
        self.thread = threading.Thread(target=self._run, args=(listing["metadata"]["resourceVersion"],),
                                       daemon=True)
        self.thread.start()

    def _run(self, resource_version: str) -> None:
        try:
            self._follow(resource_version)
        except Exception as exc:  # noqa: BLE001 - reported by stop() unless the test stopped the watch
            if not self.stopping:
                self.error = exc

    def _follow(self, resource_version: str) -> None:
        for event in self.stream.stream(self.sweeps.custom.list_namespaced_custom_object, API_GROUP, API_VERSION,
                                        self.sweeps.ns, PLURAL, resource_version=resource_version,
                                        timeout_seconds=600):
            obj = event["object"]
            name, phase = obj["metadata"]["name"], (obj.get("status") or {}).get("phase")
            with self.lock:
                if event["type"] == "ADDED":
                    self.added.append((name, obj["metadata"]["uid"]))
                if event["type"] == "DELETED" or phase in TERMINAL_PHASES:
                    self.unfinished.discard(name)
                else:
                    self.unfinished.add(name)
                self.most_unfinished = max(self.most_unfinished, len(self.unfinished))

    def stop(self) -> None:
        """Stops watching; fails when the watch broke before (the counts would be incomplete)."""
        self.stopping = True
        self.stream.stop()
        assert self.error is None, f"the watch of the children broke: {self.error!r}"


def _template(seconds: float = 0.5, **fields) -> dict:
    return {"base_model": f"fake/sleep-{seconds}", "models_to_merge": ["org/a", "org/b"],
            "merge_method": "task_arithmetic", "output": {"pvc": OUTPUT_PVC},
            "resources": {"cpu": "100m", "memory": "128Mi"},
            "evaluation": {"data": ["eval/algebra.json", "eval/code.json"]}, **fields}


def _children_scores(sweeps: Sweeps, name: str, objective: str | None = None) -> dict[str, float]:
    """Each succeeded child's objective, read from its own status.evaluation."""
    scores = {}
    for child_name, child in sweeps.children(name).items():
        evaluation = (child.get("status") or {}).get("evaluation")
        if (child.get("status") or {}).get("phase") != "Succeeded" or not evaluation:
            continue
        if objective is None:
            scores[child_name] = evaluation["overall"]["ce"]
        else:
            (file,) = [f for f in evaluation["files"] if f["name"] == objective]
            scores[child_name] = file["ce"]
    return scores


def _wait_children(sweeps: Sweeps, name: str, count: int, *, running: bool = False) -> dict[str, dict]:
    def enough() -> bool:
        children = sweeps.children(name)
        if running:
            children = {n: c for n, c in children.items() if (c.get("status") or {}).get("phase") == "Running"}
        return len(children) >= count

    wait_for(enough, 120, f"{count} children of {name}{' running' if running else ''}",
             context=lambda: sweeps.context(name))
    return sweeps.children(name)


# ---------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------


def test_grid_sweep_finds_the_best_trial_within_parallelism(sweeps):
    sweeps.start_operator()
    watch = ChildWatch(sweeps)
    template = _template()
    template.pop("merge_method")
    spec = {"template": template, "parallelism": 2,
            "space": {"merge_method": {"values": ["task_arithmetic", "ties_merging"]},
                      "scaling_coefficient": {"start": 0.4, "stop": 1.0, "step": 0.3},
                      "param_value_mask_rate": {"values": [0.2, 0.8]}}}
    name = sweeps.create(spec)
    status = sweeps.wait_phase(name, ("Succeeded", "Failed"))
    watch.stop()
    trials = sweep_trials(ModelMergeSweepSpec.model_validate(spec))
    assert len(trials) == 3 + 6, "task_arithmetic varies the coefficient only, ties_merging both"
    assert status["phase"] == "Succeeded" and status["reason"] == "Completed", sweeps.context(name)
    assert status["counts"] == {"total": 9, "created": 9, "active": 0, "succeeded": 9, "failed": 0, "cancelled": 0,
                                "skipped": 0}
    assert status["progress"] == "9/9"
    # Parallelism: never more than 2 unfinished children, and the sweep used both slots.
    assert watch.most_unfinished == 2, watch.most_unfinished
    assert sorted(n for n, _ in watch.added) == sorted(trial_name(name, i) for i in range(9))
    # The trials table is the expansion, each row the child's own result.
    scores = _children_scores(sweeps, name)
    children = sweeps.children(name)
    assert [row["index"] for row in status["trials"]] == list(range(9))
    for trial, row in zip(trials, status["trials"], strict=True):
        child = children[row["name"]]
        assert row["name"] == trial_name(name, trial.index) and row["parameters"] == trial.parameters
        assert row["phase"] == "Succeeded" and row["ce"] == scores[row["name"]]
        assert child["spec"]["merge_method"] == trial.parameters["merge_method"]
        assert child["spec"]["scaling_coefficient"] == trial.parameters["scaling_coefficient"]
        assert child["spec"]["output_dir"] == row["name"]
        (owner,) = child["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["controller"]) == ("ModelMergeSweep", name, True)
    best_name = min(scores, key=scores.get)
    best = status["best"]
    assert (best["name"], best["ce"]) == (best_name, scores[best_name])
    assert best["parameters"] == {"merge_method": "task_arithmetic", "scaling_coefficient": 0.7}
    assert best["outputPath"] == f"pvc://{OUTPUT_PVC}/{best_name}"
    printed = sweeps.printed(name)
    assert (printed["Done"], printed["Best CE"], printed["Best Trial"], printed["Phase"]) == (
        "9/9", scores[best_name], best_name, "Succeeded")
    events = sweeps.events(name)
    news = [e for e in events if e[1] == "NewBest"]
    # One event per new best (events list in no particular order): the last one names the final best.
    assert sum(f"({best_name}): cross-entropy {scores[best_name]:.6g}" in e[2] for e in news) == 1, news
    assert len({e[2] for e in news}) == len(news) <= 9
    assert ("Normal", "Completed") in [e[:2] for e in events]
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {"Accepted": "True", "Running": "False", "Complete": "True"}
    for child in children:  # every output is there (keep: all)
        assert (sweeps.kubelet.pvc_path(OUTPUT_PVC) / child / "config.json").exists()


def test_many_quick_trials_keep_parallelism_exactly(sweeps):
    """24 merges that end at once: a burst of child events per trial; never more than 3 unfinished."""
    sweeps.start_operator()
    watch = ChildWatch(sweeps)
    name = sweeps.create({"template": _template(seconds=0), "parallelism": 3,
                          "space": {"scaling_coefficient": {"start": 0.3, "stop": 1.45, "step": 0.05}}})
    status = sweeps.wait_phase(name, ("Succeeded", "Failed"))
    watch.stop()
    assert status["phase"] == "Succeeded" and status["progress"] == "24/24", sweeps.context(name)
    assert status["counts"]["succeeded"] == 24
    assert watch.most_unfinished == 3, watch.most_unfinished
    assert sorted(n for n, _ in watch.added) == sorted(trial_name(name, i) for i in range(24))
    scores = _children_scores(sweeps, name)
    assert status["best"]["name"] == min(scores, key=scores.get)


def test_random_sweep_ranks_by_one_data_files_cross_entropy(sweeps):
    sweeps.start_operator()
    spec = {"template": _template(output_dir="runs"), "strategy": "random", "trials": 5, "seed": 11,
            "parallelism": 3, "objective": {"dataFile": "code"},
            "space": {"scaling_coefficient": {"min": 0.3, "max": 1.5}}}
    name = sweeps.create(spec)
    status = sweeps.wait_phase(name, ("Succeeded", "Failed"))
    assert status["phase"] == "Succeeded", sweeps.context(name)
    trials = sweep_trials(ModelMergeSweepSpec.model_validate(spec))
    assert [row["parameters"] for row in status["trials"]] == [t.parameters for t in trials]
    scores = _children_scores(sweeps, name, objective="code")
    assert len(scores) == 5
    best_name = min(scores, key=scores.get)
    assert (status["best"]["name"], status["best"]["ce"]) == (best_name, scores[best_name])
    assert {row["name"]: row["ce"] for row in status["trials"]} == scores
    assert status["best"]["outputPath"] == f"pvc://{OUTPUT_PVC}/runs/{best_name}"
    assert (sweeps.kubelet.pvc_path(OUTPUT_PVC) / "runs" / best_name / "config.json").exists()


def test_a_failed_trial_does_not_fail_the_sweep_unless_all_fail(sweeps):
    sweeps.start_operator()
    mixed = sweeps.create({"template": _template(), "parallelism": 2,
                           "space": {"scaling_coefficient": {"values": [FAILING_COEFFICIENT, 0.5]}}})
    all_failed = sweeps.create({"template": _template(),
                                "space": {"scaling_coefficient": {"values": [FAILING_COEFFICIENT]}}})
    status = sweeps.wait_phase(mixed, ("Succeeded", "Failed"))
    assert status["phase"] == "Succeeded", sweeps.context(mixed)
    assert (status["counts"]["succeeded"], status["counts"]["failed"]) == (1, 1)
    failed_row = status["trials"][0]
    assert failed_row["phase"] == "Failed" and "makes this stand-in fail" in failed_row["message"]
    assert status["best"]["name"] == trial_name(mixed, 1)
    status = sweeps.wait_phase(all_failed, ("Succeeded", "Failed"))
    assert (status["phase"], status["reason"]) == ("Failed", "AllTrialsFailed"), sweeps.context(all_failed)
    assert "best" not in status and status["counts"]["failed"] == 1
    assert ("Warning", "AllTrialsFailed") in [e[:2] for e in sweeps.events(all_failed)]


def test_operator_restart_mid_sweep_creates_no_duplicate_and_loses_no_trial(sweeps):
    operator = sweeps.start_operator()
    watch = ChildWatch(sweeps)
    spec = {"template": _template(seconds=3), "parallelism": 2,
            "space": {"scaling_coefficient": {"start": 0.5, "stop": 1.0, "step": 0.1}}}
    name = sweeps.create(spec)
    _wait_children(sweeps, name, 2, running=True)
    operator.stop(signal.SIGKILL)  # mid-sweep: two trials running, four not created
    time.sleep(4)  # the running trials finish while no operator watches
    sweeps.start_operator()
    status = sweeps.wait_phase(name, ("Succeeded", "Failed"))
    watch.stop()
    assert status["phase"] == "Succeeded", sweeps.context(name)
    expected = [trial_name(name, i) for i in range(6)]
    assert sorted(n for n, _ in watch.added) == sorted(expected), watch.added  # each created exactly once
    assert len({uid for _, uid in watch.added}) == 6
    assert [row["phase"] for row in status["trials"]] == ["Succeeded"] * 6
    assert watch.most_unfinished <= 2
    scores = _children_scores(sweeps, name)
    # 0.8 minimizes the stand-in's overall cross-entropy (30 algebra tokens best at 0.7, 10 code tokens at 1.1)
    assert status["best"]["name"] == min(scores, key=scores.get) == trial_name(name, 3)


def test_cancel_stops_creating_trials_and_cancels_the_running_ones(sweeps):
    sweeps.start_operator()
    watch = ChildWatch(sweeps)
    name = sweeps.create({"template": _template(seconds=300), "parallelism": 2,
                          "space": {"scaling_coefficient": {"values": [0.5, 0.6, 0.7, 0.8]}}})
    _wait_children(sweeps, name, 2, running=True)
    sweeps.patch(name, {"cancel": True})
    status = sweeps.wait_phase(name, ("Cancelled",), timeout=120)
    watch.stop()
    assert status["reason"] == "Cancelled"
    assert [row["phase"] for row in status["trials"]] == ["Cancelled", "Cancelled", "Skipped", "Skipped"]
    assert status["counts"]["created"] == 2 and status["counts"]["skipped"] == 2
    children = sweeps.children(name)
    assert sorted(children) == [trial_name(name, 0), trial_name(name, 1)]
    for child in children.values():
        assert child["spec"]["cancel"] is True and child["status"]["phase"] == "Cancelled"
    time.sleep(2)
    assert len(watch.added) == 2 and len(sweeps.children(name)) == 2  # nothing created after the cancel
    assert {c["type"]: c["status"] for c in status["conditions"]}["Cancelled"] == "True"


def test_deleting_a_sweep_deletes_its_children(sweeps):
    sweeps.start_operator()
    name = sweeps.create({"template": _template(seconds=300), "parallelism": 2,
                          "space": {"scaling_coefficient": {"values": [0.5, 0.6, 0.7]}}})
    _wait_children(sweeps, name, 2, running=True)
    sweeps.custom.delete_namespaced_custom_object(API_GROUP, API_VERSION, sweeps.ns, SWEEP_PLURAL, name,
                                                  _preload_content=False)
    wait_for(lambda: not sweeps.children() and not raw(sweeps.batch.list_namespaced_job, sweeps.ns)["items"], 120,
             "the garbage collector to delete the children and their Jobs", context=lambda: str(sweeps.children()))
    assert sweeps.sweep(name) is None


def test_keep_best_deletes_the_other_trials_outputs_and_keeps_their_results(sweeps):
    sweeps.start_operator()
    name = sweeps.create({"template": _template(output_dir="keep"), "parallelism": 3, "keep": "best",
                          "space": {"scaling_coefficient": {"values": [0.5, 0.7, 0.9, FAILING_COEFFICIENT]}}})
    status = sweeps.wait_phase(name, ("Succeeded", "Failed"))
    assert status["phase"] == "Succeeded", sweeps.context(name)
    best = trial_name(name, 1)
    assert status["best"]["name"] == best
    root = sweeps.kubelet.pvc_path(OUTPUT_PVC) / "keep"
    assert sorted(p.name for p in root.iterdir()) == [best]
    assert (root / best / "config.json").exists()
    assert sorted(sweeps.children(name)) == [best, trial_name(name, 3)]  # the best, and the failed one
    assert [row["phase"] for row in status["trials"]] == ["Succeeded", "Succeeded", "Succeeded", "Failed"]
    assert all(row.get("ce") is not None for row in status["trials"][:3])
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["OutputsCleaned"]["status"] == "True"
    assert trial_name(name, 0) in conditions["OutputsCleaned"]["message"]
    (job,) = raw(sweeps.batch.list_namespaced_job, sweeps.ns, label_selector="app.kubernetes.io/component="
                 "sweep-cleanup")["items"]
    assert job["status"].get("succeeded") == 1


def test_early_stopping_skips_the_rest_once_the_best_stops_improving(sweeps):
    sweeps.start_operator()
    # On algebra the stand-in is best at 0.7: trials 1 and 2 do not improve on trial 0.
    name = sweeps.create({"template": _template(), "earlyStopping": {"patience": 2},
                          "objective": {"dataFile": "algebra"},
                          "space": {"scaling_coefficient": {"values": [0.7, 0.8, 0.9, 1.0, 0.6]}}})
    status = sweeps.wait_phase(name, ("Succeeded", "Failed"))
    assert (status["phase"], status["reason"]) == ("Succeeded", "EarlyStopped"), sweeps.context(name)
    assert [row["phase"] for row in status["trials"]] == ["Succeeded"] * 3 + ["Skipped"] * 2
    assert status["best"]["name"] == trial_name(name, 0)
    assert sorted(sweeps.children(name)) == [trial_name(name, i) for i in range(3)]
    assert {c["type"]: c["status"] for c in status["conditions"]}["EarlyStopped"] == "True"


def test_a_sweep_whose_trials_are_not_valid_merges_is_refused_creating_nothing(sweeps):
    sweeps.start_operator()
    # The API server cannot check that each trial's spec is a valid ModelMerge: mask_merging with no rates.
    name = sweeps.create({"template": _template(merge_method="mask_merging"),
                          "space": {"seed": {"values": [1, 2]}}})
    status = sweeps.wait_phase(name, ("Failed",), timeout=60)
    assert status["reason"] == "InvalidSpec"
    assert "space: trial 0 (merge_method=mask_merging, seed=1) is not a valid merge: weight_mask_rates" in \
        status["message"]
    assert {c["type"]: c["status"] for c in status["conditions"]}["Accepted"] == "False"
    wait_for(lambda: ("Warning", "InvalidSpec") in [e[:2] for e in sweeps.events(name)], 30, "the event")
    time.sleep(1)
    assert sweeps.children() == {} and raw(sweeps.batch.list_namespaced_job, sweeps.ns)["items"] == []
    assert "trials" not in status
