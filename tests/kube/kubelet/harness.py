"""``FakeKubelet``: the kubelet (and the scheduler) for the envtest control plane, which has neither.

It registers a Ready Node (capacity: ``scheduling.DEFAULT_CAPACITY``, 8 ``nvidia.com/gpu`` among it, plus
``capacity``), watches pods (all namespaces, or one namespace and/or a label selector), binds the unscheduled
ones that fit the Node (scheduling.py), and runs each bound pod on a container runtime (pod_worker.py;
``ProcessRuntime`` unless another is given), reporting its status through ``pods/status`` so the real job
controller drives Jobs from it (status.py). The Node's kubelet endpoint serves the pods' logs (logserver.py).

Files live under ``root`` (a temp folder unless given):

* ``<root>/pvc/<claimName>/`` is the volume of PersistentVolumeClaim ``claimName`` (the namespace is not part of
  the path: use distinct claim names). Tests pre-fill or inspect it: :meth:`FakeKubelet.pvc_path`.
* ``<root>/pods/<namespace>/<pod>/`` is the pod's folder: its volumes (``volumes/<name>``), termination-message
  file, log (``<container>.log``, stdout and stderr together) and the runtime's own files (the process
  runtime's working dir ``work``): :meth:`FakeKubelet.pod_dir`, :meth:`FakeKubelet.logs`.

    kubelet = FakeKubelet(api_client, namespace="ns1", root=tmp_path)
    kubelet.start()
    ...              # create Jobs; read kubelet.pvc_path("out"), kubelet.logs("ns1", pod_name)
    kubelet.stop()   # stops the containers, force-deletes its pods, deletes its Node
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from modelmerge.kubeclient import merge_patch, raw
from tests.kube.kubelet.containers import container_log_file, resolve_container
from tests.kube.kubelet.logserver import LogServer
from tests.kube.kubelet.pod_worker import MAX_GRACE_SECONDS, PodWorker
from tests.kube.kubelet.process import ProcessRuntime
from tests.kube.kubelet.runtime import ContainerRuntime, ContainerSpec
from tests.kube.kubelet.scheduling import DEFAULT_CAPACITY, Scheduler
from tests.kube.kubelet.status import HOST_IP, StatusReporter, now

log = logging.getLogger(__name__)

WATCH_TIMEOUT_SECONDS = 20
RELIST_DELAY_SECONDS = 0.5


class FakeKubelet:
    """See the module docstring. Thread-safe; :meth:`start`, then :meth:`stop`."""

    def __init__(
        self,
        api_client: client.ApiClient,
        *,
        root: Path | str | None = None,
        namespace: str | None = None,
        label_selector: str | None = None,
        capacity: dict[str, str] | None = None,
        runtime: ContainerRuntime | None = None,
    ) -> None:
        self.core = client.CoreV1Api(api_client)
        self.node_name = f"harness-{uuid.uuid4().hex[:6]}"
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="kubelet-"))
        self.namespace = namespace
        self.label_selector = label_selector
        self.capacity = {**DEFAULT_CAPACITY, **(capacity or {})}
        self.runtime = runtime or ProcessRuntime()
        self.reporter = StatusReporter(self.core)
        self.scheduler = Scheduler(
            self.core, self.reporter, node_name=self.node_name, capacity=self.capacity, list_unbound=self._list_unbound
        )
        self.log_server = LogServer(
            self.root / "kubelet-pki",
            common_name=self.node_name,
            log_file=lambda namespace, pod, container: container_log_file(self.pod_dir(namespace, pod), container),
            is_running=self._is_running,
        )
        self._lock = threading.Lock()
        self._workers: dict[str, PodWorker] = {}  # pod uid -> the worker running (or that ran) it
        self._stop = threading.Event()
        self._watch: watch.Watch | None = None
        self._thread: threading.Thread | None = None

    # -- files ------------------------------------------------------------------------------------------------
    def pvc_path(self, claim: str, sub_path: str = "") -> Path:
        """The host folder that stands for PersistentVolumeClaim ``claim`` (created on demand)."""
        path = self.root / "pvc" / claim / sub_path
        path.mkdir(parents=True, exist_ok=True)
        return path

    def pod_dir(self, namespace: str, name: str) -> Path:
        return self.root / "pods" / namespace / name

    def logs(self, namespace: str, name: str) -> str:
        """The pod's log so far ("" before its container started)."""
        with self._lock:
            files = [w.log_file for w in self._workers.values() if (w.namespace, w.name) == (namespace, name)]
        try:
            return files[0].read_text(errors="replace") if files and files[0] else ""
        except FileNotFoundError:
            return ""

    # -- lifecycle --------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.log_server.start()
        self._register_node()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch_loop, name=f"kubelet-{self.node_name}", daemon=True)
        self._thread.start()

    def stop(self, *, delete_pods: bool = True) -> None:
        """Stops watching and every container; force-deletes the pods it ran (unless not ``delete_pods``) and
        deletes its Node."""
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            worker.kill(deleted=False)
        for worker in workers:
            worker.join(timeout=MAX_GRACE_SECONDS + 10)
        if delete_pods:
            for worker in workers:
                self.reporter.confirm_deletion(worker.namespace, worker.name, worker.uid)
        try:
            self.core.delete_node(self.node_name, _preload_content=False)
        except ApiException as e:
            if e.status != 404:
                raise
        self.log_server.stop()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- the Node ---------------------------------------------------------------------------------------------
    def _register_node(self) -> None:
        labels = {"kubernetes.io/hostname": self.node_name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}
        body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.node_name, "labels": labels}}
        try:
            self.core.create_node(body, _preload_content=False)
        except ApiException as e:
            if e.status != 409:
                raise
        heartbeat = now()
        status = {
            "capacity": self.capacity,
            "allocatable": self.capacity,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "envtest kubelet harness is ready",
                    "lastHeartbeatTime": heartbeat,
                    "lastTransitionTime": heartbeat,
                }
            ],
            "addresses": [{"type": "InternalIP", "address": HOST_IP}, {"type": "Hostname", "address": self.node_name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.log_server.port}},
            "nodeInfo": {
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
                "kernelVersion": "",
                "osImage": "",
                "containerRuntimeVersion": f"{self.runtime.name}://{self.runtime.version}",
                "kubeletVersion": "harness",
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }
        merge_patch(self.core.patch_node_status, self.node_name, {"status": status})

    # -- watching pods ----------------------------------------------------------------------------------------
    def _list_call(self) -> tuple[Any, tuple[str, ...], dict[str, str]]:
        selector = {"label_selector": self.label_selector} if self.label_selector else {}
        if self.namespace:
            return self.core.list_namespaced_pod, (self.namespace,), selector
        return self.core.list_pod_for_all_namespaces, (), selector

    def _list_unbound(self) -> list[dict[str, Any]]:
        if self._stop.is_set():
            return []
        fn, args, selector = self._list_call()
        return raw(fn, *args, field_selector="spec.nodeName=", **selector).get("items", [])

    def _watch_loop(self) -> None:
        fn, args, selector = self._list_call()
        version = None
        while not self._stop.is_set():
            try:
                if version is None:  # (re)list: reconcile everything, then watch from the list's version
                    listing = raw(fn, *args, **selector)
                    version = listing["metadata"]["resourceVersion"]
                    seen = {pod["metadata"]["uid"] for pod in listing.get("items", [])}
                    for pod in listing.get("items", []):
                        self._on_pod(pod)
                    with self._lock:
                        gone = [uid for uid in self._workers if uid not in seen]
                    for uid in gone:
                        self._on_deleted(uid)
                self._watch = _RawWatch()
                events = self._watch.stream(
                    fn,
                    *args,
                    resource_version=version,
                    timeout_seconds=WATCH_TIMEOUT_SECONDS,
                    allow_watch_bookmarks=True,
                    **selector,
                )
                for event in events:
                    if self._stop.is_set():
                        break
                    obj = event["raw_object"]
                    if event["type"] == "ERROR":
                        version = None  # usually 410 Gone: relist
                        break
                    version = obj.get("metadata", {}).get("resourceVersion", version)
                    if event["type"] == "DELETED":
                        self._on_deleted(obj["metadata"]["uid"])
                    elif event["type"] in ("ADDED", "MODIFIED"):
                        self._on_pod(obj)
            except Exception as e:  # a refused or dropped watch: relist and carry on
                version = None
                if not self._stop.is_set():
                    log.warning("kubelet harness: watch failed (%s), relisting", getattr(e, "status", e))
                    time.sleep(RELIST_DELAY_SECONDS)

    def _on_pod(self, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        node = spec.get("nodeName")
        if meta.get("deletionTimestamp"):
            if node == self.node_name:
                self._on_deleted(meta["uid"], pod)
            return
        if not node:
            self.scheduler.schedule(pod)
            return
        if node != self.node_name or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            return
        with self._lock:
            if meta["uid"] in self._workers or self._stop.is_set():
                return
            worker = PodWorker(
                pod,
                runtime=self.runtime,
                reporter=self.reporter,
                resolve=self._resolve,
                on_done=self._worker_done,
            )
            self._workers[meta["uid"]] = worker
        self.scheduler.reserve(pod)
        worker.start()

    def _resolve(self, pod: dict[str, Any]) -> ContainerSpec:
        folder = self.pod_dir(pod["metadata"]["namespace"], pod["metadata"]["name"])
        return resolve_container(self.core, pod, pod_folder=folder, claim_folder=self.pvc_path)

    def _on_deleted(self, uid: str, pod: dict[str, Any] | None = None) -> None:
        """``pod`` is the object when it has a deletionTimestamp, None when it is gone from the API."""
        with self._lock:
            worker = self._workers.get(uid)
            if worker is not None:
                worker.kill(deleted=True)
                finished = worker.done
        if worker is None:
            if pod is not None:  # bound to this Node, not running (any more): just confirm
                self.reporter.confirm_deletion(pod["metadata"]["namespace"], pod["metadata"]["name"], uid)
        elif finished:  # else the worker confirms when it ends
            self._forget(worker, confirm=pod is not None)

    def _worker_done(self, worker: PodWorker) -> None:
        with self._lock:
            worker.done = True
            deleted = worker.deleted
        self.scheduler.release(worker.uid)
        if deleted:
            self._forget(worker, confirm=True)

    def _forget(self, worker: PodWorker, *, confirm: bool) -> None:
        if confirm:
            self.reporter.confirm_deletion(worker.namespace, worker.name, worker.uid)
        with self._lock:
            self._workers.pop(worker.uid, None)

    def _is_running(self, namespace: str, name: str) -> bool:
        """Whether the pod's container may still write to its log."""
        with self._lock:
            return not self._stop.is_set() and any(
                (w.namespace, w.name) == (namespace, name) and not w.done for w in self._workers.values()
            )


class _RawWatch(watch.Watch):
    """A Watch that leaves objects as dicts (``raw_object``) instead of building client models."""

    def get_return_type(self, func):
        return None
