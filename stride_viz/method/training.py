"""Stage 2, the training side: cache the frozen model's activations once, then train the
basis and all K operators jointly with the fidelity, stability and linearity losses.

Why it is cheap (ours): the blocks below the steering layer never change, so their output for
the whole pool is computed once (``PoolCache``); an example belongs to ``d`` operators, so one
batch trains ``d`` operators per example at once (the operator index is a batch dimension).
Every step draws its randomness from a generator seeded by ``(seed, step)``, so a fit killed
and resumed from its last checkpoint ends bit-for-bit where an uninterrupted fit ends.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from stride_viz.config import FitConfig
from stride_viz.method.frozen import FrozenLM
from stride_viz.method.operators import SteeringOperators
from stride_viz.progress import Cancelled, StageTimer, no_progress
from stride_viz.method.subsets import subsets_of
from stride_viz.data.tokenize import Encoded

__all__ = ["PoolCache", "build_cache", "Trainer", "step_generator"]


@dataclass
class PoolCache:
    """Activations of the frozen model on the whole pool, packed without padding.

    offsets: (n + 1,) token offsets of each example in the flat arrays;
    input_ids: (N,) all tokens; loss_mask: (N,) 1 where the next token is scored;
    targets: (N,) the next token (-1 at the last token of an example);
    final: (N, D) final hidden state h_L (input of the LM head);
    lower: (N, D) hidden state after the steering layer, residual mode only.
    """

    offsets: torch.Tensor
    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    targets: torch.Tensor
    final: torch.Tensor
    lower: Optional[torch.Tensor]

    @property
    def n(self) -> int:
        return self.offsets.numel() - 1

    @property
    def scored_lengths(self) -> torch.Tensor:
        """Scored tokens per example: (n,)."""
        cum = torch.cat([self.loss_mask.new_zeros(1), torch.cumsum(self.loss_mask, 0)])
        return cum[self.offsets[1:]] - cum[self.offsets[:-1]]

    def padded_scored(self, examples: torch.Tensor, max_tokens: Optional[int] = None,
                      gen: Optional[torch.Generator] = None) -> tuple[torch.Tensor, ...]:
        """Like :meth:`padded` on ``final`` but keeping only the scored tokens of each example
        (what the logits mode needs), at most ``max_tokens`` of them drawn at random with
        ``gen`` (an unbiased estimate of the per-example mean loss):
        (ids, attention, loss_mask, targets, final (B, Tm, D))."""
        rows = []
        for i in examples.tolist():
            lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
            row = torch.nonzero(self.loss_mask[lo:hi] > 0).squeeze(1) + lo
            if max_tokens is not None and row.numel() > max_tokens:
                pick = torch.randperm(row.numel(), generator=gen)[:max_tokens]
                row = row[pick.sort().values.to(row.device)]
            rows.append(row)
        Tm = max(1, max(r.numel() for r in rows))
        B = len(rows)
        idx = torch.zeros(B, Tm, dtype=torch.long, device=self.final.device)
        msk = torch.zeros(B, Tm, device=self.final.device)
        for j, r in enumerate(rows):
            idx[j, :r.numel()] = r
            msk[j, :r.numel()] = 1.0
        tgt = torch.where(msk > 0, self.targets[idx], torch.full_like(idx, -1))
        return self.input_ids[idx], (msk > 0).long(), msk, tgt, self.final[idx]

    def padded(self, examples: torch.Tensor, what: str) -> tuple[torch.Tensor, ...]:
        """Right-padded batch of ``examples``: (ids (B,T), attention (B,T), loss_mask (B,T),
        targets (B,T), tensor ``what`` (B,T,D))."""
        lens = (self.offsets[examples + 1] - self.offsets[examples]).tolist()
        T = max(lens)
        B = len(lens)
        src = getattr(self, what)
        ids = torch.zeros(B, T, dtype=torch.long, device=src.device)
        att = torch.zeros(B, T, dtype=torch.long, device=src.device)
        msk = torch.zeros(B, T, device=src.device)
        tgt = torch.full((B, T), -1, dtype=torch.long, device=src.device)
        val = torch.zeros(B, T, src.shape[-1], device=src.device, dtype=src.dtype)
        for j, i in enumerate(examples.tolist()):
            lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
            L = hi - lo
            ids[j, :L] = self.input_ids[lo:hi]
            att[j, :L] = 1
            msk[j, :L] = self.loss_mask[lo:hi]
            tgt[j, :L] = self.targets[lo:hi]
            val[j, :L] = src[lo:hi]
        return ids, att, msk, tgt, val


@torch.no_grad()
def build_cache(lm: FrozenLM, enc: Encoded, mode: str, batch_size: int = 32,
                progress: Callable[..., None] = no_progress) -> PoolCache:
    """Run the frozen model once over the pool and keep what training needs."""
    device = lm.device
    lengths = enc.attention_mask.sum(1)
    offsets = torch.zeros(len(enc) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(lengths, 0)
    ids, mask, tgt, fin, low = [], [], [], [], []
    timer = StageTimer("cache", len(enc), progress)
    # Sort by length so that padding wastes little; write back in pool order.
    order = torch.argsort(lengths, descending=True)
    pieces: dict[int, tuple] = {}
    for start in range(0, len(enc), batch_size):
        batch = order[start:start + batch_size]
        T = int(lengths[batch].max())
        b_ids = enc.input_ids[batch, :T].to(device)
        b_att = enc.attention_mask[batch, :T].to(device)
        lower, final = lm.hidden(b_ids, b_att)
        for j, i in enumerate(batch.tolist()):
            L = int(lengths[i])
            row_ids = enc.input_ids[i, :L]
            targets = torch.cat([row_ids[1:], torch.tensor([-1])])
            pieces[i] = (row_ids, enc.loss_mask[i, :L], targets, final[j, :L].float().cpu(),
                         lower[j, :L].float().cpu() if mode == "residual" else None)
        timer.update(min(len(enc), start + batch_size))
    for i in range(len(enc)):
        r_ids, r_mask, r_tgt, r_fin, r_low = pieces.pop(i)
        ids.append(r_ids), mask.append(r_mask), tgt.append(r_tgt), fin.append(r_fin)
        if r_low is not None:
            low.append(r_low)
    timer.finish()
    return PoolCache(offsets.to(device), torch.cat(ids).to(device), torch.cat(mask).to(device),
                     torch.cat(tgt).to(device), torch.cat(fin).to(device),
                     torch.cat(low).to(device) if low else None)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of one training step: depends on (seed, step) only, so resuming replays it."""
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + step * 7919 + 12345) % (2**63 - 1))
    return g


