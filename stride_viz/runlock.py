"""One writer per run folder: an advisory lock file naming its holder.

    with run_lock("runs/demo", "fit"):          # RunLocked at once if another fit holds it
        ...
    with run_lock("runs/demo", "fit", wait=True, should_stop=...):   # waits for it instead

The lock is ``RUN/writer.lock``, held with ``flock``: the kernel releases it when its holder
dies, even by SIGKILL, so a lock is never left behind. The file also records the holder (pid,
host, start time, command) for the message a second writer gets; a record whose process is
gone is a stale lock, taken over with a one-line warning. Short per-query locks
(:func:`file_lock`) serialise two processes writing the same attribution.
"""
from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from stride_viz.integrity import pid_alive, warn
from stride_viz.progress import Cancelled

__all__ = ["RunLocked", "run_lock", "file_lock", "LOCK_NAME", "lock_holder"]

LOCK_NAME = "writer.lock"
POLL_SECONDS = 0.5


class RunLocked(Exception):
    """Another process is writing the run folder; the message names it."""


def _record(purpose: str) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose,
            "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:300]}


def lock_holder(root: str | Path) -> Optional[dict]:
    """The record of the last process that took the lock of ``root`` (None when free)."""
    try:
        text = (Path(root) / LOCK_NAME).read_text()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


def _describe(holder: Optional[dict]) -> str:
    if not holder:
        return "another process"
    where = "" if holder.get("host") == socket.gethostname() else f" on {holder.get('host')}"
    return (f"another {holder.get('purpose', 'writer')} (pid {holder.get('pid')}{where}, since "
            f"{holder.get('started')})")


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


@contextmanager
def run_lock(root: str | Path, purpose: str, wait: bool = False,
             should_stop: Callable[[], bool] = lambda: False) -> Iterator[None]:
    """Hold the writer lock of run folder ``root`` for the ``with`` block.

    Raises :class:`RunLocked` when another process holds it, or, with ``wait``, waits for it
    (naming the holder once through :func:`stride_viz.integrity.warn`; raises
    :class:`Cancelled` when ``should_stop()`` turns true meanwhile).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            got = _try_flock(fd)
        except OSError as e:  # a filesystem without locks: say so, and go on unprotected
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            warn(f"warning: {root} is on a filesystem without file locks; make sure only one "
                 f"process writes to it at a time")
            got = True
        if not got:
            holder = lock_holder(root)
            if not wait:
                raise RunLocked(
                    f"{root} is being written by {_describe(holder)}; wait for it to finish "
                    f"(or stop it), or add --wait to start when it is done")
            warn(f"waiting for {root}: it is being written by {_describe(holder)}")
            while not _try_flock(fd):
                if should_stop():
                    raise Cancelled(f"stopped while waiting for {_describe(holder)} to finish "
                                    f"writing {root}")
                time.sleep(POLL_SECONDS)
        # a record left in a lock nobody holds: its writer died (killed, crashed) mid-write
        old = lock_holder(root)
        if old and (old.get("pid"), old.get("host")) != (os.getpid(), socket.gethostname()):
            here = old.get("host") == socket.gethostname()
            gone = "is gone" if here and not pid_alive(int(old.get("pid") or 0)) else "did not release it"
            warn(f"warning: took over the stale lock of {root} left by pid {old.get('pid')}"
                 f"{'' if here else ' on ' + str(old.get('host'))} (a {old.get('purpose')} started "
                 f"{old.get('started')}), which {gone}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_record(purpose)).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # a free lock has no holder: the next taker has nothing to warn about
    finally:
        os.close(fd)  # closing releases the flock


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """A short exclusive lock on ``path`` (created if missing), waiting as long as it takes;
    for writes that take seconds, such as one query's attribution."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
        yield
    finally:
        os.close(fd)
