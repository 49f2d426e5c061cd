"""Stage 3: measurement. The K operator responses of a query, and steered generation.

``y_k = Loss_base(x) - Loss_k(x)``: positive when operator k lowers the loss of the query's
completion (nats of mean per-token loss). All K responses come from one batched pass of the
blocks above the steering layer (residual mode) or of the LM head (logits mode); nothing is
retrained and no gradient is taken.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from stride_viz.method.cache import autocast
from stride_viz.method.frozen import FrozenLM
from stride_viz.method.logits import LOSS_CHUNK_ELEMENTS, lse, steered_nll, subset_nll, target_columns
from stride_viz.method.operators import LOGIT_MODES, SteeringOperators
from stride_viz.data.tokenize import Encoded, encode

__all__ = ["QueryResponses", "measure", "steered_logits", "generate", "generate_many"]


@dataclass
class QueryResponses:
    """Base loss (nats), per-token base losses of the completion, and the K responses."""

    loss_base: float
    token_loss: np.ndarray     # float32 (m,): base loss of each scored (completion) token
    token_ids: np.ndarray      # int64 (m,): the scored tokens
    responses: np.ndarray      # float32 (K,): Loss_base - Loss_k
    token_responses: Optional[np.ndarray] = None   # float32 (K, m): the same, per scored token


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(..., m, V), (m,) -> (..., m) next-token cross-entropy."""
    logp = torch.log_softmax(logits.float(), -1)
    return -logp.gather(-1, targets.expand(*logits.shape[:-1]).unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def measure(lm: FrozenLM, operators: SteeringOperators, mode: str, enc: Encoded,
            budget: int = LOSS_CHUNK_ELEMENTS, precision: str = "auto") -> list[QueryResponses]:
    """Responses of every encoded query (rows of ``enc``) to all K operators, in chunks of
    operators holding at most ``budget`` logits at once; the frozen model runs under bfloat16
    autocast on a GPU that supports it (``precision`` as in FitConfig)."""
    results = []
    K = operators.n_operators
    for q in range(len(enc)):
        L = int(enc.attention_mask[q].sum())
        ids = enc.input_ids[q:q + 1, :L].to(lm.device)
        att = enc.attention_mask[q:q + 1, :L].to(lm.device)
        where = torch.nonzero(enc.loss_mask[q, :L] > 0).squeeze(1).to(lm.device)
        if where.numel() == 0:
            raise ValueError("The query has no completion token to explain (empty completion, or "
                             "the prompt fills the whole context): shorten the prompt or give a "
                             "completion.")
        targets = ids[0, where + 1]
        with autocast(lm.device, precision):
            lower, final = lm.hidden(ids, att)
        h = final[0, where]                                                 # (m, D)
        base_full = lm.logits(h)                                            # (m, V)
        base_tok = _nll(base_full, targets)
        m = targets.numel()
        steered = torch.empty(K, m, device=lm.device)
        if mode in LOGIT_MODES:
            cols = _columns(operators, lm.cut.vocab, lm.device)
            base_c = base_full[:, cols]                                     # (m, |C|)
            outside = base_full.clone()
            outside[:, cols] = float("-inf")
            rest = torch.logsumexp(outside, -1) if cols.numel() < lm.cut.vocab else None
            col = target_columns(targets, cols, lm.cut.vocab)
            base_t = base_full.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            # the base loss through the same arithmetic as the steered ones (equal to the
            # model's own up to float rounding), so that a zero operator responds exactly 0
            base_tok = steered_nll(base_c, None, rest, base_t, col)
            op_cols = operators.op_columns
            if op_cols is not None:       # vocabulary 'subset': each operator its own columns
                lse_base = lse(base_c, rest)
                lp_c = base_c - lse_base.unsqueeze(-1)                      # (m, |C|)
                lp_t = base_t - lse_base
                # through the same arithmetic as the steered losses (a zero operator: exactly 0)
                base_tok = -lp_t
            chunk = max(1, budget // max(1, m * operators.out_dim))
        else:
            chunk = max(1, budget // max(1, L * lm.cut.vocab))
        for start in range(0, K, chunk):
            ops = torch.arange(start, min(K, start + chunk), device=lm.device)
            if mode in LOGIT_MODES and op_cols is not None:
                shift = operators.shift_all(h, ops)                         # (c, m, W)
                cols = op_cols[ops]                                         # (c, W)
                lp = lp_c[:, cols.clamp_min(0)].permute(1, 0, 2)            # (c, m, W)
                lp = lp.masked_fill((cols < 0).unsqueeze(1), float("-inf"))
                is_t = (cols.unsqueeze(1) == col[None, :, None]) & (col[None, :, None] >= 0)
                steered[ops] = subset_nll(lp, shift, lp_t, is_t)
            elif mode in LOGIT_MODES:
                shift = operators.shift_all(h, ops)                         # (c, m, |C|)
                steered[ops] = steered_nll(base_c, shift, rest, base_t, col)
            else:
                hs = lower + operators.shift_all(lower[0], ops)              # (c, L, D)
                c = ops.numel()
                with autocast(lm.device, precision):
                    out = lm.upper_hidden(hs, ids.expand(c, -1), att.expand(c, -1))
                steered[ops] = _nll(lm.logits(out[:, where]), targets)
        loss_base = base_tok.mean()
        results.append(QueryResponses(
            loss_base=float(loss_base), token_loss=base_tok.float().cpu().numpy(),
            token_ids=targets.cpu().numpy(),
            responses=(loss_base - steered.mean(-1)).float().cpu().numpy(),
            token_responses=(base_tok.unsqueeze(0) - steered).float().cpu().numpy()))
    return results


def _row_shift(operators: SteeringOperators, h: torch.Tensor, ops: torch.Tensor) -> torch.Tensor:
    """Shift of operator ``ops[b]`` on row b of h (B, T, D); rows with ops < 0 get exactly 0."""
    shift = operators.shift(h, ops.clamp_min(0))
    return shift * (ops >= 0).view(-1, *([1] * (shift.dim() - 1))).to(shift.dtype)


@contextlib.contextmanager
def _residual_hook(lm: FrozenLM, operators: SteeringOperators, ops: torch.Tensor) -> Iterator[None]:
    """Add operator ``ops[b]``'s shift to row b of the steering block's output."""

    def hook(_module, _inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        h = (h + _row_shift(operators, h, ops).to(h.dtype)).contiguous()  # Mixtral .view()s it
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

    handle = lm.blocks[lm.cut.layer - 1].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def steered_logits(lm: FrozenLM, operators: Optional[SteeringOperators], mode: str,
                   ids: torch.Tensor, att: torch.Tensor, ops: torch.Tensor) -> torch.Tensor:
    """Full forward with row b steered by operator ``ops[b]`` (-1: the base model): (B, T, V)."""
    return _steered_forward(lm, operators, mode, ids, att, ops)[0]


def _steered_forward(lm: FrozenLM, operators: Optional[SteeringOperators], mode: str,
                     ids: torch.Tensor, att: torch.Tensor, ops: torch.Tensor,
                     past: Any = None, cached: bool = False, position_ids: Optional[torch.Tensor] = None,
                     last_only: bool = False) -> tuple[torch.Tensor, Any]:
    """(logits (B, T, V) of ``ids``, the key/value cache when ``cached``): row b steered by
    operator ``ops[b]``; with ``cached``, ``ids`` are the tokens after those in ``past`` and
    ``position_ids`` their positions (left-padded rows); ``last_only``: the logits of the
    last position only, (B, 1, V) (what greedy generation reads)."""
    steer = operators is not None and bool((ops >= 0).any())

    def forward():
        if cached:
            final, past_out = lm.final_hidden_cached(ids, att, past, position_ids)
        else:
            final, past_out = lm.final_hidden(ids, att), None
        return (final[:, -1:] if last_only else final), past_out

    if steer and mode == "residual":
        with _residual_hook(lm, operators, ops):
            final, past = forward()
        return lm.logits(final), past
    final, past = forward()
    logits = lm.logits(final)
    if not steer:
        return logits, past
    shift = _row_shift(operators, final, ops)                               # (B, T, out)
    columns = _columns(operators, logits.shape[-1], logits.device)
    if operators.op_columns is None:
        logits[..., columns] += shift
        return logits, past
    for b, k in enumerate(ops.tolist()):      # vocabulary 'subset': row b's operator's columns
        if k >= 0:
            cols = operators.op_columns[k]
            keep = cols >= 0
            logits[b][..., columns[cols[keep]]] += shift[b][..., keep]
    return logits, past


def _columns(operators: SteeringOperators, vocab: int, device: torch.device) -> torch.Tensor:
    """The vocabulary ids a logits-space operator shifts (all of them when it names none)."""
    return operators.columns if operators.columns is not None else torch.arange(vocab, device=device)


@torch.no_grad()
def generate(lm: FrozenLM, tokenizer, prompt: str, max_new_tokens: int = 32,
             operators: Optional[SteeringOperators] = None, mode: str = "logits",
             ks: Sequence[Optional[int]] = (None,), max_length: int = 1024) -> list[str]:
    """Greedy continuations of ``prompt``, one per entry of ``ks``: the base model (None) or
    the model steered by operator k, all in one batch; each stops at the end-of-text token.
    Returns the new text only."""
    return generate_many(lm, tokenizer, [(prompt, ks)], max_new_tokens, operators, mode, max_length)[0]


@torch.no_grad()
def generate_many(lm: FrozenLM, tokenizer, requests: Sequence[tuple[str, Sequence[Optional[int]]]],
                  max_new_tokens: int = 32, operators: Optional[SteeringOperators] = None,
                  mode: str = "logits", max_length: int = 1024) -> list[list[str]]:
    """:func:`generate` for several prompts at once: ``requests`` is a list of (prompt, ks);
    returns, per request, one continuation per entry of its ks. All rows step together in one
    batch, with the shorter prompts left-padded (masked, their positions counted from their
    first real token), so a model reads each row as it would alone: one pass per new token
    for all prompts instead of one per prompt. A model whose forward takes no
    ``position_ids`` is run one prompt at a time."""
    if len(requests) > 1 and not lm.takes_position_ids:
        return [generate_many(lm, tokenizer, [r], max_new_tokens, operators, mode, max_length)[0]
                for r in requests]
    prompts = []
    for prompt, _ks in requests:
        enc = encode(tokenizer, [prompt], [""], max_length=max_length)
        prompts.append(enc.input_ids[0, :int(enc.attention_mask[0].sum())])
    rows = [(i, k) for i, (_p, ks) in enumerate(requests) for k in ks]
    if not rows:
        return [[] for _ in requests]
    L = max(len(p) for p in prompts)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = 0 if pad is None else int(pad)
    B = len(rows)
    ids = torch.full((B, L), pad, dtype=torch.long)
    att = torch.zeros((B, L), dtype=torch.long)
    for b, (i, _k) in enumerate(rows):              # left padding: every row ends at column L - 1
        ids[b, L - len(prompts[i]):] = prompts[i]
        att[b, L - len(prompts[i]):] = 1
    ids, att = ids.to(lm.device), att.to(lm.device)
    padded = bool((att == 0).any())
    positions = (att.cumsum(1) - 1).clamp(min=0) if padded else None
    ops = torch.tensor([-1 if k is None else int(k) for _i, k in rows], device=lm.device)
    eos = getattr(tokenizer, "eos_token_id", None)
    n_pos = getattr(lm.model.config, "n_positions", None) or getattr(
        lm.model.config, "max_position_embeddings", None) or 1024
    lengths = att.sum(1)                            # real tokens per row, prompt + generated
    new = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool)
    past, step_ids = None, ids          # the model's key/value cache: each step feeds one token
    for _ in range(max_new_tokens):
        if int(lengths.max()) >= n_pos or bool(done.all()):
            break
        logits, past = _steered_forward(lm, operators, mode, step_ids, att, ops, past, cached=True,
                                        position_ids=positions, last_only=True)
        nxt = logits[:, -1].argmax(-1)
        for b in range(B):
            if done[b]:
                continue
            if eos is not None and int(nxt[b]) == eos:
                done[b] = True
            else:
                new[b].append(int(nxt[b]))
        att = torch.cat([att, torch.ones_like(att[:, :1])], dim=1)
        if positions is not None:
            positions = positions[:, -1:] + 1
        lengths = lengths + 1
        step_ids = nxt.unsqueeze(1)
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in new]
    out: list[list[str]] = [[] for _ in requests]
    for (i, _k), text in zip(rows, texts):
        out[i].append(text)
    return out
