"""Stage 2 in closed form (``FitConfig.solver = "gauss-newton"``, logits mode): every operator
is the damped Gauss-Newton step of its own fidelity loss, computed in two passes over the
cached pool instead of trained by AdamW (:mod:`stride_viz.method.training`).

Operator k shifts the logits of the pool's tokens C by ``B(h_L) A[k]`` as in logits mode
(:mod:`stride_viz.method.operators`); **(ours)** here

- the shared basis ``B`` (r x D) is the top r principal directions of the RMS-normalised
  final hidden states of the pool's scored tokens (pass 1), so the r features z are
  uncorrelated with variances ``a_1 >= ... >= a_r``;
- the curvature of a fidelity loss in A is approximated by one Kronecker-factored
  Gauss-Newton matrix shared by all operators, ``E[z z^T] (x) diag(E[p_C])`` over the pool's
  tokens (p: the base model's next-token probabilities; the input factor is diagonal in this
  basis, the output factor is kept diagonal so that its size is |C|, whatever the vocabulary);
- the probabilities p (in the curvature and the gradients) are the base model's at
  ``FitConfig.fidelity_temperature`` T (1: the model's own), as the trained operators' fidelity
  loss reads them: T > 1 keeps memorised examples (p near one-hot, gradient near 0) in play;
- ``A[k] = -eta (G_k / s) / (a (x) E[p_C] + lambda)`` (elementwise), ``G_k`` the sum over
  operator k's examples of the gradient of each example's mean token loss at A = 0 (pass 2),
  s the mean subset size, ``lambda = damping x mean(a) x mean(E[p_C])``.

The step size ``eta`` keeps every operator in the linear regime: the median operator moves a
typical token's logits by ``STEP_RMS`` (RMS over C). A response is then, to first order,
``y_k = eta / s x sum_{i in A_k} g_x^T H^-1 g_i``: the sum over the subset of a Gauss-Newton
influence of each member on the query, which is the linear model ``y = M w`` the sparse
recovery assumes, with no training noise. A full step (eta = 1) is far outside that regime:
in the directions of low curvature the damped step is large, and the responses stop adding
up.

No optimiser, no epochs, no checkpoint: pass 1 reads only the cached hidden states, pass 2 is
one forward pass of the LM head over the pool's scored tokens. Under torchrun every rank holds the whole cache and
computes the same operators.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import scipy.sparse as sp
import torch

from stride_viz.config import ConfigError, FitConfig
from stride_viz.method.cache import PoolCache, autocast
from stride_viz.method.frozen import FrozenLM
from stride_viz.method.logits import LOSS_CHUNK_ELEMENTS
from stride_viz.method.operators import SteeringOperators
from stride_viz.method.subsets import subsets_of
from stride_viz.progress import Cancelled, StageTimer, no_progress

__all__ = ["gauss_newton_operators", "STEP_RMS"]

STEP_RMS = 0.01                # logit RMS shift of the median operator on a typical token
EXAMPLE_BLOCK = 256            # examples per block of a pass


def _blocks(cache: PoolCache, max_tokens: int, max_examples: int = EXAMPLE_BLOCK):
    """Contiguous blocks of at most ``max_examples`` examples [s, e) whose scored rows number at
    most ``max_tokens`` (one example more when a single one is longer)."""
    s, n = 0, cache.n
    while s < n:
        e = s + 1
        while e < n and e - s < max_examples and cache.offsets[e + 1] - cache.offsets[s] <= max_tokens:
            e += 1
        yield s, e
        s = e


def _token_pieces(cache: PoolCache, s: int, e: int, step: int):
    """The scored rows of examples s..e-1 in pieces of at most ``step`` rows: (row indices,
    the example of each row relative to s). Every row of a logits-space cache is scored."""
    rows = np.arange(int(cache.offsets[s]), int(cache.offsets[e]))
    example = np.repeat(np.arange(e - s), np.diff(cache.offsets[s:e + 1]))
    for a in range(0, rows.size, step):
        yield rows[a:a + step], example[a:a + step]


def _normalised(ops: SteeringOperators, h: torch.Tensor) -> torch.Tensor:
    """h / RMS(h), as the operators' basis reads it."""
    return h.float() / ops._rms(h)


