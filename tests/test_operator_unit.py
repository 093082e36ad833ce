"""Unit tests of the operator's pure parts (Job manifest, status from Job/pods) and of its reconcile logic
against an in-memory fake of the few API calls it makes."""

from __future__ import annotations

import json
import subprocess
import sys

import kopf
import pytest

from modelmerge.cli import build_parser
from modelmerge.contract import MergeProgress, ModelMergeSpec, Phase
from modelmerge_operator import manifests
from modelmerge_operator.config import OperatorConfig, config_from_args
from modelmerge_operator.reconcile import Reconciler
from modelmerge_operator.status import (
    Observation,
    build_status,
    merge_conditions,
    observe,
    status_changed,
)

CONFIG = OperatorConfig(image="registry.local/merge:1", merge_command=("/venv/bin/modelmerge",))


def _body(name: str = "llama-merge", uid: str = "uid-1", **spec) -> dict:
    base = {"base_model": "org/base", "models_to_merge": ["org/a", "org/b"], "merge_method": "task_arithmetic",
            "output": {"pvc": "models"}}
    base.update(spec)
    return {"apiVersion": "modelmerge.io/v1alpha1", "kind": "ModelMerge",
            "metadata": {"name": name, "namespace": "team-a", "uid": uid, "generation": 1}, "spec": base}


def _spec(body: dict) -> ModelMergeSpec:
    return ModelMergeSpec.model_validate(body["spec"])


# ---------------------------------------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------------------------------------


def test_job_name_is_deterministic_and_fits_a_label():
    assert manifests.job_name("llama-merge") == "llama-merge-merge"
    long = "x" * 200
    assert manifests.job_name(long) == manifests.job_name(long)
    assert len(manifests.job_name(long)) <= 63 and manifests.job_name(long).endswith("-merge")
    assert manifests.job_name("x" * 199 + "y") != manifests.job_name(long)
    assert len(manifests.name_label(long)) <= 63


def test_minimal_job_shape():
    body = _body()
    job = manifests.job(body, _spec(body), CONFIG)
    meta = job["metadata"]
    assert meta["name"] == "llama-merge-merge" and meta["namespace"] == "team-a"
    assert meta["ownerReferences"] == [{"apiVersion": "modelmerge.io/v1alpha1", "kind": "ModelMerge",
                                        "name": "llama-merge", "uid": "uid-1", "controller": True,
                                        "blockOwnerDeletion": True}]
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "modelmerge-operator"
    assert meta["labels"]["modelmerge.io/name"] == "llama-merge"
    spec = job["spec"]
    assert spec["backoffLimit"] == 1 and spec["suspend"] is False
    assert "activeDeadlineSeconds" not in spec and "ttlSecondsAfterFinished" not in spec
    assert spec["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [2]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert "nodeSelector" not in pod and "tolerations" not in pod and "affinity" not in pod
    (c,) = pod["containers"]
    assert c["image"] == "registry.local/merge:1"
    assert c["command"] == ["/venv/bin/modelmerge", "merge"]
    assert c["args"] == ["--spec", "/etc/modelmerge/spec.json", "--output-dir", "/output/llama-merge",
                         "--summary-file", "/dev/termination-log", "--progress", "lines"]
    assert c["terminationMessagePath"] == "/dev/termination-log"
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c["resources"] == {"requests": {"memory": manifests.DEFAULT_MERGE_MEMORY},
                              "limits": {"memory": manifests.DEFAULT_MERGE_MEMORY}}
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/etc/modelmerge", "/output", "/dev/shm", "/scratch"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["spec"]["configMap"]["name"] == "llama-merge-merge"
    assert volumes["output"]["persistentVolumeClaim"]["claimName"] == "models"
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory"}
    assert [e["name"] for e in c["env"]] == ["PYTHONUNBUFFERED", "HOME", "TMPDIR"]
    # Restricted pod security (the chart's pods have the same): non-root, read-only root, no escalation.
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}
    assert volumes["scratch"]["emptyDir"] == {}


