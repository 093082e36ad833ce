"""What the operator does for each event, on plain dicts, with the API behind a small `Kube` object (a fake
in the unit tests). The kopf handlers in `handlers.py` only unwrap kopf's arguments and call these methods.

One status writer: every change of a ModelMerge's status, from any source (the create, cancel and resume handlers,
the Job's events, the periodic resync of active merges), goes through `Reconciler.write`: build the status from an
observation (status.build_status), diff it against the last one written, persist it (a merge patch of the status
subresource) and announce it (an event). Writes of one ModelMerge are serialised, and a status in a terminal phase
is never changed again. The resync (every --resync-interval seconds) reads each active merge's Job and pods and
the running pod's log tail: that is where progress and pods that cannot start come from, as neither changes the
Job.

Observed state -> phase, reason, event (N Normal, W Warning; an event is posted when the phase changes, or when
the reason changes to a warning one):

| observed                                              | phase     | reason                                  | event |
| ----------------------------------------------------- | --------- | --------------------------------------- | ----- |
| spec fails validation (what the CRD cannot check)     | Failed    | InvalidSpec                             | W     |
| ModelMerge accepted, Job being created                | Pending   | Creating                                | N     |
| Job created, no pod yet                               | Pending   | JobCreated                              | -     |
| Job suspended (queueName: waiting for Kueue)          | Pending   | Queued, Suspended                       | -     |
| pod created, not running yet                          | Pending   | PodPending                              | -     |
| the pod's image cannot be pulled (message names it)   | Pending   | ErrImagePull, ImagePullBackOff,         | W     |
|                                                       |           | InvalidImageName, ErrImageNeverPull     |       |
| the container cannot be created (a missing Secret)    | Pending   | CreateContainerConfigError,             | W     |
|                                                       |           | CreateContainerError, RunContainerError |       |
| pod not bound to a node, a claim of the spec missing  | Pending   | ClaimNotFound                           | W     |
| no node fits (scheduler: Insufficient nvidia.com/gpu) | Pending   | Unschedulable                           | W     |
| pod running (progress from its log)                   | Running   | Running                                 | N     |
| a pod failed, the Job retries                         | Running   | Retrying                                | W     |
| Job Complete (progress 100%)                          | Succeeded | Completed                               | N     |
| ... with spec.evaluation: the summary's evaluation    | Succeeded | Evaluated (condition Evaluated True)    | N     |
| ... whose evaluation failed (the output stays)        | Succeeded | EvaluationFailed (Evaluated False)      | W     |
| Job Failed: the container ran out of memory           | Failed    | OOMKilled                               | W     |
| Job Failed: the engine's error, deadline, retries     | Failed    | the Job's reason: BackoffLimitExceeded, | W     |
|                                                       |           | DeadlineExceeded, PodFailurePolicy      |       |
| Job deleted before it finished                        | Failed    | JobDeleted                              | W     |
| spec.cancel set                                       | Cancelled | Cancelled                               | N     |

status.evaluation is the engine summary's evaluation (the overall cross-entropy is the CE printer column); the
Evaluated rows are events besides the Completed one, with the reason as the event's reason (the phase's reason stays
Completed).

A pod that cannot start keeps the merge Pending (the cause may clear up: an image pushed, a GPU freed, a claim
created); spec.activeDeadlineSeconds bounds the wait, and the Failed message then says why the pod never started.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import kopf
from pydantic import ValidationError

from modelmerge.contract import (
    KIND,
    TERMINAL_PHASES,
    MergeEvaluation,
    MergeProgress,
    ModelMergeSpec,
    Phase,
    format_validation_error,
    output_location,
    parse_progress,
)
from modelmerge_operator import manifests
from modelmerge_operator.config import OperatorConfig
from modelmerge_operator.kube import Kube
from modelmerge_operator.status import (
    WARNING_REASONS,
    Observation,
    awaits_a_node,
    build_status,
    evaluation_sentence,
    needs_pods,
    observe,
    running_pod,
    status_changed,
    true_conditions,
)

log = logging.getLogger(__name__)

Emit = Callable[[dict[str, Any], str, str, str], None]  # (object, type, reason, message)
CACHE_SIZE = 10_000
WRITE_LOCK_STRIPES = 64  # writes of one ModelMerge are serialised; of different ones mostly not
# Causes a kubelet alternates between while it retries: one announcement for the pair.
_SAME_CAUSE = {"ImagePullBackOff": "ErrImagePull"}


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def owner_of(job: dict[str, Any]) -> dict[str, Any] | None:
    """The ModelMerge owner reference of a Job (the controller reference), if any."""
    for ref in job.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == KIND and ref.get("controller"):
            return ref
    return None


def _cause(reason: str | None) -> str | None:
    return _SAME_CAUSE.get(reason or "", reason)


def is_terminal(status: dict[str, Any] | None) -> bool:
    return (status or {}).get("phase") in TERMINAL_PHASES


class Reconciler:
    def __init__(self, kube: Kube, config: OperatorConfig, emit: Emit):
        self.kube = kube
        self.config = config
        self.emit = emit
        self._written: OrderedDict[str, dict[str, Any]] = OrderedDict()  # uid -> last status written
        self._active: dict[str, dict[str, Any]] = {}  # uid -> ModelMerge with a Job and no terminal phase
        self._lock = threading.Lock()
        self._write_locks = [threading.Lock() for _ in range(WRITE_LOCK_STRIPES)]

    # -- the one status writer: build -> diff -> persist -> announce ----------------------------------------
    def current_status(self, body: dict[str, Any]) -> dict[str, Any]:
        """The last status this process wrote, else the object's (the watch may lag behind our own writes)."""
        with self._lock:
            written = self._written.get(body["metadata"]["uid"])
        return written if written is not None else dict(body.get("status") or {})

    def write(self, body: dict[str, Any], obs: Observation, *, job_name: str | None = None,
              output_path: str | None = None, accepted: bool = True) -> bool:
        """Writes the status for `obs` when it changes anything and the status is not terminal yet; announces
        the change with an event when the phase changes or the reason becomes a warning one."""
        meta = body["metadata"]
        with self._write_locks[hash(meta["uid"]) % WRITE_LOCK_STRIPES]:
            old = self.current_status(body)
            if is_terminal(old):
                self._track(body, old)
                return False
            new = build_status(old, obs, now=now(), generation=meta.get("generation"), job_name=job_name,
                               output_path=output_path, accepted=accepted)
            self._track(body, new)
            if not status_changed(old, new) or not self.kube.patch_status(meta["namespace"], meta["name"], new):
                return False
            with self._lock:
                self._written[meta["uid"]] = new
                self._written.move_to_end(meta["uid"])
                while len(self._written) > CACHE_SIZE:
                    self._written.popitem(last=False)
        self._announce(body, old, new)
        return True

    def _announce(self, body: dict[str, Any], old: dict[str, Any], new: dict[str, Any]) -> None:
        self._announce_phase(body, old, new)
        if new.get("evaluation") and not old.get("evaluation"):
            evaluation = MergeEvaluation.model_validate(new["evaluation"])
            succeeded = evaluation.state == "Succeeded"
            self.emit(body, "Normal" if succeeded else "Warning", "Evaluated" if succeeded else "EvaluationFailed",
                      evaluation_sentence(evaluation))

    def _announce_phase(self, body: dict[str, Any], old: dict[str, Any], new: dict[str, Any]) -> None:
        phase, reason, message = new["phase"], new["reason"], new.get("message")
        new_cause = reason in WARNING_REASONS and _cause(reason) != _cause(old.get("reason"))
        if phase == old.get("phase") and not new_cause:
            return
        kind = "Warning" if phase == Phase.Failed or reason in WARNING_REASONS else "Normal"
        self.emit(body, kind, reason, f"{phase}: {message}" if message else phase)

    # -- ModelMerge created (or its create handler re-run after a restart) ----------------------------------
    def parse(self, body: dict[str, Any]) -> ModelMergeSpec:
        """The spec, or a permanent error (after marking the ModelMerge Failed) when it is invalid."""
        try:
            return ModelMergeSpec.model_validate(body.get("spec") or {})
        except ValidationError as exc:
            message = "invalid spec: " + format_validation_error(exc)
            self.write(body, Observation(Phase.Failed, "InvalidSpec", message, completion_time=now()),
                       accepted=False)
            raise kopf.PermanentError(message) from None

    def create(self, body: dict[str, Any]) -> None:
        if is_terminal(self.current_status(body)):
            return
        spec = self.parse(body)
        if spec.cancel:
            self.cancel(body)
            return
        name = body["metadata"]["name"]
        job_name = manifests.job_name(name)
        if not self.current_status(body).get("phase"):
            self.write(body, Observation(Phase.Pending, "Creating", "creating the merge Job"),
                       job_name=job_name, output_path=output_location(spec, name).uri)
        config_map, _ = self.kube.create_or_get("ConfigMap", manifests.config_map(body, spec))
        self._check_owner(config_map, body)
        job, created = self.kube.create_or_get("Job", manifests.job(body, spec, self.config))
        self._check_owner(job, body)
        if created:
            self.emit(body, "Normal", "JobCreated", f"created Job {job_name}")

    @staticmethod
    def _check_owner(obj: dict[str, Any], body: dict[str, Any]) -> None:
        refs = obj["metadata"].get("ownerReferences") or []
        if not any(ref.get("uid") == body["metadata"]["uid"] for ref in refs):
            raise kopf.TemporaryError(
                f"{obj.get('kind', 'object')} {obj['metadata']['name']} belongs to another owner (a deleted "
                "ModelMerge of the same name?); waiting for the garbage collector to remove it", delay=10)

    # -- the Job changed or went away -----------------------------------------------------------------------
    def job_event(self, event_type: str | None, job: dict[str, Any], mm: dict[str, Any] | None) -> None:
        owner = owner_of(job)
        if mm is None or owner is None or owner.get("uid") != mm["metadata"]["uid"]:
            return
        if is_terminal(self.current_status(mm)) or (mm.get("spec") or {}).get("cancel"):
            return  # finished, or cancelled (the cancel handler reports that)
        if mm["metadata"].get("deletionTimestamp"):
            return
        finished = {"Complete", "Failed"} & set(true_conditions(job))
        if event_type == "DELETED" and not finished:
            self.job_gone(mm, job["metadata"]["name"])
            return
        self.sync(mm, job)

    def sync(self, mm: dict[str, Any], job: dict[str, Any], *, inspect_pods: bool = False) -> None:
        """Status from the Job, and from its pods when its events need them (`needs_pods`). `inspect_pods` (the
        resync) always reads the pods, the running pod's progress and, while a pod waits for a node, whether
        the spec's claims exist."""
        meta = job["metadata"]
        pods = self.kube.job_pods(meta["namespace"], meta["name"]) if inspect_pods or needs_pods(job) else []
        spec = mm.get("spec") or {}
        progress = missing = None
        if inspect_pods:
            progress = self._progress(meta["namespace"], pods)
            missing = self._missing_claims(meta["namespace"], spec) if awaits_a_node(pods) else None
        obs = observe(job, pods, spec.get("queueName"), progress=progress, missing_claims=missing,
                      evaluated=bool(spec.get("evaluation")))
        self.write(mm, obs, job_name=meta["name"])

    def _missing_claims(self, namespace: str, spec: dict[str, Any]) -> list[str]:
        claims = [(field, (spec.get(field) or {}).get("pvc")) for field in ("output", "modelCache")]
        return [f"PersistentVolumeClaim {claim!r} (spec.{field}.pvc) does not exist in namespace {namespace}"
                for field, claim in claims if claim and not self.kube.claim_exists(namespace, claim)]

    def _progress(self, namespace: str, pods: list[dict[str, Any]]) -> MergeProgress | None:
        """The engine's last progress line in the running pod's log tail (best effort: no log, no progress)."""
        pod = running_pod(pods)
        if pod is None:
            return None
        try:
            return parse_progress(self.kube.pod_log_tail(namespace, pod["metadata"]["name"], manifests.CONTAINER))
        except Exception as exc:  # noqa: BLE001 - logs are a nicety: no kubelet, no progress
            log.debug("progress of %s/%s: %s", namespace, pod["metadata"]["name"], exc)
            return None

    def job_gone(self, mm: dict[str, Any], job_name: str) -> None:
        message = (f"Job {job_name} was deleted before the merge finished (by hand, or by its TTL while the "
                   "operator was not watching); it is not recreated: delete and re-create the ModelMerge to "
                   "run the merge again")
        self.write(mm, Observation(Phase.Failed, "JobDeleted", message, completion_time=now()))

    # -- cancel, resume, progress ---------------------------------------------------------------------------
    def cancel(self, body: dict[str, Any]) -> None:
        status = self.current_status(body)
        if is_terminal(status):
            return
        meta = body["metadata"]
        job_name = status.get("jobName") or manifests.job_name(meta["name"])
        deleted = self.kube.delete_job(meta["namespace"], job_name)
        message = f"cancelled by spec.cancel; Job {job_name} deleted" if deleted else "cancelled by spec.cancel"
        self.write(body, Observation(Phase.Cancelled, "Cancelled", message, completion_time=now()))

    def resume(self, body: dict[str, Any]) -> None:
        """At operator start: catch up with what happened while nobody watched."""
        status = self.current_status(body)
        if is_terminal(status) or not status.get("phase"):
            return
        if (body.get("spec") or {}).get("cancel"):
            self.cancel(body)
            return
        meta = body["metadata"]
        job_name = status.get("jobName") or manifests.job_name(meta["name"])
        job = self.kube.read_job(meta["namespace"], job_name)
        if job is None:
            self.job_gone(body, job_name)
        elif (owner_of(job) or {}).get("uid") == meta["uid"]:
            self.sync(body, job)

    # -- the periodic resync of active merges: one background thread, no per-object timers (those need finalizers)
    def active(self) -> list[dict[str, Any]]:
        """The ModelMerges this process last saw with a Job and not finished."""
        with self._lock:
            return list(self._active.values())

    def _track(self, body: dict[str, Any], status: dict[str, Any]) -> None:
        uid = body["metadata"]["uid"]
        with self._lock:
            if status.get("phase") in (Phase.Pending, Phase.Running) and status.get("jobName"):
                self._active[uid] = body
            else:
                self._active.pop(uid, None)

    def resync(self, body: dict[str, Any]) -> None:
        """Status from the Job, its pods and the running pod's log: progress, and pods that cannot start."""
        status = self.current_status(body)
        if is_terminal(status) or not status.get("jobName") or (body.get("spec") or {}).get("cancel"):
            return
        meta = body["metadata"]
        job = self.kube.read_job(meta["namespace"], status["jobName"])
        if job is not None and (owner_of(job) or {}).get("uid") == meta["uid"]:
            self.sync(body, job, inspect_pods=True)  # a deleted Job is reported by its DELETED event

    def poll(self, stop: threading.Event, interval: float) -> None:
        while not stop.wait(interval):
            for body in self.active():
                try:
                    self.resync(body)
                except Exception as exc:  # noqa: BLE001 - keep resyncing the others
                    meta = body["metadata"]
                    log.warning("resync of %s/%s: %s", meta["namespace"], meta["name"], exc)
