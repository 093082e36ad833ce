"""Least-privilege RBAC, proven on the real API server: `helm install` of the chart into the envtest control plane
(RBAC and Pod Security admission on), then the operator and the REST API run under their chart ServiceAccounts'
own tokens (TokenRequest), with the command, arguments and environment of the Deployments the chart installed.
The kubelet harness runs the merge pods (the real engine on tiny models), so merges go all the way through.

Two releases: namespaced (Roles in the watched namespaces; the release namespace enforces the `restricted` Pod
Security Standard) and cluster-wide (ClusterRole). Each checks that nothing the components do is refused and
that what they must not do is: reading Secrets, writing status from the API, touching unwatched namespaces, ...
and that each ServiceAccount's effective rules are exactly the chart's (SelfSubjectRulesReview)."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from modelmerge.contract import API_GROUP, API_VERSION, PLURAL
from tests.helpers.helm_chart import CHART, RELEASE, ROOT, helm, kubeconfig_for_token, triples, values_file
from tests.helpers.waiting import wait_for
from tests.kube.controlplane import ControlPlane, free_port

pytestmark = pytest.mark.integration

# How the API server words an RBAC refusal, how kopf reports one, and a refusal passed on by the REST API (its own
# authentication failures are 401s).
RBAC_DENIAL = re.compile(
    r"cannot \w+ resource|forbidden: User \"system:serviceaccount|Not enough permissions"
    r"|HTTP/1\.1\" 403"
)
MERGE_SELECTOR = "app.kubernetes.io/component=merge"
OUTPUT_CLAIM = f"{RELEASE}-output"
OPERATOR_SA, API_SA = f"{RELEASE}-operator", f"{RELEASE}-api"


def _raw(response) -> Any:
    return json.loads(response.data or b"{}")


# ---------------------------------------------------------------------------------------------------------
# The release, its processes, and the views the tests need
# ---------------------------------------------------------------------------------------------------------


class Process:
    """A component of the chart run as a local process, logging to a file."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path):
        self.argv, self.log = argv, log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@dataclass
