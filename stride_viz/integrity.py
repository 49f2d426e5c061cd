"""Checked reads and safe writes of run-folder files: one clear line instead of a traceback.

Every file of a run folder is written to a temporary file next to it (named after the writing
process, so two writers never share one), flushed to disk and renamed over the old file: a
kill or a full disk leaves the previous version intact. Every read goes through
:func:`read_checked`, which turns a missing, truncated or unparsable file into
:class:`RunDamaged`, whose message names the file and the command that repairs it.

    atomic_write(path, lambda tmp: np.save(tmp, a), nbytes=a.nbytes, suffix=".npy")  # or DiskFull
    read_checked(path, np.load, fix="explain the query again")                        # or RunDamaged
"""
from __future__ import annotations

import errno
import itertools
import json
import os
import re
import shutil
import struct
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Optional, TypeVar

__all__ = ["RunDamaged", "DiskFull", "atomic_write", "write_text_atomic", "read_checked",
           "safetensors_problem", "set_aside", "sweep_temporaries", "temp_path", "temp_owner",
           "disk_full", "is_enospc", "pid_alive", "human_bytes", "warn", "warnings_to",
           "append_jsonl", "read_jsonl"]

T = TypeVar("T")
_TEMP_RE = re.compile(r"^\..+\.tmp-(\d+)-\d+(\..*)?$")
_temp_ids = itertools.count()
# writes smaller than this are not checked against the free space beforehand (metadata files)
_PRECHECK_BYTES = 1 << 20


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


_warning_sink: Callable[[str], None] = _to_stderr


def warn(line: str) -> None:
    """Report a problem that was repaired (a damaged checkpoint set aside, a stale lock taken
    over) in one line: on stderr, or to the listener given to :func:`warnings_to`."""
    _warning_sink(line)


def warnings_to(sink: Optional[Callable[[str], None]]) -> None:
    """Send :func:`warn` lines to ``sink`` (the job worker's log); None: back to stderr."""
    global _warning_sink
    _warning_sink = sink or _to_stderr


class RunDamaged(ValueError):
    """A file of a run folder is missing or damaged; the message names it and the fix.

    ``path``: the file; ``problem``: 'is missing' or 'is damaged (<why>)'; ``fix``: what to run.
    """

    def __init__(self, path: str | Path, problem: str, fix: str) -> None:
        self.path, self.problem, self.fix = Path(path), problem, fix
        super().__init__(f"{path} {problem}; {fix}")


class DiskFull(Exception):
    """A write that did not fit on its disk; the previous version of the file is intact."""


def human_bytes(n: float) -> str:
    """'812 bytes', '521.9 KB', '1.6 GB' (powers of 1000, as disk sizes are sold)."""
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path):
        path = path.parent
    return path


