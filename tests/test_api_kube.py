"""The REST API with the Kubernetes backend against the real envtest control plane: the ModelMerge CRD applied,
the operator running in-process, the kubelet harness running the merge pods (the real engine, on tiny models
from a pre-filled HF cache on a "model-cache" claim), and the API served by uvicorn on a free port."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from modelmerge.contract import API_GROUP, API_VERSION, PLURAL, parse_progress
from modelmerge.kubeclient import MERGE_PATCH
from modelmerge_api.app import AppSettings, create_app
from modelmerge_api.informer import Informer
from modelmerge_api.kube import KubernetesBackend
from tests.helpers.job_progress import THREE_STEPS, watch_progress
from tests.helpers.rest_api import (
    PAYLOAD,
    check_merged_model,
    extract_archive,
    job,
    make_hub,
    serve_in_thread,
    submit,
    wait_for,
    wait_status,
)
from tests.kube.fixtures import create_namespace, delete_namespace

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SECRET = "hf_KUBEsecretTokenValue987654321"
OUTPUT_PVC, CACHE_PVC = "merge-output", "hf-cache"
# The merge command the operator runs: the real engine, except that base_model "slow/model" just sleeps (so a
# merge can be cancelled while it runs) and "steps/model" reports three steps over a few seconds, one report
# going back (as a stale line would), then succeeds.
DISPATCH = r'''
import json, os, sys, time
''' + THREE_STEPS + r'''
def arg(flag):
    return sys.argv[sys.argv.index(flag) + 1]
spec = json.load(open(arg("--spec")))
if spec["base_model"] == "slow/model":
    print("merging 10%", flush=True)
    time.sleep(300)
if spec["base_model"] == "steps/model":
    report_three_steps(1.0)
    os.makedirs(arg("--output-dir"))
    open(os.path.join(arg("--output-dir"), "config.json"), "w").write("{}")
    summary = json.dumps({"status": "succeeded", "output_dir": arg("--output-dir")})
    open(arg("--summary-file"), "w").write(summary)
    print(summary, flush=True)
    sys.exit(0)
os.execv(sys.executable, [sys.executable, "-m", "modelmerge.cli", *sys.argv[1:]])
'''


def install_crd(api) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    extensions = client.ApiextensionsV1Api(api)
    bodies = [doc for path in sorted((ROOT / "crds").glob("*.yaml"))
              for doc in yaml.safe_load_all(path.read_text()) if doc]
    for body in bodies:
        try:
            extensions.create_custom_resource_definition(body, _preload_content=False)
        except ApiException as exc:
            if exc.status != 409:
                raise
        name = body["metadata"]["name"]

        def established(name=name) -> bool:
            crd = json.loads(extensions.read_custom_resource_definition(name, _preload_content=False).data)
            return any(c["type"] == "Established" and c["status"] == "True"
                       for c in (crd.get("status") or {}).get("conditions") or [])

        wait_for(established, 30, f"CRD {name} to be established")


@contextmanager
def operator_in_process(kubeconfig: Path, namespace: str, merge_command: list[str], **settings: Any):
    """The kopf operator in a thread of this process, watching one namespace (`settings`: more OperatorConfig
    fields)."""
    import kopf

    from modelmerge_operator import handlers  # noqa: F401 - registers the handlers
    from modelmerge_operator.config import OperatorConfig

    # Running merges are read every half second, so their progress reaches the status while a test watches.
    config = OperatorConfig(merge_command=tuple(merge_command), job_env=(("HF_HUB_OFFLINE", "1"),),
                            resync_interval=0.5, **settings)
    memo = kopf.Memo(config=config, workers=4, kubeconfig=str(kubeconfig))
    stop, ready = threading.Event(), threading.Event()
    patch = pytest.MonkeyPatch()
    # kopf logs in through the kubernetes client's default kubeconfig location, read from $KUBECONFIG when the
    # client was imported (before this test ran): point it at the control plane's.
    patch.setattr("kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))

    def run() -> None:
        asyncio.run(kopf.operator(clusterwide=False, namespaces=[namespace], standalone=True, memo=memo,
                                  stop_flag=stop, ready_flag=ready))

    thread = threading.Thread(target=run, name="operator", daemon=True)
    thread.start()
    assert ready.wait(60), "the operator did not start"
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)
        patch.undo()


class Cluster:
    def __init__(self, url: str, backend: KubernetesBackend, api, namespace: str, kubelet, hub) -> None:
        self.url, self.backend, self.api, self.namespace, self.kubelet, self.hub = \
            url, backend, api, namespace, kubelet, hub

    def custom_objects(self) -> list[dict]:
        from kubernetes import client

        listing = client.CustomObjectsApi(self.api).list_namespaced_custom_object(
            API_GROUP, API_VERSION, self.namespace, PLURAL)
        return listing["items"]

    def secrets(self) -> list[str]:
        from kubernetes import client

        items = json.loads(client.CoreV1Api(self.api).list_namespaced_secret(
            self.namespace, _preload_content=False).data)["items"]
        return [s["metadata"]["name"] for s in items]


@pytest.fixture(scope="module")
def module_namespace(k8s_api):
    name = create_namespace(k8s_api, f"api-{uuid.uuid4().hex[:8]}")
    yield name
    delete_namespace(k8s_api, name)


@pytest.fixture(scope="module")
def cluster(control_plane, k8s_api, kubeconfig_path, module_namespace, tmp_path_factory):
    from tests.kube.kubelet import FakeKubelet

    install_crd(k8s_api)
    root = tmp_path_factory.mktemp("kube-api")
    dispatch = root / "dispatch.py"
    dispatch.write_text(DISPATCH)
    kubelet = FakeKubelet(k8s_api, namespace=module_namespace, root=root / "kubelet")
    hub = make_hub(root, hf_home=kubelet.pvc_path(CACHE_PVC))
    kubelet.start()
    defaults = {"output": {"pvc": OUTPUT_PVC}, "modelCache": {"pvc": CACHE_PVC, "readOnly": True}}
    backend = KubernetesBackend(control_plane.api_client(), module_namespace, kubelet.pvc_path(OUTPUT_PVC),
                                defaults)
    settings = AppSettings(api_token="static-token", token_review=backend.review_token)
    try:
        with operator_in_process(kubeconfig_path, module_namespace, [sys.executable, str(dispatch)]), \
                serve_in_thread(create_app(backend, settings)) as url:
            yield Cluster(url, backend, k8s_api, module_namespace, kubelet, hub)
    finally:
        kubelet.stop()


AUTH = {"Authorization": "Bearer static-token"}


def test_health(cluster):
    health = requests.get(cluster.url + "/api/health", timeout=10).json()
    assert health["status"] == "healthy" and health["backend"] == "kubernetes"
    assert health["merging_available"] is True
    assert health["backend_info"]["namespace"] == cluster.namespace


def test_health_without_a_reachable_api_server():
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = "http://127.0.0.1:9"
    backend = KubernetesBackend(client.ApiClient(configuration), "default", None, {"output": {"pvc": "out"}})
    info = backend.health()
    assert info["merging_available"] is False and "not usable" in info["reason"]


def test_an_unreachable_api_server_is_a_bad_gateway_naming_it():
    """Creating or cancelling a merge while the API server cannot be reached answers 502 with a message saying
    so (not a 500 internal error), and leaks no address or token."""
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = "http://127.0.0.1:9"
    configuration.retries = 0
    backend = KubernetesBackend(client.ApiClient(configuration), "default", None, {"output": {"pvc": "out"}})
    with serve_in_thread(create_app(backend)) as url:
        response = requests.post(url + "/api/merge", json=PAYLOAD, timeout=60)
        assert response.status_code == 502, response.text
        assert response.json() == {"error": "the Kubernetes API server could not be reached: NewConnectionError"}
        assert requests.get(url + "/api/health", timeout=60).status_code == 200


def test_merge_end_to_end(cluster, tmp_path):
    hf_home, base, finetunes = cluster.hub
    job_id = submit(cluster.url, PAYLOAD, headers=AUTH)
    final = wait_status(cluster.url, job_id, timeout=240, headers=AUTH)
    assert final["status"] == "completed", final
    assert final["output_path"] == f"pvc://{OUTPUT_PVC}/{job_id}"
    assert final["started_at"] and final["completed_at"] and final["error_message"] is None
    assert final["params"]["models_to_merge"] == PAYLOAD["models_to_merge"]
    (merge,) = [o for o in cluster.custom_objects() if o["metadata"]["name"] == job_id]
    assert merge["spec"]["merge_method"] == "task_arithmetic" and merge["spec"]["output"]["pvc"] == OUTPUT_PVC
    info = requests.get(f"{cluster.url}/api/download/{job_id}", headers=AUTH, timeout=30).json()
    assert any(f["path"] == "config.json" for f in info["files"])
    archive = requests.get(f"{cluster.url}/api/download/{job_id}/archive", headers=AUTH, timeout=60)
    assert archive.status_code == 200
    check_merged_model(extract_archive(archive.content, tmp_path / "x"), base, finetunes, scaling=0.3)
    listed = requests.get(cluster.url + "/api/jobs", params={"status": "completed"}, headers=AUTH,
                          timeout=10).json()
    assert job_id in [j["job_id"] for j in listed["jobs"]]
    metrics = requests.get(cluster.url + "/metrics", timeout=10).text
    assert 'modelmerge_jobs{status="completed"}' in metrics
    logs = requests.get(f"{cluster.url}/api/jobs/{job_id}/logs", headers=AUTH, timeout=30).text
    last = parse_progress(logs)  # the engine's progress lines
    assert last is not None and (last.percent, last.step, last.stepIndex, last.steps) == (100.0, "merge", 1, 1), logs
    followed = requests.get(f"{cluster.url}/api/jobs/{job_id}/logs", params={"follow": "true"}, headers=AUTH,
                            timeout=60)  # ends at once: the pod has ended
    assert followed.status_code == 200 and followed.text == logs


def test_progress_is_reported_while_running_and_never_goes_down(cluster):
    job_id = submit(cluster.url, {**PAYLOAD, "base_model": "steps/model"}, headers=AUTH)
    samples = watch_progress(cluster.url, job_id, headers=AUTH)
    final = job(cluster.url, job_id, headers=AUTH)
    assert final["status"] == "completed", final
    percents = [percent for percent, _ in samples]
    assert percents == sorted(percents), samples
    assert len(set(percents)) >= 3 and {step for _, step in samples} >= {"signs 2/3", "merge 3/3"}, samples
    (merge,) = [o for o in cluster.custom_objects() if o["metadata"]["name"] == job_id]
    assert merge["status"]["outputPath"] == final["output_path"] == f"pvc://{OUTPUT_PVC}/{job_id}"


def test_hf_token_lives_in_an_owned_secret_only(cluster):
    from kubernetes import client

    response = requests.post(cluster.url + "/api/merge", json={**PAYLOAD, "hf_token": SECRET}, headers=AUTH,
                             timeout=30)
    assert response.status_code == 202 and SECRET not in response.text
    job_id = response.json()["job_id"]
    core = client.CoreV1Api(cluster.api)
    secret = json.loads(core.read_namespaced_secret(f"{job_id}-hf-token", cluster.namespace,
                                                    _preload_content=False).data)
    assert base64.b64decode(secret["data"]["token"]).decode() == SECRET
    (merge,) = [o for o in cluster.custom_objects() if o["metadata"]["name"] == job_id]
    assert secret["metadata"]["ownerReferences"][0]["uid"] == merge["metadata"]["uid"]
    assert merge["spec"]["hfTokenSecret"] == {"name": f"{job_id}-hf-token", "key": "token"}
    assert SECRET not in json.dumps(merge)
    final = wait_status(cluster.url, job_id, timeout=240, headers=AUTH)
    assert final["status"] == "completed"
    pods = json.loads(core.list_namespaced_pod(cluster.namespace, label_selector=f"job-name={job_id}-merge",
                                               _preload_content=False).data)["items"]
    env = {e["name"]: e for e in pods[0]["spec"]["containers"][0]["env"]}
    assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
        "name": f"{job_id}-hf-token", "key": "token"}}}
    for path in ("/api/jobs", f"/api/jobs/{job_id}", f"/api/download/{job_id}"):
        assert SECRET not in requests.get(cluster.url + path, headers=AUTH, timeout=10).text
    client.CustomObjectsApi(cluster.api).delete_namespaced_custom_object(
        API_GROUP, API_VERSION, cluster.namespace, PLURAL, job_id)
    wait_for(lambda: f"{job_id}-hf-token" not in cluster.secrets(), 60,
             "the garbage collector to delete the token Secret with its ModelMerge")
    wait_for(lambda: requests.get(f"{cluster.url}/api/jobs/{job_id}", headers=AUTH, timeout=10)
             .status_code == 404, 30, "the deleted job to disappear from the API")


def test_cancel(cluster):
    job_id = submit(cluster.url, {**PAYLOAD, "base_model": "slow/model"}, headers=AUTH)
    wait_status(cluster.url, job_id, ("running",), timeout=60, headers=AUTH)
    response = requests.delete(f"{cluster.url}/api/jobs/{job_id}", headers=AUTH, timeout=10)
    assert response.status_code == 200 and response.json()["message"] == "cancellation requested"
    (merge,) = [o for o in cluster.custom_objects() if o["metadata"]["name"] == job_id]
    assert merge["spec"]["cancel"] is True
    final = wait_status(cluster.url, job_id, timeout=60, headers=AUTH)
    assert final["status"] == "cancelled"
    again = requests.delete(f"{cluster.url}/api/jobs/{job_id}", headers=AUTH, timeout=10)
    assert again.status_code == 409 and "already cancelled" in again.json()["error"]


@pytest.mark.parametrize("payload", [
    {},
    {**PAYLOAD, "merge_method": "frankenmerge"},
    {**PAYLOAD, "output_dir": "../escape"},
    {**PAYLOAD, "merge_method": "mask_merging", "weight_mask_rates": [0.5]},
])
def test_bad_input_creates_nothing(cluster, payload):
    before = ({o["metadata"]["name"] for o in cluster.custom_objects()}, set(cluster.secrets()))
    response = requests.post(cluster.url + "/api/merge", json={**payload, "hf_token": SECRET}, headers=AUTH,
                             timeout=10)
    assert response.status_code == 400 and response.json()["details"]
    assert ({o["metadata"]["name"] for o in cluster.custom_objects()}, set(cluster.secrets())) == before


def test_api_server_rejection_becomes_400(cluster, k8s_api):
    """A cluster policy (ValidatingAdmissionPolicy) the contract knows nothing about: its 422 is a 400 with the
    API server's message, and the token Secret made for the request is removed again."""
    from kubernetes import client

    admission = client.AdmissionregistrationV1Api(k8s_api)
    policy = f"max-scaling-{cluster.namespace}"
    admission.create_validating_admission_policy({
        "metadata": {"name": policy},
        "spec": {"failurePolicy": "Fail",
                 "matchConstraints": {"resourceRules": [{"apiGroups": [API_GROUP], "apiVersions": ["*"],
                                                         "operations": ["CREATE"], "resources": [PLURAL]}]},
                 "validations": [{"expression": "object.spec.scaling_coefficient <= 1.0",
                                  "message": "scaling_coefficient above 1.0 is not allowed in this cluster"}]}},
        _preload_content=False)
    admission.create_validating_admission_policy_binding({
        "metadata": {"name": policy},
        "spec": {"policyName": policy, "validationActions": ["Deny"],
                 "matchResources": {"namespaceSelector": {"matchLabels": {
                     "kubernetes.io/metadata.name": cluster.namespace}}}}}, _preload_content=False)
    try:
        wait_for(lambda: _rejected_on_dry_run(cluster), 30, "the admission policy to be loaded", interval=0.5)
        before = set(cluster.secrets())
        response = requests.post(cluster.url + "/api/merge", headers=AUTH, timeout=10,
                                 json={**PAYLOAD, "scaling_coefficient": 2.0, "hf_token": SECRET})
        assert response.status_code == 400, response.text
        assert "rejected by the Kubernetes API server" in response.json()["error"]
        assert "scaling_coefficient above 1.0" in response.json()["error"]
        assert set(cluster.secrets()) == before
    finally:
        admission.delete_validating_admission_policy_binding(policy, _preload_content=False)
        admission.delete_validating_admission_policy(policy, _preload_content=False)