class Release:
    cp: ControlPlane
    admin: Any  # kubernetes.client.ApiClient, cluster admin
    namespace: str
    values: dict[str, Any]
    work: Path
    installed: bool = False
    install_output: str = ""
    processes: dict[str, Process] = field(default_factory=dict)
    api_url: str = ""
    api_token: str = ""

    # -- helm ------------------------------------------------------------------------------------------------
    def helm(self, *args: str) -> str:
        result = helm(
            *args,
            "--namespace",
            self.namespace,
            "--kubeconfig",
            str(self.cp.kubeconfig_path),
            home=self.work / "helm-home",
            timeout=300,
        )
        return result.stdout

    def install(self) -> None:
        self.install_output = self.helm("install", RELEASE, str(CHART), *values_file(self.work, self.values))
        self.installed = True
        # A CRD helm has just created answers 429 ("storage is (re)initializing") for a moment.
        from kubernetes import client

        custom = client.CustomObjectsApi(self.admin)
        wait_for(
            lambda: (
                status_code(
                    lambda: custom.list_namespaced_custom_object(API_GROUP, API_VERSION, self.namespace, PLURAL)
                )
                == 200
            ),
            30,
            "ModelMerges to be served",
        )

    def upgrade(self) -> None:
        self.helm("upgrade", RELEASE, str(CHART), *values_file(self.work, self.values))

    def uninstall(self) -> None:
        if self.installed:
            self.helm("uninstall", RELEASE)
            self.installed = False

    # -- what the chart installed -----------------------------------------------------------------------------
    def container(self, component: str) -> dict[str, Any]:
        from kubernetes import client

        deployment = _raw(
            client.AppsV1Api(self.admin).read_namespaced_deployment(
                f"{RELEASE}-{component}", self.namespace, _preload_content=False
            )
        )
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        return container

    def env_of(self, container: dict[str, Any]) -> dict[str, str]:
        """The container's environment as the kubelet would make it (Secret references read as admin)."""
        from kubernetes import client

        env: dict[str, str] = {}
        for item in container.get("env") or []:
            source = item.get("valueFrom")
            if source is None:
                env[item["name"]] = item.get("value", "")
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                secret = _raw(
                    client.CoreV1Api(self.admin).read_namespaced_secret(
                        ref["name"], self.namespace, _preload_content=False
                    )
                )
                env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
            elif "fieldRef" in source and source["fieldRef"]["fieldPath"] == "metadata.name":
                env[item["name"]] = f"{RELEASE}-test-pod"
        return env

    def token(self, service_account: str, namespace: str | None = None) -> str:
        from kubernetes import client

        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": 3600},
        }
        return _raw(
            client.CoreV1Api(self.admin).create_namespaced_service_account_token(
                service_account, namespace or self.namespace, request, _preload_content=False
            )
        )["status"]["token"]

    def kubeconfig(self, service_account: str) -> Path:
        return kubeconfig_for_token(
            self.work / f"{service_account}.kubeconfig",
            self.cp.host,
            self.cp.ca_file,
            self.token(service_account),
            service_account,
        )

    def client_as(self, service_account: str):
        return self.cp.api_client(self.token(service_account))

    # -- the components, as the Deployments run them ----------------------------------------------------------
    def _argv(self, container: dict[str, Any]) -> list[str]:
        command = container["command"]
        assert command[0] == "modelmerge", command  # the console script the images' ENTRYPOINT names
        return [sys.executable, "-m", "modelmerge.cli", *command[1:], *container["args"]]

    def _env(self, container: dict[str, Any]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBECONFIG", "MODELMERGE_"))}
        return {**env, **self.env_of(container), "HF_HUB_OFFLINE": "1"}

    def start_operator(self) -> Process:
        container = self.container("operator")
        port = free_port()
        argv = [
            *self._argv(container),
            "--kubeconfig",
            str(self.kubeconfig(OPERATOR_SA)),
            "--liveness",
            f"http://127.0.0.1:{port}/healthz",
        ]
        process = Process(argv, self._env(container), self.work / "operator.log")
        self.processes["operator"] = process
        probe = container["livenessProbe"]["httpGet"]["path"]

        def live() -> bool:
            assert process.alive(), process.tail()
            try:
                return requests.get(f"http://127.0.0.1:{port}{probe}", timeout=2).ok
            except requests.ConnectionError:
                return False

        wait_for(live, 60, "the operator's liveness endpoint", context=process.tail)
        return process

    def start_api(self, output_root: Path) -> Process:
        container = self.container("api")
        port = free_port()
        argv = [
            *self._argv(container),
            "--kubeconfig",
            str(self.kubeconfig(API_SA)),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--output-root",
            str(output_root),
        ]
        env = self._env(container)
        self.api_token = env.get("MODELMERGE_API_TOKEN", "")
        process = Process(argv, env, self.work / "api.log")
        self.processes["api"] = process
        self.api_url = f"http://127.0.0.1:{port}"
        probe = container["readinessProbe"]["httpGet"]["path"]

        def ready() -> bool:
            assert process.alive(), process.tail()
            try:
                return requests.get(self.api_url + probe, timeout=2).ok
            except requests.ConnectionError:
                return False

        wait_for(ready, 60, "the API's readiness endpoint", context=process.tail)
        return process

    def stop(self) -> None:
        for process in self.processes.values():
            process.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {name} ---\n{p.tail()}" for name, p in self.processes.items())

    # -- REST API ---------------------------------------------------------------------------------------------
    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_token}"}

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.api_url + path, headers=self.auth, timeout=30, **kwargs)


def create_namespace(admin, name: str, labels: dict[str, str] | None = None) -> str:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core = client.CoreV1Api(admin)
    core.create_namespace({"metadata": {"name": name, "labels": labels or {}}}, _preload_content=False)

    def has_default_sa() -> bool:
        try:
            core.read_namespaced_service_account("default", name, _preload_content=False)
            return True
        except ApiException:
            return False

    wait_for(has_default_sa, 30, f"the default ServiceAccount of {name}")
    return name


def delete_namespace(admin, name: str) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        client.CoreV1Api(admin).delete_namespace(name, propagation_policy="Background", _preload_content=False)
    except ApiException as exc:
        if exc.status != 404:
            raise


