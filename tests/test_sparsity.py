"""What Explore says about an explanation's sparsity (stride_viz/app/sparsity.py): known
answers on hand-made arrays, and the path-end note on a real Lasso path that stops early."""
from __future__ import annotations

import numpy as np

from stride_viz.app import sparsity
from stride_viz.config import RecoveryConfig
from stride_viz.method.recovery import Recoverer
from test_recovery import planted_problem


def test_concentration_counts_the_share_of_the_absolute_scores():
    c = sparsity.concentration(np.array([0.0, 3.0, -1.0, 0.0, 1.0]), top=1)
    assert (c.nonzero, c.top, c.total_abs, c.half) == (3, 1, 5.0, 1)
    assert np.isclose(c.top_share, 0.6)
    assert "60%" in sparsity.concentration_text(c, 5) and "concentrated" in sparsity.concentration_text(c, 5)
    spread = sparsity.concentration(np.r_[np.ones(40), -np.ones(40)], top=10)
    assert np.isclose(spread.top_share, 0.125) and spread.half == 40
    assert "spread out" in sparsity.concentration_text(spread, 100)
    few = sparsity.concentration(np.array([0.0, 0.5, -0.5]), top=10)
    assert few.top == 2 and "only 2 of the 3" in sparsity.concentration_text(few, 3)
    none = sparsity.concentration(np.zeros(4))
    assert none.nonzero == 0 and "exactly 0" in sparsity.concentration_text(none, 4)


def test_response_shift_reads_the_sign_and_the_intercept():
    s = sparsity.response_shift(np.array([-1.0, -1.0, 1.0, -3.0]), intercept=-0.9)
    assert (s.K, s.negative, s.mean) == (4, 0.75, -1.0)
    text = sparsity.shift_text(s, stability_off=True)
    assert "75%" in text and "b = -0.900 nats" in text and "stability loss" in text
    assert "Why mostly negative" not in sparsity.shift_text(sparsity.response_shift(np.ones(4), 1.0))
    assert "stability loss" not in sparsity.shift_text(s, stability_off=False)


def test_path_end_is_reported_only_when_the_chosen_lambda_is_the_last_point():
    nz, std = np.array([0, 2, 4, 6]), np.full(4, 0.01)
    falling, flat = np.array([1.0, 0.8, 0.6, 0.4]), np.array([1.0, 0.5, 0.5, 0.499])
    assert sparsity.path_end(nz, falling, std, 2, 60, 6) is None
    end = sparsity.path_end(nz, falling, std, 3, 60, 6, steps=2)
    assert (end.reason, end.nonzero, end.steps) == ("max_nonzero", 6, 2) and np.isclose(end.fall, 0.4)
    assert "still falling" in sparsity.path_end_text(end)
    levelled = sparsity.path_end(nz, flat, std, 3, 60, 6, steps=2)
    assert "levelled off" in sparsity.path_end_text(levelled)
    assert sparsity.path_end(nz, falling, std, 3, 4, 100).reason == "eps"     # the whole grid, no cap


def test_path_end_on_a_lasso_path_cut_short_by_max_nonzero():
    m, w, idx, y = planted_problem(support=10, noise=0.01)
    cfg = RecoveryConfig(max_nonzero=4)       # far fewer than the 10 planted examples
    rec = Recoverer(m, cfg).recover(y)
    assert len(rec.alphas) < cfg.path_length and rec.chosen_index == len(rec.alphas) - 1
    end = sparsity.path_end(rec.nonzeros, rec.cv_mean, rec.cv_std, rec.chosen_index, cfg.path_length, 4)
    assert end is not None and end.reason == "max_nonzero" and end.nonzero >= 4
    assert end.fall > end.std and "still falling" in sparsity.path_end_text(end)
    full = Recoverer(m, RecoveryConfig()).recover(y)   # the default bound leaves room: no note
    assert sparsity.path_end(full.nonzeros, full.cv_mean, full.cv_std, full.chosen_index, 60,
                             min(m.shape) // 2) is None
