"""Sweeps on the local backend: the sweep tables in the job table's SQLite file, and a runner thread that feeds the
trials to the backend's worker pool as merge jobs (each with the sweep's evaluation), never more than
`parallelism` of one sweep unfinished at once.

Restart safety: everything is derived from the tables. A trial's row is written before its job, and the job is
named after the trial (`trial_name(sweep, index)`, as on Kubernetes), so after a restart the runner creates the
missing job of a trial that has a row, and it never creates a trial twice. A trial whose merge the server's stop
interrupted (the local backend fails it with its INTERRUPTED message) runs again as a new attempt
(`<trial>-retry<n>`) into the same output folder. A sweep submitted with an hf_token (never stored) cannot go on
after a restart: it fails with a message asking to resubmit it.

The trials' outputs are `<output_dir>/<trial name>`, `output_dir` being the sweep's (default: its id). With
`keep: best`, the other trials' output folders are deleted once the sweep completed (their jobs and scores stay;
a cancelled or failed sweep keeps every output). Early stopping, the best trial and the ended sweep's phase are
decided by the contract's rules (modelmerge.sweep), as the operator decides them."""

from __future__ import annotations

import logging
import shutil
import threading
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from modelmerge.sweep import (
    ModelMergeSweepSpec,
    ModelMergeSweepStatus,
    SweepBest,
    SweepTrialStatus,
    Trial,
    best_trial,
    ended_sweep,
    format_sweep_error,
    objective_value,
    stopped_early,
    sweep_trials,
    trial_counts,
    trial_name,
    trial_spec,
)
from modelmerge_api import outputs
from modelmerge_api.errors import ApiError, Unavailable
from modelmerge_api.jobs import ACTIVE, Job, utcnow
from modelmerge_api.local import INTERRUPTED, LocalBackend
from modelmerge_api.sweep_store import SweepRecord, SweepStore, TrialRecord
from modelmerge_api.sweep_view import (
    PHASE_OF_STATUS,
    STATUS_OF_PHASE,
    SweepView,
    check_sweep_cancellable,
    sweep_not_found,
)

log = logging.getLogger("modelmerge.api.sweeps")

TOKEN_LOST = ("interrupted: the API server restarted during this sweep, and its hf_token is never stored; "
              "resubmit the sweep")
POLL_S = 0.25
# The contract's template is a ModelMerge spec, which names an output volume: the local backend has none (its
# trials write under the output root), so this placeholder stands in for it and nothing reads it.
LOCAL_TEMPLATE_DEFAULTS: dict[str, Any] = {"output": {"pvc": "local-output-root"}}
_TRIAL_PHASE = {"pending": "Pending", "running": "Running", "completed": "Succeeded", "failed": "Failed",
                "cancelled": "Cancelled"}


@dataclass(frozen=True)
class _Plan:
    spec: ModelMergeSweepSpec
    trials: list[Trial]


