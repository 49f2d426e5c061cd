"""Engine benchmark: fit time, time per new query and peak memory as the pool and K grow, and
the planted-fact recall@10 / MRR of the default settings on ``fortunes+facts``.

    python benchmarks/engine.py                 # full grid (tens of minutes on 2 cores)
    python benchmarks/engine.py --quick         # a smaller grid
    python benchmarks/engine.py --only quality  # just the planted-fact quality of the defaults
    python benchmarks/engine.py --quick --only pool subsets --epochs 0.25   # scaling only

Prints one JSON document (and writes it to --out, default benchmarks/results/engine.json).
Each measurement runs in a fresh subprocess so that its peak RSS is its own. Times are wall
seconds and CPU seconds of that process; fits use a short schedule (``--epochs``) for the
scaling grid, since fit time is linear in epochs (the quality row uses the defaults).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _measure(pool_size: int, subsets: int, epochs: float | None, queries: int) -> dict:
    """One fit + `queries` attributions on the demo model; runs inside the child process."""
    import torch
    from stride_viz.config import FitConfig
    from stride_viz.demo import fact_metrics
    from stride_viz.engine import Stride
    from stride_viz.data.models import load_model
    from stride_viz.data.pools import fact_queries, load_pool, make_pool

    if pool_size <= len(load_pool("fortunes+facts")):
        pool = load_pool("fortunes+facts", limit=pool_size)
    else:   # grow past the built-in pool with more fortunes (facts stay where they are)
        base, extra = load_pool("fortunes+facts"), load_pool("fortunes")
        have = set(base.ids)
        rows = [(i, p, c) for i, p, c in zip(extra.ids, extra.prompts, extra.completions) if i not in have]
        rows = rows[:pool_size - len(base)]
        pool = make_pool("fortunes+facts+more", list(base.ids) + [r[0] for r in rows],
                         list(base.prompts) + [r[1] for r in rows],
                         list(base.completions) + [r[2] for r in rows], facts=base.facts)
    model = load_model("demo:tiny")
    cfg = FitConfig(subsets=subsets, **({"epochs": epochs} if epochs else {}))
    with tempfile.TemporaryDirectory() as tmp:
        run = Stride.create_or_open(Path(tmp) / "run", model, pool, cfg)
        t0, c0 = time.monotonic(), time.process_time()
        run.fit()
        fit_s, fit_cpu = time.monotonic() - t0, time.process_time() - c0
        qs = fact_queries(pool)[:queries] if queries else fact_queries(pool)
        run.attribute(qs[:1], continuations=False)            # warm-up (recoverer set-up)
        t0 = time.monotonic()
        atts = run.attribute(qs, continuations=False)
        per_query = (time.monotonic() - t0) / len(qs)
        metrics = fact_metrics(pool, atts)
    return {"pool": len(pool), "subsets": subsets, "epochs": cfg.epochs, "mode": cfg.mode,
            "seconds_fit": fit_s, "cpu_seconds_fit": fit_cpu, "seconds_per_query": per_query,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads(), **metrics}


def _child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                         text=True, cwd=ROOT)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed",
                "args": args}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller grid")
    p.add_argument("--only", nargs="+", choices=["quality", "pool", "subsets"],
                   default=["quality", "pool", "subsets"], help="parts to run (default: all)")
    p.add_argument("--epochs", type=float, default=1.0, help="fit epochs of the scaling grid")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "engine.json"))
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        n, k, epochs, q = a.child
        print(json.dumps(_measure(int(n), int(k), float(epochs) or None, int(q))))
        return
    pools = [1000, 2000, 5000] if a.quick else [1000, 2000, 5000, 10000]
    ks = [128, 256, 512] if a.quick else [128, 256, 512, 1024]
    result: dict = {"machine": {"cpus": __import__("os").cpu_count(),
                                "load_average_at_start": __import__("os").getloadavg()},
                    "started": time.ctime(), "scaling_epochs": a.epochs}
    from stride_viz.data.pools import load_pool
    n_demo = str(len(load_pool("fortunes+facts")))      # the whole built-in demo pool
    if "quality" in a.only:
        from stride_viz.config import FitConfig

        result["quality_defaults"] = _child([n_demo, str(FitConfig().subsets), "0", "0"])
    if "pool" in a.only:
        result["pool_scaling"] = [_child([str(n), "512", str(a.epochs), "5"]) for n in pools]
    if "subsets" in a.only:
        result["subset_scaling"] = [_child([n_demo, str(k), str(a.epochs), "5"]) for k in ks]
    text = json.dumps(result, indent=1)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
