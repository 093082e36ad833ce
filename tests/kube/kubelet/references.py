"""What a pod refers to, read the way a kubelet reads it: ConfigMap and Secret data, the downward API's fields,
ServiceAccount tokens (TokenRequest)."""

from __future__ import annotations

import base64
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from modelmerge.kubeclient import raw
from tests.kube.kubelet.runtime import UnsupportedPod


class MissingReference(Exception):
    """A ConfigMap, Secret or key the pod needs does not exist (yet)."""


def config_map_data(core: client.CoreV1Api, namespace: str, name: str, *, optional: bool) -> dict[str, str]:
    """The ConfigMap's data; {} when it does not exist and the reference is ``optional``."""
    obj = _read(core.read_namespaced_config_map, "configmap", namespace, name, optional=optional)
    return obj.get("data") or {}


def secret_data(core: client.CoreV1Api, namespace: str, name: str, *, optional: bool) -> dict[str, bytes]:
    """The Secret's data, decoded; {} when it does not exist and the reference is ``optional``."""
    obj = _read(core.read_namespaced_secret, "secret", namespace, name, optional=optional)
    return {key: base64.b64decode(value) for key, value in (obj.get("data") or {}).items()}


def _read(read, kind: str, namespace: str, name: str, *, optional: bool) -> dict[str, Any]:
    try:
        return raw(read, name, namespace)
    except ApiException as e:
        if e.status == 404 and optional:
            return {}
        if e.status == 404:
            raise MissingReference(f'{kind} "{name}" not found') from e
        raise


def field_value(pod: dict[str, Any], path: str) -> str:
    """A downward API ``fieldRef``: the fields the harness's pods use (their name; their namespace, in the projected
    ServiceAccount volume)."""
    fields = {"metadata.name": pod["metadata"]["name"], "metadata.namespace": pod["metadata"]["namespace"]}
    if path not in fields:
        raise UnsupportedPod(f"fieldRef {path!r} is not supported by the kubelet harness (only {', '.join(fields)})")
    return fields[path]


def service_account_token(core: client.CoreV1Api, pod: dict[str, Any], source: dict[str, Any]) -> str:
    """A token of the pod's ServiceAccount for a projected ``serviceAccountToken`` source."""
    service_account = pod["spec"].get("serviceAccountName") or "default"
    spec: dict[str, Any] = {"expirationSeconds": source.get("expirationSeconds", 3600)}
    if source.get("audience"):
        spec["audiences"] = [source["audience"]]
    try:
        created = raw(
            core.create_namespaced_service_account_token,
            service_account,
            pod["metadata"]["namespace"],
            {"spec": spec},
        )
    except ApiException as e:
        raise MissingReference(f"token for serviceaccount {service_account}: {e.reason}") from e
    return created["status"]["token"]
