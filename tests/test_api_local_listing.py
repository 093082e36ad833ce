"""The local backend's job list and job view as served: the same bytes a JSONResponse of the jobs' to_json() sends,
and jobs kept encoded between requests (LocalBackend._served, JobStore.page's `held`) showing every change of
their row and progress. The job table is written directly, the way the backend's workers write it."""

from __future__ import annotations

import uuid

import pytest
import requests
from starlette.responses import JSONResponse

from modelmerge.contract import MergeProgress, MergeRequest
from modelmerge_api.app import create_app
from modelmerge_api.jobs import Job, request_params, utcnow
from modelmerge_api.local import LocalBackend
from modelmerge_api.store import JobStore
from tests.helpers.rest_api import PAYLOAD, serve_in_thread

PARAMS = request_params(MergeRequest.model_validate(PAYLOAD), "x")


class Idle(LocalBackend):
    """A local backend whose workers never claim a job: the test moves jobs through their statuses itself."""

    def _work(self) -> None:
        pass


@pytest.fixture
def backend(tmp_path):
    backend = Idle(tmp_path / "data")
    backend.start()
    yield backend
    backend.stop()


def record(store: JobStore, status: str = "pending", error: str | None = None) -> str:
    job_id = str(uuid.uuid4())
    store.insert(Job(job_id=job_id, status="pending", created_at=utcnow(), output_path=f"/out/{job_id}",
                     params={**PARAMS, "output_dir": job_id}, output_rel=job_id), has_token=False)
    if status == "running":
        store.claim_next()
    elif status != "pending":
        store.finish(job_id, status, error, was=("pending",))
    return job_id


def fresh(backend: LocalBackend, job_id: str) -> dict:
    """The job as the backend showed it before jobs were kept: built from its row, filled in, to_json()."""
    job = backend.store.get(job_id)
    backend._fill_in(job)
    return job.to_json()


def test_list_and_job_bodies_are_the_bytes_json_response_sent(backend):
    statuses = ["completed", "failed", "cancelled", "pending", "completed"] * 7
    ids = [record(backend.store, status, "ünïcode “quoted” \\ error" if status == "failed" else None)
           for status in statuses]
    newest_first = ids[::-1]
    with serve_in_thread(create_app(backend)) as url:
        for _ in range(2):  # the first time each job is encoded, the second time it is kept
            for params in ({"limit": 10}, {"limit": 10, "offset": 30}, {"limit": 1000}, {"offset": 40},
                           {"status": "failed", "limit": 3, "offset": 1}, {}):
                response = requests.get(f"{url}/api/jobs", params=params, timeout=10)
                limit, offset = params.get("limit", 100), params.get("offset", 0)
                matching = [i for i in newest_first if params.get("status") in (None, backend.store.get(i).status)]
                page = matching[offset:offset + limit]
                following = offset + len(page)
                expected = JSONResponse({"jobs": [fresh(backend, i) for i in page], "total": len(matching),
                                         "limit": limit, "offset": offset,
                                         "next_offset": following if following < len(matching) else None})
                assert response.status_code == 200
                assert response.headers["content-type"] == "application/json"
                assert response.content == expected.body, params
            for job_id in ids[:6]:
                response = requests.get(f"{url}/api/jobs/{job_id}", timeout=10)
                assert response.headers["content-type"] == "application/json"
                assert response.content == JSONResponse(fresh(backend, job_id)).body


def test_a_kept_job_shows_every_change_of_its_row(backend):
    store = backend.store
    job_id = record(store)

    def listed() -> Job:
        return next(job for job in backend.list(None, 10, 0)[0] if job.job_id == job_id)

    pending = listed()
    assert listed() is pending  # kept: neither read nor encoded again
    assert store.claim_next().job_id == job_id
    running = listed()
    assert running.status == "running" and running.started_at and running.progress is None
    assert listed() is running
    for percent in (10.0, 40.0):
        backend._progress[job_id] = MergeProgress(percent=percent, step="signs", stepIndex=2, steps=3,
                                                  stepPercent=50.0)
        shown = listed().to_json()
        assert (shown["progress"], shown["progress_step"]) == (percent, "signs 2/3")
        assert listed().json_bytes() == JSONResponse(shown).body
    assert store.finish(job_id, "completed", None)
    completed = listed()  # finished in the table while its worker still holds its progress: not kept yet
    assert completed.status == "completed" and completed.completed_at
    assert listed() is not completed
    backend._finished_steps[job_id] = 3  # what the worker records when it is done, before dropping the progress
    del backend._progress[job_id]
    done = listed()
    assert (done.progress.percent, done.to_json()["progress_step"]) == (100.0, "merge 3/3")
    assert listed() is done and backend.get(job_id).to_json() == done.to_json()
    assert done.json_bytes() == JSONResponse(fresh(backend, job_id)).body


def test_a_cancelled_pending_job_is_reread(backend):
    job_id = record(backend.store)
    assert backend.list("pending", 10, 0)[0][0].status == "pending"
    backend.cancel(job_id)
    assert backend.list("pending", 10, 0) == ([], 0)
    cancelled = backend.list(None, 10, 0)[0][0]
    assert (cancelled.status, cancelled.error_message) == ("cancelled", "cancelled by request")


def test_page_reads_only_the_rows_it_does_not_hold(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    try:
        ids = [record(store, status) for status in ("completed", "pending", "failed")]
        first, total = store.page(None, 10, 0)
        assert total == 3 and [job.job_id for job in first] == ids[::-1]
        held = {job.job_id: job for job in first}
        again, _ = store.page(None, 10, 0, held=held)
        assert all(job is held[job.job_id] for job in again)  # same statuses: the held jobs themselves
        store.finish(ids[1], "cancelled", "by request", was=("pending",))
        changed, _ = store.page(None, 10, 0, held=held)
        assert changed[1] is not held[ids[1]] and changed[1].status == "cancelled"
        assert changed[1].error_message == "by request"
        assert changed[0] is held[ids[2]] and changed[2] is held[ids[0]]
        assert store.page("completed", 10, 0, held=held) == ([held[ids[0]]], 1)
    finally:
        store.close()
