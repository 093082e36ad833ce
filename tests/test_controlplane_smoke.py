"""Smoke tests of the envtest control plane and the kubelet harness: real Jobs, RBAC, garbage collection."""

from __future__ import annotations

import json
import math
import os

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from modelmerge.kubeclient import pods_of_job, raw
from tests.helpers.waiting import wait_for
from tests.kube.kubelet import ContainerSpec, FakeKubelet, ProcessRuntime, ResourceLimits, SecurityContext
from tests.kube.kubelet.scheduling import parse_quantity

pytestmark = pytest.mark.integration


def is_gone(read, *args) -> bool:
    """Whether reading the object answers 404."""
    try:
        read(*args, _preload_content=False)
        return False
    except ApiException as e:
        if e.status != 404:
            raise
        return True


def job_condition(batch: client.BatchV1Api, namespace: str, name: str):
    """The Job's first true Complete/Failed condition, or None."""
    job = raw(batch.read_namespaced_job_status, name, namespace)
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond["type"] in ("Complete", "Failed") and cond["status"] == "True":
            return cond
    return None


def make_job(name: str, script: str, backoff_limit: int = 0, volumes=None, mounts=None) -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": backoff_limit,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "main",
                            "image": "ignored.example/merge:latest",
                            "command": ["python", "-c", script],
                            "env": [{"name": "GREETING", "value": "hello"}],
                            "resources": {"limits": {"nvidia.com/gpu": "1"}},
                            "volumeMounts": mounts or [],
                        }
                    ],
                    "volumes": volumes or [],
                }
            },
        },
    }


def test_job_completes_writes_pvc_and_termination_message(k8s_api, namespace, kubelet):
    core, batch = client.CoreV1Api(k8s_api), client.BatchV1Api(k8s_api)
    core.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": "output"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        },
        _preload_content=False,
    )
    script = (
        "import os\n"
        "open('/data/out/result.txt', 'w').write(os.environ['GREETING'] + ' from the pod')\n"
        "open('/dev/termination-log', 'w').write('merged 3 tensors')\n"
        "print('done writing')\n"
    )
    job = make_job(
        "writer",
        script,
        volumes=[{"name": "out", "persistentVolumeClaim": {"claimName": "output"}}],
        mounts=[{"name": "out", "mountPath": "/data/out", "subPath": "run1"}],
    )
    batch.create_namespaced_job(namespace, job, _preload_content=False)

    cond = wait_for(lambda: job_condition(batch, namespace, "writer"), what="the Job to finish")
    assert cond["type"] == "Complete", cond

    assert (kubelet.pvc_path("output") / "run1" / "result.txt").read_text() == "hello from the pod"
    (pod,) = pods_of_job(core, namespace, "writer")
    assert pod["spec"]["nodeName"] == kubelet.node_name
    assert pod["status"]["phase"] == "Succeeded"
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 0
    assert terminated["reason"] == "Completed"
    assert terminated["message"] == "merged 3 tensors"
    assert "done writing" in kubelet.logs(namespace, pod["metadata"]["name"])


def test_failing_job_exceeds_backoff_limit(k8s_api, namespace, kubelet):
    core, batch = client.CoreV1Api(k8s_api), client.BatchV1Api(k8s_api)
    job = make_job("failer", "import sys; print('boom'); sys.exit(3)", backoff_limit=1)
    job["spec"]["template"]["spec"]["containers"][0]["terminationMessagePolicy"] = "FallbackToLogsOnError"
    batch.create_namespaced_job(namespace, job, _preload_content=False)

    cond = wait_for(lambda: job_condition(batch, namespace, "failer"), timeout=90, what="the Job to fail")
    assert cond["type"] == "Failed"
    assert cond["reason"] == "BackoffLimitExceeded"
    pods = pods_of_job(core, namespace, "failer")
    assert len(pods) == 2  # the first try and one retry
    for pod in pods:
        terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
        assert terminated["exitCode"] == 3
        assert terminated["reason"] == "Error"
        assert "boom" in terminated["message"]  # from the log, per FallbackToLogsOnError


