"""Watching a REST job's progress while it runs (both backends' progress tests)."""

from __future__ import annotations

from typing import Any

import requests

from tests.helpers.rest_api import FINAL, job
from tests.helpers.waiting import wait_for


def watch_progress(base: str, job_id: str, timeout: float = 300, **kwargs: Any) -> list[tuple[float, str]]:
    """Samples the job's `progress` and `progress_step`, from its own view and from the job list, until it
    ends; returns the samples taken while it ran. Once a running job shows progress it keeps showing it, and
    the two fields come together."""
    samples: list[tuple[float | None, str | None]] = []

    def ended() -> bool:
        viewed = job(base, job_id, **kwargs)
        listed = requests.get(f"{base}/api/jobs", params={"limit": 1000}, timeout=10, **kwargs).json()["jobs"]
        for current in (viewed, next(j for j in listed if j["job_id"] == job_id)):  # in the order read
            if current["status"] in FINAL:
                return True
            if current["status"] == "running":
                assert (current["progress"] is None) == (current["progress_step"] is None), current
                samples.append((current["progress"], current["progress_step"]))
        return False

    wait_for(ended, timeout, f"job {job_id} to end", interval=0.05)
    first = next((i for i, (percent, _) in enumerate(samples) if percent is not None), len(samples))
    assert all(percent is not None for percent, _ in samples[first:]), samples
    return samples[first:]
