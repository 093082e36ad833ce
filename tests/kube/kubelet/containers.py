"""A pod's container resolved into a :class:`~.runtime.ContainerSpec`: command and args, env (``envFrom``
ConfigMaps and Secrets, then values, ``secretKeyRef``, ``configMapKeyRef``, ``fieldRef``, ``resourceFieldRef``),
mounts (volumes.py) with the termination-message file, the effective security context and the limits.

The harness runs pods of one container with ``restartPolicy: Never`` (what Jobs' pods are here); other pods,
and env sources it does not resolve, are refused with an error naming them."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes import client

from modelmerge.kubeclient import raw
from tests.kube.kubelet.references import MissingReference, config_map_data, field_value, secret_data
from tests.kube.kubelet.runtime import (
    ContainerCreateError,
    ContainerSpec,
    Mount,
    ResourceLimits,
    SecurityContext,
    UnsupportedPod,
)
from tests.kube.kubelet.scheduling import parse_quantity
from tests.kube.kubelet.volumes import container_mounts

DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"


def resolve_container(
    core: client.CoreV1Api, pod: dict[str, Any], *, pod_folder: Path, claim_folder: Callable[[str], Path]
) -> ContainerSpec:
    """Raises ContainerCreateError while something the container needs is missing, UnsupportedPod for what the
    harness does not do."""
    meta, spec = pod["metadata"], pod["spec"]
    where = f"pod {meta['namespace']}/{meta['name']}"
    if spec.get("initContainers") or len(spec["containers"]) != 1:
        raise UnsupportedPod(f"{where}: the kubelet harness runs pods of one container and no init containers")
    if spec.get("restartPolicy", "Always") != "Never":
        raise UnsupportedPod(f"{where}: the kubelet harness runs restartPolicy Never pods only")
    (container,) = spec["containers"]
    pod_folder.mkdir(parents=True, exist_ok=True)
    mounts = container_mounts(core, pod, container, pod_folder=pod_folder, claim_folder=claim_folder)
    termination_file = pod_folder / "termination-log"
    termination_file.write_text("")
    termination_path = container.get("terminationMessagePath") or DEFAULT_TERMINATION_MESSAGE_PATH
    mounts.append(Mount(termination_path, termination_file))
    return ContainerSpec(
        namespace=meta["namespace"],
        pod_name=meta["name"],
        pod_uid=meta["uid"],
        name=container["name"],
        image=container.get("image", ""),
        image_pull_policy=container.get("imagePullPolicy", "IfNotPresent"),
        command=tuple(container.get("command") or ()),
        args=tuple(container.get("args") or ()),
        working_dir=container.get("workingDir"),
        env=container_env(core, pod, container),
        mounts=tuple(mounts),
        termination_message_file=termination_file,
        log_file=container_log_file(pod_folder, container["name"]),
        pod_dir=pod_folder,
        security=security_context(spec.get("securityContext") or {}, container.get("securityContext") or {}),
        limits=resource_limits(container),
    )


def container_log_file(pod_folder: Path, container: str) -> Path:
    """Where the container's stdout and stderr go (the log server serves it)."""
    return pod_folder / f"{container}.log"


