"""The Kubernetes backend: a job is a ModelMerge custom resource (named after the job id) in one namespace.

POST creates the resource (and, for an hf_token, a Secret the resource owns and references); status and lists
are served from a watch-fed cache of the namespace's ModelMerges (read-your-writes: what this process created or
patched is put in the cache at once); cancel sets `spec.cancel`; logs come from the Job's newest pod; downloads
read the output PVC, mounted (read-only) into the API pod at the output root."""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from modelmerge.contract import (
    API_GROUP,
    API_VERSION,
    KIND,
    PLURAL,
    MergeRequest,
    ModelMergeSpec,
    format_validation_error,
)
from modelmerge_api import outputs
from modelmerge_api.errors import ApiError, Conflict, Unavailable, job_not_found
from modelmerge_api.jobs import ACTIVE, Job, WouldBlock, request_params

log = logging.getLogger("modelmerge.api.kube")

STATUS_OF_PHASE = {None: "pending", "Pending": "pending", "Running": "running", "Succeeded": "completed",
                   "Failed": "failed", "Cancelled": "cancelled"}
MERGE_PATCH = "application/merge-patch+json"
MANAGED_BY = {"app.kubernetes.io/managed-by": "modelmerge-api"}
TOKEN_KEY = "token"
HEALTH_TTL_S = 5.0


def _api_error(exc: ApiException, what: str) -> ApiError:
    """An API server error as the REST API reports it: validation → 400, conflicts → 409, others → 502."""
    try:
        body = json.loads(exc.body or "{}")
    except ValueError:
        body = {}
    message = body.get("message") or exc.reason or str(exc.status)
    if exc.status == 422:
        causes = (body.get("details") or {}).get("causes") or []
        details = [{"field": c.get("field", "spec").removeprefix("spec."), "message": c.get("message", "")}
                   for c in causes]
        return ApiError(400, f"{what} rejected by the Kubernetes API server: {message}", details or None)
    if exc.status == 409:
        return Conflict(f"{what}: {message}")
    if exc.status == 403:
        return ApiError(403, f"{what} forbidden by the Kubernetes API server: {message}")
    return ApiError(502, f"{what} failed: Kubernetes API error {exc.status}: {message}")


def in_cluster_namespace() -> str | None:
    try:
        return Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read_text().strip()
    except OSError:
        return None


