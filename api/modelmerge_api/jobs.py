"""The job view the routes serve, and the small interface both backends implement."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

from modelmerge.contract import MergeEvaluation, MergeProgress, MergeRequest
from modelmerge_api.errors import Conflict

Status = Literal["pending", "running", "completed", "failed", "cancelled"]
STATUSES: tuple[str, ...] = get_args(Status)
ACTIVE = frozenset({"pending", "running"})
FINISHED = frozenset(STATUSES) - ACTIVE  # final: a finished job never changes status again


def utcnow() -> str:
    """ISO-8601 in UTC with milliseconds, as the predecessor wrote it: 2024-01-15T10:30:00.000Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def seconds_between(start: str | None, end: str | None) -> float | None:
    begun, ended = parse_time(start), parse_time(end)
    return (ended - begun).total_seconds() if begun and ended else None


@dataclass
class Job:
    job_id: str
    status: str
    created_at: str | None
    started_at: str | None = None
    completed_at: str | None = None
    error_message: str | None = None
    output_path: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    progress: MergeProgress | None = None  # shown as `progress` (overall percent) and `progress_step`
    output_rel: str | None = None  # relative to the backend's output root; not shown to clients
    evaluation: MergeEvaluation | None = None  # of a completed merge whose request asked for one
    sweep_id: str | None = None  # the sweep this merge is a trial of
    _encoded: bytes | None = field(default=None, init=False, repr=False, compare=False)  # see freeze()

    def evaluation_json(self) -> dict[str, Any] | None:
        """`evaluation` as clients see it: the contract's MergeEvaluation (the ModelMerge's status.evaluation)."""
        return self.evaluation.model_dump(mode="json") if self.evaluation else None

    def to_json(self) -> dict[str, Any]:
        """The job as clients see it (a shallow dict: `params` is shared, not copied)."""
        return {"job_id": self.job_id, "status": self.status, "created_at": self.created_at,
                "started_at": self.started_at, "completed_at": self.completed_at,
                "error_message": self.error_message, "output_path": self.output_path, "params": self.params,
                "progress": self.progress.percent if self.progress else None,
                "progress_step": _step(self.progress), "evaluation": self.evaluation_json(),
                "sweep_id": self.sweep_id}

    def json_bytes(self) -> bytes:
        """to_json() encoded as the routes send it (encode_json); encoded once if the job is frozen."""
        return self._encoded if self._encoded is not None else encode_json(self.to_json())

    def freeze(self) -> Job:
        """Encode the job now and send those bytes from then on: for a backend that keeps a job which no longer
        changes to serve it again (the local backend's finished jobs, the Kubernetes backend's view of one version
        of a ModelMerge); the job must not be changed afterwards."""
        self._encoded = encode_json(self.to_json())
        return self

    def duration(self) -> float | None:
        return seconds_between(self.started_at, self.completed_at)


def encode_json(content: Any) -> bytes:
    """JSON as starlette's JSONResponse renders it (UTF-8, compact, no NaN), so pre-encoded bodies are the same
    bytes a JSONResponse of `content` sends."""
    return json.dumps(content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode()


def jobs_page_json(jobs: list[Job], total: int, limit: int, offset: int) -> bytes:
    """GET /api/jobs's body: the jobs' bytes (json_bytes, so frozen jobs are not encoded again) spliced into the
    page object, byte for byte what encode_json of the whole object gives."""
    following = offset + len(jobs)
    rest = encode_json({"total": total, "limit": limit, "offset": offset,
                        "next_offset": following if following < total else None})
    return b'{"jobs":[' + b",".join(job.json_bytes() for job in jobs) + b"]," + rest[1:]


def _step(progress: MergeProgress | None) -> str | None:
    """The current step and its index out of all steps, e.g. 'merge 3/3'."""
    return f"{progress.step} {progress.stepIndex}/{progress.steps}" if progress else None


def advanced(known: MergeProgress | None, reported: MergeProgress | None) -> MergeProgress | None:
    """A job's progress after a new report: the report, unless it is behind what is known (a late report, or a
    retried merge starting over), so the progress a client sees never goes down while a job runs."""
    if known is not None and reported is not None and reported.percent < known.percent:
        return known
    return reported


def check_cancellable(job: Job) -> None:
    """Only pending and running jobs can be cancelled: anything else is a 409."""
    if job.status not in ACTIVE:
        raise Conflict(f"job {job.job_id!r} is already {job.status}; only pending or running jobs can be "
                       "cancelled")


def request_params(request: MergeRequest, output_rel: str) -> dict[str, Any]:
    """What `params` echoes: every request field (there are no secrets among them), output_dir normalized."""
    params = request.model_dump(mode="json")
    params["output_dir"] = output_rel
    return params


class WouldBlock(Exception):
    """A read that needs network I/O was asked not to block: the route retries it in a worker thread."""


class Backend(Protocol):
    """What the routes need from a backend. Both implementations raise `errors.ApiError` subclasses."""

    name: str
    output_root: Path

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def health(self) -> dict[str, Any]:
        """{"merging_available": bool, ...backend details}; must be cheap (cached) and never raise."""
        ...

    def submit(self, job_id: str, request: MergeRequest, output_rel: str, hf_token: str | None) -> Job:
        """Record (and queue) a validated request; nothing is created when it raises."""
        ...

    def get(self, job_id: str, *, blocking: bool = True) -> Job:
        """With blocking=False (called on the event loop) answer from local state or raise WouldBlock."""
        ...

    def list(self, status: str | None, limit: int, offset: int, *, sweep_id: str | None = None,
             blocking: bool = True) -> tuple[list[Job], int]:
        """Newest first, of one sweep when `sweep_id` is given; returns (page, total matching). `blocking` as for
        get."""
        ...

    def cancel(self, job_id: str) -> Job:
        """Stop a pending or running job (`check_cancellable` decides, for every backend)."""
        ...

    def logs(self, job_id: str, *, follow: bool) -> Iterator[bytes]: ...

    def stats(self) -> tuple[dict[str, int], list[float]]:
        """(job count per status, durations in seconds of finished merges) for /metrics."""
        ...

    def evaluations(self) -> list[MergeEvaluation]:
        """The evaluations of completed merges, for /metrics."""
        ...
