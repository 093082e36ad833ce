"""What the operator does for each event, on plain dicts, with the API behind a small `Kube` object (a fake
in the unit tests). The kopf handlers in `handlers.py` only unwrap kopf's arguments and call these methods.

Ownership of the status: the create handler writes the first Pending status before it creates the Job; after that
the Job's events (and the cancel/resume handlers) rewrite it from what the Job and its pods say. A status in a
terminal phase is never changed again."""

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
    Observation,
    build_status,
    needs_pods,
    observe,
    status_changed,
    true_conditions,
)

log = logging.getLogger(__name__)

Emit = Callable[[dict[str, Any], str, str, str], None]  # (object, type, reason, message)
CACHE_SIZE = 10_000


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def owner_of(job: dict[str, Any]) -> dict[str, Any] | None:
    """The ModelMerge owner reference of a Job (the controller reference), if any."""
    for ref in job.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == KIND and ref.get("controller"):
            return ref
    return None


def is_terminal(status: dict[str, Any] | None) -> bool:
    return (status or {}).get("phase") in TERMINAL_PHASES


class Reconciler:
    def __init__(self, kube: Kube, config: OperatorConfig, emit: Emit):
        self.kube = kube
        self.config = config
        self.emit = emit
        self._written: OrderedDict[str, dict[str, Any]] = OrderedDict()  # uid -> last status written
        self._running: dict[str, tuple[str, str, str, str]] = {}
        self._lock = threading.Lock()

    # -- status bookkeeping ---------------------------------------------------------------------------------
    def current_status(self, body: dict[str, Any]) -> dict[str, Any]:
        """The last status this process wrote, else the object's (the watch may lag behind our own writes)."""
        with self._lock:
            written = self._written.get(body["metadata"]["uid"])
        return written if written is not None else dict(body.get("status") or {})

    def write(self, body: dict[str, Any], obs: Observation, *, job_name: str | None = None,
              output_path: str | None = None, accepted: bool = True) -> bool:
        """Writes the status for `obs` when it changes anything; posts an event when the phase changes."""
        meta = body["metadata"]
        old = self.current_status(body)
        new = build_status(old, obs, now=now(), generation=meta.get("generation"), job_name=job_name,
                           output_path=output_path, accepted=accepted)
        self._track(body, new)
        if not status_changed(old, new):
            return False
        if not self.kube.patch_status(meta["namespace"], meta["name"], new):
            return False
        with self._lock:
            self._written[meta["uid"]] = new
            self._written.move_to_end(meta["uid"])
            while len(self._written) > CACHE_SIZE:
                self._written.popitem(last=False)
        retrying = obs.reason == "Retrying" and old.get("reason") != "Retrying"
        if new["phase"] != old.get("phase") or retrying:
            kind = "Warning" if new["phase"] == Phase.Failed or retrying else "Normal"
            self.emit(body, kind, obs.reason, f"{new['phase']}: {obs.message}" if obs.message else new["phase"])
        return True

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

    def sync(self, mm: dict[str, Any], job: dict[str, Any]) -> None:
        """Status from the Job (and its pods, when one failed or it finished)."""
        meta = job["metadata"]
        pods = self.kube.job_pods(meta["namespace"], meta["name"]) if needs_pods(job) else []
        spec = mm.get("spec") or {}
        self.write(mm, observe(job, pods, spec.get("queueName")), job_name=meta["name"])

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

    # -- progress of running merges: one background poller, no per-object timers (those need finalizers) ---
    def running(self) -> list[tuple[str, str, str, str]]:
        """(namespace, name, uid, jobName) of the merges this process last saw Running."""
        with self._lock:
            return list(self._running.values())

    def _track(self, body: dict[str, Any], status: dict[str, Any]) -> None:
        meta = body["metadata"]
        with self._lock:
            if status.get("phase") == Phase.Running and status.get("jobName"):
                self._running[meta["uid"]] = (meta["namespace"], meta["name"], meta["uid"], status["jobName"])
            else:
                self._running.pop(meta["uid"], None)

    def refresh_progress(self, namespace: str, name: str, uid: str, job_name: str) -> None:
        """Reads the running merge pod's log tail for the engine's last progress line (best effort)."""
        pods = [p for p in self.kube.job_pods(namespace, job_name)
                if (p.get("status") or {}).get("phase") == "Running"]
        if not pods:
            return
        try:
            tail = self.kube.pod_log_tail(namespace, pods[0]["metadata"]["name"], manifests.CONTAINER)
        except Exception as exc:  # noqa: BLE001 - logs are a nicety: no kubelet, no progress
            log.debug("progress of %s/%s: %s", namespace, name, exc)
            return
        parsed = parse_progress(tail)
        progress = parsed.model_dump() if parsed else None
        with self._lock:
            written = self._written.get(uid) or {}
        if progress and progress != written.get("progress") and written.get("phase") == Phase.Running:
            self.kube.patch_status(namespace, name, {"progress": progress})
            with self._lock:
                if uid in self._written:
                    self._written[uid] = {**self._written[uid], "progress": progress}

    def poll_progress(self, stop: threading.Event, interval: float) -> None:
        while not stop.wait(interval):
            for namespace, name, uid, job_name in self.running():
                try:
                    self.refresh_progress(namespace, name, uid, job_name)
                except Exception as exc:  # noqa: BLE001 - keep polling the others
                    log.debug("progress of %s/%s: %s", namespace, name, exc)
