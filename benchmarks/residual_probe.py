"""Does residual mode learn? The fidelity loss of one short fit per setting, on the demo model.

400 documents of ``fortunes+facts``, 32 subsets of d = 2, 8 epochs, linearity off: small
enough that every setting takes a minute or two. For each setting the mean fidelity loss
(nats per scored token, steered by the example's own operators) of the first and the last
five steps. Logits mode is the reference: an operator that can raise its subset's tokens
lowers this loss a lot.

    python benchmarks/residual_probe.py       # -> benchmarks/results/residual_probe.json
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SETTINGS = [  # (mode, lr, layer, rank, warmup)
    ("logits", 1e-2, 1, 8, 0.0),
    ("residual", 1e-2, 1, 8, 0.0),
    ("residual", 1e-1, 1, 8, 0.0),
    ("residual", 3e-3, 2, 8, 0.0),
    ("residual", 1e-2, 2, 8, 0.0),
    ("residual", 1e-2, 2, 64, 0.0),
    ("residual", 3e-2, 1, 8, 0.1),
]


def main() -> None:
    import torch

    torch.set_num_threads(1)
    from stride_viz.config import FitConfig
    from stride_viz.data.models import load_model
    from stride_viz.data.pools import load_pool
    from stride_viz.method.cache import build_cache, tokenize_pool
    from stride_viz.method.frozen import FrozenLM
    from stride_viz.method.subsets import design_subsets
    from stride_viz.method.training import Trainer

    loaded = load_model("demo:tiny", device="cpu")
    pool = load_pool("fortunes+facts").subset(range(400))
    rows = []
    for mode, lr, layer, rank, warmup in SETTINGS:
        lm = FrozenLM(loaded.model, layer=layer)
        tokens = tokenize_pool(loaded.tokenizer, pool.prompts, pool.completions, 64)
        cache = build_cache(lm, tokens, mode)
        config = FitConfig(subsets=32, per_example=2, mode=mode, lr=lr, epochs=8, linearity_weight=0,
                           layer=layer, rank=rank, warmup=warmup)
        trainer = Trainer(lm, cache, design_subsets(len(pool), 32, 2, seed=0), config)
        t0 = time.perf_counter()
        trainer.train()
        fid = [h["fid"] for h in trainer.history]
        row = {"mode": mode, "lr": lr, "layer": layer, "rank": rank, "warmup": warmup,
               "fidelity_first": float(np.mean(fid[:5])), "fidelity_last": float(np.mean(fid[-5:])),
               "steps": len(fid), "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = ROOT / "benchmarks" / "results" / "residual_probe.json"
    out.write_text(json.dumps({"what": __doc__.strip().splitlines()[0], "setting": {
        "model": "demo:tiny", "pool": "first 400 of fortunes+facts", "subsets": 32, "per_example": 2,
        "epochs": 8, "linearity_weight": 0}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
