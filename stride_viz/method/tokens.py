"""Token-level attribution: every completion token's own proponents and opponents.

Stage 3 measures, in the same batched pass as the whole completion's responses, the K x T
matrix of per-token responses (:class:`stride_viz.method.measurement.QueryResponses`,
``token_responses``)::

    Y[k, t] = loss_base(token t) - loss_k(token t)        (nats of that token's loss)

The whole completion's response is their mean over the T tokens (the completion loss is the
mean token loss): ``responses = Y.mean(axis=1)``. Each column is then recovered by the very
same Lasso as a whole query (:class:`stride_viz.method.recovery.Recoverer`: the same path, the
same cross-validation over held-out operators, the same lambda-selection rule), so token t
gets its own sparse scores ``W[t, i]``: ``W[t, i] > 0`` means training on example i lowers the
loss of token t (a proponent of that token), in nats of that token's loss. The Lasso is not
linear, so the whole completion's scores are close to, not equal to, the mean of the tokens'.

One Recoverer serves all tokens (its folds and per-fold designs are built once per run); a
one-token completion reuses the whole completion's recovery. Cost: one recovery per token
(``benchmarks/tokens.py`` measures it).

Stored compactly in ``attributions/<query>/tokens.npz``: the (K, T) responses, the scores as
float32 CSR (T, n) (at most ``max_nonzero`` non-zeros per token), and per token the chosen
alpha, alpha/alpha_max, non-zero count, intercept and path length. An attribution folder
without the file (written before this existed, or without ``--per-token``) reads as None.

Usage::

    tok = recover_tokens(recoverer, measured.token_responses)    # (K, T) -> TokenRecovery
    tok.token_scores(0)            # (n,) float32 scores of the first completion token
    tok.top(0, 10)                 # its 10 strongest proponents (non-zero scores only)
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import scipy.sparse as sp

from stride_viz.method.recovery import Recoverer, Recovery, RecoveryError
from stride_viz.progress import Cancelled

__all__ = ["TokenRecovery", "recover_tokens", "save_tokens", "load_tokens", "first_word_token", "word_span",
           "TOKENS_FILE"]

TOKENS_FILE = "tokens.npz"


@dataclass
class TokenRecovery:
    """The sparse recovery of every completion token of one query.

    Attributes:
        token_responses: float32 (K, T), ``loss_base(t) - loss_k(t)`` in nats of token t's loss.
        scores: float32 CSR (T, n), row t = token t's scores at its chosen alpha (nats of that
            token's loss; > 0 proponent, < 0 opponent, 0 no evidence at that alpha).
        chosen_alpha: float64 (T,), the alpha chosen for each token (scikit-learn's scaling).
        chosen_ratio: float64 (T,), chosen alpha / that token's alpha_max.
        nonzeros: int64 (T,), non-zero examples of each token at its chosen alpha.
        intercept: float64 (T,), each token's intercept b (nats).
        path_points: int64 (T,), alphas computed on each token's path.
    """

    token_responses: np.ndarray
    scores: sp.csr_matrix
    chosen_alpha: np.ndarray
    chosen_ratio: np.ndarray
    nonzeros: np.ndarray
    intercept: np.ndarray
    path_points: np.ndarray

    @property
    def n_tokens(self) -> int:
        return int(self.scores.shape[0])

    def _check(self, t: int) -> int:
        if not (isinstance(t, (int, np.integer)) and 0 <= int(t) < self.n_tokens):
            raise IndexError(f"The token index must be an integer in [0, {self.n_tokens - 1}] "
                             f"(the completion has {self.n_tokens} tokens). Got {t!r} instead.")
        return int(t)

    def token_scores(self, t: int) -> np.ndarray:
        """float32 (n,): the scores of completion token ``t``."""
        t = self._check(t)
        return self.scores[t].toarray().ravel().astype(np.float32)

    def span_scores(self, span: Sequence[int]) -> np.ndarray:
        """float32 (n,): the scores of a span of completion tokens (a word split into several
        tokens): the mean of its tokens' scores, in nats of the span's mean token loss, as the
        whole completion's responses are the mean of its tokens' (the Lasso is not linear, so
        this is the mean of the tokens' recoveries, not a recovery of the mean)."""
        rows = [self._check(t) for t in span]
        if not rows:
            raise IndexError("A span needs at least one completion token.")
        return np.asarray(self.scores[rows].mean(axis=0)).ravel().astype(np.float32)

    def top(self, t: int, n: int = 10, sign: int = 1) -> np.ndarray:
        """Pool indices of token t's ``n`` strongest proponents (sign=1) or opponents (sign=-1),
        non-zero scores only (fewer than n when the Lasso kept fewer)."""
        row = self.scores[self._check(t)]
        idx, val = row.indices, sign * row.data.astype(np.float64)
        keep = val > 0
        idx, val = idx[keep], val[keep]
        order = np.lexsort((idx, -val))     # strongest first, ties by pool index
        return idx[order][:n].astype(np.int64)


def recover_tokens(recoverer: Recoverer, token_responses: np.ndarray,
                   whole: Optional[Recovery] = None,
                   responses: Optional[np.ndarray] = None,
                   should_stop: Callable[[], bool] = lambda: False) -> TokenRecovery:
    """Recover each completion token's scores with the whole query's recoverer.

    Args:
        recoverer: the run's Recoverer (same membership, RecoveryConfig and folds as the whole
            completion's recovery).
        token_responses: float (K, T) per-token responses (nats of each token's loss).
        whole, responses: the whole completion's recovery and responses (K,); when the
            completion has one token, its column equals the responses and the whole recovery is
            reused instead of being solved again.
        should_stop: asked before each token and within each token's solve (before its path
            and each fold); True stops the work (Cancelled).
    Returns:
        TokenRecovery.
    Raises:
        RecoveryError: token_responses not of shape (K, T >= 1), or not finite.
        Cancelled: should_stop() said so.
    """
    y = np.asarray(token_responses)
    if y.ndim != 2 or y.shape[0] != recoverer.k or y.shape[1] < 1:
        raise RecoveryError(f"The per-token responses must be a 2-D array of shape (K, T) = "
                            f"({recoverer.k}, number of completion tokens >= 1). Got shape {y.shape}.")
    T = y.shape[1]
    recs: list[Recovery] = []
    for t in range(T):
        if should_stop():
            raise Cancelled(f"per-token scores stopped after {t} of {T} tokens")
        col = y[:, t]
        if (whole is not None and responses is not None and T == 1
                and np.array_equal(col.astype(np.float32), np.asarray(responses, np.float32))):
            recs.append(whole)
            continue
        try:
            recs.append(recoverer.recover(col, should_stop))
        except RecoveryError as e:
            raise RecoveryError(f"Completion token {t}: {e}") from None
    rows = [sp.csr_matrix(r.scores.reshape(1, -1).astype(np.float32)) for r in recs]
    scores = sp.vstack(rows, format="csr").astype(np.float32)
    scores.eliminate_zeros()
    return TokenRecovery(
        token_responses=y.astype(np.float32), scores=scores,
        chosen_alpha=np.array([r.chosen_alpha for r in recs], np.float64),
        chosen_ratio=np.array([float(r.ratios[r.chosen_index]) for r in recs], np.float64),
        nonzeros=np.array([r.chosen_nonzeros for r in recs], np.int64),
        intercept=np.array([r.intercept for r in recs], np.float64),
        path_points=np.array([len(r.alphas) for r in recs], np.int64))


def save_tokens(tok: TokenRecovery, folder: Union[str, Path]) -> Path:
    """Write ``tokens.npz`` into folder (compressed); returns its path."""
    path = Path(folder) / TOKENS_FILE
    s = tok.scores.tocsr()
    np.savez_compressed(path, token_responses=tok.token_responses.astype(np.float32),
                        data=s.data.astype(np.float32), indices=s.indices.astype(np.int32),
                        indptr=s.indptr.astype(np.int64), n=np.int64(s.shape[1]),
                        chosen_alpha=tok.chosen_alpha, chosen_ratio=tok.chosen_ratio,
                        nonzeros=tok.nonzeros, intercept=tok.intercept, path_points=tok.path_points)
    return path


def load_tokens(folder: Union[str, Path]) -> Optional[TokenRecovery]:
    """Read what save_tokens wrote; None when the folder has no per-token data (an attribution
    made before per-token scores existed, or without ``--per-token``). A damaged file raises
    ValueError / OSError (callers wrap it into RunDamaged)."""
    path = Path(folder) / TOKENS_FILE
    if not path.is_file():
        return None
    with np.load(path) as z:
        y = z["token_responses"]
        T, n = y.shape[1], int(z["n"])
        scores = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=(T, n))
        per_token = {k: z[k] for k in ("chosen_alpha", "chosen_ratio", "nonzeros", "intercept",
                                       "path_points")}
    if any(v.shape != (T,) for v in per_token.values()):
        raise ValueError(f"inconsistent shapes (expected {T} values per token)")
    return TokenRecovery(token_responses=y, scores=scores, **per_token)


def word_span(tokens: Sequence[str], t: int) -> list[int]:
    """The tokens of the word that token ``t`` belongs to: from the token that starts it (one
    beginning with a space, or the completion's first) to the last one before the next word or
    a punctuation-only token (``[" Qu", "ess", "it", "."]``: 0 -> [0, 1, 2]; 3 -> [3])."""
    def starts(i: int) -> bool:
        return i == 0 or tokens[i][:1].isspace() or not re.search(r"[^\W_]", tokens[i]) \
            or not re.search(r"[^\W_]", tokens[i - 1])
    if not 0 <= t < len(tokens):
        raise IndexError(f"The token index must be in [0, {len(tokens) - 1}]. Got {t!r} instead.")
    first = t
    while not starts(first):
        first -= 1
    last = t
    while last + 1 < len(tokens) and not starts(last + 1):
        last += 1
    return list(range(first, last + 1))


def first_word_token(tokens: Sequence[str]) -> int:
    """Index of the first completion token holding a letter or a digit (the answer word of
    ``" Quessit."``), 0 when there is none: the token the views select first."""
    for t, text in enumerate(tokens):
        if re.search(r"[^\W_]", text):
            return t
    return 0