def modelmerge(admin, namespace: str, name: str) -> dict[str, Any] | None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        return _raw(
            client.CustomObjectsApi(admin).get_namespaced_custom_object(
                API_GROUP, API_VERSION, namespace, PLURAL, name, _preload_content=False
            )
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def create_modelmerge(admin, namespace: str, name: str, spec: dict[str, Any]) -> None:
    from kubernetes import client

    body = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "ModelMerge", "metadata": {"name": name}, "spec": spec}
    client.CustomObjectsApi(admin).create_namespaced_custom_object(
        API_GROUP, API_VERSION, namespace, PLURAL, body, _preload_content=False
    )


def wait_phase(release: Release, namespace: str, name: str, phase: str, timeout: float = 240) -> dict[str, Any]:
    def status() -> dict[str, Any]:
        return (modelmerge(release.admin, namespace, name) or {}).get("status") or {}

    def reached() -> dict[str, Any] | None:
        current = status()
        assert current.get("phase") not in ({"Failed", "Cancelled"} - {phase}), (name, current, release.logs())
        return current if current.get("phase") == phase else None

    return wait_for(
        reached,
        timeout,
        f"ModelMerge {namespace}/{name} to be {phase}",
        context=lambda: f"{json.dumps(status(), indent=1)}\n{release.logs()}",
        interval=0.5,
    )


def status_code(call: Callable[[], Any]) -> int:
    """The HTTP status of a Kubernetes API call made under a ServiceAccount token (200 when it succeeds)."""
    from kubernetes.client.exceptions import ApiException

    try:
        call()
        return 200
    except ApiException as exc:
        return exc.status


def can(
    admin,
    namespace_of_sa: str,
    service_account: str,
    verb: str,
    resource: str,
    group: str = "",
    namespace: str | None = None,
    subresource: str = "",
) -> bool:
    """SubjectAccessReview: would the API server allow this ServiceAccount the request?"""
    from kubernetes import client

    attributes = {"verb": verb, "resource": resource, "group": group, "subresource": subresource}
    if namespace:
        attributes["namespace"] = namespace
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": f"system:serviceaccount:{namespace_of_sa}:{service_account}",
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace_of_sa}", "system:authenticated"],
            "resourceAttributes": attributes,
        },
    }
    result = _raw(client.AuthorizationV1Api(admin).create_subject_access_review(review, _preload_content=False))
    return bool(result["status"].get("allowed"))


def effective_rules(api_client, namespace: str) -> set[tuple[str, str, str]]:
    """SelfSubjectRulesReview as (group, resource, verb) triples: everything the caller may do in `namespace`."""
    from kubernetes import client

    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectRulesReview",
        "spec": {"namespace": namespace},
    }
    status = _raw(
        client.AuthorizationV1Api(api_client).create_self_subject_rules_review(review, _preload_content=False)
    )["status"]
    assert not status.get("incomplete"), status
    return triples(status["resourceRules"])


def chart_rules(release: Release, kind: str, name: str, namespace: str | None = None) -> set[tuple[str, str, str]]:
    from kubernetes import client

    rbac = client.RbacAuthorizationV1Api(release.admin)
    if kind == "Role":
        obj = _raw(rbac.read_namespaced_role(name, namespace, _preload_content=False))
    else:
        obj = _raw(rbac.read_cluster_role(name, _preload_content=False))
    return triples(obj["rules"])


def assert_no_rbac_denials(release: Release) -> None:
    for name, process in release.processes.items():
        denials = [line for line in process.text().splitlines() if RBAC_DENIAL.search(line)]
        assert not denials, f"{name} was refused by RBAC:\n" + "\n".join(denials[:20])


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    from tests.helpers.models import make_family

    root = tmp_path_factory.mktemp("tiny-models")
    make_family(root, n=2)
    return root


def _payload(models: Path, **extra: Any) -> dict[str, Any]:
    return {
        "base_model": str(models / "base"),
        "models_to_merge": [str(models / "ft0"), str(models / "ft1")],
        "merge_method": "task_arithmetic",
        "scaling_coefficient": 0.5,
        **extra,
    }


def _submit(release: Release, payload: dict[str, Any]) -> str:
    response = requests.post(release.api_url + "/api/merge", json=payload, headers=release.auth, timeout=30)
    assert response.status_code == 202, (response.text, release.logs())
    return response.json()["job_id"]


