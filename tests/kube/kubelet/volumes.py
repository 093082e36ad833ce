"""A pod's volumes as host folders, and a container's volumeMounts as :class:`~.runtime.Mount` s.

* ``persistentVolumeClaim``: the claim's folder (``claim_folder(claimName)``: the harness keeps one per claim
  name, whatever the namespace); ``subPath`` is a folder inside it.
* ``emptyDir`` (medium Memory too), ``configMap``, ``secret``, ``downwardAPI`` and ``projected`` (configMap,
  secret, downwardAPI and serviceAccountToken sources): ``<pod folder>/volumes/<name>``, filled once the objects
  they name exist (until then the pod waits in ContainerCreating, as on a real node).

Other kinds (hostPath, ...) are refused with an error naming the volume.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes import client

from tests.kube.kubelet.references import (
    MissingReference,
    config_map_data,
    field_value,
    secret_data,
    service_account_token,
)
from tests.kube.kubelet.runtime import ContainerCreateError, Mount, UnsupportedPod
from tests.kube.kubelet.scheduling import parse_quantity

FILLED_KINDS = ("configMap", "secret", "downwardAPI", "projected")


def container_mounts(
    core: client.CoreV1Api,
    pod: dict[str, Any],
    container: dict[str, Any],
    *,
    pod_folder: Path,
    claim_folder: Callable[[str], Path],
) -> list[Mount]:
    """Prepares the pod's volumes and returns the container's mounts; raises ContainerCreateError while an
    object a volume needs is missing."""
    volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
    hosts: dict[str, Path] = {}
    try:
        for name, volume in volumes.items():
            claim = volume.get("persistentVolumeClaim")
            folder = pod_folder / "volumes" / name
            hosts[name] = claim_folder(claim["claimName"]) if claim else _prepare(core, pod, volume, folder)
    except MissingReference as e:
        raise ContainerCreateError("ContainerCreating", f"MountVolume.SetUp failed: {e}") from e
    mounts = []
    for m in container.get("volumeMounts") or []:
        volume = volumes[m["name"]]
        host = hosts[m["name"]]
        if m.get("subPath"):
            host = host / m["subPath"]
            host.mkdir(parents=True, exist_ok=True)
        empty_dir = volume.get("emptyDir")
        claim = volume.get("persistentVolumeClaim") or {}
        size_limit = (empty_dir or {}).get("sizeLimit")
        mounts.append(
            Mount(
                container_path=m["mountPath"],
                host_path=host,
                read_only=bool(m.get("readOnly") or claim.get("readOnly") or _filled(volume)),
                memory_backed=empty_dir is not None and empty_dir.get("medium") == "Memory",
                size_limit=int(parse_quantity(size_limit)) if size_limit is not None else None,
            )
        )
    return mounts


def _filled(volume: dict[str, Any]) -> bool:
    """configMap, secret, downwardAPI and projected volumes are read-only, as on a real node."""
    return any(kind in volume for kind in FILLED_KINDS)


def _prepare(core: client.CoreV1Api, pod: dict[str, Any], volume: dict[str, Any], folder: Path) -> Path:
    """The folder of a volume that is not a claim."""
    if "emptyDir" in volume:
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    if not _filled(volume):
        kinds = sorted(set(volume) - {"name"})
        raise UnsupportedPod(f"volume {volume['name']!r}: {', '.join(kinds)} is not supported by the kubelet harness")
    folder.mkdir(parents=True, exist_ok=True)
    sources = volume["projected"].get("sources") or [] if "projected" in volume else [volume]
    for source in sources:
        _write_items(folder, _source_data(core, pod, source), _items(source))
    return folder


def _source_data(core: client.CoreV1Api, pod: dict[str, Any], source: dict[str, Any]) -> dict[str, bytes]:
    namespace = pod["metadata"]["namespace"]
    if "configMap" in source:
        ref = source["configMap"]
        data = config_map_data(core, namespace, ref["name"], optional=ref.get("optional", False))
        return {key: value.encode() for key, value in data.items()}
    if "secret" in source:
        ref = source["secret"]
        name = ref.get("secretName") or ref["name"]  # secretName in a volume, name in a projected source
        return secret_data(core, namespace, name, optional=ref.get("optional", False))
    if "downwardAPI" in source:
        items = source["downwardAPI"].get("items") or []
        return {i["path"]: field_value(pod, i["fieldRef"]["fieldPath"]).encode() for i in items}
    if "serviceAccountToken" in source:
        token_source = source["serviceAccountToken"]
        return {token_source["path"]: service_account_token(core, pod, token_source).encode()}
    raise UnsupportedPod(f"projected volume source {sorted(source)} is not supported by the kubelet harness")


def _items(source: dict[str, Any]) -> list[dict[str, str]] | None:
    """The key -> path selection of a configMap or secret source (None: every key under its own name)."""
    for kind in ("configMap", "secret"):
        if kind in source:
            return source[kind].get("items")
    return None


def _write_items(folder: Path, data: dict[str, bytes], items: list[dict[str, str]] | None) -> None:
    pairs = [(i["key"], i["path"]) for i in items] if items else [(key, key) for key in data]
    for key, relative in pairs:
        if key in data:
            target = folder / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data[key])
