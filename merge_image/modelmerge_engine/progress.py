"""Progress on stderr: a redrawn bar on a terminal, otherwise one line per update (logs, pods, the local
backend). Every update is the contract's `MergeProgress(...).line(detail)`, so both backends read it with
`modelmerge.contract.parse_progress`, e.g.

    [thresholds 1/3]  12.5% overall, 37.5% of step 4194304/11184810 values 51.0M values/s 0.1s
    [merge 3/3]  80.7% overall, 42.0% of step 1761607/4194304 values 120/290 tensors 85.1 tensors/s 1.4s

The steps of the whole merge are planned up front, each with the element work it will do (reads of one
model's values); `overall` weighs each step by that work, so it never goes down and reaches 100 at the end.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

from modelmerge.contract import MergeProgress

LINE_INTERVAL = 1.0  # overall percent between two lines in line mode
BAR_INTERVAL = 0.1  # overall percent between two redraws of the bar
BAR_WIDTH = 30


@dataclass(frozen=True)
class Step:
    name: str
    work: int  # element visits the step will make; its weight in the overall percent


class Progress:
    def __init__(self, mode: str = "auto", stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "lines"
        if mode not in ("bar", "lines", "none"):
            raise ValueError(f"progress mode must be auto, bar, lines or none, not {mode!r}")
        self.mode = mode
        self.steps: tuple[Step, ...] = ()
        self.index = -1  # the current step's position in self.steps; -1 between steps
        self.ended = 0  # how many steps have ended
        self.work_before = 0  # work of the steps already finished
        self.total_work = 0
        self.step_done = 0
        self.tensors_total = self.tensors_done = 0
        self.started = self.step_started = time.monotonic()
        self._shown = -100.0  # overall percent of the last line or redraw
        self._advancing = threading.Lock()  # statistics threads (Method.statistics_ahead) advance it too

    def plan(self, steps: Sequence[Step]) -> None:
        """The steps of the whole merge, in the order they will run."""
        if not steps:
            raise ValueError("a merge has at least one step")
        self.steps = tuple(steps)
        self.total_work = sum(s.work for s in self.steps)
        self.index, self.ended, self.work_before, self.step_done = -1, 0, 0, 0
        self.started = time.monotonic()

    def begin_step(self, name: str, *, tensors: int = 0) -> None:
        """Start the next planned step; `tensors` > 0 counts tensors in the detail (the merge step)."""
        if self.index >= 0:
            raise RuntimeError(f"step {self.step.name!r} was not ended before {name!r} began")
        if self.ended >= len(self.steps) or self.steps[self.ended].name != name:
            planned = [s.name for s in self.steps]
            raise RuntimeError(f"step {name!r} is not the next planned step (plan: {planned})")
        self.index = self.ended
        self.step_done = 0
        self.tensors_total, self.tensors_done = tensors, 0
        self.step_started = time.monotonic()
        self._emit(final=False)

    def advance(self, work: int) -> None:
        with self._advancing:
            self.step_done += work
            self._maybe_emit()

    def tensor_done(self) -> None:
        with self._advancing:
            self.tensors_done += 1
            self._maybe_emit()

    def end_step(self) -> None:
        """The current step is complete (its line says 100% of step, and its detail the work actually done)."""
        self._emit(final=True)
        self.work_before += self.step.work
        self.ended += 1
        self.index = -1

    def message(self, text: str) -> None:
        if self.mode != "none":
            print(text, file=self.stream, flush=True)

    # --- state --------------------------------------------------------------------------------------------

    @property
    def step(self) -> Step:
        return self.steps[self.index]

    def _step_fraction(self, *, final: bool) -> float:
        if final:
            return 1.0
        return min(self.step_done, self.step.work) / self.step.work if self.step.work else 0.0

    def _overall(self, *, final: bool) -> float:
        """Overall percent: steps weighted by their work (by their count when no step has any work)."""
        fraction = self._step_fraction(final=final)
        if not self.total_work:
            return 100.0 * (self.index + fraction) / len(self.steps)
        return min(100.0, 100.0 * (self.work_before + fraction * self.step.work) / self.total_work)

    def state(self, *, final: bool = False) -> MergeProgress:
        """The contract's view of now; `final`: the current step has just completed."""
        return MergeProgress(percent=self._overall(final=final), step=self.step.name, stepIndex=self.index + 1,
                             steps=len(self.steps), stepPercent=100.0 * self._step_fraction(final=final))

    # --- output -------------------------------------------------------------------------------------------

    def detail(self) -> str:
        """Counts (the step's work as `done/planned values`: one model's element read once is one value),
        rate and time since the merge started."""
        now = time.monotonic()
        seconds = max(now - self.step_started, 1e-9)
        text = f"{self.step_done}/{self.step.work} values"
        if self.tensors_total:
            text += f" {self.tensors_done}/{self.tensors_total} tensors {self.tensors_done / seconds:.1f} tensors/s"
        else:
            text += f" {self.step_done / 1e6 / seconds:.1f}M values/s"
        return f"{text} {now - self.started:.1f}s"

    def _maybe_emit(self) -> None:
        interval = LINE_INTERVAL if self.mode == "lines" else BAR_INTERVAL
        if self.mode != "none" and self._overall(final=False) - self._shown >= interval:
            self._emit(final=False)

    def _emit(self, *, final: bool) -> None:
        if self.mode == "none":
            return
        state = self.state(final=final)
        self._shown = state.percent
        line = state.line(self.detail())
        if self.mode == "lines":
            print(line, file=self.stream, flush=True)
            return
        filled = int(BAR_WIDTH * state.percent / 100)
        print(f"\r{'#' * filled}{'.' * (BAR_WIDTH - filled)} {line}\033[K", end="\n" if final else "",
              file=self.stream, flush=True)