def test_pod_logs_are_served_through_the_api(k8s_api, namespace, kubelet):
    core = client.CoreV1Api(k8s_api)
    script = (
        "import os, time\n"
        "print('line 1', flush=True)\n"
        "while not os.path.exists('go'):\n"  # the test lets it go on once it is following the log
        "    time.sleep(0.05)\n"
        "print('line 2')\n"
        "print('line 3')\n"
    )
    pod = {
        "metadata": {"name": "talker"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": "ignored", "command": ["python", "-c", script]}],
        },
    }
    core.create_namespaced_pod(namespace, pod, _preload_content=False)
    wait_for(lambda: "line 1" in kubelet.logs(namespace, "talker"), what="the pod to print its first line")

    stream = core.read_namespaced_pod_log("talker", namespace, follow=True, _preload_content=False)
    chunks = stream.stream(amt=1024, decode_content=True)
    received = b""
    while b"line 1\n" not in received:
        received += next(chunks)
    (kubelet.pod_dir(namespace, "talker") / "work" / "go").touch()
    received += b"".join(chunks)  # ends when the process has ended and its whole log is sent
    stream.release_conn()
    assert received == b"line 1\nline 2\nline 3\n"

    wait_for(lambda: raw(core.read_namespaced_pod, "talker", namespace)["status"]["phase"] == "Succeeded")
    assert core.read_namespaced_pod_log("talker", namespace) == "line 1\nline 2\nline 3\n"
    assert core.read_namespaced_pod_log("talker", namespace, tail_lines=2) == "line 2\nline 3\n"
    assert core.read_namespaced_pod_log("talker", namespace, limit_bytes=4) == "line"
    assert core.read_namespaced_pod_log("talker", namespace, container="main", since_seconds=3600).startswith("line 1")


def test_rbac_denies_a_service_account_without_bindings(control_plane, k8s_api, namespace):
    core = client.CoreV1Api(k8s_api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "nobody"}}, _preload_content=False)
    token = raw(core.create_namespaced_service_account_token, "nobody", namespace, {"spec": {}})["status"]["token"]

    with control_plane.api_client(token=token) as sa_api:
        with pytest.raises(ApiException) as denied:
            client.CoreV1Api(sa_api).list_namespaced_secret(namespace, _preload_content=False)
    assert denied.value.status == 403
    assert f"system:serviceaccount:{namespace}:nobody" in denied.value.body
    core.list_namespaced_secret(namespace, _preload_content=False)  # the admin may


def test_garbage_collector_removes_dependents_of_a_deleted_owner(k8s_api, namespace):
    core = client.CoreV1Api(k8s_api)
    owner = raw(core.create_namespaced_config_map, namespace, {"metadata": {"name": "owner"}})
    core.delete_namespaced_config_map("owner", namespace, _preload_content=False)
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"]}
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "orphan", "ownerReferences": [ref]}}, _preload_content=False
    )

    wait_for(
        lambda: is_gone(core.read_namespaced_config_map, "orphan", namespace),
        timeout=60,
        what="the garbage collector to delete the dependent",
    )


def make_pod(name: str, script: str, **spec) -> dict:
    container = {"name": "main", "image": "ignored", "command": ["python", "-c", script]}
    container.update(spec.pop("container", {}))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "containers": [container], **spec},
    }


def pod_state(core: client.CoreV1Api, namespace: str, name: str) -> dict:
    pod = raw(core.read_namespaced_pod, name, namespace)
    statuses = (pod.get("status") or {}).get("containerStatuses") or [{}]
    return {"phase": pod["status"].get("phase"), **statuses[0].get("state", {}), "pod": pod}


