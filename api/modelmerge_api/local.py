"""The embedded local backend: a SQLite job table under a data dir and a bounded pool of worker threads, each
running `modelmerge merge` as a subprocess (its own process group, killed with the server).

Layout of the data dir: `jobs.db`, `logs/<job>.log`, `work/<job>/{spec,summary}.json`, `output/` (the default
output root). Restart policy: a job that was running when the server stopped is marked failed with an
"interrupted" message (its merge wrote into a temporary sibling, so no half-written output looks finished);
pending jobs stay queued, except those submitted with an hf_token, which is never stored: they fail with a
message asking to resubmit.

Evaluation: a request's local data files are relative to the output root (as a ModelMerge's are to its output
volume), checked at submit and resolved to absolute paths for the engine; a completed job's evaluation is the one
in its summary.json (read once, then cached).

A sweep's trials (jobs with a sweep_id, in `<sweep output folder>/<trial>`) run with the work cache
`<sweep output folder>/.work-cache`, so work that does not depend on the trial's parameters is done once."""

from __future__ import annotations

import dataclasses
import fcntl
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from modelmerge.contract import MergeEvaluation, MergeProgress, MergeRequest, engine_outcome, parse_progress
from modelmerge.sweep import WORK_CACHE_FOLDER
from modelmerge_api import outputs
from modelmerge_api.errors import ApiError, Unavailable, job_not_found
from modelmerge_api.jobs import (
    ACTIVE,
    FINISHED,
    Job,
    advanced,
    check_cancellable,
    request_params,
    seconds_between,
    utcnow,
)
from modelmerge_api.store import JobStore

INTERRUPTED = ("interrupted: the API server stopped while this merge was running; "
               "its partial output was discarded, resubmit the job")
TOKEN_LOST = ("interrupted: the API server restarted before this job started, and its hf_token is never "
              "stored; resubmit the job")
KILL_GRACE_S = 10.0
EVALUATION_CACHE_SIZE = 20_000
_SECRET_ENV = ("MODELMERGE_API_TOKEN",)


def default_engine_command() -> list[str]:
    return [sys.executable, "-m", "modelmerge.cli"]


