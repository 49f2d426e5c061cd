"""Turn prompt/completion pairs into padded token tensors with a loss mask.

The loss of an example is the mean next-token cross-entropy over its completion tokens
(over the whole text when the prompt is empty). ``loss_mask[i, t] = 1`` marks the positions
``t`` whose *next* token ``input_ids[i, t + 1]`` is scored, so that

    logits[:, :-1] predicts input_ids[:, 1:] and loss_mask[:, :-1] weights it.

A BOS token is prepended when the tokenizer has one, so the first word of a document is
predicted too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

__all__ = ["Encoded", "encode", "sequence_losses", "token_losses"]


@dataclass
class Encoded:
    """input_ids, attention_mask, loss_mask: tensors of shape (n, T), right-padded."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    truncated: torch.Tensor  # bool (n,): the text was cut at max_length

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> "Encoded":
        return Encoded(self.input_ids.to(device), self.attention_mask.to(device),
                       self.loss_mask.to(device), self.truncated.to(device))

    def select(self, index: torch.Tensor | Sequence[int]) -> "Encoded":
        index = torch.as_tensor(index, dtype=torch.long, device=self.input_ids.device)
        return Encoded(self.input_ids[index], self.attention_mask[index], self.loss_mask[index],
                       self.truncated[index.cpu()] if self.truncated.device.type == "cpu" else self.truncated[index])


def encode(tokenizer, prompts: Sequence[str], completions: Sequence[str], max_length: int,
           device: Optional[torch.device | str] = None) -> Encoded:
    """Tokenise ``prompt + completion`` pairs; an empty prompt scores the whole text.

    The prompt is tokenised on its own and the completion after it, so the boundary between
    the two is exact even for BPE merges across it. Texts longer than ``max_length`` tokens
    are cut from the right (the completion keeps at least one scored token when possible).
    """
    if len(prompts) != len(completions):
        raise ValueError(f"prompts and completions must have the same length; got "
                         f"{len(prompts)} and {len(completions)}.")
    bos = getattr(tokenizer, "bos_token_id", None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (bos or 0)
    rows, masks, cut = [], [], []
    for prompt, completion in zip(prompts, completions):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] if completion else []
        head = ([bos] if bos is not None else []) + list(p)
        ids = head + list(c)
        # position t scores token t+1; completion tokens sit at len(head)..len(ids)-1
        first_scored = max(len(head), 1) - 1
        mask = [0] * len(ids)
        for t in range(first_scored, len(ids) - 1):
            mask[t] = 1
        was_cut = len(ids) > max_length
        if was_cut:
            ids, mask = ids[:max_length], mask[:max_length]
            mask[-1] = 0
        rows.append(ids)
        masks.append(mask)
        cut.append(was_cut)
    T = max(1, max(len(r) for r in rows)) if rows else 1
    n = len(rows)
    input_ids = torch.full((n, T), pad, dtype=torch.long)
    attention = torch.zeros((n, T), dtype=torch.long)
    loss_mask = torch.zeros((n, T), dtype=torch.float32)
    for i, (r, m) in enumerate(zip(rows, masks)):
        input_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        attention[i, :len(r)] = 1
        loss_mask[i, :len(m)] = torch.tensor(m, dtype=torch.float32)
    enc = Encoded(input_ids, attention, loss_mask, torch.tensor(cut, dtype=torch.bool))
    return enc.to(device) if device is not None else enc


def token_losses(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy at every position: (..., T, V), (..., T) -> (..., T) with the
    last position 0 (nothing follows it)."""
    logp = torch.log_softmax(logits[..., :-1, :].float(), dim=-1)
    nll = -logp.gather(-1, input_ids[..., 1:].unsqueeze(-1)).squeeze(-1)
    return torch.nn.functional.pad(nll, (0, 1))


def sequence_losses(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over the scored positions of each row: (..., T, V) -> (...,)."""
    nll = token_losses(logits, input_ids)
    return (nll * loss_mask).sum(-1) / loss_mask.sum(-1).clamp_min(1.0)