def _wait_job(release: Release, job_id: str, timeout: float = 240) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job = release.get(f"/api/jobs/{job_id}").json()
        return job if job["status"] in ("completed", "failed", "cancelled") else None

    return wait_for(done, timeout, f"job {job_id}", context=release.logs, interval=0.5)


def _check_download(release: Release, job_id: str) -> None:
    info = release.get(f"/api/download/{job_id}")
    assert info.status_code == 200, info.text
    files = {f["path"] for f in info.json()["files"]}
    assert "config.json" in files and any(f.endswith(".safetensors") for f in files), files
    archive = release.get(f"/api/download/{job_id}/archive")
    assert archive.status_code == 200 and len(archive.content) > 10_000


# ---------------------------------------------------------------------------------------------------------
# Namespaced mode: Roles in the release namespace and in one more watched namespace
# ---------------------------------------------------------------------------------------------------------

RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}


@dataclass
class Namespaced:
    release: Release
    other: str  # watched too
    unwatched: str
    kubelet: Any
    models: Path


@pytest.fixture(scope="module")
def namespaced(control_plane, k8s_api, tiny_models, tmp_path_factory) -> Iterator[Namespaced]:
    from tests.kube.kubelet import FakeKubelet

    suffix = uuid.uuid4().hex[:6]
    work = tmp_path_factory.mktemp("rbac-namespaced")
    ns = create_namespace(k8s_api, f"mm-rbac-{suffix}", RESTRICTED)
    other = create_namespace(k8s_api, f"mm-rbac-other-{suffix}")
    unwatched = create_namespace(k8s_api, f"mm-rbac-unwatched-{suffix}")
    values = {
        "watch": {"namespaces": [other]},
        "api": {"auth": {"tokenReview": True}},
        "merge": {"env": {"HF_HUB_OFFLINE": "1"}},
    }
    release = Release(control_plane, k8s_api, ns, values, work)
    kubelet = FakeKubelet(
        control_plane.api_client(), namespace=ns, label_selector=MERGE_SELECTOR, root=work / "kubelet"
    )
    try:
        release.install()
        kubelet.start()
        release.start_operator()
        release.start_api(kubelet.pvc_path(OUTPUT_CLAIM))
        yield Namespaced(release, other, unwatched, kubelet, tiny_models)
    finally:
        release.stop()
        kubelet.stop()
        try:
            release.uninstall()
        finally:
            for name in (ns, other, unwatched):
                delete_namespace(k8s_api, name)


def test_install_admits_the_chart_pods_under_the_restricted_pod_security_standard(namespaced):
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    release = namespaced.release
    core = client.CoreV1Api(release.admin)
    assert "kubectl" in release.install_output and "get mm" in release.install_output  # NOTES.txt

    def chart_pods() -> set[str]:
        pods = _raw(
            core.list_namespaced_pod(
                release.namespace, label_selector=f"app.kubernetes.io/instance={RELEASE}", _preload_content=False
            )
        )["items"]
        return {p["metadata"]["labels"]["app.kubernetes.io/component"] for p in pods}

    # The ReplicaSets' pods exist, so Pod Security admission (enforce=restricted) let them in ...
    wait_for(lambda: chart_pods() == {"operator", "api"}, 60, "the operator and API pods")
    # ... and it does refuse pods that are not restricted in this namespace.
    with pytest.raises(ApiException) as refused:
        core.create_namespaced_pod(
            release.namespace,
            {"metadata": {"name": "lax"}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}},
            _preload_content=False,
        )
    assert refused.value.status == 403 and "violates PodSecurity" in refused.value.body