def _rejected_on_dry_run(cluster) -> bool:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    body = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "ModelMerge", "metadata": {"name": "probe"},
            "spec": {**PAYLOAD, "scaling_coefficient": 2.0, "output": {"pvc": OUTPUT_PVC}}}
    try:
        client.CustomObjectsApi(cluster.api).create_namespaced_custom_object(
            API_GROUP, API_VERSION, cluster.namespace, PLURAL, body, dry_run="All")
    except ApiException as exc:
        return exc.status == 422
    return False


def test_jobs_made_with_kubectl_are_listed(cluster):
    from kubernetes import client

    name = f"by-hand-{uuid.uuid4().hex[:6]}"
    body = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "ModelMerge", "metadata": {"name": name},
            "spec": {"base_model": "slow/model", "models_to_merge": ["a/b"], "merge_method": "average_merging",
                     "output": {"pvc": "elsewhere"}}}
    client.CustomObjectsApi(cluster.api).create_namespaced_custom_object(
        API_GROUP, API_VERSION, cluster.namespace, PLURAL, body)
    seen = wait_for(lambda: next((j for j in requests.get(cluster.url + "/api/jobs", headers=AUTH, timeout=10)
                                  .json()["jobs"] if j["job_id"] == name), None), 30, "the watch to see it")
    assert seen["params"]["base_model"] == "slow/model" and seen["output_path"] == f"pvc://elsewhere/{name}"
    assert job(cluster.url, name, headers=AUTH)["job_id"] == name
    requests.delete(f"{cluster.url}/api/jobs/{name}", headers=AUTH, timeout=10)
    assert requests.get(cluster.url + "/api/jobs/no-such-job", headers=AUTH, timeout=10).status_code == 404


