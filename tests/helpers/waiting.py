"""Polling for a condition in tests: the one helper every test module uses."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(
    check: Callable[[], Any],
    timeout: float = 60.0,
    what: str = "condition",
    *,
    context: Callable[[], str] | None = None,
    interval: float = 0.2,
) -> Any:
    """Call `check` until it returns something truthy and return that; fail after `timeout` seconds with
    `what` (and `context()`, e.g. logs or a status dump) in the message."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f"\n{context()}" if context else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{detail}")
        time.sleep(interval)
