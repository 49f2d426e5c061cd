"""Stage 2, the operator side: the shared basis and the K steering operators (the frozen
model they steer is :mod:`stride_viz.method.frozen`).

One shared low-rank basis ``B: R^D -> R^r`` reads a hidden state; operator ``k`` owns a matrix
``A[k]`` that maps the r features to a shift.

- residual mode: ``h_l <- h_l + A[k] B(h_l)`` with ``A[k]: r x D``, after block ``layer``; the
  frozen blocks above run as usual.
- logits mode: ``logits <- logits + A[k] B(h_L)`` with ``A[k]: r x V``; **(ours)** the basis
  reads the final hidden state h_L (the input of the LM head), so no block has to be re-run.

``A`` starts at zero, so every operator starts as the identity (bit-for-bit: a zero operator
adds exactly 0.0). **(ours)** The basis reads the RMS-normalised hidden state, and in
residual mode the shift is scaled back by that RMS (``h + rms(h) A[k] B(h / rms(h))``): the
residual stream's scale differs by orders of magnitude between models and layers, and the
normalisation keeps one learning rate right for all of them.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["SteeringOperators"]


class SteeringOperators(nn.Module):
    """The shared basis and the K operator matrices.

    basis: (r, D); A: (K, r, out) with out = D (residual mode) or V (logits mode).
    """

    def __init__(self, n_operators: int, d_model: int, rank: int, out_dim: int,
                 generator: torch.Generator, rms_scale: bool = False) -> None:
        super().__init__()
        self.rms_scale = rms_scale    # residual mode: shift in units of the stream's RMS
        basis = torch.empty(rank, d_model)
        # Orthonormal rows: the r features start decorrelated and unit-gain.
        nn.init.orthogonal_(basis, generator=generator)
        self.basis = nn.Parameter(basis)
        self.A = nn.Parameter(torch.zeros(n_operators, rank, out_dim))

    @property
    def n_operators(self) -> int:
        return self.A.shape[0]

    def _rms(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6)

    def features(self, h: torch.Tensor) -> torch.Tensor:
        """B(h): (..., D) -> (..., r), on the RMS-normalised h."""
        return (h.float() / self._rms(h)) @ self.basis.T

    def scale(self, h: torch.Tensor) -> torch.Tensor | float:
        """Factor applied to a shift: rms(h) (..., 1) in residual mode, else 1."""
        return self._rms(h) if self.rms_scale else 1.0

    def shift(self, h: torch.Tensor, ops: torch.Tensor) -> torch.Tensor:
        """Shift of operator ``ops[p]`` on ``h[p]``: h (P, ..., D), ops (P,) -> (P, ..., out)."""
        z = self.features(h)                       # (P, ..., r)
        A = self.A[ops]                            # (P, r, out)
        flat = z.reshape(z.shape[0], -1, z.shape[-1])
        return torch.bmm(flat, A).reshape(*z.shape[:-1], A.shape[-1]) * self.scale(h)

    def shift_rows(self, h: torch.Tensor, ops: torch.Tensor) -> torch.Tensor:
        """Shift of each of the operators ``ops[b]`` on ``h[b]``: h (B, T, D), ops (B, c) ->
        (B, c, T, out) (how training steers an example with several operators at once)."""
        shift = torch.einsum("btr,bcro->bcto", self.features(h), self.A[ops])
        return shift * (self.scale(h).unsqueeze(1) if self.rms_scale else 1.0)

    def shift_all(self, h: torch.Tensor, ops: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Shift of every operator (or of ``ops``) on the same h: (..., D) -> (K, ..., out)."""
        z = self.features(h)
        A = self.A if ops is None else self.A[ops]
        return torch.einsum("...r,kro->k...o", z, A) * self.scale(h)