def test_merge_through_the_api_with_an_hf_token(namespaced):
    from kubernetes import client

    release = namespaced.release
    job_id = _submit(release, _payload(namespaced.models, hf_token="hf_rbacTestToken123"))
    final = _wait_job(release, job_id)
    assert final["status"] == "completed", (final, release.logs())
    _check_download(release, job_id)
    secret = _raw(
        client.CoreV1Api(release.admin).read_namespaced_secret(
            f"{job_id}-hf-token", release.namespace, _preload_content=False
        )
    )
    assert secret["metadata"]["ownerReferences"][0]["name"] == job_id  # the API could patch what it created
    logs = release.get(f"/api/jobs/{job_id}/logs")  # pods list + pods/log get (no kubelet API here: 503)
    assert logs.status_code in (200, 503) and "forbidden" not in logs.text.lower(), logs.text
    # The merge pod ran under the restricted standard: the operator's Job builder made it compliant.
    pods = _raw(
        client.CoreV1Api(release.admin).list_namespaced_pod(
            release.namespace, label_selector=f"job-name={job_id}-merge", _preload_content=False
        )
    )["items"]
    assert pods and pods[0]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_the_tiny_examples_succeed_and_are_served_by_the_api(namespaced):
    release = namespaced.release
    docs = [d for d in yaml.safe_load_all((ROOT / "examples" / "modelmerge-tiny.yaml").read_text()) if d]
    assert sorted(d["spec"]["merge_method"] for d in docs) == sorted(
        ["average_merging", "task_arithmetic", "ties_merging", "ties_merging_dare", "mask_merging"]
    )
    for doc in docs:
        spec = doc["spec"]
        assert spec["output"]["pvc"] == OUTPUT_CLAIM  # the chart's claim for a release named "modelmerge"
        # The kind image has the models at /models; here they are the same tiny family in a temp folder.
        spec["base_model"] = spec["base_model"].replace("/models", str(namespaced.models), 1)
        spec["models_to_merge"] = [m.replace("/models", str(namespaced.models), 1) for m in spec["models_to_merge"]]
        create_modelmerge(release.admin, release.namespace, doc["metadata"]["name"], spec)
    for doc in docs:
        status = wait_phase(release, release.namespace, doc["metadata"]["name"], "Succeeded")
        assert status["outputPath"] == f"pvc://{OUTPUT_CLAIM}/{doc['metadata']['name']}"
    jobs = {j["job_id"]: j for j in release.get("/api/jobs", params={"limit": 100}).json()["jobs"]}
    assert all(jobs[d["metadata"]["name"]]["status"] == "completed" for d in docs)
    _check_download(release, "tiny-mask")


def test_every_example_is_accepted_by_the_api_server(namespaced):
    """Server-side dry run of every ModelMerge in examples/ against the CRD's schema and CEL rules."""
    from kubernetes import client

    custom = client.CustomObjectsApi(namespaced.release.admin)
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == "ModelMerge":
                custom.create_namespaced_custom_object(
                    API_GROUP, API_VERSION, namespaced.other, PLURAL, doc, dry_run="All", _preload_content=False
                )


def test_the_operator_acts_in_the_other_watched_namespace_only(namespaced):
    from kubernetes import client

    release = namespaced.release
    spec = {**_payload(namespaced.models), "output": {"pvc": "team-output"}}
    create_modelmerge(release.admin, namespaced.other, "elsewhere", spec)
    create_modelmerge(release.admin, namespaced.unwatched, "ignored", spec)
    # No kubelet runs there: the merge stays Pending, but the operator made its ConfigMap and Job and wrote status.
    status = wait_phase(release, namespaced.other, "elsewhere", "Pending", timeout=60)
    assert status["jobName"] == "elsewhere-merge"
    batch, core = client.BatchV1Api(release.admin), client.CoreV1Api(release.admin)
    # Pending ("Creating") is written before the Job is created: wait for the Job rather than race it.
    wait_for(lambda: _raw(batch.list_namespaced_job(namespaced.other, _preload_content=False))["items"], 60,
             "the operator to create the Job in the other watched namespace")
    assert _raw(batch.read_namespaced_job("elsewhere-merge", namespaced.other, _preload_content=False))
    assert _raw(core.read_namespaced_config_map("elsewhere-merge", namespaced.other, _preload_content=False))
    time.sleep(3)
    assert "status" not in modelmerge(release.admin, namespaced.unwatched, "ignored")
    assert not _raw(batch.list_namespaced_job(namespaced.unwatched, _preload_content=False))["items"]