class KubernetesBackend:
    name = "kubernetes"

    def __init__(self, api_client: client.ApiClient, namespace: str, output_root: Path | None,
                 spec_defaults: dict[str, Any] | None = None) -> None:
        self.api = api_client
        self.namespace = namespace
        self.output_root = Path(output_root or "/output")
        self.spec_defaults = spec_defaults or {}
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self._cache: dict[str, _Entry] = {}
        self._newest_first: list[_Entry] | None = None  # sorted view of the cache, rebuilt after changes
        self._lock = threading.Lock()
        self._synced = threading.Event()
        self._stopping = threading.Event()
        self._watch: watch.Watch | None = None
        self._thread: threading.Thread | None = None
        self._health: tuple[float, dict[str, Any]] = (0.0, {})
        self._check_defaults()

    @classmethod
    def from_config(cls, kubeconfig: str | None, namespace: str | None, output_root: Path | None,
                    spec_defaults: dict[str, Any] | None = None) -> KubernetesBackend:
        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig)
        else:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
        if namespace is None:
            namespace = in_cluster_namespace()
        if namespace is None:
            try:
                _, context = config.list_kube_config_contexts(config_file=kubeconfig)
                namespace = context["context"].get("namespace")
            except (config.ConfigException, OSError, TypeError, KeyError):
                namespace = None
        return cls(client.ApiClient(), namespace or "default", output_root, spec_defaults)

    def _check_defaults(self) -> None:
        """Bad chart/flag configuration fails at start, not on the first POST."""
        try:
            self._spec("check", MergeRequest(base_model="a", models_to_merge=["b"], merge_method="task_arithmetic"),
                       "check", None)
        except ApiError as exc:
            raise SystemExit(f"invalid Kubernetes spec defaults (--spec-defaults / --output-pvc): {exc.message}") \
                from None

    # ---- lifecycle and the watch cache ----------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch_loop, name="modelmerge-watch", daemon=True)
        self._thread.start()
        self._synced.wait(timeout=10)

    def stop(self) -> None:
        self._stopping.set()
        if self._watch is not None:
            self._watch.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _list_args(self) -> tuple[str, str, str, str]:
        return API_GROUP, API_VERSION, self.namespace, PLURAL

    def _watch_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                version = self._relist()
                self._follow(version)
            except Exception as exc:  # 410 Gone, dropped connections and the like: relist and go on
                if self._stopping.is_set():
                    return
                if getattr(exc, "status", None) != 410:
                    log.warning("watching ModelMerges failed (%s); retrying", exc)
                    self._stopping.wait(1.0)

    def _relist(self) -> str:
        listing = self.custom.list_namespaced_custom_object(*self._list_args())
        entries = {item["metadata"]["name"]: _Entry(item, self._job(item)) for item in listing.get("items", [])}
        with self._lock:
            self._cache, self._newest_first = entries, None
        self._synced.set()
        return listing["metadata"]["resourceVersion"]

    def _follow(self, version: str) -> None:
        self._watch = watch.Watch()
        for event in self._watch.stream(self.custom.list_namespaced_custom_object, *self._list_args(),
                                        resource_version=version, timeout_seconds=300,
                                        allow_watch_bookmarks=True):
            kind, obj = event["type"], event["object"]
            if self._stopping.is_set() or kind == "ERROR":
                return
            if kind == "BOOKMARK":
                continue
            self._remember(obj, deleted=kind == "DELETED")

    def _remember(self, obj: dict[str, Any], deleted: bool = False) -> _Entry | None:
        """Keep the newest version of an object (by resourceVersion) so a late watch event never rolls back;
        its job view is computed once here, not on every read."""
        name = obj["metadata"]["name"]
        entry = None if deleted else _Entry(obj, self._job(obj))
        with self._lock:
            known = self._cache.get(name)
            if entry is not None and known is not None and _version(obj) < _version(known.obj):
                return known
            if entry is None:
                self._cache.pop(name, None)
            else:
                self._cache[name] = entry
            self._newest_first = None
            return entry

    # ---- the interface -----------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        checked, info = self._health
        if time.monotonic() - checked < HEALTH_TTL_S:
            return dict(info)
        try:
            self.custom.list_namespaced_custom_object(*self._list_args(), limit=1)
            info = {"merging_available": True, "namespace": self.namespace, "watching": self._synced.is_set()}
        except Exception as exc:
            reason = "the ModelMerge CRD is not installed" if getattr(exc, "status", None) == 404 \
                else f"the Kubernetes API is not usable: {getattr(exc, 'reason', None) or exc}"
            info = {"merging_available": False, "namespace": self.namespace, "reason": reason}
        self._health = (time.monotonic(), info)
        return dict(info)

    def submit(self, job_id: str, request: MergeRequest, output_rel: str, hf_token: str | None) -> Job:
        spec = self._spec(job_id, request, output_rel, hf_token)
        self._check_output_free(job_id, spec)
        body = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND,
                "metadata": {"name": job_id, "labels": dict(MANAGED_BY)}, "spec": spec}
        secret = self._create_token_secret(job_id, hf_token) if hf_token else None
        try:
            created = self.custom.create_namespaced_custom_object(*self._list_args(), body)
        except ApiException as exc:
            if secret:
                self._delete_secret(secret)
            raise _api_error(exc, "ModelMerge") from None
        if secret:
            self._adopt_secret(secret, created)
        return self._remember(created).job

    def get(self, job_id: str, blocking: bool = True) -> Job:
        return self._entry(job_id, blocking).job

    def list(self, status: str | None, limit: int, offset: int, blocking: bool = True) -> tuple[list[Job], int]:
        jobs = [entry.job for entry in self._entries(blocking)]
        if status:
            jobs = [job for job in jobs if job.status == status]
        return jobs[offset:offset + limit], len(jobs)

    def cancel(self, job_id: str) -> Job:
        current = self._entry(job_id).job
        if current.status not in ACTIVE:
            raise Conflict(f"job {job_id!r} is already {current.status}; only pending or running jobs can "
                           "be cancelled")
        try:
            patched = self.custom.patch_namespaced_custom_object(
                *self._list_args(), job_id, {"spec": {"cancel": True}}, _content_type=MERGE_PATCH)
        except ApiException as exc:
            raise _api_error(exc, "cancelling the ModelMerge") from None
        return self._remember(patched).job

    def logs(self, job_id: str, follow: bool) -> Iterator[bytes]:
        obj = self._entry(job_id).obj
        pod = self._newest_pod((obj.get("status") or {}).get("jobName"))
        if pod is None:
            note = f"no merge pod yet (status: {_status(obj)})\n"
            return iter([note.encode()])
        try:
            response = self.core.read_namespaced_pod_log(pod, self.namespace, follow=follow,
                                                         _preload_content=False)
        except ApiException as exc:
            raise Unavailable(f"logs of pod {pod} are not available: {_api_error(exc, 'reading logs').message}") \
                from None
        return _stream(response)

    def stats(self) -> tuple[dict[str, int], list[float]]:
        counts: dict[str, int] = {}
        durations = []
        for job in (entry.job for entry in self._entries()):
            counts[job.status] = counts.get(job.status, 0) + 1
            if job.status == "completed" and (seconds := job.duration()) is not None:
                durations.append(seconds)
        return counts, durations

    def review_token(self, token: str) -> bool:
        """TokenReview: does the cluster authenticate this bearer token (e.g. a service-account token)?"""
        review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}}
        try:
            result = client.AuthenticationV1Api(self.api).create_token_review(review, _preload_content=False)
        except ApiException as exc:
            log.warning("TokenReview failed: %s %s", exc.status, exc.reason)
            return False
        return bool(json.loads(result.data).get("status", {}).get("authenticated"))

    # ---- helpers -----------------------------------------------------------------------------------

    def _spec(self, job_id: str, request: MergeRequest, output_rel: str, hf_token: str | None) -> dict[str, Any]:
        spec = {**self.spec_defaults, **request.model_dump(mode="json", exclude_none=True),
                "output_dir": output_rel}
        if hf_token:
            spec["hfTokenSecret"] = {"name": _secret_name(job_id), "key": TOKEN_KEY}
        try:
            return ModelMergeSpec.model_validate(spec).model_dump(mode="json", exclude_none=True)
        except ValidationError as exc:
            raise ApiError(400, "invalid ModelMerge spec: " + format_validation_error(exc)) from None

    def _output_rel(self, location: tuple[str | None, str | None, str]) -> str | None:
        """The output's path under the API's output root, when it is on the claim the API has mounted."""
        pvc, sub_path, output_dir = location
        if pvc != (self.spec_defaults.get("output") or {}).get("pvc"):
            return None
        return "/".join(p for p in (sub_path, output_dir) if p)

    def _check_output_free(self, name: str, spec: dict[str, Any]) -> None:
        where = _location(name, spec)
        for obj, job in self._entries():
            if job.status in ACTIVE and _location(job.job_id, obj.get("spec") or {}) == where:
                raise Conflict(f"output_dir: {where[2]!r} is the output of the active job {job.job_id!r}")
        relative = self._output_rel(where)
        if relative and self.output_root.is_dir():
            outputs.ensure_free(self.output_root, relative)

    def _entry(self, job_id: str, blocking: bool = True) -> _Entry:
        """From the cache; on a miss (e.g. created through another API replica a moment ago) from the API."""
        with self._lock:
            cached = self._cache.get(job_id)
        if cached is not None:
            return cached
        if not blocking:
            raise WouldBlock
        try:
            obj = self.custom.get_namespaced_custom_object(*self._list_args(), job_id)
        except ApiException as exc:
            if exc.status in (404, 422):
                raise job_not_found(job_id) from None
            raise _api_error(exc, "reading the ModelMerge") from None
        return self._remember(obj)

    def _entries(self, blocking: bool = True) -> list[_Entry]:
        """Every ModelMerge, newest first."""
        if not self._synced.is_set():
            if not blocking:
                raise WouldBlock
            try:
                self._relist()
            except ApiException as exc:
                raise _api_error(exc, "listing ModelMerges") from None
        with self._lock:
            if self._newest_first is None:
                self._newest_first = sorted(self._cache.values(), reverse=True, key=lambda e: (
                    e.obj["metadata"].get("creationTimestamp", ""), e.job.job_id))
            return self._newest_first

    def _job(self, obj: dict[str, Any]) -> Job:
        name, spec, status = obj["metadata"]["name"], obj.get("spec") or {}, obj.get("status") or {}
        job_status, location = _status(obj), _location(name, spec)
        params = {field: spec[field] for field in MergeRequest.model_fields if field in spec}
        try:
            params = request_params(MergeRequest.model_validate(params), location[2])
        except ValidationError:
            pass  # a ModelMerge written by hand that the API would not accept: echo it as it is
        return Job(job_id=name, status=job_status,
                   created_at=obj["metadata"].get("creationTimestamp"), started_at=status.get("startTime"),
                   completed_at=status.get("completionTime"),
                   error_message=status.get("message") if job_status in ("failed", "cancelled") else None,
                   output_path=status.get("outputPath") or _planned_path(location),
                   params=params, progress=_percent(status.get("progress")),
                   output_rel=self._output_rel(location))

    def _create_token_secret(self, job_id: str, token: str) -> str:
        name = _secret_name(job_id)
        body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": name, "labels": dict(MANAGED_BY)},
                "data": {TOKEN_KEY: base64.b64encode(token.encode()).decode()}}
        try:
            self.core.create_namespaced_secret(self.namespace, body, _preload_content=False)
        except ApiException as exc:
            raise _api_error(exc, "storing the hf_token Secret") from None
        return name

    def _adopt_secret(self, name: str, owner: dict[str, Any]) -> None:
        """Make the ModelMerge own its token Secret, so deleting the merge deletes the token."""
        reference = {"apiVersion": owner["apiVersion"], "kind": KIND, "name": owner["metadata"]["name"],
                     "uid": owner["metadata"]["uid"], "blockOwnerDeletion": False}
        try:
            self.core.patch_namespaced_secret(name, self.namespace,
                                              {"metadata": {"ownerReferences": [reference]}},
                                              _preload_content=False)
        except ApiException as exc:
            log.warning("could not make ModelMerge %s own Secret %s: %s", reference["name"], name, exc.reason)

    def _delete_secret(self, name: str) -> None:
        try:
            self.core.delete_namespaced_secret(name, self.namespace, _preload_content=False)
        except ApiException as exc:
            log.warning("could not delete Secret %s: %s", name, exc.reason)

    def _newest_pod(self, job_name: str | None) -> str | None:
        if not job_name:
            return None
        try:
            pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"job-name={job_name}",
                                                 _preload_content=False)
        except ApiException as exc:
            raise _api_error(exc, "listing the merge's pods") from None
        items = json.loads(pods.data).get("items", [])
        items.sort(key=lambda p: p["metadata"].get("creationTimestamp", ""))
        return items[-1]["metadata"]["name"] if items else None


