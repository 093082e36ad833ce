"""Evaluated merges on Kubernetes. Integration tests on the real control plane (envtest kube-apiserver, the
operator in-process, the test kubelet running merge pods as local processes, the REST API's Kubernetes backend):
the CE in status.evaluation, in the `CE` printer column (read through the API server's Table form, as `kubectl get
mm` does), in GET /api/jobs/{id} and /metrics; the Job in the evaluation image with the evaluation's default memory
and the output volume as its working directory; an evaluation that fails after the merge keeps the merge
Succeeded; bad evaluation input is refused naming the field, creating nothing.

The merges run the real engine on tiny chat models from a pre-filled HF cache on the cache claim, with data files
on the output claim. The real engine checks everything it can before merging, so an evaluation failing after a
successful merge is played by a stand-in engine (`fake/...` base models) that writes such a summary.

Unit tests (no control plane): the Job of an evaluated merge, the operator's evaluation flags, and the status,
condition and events the Reconciler derives from an engine summary, against test_operator_unit's fake API."""

from __future__ import annotations

import json
import math
import sys
import uuid

import pytest
import requests
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from modelmerge.contract import API_GROUP, API_VERSION, PLURAL, MergeEvaluation, ModelMergeSpec
from modelmerge.kubeclient import raw
from modelmerge_api.app import AppSettings, create_app
from modelmerge_api.kube import KubernetesBackend
from modelmerge_operator import manifests
from modelmerge_operator.config import DEFAULT_EVALUATION_MEMORY, DEFAULT_IMAGE, OperatorConfig, config_from_args
from modelmerge_operator.reconcile import Reconciler
from modelmerge_operator.status import NO_EVALUATION, evaluated_condition, evaluation_sentence
from tests.helpers.eval_data import make_chat_finetune, make_chat_model, make_records, write_records
from tests.helpers.models import fill_hf_cache
from tests.helpers.rest_api import job, serve_in_thread, submit, wait_status
from tests.helpers.waiting import wait_for
from tests.kube.fixtures import create_namespace, delete_namespace
from tests.test_api_kube import install_crd, operator_in_process
from tests.test_operator_unit import FakeKube
from tests.test_operator_unit import _body as unit_body

integration = pytest.mark.integration

OUTPUT_PVC, CACHE_PVC = "merge-output", "hf-cache"
EVALUATION_IMAGE = "registry.local/modelmerge/merge-eval:1"
MERGE_IMAGE = "registry.local/modelmerge/merge-cpu:1"
BASE, FINETUNES = "test/chat-base", ("test/chat-code", "test/chat-algebra")
DATA = "eval/algebra.json"
DATASET, DATASET_REF = "test/evals", "hf://datasets/test/evals/code.json"
AUTH = {"Authorization": "Bearer static-token"}
TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io"
EVAL_FAILURE = "evaluation: CUDA error: an illegal memory access was encountered (stand-in engine)"
# The merge command: the real engine, except for the `fake/...` base models: `fake/eval-fails` merges (writes an
# output) and reports a failed evaluation, `fake/no-evaluation` succeeds with a summary that has none (an engine
# image that cannot evaluate).
DISPATCH = r'''
import json, os, sys
def arg(flag):
    return sys.argv[sys.argv.index(flag) + 1]
spec = json.load(open(arg("--spec")))
if spec["base_model"].startswith("fake/"):
    os.makedirs(arg("--output-dir"))
    open(os.path.join(arg("--output-dir"), "config.json"), "w").write("{}")
    summary = {"status": "succeeded", "output_dir": arg("--output-dir"), "tensors": 3}
    if spec["base_model"] == "fake/eval-fails":
        summary["evaluation"] = {"state": "Failed", "message": EVAL_FAILURE}
    open(arg("--summary-file"), "w").write(json.dumps(summary))
    print(json.dumps(summary), flush=True)
    sys.exit(0)
os.execv(sys.executable, [sys.executable, "-m", "modelmerge.cli", *sys.argv[1:]])
'''.replace("EVAL_FAILURE", repr(EVAL_FAILURE))


