"""The warm explainer: one long-lived process per run folder that holds the model and the
operators and explains new prompts as they come (the Explore page's "Explain" box).

    python -m stride_viz.jobs.explainer --run RUN_DIR [--db PATH] [--idle SECONDS]

Requests are ``explain`` jobs in the job table (:mod:`stride_viz.jobs.kinds`).
``Executor.submit("explain", ...)`` queues the row, then wakes this run's explainer with
SIGUSR1, or starts one when none is alive: detached like a worker (its own session, output
appended to ``job_logs/explainer-<key>.log``), never a thread of the Streamlit server. The
explainer claims the queued ``explain`` jobs of its run (their pid is its own, their heartbeat
beats while they wait), loads the run once (``Stride.open``: model, operators, the Lasso's
per-fold designs) and explains each job in turn: the scores first (the Explore page shows
the query as soon as its folder is written), then, once no other request waits, the base
and steered continuations; it closes the row as done (``result["query_ids"]``) or failed (a
one-line message), and, when no request waits, adds each completion token's own scores
(``Stride.attribute_tokens``; a new request interrupts them). It exits after ``idle`` seconds
without a request (default 600, ``$STRIDE_VIZ_EXPLAINER_IDLE``), or on SIGTERM once the
request at hand is written. It runs torch on one thread (``$STRIDE_VIZ_EXPLAINER_THREADS``):
one query is small matrices, and threads that wait for busy cores cost far more than they gain.

One explainer per run folder and job table: it holds an ``flock`` on
``<db folder>/explainers/<key>.lock`` (released by the kernel when it dies, even by SIGKILL),
and ``<key>.json`` next to it names its pid for the executor. Nothing listens on a socket or a
port: requests and answers go through the job table and the run folder.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import signal
import sys
import threading
import time
import traceback as tb
from pathlib import Path
from typing import Optional

from .store import HEARTBEAT_SECONDS, JobError, JobStore, process_alive

__all__ = ["KIND", "IDLE_SECONDS", "idle_seconds", "explainer_record", "wake_or_start", "Explainer", "main"]

KIND = "explain"
IDLE_SECONDS = 600.0
# Without a wake-up signal (one lost in a race) a queued request waits at most this long.
POLL_SECONDS = 1.0
# A new explainer waits this long for the lock of one that is just exiting on its idle timeout.
LOCK_WAIT_SECONDS = 10.0
# One query is small matrices: a second torch thread gains little, and on cores shared with a
# fit or a benchmark it loses much (measured on the demo run, 2 busy cores: a 24-token
# generation 7.1 s with 2 threads, 0.12 s with 1; the 7 continuations 3-24 s against 0.6 s).
DEFAULT_THREADS = 1


def _threads() -> int:
    """$STRIDE_VIZ_EXPLAINER_THREADS (torch threads of an explainer), default DEFAULT_THREADS."""
    raw = os.environ.get("STRIDE_VIZ_EXPLAINER_THREADS", "")
    if not raw:
        return DEFAULT_THREADS
    if not raw.isdigit() or not 1 <= int(raw) <= 256:
        raise JobError(f"STRIDE_VIZ_EXPLAINER_THREADS must be an integer in [1, 256]. Got {raw!r} instead.")
    return int(raw)


def idle_seconds() -> float:
    """$STRIDE_VIZ_EXPLAINER_IDLE (seconds an explainer waits for a request before it exits),
    default IDLE_SECONDS."""
    raw = os.environ.get("STRIDE_VIZ_EXPLAINER_IDLE", "")
    if not raw:
        return IDLE_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 86_400:
        raise JobError(f"STRIDE_VIZ_EXPLAINER_IDLE must be a number of seconds in (0, 86400]. "
                       f"Got {raw!r} instead.")
    return value


def _key(run_dir: str | Path) -> str:
    path = str(Path(run_dir).resolve())
    return f"{Path(path).name[:40]}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"


def _paths(store: JobStore, run_dir: str | Path) -> tuple[Path, Path]:
    """(lock file, record file) of the explainer of ``run_dir`` for this job table."""
    folder = store.path.parent / "explainers"
    key = _key(run_dir)
    return folder / f"{key}.lock", folder / f"{key}.json"


def explainer_record(store: JobStore, run_dir: str | Path) -> Optional[dict]:
    """The record of the live explainer of ``run_dir`` (pid, state 'loading'/'ready', ...),
    or None when there is none."""
    try:
        record = json.loads(_paths(store, run_dir)[1].read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not process_alive(record.get("pid"), record.get("pid_created")):
        return None
    return record


def wake_or_start(store: JobStore, run_dir: str | Path) -> int:
    """Wake the explainer of ``run_dir`` to serve a queued request, or start one; its pid."""
    record = explainer_record(store, run_dir)
    if record is not None:
        try:
            os.kill(int(record["pid"]), signal.SIGUSR1)
            return int(record["pid"])
        except ProcessLookupError:  # it has just exited
            pass
    return _start_detached(store, run_dir)


def _start_detached(store: JobStore, run_dir: str | Path) -> int:
    """Start ``python -m stride_viz.jobs.explainer`` for ``run_dir`` as a detached process
    (see :func:`stride_viz.jobs.worker.start_detached`); return its pid."""
    from .worker import start_detached
    return start_detached("stride_viz.jobs.explainer",
                          ["--run", str(Path(run_dir).resolve()), "--db", str(store.path)],
                          store.log_dir / f"explainer-{_key(run_dir)}.log", f"the explainer of {run_dir}")


def _one_line(e: BaseException) -> str:
    """The message a user reads: input problems and damaged files say it all themselves."""
    from stride_viz.config import ConfigError
    from stride_viz.engine import QueryError
    from stride_viz.integrity import DiskFull, RunDamaged
    from stride_viz.method.recovery import RecoveryError
    if isinstance(e, (QueryError, ConfigError, RecoveryError, RunDamaged, DiskFull, JobError)):
        return " ".join(str(e).split())
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


class Explainer:
    """Serve the ``explain`` jobs of one run folder from one loaded :class:`Stride`."""

    def __init__(self, store: JobStore, run_dir: str | Path, idle: float = IDLE_SECONDS) -> None:
        self.store, self.idle = store, float(idle)
        self.run_dir = str(Path(run_dir).resolve())
        self.lock_path, self.record_path = _paths(store, self.run_dir)
        self.stride = None
        self.stamp: Optional[int] = None      # mtime of the operators file that was loaded
        self.state = "loading"
        self.claimed: dict[int, dict] = {}    # job id -> params: claimed, not yet explained
        self.finishing: dict[int, dict] = {}  # job id -> result: scores written, continuations due
        self.tokens_due: list[str] = []       # query ids whose per-token scores are still due
        self._claim_lock = threading.Lock()
        self.stop = threading.Event()
        self.done = threading.Event()

    # ------------------------------------------------------------------ bookkeeping
    def _log(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    def _write_record(self, **extra) -> None:
        import psutil
        record = {"pid": os.getpid(), "pid_created": psutil.Process().create_time(),
                  "run_dir": self.run_dir, "db": str(self.store.path), "state": self.state,
                  "idle_seconds": self.idle, **extra}
        tmp = self.record_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.record_path)

    def claim(self) -> None:
        """Take the queued explain jobs of this run that no process holds yet."""
        with self._claim_lock:
            for job in self.store.list(kind=KIND, limit=100):
                if (job.state == "queued" and job.params.get("run_dir") == self.run_dir
                        and job.pid is None and job.id not in self.claimed):
                    self.store.set_pid(job.id, os.getpid())
                    self.claimed[job.id] = job.params
                    if self.state == "loading":
                        self.store.progress(job.id, "load", 0.0, None,
                                            "the first request of this run pays this once")

    def _heartbeat(self) -> None:
        # this thread is inside the explainer process, never inside the Streamlit server
        while not self.done.wait(HEARTBEAT_SECONDS):
            try:
                for job_id in list(self.claimed) + list(self.finishing):
                    self.store.beat(job_id)
                self.claim()
            except Exception:  # a locked DB for a moment must not stop the explainer
                pass

    def _on_term(self, signum, frame) -> None:
        self.stop.set()

    # ------------------------------------------------------------------ the work
    def _operators_stamp(self) -> Optional[int]:
        from stride_viz.storage import RunStore
        try:
            return RunStore(self.run_dir).operators_path.stat().st_mtime_ns
        except OSError:
            return None

    def load(self) -> None:
        from stride_viz.config import RecoveryConfig
        from stride_viz.engine import Stride
        t0 = time.monotonic()
        self.stamp = self._operators_stamp()
        self.stride = Stride.open(self.run_dir)
        _ = self.stride.operators                     # read once, kept on the device
        self.stride.recoverer(RecoveryConfig())       # the per-fold designs of the default
        self.state = "ready"
        self._write_record(load_seconds=round(time.monotonic() - t0, 2))
        self._log(f"ready: {self.run_dir} loaded in {time.monotonic() - t0:.1f} s")

    def serve(self, job_id: int) -> None:
        """Explain one claimed job: its scores first (the page shows the query as soon as its
        folder is written); the job stays running until :meth:`finish_one` adds the
        continuations, after any other request that is waiting."""
        from .kinds import explain
        params = self.claimed[job_id]
        try:
            if self.store.try_start(job_id) != "started":
                return                                   # cancelled meanwhile
            self.store.set_run_dir(job_id, self.run_dir)
            self.store.append_log(job_id, f"explained by the warm explainer of this run (pid {os.getpid()})\n")
            t0 = time.monotonic()
            try:
                if self._operators_stamp() != self.stamp:   # refitted since they were loaded
                    self._log("the run's operators changed on disk: loading the run again")
                    self.load()
                result = explain(self.stride, params, continuations=False,
                                 progress=lambda stage, fraction, eta, message="":
                                 self.store.progress(job_id, stage, fraction, eta, message))
            except Exception as e:
                self._fail(job_id, _one_line(e))
                return
            self._log(f"job {job_id}: {result['query_ids'][0]} in {time.monotonic() - t0:.2f} s")
            self.store.progress(job_id, "continuations", 0.0, None, "the scores are written")
            self.finishing[job_id] = result
        finally:
            with self._claim_lock:
                self.claimed.pop(job_id, None)

    def finish_one(self, job_id: int) -> None:
        """Add the continuations of a served job and close its row as done; its per-token
        scores follow when nothing else waits (``result["per_token"] == "following"``)."""
        from .kinds import add_continuations
        result = self.finishing[job_id]
        result["per_token"] = "following"
        self.tokens_due.append(result["query_ids"][0])
        try:
            add_continuations(self.stride, result["query_ids"][0])
        except Exception as e:
            self._fail(job_id, f"The scores were written, the continuations could not be: {_one_line(e)}")
        else:
            self.store.finish(job_id, "done", result=result)
        finally:
            self.finishing.pop(job_id, None)

    def add_tokens(self) -> None:
        """Each completion token's own scores for the oldest query due (tokens.npz: one
        recovery per token, ~0.7 s each on the demo run), after its job is done. A request
        that arrives meanwhile goes first: the work stops before the next token and starts
        again later. A failure is logged (the query keeps its other results)."""
        from stride_viz.progress import Cancelled
        query_id = self.tokens_due.pop(0)
        t0 = time.monotonic()
        try:
            # a request is a claimed job, or a wake-up signal not yet taken by the main loop
            a = self.stride.attribute_tokens(query_id, should_stop=lambda: bool(self.claimed) or self.stop.is_set()
                                             or signal.SIGUSR1 in signal.sigpending())
        except Cancelled:
            self.tokens_due.append(query_id)
            # take the wake-up signal that stopped us (the loop claims its job from the table
            # next): left pending, it would stop every later try at once
            signal.sigtimedwait([signal.SIGUSR1], 0)
            return
        except Exception as e:
            self._log(f"per-token scores of {query_id} failed: {_one_line(e)}")
            return
        self._log(f"per-token scores of {query_id} ({a.tokens.n_tokens} tokens) in {time.monotonic() - t0:.2f} s")

    def _fail(self, job_id: int, error: str) -> None:
        trace = tb.format_exc()
        self._log(f"job {job_id} failed: {error}")
        self.store.append_log(job_id, trace)
        self.store.finish(job_id, "failed", error=error, traceback=trace)

    def _fail_claimed(self, error: str, trace: str) -> None:
        for job_id in list(self.claimed):
            if self.store.try_start(job_id) == "started":
                self.store.finish(job_id, "failed", error=error, traceback=trace)
            self.claimed.pop(job_id, None)

    def _take_lock(self) -> Optional[int]:
        """The explainer lock's fd, or None when another live explainer keeps it."""
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    return None
                time.sleep(0.1)

    def run(self) -> int:
        fd = self._take_lock()
        if fd is None:  # another explainer serves this run: make sure it saw the request
            other = explainer_record(self.store, self.run_dir)
            if other is not None:
                os.kill(int(other["pid"]), signal.SIGUSR1)
            self._log("another explainer serves this run; exiting")
            return 0
        signal.signal(signal.SIGTERM, self._on_term)
        heart = threading.Thread(target=self._heartbeat, daemon=True)
        try:
            self._write_record()
            self._log(f"explainer of {self.run_dir} started (pid {os.getpid()}, idle timeout {self.idle:g} s)")
            self.claim()
            heart.start()
            try:
                self.load()
            except Exception as e:
                self._log(f"could not load the run: {_one_line(e)}")
                self._fail_claimed(f"The run could not be loaded to explain the prompt: {_one_line(e)}",
                                   tb.format_exc())
                return 1
            last = time.monotonic()
            while not self.stop.is_set():
                try:
                    self.claim()
                    if self.claimed or self.finishing:
                        if self.claimed:                 # new requests before continuations
                            self.serve(min(self.claimed))
                        else:
                            self.finish_one(min(self.finishing))
                        last = time.monotonic()
                        continue
                    if self.tokens_due and self.state == "ready":
                        self.add_tokens()
                        last = time.monotonic()
                        continue
                except JobError as e:  # the job table locked for a while: try again shortly
                    self._log(f"job table: {e}")
                    time.sleep(POLL_SECONDS)
                    continue
                waited = time.monotonic() - last
                if waited >= self.idle:
                    # remove the record first: a request queued from now on starts a new
                    # explainer (which waits for this lock), one queued before is seen here
                    self.record_path.unlink(missing_ok=True)
                    self.claim()
                    if self.claimed:
                        self._write_record()
                        continue
                    self._log(f"no request for {waited:.0f} s: exiting")
                    break
                signal.sigtimedwait([signal.SIGUSR1], min(POLL_SECONDS, self.idle - waited))
            for job_id, result in list(self.finishing.items()):  # stopped: the scores are there
                self.store.finish(job_id, "done", result=result)
            return 0
        finally:
            self.done.set()
            try:
                record = json.loads(self.record_path.read_text())
                if record.get("pid") == os.getpid():
                    self.record_path.unlink(missing_ok=True)
            except (OSError, ValueError):
                pass
            os.close(fd)


def main(argv: Optional[list[str]] = None) -> int:
    # SIGUSR1 (the executor's "a request is queued") is taken by sigtimedwait, never by a
    # handler: blocked before anything else, so an early one cannot end the process
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="the run folder to serve")
    parser.add_argument("--db", type=Path, default=None, help="job database (default: data_home()/jobs.sqlite)")
    parser.add_argument("--idle", type=float, default=None,
                        help="seconds without a request before exiting (default: $STRIDE_VIZ_EXPLAINER_IDLE or 600)")
    args = parser.parse_args(argv)
    idle = args.idle if args.idle is not None else idle_seconds()
    import torch
    torch.set_num_threads(_threads())
    return Explainer(JobStore(args.db), args.run, idle).run()


if __name__ == "__main__":
    sys.exit(main())
