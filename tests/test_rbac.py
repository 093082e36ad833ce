"""Least-privilege RBAC, proven on the real API server: `helm install` of the chart into the envtest control plane
(RBAC and Pod Security admission on), then the operator and the REST API run under their chart ServiceAccounts'
own tokens (TokenRequest), with the command, arguments and environment of the Deployments the chart installed.
The kubelet harness runs the merge pods (the real engine on tiny models), so merges go all the way through.

Two releases: namespaced (Roles in the watched namespaces; the release namespace enforces the `restricted` Pod
Security Standard) and cluster-wide (ClusterRole). Each checks that nothing the components do is refused and
that what they must not do is: reading Secrets, writing status from the API, touching unwatched namespaces, ...
and that each ServiceAccount's effective rules are exactly the chart's (SelfSubjectRulesReview)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from modelmerge.contract import API_GROUP, API_VERSION, METHODS, PLURAL
from modelmerge.kubeclient import pods_of_job, raw
from tests.helpers.helm_chart import CHART, RELEASE, ROOT, helm, triples, values_file
from tests.helpers.waiting import wait_for
from tests.kube.controlplane import ControlPlane, free_port
from tests.kube.fixtures import create_namespace, delete_namespace, running_kubelet
from tests.kube.kubelet import FakeKubelet
from tests.kube.kubelet.containers import container_env

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
    def pod(self, component: str) -> dict[str, Any]:
        """A pod of the component's Deployment, as its ReplicaSet made it (no kubelet runs it here)."""
        core = client.CoreV1Api(self.admin)
        selector = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component={component}"

        def first_pod() -> dict[str, Any] | None:
            return next(iter(raw(core.list_namespaced_pod, self.namespace, label_selector=selector)["items"]), None)

        return wait_for(first_pod, 60, f"a pod of the {component} Deployment")

    def token(self, service_account: str, namespace: str | None = None) -> str:
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": 3600},
        }
        return raw(
            client.CoreV1Api(self.admin).create_namespaced_service_account_token,
            service_account,
            namespace or self.namespace,
            request,
        )["status"]["token"]

    def kubeconfig(self, service_account: str) -> Path:
        path = self.work / f"{service_account}.kubeconfig"
        return self.cp.write_kubeconfig(path, token=self.token(service_account), user=service_account)

    def client_as(self, service_account: str):
        return self.cp.api_client(self.token(service_account))

    # -- the components, as the Deployments run them ----------------------------------------------------------
    def _argv(self, container: dict[str, Any]) -> list[str]:
        command = container["command"]
        assert command[0] == "modelmerge", command  # the console script the images' ENTRYPOINT names
        return [sys.executable, "-m", "modelmerge.cli", *command[1:], *container["args"]]

    def _env(self, pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
        """This machine's environment without kubeconfig or ModelMerge settings, plus the container's, resolved as the
        test kubelet resolves it (Secret references read as admin)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBECONFIG", "MODELMERGE_"))}
        return {**env, **container_env(client.CoreV1Api(self.admin), pod, container), "HF_HUB_OFFLINE": "1"}

    def _start(
        self, component: str, service_account: str, probe: str, flags: Callable[[int], list[str]]
    ) -> tuple[str, dict[str, str]]:
        """Runs the component as its pod would (command, arguments, environment) plus ``flags(port)``, as a local
        process under the ServiceAccount's token; waits until the container's ``probe`` answers on that port.
        Returns the component's URL and environment."""
        pod = self.pod(component)
        (container,) = pod["spec"]["containers"]
        port = free_port()
        argv = [*self._argv(container), "--kubeconfig", str(self.kubeconfig(service_account)), *flags(port)]
        env = self._env(pod, container)
        process = Process(argv, env, self.work / f"{component}.log")
        self.processes[component] = process
        url = f"http://127.0.0.1:{port}"
        path = container[probe]["httpGet"]["path"]

        def answers() -> bool:
            assert process.alive(), process.tail()
            try:
                return requests.get(url + path, timeout=2).ok
            except requests.ConnectionError:
                return False

        wait_for(answers, 60, f"the {component}'s {probe}", context=process.tail)
        return url, env

    def start_operator(self) -> None:
        self._start(
            "operator", OPERATOR_SA, "livenessProbe", lambda port: ["--liveness", f"http://127.0.0.1:{port}/healthz"]
        )

    def start_api(self, output_root: Path) -> None:
        def flags(port: int) -> list[str]:
            return ["--host", "127.0.0.1", "--port", str(port), "--output-root", str(output_root)]

        self.api_url, env = self._start("api", API_SA, "readinessProbe", flags)
        self.api_token = env.get("MODELMERGE_API_TOKEN", "")

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


def modelmerge(admin, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return raw(
            client.CustomObjectsApi(admin).get_namespaced_custom_object, API_GROUP, API_VERSION, namespace, PLURAL, name
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def create_modelmerge(admin, namespace: str, name: str, spec: dict[str, Any]) -> None:
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
    result = raw(client.AuthorizationV1Api(admin).create_subject_access_review, review)
    return bool(result["status"].get("allowed"))


def effective_rules(api_client, namespace: str) -> set[tuple[str, str, str]]:
    """SelfSubjectRulesReview as (group, resource, verb) triples: everything the caller may do in `namespace`."""

    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectRulesReview",
        "spec": {"namespace": namespace},
    }
    status = raw(client.AuthorizationV1Api(api_client).create_self_subject_rules_review, review)["status"]
    assert not status.get("incomplete"), status
    return triples(status["resourceRules"])


def chart_rules(release: Release, kind: str, name: str, namespace: str | None = None) -> set[tuple[str, str, str]]:
    rbac = client.RbacAuthorizationV1Api(release.admin)
    if kind == "Role":
        obj = raw(rbac.read_namespaced_role, name, namespace)
    else:
        obj = raw(rbac.read_cluster_role, name)
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
    kubelet: FakeKubelet
    models: Path


@contextmanager
def running_release(
    control_plane: ControlPlane,
    admin,
    work: Path,
    values: dict[str, Any],
    *,
    namespaces: dict[str, dict[str, str]],
    merges_in: str,
    api_output_claim: str | None,
) -> Iterator[tuple[Release, FakeKubelet]]:
    """Creates ``namespaces`` (name -> labels; the first is the release's), installs the chart with ``values`` and
    runs what a cluster would: the test kubelet for the merge pods of namespace ``merges_in``, and the operator and
    the API as their Deployments state (the API serves claim ``api_output_claim``, or an empty folder). Everything
    goes afterwards, the namespaces too."""
    release = Release(control_plane, admin, next(iter(namespaces)), values, work)
    try:
        for name, labels in namespaces.items():
            create_namespace(admin, name, labels=labels)
        release.install()
        with running_kubelet(
            control_plane, work / "kubelet", namespace=merges_in, label_selector=MERGE_SELECTOR
        ) as kubelet:
            try:
                release.start_operator()
                release.start_api(kubelet.pvc_path(api_output_claim) if api_output_claim else work / "api-output")
                yield release, kubelet
            finally:
                release.stop()
    finally:
        try:
            release.uninstall()
        finally:
            for name in namespaces:
                delete_namespace(admin, name)


@pytest.fixture(scope="module")
def namespaced(control_plane, k8s_api, tiny_models, tmp_path_factory) -> Iterator[Namespaced]:
    suffix = uuid.uuid4().hex[:6]
    ns, other, unwatched = f"mm-rbac-{suffix}", f"mm-rbac-other-{suffix}", f"mm-rbac-unwatched-{suffix}"
    values = {
        "watch": {"namespaces": [other]},
        "api": {"auth": {"tokenReview": True}},
        "merge": {"env": {"HF_HUB_OFFLINE": "1"}},
    }
    with running_release(
        control_plane,
        k8s_api,
        tmp_path_factory.mktemp("rbac-namespaced"),
        values,
        namespaces={ns: RESTRICTED, other: {}, unwatched: {}},
        merges_in=ns,
        api_output_claim=OUTPUT_CLAIM,
    ) as (release, kubelet):
        yield Namespaced(release, other, unwatched, kubelet, tiny_models)


def test_install_admits_the_chart_pods_under_the_restricted_pod_security_standard(namespaced):
    release = namespaced.release
    core = client.CoreV1Api(release.admin)
    assert "kubectl" in release.install_output and "get mm" in release.install_output  # NOTES.txt

    def chart_pods() -> set[str]:
        pods = raw(core.list_namespaced_pod, release.namespace, label_selector=f"app.kubernetes.io/instance={RELEASE}")[
            "items"
        ]
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
    release = namespaced.release
    job_id = _submit(release, _payload(namespaced.models, hf_token="hf_rbacTestToken123"))
    final = _wait_job(release, job_id)
    assert final["status"] == "completed", (final, release.logs())
    _check_download(release, job_id)
    secret = raw(client.CoreV1Api(release.admin).read_namespaced_secret, f"{job_id}-hf-token", release.namespace)
    assert secret["metadata"]["ownerReferences"][0]["name"] == job_id  # the API could patch what it created
    logs = release.get(f"/api/jobs/{job_id}/logs")  # pods list + pods/log get, through the test kubelet's log server
    assert logs.status_code == 200, logs.text
    assert re.search(r'"status":\s*"succeeded"', logs.text), logs.text  # the engine's JSON summary line
    # The merge pod ran under the restricted standard: the operator's Job builder made it compliant.
    pods = pods_of_job(client.CoreV1Api(release.admin), release.namespace, f"{job_id}-merge")
    assert pods and pods[0]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_the_tiny_examples_succeed_and_are_served_by_the_api(namespaced):
    release = namespaced.release
    docs = [d for d in yaml.safe_load_all((ROOT / "examples" / "modelmerge-tiny.yaml").read_text()) if d]
    assert sorted(d["spec"]["merge_method"] for d in docs) == sorted(METHODS)  # one per method of the catalogue
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

    custom = client.CustomObjectsApi(namespaced.release.admin)
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == "ModelMerge":
                custom.create_namespaced_custom_object(
                    API_GROUP, API_VERSION, namespaced.other, PLURAL, doc, dry_run="All", _preload_content=False
                )


def test_the_operator_acts_in_the_other_watched_namespace_only(namespaced):
    release = namespaced.release
    spec = {**_payload(namespaced.models), "output": {"pvc": "team-output"}}
    create_modelmerge(release.admin, namespaced.other, "elsewhere", spec)
    create_modelmerge(release.admin, namespaced.unwatched, "ignored", spec)
    # No kubelet runs there: the merge stays Pending, but the operator made its ConfigMap and Job and wrote status.
    status = wait_phase(release, namespaced.other, "elsewhere", "Pending", timeout=60)
    assert status["jobName"] == "elsewhere-merge"
    batch, core = client.BatchV1Api(release.admin), client.CoreV1Api(release.admin)
    # Pending ("Creating") is written before the Job is created: wait for the Job rather than race it.
    wait_for(
        lambda: raw(batch.list_namespaced_job, namespaced.other)["items"],
        60,
        "the operator to create the Job in the other watched namespace",
    )
    assert raw(batch.read_namespaced_job, "elsewhere-merge", namespaced.other)
    assert raw(core.read_namespaced_config_map, "elsewhere-merge", namespaced.other)
    time.sleep(3)
    assert "status" not in modelmerge(release.admin, namespaced.unwatched, "ignored")
    assert not raw(batch.list_namespaced_job, namespaced.unwatched)["items"]


def test_service_accounts_are_denied_what_they_must_not_do(namespaced):
    release = namespaced.release
    ns, other, unwatched = release.namespace, namespaced.other, namespaced.unwatched
    operator, api = release.client_as(OPERATOR_SA), release.client_as(API_SA)
    op_core, op_custom = client.CoreV1Api(operator), client.CustomObjectsApi(operator)
    api_core, api_custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    token_secret = next(
        s["metadata"]["name"]
        for s in raw(client.CoreV1Api(release.admin).list_namespaced_secret, ns)["items"]
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
        # It creates and deletes the ModelMerges of sweeps in the namespaces it watches, nowhere else.
        "operator deletes a ModelMerge in an unwatched namespace": lambda: op_custom.delete_namespaced_custom_object(
            *mm, unwatched, PLURAL, "tiny-mask"
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
        (OPERATOR_SA, "create", "modelmerges", "modelmerge.io", unwatched, ""),
        (OPERATOR_SA, "update", "modelmerges", "modelmerge.io", ns, ""),
        (OPERATOR_SA, "create", "modelmergesweeps", "modelmerge.io", ns, ""),
        (OPERATOR_SA, "patch", "modelmergesweeps", "modelmerge.io", ns, ""),
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
        (API_SA, "patch", "modelmergesweeps", "modelmerge.io", ns, "status"),
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
    release = namespaced.release
    core = client.CoreV1Api(release.admin)

    def token() -> str:
        return raw(core.read_namespaced_secret, f"{RELEASE}-api-token", release.namespace)["data"]["token"]

    before = token()
    release.upgrade()
    assert token() == before  # the generated token survives upgrades (lookup)
    release.stop()  # the components lose their permissions with the release
    release.uninstall()
    ext = client.ApiextensionsV1Api(release.admin)
    assert raw(ext.read_custom_resource_definition, "modelmerges.modelmerge.io")
    assert modelmerge(release.admin, release.namespace, "tiny-mask")["status"]["phase"] == "Succeeded"
    assert raw(core.read_namespaced_persistent_volume_claim, OUTPUT_CLAIM, release.namespace)
    rbac = client.RbacAuthorizationV1Api(release.admin)
    with pytest.raises(ApiException) as gone:
        rbac.read_cluster_role(f"{release.namespace}-{RELEASE}-operator-discovery", _preload_content=False)
    assert gone.value.status == 404
    assert not raw(rbac.list_namespaced_role, namespaced.other)["items"]


# ---------------------------------------------------------------------------------------------------------
# Cluster-wide mode: a ClusterRole; merges in a namespace the chart never heard of
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ClusterWide:
    release: Release
    workload: str
    kubelet: FakeKubelet
    models: Path


@pytest.fixture(scope="module")
def cluster_wide(control_plane, k8s_api, tiny_models, tmp_path_factory) -> Iterator[ClusterWide]:
    suffix = uuid.uuid4().hex[:6]
    ns, workload = f"mm-rbac-cw-{suffix}", f"mm-rbac-work-{suffix}"
    values = {"watch": {"clusterWide": True}, "merge": {"env": {"HF_HUB_OFFLINE": "1"}}}
    with running_release(
        control_plane,
        k8s_api,
        tmp_path_factory.mktemp("rbac-cluster"),
        values,
        namespaces={ns: RESTRICTED, workload: RESTRICTED},
        merges_in=workload,
        api_output_claim=None,  # nothing is merged through the API in this mode
    ) as (release, kubelet):
        yield ClusterWide(release, workload, kubelet, tiny_models)


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
        "operator replaces a ModelMerge": status_code(
            lambda: client.CustomObjectsApi(operator).replace_namespaced_custom_object(*mm, workload, PLURAL, "x", {})
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
