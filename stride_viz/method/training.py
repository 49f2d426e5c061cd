"""Stage 2, the training side: train the basis and all K operators jointly on the cached pool
(:mod:`stride_viz.method.cache`) with the fidelity, stability and linearity losses.

Why it is cheap (ours): the blocks below the steering layer never change, so their output for
the whole pool is computed once; an example belongs to ``d`` operators, so one batch trains
``d`` operators per example at once (the operator index is a batch dimension). No tensor of
size (batch x d x tokens x V) is alive at once: the losses are computed in chunks of at most
``LOSS_CHUNK_ELEMENTS`` logits, each recomputed in the backward pass (activation
checkpointing) when a step needs more than one chunk, and the logits-space modes only ever
form the |C| pool-token columns (exact, see :mod:`stride_viz.method.logits`).
Every step draws its randomness from a generator seeded by ``(seed, step)``, so a fit killed
and resumed from its last checkpoint ends bit-for-bit where an uninterrupted fit ends.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from stride_viz.config import FitConfig
from stride_viz.method import distributed
from stride_viz.method.cache import PoolCache, autocast, build_cache
from stride_viz.method.checkpoint import CHECKPOINT, Interrupts, load_newest, write_checkpoint
from stride_viz.method.frozen import FrozenLM
from stride_viz.method.logits import (LOSS_CHUNK_ELEMENTS, kl_to_steered, lse, steered_nll, subset_kl,
                                      subset_nll)
from stride_viz.method.operators import LOGIT_MODES, SteeringOperators
from stride_viz.method.subsets import subsets_of
from stride_viz.progress import Cancelled, StageTimer, no_progress

__all__ = ["PoolCache", "build_cache", "Trainer", "step_generator", "LOSS_CHUNK_ELEMENTS"]

SKETCH_BLOCK = 65536             # pool rows of the JL sketch drawn at once


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of one training step: depends on (seed, step) only, so resuming replays it."""
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + step * 7919 + 12345) % (2**63 - 1))
    return g


