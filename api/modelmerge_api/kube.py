"""The Kubernetes backend: a job is a ModelMerge custom resource (named after the job id) in one namespace.

POST creates the resource (and, for an hf_token, a Secret the resource owns and references); status and lists
are served from an informer's cache of the namespace's ModelMerges (read-your-writes: what this process created
or patched is put in the cache at once); cancel sets `spec.cancel`; logs come from the Job's newest pod;
downloads read the output PVC, mounted (read-only) into the API pod at the output root. This module translates
between ModelMerges and REST jobs; the cache is `informer.Informer`, API server errors map in `kube_errors`."""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import BaseModel, ValidationError

from modelmerge import kubeclient
from modelmerge.contract import (
    API_GROUP,
    API_VERSION,
    KIND,
    PLURAL,
    MergeEvaluation,
    MergeProgress,
    MergeRequest,
    ModelMergeSpec,
    OutputLocation,
    format_validation_error,
    output_location,
)
from modelmerge.sweep import SWEEP_KIND
from modelmerge_api import outputs
from modelmerge_api.errors import ApiError, Conflict, Unavailable, job_not_found
from modelmerge_api.informer import Cached, Informer
from modelmerge_api.jobs import ACTIVE, Job, WouldBlock, advanced, check_cancellable, request_params
from modelmerge_api.kube_errors import api_error

log = logging.getLogger("modelmerge.api.kube")

STATUS_OF_PHASE = {None: "pending", "Pending": "pending", "Running": "running", "Succeeded": "completed",
                   "Failed": "failed", "Cancelled": "cancelled"}
MANAGED_BY = {"app.kubernetes.io/managed-by": "modelmerge-api"}
TOKEN_KEY = "token"
HEALTH_TTL_S = 5.0
SYNC_WAIT_S = 10.0
Reported = TypeVar("Reported", bound=BaseModel)