def test_harness_env_volumes_and_deletion(k8s_api, namespace, kubelet):
    core = client.CoreV1Api(k8s_api)
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "hf"}, "stringData": {"token": "s3cret"}}, _preload_content=False
    )
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "cfg"}, "data": {"spec.json": "{}"}}, _preload_content=False
    )
    settings = {"MODE": "fast", "LEVEL": "from-config-map"}
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "settings"}, "data": settings}, _preload_content=False
    )
    script = (
        "import json, os, time\n"
        "cfg = open('/etc/cfg/spec.json').read()\n"
        "open('/scratch/env.txt', 'w').write(os.environ['HF_TOKEN'] + ' ' + os.environ['POD'] + ' ' + cfg)\n"
        "names = ('CFG_MODE', 'CFG_LEVEL', 'S_token', 'MEM_MI', 'CPU_M', 'CPU_LIMIT')\n"
        "open('/scratch/env.json', 'w').write(json.dumps({n: os.environ.get(n) for n in names}))\n"
        "print('ready', flush=True)\n"
        "time.sleep(300)\n"
    )
    pod = make_pod(
        "sleeper",
        script,
        container={
            "envFrom": [
                {"configMapRef": {"name": "settings"}, "prefix": "CFG_"},
                {"secretRef": {"name": "hf"}, "prefix": "S_"},
                {"configMapRef": {"name": "absent", "optional": True}},
            ],
            "env": [
                {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "CFG_LEVEL", "value": "from-env"},  # env wins over envFrom
                {"name": "MEM_MI", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
                {"name": "CPU_M", "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu", "divisor": "1m"}}},
                {"name": "CPU_LIMIT", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
            ],
            "resources": {"requests": {"cpu": "250m"}, "limits": {"memory": "300Mi"}},
            "volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg"}, {"name": "scratch", "mountPath": "/scratch"}],
        },
        volumes=[{"name": "cfg", "configMap": {"name": "cfg"}}, {"name": "scratch", "emptyDir": {}}],
        terminationGracePeriodSeconds=30,
    )
    core.create_namespaced_pod(namespace, pod, _preload_content=False)

    state = wait_for(lambda: (s := pod_state(core, namespace, "sleeper")).get("running") and s, what="the pod to run")
    assert state["phase"] == "Running"
    wait_for(lambda: "ready" in kubelet.logs(namespace, "sleeper"), what="the process to start")
    scratch = kubelet.pod_dir(namespace, "sleeper") / "volumes" / "scratch"
    assert (scratch / "env.txt").read_text() == "s3cret sleeper {}"
    node = raw(core.read_node, state["pod"]["spec"]["nodeName"])
    node_cpus = str(math.ceil(parse_quantity(node["status"]["allocatable"]["cpu"])))
    assert json.loads((scratch / "env.json").read_text()) == {
        "CFG_MODE": "fast",
        "CFG_LEVEL": "from-env",
        "S_token": "s3cret",  # envFrom, prefixed; env overrides it
        "MEM_MI": "300",
        "CPU_M": "250",
        "CPU_LIMIT": node_cpus,  # resourceFieldRef; no cpu limit: node allocatable
    }
    pid = int(state["pod"]["status"]["containerStatuses"][0]["containerID"].split("://")[1])

    core.delete_namespaced_pod("sleeper", namespace, _preload_content=False)

    wait_for(lambda: is_gone(core.read_namespaced_pod, "sleeper", namespace), 30, "the deleted pod to disappear")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_harness_honours_active_deadline(k8s_api, namespace, kubelet):
    core = client.CoreV1Api(k8s_api)
    core.create_namespaced_pod(
        namespace, make_pod("slow", "import time; time.sleep(300)", activeDeadlineSeconds=2), _preload_content=False
    )
    state = wait_for(
        lambda: (s := pod_state(core, namespace, "slow")).get("terminated") and s,
        timeout=30,
        what="the deadline to end the pod",
    )
    assert state["phase"] == "Failed"
    assert state["pod"]["status"]["reason"] == "DeadlineExceeded"


def test_harness_leaves_pods_that_do_not_fit_unscheduled(k8s_api, namespace, kubelet):
    core = client.CoreV1Api(k8s_api)
    core.create_namespaced_pod(
        namespace,
        make_pod("greedy", "print('never')", container={"resources": {"limits": {"nvidia.com/gpu": "9"}}}),
        _preload_content=False,
    )

    def unschedulable():
        pod = raw(core.read_namespaced_pod, "greedy", namespace)
        conds = {c["type"]: c for c in (pod.get("status") or {}).get("conditions") or []}
        return conds.get("PodScheduled", {}).get("reason") == "Unschedulable" and pod

    pod = wait_for(unschedulable, timeout=30, what="the pod to be marked unschedulable")
    assert not pod["spec"].get("nodeName")
    assert "Insufficient nvidia.com/gpu" in pod["status"]["conditions"][0]["message"]


def test_harness_waits_for_a_missing_secret_then_runs_the_pod(k8s_api, namespace, kubelet):
    core = client.CoreV1Api(k8s_api)
    env = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "later", "key": "token"}}}]
    pod = make_pod("needs-secret", "import os; print(os.environ['TOKEN'])", container={"env": env})
    core.create_namespaced_pod(namespace, pod, _preload_content=False)

    state = wait_for(lambda: (s := pod_state(core, namespace, "needs-secret")).get("waiting") and s)
    assert state["phase"] == "Pending"
    assert state["waiting"] == {"reason": "CreateContainerConfigError", "message": 'secret "later" not found'}
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "later"}, "stringData": {"token": "now"}}, _preload_content=False
    )
    state = wait_for(lambda: (s := pod_state(core, namespace, "needs-secret")).get("terminated") and s)
    assert state["phase"] == "Succeeded"
    assert kubelet.logs(namespace, "needs-secret") == "now\n"