class Cluster:
    def __init__(self, url: str, api, namespace: str, kubelet) -> None:
        self.url, self.api, self.namespace, self.kubelet = url, api, namespace, kubelet
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)

    def merge(self, name: str) -> dict:
        return raw(self.custom.get_namespaced_custom_object, API_GROUP, API_VERSION, self.namespace, PLURAL, name)

    def names(self) -> list[str]:
        listing = raw(self.custom.list_namespaced_custom_object, API_GROUP, API_VERSION, self.namespace, PLURAL)
        return [item["metadata"]["name"] for item in listing["items"]]

    def create(self, name: str, spec: dict) -> dict:
        body = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "ModelMerge", "metadata": {"name": name},
                "spec": spec}
        return raw(self.custom.create_namespaced_custom_object, API_GROUP, API_VERSION, self.namespace, PLURAL,
                   body)

    def wait_phase(self, name: str, phase: str) -> dict:
        wait_for(lambda: (self.merge(name).get("status") or {}).get("phase") in ("Succeeded", "Failed"), 240,
                 f"ModelMerge {name} to finish", context=lambda: json.dumps(self.merge(name).get("status")))
        merge = self.merge(name)
        assert merge["status"]["phase"] == phase, merge["status"]
        return merge

    def table_row(self, name: str) -> dict[str, object]:
        """The printer columns of one ModelMerge, as `kubectl get mm NAME` receives them."""
        table = raw(self.custom.get_namespaced_custom_object, API_GROUP, API_VERSION, self.namespace, PLURAL, name,
                    _headers={"Accept": TABLE})
        assert table["kind"] == "Table"
        columns = [c["name"] for c in table["columnDefinitions"]]
        (row,) = table["rows"]
        return dict(zip(columns, row["cells"], strict=True))

    def events(self, name: str) -> list[tuple[str, str, str]]:
        items = raw(self.core.list_namespaced_event, self.namespace,
                    field_selector=f"involvedObject.name={name}")["items"]
        return [(e["type"], e["reason"], e.get("message") or "") for e in items]

    def pod(self, name: str) -> dict:
        pods = raw(self.core.list_namespaced_pod, self.namespace, label_selector=f"job-name={name}-merge")["items"]
        return pods[0]


@pytest.fixture(scope="module")
def module_namespace(k8s_api):
    name = create_namespace(k8s_api, f"eval-{uuid.uuid4().hex[:8]}")
    yield name
    delete_namespace(k8s_api, name)


@pytest.fixture(scope="module")
def cluster(control_plane, k8s_api, kubeconfig_path, module_namespace, tmp_path_factory):
    from tests.kube.kubelet import FakeKubelet

    install_crd(k8s_api)
    root = tmp_path_factory.mktemp("eval-kube")
    dispatch = root / "dispatch.py"
    dispatch.write_text(DISPATCH)
    kubelet = FakeKubelet(k8s_api, namespace=module_namespace, root=root / "kubelet")
    base = make_chat_model(root / "models" / "base")
    fill_hf_cache(kubelet.pvc_path(CACHE_PVC), BASE, base)
    for seed, repo in enumerate(FINETUNES, start=1):
        fill_hf_cache(kubelet.pvc_path(CACHE_PVC), repo, make_chat_finetune(base, root / "models" / repo, seed=seed))
    write_records(kubelet.pvc_path(OUTPUT_PVC) / DATA, make_records(12, seed=3))
    write_records(root / "dataset" / "code.json", make_records(7, seed=4))
    fill_hf_cache(kubelet.pvc_path(CACHE_PVC), DATASET, root / "dataset", repo_type="dataset")
    kubelet.start()
    defaults = {"output": {"pvc": OUTPUT_PVC}, "modelCache": {"pvc": CACHE_PVC, "readOnly": True},
                "resources": {"cpu": 1, "memory": "2Gi"}}
    backend = KubernetesBackend(control_plane.api_client(), module_namespace, kubelet.pvc_path(OUTPUT_PVC),
                                defaults)
    try:
        with operator_in_process(kubeconfig_path, module_namespace, [sys.executable, str(dispatch)],
                                 image=MERGE_IMAGE, evaluation_image=EVALUATION_IMAGE), \
                serve_in_thread(create_app(backend, AppSettings(api_token="static-token"))) as url:
            yield Cluster(url, k8s_api, module_namespace, kubelet)
    finally:
        kubelet.stop()


def _request(**evaluation) -> dict:
    return {"base_model": BASE, "models_to_merge": list(FINETUNES), "merge_method": "task_arithmetic",
            "scaling_coefficient": 0.5, "evaluation": {"data": [DATA], **evaluation}}


def _spec(**evaluation) -> dict:
    return {**_request(**evaluation), "output": {"pvc": OUTPUT_PVC}, "modelCache": {"pvc": CACHE_PVC}}


