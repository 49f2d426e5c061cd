"""Loss curves of the LDS ground truth's training recipe: is the model trained to a plateau?

The held-out query loss (mean completion loss of the ground truth's queries, nats; held-out
fortunes and planted facts separately) of the recipe's GPT-2, measured while it trains, on
the whole pool (the base model) and on a 30% subset (subset 0 of the ground truth: what every
retrain sees). Two kinds of run, each appended as one JSON line to ``--log``:

- ``curve``: one long run (``--epochs``, cosine schedule over that length), the loss every
  half epoch: where the held-out loss stops falling and starts rising (over-fitting);
- ``end``: the recipe as it would be used, the loss after the schedule ends at ``--epochs``.

``--assemble`` writes ``benchmarks/results/lds_loss_curve.json`` from the log.

    python benchmarks/lds_loss_curve.py curve --on subset --epochs 40
    python benchmarks/lds_loss_curve.py curve --on full --epochs 30
    python benchmarks/lds_loss_curve.py end --on subset --epochs 8 10 12
    python benchmarks/lds_loss_curve.py --assemble
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LOG = ROOT / "benchmarks" / "work" / "lds_loss_curve.jsonl"
OUT = ROOT / "benchmarks" / "results" / "lds_loss_curve.json"
UNIFORM = None  # log(vocabulary size), filled in from the tokenizer


def run(kind: str, on: str, epochs: float, gt: Path, log: Path, recipe_over: dict) -> dict:
    import torch

    from stride_viz.evaluation.retrain import draw_subsets, init_model, open_inputs, query_losses, train_recipe

    torch.set_num_threads(1)
    meta, pool, queries, tok = open_inputs(gt)
    recipe = {**meta["recipe"], **recipe_over, "epochs": float(epochs)}
    data = pool if on == "full" else pool.subset(
        draw_subsets(len(pool), meta["n_subsets"], meta["fraction"], meta["seed"])[0])
    per_epoch = math.ceil(len(data) / recipe["batch_size"])
    steps = max(1, round(recipe["epochs"] * per_epoch))
    is_fact = np.array([q.id.startswith("fact") for q in queries])
    model = init_model(recipe, tok)
    t0 = time.monotonic()
    points, seen = [], [-1]

    def measure(step: int) -> dict:
        losses = query_losses(model, tok, queries, recipe["max_length"])
        model.train()
        return {"step": step, "epoch": round(step / per_epoch, 2), "loss": round(float(losses.mean()), 4),
                "heldout": round(float(losses[~is_fact].mean()), 4),
                "facts": round(float(losses[is_fact].mean()), 4)}

    def progress(stage, fraction, eta, message=""):
        step = round(fraction * steps)
        half = int(2 * step / per_epoch)   # StageTimer throttles calls: the first after each half epoch
        if kind == "curve" and half > seen[0]:
            seen[0] = half
            points.append(measure(step))

    train_recipe(recipe, tok, data, progress=progress, model=model)
    seconds = time.monotonic() - t0
    final = measure(steps)
    row = {"kind": kind, "on": on, "n_train": len(data), "epochs": recipe["epochs"], "steps": steps,
           "recipe": {k: recipe[k] for k in ("n_layer", "n_embd", "epochs", "batch_size", "lr", "seed")},
           "final": final, "points": points, "train_seconds": round(seconds, 1),
           "seconds_per_step": round(seconds / steps, 4), "uniform_loss": round(math.log(len(tok)), 4)}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{kind} {on} {epochs} epochs ({steps} steps, {seconds:.0f} s): query loss {final['loss']:.3f} "
          f"(held-out {final['heldout']:.3f}, facts {final['facts']:.3f})", flush=True)
    return row


def assemble(log: Path, out: Path, note: str) -> dict:
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    report = {
        "what": "Held-out query loss (mean next-token cross-entropy over each query's completion, nats; "
                "the LDS ground truth's 114 queries: 80 held-out fortunes + 34 planted facts) of the "
                "ground truth's recipe (GPT-2 from scratch, stride_viz.data.models.train_lm) against "
                "training length, on the whole pool and on a 30% subset (subset 0). 'curve': one long run "
                "measured every half epoch (its cosine schedule spans the whole run); 'end': the loss at "
                "the end of a run whose schedule ends there (the recipe as used).",
        "uniform_loss": rows[0]["uniform_loss"] if rows else None,
        "command": "python benchmarks/lds_loss_curve.py (see its docstring)",
        "note": note,
        "runs": rows,
    }
    out.write_text(json.dumps(report, indent=1))
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", nargs="?", choices=("curve", "end"))
    ap.add_argument("--on", choices=("full", "subset"), default="subset")
    ap.add_argument("--epochs", type=float, nargs="+", default=[10.0])
    ap.add_argument("--recipe", default="{}", help="JSON overriding recipe keys (lr, seed, ...)")
    ap.add_argument("--gt", default=str(ROOT / "benchmarks" / "results" / "lds_ground_truth"),
                    help="the ground truth whose pool, queries and tokenizer are used")
    ap.add_argument("--log", default=str(LOG))
    ap.add_argument("--assemble", action="store_true", help=f"write {OUT.relative_to(ROOT)} from the log")
    ap.add_argument("--note", default="")
    a = ap.parse_args()
    if a.assemble:
        assemble(Path(a.log), OUT, a.note)
        return
    if not a.kind:
        ap.error("give curve or end (or --assemble)")
    for e in a.epochs:
        if e <= 0:
            ap.error(f"--epochs must be > 0; got {e}")
        run(a.kind, a.on, e, Path(a.gt), Path(a.log), json.loads(a.recipe))


if __name__ == "__main__":
    main()