def test_service_accounts_are_denied_what_they_must_not_do(namespaced):
    from kubernetes import client

    release = namespaced.release
    ns, other, unwatched = release.namespace, namespaced.other, namespaced.unwatched
    operator, api = release.client_as(OPERATOR_SA), release.client_as(API_SA)
    op_core, op_custom = client.CoreV1Api(operator), client.CustomObjectsApi(operator)
    api_core, api_custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    token_secret = next(
        s["metadata"]["name"]
        for s in _raw(client.CoreV1Api(release.admin).list_namespaced_secret(ns, _preload_content=False))["items"]
        if s["metadata"]["name"].endswith("-hf-token")
    )
    mm = ("modelmerge.io", "v1alpha1")
    # Real requests under the ServiceAccount tokens: refused with 403.
    refused = {
        "operator reads a Secret the API created": lambda: op_core.read_namespaced_secret(token_secret, ns),
        "operator reads the API token Secret": lambda: op_core.read_namespaced_secret(f"{RELEASE}-api-token", ns),
        "operator lists Secrets": lambda: op_core.list_namespaced_secret(ns),
        "operator creates a Secret": lambda: op_core.create_namespaced_secret(ns, {"metadata": {"name": "x"}}),
        "operator creates a pod": lambda: op_core.create_namespaced_pod(
            ns, {"metadata": {"name": "x"}, "spec": {"containers": [{"name": "c", "image": "x"}]}}
        ),
        "operator lists ModelMerges in an unwatched namespace": lambda: op_custom.list_namespaced_custom_object(
            *mm, unwatched, PLURAL
        ),
        "operator lists ModelMerges cluster-wide": lambda: op_custom.list_cluster_custom_object(*mm, PLURAL),
        "operator deletes a ModelMerge": lambda: op_custom.delete_namespaced_custom_object(
            *mm, ns, PLURAL, "tiny-mask"
        ),
        "API reads back the token Secret it created": lambda: api_core.read_namespaced_secret(token_secret, ns),
        "API lists Secrets": lambda: api_core.list_namespaced_secret(ns),
        "API writes a ModelMerge status": lambda: api_custom.patch_namespaced_custom_object_status(
            *mm, ns, PLURAL, "tiny-mask", {"status": {"phase": "Failed"}}
        ),
        "API deletes a ModelMerge": lambda: api_custom.delete_namespaced_custom_object(*mm, ns, PLURAL, "tiny-mask"),
        "API lists ModelMerges in another namespace": lambda: api_custom.list_namespaced_custom_object(
            *mm, other, PLURAL
        ),
        "API creates a Job": lambda: client.BatchV1Api(api).create_namespaced_job(ns, {"metadata": {"name": "x"}}),
        "API lists namespaces": lambda: api_core.list_namespace(),
    }
    codes = {what: status_code(call) for what, call in refused.items()}
    assert all(code == 403 for code in codes.values()), codes
    # A wider matrix through SubjectAccessReview (no side effects).
    denied = [
        (OPERATOR_SA, "get", "secrets", "", ns, ""),
        (OPERATOR_SA, "watch", "secrets", "", other, ""),
        (OPERATOR_SA, "create", "modelmerges", "modelmerge.io", ns, ""),
        (OPERATOR_SA, "update", "modelmerges", "modelmerge.io", ns, ""),
        (OPERATOR_SA, "patch", "jobs", "batch", ns, ""),
        (OPERATOR_SA, "create", "jobs", "batch", unwatched, ""),
        (OPERATOR_SA, "create", "configmaps", "", unwatched, ""),
        (OPERATOR_SA, "delete", "configmaps", "", ns, ""),
        (OPERATOR_SA, "get", "pods", "", unwatched, "log"),
        (OPERATOR_SA, "create", "pods", "", ns, "exec"),
        (OPERATOR_SA, "patch", "deployments", "apps", ns, ""),
        (OPERATOR_SA, "create", "roles", "rbac.authorization.k8s.io", ns, ""),
        (OPERATOR_SA, "create", "serviceaccounts", "", ns, "token"),
        (OPERATOR_SA, "list", "nodes", "", None, ""),
        (OPERATOR_SA, "patch", "kopfpeerings", "kopf.dev", ns, ""),
        (OPERATOR_SA, "patch", "clusterkopfpeerings", "kopf.dev", None, ""),
        (API_SA, "get", "secrets", "", ns, ""),
        (API_SA, "create", "secrets", "", other, ""),
        (API_SA, "patch", "modelmerges", "modelmerge.io", ns, "status"),
        (API_SA, "update", "modelmerges", "modelmerge.io", ns, ""),
        (API_SA, "create", "modelmerges", "modelmerge.io", other, ""),
        (API_SA, "get", "jobs", "batch", ns, ""),
        (API_SA, "create", "configmaps", "", ns, ""),
        (API_SA, "get", "pods", "", other, "log"),
        (API_SA, "create", "pods", "", ns, ""),
        (API_SA, "list", "customresourcedefinitions", "apiextensions.k8s.io", None, ""),
        (API_SA, "create", "subjectaccessreviews", "authorization.k8s.io", None, ""),
    ]
    allowed = [d for d in denied if can(release.admin, ns, d[0], d[1], d[2], d[3], d[4], d[5])]
    assert not allowed, allowed
    # ... and the same review does allow what they need (the review itself works).
    assert can(release.admin, ns, OPERATOR_SA, "patch", "modelmerges", "modelmerge.io", other, "status")
    assert can(release.admin, ns, API_SA, "create", "tokenreviews", "authentication.k8s.io")


