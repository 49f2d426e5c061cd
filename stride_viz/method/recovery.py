"""Stage 4 of STRIDE: per-query sparse recovery of the influence vector.

A query's K operator responses ``y`` (nats, ``y_k = Loss_base - Loss_k``) are modelled as
``y ≈ b + M w`` with the 0/1 membership matrix ``M`` (K subsets x n examples) and a sparse
influence vector ``w`` (n,). ``w`` is the Lasso solution

    min_{w, b}  1/(2K) ||y - b - M w||²  +  alpha ||w||₁          (alpha = lambda / K)

computed along the regularisation path from ``alpha_max`` (everything zero) down to
``eps * alpha_max``, and ``alpha`` is chosen by cross-validation over held-out operators
(rows of M). Sign: ``w_i > 0`` means example i lowers the query's loss (a proponent), in nats
of mean per-token loss.

Speed. Scikit-learn's coordinate descent (``enet_path``) does the solving. Called on the
whole centred design it costs O(K n) per lambda even when only a handful of examples are
active (a dense pass, or the O(K n) centring set-up of its sparse solver), which is what made
``LassoCV`` take seconds per query. Here every lambda is solved on a small *working set* of
columns (the strong rule of Tibshirani et al. 2012, as in glmnet), then the optimality (KKT)
conditions of all n examples are checked with one sparse product ``Mᵀ r`` (n·d operations,
d = subsets per example) and violators are added until none is left: the result is the exact
Lasso path, at a cost that grows with the number of non-zeros, not with n. See
``benchmarks/recovery.py`` for the measurements.

Usage::

    rec = Recoverer(membership, RecoveryConfig()).recover(y)   # y: (K,) float
    rec.scores          # (n,) float32 influence at the chosen lambda
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import numpy as np
import scipy.sparse as sp
import sklearn
from sklearn.linear_model import enet_path
from threadpoolctl import ThreadpoolController

from stride_viz.config import RecoveryConfig
from stride_viz.progress import Cancelled

__all__ = ["Recovery", "Recoverer", "RecoveryError", "backproject", "save_recovery",
           "load_recovery"]

# Relative duality-gap tolerance of scikit-learn's coordinate descent: each lambda's solve
# stops when the gap is below TOL * ||y - mean y||². Scikit-learn's default 1e-4 leaves
# errors of ~1e-2 on the coefficients of the dense end of the path (enough to move the CV
# choice); 1e-5 brings them below 1e-4 for ~1.3x the time ("tolerance" in
# benchmarks/recovery.py).
TOL = 1e-5
# Bound on the working-set rounds per lambda (each round adds every KKT violator, so a few
# rounds are the norm; the bound only guards against a pathological loop).
_MAX_ROUNDS = 50
# Coefficients below this fraction of max |y - mean y| are round-off, recorded as exact zeros.
_ZERO = 1e-7
_threadpools: ThreadpoolController | None = None


def _one_blas_thread():
    """Context that runs BLAS single-threaded: the recovery makes hundreds of small
    matrix-vector products, where multi-threaded BLAS spends more time waking threads than
    computing (measured 4x slower CPU time on 2 cores)."""
    global _threadpools
    if _threadpools is None:
        _threadpools = ThreadpoolController()
    return _threadpools.limit(limits=1, user_api="blas")


class RecoveryError(ValueError):
    """Bad input to the recovery (wrong shape, non-finite responses, unusable design)."""


@dataclass
class Recovery:
    """The sparse recovery of one query.

    Attributes:
        scores: float32 (n,) ``w`` at the chosen alpha, nats of mean per-token loss;
            > 0 proponent (training on example i lowers the query's loss), < 0 opponent.
        backprojection: float32 (n,) the fast preview ``(1/d_i) Σ_{k ∋ i} (y_k - mean y)``.
        alphas: float64 (L,) the alpha grid actually computed, decreasing (scikit-learn's
            scaling: alpha = lambda / K). L < path_length when the path stopped early.
        ratios: float64 (L,) alphas / alpha_max (1 at the start of the path).
        coefs: float32 sparse CSR (L, n): ``w`` along the path.
        nonzeros: int64 (L,) non-zero examples along the path.
        cv_mean: float64 (L,) held-out mean squared error per operator (nats²), mean over folds.
        cv_std: float64 (L,) its standard error over folds.
        chosen_index: index into the path of the chosen alpha.
        chosen_alpha: alphas[chosen_index].
        intercept: b (nats), so that ``y ≈ intercept + M @ scores``.
    """

    scores: np.ndarray
    backprojection: np.ndarray
    alphas: np.ndarray
    ratios: np.ndarray
    coefs: sp.csr_matrix
    nonzeros: np.ndarray
    cv_mean: np.ndarray
    cv_std: np.ndarray
    chosen_index: int
    chosen_alpha: float
    intercept: float

    @property
    def chosen_nonzeros(self) -> int:
        """Number of non-zero examples at the chosen alpha."""
        return int(self.nonzeros[self.chosen_index])


def _as_membership(membership: Union[sp.spmatrix, sp.sparray, np.ndarray]) -> sp.csr_matrix:
    """Validate a membership matrix and return it as float64 CSR (K, n)."""
    if sp.issparse(membership):
        m = sp.csr_matrix(membership, dtype=np.float64, copy=True)
    elif isinstance(membership, np.ndarray):
        if membership.ndim != 2:
            raise RecoveryError(f"The 'membership' matrix must be 2-D of shape (K subsets, "
                                f"n examples). Got an array of shape {membership.shape}.")
        m = sp.csr_matrix(membership.astype(np.float64))
    else:
        raise RecoveryError(f"The 'membership' matrix must be a scipy.sparse matrix or a numpy "
                            f"array of shape (K, n). Got {type(membership).__name__}.")
    if m.shape[0] < 2 or m.shape[1] < 1:
        raise RecoveryError(f"The 'membership' matrix needs at least 2 subsets (rows) and 1 "
                            f"example (column). Got shape {m.shape}.")
    m.sum_duplicates()
    m.eliminate_zeros()
    if m.data.size and not np.all(m.data == 1.0):
        bad = m.data[m.data != 1.0][0]
        raise RecoveryError(f"The 'membership' matrix must hold only 0 and 1 (subset k contains "
                            f"example i). Found the value {bad!r}.")
    return m


def backproject(y: np.ndarray, membership: Union[sp.spmatrix, np.ndarray]) -> np.ndarray:
    """Fast influence preview ``w_i ≈ (1/d_i) Σ_{k ∋ i} (y_k - mean y)``.

    Args:
        y: float (K,) operator responses of one query, nats.
        membership: 0/1 (K, n) membership matrix.
    Returns:
        float32 (n,); 0 for an example in no subset.
    """
    m = _as_membership(membership)
    yc = _check_y(y, m.shape[0])
    yc = yc - yc.mean()
    return _backproject(m, yc)


def _backproject(m: sp.csr_matrix, yc: np.ndarray) -> np.ndarray:
    degree = np.asarray(m.sum(axis=0)).ravel()
    total = m.T @ yc
    out = np.divide(total, degree, out=np.zeros_like(total), where=degree > 0)
    return out.astype(np.float32)


def _check_y(y: np.ndarray, k: int) -> np.ndarray:
    """Validate one query's responses and return them as float64 (K,)."""
    arr = np.asarray(y)
    if arr.ndim == 2 and 1 in arr.shape and arr.size == k:
        arr = arr.ravel()
    if arr.ndim != 1:
        raise RecoveryError(f"The responses 'y' must be a 1-D array of shape (K,) = ({k},), one "
                            f"query at a time (a 2-D target would couple queries in a "
                            f"multi-task Lasso). Got shape {arr.shape}.")
    if arr.shape[0] != k:
        raise RecoveryError(f"The responses 'y' must have one value per subset: length K = {k} "
                            f"(the rows of the membership matrix). Got length {arr.shape[0]}.")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise RecoveryError(f"The responses 'y' must be real numbers. Got dtype {arr.dtype}.")
    arr = arr.astype(np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        raise RecoveryError(f"The responses 'y' must be finite: {int(bad.sum())} of {k} are NaN "
                            f"or infinite (first at subset {int(np.flatnonzero(bad)[0])}). "
                            f"Recompute the responses of this query.")
    return arr


class _Problem:
    """The centred Lasso on a set of rows of M (all rows, or the training rows of one fold).

    Everything here depends on M only, never on y: it is built once per Recoverer.
    """

    def __init__(self, m: sp.csr_matrix, rows: np.ndarray) -> None:
        sub = m[rows]
        self.rows = rows
        self.k = len(rows)
        self.csc = sub.tocsc()                     # column slices for the working set
        self.csr_t = sub.T.tocsr()                 # (n, k): gradient Mᵀ r in n·d operations
        self.mean = np.asarray(sub.mean(axis=0)).ravel()   # column means (n,)

    def gradient(self, r: np.ndarray) -> np.ndarray:
        """Centred design transposed times the residual, / k: (n,)."""
        return (self.csr_t @ r - self.mean * r.sum()) / self.k

    def path(self, yc: np.ndarray, alphas: np.ndarray, max_nonzero: int | None,
             rng: np.random.RandomState, tol: float = TOL) -> sp.csr_matrix:
        """Lasso path on centred responses yc (k,) at the given decreasing alphas.

        Each alpha is warm-started from the previous solution and solved by scikit-learn on a
        working set of columns: all columns used so far plus the strong-rule candidates
        ``|g_j| >= 2 alpha - alpha_prev`` (g: the gradient at the previous solution). The KKT
        condition ``|g_j| <= alpha`` of every other example is then checked; violators are
        added and the alpha re-solved until there is none, so the result is the exact path.
        The working set only grows, so its dense centred columns live in one Fortran buffer
        whose leading block goes to the solver without a copy (scikit-learn's gap-safe
        screening drops the columns that have become irrelevant). Stops after the first
        alpha with at least max_nonzero non-zeros.

        Returns:
            float32 CSR (L, n), L <= len(alphas).
        """
        ws = _WorkingSet(self)
        y_scale = float(np.abs(yc).max())
        coef = np.zeros(0)
        g = self.gradient(yc)
        rows_idx: list[np.ndarray] = []
        rows_val: list[np.ndarray] = []
        prev = alphas[0]
        for alpha in alphas:
            ws.add(np.flatnonzero(np.abs(g) >= 2 * alpha - prev))
            for _ in range(_MAX_ROUNDS):
                r = yc
                if ws.size:
                    coef = np.concatenate([coef, np.zeros(ws.size - coef.size)])
                    x = ws.matrix()
                    _, path_coef, _ = enet_path(x, yc, l1_ratio=1.0, alphas=[alpha],
                                                precompute=False, check_input=False,
                                                coef_init=coef, tol=tol, random_state=rng)
                    coef = path_coef[:, 0]
                    r = yc - x @ coef
                g = self.gradient(r)
                if not ws.add(np.flatnonzero(np.abs(g) > alpha)):
                    break
            # Coordinate descent leaves round-off residue (|w| ~ 1e-10 .. 1e-17) on examples
            # that are really at zero; they would show as "helps"/"hurts" in the views.
            nz = np.flatnonzero(np.abs(coef) > _ZERO * y_scale)
            feats = ws.features()[nz]
            order = np.argsort(feats)
            rows_idx.append(feats[order])
            rows_val.append(coef[nz][order].astype(np.float32))
            prev = alpha
            if max_nonzero is not None and nz.size >= max_nonzero:
                break
        indptr = np.concatenate([[0], np.cumsum([len(i) for i in rows_idx])])
        return sp.csr_matrix((np.concatenate(rows_val), np.concatenate(rows_idx), indptr),
                             shape=(len(rows_idx), self.mean.shape[0]))


class _WorkingSet:
    """The columns a path has used so far, as dense centred columns in a growing buffer."""

    def __init__(self, problem: _Problem, capacity: int = 64) -> None:
        self.p = problem
        self.size = 0
        self._in = np.zeros(problem.mean.shape[0], dtype=bool)
        self._features = np.empty(capacity, dtype=np.int64)
        self._buf = np.empty((problem.k, capacity), order="F")

    def features(self) -> np.ndarray:
        """Example indices of the working set, in the order they were added: (size,)."""
        return self._features[: self.size]

    def matrix(self) -> np.ndarray:
        """Dense centred design of the working set, Fortran order: (k, size), no copy."""
        return self._buf[:, : self.size]

    def add(self, candidates: np.ndarray) -> int:
        """Add the candidates not yet in the set; return how many were new."""
        new = candidates[~self._in[candidates]]
        if new.size == 0:
            return 0
        end = self.size + new.size
        if end > self._buf.shape[1]:
            cap = max(end, 2 * self._buf.shape[1])
            buf = np.empty((self.p.k, cap), order="F")
            buf[:, : self.size] = self.matrix()
            features = np.empty(cap, dtype=np.int64)
            features[: self.size] = self.features()
            self._buf, self._features = buf, features
        # Fill the new columns straight from the CSC arrays (scipy's column slicing costs
        # more than the copy itself at these sizes): 1 - mean where the subset holds the
        # example, -mean elsewhere.
        indptr, indices = self.p.csc.indptr, self.p.csc.indices
        starts, counts = indptr[new], indptr[new + 1] - indptr[new]
        offsets = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        block = self._buf[:, self.size: end]
        block[:] = -self.p.mean[new]
        block[indices[offsets], np.repeat(np.arange(new.size), counts)] += 1.0
        self._features[self.size: end] = new
        self._in[new] = True
        self.size = end
        return int(new.size)


def _stop_if(should_stop: Callable[[], bool]) -> None:
    if should_stop():
        raise Cancelled("the recovery was stopped")


class Recoverer:
    """Per-query sparse recovery against one membership matrix.

    Build once per fit (it precomputes the folds and the per-fold designs), then call
    ``recover(y)`` for every query.

    Args:
        membership: 0/1 (K, n) scipy.sparse (CSR preferred) or numpy membership matrix.
        config: RecoveryConfig (path length, eps, max_nonzero, folds, selection, seed).
        tol: relative duality-gap tolerance of every solve (see TOL).
    Raises:
        RecoveryError: a membership matrix that is not 0/1, or too few subsets for the folds.
    """

    def __init__(self, membership: Union[sp.spmatrix, np.ndarray],
                 config: RecoveryConfig = RecoveryConfig(), *, tol: float = TOL) -> None:
        if not isinstance(config, RecoveryConfig):
            raise RecoveryError(f"The 'config' parameter of Recoverer must be a RecoveryConfig. "
                                f"Got {type(config).__name__}.")
        if not (isinstance(tol, (int, float)) and 0 < tol < 1):
            raise RecoveryError(f"The 'tol' parameter of Recoverer must be a number in the range "
                                f"(0, 1). Got {tol!r} instead.")
        self.config = config
        self.tol = float(tol)
        self.membership = _as_membership(membership)
        k, n = self.membership.shape
        if k < 2 * config.cv_folds:
            raise RecoveryError(f"Cross-validation with cv_folds = {config.cv_folds} needs at "
                                f"least {2 * config.cv_folds} subsets (rows of the membership "
                                f"matrix). Got K = {k}: lower cv_folds in RecoveryConfig.")
        self.k, self.n = k, n
        # default: half of the measurements (beyond that the fit interpolates noise) or half of
        # the examples, whichever is fewer (past that the scores are no longer sparse, and on a
        # small pool with K > n the path would run to its end at several times the cost)
        self.max_nonzero = (config.max_nonzero if config.max_nonzero is not None
                            else max(1, min(k, n) // 2))
        # Folds over operators: a seeded permutation of the rows, cut into near-equal parts.
        perm = np.random.default_rng(config.seed).permutation(k)
        self.folds = [np.sort(f) for f in np.array_split(perm, config.cv_folds)]
        self._full = _Problem(self.membership, np.arange(k))
        self._fold_problems = [_Problem(self.membership, np.setdiff1d(np.arange(k), held))
                               for held in self.folds]
        self._held = [self.membership[held] for held in self.folds]

    def recover(self, y: np.ndarray, should_stop: Callable[[], bool] = lambda: False) -> Recovery:
        """Recover the influence vector of one query.

        Args:
            y: float (K,) operator responses of the query, nats.
            should_stop: asked before the full path and before each fold's (a fraction of a
                second apart on the demo run): True stops the solve (background work that
                gives way to a request, e.g. the explainer's per-token scores).
        Returns:
            Recovery with the chosen scores, the path and the CV curve.
        Raises:
            RecoveryError: y of the wrong shape or with NaN / infinite values.
            Cancelled: should_stop() said so.
        """
        cfg = self.config
        y = _check_y(y, self.k)
        ybar = float(y.mean())
        yc = y - ybar
        back = _backproject(self.membership, yc)
        alpha_max = float(np.abs(self._full.gradient(yc)).max())
        if alpha_max <= 1e-12 * float(np.abs(y).max()):
            return self._constant(ybar, back)    # y constant (up to rounding): nothing to explain
        alphas = alpha_max * np.logspace(0.0, np.log10(cfg.eps), cfg.path_length)
        rng = np.random.RandomState(cfg.seed)   # only seeds scikit-learn's unused shuffling
        # Parameter validation costs more than a small solve: the inputs are checked here.
        with sklearn.config_context(skip_parameter_validation=True), _one_blas_thread():
            _stop_if(should_stop)
            coefs = self._full.path(yc, alphas, self.max_nonzero, rng, self.tol)
            alphas = alphas[: coefs.shape[0]]
            fold_errors = []
            for f in range(len(self.folds)):
                _stop_if(should_stop)
                fold_errors.append(self._fold_error(f, y, alphas, rng))
            errors = np.stack(fold_errors)
        n_folds = errors.shape[0]
        cv_mean = errors.mean(axis=0)
        cv_std = errors.std(axis=0, ddof=1) / np.sqrt(n_folds)
        nonzeros = np.diff(coefs.indptr).astype(np.int64)
        chosen = self._select(cv_mean, cv_std, nonzeros)
        scores = coefs[chosen].toarray().ravel().astype(np.float32)
        intercept = ybar - float(self._full.mean @ scores.astype(np.float64))
        return Recovery(scores=scores, backprojection=back, alphas=alphas,
                        ratios=alphas / alpha_max, coefs=coefs, nonzeros=nonzeros,
                        cv_mean=cv_mean, cv_std=cv_std, chosen_index=int(chosen),
                        chosen_alpha=float(alphas[chosen]), intercept=intercept)

    def _fold_error(self, f: int, y: np.ndarray, alphas: np.ndarray,
                    rng: np.random.RandomState) -> np.ndarray:
        """Held-out mean squared error (L,) of fold f's path at the given alphas."""
        prob = self._fold_problems[f]
        y_train = y[prob.rows]
        ybar = y_train.mean()
        coefs = prob.path(y_train - ybar, alphas, None, rng, self.tol)   # (L, n)
        pred = (self._held[f] @ coefs.T).toarray() - (coefs @ prob.mean)[None, :]   # (h, L)
        resid = (y[self.folds[f]] - ybar)[:, None] - pred
        return np.mean(resid ** 2, axis=0)

    def _select(self, cv_mean: np.ndarray, cv_std: np.ndarray, nonzeros: np.ndarray) -> int:
        cfg = self.config
        if cfg.selection == "nonzeros":
            reached = np.flatnonzero(nonzeros >= cfg.target_nonzeros)
            return int(reached[0]) if reached.size else len(nonzeros) - 1
        best = int(np.argmin(cv_mean))
        if cfg.selection == "cv":
            return best
        # 'cv-1se': the largest alpha (sparsest model) within one standard error of the best.
        return int(np.flatnonzero(cv_mean <= cv_mean[best] + cv_std[best])[0])

    def _constant(self, ybar: float, back: np.ndarray) -> Recovery:
        """Responses that do not vary: nothing to explain, every score is 0 (a one-point path
        at alpha = 0, ratio 1)."""
        return Recovery(scores=np.zeros(self.n, np.float32), backprojection=np.zeros_like(back),
                        alphas=np.zeros(1), ratios=np.ones(1),
                        coefs=sp.csr_matrix((1, self.n), dtype=np.float32),
                        nonzeros=np.zeros(1, np.int64), cv_mean=np.zeros(1), cv_std=np.zeros(1),
                        chosen_index=0, chosen_alpha=0.0, intercept=ybar)


def save_recovery(rec: Recovery, folder: Union[str, Path]) -> None:
    """Write scores.npy, backprojection.npy and path.npz into folder (created if missing).

    path.npz holds alphas, ratios, coefs (dense float32 (L, n), compressed), nonzeros,
    cv_mean, cv_std, chosen_index, chosen_alpha and intercept.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "scores.npy", np.asarray(rec.scores, dtype=np.float32))
    np.save(folder / "backprojection.npy", np.asarray(rec.backprojection, dtype=np.float32))
    coefs = rec.coefs.toarray() if sp.issparse(rec.coefs) else np.asarray(rec.coefs)
    np.savez_compressed(folder / "path.npz", alphas=rec.alphas, ratios=rec.ratios,
                        coefs=coefs.astype(np.float32), nonzeros=rec.nonzeros,
                        cv_mean=rec.cv_mean, cv_std=rec.cv_std,
                        chosen_index=np.int64(rec.chosen_index),
                        chosen_alpha=np.float64(rec.chosen_alpha),
                        intercept=np.float64(rec.intercept))


def load_recovery(folder: Union[str, Path]) -> Recovery:
    """Read what save_recovery wrote (coefs come back as float32 CSR)."""
    folder = Path(folder)
    missing = [f for f in ("scores.npy", "backprojection.npy", "path.npz")
               if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"No recovery in {folder}: missing {', '.join(missing)}. "
                                f"Run the attribution of this query again.")
    with np.load(folder / "path.npz") as z:
        return Recovery(scores=np.load(folder / "scores.npy"),
                        backprojection=np.load(folder / "backprojection.npy"),
                        alphas=z["alphas"], ratios=z["ratios"],
                        coefs=sp.csr_matrix(z["coefs"].astype(np.float32)),
                        nonzeros=z["nonzeros"].astype(np.int64),
                        cv_mean=z["cv_mean"], cv_std=z["cv_std"],
                        chosen_index=int(z["chosen_index"]),
                        chosen_alpha=float(z["chosen_alpha"]),
                        intercept=float(z["intercept"]) if "intercept" in z else float("nan"))