def test_logs_come_from_the_merge_pod(cluster):
    job_id = submit(cluster.url, {**PAYLOAD, "base_model": "slow/model"}, headers=AUTH)
    wait_status(cluster.url, job_id, ("running",), timeout=60, headers=AUTH)
    url = f"{cluster.url}/api/jobs/{job_id}/logs"
    # The kubelet harness serves the pod's log to the API server, which the backend reads it through.
    wait_for(lambda: "merging 10%" in requests.get(url, headers=AUTH, timeout=30).text, 30, "the merge log")
    response = requests.get(url, headers=AUTH, timeout=30)
    assert response.status_code == 200 and response.text == "merging 10%\n"
    with requests.get(url, params={"follow": "true"}, headers=AUTH, stream=True, timeout=60) as followed:
        assert followed.status_code == 200
        chunks = followed.iter_content(chunk_size=None)
        received = b""
        while b"merging 10%\n" not in received:
            received += next(chunks)
        # Cancelling stops the pod: the stream ends once its process has ended.
        requests.delete(f"{cluster.url}/api/jobs/{job_id}", headers=AUTH, timeout=10)
        received += b"".join(chunks)
    assert received == b"merging 10%\n"
    assert requests.get(cluster.url + "/api/jobs/nope/logs", headers=AUTH, timeout=10).status_code == 404


