"""Progress reporting shared by every long stage (training, fitting, attribution).

A stage reports ``(stage, fraction, eta_seconds, message)`` through a plain callable so that
the library knows nothing about who listens: the CLI prints a line, the job runner writes the
row of its SQLite table, tests collect the calls in a list.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

__all__ = ["ProgressFn", "Progress", "StageTimer", "print_progress", "no_progress", "Cancelled"]


class ProgressFn(Protocol):
    def __call__(self, stage: str, fraction: float, eta_seconds: Optional[float], message: str = "") -> None: ...


class Cancelled(RuntimeError):
    """Raised inside a stage when its listener asked it to stop (the work done so far is kept)."""


def no_progress(stage: str, fraction: float, eta_seconds: Optional[float], message: str = "") -> None:
    """A listener that ignores every report."""


def print_progress(stage: str, fraction: float, eta_seconds: Optional[float], message: str = "") -> None:
    """The CLI's listener: one line per report on stderr."""
    eta = "" if eta_seconds is None else f", about {eta_seconds:.0f} s left"
    text = f" {message}" if message else ""
    print(f"[{stage}] {100 * fraction:5.1f}%{eta}{text}", file=sys.stderr, flush=True)


Progress = Callable[..., None]


@dataclass
class StageTimer:
    """Turns 'done/total' into a fraction and a time-left estimate, and throttles reports.

    ``start_fraction`` lets a resumed stage estimate its speed from the work done in this
    process only (the steps restored from a checkpoint took no time here).
    """

    stage: str
    total: int
    progress: Callable[..., None] = no_progress
    min_interval: float = 0.5
    _t0: float = field(default_factory=time.monotonic)
    _done0: Optional[int] = None
    _last: float = 0.0

    def update(self, done: int, message: str = "", force: bool = False) -> None:
        now = time.monotonic()
        if self._done0 is None:
            self._done0, self._t0 = done, now
        if not force and now - self._last < self.min_interval and done < self.total:
            return
        self._last = now
        fraction = min(1.0, done / max(1, self.total))
        rate_done = done - self._done0
        eta = None
        if rate_done > 0:
            eta = (now - self._t0) / rate_done * max(0, self.total - done)
        self.progress(self.stage, fraction, eta, message)

    def finish(self, message: str = "") -> None:
        self.progress(self.stage, 1.0, 0.0, message)
