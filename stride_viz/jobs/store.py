"""The job table: one SQLite file under the data directory that every process shares.

The Streamlit server writes a row when a job is launched, the detached worker process
(:mod:`stride_viz.jobs.worker`) updates it while it runs (state, stage, fraction, time left,
log tail, heartbeat) and the pages read it. SQLite in WAL mode with a busy timeout is enough
for one writer per job and a few readers; every call opens its own connection because
Streamlit runs each session in its own thread and connections must not cross threads.

States: ``queued`` -> ``running`` -> ``done`` | ``failed`` | ``cancelled``. A ``failed`` or
``cancelled`` job can be resumed (back to ``queued``); the engine then continues from its
checkpoints. A job whose worker process is gone (killed, machine rebooted) or whose heartbeat
is stale is marked ``failed`` by :meth:`JobStore.reap`, which every listing calls.

Faults: a writer killed mid-transaction is rolled back by SQLite (WAL journal); a database
locked for longer than the busy timeout, or a damaged file, gives a :class:`JobError` of one
line. A damaged file is moved aside to ``jobs.sqlite.damaged-<time>`` and a fresh table is
started (the run folders, where the results are, are not touched); ``JobStore.notice`` and a
warning line say so.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from datetime import datetime
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import psutil

__all__ = ["Job", "JobStore", "JobError", "STATES", "ACTIVE_STATES", "FINAL_STATES", "max_heavy_jobs",
           "default_db_path"]

STATES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE_STATES = ("queued", "running")
FINAL_STATES = ("done", "failed", "cancelled")
LOG_TAIL_CHARS = 6000
# A worker beats every HEARTBEAT_SECONDS; after STALE_SECONDS of silence it is presumed hung.
HEARTBEAT_SECONDS = 2.0
STALE_SECONDS = 60.0
# A job row without a worker pid this long after it was (re)queued never got a worker.
SPAWN_GRACE_SECONDS = 30.0


class JobError(ValueError):
    """A job operation that is not allowed (unknown id, resume of a running job, bad input)."""


def max_heavy_jobs() -> int:
    """How many heavy jobs may run at once: $STRIDE_VIZ_MAX_HEAVY_JOBS, default 1 (a fit uses
    every core and most of the memory it can get)."""
    raw = os.environ.get("STRIDE_VIZ_MAX_HEAVY_JOBS", "1")
    if not raw.isdigit() or int(raw) < 1:
        raise JobError(f"STRIDE_VIZ_MAX_HEAVY_JOBS must be a positive integer. Got {raw!r} instead.")
    return int(raw)


def default_db_path() -> Path:
    """``<data_home>/jobs.sqlite`` (data_home: $STRIDE_VIZ_HOME or ~/.stride_viz)."""
    from stride_viz.data.models import data_home  # late: keep `import stride_viz.jobs` light
    return data_home() / "jobs.sqlite"


@dataclass
class Job:
    """One row of the job table (times are Unix seconds)."""

    id: int
    kind: str
    title: str
    params: dict[str, Any]
    heavy: bool
    state: str
    stage: str = ""
    fraction: float = 0.0
    eta_seconds: Optional[float] = None
    message: str = ""
    log: str = ""
    error: str = ""
    traceback: str = ""
    run_dir: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0
    started: Optional[float] = None
    finished: Optional[float] = None
    heartbeat: Optional[float] = None
    pid: Optional[int] = None
    pid_created: Optional[float] = None
    cancel_requested: bool = False
    attempts: int = 1
    elapsed_before: float = 0.0    # seconds run by the earlier attempts of a resumed job

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def resumable(self) -> bool:
        return self.state in ("failed", "cancelled")

    @property
    def elapsed_seconds(self) -> Optional[float]:
        """Seconds the job has run, over all its attempts (None before it first started)."""
        if self.started is None:
            return self.elapsed_before or None
        return self.elapsed_before + (self.finished or time.time()) - self.started


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    title TEXT NOT NULL DEFAULT '',
    params TEXT NOT NULL,
    heavy INTEGER NOT NULL DEFAULT 1,
    state TEXT NOT NULL,
    stage TEXT NOT NULL DEFAULT '',
    fraction REAL NOT NULL DEFAULT 0,
    eta_seconds REAL,
    message TEXT NOT NULL DEFAULT '',
    log TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '',
    traceback TEXT NOT NULL DEFAULT '',
    run_dir TEXT NOT NULL DEFAULT '',
    result TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    queued_at REAL NOT NULL,
    started REAL,
    finished REAL,
    heartbeat REAL,
    pid INTEGER,
    pid_created REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 1,
    elapsed_before REAL NOT NULL DEFAULT 0
);
"""