def test_effective_rules_are_exactly_the_charts(namespaced):
    """SelfSubjectRulesReview under each token: the chart's rules plus what every authenticated user may do
    (measured on the namespace's default ServiceAccount), nothing else."""
    release = namespaced.release
    ns, other, unwatched = release.namespace, namespaced.other, namespaced.unwatched
    operator, api = release.client_as(OPERATOR_SA), release.client_as(API_SA)
    baseline = {
        n: effective_rules(release.cp.api_client(release.token("default", n)), n) for n in (ns, other, unwatched)
    }
    discovery = chart_rules(release, "ClusterRole", f"{ns}-{RELEASE}-operator-discovery")
    operator_role = chart_rules(release, "Role", f"{RELEASE}-operator", ns)
    assert operator_role == chart_rules(release, "Role", f"{RELEASE}-operator", other)
    token_review = chart_rules(release, "ClusterRole", f"{ns}-{RELEASE}-api-tokenreview")
    api_role = chart_rules(release, "Role", f"{RELEASE}-api", ns)
    assert effective_rules(operator, ns) == baseline[ns] | operator_role | discovery
    assert effective_rules(operator, other) == baseline[other] | operator_role | discovery
    assert effective_rules(operator, unwatched) == baseline[unwatched] | discovery
    assert effective_rules(api, ns) == baseline[ns] | api_role | token_review
    assert effective_rules(api, other) == baseline[other] | token_review
    assert not any(r[1] == "secrets" and r[2] in ("get", "list", "watch") for r in effective_rules(api, ns))


def test_token_review_lets_service_account_tokens_in(namespaced):
    release = namespaced.release
    token = release.token("default")
    assert (
        requests.get(
            release.api_url + "/api/jobs", headers={"Authorization": f"Bearer {token}"}, timeout=10
        ).status_code
        == 200
    )
    assert (
        requests.get(release.api_url + "/api/jobs", headers={"Authorization": "Bearer nope"}, timeout=10).status_code
        == 401
    )


def test_no_rbac_refusals_in_the_operator_and_api_logs(namespaced):
    release = namespaced.release
    assert all(p.alive() for p in release.processes.values()), release.logs()
    assert_no_rbac_denials(release)


def test_upgrade_keeps_the_token_and_uninstall_keeps_crds_claims_and_merges(namespaced):
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    release = namespaced.release
    core = client.CoreV1Api(release.admin)

    def token() -> str:
        return _raw(core.read_namespaced_secret(f"{RELEASE}-api-token", release.namespace, _preload_content=False))[
            "data"
        ]["token"]

    before = token()
    release.upgrade()
    assert token() == before  # the generated token survives upgrades (lookup)
    release.stop()  # the components lose their permissions with the release
    release.uninstall()
    ext = client.ApiextensionsV1Api(release.admin)
    assert _raw(ext.read_custom_resource_definition("modelmerges.modelmerge.io", _preload_content=False))
    assert modelmerge(release.admin, release.namespace, "tiny-mask")["status"]["phase"] == "Succeeded"
    assert _raw(core.read_namespaced_persistent_volume_claim(OUTPUT_CLAIM, release.namespace, _preload_content=False))
    rbac = client.RbacAuthorizationV1Api(release.admin)
    with pytest.raises(ApiException) as gone:
        rbac.read_cluster_role(f"{release.namespace}-{RELEASE}-operator-discovery", _preload_content=False)
    assert gone.value.status == 404
    assert not _raw(rbac.list_namespaced_role(namespaced.other, _preload_content=False))["items"]


