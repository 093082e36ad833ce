"""Smoke tests of the envtest control plane and the kubelet harness: real Jobs, RBAC, garbage collection."""

from __future__ import annotations

import json
import os

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.helpers.waiting import wait_for

pytestmark = pytest.mark.integration


def raw(fn, *args, **kwargs) -> dict:
    return json.loads(fn(*args, _preload_content=False, **kwargs).data)




def job_condition(batch: client.BatchV1Api, namespace: str, name: str):
    """The Job's first true Complete/Failed condition, or None."""
    job = raw(batch.read_namespaced_job_status, name, namespace)
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond["type"] in ("Complete", "Failed") and cond["status"] == "True":
            return cond
    return None


def job_pods(core: client.CoreV1Api, namespace: str, name: str) -> list[dict]:
    return raw(core.list_namespaced_pod, namespace, label_selector=f"job-name={name}")["items"]


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
    (pod,) = job_pods(core, namespace, "writer")
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
    pods = job_pods(core, namespace, "failer")
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

    def collected() -> bool:
        try:
            core.read_namespaced_config_map("orphan", namespace, _preload_content=False)
            return False
        except ApiException as e:
            return e.status == 404

    wait_for(collected, timeout=60, what="the garbage collector to delete the dependent")


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
    script = (
        "import os, time\n"
        "cfg = open('/etc/cfg/spec.json').read()\n"
        "open('/scratch/env.txt', 'w').write(os.environ['HF_TOKEN'] + ' ' + os.environ['POD'] + ' ' + cfg)\n"
        "print('ready', flush=True)\n"
        "time.sleep(300)\n"
    )
    pod = make_pod(
        "sleeper",
        script,
        container={
            "env": [
                {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            ],
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
    pid = int(state["pod"]["status"]["containerStatuses"][0]["containerID"].split("://")[1])

    core.delete_namespaced_pod("sleeper", namespace, _preload_content=False)

    def gone() -> bool:
        try:
            core.read_namespaced_pod("sleeper", namespace, _preload_content=False)
            return False
        except ApiException as e:
            return e.status == 404

    wait_for(gone, timeout=30, what="the deleted pod to disappear")
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