_JOB_FIELDS = ("id", "kind", "title", "params", "heavy", "state", "stage", "fraction",
               "eta_seconds", "message", "log", "error", "traceback", "run_dir", "result",
               "created", "started", "finished", "heartbeat", "pid", "pid_created",
               "cancel_requested", "attempts", "elapsed_before")


def _row_to_job(row: sqlite3.Row) -> Job:
    data = {k: row[k] for k in _JOB_FIELDS}
    data["params"] = json.loads(data["params"])
    data["result"] = json.loads(data["result"] or "{}")
    data["heavy"] = bool(data["heavy"])
    data["cancel_requested"] = bool(data["cancel_requested"])
    return Job(**data)


def process_alive(pid: Optional[int], created: Optional[float]) -> bool:
    """True when process ``pid`` exists, is not a zombie and (when ``created`` is known) is the
    same process that was recorded, not a later one that reused the pid."""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return created is None or abs(proc.create_time() - created) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _add_missing_columns(con: sqlite3.Connection) -> None:
    """Migrate a table written by an older version: add the columns it lacks (with their
    defaults). Another process may add one at the same moment: that is not an error."""
    have = {r[1] for r in con.execute("PRAGMA table_info(jobs)").fetchall()}
    for name, decl in (("elapsed_before", "REAL NOT NULL DEFAULT 0"),):
        if name not in have:
            try:
                con.execute(f"ALTER TABLE jobs ADD COLUMN {name} {decl}")
            except sqlite3.OperationalError as e:
                if "duplicate column" not in str(e).lower():
                    raise


class _Replaced(JobError):
    """The database file was damaged and has just been replaced by a fresh one."""


def _is_damage(e: sqlite3.DatabaseError) -> bool:
    text = str(e).lower()
    return "malformed" in text or "not a database" in text