class MergeView(NamedTuple):
    """What the cache keeps per ModelMerge: its REST job and where its output lands (None when its spec is not
    one the contract accepts, e.g. written by hand)."""

    job: Job
    location: OutputLocation | None


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
        self.merges: Informer[MergeView] = Informer(
            self.custom.list_namespaced_custom_object, self._list_args(), make_view=self._view,
            order=lambda e: (e.obj["metadata"].get("creationTimestamp", ""), e.view.job.job_id),
            descending=True, what=f"ModelMerges in {namespace}")
        self._health: tuple[float, dict[str, Any]] = (0.0, {})
        self._check_defaults()

    @classmethod
    def from_config(cls, kubeconfig: str | None, namespace: str | None, output_root: Path | None,
                    spec_defaults: dict[str, Any] | None = None) -> KubernetesBackend:
        """A backend on its own client (in-cluster credentials in a pod unless a kubeconfig is named); the
        namespace defaults to the pod's own, else the kubeconfig context's, else 'default'."""
        api_client = kubeclient.api_client(kubeconfig=kubeconfig)
        namespace = namespace or kubeclient.current_namespace(kubeconfig=kubeconfig) or "default"
        return cls(api_client, namespace, output_root, spec_defaults)

    def _check_defaults(self) -> None:
        """Bad chart/flag configuration fails at start, not on the first POST."""
        try:
            self._spec("check", MergeRequest(base_model="a", models_to_merge=["b"], merge_method="task_arithmetic"),
                       "check", None)
        except ApiError as exc:
            raise SystemExit(f"invalid Kubernetes spec defaults (--spec-defaults / --output-pvc): {exc.message}") \
                from None

    def _list_args(self) -> tuple[str, str, str, str]:
        return API_GROUP, API_VERSION, self.namespace, PLURAL

    # ---- the interface -----------------------------------------------------------------------------

    def start(self) -> None:
        self.merges.start()
        self.merges.wait_synced(SYNC_WAIT_S)

    def stop(self) -> None:
        self.merges.stop()

    def health(self) -> dict[str, Any]:
        checked, info = self._health
        if time.monotonic() - checked < HEALTH_TTL_S:
            return dict(info)
        try:
            kubeclient.raw(self.custom.list_namespaced_custom_object, *self._list_args(), limit=1)
            info = {"merging_available": True, "namespace": self.namespace, "watching": self.merges.synced}
        except Exception as exc:
            reason = "the ModelMerge CRD is not installed" if getattr(exc, "status", None) == 404 \
                else f"the Kubernetes API is not usable: {getattr(exc, 'reason', None) or exc}"
            info = {"merging_available": False, "namespace": self.namespace, "reason": reason}
        self._health = (time.monotonic(), info)
        return dict(info)

    def submit(self, job_id: str, request: MergeRequest, output_rel: str, hf_token: str | None) -> Job:
        spec = self._spec(job_id, request, output_rel, hf_token)
        self.check_output_free(output_location(spec, job_id))
        body = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND,
                "metadata": {"name": job_id, "labels": dict(MANAGED_BY)},
                "spec": spec.model_dump(mode="json", exclude_none=True)}
        secret = self.create_token_secret(job_id, hf_token) if hf_token else None
        try:
            created = kubeclient.raw(self.custom.create_namespaced_custom_object, *self._list_args(), body)
        except ApiException as exc:
            if secret:
                self.delete_secret(secret)
            raise api_error(exc, "ModelMerge") from None
        if secret:
            self.adopt_secret(secret, created)
        return self.merges.remember(created).view.job

    def get(self, job_id: str, *, blocking: bool = True) -> Job:
        return self._entry(job_id, blocking=blocking).view.job

    def list(self, status: str | None, limit: int, offset: int, *, sweep_id: str | None = None,
             blocking: bool = True) -> tuple[list[Job], int]:
        jobs = [entry.view.job for entry in self._entries(blocking=blocking)]
        if status:
            jobs = [job for job in jobs if job.status == status]
        if sweep_id:
            jobs = [job for job in jobs if job.sweep_id == sweep_id]
        return jobs[offset:offset + limit], len(jobs)

    def cancel(self, job_id: str) -> Job:
        check_cancellable(self._entry(job_id).view.job)
        try:
            patched = kubeclient.merge_patch(self.custom.patch_namespaced_custom_object, *self._list_args(),
                                             job_id, {"spec": {"cancel": True}})
        except ApiException as exc:
            raise api_error(exc, "cancelling the ModelMerge") from None
        return self.merges.remember(patched).view.job

    def logs(self, job_id: str, *, follow: bool) -> Iterator[bytes]:
        obj = self._entry(job_id).obj
        pod = self._newest_pod((obj.get("status") or {}).get("jobName"))
        if pod is None:
            note = f"no merge pod yet (status: {_status(obj)})\n"
            return iter([note.encode()])
        try:
            response = self.core.read_namespaced_pod_log(pod, self.namespace, follow=follow,
                                                         _preload_content=False)
        except ApiException as exc:
            raise Unavailable(f"logs of pod {pod} are not available: {api_error(exc, 'reading logs').message}") \
                from None
        return _stream(response)

    def stats(self) -> tuple[dict[str, int], list[float]]:
        counts: dict[str, int] = {}
        durations = []
        for job in (entry.view.job for entry in self._entries()):
            counts[job.status] = counts.get(job.status, 0) + 1
            if job.status == "completed" and (seconds := job.duration()) is not None:
                durations.append(seconds)
        return counts, durations

    def evaluations(self) -> list[MergeEvaluation]:
        return [job.evaluation for job in (entry.view.job for entry in self._entries())
                if job.status == "completed" and job.evaluation is not None]

    def review_token(self, token: str) -> bool:
        """TokenReview: does the cluster authenticate this bearer token (e.g. a service-account token)?"""
        review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}}
        try:
            result = kubeclient.raw(client.AuthenticationV1Api(self.api).create_token_review, review)
        except ApiException as exc:
            log.warning("TokenReview failed: %s %s", exc.status, exc.reason)
            return False
        return bool(result.get("status", {}).get("authenticated"))

    # ---- ModelMerge <-> job ------------------------------------------------------------------------

    def _spec(self, job_id: str, request: MergeRequest, output_rel: str, hf_token: str | None) -> ModelMergeSpec:
        defaults = self.spec_defaults if request.evaluation is None else evaluation_spec_defaults(self.spec_defaults)
        spec = {**defaults, **request.model_dump(mode="json", exclude_none=True), "output_dir": output_rel}
        if hf_token:
            spec["hfTokenSecret"] = {"name": token_secret_name(job_id), "key": TOKEN_KEY}
        try:
            return ModelMergeSpec.model_validate(spec)
        except ValidationError as exc:
            raise ApiError(400, "invalid ModelMerge spec: " + format_validation_error(exc)) from None

    def _view(self, obj: dict[str, Any], previous: MergeView | None) -> MergeView:
        """The REST job of a ModelMerge (`previous`: the cached view of an earlier version of it)."""
        name, status = obj["metadata"]["name"], obj.get("status") or {}
        job_status = _status(obj)
        try:
            spec = ModelMergeSpec.model_validate(obj.get("spec") or {})
        except ValidationError:  # a ModelMerge written by hand that the API would not accept: echo it as it is
            spec, location = None, None
            params = {field: value for field, value in (obj.get("spec") or {}).items()
                      if field in MergeRequest.model_fields}
        else:
            location = output_location(spec, name)
            params = request_params(spec.merge_request(), location.relative)
        progress = advanced(previous.job.progress if previous else None,
                            _reported(MergeProgress, status.get("progress")))
        evaluation = _reported(MergeEvaluation, status.get("evaluation")) if job_status == "completed" else None
        job = Job(job_id=name, status=job_status,
                  created_at=obj["metadata"].get("creationTimestamp"), started_at=status.get("startTime"),
                  completed_at=status.get("completionTime"),
                  error_message=status.get("message") if job_status in ("failed", "cancelled") else None,
                  output_path=status.get("outputPath") or (location.uri if location else None),
                  params=params, progress=progress, output_rel=self._output_rel(location),
                  evaluation=evaluation, sweep_id=_sweep_of(obj))
        return MergeView(job.freeze(), location)  # a view is never changed: a new version gets a new view

    def _output_rel(self, location: OutputLocation | None) -> str | None:
        """The output's path under the API's output root (the output claim's root), when it is on that claim."""
        if location is None or location.claim != (self.spec_defaults.get("output") or {}).get("pvc"):
            return None
        return location.claim_path

    def check_output_free(self, location: OutputLocation) -> None:
        """Conflict when an active job writes to `location`, or when it exists on the output claim (when the API
        mounts it at the output root)."""
        for entry in self._entries():
            job, taken = entry.view
            if job.status in ACTIVE and taken is not None and taken.uri == location.uri:
                raise Conflict(f"output_dir: {location.relative!r} is the output of the active job {job.job_id!r}")
        relative = self._output_rel(location)
        if relative and self.output_root.is_dir():
            outputs.ensure_free(self.output_root, relative)

    def _entry(self, job_id: str, *, blocking: bool = True) -> Cached[MergeView]:
        """From the cache; on a miss (e.g. created through another API replica a moment ago) from the API."""
        cached = self.merges.get(job_id)
        if cached is not None:
            return cached
        if not blocking:
            raise WouldBlock
        try:
            obj = kubeclient.raw(self.custom.get_namespaced_custom_object, *self._list_args(), job_id)
        except ApiException as exc:
            if exc.status in (404, 422):
                raise job_not_found(job_id) from None
            raise api_error(exc, "reading the ModelMerge") from None
        return self.merges.remember(obj)

    def _entries(self, *, blocking: bool = True) -> list[Cached[MergeView]]:
        """Every ModelMerge, newest first."""
        if not self.merges.synced:
            if not blocking:
                raise WouldBlock
            try:
                self.merges.relist()
            except ApiException as exc:
                raise api_error(exc, "listing ModelMerges") from None
        return self.merges.entries()

    # ---- the hf_token Secret and the merge pod --------------------------------------------------------

    def create_token_secret(self, job_id: str, token: str) -> str:
        name = token_secret_name(job_id)
        body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": name, "labels": dict(MANAGED_BY)},
                "data": {TOKEN_KEY: base64.b64encode(token.encode()).decode()}}
        try:
            kubeclient.raw(self.core.create_namespaced_secret, self.namespace, body)
        except ApiException as exc:
            raise api_error(exc, "storing the hf_token Secret") from None
        return name

    def adopt_secret(self, name: str, owner: dict[str, Any]) -> None:
        """Make the ModelMerge (or ModelMergeSweep) own its token Secret, so deleting it deletes the token."""
        reference = {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": owner["metadata"]["name"],
                     "uid": owner["metadata"]["uid"], "blockOwnerDeletion": False}
        try:
            kubeclient.merge_patch(self.core.patch_namespaced_secret, name, self.namespace,
                                   {"metadata": {"ownerReferences": [reference]}})
        except ApiException as exc:
            log.warning("could not make %s %s own Secret %s: %s", reference["kind"], reference["name"], name,
                        exc.reason)

    def delete_secret(self, name: str) -> None:
        try:
            kubeclient.raw(self.core.delete_namespaced_secret, name, self.namespace)
        except ApiException as exc:
            log.warning("could not delete Secret %s: %s", name, exc.reason)

    def _newest_pod(self, job_name: str | None) -> str | None:
        if not job_name:
            return None
        try:
            pods = kubeclient.pods_of_job(self.core, self.namespace, job_name)
        except ApiException as exc:
            raise api_error(exc, "listing the merge's pods") from None
        return pods[0]["metadata"]["name"] if pods else None


