"""Why STRIDE trails EK-FAC on held-out text (issue 10, item 10): development queries only.

    python benchmarks/lds_diagnosis.py [--peer ekfac] [--out benchmarks/results/lds_diagnosis.json]

Reads only committed files (the ground truth and the score files of benchmarks/results/); runs
no model. Every number is on the development queries of the fixed split, so that what it
suggests can be tried without looking at the test queries. Two questions:

1. **Does sparsity cost LDS?** The peer's scores cut to the k largest |score| of each query
   (the rest set to 0), k = the number of non-zeros STRIDE's Lasso kept on that query, and a
   few fixed k. If the cut peer falls to STRIDE's level, a sparse recovery cannot reach the
   peer here, however good the operators are.
2. **How much survives STRIDE's measurement and recovery stages alone?** Exact responses
   ``y = M w_peer`` (what the K operators would return if each measured exactly the sum of the
   peer's influence over its subset), recovered with STRIDE's Lasso (``RecoveryConfig()``)
   and with the back-projection, through STRIDE's own design M (the default fit's K, d and
   seed, and K = 2048). The gap between this and the peer's own LDS is what stages 1 and 4
   lose; the gap between this and STRIDE's LDS is what the operators (stage 2) lose.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stride_viz.evaluation import metrics as ev  # noqa: E402
from stride_viz.evaluation import stats  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
FIXED_K = (20, 100, 300, 1000)


def top_k(scores: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Each row of scores (n_queries, n) with all but its k[q] largest |values| set to 0."""
    out = np.zeros_like(scores)
    for q, kq in enumerate(np.asarray(k, dtype=int)):
        if kq > 0:
            keep = np.argsort(-np.abs(scores[q]))[:kq]
            out[q, keep] = scores[q, keep]
    return out


def _summary(per_query: np.ndarray, dev: np.ndarray, groups: dict) -> dict:
    """The development side of ``metrics.split_means``: its means, overall and per group (the
    diagnosis reads no test query)."""
    means = ev.split_means(per_query, dev, groups)
    return {"lds_mean_dev": means["lds_mean_dev"], **{f"lds_mean_dev_{g}": means[f"lds_mean_dev_{g}"] for g in groups}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer", default="ekfac", help="the peer whose committed scores are probed (default ekfac)")
    ap.add_argument("--out", default=str(RESULTS / "lds_diagnosis.json"))
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from stride_viz.config import FitConfig, RecoveryConfig
    from stride_viz.method.recovery import Recoverer, backproject
    from stride_viz.method.subsets import design_subsets

    report = json.loads((RESULTS / "lds.json").read_text())
    if a.peer not in report["methods"] or not report["methods"][a.peer].get("scores_file"):
        raise SystemExit(f"lds_diagnosis.py: lds.json has no committed scores of {a.peer!r}.")
    gt = ev.read_ground_truth(ROOT / report["ground_truth"])
    ids = [q["id"] for q in gt.metadata["queries"]]
    dev = stats.development_mask(gt.metadata)
    group = np.array(report["setting"]["query_group"])
    groups = {g: group == g for g in ("heldout", "facts")}
    load = lambda m: ev.load_scores(ROOT / report["methods"][m]["scores_file"], len(ids), ids)  # noqa: E731
    lds = lambda s: ev.lds(s, gt.train_subsets, gt.test_loss).per_query  # noqa: E731
    peer, stride = load(a.peer), load("stride")
    rows = np.flatnonzero(dev)
    out = {"what": __doc__.split("\n\n")[2].strip(), "queries": "development", "n_dev": int(dev.sum()),
           "command": "python benchmarks/lds_diagnosis.py " + shlex.join(sys.argv[1:]),
           "peer": a.peer, "stride_settings": "committed defaults (lds.json methods.stride)",
           "stride": _summary(lds(stride), dev, groups), "peer_lds": _summary(lds(peer), dev, groups)}

    # 1. sparsity
    nnz = (stride != 0).sum(axis=1)
    out["stride_nonzeros_dev"] = {"median": float(np.median(nnz[dev])), "mean": float(nnz[dev].mean()),
                                  "min": int(nnz[dev].min()), "max": int(nnz[dev].max()),
                                  **{f"median_{g}": float(np.median(nnz[dev & m])) for g, m in groups.items()}}
    cut = {"k = STRIDE's non-zeros": _summary(lds(top_k(peer, nnz)), dev, groups)}
    for k in FIXED_K:
        cut[f"k = {k}"] = _summary(lds(top_k(peer, np.full(len(ids), k))), dev, groups)
    out["peer_cut_to_top_k"] = cut

    # 2. exact responses y = M w_peer through STRIDE's design and recovery
    fit = FitConfig()
    rec_cfg = RecoveryConfig()
    exact = {}
    for K in (fit.subsets, 2 * fit.subsets):
        M = design_subsets(gt.n_pool, K, fit.per_example, fit.seed)
        rec = Recoverer(M, rec_cfg)
        lasso, back = np.zeros_like(peer), np.zeros_like(peer)
        t0 = time.perf_counter()
        for q in rows:
            y = np.asarray(M @ peer[q].astype(np.float64)).ravel()
            r = rec.recover(y)
            lasso[q], back[q] = r.scores, backproject(y, M)
        name = f"K {K}, d {fit.per_example}"
        exact[name] = {"lasso": _summary(lds(np.where(dev[:, None], lasso, peer)), dev, groups),
                       "lasso_nonzeros_median": float(np.median((lasso[rows] != 0).sum(axis=1))),
                       "backprojection": _summary(lds(np.where(dev[:, None], back, peer)), dev, groups),
                       "seconds_per_query": round((time.perf_counter() - t0) / len(rows), 3)}
        print(f"[diagnosis] {name}: exact responses -> Lasso {exact[name]['lasso']['lds_mean_dev']:+.3f}, "
              f"back-projection {exact[name]['backprojection']['lds_mean_dev']:+.3f}", file=sys.stderr)
    out["exact_responses"] = exact
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "what"}, indent=1))


if __name__ == "__main__":
    main()
