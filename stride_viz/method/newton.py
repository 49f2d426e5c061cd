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
from stride_viz.method.cache import PoolCache
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


@torch.no_grad()
def gauss_newton_operators(lm: FrozenLM, cache: PoolCache, membership: sp.csr_matrix, config: FitConfig,
                           progress: Callable[..., None] = no_progress,
                           should_stop: Callable[[], bool] = lambda: False) -> tuple[SteeringOperators, dict]:
    """The K operators of a logits-mode fit by one damped Gauss-Newton step each, and a record
    of the fit (for fit/state.json): basis variances, damping, step size, seconds."""
    t0 = time.monotonic()
    device = lm.device
    K, n = membership.shape
    D, C, r = lm.cut.d_model, int(cache.columns.numel()), config.rank
    if r > D:
        raise ConfigError(f"The 'rank' parameter of FitConfig must be at most the model's hidden "
                          f"size ({D}) with solver 'gauss-newton'. Got {r} instead.")
    ops = SteeringOperators(K, D, r, C, torch.Generator().manual_seed(config.seed), rms_scale=False,
                            columns=cache.columns.cpu()).to(device)
    # a block's (tokens x |C|) probabilities and (examples x r x |C|) gradients stay within the
    # loss budget of a training step
    blocks = list(_blocks(cache, max(1, LOSS_CHUNK_ELEMENTS // max(1, C)),
                          max(1, min(EXAMPLE_BLOCK, LOSS_CHUNK_ELEMENTS // max(1, r * C)))))
    timer = StageTimer("fit", 2 * len(blocks), progress)

    def check(done: int, what: str) -> None:
        if should_stop():
            raise Cancelled(f"fit stopped during its closed-form pass ({what}); it keeps no "
                            "partial state (the pass is cheap): run the same command again")
        timer.update(done, what)

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
    second /= max(1, n_tok)
    evals, evecs = torch.linalg.eigh(second)
    order = torch.argsort(evals, descending=True)[:r]
    basis = evecs[:, order].T.float()                              # (r, D), orthonormal rows
    a = evals[order].clamp_min(0).float()                          # variances of the features
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
    median = float(rms.median())
    eta = STEP_RMS / median if median > 0 else 0.0
    ops.A.data.copy_(step * eta)
    record = {"solver": "gauss-newton", "status": "done", "step": 2 * len(blocks),
              "total_steps": 2 * len(blocks), "history": [],
              "basis_variance": [round(float(x), 6) for x in a],
              "basis_variance_share": float(a.sum() / max(1e-12, float(torch.trace(second)))),
              "damping_absolute": lam, "step_scale": eta, "step_rms": STEP_RMS,
              "tokens": n_tok, "seconds_passes": time.monotonic() - t0}
    return ops, record
