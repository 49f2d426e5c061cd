"""How sure is a difference in LDS? Paired bootstrap intervals, the Wilcoxon test, query groups.

Everything compares two methods on the same queries and the same retrained subsets
(``a - b``; in the benchmark ``b`` is STRIDE), so the comparison is paired twice over:

- over queries: the queries are a sample of what users ask. ``bootstrap_queries`` resamples
  the per-query LDS differences with replacement and takes the mean of each resample;
- over retrained subsets: the M' retrained models are a sample of the subsets one could have
  retrained on. ``bootstrap_subsets`` resamples the subsets (columns) with replacement and
  recomputes every query's Spearman rho for both methods on that resample, then the mean
  difference over queries (``resampled_spearman`` does this from the multiplicity of each
  subset in the resample, without writing the resample out);
- ``wilcoxon_p``: the two-sided Wilcoxon signed-rank test of the per-query differences
  (scipy's ``method="auto"``: exact for at most 50 non-zero differences without ties, else
  the normal approximation; zero differences dropped; 1.0 when every difference is zero).

Intervals are percentile intervals (``level``, default 95%) of ``n_boot`` resamples drawn
from ``numpy.random.default_rng(seed)``: the same inputs give the same interval.

``noise_ceiling``: the LDS the retrained losses of one training seed reach as predictions of
another seed's on the same subsets: the scale of training noise (a reference, not a hard limit;
see its docstring).

``development_mask`` reads the fixed development/test split of a ground truth's metadata.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import numpy as np
from scipy.stats import rankdata, wilcoxon

__all__ = ["spearman_rows", "resampled_spearman", "percentile_interval", "bootstrap_queries",
           "bootstrap_subsets", "wilcoxon_p", "paired_comparison", "mean_summary", "development_mask", "split_metadata",
           "noise_ceiling", "SPLIT_RULE"]

N_BOOT = 2000
LEVEL = 0.95
SPLIT_RULE = ("stride_viz.evaluation.metrics.query_split(query ids): the first 8 hex digits of "
              "sha256(salt + id) even -> development; every setting is chosen on the development "
              "queries, results are reported on the test queries")


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rho of ``a[..., :]`` vs ``b[..., :]`` along the last axis (average ranks for
    ties); a row with a constant side gives 0, as in ``metrics.lds``. a, b: (..., m) of one
    shape, at least 2-D. Returns float64 of shape a.shape[:-1]."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"spearman_rows needs two arrays of one shape, at least 2-D; got {a.shape} "
                         f"and {b.shape}.")
    ra, rb = rankdata(a, axis=-1), rankdata(b, axis=-1)
    ra -= ra.mean(axis=-1, keepdims=True)
    rb -= rb.mean(axis=-1, keepdims=True)
    den = np.sqrt((ra ** 2).sum(axis=-1) * (rb ** 2).sum(axis=-1))
    num = (ra * rb).sum(axis=-1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def _resampled_ranks(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Average ranks of the values ``x`` (m,) in resamples that hold column j ``w[b, j]``
    times: rank = (copies of smaller values) + (copies of equal values + 1) / 2, as
    ``rankdata`` gives on the resample written out. w: (B, m). Returns (B, m)."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    ws = w[:, order]
    cum = np.cumsum(ws, axis=1)
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])        # first column of each tie group
    ends = np.r_[starts[1:], xs.size] - 1
    below = cum[:, starts] - ws[:, starts]                          # copies of smaller values
    total = cum[:, ends] - below                                    # copies of this value
    group = np.repeat(np.arange(starts.size), np.diff(np.r_[starts, xs.size]))
    ranks = np.empty_like(ws)
    ranks[:, order] = (below + (total + 1) / 2)[:, group]
    return ranks


def resampled_spearman(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Spearman rho of ``a[q]`` vs ``b[q]`` on resamples of the columns, without writing them
    out: resample k holds column j ``w[k, j]`` times (a bootstrap draw of the retrained
    subsets). Equal to ``spearman_rows(a[:, cols], b[:, cols])`` for the drawn ``cols``
    (average ranks for ties; a constant side gives 0). a, b: (n, m); w: (B, m). Returns (n, B)."""
    a, b, w = (np.asarray(v, dtype=np.float64) for v in (a, b, w))
    if a.shape != b.shape or a.ndim != 2 or w.ndim != 2 or w.shape[1] != a.shape[1]:
        raise ValueError(f"resampled_spearman needs a, b of one shape (n, m) and w (B, m); got "
                         f"{a.shape}, {b.shape} and {w.shape}.")
    total = w.sum(axis=1, keepdims=True)
    out = np.empty((a.shape[0], w.shape[0]))
    for q in range(a.shape[0]):
        ra, rb = _resampled_ranks(a[q], w), _resampled_ranks(b[q], w)
        ra -= (w * ra).sum(axis=1, keepdims=True) / total
        rb -= (w * rb).sum(axis=1, keepdims=True) / total
        den = np.sqrt((w * ra ** 2).sum(axis=1) * (w * rb ** 2).sum(axis=1))
        num = (w * ra * rb).sum(axis=1)
        out[q] = np.where(den > 1e-12 * total[:, 0] ** 3, num / np.where(den > 0, den, 1.0), 0.0)
    return out


