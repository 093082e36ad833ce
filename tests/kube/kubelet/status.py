"""Pod status as a kubelet reports it through ``pods/status``: phase, conditions, the container's state
(waiting / running / terminated with exit code, reason and termination message), so the real job controller
drives a Job's status from it; and the confirmation of a pod's deletion."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from modelmerge.kubeclient import merge_patch

log = logging.getLogger(__name__)

HOST_IP = "127.0.0.1"  # the harness's Node, and every pod on it


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def waiting(reason: str, message: str = "") -> dict[str, Any]:
    return {"waiting": {"reason": reason, "message": message} if message else {"reason": reason}}


def running(started_at: str) -> dict[str, Any]:
    return {"running": {"startedAt": started_at}}


def terminated(
    exit_code: int, *, started_at: str, message: str, container_id: str | None = None, reason: str | None = None
) -> dict[str, Any]:
    state: dict[str, Any] = {
        "exitCode": exit_code,
        "reason": reason or ("Completed" if exit_code == 0 else "Error"),
        "startedAt": started_at,
        "finishedAt": now(),
    }
    if container_id:
        state["containerID"] = container_id
    if message:
        state["message"] = message
    return {"terminated": state}


class StatusReporter:
    def __init__(self, core: client.CoreV1Api) -> None:
        self.core = core

    def report(
        self,
        pod: dict[str, Any],
        *,
        started: str,
        state: dict[str, Any],
        phase: str,
        container_id: str | None = None,
        reason: str | None = None,
        message: str | None = None,
    ) -> None:
        """The pod's status with its (one) container in ``state``; ``reason``/``message`` are the pod's own."""
        (container,) = pod["spec"]["containers"]
        ready = "running" in state
        container_status: dict[str, Any] = {
            "name": container["name"],
            "image": container.get("image", ""),
            "imageID": "",
            "ready": ready,
            "started": ready,
            "restartCount": 0,
            "state": state,
        }
        if container_id is not None:
            container_status["containerID"] = container_id
        done = phase in ("Succeeded", "Failed")
        transition = now()

        def condition(kind: str, ok: bool, why: str | None = None) -> dict[str, Any]:
            c = {"type": kind, "status": "True" if ok else "False", "lastTransitionTime": transition}
            return {**c, "reason": why} if why else c

        not_ready = "PodCompleted" if done else "ContainersNotReady"
        status: dict[str, Any] = {
            "phase": phase,
            "hostIP": HOST_IP,
            "hostIPs": [{"ip": HOST_IP}],
            "podIP": HOST_IP,
            "podIPs": [{"ip": HOST_IP}],
            "startTime": started,
            "conditions": [
                condition("PodReadyToStartContainers", not done),
                condition("Initialized", True, "PodCompleted" if done else None),
                condition("Ready", ready, None if ready else not_ready),
                condition("ContainersReady", ready, None if ready else not_ready),
                condition("PodScheduled", True),
            ],
            "containerStatuses": [container_status],
        }
        if reason:
            status.update(reason=reason, message=message or "")
        self._patch(pod["metadata"]["namespace"], pod["metadata"]["name"], status)

    def pod_phase(self, namespace: str, name: str, *, phase: str, reason: str, message: str) -> None:
        """The phase, reason and message of a pod whose container the harness could not run."""
        self._patch(namespace, name, {"phase": phase, "reason": reason, "message": message})

    def unschedulable(self, namespace: str, name: str, message: str) -> None:
        condition = {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": message,
            "lastTransitionTime": now(),
        }
        self._patch(namespace, name, {"conditions": [condition]})

    def confirm_deletion(self, namespace: str, name: str, uid: str) -> None:
        """Deletes the pod with grace period 0, as a kubelet does once its containers have stopped."""
        try:
            self.core.delete_namespaced_pod(
                name,
                namespace,
                grace_period_seconds=0,
                body={"gracePeriodSeconds": 0, "preconditions": {"uid": uid}},
                _preload_content=False,
            )
        except ApiException as e:
            if e.status not in (404, 409):
                log.warning("kubelet harness: deleting %s/%s: %s", namespace, name, e)

    def _patch(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        try:
            merge_patch(self.core.patch_namespaced_pod_status, name, namespace, {"status": status})
        except ApiException as e:
            if e.status != 404:
                log.warning("kubelet harness: status of %s/%s: %s", namespace, name, e.body)