class LocalSweeps:
    template_defaults = LOCAL_TEMPLATE_DEFAULTS

    def __init__(self, backend: LocalBackend, poll_s: float = POLL_S) -> None:
        self.backend = backend
        self.output_root = backend.output_root
        self.poll_s = poll_s
        self.store: SweepStore | None = None
        self._plans: dict[str, _Plan] = {}  # sweeps never change once created: parsed and expanded once
        self._tokens: dict[str, str] = {}  # by sweep id; in memory only
        self._lock = threading.Lock()  # one sweep advanced at a time (the runner, a cancel request)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- lifecycle (after the backend's start, before its stop) ------------------------------------------

    def start(self) -> None:
        self.store = SweepStore(self.backend.data_dir / "jobs.db")
        self._thread = threading.Thread(target=self._run, name="sweep-runner", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.store is not None:
            self.store.close()

    # ---- the interface -----------------------------------------------------------------------------------

    def submit(self, sweep_id: str, spec: ModelMergeSweepSpec, hf_token: str | None) -> SweepView:
        if self._stopping.is_set():
            raise Unavailable("the server is shutting down")
        try:
            outputs.evaluation_data(self.output_root, spec.template.evaluation.data)
        except ApiError as exc:  # the same check as each trial's, about the template's field
            raise ApiError(exc.status, f"template.{exc.message}",
                           [{**d, "field": f"template.{d['field']}"} for d in exc.details or []]) from None
        output_rel = spec.template.output_dir
        target = outputs.ensure_free(self.output_root, output_rel)
        plan = _Plan(spec, sweep_trials(spec))
        record = SweepRecord(sweep_id=sweep_id, status="pending", created_at=utcnow(), output_rel=output_rel,
                             spec=spec.model_dump(mode="json", exclude_none=True), total=len(plan.trials),
                             has_token=bool(hf_token))
        target.mkdir(parents=True)  # the sweep's folder: no other job or sweep can take it now
        try:
            self.store.insert(record)
        except BaseException:
            target.rmdir()
            raise
        self._plans[sweep_id] = plan
        if hf_token:
            self._tokens[sweep_id] = hf_token
        self._wake.set()
        return self.get(sweep_id)

    def get(self, sweep_id: str) -> SweepView:
        record = self.store.get(sweep_id)
        if record is None:
            raise sweep_not_found(sweep_id)
        return self._view(record)

    def list(self, limit: int, offset: int) -> tuple[list[SweepView], int]:
        records, total = self.store.page(limit, offset)
        views = []
        for record in records:
            record.trials = self.store.trials(record.sweep_id)
            views.append(self._view(record))
        return views, total

    def cancel(self, sweep_id: str) -> SweepView:
        check_sweep_cancellable(self.get(sweep_id))
        if self.store.request_cancel(sweep_id):
            with self._lock:  # cancel the running trials now rather than at the runner's next round
                self._advance(sweep_id)
        else:
            check_sweep_cancellable(self.get(sweep_id))  # it ended between the read and the update
        return self.get(sweep_id)

    # ---- the runner ----------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            for sweep_id in self.store.active_ids():
                if self._stopping.is_set():
                    return
                with self._lock:
                    try:
                        self._advance(sweep_id)
                    except Exception:  # the runner must survive anything one sweep throws at it
                        log.exception("advancing sweep %s failed; retrying", sweep_id)
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def _plan(self, record: SweepRecord) -> _Plan:
        plan = self._plans.get(record.sweep_id)
        if plan is None:
            spec = ModelMergeSweepSpec.model_validate(record.spec)
            plan = self._plans[record.sweep_id] = _Plan(spec, sweep_trials(spec))
        return plan

    def _advance(self, sweep_id: str) -> None:
        """One round of a sweep: record the trials that ended, cancel or retry the ones that must be, start new
        ones up to parallelism, and finish the sweep when nothing is left to run."""
        record = self.store.get(sweep_id)
        if record is None or record.status not in ACTIVE:
            return
        try:
            plan = self._plan(record)
        except ValidationError as exc:  # stored by a version whose contract took it: nothing can run it now
            self.store.finish(sweep_id, "failed", reason="InvalidSpec",
                              message=f"the sweep's spec is no longer valid: {format_sweep_error(exc)}")
            return
        if record.status == "pending":
            self.store.start(sweep_id)
        token_lost = record.has_token and sweep_id not in self._tokens
        stopping = record.cancel or token_lost
        for trial in record.trials:
            if trial.status is None:
                self._follow(record, plan, trial, stopping=stopping)
        trials = self.store.trials(sweep_id)
        unfinished = sum(1 for trial in trials if trial.status is None)
        early = stopped_early(plan.spec, [SweepTrialStatus(index=row.index, name=row.name, phase=_phase(row),
                                                            ce=row.objective) for row in trials])
        started = len(trials)  # trials start in index order
        while not (stopping or early) and unfinished < plan.spec.parallelism and started < record.total:
            self._start_trial(record, plan, plan.trials[started])
            unfinished, started = unfinished + 1, started + 1
        if unfinished == 0 and (stopping or early or started == record.total):
            self._finish(record, plan, self.store.trials(sweep_id), token_lost=token_lost, early=early)

    def _start_trial(self, record: SweepRecord, plan: _Plan, trial: Trial) -> None:
        name = trial_name(record.sweep_id, trial.index)
        row = TrialRecord(index=trial.index, name=name, job_id=name, attempt=0, params=trial.parameters)
        self.store.add_trial(record.sweep_id, row)  # before the job: a restart finds the row and makes the job
        self._create_job(record, plan, row)

    def _create_job(self, record: SweepRecord, plan: _Plan, row: TrialRecord) -> None:
        request = trial_spec(plan.spec, plan.trials[row.index], row.name).merge_request()
        try:
            self.backend.submit(row.job_id, request, request.output_dir, self._tokens.get(record.sweep_id),
                                sweep_id=record.sweep_id)
        except Unavailable:  # the server is stopping: the next start creates the job
            return
        except ApiError as exc:  # e.g. its output folder exists: the trial fails, the sweep goes on
            self.store.finish_trial(record.sweep_id, row.index, status="failed", objective=None,
                                    message=exc.message)

    def _follow(self, record: SweepRecord, plan: _Plan, row: TrialRecord, *, stopping: bool) -> None:
        job = self._job(row.job_id)
        if job is None:
            if stopping:
                self.store.finish_trial(record.sweep_id, row.index, status="cancelled", objective=None,
                                        message="the sweep stopped before this trial's merge was created")
            else:
                self._create_job(record, plan, row)
            return
        if job.status in ACTIVE:
            if stopping:
                try:
                    self.backend.cancel(job.job_id)
                except ApiError:  # it ended meanwhile: the next round records how
                    pass
            return
        if job.status == "failed" and job.error_message == INTERRUPTED and not stopping:
            attempt = row.attempt + 1
            retry = TrialRecord(index=row.index, name=row.name, job_id=f"{row.name}-retry{attempt}",
                                attempt=attempt, params=row.params)
            self.store.retry_trial(record.sweep_id, row.index, retry.job_id, attempt)
            self._create_job(record, plan, retry)
            return
        if job.status == "completed":
            objective, why = objective_value(plan.spec.objective, job.evaluation)
            self.store.finish_trial(record.sweep_id, row.index, status="completed", objective=objective,
                                    message=why or None)
        else:
            self.store.finish_trial(record.sweep_id, row.index, status=job.status, objective=None,
                                    message=job.error_message)

    def _job(self, job_id: str) -> Job | None:
        try:
            return self.backend.get(job_id)
        except ApiError:
            return None

    def _finish(self, record: SweepRecord, plan: _Plan, trials: list[TrialRecord], *, token_lost: bool,
                early: bool) -> None:
        record.trials = trials
        rows = self._trial_rows(record, plan.trials, finished=True)
        if token_lost and not record.cancel:
            status, reason, message = "failed", "TokenLost", TOKEN_LOST
        else:
            spec = plan.spec.model_copy(update={"cancel": record.cancel})  # a cancel is stored beside the spec
            phase, reason, message = ended_sweep(spec, rows, early=early, total=record.total)
            status = STATUS_OF_PHASE[phase]
        if plan.spec.keep == "best" and status == "completed":  # as the operator: not after a cancel
            best = best_trial(rows)
            for trial in trials:
                if trial.index != best.index:
                    self._delete_output(record, trial)
        self.store.finish(record.sweep_id, status, reason=reason, message=message)
        self._tokens.pop(record.sweep_id, None)
        log.info("sweep %s %s (%s)", record.sweep_id, status, reason)

    def _delete_output(self, record: SweepRecord, trial: TrialRecord) -> None:
        relative = f"{record.output_rel}/{trial.name}"
        folder = self.output_root / relative
        if outputs.contained(self.output_root, relative) == folder and folder.is_dir():
            shutil.rmtree(folder)

    # ---- the view ----------------------------------------------------------------------------------------

    def _view(self, record: SweepRecord) -> SweepView:
        try:
            planned = self._plan(record).trials
        except ValidationError:  # see _advance: the trials that ran are all there is
            planned = [Trial(row.index, row.params) for row in record.trials]
        trials = self._trial_rows(record, planned, finished=record.status not in ACTIVE)
        best = best_trial(trials)
        status = ModelMergeSweepStatus(
            phase=PHASE_OF_STATUS[record.status],
            reason=record.reason or ("Running" if record.status == "running" else None), message=record.message,
            progress=f"{sum(1 for t in record.trials if t.status is not None)}/{record.total}",
            counts=trial_counts(trials, record.total),
            best=None if best is None else SweepBest(
                index=best.index, name=best.name, parameters=best.parameters, ce=best.ce,
                outputPath=str(self.output_root / record.output_rel / best.name)),
            trials=trials, startTime=record.started_at, completionTime=record.completed_at)
        return SweepView(sweep_id=record.sweep_id, created_at=record.created_at,
                         spec=record.spec, status=status, job_ids={row.index: row.job_id for row in record.trials})

    def _trial_rows(self, record: SweepRecord, planned: list[Trial], *, finished: bool) -> list[SweepTrialStatus]:
        """Every planned trial as the status shows it: a started one from its row (an unfinished one in its job's
        phase), one never started Waiting, or Skipped once the sweep is `finished`."""
        rows = {trial.index: trial for trial in record.trials}
        trials = []
        for trial in planned:
            row = rows.get(trial.index)
            if row is None:
                trials.append(SweepTrialStatus(index=trial.index, name=trial_name(record.sweep_id, trial.index),
                                               parameters=trial.parameters,
                                               phase="Skipped" if finished else "Waiting"))
                continue
            if row.status is None:
                job = self._job(row.job_id)
                phase = _TRIAL_PHASE[job.status] if job is not None else "Pending"
            else:
                phase = _TRIAL_PHASE[row.status]
            trials.append(SweepTrialStatus(index=row.index, name=row.name, parameters=row.params, phase=phase,
                                           ce=row.objective, message=row.message))
        return trials


def _phase(row: TrialRecord) -> str:
    """A trial's phase for the sweep's rules, which only tell unfinished trials from ended ones."""
    return "Running" if row.status is None else _TRIAL_PHASE[row.status]
