"""Kubernetes plumbing shared by the operator, the REST API's Kubernetes backend and the test harness: a client
with its own configuration, raw JSON calls, merge patches and the pods of a Job.

`kubernetes` is imported inside the functions, so `modelmerge` (the contract, the CLI) imports without it. Nothing
here touches the kubernetes client's global default configuration: every client carries its own `Configuration`,
so two clients in one process (an operator and a test, two users of a test harness) never see each other's
credentials.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kubernetes import client

MERGE_PATCH = "application/merge-patch+json"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"  # set on a Job's pods by the job controller
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def configuration(*, kubeconfig: str | None = None, context: str | None = None,
                  in_cluster: bool | None = None) -> client.Configuration:
    """A fresh client configuration. `in_cluster`: True = the pod's service account only, False = a kubeconfig
    only (`kubeconfig`, else $KUBECONFIG / ~/.kube/config, with `context` or the current one), None = the
    service account when running in a pod and no kubeconfig is named, else the kubeconfig."""
    from kubernetes import client, config

    if in_cluster and (kubeconfig or context):
        raise ValueError("in_cluster=True takes no kubeconfig or context: in-cluster credentials are the pod's "
                         "service account")
    conf = client.Configuration()
    if in_cluster is None and not kubeconfig and not context:
        try:
            config.load_incluster_config(client_configuration=conf)
            return conf
        except config.ConfigException:
            pass  # not in a pod: the kubeconfig
    if in_cluster:
        config.load_incluster_config(client_configuration=conf)
    else:
        config.load_kube_config(config_file=_kubeconfig_file(kubeconfig), context=context,
                                client_configuration=conf)
    return conf


def _kubeconfig_file(kubeconfig: str | None) -> str | None:
    """The named file, else $KUBECONFIG as it is now (the kubernetes package reads it once, at import)."""
    return kubeconfig or os.environ.get("KUBECONFIG") or None


def api_client(*, kubeconfig: str | None = None, context: str | None = None, in_cluster: bool | None = None,
               pool_size: int | None = None, retries: int | None = None) -> client.ApiClient:
    """An ApiClient on its own configuration (see `configuration`); `pool_size` bounds its connection pool
    (one connection per concurrent call), `retries` retries failed connections."""
    from kubernetes import client

    conf = configuration(kubeconfig=kubeconfig, context=context, in_cluster=in_cluster)
    if pool_size is not None:
        conf.connection_pool_maxsize = pool_size
    if retries is not None:
        conf.retries = retries
    return client.ApiClient(conf)


def current_namespace(*, kubeconfig: str | None = None, context: str | None = None) -> str | None:
    """The namespace a client works in by default: the pod's own when running in one (and no kubeconfig or
    context is named), else the kubeconfig context's, else None."""
    from kubernetes import config

    if not kubeconfig and not context:
        try:
            with open(SERVICE_ACCOUNT_NAMESPACE, encoding="utf-8") as handle:
                namespace = handle.read().strip()
            if namespace:
                return namespace
        except OSError:
            pass
    try:
        contexts, current = config.list_kube_config_contexts(config_file=_kubeconfig_file(kubeconfig))
    except (config.ConfigException, OSError, TypeError):
        return None
    chosen = next((c for c in contexts if c.get("name") == context), None) if context else current
    return ((chosen or {}).get("context") or {}).get("namespace")


def raw(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Calls a generated API method with `_preload_content=False` and returns the JSON body as a dict (no model
    round trip: fields the client's models do not know survive, and nothing is renamed to snake_case)."""
    response = fn(*args, _preload_content=False, **kwargs)
    return json.loads(response.data or b"{}")


def merge_patch(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Calls a generated `patch_*` method with a JSON merge patch (RFC 7386: keys set to None are removed; lists
    are replaced) and returns the patched object as a dict."""
    return raw(fn, *args, _content_type=MERGE_PATCH, **kwargs)


def pods_of_job(core_v1: client.CoreV1Api, namespace: str, job_name: str) -> list[dict[str, Any]]:
    """The pods the job controller made for Job `job_name` (its job-name label), newest first."""
    pods = raw(core_v1.list_namespaced_pod, namespace, label_selector=f"{JOB_NAME_LABEL}={job_name}")
    items = pods.get("items") or []
    items.sort(key=lambda pod: (pod["metadata"].get("creationTimestamp") or "", pod["metadata"]["name"]),
               reverse=True)
    return items