def test_harness_reports_a_container_that_cannot_start(k8s_api, namespace, kubelet):
    core = client.CoreV1Api(k8s_api)
    pod = make_pod("no-binary", "", container={"command": ["/nonexistent/modelmerge", "merge"]})
    core.create_namespaced_pod(namespace, pod, _preload_content=False)

    state = wait_for(lambda: (s := pod_state(core, namespace, "no-binary")).get("terminated") and s)
    assert state["phase"] == "Failed"
    assert state["terminated"]["exitCode"] == 128 and state["terminated"]["reason"] == "StartError"
    assert "/nonexistent/modelmerge" in state["terminated"]["message"]


def test_harness_refuses_a_pod_it_would_not_run_as_asked(k8s_api, namespace, kubelet):
    core = client.CoreV1Api(k8s_api)
    core.create_namespaced_pod(
        namespace, make_pod("restarter", "print('once')", restartPolicy="OnFailure"), _preload_content=False
    )

    # Pending, not Failed: a ReplicaSet would replace a failed pod at once, over and over.
    pod = wait_for(lambda: (s := pod_state(core, namespace, "restarter"))["pod"]["status"].get("reason") and s["pod"])
    assert pod["status"]["phase"] == "Pending" and pod["status"]["reason"] == "UnsupportedByHarness"
    assert "restartPolicy Never" in pod["status"]["message"]
    assert not (kubelet.pod_dir(namespace, "restarter") / "main.log").exists()  # it never ran


class RecordingRuntime(ProcessRuntime):
    """The process runtime, keeping the ContainerSpec the harness resolved for each container it starts."""

    def __init__(self) -> None:
        self.started: list[ContainerSpec] = []

    def start(self, spec: ContainerSpec):
        self.started.append(spec)
        return super().start(spec)


def test_a_runtime_gets_the_resolved_container(control_plane, k8s_api, namespace, tmp_path):
    core = client.CoreV1Api(k8s_api)
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "spec"}, "data": {"spec.json": "{}"}}, _preload_content=False
    )
    script = "import os; open('/dev/shm/x', 'w').write('shm'); print(open('/spec/spec.json').read())"
    pod = make_pod(
        "resolved",
        script,
        container={
            "image": "registry.example/merge:1",
            "imagePullPolicy": "Never",
            "args": ["ignored-by-python"],
            "resources": {"limits": {"cpu": "500m", "memory": "1Gi"}},
            "securityContext": {
                "runAsUser": 20002,
                "readOnlyRootFilesystem": True,
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
            },
            "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "spec", "mountPath": "/spec"}],
            "terminationMessagePath": "/tmp/summary",
        },
        securityContext={
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "fsGroup": 10001,
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        volumes=[
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
            {"name": "spec", "configMap": {"name": "spec"}},
        ],
        automountServiceAccountToken=False,
    )
    runtime = RecordingRuntime()
    api = control_plane.api_client()
    harness = FakeKubelet(api, namespace=namespace, root=tmp_path / "kubelet", runtime=runtime)
    harness.start()
    try:
        core.create_namespaced_pod(namespace, pod, _preload_content=False)
        state = wait_for(lambda: (s := pod_state(core, namespace, "resolved")).get("terminated") and s)
    finally:
        harness.stop()
        api.close()
    assert state["phase"] == "Succeeded", state
    assert state["terminated"]["containerID"].startswith("process://")
    (spec,) = runtime.started
    assert (spec.namespace, spec.pod_name, spec.name) == (namespace, "resolved", "main")
    assert (spec.image, spec.image_pull_policy) == ("registry.example/merge:1", "Never")
    assert spec.command == ("python", "-c", script) and spec.args == ("ignored-by-python",)
    assert spec.security == SecurityContext(
        run_as_user=20002,  # the container's over the pod's
        run_as_group=10001,
        run_as_non_root=True,
        fs_group=10001,
        read_only_root_filesystem=True,
        allow_privilege_escalation=False,
        capabilities_drop=("ALL",),
        seccomp_profile="RuntimeDefault",
    )
    assert spec.limits == ResourceLimits(cpu=0.5, memory=2**30)
    mounts = {m.container_path: m for m in spec.mounts}
    assert mounts["/dev/shm"].memory_backed and mounts["/dev/shm"].size_limit == 64 * 2**20
    assert mounts["/spec"].read_only and (mounts["/spec"].host_path / "spec.json").read_text() == "{}"
    assert (mounts["/dev/shm"].host_path / "x").read_text() == "shm"
    assert mounts["/tmp/summary"].host_path == spec.termination_message_file
