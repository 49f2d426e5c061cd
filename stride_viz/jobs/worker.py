"""The worker process that runs one job: ``python -m stride_viz.jobs.worker --job ID [--db PATH]``.

It waits for its turn in the queue (one heavy job at a time), runs the job's kind with a
progress callback that writes the job row and a ``should_stop`` that reads the cancel flag,
and closes the row as done, failed (message + traceback) or cancelled. A background thread
beats the heartbeat every few seconds so that a frozen worker can be told from a slow one.

:func:`spawn` starts a worker as a detached process (new session, stdout/stderr appended to
the job's log file): it outlives the Streamlit server and is never left as its zombie.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback as tb
from pathlib import Path
from typing import Optional

from stride_viz.progress import Cancelled

from .store import HEARTBEAT_SECONDS, JobError, JobStore

# After SIGTERM the job gets this long to stop at its next should_stop check and save its
# checkpoint, then the process exits regardless.
TERM_GRACE_SECONDS = 10.0
QUEUE_POLL_SECONDS = 0.5
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def start_detached(module: str, args: list[str], log: Path, what: str) -> int:
    """Start ``python -m <module> <args>`` detached, its output appended to ``log``; its pid.

    A throw-away ``sh`` starts it in the background and exits at once, so the process is
    re-parented to init: it is not a child of the caller (no zombie in the Streamlit server)
    and it lives in its own session (a server restart or Ctrl-C does not reach it).
    """
    env = dict(os.environ)
    # the process imports this very package, wherever the caller's working directory is
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
    cmd = " ".join(shlex.quote(a) for a in [sys.executable, "-m", module, *args])
    out = subprocess.run(["/bin/sh", "-c", f"{cmd} </dev/null >>{shlex.quote(str(log))} 2>&1 & echo $!"],
                         capture_output=True, text=True, env=env, start_new_session=True, timeout=30)
    if out.returncode != 0 or not out.stdout.strip().isdigit():
        raise RuntimeError(f"could not start {what}: {out.stderr.strip()[-500:]}")
    return int(out.stdout.strip())


def spawn(store: JobStore, job_id: int) -> int:
    """Start a detached worker for ``job_id``; return its pid (also written in the row)."""
    pid = start_detached("stride_viz.jobs.worker", ["--job", str(job_id), "--db", str(store.path)],
                         store.log_path(job_id), f"a worker for job {job_id}")
    store.set_pid(job_id, pid)
    return pid


class _Runner:
    def __init__(self, store: JobStore, job_id: int) -> None:
        self.store, self.job_id = store, job_id
        self.stop = threading.Event()
        self.done = threading.Event()
        self._last_log = 0.0

    # the thread is inside the worker process, never inside the Streamlit server
    def _heartbeat(self) -> None:
        while not self.done.wait(HEARTBEAT_SECONDS):
            try:
                if self.store.beat(self.job_id):
                    self.stop.set()
            except Exception:  # a locked DB for a moment must not kill the worker
                pass

    def _on_term(self, signum, frame) -> None:
        self.stop.set()
        timer = threading.Timer(TERM_GRACE_SECONDS, lambda: os._exit(143))
        timer.daemon = True  # a worker that stopped in time exits at once
        timer.start()

    def progress(self, stage: str, fraction: float, eta_seconds: Optional[float], message: str = "") -> None:
        try:
            self.store.progress(self.job_id, stage, fraction, eta_seconds, message)
        except JobError as e:  # a locked or replaced table must not stop the work itself
            print(f"[progress not recorded: {e}]", flush=True)
        now = time.monotonic()
        # the log tail gets at most one progress line a second (plus every stage end)
        if now - self._last_log > 1.0 or fraction >= 1.0:
            self._last_log = now
            eta = "" if eta_seconds is None else f", ~{eta_seconds:.0f} s left"
            self.log(f"[{time.strftime('%H:%M:%S')}] {stage} {100 * fraction:.0f}%{eta} {message}\n")

    def log(self, text: str) -> None:
        try:
            self.store.append_log(self.job_id, text)
        except JobError as e:
            print(f"[log tail not recorded: {e}]", flush=True)
        print(text, end="", flush=True)

    def should_stop(self) -> bool:
        return self.stop.is_set()

    def run(self) -> int:
        from stride_viz.integrity import warnings_to
        from .kinds import JobContext, get_kind
        signal.signal(signal.SIGTERM, self._on_term)
        warnings_to(lambda line: self.log(line + "\n"))  # repaired damage shows in the job's log
        self.store.set_pid(self.job_id, os.getpid())
        threading.Thread(target=self._heartbeat, daemon=True).start()
        try:
            while True:
                turn = self.store.try_start(self.job_id)
                if turn == "gone" or self.stop.is_set():
                    return 0
                if turn == "started":
                    break
                time.sleep(QUEUE_POLL_SECONDS)
            job = self.store.get(self.job_id)
            self.log(f"[{time.strftime('%H:%M:%S')}] started {job.kind} job {job.id} "
                     f"(attempt {job.attempts}, pid {os.getpid()})\n")
            ctx = JobContext(job_id=job.id, progress=self.progress, should_stop=self.should_stop,
                             set_run_dir=lambda d: self.store.set_run_dir(self.job_id, d), log=self.log)
            try:
                result = get_kind(job.kind).run(job.params, ctx)
            except Cancelled as e:
                self.log(f"[{time.strftime('%H:%M:%S')}] cancelled: {e}\n")
                self.store.finish(self.job_id, "cancelled", error=f"Cancelled ({e}). Resume "
                                  f"continues from the last checkpoint.")
                return 0
            except BaseException as e:  # the job failed: keep the message and the traceback
                trace = tb.format_exc()
                self.log(trace)
                # a damaged run file, a full disk or a busy run folder: the message says it all
                error = str(e) if isinstance(e, _one_line_errors()) else f"{type(e).__name__}: {e}"
                self.store.finish(self.job_id, "failed", error=error, traceback=trace)
                return 1
            state = "cancelled" if self.stop.is_set() else "done"
            self.log(f"[{time.strftime('%H:%M:%S')}] {state}\n")  # before the row closes: readers see it
            self.store.finish(self.job_id, state, result=result)
            return 0
        finally:
            self.done.set()


def _one_line_errors() -> tuple[type, ...]:
    from stride_viz.integrity import DiskFull, RunDamaged
    from stride_viz.runlock import RunLocked
    return (RunDamaged, DiskFull, RunLocked)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", type=int, required=True, help="id of the job row to run")
    parser.add_argument("--db", type=Path, default=None, help="job database (default: data_home()/jobs.sqlite)")
    args = parser.parse_args(argv)
    return _Runner(JobStore(args.db), args.job).run()


if __name__ == "__main__":
    sys.exit(main())
