"""Does residual mode learn? The fidelity loss of one short fit per setting, on the demo model.

400 documents of ``fortunes+facts``, 32 subsets of d = 2, 8 epochs, linearity off: small
enough that every setting takes well under a minute. For each setting the mean fidelity loss
(nats per scored token, steered by the example's own operators) of the first and the last
five steps. Logits mode is the reference (a row of every run): an operator that can raise its
subset's tokens lowers this loss a lot.

    python benchmarks/residual_probe.py                 # every setting -> results/residual_probe.json
    python benchmarks/residual_probe.py --only logits,residual-bias   # some (their rows replaced)
    python benchmarks/residual_probe.py --recall logits,residual-memory   # planted-fact recall

With ``--recall``, each design of RECALL (FitConfig defaults plus its overrides) is fitted on
the whole pool (3,251 documents, K 1024) of the shipped demo model and explains the 34 planted-
fact queries: recall@10 and MRR of the facts' own documents, as ``python -m stride_viz demo``
reports them (rows under ``recall`` in the same file).
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
OUT = ROOT / "benchmarks" / "results" / "residual_probe.json"

BASE = {"subsets": 32, "per_example": 2, "epochs": 8, "linearity_weight": 0, "lr": 1e-2, "layer": 1,
        "rank": 8, "warmup": 0.0}
# name -> (FitConfig overrides on BASE, SteeringOperators options)
SETTINGS = {
    "logits": ({"mode": "logits"}, {}),
    "factored": ({"mode": "factored"}, {}),
    "residual": ({"mode": "residual", "residual_design": "linear"}, {}),
    "residual-lr1e-1": ({"mode": "residual", "lr": 1e-1, "residual_design": "linear"}, {}),
    "residual-layer2-lr3e-3": ({"mode": "residual", "layer": 2, "lr": 3e-3, "residual_design": "linear"}, {}),
    "residual-layer2": ({"mode": "residual", "layer": 2, "residual_design": "linear"}, {}),
    "residual-lr3e-2-warmup": ({"mode": "residual", "lr": 3e-2, "warmup": 0.1, "residual_design": "linear"}, {}),
    "residual-warmup": ({"mode": "residual", "warmup": 0.1, "residual_design": "linear"}, {}),
    "residual-init0.1": ({"mode": "residual", "residual_design": "linear"}, {"init_scale": 0.1}),
    "residual-init0.5": ({"mode": "residual", "residual_design": "linear"}, {"init_scale": 0.5}),
    "residual-bias": ({"mode": "residual", "residual_design": "linear"}, {"bias": True}),
    "residual-own-basis": ({"mode": "residual", "residual_design": "linear"}, {"own_basis": True}),
    "residual-bias-own-basis": ({"mode": "residual", "residual_design": "linear"}, {"bias": True, "own_basis": True}),
    "residual-r64": ({"mode": "residual", "rank": 64, "residual_design": "linear"}, {}),
    "residual-r128": ({"mode": "residual", "rank": 128, "residual_design": "linear"}, {}),
    "residual-r256": ({"mode": "residual", "rank": 256, "residual_design": "linear"}, {}),
    "residual-r64-lr3e-3": ({"mode": "residual", "rank": 64, "lr": 3e-3, "residual_design": "linear"}, {}),
    "residual-r64-lr3e-2": ({"mode": "residual", "rank": 64, "lr": 3e-2, "residual_design": "linear"}, {}),
    "residual-r64-32-epochs": ({"mode": "residual", "rank": 64, "epochs": 32, "residual_design": "linear"}, {}),
    "residual-r64-layer2": ({"mode": "residual", "rank": 64, "layer": 2, "residual_design": "linear"}, {}),
    "residual-r128-layer2": ({"mode": "residual", "rank": 128, "layer": 2, "residual_design": "linear"}, {}),
    "residual-r64-layer2-bias": ({"mode": "residual", "rank": 64, "layer": 2, "residual_design": "linear"}, {"bias": True}),
    "residual-r64-layer2-lr3e-3": ({"mode": "residual", "rank": 64, "layer": 2, "lr": 3e-3, "residual_design": "linear"}, {}),
    "residual-memory-r64-layer2": ({"mode": "residual", "memory_slots": 64, "layer": 2, "residual_design": "memory"}, {}),
    "residual-memory-r256-layer2": ({"mode": "residual", "memory_slots": 256, "layer": 2, "residual_design": "memory"}, {}),
    "residual-memory-r256": ({"mode": "residual", "memory_slots": 256, "residual_design": "memory"}, {}),
    "residual-memory-r8": ({"mode": "residual", "memory_slots": 8, "residual_design": "memory"}, {}),
    "residual-memory-r64": ({"mode": "residual", "memory_slots": 64, "residual_design": "memory"}, {}),
    "residual-memory-r64-bias": ({"mode": "residual", "memory_slots": 64, "residual_design": "memory"}, {"bias": True}),
    "residual-layer2-bias": ({"mode": "residual", "layer": 2, "residual_design": "linear"}, {"bias": True}),
    "residual-32-epochs": ({"mode": "residual", "epochs": 32, "residual_design": "linear"}, {}),
    "logits-32-epochs": ({"mode": "logits", "epochs": 32}, {}),
}
# name -> FitConfig overrides on FitConfig()'s defaults, for --recall
RECALL = {
    "logits": {"mode": "logits"},
    "residual-linear": {"mode": "residual", "residual_design": "linear"},
    "residual-linear-r64-layer2": {"mode": "residual", "residual_design": "linear", "rank": 64, "layer": 2},
    "residual-memory": {"mode": "residual"},
    "residual-memory-layer2": {"mode": "residual", "layer": 2},
    "residual-memory-layer2-8-epochs": {"mode": "residual", "layer": 2, "epochs": 8},
    "residual-memory-layer2-256-slots": {"mode": "residual", "layer": 2, "memory_slots": 256},
    "residual-memory-layer2-lr3e-3": {"mode": "residual", "layer": 2, "lr": 3e-3},
    # the linear design in closed form (solver 'gauss-newton': a K-FAC step per operator)
    "residual-gn-layer2": {"mode": "residual", "residual_design": "linear", "solver": "gauss-newton", "layer": 2},
    "residual-gn-r32-layer2": {"mode": "residual", "residual_design": "linear", "solver": "gauss-newton",
                               "rank": 32, "layer": 2},
    "residual-gn-r64-layer2": {"mode": "residual", "residual_design": "linear", "solver": "gauss-newton",
                               "rank": 64, "layer": 2},
    "residual-gn-r64-d0.01-layer2": {"mode": "residual", "residual_design": "linear", "solver": "gauss-newton",
                                    "rank": 64, "damping": 0.01, "layer": 2},
    "residual-gn-r128-layer2": {"mode": "residual", "residual_design": "linear", "solver": "gauss-newton",
                                "rank": 128, "layer": 2},
    "residual-gn-r64": {"mode": "residual", "residual_design": "linear", "solver": "gauss-newton", "rank": 64},
    "logits-gn": {"mode": "logits", "solver": "gauss-newton"},
}


def recall(name: str, loaded) -> dict:
    import tempfile
    from stride_viz.config import FitConfig
    from stride_viz.data.pools import fact_queries, load_pool
    from stride_viz.demo import fact_metrics
    from stride_viz.engine import Stride

    pool = load_pool("fortunes+facts")
    work = ROOT / "benchmarks" / "work"
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="residual-recall-", dir=work) as tmp:
        run = Stride.create_or_open(tmp, loaded, pool, FitConfig(**RECALL[name]))
        t0 = time.perf_counter()
        run.fit()
        fit = time.perf_counter() - t0
        fid = [h["fid"] for h in json.loads((run.store.fit_dir / "state.json").read_text())["history"]]
        metrics = fact_metrics(pool, run.attribute(fact_queries(pool), continuations=False))
    # the closed form (solver 'gauss-newton') trains nothing: it has no fidelity curve
    curve = ({"fidelity_first": round(float(np.mean(fid[:10])), 4),
              "fidelity_last": round(float(np.mean(fid[-10:])), 4)} if fid else {})
    return {"design": name, "overrides": RECALL[name], "layer": run.lm.cut.layer, **metrics, **curve,
            "seconds_fit": round(fit, 1)}


def run(name: str, loaded, pool) -> dict:
    import torch
    from stride_viz.config import FitConfig
    from stride_viz.method.cache import build_cache, tokenize_pool
    from stride_viz.method.frozen import FrozenLM
    from stride_viz.method.subsets import design_subsets
    from stride_viz.method.training import Trainer

    overrides, options = SETTINGS[name]
    config = FitConfig(**{**BASE, **overrides})
    lm = FrozenLM(loaded.model, layer=config.layer)
    tokens = tokenize_pool(loaded.tokenizer, pool.prompts, pool.completions, config.max_length)
    cache = build_cache(lm, tokens, config.mode)
    trainer = Trainer(lm, cache, design_subsets(len(pool), config.subsets, config.per_example, seed=0),
                      config, operator_options=options)
    t0 = time.perf_counter()
    trainer.train()
    fid = [h["fid"] for h in trainer.history]
    keys = ("mode", *BASE) + (("residual_design",) if config.mode == "residual" else ()) + (
        ("memory_slots",) if config.mode == "residual" and config.residual_design == "memory" else ())
    return {"setting": name, **{k: getattr(config, k) for k in keys}, "operator_options": options,
            "parameters_per_operator": sum(p.numel() for p in trainer.operators.parameters()) // config.subsets,
            "fidelity_first": round(float(np.mean(fid[:5])), 4), "fidelity_last": round(float(np.mean(fid[-5:])), 4),
            "steps": len(fid), "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(SETTINGS), help="comma-separated setting names")
    ap.add_argument("--recall", default="", help="comma-separated designs of RECALL (instead of --only)")
    args = ap.parse_args()
    table = RECALL if args.recall else SETTINGS
    names = (args.recall or args.only).split(",")
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown name(s) {unknown}; known: {', '.join(table)}")
    import torch

    torch.set_num_threads(1)
    from stride_viz.data.models import load_model
    from stride_viz.data.pools import load_pool

    loaded = load_model("demo:tiny", device="cpu")
    pool = load_pool("fortunes+facts").subset(range(400))
    old = json.loads(OUT.read_text()) if OUT.exists() else {}
    rows = {r.get("setting"): r for r in old.get("rows", []) if "setting" in r}
    recalls = {r["design"]: r for r in old.get("recall", [])}
    for name in names:
        if args.recall:
            recalls[name] = recall(name, loaded)
        else:
            rows[name] = run(name, loaded, pool)
        print(json.dumps(recalls[name] if args.recall else rows[name]), flush=True)
        OUT.write_text(json.dumps({"what": __doc__.strip().splitlines()[0], "setting": {
            "model": "demo:tiny", "pool": "first 400 of fortunes+facts", **BASE},
            "rows": [rows[n] for n in SETTINGS if n in rows],
            "recall_setting": "FitConfig defaults + overrides, the whole fortunes+facts pool, 34 fact queries",
            "recall": [recalls[n] for n in RECALL if n in recalls]}, indent=1))


if __name__ == "__main__":
    main()
