"""kopf wiring: settings, the ModelMerge index, and thin handlers that call `Reconciler`.

Importing this module registers the handlers with kopf's default registry (`modelmerge operator` does that, and
so can `kopf run -m modelmerge_operator.handlers` or `kopf.testing.KopfRunner`)."""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from typing import Any

import kopf

from modelmerge.contract import API_GROUP, API_VERSION, PLURAL
from modelmerge.kubeclient import api_client, configuration
from modelmerge_operator import manifests, sweep_handlers  # noqa: F401 - sweep_handlers registers the sweep handlers
from modelmerge_operator.config import OperatorConfig
from modelmerge_operator.kube import REPORTING_COMPONENT, Kube
from modelmerge_operator.reconcile import Reconciler, owner_of

RESOURCE = (API_GROUP, API_VERSION, PLURAL)
HANDLER_BACKOFF = 5.0


def configure(settings: kopf.OperatorSettings, workers: int) -> None:
    """Production settings: state in our own annotations, only warnings become Kubernetes events (the
    operator posts its own transition events), bounded watches that reconnect, retries with backoff."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration")
    settings.persistence.finalizer = f"{API_GROUP}/finalizer"
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = REPORTING_COMPONENT
    settings.posting.reporting_instance = os.environ.get("HOSTNAME", REPORTING_COMPONENT)
    settings.watching.server_timeout = 300  # the API server ends each watch after 5 min; kopf re-lists
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.networking.connect_timeout = 30
    settings.networking.request_timeout = 60
    settings.networking.error_backoffs = (1, 2, 5, 10, 20, 30, 60)
    settings.queueing.error_delays = (1, 2, 5, 10, 20, 30, 60)
    settings.execution.max_workers = workers


@kopf.on.login()
def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    """kopf's own connection, from the same kubeconfig / in-cluster credentials as the operator's client (kopf's
    built-in login would load them into the kubernetes client's global configuration)."""
    conf = configuration(kubeconfig=memo.get("kubeconfig"))
    header = conf.get_api_key_with_prefix("BearerToken") or conf.get_api_key_with_prefix("authorization")
    scheme, _, token = (header or "").rpartition(" ")
    return kopf.ConnectionInfo(
        server=conf.host, ca_path=conf.ssl_ca_cert, insecure=not conf.verify_ssl,
        username=conf.username or None, password=conf.password or None, scheme=scheme or None,
        token=token or None, certificate_path=conf.cert_file, private_key_path=conf.key_file)


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    workers = int(memo.get("workers") or os.environ.get("MODELMERGE_WORKERS", "16"))
    configure(settings, workers)
    config = memo.get("config") or OperatorConfig()
    kube = Kube(api_client(kubeconfig=memo.get("kubeconfig"), pool_size=workers + 4, retries=3),
                reporting_instance=settings.posting.reporting_instance)
    memo.reconciler = Reconciler(kube, config, kube.post_event)
    if config.resync_interval > 0:
        memo.stop_resync = threading.Event()
        threading.Thread(target=memo.reconciler.poll, name="resync", daemon=True,
                         args=(memo.stop_resync, config.resync_interval)).start()


@kopf.on.cleanup()
def cleanup(memo: kopf.Memo, **_: Any) -> None:
    if "stop_resync" in memo:
        memo.stop_resync.set()


@kopf.on.probe(id="started")
def probe(**_: Any) -> float:
    return time.time()


def _plain(body: Any) -> dict[str, Any]:
    """A detached copy of a kopf body, without the bulky bookkeeping the operator never reads (of the
    annotations, only the work cache folder of a sweep's trial stays)."""
    plain = copy.deepcopy(dict(body))
    plain.get("metadata", {}).pop("managedFields", None)
    annotations = plain.get("metadata", {}).pop("annotations", None) or {}
    work_cache = annotations.get(manifests.ANNOTATION_WORK_CACHE)
    if work_cache is not None:
        plain["metadata"]["annotations"] = {manifests.ANNOTATION_WORK_CACHE: work_cache}
    return plain


@kopf.index(*RESOURCE)
def modelmerges(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[tuple[str, str], dict]:
    """(namespace, name) → the ModelMerge, so Job events find their owner without an API call."""
    return {(namespace, name): _plain(body)}


@kopf.on.create(*RESOURCE, backoff=HANDLER_BACKOFF)
def create(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    memo.reconciler.create(_plain(body))


@kopf.on.field(*RESOURCE, field="spec.cancel", new=True, backoff=HANDLER_BACKOFF)
def cancel(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    memo.reconciler.cancel(_plain(body))


@kopf.on.resume(*RESOURCE, backoff=HANDLER_BACKOFF)
def resume(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    memo.reconciler.resume(_plain(body))


@kopf.on.event("batch", "v1", "jobs", labels={manifests.LABEL_MANAGED_BY: manifests.MANAGED_BY})
def job_event(type: str | None, body: kopf.Body, memo: kopf.Memo, modelmerges: kopf.Index,
              **_: Any) -> None:
    owner = owner_of(body)
    if owner is None or "reconciler" not in memo:
        return
    store = modelmerges.get((body["metadata"]["namespace"], owner["name"]))
    mm = next(iter(store), None) if store else None
    memo.reconciler.job_event(type, _plain(body), mm)


