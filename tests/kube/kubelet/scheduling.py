"""The scheduler's part of the harness: binding unscheduled pods to its Node when their requests fit what the
Node has free, and marking the others ``PodScheduled=False``/``Unschedulable`` with the scheduler's message
(e.g. ``0/1 nodes are available: 1 Insufficient nvidia.com/gpu.``) until a pod ends and frees resources.
nodeSelector, affinity and taints are not considered."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.kube.kubelet.status import StatusReporter

log = logging.getLogger(__name__)

DEFAULT_CAPACITY = {
    "cpu": "16",
    "memory": "64Gi",
    "pods": "110",
    "ephemeral-storage": "200Gi",
    "nvidia.com/gpu": "8",
}
_SUFFIX = {
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
}


def parse_quantity(quantity: str | int | float) -> float:
    """A Kubernetes quantity ("500m", "2Gi", "8") as a float."""
    m = re.fullmatch(r"([0-9.eE+-]+?)([a-zA-Z]{0,2})", str(quantity).strip())
    if not m or (m.group(2) and m.group(2) not in _SUFFIX):
        raise ValueError(f"bad quantity {quantity!r}")
    return float(m.group(1)) * _SUFFIX.get(m.group(2), 1.0)


def pod_requests(pod: dict[str, Any]) -> dict[str, float]:
    """Summed requests of a pod's containers (limits stand in for missing requests, as the API defaults)."""
    total: dict[str, float] = {}
    for c in pod["spec"].get("containers", []):
        resources = c.get("resources") or {}
        for key, value in {**(resources.get("limits") or {}), **(resources.get("requests") or {})}.items():
            total[key] = total.get(key, 0.0) + parse_quantity(value)
    return total


class Scheduler:
    """Binds pods to ``node_name`` within ``capacity``; :meth:`reserve` / :meth:`release` account for the pods
    on the Node. ``list_unbound`` lists the pods the harness watches that have no node yet."""

    def __init__(
        self,
        core: client.CoreV1Api,
        reporter: StatusReporter,
        *,
        node_name: str,
        capacity: dict[str, str],
        list_unbound: Callable[[], list[dict[str, Any]]],
    ) -> None:
        self.core = core
        self.reporter = reporter
        self.node_name = node_name
        self.capacity = {key: parse_quantity(value) for key, value in capacity.items()}
        self.list_unbound = list_unbound
        self._lock = threading.Lock()
        self._reserved: dict[str, dict[str, float]] = {}  # pod uid -> its requests
        self._unschedulable: set[str] = set()  # uids already reported Unschedulable

    def reserve(self, pod: dict[str, Any]) -> None:
        """Counts a pod bound to the Node against its capacity (idempotent)."""
        with self._lock:
            self._reserved.setdefault(pod["metadata"]["uid"], pod_requests(pod))

    def release(self, uid: str) -> None:
        """The pod has ended: frees its resources and tries the unschedulable pods again."""
        with self._lock:
            self._reserved.pop(uid, None)
            retry = bool(self._unschedulable)
            self._unschedulable.clear()
        if retry:
            try:
                pods = self.list_unbound()
            except ApiException as e:
                log.warning("kubelet harness: listing unscheduled pods: %s", e.status)
                return
            for pod in pods:
                if not pod["metadata"].get("deletionTimestamp"):
                    self.schedule(pod)

    def schedule(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        with self._lock:
            if meta["uid"] in self._reserved:
                return  # bound already; the watch has not shown it yet
            short = self._shortages(pod_requests(pod))
            if short:
                first_report = meta["uid"] not in self._unschedulable
                self._unschedulable.add(meta["uid"])
            else:
                self._unschedulable.discard(meta["uid"])
                self._reserved[meta["uid"]] = pod_requests(pod)  # counted right away, before the pod runs
        if short:
            if first_report:
                message = "0/1 nodes are available: " + ", ".join(f"1 Insufficient {k}" for k in short) + "."
                self.reporter.unschedulable(meta["namespace"], meta["name"], message)
            return
        binding = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": meta["name"]},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name},
        }
        try:
            self.core.create_namespaced_pod_binding(meta["name"], meta["namespace"], binding, _preload_content=False)
        except ApiException as e:
            with self._lock:
                self._reserved.pop(meta["uid"], None)
            if e.status not in (404, 409):  # gone, or bound by someone else meanwhile
                log.warning("kubelet harness: binding %s/%s failed: %s", meta["namespace"], meta["name"], e)

    def _shortages(self, requests: dict[str, float]) -> list[str]:
        free = dict(self.capacity)
        for reserved in self._reserved.values():
            for key, value in reserved.items():
                free[key] = free.get(key, 0.0) - value
        free["pods"] = free.get("pods", 0.0) - len(self._reserved)
        short = sorted(key for key, value in requests.items() if value > free.get(key, 0.0) + 1e-9)
        if free["pods"] < 1:
            short.append("pods")
        return short
