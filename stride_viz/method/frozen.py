"""The frozen Hugging Face causal LM, cut at the steering layer: blocks below the cut run once
per pool (their output is cached), blocks above run from a cached or steered hidden state.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

__all__ = ["FrozenLM", "ModelCut"]


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
