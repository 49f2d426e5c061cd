"""Stage 2, the operator side: the shared basis and the K steering operators (the frozen
model they steer is :mod:`stride_viz.method.frozen`).

One shared low-rank basis ``B: R^D -> R^r`` reads a hidden state; operator ``k`` owns a matrix
``A[k]`` that maps the r features to a shift. Three designs (``FitConfig.mode``):

- ``logits`` (default): ``logits[C_k] <- logits[C_k] + B(h_L) A[k]`` with ``A[k]: r x |C_k|``.
  With ``vocabulary = "pool"`` (the default) or ``"full"`` every operator shifts all of C; with
  ``"subset"`` C_k are the tokens of operator k's own subset (its fidelity loss can only ever
  ask it to raise those), so an operator holds r * |C_k| numbers, a few hundred tokens' worth
  for a subset of a few dozen documents, whatever V is.
- ``factored``: ``logits[C] <- logits[C] + B(h_L) A[k] U`` with ``A[k]: r x r2`` per operator
  and one shared, trained output basis ``U: r2 x |C|``. Per operator r * r2 numbers (512 at
  r 8, r2 64), whatever the vocabulary: the cost does not grow with K * V.
- ``residual``: a shift of the residual stream after block ``layer``; the frozen blocks above
  run as usual. ``FitConfig.residual_design`` 'memory' (default): ``h_l <- h_l + rms(h_l)
  relu(B[k] h_l / rms(h_l)) A[k]``, operator k a key-value memory of its own (keys ``B[k]`` and
  values ``A[k]``, both slots x D); 'linear' (the first design): ``h_l + rms(h_l) B(h_l /
  rms(h_l)) A[k]`` through the shared basis, ``A[k]: r x D``. A linear map of h with a shared
  basis cannot make an operator act on its own subset's contexts only; measured on the demo's
  planted facts, the memory raises recall@10 from 0.54 to 0.65 at 64 slots after the last
  block (``benchmarks/residual_probe.py`` and the README's *Real models*).

``C`` are the operators' output columns: in the two logits-space modes the tokens that occur as
targets in the pool (``FitConfig.vocabulary = "pool"``) or the whole vocabulary (``"full"``).
Tokens outside C keep their logits; the log-sum-exp over them is exact (see
:mod:`stride_viz.method.logits`). **(ours)** the basis reads the final hidden state h_L (the
input of the LM head), so no block has to be re-run in the logits-space modes.

``A`` starts at zero, so every operator starts as the identity (bit-for-bit: a zero operator
adds exactly 0.0). Two further options are measured only (``benchmarks/residual_probe.py``; no
setting uses them): a steering vector ``bias[k]`` added at every position, and a non-zero,
norm-matched start of ``A`` (``init_scale``). **(ours)** The basis reads the RMS-normalised hidden state, and in
residual mode the shift is scaled back by that RMS: the residual stream's scale differs by
orders of magnitude between models and layers (it grows with depth), and the normalisation
keeps one learning rate right for all of them.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["SteeringOperators", "MODES", "LOGIT_MODES"]

MODES = ("factored", "logits", "residual")
LOGIT_MODES = ("factored", "logits")     # operators that shift the logits of the columns C


class SteeringOperators(nn.Module):
    """The shared basis and the K operator matrices.

    basis: (r, D); A: (K, r, r2) with a shared U: (r2, out) when ``inner_rank`` = r2 is given
    (factored mode), else A: (K, r, out); out = D (residual mode) or |C| (logits-space modes).
    ``columns``: int64 (|C|,) vocabulary ids of the output columns (logits-space modes; None
    in residual mode); ``op_columns``: int64 (K, W), with vocabulary 'subset', the columns
    (indices into ``columns``, -1 = padding) that each operator shifts; then out = W.
    """

    def __init__(self, n_operators: int, d_model: int, rank: int, out_dim: int,
                 generator: torch.Generator, rms_scale: bool = False,
                 inner_rank: Optional[int] = None, columns: Optional[torch.Tensor] = None,
                 op_columns: Optional[torch.Tensor] = None, bias: bool = False,
                 own_basis: bool = False, init_scale: float = 0.0, gated: bool = False) -> None:
        super().__init__()
        # gated: the features pass a ReLU, so an operator is a key-value memory (its basis rows
        # the keys, the rows of A the values) instead of a linear map
        self.register_buffer("gated", torch.tensor(bool(gated)) if gated else None)
        self.rms_scale = rms_scale    # residual mode: shift in units of the stream's RMS
        # own_basis: every operator reads h through its own (r, D) basis instead of a shared one
        basis = torch.empty(n_operators if own_basis else 1, rank, d_model)
        # Orthonormal rows: the r features start decorrelated and unit-gain.
        for b in basis:
            nn.init.orthogonal_(b, generator=generator)
        self.basis = nn.Parameter(basis if own_basis else basis[0])
        width = out_dim if inner_rank is None else inner_rank
        # init_scale eps > 0: A ~ N(0, eps^2 / r), so that a start shift has about eps times the
        # RMS of what it is added to (the features have unit variance); 0: exactly zero
        A = torch.zeros(n_operators, rank, width)
        if init_scale > 0:
            A = torch.randn(n_operators, rank, width, generator=generator) * (init_scale / rank ** 0.5)
        self.A = nn.Parameter(A)
        # bias: a steering vector b[k] per operator, added at every position (zero at start)
        self.bias: Optional[nn.Parameter] = (nn.Parameter(torch.zeros(n_operators, width))
                                             if bias and inner_rank is None else None)
        if inner_rank is not None:
            # N(0, 1/r2): a unit change of A moves a logit by about as much as in logits mode
            U = torch.randn(inner_rank, out_dim, generator=generator) / inner_rank ** 0.5
            self.U: Optional[nn.Parameter] = nn.Parameter(U)
        else:
            self.U = None
        if op_columns is not None and tuple(op_columns.shape) != (n_operators, out_dim):
            raise ValueError(f"op_columns must have shape ({n_operators}, {out_dim}); got "
                             f"{tuple(op_columns.shape)}")
        if op_columns is None and columns is not None and columns.numel() != out_dim:
            raise ValueError(f"columns has {columns.numel()} entries for {out_dim} output columns")
        self.register_buffer("columns", columns.long() if columns is not None else None)
        # vocabulary 'subset': operator k shifts the columns op_columns[k] (indices into
        # ``columns``, -1 = padding) instead of all of them
        self.register_buffer("op_columns", op_columns.long() if op_columns is not None else None)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], rms_scale: bool) -> "SteeringOperators":
        """Rebuild from :meth:`to_tensors` (the run's operators.safetensors)."""
        K, r, width = tensors["A"].shape
        U = tensors.get("U")
        out = U.shape[1] if U is not None else width
        ops = cls(K, tensors["basis"].shape[-1], r, out, torch.Generator(), rms_scale=rms_scale,
                  inner_rank=width if U is not None else None, columns=tensors.get("columns"),
                  op_columns=tensors.get("op_columns"), bias="bias" in tensors,
                  own_basis=tensors["basis"].dim() == 3, gated="gated" in tensors)
        ops.load_state_dict({k: v for k, v in tensors.items()})
        return ops

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}

    @property
    def out_dim(self) -> int:
        return self.U.shape[1] if self.U is not None else self.A.shape[2]

    @property
    def n_operators(self) -> int:
        return self.A.shape[0]

    def _rms(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6)

    def _features(self, h: torch.Tensor, shape: str, ops: Optional[torch.Tensor]) -> torch.Tensor:
        """B(h) on the RMS-normalised h. shape 'rows': h (B, T, D), ops (B, c) -> (B, c, T, r);
        'pairs': h (P, N, D), ops (P,) -> (P, N, r); 'all': h (..., D) -> (k, ..., r) (ops None:
        every operator). A shared basis is applied once and broadcast over the operators."""
        hn = h.float() / self._rms(h)
        if self.basis.dim() == 2:
            z = hn @ self.basis.T
            z = z.unsqueeze(1) if shape == "rows" else z if shape == "pairs" else z.unsqueeze(0)
        else:
            basis = self.basis if ops is None else self.basis[ops]
            eq = {"rows": "btd,bcrd->bctr", "pairs": "pnd,prd->pnr", "all": "...d,krd->k...r"}[shape]
            z = torch.einsum(eq, hn, basis)
        return torch.relu(z) if self.gated is not None else z

    def scale(self, h: torch.Tensor) -> torch.Tensor | float:
        """Factor applied to a shift: rms(h) (..., 1) in residual mode, else 1."""
        return self._rms(h) if self.rms_scale else 1.0

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        """(..., r2) -> (..., out) through the shared output basis (factored mode), else as is."""
        return x if self.U is None else x @ self.U

    def _bias(self, ops: Optional[torch.Tensor], trail: int) -> torch.Tensor | float:
        """The operators' steering vectors shaped (*ops.shape or K, 1 x trail, out) (0: none)."""
        if self.bias is None:
            return 0.0
        b = self.bias if ops is None else self.bias[ops]
        return b.view(*b.shape[:-1], *([1] * trail), b.shape[-1])

    def shift(self, h: torch.Tensor, ops: torch.Tensor) -> torch.Tensor:
        """Shift of operator ``ops[p]`` on ``h[p]``: h (P, ..., D), ops (P,) -> (P, ..., out)."""
        flat = h.reshape(h.shape[0], -1, h.shape[-1])
        z = self._features(flat, "pairs", ops)                  # (P, N, r)
        out = self._out(torch.bmm(z, self.A[ops])) + self._bias(ops, 1)
        out = out.reshape(*h.shape[:-1], out.shape[-1])
        return out * self.scale(h)

    def shift_rows(self, h: torch.Tensor, ops: torch.Tensor) -> torch.Tensor:
        """Shift of each of the operators ``ops[b]`` on ``h[b]``: h (B, T, D), ops (B, c) ->
        (B, c, T, out) (how training steers an example with several operators at once)."""
        z = self._features(h, "rows", ops)                      # (B, c or 1, T, r)
        shift = self._out(torch.einsum("bctr,bcro->bcto", z.expand(-1, ops.shape[1], -1, -1),
                                       self.A[ops])) + self._bias(ops, 1)
        return shift * (self.scale(h).unsqueeze(1) if self.rms_scale else 1.0)

    def shift_all(self, h: torch.Tensor, ops: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Shift of every operator (or of ``ops``) on the same h: (..., D) -> (K, ..., out)."""
        z = self._features(h, "all", ops)                       # (K or 1, ..., r)
        A = self.A if ops is None else self.A[ops]
        if z.shape[0] == 1:
            out = self._out(torch.einsum("...r,kro->k...o", z[0], A))
        else:
            out = self._out(torch.einsum("k...r,kro->k...o", z, A))
        return (out + self._bias(ops, h.dim() - 1)) * self.scale(h)
