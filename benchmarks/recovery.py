"""Benchmark of stage 4 (stride_viz/method/recovery.py): speed and quality of the per-query Lasso.

Planted problems: M is a left-d-regular design (every example in exactly d distinct random
subsets), w has `support` non-zeros of mixed sign (|w_i| in [0.5, 1.5]), y = 2 + M w + noise,
with the noise std a fraction (`noise`) of the std of M w.

Prints one JSON object:
- "speed": wall and CPU seconds per query (median) of Recoverer.recover, with CV, for
  n in 1k..10k and K in 256/512/1024 (d = 8), plus the one-off Recoverer set-up time;
- "baselines" (skipped with --quick): one K=512, n=5000 query solved by LassoCV with its
  defaults on sparse and dense input (what the spec found too slow), LassoCV on our 60-point
  grid, a plain scikit-learn enet_path CV on the whole sparse design (no working set) and a
  LARS path bounded at K/2 steps; wall and CPU seconds (CPU is the fairer number on a shared
  machine);
- "tolerance" (skipped with --quick): CPU time and coefficient error of the solver tolerance;
- "quality": for 'cv', 'cv-1se' and back-projection, precision of the top-|support| examples
  (= recall, same count), sign agreement on the support, precision/recall of the chosen
  non-zero set, relative l2 error, non-zeros chosen; means over seeds.

Run: .venv/bin/python benchmarks/recovery.py [--quick] [--out FILE]
(2 shared CPU cores: about a minute with baselines.)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import scipy
import scipy.sparse as sp
import sklearn
from sklearn.linear_model import LassoCV, enet_path, lars_path
from sklearn.model_selection import KFold
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stride_viz.config import RecoveryConfig  # noqa: E402
from stride_viz.method.recovery import Recoverer  # noqa: E402


def planted_design(k: int, n: int, d: int, rng: np.random.Generator) -> sp.csr_matrix:
    """Left-d-regular 0/1 membership (k, n): every example in exactly d distinct subsets."""
    rows = np.argpartition(rng.random((n, k)), d, axis=1)[:, :d]
    cols = np.repeat(np.arange(n), d)
    return sp.csr_matrix((np.ones(n * d, np.int8), (rows.ravel(), cols)), shape=(k, n))


def planted_query(m: sp.csr_matrix, support: int, noise: float, rng: np.random.Generator):
    """Return (w (n,), support indices, y (K,))."""
    n = m.shape[1]
    w = np.zeros(n)
    idx = rng.choice(n, support, replace=False)
    w[idx] = rng.choice([-1.0, 1.0], support) * rng.uniform(0.5, 1.5, support)
    signal = m @ w
    y = 2.0 + signal + noise * signal.std() * rng.standard_normal(m.shape[0])
    return w, idx, y


def speed(ks, ns, queries: int, d: int = 8) -> list[dict]:
    rows = []
    for k in ks:
        for n in ns:
            rng = np.random.default_rng(k * 100_003 + n)
            m = planted_design(k, n, d, rng)
            t0 = time.perf_counter()
            rec = Recoverer(m, RecoveryConfig())
            setup = time.perf_counter() - t0
            times, cpu, lengths, chosen = [], [], [], []
            for _ in range(queries):
                _, _, y = planted_query(m, 20, 0.1, rng)
                t0, c0 = time.perf_counter(), time.process_time()
                r = rec.recover(y)
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
                lengths.append(r.alphas.size)
                chosen.append(r.chosen_nonzeros)
            rows.append({"K": k, "n": n, "d": d, "seconds_per_query": round(float(np.median(times)), 4),
                         "cpu_seconds_per_query": round(float(np.median(cpu)), 4),
                         "seconds_max": round(float(np.max(times)), 4),
                         "setup_seconds": round(setup, 4), "path_points": int(np.median(lengths)),
                         "chosen_nonzeros": int(np.median(chosen))})
            print(f"speed K={k} n={n}: {rows[-1]['seconds_per_query']} s/query", file=sys.stderr)
    return rows


def _plain_enet_cv(m: sp.csr_matrix, y: np.ndarray, alphas: np.ndarray, folds: int) -> np.ndarray:
    """CV errors with scikit-learn's sparse enet_path on the whole design (no working set)."""
    x = m.tocsc().astype(np.float64)
    errors = []
    for train, test in KFold(folds, shuffle=True, random_state=0).split(y):
        xt = x[train]
        mean = np.asarray(xt.mean(axis=0)).ravel()
        yt = y[train] - y[train].mean()
        _, coefs, _ = enet_path(xt, yt, l1_ratio=1.0, alphas=alphas, precompute=False,
                                X_offset=mean, X_scale=np.ones(x.shape[1]))
        pred = x[test] @ coefs - (mean @ coefs)[None, :] + y[train].mean()
        errors.append(np.mean((y[test][:, None] - pred) ** 2, axis=0))
    enet_path(x, y - y.mean(), l1_ratio=1.0, alphas=alphas, precompute=False,
              X_offset=np.asarray(x.mean(axis=0)).ravel(), X_scale=np.ones(x.shape[1]))
    return np.mean(errors, axis=0)


