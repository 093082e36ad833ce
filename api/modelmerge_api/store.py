"""The local backend's job table: one SQLite file (WAL), one connection guarded by a lock.

Secrets are never stored: the table only remembers *whether* a job came with an HF token."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from modelmerge_api.errors import Conflict
from modelmerge_api.jobs import Job, utcnow

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL,
    started_at TEXT,
    completed_at TEXT,
    error_message TEXT,
    output_rel TEXT NOT NULL,
    output_path TEXT NOT NULL,
    params TEXT NOT NULL,
    has_token INTEGER NOT NULL DEFAULT 0,
    pid INTEGER,
    sweep_id TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs(status, seq);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_active_output ON jobs(output_rel)
    WHERE status IN ('pending', 'running');
"""
_COLUMNS = ("id, status, created_at, started_at, completed_at, error_message, output_rel, output_path, params, "
            "sweep_id")
_IDS_PER_QUERY = 500  # bound parameters of one `id IN (...)` (SQLite before 3.32 allows 999)


class JobStore:
    """One connection per thread (WAL: readers never wait for each other or for the writer; concurrent writers
    wait on SQLite's busy timeout). Every change is a single autocommitted statement."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._local = threading.local()
        self._connections: dict[int, sqlite3.Connection] = {}  # by thread ident
        self._lock = threading.Lock()
        self._params: dict[str, dict] = {}  # parsed params by job id (never change): lists skip json.loads
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        if "sweep_id" not in {row["name"] for row in self._rows("PRAGMA table_info(jobs)")}:  # a data dir from
            self._db.execute("ALTER TABLE jobs ADD COLUMN sweep_id TEXT")  # before sweeps
        self._db.execute("CREATE INDEX IF NOT EXISTS jobs_by_sweep ON jobs(sweep_id, seq) WHERE sweep_id IS NOT "
                         "NULL")

    @property
    def _db(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None,
                                         timeout=30)
            connection.row_factory = sqlite3.Row
            connection.execute("PRAGMA synchronous=NORMAL")
            self._local.connection = connection
            with self._lock:
                self._close_orphans()
                self._connections[threading.get_ident()] = connection
        return connection

    def _close_orphans(self) -> None:
        """Worker threads of the server's pool come and go: close the connections of those that ended."""
        alive = {thread.ident for thread in threading.enumerate()}
        for ident in [i for i in self._connections if i not in alive]:
            self._connections.pop(ident).close()

    def close(self) -> None:
        with self._lock:
            for connection in self._connections.values():
                connection.close()
            self._connections.clear()

    def _job(self, row: sqlite3.Row) -> Job:
        params = self._params.get(row["id"])
        if params is None:
            if len(self._params) >= 20_000:
                self._params.clear()
            params = self._params[row["id"]] = json.loads(row["params"])
        return Job(job_id=row["id"], status=row["status"], created_at=row["created_at"],
                   started_at=row["started_at"], completed_at=row["completed_at"],
                   error_message=row["error_message"], output_path=row["output_path"], params=params,
                   output_rel=row["output_rel"], sweep_id=row["sweep_id"])

    def _rows(self, sql: str, *args: object) -> list[sqlite3.Row]:
        return self._db.execute(sql, args).fetchall()

    def _change(self, sql: str, *args: object) -> int:
        return self._db.execute(sql, args).rowcount

    def insert(self, job: Job, *, has_token: bool) -> None:
        try:
            self._change(
                "INSERT INTO jobs (id, status, created_at, output_rel, output_path, params, has_token, sweep_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                job.job_id, job.status, job.created_at, job.output_rel, job.output_path,
                json.dumps(job.params), int(has_token), job.sweep_id)
        except sqlite3.IntegrityError:
            raise Conflict(f"output_dir: {job.output_rel!r} is the output of another pending or running job") \
                from None

    def get(self, job_id: str) -> Job | None:
        rows = self._rows(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", job_id)
        return self._job(rows[0]) if rows else None

    def page(self, status: str | None, limit: int, offset: int, *, sweep_id: str | None = None,
             held: Mapping[str, Job] | None = None) -> tuple[list[Job], int]:
        """Newest first, in `status` and of sweep `sweep_id` when given; (page, total matching), both read from
        one state of the table. `held`: jobs the caller already has, by id: a page's row whose status is still
        the held job's is that job (a row's shown columns change only with its status: claim_next and finish
        change it, set_pid shows nothing), returned as it is, its row not read."""
        filters = [(column, value) for column, value in (("status", status), ("sweep_id", sweep_id)) if value]
        where = "WHERE " + " AND ".join(f"{column} = ?" for column, _ in filters) if filters else ""
        args = tuple(value for _, value in filters)
        held = held or {}
        with self._snapshot():
            refs = self._rows(f"SELECT id, status FROM jobs {where} ORDER BY seq DESC LIMIT ? OFFSET ?",
                              *args, limit, offset)
            read = self._by_id([job_id for job_id, state in refs
                                if (kept := held.get(job_id)) is None or kept.status != state])
            total = self._rows(f"SELECT count(*) FROM jobs {where}", *args)[0][0]
        return [read.get(job_id) or held[job_id] for job_id, _ in refs], total

    def _by_id(self, ids: list[str]) -> dict[str, Job]:
        jobs = {}
        for start in range(0, len(ids), _IDS_PER_QUERY):
            chunk = ids[start:start + _IDS_PER_QUERY]
            marks = ", ".join("?" * len(chunk))
            jobs.update((row["id"], self._job(row))
                        for row in self._rows(f"SELECT {_COLUMNS} FROM jobs WHERE id IN ({marks})", *chunk))
        return jobs

    @contextmanager
    def _snapshot(self) -> Iterator[None]:
        """The statements in the block read one state of the table (a read transaction; WAL: no writer waits)."""
        db = self._db
        db.execute("BEGIN")
        try:
            yield
        finally:
            db.execute("COMMIT")

    def with_status(self, status: str) -> list[tuple[Job, bool, int | None]]:
        """(job, has_token, pid) of every job in `status`, oldest first (for recovery)."""
        rows = self._rows(f"SELECT {_COLUMNS}, has_token, pid FROM jobs WHERE status = ? ORDER BY seq", status)
        return [(self._job(row), bool(row["has_token"]), row["pid"]) for row in rows]

    def claim_next(self) -> Job | None:
        """Atomically move the oldest pending job to running."""
        rows = self._rows(
            f"UPDATE jobs SET status = 'running', started_at = ? WHERE seq = "
            f"(SELECT seq FROM jobs WHERE status = 'pending' ORDER BY seq LIMIT 1) RETURNING {_COLUMNS}",
            utcnow())
        return self._job(rows[0]) if rows else None

    def set_pid(self, job_id: str, pid: int) -> None:
        self._change("UPDATE jobs SET pid = ? WHERE id = ?", pid, job_id)

    def finish(self, job_id: str, status: str, error: str | None, *, was: tuple[str, ...] = ("running",)) -> bool:
        """Move a job to a final status, only from one of the statuses in `was` (so a cancel is never undone)."""
        marks = ", ".join("?" * len(was))
        return self._change(
            f"UPDATE jobs SET status = ?, error_message = ?, completed_at = ? WHERE id = ? AND status IN ({marks})",
            status, error, utcnow(), job_id, *was) == 1

    def stats(self) -> tuple[dict[str, int], list[tuple[str, str]]]:
        counts = {row[0]: row[1] for row in self._rows("SELECT status, count(*) FROM jobs GROUP BY status")}
        spans = [(row[0], row[1]) for row in self._rows(
            "SELECT started_at, completed_at FROM jobs WHERE status = 'completed' AND started_at IS NOT NULL")]
        return counts, spans