def _chunks(B: int, c: int, per_pair: int, budget: int):
    """(example slice, operator slice) pieces of a (B, c) grid whose pairs cost ``per_pair``
    elements each, at most ``budget`` elements a piece."""
    if c * per_pair <= budget:
        step = max(1, budget // max(1, c * per_pair))
        for b in range(0, B, step):
            yield slice(b, min(B, b + step)), slice(0, c)
        return
    step = max(1, budget // max(1, per_pair))
    for b in range(B):
        for o in range(0, c, step):
            yield slice(b, b + 1), slice(o, min(c, o + step))


def subset_columns(cache: PoolCache, membership: sp.csr_matrix, member_of: np.ndarray,
                   block: int = 65536) -> torch.Tensor:
    """vocabulary 'subset': the columns (indices into ``cache.columns``) of the target tokens of
    each operator's own examples, -1-padded to the widest: int64 (K, W)."""
    K, n = membership.shape
    has = np.zeros((K, cache.columns.numel()), dtype=bool)
    col = cache.target_col.cpu().numpy()
    lengths = np.diff(cache.offsets)
    for s in range(0, n, block):
        e = min(n, s + block)
        rows = slice(int(cache.offsets[s]), int(cache.offsets[e]))
        ex = np.repeat(np.arange(s, e), lengths[s:e])
        ok = cache.scored[rows] & (col[rows] >= 0)
        ks = member_of[ex[ok]]                                                # (R, d)
        has[ks.reshape(-1), np.repeat(col[rows][ok], ks.shape[1])] = True
    width = max(1, int(has.sum(1).max()))
    out = np.full((K, width), -1, dtype=np.int64)
    for k in range(K):
        idx = np.flatnonzero(has[k])
        out[k, :idx.size] = idx
    return torch.as_tensor(out)


class Trainer:
    """Joint training of the basis and the K operators on a cached pool."""

    def __init__(self, lm: FrozenLM, cache: PoolCache, membership: sp.csr_matrix,
                 config: FitConfig, operator_options: Optional[dict] = None) -> None:
        """``operator_options``: SteeringOperators options over those the config implies
        (measurements of other designs, benchmarks/residual_probe.py)."""
        self.lm, self.cache, self.config = lm, cache, config
        self.device = lm.device
        self.K, self.n = membership.shape
        self.member_of = torch.as_tensor(subsets_of(membership), device=self.device)  # (n, d)
        init = torch.Generator().manual_seed(config.seed)
        logit_mode = config.mode in LOGIT_MODES
        op_columns = (subset_columns(cache, membership, self.member_of.cpu().numpy())
                      if config.mode == "logits" and config.vocabulary == "subset" else None)
        out_dim = (op_columns.shape[1] if op_columns is not None
                   else cache.columns.numel() if logit_mode else lm.cut.d_model)
        memory = config.mode == "residual" and config.residual_design == "memory"
        options = {**(dict(own_basis=True, gated=True) if memory else {}), **(operator_options or {})}
        self.operators = SteeringOperators(
            self.K, lm.cut.d_model, config.memory_slots if memory else config.rank, out_dim, init,
            rms_scale=not logit_mode, inner_rank=config.inner_rank if config.mode == "factored" else None,
            columns=cache.columns.cpu() if logit_mode else None, op_columns=op_columns,
            **options).to(self.device)
        # the fused kernel: one pass over the K x r x |C| parameters (5x faster on a CPU core,
        # measured at K 1024, r 8, |C| 5,901); elementwise, so just as deterministic
        self.optimizer = torch.optim.AdamW(self.operators.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay, fused=True)
        self.steps_per_epoch = math.ceil(self.n / config.batch_size)
        self.total_steps = max(1, math.ceil(config.epochs * self.steps_per_epoch))
        self.warmup_steps = int(round(config.warmup * self.total_steps))
        self.step = 0
        self.history: list[dict] = []
        self.sketch = self._sketch(membership)
        self._scored_lengths = cache.scored_lengths()

    # ----------------------------------------------------------------- set-up
    def _sketch(self, membership: sp.csr_matrix) -> torch.Tensor:
        """M~ = [M R, 1]: (K, q + 1), R a Gaussian JL sketch (n, q) seeded by the config, drawn
        in blocks of pool rows so that no (n, q) array is held."""
        q = self.config.sketch_dim
        rng = np.random.default_rng(self.config.seed + 1)
        csc = membership.tocsc()
        MR = np.zeros((self.K, q))
        for s in range(0, self.n, SKETCH_BLOCK):
            R = rng.standard_normal((min(SKETCH_BLOCK, self.n - s), q)) / math.sqrt(q)
            MR += np.asarray(csc[:, s:s + R.shape[0]] @ R)
        MR = np.hstack([MR, np.ones((self.K, 1))])
        return torch.as_tensor(MR, dtype=torch.float32, device=self.device)

    def _batch(self, step: int) -> np.ndarray:
        """The examples of a step: a seeded permutation per epoch, cut into windows of 16
        batches that are sorted by length before being cut, so a batch pads little."""
        epoch, within = divmod(step, self.steps_per_epoch)
        if getattr(self, "_epoch", None) != epoch:
            rng = np.random.default_rng([self.config.seed, epoch])
            perm = rng.permutation(self.n)
            B = self.config.batch_size
            lengths = self._scored_lengths
            batches = []
            for start in range(0, self.n, 16 * B):
                window = perm[start:start + 16 * B]
                window = window[np.argsort(lengths[window], kind="stable")]
                batches += [window[i:i + B] for i in range(0, len(window), B)]
            self._batches = [batches[i] for i in rng.permutation(len(batches))]
            self._epoch = epoch
        return self._batches[within]

    # ----------------------------------------------------------------- losses
    def _run_chunks(self, fn, B: int, c: int, per_pair: int, inputs: tuple) -> torch.Tensor:
        """fn(b_slice, o_slice, *inputs) -> (b, c') per-pair values, over the (B, c) grid in
        chunks; recomputed in the backward pass when there is more than one chunk."""
        pieces = list(_chunks(B, c, per_pair, LOSS_CHUNK_ELEMENTS))
        rows = []
        for b_sl in dict.fromkeys((p[0].start, p[0].stop) for p in pieces):
            row = []
            for p in pieces:
                if (p[0].start, p[0].stop) != b_sl:
                    continue
                if len(pieces) == 1 or not torch.is_grad_enabled():
                    row.append(fn(p[0], p[1], *inputs))
                else:
                    row.append(checkpoint(fn, p[0], p[1], *inputs, use_reentrant=False))
            rows.append(torch.cat(row, 1))
        return torch.cat(rows, 0)

    def _pair_losses(self, examples: np.ndarray, inside: torch.Tensor,
                     outside: Optional[torch.Tensor] = None,
                     gen: Optional[torch.Generator] = None, part: Optional[np.ndarray] = None,
                     temperature: float = 1.0,
                     ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """Means over the scored tokens (at most ``tokens_per_example`` of them, drawn with
        ``gen``; gen=None: all of them), per (example, operator): the steered loss under the
        operators ``inside`` (B, c_in), KL(base || steered) under ``outside`` (B, c_out), and
        the base loss (B,) on the same tokens. With ``part`` (this process's share under
        torchrun, see :mod:`stride_viz.method.distributed`) only the rows ``part`` of the three;
        the tokens are still drawn for every example, so all ranks' generators stay in step.
        ``temperature``: the steered loss scores base / T + shift (the fit's
        ``fidelity_temperature``; logits-space modes only); the KL and the base loss do not."""
        logit_mode = self.config.mode in LOGIT_MODES
        if logit_mode:
            rows = self.cache.scored_rows(examples, self.config.tokens_per_example
                                          if gen is not None else None, gen)
        if part is not None:
            pick = torch.as_tensor(part, dtype=torch.long, device=self.device)
            examples, inside = examples[part], inside[pick]
            outside = None if outside is None else outside[pick]
            if part.size == 0:
                empty = lambda x: None if x is None else torch.zeros((0, x.shape[1]), device=self.device)
                return empty(inside), empty(outside), torch.zeros(0, device=self.device)
            if logit_mode:
                idx, msk = rows[0][part], rows[1][part]
                width = max(1, int(msk.sum(1).max()))          # drop columns of padding only
                rows = idx[:, :width], msk[:, :width]
        if logit_mode:
            return self._pair_losses_logits(rows, inside, outside, temperature)
        return self._pair_losses_residual(examples, inside, outside)

    def _pair_losses_logits(self, rows, inside, outside, temperature=1.0):
        cache, dev = self.cache, self.device
        idx, msk = rows                                                       # (B, T) each
        msk = torch.as_tensor(msk, device=dev)
        final = cache.final.take(idx)                                         # (B, T, D)
        _, col = cache.targets_at(idx)                                        # (B, T)
        rest = cache.rest_at(idx)
        base_c = self.lm.column_logits(final, cache.columns)                  # (B, T, |C|)
        base_t = torch.gather(base_c, -1, col.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        count = msk.sum(-1).clamp_min(1.0)
        B, T, C = base_c.shape
        base_nll = (steered_nll(base_c, None, rest, base_t, col) * msk).sum(-1) / count
        if self.operators.op_columns is not None:
            return self._pair_losses_subset(base_c, base_t, col, rest, msk, count, final,
                                            inside, outside) + (base_nll,)

        def expand(x, sl):
            return None if x is None else x[sl].unsqueeze(1)

        inv_t = 1.0 / temperature

        def soft(x):   # the fidelity's base logits, divided by the temperature (rest: see below)
            return x if x is None or inv_t == 1.0 else x * inv_t

        def fid(b, o, final, base_c, base_t, col, rest, msk, ops):
            shift = self.operators.shift_rows(final[b], ops[b, o])           # (b, c', T, |C|)
            # with T != 1 the log-sum-exp of the tokens outside C is taken as rest / T: exact
            # when C is the vocabulary, otherwise an approximation (a lower bound for T > 1;
            # those tokens never occur in the pool and their logits are low)
            nll = steered_nll(soft(base_c[b]).unsqueeze(1), shift, soft(expand(rest, b)),
                              soft(base_t[b]).unsqueeze(1), col[b].unsqueeze(1))
            return (nll * msk[b].unsqueeze(1)).sum(-1) / count[b].unsqueeze(1)

        def stab(b, o, final, base_c, rest, msk, ops):
            shift = self.operators.shift_rows(final[b], ops[b, o])
            kl = kl_to_steered(base_c[b].unsqueeze(1), shift, expand(rest, b))
            return (kl * msk[b].unsqueeze(1)).sum(-1) / count[b].unsqueeze(1)

        nll = self._run_chunks(fid, B, inside.shape[1], T * C,
                               (final, base_c, base_t, col, rest, msk, inside))
        kl = None
        if outside is not None:
            kl = self._run_chunks(stab, B, outside.shape[1], T * C,
                                  (final, base_c, rest, msk, outside))
        return nll, kl, base_nll

    def _pair_losses_subset(self, base_c, base_t, col, rest, msk, count, final, inside, outside):
        """Logits mode with per-operator columns (vocabulary 'subset'): the same losses from the
        base log-probabilities of each operator's own columns (see method/logits.py)."""
        lse_base = lse(base_c, rest)                                          # (B, T)
        lp_c = base_c - lse_base.unsqueeze(-1)                                # (B, T, |C|)
        lp_t = base_t - lse_base
        op_cols = self.operators.op_columns
        W = op_cols.shape[1]
        B, T = msk.shape

        def gathered(b, o, ops):
            cols = op_cols[ops[b, o]]                                        # (b, c', W)
            lp = torch.gather(lp_c[b].unsqueeze(1).expand(-1, cols.shape[1], -1, -1), -1,
                              cols.clamp_min(0).unsqueeze(2).expand(-1, -1, T, -1))
            lp = lp.masked_fill((cols < 0).unsqueeze(2), float("-inf"))     # (b, c', T, W)
            return cols, lp, self.operators.shift_rows(final[b], ops[b, o])

        def fid(b, o, final, lp_c, lp_t, col, msk, ops):
            cols, lp, shift = gathered(b, o, ops)
            is_t = (cols.unsqueeze(2) == col[b][:, None, :, None]) & (col[b][:, None, :, None] >= 0)
            nll = subset_nll(lp, shift, lp_t[b].unsqueeze(1), is_t)
            return (nll * msk[b].unsqueeze(1)).sum(-1) / count[b].unsqueeze(1)

        def stab(b, o, final, lp_c, msk, ops):
            _, lp, shift = gathered(b, o, ops)
            return (subset_kl(lp, shift) * msk[b].unsqueeze(1)).sum(-1) / count[b].unsqueeze(1)

        nll = self._run_chunks(fid, B, inside.shape[1], T * W, (final, lp_c, lp_t, col, msk, inside))
        kl = None
        if outside is not None:
            kl = self._run_chunks(stab, B, outside.shape[1], T * W, (final, lp_c, msk, outside))
        return nll, kl

    def _pair_losses_residual(self, examples, inside, outside):
        cache, dev, V = self.cache, self.device, self.lm.cut.vocab
        idx, att, msk = cache.padded(examples)
        flat = torch.as_tensor(idx, device=dev)
        ids, att = cache.input_ids[flat], torch.as_tensor(att, device=dev)
        msk = torch.as_tensor(msk, device=dev)
        tgt = cache.targets_at(idx)[0].clamp_min(0)
        lower = cache.lower.take(idx)                                         # (B, T, D)
        base = self.lm.logits(cache.final.take(idx))                          # (B, T, V)
        base_logp = torch.log_softmax(base, -1)
        count = msk.sum(-1).clamp_min(1.0)
        B, T = ids.shape
        base_nll = (-base_logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) * msk).sum(-1) / count

        def steered(b, o, lower, ids, att, ops):
            c = o.stop - o.start
            h = lower[b].unsqueeze(1) + self.operators.shift_rows(lower[b], ops[b, o])
            nb = h.shape[0]
            with autocast(self.device, self.config.precision):
                final = self.lm.upper_hidden(h.reshape(nb * c, T, -1), ids[b].repeat_interleave(c, 0),
                                             att[b].repeat_interleave(c, 0))
            return torch.log_softmax(self.lm.logits(final).view(nb, c, T, V), -1)

        def fid(b, o, lower, ids, att, tgt, msk, ops):
            logp = steered(b, o, lower, ids, att, ops)
            nll = -logp.gather(-1, tgt[b].unsqueeze(1).expand(-1, logp.shape[1], -1).unsqueeze(-1)).squeeze(-1)
            return (nll * msk[b].unsqueeze(1)).sum(-1) / count[b].unsqueeze(1)

        def stab(b, o, lower, ids, att, base_logp, msk, ops):
            logp = steered(b, o, lower, ids, att, ops)
            kl = F.kl_div(logp, base_logp[b].unsqueeze(1), log_target=True, reduction="none").sum(-1)
            return (kl * msk[b].unsqueeze(1)).sum(-1) / count[b].unsqueeze(1)

        nll = self._run_chunks(fid, B, inside.shape[1], T * V, (lower, ids, att, tgt, msk, inside))
        kl = None
        if outside is not None:
            kl = self._run_chunks(stab, B, outside.shape[1], T * V,
                                  (lower, ids, att, base_logp, msk, outside))
        return nll, kl, base_nll

    def _linearity(self, gen: torch.Generator) -> torch.Tensor:
        """Distance of probe responses y (over a random set of operators) from the column space
        of the sketch M~ restricted to those operators, per operator."""
        cfg = self.config
        probes = torch.randint(0, self.n, (cfg.probe_queries,), generator=gen).numpy()
        n_ops = min(self.K, cfg.linearity_operators)
        ops = torch.randperm(self.K, generator=gen)[:n_ops].to(self.device)
        steered, _, base = self._pair_losses(probes, ops.unsqueeze(0).expand(cfg.probe_queries, -1),
                                             gen=gen if cfg.mode in LOGIT_MODES else None,
                                             part=distributed.share(cfg.probe_queries))
        y = (base.detach().unsqueeze(1) - steered).T                          # (n_ops, this rank's probes)
        S = self.sketch[ops]                                                  # (n_ops, q+1)
        G = S.T @ S
        G = G + cfg.sketch_ridge * G.diagonal().mean() * torch.eye(G.shape[0], device=self.device)
        proj = S @ torch.linalg.solve(G, S.T @ y)
        # a sum over this rank's probes over the whole count: summed over the ranks, the mean
        return ((proj - y) ** 2).sum() / (cfg.probe_queries * n_ops)

    def _outside(self, batch: np.ndarray, gen: torch.Generator) -> Optional[torch.Tensor]:
        """For the stability loss: random operators whose subsets do not hold the example (B, s)
        (candidates inside its subsets are pushed back; membership stays sparse)."""
        s = self.config.outside_per_example if self.config.stability_weight > 0 else 0
        if not s:
            return None
        B = batch.size
        cand = torch.randint(0, self.K, (B, 4 * s + 4), generator=gen).to(self.device)
        mine = self.member_of[torch.as_tensor(batch, device=self.device)]  # (B, d)
        inside = (cand.unsqueeze(-1) == mine.unsqueeze(1)).any(-1)
        order = torch.argsort(inside.float(), dim=1, stable=True)[:, :s]
        return torch.gather(cand, 1, order)

    def _loss(self, step: int) -> tuple[torch.Tensor, dict]:
        cfg = self.config
        gen = step_generator(cfg.seed, step)
        batch = self._batch(step)
        fid_op = self.member_of[torch.as_tensor(batch, device=self.device)]  # (B, d)
        out_op = self._outside(batch, gen)
        # this rank's share of the batch (all of it alone); sums over the share divided by the
        # whole batch's counts, so that the ranks' losses add up to the one-process means
        nll, kl, _ = self._pair_losses(batch, fid_op, out_op, gen, part=distributed.share(batch.size),
                                       temperature=cfg.fidelity_temperature)
        fid = nll.sum() / fid_op.numel()
        stab = kl.sum() / out_op.numel() if kl is not None else torch.zeros((), device=self.device)
        loss = fid + cfg.stability_weight * stab
        lin = torch.zeros((), device=self.device)
        if cfg.linearity_weight > 0 and cfg.linearity_every and step % cfg.linearity_every == 0:
            lin = self._linearity(gen)
            loss = loss + cfg.linearity_weight * lin
        # one host synchronisation per step, for the history (summed over the ranks' shares)
        stats = distributed.all_sum(torch.stack([fid.detach(), stab.detach(), lin.detach()]))
        fid_v, stab_v, lin_v = stats.tolist()
        return loss, {"step": step, "fid": fid_v, "stab": stab_v, "lin": lin_v}

    def _set_lr(self, step: int) -> None:
        """Linear warm-up over the first ``warmup`` fraction of the steps (a function of the
        step alone, so a resumed fit follows the same schedule)."""
        scale = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * scale

    # ----------------------------------------------------------------- loop
    def train(self, checkpoint_dir: Optional[Path] = None,
              progress: Callable[..., None] = no_progress,
              should_stop: Callable[[], bool] = lambda: False) -> None:
        """Train to ``total_steps``, resuming from the newest intact checkpoint in
        ``checkpoint_dir``. SIGTERM or Ctrl-C (in the main thread) stop it like ``should_stop``:
        a checkpoint is written, then :class:`Cancelled` says how to resume."""
        if checkpoint_dir is not None:
            self.load_checkpoint(checkpoint_dir)
        # Multi-threaded CPU kernels accumulate the gradient of A[ops] (repeated operators) in
        # a thread-dependent order; the deterministic variants make a resumed or repeated fit
        # bit-for-bit equal, at no measurable cost here.
        was_deterministic = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        try:
            with Interrupts() as interrupts:
                self._train(checkpoint_dir, progress, should_stop, interrupts)
        finally:
            torch.use_deterministic_algorithms(was_deterministic)

    def _train(self, checkpoint_dir: Optional[Path], progress: Callable[..., None],
               should_stop: Callable[[], bool], interrupts: Optional[Interrupts] = None) -> None:
        timer = StageTimer("fit", self.total_steps, progress)
        t0 = time.monotonic()
        while self.step < self.total_steps:
            signalled = interrupts.name if interrupts is not None else None
            # under torchrun every rank stops at the same step when one of them is asked to
            if distributed.any_rank(bool(signalled) or should_stop()):
                if checkpoint_dir is not None:
                    self.save_checkpoint(checkpoint_dir)
                how = f"interrupted by {signalled}" if signalled else "stopped"
                kept = (f"its checkpoint {checkpoint_dir / CHECKPOINT} is saved: run the same "
                        "command (or Resume the job) to continue from it"
                        if checkpoint_dir is not None else "nothing was saved")
                raise Cancelled(f"fit {how} at step {self.step} of {self.total_steps}; {kept}")
            self.optimizer.zero_grad(set_to_none=True)
            loss, row = self._loss(self.step)
            if loss.requires_grad:              # not on a torchrun rank with an empty share
                loss.backward()
            distributed.sum_gradients(self.operators.parameters())
            self._set_lr(self.step)
            self.optimizer.step()
            self.step += 1
            self.history.append(row)
            if checkpoint_dir is not None and (self.step % self.config.checkpoint_every == 0
                                               or self.step == self.total_steps):
                self.save_checkpoint(checkpoint_dir)
            timer.update(self.step, f"step {self.step}/{self.total_steps} fidelity "
                                    f"{row['fid']:.3f} stability {row['stab']:.4f}")
        self.seconds = time.monotonic() - t0

    # ----------------------------------------------------------------- checkpoints
    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"op.{k}": v.detach().cpu().contiguous() for k, v in self.operators.state_dict().items()}
        for i, p in enumerate(self.optimizer.param_groups[0]["params"]):
            for name, value in self.optimizer.state.get(p, {}).items():
                tensors[f"opt.{i}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
        return tensors

    def save_checkpoint(self, folder: Path) -> None:
        """Write the tensors with the step and history in one file, atomically; the checkpoint
        it replaces is kept as the previous one (see :mod:`stride_viz.method.checkpoint`)."""
        state = {"status": "done" if self.step >= self.total_steps else "running",
                 "step": self.step, "total_steps": self.total_steps, "history": self.history}
        if distributed.is_writer():             # every rank holds the same state
            write_checkpoint(folder, self.state_tensors(), state)
        distributed.barrier()                   # no rank exits while rank 0 is writing

    def load_checkpoint(self, folder: Path) -> bool:
        """Restore the newest intact checkpoint of ``folder``; False (step 0) when there is none."""
        found = (load_newest(folder, str(self.device), self._check_checkpoint)
                 if distributed.is_writer() else None)
        found = distributed.broadcast_checkpoint(found, self.device)  # rank 0's, on every rank
        if found is None:
            return False
        tensors, state = found
        self.operators.load_state_dict({k[3:]: v for k, v in tensors.items() if k.startswith("op.")})
        params = self.optimizer.param_groups[0]["params"]
        for i, p in enumerate(params):
            st = {name.split(".", 2)[2]: v for name, v in tensors.items()
                  if name.startswith(f"opt.{i}.")}
            if st:
                if "step" in st:   # the fused optimiser keeps its step count beside the parameter
                    st["step"] = st["step"].to(p.device)
                self.optimizer.state[p] = st
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        return True

    def _check_checkpoint(self, tensors: dict[str, torch.Tensor]) -> None:
        """ValueError unless ``tensors`` are a checkpoint of this trainer (checked before
        anything is loaded, so a refused checkpoint leaves the fresh state untouched)."""
        want = {f"op.{k}": tuple(v.shape) for k, v in self.operators.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in tensors.items() if k.startswith("op.")}
        if got != want:
            raise ValueError("its operators do not fit this run: "
                             f"{sorted(set(got) ^ set(want)) or 'other shapes'}")
        params = self.optimizer.param_groups[0]["params"]
        for name, v in tensors.items():
            if name.startswith("opt."):
                i, key = name.split(".", 2)[1:]
                if not i.isdigit() or int(i) >= len(params) or (
                        key != "step" and tuple(v.shape) != tuple(params[int(i)].shape)):
                    raise ValueError(f"its optimiser state {name} does not fit this run")

