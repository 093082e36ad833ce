"""The sweep view the /api/sweeps routes serve, and the small interface both backends' sweeps implement.

Both backends describe a sweep with the contract's ModelMergeSweepStatus (on Kubernetes the ModelMergeSweep's
status, written by the operator; locally built from the sweep tables), so one function turns it into the REST
view, in the REST API's words: statuses pending, running, completed, failed, cancelled, as jobs have them (plus
waiting and skipped for trials that have not run or never will)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from modelmerge.contract import MergeRequest
from modelmerge.sweep import ModelMergeSweepSpec, ModelMergeSweepStatus
from modelmerge_api.errors import Conflict, NotFound

STATUS_OF_PHASE = {None: "pending", "Pending": "pending", "Running": "running", "Succeeded": "completed",
                   "Failed": "failed", "Cancelled": "cancelled"}
STATUS_OF_TRIAL_PHASE = {"Waiting": "waiting", "Pending": "pending", "Running": "running", "Succeeded": "completed",
                         "Failed": "failed", "Cancelled": "cancelled", "Skipped": "skipped"}
PHASE_OF_STATUS = {status: phase for phase, status in STATUS_OF_PHASE.items() if phase}
ACTIVE_SWEEP = frozenset({"pending", "running"})


@dataclass
class SweepView:
    """A sweep as clients see it: `spec` is its spec as stored (the request's template fields are shown, the
    Kubernetes fields a backend adds are not), `job_ids` the job of each started trial by index (the trial's
    ModelMerge on Kubernetes, its latest attempt locally)."""

    sweep_id: str
    created_at: str | None
    spec: dict[str, Any]
    status: ModelMergeSweepStatus
    job_ids: dict[int, str] = field(default_factory=dict)

    @property
    def rest_status(self) -> str:
        return STATUS_OF_PHASE.get(self.status.phase, "pending")

    def to_json(self, *, trials: bool = True) -> dict[str, Any]:
        status = self.status
        best = status.best
        view = {"sweep_id": self.sweep_id, "status": self.rest_status, "reason": status.reason,
                "message": status.message, "created_at": self.created_at, "started_at": status.startTime,
                "completed_at": status.completionTime, "progress": status.progress,
                "counts": status.counts.model_dump(mode="json"),
                "best": None if best is None else {
                    "index": best.index, "name": best.name, "job_id": self.job_ids.get(best.index),
                    "parameters": best.parameters, "ce": best.ce, "output_path": best.outputPath},
                "spec": request_fields(self.spec)}
        if trials:
            view["trials"] = [{"index": trial.index, "name": trial.name, "job_id": self.job_ids.get(trial.index),
                               "status": STATUS_OF_TRIAL_PHASE[trial.phase], "parameters": trial.parameters,
                               "ce": trial.ce, "message": trial.message} for trial in status.trials]
        return view


def request_fields(spec: dict[str, Any]) -> dict[str, Any]:
    """A sweep spec as the REST API takes it: the template's merge request fields only."""
    template = {name: value for name, value in (spec.get("template") or {}).items()
                if name in MergeRequest.model_fields}
    return {**spec, "template": template}


def sweep_not_found(sweep_id: str) -> NotFound:
    return NotFound(f"sweep {sweep_id!r} not found")


def check_sweep_cancellable(view: SweepView) -> None:
    if view.rest_status not in ACTIVE_SWEEP:
        raise Conflict(f"sweep {view.sweep_id!r} is already {view.rest_status}; only pending or running sweeps "
                       "can be cancelled")


class SweepBackend(Protocol):
    """What the sweep routes need from a backend's sweeps. `template_defaults` are the spec fields the backend adds
    to every sweep's template (the REST request names only merge request fields)."""

    template_defaults: dict[str, Any]

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def submit(self, sweep_id: str, spec: ModelMergeSweepSpec, hf_token: str | None) -> SweepView:
        """Record and start a validated sweep; nothing is created when it raises."""
        ...

    def get(self, sweep_id: str) -> SweepView: ...

    def list(self, limit: int, offset: int) -> tuple[list[SweepView], int]:
        """Newest first; returns (page, total)."""
        ...

    def cancel(self, sweep_id: str) -> SweepView:
        """No new trials; the running ones are cancelled."""
        ...
