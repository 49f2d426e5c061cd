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

import numpy as np
import torch

__all__ = ["Encoded", "encode", "token_rows", "sequence_losses", "token_losses"]


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


def token_rows(tokenizer, prompts: Sequence[str], completions: Sequence[str],
               max_length: int) -> tuple[list[list[int]], list[list[int]], list[bool]]:
    """The unpadded rows of :func:`encode`: (token ids, loss mask, cut at max_length) per pair."""
    if len(prompts) != len(completions):
        raise ValueError(f"prompts and completions must have the same length; got "
                         f"{len(prompts)} and {len(completions)}.")
    bos = getattr(tokenizer, "bos_token_id", None)
    rows, masks, cut = [], [], []
    for p, c in zip(_token_ids(tokenizer, prompts), _token_ids(tokenizer, completions)):
        head = ([bos] if bos is not None else []) + p
        ids = head + c
        # position t scores token t+1; completion tokens sit at len(head)..len(ids)-1
        first_scored = max(len(head), 1) - 1
        mask = [0] * first_scored + [1] * max(0, len(ids) - 1 - first_scored) + [0] * (len(ids) > first_scored)
        mask = mask[:len(ids)]
        was_cut = len(ids) > max_length
        if was_cut:
            ids, mask = ids[:max_length], mask[:max_length]
            mask[-1] = 0
        rows.append(ids)
        masks.append(mask)
        cut.append(was_cut)
    return rows, masks, cut


def encode(tokenizer, prompts: Sequence[str], completions: Sequence[str], max_length: int,
           device: Optional[torch.device | str] = None) -> Encoded:
    """Tokenise ``prompt + completion`` pairs; an empty prompt scores the whole text.

    The prompt is tokenised on its own and the completion after it, so the boundary between
    the two is exact even for BPE merges across it. Texts longer than ``max_length`` tokens
    are cut from the right (the completion keeps at least one scored token when possible).
    """
    rows, masks, cut = token_rows(tokenizer, prompts, completions, max_length)
    bos = getattr(tokenizer, "bos_token_id", None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (bos or 0)
    T = max(1, max(len(r) for r in rows)) if rows else 1
    n = len(rows)
    input_ids = np.full((n, T), pad, dtype=np.int64)
    loss_mask = np.zeros((n, T), dtype=np.float32)
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    for i, (r, m) in enumerate(zip(rows, masks)):
        input_ids[i, :len(r)] = r
        loss_mask[i, :len(m)] = m
    attention = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)
    enc = Encoded(torch.from_numpy(input_ids), torch.from_numpy(attention), torch.from_numpy(loss_mask),
                  torch.tensor(cut, dtype=torch.bool))
    return enc.to(device) if device is not None else enc


def _token_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text (no special tokens), in one batched call; "" -> []."""
    out: list[list[int]] = [[] for _ in texts]
    where = [i for i, text in enumerate(texts) if text]
    if where:
        ids = tokenizer([texts[i] for i in where], add_special_tokens=False)["input_ids"]
        for i, row in zip(where, ids):
            out[i] = list(row)
    return out


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