class Trainer:
    """Joint training of the basis and the K operators on a cached pool."""

    def __init__(self, lm: FrozenLM, cache: PoolCache, membership: sp.csr_matrix,
                 config: FitConfig) -> None:
        self.lm, self.cache, self.config = lm, cache, config
        self.device = lm.device
        self.K, self.n = membership.shape
        self.member_of = torch.as_tensor(subsets_of(membership), device=self.device)  # (n, d)
        self.membership_dense = torch.as_tensor(membership.toarray(), dtype=torch.float32,
                                                device=self.device)  # (K, n), for outside sampling
        init = torch.Generator().manual_seed(config.seed)
        out_dim = lm.cut.d_model if config.mode == "residual" else lm.cut.vocab
        self.operators = SteeringOperators(self.K, lm.cut.d_model, config.rank, out_dim, init,
                                           rms_scale=config.mode == "residual").to(self.device)
        self.optimizer = torch.optim.AdamW(self.operators.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay)
        self.steps_per_epoch = math.ceil(self.n / config.batch_size)
        self.total_steps = max(1, math.ceil(config.epochs * self.steps_per_epoch))
        self.step = 0
        self.history: list[dict] = []
        self.sketch = self._sketch(membership)

    # ----------------------------------------------------------------- set-up
    def _sketch(self, membership: sp.csr_matrix) -> torch.Tensor:
        """M~ = [M R, 1]: (K, q + 1), R a Gaussian JL sketch (n, q) seeded by the config."""
        rng = np.random.default_rng(self.config.seed + 1)
        R = rng.standard_normal((self.n, self.config.sketch_dim)) / math.sqrt(self.config.sketch_dim)
        MR = np.asarray(membership @ R)
        MR = np.hstack([MR, np.ones((self.K, 1))])
        return torch.as_tensor(MR, dtype=torch.float32, device=self.device)

    def _batch(self, step: int) -> torch.Tensor:
        """The examples of a step: a seeded permutation per epoch, cut into windows of 16
        batches that are sorted by length before being cut, so a batch pads little."""
        epoch, within = divmod(step, self.steps_per_epoch)
        if getattr(self, "_epoch", None) != epoch:
            rng = np.random.default_rng([self.config.seed, epoch])
            perm = rng.permutation(self.n)
            B = self.config.batch_size
            lengths = self.cache.scored_lengths.cpu().numpy()
            batches = []
            for start in range(0, self.n, 16 * B):
                window = perm[start:start + 16 * B]
                window = window[np.argsort(lengths[window], kind="stable")]
                batches += [window[i:i + B] for i in range(0, len(window), B)]
            self._batches = [batches[i] for i in rng.permutation(len(batches))]
            self._epoch = epoch
        return torch.as_tensor(self._batches[within], device=self.device)

    # ----------------------------------------------------------------- losses
    def _steered_logits(self, examples: torch.Tensor, op_groups: list[torch.Tensor],
                        gen: Optional[torch.Generator]) -> tuple:
        """Logits of every example under each operator of each group: examples (B,), groups of
        ops (B, c_g) -> ([steered (B, c_g, T, V) per group], base (B, T, V), targets (B, T),
        mask (B, T)) over the scored tokens, at most ``tokens_per_example`` of them drawn with
        ``gen`` (gen=None: all of them). Groups are separate tensors, not slices of one:
        the backward of a slice zero-fills the whole tensor, a third of a step's time."""
        if self.config.mode == "logits":
            ids, att, msk, tgt, final = self.cache.padded_scored(
                examples, self.config.tokens_per_example if gen is not None else None, gen)
            base = self.lm.logits(final)                                      # (B, T, V)
            steered = [base.unsqueeze(1) + self.operators.shift_rows(final, ops) for ops in op_groups]
            return steered, base, tgt, msk
        ids, att, msk, tgt, lower = self.cache.padded(examples, "lower")      # (B, T, ...)
        B, T = ids.shape
        steered = []
        for ops in op_groups:
            c = ops.shape[1]
            h = (lower.unsqueeze(1) + self.operators.shift_rows(lower, ops)).reshape(B * c, T, -1)
            final = self.lm.upper_hidden(h, ids.repeat_interleave(c, 0), att.repeat_interleave(c, 0))
            steered.append(self.lm.logits(final).view(B, c, T, -1))
        base = self.lm.logits(self.cache.padded(examples, "final")[4])
        return steered, base, tgt, msk

    def _pair_losses(self, examples: torch.Tensor, inside: torch.Tensor,
                     outside: Optional[torch.Tensor] = None,
                     gen: Optional[torch.Generator] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Mean over the scored tokens, per (example, operator): the steered loss under the
        operators ``inside`` (B, c_in) and KL(base || steered) under ``outside`` (B, c_out)."""
        groups = [inside] + ([outside] if outside is not None else [])
        steered, base, tgt, msk = self._steered_logits(examples, groups, gen)
        B, c, T, V = steered[0].shape
        count = msk.sum(-1).clamp_min(1.0).unsqueeze(1)                      # (B, 1)
        nll = F.cross_entropy(steered[0].reshape(-1, V), tgt.clamp_min(0).unsqueeze(1)
                              .expand(B, c, T).reshape(-1), reduction="none")
        nll = (nll.view(B, c, T) * msk.unsqueeze(1)).sum(-1) / count
        if outside is None:
            return nll, None
        base_logp = torch.log_softmax(base, -1).unsqueeze(1)                 # (B, 1, T, V)
        out_logp = torch.log_softmax(steered[1], -1)
        kl = F.kl_div(out_logp, base_logp, log_target=True, reduction="none").sum(-1)
        return nll, (kl * msk.unsqueeze(1)).sum(-1) / count

    def _linearity(self, gen: torch.Generator) -> torch.Tensor:
        """Distance of probe responses y (over a random set of operators) from the column space
        of the sketch M~ restricted to those operators, per operator."""
        cfg = self.config
        probes = torch.randint(0, self.n, (cfg.probe_queries,), generator=gen).to(self.device)
        n_ops = min(self.K, 64)
        ops = torch.randperm(self.K, generator=gen)[:n_ops].to(self.device)
        steered, _ = self._pair_losses(probes, ops.unsqueeze(0).expand(cfg.probe_queries, -1))
        y = (self._base_losses(probes).unsqueeze(1) - steered).T             # (n_ops, probes)
        S = self.sketch[ops]                                                  # (n_ops, q+1)
        G = S.T @ S
        G = G + cfg.sketch_ridge * G.diagonal().mean() * torch.eye(G.shape[0], device=self.device)
        proj = S @ torch.linalg.solve(G, S.T @ y)
        return ((proj - y) ** 2).sum(0).mean() / n_ops

    @torch.no_grad()
    def _base_losses(self, examples: torch.Tensor) -> torch.Tensor:
        ids, att, msk, tgt, final = self.cache.padded_scored(examples)
        logits = self.lm.logits(final)
        nll = F.cross_entropy(logits.flatten(0, 1), tgt.clamp_min(0).flatten(), reduction="none")
        return (nll.view_as(msk) * msk).sum(-1) / msk.sum(-1).clamp_min(1.0)

    def _loss(self, step: int) -> tuple[torch.Tensor, dict]:
        cfg = self.config
        gen = step_generator(cfg.seed, step)
        batch = self._batch(step)
        B = batch.numel()
        fid_op = self.member_of[batch]                                       # (B, d)
        s = cfg.outside_per_example if cfg.stability_weight > 0 else 0
        if s:
            # random operators whose subsets do not hold the example (inside draws pushed back)
            cand = torch.randint(0, self.K, (B, 4 * s + 4), generator=gen).to(self.device)
            inside = self.membership_dense[cand, batch.unsqueeze(1)] > 0
            order = torch.argsort(inside.float(), dim=1, stable=True)[:, :s]
            out_op = torch.gather(cand, 1, order)
        else:
            out_op = None
        nll, kl = self._pair_losses(batch, fid_op, out_op, gen)
        fid = nll.mean()
        stab = kl.mean() if kl is not None else torch.zeros((), device=self.device)
        loss = fid + cfg.stability_weight * stab
        lin = torch.zeros((), device=self.device)
        if cfg.linearity_weight > 0 and cfg.linearity_every and step % cfg.linearity_every == 0:
            lin = self._linearity(gen)
            loss = loss + cfg.linearity_weight * lin
        return loss, {"step": step, "fid": fid.item(), "stab": stab.item(), "lin": lin.item()}

    # ----------------------------------------------------------------- loop
    def train(self, checkpoint_dir: Optional[Path] = None,
              progress: Callable[..., None] = no_progress,
              should_stop: Callable[[], bool] = lambda: False) -> None:
        """Train to ``total_steps``, resuming from ``checkpoint_dir`` when it holds one."""
        if checkpoint_dir is not None:
            self.load_checkpoint(checkpoint_dir)
        # Multi-threaded CPU kernels accumulate the gradient of A[ops] (repeated operators) in
        # a thread-dependent order; the deterministic variants make a resumed or repeated fit
        # bit-for-bit equal, at no measurable cost here.
        was_deterministic = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            self._train(checkpoint_dir, progress, should_stop)
        finally:
            torch.use_deterministic_algorithms(was_deterministic)

    def _train(self, checkpoint_dir: Optional[Path], progress: Callable[..., None],
               should_stop: Callable[[], bool]) -> None:
        timer = StageTimer("fit", self.total_steps, progress)
        t0 = time.monotonic()
        while self.step < self.total_steps:
            if should_stop():
                if checkpoint_dir is not None:
                    self.save_checkpoint(checkpoint_dir)
                raise Cancelled(f"fit stopped at step {self.step} of {self.total_steps}; "
                                "its checkpoint is kept and the fit resumes from it")
            self.optimizer.zero_grad(set_to_none=True)
            loss, row = self._loss(self.step)
            loss.backward()
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
        """Write tensors and the step atomically (temp file + rename): a kill mid-write leaves
        the previous checkpoint intact."""
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "checkpoint.safetensors.tmp"
        save_file(self.state_tensors(), str(tmp))
        tmp.replace(folder / "checkpoint.safetensors")
        state = {"status": "done" if self.step >= self.total_steps else "running",
                 "step": self.step, "total_steps": self.total_steps, "history": self.history}
        tmp_json = folder / "state.json.tmp"
        tmp_json.write_text(json.dumps(state))
        tmp_json.replace(folder / "state.json")

    def load_checkpoint(self, folder: Path) -> bool:
        ckpt, state_file = folder / "checkpoint.safetensors", folder / "state.json"
        if not (ckpt.exists() and state_file.exists()):
            return False
        tensors = load_file(str(ckpt), device=str(self.device))
        state = json.loads(state_file.read_text())
        self.operators.load_state_dict({k[3:]: v for k, v in tensors.items() if k.startswith("op.")})
        params = self.optimizer.param_groups[0]["params"]
        for i, p in enumerate(params):
            st = {name.split(".", 2)[2]: v for name, v in tensors.items()
                  if name.startswith(f"opt.{i}.")}
            if st:
                if "step" in st:
                    st["step"] = st["step"].cpu()
                self.optimizer.state[p] = st
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        return True