@integration
def test_an_evaluated_merge_through_the_api_shows_its_ce_in_status_column_job_and_metrics(cluster):
    job_id = submit(cluster.url, _request(baselines=True, batch_size=4), headers=AUTH)
    final = wait_status(cluster.url, job_id, timeout=240, headers=AUTH)
    assert final["status"] == "completed", final
    merge = cluster.merge(job_id)
    status = merge["status"]
    evaluation = MergeEvaluation.model_validate(status["evaluation"])
    assert evaluation.state == "Succeeded" and evaluation.device == "cpu" and evaluation.dtype == "float32"
    ce = evaluation.overall.ce
    assert ce is not None and math.isfinite(ce) and ce > 0 and evaluation.overall.tokens > 0
    assert evaluation.overall.records == 12 and [f.name for f in evaluation.files] == ["algebra"]
    assert math.isclose(evaluation.overall.ppl, math.exp(ce), rel_tol=1e-9)
    assert sorted(b.role for b in evaluation.baselines) == ["base", "finetuned", "finetuned"]
    assert evaluation.bestInput in (BASE, *FINETUNES)
    assert evaluation.bestInputCe == min(b.ce for b in evaluation.baselines)
    # The REST job view carries the same evaluation, in the contract's shape.
    assert final["evaluation"] == evaluation.model_dump(mode="json")
    assert job(cluster.url, job_id, headers=AUTH)["evaluation"]["overall"]["ce"] == ce
    listed = requests.get(cluster.url + "/api/jobs", headers=AUTH, timeout=10).json()["jobs"]
    assert [j["evaluation"] for j in listed if j["job_id"] == job_id] == [final["evaluation"]]
    # `kubectl get mm` shows it: the CE printer column.
    row = cluster.table_row(job_id)
    assert row["CE"] == ce and row["Phase"] == "Succeeded"
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Evaluated"]["status"] == "True" and conditions["Evaluated"]["reason"] == "Evaluated"
    assert f"cross-entropy {ce:.4f}" in conditions["Evaluated"]["message"]
    assert conditions["Complete"]["status"] == "True" and status["reason"] == "Completed"
    wait_for(lambda: any(e[:2] == ("Normal", "Evaluated") for e in cluster.events(job_id)), 30,
             "the Evaluated event", context=lambda: str(cluster.events(job_id)))
    (event,) = [e for e in cluster.events(job_id) if e[1] == "Evaluated"]
    assert f"cross-entropy {ce:.4f}" in event[2] and "best input" in event[2]
    # The Job ran in the evaluation image, with the evaluation's default memory (not the API's merge default,
    # 2Gi) and the output volume as working directory, where the relative data file is.
    (container,) = cluster.pod(job_id)["spec"]["containers"]
    assert container["image"] == EVALUATION_IMAGE and container["workingDir"] == "/output"
    assert container["resources"]["limits"] == {"memory": DEFAULT_EVALUATION_MEMORY}
    assert merge["spec"]["resources"] == {"gpu": 1, "gpuResourceName": "nvidia.com/gpu"}
    metrics = requests.get(cluster.url + "/metrics", timeout=10).text
    assert 'modelmerge_evaluations{state="Succeeded"}' in metrics
    counts = [line for line in metrics.splitlines() if line.startswith("modelmerge_evaluation_cross_entropy_count")]
    assert counts and float(counts[0].split()[-1]) >= 1, metrics


@integration
def test_a_modelmerge_applied_directly_runs_in_the_evaluation_image_and_shows_its_ce(cluster):
    """Data from the output volume and from a dataset repo in the cache claim (HF_HOME, offline)."""
    name = f"direct-{uuid.uuid4().hex[:6]}"
    spec = _spec(limit=5)
    spec["evaluation"]["data"].append(DATASET_REF)
    cluster.create(name, {**spec, "resources": {"memory": "3Gi"}})
    merge = cluster.wait_phase(name, "Succeeded")
    evaluation = merge["status"]["evaluation"]
    assert evaluation["state"] == "Succeeded" and evaluation["overall"]["records"] == 10
    assert sorted(f["records"] for f in evaluation["files"]) == [5, 5]
    assert "baselines" not in evaluation or evaluation["baselines"] == []
    assert cluster.table_row(name)["CE"] == evaluation["overall"]["ce"]
    (container,) = cluster.pod(name)["spec"]["containers"]
    assert container["image"] == EVALUATION_IMAGE
    assert container["resources"]["limits"] == {"memory": "3Gi"}  # spec.resources wins over the default
    # Without spec.evaluation a merge keeps the merge image, its default memory and no CE.
    plain = f"plain-{uuid.uuid4().hex[:6]}"
    spec = _spec()
    del spec["evaluation"]
    cluster.create(plain, spec)
    merge = cluster.wait_phase(plain, "Succeeded")
    assert "evaluation" not in merge["status"]
    assert "Evaluated" not in {c["type"] for c in merge["status"]["conditions"]}
    assert cluster.table_row(plain)["CE"] is None
    (container,) = cluster.pod(plain)["spec"]["containers"]
    assert container["image"] == MERGE_IMAGE and "workingDir" not in container