class LocalBackend:
    name = "local"

    def __init__(self, data_dir: Path, output_root: Path | None = None, workers: int = 1,
                 engine_command: list[str] | None = None) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.output_root = Path(output_root or self.data_dir / "output").expanduser().resolve()
        self.workers = max(1, workers)
        self.engine_command = engine_command or default_engine_command()
        self.store: JobStore | None = None
        self._tokens: dict[str, str] = {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._progress: dict[str, MergeProgress] = {}  # of running jobs, by job id
        self._finished_steps: dict[str, int] = {}  # how many steps finished merges reported (bounded)
        self._evaluations: dict[str, MergeEvaluation | None] = {}  # of completed jobs (never change), by job id
        self._kept: dict[str, Job] = {}  # jobs as last served (filled in, frozen), by job id: see _served
        self._wake = threading.Condition()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock_file: IO[str] | None = None

    # ---- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        for folder in (self.data_dir, self.data_dir / "logs", self.data_dir / "work", self.output_root):
            folder.mkdir(parents=True, exist_ok=True)
        self._lock_data_dir()
        self.store = JobStore(self.data_dir / "jobs.db")
        self._recover()
        for index in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"merge-worker-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stopping.set()
        with self._wake:
            self._wake.notify_all()
        for proc in list(self._procs.values()):
            _signal_group(proc, signal.SIGTERM)
        for thread in self._threads:
            thread.join(timeout=KILL_GRACE_S)
        for proc in list(self._procs.values()):  # still there after the grace period
            _signal_group(proc, signal.SIGKILL)
        for thread in self._threads:
            thread.join(timeout=5)
        if self.store:
            self.store.close()
        if self._lock_file:
            self._lock_file.close()

    def _lock_data_dir(self) -> None:
        """Two servers on one data dir would fail each other's running jobs on start: refuse the second."""
        self._lock_file = open(self.data_dir / "server.lock", "w")  # held until stop()
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another modelmerge server already uses the data dir {self.data_dir}") from None

    def _recover(self) -> None:
        for job, _, pid in self.store.with_status("running"):
            _kill_orphan(pid, job.job_id)
            self.store.finish(job.job_id, "failed", INTERRUPTED)
        for job, has_token, _ in self.store.with_status("pending"):
            if has_token:
                self.store.finish(job.job_id, "failed", TOKEN_LOST, was=("pending",))

    # ---- the interface -----------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        available = all(_importable(name) for name in ("torch", "modelmerge_engine.run"))
        return {"merging_available": available, "workers": self.workers,
                "running": len(self._procs), "output_root": str(self.output_root)}

    def submit(self, job_id: str, request: MergeRequest, output_rel: str, hf_token: str | None, *,
               sweep_id: str | None = None) -> Job:
        """`sweep_id`: the sweep whose trial this merge is (local_sweeps submits its trials here)."""
        if self._stopping.is_set():
            raise Unavailable("the server is shutting down")
        if request.evaluation is not None:
            outputs.evaluation_data(self.output_root, request.evaluation.data)
        target = outputs.ensure_free(self.output_root, output_rel)
        job = Job(job_id=job_id, status="pending", created_at=utcnow(), output_path=str(target),
                  params=request_params(request, output_rel), output_rel=output_rel, sweep_id=sweep_id)
        if hf_token:
            self._tokens[job.job_id] = hf_token
        self.store.insert(job, has_token=bool(hf_token))
        with self._wake:
            self._wake.notify()
        return job

    def get(self, job_id: str, *, blocking: bool = True) -> Job:  # a local SQLite read never waits long
        job = self.store.get(job_id)
        if job is None:
            raise job_not_found(job_id)
        return self._served(job)

    def list(self, status: str | None, limit: int, offset: int, *, sweep_id: str | None = None,
             blocking: bool = True) -> tuple[list[Job], int]:
        jobs, total = self.store.page(status, limit, offset, sweep_id=sweep_id, held=self._kept)
        return [self._served(job) for job in jobs], total

    def _served(self, job: Job) -> Job:
        """The job as served, filled in. A served job is kept filled in and encoded (Job.freeze), and the store
        hands it back for a row whose status is still the same (JobStore.page's `held`): it is served again
        as it is, without building its progress and evaluation or encoding it again, unless it is running and
        reported progress since. A finished job is kept only once its worker is done with it (its last step
        recorded)."""
        if job is self._kept.get(job.job_id):
            if job.status != "running" or job.progress is self._progress.get(job.job_id):
                return job
            job = dataclasses.replace(job)  # a fresh, unfrozen copy for the new progress
        self._fill_in(job)
        if job.status not in FINISHED or job.job_id not in self._progress:
            if len(self._kept) >= EVALUATION_CACHE_SIZE:
                self._kept.clear()
            self._kept[job.job_id] = job.freeze()
        return job

    def _fill_in(self, job: Job) -> None:
        """What the job table does not hold: the progress of a running merge (100% once completed, at its last
        step where this process saw it run, as the Kubernetes backend shows it), the evaluation of a completed
        one."""
        if job.status == "completed":
            job.progress = MergeProgress.finished(steps=self._finished_steps.get(job.job_id, 1))
        else:
            job.progress = self._progress.get(job.job_id) if job.status == "running" else None
        job.evaluation = self._evaluation(job)

    def _evaluation(self, job: Job) -> MergeEvaluation | None:
        if job.status != "completed" or not job.params.get("evaluation"):
            return None
        if job.job_id not in self._evaluations:
            if len(self._evaluations) >= EVALUATION_CACHE_SIZE:
                self._evaluations.clear()
            summary = _read_from(self.data_dir / "work" / job.job_id / "summary.json", 0)
            parsed = engine_outcome(exit_code=0, summary=summary).summary
            self._evaluations[job.job_id] = parsed.evaluation if parsed is not None else None
        return self._evaluations[job.job_id]

    def cancel(self, job_id: str) -> Job:
        check_cancellable(self.get(job_id))
        if not self.store.finish(job_id, "cancelled", "cancelled by request", was=tuple(ACTIVE)):
            check_cancellable(self.get(job_id))  # it ended between the read and the update
        self._tokens.pop(job_id, None)
        proc = self._procs.get(job_id)
        if proc is not None:
            _terminate(proc)
        return self.get(job_id)

    def logs(self, job_id: str, *, follow: bool) -> Iterator[bytes]:
        self.get(job_id)
        active = (lambda: self.store.get(job_id).status in ACTIVE) if follow else (lambda: False)
        return tail(self._log_path(job_id), active)

    def stats(self) -> tuple[dict[str, int], list[float]]:
        counts, spans = self.store.stats()
        return counts, [seconds_between(start, end) for start, end in spans]

    def evaluations(self) -> list[MergeEvaluation]:
        completed = (job for job, _, _ in self.store.with_status("completed"))
        return [evaluation for job in completed if (evaluation := self._evaluation(job)) is not None]

    # ---- workers -----------------------------------------------------------------------------------

    def _log_path(self, job_id: str) -> Path:
        return self.data_dir / "logs" / f"{job_id}.log"

    def _work(self) -> None:
        while not self._stopping.is_set():
            job = self.store.claim_next()
            if job is None:
                with self._wake:
                    self._wake.wait(timeout=1.0)
                continue
            try:
                self._run(job)
            except Exception as exc:  # a worker must survive anything one job throws at it
                self.store.finish(job.job_id, "failed", f"internal error running the merge: {exc}")
            finally:  # the last step recorded before the progress goes (_served: a job not in _progress is done)
                if last := self._progress.get(job.job_id):
                    if len(self._finished_steps) >= EVALUATION_CACHE_SIZE:
                        self._finished_steps.clear()
                    self._finished_steps[job.job_id] = last.steps
                self._progress.pop(job.job_id, None)

    def _run(self, job: Job) -> None:
        token = self._tokens.pop(job.job_id, None)
        work = self.data_dir / "work" / job.job_id
        work.mkdir(parents=True, exist_ok=True)
        target = outputs.contained(self.output_root, job.output_rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        spec, summary = work / "spec.json", work / "summary.json"
        try:
            spec.write_text(json.dumps(self._engine_request(job.params, target)))
        except ApiError as exc:  # a data file went away (or was replaced by a link out) since the job was queued
            self.store.finish(job.job_id, "failed", exc.message)
            return
        command = [sys.executable, "-m", "modelmerge_api.child", str(os.getpid()), *self.engine_command,
                   "merge", "--spec", str(spec), "--output-dir", str(target),
                   "--summary-file", str(summary), "--progress", "lines"]
        if job.sweep_id is not None:  # a sweep's trials share one work cache in the sweep's output folder
            command += ["--work-cache", str(target.parent / WORK_CACHE_FOLDER)]  # sweep.work_cache_folder
        with open(self._log_path(job.job_id), "ab") as log:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, env=_child_env(token), cwd=work,
                                    start_new_session=True)
            self._procs[job.job_id] = proc
            self.store.set_pid(job.job_id, proc.pid)
            if self.store.get(job.job_id).status != "running":  # cancelled while it was being claimed
                _terminate(proc)
            self._pump(proc, log, job.job_id, token)
            code = proc.wait()
        self._procs.pop(job.job_id, None)
        if self._stopping.is_set():
            self.store.finish(job.job_id, "failed", INTERRUPTED)
            return
        outcome = engine_outcome(exit_code=code, summary=_read_from(summary, 0))
        self.store.finish(job.job_id, "completed" if outcome.succeeded else "failed", outcome.error)

    def _engine_request(self, params: dict[str, Any], target: Path) -> dict[str, Any]:
        """The request the engine runs: the job's params with absolute output and evaluation data paths."""
        request = {**params, "output_dir": str(target)}
        if params.get("evaluation"):
            data = outputs.evaluation_data(self.output_root, params["evaluation"]["data"])
            request["evaluation"] = {**params["evaluation"], "data": data}
        return request

    def _pump(self, proc: subprocess.Popen[bytes], log: IO[bytes], job_id: str, token: str | None) -> None:
        """Copy the merge's output into its log (token redacted), keeping the progress it reports."""
        for line in proc.stdout:
            if token:
                line = line.replace(token.encode(), b"***")
            log.write(line)
            log.flush()
            if reported := parse_progress(line):
                self._progress[job_id] = advanced(self._progress.get(job_id), reported)


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _child_env(token: str | None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in _SECRET_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    if token:
        env["HF_TOKEN"] = token
    return env


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the merge's process group now, SIGKILL it if it is still there after a grace period."""
    _signal_group(proc, signal.SIGTERM)

    def escalate() -> None:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGKILL)

    timer = threading.Timer(KILL_GRACE_S, escalate)
    timer.daemon = True
    timer.start()


def _kill_orphan(pid: int | None, job_id: str) -> None:
    """A merge left over from a server that died: kill it, but only if that pid still is this job's merge."""
    if not pid:
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if job_id.encode() in cmdline:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def tail(path: Path, active: Callable[[], bool], poll_s: float = 0.25) -> Iterator[bytes]:
    """The file's content; then, while `active()`, whatever is appended to it."""
    offset = 0
    while True:
        running = active()
        chunk = _read_from(path, offset)
        offset += len(chunk)
        if chunk:
            yield chunk
        elif not running:
            return
        else:
            time.sleep(poll_s)


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read(outputs.CHUNK)
    except FileNotFoundError:
        return b""
