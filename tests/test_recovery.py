"""Tests of stage 4 (stride_viz/method/recovery.py): tiny planted problems with known answers.

Run: .venv/bin/python -m pytest tests/test_recovery.py -q
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.linear_model import Lasso

from stride_viz.config import RecoveryConfig
from stride_viz.method.recovery import (Recoverer, RecoveryError, backproject, load_recovery,
                                 save_recovery)


def planted_design(k: int, n: int, d: int, rng: np.random.Generator) -> sp.csr_matrix:
    """Left-d-regular 0/1 membership (k, n): every example in exactly d distinct subsets."""
    rows = np.argsort(rng.random((n, k)), axis=1)[:, :d]
    cols = np.repeat(np.arange(n), d)
    return sp.csr_matrix((np.ones(n * d, np.int8), (rows.ravel(), cols)), shape=(k, n))


def planted_problem(k=160, n=600, d=8, support=10, noise=0.02, seed=0):
    rng = np.random.default_rng(seed)
    m = planted_design(k, n, d, rng)
    w = np.zeros(n)
    idx = rng.choice(n, support, replace=False)
    w[idx] = rng.choice([-1.0, 1.0], support) * rng.uniform(0.5, 1.5, support)
    y = 2.0 + m @ w + noise * rng.standard_normal(k)
    return m, w, idx, y


@pytest.fixture(scope="module")
def planted():
    m, w, idx, y = planted_problem()
    rec = Recoverer(m, RecoveryConfig()).recover(y)
    return m, w, idx, y, rec


def test_planted_support_and_signs_recovered(planted):
    m, w, idx, y, rec = planted
    top = np.argsort(-np.abs(rec.scores))[: idx.size]
    assert set(top) == set(idx)
    assert np.array_equal(np.sign(rec.scores[idx]), np.sign(w[idx]))
    # Magnitudes too: the Lasso shrinks a little, nothing more.
    assert np.max(np.abs(rec.scores[idx] - w[idx])) < 0.15
    assert rec.scores.dtype == np.float32 and rec.scores.shape == (m.shape[1],)
    # y ≈ intercept + M w
    fitted = rec.intercept + m @ rec.scores.astype(np.float64)
    assert np.std(y - fitted) < 0.1 * np.std(y)


def test_backprojection_preview_ranks_planted_examples(planted):
    m, w, idx, y, rec = planted
    # A rough preview (other examples in the same subsets leak in): far above chance
    # (10 * 10 / 600 ≈ 0.2 expected hits), well below the Lasso.
    top = np.argsort(-np.abs(rec.backprojection))[: idx.size]
    assert len(set(top) & set(idx)) >= 0.5 * idx.size
    np.testing.assert_allclose(rec.backprojection, backproject(y, m))


def test_backproject_known_answer():
    m = sp.csr_matrix(np.array([[1, 0, 1], [1, 1, 0], [0, 1, 0], [0, 0, 0]]))
    y = np.array([3.0, 1.0, 0.0, 0.0])          # mean 1 -> centred [2, 0, -1, -1]
    np.testing.assert_allclose(backproject(y, m), [1.0, -0.5, 2.0])
    # An example in no subset gets 0, not a division by zero.
    m0 = sp.csr_matrix(np.array([[1, 0], [0, 0], [1, 0]]))
    np.testing.assert_allclose(backproject(np.array([1.0, 0.0, 2.0]), m0), [0.5, 0.0])


def test_sign_convention():
    """An example whose operators lower the loss (y_k > 0 for k ∋ i) is a proponent."""
    rng = np.random.default_rng(1)
    m = planted_design(96, 200, 6, rng)
    y = 0.01 * rng.standard_normal(96)
    col = m[:, 7].toarray().ravel()
    for sign in (1.0, -1.0):
        rec = Recoverer(m).recover(y + sign * 0.5 * col)
        assert int(np.argmax(np.abs(rec.scores))) == 7
        assert np.sign(rec.scores[7]) == sign
        assert np.sign(rec.backprojection[7]) == sign


def test_constant_responses_give_zero_scores():
    m, _, _, _ = planted_problem(k=64, n=100)
    rec = Recoverer(m).recover(np.full(64, 0.3))
    assert not rec.scores.any() and not rec.backprojection.any()
    assert rec.intercept == pytest.approx(0.3)
    assert rec.nonzeros.tolist() == [0] and rec.chosen_index == 0


def test_path_starts_empty_and_is_monotone(planted):
    _, _, _, _, rec = planted
    L = rec.alphas.size
    assert rec.coefs.shape == (L, 600) and rec.ratios.shape == rec.nonzeros.shape == (L,)
    assert rec.ratios[0] == pytest.approx(1.0)
    assert rec.nonzeros[0] == 0 and rec.coefs[0].nnz == 0
    assert np.all(np.diff(rec.alphas) < 0)
    np.testing.assert_allclose(rec.ratios, rec.alphas / rec.alphas[0])
    np.testing.assert_allclose(rec.ratios[1] / rec.ratios[0], 1e-3 ** (1 / 59))
    # The l1 norm of the Lasso solution never decreases as lambda decreases.
    l1 = np.abs(rec.coefs).sum(axis=1).A.ravel()
    assert np.all(np.diff(l1) >= -1e-4 * l1.max())
    # Just above lambda_max nothing is non-zero; just below, something is.
    assert rec.nonzeros[1] >= 1
    assert rec.chosen_alpha == rec.alphas[rec.chosen_index]


def test_path_matches_scikit_learn_lasso_with_intercept():
    """Each point of the path is the exact Lasso solution (same objective as sklearn's)."""
    m, _, _, y = planted_problem(k=80, n=150, support=6, seed=3)
    rec = Recoverer(m, RecoveryConfig(path_length=12), tol=1e-10).recover(y)
    x = m.toarray().astype(np.float64)
    for i in range(1, rec.alphas.size, 3):
        ref = Lasso(alpha=rec.alphas[i], fit_intercept=True, tol=1e-12, max_iter=100_000).fit(x, y)
        np.testing.assert_allclose(rec.coefs[i].toarray().ravel(), ref.coef_, atol=1e-5)


def test_working_set_grows_until_kkt_conditions_hold():
    """A cold start straight at a small alpha: the first working set (|g_j| >= alpha at w = 0)
    misses examples of the solution, which only the KKT check can bring in."""
    from stride_viz.method.recovery import _Problem
    m, _, _, y = planted_problem(k=80, n=150, support=6, seed=3)
    problem = _Problem(sp.csr_matrix(m, dtype=np.float64), np.arange(80))
    yc = y - y.mean()
    alpha = 0.6 * np.abs(problem.gradient(yc)).max()    # seed 3: one example is missed
    first = np.flatnonzero(np.abs(problem.gradient(yc)) >= alpha)
    coef = problem.path(yc, np.array([alpha]), None, np.random.RandomState(0), 1e-10)
    ref = Lasso(alpha=alpha, tol=1e-12, max_iter=100_000).fit(m.toarray().astype(float), y)
    assert not set(np.flatnonzero(ref.coef_)) <= set(first)
    np.testing.assert_allclose(coef.toarray().ravel(), ref.coef_, atol=1e-5)


def test_cv_error_matches_manual_fold_computation():
    m, _, _, y = planted_problem(k=60, n=120, support=5, seed=4)
    cfg = RecoveryConfig(path_length=8, cv_folds=3)
    rcv = Recoverer(m, cfg, tol=1e-10)
    rec = rcv.recover(y)
    x = m.toarray().astype(np.float64)
    errors = []
    for held in rcv.folds:
        train = np.setdiff1d(np.arange(60), held)
        errs = []
        for a in rec.alphas:
            fit = Lasso(alpha=a, tol=1e-12, max_iter=100_000).fit(x[train], y[train])
            errs.append(np.mean((y[held] - fit.predict(x[held])) ** 2))
        errors.append(errs)
    errors = np.array(errors)
    np.testing.assert_allclose(rec.cv_mean, errors.mean(axis=0), rtol=1e-4)
    np.testing.assert_allclose(rec.cv_std, errors.std(axis=0, ddof=1) / np.sqrt(3), rtol=1e-3)
    # The folds partition the operators.
    assert np.array_equal(np.sort(np.concatenate(rcv.folds)), np.arange(60))


def test_selection_modes(planted):
    m, _, _, y, rec_cv = planted
    assert rec_cv.chosen_index == int(np.argmin(rec_cv.cv_mean))
    rec_1se = Recoverer(m, RecoveryConfig(selection="cv-1se")).recover(y)
    best = int(np.argmin(rec_1se.cv_mean))
    assert rec_1se.chosen_index <= best
    assert rec_1se.cv_mean[rec_1se.chosen_index] <= rec_1se.cv_mean[best] + rec_1se.cv_std[best]
    assert rec_1se.chosen_index == 0 or (rec_1se.cv_mean[rec_1se.chosen_index - 1]
                                         > rec_1se.cv_mean[best] + rec_1se.cv_std[best])
    assert rec_1se.chosen_nonzeros <= rec_cv.chosen_nonzeros
    rec_nz = Recoverer(m, RecoveryConfig(selection="nonzeros", target_nonzeros=5)).recover(y)
    i = rec_nz.chosen_index
    assert rec_nz.nonzeros[i] >= 5 and rec_nz.nonzeros[i - 1] < 5
    assert np.count_nonzero(rec_nz.scores) == rec_nz.nonzeros[i]


def test_max_nonzero_stops_the_path_early(planted):
    m, _, _, y, _ = planted
    rec = Recoverer(m, RecoveryConfig(max_nonzero=8)).recover(y)
    assert rec.alphas.size < 60
    assert rec.nonzeros[-1] >= 8 and rec.nonzeros[-2] < 8
    assert rec.cv_mean.shape == rec.cv_std.shape == rec.alphas.shape
    # Default: K/2 = 80.
    _, _, _, _, full = planted
    assert full.nonzeros[:-1].max() < 80 <= full.nonzeros[-1] or full.alphas.size == 60


def test_save_load_round_trip(planted, tmp_path):
    *_, rec = planted
    save_recovery(rec, tmp_path / "q1")
    assert {p.name for p in (tmp_path / "q1").iterdir()} == {"scores.npy", "backprojection.npy",
                                                              "path.npz"}
    with np.load(tmp_path / "q1" / "path.npz") as z:      # what the dashboard reads
        assert z["coefs"].shape == (rec.alphas.size, 600) and z["coefs"].dtype == np.float32
    back = load_recovery(tmp_path / "q1")
    for name in ("scores", "backprojection", "alphas", "ratios", "nonzeros", "cv_mean", "cv_std"):
        np.testing.assert_array_equal(getattr(back, name), getattr(rec, name))
    assert (back.coefs != rec.coefs).nnz == 0
    assert (back.chosen_index, back.chosen_alpha, back.intercept) == \
        (rec.chosen_index, rec.chosen_alpha, rec.intercept)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_recovery(tmp_path / "nothing")


def test_bad_input_raises_clear_errors():
    m, _, _, y = planted_problem(k=64, n=100)
    rcv = Recoverer(m)
    with pytest.raises(ValueError, match=r"length K = 64.*Got length 63"):
        rcv.recover(y[:63])
    bad = y.copy()
    bad[5] = np.nan
    with pytest.raises(ValueError, match=r"NaN or infinite.*subset 5"):
        rcv.recover(bad)
    with pytest.raises(ValueError, match="one query at a time"):
        rcv.recover(np.stack([y, y], axis=1))
    assert isinstance(RecoveryError("x"), ValueError)
    with pytest.raises(ValueError, match="only 0 and 1"):
        Recoverer(m * 2)
    with pytest.raises(ValueError, match="cv_folds"):
        Recoverer(m[:6], RecoveryConfig(cv_folds=5))
    with pytest.raises(ValueError, match="2-D"):
        Recoverer(np.ones(5))


def test_same_seed_same_result_different_seed_different_folds(planted):
    m, _, _, y, rec = planted
    again = Recoverer(m, RecoveryConfig(seed=0))
    rec2 = again.recover(y)
    np.testing.assert_array_equal(rec2.scores, rec.scores)
    np.testing.assert_array_equal(rec2.cv_mean, rec.cv_mean)
    other = Recoverer(m, RecoveryConfig(seed=1))
    assert any(not np.array_equal(a, b) for a, b in zip(again.folds, other.folds))
    assert not np.array_equal(other.recover(y).cv_mean, rec.cv_mean)


def test_should_stop_is_asked_within_the_solve(planted):
    """Background work (the explainer's per-token scores) gives way to a request within one
    fold's path: the stop is asked before the full path and before each fold."""
    from stride_viz.progress import Cancelled
    m, _w, _idx, y, rec = planted
    recoverer = Recoverer(m, RecoveryConfig())
    calls = []
    same = recoverer.recover(y, should_stop=lambda: calls.append(1) and False)
    assert len(calls) == 1 + RecoveryConfig().cv_folds
    np.testing.assert_array_equal(same.scores, rec.scores)     # asking changes nothing
    for stop_at in (1, 3):
        asked = []
        with pytest.raises(Cancelled):
            recoverer.recover(y, should_stop=lambda: len(asked) >= stop_at or asked.append(1))
        assert len(asked) == stop_at