@integration
def test_an_evaluation_failure_keeps_the_merge_succeeded(cluster):
    name = f"evalfails-{uuid.uuid4().hex[:6]}"
    cluster.create(name, {**_spec(), "base_model": "fake/eval-fails"})
    merge = cluster.wait_phase(name, "Succeeded")
    status = merge["status"]
    assert status["evaluation"] == {"state": "Failed", "message": EVAL_FAILURE, "metric": "cross_entropy",
                                    "files": [], "baselines": []}
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Complete"]["status"] == "True"
    assert (conditions["Evaluated"]["status"], conditions["Evaluated"]["reason"]) == ("False", "EvaluationFailed")
    assert EVAL_FAILURE in conditions["Evaluated"]["message"]
    assert (cluster.kubelet.pvc_path(OUTPUT_PVC) / name / "config.json").is_file()  # the output stays
    wait_for(lambda: any(e[:2] == ("Warning", "EvaluationFailed") for e in cluster.events(name)), 30,
             "the EvaluationFailed event", context=lambda: str(cluster.events(name)))
    assert cluster.table_row(name)["CE"] is None
    view = job(cluster.url, name, headers=AUTH)
    assert view["status"] == "completed" and view["error_message"] is None
    assert view["evaluation"]["state"] == "Failed" and view["evaluation"]["message"] == EVAL_FAILURE
    # An engine whose summary has no evaluation: the evaluation is marked Failed, saying so.
    silent = f"noeval-{uuid.uuid4().hex[:6]}"
    cluster.create(silent, {**_spec(), "base_model": "fake/no-evaluation"})
    status = cluster.wait_phase(silent, "Succeeded")["status"]
    assert status["evaluation"]["state"] == "Failed" and status["evaluation"]["message"] == NO_EVALUATION


@integration
@pytest.mark.parametrize("data, reason", [
    ("/etc/passwd", "relative to the output volume"),
    ("eval/../../../etc/passwd", "without '..'"),
    ("hf://models/org/x", "hf://datasets/<owner>/<name>"),
])
def test_bad_evaluation_input_is_refused_naming_the_field_and_nothing_is_created(cluster, data, reason):
    before = set(cluster.names())
    body = {**_request(), "evaluation": {"data": [DATA, data]}, "hf_token": "hf_secretValue123456"}
    response = requests.post(cluster.url + "/api/merge", json=body, headers=AUTH, timeout=30)
    assert response.status_code == 400, response.text
    assert "evaluation.data" in response.json()["error"] and reason in response.json()["error"]
    # kubectl apply: the API server refuses it (CRD schema and CEL rules), naming the field.
    with pytest.raises(ApiException) as refused:
        cluster.create(f"bad-{uuid.uuid4().hex[:6]}", {**_spec(), "evaluation": {"data": [data]}})
    assert refused.value.status == 422
    assert "spec.evaluation.data[0]" in refused.value.body, refused.value.body
    assert set(cluster.names()) == before
    secrets = raw(cluster.core.list_namespaced_secret, cluster.namespace)["items"]
    assert not [s for s in secrets if s["metadata"]["name"].endswith("-hf-token")
                and s["metadata"]["name"].removesuffix("-hf-token") not in before]


@integration
def test_bad_evaluation_options_are_refused_naming_the_field(cluster):
    before = set(cluster.names())
    for evaluation, field in (({"data": []}, "evaluation.data"), ({"data": [DATA], "batch_size": 0},
                                                                  "evaluation.batch_size"),
                              ({"data": [DATA], "max_lenght": 64}, "evaluation.max_lenght")):
        response = requests.post(cluster.url + "/api/merge", json={**_request(), "evaluation": evaluation},
                                 headers=AUTH, timeout=30)
        assert response.status_code == 400, response.text
        assert field in response.json()["error"], response.text
        assert field in [d["field"] for d in response.json()["details"]], response.text
    assert set(cluster.names()) == before


