"""A pod's container resolved into a :class:`~.runtime.ContainerSpec`: command and args, env (values,
``secretKeyRef``, ``configMapKeyRef``, ``fieldRef``), mounts (volumes.py) with the termination-message file,
the effective security context and the limits.

The harness runs pods of one container with ``restartPolicy: Never`` (what Jobs' pods are here); other pods,
and env sources it does not resolve (``envFrom``, ``resourceFieldRef``), are refused with an error naming them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes import client

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
    namespace = pod["metadata"]["namespace"]
    if container.get("envFrom"):
        raise UnsupportedPod(f"container {container['name']!r}: envFrom is not supported by the kubelet harness")
    env: dict[str, str] = {}
    for item in container.get("env") or []:
        source = item.get("valueFrom")
        if source is None:
            env[item["name"]] = item.get("value", "")
        elif "fieldRef" in source:
            env[item["name"]] = field_value(pod, source["fieldRef"]["fieldPath"])
        elif "secretKeyRef" in source or "configMapKeyRef" in source:
            kind = "Secret" if "secretKeyRef" in source else "ConfigMap"
            ref = source["secretKeyRef" if kind == "Secret" else "configMapKeyRef"]
            optional = ref.get("optional", False)
            try:
                if kind == "Secret":
                    data = {
                        k: v.decode() for k, v in secret_data(core, namespace, ref["name"], optional=optional).items()
                    }
                else:
                    data = config_map_data(core, namespace, ref["name"], optional=optional)
            except MissingReference as e:
                raise ContainerCreateError("CreateContainerConfigError", str(e)) from e
            if ref["key"] in data:
                env[item["name"]] = data[ref["key"]]
            elif not optional:
                message = f"couldn't find key {ref['key']} in {kind} {namespace}/{ref['name']}"
                raise ContainerCreateError("CreateContainerConfigError", message)
        else:
            raise UnsupportedPod(f"env {item['name']!r}: {sorted(source)} is not supported by the kubelet harness")
    return env


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