def percentile_interval(samples: Sequence[float], level: float = LEVEL) -> list[float]:
    """[low, high]: the (1 - level)/2 and (1 + level)/2 quantiles of ``samples``."""
    if not 0 < level < 1:
        raise ValueError(f"The 'level' parameter must be in (0, 1). Got {level!r} instead.")
    s = np.asarray(samples, dtype=np.float64)
    return [float(np.quantile(s, (1 - level) / 2)), float(np.quantile(s, (1 + level) / 2))]


def _check_boot(n_boot: int) -> None:
    if n_boot < 1:
        raise ValueError(f"The 'n_boot' parameter must be >= 1. Got {n_boot!r} instead.")


def bootstrap_queries(values: Sequence[float], n_boot: int = N_BOOT, seed: int = 0,
                      level: float = LEVEL) -> dict:
    """Mean of ``values`` (one per query, e.g. per-query LDS differences) and its bootstrap
    interval over queries: {"mean", "low", "high"}."""
    _check_boot(n_boot)
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"The 'values' parameter must be a non-empty 1-D array. Got shape {v.shape}.")
    idx = np.random.default_rng(seed).integers(0, v.size, size=(n_boot, v.size))
    low, high = percentile_interval(v[idx].mean(axis=1), level)
    return {"mean": float(v.mean()), "low": low, "high": high}