# ---------------------------------------------------------------------------------------------------------
# Unit tests: the Job, the flags, the status and events of an evaluated merge (no control plane)
# ---------------------------------------------------------------------------------------------------------

UNIT_CONFIG = OperatorConfig(image=MERGE_IMAGE, evaluation_image=EVALUATION_IMAGE, evaluation_cpu="4",
                             evaluation_memory="24Gi")
EVALUATION = {"state": "Succeeded", "dtype": "float32", "device": "cpu",
              "overall": {"ce": 1.25, "ppl": math.exp(1.25), "tokens": 420, "records": 12, "meanCe": 1.3},
              "files": [{"name": "algebra", "ce": 1.25, "ppl": math.exp(1.25), "tokens": 420, "records": 12}],
              "baselines": [{"model": "org/a", "role": "finetuned", "ce": 1.5}, {"model": "org/base", "role": "base",
                                                                               "ce": 1.75}]}


def _merge_container(**spec) -> dict:
    body = unit_body(**spec)
    job = manifests.job(body, ModelMergeSpec.model_validate(body["spec"]), UNIT_CONFIG)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container


def test_an_evaluated_job_runs_in_the_evaluation_image_with_the_evaluation_defaults():
    evaluated = _merge_container(evaluation={"data": ["eval/a.json", "hf://datasets/org/evals/b.json"]})
    assert evaluated["image"] == EVALUATION_IMAGE and evaluated["workingDir"] == "/output"
    amounts = {"cpu": "4", "memory": "24Gi"}
    assert evaluated["resources"] == {"requests": amounts, "limits": amounts}
    # spec.image and spec.resources win; GPUs with use_gpu as for any merge.
    mine = _merge_container(evaluation={"data": ["a.json"]}, image="mine:1", use_gpu=True,
                            resources={"memory": "80Gi"})
    assert mine["image"] == "mine:1"
    assert mine["resources"] == {"requests": {"cpu": "4", "memory": "80Gi"},
                                 "limits": {"cpu": "4", "memory": "80Gi", "nvidia.com/gpu": "1"}}
    plain = _merge_container()
    assert plain["image"] == MERGE_IMAGE and "workingDir" not in plain
    assert plain["resources"]["limits"] == {"memory": manifests.DEFAULT_MERGE_MEMORY}
    # The engine's request keeps the data refs relative: the working directory is the output volume.
    body = unit_body(evaluation={"data": ["eval/a.json"]})
    request = json.loads(manifests.config_map(body, ModelMergeSpec.model_validate(body["spec"]))["data"]["spec.json"])
    assert request["evaluation"]["data"] == ["eval/a.json"]


def test_the_operators_evaluation_flags(monkeypatch):
    from modelmerge.cli import build_parser

    def config(*flags: str) -> OperatorConfig:
        return config_from_args(build_parser().parse_args(["operator", *flags]))

    assert (config().evaluation_image, config().evaluation_cpu, config().evaluation_memory) == (
        DEFAULT_IMAGE, None, DEFAULT_EVALUATION_MEMORY)
    given = config("--evaluation-image", "e:2", "--evaluation-cpu", "3500m", "--evaluation-memory", "40Gi")
    assert (given.evaluation_image, given.evaluation_cpu, given.evaluation_memory) == ("e:2", "3500m", "40Gi")
    for flag in ("--evaluation-cpu", "--evaluation-memory"):
        with pytest.raises(ValueError, match=f"{flag} 'lots': not a Kubernetes quantity"):
            config(flag, "lots")
    monkeypatch.setenv("MODELMERGE_EVALUATION_MEMORY", "12Gi")
    assert config().evaluation_memory == "12Gi"


def _finished(world, summary: dict, **spec) -> tuple[dict, list[tuple[str, str, str]]]:
    """A merge created and completed through the Reconciler, its pod's termination message `summary`; returns the
    last status written and the events."""
    rec, kube, events = world
    body = unit_body(**spec)
    rec.create(body)
    job = kube.objects[("Job", "llama-merge-merge")]
    job["status"] = {"succeeded": 1, "completionTime": "2026-01-01T00:02:00Z",
                     "conditions": [{"type": "Complete", "status": "True"}]}
    kube.pods = [{"status": {"phase": "Succeeded", "containerStatuses": [{"name": "merge", "state": {"terminated": {
        "exitCode": 0, "reason": "Completed", "message": json.dumps(summary),
        "finishedAt": "2026-01-01T00:01:59Z"}}}]}}]
    rec.job_event("MODIFIED", job, body)
    rec.job_event("MODIFIED", job, {**body, "status": rec.current_status(body)})  # a repeated event: no change
    return kube.statuses[-1][1], events


