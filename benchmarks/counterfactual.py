"""Counterfactual removal (the STRIDE paper's top-k test): does removing what a method calls a
query's proponents really raise the query's loss?

For a sample of test queries of the LDS ground truth and each method, the model is retrained
with the ground truth's recipe on the whole pool **minus the k examples with the highest
scores** for that query (k = 10, 50, 100), and minus k random examples for comparison; the
query's completion loss under the retrained model minus its loss under the base model
(trained on the whole pool with the same recipe and seed) is the **loss rise** (nats; higher
= the removed examples mattered more). Scores: the committed ``benchmarks/results/lds_scores``
of the methods; random removals are seeded by (query, k). Each retrain is one JSON line in
``--log`` (resumable: a rerun skips what is recorded), ``--assemble`` writes
``benchmarks/results/counterfactual.json``.

    python benchmarks/counterfactual.py --queries 4 --methods stride,ekfac,random --k 10,100
    python benchmarks/counterfactual.py --assemble

Each retrain is a full-pool training (~45-90 s on one core): the sample is small, and the
report says how small.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
GT_DIR = RESULTS / "lds_ground_truth"
MODEL_DIR = ROOT / "benchmarks" / "work" / "lds_model"
LOG = ROOT / "benchmarks" / "work" / "counterfactual.jsonl"
OUT = RESULTS / "counterfactual.json"


def sample_queries(meta: dict, n: int) -> list[int]:
    """n test queries, alternating planted facts and held-out text, in query order."""
    from stride_viz.evaluation import stats

    dev = stats.development_mask(meta)
    ids = [q["id"] for q in meta["queries"]]
    facts = [i for i in range(len(ids)) if not dev[i] and ids[i].startswith("fact")]
    held = [i for i in range(len(ids)) if not dev[i] and not ids[i].startswith("fact")]
    out = []
    for a, b in zip(held, facts):
        out += [a, b]
    return out[:n]


def removed(method: str, scores: dict, q: int, k: int, n_pool: int) -> np.ndarray:
    if method == "random":
        return np.random.default_rng([q, k]).choice(n_pool, size=k, replace=False)
    return np.argsort(-scores[method][q], kind="stable")[:k]


def run(n_queries: int, methods: list[str], ks: list[int], log: Path) -> None:
    import torch

    from stride_viz.data.models import load_model
    from stride_viz.evaluation import metrics as ev
    from stride_viz.evaluation.retrain import open_inputs, query_losses, train_recipe

    torch.set_num_threads(1)
    meta, pool, queries, tok = open_inputs(GT_DIR)
    ids = [q.id for q in queries]
    report = json.loads((RESULTS / "lds.json").read_text())
    scores = {m: ev.load_scores(ROOT / report["methods"][m]["scores_file"], len(ids), ids)
              for m in methods if m != "random"}
    base = load_model(str(MODEL_DIR), device="cpu")
    base_loss = query_losses(base.model, base.tokenizer, queries, meta["recipe"]["max_length"])
    done = set()
    if log.exists():
        done = {(r["query"], r["method"], r["k"]) for r in map(json.loads, log.read_text().splitlines()) if r}
    sample = sample_queries(meta, n_queries)
    order = [(k, q, m) for k in ks for q in sample for m in methods]
    for k, q, m in order:
        if (ids[q], m, k) in done:
            continue
        drop = set(removed(m, scores, q, k, len(pool)).tolist())
        keep = [i for i in range(len(pool)) if i not in drop]
        t0 = time.monotonic()
        model = train_recipe(meta["recipe"], tok, pool.subset(keep))
        loss = query_losses(model, tok, [queries[q]], meta["recipe"]["max_length"])[0]
        row = {"query": ids[q], "method": m, "k": k, "loss": float(loss), "base_loss": float(base_loss[q]),
               "rise": float(loss - base_loss[q]), "removed": sorted(int(i) for i in drop),
               "seconds": round(time.monotonic() - t0, 1)}
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"k {k:3d} {ids[q]:24s} {m:7s} rise {row['rise']:+.3f} nats ({row['seconds']:.0f} s)", flush=True)


def assemble(log: Path, out: Path) -> dict:
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    methods = sorted({r["method"] for r in rows})
    ks = sorted({r["k"] for r in rows})
    table = {}
    for m in methods:
        table[m] = {}
        for k in ks:
            rs = [r["rise"] for r in rows if r["method"] == m and r["k"] == k]
            if rs:
                table[m][str(k)] = {"mean_rise": float(np.mean(rs)), "n_queries": len(rs),
                                    "min": float(np.min(rs)), "max": float(np.max(rs))}
    # paired against random on the same queries
    for m in methods:
        for k in ks:
            pairs = [(r["rise"], s["rise"]) for r in rows for s in rows if r["method"] == m and s["method"] == "random"
                     and r["k"] == s["k"] == k and r["query"] == s["query"]]
            if pairs and m != "random" and str(k) in table[m]:
                table[m][str(k)]["minus_random"] = float(np.mean([a - b for a, b in pairs]))
    report = {
        "what": "Counterfactual removal: the rise of a test query's completion loss (nats) when the model "
                "is retrained with the LDS ground truth's recipe on the whole pool minus the method's k "
                "highest-scored examples for that query, against the base model trained on the whole pool; "
                "'random': k random examples removed (seeded by query and k). Higher = the removed "
                "examples mattered more.",
        "command": "python benchmarks/counterfactual.py (see its docstring)",
        "queries": sorted({r["query"] for r in rows}),
        "methods": table, "rows": rows,
        "note": "a small sample: each removal is one full-pool retrain (~45-90 s on one shared core)",
    }
    out.write_text(json.dumps(report, indent=1))
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=4, help="how many test queries (facts and held-out text alternate)")
    ap.add_argument("--methods", default="stride,ekfac,random")
    ap.add_argument("--k", default="10,50,100")
    ap.add_argument("--log", default=str(LOG))
    ap.add_argument("--assemble", action="store_true")
    a = ap.parse_args()
    if a.assemble:
        assemble(Path(a.log), OUT)
        return
    try:
        ks = [int(x) for x in a.k.split(",") if x]
    except ValueError:
        ap.error(f"--k must be comma-separated integers; got {a.k!r}")
    if a.queries < 1 or not ks or min(ks) < 1:
        ap.error("--queries and every --k must be >= 1")
    run(a.queries, [m for m in a.methods.split(",") if m], ks, Path(a.log))


if __name__ == "__main__":
    main()
