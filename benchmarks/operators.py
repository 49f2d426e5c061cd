"""Which operator design: LDS on the built-in benchmark's *development* queries, per design.

The designs of ``FitConfig.mode`` (and a few settings of each) are fitted on the LDS
benchmark's pool and model (``benchmarks/lds.py`` builds both; this script trains the model
if it is missing) and scored against its committed ground truth, on the development half of
the queries only (``stride_viz.evaluation.metrics.query_split``): the test half stays unseen
for the report. Planted-fact recall@10 is reported on the development fact queries. Each
design also records its fit time, time per query and the size of its operators file.

    python benchmarks/operators.py                          # every design in DESIGNS
    python benchmarks/operators.py --designs factored,logits

Results: benchmarks/results/operators.json (a row per design; rerunning a design replaces
its row). One torch thread per fit (``OPERATORS_THREADS`` to change).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / "work" / "operators"

# name -> FitConfig overrides (on top of FitConfig()'s defaults)
DESIGNS = {
    "logits-subset": {"mode": "logits", "vocabulary": "subset"},
    "logits-pool": {"mode": "logits", "vocabulary": "pool"},
    "logits-full-vocab": {"mode": "logits", "vocabulary": "full"},
    "factored": {"mode": "factored"},
    "factored-r2-256": {"mode": "factored", "inner_rank": 256},
    "residual": {"mode": "residual", "residual_design": "linear"},   # the first residual design
    "residual-warmup": {"mode": "residual", "residual_design": "linear", "warmup": 0.1, "lr": 3e-2},
    "residual-memory": {"mode": "residual"},                               # the default since
    "residual-memory-layer2": {"mode": "residual", "layer": 2},
}


def _evaluate(name: str, overrides: dict) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("OPERATORS_THREADS", "1")))
    import lds as bench
    from stride_viz.config import FitConfig
    from stride_viz.data.models import load_model
    from stride_viz.data.pools import load_pool
    from stride_viz.engine import Stride
    from stride_viz.evaluation import metrics as ev
    from stride_viz.evaluation.baselines import PeakRss
    from stride_viz.evaluation.retrain import open_inputs

    if not (bench.MODEL_DIR / "config.json").exists():
        bench.step_model()
    _, pool, queries, _ = open_inputs(bench.GT_DIR)
    gt = ev.read_ground_truth(bench.GT_DIR)
    dev = ev.query_split([q.id for q in queries])
    lm = load_model(str(bench.MODEL_DIR), device="cpu")
    config = FitConfig(**overrides)
    queries = [bench._fit_query(q, lm.tokenizer, config.max_length) for q in queries]
    run_dir = WORK / name
    with PeakRss() as rss:
        t0 = time.perf_counter()
        run = Stride.create_or_open(run_dir, lm, pool, config)
        run.fit()
        fit = time.perf_counter() - t0
        state = json.loads((run_dir / "fit" / "state.json").read_text())
        fit = max(fit, float(state.get("seconds", 0.0)))
        t0 = time.perf_counter()
        atts = run.attribute([q for q, d in zip(queries, dev) if d], continuations=False)
        per = (time.perf_counter() - t0) / max(1, len(atts))
    scores = np.stack([a.scores for a in atts]).astype(np.float32)
    res = ev.lds(scores, gt.train_subsets, gt.test_loss[:, dev])
    facts = {f.query.id: f.source_ids for f in load_pool("fortunes+facts").facts}
    ids = [q.id for q, d in zip(queries, dev) if d]
    fact_rows = [i for i, q in enumerate(ids) if q in facts]
    held_rows = [i for i in range(len(ids)) if i not in set(fact_rows)]
    # the benchmark's pool holds some of each fact's documents only
    relevant = [[pool.index_of(s) for s in facts[ids[i]] if s in pool.ids] for i in fact_rows]
    hist = state.get("history", [])
    return {"design": name, "overrides": overrides, "n_dev_queries": len(ids),
            "lds_dev": float(res.per_query.mean()),
            "lds_dev_heldout": float(res.per_query[held_rows].mean()),
            "lds_dev_facts": float(res.per_query[fact_rows].mean()),
            "lds_dev_per_query": [float(x) for x in res.per_query],
            "recall_at_10_dev_facts": ev.recall_at_k(scores[fact_rows], relevant, 10),
            "mrr_dev_facts": ev.mrr(scores[fact_rows], relevant),
            "final_fidelity": float(np.mean([h["fid"] for h in hist[-10:]])) if hist else None,
            "seconds_fit": fit, "seconds_per_query": per, "peak_rss_mb": rss.peak_mb,
            "operators_mb": (run_dir / "operators.safetensors").stat().st_size / 2**20,
            "settings": config.to_dict()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--designs", default=",".join(DESIGNS))
    a = ap.parse_args()
    out = RESULTS / "operators.json"
    old = json.loads(out.read_text()) if out.exists() else {}
    rows = {r["design"]: r for r in old.get("rows", [])}
    for name in a.designs.split(","):
        if name not in DESIGNS:
            raise SystemExit(f"unknown design {name!r}; known: {', '.join(DESIGNS)}")
        t0 = time.monotonic()
        load = os.getloadavg()[0]
        row = _evaluate(name, DESIGNS[name])
        row.update(wall_seconds=round(time.monotonic() - t0, 1), load_average_at_start=round(load, 2))
        rows[name] = row
        print(f"[operators] {name:18s} LDS dev {row['lds_dev']:+.3f} (held-out {row['lds_dev_heldout']:+.3f}, "
              f"facts {row['lds_dev_facts']:+.3f}) recall@10 {row['recall_at_10_dev_facts']:.2f} "
              f"fit {row['seconds_fit']:.0f}s query {row['seconds_per_query']:.2f}s "
              f"ops {row['operators_mb']:.1f} MB", file=sys.stderr, flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "what": "STRIDE operator designs on the LDS benchmark (benchmarks/lds.py's pool, model and "
                    "ground truth), development queries only (metrics.query_split); LDS = mean "
                    "per-query Spearman against retraining; recall@10 and MRR on the development "
                    "planted-fact queries; times on 2 shared CPU cores, 1 torch thread",
            "rows": list(rows.values())}, indent=1))


if __name__ == "__main__":
    main()
