"""Sweeps on the Kubernetes backend: a sweep is a ModelMergeSweep custom resource (named after the sweep id) in the
backend's namespace; the operator creates its trials as ModelMerges (which the job routes show, with their
sweep_id) and writes its status, which is what the view shows. Reads come from an informer's cache of the
namespace's ModelMergeSweeps; cancel sets `spec.cancel`. A sweep whose output folder exists is refused (409) as
locally, where the API mounts the output claim at its output root (elsewhere it cannot know). An hf_token goes
into a Secret that the sweep owns and its template references, as for a single merge."""

from __future__ import annotations

from typing import Any

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from modelmerge import kubeclient
from modelmerge.contract import API_GROUP, API_VERSION, output_location
from modelmerge.sweep import SWEEP_KIND, SWEEP_PLURAL, ModelMergeSweepSpec, ModelMergeSweepStatus
from modelmerge_api.informer import Cached, Informer
from modelmerge_api.kube import (
    MANAGED_BY,
    SYNC_WAIT_S,
    TOKEN_KEY,
    KubernetesBackend,
    evaluation_spec_defaults,
    token_secret_name,
)
from modelmerge_api.kube_errors import api_error
from modelmerge_api.sweep_view import SweepView, check_sweep_cancellable, sweep_not_found


class KubeSweeps:
    def __init__(self, backend: KubernetesBackend) -> None:
        self.backend = backend
        self.output_root = backend.output_root
        # Every trial is evaluated: the operator's evaluation resources apply, as for an evaluated merge.
        self.template_defaults = evaluation_spec_defaults(backend.spec_defaults)
        self.sweeps: Informer[SweepView] = Informer(
            backend.custom.list_namespaced_custom_object, self._list_args(), make_view=_view,
            order=lambda e: (e.obj["metadata"].get("creationTimestamp", ""), e.view.sweep_id), descending=True,
            what=f"ModelMergeSweeps in {backend.namespace}")

    def _list_args(self) -> tuple[str, str, str, str]:
        return API_GROUP, API_VERSION, self.backend.namespace, SWEEP_PLURAL

    def start(self) -> None:
        self.sweeps.start()
        self.sweeps.wait_synced(SYNC_WAIT_S)

    def stop(self) -> None:
        self.sweeps.stop()

    def submit(self, sweep_id: str, spec: ModelMergeSweepSpec, hf_token: str | None) -> SweepView:
        # The trials' folder must not exist yet, as locally (checked where the API mounts the output claim).
        self.backend.check_output_free(output_location(spec.template, sweep_id))
        body_spec = spec.model_dump(mode="json", exclude_none=True)
        if hf_token:
            body_spec["template"]["hfTokenSecret"] = {"name": token_secret_name(sweep_id),
                                                      "key": TOKEN_KEY}
        body = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": SWEEP_KIND,
                "metadata": {"name": sweep_id, "labels": dict(MANAGED_BY)}, "spec": body_spec}
        secret = self.backend.create_token_secret(sweep_id, hf_token) if hf_token else None
        try:
            created = kubeclient.raw(self.backend.custom.create_namespaced_custom_object, *self._list_args(), body)
        except ApiException as exc:
            if secret:
                self.backend.delete_secret(secret)
            raise api_error(exc, SWEEP_KIND) from None
        if secret:
            self.backend.adopt_secret(secret, created)
        return self.sweeps.remember(created).view

    def get(self, sweep_id: str) -> SweepView:
        return self._entry(sweep_id).view

    def list(self, limit: int, offset: int) -> tuple[list[SweepView], int]:
        if not self.sweeps.synced:
            try:
                self.sweeps.relist()
            except ApiException as exc:
                raise api_error(exc, "listing ModelMergeSweeps") from None
        views = [entry.view for entry in self.sweeps.entries()]
        return views[offset:offset + limit], len(views)

    def cancel(self, sweep_id: str) -> SweepView:
        check_sweep_cancellable(self.get(sweep_id))
        try:
            patched = kubeclient.merge_patch(self.backend.custom.patch_namespaced_custom_object, *self._list_args(),
                                             sweep_id, {"spec": {"cancel": True}})
        except ApiException as exc:
            raise api_error(exc, "cancelling the ModelMergeSweep") from None
        return self.sweeps.remember(patched).view

    def _entry(self, sweep_id: str) -> Cached[SweepView]:
        """From the cache; on a miss (e.g. created through another API replica a moment ago) from the API."""
        cached = self.sweeps.get(sweep_id)
        if cached is not None:
            return cached
        try:
            obj = kubeclient.raw(self.backend.custom.get_namespaced_custom_object, *self._list_args(), sweep_id)
        except ApiException as exc:
            if exc.status in (404, 422):
                raise sweep_not_found(sweep_id) from None
            raise api_error(exc, "reading the ModelMergeSweep") from None
        return self.sweeps.remember(obj)


def _view(obj: dict[str, Any], previous: SweepView | None) -> SweepView:
    """The REST view of a ModelMergeSweep: its status as the operator wrote it (empty until it did)."""
    try:
        status = ModelMergeSweepStatus.model_validate(obj.get("status") or {})
    except ValidationError:
        status = ModelMergeSweepStatus()
    job_ids = {trial.index: trial.name for trial in status.trials if trial.phase not in ("Waiting", "Skipped")}
    return SweepView(sweep_id=obj["metadata"]["name"], created_at=obj["metadata"].get("creationTimestamp"),
                     spec=obj.get("spec") or {}, status=status, job_ids=job_ids)
