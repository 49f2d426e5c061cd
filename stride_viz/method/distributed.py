"""Fits on several processes or machines with torch.distributed: one process per device,
started by ``torchrun``; without it the world is one process and every helper here does
nothing (no process group), so the one-process fit is the same code with world size 1.

    torchrun --standalone --nproc_per_node 2 -m stride_viz fit --model M --pool P --run-dir R

Rank, world size and local rank come from the environment torchrun sets (RANK, WORLD_SIZE,
LOCAL_RANK); the backend is NCCL when the model is on a GPU, else gloo. What is split:

- the pool cache (:func:`owns`, :func:`sum_over_ranks`): rank r runs the frozen model on the
  length-sorted cache batches b with b % world = r, writes their rows into zeros, and the
  ranks then sum their copies block by block: every rank holds the whole cache, bit-for-bit
  the one a single process builds (batch shapes are the same);
- a training step (:func:`share`, :func:`sum_gradients`): every rank draws the step's whole
  randomness (batch, stability operators, probe tokens) from the same generator, computes
  the loss of its share of the (example, operator) pairs and of the linearity probes,
  normalised by the *global* counts, and the gradients are summed: the gradient of the
  one-process loss, up to float rounding;
- the run folder (:func:`from_writer`, :func:`writer_context`): rank 0 alone writes it (run.json,
  pool, design, checkpoints, operators) and takes its lock; the others receive what they need
  from rank 0 (the design, the checkpoint to resume from: :func:`broadcast_checkpoint`), so
  the machines need no shared filesystem.
"""
from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, ContextManager, Iterable, Iterator, Optional, TypeVar

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["rank", "world_size", "local_rank", "is_writer", "local_device", "init", "close",
           "barrier", "owns", "share", "all_sum", "any_rank", "sum_gradients", "sum_over_ranks",
           "broadcast_object", "broadcast_checkpoint", "from_writer", "writer_context",
           "rank_suffix", "PeerFailed"]

COMM_BYTES = 64 * 2**20        # largest block of the cache summed in one collective
T = TypeVar("T")


class PeerFailed(RuntimeError):
    """Raised on the other ranks when rank 0 failed at a step they wait for; rank 0 raises
    (and reports) the error itself."""


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"The environment variable {name} must be an integer (torchrun sets "
                         f"it). Got {value!r} instead.") from None


def rank() -> int:
    """This process's rank: $RANK, 0 outside torchrun."""
    return _env_int("RANK", 0)


def world_size() -> int:
    """Number of processes of the fit: $WORLD_SIZE, 1 outside torchrun."""
    return _env_int("WORLD_SIZE", 1)


def local_rank() -> int:
    """This process's rank on its machine ($LOCAL_RANK): the GPU it uses."""
    return _env_int("LOCAL_RANK", 0)


def is_writer() -> bool:
    """Whether this process writes the run folder (rank 0)."""
    return rank() == 0


def local_device(device: str) -> str:
    """The device of this rank: under torchrun with more than one process, 'auto' and 'cuda'
    mean this machine's GPU ``LOCAL_RANK`` (one process per GPU); anything else is kept."""
    if world_size() > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank()}"
    return device


def _active() -> bool:
    return world_size() > 1


def init(device: str | torch.device = "cpu") -> None:
    """Join the process group of a torchrun launch (once; a no-op for one process): NCCL when
    ``device`` is a GPU, else gloo."""
    if not _active() or dist.is_initialized():
        return
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend)


def close() -> None:
    """Leave the process group (at the end of a command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _group_device() -> torch.device:
    """Where collective buffers live: the current GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _ready() -> bool:
    if not _active():
        return False
    if not dist.is_initialized():
        init("cpu")
    return True


def barrier() -> None:
    if _ready():
        dist.barrier()


def owns(batch_index: int) -> bool:
    """Whether this rank computes cache batch ``batch_index`` (round robin: the batches are
    sorted by length, so every rank gets long and short ones)."""
    return batch_index % world_size() == rank()