class JobStore:
    """The job table in the SQLite file ``path`` (created on first use; a damaged file is
    moved aside and replaced by a fresh one, see the module docstring). ``timeout``: seconds a
    call waits for another process's write before it gives up with a JobError."""

    def __init__(self, path: str | Path | None = None, timeout: float = 30.0) -> None:
        self.path = Path(path) if path is not None else default_db_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        self.notice: Optional[str] = None   # set when a damaged file was replaced
        try:
            self._init_schema(check=True)
        except _Replaced:
            pass  # a fresh table replaced the damaged one (self.notice says so)

    def _init_schema(self, check: bool) -> None:
        with self._connect() as con:
            if check and self.path.stat().st_size > 0:
                result = con.execute("PRAGMA quick_check").fetchone()[0]
                if result != "ok":
                    raise sqlite3.DatabaseError(f"database disk image is malformed ({result})")
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(_SCHEMA)
            _add_missing_columns(con)

    def _set_aside(self, error: Exception) -> str:
        """Move the damaged database (and its journal files) aside; returns the message."""
        from stride_viz.integrity import warn
        from stride_viz.runlock import file_lock
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        target = self.path.with_name(f"{self.path.name}.damaged-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.damaged-{stamp}-{n}")
        with file_lock(self.path.with_name(self.path.name + ".lock")):
            try:  # another process may have replaced it meanwhile: only move a damaged file
                con = sqlite3.connect(self.path, timeout=self.timeout)
                try:
                    still_damaged = con.execute("PRAGMA quick_check").fetchone()[0] != "ok"
                finally:
                    con.close()
            except sqlite3.DatabaseError:
                still_damaged = True
            if still_damaged:
                for suffix in ("", "-wal", "-shm"):
                    src = Path(str(self.path) + suffix)
                    if src.exists():
                        os.replace(src, Path(str(target) + suffix))
        self.notice = (f"the job database {self.path} was damaged ({error}); it was moved to "
                       f"{target.name} and a fresh one started (the run folders are untouched)")
        warn(f"warning: {self.notice}")
        return self.notice

    @property
    def log_dir(self) -> Path:
        """Folder of the workers' full stdout/stderr logs (``<id>.log``)."""
        d = self.path.parent / "job_logs"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def log_path(self, job_id: int) -> Path:
        return self.log_dir / f"{job_id}.log"

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection for one call; a locked or damaged database becomes a one-line JobError
        (a damaged one is replaced by a fresh one first)."""
        try:
            con = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
            con.row_factory = sqlite3.Row
            try:
                yield con
            finally:
                con.close()
        except sqlite3.DatabaseError as e:
            text = str(e).lower()
            if isinstance(e, sqlite3.OperationalError) and ("locked" in text or "busy" in text):
                raise JobError(f"the job database {self.path} stayed locked by another process "
                               f"for {self.timeout:g} s; try again (a worker that hangs can be "
                               f"stopped from the Runs page)") from None
            if "database or disk is full" in text:
                from stride_viz.integrity import disk_full
                raise JobError(str(disk_full(self.path, None))) from None
            if _is_damage(e):
                message = self._set_aside(e)
                self._init_schema(check=False)
                raise _Replaced(message + "; this call was not done, try it again") from None
            raise

    # ------------------------------------------------------------------ create / read
    def create(self, kind: str, params: dict[str, Any], *, heavy: bool = True, title: str = "") -> int:
        """Insert a queued job and return its id (no worker is started here)."""
        now = time.time()
        with self._connect() as con:
            cur = con.execute(
                "INSERT INTO jobs (kind, title, params, heavy, state, created, queued_at) "
                "VALUES (?, ?, ?, ?, 'queued', ?, ?)",
                (kind, title or kind, json.dumps(params, sort_keys=True), int(heavy), now, now))
            return int(cur.lastrowid)

    def get(self, job_id: int) -> Job:
        with self._connect() as con:
            row = con.execute("SELECT * FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
        if row is None:
            raise JobError(f"There is no job with id {job_id}; the Runs page lists the existing jobs.")
        return _row_to_job(row)

    def list(self, limit: Optional[int] = None, kind: Optional[str] = None) -> list[Job]:
        """Jobs, newest first, after marking dead workers' jobs as failed."""
        self.reap()
        sql, args = "SELECT * FROM jobs", []
        if kind is not None:
            sql += " WHERE kind = ?"
            args.append(kind)
        sql += " ORDER BY id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        with self._connect() as con:
            return [_row_to_job(r) for r in con.execute(sql, args).fetchall()]

    # ------------------------------------------------------------------ worker side
    def set_pid(self, job_id: int, pid: int) -> None:
        try:
            created = psutil.Process(pid).create_time()
        except psutil.NoSuchProcess:
            created = None
        with self._connect() as con:
            con.execute("UPDATE jobs SET pid = ?, pid_created = ?, heartbeat = ? WHERE id = ?",
                        (pid, created, time.time(), job_id))

    def beat(self, job_id: int) -> bool:
        """Record that the worker is alive; return whether a cancel was requested."""
        with self._connect() as con:
            con.execute("UPDATE jobs SET heartbeat = ? WHERE id = ?", (time.time(), job_id))
            row = con.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row[0])

    def try_start(self, job_id: int) -> str:
        """Move a queued job to ``running`` when its turn has come.

        Returns ``"started"``, ``"wait"`` (heavy jobs running or queued before it fill the
        :func:`max_heavy_jobs` slots) or ``"gone"`` (it is no longer queued, e.g. cancelled).
        """
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")  # one writer decides at a time: no two jobs start together
            try:
                row = con.execute("SELECT state, heavy, queued_at FROM jobs WHERE id = ?",
                                  (job_id,)).fetchone()
                if row is None or row["state"] != "queued":
                    con.execute("COMMIT")
                    return "gone"
                if row["heavy"]:
                    blockers = con.execute(
                        "SELECT id, pid, pid_created, state FROM jobs WHERE heavy = 1 AND id != ? AND "
                        "(state = 'running' OR (state = 'queued' AND (queued_at < ? OR "
                        "(queued_at = ? AND id < ?))))",
                        (job_id, row["queued_at"], row["queued_at"], job_id)).fetchall()
                    # a blocker whose worker died is not waited for (reap marks it failed later)
                    ahead = sum(1 for b in blockers if b["pid"] is None or
                                process_alive(b["pid"], b["pid_created"]))
                    if ahead >= max_heavy_jobs():
                        con.execute("COMMIT")
                        return "wait"
                now = time.time()
                con.execute("UPDATE jobs SET state = 'running', started = ?, finished = NULL, "
                            "heartbeat = ? WHERE id = ?", (now, now, job_id))
                con.execute("COMMIT")
                return "started"
            except BaseException:
                con.execute("ROLLBACK")
                raise

    def progress(self, job_id: int, stage: str, fraction: float, eta_seconds: Optional[float],
                 message: str = "") -> None:
        with self._connect() as con:
            con.execute("UPDATE jobs SET stage = ?, fraction = ?, eta_seconds = ?, message = ?, "
                        "heartbeat = ? WHERE id = ?",
                        (stage, float(fraction), eta_seconds, message, time.time(), job_id))

    def append_log(self, job_id: int, text: str) -> None:
        """Append to the log tail kept in the row (the last LOG_TAIL_CHARS characters)."""
        with self._connect() as con:
            con.execute("UPDATE jobs SET log = substr(log || ?, -?) WHERE id = ?",
                        (text, LOG_TAIL_CHARS, job_id))

    def set_run_dir(self, job_id: int, run_dir: str | Path) -> None:
        with self._connect() as con:
            con.execute("UPDATE jobs SET run_dir = ? WHERE id = ?", (str(run_dir), job_id))

    def finish(self, job_id: int, state: str, *, result: Optional[dict] = None, error: str = "",
               traceback: str = "") -> bool:
        """Close a running job as ``done``, ``failed`` or ``cancelled``.

        Only a job still ``running`` is changed (a job cancelled meanwhile stays cancelled);
        returns whether the row was changed.
        """
        if state not in FINAL_STATES:
            raise JobError(f"The 'state' parameter of finish must be one of {FINAL_STATES}. "
                           f"Got {state!r} instead.")
        with self._connect() as con:
            cur = con.execute(
                "UPDATE jobs SET state = ?, finished = ?, result = ?, error = ?, traceback = ?, "
                "fraction = CASE WHEN ? = 'done' THEN 1.0 ELSE fraction END, "
                "eta_seconds = CASE WHEN ? = 'done' THEN 0 ELSE NULL END "
                "WHERE id = ? AND state = 'running'",
                (state, time.time(), json.dumps(result or {}), error, traceback, state, state, job_id))
            return cur.rowcount == 1

    # ------------------------------------------------------------------ user side
    def request_cancel(self, job_id: int) -> Job:
        """Flag a queued or running job as cancelled (the executor then stops its worker)."""
        job = self.get(job_id)
        if not job.active:
            raise JobError(f"Job {job_id} is {job.state}; only queued or running jobs can be cancelled.")
        with self._connect() as con:
            con.execute("UPDATE jobs SET cancel_requested = 1, state = 'cancelled', finished = ?, "
                        "eta_seconds = NULL, error = 'Cancelled by the user. Resume continues from "
                        "the last checkpoint.' WHERE id = ? AND state IN ('queued', 'running')",
                        (time.time(), job_id))
        return self.get(job_id)

    def requeue(self, job_id: int) -> Job:
        """Put a failed or cancelled job back in the queue (its worker is started by the
        executor); the time its attempts have run so far is kept in ``elapsed_before``."""
        job = self.get(job_id)
        if not job.resumable:
            raise JobError(f"Job {job_id} is {job.state}; only failed or cancelled jobs can be resumed.")
        now = time.time()
        with self._connect() as con:
            con.execute("UPDATE jobs SET state = 'queued', queued_at = ?, cancel_requested = 0, "
                        "error = '', traceback = '', started = NULL, finished = NULL, pid = NULL, "
                        "elapsed_before = elapsed_before + COALESCE(COALESCE(finished, ?) - started, 0), "
                        "pid_created = NULL, heartbeat = NULL, eta_seconds = NULL, "
                        "attempts = attempts + 1, log = substr(log || ?, -?) WHERE id = ?",
                        (now, now, f"--- resumed (attempt {job.attempts + 1}) ---\n", LOG_TAIL_CHARS, job_id))
        return self.get(job_id)

    def reap(self, stale_seconds: float = STALE_SECONDS) -> list[int]:
        """Mark active jobs whose worker is gone or silent as failed; return their ids."""
        now = time.time()
        with self._connect() as con:
            rows = con.execute("SELECT id, state, pid, pid_created, heartbeat, queued_at FROM jobs "
                               "WHERE state IN ('queued', 'running')").fetchall()
        dead: list[tuple[int, str]] = []
        for r in rows:
            if r["pid"] is None:
                if now - r["queued_at"] > SPAWN_GRACE_SECONDS:
                    dead.append((r["id"], "No worker process picked this job up. Press Resume "
                                          "to start one."))
            elif not process_alive(r["pid"], r["pid_created"]):
                dead.append((r["id"], f"The worker process (pid {r['pid']}) stopped without "
                                      f"reporting (killed or crashed). Press Resume to continue "
                                      f"from the last checkpoint."))
            elif r["heartbeat"] is not None and now - r["heartbeat"] > stale_seconds:
                # alive but silent (stopped, swapped out for minutes): stop it so that a resumed
                # job never races a second writer on the same run directory
                try:
                    psutil.Process(r["pid"]).kill()
                except psutil.Error:
                    pass
                dead.append((r["id"], f"The worker process (pid {r['pid']}) did not report for "
                                      f"{now - r['heartbeat']:.0f} s and was stopped. Press Resume "
                                      f"to continue from the last checkpoint."))
        changed = []
        with self._connect() as con:
            for job_id, msg in dead:
                cur = con.execute("UPDATE jobs SET state = 'failed', finished = ?, error = ?, "
                                  "eta_seconds = NULL WHERE id = ? AND state IN ('queued', 'running')",
                                  (now, msg, job_id))
                if cur.rowcount:
                    changed.append(job_id)
        return changed

    def delete(self, job_id: int) -> None:
        """Forget a finished job (its run directory is kept)."""
        job = self.get(job_id)
        if job.active:
            raise JobError(f"Job {job_id} is {job.state}; cancel it before deleting it.")
        with self._connect() as con:
            con.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
