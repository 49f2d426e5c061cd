"""The frozen Hugging Face causal LM, cut at the steering layer: blocks below the cut run once
per pool (their output is cached), blocks above run from a cached or steered hidden state.

The model's output is reproduced exactly: ``h_L`` is the final hidden state in the width of
the residual stream, and :meth:`FrozenLM.logits` applies everything the model's own forward
applies after it: a projection before the head (OPT's ``project_out``), the head, logit
scaling (Granite divides by ``logits_scaling``, Cohere multiplies by ``logit_scale``) and
final-logit soft-capping (Gemma 2/3: ``final_logit_softcapping``). Construction checks this
against ``model(...).logits`` on a few tokens and refuses a model whose output path differs.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import nn

from stride_viz.data.models import ModelError, check_causal_decoder

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


def _find_projection(base: nn.Module, d_model: int, head_in: int) -> Optional[nn.Module]:
    """The module between the last block and a head narrower or wider than the stream (OPT
    with ``word_embed_proj_dim != hidden_size``: ``decoder.project_out``), else None."""
    if head_in == d_model:
        return None
    for name, module in base.named_modules():
        if (name.rsplit(".", 1)[-1] in ("project_out", "proj_out") and isinstance(module, nn.Linear)
                and (module.in_features, module.out_features) == (d_model, head_in)):
            return module
    raise ModelError(f"The LM head of this model reads {head_in} features but its hidden states have "
                     f"{d_model}, and no output projection (project_out) links them; STRIDE cannot "
                     f"reproduce its logits.")


def _output_transform(cfg: Any) -> tuple[Optional[float], Optional[float], Optional[float]]:
    """(divide_by, multiply_by, softcap) that the model's forward applies to the head's output,
    read from the configuration attributes the transformers families use for them. A family
    that uses one of these names otherwise is caught by :meth:`FrozenLM._check_output`."""

    def number(name: str, identity: float) -> Optional[float]:
        value = getattr(cfg, name, None)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return float(value) if ok and value not in (0, identity) else None

    return (number("logits_scaling", 1.0), number("logit_scale", 1.0),
            number("final_logit_softcapping", 0.0))


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
    masks and position embeddings. Construction puts the model in eval mode, turns its
    gradients off, and refuses (ModelError) a model that is not a causal decoder or whose
    logits :meth:`logits` does not reproduce.
    """

    def __init__(self, model: nn.Module, layer: Optional[int] = None) -> None:
        check_causal_decoder(model.config)
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
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
        # the output path after h_L: projection, head, scaling, soft-cap (see the module doc)
        self.project = _find_projection(self.base, d_model, self.head.weight.shape[1])
        self.divide_by, self.multiply_by, self.softcap = _output_transform(cfg)
        self._tuple_output: Optional[bool] = None
        model.eval()  # frozen: no dropout, so the base loss is the model's own
        for p in model.parameters():
            p.requires_grad_(False)
        self._check_output()

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @torch.no_grad()
    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One base forward: (h after block ``layer`` (n, T, D), final hidden h_L (n, T, D),
        the input of the output path, see :meth:`final_hidden`)."""
        captured = {}

        def grab(_module, _inputs, output):
            self._tuple_output = isinstance(output, tuple)
            captured["h"] = output[0] if isinstance(output, tuple) else output

        handle = self.blocks[self.cut.layer - 1].register_forward_hook(grab)
        try:
            final = self.final_hidden(input_ids, attention_mask)
        finally:
            handle.remove()
        return captured["h"], final

    def final_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """h_L (n, T, D) of one pass of the base model (hooks on its blocks apply): its last
        hidden state, or the input of its output projection when it has one."""
        if self.project is None:
            return self.base(input_ids=input_ids, attention_mask=attention_mask,
                             use_cache=False).last_hidden_state
        captured = {}
        handle = self.project.register_forward_pre_hook(lambda _m, args: captured.update(h=args[0]))
        try:
            self.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            handle.remove()
        return captured["h"]

    @property
    def takes_position_ids(self) -> bool:
        """Whether the base model's forward accepts ``position_ids`` (needed to batch
        left-padded prompts; models without it derive positions from the attention mask)."""
        return "position_ids" in inspect.signature(self.base.forward).parameters

    def final_hidden_cached(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            past: Any = None, position_ids: Optional[torch.Tensor] = None
                            ) -> tuple[torch.Tensor, Any]:
        """:meth:`final_hidden` with the model's key/value cache (for generation): ``input_ids``
        are the new tokens only (the whole prompt the first time), ``attention_mask`` covers the
        whole sequence; ``position_ids`` (of the new tokens) when rows are left-padded; returns
        (h_L of the new tokens, the updated cache)."""
        captured = {}
        handle = (self.project.register_forward_pre_hook(lambda _m, args: captured.update(h=args[0]))
                  if self.project is not None else None)
        # transformers 5 calls the argument and the output `cache`, earlier versions `past_key_values`
        key = "cache" if "cache" in inspect.signature(self.base.forward).parameters else "past_key_values"
        extra = {} if position_ids is None else {"position_ids": position_ids}
        try:
            out = self.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                            **{key: past}, **extra)
        finally:
            if handle is not None:
                handle.remove()
        return (captured["h"] if handle is not None else out.last_hidden_state), out[key]

    def logits(self, final_hidden: torch.Tensor) -> torch.Tensor:
        """The model's output path from h_L: (..., D) -> (..., V) float32, equal to
        ``model(...).logits`` (projection, head, scaling and soft-cap as the model applies them)."""
        h = final_hidden.to(self.head.weight.dtype)
        return self._post(self.head(h if self.project is None else self.project(h)).float())

    def column_logits(self, final_hidden: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """The logits of the vocabulary ids ``columns`` only: (..., D) -> (..., |C|) float32,
        equal to ``logits(final_hidden)[..., columns]`` at |C| / V of the cost."""
        h = final_hidden.to(self.head.weight.dtype)
        h = h if self.project is None else self.project(h)
        bias = getattr(self.head, "bias", None)
        out = torch.nn.functional.linear(h, self.head.weight[columns],
                                         None if bias is None else bias[columns])
        return self._post(out.float())

    def _post(self, logits: torch.Tensor) -> torch.Tensor:
        """What the model's forward applies to the head's output (scaling, soft-cap)."""
        if self.divide_by is not None:
            logits = logits / self.divide_by
        if self.multiply_by is not None:
            logits = logits * self.multiply_by
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @torch.no_grad()
    def _check_output(self) -> None:
        """Refuse a model whose logits on a few tokens differ from :meth:`logits` of its h_L
        (an output path this module does not know); also records the blocks' output type."""
        ids = ((torch.arange(8) * 7 + 1) % self.cut.vocab).unsqueeze(0).to(self.device)
        att = torch.ones_like(ids)
        ours = self.logits(self.hidden(ids, att)[1])
        theirs = self.model(input_ids=ids, attention_mask=att, use_cache=False).logits.float()
        low_precision = self.head.weight.dtype in (torch.float16, torch.bfloat16)
        tol = 1e-4 + (3e-2 if low_precision else 1e-4) * float(theirs.abs().max())
        gap = float((ours - theirs).abs().max()) if ours.shape == theirs.shape else float("inf")
        if not gap <= tol:
            raise ModelError(f"STRIDE cannot reproduce the logits of this {type(self.model).__name__} "
                             f"from its hidden states (largest difference {gap:.3g}): its forward "
                             f"transforms the LM head's output in a way stride_viz does not know.")

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
            # contiguous: some blocks (Mixtral's experts) .view() their input
            replay.value = h.to(self.head.weight.dtype).contiguous()
            return self.final_hidden(input_ids, attention_mask)
