"""The training checkpoint on disk, and the signals that stop a fit cleanly.

    fit/checkpoint.safetensors        operator and optimiser tensors; the step and the loss
                                      history in its metadata, so the two can never disagree
    fit/checkpoint.prev.safetensors   the checkpoint before it, kept as a fallback
    fit/state.json                    a readable copy of the metadata (the dashboard reads it)

A new checkpoint is written to a temporary file, flushed, and only then renamed into place,
after the current one has become the previous one: a kill or a full disk at any moment
leaves at least one intact checkpoint. On resume a damaged checkpoint is set aside with a
one-line warning and the previous one is used, else the fit starts from step 0.

Fault injection for the tests: ``STRIDE_VIZ_FAULT=<point>:<step>`` SIGKILLs the process when
the checkpoint of ``<step>`` reaches ``<point>``: ``written`` (temporary file on disk, nothing
renamed yet) or ``rotated`` (the current checkpoint already renamed to the previous one);
``<point>:<step>:<seconds>`` sleeps there instead (a writer caught in the act).
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file

from stride_viz.integrity import (RunDamaged, atomic_write, read_checked, safetensors_problem,
                                  set_aside, sweep_temporaries, warn, write_text_atomic)

__all__ = ["CHECKPOINT", "PREVIOUS", "write_checkpoint", "load_newest", "Interrupts"]

CHECKPOINT = "checkpoint.safetensors"
PREVIOUS = "checkpoint.prev.safetensors"
FAULT_ENV = "STRIDE_VIZ_FAULT"


def _fault(point: str, step: int) -> None:
    spec = os.environ.get(FAULT_ENV, "").split(":")
    if spec[:2] == [point, str(step)]:
        if len(spec) > 2:
            time.sleep(float(spec[2]))
        else:
            os.kill(os.getpid(), signal.SIGKILL)


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """Write ``tensors`` with ``state`` (JSON-able: step, total_steps, history, ...) as the
    newest checkpoint of ``folder``; the one it replaces becomes the previous checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(folder)
    ckpt, prev = folder / CHECKPOINT, folder / PREVIOUS
    if ckpt.exists():
        prev.unlink(missing_ok=True)  # room for the new one; the current one is still intact
    step = int(state["step"])
    meta = json.dumps(state)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values()) + len(meta) + 1024

    def rotate() -> None:
        _fault("written", step)
        if ckpt.exists():
            os.replace(ckpt, prev)
        _fault("rotated", step)

    atomic_write(ckpt, lambda tmp: save_file(tensors, str(tmp), metadata={"state": meta}),
                 nbytes=nbytes, before_replace=rotate)
    write_text_atomic(folder / "state.json", meta)


def _read(path: Path, device: str, check: Callable[[dict[str, torch.Tensor]], None]) -> tuple[dict, dict]:
    def parse(p: Path) -> tuple[dict, dict]:
        problem = safetensors_problem(p)
        if problem:
            raise ValueError(problem)
        from safetensors import safe_open
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        if "state" in meta:
            state = json.loads(meta["state"])
        else:  # written before the state moved into the checkpoint
            state = json.loads((p.parent / "state.json").read_text())
        tensors = load_file(str(p), device=device)
        check(tensors)
        int(state["step"])
        return tensors, state

    return read_checked(path, parse, "")


def load_newest(folder: Path, device: str,
                check: Callable[[dict[str, torch.Tensor]], None]) -> Optional[tuple[dict, dict]]:
    """``(tensors, state)`` of the newest intact checkpoint in ``folder`` (``check`` raises
    ValueError for tensors that do not fit the trainer), or None: start from step 0. A damaged
    checkpoint is renamed ``<name>.damaged`` and reported in one warning line."""
    lost = []
    for path in (folder / CHECKPOINT, folder / PREVIOUS):
        if not path.exists():
            continue
        try:
            tensors, state = _read(path, device, check)
        except RunDamaged as e:
            set_aside(path)
            lost.append(f"{path} {e.problem}")
            continue
        if lost:
            warn(f"warning: {'; '.join(lost)}: set aside as .damaged; resuming from {path.name} "
                 f"(step {state['step']})")
        _sync_state_json(folder, state)
        return tensors, state
    if lost:
        warn(f"warning: {'; '.join(lost)}: set aside as .damaged; no intact checkpoint is left, "
             "so the fit starts again from step 0")
    return None


def _sync_state_json(folder: Path, state: dict) -> None:
    """state.json is a copy of the checkpoint's metadata: rewrite it when it is damaged or
    belongs to another checkpoint (a kill between the two writes)."""
    try:
        if json.loads((folder / "state.json").read_text()).get("step") == state["step"]:
            return
    except (OSError, ValueError, AttributeError):
        pass
    write_text_atomic(folder / "state.json", json.dumps(state))


class Interrupts:
    """Inside the block, SIGTERM and Ctrl-C (SIGINT) only set ``name``: the training loop
    then writes a checkpoint and stops. A second Ctrl-C interrupts at once. Handlers are only
    installed in the main thread (Python delivers signals there); a previous Python handler
    (the job worker's) still runs."""

    def __init__(self) -> None:
        self.name: Optional[str] = None
        self._old: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name
        old = self._old.get(signum)
        if callable(old) and old is not signal.default_int_handler:
            old(signum, frame)

    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
