"""Pure functions that build what the operator creates for a ModelMergeSweep: each trial's ModelMerge and, for
keep=best, the Job that deletes the other trials' outputs. No API calls here."""

from __future__ import annotations

import copy
from typing import Any

from modelmerge.contract import API_GROUP, API_VERSION, KIND, output_location
from modelmerge.sweep import (
    SWEEP_KIND,
    ModelMergeSweepSpec,
    Trial,
    bounded_name,
    trial_name,
    trial_spec,
    work_cache_folder,
)
from modelmerge_operator import manifests
from modelmerge_operator.config import OperatorConfig

LABEL_SWEEP = f"{API_GROUP}/sweep"  # the sweep's name (hashed to 63 characters when longer), on children and Jobs
LABEL_TRIAL = f"{API_GROUP}/trial"  # the trial's index, on children
CLEANUP_CONTAINER = "cleanup"
CLEANUP_BACKOFF_LIMIT = 2


def owner_reference(sweep: dict[str, Any]) -> dict[str, Any]:
    meta = sweep["metadata"]
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": SWEEP_KIND, "name": meta["name"],
            "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}


def sweep_owner(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The ModelMergeSweep controller reference of a child ModelMerge or a cleanup Job, if any."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") == SWEEP_KIND and ref.get("controller"):
            return ref
    return None


def sweep_label(sweep_name: str) -> str:
    return manifests.name_label(sweep_name)


def child(sweep: dict[str, Any], spec: ModelMergeSweepSpec, trial: Trial) -> dict[str, Any]:
    """Trial `trial`'s ModelMerge: the template with the trial's values, owned by the sweep, annotated with the
    work cache folder the trials share."""
    meta = sweep["metadata"]
    name = trial_name(meta["name"], trial.index)
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": meta["namespace"],
            "labels": {"app.kubernetes.io/name": "modelmerge", manifests.LABEL_MANAGED_BY: manifests.MANAGED_BY,
                       LABEL_SWEEP: sweep_label(meta["name"]), LABEL_TRIAL: str(trial.index)},
            "annotations": {manifests.ANNOTATION_WORK_CACHE: work_cache_folder(spec, meta["name"])},
            "ownerReferences": [owner_reference(sweep)],
        },
        "spec": trial_spec(spec, trial, name).model_dump(mode="json", exclude_unset=True),
    }


def output_folder(spec: ModelMergeSweepSpec, trial: Trial, sweep_name: str) -> str:
    """Where trial `trial`'s merged model lands inside the template's output volume (its subPath)."""
    name = trial_name(sweep_name, trial.index)
    return output_location(trial_spec(spec, trial, name), name).relative


def cleanup_job_name(sweep_name: str) -> str:
    return bounded_name(sweep_name, "-cleanup")


def cleanup_job(sweep: dict[str, Any], spec: ModelMergeSweepSpec, folders: list[str],
                config: OperatorConfig) -> dict[str, Any]:
    """A Job that deletes `folders` (relative to the template's output volume) in the operator's merge image, as
    the merge pods' user, with the template's scheduling fields (the claim must be reachable from its node)."""
    meta = sweep["metadata"]
    template = spec.template
    labels = {"app.kubernetes.io/name": "modelmerge", "app.kubernetes.io/component": "sweep-cleanup",
              manifests.LABEL_MANAGED_BY: manifests.MANAGED_BY, LABEL_SWEEP: sweep_label(meta["name"])}
    mount = {"name": "output", "mountPath": manifests.OUTPUT_MOUNT}
    if template.output.subPath:
        mount["subPath"] = template.output.subPath
    container = {
        "name": CLEANUP_CONTAINER,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["rm", "-rf", "--", *(f"{manifests.OUTPUT_MOUNT}/{folder}" for folder in folders)],
        "volumeMounts": [mount],
        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"cpu": "1", "memory": "256Mi"}},
        "securityContext": copy.deepcopy(manifests.CONTAINER_SECURITY_CONTEXT),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": copy.deepcopy(manifests.POD_SECURITY_CONTEXT),
        "containers": [container],
        "volumes": [{"name": "output", "persistentVolumeClaim": {"claimName": template.output.pvc}}],
    }
    if config.service_account:
        pod["serviceAccountName"] = config.service_account
    optional = {
        "nodeSelector": template.nodeSelector or None,
        "tolerations": [t.model_dump(exclude_none=True) for t in template.tolerations] or None,
        "affinity": template.affinity or None,
        "imagePullSecrets": [r.model_dump() for r in template.imagePullSecrets] or None,
    }
    pod.update({key: value for key, value in optional.items() if value is not None})
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": cleanup_job_name(meta["name"]), "namespace": meta["namespace"], "labels": labels,
                     "ownerReferences": [owner_reference(sweep)]},
        "spec": {"backoffLimit": CLEANUP_BACKOFF_LIMIT, "completions": 1, "parallelism": 1,
                 "template": {"metadata": {"labels": labels}, "spec": pod}},
    }
