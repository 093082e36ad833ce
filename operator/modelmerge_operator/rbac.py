"""The permissions the operator needs, as Kubernetes RBAC rules (the chart's ClusterRole/Role are these; an
integration test runs the operator under exactly these rules).

* `CLUSTER_RULES`: cluster-scoped reads kopf needs in any mode (it notices CRDs and namespaces coming and going)
  and the cluster-wide peering object.
* `NAMESPACE_RULES`: what it does in each watched namespace: ModelMerges and their status, ModelMergeSweeps,
  their status and their trials (ModelMerges it creates and deletes), Jobs, the spec ConfigMaps, reading pods and
  their logs (failure messages, progress, pods that cannot start), whether the claims of a spec exist, events,
  and the namespaced peering object.
  Bind them with a RoleBinding per namespace (namespaced mode) or a ClusterRoleBinding (cluster-wide mode).
"""

from __future__ import annotations

from typing import Any

from modelmerge.contract import API_GROUP, PLURAL
from modelmerge.sweep import SWEEP_PLURAL

CLUSTER_RULES: list[dict[str, Any]] = [
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
     "verbs": ["list", "watch"]},
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
    {"apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings"], "verbs": ["get", "list", "watch", "patch"]},
]

NAMESPACE_RULES: list[dict[str, Any]] = [
    # patch: cancel; create and delete: the trials of ModelMergeSweeps.
    {"apiGroups": [API_GROUP], "resources": [PLURAL], "verbs": ["get", "list", "watch", "patch", "create", "delete"]},
    {"apiGroups": [API_GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["get", "patch"]},
    # Owner references with blockOwnerDeletion need this where OwnerReferencesPermissionEnforcement is on.
    {"apiGroups": [API_GROUP], "resources": [f"{PLURAL}/finalizers"], "verbs": ["update"]},
    {"apiGroups": [API_GROUP], "resources": [SWEEP_PLURAL], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [API_GROUP], "resources": [f"{SWEEP_PLURAL}/status"], "verbs": ["get", "patch"]},
    {"apiGroups": [API_GROUP], "resources": [f"{SWEEP_PLURAL}/finalizers"], "verbs": ["update"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create", "delete"]},
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    # Whether the claims of a merge whose pod waits for a node exist (ClaimNotFound).
    {"apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": ["get"]},
    {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
    {"apiGroups": ["kopf.dev"], "resources": ["kopfpeerings"], "verbs": ["get", "list", "watch", "patch"]},
]


def manifests(name: str, service_account: str, sa_namespace: str, namespaces: list[str] | None) -> list[dict]:
    """ClusterRoles and bindings for an operator running as `service_account`: the namespace rules bound in
    each of `namespaces`, or cluster-wide when `namespaces` is None."""
    subject = [{"kind": "ServiceAccount", "name": service_account, "namespace": sa_namespace}]
    out: list[dict[str, Any]] = [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": f"{name}-cluster"},
         "rules": CLUSTER_RULES},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name},
         "rules": NAMESPACE_RULES},
        _binding("ClusterRoleBinding", f"{name}-cluster", None, subject),
    ]
    if namespaces is None:
        out.append(_binding("ClusterRoleBinding", name, None, subject))
    else:
        out.extend(_binding("RoleBinding", name, ns, subject) for ns in namespaces)
    return out


def _binding(kind: str, role: str, namespace: str | None, subjects: list[dict]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": role}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind, "metadata": meta, "subjects": subjects,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role}}