def test_full_job_shape():
    body = _body(
        use_gpu=True, output_dir="runs/7", output={"pvc": "models", "subPath": "team"},
        modelCache={"pvc": "hf-cache", "subPath": "hub", "readOnly": True}, hfTokenSecret={"name": "hf"},
        resources={"cpu": 8, "memory": "64Gi", "gpu": 2, "gpuResourceName": "amd.com/gpu", "shmSize": "8Gi"},
        image="mine:2", imagePullSecrets=[{"name": "regcred"}], nodeSelector={"pool": "gpu"},
        tolerations=[{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        affinity={"nodeAffinity": {}}, priorityClassName="high", queueName="team-queue",
        backoffLimit=3, activeDeadlineSeconds=7200, ttlSecondsAfterFinished=60,
    )
    config = OperatorConfig(image="default:1", service_account="merger", job_env=(("HF_HUB_OFFLINE", "1"),))
    job = manifests.job(body, _spec(body), config)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-queue"
    spec = job["spec"]
    assert (spec["suspend"], spec["backoffLimit"], spec["activeDeadlineSeconds"],
            spec["ttlSecondsAfterFinished"]) == (True, 3, 7200, 60)
    template = spec["template"]
    assert template["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-queue"
    pod = template["spec"]
    assert pod["serviceAccountName"] == "merger"
    assert pod["nodeSelector"] == {"pool": "gpu"} and pod["affinity"] == {"nodeAffinity": {}}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["priorityClassName"] == "high" and pod["imagePullSecrets"] == [{"name": "regcred"}]
    (c,) = pod["containers"]
    assert c["image"] == "mine:2" and c["command"] == ["modelmerge", "merge"]
    assert c["args"][3] == "/output/runs/7"
    assert c["resources"] == {"requests": {"cpu": "8", "memory": "64Gi"},
                              "limits": {"cpu": "8", "memory": "64Gi", "amd.com/gpu": "2"}}
    env = {e["name"]: e for e in c["env"]}
    assert env["HF_HOME"]["value"] == "/cache"
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert env["HF_HUB_OFFLINE"]["value"] == "1"
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["output"] == {"name": "output", "mountPath": "/output", "subPath": "team"}
    assert mounts["model-cache"] == {"name": "model-cache", "mountPath": "/cache", "readOnly": True,
                                     "subPath": "hub"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert volumes["model-cache"]["persistentVolumeClaim"] == {"claimName": "hf-cache", "readOnly": True}


def test_gpu_limit_only_when_use_gpu():
    default = {"memory": manifests.DEFAULT_MERGE_MEMORY}
    body = _body(resources={"gpu": 4})
    assert manifests.resources(_spec(body)) == {"requests": default, "limits": default}
    body = _body(use_gpu=True)
    assert manifests.resources(_spec(body)) == {"requests": default,
                                                "limits": {**default, "nvidia.com/gpu": "1"}}


def test_config_map_holds_only_the_engine_request():
    body = _body(output_dir="x", queueName="q", exclude_param_names_regex=["^lm_head"])
    cm = manifests.config_map(body, _spec(body))
    assert cm["metadata"]["name"] == "llama-merge-merge"
    assert cm["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    request = json.loads(cm["data"]["spec.json"])
    assert request["base_model"] == "org/base" and request["exclude_param_names_regex"] == ["^lm_head"]
    assert "output_dir" not in request and "queueName" not in request and "output" not in request


def test_regexes_with_commas_reach_the_engine_whole(tmp_path):
    """A ModelMerge's exclude regexes (a list in the CRD) go through the ConfigMap's spec.json to the engine's
    `--spec` unsplit, commas inside {}, () and [] included."""
    from modelmerge.cli import request_from_args

    regexes = [r"model\.layers\.[0-9]{1,3}\.mlp\..*", r"(q,k|v)_proj", r"[,;]x"]
    body = _body(exclude_param_names_regex=regexes)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(manifests.config_map(body, _spec(body))["data"]["spec.json"])
    args = build_parser().parse_args(["merge", "--spec", str(spec_file), "--output-dir", str(tmp_path / "out")])
    assert request_from_args(args).exclude_param_names_regex == regexes


def test_operator_flags_and_environment(monkeypatch):
    monkeypatch.setenv("MODELMERGE_IMAGE", "env-image:3")
    monkeypatch.setenv("MODELMERGE_JOB_ENV", "A=1,B=2")
    args = build_parser().parse_args(["operator", "-n", "ns1", "-n", "ns2", "--merge-command",
                                      "python -m modelmerge.cli", "--job-env", "C=3"])
    config = config_from_args(args)
    assert args.namespaces == ["ns1", "ns2"]
    assert config.image == "env-image:3"
    assert config.merge_command == ("python", "-m", "modelmerge.cli")
    assert config.job_env == (("A", "1"), ("B", "2"), ("C", "3"))
    bad = build_parser().parse_args(["operator", "--job-env", "novalue"])
    with pytest.raises(ValueError, match="NAME=VALUE"):
        config_from_args(bad)


def test_operator_never_imports_torch():
    code = ("import sys, modelmerge.cli, modelmerge_operator.handlers, modelmerge_operator.main; "
            "modelmerge.cli.build_parser(); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------------------
# Status from Job and pods
# ---------------------------------------------------------------------------------------------------------


def _job(suspend=False, conditions=(), **status) -> dict:
    return {"metadata": {"name": "j", "namespace": "team-a"}, "spec": {"suspend": suspend},
            "status": {**status, "conditions": [{"type": t, "status": "True", "reason": r, "message": m,
                                                 "lastTransitionTime": "2026-01-01T00:01:00Z"}
                                                for t, r, m in conditions]}}


def _pod(phase: str, message: str = "", reason: str = "Error", finished: str = "2026-01-01T00:00:30Z",
         exit_code: int = 1) -> dict:
    return {"status": {"phase": phase, "containerStatuses": [{"name": "merge", "state": {"terminated": {
        "exitCode": exit_code, "reason": reason, "message": message, "finishedAt": finished}}}]}}


def test_pending_running_and_succeeded():
    assert observe(_job(), []).phase == Phase.Pending
    waiting = observe(_job(active=1, ready=0, startTime="t0"), [])
    assert (waiting.phase, waiting.reason, waiting.start_time) == (Phase.Pending, "PodPending", "t0")
    running = observe(_job(active=1, ready=1), [])
    assert (running.phase, running.attempts) == (Phase.Running, 1)
    finishing = observe(_job(succeeded=1, conditions=[("SuccessCriteriaMet", "", "")]), [])
    assert finishing.phase == Phase.Running  # never back to Pending between the pod's end and Complete
    summary = json.dumps({"status": "succeeded", "output_dir": "/output/x", "tensors": 24, "seconds": 1.5})
    done = observe(_job(succeeded=1, completionTime="t9", conditions=[("Complete", "", "")]),
                   [_pod("Succeeded", summary, "Completed", exit_code=0)])
    assert (done.phase, done.reason, done.completion_time) == (Phase.Succeeded, "Completed", "t9")
    assert done.message == "merged 24 tensors in 1.5s"


def test_failed_with_the_engines_message_from_the_latest_pod():
    pods = [_pod("Failed", json.dumps({"status": "failed", "error": "first"}), finished="2026-01-01T00:00:10Z"),
            _pod("Failed", "log line\n" + json.dumps({"status": "failed", "error": "base_model: missing"}),
                 finished="2026-01-01T00:00:50Z")]
    obs = observe(_job(failed=2, conditions=[("Failed", "BackoffLimitExceeded", "Job has reached...")]), pods)
    assert (obs.phase, obs.reason, obs.message, obs.attempts) == (
        Phase.Failed, "BackoffLimitExceeded", "base_model: missing", 2)
    assert obs.completion_time == "2026-01-01T00:01:00Z"


def test_failure_reasons_oom_deadline_and_plain_text():
    oom = observe(_job(failed=1, conditions=[("Failed", "BackoffLimitExceeded", "")]),
                  [_pod("Failed", "", "OOMKilled", exit_code=137)])
    assert oom.reason == "OOMKilled" and "memory" in oom.message
    deadline = observe(_job(failed=1, conditions=[("Failed", "DeadlineExceeded", "Job was active longer")]),
                       [_pod("Failed", json.dumps({"status": "failed", "error": "interrupted by SIGTERM"}))])
    assert (deadline.reason, deadline.message) == ("DeadlineExceeded", "Job was active longer")
    traceback = observe(_job(failed=1, conditions=[("Failed", "PodFailurePolicy", "exit code 2")]),
                        [_pod("Failed", "Traceback ...\nKeyError: 'x'")])
    assert traceback.message == "Traceback ...\nKeyError: 'x'"
    no_pods = observe(_job(failed=1, conditions=[("Failed", "BackoffLimitExceeded", "limit reached")]), [])
    assert no_pods.message == "limit reached"


def test_retrying_and_suspended():
    retry = observe(_job(active=1, ready=0, failed=1),
                    [_pod("Failed", json.dumps({"status": "failed", "error": "disk full"}))])
    assert (retry.phase, retry.reason) == (Phase.Running, "Retrying") and "disk full" in retry.message
    assert observe(_job(failed=1), []).phase == Phase.Running  # between a failed pod and its replacement
    queued = observe(_job(suspend=True, conditions=[("Suspended", "JobSuspended", "")]), [], queue="gpu")
    assert (queued.phase, queued.reason) == (Phase.Pending, "Queued") and "gpu" in queued.message
    assert observe(_job(suspend=True), []).reason == "Suspended"


def _waiting_pod(*, node: str | None = "n", waiting: tuple[str, str] | None = None,
                 scheduled: tuple[str, str] | None = None, image: str = "registry.local/merge:1") -> dict:
    status: dict = {"phase": "Pending"}
    if waiting:
        status["containerStatuses"] = [{"name": "merge", "image": image,
                                        "state": {"waiting": {"reason": waiting[0], "message": waiting[1]}}}]
    if scheduled:
        status["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": scheduled[0],
                                 "message": scheduled[1]}]
    return {"metadata": {"name": "p"}, "spec": {"nodeName": node} if node else {}, "status": status}


def test_pods_that_cannot_start_are_reported_with_their_cause():
    job = _job(active=1, ready=0)
    pull = observe(job, [_waiting_pod(waiting=("ErrImagePull", 'failed to pull image "registry.local/merge:1": '
                                                               "not found"))])
    assert (pull.phase, pull.reason, pull.message) == (
        Phase.Pending, "ErrImagePull", 'failed to pull image "registry.local/merge:1": not found')
    backoff = observe(job, [_waiting_pod(waiting=("ImagePullBackOff", "Back-off pulling image"))])
    assert (backoff.reason, backoff.message) == ("ImagePullBackOff",
                                                 "image registry.local/merge:1: Back-off pulling image")
    config = observe(job, [_waiting_pod(waiting=("CreateContainerConfigError", 'secret "hf" not found'))])
    assert (config.reason, config.message) == ("CreateContainerConfigError", 'secret "hf" not found')
    unschedulable = ("Unschedulable", "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.")
    gpu = observe(job, [_waiting_pod(node=None, scheduled=unschedulable)])
    assert (gpu.phase, gpu.reason, gpu.message) == (Phase.Pending, *unschedulable)
    claim = observe(job, [_waiting_pod(node=None, scheduled=unschedulable)], missing_claims=["no claim"])
    assert (claim.reason, claim.message) == ("ClaimNotFound", "no claim")
    bound = observe(job, [_waiting_pod()], missing_claims=["no claim"])  # bound: the claim was there
    assert (bound.reason, bound.message) == ("PodPending", "waiting for the merge pod to start")
    creating = observe(job, [_waiting_pod(waiting=("ContainerCreating", ""))])
    assert creating.reason == "PodPending"
    assert observe(job, []).reason == "PodPending"


def test_a_deadline_while_the_pod_never_started_says_why():
    stuck = build_status({}, Observation(Phase.Pending, "ImagePullBackOff", "image x: Back-off pulling image"),
                         now="t1", generation=1, job_name="j")
    failed = build_status(stuck, Observation(Phase.Failed, "DeadlineExceeded", "Job was active longer than "
                                             "specified deadline"), now="t2", generation=1)
    assert failed["message"] == ("Job was active longer than specified deadline; the merge pod never started: "
                                 "image x: Back-off pulling image")
    assert failed["reason"] == "DeadlineExceeded"


def test_conditions_keep_their_transition_time():
    running = build_status({}, Observation(Phase.Running, "Running"), now="t1", generation=1, job_name="j")
    again = build_status(running, Observation(Phase.Running, "Running"), now="t2", generation=1)
    assert not status_changed(running, again)
    assert {c["type"]: c["lastTransitionTime"] for c in again["conditions"]} == {"Accepted": "t1",
                                                                                "Running": "t1"}
    done = build_status(again, Observation(Phase.Succeeded, "Completed", "ok"), now="t3", generation=1)
    times = {c["type"]: (c["status"], c["lastTransitionTime"]) for c in done["conditions"]}
    assert times == {"Accepted": ("True", "t1"), "Running": ("False", "t3"), "Complete": ("True", "t3")}
    assert done["jobName"] == "j" and status_changed(again, done)
    assert merge_conditions(None, [{"type": "A", "status": "True"}], "t")[0]["lastTransitionTime"] == "t"


# ---------------------------------------------------------------------------------------------------------
# Reconciler against a fake API
# ---------------------------------------------------------------------------------------------------------


class FakeKube:
    def __init__(self):
        self.objects: dict[tuple[str, str], dict] = {}
        self.statuses: list[tuple[str, dict]] = []
        self.pods: list[dict] = []
        self.deleted: list[str] = []
        self.claims: set[str] = {"models"}
        self.log_tail = ""

    def create_or_get(self, kind, manifest):
        key = (kind, manifest["metadata"]["name"])
        if key in self.objects:
            return self.objects[key], False
        self.objects[key] = {**manifest, "kind": kind}
        return self.objects[key], True

    def read_job(self, namespace, name):
        return self.objects.get(("Job", name))

    def delete_job(self, namespace, name, uid=None):
        self.deleted.append(name)
        return self.objects.pop(("Job", name), None) is not None

    def job_pods(self, namespace, job_name):
        return self.pods

    def pod_log_tail(self, namespace, pod, container, lines=20):
        return self.log_tail

    def claim_exists(self, namespace, name):
        return name in self.claims

    def patch_status(self, namespace, name, status):
        self.statuses.append((name, status))
        return True


@pytest.fixture
def world():
    kube, events = FakeKube(), []
    rec = Reconciler(kube, CONFIG, lambda obj, type_, reason, message: events.append((type_, reason, message)))
    return rec, kube, events


def _created(world, job_status: dict, **spec) -> tuple[dict, dict]:
    """A ModelMerge created through the world's Reconciler, and its Job, given `job_status`."""
    rec, kube, _ = world
    body = _body(**spec)
    rec.create(body)
    job = kube.objects[("Job", "llama-merge-merge")]
    job["status"] = job_status
    return body, job


def _with_status(body: dict, rec: Reconciler) -> dict:
    return {**body, "status": rec.current_status(body)}


def test_create_writes_pending_then_creates_config_map_and_job_once(world):
    rec, kube, events = world
    body = _body()
    rec.create(body)
    assert set(kube.objects) == {("ConfigMap", "llama-merge-merge"), ("Job", "llama-merge-merge")}
    (name, status), = kube.statuses
    assert (status["phase"], status["jobName"], status["outputPath"]) == (
        "Pending", "llama-merge-merge", "pvc://models/llama-merge")
    assert [e[1] for e in events] == ["Creating", "JobCreated"]
    rec.create(_with_status(body, rec))  # the handler re-run after an operator restart
    assert len(kube.objects) == 2 and len(kube.statuses) == 1 and len(events) == 2


def test_create_refuses_objects_of_another_owner(world):
    rec, kube, _ = world
    rec.create(_body(uid="old"))
    with pytest.raises(kopf.TemporaryError, match="belongs to another owner"):
        rec.create(_body(uid="new"))


def test_invalid_spec_is_a_permanent_error_and_creates_nothing(world):
    rec, kube, events = world
    body = _body(exclude_param_names_regex=["(unclosed"])
    with pytest.raises(kopf.PermanentError, match="exclude_param_names_regex"):
        rec.create(body)
    assert kube.objects == {}
    status = kube.statuses[-1][1]
    assert (status["phase"], status["reason"]) == ("Failed", "InvalidSpec")
    assert "invalid regular expression" in status["message"]
    accepted = {c["type"]: c for c in status["conditions"]}["Accepted"]
    assert accepted["status"] == "False" and accepted["reason"] == "InvalidSpec"
    assert events[-1][:2] == ("Warning", "InvalidSpec")


def _running_pod(name: str = "p") -> dict:
    return {"metadata": {"name": name}, "spec": {"nodeName": "n"}, "status": {"phase": "Running"}}


def _progress_line(step: str, index: int, steps: int, percent: float) -> str:
    return MergeProgress(percent=percent, step=step, stepIndex=index, steps=steps, stepPercent=50.0).line("1/2")


def test_job_events_drive_the_status_and_stop_at_a_terminal_phase(world):
    rec, kube, events = world
    body = _body()
    rec.create(body)
    assert [mm["metadata"]["name"] for mm in rec.active()] == ["llama-merge"]  # Pending with a Job
    job = kube.objects[("Job", "llama-merge-merge")]
    job["status"] = {"active": 1, "ready": 1, "startTime": "t0"}
    rec.job_event("MODIFIED", job, body)
    assert kube.statuses[-1][1]["phase"] == "Running" and kube.statuses[-1][1]["startTime"] == "t0"
    meta = job["metadata"]
    kube.pods = [_pod("Succeeded", json.dumps({"status": "succeeded", "tensors": 3}), "Completed", exit_code=0)]
    rec.job_event("MODIFIED", {**_job(succeeded=1, conditions=[("Complete", "", "")]), "metadata": meta}, body)
    final = kube.statuses[-1][1]
    assert (final["phase"], final["progress"]["text"], final["message"]) == (
        "Succeeded", "merge 1/1 100%", "merged 3 tensors")
    assert rec.active() == []
    count = len(kube.statuses)
    rec.job_event("DELETED", {**_job(), "metadata": meta}, body)  # e.g. its TTL ran out
    rec.write(body, Observation(Phase.Running, "Running"))  # nothing changes a terminal status
    assert len(kube.statuses) == count
    assert [e[1] for e in events] == ["Creating", "JobCreated", "Running", "Completed"]


def test_resync_reads_progress_through_the_one_writer_and_never_lowers_it(world):
    rec, kube, events = world
    body, job = _created(world, {"active": 1, "ready": 1})
    kube.pods = [_running_pod()]
    kube.log_tail = "merging\n" + _progress_line("thresholds", 1, 3, 20.0)
    rec.resync(body)
    status = kube.statuses[-1][1]
    assert status["phase"] == "Running" and status["conditions"]  # a whole status, not a progress side patch
    assert status["progress"] == {"percent": 20.0, "step": "thresholds", "stepIndex": 1, "steps": 3,
                                  "stepPercent": 50.0, "text": "thresholds 1/3 20%"}
    kube.log_tail = _progress_line("signs", 2, 3, 45.5) + "\n"
    rec.resync(body)
    assert kube.statuses[-1][1]["progress"]["text"] == "signs 2/3 46%"
    count = len(kube.statuses)
    kube.log_tail = _progress_line("thresholds", 1, 3, 10.0)  # an older line: progress never goes down
    rec.resync(body)
    kube.log_tail = "no progress line in this tail"
    rec.resync(body)
    assert len(kube.statuses) == count
    job["status"] = {"active": 1, "ready": 0, "failed": 1}  # the pod failed: a new attempt starts from its own
    kube.pods = [_running_pod("p2"), _pod("Failed", json.dumps({"status": "failed", "error": "disk full"}))]
    kube.log_tail = _progress_line("thresholds", 1, 3, 5.0)
    rec.resync(body)
    status = kube.statuses[-1][1]
    assert (status["reason"], status["attempts"], status["progress"]["percent"]) == ("Retrying", 2, 5.0)
    assert [e[:2] for e in events][-2:] == [("Normal", "Running"), ("Warning", "Retrying")]
    job["status"] = {"succeeded": 1, "failed": 1, "conditions": [{"type": "Complete", "status": "True"}]}
    rec.resync(body)
    assert kube.statuses[-1][1]["progress"]["text"] == "merge 3/3 100%"


def test_resync_leaves_finished_cancelled_and_foreign_merges_alone(world):
    rec, kube, _ = world
    body = _body()
    rec.create(body)
    count = len(kube.statuses)
    rec.resync({**body, "spec": {**body["spec"], "cancel": True}})
    kube.objects[("Job", "llama-merge-merge")]["metadata"]["ownerReferences"][0]["uid"] = "someone-else"
    rec.resync(body)
    kube.objects.pop(("Job", "llama-merge-merge"))
    rec.resync(body)  # a deleted Job is reported by its DELETED event, not here
    assert len(kube.statuses) == count


def test_resync_reports_pods_that_cannot_start_once_per_cause(world):
    rec, kube, events = world
    body, job = _created(world, {"active": 1, "ready": 0}, modelCache={"pvc": "hf-cache"})
    kube.pods = [_waiting_pod(node=None)]
    rec.resync(body)
    status = kube.statuses[-1][1]
    assert (status["phase"], status["reason"]) == ("Pending", "ClaimNotFound")
    assert status["message"] == ("PersistentVolumeClaim 'hf-cache' (spec.modelCache.pvc) does not exist in "
                                 "namespace team-a")
    assert events[-1] == ("Warning", "ClaimNotFound", f"Pending: {status['message']}")
    kube.claims.add("hf-cache")
    kube.pods = [_waiting_pod(waiting=("ErrImagePull", "not found"))]
    rec.resync(body)
    kube.pods = [_waiting_pod(waiting=("ImagePullBackOff", "Back-off pulling image"))]
    rec.resync(body)
    kube.pods = [_waiting_pod(waiting=("ErrImagePull", "not found"))]
    rec.resync(body)
    assert [s["reason"] for _, s in kube.statuses[-3:]] == ["ErrImagePull", "ImagePullBackOff", "ErrImagePull"]
    assert [e[1] for e in events if e[0] == "Warning"] == ["ClaimNotFound", "ErrImagePull"]  # one per cause
    kube.pods = [_running_pod()]
    job["status"] = {"active": 1, "ready": 1}
    rec.resync(body)
    assert (kube.statuses[-1][1]["phase"], events[-1][:2]) == ("Running", ("Normal", "Running"))


def test_job_deleted_by_hand_is_reported_not_recreated(world):
    rec, kube, events = world
    body = _body()
    rec.create(body)
    meta = kube.objects.pop(("Job", "llama-merge-merge"))["metadata"]
    rec.job_event("DELETED", {**_job(active=1), "metadata": meta}, body)
    status = kube.statuses[-1][1]
    assert (status["phase"], status["reason"]) == ("Failed", "JobDeleted")
    assert ("Job", "llama-merge-merge") not in kube.objects
    assert events[-1][:2] == ("Warning", "JobDeleted")
    rec.create(_with_status(body, rec))  # even a re-run create handler leaves it alone
    assert ("Job", "llama-merge-merge") not in kube.objects


def test_job_deleted_right_after_finishing_reports_the_outcome(world):
    rec, kube, _ = world
    body = _body()
    rec.create(body)
    meta = kube.objects[("Job", "llama-merge-merge")]["metadata"]
    rec.job_event("DELETED", {**_job(succeeded=1, conditions=[("Complete", "", "")]), "metadata": meta}, body)
    assert kube.statuses[-1][1]["phase"] == "Succeeded"


def test_events_of_foreign_or_unknown_jobs_are_ignored(world):
    rec, kube, _ = world
    body = _body()
    rec.create(body)
    meta = kube.objects[("Job", "llama-merge-merge")]["metadata"]
    count = len(kube.statuses)
    rec.job_event("MODIFIED", {**_job(active=1, ready=1), "metadata": meta}, None)
    rec.job_event("MODIFIED", {**_job(active=1, ready=1), "metadata": meta}, _body(uid="other"))
    rec.job_event("MODIFIED", {**_job(active=1, ready=1), "metadata": meta},
                  {**body, "metadata": {**body["metadata"], "deletionTimestamp": "t"}})
    assert len(kube.statuses) == count


def test_cancel_deletes_the_job_and_wins_over_later_job_events(world):
    rec, kube, events = world
    body = _body()
    rec.create(body)
    meta = kube.objects[("Job", "llama-merge-merge")]["metadata"]
    cancelled = {**body, "spec": {**body["spec"], "cancel": True}}
    rec.cancel(cancelled)
    assert kube.deleted == ["llama-merge-merge"] and ("Job", "llama-merge-merge") not in kube.objects
    status = kube.statuses[-1][1]
    assert (status["phase"], status["reason"]) == ("Cancelled", "Cancelled")
    assert {c["type"]: c["status"] for c in status["conditions"]}["Cancelled"] == "True"
    count = len(kube.statuses)
    rec.job_event("DELETED", {**_job(active=1), "metadata": meta}, cancelled)
    rec.cancel(cancelled)
    assert len(kube.statuses) == count and events[-1][1] == "Cancelled"


def test_cancel_at_creation_makes_no_job(world):
    rec, kube, _ = world
    rec.create(_body(cancel=True))
    assert ("Job", "llama-merge-merge") not in kube.objects
    assert kube.statuses[-1][1]["phase"] == "Cancelled"


def test_resume_reports_a_job_that_vanished_while_the_operator_was_down(world):
    rec, kube, _ = world
    body = _body()
    rec.create(body)
    kube.objects.pop(("Job", "llama-merge-merge"))
    fresh = Reconciler(kube, CONFIG, lambda *a: None)  # a restarted operator remembers nothing
    fresh.resume(_with_status(body, rec))
    assert kube.statuses[-1][1]["reason"] == "JobDeleted"
    assert ("Job", "llama-merge-merge") not in kube.objects


def test_resume_syncs_from_an_existing_job(world):
    rec, kube, _ = world
    body, _ = _created(world, {"active": 1, "ready": 1})
    fresh = Reconciler(kube, CONFIG, lambda *a: None)
    fresh.resume(_with_status(body, rec))
    assert kube.statuses[-1][1]["phase"] == "Running"


@pytest.mark.parametrize("argv, expected", [
    (["-n", "a", "-n", "b", "--standalone"], {"clusterwide": False, "namespaces": ["a", "b"], "standalone": True}),
    ([], {"clusterwide": True, "namespaces": []}),
    (["-n", "a", "--all-namespaces"], {"clusterwide": True, "namespaces": []}),
    (["--peering", "modelmerge", "--priority", "7"], {"clusterwide": True, "peering_name": "modelmerge",
                                                      "priority": 7}),
])
def test_run_operator_passes_scope_peering_and_liveness_to_kopf(monkeypatch, argv, expected):
    from modelmerge_operator import main

    calls = []
    monkeypatch.setattr(kopf, "run", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(kopf, "configure", lambda **kwargs: None)
    args = build_parser().parse_args(["operator", "--liveness", "http://0.0.0.0:9090/healthz", *argv])
    assert main.run_operator(args) == 0
    (kwargs,) = calls
    assert {k: kwargs[k] for k in expected} == expected
    assert kwargs["liveness_endpoint"] == "http://0.0.0.0:9090/healthz"
    assert isinstance(kwargs["memo"]["config"], OperatorConfig)


def test_rbac_rules_cover_what_the_operator_calls():
    from modelmerge_operator import rbac

    def allowed(group: str, resource: str, verb: str) -> bool:
        return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]
                   for r in rbac.NAMESPACE_RULES + rbac.CLUSTER_RULES)

    for group, resource, verb in [("modelmerge.io", "modelmerges", "watch"), ("modelmerge.io",
                                  "modelmerges/status", "patch"), ("batch", "jobs", "create"),
                                  ("batch", "jobs", "delete"), ("", "configmaps", "create"), ("", "pods", "list"),
                                  ("", "events", "create"), ("kopf.dev", "kopfpeerings", "patch"),
                                  ("", "persistentvolumeclaims", "get"), ("", "pods/log", "get")]:
        assert allowed(group, resource, verb), (group, resource, verb)
    kinds = [m["kind"] for m in rbac.manifests("mm", "op", "system", ["a", "b"])]
    assert kinds == ["ClusterRole", "ClusterRole", "ClusterRoleBinding", "RoleBinding", "RoleBinding"]
    assert [m["kind"] for m in rbac.manifests("mm", "op", "system", None)][-1] == "ClusterRoleBinding"


def test_kopf_logs_in_with_the_operators_kubeconfig_without_touching_the_global_configuration(tmp_path):
    from kubernetes import client

    from modelmerge_operator import handlers

    path = tmp_path / "config"
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: c, cluster: {server: 'https://api.example:6443', insecure-skip-tls-verify: true}}]\n"
        "users: [{name: u, user: {token: secret-token}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\n")
    before = client.Configuration.get_default_copy().host
    info = handlers.login(memo=kopf.Memo(kubeconfig=str(path)))
    assert (info.server, info.scheme, info.token, info.insecure) == (
        "https://api.example:6443", "Bearer", "secret-token", True)
    assert client.Configuration.get_default_copy().host == before