def gauss_newton_operators(lm: FrozenLM, cache: PoolCache, membership: sp.csr_matrix, config: FitConfig,
                           progress: Callable[..., None] = no_progress,
                           should_stop: Callable[[], bool] = lambda: False) -> tuple[SteeringOperators, dict]:
    """The K operators of a fit by one damped Gauss-Newton step each (logits mode, or residual
    mode with the linear design), and a record of the fit (for fit/state.json): basis
    variances, damping, step size, seconds."""
    D, r = lm.cut.d_model, config.rank
    if r > D:
        raise ConfigError(f"The 'rank' parameter of FitConfig must be at most the model's hidden "
                          f"size ({D}) with solver 'gauss-newton'. Got {r} instead.")
    solve = _residual_operators if config.mode == "residual" else _logit_operators
    return solve(lm, cache, membership, config, progress, should_stop)


def _timer(n_blocks: int, progress: Callable[..., None], should_stop: Callable[[], bool]):
    """A check(done, what) for the two passes: reports progress, raises Cancelled on a stop."""
    timer = StageTimer("fit", 2 * n_blocks, progress)

    def check(done: int, what: str) -> None:
        if should_stop():
            raise Cancelled(f"fit stopped during its closed-form pass ({what}); it keeps no "
                            "partial state (the pass is cheap): run the same command again")
        timer.update(done, what)
    return check