@pytest.fixture
def world():
    kube, events = FakeKube(), []
    return Reconciler(kube, UNIT_CONFIG, lambda obj, kind, reason, message: events.append((kind, reason, message))), \
        kube, events


def test_a_succeeded_evaluation_is_in_the_status_a_condition_and_an_event(world):
    summary = {"status": "succeeded", "tensors": 27, "seconds": 3.5, "evaluation": EVALUATION}
    status, events = _finished(world, summary, evaluation={"data": ["eval/a.json"], "baselines": True})
    assert (status["phase"], status["reason"]) == ("Succeeded", "Completed")
    assert status["evaluation"] == MergeEvaluation.model_validate(EVALUATION).model_dump(mode="json",
                                                                                           exclude_none=True)
    assert (status["evaluation"]["bestInput"], status["evaluation"]["bestInputCe"]) == ("org/a", 1.5)
    evaluated = {c["type"]: c for c in status["conditions"]}["Evaluated"]
    sentence = ("cross-entropy 1.2500 (perplexity 3.49) over 420 answer tokens of 1 data file; best input org/a: "
                "1.5000")
    assert (evaluated["status"], evaluated["reason"], evaluated["message"]) == ("True", "Evaluated", sentence)
    assert [e for e in events if e[1] in ("Completed", "Evaluated", "EvaluationFailed")] == [
        ("Normal", "Completed", "Succeeded: merged 27 tensors in 3.5s"), ("Normal", "Evaluated", sentence)]


def test_a_failed_evaluation_keeps_the_merge_succeeded_with_a_warning(world):
    summary = {"status": "succeeded", "evaluation": {"state": "Failed", "message": "CUDA out of memory"}}
    status, events = _finished(world, summary, evaluation={"data": ["eval/a.json"]})
    assert status["phase"] == "Succeeded" and status["message"] == "merged"
    assert status["evaluation"]["state"] == "Failed" and status["evaluation"]["message"] == "CUDA out of memory"
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Complete"]["status"] == "True"
    assert (conditions["Evaluated"]["status"], conditions["Evaluated"]["reason"]) == ("False", "EvaluationFailed")
    assert events[-1] == ("Warning", "EvaluationFailed", "the evaluation failed: CUDA out of memory")


def test_a_summary_without_the_requested_evaluation_is_a_failed_evaluation(world):
    status, events = _finished(world, {"status": "succeeded"}, evaluation={"data": ["eval/a.json"]})
    assert status["evaluation"] == {"state": "Failed", "message": NO_EVALUATION, "metric": "cross_entropy",
                                    "files": [], "baselines": []}
    assert events[-1][:2] == ("Warning", "EvaluationFailed")


def test_a_merge_without_evaluation_has_none_in_its_status(world):
    status, events = _finished(world, {"status": "succeeded", "evaluation": EVALUATION})
    assert status["evaluation"] is None and "Evaluated" not in {c["type"] for c in status["conditions"]}
    assert not [e for e in events if e[1] in ("Evaluated", "EvaluationFailed")]


def test_the_evaluated_condition_and_sentence_for_every_outcome():
    unscored = MergeEvaluation(state="Succeeded", overall={"ce": None, "tokens": 0}, files=[])
    assert evaluation_sentence(unscored) == "no answer token was scored (cross-entropy undefined)"
    # a broken merge's cross-entropy can be so large that exp() overflows: the contract's ppl is then null
    overflowing = MergeEvaluation(state="Succeeded", overall={"ce": 812.5, "ppl": None, "tokens": 7},
                                  files=[{"name": "a.json", "ce": 812.5, "tokens": 7}])
    assert evaluation_sentence(overflowing) == ("cross-entropy 812.5000 (perplexity overflows) over 7 answer tokens "
                                                "of 1 data file")
    assert evaluated_condition(None) == []
    (condition,) = evaluated_condition({"state": "Failed", "message": "x" * 1900})
    assert condition["status"] == "False" and len(condition["message"]) <= 1024
