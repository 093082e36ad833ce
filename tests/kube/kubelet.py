"""A stand-in for the kubelet (and the scheduler) so Jobs run against the envtest control plane, where no
container runtime exists.

``FakeKubelet`` registers a Ready Node with the given capacity (``nvidia.com/gpu: 8`` by default), watches
pods (all namespaces, or one namespace and/or a label selector), binds the unscheduled ones that fit the
node to it, and runs each bound pod's **first container** as a local subprocess. The container image is
ignored; only ``command`` + ``args`` (``args`` alone when there is no ``command``), ``env``/``envFrom``,
``workingDir`` and ``volumeMounts`` matter. Init containers and other containers are not run (the others are
reported in the same state as the first one). Pod status goes back through ``pods/status`` as a kubelet
would report it (phase, conditions, containerStatuses with running/terminated state, exit code, reason,
termination message), so the real job controller drives the Job's status from it.

Files. Everything lives under ``root`` (a temp dir unless given):

* ``<root>/pvc/<claimName>/`` is the volume of PersistentVolumeClaim ``claimName`` (the claim's namespace is
  not part of the path: use distinct claim names); a mount's ``subPath`` is a folder inside it. Tests may
  pre-fill or inspect it: :meth:`FakeKubelet.pvc_path`.
* ``<root>/pods/<namespace>/<pod>/`` holds each pod's emptyDir/configMap/secret/projected/downwardAPI
  volumes (``volumes/<name>``), its termination-message file, its working dir (``work``, used when the
  container's ``workingDir`` is unset or does not exist on this machine) and its log (``<container>.log``,
  stdout and stderr together, across restarts): :meth:`FakeKubelet.log_path` / :meth:`FakeKubelet.logs`.
* ``hostPath`` volumes are the host path itself.

Logs. The harness serves the kubelet API's ``/containerLogs/{namespace}/{pod}/{container}`` over HTTPS on a
free port of 127.0.0.1 (a self-signed certificate made with ``openssl``; the Node's ``InternalIP`` and
``daemonEndpoints.kubeletEndpoint.Port`` point there), so ``GET .../pods/{pod}/log`` (``kubectl logs``,
``read_namespaced_pod_log``) works through the API server. ``follow`` streams new bytes until the pod's runner
has ended (across restarts, unlike a real kubelet) or the client disconnects; ``tailLines`` and ``limitBytes``
are honoured; ``sinceSeconds`` is approximated by the file's mtime (all or nothing of what is already written);
``timestamps`` and ``previous`` are ignored. Clients are not authenticated.

Paths. The process sees the host's filesystem, not the container's, so every ``mountPath`` (and the
container's ``terminationMessagePath``, default ``/dev/termination-log``) that appears as a path in the
argv, in env values or in ``workingDir`` is rewritten to the mapped host folder: with ``/data`` mounted from
claim ``out``, ``/data/x`` and ``--output=/data`` become ``<root>/pvc/out/x`` and
``--output=<root>/pvc/out``, while ``/database`` is left alone. Paths the program builds itself from pieces
are not rewritten; for those the JSON object ``{mountPath: hostPath}`` is in the env var
``KUBELET_HARNESS_MOUNTS``. ``python``/``python3`` as argv[0] mean this interpreter (``command_map``), and
this interpreter's bin folder is first on PATH, so console scripts of the test venv resolve.

Lifecycle. ``restartPolicy`` Never/OnFailure/Always is honoured (restarts after ``restart_delay`` seconds,
counting ``restartCount``), as is the pod's ``activeDeadlineSeconds`` (the pod then fails with reason
DeadlineExceeded). When a pod is deleted or gets a deletionTimestamp, its process group is killed (SIGTERM,
then SIGKILL after the grace period, capped at ``max_grace``), a Failed status is reported and the deletion
is confirmed with grace period 0 so the pod disappears. Unschedulable pods (requests above what the node has
free) get ``PodScheduled=False``/``Unschedulable`` and are retried when a pod finishes. nodeSelector,
affinity and taints are ignored.

    kubelet = FakeKubelet(api_client, namespace="ns1", root=tmp_path)
    kubelet.start()
    ...              # create Jobs; read kubelet.pvc_path("out"), kubelet.logs("ns1", pod_name)
    kubelet.stop()   # kills the processes, force-deletes its pods, deletes its Node
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import select
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
DEFAULT_CAPACITY = {"cpu": "16", "memory": "64Gi", "pods": "110", "ephemeral-storage": "200Gi"}
_SUFFIX = {
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
}


def parse_quantity(q: str | int | float) -> float:
    """A Kubernetes quantity ("500m", "2Gi", "8") as a float."""
    m = re.fullmatch(r"([0-9.eE+-]+?)([a-zA-Z]{0,2})", str(q).strip())
    if not m or (m.group(2) and m.group(2) not in _SUFFIX):
        raise ValueError(f"bad quantity {q!r}")
    return float(m.group(1)) * _SUFFIX.get(m.group(2), 1.0)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _raw(fn, *args, **kwargs) -> dict:
    """Calls a generated API method and returns the JSON body as a dict (no model round trip)."""
    return json.loads(fn(*args, _preload_content=False, **kwargs).data or b"{}")


def pod_requests(pod: dict) -> dict[str, float]:
    """Summed requests of a pod's containers (limits stand in for missing requests, as the API defaults)."""
    total: dict[str, float] = {}
    for c in pod["spec"].get("containers", []):
        res = c.get("resources") or {}
        merged = {**(res.get("limits") or {}), **(res.get("requests") or {})}
        for k, v in merged.items():
            total[k] = total.get(k, 0.0) + parse_quantity(v)
    return total


