"""Stage 1: the subset design (measurement matrix).

Every training example is put into exactly ``d`` distinct subsets out of ``K``, chosen
uniformly at random: a left-d-regular bipartite graph, an expander with high probability,
which is what makes a sparse influence vector recoverable from the K responses.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["design_subsets", "members_of", "subsets_of"]


def design_subsets(n: int, subsets: int, per_example: int, seed: int) -> sp.csr_matrix:
    """Membership matrix M: int8 CSR of shape (subsets, n), M[k, i] = 1 iff example i is in A_k.

    Each column has exactly ``per_example`` ones at distinct rows. Rows are balanced by
    drawing the columns' subsets from a shuffled round-robin order, so every subset holds
    ``n * d / K`` examples give or take one (plain uniform draws leave some subsets with
    half the average and the operators of those learn little).
    """
    if n < 1:
        raise ValueError(f"The pool must hold at least 1 example. Got n={n}.")
    if not 1 <= per_example <= subsets:
        raise ValueError(f"'per_example' must be in [1, subsets={subsets}]. Got {per_example}.")
    if n * per_example < subsets:
        raise ValueError(
            f"A pool of {n} examples, each in {per_example} subsets, cannot fill {subsets} "
            f"subsets (needs n x per_example >= subsets, i.e. at least "
            f"{-(-subsets // per_example)} examples). Use fewer subsets (--subsets) or a larger pool.")
    rng = np.random.default_rng(seed)
    rows = np.empty((n, per_example), dtype=np.int64)
    # A stream of subset labels in which every label appears equally often; each example takes
    # the next d distinct labels, pushing repeats back into the stream.
    stream: list[int] = []
    for i in range(n):
        chosen: list[int] = []
        deferred: list[int] = []
        while len(chosen) < per_example:
            if not stream:
                stream = list(rng.permutation(subsets))
            k = stream.pop()
            if k in chosen:
                deferred.append(k)
            else:
                chosen.append(k)
        stream.extend(deferred)
        rows[i] = chosen
    cols = np.repeat(np.arange(n), per_example)
    data = np.ones(n * per_example, dtype=np.int8)
    M = sp.csr_matrix((data, (rows.reshape(-1), cols)), shape=(subsets, n), dtype=np.int8)
    M.sort_indices()
    return M


def members_of(M: sp.csr_matrix, k: int) -> np.ndarray:
    """Pool indices of subset k: int array."""
    return M.indices[M.indptr[k]:M.indptr[k + 1]].copy()


def subsets_of(M: sp.csr_matrix) -> np.ndarray:
    """For every example, the indices of its subsets: int64 array of shape (n, d)."""
    csc = M.tocsc()
    csc.sort_indices()
    d = np.diff(csc.indptr)
    if d.min() != d.max():
        raise ValueError("The membership matrix is not left-regular (examples sit in different "
                         "numbers of subsets).")
    return csc.indices.reshape(M.shape[1], int(d[0])).astype(np.int64)