def token_secret_name(job_id: str) -> str:
    return f"{job_id}-hf-token"


def _sweep_of(obj: dict[str, Any]) -> str | None:
    """The sweep whose trial a ModelMerge is: its controlling ModelMergeSweep, if any."""
    for owner in obj["metadata"].get("ownerReferences") or []:
        if owner.get("kind") == SWEEP_KIND and owner.get("controller"):
            return owner.get("name")
    return None


def _status(obj: dict[str, Any]) -> str:
    return STATUS_OF_PHASE.get((obj.get("status") or {}).get("phase"), "pending")


def _reported(model: type[Reported], reported: Any) -> Reported | None:
    """A status field (progress, evaluation) as the contract's `model` (None when absent or not in that form)."""
    if not isinstance(reported, dict):
        return None
    try:
        return model.model_validate(reported)
    except ValidationError:
        return None


def evaluation_spec_defaults(defaults: dict[str, Any]) -> dict[str, Any]:
    """The spec defaults of an evaluated merge: without the merge's CPU and memory, so that the operator's
    evaluation defaults (--evaluation-cpu/--evaluation-memory, the chart's evaluation.resources) apply; the
    model is loaded to be evaluated, which a streaming merge never does."""
    resources = {key: value for key, value in (defaults.get("resources") or {}).items()
                 if key not in ("cpu", "memory")}
    out = {key: value for key, value in defaults.items() if key != "resources"}
    return {**out, "resources": resources} if resources else out


def _stream(response: Any) -> Iterator[bytes]:
    try:
        yield from response.stream(outputs.CHUNK)
    finally:
        response.release_conn()
