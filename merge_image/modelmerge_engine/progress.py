"""Progress on stderr: a redrawn bar on a terminal, otherwise one line per step (logs, pods, the local
backend). Lines look like `[merge] 42.0% 120/290 tensors 85.1 tensors/s 1.4s` so callers can parse them."""

from __future__ import annotations

import sys
import time
from typing import TextIO

LINE_INTERVAL = 1.0  # percent between two lines in line mode


class Progress:
    def __init__(self, mode: str = "auto", stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "lines"
        self.mode = mode
        self.phase = ""
        self.total = self.done = 0
        self.tensors_total = self.tensors_done = 0
        self.started = time.monotonic()
        self._last_percent = -LINE_INTERVAL

    def start(self, phase: str, total_elements: int, tensors: int = 0) -> None:
        self.phase, self.total, self.done = phase, max(total_elements, 1), 0
        self.tensors_total, self.tensors_done = tensors, 0
        self.started = time.monotonic()
        self._last_percent = -LINE_INTERVAL

    def advance(self, elements: int) -> None:
        self.done += elements
        if self.mode == "bar":
            self._emit(final=False)

    def tensor_done(self) -> None:
        self.tensors_done += 1
        if self.mode == "lines" and self.percent - self._last_percent >= LINE_INTERVAL:
            self._emit(final=False)

    def finish(self) -> None:
        self.done = self.total
        self._emit(final=True)

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.total

    def message(self, text: str) -> None:
        if self.mode != "none":
            print(text, file=self.stream, flush=True)

    def _emit(self, final: bool) -> None:
        if self.mode == "none":
            return
        elapsed = max(time.monotonic() - self.started, 1e-9)
        text = f"[{self.phase}] {self.percent:5.1f}% "
        if self.tensors_total:  # passes over ranges of many tensors (thresholds, signs) count elements only
            text += f"{self.tensors_done}/{self.tensors_total} tensors {self.tensors_done / elapsed:.1f} tensors/s "
        text += f"{elapsed:.1f}s"
        self._last_percent = self.percent
        if self.mode == "bar":
            width = 30
            filled = int(width * self.percent / 100)
            end = "\n" if final else ""
            print(f"\r{'#' * filled}{'.' * (width - filled)} {text}", end=end, file=self.stream, flush=True)
        else:
            print(text, file=self.stream, flush=True)
