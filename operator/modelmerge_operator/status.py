"""Pure functions that turn a Job (and its pods, the merge's progress and the claims it lacks, when the caller
read them) into the ModelMerge's status: phase, reason, message, times, attempts, progress, the evaluation of the
merged model and conditions. No API calls here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from modelmerge.contract import TERMINAL_PHASES, MergeEvaluation, MergeProgress, MergeSummary, Phase, engine_outcome

MESSAGE_LIMIT = 1024


# Why a merge pod cannot start. The phase stays Pending (each may clear up: the image gets pushed, a node with a
# free GPU joins, the claim is created); spec.activeDeadlineSeconds bounds the wait.
IMAGE_PROBLEMS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})
CONTAINER_PROBLEMS = IMAGE_PROBLEMS | {"CreateContainerConfigError", "CreateContainerError", "RunContainerError"}
START_PROBLEMS = CONTAINER_PROBLEMS | {"Unschedulable", "ClaimNotFound"}
WARNING_REASONS = START_PROBLEMS | {"Retrying"}  # announced with a Warning event whenever they start
WAITING_MESSAGE = "waiting for the merge pod to start"
NO_EVALUATION = ("the merge succeeded but the engine reported no evaluation (its summary has none: does the image "
                 "run an engine that evaluates?)")


@dataclass(frozen=True)
class Observation:
    """What the Job, its pods and the merge's log say; everything else in the status is derived from it."""

    phase: Phase
    reason: str
    message: str = ""
    start_time: str | None = None
    completion_time: str | None = None
    attempts: int | None = None
    progress: MergeProgress | None = None
    evaluation: MergeEvaluation | None = None  # of a succeeded merge whose spec asked for one


# ---------------------------------------------------------------------------------------------------------
# Pods: the engine's summary (termination message) and how a container ended
# ---------------------------------------------------------------------------------------------------------


def _terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        state = status.get("state") or {}
        if "terminated" in state:
            return state["terminated"]
    return None


def last_terminated(pods: list[dict[str, Any]], phase: str) -> dict[str, Any] | None:
    """The container state of the most recently finished pod in `phase` (Succeeded or Failed)."""
    done = [(t.get("finishedAt") or "", t) for pod in pods
            if (pod.get("status") or {}).get("phase") == phase and (t := _terminated(pod)) is not None]
    return max(done, key=lambda pair: pair[0])[1] if done else None


def failure_detail(terminated: dict[str, Any] | None) -> tuple[str | None, str]:
    """(reason, message) of a failed merge container: OOMKilled, or the engine's error, or the log tail the
    container left as its termination message, or what its exit code says."""
    if terminated is None:
        return None, ""
    if terminated.get("reason") == "OOMKilled":
        return "OOMKilled", "the merge container ran out of memory (raise spec.resources.memory)"
    message = (terminated.get("message") or "").strip()
    outcome = engine_outcome(exit_code=terminated.get("exitCode"), summary=message)
    if outcome.summary is None and message:
        return "MergeFailed", message  # no summary: the log's tail (FallbackToLogsOnError) says the most
    if outcome.summary is None:
        return None, outcome.error or ""
    return "MergeFailed", outcome.error or "the merge failed"


def success_detail(terminated: dict[str, Any] | None) -> str:
    summary = _success_summary(terminated)
    if summary is None:
        return "the merge finished"
    parts = [f"{summary.tensors} tensors" if summary.tensors is not None else "",
             f"in {summary.seconds:g}s" if summary.seconds is not None else ""]
    return " ".join(["merged", *[p for p in parts if p]])


def _success_summary(terminated: dict[str, Any] | None) -> MergeSummary | None:
    return engine_outcome(exit_code=0, summary=(terminated or {}).get("message")).summary


def evaluation_detail(terminated: dict[str, Any] | None) -> MergeEvaluation:
    """The evaluation in a succeeded merge's summary; a Failed one saying so when the summary has none."""
    summary = _success_summary(terminated)
    if summary is None or summary.evaluation is None:
        return MergeEvaluation(state="Failed", message=NO_EVALUATION)
    return summary.evaluation


def evaluation_sentence(evaluation: MergeEvaluation) -> str:
    """One line for the Evaluated condition and its event: the overall CE, and the best input's to compare."""
    if evaluation.state == "Failed":
        return _clip(f"the evaluation failed: {evaluation.message or 'no reason given'}")
    overall = evaluation.overall
    if overall is None or overall.ce is None:
        text = "no answer token was scored (cross-entropy undefined)"
    else:
        files = len(evaluation.files)
        perplexity = "overflows" if overall.ppl is None else f"{overall.ppl:.4g}"  # exp(ce) past a float's range
        text = (f"cross-entropy {overall.ce:.4f} (perplexity {perplexity}) over {overall.tokens} answer "
                f"tokens of {files} data file{'s' if files != 1 else ''}")
    if evaluation.bestInput is not None and evaluation.bestInputCe is not None:
        text += f"; best input {evaluation.bestInput}: {evaluation.bestInputCe:.4f}"
    return _clip(text)