def test_service_account_tokens_via_token_review(cluster, k8s_api):
    from kubernetes import client

    core = client.CoreV1Api(k8s_api)
    request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
               "spec": {"expirationSeconds": 600}}
    token = json.loads(core.create_namespaced_service_account_token(
        "default", cluster.namespace, request, _preload_content=False).data)["status"]["token"]
    ok = requests.get(cluster.url + "/api/jobs", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert ok.status_code == 200
    bad = requests.get(cluster.url + "/api/jobs", headers={"Authorization": "Bearer not-a-token"}, timeout=10)
    assert bad.status_code == 401
    assert requests.get(cluster.url + "/api/jobs", timeout=10).status_code == 401


def test_informer_follows_the_namespace_and_never_rolls_back(k8s_api, namespace):
    """The cache the backend reads: it lists, follows additions, changes and deletions through its watch, keeps
    an object's newest version when an older one arrives late, hands each view its previous one, and stops."""
    from kubernetes import client

    install_crd(k8s_api)
    custom = client.CustomObjectsApi(k8s_api)
    args = (API_GROUP, API_VERSION, namespace, PLURAL)

    def by_hand(name: str) -> dict:
        body = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "ModelMerge", "metadata": {"name": name},
                "spec": {"base_model": "a/b", "models_to_merge": ["c/d"], "merge_method": "average_merging",
                         "output": {"pvc": "out"}}}
        return custom.create_namespaced_custom_object(*args, body)

    first = by_hand("listed")
    what = f"ModelMerges in {namespace}"
    informer = Informer(custom.list_namespaced_custom_object, args, order=lambda e: e.obj["metadata"]["name"],
                        make_view=lambda obj, previous: (obj["metadata"]["resourceVersion"], previous), what=what)
    informer.start()
    try:
        assert informer.wait_synced(30)
        assert informer.get("listed").view == (first["metadata"]["resourceVersion"], None)
        by_hand("watched")
        wait_for(lambda: informer.get("watched"), 30, "the watch to add the new object")
        changed = custom.patch_namespaced_custom_object(*args, "listed", {"metadata": {"labels": {"x": "y"}}},
                                                        _content_type=MERGE_PATCH)
        version = changed["metadata"]["resourceVersion"]
        wait_for(lambda: informer.get("listed").view[0] == version, 30, "the watch to see the change")
        assert informer.get("listed").view == (version, (first["metadata"]["resourceVersion"], None))
        assert informer.remember(first).obj["metadata"]["resourceVersion"] == version  # late: not taken
        assert [entry.obj["metadata"]["name"] for entry in informer.entries()] == ["listed", "watched"]
        custom.delete_namespaced_custom_object(*args, "watched")
        wait_for(lambda: informer.get("watched") is None, 30, "the watch to see the deletion")
        assert informer.get("listed").view[0] == version
    finally:
        informer.stop(timeout=30)
    assert f"informer-{what}" not in {thread.name for thread in threading.enumerate()}