class _Entry(NamedTuple):
    obj: dict[str, Any]
    job: Job


def _secret_name(job_id: str) -> str:
    return f"{job_id}-hf-token"


def _version(obj: dict[str, Any]) -> int:
    try:
        return int(obj["metadata"].get("resourceVersion", 0))
    except ValueError:
        return 0


def _status(obj: dict[str, Any]) -> str:
    return STATUS_OF_PHASE.get((obj.get("status") or {}).get("phase"), "pending")


def _location(name: str, spec: dict[str, Any]) -> tuple[str | None, str | None, str]:
    """(claim, subPath, output_dir) of a ModelMerge's output; output_dir defaults to its name, as the operator
    does."""
    output = spec.get("output") or {}
    sub_path = (output.get("subPath") or "").strip("/") or None
    return output.get("pvc"), sub_path, (spec.get("output_dir") or name).strip("/")


def _planned_path(location: tuple[str | None, str | None, str]) -> str | None:
    return "pvc://" + "/".join(p for p in location if p) if location[0] else None


def _percent(progress: Any) -> float | None:
    try:
        return float(str(progress).strip().rstrip("%")) if progress is not None else None
    except ValueError:
        return None


def _stream(response: Any) -> Iterator[bytes]:
    try:
        yield from response.stream(outputs.CHUNK)
    finally:
        response.release_conn()

