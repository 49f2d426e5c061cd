"""How jobs are started and stopped: a small interface, and its local-process implementation.

Pages talk to an :class:`Executor` only (submit, cancel, resume, the store to read rows), so a
distributed backend (a cluster queue, a remote GPU box) can replace
:class:`LocalProcessExecutor` without touching them.
"""
from __future__ import annotations

import os
import signal
import subprocess
from abc import ABC, abstractmethod
from typing import Any, Optional

import psutil

from .kinds import get_kind
from .store import Job, JobError, JobStore, process_alive
from .worker import spawn

__all__ = ["Executor", "LocalProcessExecutor"]


class Executor(ABC):
    """Start, stop and resume jobs; their records live in ``self.store``."""

    store: JobStore

    @abstractmethod
    def submit(self, kind: str, params: dict[str, Any], title: str = "") -> int:
        """Validate ``params`` for ``kind`` (raise :class:`JobError` on bad input, nothing is
        started then), queue the job and return its id."""

    @abstractmethod
    def cancel(self, job_id: int) -> Job:
        """Stop a queued or running job; the work it saved (checkpoints) is kept."""

    @abstractmethod
    def resume(self, job_id: int) -> Job:
        """Queue a failed or cancelled job again; it continues from its checkpoints."""


class LocalProcessExecutor(Executor):
    """Every job runs in its own detached ``python -m stride_viz.jobs.worker`` process on this
    machine; heavy jobs wait in the queue for the one before them (see ``JobStore.try_start``).
    Jobs of a warm kind (``explain``) go to their run's long-lived explainer process instead
    (:mod:`stride_viz.jobs.explainer`), started on the first request and woken for each."""

    def __init__(self, store: Optional[JobStore] = None) -> None:
        self.store = store if store is not None else JobStore()

    def _spawn(self, job_id: int, kind: str, params: dict[str, Any]) -> None:
        """Start the job's worker, or hand a warm kind's job to its run's explainer."""
        try:
            if get_kind(kind).warm:
                from .explainer import wake_or_start  # late: `-m stride_viz.jobs.explainer` runs it as __main__
                wake_or_start(self.store, params["run_dir"])
            else:
                spawn(self.store, job_id)
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            self.store.append_log(job_id, f"{e}\n")
            raise JobError(f"Could not start a worker process for job {job_id}: {e}") from e

    def submit(self, kind: str, params: dict[str, Any], title: str = "") -> int:
        spec = get_kind(kind)
        clean = spec.validate(dict(params))
        heavy = bool(clean.get("heavy", spec.heavy))
        job_id = self.store.create(kind, clean, heavy=heavy, title=title or spec.title(clean))
        self._spawn(job_id, kind, clean)
        return job_id

    def cancel(self, job_id: int) -> Job:
        job = self.store.request_cancel(job_id)
        # a warm kind's pid is its run's explainer, which serves other requests too: the
        # cancelled row is enough (the explainer skips it, or its answer is not recorded)
        if process_alive(job.pid, job.pid_created) and not get_kind(job.kind).warm:
            # SIGTERM: the worker stops at its next should_stop check (saving its checkpoint)
            # and exits by itself after a short grace period in any case
            try:
                os.kill(job.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        return job

    def resume(self, job_id: int) -> Job:
        old = self.store.get(job_id)
        if process_alive(old.pid, old.pid_created) and not get_kind(old.kind).warm:
            # a cancelled worker still saving its checkpoint: let it finish before a new one starts
            try:
                psutil.Process(old.pid).wait(timeout=15)
            except psutil.TimeoutExpired:
                raise JobError(f"The previous worker of job {job_id} (pid {old.pid}) is still "
                               f"stopping; try Resume again in a few seconds.")
            except psutil.NoSuchProcess:
                pass
        job = self.store.requeue(job_id)
        self._spawn(job_id, job.kind, job.params)
        return job
