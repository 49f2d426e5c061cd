"""How sparse one explanation really is, in numbers and in plain sentences for the Explore
page: how much of the scores the top examples carry, the shift shared by all operator
responses (the intercept), and whether the chosen λ sits at the end of the computed path.

Pure functions of a query's arrays (no Streamlit, no model); every sentence states its units.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

__all__ = ["Concentration", "concentration", "concentration_text", "ResponseShift", "response_shift",
           "shift_text", "PathEnd", "path_end", "path_end_text"]


@dataclass(frozen=True)
class Concentration:
    """How the total |score| of one explanation is spread over the examples.

    nonzero: examples with a score ≠ 0; top: min(asked, nonzero); top_share: fraction of
    Σ|w| carried by the ``top`` largest |w| (nan when every score is 0); total_abs: Σ|w|
    (nats); half: the fewest examples whose |w| add up to at least half of Σ|w| (0 if none).
    """

    nonzero: int
    top: int
    top_share: float
    total_abs: float
    half: int


def concentration(scores: np.ndarray, top: int = 10) -> Concentration:
    """scores: float (n,) influence scores (nats); top: how many of the largest |w| to count."""
    a = np.sort(np.abs(np.asarray(scores, dtype=np.float64)))[::-1]
    a = a[a > 0]
    total = float(a.sum())
    if not a.size:
        return Concentration(0, 0, float("nan"), 0.0, 0)
    cum = np.cumsum(a)
    k = min(int(top), a.size)
    half = int(np.searchsorted(cum, 0.5 * total - 1e-12 * total) + 1)
    return Concentration(int(a.size), k, float(cum[k - 1] / total), total, half)


def concentration_text(c: Concentration, n: int) -> str:
    """One Markdown sentence on ``c`` for a pool of ``n`` examples."""
    if c.nonzero == 0:
        return (f"Every one of the {n} examples has a score of exactly 0 at the chosen λ: the "
                "operator responses show no difference between subsets to explain.")
    if c.nonzero <= c.top:
        return (f"**Concentration:** only {c.nonzero} of the {n} examples have a non-zero score; "
                f"together they carry Σ|w| = {c.total_abs:.3g} nats.")
    return (f"**Concentration:** the {c.top} examples with the largest |score| carry "
            f"**{100 * c.top_share:.0f}%** of Σ|w| = {c.total_abs:.3g} nats, the sum of the absolute "
            f"scores of all {c.nonzero} non-zero examples (half of it takes the top {c.half}). "
            + ("The explanation is concentrated on a few examples." if c.top_share >= 0.5 else
               "The explanation is spread out: read the top of the list as the strongest of many "
               "small effects, not as the few examples responsible."))


@dataclass(frozen=True)
class ResponseShift:
    """The K responses of one query against the Lasso's intercept (all in nats).

    K: number of operators; negative: fraction of responses < 0 (the operator raises the
    completion's loss); mean, std: mean and standard deviation of the responses; intercept: b
    of ``y ≈ b + M w``.
    """

    K: int
    negative: float
    mean: float
    std: float
    intercept: float


def response_shift(responses: np.ndarray, intercept: float) -> ResponseShift:
    """responses: float (K,) y_k = Loss_base − Loss_k (nats); intercept: b (nats)."""
    y = np.asarray(responses, dtype=np.float64)
    return ResponseShift(int(y.size), float((y < 0).mean()), float(y.mean()),
                         float(y.std()), float(intercept))


def shift_text(s: ResponseShift, stability_off: bool = True) -> str:
    """What the responses and the intercept of this query say, in Markdown. ``stability_off``:
    the run was fitted without the stability loss (the default), which would otherwise train
    every operator to leave the texts outside its subset alone."""
    text = (f"Here **{100 * s.negative:.0f}%** of the K = {s.K} responses are negative (that "
            f"operator raises the loss of this completion); their mean is {s.mean:+.3f} nats and "
            f"their standard deviation {s.std:.3f} nats.")
    if np.isfinite(s.intercept):
        text += (f" The Lasso's intercept **b = {s.intercept:+.3f} nats** is the part of every "
                 "response that does not depend on which examples the operator's subset holds: "
                 "the scores only explain how the subsets that contain an example differ from it.")
    if s.negative > 0.5:
        text += (" Why mostly negative: each operator was trained only to make *its own* subset's "
                 "texts more likely" + (" (this run's stability loss, which would also teach it to "
                                        "leave other texts alone, is off)" if stability_off else "")
                 + ". On a text that is not in its subset, that mostly moves probability away from "
                 "the text's own tokens and raises its loss; b absorbs this shift common to all "
                 "operators.")
    return text


@dataclass(frozen=True)
class PathEnd:
    """The chosen λ is the last point of the computed path.

    reason: 'max_nonzero' (the path stopped once ``max_nonzero`` examples were non-zero) or
    'eps' (it reached its smallest λ, eps·λ_max); nonzero: non-zero examples there; fall:
    how much the held-out error (nats²) fell over the last ``steps`` path points; std: the
    standard error (nats²) of the held-out error at the chosen λ.
    """

    reason: str
    nonzero: int
    max_nonzero: int
    fall: float
    steps: int
    std: float


def path_end(nonzeros: np.ndarray, cv_mean: np.ndarray, cv_std: np.ndarray, chosen_index: int,
             path_length: int, max_nonzero: int, steps: int = 5) -> Optional[PathEnd]:
    """A :class:`PathEnd` when ``chosen_index`` is the last of the L computed points, else None.

    nonzeros, cv_mean, cv_std: (L,) along the path; path_length: the λ grid asked for (L <
    path_length when the path stopped early); max_nonzero: the stopping bound.
    """
    L = len(nonzeros)
    if L < 2 or chosen_index != L - 1:
        return None
    m = min(int(steps), L - 1)
    reason = "max_nonzero" if L < path_length or int(nonzeros[-1]) >= max_nonzero else "eps"
    return PathEnd(reason, int(nonzeros[-1]), int(max_nonzero), float(cv_mean[-1 - m] - cv_mean[-1]),
                   m, float(cv_std[-1]))


def path_end_text(p: PathEnd) -> str:
    """The note shown under the sparsity path when the chosen λ is its last point."""
    if p.reason == "max_nonzero":
        head = (f"**The chosen λ is the end of the computed path.** The path stops once "
                f"{p.max_nonzero} examples are non-zero (min(K, n)/2: with K measurements, more "
                f"non-zero scores mostly fit noise); here {p.nonzero} are.")
    else:
        head = ("**The chosen λ is the smallest one computed** (eps · λ_max): the held-out error "
                "was lowest at the weakest regularisation tried.")
    if p.fall > p.std:
        tail = (f" The held-out error was still falling there (by {p.fall:.3g} nats² over the last "
                f"{p.steps} points, more than its standard error of {p.std:.3g} nats²), so a smaller "
                "λ might predict held-out operators better with even more non-zero examples: read "
                "these scores as the densest explanation computed, not as the error's minimum.")
    else:
        tail = (f" The held-out error had levelled off (it fell by {p.fall:.3g} nats² over the last "
                f"{p.steps} points, within its standard error of {p.std:.3g} nats²): going further "
                "would add examples without predicting held-out operators measurably better.")
    return head + tail