def bootstrap_subsets(pred_a: np.ndarray, target: np.ndarray, pred_b: Optional[np.ndarray] = None,
                      n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> dict:
    """Mean over queries of rho(pred_a, target) - rho(pred_b, target) (or of rho(pred_a,
    target) alone when ``pred_b`` is None) and its bootstrap interval over retrained subsets:
    each resample draws M' subsets with replacement and recomputes every query's Spearman rho.

    pred_a, pred_b: (n_queries, M'), a method's predicted effect of each subset (its subset
    sums); target: (n_queries, M'), minus each query's loss under each retrained model.
    Returns {"mean", "low", "high"}."""
    _check_boot(n_boot)
    pred_a, target = np.asarray(pred_a, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if pred_a.shape != target.shape or pred_a.ndim != 2:
        raise ValueError(f"pred_a and target must be 2-D of one shape (n_queries, M'); got "
                         f"{pred_a.shape} and {target.shape}.")
    if pred_b is not None:
        pred_b = np.asarray(pred_b, dtype=np.float64)
        if pred_b.shape != target.shape:
            raise ValueError(f"pred_b must have shape {target.shape}; got {pred_b.shape}.")

    m = target.shape[1]
    idx = np.random.default_rng(seed).integers(0, m, size=(n_boot, m))
    counts = np.zeros((n_boot, m))
    np.add.at(counts, (np.arange(n_boot)[:, None], idx), 1.0)     # how often each subset is drawn

    def stat(w: np.ndarray) -> np.ndarray:
        """w: (B, M') multiplicities of B resamples -> (B,) mean difference over queries."""
        d = resampled_spearman(pred_a, target, w)                    # (n_queries, B)
        if pred_b is not None:
            d = d - resampled_spearman(pred_b, target, w)
        return d.mean(axis=0)

    samples = stat(counts)
    low, high = percentile_interval(samples, level)
    return {"mean": float(stat(np.ones((1, m)))[0]), "low": low, "high": high}


def wilcoxon_p(differences: Sequence[float]) -> float:
    """Two-sided p-value of the Wilcoxon signed-rank test that the differences are centred on
    0 (zeros dropped; 1.0 when all are zero; NaN when there are none)."""
    d = np.asarray(differences, dtype=np.float64)
    if d.size == 0:
        return math.nan
    d = d[d != 0]
    if d.size == 0:
        return 1.0
    return float(wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)


def mean_summary(per_query: Sequence[float], pred: np.ndarray, target: np.ndarray,
                 n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> dict:
    """One method's mean LDS with both intervals: {"mean", "n_queries", "ci_queries": [low,
    high], "ci_subsets": [low, high]} (pred, target: (n_queries, M') as in bootstrap_subsets)."""
    q = bootstrap_queries(per_query, n_boot, seed, level)
    s = bootstrap_subsets(pred, target, None, n_boot, seed, level)
    return {"mean": q["mean"], "n_queries": int(np.size(per_query)),
            "ci_queries": [q["low"], q["high"]], "ci_subsets": [s["low"], s["high"]]}


def paired_comparison(pred_a: np.ndarray, pred_b: np.ndarray, target: np.ndarray,
                      groups: Optional[Mapping[str, np.ndarray]] = None, n_boot: int = N_BOOT,
                      seed: int = 0, level: float = LEVEL) -> dict:
    """Method a minus method b on the same queries and subsets.

    pred_a, pred_b, target: (n_queries, M') as in ``bootstrap_subsets``; groups: name -> bool
    (n_queries,) (e.g. "facts", "heldout"). Returns {"mean_difference" (mean over queries of
    LDS_a - LDS_b), "ci_queries", "ci_subsets" ([low, high]), "wilcoxon_p", "n_queries",
    "a_better", "b_better" (queries where a's LDS is higher / lower), "groups": {name: the same
    keys on that group's queries}} (a group with no query is left out)."""
    pred_a, pred_b = np.asarray(pred_a, dtype=np.float64), np.asarray(pred_b, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)

    def one(rows: np.ndarray) -> dict:
        d = spearman_rows(pred_a[rows], target[rows]) - spearman_rows(pred_b[rows], target[rows])
        q = bootstrap_queries(d, n_boot, seed, level)
        s = bootstrap_subsets(pred_a[rows], target[rows], pred_b[rows], n_boot, seed, level)
        return {"mean_difference": q["mean"], "ci_queries": [q["low"], q["high"]],
                "ci_subsets": [s["low"], s["high"]], "wilcoxon_p": wilcoxon_p(d),
                "n_queries": int(rows.size), "a_better": int((d > 0).sum()), "b_better": int((d < 0).sum())}

    out = one(np.arange(target.shape[0]))
    out["groups"] = {}
    for name, mask in (groups or {}).items():
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (target.shape[0],):
            raise ValueError(f"Group {name!r} must be a bool mask of shape ({target.shape[0]},); "
                             f"got {mask.shape}.")
        if mask.all():  # the group is every query: the same numbers
            out["groups"][name] = {k: v for k, v in out.items() if k != "groups"}
        elif mask.any():
            out["groups"][name] = one(np.flatnonzero(mask))
    return out


def split_metadata(query_ids: Sequence[str]) -> dict:
    """The "split" entry of a ground truth's metadata: the rule and which ids fall on each
    side (written once, when the ground truth is prepared)."""
    from stride_viz.evaluation.metrics import query_split

    dev = query_split(query_ids)
    return {"rule": SPLIT_RULE, "development": [q for q, d in zip(query_ids, dev) if d],
            "test": [q for q, d in zip(query_ids, dev) if not d]}


def development_mask(metadata: dict) -> np.ndarray:
    """bool (n_queries,), True = development query, from the ground truth's metadata: its
    fixed "split" entry where it has one, else ``metrics.query_split`` of the query ids (the
    same rule; ground truths prepared before the split was recorded)."""
    from stride_viz.evaluation.metrics import GroundTruthError, query_split

    ids = [q["id"] for q in metadata["queries"]]
    split = metadata.get("split")
    if not split:
        return query_split(ids)
    dev, test = set(split.get("development", [])), set(split.get("test", []))
    missing = [q for q in ids if (q in dev) == (q in test)]
    if missing:
        raise GroundTruthError(f"The ground truth's split names query {missing[0]!r} on neither or "
                               f"both sides; every query must be on exactly one side.")
    return np.array([q in dev for q in ids], dtype=bool)


def noise_ceiling(losses: Sequence[np.ndarray]) -> np.ndarray:
    """The scale of training noise in LDS units: per query, the Spearman rho over the subsets
    between the losses of models trained with one seed and those of models trained on the same
    subsets with another seed, averaged over every pair of seeds. It is what a method that
    reproduced one retrained model exactly would score. A method's prediction is a fixed
    function of the subset, so it cannot track the part of the retrained loss that changes with
    the seed alone; but a method that predicted the loss averaged over seeds would score more
    than this (with independent additive noise, about its square root), so read it as a
    reference, not as a hard limit.

    losses: >= 2 arrays of shape (k, n_queries), one per seed, rows = the same k subsets in
    the same order. Returns float64 (n_queries,)."""
    arrs = [np.asarray(x, dtype=np.float64) for x in losses]
    if len(arrs) < 2 or any(a.shape != arrs[0].shape for a in arrs) or arrs[0].ndim != 2 \
            or arrs[0].shape[0] < 3:
        raise ValueError(f"noise_ceiling needs >= 2 arrays of one shape (k >= 3 subsets, n_queries); "
                         f"got shapes {[a.shape for a in arrs]}.")
    pairs = [(i, j) for i in range(len(arrs)) for j in range(i + 1, len(arrs))]
    return np.mean([spearman_rows(arrs[i].T, arrs[j].T) for i, j in pairs], axis=0)