@dataclass
class _Pod:
    """A pod bound to the harness's node; ``kill`` is set when the pod is deleted or the harness stops."""

    uid: str
    namespace: str
    name: str
    requests: dict[str, float]
    kill: threading.Event = field(default_factory=threading.Event)
    deleted: bool = False
    done: bool = False
    thread: threading.Thread | None = None


class FakeKubelet:
    """See the module docstring. Thread-safe; :meth:`start` / :meth:`stop` (also a context manager)."""

    def __init__(
        self,
        api_client: client.ApiClient,
        *,
        node_name: str | None = None,
        root: Path | str | None = None,
        namespace: str | None = None,
        label_selector: str | None = None,
        capacity: dict[str, str] | None = None,
        extended_resources: dict[str, str] | None = None,
        node_labels: dict[str, str] | None = None,
        command_map: dict[str, str] | None = None,
        extra_env: dict[str, str] | None = None,
        restart_delay: float = 1.0,
        max_grace: float = 5.0,
    ) -> None:
        self.api = api_client
        self.core = client.CoreV1Api(api_client)
        self.node_name = node_name or f"harness-{uuid.uuid4().hex[:6]}"
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="kubelet-"))
        self.namespace = namespace
        self.label_selector = label_selector
        gpus = {"nvidia.com/gpu": "8"} if extended_resources is None else extended_resources
        self.capacity = {**DEFAULT_CAPACITY, **(capacity or {}), **gpus}
        self.node_labels = node_labels or {}
        self.command_map = {"python": sys.executable, "python3": sys.executable, **(command_map or {})}
        self.extra_env = extra_env or {}
        self.restart_delay = restart_delay
        self.max_grace = max_grace
        self._lock = threading.Lock()
        self._pods: dict[str, _Pod] = {}  # uid -> pod this harness runs (or ran)
        self._unschedulable: set[str] = set()
        self._containers: dict[tuple[str, str], str] = {}  # (namespace, pod) -> the container that ran
        self._stop = threading.Event()
        self._watch: watch.Watch | None = None
        self._thread: threading.Thread | None = None
        self._server: ThreadingHTTPServer | None = None

    # -- paths ----------------------------------------------------------------------------------------------
    def pvc_path(self, claim: str, sub_path: str = "") -> Path:
        """The host folder that stands for PersistentVolumeClaim ``claim`` (created on demand)."""
        p = self.root / "pvc" / claim / sub_path
        p.mkdir(parents=True, exist_ok=True)
        return p

    def pod_dir(self, namespace: str, name: str) -> Path:
        return self.root / "pods" / namespace / name

    def log_path(self, namespace: str, name: str, container: str | None = None) -> Path:
        """The pod's log file (its first container's unless ``container`` is named)."""
        if container is None:
            container = self._containers.get((namespace, name))
        if container is None:
            pod = _raw(self.core.read_namespaced_pod, name, namespace)
            container = pod["spec"]["containers"][0]["name"]
        return self.pod_dir(namespace, name) / f"{container}.log"

    def logs(self, namespace: str, name: str, container: str | None = None) -> str:
        try:
            return self.log_path(namespace, name, container).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- lifecycle ------------------------------------------------------------------------------------------
    def __enter__(self) -> FakeKubelet:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self._serve_logs()
        self._register_node()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch_loop, name=f"kubelet-{self.node_name}", daemon=True)
        self._thread.start()

    def stop(self, delete_pods: bool = True, delete_node: bool = True) -> None:
        """Stops watching, kills every process, force-deletes the pods it ran and deletes its Node."""
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            pods = list(self._pods.values())
        for p in pods:
            p.kill.set()
        for p in pods:
            if p.thread is not None:
                p.thread.join(timeout=self.max_grace + 10)
        if delete_pods:
            for p in pods:
                self._confirm_deletion(p)
        if delete_node:
            try:
                self.core.delete_node(self.node_name, _preload_content=False)
            except ApiException as e:
                if e.status != 404:
                    raise
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- node -----------------------------------------------------------------------------------------------
    def _register_node(self) -> None:
        labels = {
            "kubernetes.io/hostname": self.node_name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            **self.node_labels,
        }
        body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.node_name, "labels": labels}}
        try:
            self.core.create_node(body, _preload_content=False)
        except ApiException as e:
            if e.status != 409:
                raise
        now = _now()
        status = {
            "capacity": self.capacity,
            "allocatable": self.capacity,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "envtest kubelet harness is ready",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.node_name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self._server.server_address[1]}},
            "nodeInfo": {
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
                "kernelVersion": "",
                "osImage": "",
                "containerRuntimeVersion": "harness://1",
                "kubeletVersion": "harness",
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }
        self.core.patch_node_status(
            self.node_name, {"status": status}, _content_type=MERGE_PATCH, _preload_content=False
        )

    # -- the kubelet API: container logs ----------------------------------------------------------------------
    def _serve_logs(self) -> None:
        """Starts the HTTPS server of ``/containerLogs/...`` (see the module docstring) in a daemon thread."""
        if self._server is not None:
            return
        pki = self.root / "kubelet-pki"
        pki.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "kubelet.key", "-out", "kubelet.crt", "-days", "3650", "-subj", f"/CN={self.node_name}",
             "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
            cwd=pki, check=True, capture_output=True,
        )  # fmt: skip
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pki / "kubelet.crt", pki / "kubelet.key")
        server = ThreadingHTTPServer(("127.0.0.1", 0), _LogHandler)
        server.daemon_threads = True
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        server.kubelet = self  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, name=f"kubelet-api-{self.node_name}", daemon=True).start()
        self._server = server

    def _running(self, namespace: str, name: str) -> bool:
        """Whether a runner of this pod may still write to its log."""
        with self._lock:
            return not self._stop.is_set() and any(
                p.namespace == namespace and p.name == name and not p.done for p in self._pods.values()
            )

    # -- watching -------------------------------------------------------------------------------------------
    def _list_fn(self):
        if self.namespace:
            return self.core.list_namespaced_pod, (self.namespace,)
        return self.core.list_pod_for_all_namespaces, ()

    def _watch_loop(self) -> None:
        fn, args = self._list_fn()
        sel = {"label_selector": self.label_selector} if self.label_selector else {}
        rv = None
        while not self._stop.is_set():
            try:
                if rv is None:  # (re)list: reconcile everything, then watch from the list's version
                    listing = _raw(fn, *args, **sel)
                    rv = listing["metadata"]["resourceVersion"]
                    seen = set()
                    for pod in listing.get("items", []):
                        seen.add(pod["metadata"]["uid"])
                        self._on_pod(pod)
                    with self._lock:
                        gone = [p for uid, p in self._pods.items() if uid not in seen]
                    for p in gone:
                        self._on_deleted(p.uid)
                w = _RawWatch()
                self._watch = w
                for ev in w.stream(
                    fn, *args, resource_version=rv, timeout_seconds=20, allow_watch_bookmarks=True, **sel
                ):
                    if self._stop.is_set():
                        break
                    obj = ev["raw_object"]
                    if ev["type"] == "ERROR":
                        rv = None  # usually 410 Gone: relist
                        break
                    rv = obj.get("metadata", {}).get("resourceVersion", rv)
                    if ev["type"] == "DELETED":
                        self._on_deleted(obj["metadata"]["uid"])
                    elif ev["type"] in ("ADDED", "MODIFIED"):
                        self._on_pod(obj)
            except ApiException as e:
                rv = None
                if not self._stop.is_set():
                    log.warning("kubelet harness: watch failed (%s), relisting", e.status)
                    time.sleep(0.5)
            except Exception:  # a dropped connection, say: relist and carry on
                rv = None
                if not self._stop.is_set():
                    log.exception("kubelet harness: watch loop error, relisting")
                    time.sleep(0.5)

    def _on_pod(self, pod: dict) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        uid = meta["uid"]
        node = spec.get("nodeName")
        if meta.get("deletionTimestamp"):
            if node == self.node_name:
                self._on_deleted(uid, pod)
            return
        if not node:
            self._schedule(pod)
            return
        if node != self.node_name or pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
            return
        with self._lock:
            p = self._pods.setdefault(uid, _Pod(uid, meta["namespace"], meta["name"], pod_requests(pod)))
            if p.thread is not None or p.done or self._stop.is_set():
                return
            p.thread = threading.Thread(
                target=self._run_pod, args=(p, pod), daemon=True, name=f"pod-{p.namespace}-{p.name}"
            )
        p.thread.start()

    def _on_deleted(self, uid: str, pod: dict | None = None) -> None:
        """``pod`` is the object when it has a deletionTimestamp, None when it is gone from the API."""
        with self._lock:
            p = self._pods.get(uid)
        if p is None:
            if pod is not None:  # bound to this node, not running (any more): just confirm
                self._confirm_deletion(_Pod(uid, pod["metadata"]["namespace"], pod["metadata"]["name"], {}))
            return
        p.deleted = True
        p.kill.set()
        if p.thread is None or not p.thread.is_alive():  # nothing running: finish here, else the runner does
            self._forget(p, confirm=pod is not None)

    def _forget(self, p: _Pod, confirm: bool) -> None:
        p.done = True
        if confirm:
            self._confirm_deletion(p)
        with self._lock:
            self._pods.pop(p.uid, None)

    # -- scheduling -----------------------------------------------------------------------------------------
    def _free(self) -> dict[str, float]:
        free = {k: parse_quantity(v) for k, v in self.capacity.items()}
        with self._lock:
            running = [p for p in self._pods.values() if not p.done]
        for p in running:
            for k, v in p.requests.items():
                free[k] = free.get(k, 0.0) - v
        free["pods"] = free.get("pods", 0.0) - len(running)
        return free

    def _schedule(self, pod: dict) -> None:
        meta = pod["metadata"]
        free = self._free()
        short = sorted(k for k, v in pod_requests(pod).items() if v > free.get(k, 0.0) + 1e-9)
        if free.get("pods", 0.0) < 1:
            short.append("pods")
        if short:
            with self._lock:
                if meta["uid"] in self._unschedulable:
                    return
                self._unschedulable.add(meta["uid"])
            msg = "0/1 nodes are available: " + ", ".join(f"1 Insufficient {k}" for k in short) + "."
            cond = {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": msg,
                "lastTransitionTime": _now(),
            }
            self._patch_status(meta["namespace"], meta["name"], {"conditions": [cond]})
            return
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": meta["name"]},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name},
        }
        try:
            self.core.create_namespaced_pod_binding(meta["name"], meta["namespace"], body, _preload_content=False)
            with self._lock:  # count it against the node's capacity right away
                self._unschedulable.discard(meta["uid"])
                self._pods.setdefault(
                    meta["uid"], _Pod(meta["uid"], meta["namespace"], meta["name"], pod_requests(pod))
                )
        except ApiException as e:
            if e.status not in (404, 409):  # gone, or bound by someone else meanwhile
                log.warning("kubelet harness: binding %s/%s failed: %s", meta["namespace"], meta["name"], e)

    def _retry_unschedulable(self) -> None:
        if not self._unschedulable or self._stop.is_set():
            return
        fn, args = self._list_fn()
        sel = {"label_selector": self.label_selector} if self.label_selector else {}
        try:
            pods = _raw(fn, *args, field_selector="spec.nodeName=", **sel).get("items", [])
        except ApiException:
            return
        with self._lock:
            self._unschedulable.clear()
        for pod in pods:
            if not pod["metadata"].get("deletionTimestamp"):
                self._schedule(pod)

    # -- running --------------------------------------------------------------------------------------------
    def _run_pod(self, p: _Pod, pod: dict) -> None:
        try:
            self._run_pod_inner(p, pod)
        except Exception as e:  # report instead of leaving the pod Running forever
            log.exception("kubelet harness: pod %s/%s", p.namespace, p.name)
            if not p.kill.is_set():
                self._patch_status(
                    p.namespace,
                    p.name,
                    {"phase": "Failed", "reason": "HarnessError", "message": f"kubelet harness: {e}"},
                )
        finally:
            p.done = True
            if p.deleted:
                self._forget(p, confirm=True)
            self._retry_unschedulable()

    def _run_pod_inner(self, p: _Pod, pod: dict) -> None:
        spec = pod["spec"]
        c = spec["containers"][0]
        self._containers[(p.namespace, p.name)] = c["name"]
        pdir = self.pod_dir(p.namespace, p.name)
        (pdir / "work").mkdir(parents=True, exist_ok=True)
        started = _now()
        t0 = time.monotonic()

        # Volumes may reference ConfigMaps/Secrets that do not exist yet: wait like a kubelet does.
        while True:
            try:
                mounts = self._mounts(pod, c, pdir)
                env = self._env(pod, c)
                break
            except _NotReady as e:
                self._report(p, pod, started, waiting=("ContainerCreating", str(e)))
                if p.kill.wait(1.0):
                    return

        term_path = c.get("terminationMessagePath") or "/dev/termination-log"
        term_file = pdir / "termination-log"
        mounts[term_path] = term_file
        rewrite = _rewriter(mounts)
        env = {k: rewrite(v) for k, v in env.items()}
        argv = [_expand(rewrite(a), env) for a in (c.get("command") or []) + (c.get("args") or [])]
        if not argv:
            raise RuntimeError(f"container {c['name']!r} has no command/args; the harness cannot run images")
        argv[0] = self.command_map.get(argv[0], argv[0])
        cwd = Path(rewrite(c["workingDir"])) if c.get("workingDir") else pdir / "work"
        if not cwd.is_dir():
            cwd = pdir / "work"
        base = {**os.environ, **self.extra_env}
        base["PATH"] = os.path.dirname(sys.executable) + os.pathsep + base.get("PATH", "")
        base["HOSTNAME"] = p.name
        base["KUBELET_HARNESS_MOUNTS"] = json.dumps({k: str(v) for k, v in mounts.items()})
        full_env = {**base, **env}
        deadline = spec.get("activeDeadlineSeconds")
        grace = min(float(spec.get("terminationGracePeriodSeconds", 30)), self.max_grace)
        policy = spec.get("restartPolicy", "Always")
        log_file = pdir / f"{c['name']}.log"
        restarts, last = 0, None

        while True:
            term_file.write_text("")
            with open(log_file, "ab") as out:
                proc = subprocess.Popen(
                    argv,
                    env=full_env,
                    cwd=cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            run_started = _now()
            running = {"running": {"startedAt": run_started}}
            self._report(p, pod, started, state=running, restarts=restarts, last=last, cid=proc.pid)
            reason = None
            while proc.poll() is None:
                if p.kill.wait(0.1):
                    reason = "Killed"
                elif deadline is not None and time.monotonic() - t0 > float(deadline):
                    reason = "DeadlineExceeded"
                if reason:
                    _kill_group(proc, grace)
                    break
            rc = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
            message = term_file.read_text(errors="replace")[:4096]
            if not message and rc != 0 and c.get("terminationMessagePolicy") == "FallbackToLogsOnError":
                message = "\n".join(self.logs(p.namespace, p.name, c["name"]).splitlines()[-80:])[-2048:]
            terminated = {
                "exitCode": rc,
                "reason": "Completed" if rc == 0 else "Error",
                "startedAt": run_started,
                "finishedAt": _now(),
                "containerID": f"harness://{proc.pid}",
            }
            if message:
                terminated["message"] = message
            if (
                reason is None
                and not self._stop.is_set()
                and (policy == "Always" or (policy == "OnFailure" and rc != 0))
            ):
                restarts, last = restarts + 1, {"terminated": terminated}
                self._report(
                    p,
                    pod,
                    started,
                    waiting=("CrashLoopBackOff" if rc else "Completed", ""),
                    restarts=restarts,
                    last=last,
                )
                if p.kill.wait(self.restart_delay):
                    return
                continue
            extra: dict[str, Any] = {}
            if reason == "DeadlineExceeded":
                extra = {
                    "reason": "DeadlineExceeded",
                    "message": f"Pod was active on the node longer than the specified deadline ({deadline}s)",
                }
            if reason == "Killed" and not p.deleted:
                return  # the harness is stopping: leave the pod's status alone
            phase = "Succeeded" if rc == 0 and reason is None else "Failed"
            self._report(
                p,
                pod,
                started,
                state={"terminated": terminated},
                restarts=restarts,
                last=last,
                phase=phase,
                extra=extra,
            )
            return

    def _report(
        self,
        p: _Pod,
        pod: dict,
        started: str,
        *,
        state: dict | None = None,
        waiting: tuple[str, str] | None = None,
        restarts: int = 0,
        last: dict | None = None,
        phase: str = "Running",
        cid: int | None = None,
        extra: dict | None = None,
    ) -> None:
        if waiting is not None:
            state = {"waiting": {"reason": waiting[0], "message": waiting[1]} if waiting[1] else {"reason": waiting[0]}}
            phase = "Pending" if restarts == 0 else "Running"
        assert state is not None
        ready = "running" in state
        statuses = []
        for c in pod["spec"]["containers"]:
            s: dict[str, Any] = {
                "name": c["name"],
                "image": c.get("image", ""),
                "imageID": "",
                "ready": ready,
                "started": ready,
                "restartCount": restarts,
                "state": state,
            }
            if last:
                s["lastState"] = last
            if cid is not None:
                s["containerID"] = f"harness://{cid}"
            elif "terminated" in state:
                s["containerID"] = state["terminated"]["containerID"]
            statuses.append(s)
        now = _now()
        done = phase in ("Succeeded", "Failed")

        def cond(t: str, ok: bool, reason: str | None = None) -> dict:
            d = {"type": t, "status": "True" if ok else "False", "lastTransitionTime": now}
            if reason:
                d["reason"] = reason
            return d

        not_ready_reason = "PodCompleted" if done else "ContainersNotReady"
        status = {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": started,
            "conditions": [
                cond("PodReadyToStartContainers", not done),
                cond("Initialized", True, "PodCompleted" if done else None),
                cond("Ready", ready, None if ready else not_ready_reason),
                cond("ContainersReady", ready, None if ready else not_ready_reason),
                cond("PodScheduled", True),
            ],
            "containerStatuses": statuses,
            **(extra or {}),
        }
        self._patch_status(p.namespace, p.name, status)

    def _patch_status(self, namespace: str, name: str, status: dict) -> None:
        try:
            self.core.patch_namespaced_pod_status(
                name, namespace, {"status": status}, _content_type=MERGE_PATCH, _preload_content=False
            )
        except ApiException as e:
            if e.status != 404:
                log.warning("kubelet harness: status of %s/%s: %s", namespace, name, e.body)

    def _confirm_deletion(self, p: _Pod) -> None:
        try:
            self.core.delete_namespaced_pod(
                p.name,
                p.namespace,
                grace_period_seconds=0,
                body={"gracePeriodSeconds": 0, "preconditions": {"uid": p.uid}},
                _preload_content=False,
            )
        except ApiException as e:
            if e.status not in (404, 409):
                log.warning("kubelet harness: deleting %s/%s: %s", p.namespace, p.name, e)

    # -- volumes and env ------------------------------------------------------------------------------------
    def _mounts(self, pod: dict, c: dict, pdir: Path) -> dict[str, Path]:
        ns = pod["metadata"]["namespace"]
        volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        hosts: dict[str, Path] = {}
        for name, v in volumes.items():
            if "persistentVolumeClaim" in v:
                hosts[name] = self.pvc_path(v["persistentVolumeClaim"]["claimName"])
            elif "hostPath" in v:
                hosts[name] = Path(v["hostPath"]["path"])
            else:
                d = pdir / "volumes" / name
                d.mkdir(parents=True, exist_ok=True)
                self._fill(ns, pod, v, d)
                hosts[name] = d
        mounts: dict[str, Path] = {}
        for m in c.get("volumeMounts") or []:
            host = hosts[m["name"]]
            if m.get("subPath"):
                host = host / m["subPath"]
                host.mkdir(parents=True, exist_ok=True)
            mounts[m["mountPath"]] = host
        return mounts

    def _fill(self, ns: str, pod: dict, v: dict, d: Path) -> None:
        sources = v["projected"].get("sources", []) if "projected" in v else [v]
        for src in sources:
            if "configMap" in src:
                ref = src["configMap"]
                obj = self._get("config_map", ns, ref.get("name", ""), ref.get("optional", False))
                data = {
                    **(obj.get("data") or {}),
                    **{k: base64.b64decode(b) for k, b in (obj.get("binaryData") or {}).items()},
                }
                _write_items(d, data, ref.get("items"))
            elif "secret" in src:
                ref = src["secret"]
                name = ref.get("secretName") or ref.get("name", "")
                obj = self._get("secret", ns, name, ref.get("optional", False))
                data = {k: base64.b64decode(b) for k, b in (obj.get("data") or {}).items()}
                _write_items(d, data, ref.get("items"))
            elif "downwardAPI" in src:
                data = {
                    i["path"]: _field(pod, i["fieldRef"]["fieldPath"])
                    for i in src["downwardAPI"].get("items", [])
                    if "fieldRef" in i
                }
                _write_items(d, data, None)
            elif "serviceAccountToken" in src:
                sa = pod["spec"].get("serviceAccountName") or "default"
                req = {
                    "spec": {
                        "audiences": [src["serviceAccountToken"]["audience"]]
                        if src["serviceAccountToken"].get("audience")
                        else [],
                        "expirationSeconds": src["serviceAccountToken"].get("expirationSeconds", 3600),
                    }
                }
                try:
                    tok = _raw(self.core.create_namespaced_service_account_token, sa, ns, req)
                    _write_items(d, {src["serviceAccountToken"]["path"]: tok["status"]["token"]}, None)
                except ApiException as e:
                    raise _NotReady(f"token for serviceaccount {sa}: {e.reason}") from e

    def _get(self, kind: str, ns: str, name: str, optional: bool) -> dict:
        try:
            return _raw(getattr(self.core, f"read_namespaced_{kind}"), name, ns)
        except ApiException as e:
            if e.status == 404 and optional:
                return {}
            raise _NotReady(f"{kind.replace('_', '')} {ns}/{name}: {e.reason}") from e

    def _env(self, pod: dict, c: dict) -> dict[str, str]:
        ns = pod["metadata"]["namespace"]
        env: dict[str, str] = {}
        for src in c.get("envFrom") or []:
            prefix = src.get("prefix", "")
            if "configMapRef" in src:
                ref = src["configMapRef"]
                data = self._get("config_map", ns, ref["name"], ref.get("optional", False)).get("data") or {}
            else:
                ref = src["secretRef"]
                raw = self._get("secret", ns, ref["name"], ref.get("optional", False)).get("data") or {}
                data = {k: base64.b64decode(v).decode() for k, v in raw.items()}
            env.update({prefix + k: v for k, v in data.items()})
        for e in c.get("env") or []:
            vf = e.get("valueFrom")
            if vf is None:
                env[e["name"]] = _expand(e.get("value", ""), env)
            elif "secretKeyRef" in vf or "configMapKeyRef" in vf:
                secret = "secretKeyRef" in vf
                ref = vf["secretKeyRef" if secret else "configMapKeyRef"]
                obj = self._get("secret" if secret else "config_map", ns, ref["name"], ref.get("optional", False))
                val = (obj.get("data") or {}).get(ref["key"])
                if val is None:
                    if ref.get("optional", False):
                        continue
                    raise _NotReady(f"key {ref['key']!r} not in {ref['name']}")
                env[e["name"]] = base64.b64decode(val).decode() if secret else val
            elif "fieldRef" in vf:
                env[e["name"]] = _field(pod, vf["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in vf:  # the raw quantity; divisors are not applied
                res = c.get("resources") or {}
                kind, _, rname = vf["resourceFieldRef"]["resource"].partition(".")
                env[e["name"]] = str((res.get(kind) or {}).get(rname, "0"))
        return env


class _LogHandler(BaseHTTPRequestHandler):
    """``GET /containerLogs/{namespace}/{pod}/{container}?follow=&tailLines=&limitBytes=&sinceSeconds=``."""

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        kubelet: FakeKubelet = self.server.kubelet  # type: ignore[attr-defined]
        url = urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        path = kubelet.pod_dir(parts[1], parts[2]) / f"{parts[3]}.log" if len(parts) == 4 else None
        if parts[0] != "containerLogs" or path is None or not path.is_file():
            self.send_error(404, "no such container log")
            return
        follow = query.get("follow") in ("true", "1")
        limit = int(query["limitBytes"]) if "limitBytes" in query else None
        with open(path, "rb") as f:
            data = f.read()
            since = query.get("sinceSeconds")
            if since and os.path.getmtime(path) < time.time() - float(since):
                data = b""
            if "tailLines" in query:
                n = int(query["tailLines"])
                data = b"".join(data.splitlines(keepends=True)[-n:]) if n > 0 else b""
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                while True:
                    if limit is not None:
                        data, limit = data[:limit], limit - len(data[:limit])
                    self.wfile.write(data)
                    self.wfile.flush()
                    if not follow or limit == 0:
                        return
                    running = kubelet._running(parts[1], parts[2])  # read what is there after it ended too
                    data = f.read()
                    if not data and not running:
                        return
                    if not data and self._client_gone(0.2):
                        return
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                return

    def _client_gone(self, wait: float) -> bool:
        """Waits up to ``wait`` seconds for the client to close the connection (it sends nothing after its
        request, so anything readable means it is gone)."""
        if not select.select([self.connection], [], [], wait)[0]:
            return False
        try:
            return not self.connection.recv(1)
        except (OSError, ssl.SSLError):
            return True

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet: tests read the pods' logs instead
        log.debug("kubelet harness api: " + format, *args)


class _NotReady(Exception):
    """Something the pod needs (a ConfigMap, a Secret, a key) does not exist yet."""


class _RawWatch(watch.Watch):
    """A Watch that leaves objects as dicts (``raw_object``) instead of building client models."""

    def get_return_type(self, func):
        return None


def _write_items(d: Path, data: dict[str, str | bytes], items: list[dict] | None) -> None:
    pairs = [(i["key"], i["path"]) for i in items] if items else [(k, k) for k in data]
    for key, rel in pairs:
        if key not in data:
            continue
        target = d / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        val = data[key]
        target.write_bytes(val if isinstance(val, bytes) else val.encode())


def _field(pod: dict, path: str) -> str:
    meta = pod["metadata"]
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if m:
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    simple = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"],
        "spec.nodeName": pod["spec"].get("nodeName", ""),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
        "status.hostIP": "127.0.0.1",
        "status.podIP": "127.0.0.1",
    }
    return simple.get(path, "")


def _rewriter(mounts: dict[str, Path]):
    """A function replacing each mount path (as a whole path prefix) in a string with its host folder."""
    keys = sorted((k.rstrip("/") for k in mounts if k.rstrip("/")), key=len, reverse=True)
    if not keys:
        return lambda s: s
    table = {k.rstrip("/"): str(v) for k, v in mounts.items()}
    pattern = re.compile(r"(?<![\w.\-/])(" + "|".join(map(re.escape, keys)) + r")(?![\w.\-])")
    return lambda s: pattern.sub(lambda m: table[m.group(1)], s)


def _expand(s: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: known variables are replaced, $$ escapes, unknown references stay."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
        lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
        s,
    )


def _kill_group(proc: subprocess.Popen, grace: float) -> None:
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
    proc.wait()