# ---------------------------------------------------------------------------------------------------------
# Cluster-wide mode: a ClusterRole; merges in a namespace the chart never heard of
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ClusterWide:
    release: Release
    workload: str
    kubelet: Any
    models: Path


@pytest.fixture(scope="module")
def cluster_wide(control_plane, k8s_api, tiny_models, tmp_path_factory) -> Iterator[ClusterWide]:
    from tests.kube.kubelet import FakeKubelet

    suffix = uuid.uuid4().hex[:6]
    work = tmp_path_factory.mktemp("rbac-cluster")
    ns = create_namespace(k8s_api, f"mm-rbac-cw-{suffix}", RESTRICTED)
    workload = create_namespace(k8s_api, f"mm-rbac-work-{suffix}", RESTRICTED)
    values = {"watch": {"clusterWide": True}, "merge": {"env": {"HF_HUB_OFFLINE": "1"}}}
    release = Release(control_plane, k8s_api, ns, values, work)
    kubelet = FakeKubelet(
        control_plane.api_client(), namespace=workload, label_selector=MERGE_SELECTOR, root=work / "kubelet"
    )
    try:
        release.install()
        kubelet.start()
        release.start_operator()
        release.start_api(work / "api-output")  # nothing is merged through the API in this mode
        yield ClusterWide(release, workload, kubelet, tiny_models)
    finally:
        release.stop()
        kubelet.stop()
        try:
            release.uninstall()
        finally:
            for name in (ns, workload):
                delete_namespace(k8s_api, name)


def test_cluster_wide_operator_merges_in_any_namespace(cluster_wide):
    release = cluster_wide.release
    spec = {**_payload(cluster_wide.models), "output": {"pvc": "team-output"}, "output_dir": "merged"}
    create_modelmerge(release.admin, cluster_wide.workload, "anywhere", spec)
    status = wait_phase(release, cluster_wide.workload, "anywhere", "Succeeded")
    assert status["outputPath"] == "pvc://team-output/merged"
    assert (cluster_wide.kubelet.pvc_path("team-output") / "merged" / "config.json").is_file()
    # The API still serves its own namespace only.
    assert release.get("/api/health").json()["backend_info"]["namespace"] == release.namespace


def test_cluster_wide_rules_and_refusals(cluster_wide):
    from kubernetes import client

    release = cluster_wide.release
    ns, workload = release.namespace, cluster_wide.workload
    operator, api = release.client_as(OPERATOR_SA), release.client_as(API_SA)
    baseline = effective_rules(release.cp.api_client(release.token("default", workload)), workload)
    cluster_role = chart_rules(release, "ClusterRole", f"{ns}-{RELEASE}-operator")
    discovery = chart_rules(release, "ClusterRole", f"{ns}-{RELEASE}-operator-discovery")
    assert ("", "namespaces", "list") not in discovery  # kopf lists namespaces only in namespaced mode
    assert effective_rules(operator, workload) == baseline | cluster_role | discovery
    assert effective_rules(api, workload) == baseline  # no token review in this release
    mm = ("modelmerge.io", "v1alpha1")
    codes = {
        "operator lists Secrets in the workload namespace": status_code(
            lambda: client.CoreV1Api(operator).list_namespaced_secret(workload)
        ),
        "operator lists Secrets cluster-wide": status_code(
            lambda: client.CoreV1Api(operator).list_secret_for_all_namespaces()
        ),
        "operator creates ModelMerges": status_code(
            lambda: client.CustomObjectsApi(operator).create_namespaced_custom_object(*mm, workload, PLURAL, {})
        ),
        "API lists ModelMerges in the workload namespace": status_code(
            lambda: client.CustomObjectsApi(api).list_namespaced_custom_object(*mm, workload, PLURAL)
        ),
        "API creates a TokenReview": status_code(
            lambda: client.AuthenticationV1Api(api).create_token_review({"spec": {"token": "x"}})
        ),
    }
    assert all(code == 403 for code in codes.values()), codes
    assert status_code(lambda: client.CustomObjectsApi(operator).list_cluster_custom_object(*mm, PLURAL)) == 200
    assert_no_rbac_denials(release)
