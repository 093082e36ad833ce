"""Pure functions that build what the operator creates for a ModelMerge: the ConfigMap with the engine's request
and the Job that runs it. No API calls here, so the whole shape is unit-tested."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import PurePosixPath
from typing import Any

from modelmerge.contract import API_GROUP, API_VERSION, EXIT_INVALID_REQUEST, KIND, ModelMergeSpec, output_location
from modelmerge.sweep import SWEEP_KIND
from modelmerge_operator.config import OperatorConfig

CONTAINER = "merge"
SPEC_DIR = "/etc/modelmerge"
SPEC_FILE = "spec.json"
OUTPUT_MOUNT = "/output"
CACHE_MOUNT = "/cache"
SCRATCH_MOUNT = "/scratch"  # the writable HOME/TMPDIR of a read-only root filesystem (HF downloads without a cache)
# Memory request and limit of a merge whose ModelMerge states none. Measured (README, Performance): the compiled
# CPU path peaks at ~85 MiB anonymous memory and merges 0.96 GB of inputs under a 256 MiB limit (page cache is
# reclaimed); the torch kernels use_gpu runs peak at ~370 MiB on the host. 2Gi leaves room for CUDA's host memory.
DEFAULT_MERGE_MEMORY = "2Gi"
TERMINATION_LOG = "/dev/termination-log"

MANAGED_BY = "modelmerge-operator"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_NAME = f"{API_GROUP}/name"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
MAX_NAME = 63  # a Job's name ends up in its pods' job-name label
# On a sweep's trial: the folder of the output volume where the trials share the engine's work cache
# (modelmerge.sweep.work_cache_folder), passed to the engine as --work-cache.
ANNOTATION_WORK_CACHE = f"{API_GROUP}/work-cache"

# Restricted pod security for every merge pod: the user and group of the merge image (merge_image/Dockerfile),
# fsGroup so fresh volumes are writable, no privilege escalation, no capabilities, read-only root filesystem.
RUN_AS = 10001
POD_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
    "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {
    "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
}


def job_name(name: str) -> str:
    """`<name>-merge`, shortened with a hash of the full name when that would pass 63 characters."""
    candidate = f"{name}-merge"
    if len(candidate) <= MAX_NAME:
        return candidate
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    return f"{name[:MAX_NAME - len(digest) - 7].rstrip('-.')}-{digest}-merge"


def name_label(name: str) -> str:
    """A ModelMerge name as a label value (≤ 63 characters, hashed like the Job name when longer)."""
    return name if len(name) <= MAX_NAME else job_name(name).removesuffix("-merge")


def labels(name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "modelmerge",
        "app.kubernetes.io/component": "merge",
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_NAME: name_label(name),
    }


def owner_reference(body: dict[str, Any]) -> dict[str, Any]:
    meta = body["metadata"]
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "name": meta["name"],
            "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}


def _metadata(body: dict[str, Any], extra_labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta = body["metadata"]
    return {"name": job_name(meta["name"]), "namespace": meta["namespace"],
            "labels": {**labels(meta["name"]), **(extra_labels or {})},
            "ownerReferences": [owner_reference(body)]}


def request_json(spec: ModelMergeSpec) -> str:
    """The engine's request: the merge fields only; the output directory is passed as a flag, as a path under
    the mounted volume."""
    return json.dumps(spec.merge_request().model_dump(mode="json", exclude={"output_dir"}), indent=2,
                      sort_keys=True) + "\n"


def config_map(body: dict[str, Any], spec: ModelMergeSpec) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(body),
            "data": {SPEC_FILE: request_json(spec)}}


def job(body: dict[str, Any], spec: ModelMergeSpec, config: OperatorConfig) -> dict[str, Any]:
    name = body["metadata"]["name"]
    queue = {KUEUE_QUEUE_LABEL: spec.queueName} if spec.queueName else {}
    job_spec: dict[str, Any] = {
        "backoffLimit": spec.backoffLimit,
        "completions": 1,
        "parallelism": 1,
        # Kueue admits a queued Job by unsuspending it; the operator never touches `suspend` afterwards.
        "suspend": bool(spec.queueName),
        "podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {
            "containerName": CONTAINER, "operator": "In", "values": [EXIT_INVALID_REQUEST]}}]},  # retrying cannot help
        "template": {"metadata": {"labels": {**labels(name), **queue}}, "spec": pod_spec(body, spec, config)},
    }
    if spec.activeDeadlineSeconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.activeDeadlineSeconds
    if spec.ttlSecondsAfterFinished is not None:
        job_spec["ttlSecondsAfterFinished"] = spec.ttlSecondsAfterFinished
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": _metadata(body, queue), "spec": job_spec}


def pod_spec(body: dict[str, Any], spec: ModelMergeSpec, config: OperatorConfig) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "restartPolicy": "Never",  # retries are new pods (backoffLimit), each with its termination message
        "automountServiceAccountToken": False,  # the merge never talks to the API
        "securityContext": copy.deepcopy(POD_SECURITY_CONTEXT),
        "containers": [container(body, spec, config)],
        "volumes": volumes(body, spec),
    }
    if config.service_account:
        pod["serviceAccountName"] = config.service_account
    optional = {
        "nodeSelector": spec.nodeSelector or None,
        "tolerations": [t.model_dump(exclude_none=True) for t in spec.tolerations] or None,
        "affinity": spec.affinity or None,
        "priorityClassName": spec.priorityClassName,
        "imagePullSecrets": [r.model_dump() for r in spec.imagePullSecrets] or None,
    }
    pod.update({key: value for key, value in optional.items() if value is not None})
    return pod


def image(spec: ModelMergeSpec, config: OperatorConfig) -> str:
    """spec.image, else the evaluation image for an evaluated merge (evaluation needs torch and transformers, which
    the CPU merge image lacks), else the merge image."""
    if spec.image:
        return spec.image
    return config.evaluation_image if spec.evaluation is not None else config.image


def container(body: dict[str, Any], spec: ModelMergeSpec, config: OperatorConfig) -> dict[str, Any]:
    name = body["metadata"]["name"]
    out = {
        "name": CONTAINER,
        "image": image(spec, config),
        "imagePullPolicy": config.image_pull_policy,
        "command": [*config.merge_command, "merge"],
        "args": ["--spec", f"{SPEC_DIR}/{SPEC_FILE}",
                 "--output-dir", output_location(spec, name).in_mount(OUTPUT_MOUNT),
                 "--summary-file", TERMINATION_LOG,
                 "--progress", "lines"],
        "env": env(spec, config),
        "resources": resources(spec, config),
        "volumeMounts": volume_mounts(spec),
        "terminationMessagePath": TERMINATION_LOG,
        # The engine writes its JSON summary there; if it dies before that, the log's tail stands in.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": copy.deepcopy(CONTAINER_SECURITY_CONTEXT),
    }
    work_cache = work_cache_folder(body)
    if work_cache is not None:
        out["args"] += ["--work-cache", f"{OUTPUT_MOUNT}/{work_cache}"]
    if spec.evaluation is not None:
        out["workingDir"] = OUTPUT_MOUNT  # spec.evaluation.data's local files are relative to the output volume
    return out


def work_cache_folder(body: dict[str, Any]) -> str | None:
    """The work cache folder (relative to the output volume) of a sweep's trial: its ANNOTATION_WORK_CACHE when
    a ModelMergeSweep controls it and the value stays inside the volume; None otherwise (no cache)."""
    meta = body.get("metadata") or {}
    folder = str((meta.get("annotations") or {}).get(ANNOTATION_WORK_CACHE) or "").strip("/")
    by_sweep = any(ref.get("kind") == SWEEP_KIND and ref.get("controller")
                   for ref in meta.get("ownerReferences") or [])
    parts = PurePosixPath(folder).parts
    if not by_sweep or not parts or any(part in ("..", ".") for part in parts) or "\x00" in folder:
        return None
    return "/".join(parts)


def env(spec: ModelMergeSpec, config: OperatorConfig) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"name": "PYTHONUNBUFFERED", "value": "1"},
                                 {"name": "HOME", "value": SCRATCH_MOUNT}, {"name": "TMPDIR", "value": SCRATCH_MOUNT}]
    if spec.modelCache is not None:
        out.append({"name": "HF_HOME", "value": CACHE_MOUNT})
    if spec.hfTokenSecret is not None:
        out.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": spec.hfTokenSecret.name, "key": spec.hfTokenSecret.key}}})
    out.extend({"name": name, "value": value} for name, value in config.job_env)
    return out


def resources(spec: ModelMergeSpec, config: OperatorConfig = OperatorConfig()) -> dict[str, Any]:
    """spec.resources as requests = limits; what it leaves unset comes from the operator's defaults: those of
    evaluated merges (--evaluation-cpu/--evaluation-memory: the model is loaded) or DEFAULT_MERGE_MEMORY."""
    evaluated = spec.evaluation is not None
    default_cpu = config.evaluation_cpu if evaluated else None
    default_memory = config.evaluation_memory if evaluated else DEFAULT_MERGE_MEMORY
    cpu = spec.resources.cpu if spec.resources.cpu is not None else default_cpu
    memory = spec.resources.memory if spec.resources.memory is not None else default_memory
    amounts = {key: str(value) for key, value in (("cpu", cpu), ("memory", memory)) if value is not None}
    limits = dict(amounts)
    if spec.use_gpu:
        limits[spec.resources.gpuResourceName] = str(spec.resources.gpu)
    out: dict[str, Any] = {}
    if amounts:
        out["requests"] = amounts
    if limits:
        out["limits"] = limits
    return out


def volumes(body: dict[str, Any], spec: ModelMergeSpec) -> list[dict[str, Any]]:
    shm: dict[str, Any] = {"medium": "Memory"}
    if spec.resources.shmSize is not None:
        shm["sizeLimit"] = str(spec.resources.shmSize)
    out = [
        {"name": "spec", "configMap": {"name": job_name(body["metadata"]["name"])}},
        {"name": "output", "persistentVolumeClaim": {"claimName": spec.output.pvc}},
        {"name": "dshm", "emptyDir": shm},
        {"name": "scratch", "emptyDir": {}},
    ]
    if spec.modelCache is not None:
        out.append({"name": "model-cache", "persistentVolumeClaim": {
            "claimName": spec.modelCache.pvc, "readOnly": spec.modelCache.readOnly}})
    return out


def volume_mounts(spec: ModelMergeSpec) -> list[dict[str, Any]]:
    output: dict[str, Any] = {"name": "output", "mountPath": OUTPUT_MOUNT}
    if spec.output.subPath:
        output["subPath"] = spec.output.subPath
    out = [{"name": "spec", "mountPath": SPEC_DIR, "readOnly": True}, output,
           {"name": "dshm", "mountPath": "/dev/shm"}, {"name": "scratch", "mountPath": SCRATCH_MOUNT}]
    if spec.modelCache is not None:
        cache: dict[str, Any] = {"name": "model-cache", "mountPath": CACHE_MOUNT,
                                 "readOnly": spec.modelCache.readOnly}
        if spec.modelCache.subPath:
            cache["subPath"] = spec.modelCache.subPath
        out.append(cache)
    return out