def share(n: int) -> np.ndarray:
    """This rank's rows of an n-row batch: every world_size-th row from its rank (the batch
    is sorted by length, so the shares cost about the same); all of them alone."""
    return np.arange(rank(), n, world_size())


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place (returned for chaining)."""
    if not _ready():
        return tensor
    dev = _group_device()
    buf = tensor if tensor.device == dev else tensor.to(dev)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on one of them (a stop request, say)."""
    if not _ready():
        return bool(flag)
    return bool(all_sum(torch.tensor([1.0 if flag else 0.0], device=_group_device())).item())


def sum_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Sum the gradients over the ranks (each rank's loss is already divided by the global
    count). A parameter this rank did not reach (an empty share) contributes zeros."""
    if not _ready():
        return
    for p in params:
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        all_sum(p.grad)


def sum_over_ranks(*arrays: Any) -> None:
    """Sum whole arrays over the ranks, in place, in blocks of at most COMM_BYTES: tensors
    (N, ...) or row stores with ``shape``, ``take(index)`` and ``write(start, values)`` (the
    cache's :class:`~stride_viz.method.cache.Rows`). Each rank filled its own rows and left
    zeros elsewhere, so the sum is every rank's rows, exactly. None entries are skipped."""
    if not _ready():
        return
    for a in arrays:
        if a is None:
            continue
        n = a.shape[0]
        width = int(np.prod(a.shape[1:])) if len(a.shape) > 1 else 1
        itemsize = a.element_size() if isinstance(a, torch.Tensor) else 2
        step = max(1, COMM_BYTES // max(1, width * itemsize))
        for s in range(0, n, step):
            e = min(n, s + step)
            if isinstance(a, torch.Tensor):
                all_sum(a[s:e])
            else:  # 16-bit rows: summed in 16 bits (x + 0 is exact)
                block = a.take(np.arange(s, e)).half()
                a.write(s, all_sum(block))


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` of rank ``src`` on every rank (pickled)."""
    if not _ready():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_group_device())
    return box[0]


def broadcast_checkpoint(found: Optional[tuple[dict[str, torch.Tensor], dict]],
                         device: torch.device) -> Optional[tuple[dict[str, torch.Tensor], dict]]:
    """Rank 0's checkpoint ``(tensors, state)`` (or None: start from step 0) on every rank,
    its tensors on ``device``: a resumed fit starts every rank from the checkpoint rank 0 read."""
    if not _ready():
        return found
    head = None
    if is_writer() and found is not None:
        tensors, state = found
        head = (state, [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()])
    head = broadcast_object(head)
    if head is None:
        return None
    state, layout = head
    dev = _group_device()
    out = {}
    for name, shape, dtype in layout:
        buf = (found[0][name].to(dev) if is_writer()
               else torch.empty(shape, dtype=dtype, device=dev))
        dist.broadcast(buf, src=0)
        out[name] = buf.to(device)
    return out, state


def from_writer(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 alone (a write to the run folder, a decision read from it) and
    give its result to every rank; the others wait. When it raises, rank 0 raises the error
    and the others :class:`PeerFailed`."""
    if not _ready():
        return fn()
    result, error = None, None
    if is_writer():
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below, after telling the others
            error = e
    failed, result = broadcast_object((None if error is None else f"{type(error).__name__}: {error}",
                                       None if error is not None else result))
    if error is not None:
        raise error
    if failed is not None:
        raise PeerFailed(f"rank 0 stopped: {failed}")
    return result


@contextmanager
def writer_context(make: Callable[[], ContextManager]) -> Iterator[None]:
    """Enter the context ``make()`` (the run folder's writer lock) on rank 0 alone; the other
    ranks wait until rank 0 holds it, and raise :class:`PeerFailed` when it could not."""
    cm = make() if is_writer() or not _active() else nullcontext()
    from_writer(cm.__enter__)
    try:
        yield
    except BaseException as e:
        if not cm.__exit__(type(e), e, e.__traceback__):
            raise
    else:
        cm.__exit__(None, None, None)


def rank_suffix() -> str:
    """'' for one process, '.rank<r>' under torchrun: per-rank names for scratch files."""
    return f".rank{rank()}" if _active() else ""
