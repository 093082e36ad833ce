"""Progress tests on both backends: what a fake engine prints, and watching a REST job's progress while it runs."""

from __future__ import annotations

from typing import Any

import requests

from tests.helpers.rest_api import FINAL, job
from tests.helpers.waiting import wait_for

# Python source for fake engines (needs sys and time): `report_three_steps(pause)` prints the progress lines of
# a three-step merge, `pause` seconds apart, and after the second step one stale report going back.
THREE_STEPS = r'''
def report_three_steps(pause):
    for step, index, start, weight in (("thresholds", 1, 0.0, 40.0), ("signs", 2, 40.0, 20.0),
                                       ("merge", 3, 60.0, 40.0)):
        for of_step in (0.0, 50.0, 100.0):
            overall = start + weight * of_step / 100
            print(f"[{step} {index}/3] {overall:5.1f}% overall, {of_step:.1f}% of step", file=sys.stderr, flush=True)
            time.sleep(pause)
        if step == "signs":
            print("[thresholds 1/3]  10.0% overall, 25.0% of step", file=sys.stderr, flush=True)
            time.sleep(pause * 1.5)
'''
STALE_REPORT = "[thresholds 1/3]  10.0% overall"


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
