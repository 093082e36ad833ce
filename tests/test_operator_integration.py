"""The operator against the real control plane: `modelmerge operator` runs as a subprocess (namespaced, standalone)
against the envtest API server; the kubelet harness runs the Jobs' pods as local processes, so the real job and
garbage-collector controllers drive the Jobs."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from modelmerge import crd
from modelmerge.contract import API_GROUP, API_VERSION, PLURAL, MergeProgress
from modelmerge.kubeclient import merge_patch, raw
from tests.helpers.waiting import wait_for
from tests.kube.controlplane import free_port

pytestmark = pytest.mark.integration

SLEEPER = "python -c 'import time; time.sleep(300)'"  # a "merge" that runs until it is stopped
NO_OP = "true"
# The progress lines of a three-step merge (ties_merging_dare: thresholds, signs, merge), as the engine prints them.
PROGRESS_LINES = [
    MergeProgress(percent=percent, step=step, stepIndex=index, steps=3, stepPercent=step_percent).line("t/s")
    for step, index, percent, step_percent in [("thresholds", 1, 10.0, 30.0), ("thresholds", 1, 30.0, 100.0),
                                              ("signs", 2, 45.0, 50.0), ("signs", 2, 60.0, 100.0),
                                              ("merge", 3, 80.7, 42.0), ("merge", 3, 97.0, 95.0)]
]
# A "merge" that prints those lines on stderr over a few seconds, then ends well.
PROGRESSING = "python -c " + shlex.quote(
    f"import sys, time\nfor line in {PROGRESS_LINES!r}:\n"
    "    print(line, file=sys.stderr, flush=True)\n    time.sleep(1.0)\n"
    "time.sleep(1.0)\nprint('{\"status\": \"succeeded\"}', flush=True)"
)


# ---------------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------------------


class OperatorProcess:
    """`modelmerge operator -n <namespace> --standalone` as a subprocess, logging to a file."""

    def __init__(
        self,
        kubeconfig: Path,
        namespace: str,
        log: Path,
        merge_command: str | None = None,
        liveness_port: int | None = None,
        peering: tuple[str, int] | None = None,
        resync_interval: float = 0,
    ):
        scope = ["--peering", peering[0], "--priority", str(peering[1])] if peering else ["--standalone"]
        self.args = [
            sys.executable,
            "-m",
            "modelmerge.cli",
            "operator",
            "-n",
            namespace,
            *scope,
            "--kubeconfig",
            str(kubeconfig),
            "--resync-interval",
            str(resync_interval),
            "--job-env",
            "HF_HUB_OFFLINE=1",
            "--liveness",
            f"http://127.0.0.1:{liveness_port}/healthz" if liveness_port else "",
        ]
        if merge_command:
            self.args += ["--merge-command", merge_command]
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> OperatorProcess:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@pytest.fixture(scope="module")
def crd_installed(k8s_api):
    return crd.install(k8s_api)


@pytest.fixture
def apis(k8s_api, crd_installed):
    from kubernetes import client

    return client.CustomObjectsApi(k8s_api), client.BatchV1Api(k8s_api), client.CoreV1Api(k8s_api)


@pytest.fixture
def start_operator(kubeconfig_path, namespace, tmp_path):
    started: list[OperatorProcess] = []

    def start(
        merge_command: str | None = None,
        liveness_port: int | None = None,
        peering: tuple[str, int] | None = None,
        kubeconfig: Path | None = None,
        resync_interval: float = 0,
    ) -> OperatorProcess:
        op = OperatorProcess(
            kubeconfig or kubeconfig_path,
            namespace,
            tmp_path / f"operator-{len(started)}.log",
            merge_command,
            liveness_port,
            peering,
            resync_interval,
        ).start()
        started.append(op)
        return op

    yield start
    for op in started:
        op.stop()


class World:
    """The ModelMerge, Job and pod views one test needs, plus waiting with diagnostics."""

    def __init__(self, apis, namespace: str, operator: OperatorProcess | None = None):
        self.custom, self.batch, self.core = apis
        self.ns = namespace
        self.operator = operator

    def create(self, spec: dict, name: str | None = None) -> str:
        name = name or f"mm-{uuid.uuid4().hex[:6]}"
        body = {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": "ModelMerge",
            "metadata": {"name": name},
            "spec": spec,
        }
        self.custom.create_namespaced_custom_object(
            API_GROUP, API_VERSION, self.ns, PLURAL, body, _preload_content=False
        )
        return name

    def mm(self, name: str) -> dict | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return raw(self.custom.get_namespaced_custom_object, API_GROUP, API_VERSION, self.ns, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def status(self, name: str) -> dict:
        return (self.mm(name) or {}).get("status") or {}

    def patch_spec(self, name: str, spec: dict) -> None:
        merge_patch(self.custom.patch_namespaced_custom_object, API_GROUP, API_VERSION, self.ns, PLURAL, name,
                    {"spec": spec})

    def create_claim(self, name: str) -> None:
        claim = {"metadata": {"name": name},
                 "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}
        self.core.create_namespaced_persistent_volume_claim(self.ns, claim, _preload_content=False)

    def printed(self, name: str) -> dict[str, tuple[str, int]]:
        """What `kubectl get mm <name>` prints: each printer column's cell and priority (0: shown without -o wide),
        as the API server renders them in a Table."""
        table = raw(self.custom.get_namespaced_custom_object, API_GROUP, API_VERSION, self.ns, PLURAL, name,
                    _headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"})
        (row,) = table["rows"]
        return {column["name"]: (cell, column.get("priority", 0))
                for column, cell in zip(table["columnDefinitions"], row["cells"], strict=True)}

    def wait_event(self, name: str, event: tuple[str, str, str]) -> None:
        """Events are posted in the background: wait for (type, reason, message) to be there."""
        wait_for(lambda: event in self.events(name), what=f"event {event}", context=lambda: str(self.events(name)))

    def wait_reason(self, name: str, reason: str, timeout: float = 60.0) -> dict:
        wait_for(lambda: self.status(name).get("reason") == reason, timeout, f"{name} to have reason {reason}",
                 context=lambda: self.context(name))
        return self.status(name)

    def jobs(self) -> list[dict]:
        return raw(self.batch.list_namespaced_job, self.ns)["items"]

    def job(self, name: str) -> dict | None:
        return next((j for j in self.jobs() if j["metadata"]["name"] == name), None)

    def pods(self) -> list[dict]:
        return raw(self.core.list_namespaced_pod, self.ns)["items"]

    def events(self, name: str) -> list[tuple[str, str, str]]:
        items = raw(self.core.list_namespaced_event, self.ns, field_selector=f"involvedObject.name={name}")["items"]
        return [(e["type"], e["reason"], e.get("message", "")) for e in items]

    def context(self, name: str | None = None) -> str:
        parts = []
        if name:
            parts.append(f"ModelMerge status: {json.dumps(self.status(name), indent=1)}")
        parts.append("Jobs: " + json.dumps([(j["metadata"]["name"], j.get("status")) for j in self.jobs()]))
        if self.operator is not None:
            parts.append(f"operator log:\n{self.operator.tail()}")
        return "\n".join(parts)

    def wait_phase(self, name: str, phase: str, timeout: float = 60.0) -> dict:
        wait_for(
            lambda: self.status(name).get("phase") == phase,
            timeout,
            f"{name} to be {phase}",
            context=lambda: self.context(name),
        )
        return self.status(name)


def _spec(**fields) -> dict:
    spec = {
        "base_model": "org/base",
        "models_to_merge": ["org/a"],
        "merge_method": "average_merging",
        "output": {"pvc": "out"},
    }
    spec.update(fields)
    return spec


# ---------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------


def test_modelmerge_becomes_a_job_with_the_expected_pod_spec(apis, namespace, start_operator):
    port = free_port()
    world = World(apis, namespace, start_operator(liveness_port=port))
    name = world.create(
        _spec(
            use_gpu=True,
            output_dir="runs/1",
            output={"pvc": "out", "subPath": "team"},
            modelCache={"pvc": "hf-cache"},
            hfTokenSecret={"name": "hf", "key": "tok"},
            resources={"cpu": 2, "memory": "8Gi", "gpu": 2, "shmSize": "1Gi"},
            nodeSelector={"pool": "gpu"},
            tolerations=[{"key": "gpu", "operator": "Exists"}],
            backoffLimit=2,
            activeDeadlineSeconds=600,
            ttlSecondsAfterFinished=3600,
            image="registry.local/m:1",
        )
    )
    job = wait_for(lambda: world.job(f"{name}-merge"), what="the Job", context=world.context)
    mm = world.mm(name)
    assert job["metadata"]["ownerReferences"][0]["uid"] == mm["metadata"]["uid"]
    assert job["metadata"]["labels"]["modelmerge.io/name"] == name
    spec = job["spec"]
    assert (spec["backoffLimit"], spec["activeDeadlineSeconds"], spec["ttlSecondsAfterFinished"]) == (2, 600, 3600)
    pod = spec["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "gpu"} and pod["restartPolicy"] == "Never"
    (c,) = pod["containers"]
    assert c["image"] == "registry.local/m:1" and c["command"] == ["modelmerge", "merge"]
    assert c["args"] == [
        "--spec",
        "/etc/modelmerge/spec.json",
        "--output-dir",
        "/output/runs/1",
        "--summary-file",
        "/dev/termination-log",
        "--progress",
        "lines",
    ]
    assert c["resources"]["limits"] == {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "2"}
    env = {e["name"]: e for e in c["env"]}
    assert env["HF_HOME"]["value"] == "/cache" and env["HF_HUB_OFFLINE"]["value"] == "1"
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "tok"}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/output"]["subPath"] == "team" and set(mounts) == {
        "/etc/modelmerge",
        "/output",
        "/cache",
        "/dev/shm",
        "/scratch",
    }
    assert c["terminationMessagePath"] == "/dev/termination-log"
    cm = raw(world.core.read_namespaced_config_map, f"{name}-merge", namespace)
    assert json.loads(cm["data"]["spec.json"])["base_model"] == "org/base"
    status = world.wait_phase(name, "Pending")
    assert status["jobName"] == f"{name}-merge" and status["outputPath"] == "pvc://out/team/runs/1"
    assert status["observedGeneration"] == 1
    wait_for(lambda: any(e[1] == "JobCreated" for e in world.events(name)), what="a JobCreated event")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
        assert response.status == 200


def test_real_merge_on_tiny_models_succeeds(apis, namespace, start_operator, kubelet, tmp_path):
    from tests.helpers.models import make_family

    base, finetunes = make_family(tmp_path / "models", n=2)
    world = World(apis, namespace, start_operator())
    name = world.create(
        _spec(
            base_model=str(base),
            models_to_merge=[str(f) for f in finetunes],
            merge_method="task_arithmetic",
            scaling_coefficient=0.5,
            dtype="float32",
            output={"pvc": "out", "subPath": "team"},
            output_dir="merged/one",
        )
    )
    status = world.wait_phase(name, "Succeeded", timeout=240)
    assert status["outputPath"] == "pvc://out/team/merged/one"
    assert status["reason"] == "Completed" and status["message"].startswith("merged ")
    assert status["progress"]["percent"] == 100.0 and status["completionTime"] and status["startTime"]
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {"Accepted": "True", "Running": "False", "Complete": "True"}
    out = kubelet.pvc_path("out", "team") / "merged" / "one"
    files = {p.name for p in out.iterdir()}
    assert "config.json" in files and any(f.endswith(".safetensors") for f in files), files
    reasons = [e[1] for e in world.events(name)]
    assert "JobCreated" in reasons and "Completed" in reasons


def test_progress_comes_from_the_running_merge_pods_log(apis, namespace, start_operator, kubelet):
    from kubernetes import watch

    world = World(apis, namespace, start_operator(merge_command=PROGRESSING, resync_interval=0.3))
    name = world.create(_spec())
    seen: list[dict] = []  # status.progress of every status the API server reported while the merge ran
    stream = watch.Watch()
    for event in stream.stream(world.custom.list_namespaced_custom_object, API_GROUP, API_VERSION, namespace,
                               PLURAL, field_selector=f"metadata.name={name}", timeout_seconds=120):
        status = event["object"].get("status") or {}
        if status.get("progress") and (not seen or seen[-1] != status["progress"]):
            seen.append(status["progress"])
        if status.get("phase") in ("Succeeded", "Failed"):
            stream.stop()
    assert world.status(name)["phase"] == "Succeeded", world.context(name)
    running, final = seen[:-1], seen[-1]
    assert len(running) >= 3, seen  # several reports while it ran, not just the end
    for progress in seen:
        assert set(progress) == {"percent", "step", "stepIndex", "steps", "stepPercent", "text"}, progress
        assert progress["steps"] == 3 and progress["text"].startswith(f"{progress['step']} {progress['stepIndex']}/3 ")
    percents = [p["percent"] for p in seen]
    assert percents == sorted(percents), percents  # never goes down
    assert {p["step"] for p in running} <= {"thresholds", "signs", "merge"} and len({p["step"] for p in running}) >= 2
    assert (final["percent"], final["text"]) == (100.0, "merge 3/3 100%")


def test_unschedulable_merge_pod_is_reported_with_the_schedulers_message(apis, namespace, start_operator,
                                                                        kubelet):
    world = World(apis, namespace, start_operator(merge_command=NO_OP, resync_interval=0.3))
    world.create_claim("out")
    name = world.create(_spec(use_gpu=True, resources={"gpu": 64}))  # the test node has 8 GPUs
    status = world.wait_reason(name, "Unschedulable")
    (pod,) = world.pods()
    (scheduled,) = [c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled"]
    assert status["phase"] == "Pending" and status["message"] == scheduled["message"]
    assert "Insufficient nvidia.com/gpu" in status["message"], status["message"]
    world.wait_event(name, ("Warning", "Unschedulable", f"Pending: {status['message']}"))
    assert world.printed(name)["Reason"] == ("Unschedulable", 0)
    assert world.printed(name)["Phase"] == ("Pending", 0)


def test_image_that_cannot_be_pulled_is_reported_naming_the_image(apis, namespace, start_operator):
    image = "registry.local/no-such-merge-image:1"
    world = World(apis, namespace, start_operator(merge_command=NO_OP, resync_interval=0.3))
    world.create_claim("out")
    name = world.create(_spec(image=image))
    pod = wait_for(lambda: next(iter(world.pods()), None), what="the merge pod", context=world.context)
    pod_name = pod["metadata"]["name"]
    # What a scheduler and a kubelet that cannot pull the image do: bind the pod, report the container waiting.
    world.core.create_namespaced_pod_binding(pod_name, namespace, {
        "apiVersion": "v1", "kind": "Binding", "metadata": {"name": pod_name},
        "target": {"apiVersion": "v1", "kind": "Node", "name": "node-without-the-image"}}, _preload_content=False)

    def kubelet_reports(reason: str, message: str) -> None:
        container = {"name": "merge", "image": image, "imageID": "", "ready": False, "started": False,
                     "restartCount": 0, "state": {"waiting": {"reason": reason, "message": message}}}
        merge_patch(world.core.patch_namespaced_pod_status, pod_name, namespace,
                    {"status": {"phase": "Pending", "containerStatuses": [container]}})

    pull_error = f'failed to pull and unpack image "{image}": not found'
    kubelet_reports("ErrImagePull", pull_error)
    status = world.wait_reason(name, "ErrImagePull")
    assert (status["phase"], status["message"]) == ("Pending", pull_error)
    world.wait_event(name, ("Warning", "ErrImagePull", f"Pending: {pull_error}"))
    kubelet_reports("ImagePullBackOff", f'Back-off pulling image "{image}"')
    status = world.wait_reason(name, "ImagePullBackOff")
    assert (status["phase"], status["message"]) == ("Pending", f'Back-off pulling image "{image}"')
    assert world.printed(name)["Reason"] == ("ImagePullBackOff", 0)
    time.sleep(2)  # give a buggy operator time to announce the same cause again
    warnings = [e for e in world.events(name) if e[0] == "Warning"]
    assert warnings == [("Warning", "ErrImagePull", f"Pending: {pull_error}")]  # one per cause


def test_missing_claim_is_reported_until_it_exists(apis, namespace, start_operator, control_plane, tmp_path):
    from tests.kube.kubelet import FakeKubelet

    world = World(apis, namespace, start_operator(merge_command=NO_OP, resync_interval=0.3))
    world.create_claim("out")  # the output claim exists, the cache claim does not
    name = world.create(_spec(modelCache={"pvc": "hf-cache", "readOnly": True}))
    status = world.wait_reason(name, "ClaimNotFound")
    expected = f"PersistentVolumeClaim 'hf-cache' (spec.modelCache.pvc) does not exist in namespace {namespace}"
    assert (status["phase"], status["message"]) == ("Pending", expected)
    world.wait_event(name, ("Warning", "ClaimNotFound", f"Pending: {expected}"))
    assert world.printed(name)["Reason"] == ("ClaimNotFound", 0)
    world.create_claim("hf-cache")
    api = control_plane.api_client()
    kubelet = FakeKubelet(api, namespace=namespace, root=tmp_path / "kubelet")  # now a node takes the pod
    kubelet.start()
    try:
        status = world.wait_phase(name, "Succeeded")
    finally:
        kubelet.stop()
        api.close()
    assert status["reason"] == "Completed" and world.printed(name)["Reason"] == ("Completed", 0)


def test_bad_model_path_fails_with_the_engines_message_after_retries(apis, namespace, start_operator, kubelet):
    world = World(apis, namespace, start_operator())
    name = world.create(
        _spec(base_model="/nonexistent/base-model", models_to_merge=["/nonexistent/ft"], backoffLimit=1)
    )
    status = world.wait_phase(name, "Failed", timeout=180)
    assert status["reason"] == "BackoffLimitExceeded"
    assert "/nonexistent/base-model" in status["message"], status["message"]
    assert status["attempts"] == 2
    job = world.job(f"{name}-merge")
    assert job["status"]["failed"] == 2  # backoffLimit 1: the merge ran twice
    events = world.events(name)
    assert any(e[:2] == ("Warning", "Retrying") for e in events), events
    assert any(e[:2] == ("Warning", "BackoffLimitExceeded") and "/nonexistent" in e[2] for e in events)


def test_invalid_regex_is_a_permanent_error_without_a_job(apis, namespace, start_operator):
    world = World(apis, namespace, start_operator())
    name = world.create(_spec(exclude_param_names_regex=["(unclosed"]))  # CEL cannot compile-check regexes
    status = world.wait_phase(name, "Failed")
    assert status["reason"] == "InvalidSpec" and "invalid regular expression" in status["message"]
    time.sleep(2)
    assert world.jobs() == []
    assert any(e[:2] == ("Warning", "InvalidSpec") for e in world.events(name))


def test_deadline_exceeded(apis, namespace, start_operator, kubelet):
    world = World(apis, namespace, start_operator(merge_command=SLEEPER))
    name = world.create(_spec(activeDeadlineSeconds=4, backoffLimit=0))
    world.wait_phase(name, "Running")
    status = world.wait_phase(name, "Failed", timeout=60)
    assert status["reason"] == "DeadlineExceeded", status


def test_cancel_deletes_the_job_and_marks_cancelled(apis, namespace, start_operator, kubelet):
    world = World(apis, namespace, start_operator(merge_command=SLEEPER))
    name = world.create(_spec())
    world.wait_phase(name, "Running")
    world.patch_spec(name, {"cancel": True})
    status = world.wait_phase(name, "Cancelled")
    assert status["observedGeneration"] == 2
    wait_for(lambda: world.job(f"{name}-merge") is None, what="the Job to be deleted", context=world.context)
    wait_for(lambda: world.pods() == [], what="the merge pod to go")
    time.sleep(1)
    assert world.status(name)["phase"] == "Cancelled" and world.jobs() == []


def test_deleting_the_modelmerge_cascades_to_its_job(apis, namespace, start_operator, kubelet):
    world = World(apis, namespace, start_operator(merge_command=SLEEPER))
    name = world.create(_spec())
    world.wait_phase(name, "Running")
    world.custom.delete_namespaced_custom_object(
        API_GROUP, API_VERSION, namespace, PLURAL, name, _preload_content=False
    )
    wait_for(lambda: world.jobs() == [], what="the garbage collector to delete the Job", context=world.context)

    def config_map_gone() -> bool:
        names = [
            c["metadata"]["name"]
            for c in raw(world.core.list_namespaced_config_map, namespace)["items"]
        ]
        return f"{name}-merge" not in names

    wait_for(config_map_gone, what="the ConfigMap to be deleted")
    wait_for(lambda: world.pods() == [], what="the merge pod to go")


def test_job_deleted_by_hand_is_reported_not_recreated(apis, namespace, start_operator, kubelet):
    world = World(apis, namespace, start_operator(merge_command=SLEEPER))
    name = world.create(_spec())
    world.wait_phase(name, "Running")
    world.batch.delete_namespaced_job(
        f"{name}-merge", namespace, propagation_policy="Background", _preload_content=False
    )
    status = world.wait_phase(name, "Failed")
    assert status["reason"] == "JobDeleted" and "not recreated" in status["message"]
    time.sleep(3)
    assert world.jobs() == [] and world.status(name)["reason"] == "JobDeleted"


def test_operator_restart_mid_run_creates_no_duplicate(apis, namespace, start_operator, kubelet):
    first = start_operator(merge_command=SLEEPER)
    world = World(apis, namespace, first)
    running, vanishing = world.create(_spec(), "running"), world.create(_spec(), "vanishing")
    world.wait_phase(running, "Running")
    world.wait_phase(vanishing, "Running")
    job_uid = world.job("running-merge")["metadata"]["uid"]
    first.stop(signal.SIGKILL)  # no graceful shutdown

    late = world.create(_spec(), "late")  # created while no operator runs
    world.batch.delete_namespaced_job(
        "vanishing-merge", namespace, propagation_policy="Background", _preload_content=False
    )
    wait_for(lambda: world.job("vanishing-merge") is None, what="the Job to be gone")

    world.operator = start_operator(merge_command=SLEEPER)
    world.wait_phase(late, "Running")
    status = world.wait_phase(vanishing, "Failed")
    assert status["reason"] == "JobDeleted"
    time.sleep(3)  # give a buggy operator time to make duplicates
    jobs = {j["metadata"]["name"]: j["metadata"]["uid"] for j in world.jobs()}
    assert set(jobs) == {"running-merge", "late-merge"} and jobs["running-merge"] == job_uid
    assert world.status(running)["phase"] == "Running"
    assert len([p for p in world.pods() if p["metadata"]["labels"].get("job-name") == "running-merge"]) == 1
    world.patch_spec(running, {"cancel": True})  # the new operator handles updates of old objects
    world.wait_phase(running, "Cancelled")


def test_kueue_queue_creates_a_suspended_job_that_runs_once_admitted(apis, namespace, start_operator, kubelet):
    world = World(apis, namespace, start_operator(merge_command=NO_OP))
    name = world.create(_spec(queueName="team-queue"))
    job = wait_for(lambda: world.job(f"{name}-merge"), what="the Job", context=world.context)
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-queue"
    status = world.wait_phase(name, "Pending")
    wait_for(lambda: world.status(name).get("reason") == "Queued", what="reason Queued", context=world.context)
    assert world.pods() == []
    # Kueue admits the workload by unsuspending the Job; the operator must not suspend it again.
    merge_patch(world.batch.patch_namespaced_job, f"{name}-merge", namespace, {"spec": {"suspend": False}})
    status = world.wait_phase(name, "Succeeded")
    assert status["message"] == "the merge finished"
    assert world.job(f"{name}-merge")["spec"]["suspend"] is False


def test_peering_lets_one_replica_act_and_the_other_take_over(apis, namespace, start_operator, kubelet, k8s_api):
    for manifest in crd.peering_crds():
        crd.install(k8s_api, manifest=manifest)
    custom = apis[0]
    custom.create_namespaced_custom_object(
        "kopf.dev",
        "v1",
        namespace,
        "kopfpeerings",
        {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "modelmerge"}},
        _preload_content=False,
    )
    leader = start_operator(merge_command=SLEEPER, peering=("modelmerge", 10))
    standby = start_operator(merge_command=SLEEPER, peering=("modelmerge", 5))
    world = World(apis, namespace, leader)

    def peers() -> dict:
        obj = raw(
            custom.get_namespaced_custom_object, "kopf.dev", "v1", namespace, "kopfpeerings", "modelmerge"
        )
        return obj.get("status") or {}

    wait_for(lambda: len(peers()) == 2, what="both replicas in the peering", context=lambda: leader.tail())
    first = world.create(_spec())
    world.wait_phase(first, "Running")
    time.sleep(2)
    assert [j["metadata"]["name"] for j in world.jobs()] == [f"{first}-merge"]
    assert "Creation is processed" not in standby.log.read_text(errors="replace")  # it stayed paused
    leader.stop()  # a graceful exit leaves the peering at once
    world.operator = standby
    second = world.create(_spec())
    world.wait_phase(second, "Running")
    assert sorted(j["metadata"]["name"] for j in world.jobs()) == sorted([f"{first}-merge", f"{second}-merge"])


def test_operator_works_under_its_own_rbac_rules(
    apis, namespace, start_operator, kubelet, k8s_api, control_plane, tmp_path
):
    from kubernetes import client

    from modelmerge_operator import rbac

    custom, _, core = apis
    rbac_api = client.RbacAuthorizationV1Api(k8s_api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "operator"}}, _preload_content=False)
    objects = rbac.manifests(f"mm-operator-{namespace}", "operator", namespace, [namespace])
    for obj in objects:
        if obj["kind"] == "ClusterRole":
            rbac_api.create_cluster_role(obj, _preload_content=False)
        elif obj["kind"] == "ClusterRoleBinding":
            rbac_api.create_cluster_role_binding(obj, _preload_content=False)
        else:
            rbac_api.create_namespaced_role_binding(namespace, obj, _preload_content=False)
    try:
        token = raw(
            core.create_namespaced_service_account_token, "operator", namespace, {"spec": {"expirationSeconds": 3600}}
        )["status"]["token"]
        kubeconfig = tmp_path / "operator.kubeconfig"
        kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters:\n- name: c\n  cluster:\n    server: {control_plane.host}\n"
            f"    certificate-authority: {control_plane.ca_file}\n"
            f"users:\n- name: operator\n  user:\n    token: {token}\n"
            "contexts:\n- name: c\n  context:\n    cluster: c\n    user: operator\n"
            "current-context: c\n"
        )
        world = World(apis, namespace, start_operator(merge_command=SLEEPER, kubeconfig=kubeconfig))
        name = world.create(_spec(backoffLimit=0))
        world.wait_phase(name, "Running")
        wait_for(lambda: any(e[1] == "JobCreated" for e in world.events(name)), what="a JobCreated event")
        world.patch_spec(name, {"cancel": True})
        world.wait_phase(name, "Cancelled")
        bad = world.create(_spec(exclude_param_names_regex=["[unclosed"]))
        world.wait_phase(bad, "Failed")
        log = world.operator.log.read_text(errors="replace")
        assert "403" not in log and "Forbidden" not in log and "forbidden" not in log, world.operator.tail()
    finally:
        for obj in objects:
            kind, obj_name = obj["kind"], obj["metadata"]["name"]
            if kind == "ClusterRole":
                rbac_api.delete_cluster_role(obj_name, _preload_content=False)
            elif kind == "ClusterRoleBinding":
                rbac_api.delete_cluster_role_binding(obj_name, _preload_content=False)