def disk_full(path: Path, nbytes: Optional[int], at_least: bool = False) -> DiskFull:
    """The one-line error of a write of ``nbytes`` to ``path`` that does not fit (``at_least``:
    the write had reached ``nbytes`` when the disk filled up)."""
    folder = next((p for p in (path.parent, *path.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(folder).free
    need = (f"needs {'more than ' if at_least else ''}{human_bytes(nbytes)}" if nbytes
            else "needs more space")
    return DiskFull(f"no space left to write {path} ({need}, {human_bytes(free)} free on "
                    f"{_mount_point(folder)}); free some space there (or move the run folder to "
                    f"a larger disk) and run the same command again: the earlier files are intact")


def is_enospc(e: BaseException) -> bool:
    """Whether ``e`` is a full disk (or quota), also when safetensors' Rust code raised it."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "os error 28" in str(e) or "No space left on device" in str(e)  # safetensors' Rust I/O


def temp_path(path: Path, suffix: str = "") -> Path:
    """A temporary name next to ``path``, private to this call of this process
    (``.<name>.tmp-<pid>-<n><suffix>``: the pid tells :func:`sweep_temporaries` whether its
    writer is still alive)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{next(_temp_ids)}{suffix}")


def temp_owner(path: Path) -> Optional[int]:
    """The pid in a name made by :func:`temp_path` (None for other names)."""
    m = _TEMP_RE.match(path.name)
    return int(m.group(1)) if m else None


def atomic_write(path: str | Path, write: Callable[[Path], None], nbytes: Optional[int] = None,
                 suffix: str = "", before_replace: Callable[[], None] = lambda: None) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, flush it to disk and rename it
    over ``path``. A write that runs out of space raises :class:`DiskFull` (saying how much is
    needed and where) and leaves ``path`` as it was; ``nbytes``, the expected size, lets a big
    write be refused before it starts. ``suffix`` ends the temporary name (numpy adds '.npy'
    to names without it); ``before_replace`` runs once the new file is on disk, just before
    the rename (a checkpoint keeps its predecessor there)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if nbytes is not None and nbytes >= _PRECHECK_BYTES:
        if shutil.disk_usage(path.parent).free < nbytes:
            raise disk_full(path, nbytes)
    tmp = temp_path(path, suffix)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        before_replace()
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_enospc(e):
            raise disk_full(path, nbytes) from None
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    data = text.encode()
    atomic_write(path, lambda tmp: tmp.write_bytes(data), nbytes=len(data))


def _reason(e: BaseException) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
    if isinstance(e, zipfile.BadZipFile):
        return f"not a valid .npz archive: {e}"
    if isinstance(e, UnicodeDecodeError):
        return "not valid UTF-8 text"
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:160]


def damaged(path: Path, reason: str, fix: str) -> RunDamaged:
    return RunDamaged(path, f"is damaged ({reason})", fix)


def read_checked(path: str | Path, read: Callable[[Path], T], fix: str) -> T:
    """``read(path)``, with a missing or unreadable file raised as :class:`RunDamaged`."""
    path = Path(path)
    if not path.is_file():
        raise RunDamaged(path, "is missing", fix)
    try:
        return read(path)
    except RunDamaged:
        raise
    except (ValueError, OSError, EOFError, KeyError, IndexError, TypeError, zipfile.BadZipFile,
            UnicodeDecodeError, zlib.error) as e:
        raise damaged(path, _reason(e), fix) from None
    except Exception as e:  # safetensors' Rust errors and numpy's unpickling errors
        if type(e).__name__ in ("SafetensorError", "UnpicklingError"):
            raise damaged(path, _reason(e), fix) from None
        raise


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one JSON line to a log of results (flushed at once). A torn last line (no newline:
    a process killed mid-write, whose result is not done) is cut off first; appended to, it
    would become an unreadable line in the middle of the file."""
    with open(path, "a+b") as f:
        size = f.seek(0, 2)
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                f.seek(0)
                data = f.read()
                f.truncate(data.rfind(b"\n") + 1)
        f.write((json.dumps(row) + "\n").encode())
        f.flush()


def read_jsonl(path: str | Path, error: Callable[[str], BaseException] = ValueError, fix: str = ""):
    """(line index, row) of each line of a log written by :func:`append_jsonl`, blank lines
    skipped; a torn last line is skipped too (its result is simply not done); an unreadable
    line elsewhere raises ``error`` with a message naming the file, the line and ``fix``."""
    lines = Path(path).read_text().splitlines()
    for ln, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if ln == len(lines) - 1:
                continue
            raise error(f"{path}: line {ln + 1} is not valid JSON{'; ' + fix if fix else ''}.") from None
        yield ln, row


def safetensors_problem(path: str | Path) -> Optional[str]:
    """Why the safetensors file ``path`` is incomplete (truncated, a bad header, trailing
    bytes), or None when its size is what its header says."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"truncated: {size:,} bytes, not even a header"
        n = struct.unpack("<Q", head)[0]
        if n > 100_000_000:
            return "not a safetensors file (header length out of range)"
        if size < 8 + n:
            return f"truncated: {size:,} bytes, its header alone needs {8 + n:,}"
        try:
            header = json.loads(f.read(n))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, AttributeError, KeyError, IndexError, TypeError):
            return "its header is not a safetensors header"
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        return f"truncated: {size:,} of {expected:,} bytes"
    if size > expected:
        return f"{size - expected:,} unexpected bytes after the data"
    return None


def set_aside(path: Path) -> Path:
    """Rename a damaged file to ``<name>.damaged`` (kept for inspection, never read again)."""
    target = path.with_name(path.name + ".damaged")
    os.replace(path, target)
    return target


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_temporaries(folder: Path, name: Optional[str] = None) -> None:
    """Remove the temporary files and folders that killed writers left in ``folder`` (those
    whose writing process is gone; a live writer's files are left alone), only those of the
    file ``name`` when it is given."""
    if not folder.is_dir():
        return
    for entry in folder.glob(f".{name}.tmp-*" if name else ".*.tmp-*"):
        pid = temp_owner(entry)
        if pid is not None and not pid_alive(pid):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