def _timed(fn) -> dict:
    """Wall and CPU seconds of fn() (CPU time is the fairer number on a shared machine)."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return {"seconds": round(time.perf_counter() - t0, 3), "cpu_seconds": round(time.process_time() - c0, 3)}


def baselines(k: int = 512, n: int = 5000, d: int = 8) -> dict:
    """One query, K=512, n=5000, solved by each method (5-fold CV, single-threaded BLAS)."""
    rng = np.random.default_rng(7)
    m = planted_design(k, n, d, rng)
    _, _, y = planted_query(m, 20, 0.1, rng)
    ours = Recoverer(m, RecoveryConfig())
    out = {"K": k, "n": n, "stride_viz_Recoverer": _timed(lambda: ours.recover(y))}
    alphas = ours.recover(y).alphas[0] * np.logspace(0, -3, 60)
    x_sparse, x_dense = m.astype(np.float64), m.toarray().astype(np.float64)
    folds = [np.arange(k)] + [tr for tr, _ in KFold(5, shuffle=True, random_state=0).split(y)]

    def lars() -> None:
        # LARS (lasso variant) bounded at K/2 steps, full problem + 5 folds, dense design.
        for rows in folds:
            xr = x_dense[rows] - x_dense[rows].mean(axis=0)
            lars_path(xr, y[rows] - y[rows].mean(), method="lasso", max_iter=k // 2)

    with warnings.catch_warnings(), threadpool_limits(1, user_api="blas"):
        warnings.simplefilter("ignore")
        out["LassoCV_default_sparse"] = _timed(lambda: LassoCV(cv=5).fit(x_sparse, y))
        out["LassoCV_default_dense"] = _timed(lambda: LassoCV(cv=5).fit(x_dense, y))
        out["LassoCV_same_60_alphas_sparse"] = _timed(
            lambda: LassoCV(alphas=alphas, cv=5).fit(x_sparse, y))
        out["plain_sparse_enet_path_cv_60_alphas"] = _timed(
            lambda: _plain_enet_cv(m, y, alphas, 5))
        out["lars_path_cv_K/2_steps_dense"] = _timed(lars)
    ours_cpu = out["stride_viz_Recoverer"]["cpu_seconds"]
    out["cpu_speedup_vs_LassoCV_default_sparse"] = round(
        out["LassoCV_default_sparse"]["cpu_seconds"] / ours_cpu, 1)
    out["cpu_speedup_vs_LassoCV_default_dense"] = round(
        out["LassoCV_default_dense"]["cpu_seconds"] / ours_cpu, 1)
    print(f"baselines: {out}", file=sys.stderr)
    return out


def tolerance(k: int = 512, n: int = 5000, d: int = 8, queries: int = 2) -> list[dict]:
    """CPU seconds and coefficient error (vs tol 1e-9) of the solver tolerance."""
    rng = np.random.default_rng(5)
    m = planted_design(k, n, d, rng)
    ys = [planted_query(m, 20, 0.1, rng)[2] for _ in range(queries)]
    refs = [Recoverer(m, tol=1e-9).recover(y) for y in ys]
    rows = []
    for tol in (1e-4, 1e-5, 1e-6):
        rec = Recoverer(m, tol=tol)
        c0 = time.process_time()
        outs = [rec.recover(y) for y in ys]
        cpu = (time.process_time() - c0) / queries
        err = max(abs(o.coefs[: min(o.alphas.size, r.alphas.size)]
                      - r.coefs[: min(o.alphas.size, r.alphas.size)]).max()
                  for o, r in zip(outs, refs))
        rows.append({"tol": tol, "cpu_seconds_per_query": round(cpu, 4),
                     "max_coef_error_vs_tol_1e-9": float(f"{err:.2g}"),
                     "same_chosen_index": all(o.chosen_index == r.chosen_index
                                              for o, r in zip(outs, refs))})
    print(f"tolerance: {rows}", file=sys.stderr)
    return rows


def _metrics(score: np.ndarray, w: np.ndarray, idx: np.ndarray) -> dict:
    s = idx.size
    top = np.argsort(-np.abs(score))[:s]
    hits = len(set(top.tolist()) & set(idx.tolist()))
    chosen = np.flatnonzero(score)
    true_nz = len(set(chosen.tolist()) & set(idx.tolist()))
    return {"precision_at_support": hits / s,
            "sign_agreement": float(np.mean(np.sign(score[idx]) == np.sign(w[idx]))),
            "nonzero_precision": true_nz / max(1, chosen.size),
            "nonzero_recall": true_nz / s,
            "nonzeros": int(chosen.size),
            "relative_l2_error": float(np.linalg.norm(score - w) / np.linalg.norm(w))}


def quality(k: int, n: int, supports, noises, seeds: int, d: int = 8) -> list[dict]:
    rows = []
    rng = np.random.default_rng(11 + k)
    m = planted_design(k, n, d, rng)
    recoverers = {sel: Recoverer(m, RecoveryConfig(selection=sel)) for sel in ("cv", "cv-1se")}
    for support in supports:
        for noise in noises:
            acc: dict[str, list[dict]] = {"cv": [], "cv-1se": [], "backprojection": []}
            for _ in range(seeds):
                w, idx, y = planted_query(m, support, noise, rng)
                for sel, r in recoverers.items():
                    acc[sel].append(_metrics(r.recover(y).scores.astype(np.float64), w, idx))
                acc["backprojection"].append(
                    _metrics(recoverers["cv"].recover(y).backprojection.astype(np.float64), w, idx))
            for method, ms in acc.items():
                keys = ms[0].keys() if method != "backprojection" else (
                    "precision_at_support", "sign_agreement", "relative_l2_error")
                rows.append({"K": k, "n": n, "support": support, "noise": noise,
                             "method": method, "seeds": seeds,
                             **{key: round(float(np.mean([x[key] for x in ms])), 3) for key in keys}})
            print(f"quality support={support} noise={noise} done", file=sys.stderr)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes, no baselines")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    ks = (256, 512, 1024)
    ns = (1000, 5000) if args.quick else (1000, 2000, 5000, 10000)
    result = {
        "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg(),
                    "python": platform.python_version(), "numpy": np.__version__,
                    "scipy": scipy.__version__,
                    "sklearn": sklearn.__version__},
        "config": RecoveryConfig().to_dict(),
        "speed": speed(ks, ns, queries=2 if args.quick else 3),
    }
    if not args.quick:
        result["baselines"] = baselines()
        result["tolerance"] = tolerance()
    result["quality"] = [row for k in (512, 256)
                         for row in quality(k, 5000, supports=(10, 30), noises=(0.1, 0.3),
                                            seeds=2 if args.quick else 3)]
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
