"""Stage 2's input: the frozen model's activations on the whole pool, computed once.

The blocks below the steering layer never change, so one forward pass over the pool gives
everything operator training reads (``build_cache``):

- logits-space modes (``factored``, ``logits``): for every *scored* token only, the LM head's
  input h_L, the target token, its column in C and the log-sum-exp of the base logits outside
  C (``rest``: what makes the restricted loss exact, see :mod:`stride_viz.method.logits`);
- residual mode: every token, with h_L and the hidden state after the steering layer.

Memory stays bounded in the pool size: hidden states are kept in 16 bits, and when they
would take more than ``FitConfig.cache_memory_mb`` they go to a file under the run's
``fit/`` folder (written with ``pwrite``, read through a memory map: only the rows a step
touches are resident) that is deleted once the fit ends. ``FitConfig.cache = "stream"`` keeps
no hidden states at all: each step reruns the frozen model on its own examples (set-up is
then only tokenisation, for pools too large to pass over once). The pool is tokenised in blocks,
never as one padded (n x T) tensor. Every index a step needs is computed on the host from
numpy offsets and moved to the device once per step (no per-example synchronisation).
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from stride_viz.config import CHOICES
from stride_viz.data.tokenize import token_rows
from stride_viz.method import distributed
from stride_viz.method.frozen import FrozenLM
from stride_viz.method.logits import target_columns
from stride_viz.progress import StageTimer, no_progress

__all__ = ["Rows", "PoolCache", "Tokens", "tokenize_pool", "build_cache", "autocast"]

ENCODE_BLOCK = 4096           # examples tokenised at once
LSE_CHUNK_ELEMENTS = 1 << 24  # logits materialised at once while computing `rest`


def autocast(device: torch.device, precision: str):
    """The frozen model's forward under bfloat16 autocast on a GPU that supports it
    (precision 'auto' or 'bfloat16'), else a no-op context."""
    use = (device.type == "cuda" and precision in ("auto", "bfloat16")
           and torch.cuda.is_bf16_supported())
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=use)


class Rows:
    """(N, D) float16 rows: a tensor on the device, or a file on disk read through a memory map."""

    def __init__(self, n: int, d: int, device: torch.device, path: Optional[Path] = None) -> None:
        self.shape, self.device, self.path = (n, d), device, path
        if path is None:
            # zeros: under torchrun the rows of other ranks' batches are summed in (build_cache)
            self._tensor: Optional[torch.Tensor] = torch.zeros((n, d), dtype=torch.float16, device=device)
            self._fd = None
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._tensor = None
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(self._fd, max(1, n * d * 2))
        self._map: Optional[np.memmap] = None

    @property
    def on_disk(self) -> bool:
        return self.path is not None

    def write(self, start: int, values: torch.Tensor) -> None:
        """Rows start .. start + len(values) from a (L, D) tensor."""
        if self._tensor is not None:
            self._tensor[start:start + values.shape[0]] = values.to(self.device, torch.float16)
            return
        data = values.detach().to("cpu", torch.float16).numpy().tobytes()
        written = os.pwrite(self._fd, data, start * self.shape[1] * 2)
        if written != len(data):
            raise OSError(f"short write to {self.path}: {written} of {len(data)} bytes")

    def take(self, index: np.ndarray) -> torch.Tensor:
        """Rows ``index`` (any shape of int64) as float32 on the device: index.shape + (D,)."""
        if self._tensor is not None:
            flat = torch.as_tensor(index.reshape(-1), device=self.device)
            return self._tensor[flat].float().view(*index.shape, self.shape[1])
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.float16, mode="r", shape=self.shape)
        rows = np.asarray(self._map[index.reshape(-1)])
        return torch.from_numpy(rows).to(self.device).float().view(*index.shape, self.shape[1])

    def close(self) -> None:
        """Release the file (and delete it)."""
        self._map = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self.path.unlink(missing_ok=True)


class _Stream:
    """FitConfig.cache = 'stream': recompute the rows of the examples a step reads (the last
    batch is kept, so h_L, the lower rows and ``rest`` of one step come from one forward)."""

    def __init__(self, lm: FrozenLM, tokens: "Tokens", offsets: np.ndarray, keep: np.ndarray,
                 columns: Optional[torch.Tensor], with_rest: bool, precision: str) -> None:
        self.lm, self.tokens, self.offsets, self.keep = lm, tokens, offsets, keep
        self.columns, self.with_rest, self.precision = columns, with_rest, precision
        self._key: Optional[bytes] = None

    @torch.no_grad()
    def _compute(self, examples: np.ndarray) -> None:
        lm, tok = self.lm, self.tokens
        lengths = tok.lengths[examples]
        T = int(lengths.max())
        pos = np.arange(T)
        att = pos[None, :] < lengths[:, None]
        idx = np.where(att, tok.offsets[examples][:, None] + pos[None, :], 0)
        ids = torch.as_tensor(tok.ids[idx].astype(np.int64), device=lm.device)
        with autocast(lm.device, self.precision):
            low, fin = lm.hidden(ids, torch.as_tensor(att.astype(np.int64), device=lm.device))
        sel = torch.as_tensor(att & self.keep[idx], device=lm.device)
        final = fin[sel].float()
        self._rest = _rest_lse(lm, final, self.columns) if self.with_rest else None
        # rounded like the stored caches, so that the cache kind does not change the fit
        self._final = final.half().float()
        self._lower = low[sel].float().half().float()
        counts = self.offsets[examples + 1] - self.offsets[examples]
        self._start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self._examples = examples

    def get(self, index: np.ndarray, what: str) -> torch.Tensor:
        flat = index.reshape(-1)
        ex = np.searchsorted(self.offsets, flat, side="right") - 1
        examples = np.unique(ex)
        key = examples.tobytes()
        if key != self._key:
            self._compute(examples)
            self._key = key
        where = self._start[np.searchsorted(self._examples, ex)] + (flat - self.offsets[ex])
        src = {"final": self._final, "lower": self._lower, "rest": self._rest}[what]
        out = src[torch.as_tensor(where, device=src.device)]
        return out.view(*index.shape, *src.shape[1:])


class StreamRows:
    """The :class:`Rows` interface over a :class:`_Stream` (nothing stored)."""

    on_disk = False

    def __init__(self, stream: _Stream, what: str) -> None:
        self.stream, self.what = stream, what

    def take(self, index: np.ndarray) -> torch.Tensor:
        return self.stream.get(index, self.what)

    def close(self) -> None:
        pass


@dataclass
class Tokens:
    """The tokenised pool, packed without padding: offsets (n + 1,), ids int32 (N,), scored bool
    (N,) (position t scores token t + 1), and how many examples were cut at max_length."""

    offsets: np.ndarray
    ids: np.ndarray
    scored: np.ndarray
    truncated: int

    @property
    def n(self) -> int:
        return self.offsets.size - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def tokenize_pool(tokenizer, prompts: Sequence[str], completions: Sequence[str],
                  max_length: int) -> Tokens:
    """Tokenise the pool in blocks of ENCODE_BLOCK examples (as :func:`encode` does), straight
    into flat arrays (no padded (n x T) tensor)."""
    ids, scored, lengths, truncated = [], [], [], 0
    for start in range(0, len(prompts), ENCODE_BLOCK):
        rows, masks, cut = token_rows(tokenizer, prompts[start:start + ENCODE_BLOCK],
                                      completions[start:start + ENCODE_BLOCK], max_length)
        lengths.append(np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows)))
        ids.append(np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32))
        scored.append(np.fromiter(itertools.chain.from_iterable(masks), dtype=bool))
        truncated += sum(cut)
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return Tokens(offsets, np.concatenate(ids) if ids else np.zeros(0, np.int32),
                  np.concatenate(scored) if scored else np.zeros(0, bool), truncated)


@dataclass
class PoolCache:
    """What operator training reads, packed by example: rows offsets[i] .. offsets[i + 1] - 1
    belong to example i.

    scored_only: True in the logits-space modes (every row is a scored token).
    targets, target_col: (N,) int32 on the device: the next token (-1: none) and its column
    in ``columns`` (-1: outside C); scored: (N,) bool on the host; input_ids: (N,) int64
    (residual mode only); final: h_L rows; lower: rows after the steering layer (residual
    mode); rest: (N,) float32 log-sum-exp of the base logits outside C (None when C is the
    whole vocabulary or in residual mode); columns: (|C|,) int64 vocabulary ids. With
    ``cache="stream"`` the rows and ``rest`` are recomputed on demand.
    """

    offsets: np.ndarray
    scored_only: bool
    targets: torch.Tensor
    target_col: torch.Tensor
    scored: np.ndarray
    input_ids: Optional[torch.Tensor]
    final: Rows | StreamRows
    lower: Optional[Rows | StreamRows]
    rest: Optional[torch.Tensor | _Stream]
    columns: Optional[torch.Tensor]
    truncated: int = 0

    @property
    def n(self) -> int:
        return self.offsets.size - 1

    @property
    def on_disk(self) -> bool:
        return self.final.on_disk

    def rest_at(self, index: np.ndarray) -> Optional[torch.Tensor]:
        """``rest`` of the rows ``index`` (any shape), or None when C is the vocabulary."""
        if self.rest is None:
            return None
        if isinstance(self.rest, _Stream):
            return self.rest.get(index, "rest")
        return self.rest[torch.as_tensor(index, device=self.rest.device)]

    def targets_at(self, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(targets, target columns) of the rows ``index``, int64 on the device."""
        flat = torch.as_tensor(index, device=self.targets.device)
        return self.targets[flat].long(), self.target_col[flat].long()

    def scored_lengths(self) -> np.ndarray:
        """Scored tokens per example: (n,)."""
        cum = np.concatenate([[0], np.cumsum(self.scored, dtype=np.int64)])
        return cum[self.offsets[1:]] - cum[self.offsets[:-1]]

    def close(self) -> None:
        self.final.close()
        if self.lower is not None:
            self.lower.close()

    def scored_rows(self, examples: np.ndarray, max_tokens: Optional[int] = None,
                    gen: Optional[torch.Generator] = None) -> tuple[np.ndarray, np.ndarray]:
        """Row indices (B, Tm) of the scored tokens of ``examples`` and a (B, Tm) float mask; at
        most ``max_tokens`` per example, drawn with ``gen`` (an unbiased estimate of the
        example's mean loss)."""
        rows = []
        for i in examples.tolist():
            lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
            row = np.arange(lo, hi) if self.scored_only else lo + np.flatnonzero(self.scored[lo:hi])
            if max_tokens is not None and row.size > max_tokens:
                pick = torch.randperm(row.size, generator=gen)[:max_tokens].sort().values.numpy()
                row = row[pick]
            rows.append(row)
        Tm = max(1, max(r.size for r in rows))
        idx = np.zeros((len(rows), Tm), dtype=np.int64)
        msk = np.zeros((len(rows), Tm), dtype=np.float32)
        for j, r in enumerate(rows):
            idx[j, :r.size] = r
            msk[j, :r.size] = 1.0
        return idx, msk

    def padded(self, examples: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Residual mode: right-padded row indices (B, T), attention (B, T) and the scored mask
        (B, T) of whole examples."""
        lens = self.offsets[examples + 1] - self.offsets[examples]
        T = int(lens.max())
        pos = np.arange(T)
        att = pos[None, :] < lens[:, None]
        idx = np.where(att, self.offsets[examples][:, None] + pos[None, :], 0)
        msk = np.where(att, self.scored[idx], False)
        return idx, att.astype(np.int64), msk.astype(np.float32)


def _columns(tokens: Tokens, vocab: int, mode: str, vocabulary: str) -> Optional[np.ndarray]:
    """Output columns C: the scored targets of the pool ('pool') or the vocabulary ('full');
    None in residual mode (its shift moves every logit)."""
    if mode == "residual":
        return None
    if vocabulary == "full":
        return np.arange(vocab, dtype=np.int64)
    # 'pool' and 'subset' (whose per-operator columns are a part of the pool's)
    nxt = np.concatenate([tokens.ids[1:], [-1]]).astype(np.int64)
    return np.unique(nxt[tokens.scored & (nxt >= 0)])


@torch.no_grad()
def _rest_lse(lm: FrozenLM, final: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """log-sum-exp of the base logits outside C for each row of ``final`` (L, D): (L,)."""
    V = lm.cut.vocab
    out = torch.empty(final.shape[0], device=final.device)
    step = max(1, LSE_CHUNK_ELEMENTS // V)
    for s in range(0, final.shape[0], step):
        logits = lm.logits(final[s:s + step])
        logits[:, columns] = float("-inf")
        out[s:s + step] = torch.logsumexp(logits, -1)
    return out


@torch.no_grad()
def build_cache(lm: FrozenLM, tokens: Tokens, mode: str, vocabulary: str = "pool",
                batch_size: int = 32, memory_mb: float = 2048, work_dir: Optional[Path] = None,
                precision: str = "auto", kind: str = "auto",
                progress: Callable[..., None] = no_progress) -> PoolCache:
    """One pass of the frozen model over the pool (length-sorted batches, written back in pool
    order). Rows go to files under ``work_dir`` with kind 'disk', or with 'auto' when they would
    take more than ``memory_mb``; kind 'stream' makes no pass and stores no rows."""
    if kind not in CHOICES["cache"]:
        raise ValueError(f"cache kind must be one of {CHOICES['cache']}; got {kind!r}")
    device, D = lm.device, lm.cut.d_model
    scored_only = mode != "residual"
    cols_np = _columns(tokens, lm.cut.vocab, mode, vocabulary)
    columns = torch.as_tensor(cols_np, device=device) if cols_np is not None else None
    with_rest = columns is not None and columns.numel() < lm.cut.vocab
    # rows kept per example: its scored tokens (logits-space modes) or all of them (residual)
    keep = tokens.scored if scored_only else np.ones_like(tokens.scored)
    cum = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
    offsets = cum[tokens.offsets]
    N = int(offsets[-1])
    nxt = np.concatenate([tokens.ids[1:], [-1]]).astype(np.int32)
    nxt[tokens.offsets[1:] - 1] = -1          # the last token of an example predicts nothing
    targets_all = torch.as_tensor(nxt[keep.astype(bool)], device=device)
    target_col = (target_columns(targets_all.long(), columns, lm.cut.vocab).int() if columns is not None
                  else torch.full_like(targets_all, -1))
    scored = np.ones(N, dtype=bool) if scored_only else tokens.scored.copy()
    input_ids = None if scored_only else torch.as_tensor(tokens.ids.astype(np.int64), device=device)
    if kind == "stream":
        stream = _Stream(lm, tokens, offsets, keep.astype(bool), columns, with_rest, precision)
        return PoolCache(offsets=offsets, scored_only=scored_only, targets=targets_all,
                         target_col=target_col, scored=scored, input_ids=input_ids,
                         final=StreamRows(stream, "final"),
                         lower=None if scored_only else StreamRows(stream, "lower"),
                         rest=stream if with_rest else None, columns=columns, truncated=tokens.truncated)
    n_arrays = 1 if scored_only else 2
    on_disk = work_dir is not None and (kind == "disk" or (
        kind == "auto" and N * D * 2 * n_arrays > memory_mb * 2**20))
    tag = distributed.rank_suffix()           # each rank of a torchrun fit has its own files
    final = Rows(N, D, device, work_dir / f"cache-final{tag}.f16" if on_disk else None)
    lower = None if scored_only else Rows(N, D, device, work_dir / f"cache-lower{tag}.f16" if on_disk else None)
    rest = torch.zeros(N, device=device) if with_rest else None
    lengths = tokens.lengths
    order = np.argsort(-lengths, kind="stable")
    timer = StageTimer("cache", tokens.n, progress)
    for b, start in enumerate(range(0, tokens.n, batch_size)):
        if not distributed.owns(b):           # another rank of a torchrun fit computes it
            continue
        batch = order[start:start + batch_size]
        T = int(lengths[batch].max())
        pos = np.arange(T)
        att = pos[None, :] < lengths[batch][:, None]
        idx = np.where(att, tokens.offsets[batch][:, None] + pos[None, :], 0)
        ids = torch.as_tensor(tokens.ids[idx].astype(np.int64), device=device)
        att_t = torch.as_tensor(att.astype(np.int64), device=device)
        with autocast(device, precision):
            low, fin = lm.hidden(ids, att_t)
        sel = att & keep[idx].astype(bool)                     # (b, T) rows to keep
        sel_t = torch.as_tensor(sel, device=device)
        fin_rows = fin[sel_t].float()
        # the kept rows of one example are consecutive in the cache, in position order
        starts = offsets[:-1][batch]
        counts = sel.sum(1)
        dest = np.repeat(starts, counts) + (np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts))
        _scatter(final, dest, fin_rows)
        if lower is not None:
            _scatter(lower, dest, low[sel_t].float())
        if rest is not None and dest.size:
            rest[torch.as_tensor(dest, device=device)] = _rest_lse(lm, fin_rows, columns)
        timer.update(min(tokens.n, start + batch_size))
    timer.finish()
    distributed.sum_over_ranks(final, lower, rest)  # every rank: its rows + the others' = all
    return PoolCache(offsets=offsets, scored_only=scored_only, targets=targets_all,
                     target_col=target_col, scored=scored, input_ids=input_ids,
                     final=final, lower=lower, rest=rest, columns=columns, truncated=tokens.truncated)


def _scatter(rows: Rows, dest: np.ndarray, values: torch.Tensor) -> None:
    """Write values (L, D) to the rows ``dest`` (L,), in runs of consecutive destinations."""
    if dest.size == 0:
        return
    breaks = np.flatnonzero(np.diff(dest) != 1) + 1
    bounds = np.concatenate([[0], breaks, [dest.size]])
    for a, b in zip(bounds[:-1], bounds[1:]):
        rows.write(int(dest[a]), values[a:b])
