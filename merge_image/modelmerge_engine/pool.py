"""An ordered, bounded map over worker threads.

The compiled kernels (and torch's) release the GIL, so Python threads each running one range use every core
without OpenMP's barriers (which spin badly on a busy 2-core machine). The window bounds how many ranges are
in flight, and so the memory."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class OrderedPool:
    def __init__(self, workers: int, *, name: str = "merge", window: int | None = None):
        """`window`: how many items may be submitted and not yet taken (default one more than the workers): a
        wider window lets the threads run further ahead of a consumer that waits on a long item."""
        self.workers = max(1, workers)
        self.window = max(self.workers + 1, window or 0)
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix=name) if self.workers > 1 else None

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        if self._executor is None:
            yield from map(fn, items)
            return
        window: deque[Future] = deque()
        try:
            for item in items:
                window.append(self._executor.submit(fn, item))
                if len(window) >= self.window:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            for future in window:
                future.cancel()
            for future in window:
                if not future.cancelled():
                    future.exception()  # wait, so nothing still runs on buffers we are about to release

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
