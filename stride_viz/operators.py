"""Stage 2, the model side: steering operators and the frozen model cut at the steering layer.

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

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

__all__ = ["SteeringOperators", "FrozenLM", "ModelCut"]


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


class _Replay(nn.Module):
    """Stands in for the first transformer block: returns the cached hidden state after block
    ``layer`` (plus the steering shift) instead of computing blocks 1..layer again."""

    def __init__(self, tuple_output: bool) -> None:
        super().__init__()
        self.value: Optional[torch.Tensor] = None
        self.tuple_output = tuple_output

    def forward(self, *args, **kwargs):  # noqa: D401 - mimics a decoder block
        return (self.value,) if self.tuple_output else self.value


class _PassThrough(nn.Module):
    def __init__(self, tuple_output: bool) -> None:
        super().__init__()
        self.tuple_output = tuple_output

    def forward(self, *args, **kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        return (h,) if self.tuple_output else h


def _find_blocks(model: nn.Module, n_layers: int) -> nn.ModuleList:
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise ValueError("Could not find the transformer blocks of this model (no ModuleList with "
                     f"{n_layers} entries); STRIDE needs a standard decoder-only stack.")


@dataclass
class ModelCut:
    """Where the operators act: ``layer`` blocks below the cut (1-based), ``n_layers`` in all."""

    layer: int
    n_layers: int
    d_model: int
    vocab: int


class FrozenLM:
    """A frozen Hugging Face causal LM, viewed as 'blocks below the cut' and 'blocks above'.

    ``upper_hidden`` runs the blocks above the cut from a cached hidden state by swapping the
    blocks below for a replay module for the duration of the call, so any decoder-only stack
    whose blocks live in one ModuleList works (GPT-2, Llama, Qwen, ...), with the model's own
    masks and position embeddings.
    """

    def __init__(self, model: nn.Module, layer: Optional[int] = None) -> None:
        cfg = model.config
        n_layers = int(getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer"))
        if layer is None:
            layer = max(1, min(n_layers, round(0.6 * n_layers)))
        if not 1 <= layer <= n_layers:
            raise ValueError(f"The 'layer' parameter must be in [1, {n_layers}] for this "
                             f"{n_layers}-block model. Got {layer} instead.")
        self.model = model
        self.base = model.base_model
        self.head = model.get_output_embeddings()
        self.blocks = _find_blocks(self.base, n_layers)
        d_model = int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd"))
        self.cut = ModelCut(layer, n_layers, d_model, self.head.weight.shape[0])
        self._tuple_output: Optional[bool] = None
        for p in model.parameters():
            p.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @torch.no_grad()
    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One base forward: (h after block ``layer`` (n, T, D), final hidden h_L (n, T, D))."""
        captured = {}

        def grab(_module, _inputs, output):
            self._tuple_output = isinstance(output, tuple)
            captured["h"] = output[0] if isinstance(output, tuple) else output

        handle = self.blocks[self.cut.layer - 1].register_forward_hook(grab)
        try:
            out = self.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            handle.remove()
        return captured["h"], out.last_hidden_state

    def logits(self, final_hidden: torch.Tensor) -> torch.Tensor:
        """The LM head: (..., D) -> (..., V) float32."""
        return self.head(final_hidden.to(self.head.weight.dtype)).float()

    @contextlib.contextmanager
    def _replaying(self) -> Iterator[_Replay]:
        if self._tuple_output is None:
            raise RuntimeError("call hidden() once before upper_hidden()")
        replay = _Replay(self._tuple_output)
        saved = [self.blocks[i] for i in range(self.cut.layer)]
        self.blocks[0] = replay
        for i in range(1, self.cut.layer):
            self.blocks[i] = _PassThrough(self._tuple_output)
        try:
            yield replay
        finally:
            for i, block in enumerate(saved):
                self.blocks[i] = block

    def upper_hidden(self, h: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden state h_L from a (steered) hidden state after block ``layer``.

        h: (P, T, D); input_ids, attention_mask: (P, T) (used for masks and positions only).
        Gradients flow into ``h`` (the model's own weights stay frozen).
        """
        with self._replaying() as replay:
            replay.value = h.to(self.head.weight.dtype)
            out = self.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state