def test_the_job_view_keeps_its_progress_when_a_retry_starts_lower():
    """The operator starts a retried pod's status.progress again from that pod's first report, so it can go
    down; the job view the Kubernetes backend serves does not (no control plane needed: the view alone)."""
    from kubernetes import client

    from modelmerge.contract import MergeProgress

    backend = KubernetesBackend(client.ApiClient(), "team-a", None, {"output": {"pvc": OUTPUT_PVC}})

    def viewed(progress: MergeProgress, attempts: int, previous=None):
        merge = {"metadata": {"name": "m1", "creationTimestamp": "2026-12-02T10:00:00Z"},
                 "spec": {"base_model": "org/base", "models_to_merge": ["org/a"], "merge_method": "task_arithmetic",
                          "output": {"pvc": OUTPUT_PVC}},
                 "status": {"phase": "Running", "attempts": attempts, "progress": progress.model_dump()}}
        return backend._view(merge, previous)

    def served(view):  # the bytes the routes send (a view's job is encoded once, when the version arrives)
        shown = json.loads(view.job.json_bytes())
        assert shown == view.job.to_json()
        return shown["progress"], shown["progress_step"]

    first = viewed(MergeProgress(percent=60.0, step="merge", stepIndex=3, steps=3, stepPercent=0.0), 1)
    assert served(first) == (60.0, "merge 3/3")
    retried = viewed(MergeProgress(percent=10.0, step="thresholds", stepIndex=1, steps=3, stepPercent=25.0), 2, first)
    assert served(retried) == (60.0, "merge 3/3")
    further = viewed(MergeProgress(percent=80.0, step="merge", stepIndex=3, steps=3, stepPercent=50.0), 2, retried)
    assert served(further) == (80.0, "merge 3/3")
