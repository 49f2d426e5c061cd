"""Exact losses of a shift restricted to some output columns, without a (..., V) tensor.

The logits-space operators move only the logits of the columns ``C`` (the tokens that occur in
the pool, or the whole vocabulary). Every other logit keeps its base value, so the
log-sum-exp over them is one number per token position, ``rest`` (computed once from the
base model: -inf when C is the whole vocabulary), and for a shift ``s`` on C:

    lse_steered = logaddexp(logsumexp(base_C + s), rest)
    nll         = lse_steered - (base_target + s_target)          (s_target = 0 outside C)
    KL(base || steered) = lse_steered - lse_base - sum_C p_base * s

All three are exact: nothing is sampled or approximated.

With per-operator columns (``vocabulary = "subset"``: operator k shifts only the tokens of its
own subset, V_k, padded to a common width with log-probability -inf), the same quantities
follow from the base log-probabilities ``lp`` on V_k and their mass P_k:

    lse_steered - lse_base = log1p(sum_{V_k} p * (e^s - 1))                   (= delta)
    nll = -lp_target + delta - s_target,    KL = delta - sum_{V_k} p * s Tensors broadcast: ``base_c``
(..., |C|) against ``shift`` (..., |C|); the per-position tensors have the shape without
the last axis.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["lse", "steered_nll", "kl_to_steered", "target_columns", "LOSS_CHUNK_ELEMENTS",
           "subset_terms", "subset_nll", "subset_kl"]

# logits (float32) formed at once by a loss or measurement chunk: 256 MiB (a few such tensors
# live). Large enough that a default step at GPT-2's size is one chunk (no recomputation).
LOSS_CHUNK_ELEMENTS = 1 << 26


def lse(logits_c: torch.Tensor, rest: Optional[torch.Tensor]) -> torch.Tensor:
    """log-sum-exp over the whole vocabulary from the columns C and the rest: (..., |C|) -> (...)."""
    out = torch.logsumexp(logits_c, -1)
    return out if rest is None else torch.logaddexp(out, rest)


def _at(x: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """x[..., col] where col >= 0, else 0: x (..., |C|), col (...) broadcastable."""
    shape = torch.broadcast_shapes(x.shape[:-1], col.shape)
    picked = torch.gather(x.expand(*shape, x.shape[-1]), -1,
                          col.clamp_min(0).expand(shape).unsqueeze(-1)).squeeze(-1)
    return torch.where(col.expand(shape) >= 0, picked, torch.zeros((), dtype=x.dtype, device=x.device))


def steered_nll(base_c: torch.Tensor, shift: Optional[torch.Tensor], rest: Optional[torch.Tensor],
                base_target: torch.Tensor, target_col: torch.Tensor) -> torch.Tensor:
    """Next-token loss under ``base + shift`` (nats): base_target (...) is the base logit of the
    target token, target_col (...) its column in C (-1: outside C, where the shift is 0)."""
    if shift is None:
        return lse(base_c, rest) - base_target
    return lse(base_c + shift, rest) - base_target - _at(shift, target_col)


def kl_to_steered(base_c: torch.Tensor, shift: torch.Tensor, rest: Optional[torch.Tensor]) -> torch.Tensor:
    """KL(softmax(base) || softmax(base + shift)) over the whole vocabulary: (...)."""
    lse_base = lse(base_c, rest)
    p_c = torch.exp(base_c - lse_base.unsqueeze(-1))
    return lse(base_c + shift, rest) - lse_base - (p_c * shift).sum(-1)


def target_columns(targets: torch.Tensor, columns: torch.Tensor, vocab: int) -> torch.Tensor:
    """Column in ``columns`` of each target token id, -1 where it is not a column (or < 0)."""
    lookup = torch.full((vocab,), -1, dtype=torch.long, device=targets.device)
    lookup[columns.to(targets.device)] = torch.arange(columns.numel(), device=targets.device)
    return torch.where(targets >= 0, lookup[targets.clamp_min(0)], torch.full_like(targets, -1))


def subset_terms(lp_k: torch.Tensor, shift: torch.Tensor, big: float = 20.0) -> torch.Tensor:
    """delta = lse_steered - lse_base for shifts on per-operator columns: lp_k (..., W) the base
    log-probabilities of the operator's columns (-inf on padding), shift (..., W) -> (...).

    delta = log1p(sum p (e^s - 1)): exactly 0 for a zero shift and accurate for small ones;
    where a shift exceeds ``big`` nats, the overflow-free logaddexp(log(1 - P), lse(lp + s))."""
    p = torch.exp(lp_k)
    small = torch.log1p((p * torch.expm1(shift.clamp(max=big))).sum(-1).clamp_min(-1.0))
    if not bool((shift > big).any()):
        return small
    mass = p.sum(-1).clamp(max=1.0)
    large = torch.logaddexp(torch.log1p(-mass), torch.logsumexp(lp_k + shift, -1))
    return torch.where(shift.amax(-1) > big, large, small)


def subset_nll(lp_k: torch.Tensor, shift: torch.Tensor, lp_target: torch.Tensor,
               is_target: torch.Tensor) -> torch.Tensor:
    """Next-token loss under per-operator column shifts: lp_target (...) the base log-probability
    of the target, is_target (..., W) bool marks the target's column among the operator's."""
    s_t = torch.where(is_target, shift, torch.zeros((), dtype=shift.dtype, device=shift.device)).sum(-1)
    return subset_terms(lp_k, shift) - lp_target - s_t


def subset_kl(lp_k: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """KL(base || steered) under per-operator column shifts: (...)."""
    p = torch.exp(lp_k)
    return subset_terms(lp_k, shift) - (p * torch.where(p > 0, shift, torch.zeros_like(shift))).sum(-1)