def container_env(core: client.CoreV1Api, pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as a kubelet builds it: ``envFrom`` sources in order, then ``env`` (which wins)."""
    namespace = pod["metadata"]["namespace"]
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        kind = "Secret" if "secretRef" in source else "ConfigMap" if "configMapRef" in source else None
        if kind is None:
            raise UnsupportedPod(f"envFrom {sorted(source)} is not supported by the kubelet harness")
        ref = source["secretRef" if kind == "Secret" else "configMapRef"]
        data = _referenced_data(core, namespace, kind, ref["name"], optional=ref.get("optional", False))
        prefix = source.get("prefix", "")
        env.update({prefix + key: value for key, value in data.items()})  # every config key is a valid name (1.30+)
    for item in container.get("env") or []:
        source = item.get("valueFrom")
        if source is None:
            env[item["name"]] = item.get("value", "")
        elif "fieldRef" in source:
            env[item["name"]] = field_value(pod, source["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in source:
            env[item["name"]] = resource_field_value(core, pod, container, source["resourceFieldRef"])
        elif "secretKeyRef" in source or "configMapKeyRef" in source:
            kind = "Secret" if "secretKeyRef" in source else "ConfigMap"
            ref = source["secretKeyRef" if kind == "Secret" else "configMapKeyRef"]
            optional = ref.get("optional", False)
            data = _referenced_data(core, namespace, kind, ref["name"], optional=optional)
            if ref["key"] in data:
                env[item["name"]] = data[ref["key"]]
            elif not optional:
                message = f"couldn't find key {ref['key']} in {kind} {namespace}/{ref['name']}"
                raise ContainerCreateError("CreateContainerConfigError", message)
        else:
            raise UnsupportedPod(f"env {item['name']!r}: {sorted(source)} is not supported by the kubelet harness")
    return env


def _referenced_data(core: client.CoreV1Api, namespace: str, kind: str, name: str, *, optional: bool) -> dict[str, str]:
    """A Secret's (decoded) or ConfigMap's data; a missing one that is not optional makes the pod wait, as on a node."""
    try:
        if kind == "Secret":
            return {k: v.decode() for k, v in secret_data(core, namespace, name, optional=optional).items()}
        return config_map_data(core, namespace, name, optional=optional)
    except MissingReference as e:
        raise ContainerCreateError("CreateContainerConfigError", str(e)) from e


def resource_field_value(
    core: client.CoreV1Api, pod: dict[str, Any], container: dict[str, Any], ref: dict[str, Any]
) -> str:
    """A downward API ``resourceFieldRef`` as a kubelet resolves it: requests.X is the request (else the limit, else
    0), limits.X the limit (else the node's allocatable), divided by ``divisor`` and rounded up."""
    if ref.get("containerName") not in (None, container["name"]):
        raise UnsupportedPod(f"resourceFieldRef of container {ref['containerName']!r}: the harness runs one container")
    kind, _, resource = ref["resource"].partition(".")
    if kind not in ("requests", "limits") or not resource:
        raise UnsupportedPod(f"resourceFieldRef {ref['resource']!r} is not supported by the kubelet harness")
    resources = container.get("resources") or {}
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    if kind == "requests":
        quantity = requests.get(resource, limits.get(resource, 0))
    elif resource in limits:
        quantity = limits[resource]
    else:
        node = raw(core.read_node, pod["spec"]["nodeName"])
        quantity = (node.get("status") or {}).get("allocatable", {}).get(resource, 0)
    divisor = parse_quantity(ref.get("divisor") or 1) or 1
    return str(math.ceil(round(parse_quantity(quantity) / divisor, 6)))  # round: 0.7 / 0.001 is 699.99…


def security_context(pod_context: dict[str, Any], container_context: dict[str, Any]) -> SecurityContext:
    """The container's fields over the pod's, as a kubelet applies them."""

    def pick(key: str) -> Any:
        return container_context.get(key, pod_context.get(key))

    capabilities = container_context.get("capabilities") or {}
    seccomp = pick("seccompProfile") or {}
    return SecurityContext(
        run_as_user=pick("runAsUser"),
        run_as_group=pick("runAsGroup"),
        run_as_non_root=bool(pick("runAsNonRoot")),
        fs_group=pod_context.get("fsGroup"),
        read_only_root_filesystem=bool(container_context.get("readOnlyRootFilesystem")),
        allow_privilege_escalation=container_context.get("allowPrivilegeEscalation"),
        capabilities_add=tuple(capabilities.get("add") or ()),
        capabilities_drop=tuple(capabilities.get("drop") or ()),
        seccomp_profile=seccomp.get("type"),
    )


def resource_limits(container: dict[str, Any]) -> ResourceLimits:
    limits = (container.get("resources") or {}).get("limits") or {}
    return ResourceLimits(
        cpu=parse_quantity(limits["cpu"]) if "cpu" in limits else None,
        memory=int(parse_quantity(limits["memory"])) if "memory" in limits else None,
    )
