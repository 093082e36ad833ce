"""Pure functions that turn a ModelMergeSweep, its trials and the child ModelMerges that exist into what the
operator does next (which trials to create, which children to cancel, whether to clean up) and the sweep's status.
No API calls here.

Everything is derived from what exists, so a restarted operator carries on where the last one stopped: a trial is
created when no child of it exists and the status does not record it as finished (children deleted by keep=best,
or by hand after they finished, keep their row). Trials are created in index order, and only while fewer than
`parallelism` children are unfinished (a child with no phase yet counts as unfinished).

Early stopping walks the finished trials in index order up to the first unfinished one: once `patience` of them in a
row did not improve on the best before them, no more trials are created (running ones finish) and the rest are
Skipped. A failed or unscored trial does not improve. That rule, the best trial, the counts and the phase of an
ended sweep are the contract's (modelmerge.sweep: stopped_early, best_trial, trial_counts, ended_sweep), which the
local backend's sweeps use too; this module adds the phases only the operator has (Creating, Cancelling, CleaningUp).

| observed                                                 | phase     | reason          |
| -------------------------------------------------------- | --------- | --------------- |
| spec invalid (what the CRD cannot check)                 | Failed    | InvalidSpec     |
| no trial created yet                                     | Pending   | Creating        |
| trials unfinished or waiting                             | Running   | Running         |
| keep=best: the non-best outputs are being deleted        | Running   | CleaningUp      |
| every trial finished, one scored                         | Succeeded | Completed       |
| the same after early stopping                            | Succeeded | EarlyStopped    |
| every trial finished, none succeeded                     | Failed    | AllTrialsFailed |
| trials succeeded but none has a score                    | Failed    | NoTrialScored   |
| spec.cancel, children still finishing                    | Running   | Cancelling      |
| spec.cancel, no child unfinished                         | Cancelled | Cancelled       |
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from modelmerge.contract import TERMINAL_PHASES, MergeEvaluation, Phase
from modelmerge.sweep import (
    FINISHED_TRIAL_PHASES,
    ModelMergeSweepSpec,
    SweepCounts,
    SweepTrialStatus,
    Trial,
    best_trial,
    clip_message,
    counts_summary,
    ended_sweep,
    objective_value,
    stopped_early,
    trial_counts,
    trial_name,
)
from modelmerge_operator.status import merge_conditions

SWEEP_TERMINAL = frozenset({"Succeeded", "Failed", "Cancelled"})


@dataclass(frozen=True)
class Child:
    """What the operator reads of a trial's ModelMerge."""

    index: int
    name: str
    phase: str | None
    cancel: bool
    message: str | None = None
    evaluation: dict[str, Any] | None = None
    output_path: str | None = None

    @staticmethod
    def of(body: dict[str, Any], index: int) -> Child:
        status = body.get("status") or {}
        return Child(index=index, name=body["metadata"]["name"], phase=status.get("phase"),
                     cancel=bool((body.get("spec") or {}).get("cancel")), message=status.get("message"),
                     evaluation=status.get("evaluation"), output_path=status.get("outputPath"))

    @property
    def finished(self) -> bool:
        return self.phase in TERMINAL_PHASES


@dataclass
class Plan:
    """What to do next and the status to write."""

    create: list[Trial] = field(default_factory=list)
    cancel: list[str] = field(default_factory=list)  # children to cancel
    status: dict[str, Any] = field(default_factory=dict)
    done: bool = False  # every trial finished (or Skipped)
    stopped_early: bool = False


def _row(trial: Trial, name: str, phase: str, ce: float | None = None, message: str | None = None) -> dict:
    return {"index": trial.index, "name": name, "parameters": trial.parameters, "phase": phase, "ce": ce,
            "message": clip_message(message) if message else None}


def _score(spec: ModelMergeSweepSpec, child: Child) -> tuple[float | None, str | None]:
    if child.phase != Phase.Succeeded:
        return None, child.message
    try:
        evaluation = MergeEvaluation.model_validate(child.evaluation) if child.evaluation else None
    except ValidationError as exc:
        return None, f"unreadable status.evaluation: {exc.error_count()} errors"
    ce, why = objective_value(spec.objective, evaluation)
    return ce, why or None


