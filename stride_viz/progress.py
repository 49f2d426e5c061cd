"""Progress reporting shared by every long stage (training, fitting, attribution).

A stage reports ``(stage, fraction, eta_seconds, message)`` through a plain callable so that
the library knows nothing about who listens: the CLI prints a line, the job runner writes the
row of its SQLite table, tests collect the calls in a list.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

__all__ = ["ProgressFn", "Progress", "StageTimer", "print_progress", "no_progress", "Cancelled",
           "Stage", "JobProgress", "overall_fraction", "overall_eta"]


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


# ----------------------------------------------------------------------------- whole jobs

@dataclass(frozen=True)
class Stage:
    """One stage of a job's plan: the name its code reports, the words a user reads, and the
    seconds it is expected to take (measured on a reference machine: only the ratios between
    the stages of one plan matter, the job's own speed is measured as it runs)."""

    name: str
    label: str
    seconds: float


def overall_fraction(plan: Sequence[Stage], index: int, fraction: float) -> float:
    """Fraction of the whole job done when stage ``plan[index]`` is ``fraction`` done: the
    stages before it count as done, each stage weighs its expected seconds."""
    total = sum(s.seconds for s in plan)
    if total <= 0:
        return (index + min(1.0, max(0.0, fraction))) / max(1, len(plan))
    before = sum(s.seconds for s in plan[:index])
    return (before + plan[index].seconds * min(1.0, max(0.0, fraction))) / total


def overall_eta(plan: Sequence[Stage], index: int, fraction: float, stage_eta: Optional[float],
                speed: Optional[float]) -> Optional[float]:
    """Seconds left for the whole job: the stage's own time left (``stage_eta``, else its
    remaining expected seconds times ``speed``) plus the expected seconds of the stages after
    it times ``speed`` (seconds this job takes per expected second). None when unknown."""
    if speed is None:
        return stage_eta if index == len(plan) - 1 else None
    if stage_eta is None:
        stage_eta = speed * plan[index].seconds * (1.0 - min(1.0, max(0.0, fraction)))
    return stage_eta + speed * sum(s.seconds for s in plan[index + 1:])


class JobProgress:
    """A progress listener that reports the whole job instead of its stages.

    Each report ``(stage, fraction, eta, message)`` of a stage in ``plan`` is passed on to
    ``listener`` as ``(stage, overall fraction, overall seconds left, message)``; stages the
    job skipped (a model already built, operators already fitted) count as done once a later
    stage reports. The job's speed (seconds per expected second) is measured on the stage
    that runs: from its own time-left estimate while it runs, from its duration when it ends,
    so a slower machine or a resumed fit still gets an honest total. Reports of names not in
    the plan keep the current stage's position.
    """

    def __init__(self, plan: Sequence[Stage], listener: Callable[..., None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not plan:
            raise ValueError("A JobProgress needs a plan of at least one stage.")
        self.plan = tuple(plan)
        self.listener, self.clock = listener, clock
        self.index, self.fraction = 0, 0.0
        self.speed: Optional[float] = None
        self._stage_start: Optional[tuple[float, float]] = None   # (time, fraction) of its first report

    def __call__(self, stage: str, fraction: float, eta_seconds: Optional[float], message: str = "") -> None:
        names = [s.name for s in self.plan]
        now = self.clock()
        if stage in names:
            index = names.index(stage)
            if index != self.index or self._stage_start is None:
                self.index, self._stage_start = index, (now, fraction)
            self.fraction = fraction
            self._measure_speed(now, fraction, eta_seconds)
        else:
            eta_seconds = None   # the time left of something outside the plan says nothing here
        total = overall_fraction(self.plan, self.index, self.fraction)
        eta = overall_eta(self.plan, self.index, self.fraction, eta_seconds, self.speed)
        self.listener(stage, total, eta, message)

    def _measure_speed(self, now: float, fraction: float, eta: Optional[float]) -> None:
        expected = self.plan[self.index].seconds
        if expected <= 0:
            return
        if eta is not None and fraction < 1.0:
            self.speed = eta / (expected * (1.0 - fraction))
            return
        t0, f0 = self._stage_start
        if fraction > f0 and now - t0 >= 1.0:   # a stage over in a moment (reused) says nothing
            self.speed = (now - t0) / (expected * (fraction - f0))
