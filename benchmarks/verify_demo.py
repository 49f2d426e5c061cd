"""Verify by retraining on a small demo setting: for planted-fact queries, does retraining
without STRIDE's top-k proponents raise the query's loss more than removing k random examples
or reseeding?

The setting (ours, sized for a shared 2-core CPU): the first ``--docs`` documents of the
built-in ``fortunes+facts`` pool (fortunes plus the planted-fact documents among them), a
GPT-2 of the demo:tiny shape trained from scratch by ``train_demo_model`` (tiny preset with
``--epochs``), a STRIDE run with FitConfig defaults except ``--subsets``, then
``stride_viz.downstream.verify.verify`` for each of the first ``--queries`` fact queries whose
facts survive in the pool (k = ``--k``, 3 random draws, 1 other seed).

    nice -n 10 python benchmarks/verify_demo.py        # writes benchmarks/results/verify_demo.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stride_viz.config import FitConfig  # noqa: E402
from stride_viz.data.pools import fact_queries, load_pool  # noqa: E402

WORK = ROOT / "benchmarks" / "work" / "verify_demo"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=600)
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--subsets", type=int, default=256)
    ap.add_argument("--queries", type=int, default=2)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "verify_demo.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    t_all, load_start = time.monotonic(), os.getloadavg()
    from stride_viz.data.models import load_model, train_demo_model
    from stride_viz.downstream.verify import verify
    from stride_viz.engine import Stride
    pool = load_pool("fortunes+facts", limit=a.docs)
    model_dir = WORK / f"model-{pool.hash[:8]}-e{a.epochs}"
    t0 = time.monotonic()
    if not (model_dir / "config.json").exists():
        train_demo_model(pool, model_dir, preset="tiny", seed=0, epochs=a.epochs)
    seconds = {"model": time.monotonic() - t0}
    t0 = time.monotonic()
    run = Stride.create_or_open(WORK / f"run-{pool.hash[:8]}-K{a.subsets}", load_model(str(model_dir), device="cpu"),
                                pool, FitConfig(subsets=a.subsets, device="cpu"))
    run.fit()
    queries = fact_queries(pool)[: a.queries]
    run.attribute(queries, continuations=False)
    seconds["fit_and_attribute"] = time.monotonic() - t0
    results = []
    for q in queries:
        t0 = time.monotonic()
        r = verify(run.store.root, q.id, k=a.k, random_seeds=3, noise_seeds=1)
        sources = set(next(f.source_ids for f in pool.facts if f.query.id == q.id))
        results.append({"query": q.id, "n_sources_in_pool": len(sources),
                        "sources_in_top_k": len(sources & set(r["top"]["ids"])),
                        "loss_model": r["loss_model"], "loss_full": r["loss_full"],
                        "baseline_reproduces_model": r["baseline_reproduces_model"],
                        "top_change": r["top"]["change"], "top_predicted_change": r["top"]["predicted_change"],
                        "random_changes": r["random"]["changes"], "random_mean": r["random"]["mean"],
                        "random_std": r["random"]["std"], "seed_noise_changes": r["seed_noise"]["changes"],
                        "seconds": round(time.monotonic() - t0, 1)})
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    out = {"what": "verify by retraining: change of a planted-fact query's loss (nats per completion token) "
                   "after retraining without its top-k STRIDE proponents, without k random examples (3 draws) "
                   "and on the full pool with another seed; > 0: removing them made the completion less likely",
           "command": "python " + " ".join(shlex.quote(x) for x in [sys.argv[0]] + list(argv if argv is not None
                                                                                        else sys.argv[1:])),
           "settings": {"docs": len(pool), "model": "demo:tiny shape, train_demo_model", "epochs": a.epochs,
                        "subsets": a.subsets, "k": a.k, "random_seeds": 3, "noise_seeds": 1},
           "results": results, "seconds": {k: round(v, 1) for k, v in seconds.items()}
           | {"total": round(time.monotonic() - t_all, 1)},
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": 1,
                       "load_average_at_start": load_start, "load_average_at_end": os.getloadavg(),
                       "note": "2 CPU cores shared with other processes; run under nice -n 10"}}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