def trial_rows(spec: ModelMergeSweepSpec, sweep_name: str, trials: list[Trial], children: dict[int, Child],
               recorded: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per trial: from its child when it exists, else from the status when that records it finished,
    else Waiting."""
    rows = []
    for trial in trials:
        name = trial_name(sweep_name, trial.index)
        child = children.get(trial.index)
        if child is not None:
            ce, message = _score(spec, child)
            rows.append(_row(trial, child.name, child.phase or "Pending", ce, message))
        elif (recorded.get(trial.index) or {}).get("phase") in FINISHED_TRIAL_PHASES - {"Skipped"}:
            rows.append({**recorded[trial.index], "parameters": trial.parameters})
        else:
            rows.append(_row(trial, name, "Waiting"))
    return rows


def statuses(rows: list[dict[str, Any]]) -> list[SweepTrialStatus]:
    """The rows as the contract's trial statuses, which the sweep's rules (modelmerge.sweep) read."""
    return [SweepTrialStatus.model_validate(row) for row in rows]


def plan(spec: ModelMergeSweepSpec, sweep_name: str, trials: list[Trial], children: dict[int, Child],
         old_status: dict[str, Any]) -> Plan:
    """The next actions and the trial table, counts and best (phase, conditions and times are `finish`'s)."""
    recorded = {row["index"]: row for row in old_status.get("trials") or [] if isinstance(row, dict)}
    rows = trial_rows(spec, sweep_name, trials, children, recorded)
    out = Plan(stopped_early=stopped_early(spec, statuses(rows)))
    active = [row for row in rows if row["phase"] not in FINISHED_TRIAL_PHASES and row["phase"] != "Waiting"]
    if spec.cancel:
        out.cancel = [child.name for child in children.values() if not child.finished and not child.cancel]
    elif not out.stopped_early:
        free = spec.parallelism - len(active)
        waiting = [trial for trial, row in zip(trials, rows, strict=True) if row["phase"] == "Waiting"]
        out.create = waiting[:max(free, 0)]
        for trial in out.create:
            rows[trial.index]["phase"] = "Pending"
    if spec.cancel or out.stopped_early:
        for row in rows:
            if row["phase"] == "Waiting":
                row["phase"] = "Skipped"
                row["message"] = "cancelled before it started" if spec.cancel else "not run: early stopping"
    out.done = all(row["phase"] in FINISHED_TRIAL_PHASES for row in rows)
    final = statuses(rows)
    best = best_trial(final)
    finished = sum(row["phase"] in FINISHED_TRIAL_PHASES for row in rows)
    out.status = {
        "progress": f"{finished}/{len(rows)}",
        "counts": trial_counts(final).model_dump(),
        "best": _best(None if best is None else rows[best.index], children, old_status),
        "trials": rows,
    }
    return out


def _best(row: dict[str, Any] | None, children: dict[int, Child], old_status: dict[str, Any]) -> dict | None:
    if row is None:
        return None
    child = children.get(row["index"])
    old = old_status.get("best") or {}
    output = child.output_path if child is not None else (old.get("outputPath") if old.get("index") == row["index"]
                                                           else None)
    return {"index": row["index"], "name": row["name"], "parameters": row["parameters"], "ce": row["ce"],
            "outputPath": output}


def outcome(spec: ModelMergeSweepSpec, result: Plan, *, cleaning: bool) -> tuple[str, str, str]:
    """(phase, reason, message) of the sweep: while trials run or outputs are being deleted, the operator's own;
    once every trial finished, the contract's ended_sweep (the local backend decides the same way)."""
    counts = result.status["counts"]
    if spec.cancel and counts["active"]:
        return "Running", "Cancelling", f"cancelled by request; waiting for {counts['active']} trials to stop"
    if not spec.cancel and not result.done:
        if not counts["created"]:
            return "Pending", "Creating", "creating the first trials"
        return "Running", "Running", f"{counts['active']} trials running: {counts_summary(SweepCounts(**counts))}"
    if cleaning and not spec.cancel:
        return "Running", "CleaningUp", "keep=best: deleting the other trials' outputs"
    return ended_sweep(spec, statuses(result.status["trials"]), early=result.stopped_early)


def conditions(old: dict[str, Any], phase: str, reason: str, message: str, *, accepted: bool,
               stopped_early: bool, cleaned: tuple[bool, str] | None, now: str) -> list[dict[str, Any]]:
    """Accepted, Running, the terminal one (Complete, Failed, Cancelled), EarlyStopped, OutputsCleaned."""
    wanted = [{"type": "Accepted", "status": "True" if accepted else "False", "reason": "Valid" if accepted
               else reason, "message": "" if accepted else message}]
    if accepted:
        wanted.append({"type": "Running", "status": "True" if phase == "Running" else "False", "reason": reason,
                       "message": ""})
    terminal = {"Succeeded": "Complete", "Failed": "Failed", "Cancelled": "Cancelled"}.get(phase)
    if terminal:
        wanted.append({"type": terminal, "status": "True", "reason": reason, "message": message})
    if stopped_early:
        wanted.append({"type": "EarlyStopped", "status": "True", "reason": "NoImprovement", "message": ""})
    if cleaned is not None:
        wanted.append({"type": "OutputsCleaned", "status": "True" if cleaned[0] else "False",
                       "reason": "Deleted" if cleaned[0] else "CleanupFailed", "message": cleaned[1]})
    return merge_conditions(old.get("conditions"), wanted, now)
