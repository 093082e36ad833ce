"""The few Kubernetes API calls the operator makes, on plain dicts (no client model round trips). Each call is
idempotent or tolerant of the races an operator meets (409 on create, 404 on delete)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from modelmerge.contract import API_GROUP, API_VERSION, PLURAL
from modelmerge.kubeclient import merge_patch, pods_of_job, raw

log = logging.getLogger(__name__)

EVENT_MESSAGE_LIMIT = 1024
REPORTING_COMPONENT = "modelmerge-operator"


class Kube:
    def __init__(self, api: client.ApiClient, *, reporting_instance: str = REPORTING_COMPONENT):
        self.reporting_instance = reporting_instance
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    def create_or_get(self, kind: str, manifest: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Creates the object, or returns the existing one of the same name: (object, created)."""
        create, read = {
            "Job": (self.batch.create_namespaced_job, self.batch.read_namespaced_job),
            "ConfigMap": (self.core.create_namespaced_config_map, self.core.read_namespaced_config_map),
        }[kind]
        namespace = manifest["metadata"]["namespace"]
        try:
            return raw(create, namespace, manifest), True
        except ApiException as exc:
            if exc.status != 409:
                raise
        return raw(read, manifest["metadata"]["name"], namespace), False

    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return raw(self.batch.read_namespaced_job, name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def delete_job(self, namespace: str, name: str, uid: str | None = None) -> bool:
        """Deletes the Job and (in the background) its pods; False when it was already gone."""
        body: dict[str, Any] = {"propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            self.batch.delete_namespaced_job(name, namespace, body=body, _preload_content=False)
            return True
        except ApiException as exc:
            if exc.status in (404, 409):
                return False
            raise

    def job_pods(self, namespace: str, job_name: str) -> list[dict[str, Any]]:
        """Newest first."""
        return pods_of_job(self.core, namespace, job_name)

    def pod_log_tail(self, namespace: str, pod: str, container: str, lines: int = 20) -> str:
        response = self.core.read_namespaced_pod_log(pod, namespace, container=container, tail_lines=lines,
                                                     _preload_content=False, _request_timeout=10)
        return response.data.decode(errors="replace")

    def claim_exists(self, namespace: str, name: str) -> bool:
        """Whether PersistentVolumeClaim `name` exists (True when the operator may not look: it cannot tell)."""
        try:
            self.core.read_namespaced_persistent_volume_claim(name, namespace, _preload_content=False)
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            if exc.status == 403:
                return True
            raise

    def post_event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """Posts a core/v1 Event about `obj` (best effort, from any thread: kopf.event works only inside kopf's
        handlers, and the resync runs outside them)."""
        meta = obj["metadata"]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta["uid"]},
            "type": type_, "reason": reason, "message": message[:EVENT_MESSAGE_LIMIT],
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
            "source": {"component": REPORTING_COMPONENT},
            "reportingComponent": REPORTING_COMPONENT, "reportingInstance": self.reporting_instance,
        }
        try:
            self.core.create_namespaced_event(meta["namespace"], event, _preload_content=False)
        except ApiException as exc:
            log.warning("event %s for %s/%s not posted: %s", reason, meta["namespace"], meta["name"], exc.reason)

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> bool:
        """Merge-patches the ModelMerge's status subresource; False when the ModelMerge is gone."""
        try:
            merge_patch(self.custom.patch_namespaced_custom_object_status,
                        API_GROUP, API_VERSION, namespace, PLURAL, name, {"status": status})
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
