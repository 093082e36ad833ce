"""The local backend's sweep tables, in the job table's SQLite file (`jobs.db`): one row per sweep and one per
trial that was started.

A trial row is written before its merge job, and the job's id is derived from the sweep and the trial (see
`local_sweeps`), so the runner can always tell from these rows what exists: after a restart it creates the job
of a trial whose row exists but whose job does not, and never a second trial with the same index."""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelmerge_api.errors import Conflict
from modelmerge_api.jobs import utcnow

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sweeps (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL,
    started_at TEXT,
    completed_at TEXT,
    reason TEXT,
    message TEXT,
    output_rel TEXT NOT NULL,
    spec TEXT NOT NULL,
    total INTEGER NOT NULL,
    cancel INTEGER NOT NULL DEFAULT 0,
    has_token INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS sweeps_by_status ON sweeps(status, seq);
CREATE UNIQUE INDEX IF NOT EXISTS sweeps_active_output ON sweeps(output_rel)
    WHERE status IN ('pending', 'running');
CREATE TABLE IF NOT EXISTS sweep_trials (
    sweep_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    name TEXT NOT NULL,
    job_id TEXT NOT NULL UNIQUE,
    attempt INTEGER NOT NULL DEFAULT 0,
    params TEXT NOT NULL,
    status TEXT,
    objective REAL,
    message TEXT,
    PRIMARY KEY (sweep_id, idx)
);
"""
_SWEEP_COLUMNS = ("id, status, created_at, started_at, completed_at, reason, message, output_rel, spec, total, "
                  "cancel, has_token")
_TRIAL_COLUMNS = "idx, name, job_id, attempt, params, status, objective, message"


@dataclass
class TrialRecord:
    """A started trial: its merge job (`job_id`, the latest attempt's) and, once that job ended, its outcome:
    `status` the job's final status (None until then), `objective` the sweep's objective value and `message` why
    it has none."""

    index: int
    name: str
    job_id: str
    attempt: int
    params: dict[str, Any]
    status: str | None = None
    objective: float | None = None
    message: str | None = None


@dataclass
class SweepRecord:
    sweep_id: str
    status: str
    created_at: str
    output_rel: str
    spec: dict[str, Any]
    total: int
    started_at: str | None = None
    completed_at: str | None = None
    reason: str | None = None  # of the final status, e.g. Completed, EarlyStopped, AllTrialsFailed
    message: str | None = None
    cancel: bool = False
    has_token: bool = False
    trials: list[TrialRecord] = field(default_factory=list)


class SweepStore:
    """One connection guarded by a lock: sweeps are written by one runner thread and read by a few requests.
    Every change is one autocommitted statement."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _rows(self, sql: str, *args: object) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _change(self, sql: str, *args: object) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    # ---- sweeps ------------------------------------------------------------------------------------------

    def insert(self, sweep: SweepRecord) -> None:
        try:
            self._change(
                f"INSERT INTO sweeps ({_SWEEP_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                sweep.sweep_id, sweep.status, sweep.created_at, sweep.started_at, sweep.completed_at, sweep.reason,
                sweep.message, sweep.output_rel, json.dumps(sweep.spec), sweep.total, int(sweep.cancel),
                int(sweep.has_token))
        except sqlite3.IntegrityError:
            raise Conflict(f"output_dir: {sweep.output_rel!r} is the output of another pending or running sweep") \
                from None

    def get(self, sweep_id: str) -> SweepRecord | None:
        rows = self._rows(f"SELECT {_SWEEP_COLUMNS} FROM sweeps WHERE id = ?", sweep_id)
        if not rows:
            return None
        sweep = _sweep(rows[0])
        sweep.trials = self.trials(sweep_id)
        return sweep

    def page(self, limit: int, offset: int) -> tuple[list[SweepRecord], int]:
        """Sweeps newest first, without their trials."""
        rows = self._rows(f"SELECT {_SWEEP_COLUMNS} FROM sweeps ORDER BY seq DESC LIMIT ? OFFSET ?", limit, offset)
        total = self._rows("SELECT count(*) FROM sweeps")[0][0]
        return [_sweep(row) for row in rows], total

    def active_ids(self) -> list[str]:
        """Sweeps that are not finished, oldest first."""
        return [row[0] for row in self._rows(
            "SELECT id FROM sweeps WHERE status IN ('pending', 'running') ORDER BY seq")]

    def start(self, sweep_id: str) -> None:
        self._change("UPDATE sweeps SET status = 'running', started_at = ? WHERE id = ? AND status = 'pending'",
                     utcnow(), sweep_id)

    def request_cancel(self, sweep_id: str) -> bool:
        """Mark an unfinished sweep for cancellation; False when it has already ended."""
        return self._change("UPDATE sweeps SET cancel = 1 WHERE id = ? AND status IN ('pending', 'running')",
                            sweep_id) == 1

    def finish(self, sweep_id: str, status: str, *, reason: str, message: str | None) -> None:
        self._change("UPDATE sweeps SET status = ?, reason = ?, message = ?, completed_at = ? "
                     "WHERE id = ? AND status IN ('pending', 'running')", status, reason, message, utcnow(), sweep_id)

    # ---- trials ------------------------------------------------------------------------------------------

    def trials(self, sweep_id: str) -> list[TrialRecord]:
        rows = self._rows(f"SELECT {_TRIAL_COLUMNS} FROM sweep_trials WHERE sweep_id = ? ORDER BY idx", sweep_id)
        return [_trial(row) for row in rows]

    def add_trial(self, sweep_id: str, trial: TrialRecord) -> None:
        """Record a trial before its job is created (a second call for the same index changes nothing)."""
        self._change(f"INSERT OR IGNORE INTO sweep_trials (sweep_id, {_TRIAL_COLUMNS}) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     sweep_id, trial.index, trial.name, trial.job_id, trial.attempt, json.dumps(trial.params),
                     trial.status, trial.objective, trial.message)

    def retry_trial(self, sweep_id: str, index: int, job_id: str, attempt: int) -> None:
        """Point a trial at a new attempt's job (its earlier job was interrupted by a server stop)."""
        self._change("UPDATE sweep_trials SET job_id = ?, attempt = ? WHERE sweep_id = ? AND idx = ? AND "
                     "attempt = ? AND status IS NULL", job_id, attempt, sweep_id, index, attempt - 1)

    def finish_trial(self, sweep_id: str, index: int, *, status: str, objective: float | None,
                     message: str | None) -> None:
        """Record how a trial ended (once: a finished trial stays as it is)."""
        self._change("UPDATE sweep_trials SET status = ?, objective = ?, message = ? "
                     "WHERE sweep_id = ? AND idx = ? AND status IS NULL", status, objective, message, sweep_id, index)


def _sweep(row: sqlite3.Row) -> SweepRecord:
    return SweepRecord(sweep_id=row["id"], status=row["status"], created_at=row["created_at"],
                       started_at=row["started_at"], completed_at=row["completed_at"], reason=row["reason"],
                       message=row["message"], output_rel=row["output_rel"], spec=json.loads(row["spec"]),
                       total=row["total"], cancel=bool(row["cancel"]), has_token=bool(row["has_token"]))


def _trial(row: sqlite3.Row) -> TrialRecord:
    return TrialRecord(index=row["idx"], name=row["name"], job_id=row["job_id"], attempt=row["attempt"],
                       params=json.loads(row["params"]), status=row["status"], objective=row["objective"],
                       message=row["message"])