def _principal(second: torch.Tensor, n_rows: int, r: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The top r principal directions (r, D) of a summed second moment over ``n_rows`` rows,
    their variances (r,) and the share of the total variance they hold."""
    second = second / max(1, n_rows)
    evals, evecs = torch.linalg.eigh(second)
    order = torch.argsort(evals, descending=True)[:r]
    a = evals[order].clamp_min(0)
    return evecs[:, order].T.float(), a.float(), float(a.sum() / max(1e-12, float(torch.trace(second))))


def _record(a: torch.Tensor, share: float, lam: float, eta: float, step_rms: float, n_tok: int,
            n_blocks: int, t0: float, **extra) -> dict:
    return {"solver": "gauss-newton", "status": "done", "step": 2 * n_blocks,
            "total_steps": 2 * n_blocks, "history": [],
            "basis_variance": [round(float(x), 6) for x in a], "basis_variance_share": share,
            "damping_absolute": lam, "step_scale": eta, "step_rms": step_rms,
            "tokens": n_tok, "seconds_passes": time.monotonic() - t0, **extra}


def _median_scale(rms: torch.Tensor, target: float) -> float:
    """The factor that makes the median of the operators' typical shifts ``rms`` equal ``target``."""
    median = float(rms.median())
    return target / median if median > 0 else 0.0


@torch.no_grad()
def _logit_operators(lm, cache, membership, config, progress, should_stop):
    t0 = time.monotonic()
    device = lm.device
    K, n = membership.shape
    D, C, r = lm.cut.d_model, int(cache.columns.numel()), config.rank
    ops = SteeringOperators(K, D, r, C, torch.Generator().manual_seed(config.seed), rms_scale=False,
                            columns=cache.columns.cpu()).to(device)
    # a block's (tokens x |C|) probabilities and (examples x r x |C|) gradients stay within the
    # loss budget of a training step
    blocks = list(_blocks(cache, max(1, LOSS_CHUNK_ELEMENTS // max(1, C)),
                          max(1, min(EXAMPLE_BLOCK, LOSS_CHUNK_ELEMENTS // max(1, r * C)))))
    check = _timer(len(blocks), progress, should_stop)
    step_rows = max(1, LOSS_CHUNK_ELEMENTS // lm.cut.vocab)   # full-vocabulary logits per piece

    # pass 1 (the cached hidden states only): their second moment, whose top directions are the basis
    second = torch.zeros(D, D, dtype=torch.float64, device=device)
    n_tok = 0
    for b, (s, e) in enumerate(blocks):
        for rows, _ in _token_pieces(cache, s, e, step_rows):
            hn = _normalised(ops, cache.final.take(rows))
            second += (hn.T @ hn).double()
            n_tok += hn.shape[0]
        check(b + 1, f"curvature: block {b + 1}/{len(blocks)}")
    basis, a, share = _principal(second, n_tok, r)
    ops.basis.data.copy_(basis)

    # pass 2 (one pass of the LM head): the mean probabilities of C (the output factor) and, per
    # operator, the sum over its examples of d(mean token loss)/dA at A = 0
    member_of = torch.as_tensor(subsets_of(membership), device=device)        # (n, d)
    lengths = torch.as_tensor(cache.scored_lengths(), device=device).clamp_min(1).float()
    grad = torch.zeros(K, r, C, device=device)
    mean_p = torch.zeros(C, dtype=torch.float64, device=device)
    cols = cache.columns
    for b, (s, e) in enumerate(blocks):
        G = torch.zeros(e - s, r, C, device=device)
        for rows, example in _token_pieces(cache, s, e, step_rows):
            h = cache.final.take(rows)
            _, col = cache.targets_at(rows)
            p = torch.softmax(lm.logits(h).float() / config.fidelity_temperature, -1)
            p = p[:, cols] if cols.numel() < p.shape[1] else p
            mean_p += p.sum(0).double()
            ex = torch.as_tensor(example, device=device)
            g = p.clone()                                          # d loss / d logits_C = p - onehot
            ok = col >= 0
            g[ok.nonzero().squeeze(1), col[ok]] -= 1.0
            z = (_normalised(ops, h) @ basis.T) / lengths[s + ex].unsqueeze(1)   # (T, r), each example's mean
            for j in range(r):
                G[:, j].index_add_(0, ex, z[:, j:j + 1] * g)
        for slot in range(member_of.shape[1]):
            grad.index_add_(0, member_of[s:e, slot], G)
        check(len(blocks) + b + 1, f"operators: block {b + 1}/{len(blocks)}")
    d = (mean_p / max(1, n_tok)).float()

    size = float(membership.sum()) / K                             # mean subset size
    lam = config.damping * float(a.mean()) * float(d.mean())
    step = -(grad / size) / (a[:, None] * d[None, :] + lam)        # (K, r, C)
    rms = torch.sqrt((a[None, :, None] * step.pow(2)).sum((1, 2)) / C)   # typical logit shift
    eta = _median_scale(rms, STEP_RMS)
    ops.A.data.copy_(step * eta)
    return ops, _record(a, share, lam, eta, STEP_RMS, n_tok, len(blocks), t0)


@torch.no_grad()
def _residual_operators(lm, cache, membership, config, progress, should_stop):
    """Residual mode, linear design: operator k shifts the residual stream after block ``layer``
    by ``rms(h) B(h / rms(h)) A[k]`` (A[k]: r x D, whatever the vocabulary). **(ours)** The
    gradient of an example's mean token loss in A is ``sum_t u_t g_t^T`` (u_t = rms(h_t) B(h_t
    / rms(h_t)), g_t = d loss / d h_t from one backward pass through the blocks above), and the
    curvature is K-FAC's ``E[u u^T] (x) E[g~ g~^T]`` over the pool's positions (g~: the gradient
    for next tokens sampled from the model, so that its second moment is the Fisher, the
    Gauss-Newton matrix of the log-likelihood); the damped step is taken in the two factors'
    eigenbases. The step size makes the median operator move the stream by ``STEP_RMS`` of its
    RMS (a typical position, RMS over D)."""
    t0 = time.monotonic()
    device = lm.device
    K = membership.shape[0]
    D, V, r = lm.cut.d_model, lm.cut.vocab, config.rank
    gen = torch.Generator().manual_seed(config.seed)
    ops = SteeringOperators(K, D, r, D, gen, rms_scale=True).to(device)
    # a block's logits (and their softmax, gradient, sampled copy) stay within the loss budget
    blocks = list(_blocks(cache, max(1, LOSS_CHUNK_ELEMENTS // (4 * V))))
    check = _timer(len(blocks), progress, should_stop)

    # pass 1 (the cached hidden states after block `layer` only): the basis
    second = torch.zeros(D, D, dtype=torch.float64, device=device)
    n_rows = int(cache.offsets[-1])
    piece = max(1, LOSS_CHUNK_ELEMENTS // (4 * D))
    for b, (s, e) in enumerate(blocks):
        for a0 in range(int(cache.offsets[s]), int(cache.offsets[e]), piece):
            rows = np.arange(a0, min(a0 + piece, int(cache.offsets[e])))
            hn = _normalised(ops, cache.lower.take(rows))
            second += (hn.T @ hn).double()
        check(b + 1, f"basis: block {b + 1}/{len(blocks)}")
    basis, a, share = _principal(second, n_rows, r)
    ops.basis.data.copy_(basis)

    # pass 2 (one forward and two backward passes of the blocks above): per-example gradients
    # in A, and the two Kronecker factors of the curvature
    member_of = torch.as_tensor(subsets_of(membership), device=device)        # (n, d)
    grad = torch.zeros(K, r, D, device=device)
    f_in = torch.zeros(r, r, dtype=torch.float64, device=device)
    f_out = torch.zeros(D, D, dtype=torch.float64, device=device)
    sample_gen = torch.Generator(device=device).manual_seed(config.seed)
    T_fid = config.fidelity_temperature
    for b, (s, e) in enumerate(blocks):
        idx, att, msk = cache.padded(np.arange(s, e))
        flat = torch.as_tensor(idx, device=device)
        ids, att = cache.input_ids[flat], torch.as_tensor(att, device=device)
        msk = torch.as_tensor(msk, device=device)
        count = msk.sum(-1, keepdim=True).clamp_min(1.0)
        weight = msk / count                                    # each example's mean over its tokens
        tgt = cache.targets_at(idx)[0].clamp_min(0)
        with torch.enable_grad():
            h = cache.lower.take(idx).float().requires_grad_(True)               # (B, T, D)
            with autocast(device, config.precision):
                final = lm.upper_hidden(h, ids, att)
            logp = torch.log_softmax(lm.logits(final).float() / T_fid, -1)       # (B, T, V)
            with torch.no_grad():
                drawn = torch.multinomial(logp.detach().exp().view(-1, V), 1, generator=sample_gen)
            own = -(logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) * weight).sum()
            fisher = -(logp.gather(-1, drawn.view(*tgt.shape, 1)).squeeze(-1) * weight).sum()
            g = torch.autograd.grad(own, h, retain_graph=True)[0].float()
            g_sampled = torch.autograd.grad(fisher, h)[0].float()
        on = att.unsqueeze(-1).float()
        hf = h.detach()
        u = (_normalised(ops, hf) @ basis.T) * ops._rms(hf) * on                # (B, T, r)
        G = torch.einsum("btr,btd->brd", u, g)                                   # (B, r, D)
        for slot in range(member_of.shape[1]):
            grad.index_add_(0, member_of[s:e, slot], G)
        f_in += torch.einsum("btr,bts->rs", u, u).double()
        gs = (g_sampled * on).reshape(-1, D)
        f_out += (gs.T @ gs).double()
        check(len(blocks) + b + 1, f"operators: block {b + 1}/{len(blocks)}")
    e_in, q_in = torch.linalg.eigh(f_in / max(1, n_rows))
    e_out, q_out = torch.linalg.eigh(f_out / max(1, n_rows))
    e_in, e_out = e_in.clamp_min(0).float(), e_out.clamp_min(0).float()
    q_in, q_out = q_in.float(), q_out.float()

    size = float(membership.sum()) / K                             # mean subset size
    lam = config.damping * float(e_in.mean()) * float(e_out.mean())
    rotated = torch.einsum("sr,ksd,de->kre", q_in, grad / size, q_out)
    step = torch.einsum("rs,kse,de->krd", q_in, -rotated / (e_in[:, None] * e_out[None, :] + lam), q_out)
    rms = torch.sqrt((a[None, :, None] * step.pow(2)).sum((1, 2)) / D)   # shift / rms(h)
    eta = _median_scale(rms, STEP_RMS)
    ops.A.data.copy_(step * eta)
    return ops, _record(a, share, lam, eta, STEP_RMS, n_rows, len(blocks), t0,
                        curvature="kfac-sampled")