def _pending_pod(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The newest pod that has not started its container yet (`pods` newest first)."""
    return next((pod for pod in pods if (pod.get("status") or {}).get("phase") == "Pending"), None)


def awaits_a_node(pods: list[dict[str, Any]]) -> bool:
    """Whether the newest pending pod is not bound to a node yet (where a missing claim keeps it)."""
    pod = _pending_pod(pods)
    return pod is not None and not (pod.get("spec") or {}).get("nodeName")


def running_pod(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The newest pod whose container runs (where the merge's progress is)."""
    return next((pod for pod in pods if (pod.get("status") or {}).get("phase") == "Running"), None)


def start_problem(pods: list[dict[str, Any]], missing_claims: list[str]) -> tuple[str, str] | None:
    """(reason, message) of what keeps the newest pending pod from starting, if anything does: its container's
    waiting reason (an image that cannot be pulled, ...), a claim that does not exist (`missing_claims`: one
    sentence each), or the scheduler's verdict."""
    pod = _pending_pod(pods)
    if pod is None:
        return None
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in CONTAINER_PROBLEMS:
            message = waiting.get("message") or waiting["reason"]
            image = container.get("image") or ""
            if waiting["reason"] in IMAGE_PROBLEMS and image not in message:
                message = f"image {image}: {message}"
            return waiting["reason"], _clip(message)
    if missing_claims and awaits_a_node(pods):
        return "ClaimNotFound", _clip("; ".join(missing_claims))
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False" and \
                condition.get("reason") == "Unschedulable":
            return "Unschedulable", _clip(condition.get("message") or "no node can run the merge pod")
    return None


# ---------------------------------------------------------------------------------------------------------
# Job → observation
# ---------------------------------------------------------------------------------------------------------


def true_conditions(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (job.get("status") or {}).get("conditions") or [] if c.get("status") == "True"}


def needs_pods(job: dict[str, Any]) -> bool:
    """Pods are read on a Job event only when their termination messages matter: the Job ended, or a pod
    failed. (What keeps a pod from starting does not change the Job: the resync reads that.)"""
    conditions = true_conditions(job)
    return "Complete" in conditions or "Failed" in conditions or bool((job.get("status") or {}).get("failed"))


def observe(job: dict[str, Any], pods: list[dict[str, Any]], queue: str | None = None, *,
            progress: MergeProgress | None = None, missing_claims: list[str] | None = None,
            evaluated: bool = False) -> Observation:
    """The merge's state from its Job and `pods` (newest first), with `progress` from the running pod's log and
    `missing_claims` (sentences) when the caller read them; `evaluated`: the spec asked for an evaluation, which
    a succeeded merge's summary carries."""
    status = job.get("status") or {}
    conditions = true_conditions(job)
    failed, active = status.get("failed") or 0, status.get("active") or 0
    common = {"start_time": status.get("startTime"),
              "attempts": failed + (status.get("succeeded") or 0) + active or None}
    if "Complete" in conditions:
        terminated = last_terminated(pods, "Succeeded")
        return Observation(Phase.Succeeded, "Completed", success_detail(terminated),
                           completion_time=status.get("completionTime") or conditions["Complete"].get(
                               "lastTransitionTime"),
                           evaluation=evaluation_detail(terminated) if evaluated else None, **common)
    if "Failed" in conditions:
        return _failed(conditions["Failed"], pods, common)
    if (job.get("spec") or {}).get("suspend") and not active:
        message = f"waiting for Kueue to admit the Job (queue {queue})" if queue else "the Job is suspended"
        return Observation(Phase.Pending, "Queued" if queue else "Suspended", message, **common)
    ready = status.get("ready")
    finishing = {"SuccessCriteriaMet", "FailureTarget"} & set(conditions) or status.get("succeeded")
    if finishing or failed or (active and (ready is None or ready > 0)):
        message = "the merge is running"
        if failed and not finishing:
            _, detail = failure_detail(last_terminated(pods, "Failed"))
            message = f"attempt {failed + 1} is starting or running; attempt {failed} failed: {detail}"
        return Observation(Phase.Running, "Retrying" if failed and not finishing else "Running",
                           _clip(message), progress=progress, **common)
    problem = start_problem(pods, missing_claims or []) if active else None
    if problem is not None:
        return Observation(Phase.Pending, *problem, **common)
    return Observation(Phase.Pending, "PodPending" if active else "JobCreated", WAITING_MESSAGE, **common)


def _failed(condition: dict[str, Any], pods: list[dict[str, Any]], common: dict[str, Any]) -> Observation:
    job_reason = condition.get("reason") or "JobFailed"
    job_message = condition.get("message") or "the Job failed"
    pod_reason, detail = failure_detail(last_terminated(pods, "Failed"))
    if pod_reason == "OOMKilled":
        reason, message = "OOMKilled", detail
    elif job_reason == "DeadlineExceeded" or pod_reason is None:
        reason, message = job_reason, job_message
    else:
        reason, message = job_reason, detail
    return Observation(Phase.Failed, reason, _clip(message),
                       completion_time=condition.get("lastTransitionTime"), **common)


def _clip(message: str) -> str:
    return message if len(message) <= MESSAGE_LIMIT else message[: MESSAGE_LIMIT - 3] + "..."


# ---------------------------------------------------------------------------------------------------------
# Observation → status (with conditions that keep their lastTransitionTime while unchanged)
# ---------------------------------------------------------------------------------------------------------

_TERMINAL_CONDITION = {Phase.Succeeded: "Complete", Phase.Failed: "Failed", Phase.Cancelled: "Cancelled"}


def evaluated_condition(evaluation: dict[str, Any] | None) -> list[dict[str, str]]:
    """`Evaluated` once a merge with an evaluation succeeded: True when it was evaluated, False when the evaluation
    failed (the merge and its output stay Succeeded)."""
    if not evaluation:
        return []
    parsed = MergeEvaluation.model_validate(evaluation)
    succeeded = parsed.state == "Succeeded"
    return [{"type": "Evaluated", "status": "True" if succeeded else "False",
             "reason": "Evaluated" if succeeded else "EvaluationFailed", "message": evaluation_sentence(parsed)}]


def desired_conditions(obs: Observation, accepted: bool = True) -> list[dict[str, str]]:
    phase = Phase(obs.phase)
    out = [{"type": "Accepted", "status": "True" if accepted else "False",
            "reason": "Valid" if accepted else obs.reason,
            "message": "" if accepted else obs.message}]
    if accepted:
        running = phase == Phase.Running
        out.append({"type": "Running", "status": "True" if running else "False", "reason": obs.reason,
                    "message": "" if running or phase in TERMINAL_PHASES else obs.message})
        if obs.reason in ("Queued", "Suspended"):
            out.append({"type": "Suspended", "status": "True", "reason": obs.reason, "message": obs.message})
    if phase in _TERMINAL_CONDITION:
        out.append({"type": _TERMINAL_CONDITION[phase], "status": "True", "reason": obs.reason,
                    "message": obs.message})
    return out


def merge_conditions(old: list[dict[str, Any]] | None, new: list[dict[str, str]], now: str) -> list[dict]:
    """New conditions, each keeping its old lastTransitionTime when its status did not change."""
    previous = {c.get("type"): c for c in old or []}
    merged = []
    for condition in new:
        before = previous.get(condition["type"])
        same = before is not None and before.get("status") == condition["status"]
        merged.append({**condition, "lastTransitionTime": before.get("lastTransitionTime", now) if same and
                       before else now})
    return merged


def build_status(old: dict[str, Any] | None, obs: Observation, *, now: str, generation: int | None,
                 job_name: str | None = None, output_path: str | None = None,
                 accepted: bool = True) -> dict[str, Any]:
    """The full status to write (a merge patch: every key is set, None clears)."""
    old = old or {}
    evaluation = obs.evaluation.model_dump(mode="json", exclude_none=True) if obs.evaluation else \
        old.get("evaluation")
    message = obs.message
    if obs.phase == Phase.Failed and old.get("reason") in START_PROBLEMS and old.get("message"):
        message = _clip(f"{message}; the merge pod never started: {old['message']}")
    return {
        "phase": str(obs.phase),
        "reason": obs.reason,
        "message": message or None,
        "jobName": job_name or old.get("jobName"),
        "startTime": obs.start_time or old.get("startTime"),
        "completionTime": obs.completion_time or old.get("completionTime"),
        "outputPath": output_path or old.get("outputPath"),
        "progress": next_progress(old, obs),
        "evaluation": evaluation,
        "attempts": obs.attempts if obs.attempts is not None else old.get("attempts"),
        "observedGeneration": generation,
        "conditions": merge_conditions(old.get("conditions"),
                                       desired_conditions(obs, accepted) + evaluated_condition(evaluation), now),
    }


def next_progress(old: dict[str, Any], obs: Observation) -> dict[str, Any] | None:
    """status.progress after `obs`: the newest report, never lower than the last one of the same pod attempt
    (a retry starts again from its own first report); 100% once the merge succeeded."""
    previous = old.get("progress") if isinstance(old.get("progress"), dict) else None  # not an older string
    if obs.phase == Phase.Succeeded:
        return MergeProgress.finished(steps=int(previous["steps"]) if previous else 1).model_dump()
    if obs.attempts is not None and obs.attempts != old.get("attempts"):
        previous = None
    if obs.progress is None or (previous is not None and obs.progress.percent < previous["percent"]):
        return previous
    return obs.progress.model_dump()


def status_changed(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """Whether writing `new` changes anything (lastTransitionTime follows the rest, so it is ignored)."""

    def strip(status: dict[str, Any]) -> dict[str, Any]:
        conditions = [{k: v for k, v in c.items() if k != "lastTransitionTime" and v not in ("", None)}
                      for c in status.get("conditions") or []]
        rest = {k: v for k, v in status.items() if k != "conditions" and v is not None}
        return {**rest, "conditions": conditions}

    return strip(old or {}) != strip(new)
