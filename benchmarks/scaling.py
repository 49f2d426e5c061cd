"""Cost of every attribution method as the model grows (time only, no LDS).

STRIDE's promise is that it never takes per-example gradients of all the model's parameters,
so its cost should grow more slowly with the model than the gradient peers'. This script
times, on GPT-2s of increasing size (random weights: the cost does not depend on them), a
small pool and a few queries:

- one-off: STRIDE's operator fit (engine defaults, ``FitConfig()``); the peers' caching of
  gradients / factors (see ``stride_viz.baselines``);
- per query: STRIDE's responses + sparse recovery; the peers' attribute call, amortised over
  the queries (for TracIn and the IFs that recompute a pass over the pool per call, this part
  is the whole pass: see ``per_query_recomputes_pool_pass`` in the results).

Each (size, method) runs in its own process with a time limit; a method that runs out of time
or memory is reported as such. Results: benchmarks/results/scaling.json and scaling.html/png.

    python benchmarks/scaling.py [--sizes tiny,small,medium] [--methods stride,trak] [--limit 600]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / "work" / "scaling"
SIZES = {  # GPT-2 shapes; vocabulary 2048 (the demo tokenizer), context 64
    "tiny": dict(n_layer=2, n_embd=64, n_head=4),      # ~0.2M parameters
    "small": dict(n_layer=4, n_embd=256, n_head=4),    # ~3.7M
    "medium": dict(n_layer=6, n_embd=512, n_head=8),   # ~20M
}
N_POOL = 128
N_QUERIES = 4
MAX_LENGTH = 64
METHODS = ("stride", "random", "tfidf", "repsim", "trak", "tracin", "logra", "ekfac", "if-arnoldi")


def _inputs():
    """The first N_POOL documents of the benchmark pool and N_QUERIES of its queries."""
    from stride_viz.retrain import open_inputs

    _, pool, queries, tok = open_inputs(ROOT / "benchmarks" / "results" / "lds_ground_truth")
    return pool.subset(range(N_POOL)), queries[:N_QUERIES], tok


def _model_dir(size: str) -> Path:
    """A randomly initialised GPT-2 of this size saved with the benchmark tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    out = WORK / f"model-{size}"
    if (out / "config.json").exists():
        return out
    _, _, tok = _inputs()
    import torch

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=MAX_LENGTH, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **SIZES[size])
    GPT2LMHeadModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def worker(size: str, method: str) -> dict:
    import torch

    torch.set_num_threads(1)
    from stride_viz.baselines import PeakRss, run_method
    from stride_viz.models import load_model

    pool, queries, _ = _inputs()
    lm = load_model(str(_model_dir(size)), device="cpu")
    n_params = sum(p.numel() for p in lm.model.parameters())
    if method == "stride":
        from stride_viz.config import FitConfig
        from stride_viz.engine import Stride

        config = FitConfig(max_length=MAX_LENGTH)
        with tempfile.TemporaryDirectory() as tmp, PeakRss() as rss:
            t0 = time.perf_counter()
            run = Stride.create_or_open(Path(tmp) / "run", lm, pool, config)
            run.fit()
            fit = time.perf_counter() - t0
            t0 = time.perf_counter()
            run.attribute(queries, continuations=False)
            per = (time.perf_counter() - t0) / len(queries)
        return {"n_params": n_params, "seconds_fit": fit, "seconds_per_query": per,
                "peak_rss_mb": rss.peak_mb, "settings": config.to_dict()}
    res = run_method(method, lm.model, lm.tokenizer, pool, queries, max_length=MAX_LENGTH)
    return {"n_params": n_params, **res.summary()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--limit", type=float, default=600, help="seconds allowed per (size, method)")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(worker(*a.worker), default=str))
        return
    out_file = RESULTS / "scaling.json"
    rows = json.loads(out_file.read_text())["rows"] if out_file.exists() else []
    for size in a.sizes.split(","):
        _model_dir(size)
        for m in a.methods.split(","):
            rows = [r for r in rows if not (r["size"] == size and r["method"] == m)]
            t0 = time.monotonic()
            try:
                proc = subprocess.run([sys.executable, __file__, "--worker", size, m], timeout=a.limit,
                                      capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode == 0 and lines:
                    row = {"size": size, "method": m, "status": "ok", **json.loads(lines[-1][7:])}
                else:
                    lines_err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
                    errs = [ln for ln in lines_err if ("Error" in ln or "Exception" in ln)
                            and not ln.startswith(" ")]
                    err = (errs or lines_err or [f"exit code {proc.returncode}"])[-1]
                    if proc.returncode == -9 and not errs:
                        err = "killed by signal 9 (the kernel's out-of-memory killer on this machine)"
                    row = {"size": size, "method": m, "status": "failed", "error": err[:300]}
            except subprocess.TimeoutExpired:
                row = {"size": size, "method": m, "status": "timeout",
                       "error": f"did not finish within {a.limit:.0f} s"}
            row.setdefault("n_params", None)
            row["wall_seconds"] = round(time.monotonic() - t0, 1)
            rows.append(row)
            print(f"[scaling] {size:6s} {m:10s} {row['status']:7s} "
                  + (f"fit {row['seconds_fit']:.1f}s per query {row['seconds_per_query']:.3f}s"
                     if row["status"] == "ok" else row["error"]), file=sys.stderr, flush=True)
            RESULTS.mkdir(parents=True, exist_ok=True)
            out_file.write_text(json.dumps({
                "what": "wall time of each method's one-off part and per-query part (amortised over "
                        f"{N_QUERIES} queries) on GPT-2s with random weights, pool of {N_POOL} "
                        "documents, 1 torch thread, 2 shared CPU cores",
                "sizes": SIZES, "rows": rows}, indent=1))
    from stride_viz.eval_plots import scaling_figure

    sizes = {}
    for r in rows:  # a failed row has no n_params: take it from a sibling
        if r.get("n_params"):
            sizes[r["size"]] = r["n_params"]
    fig = scaling_figure([{**r, "n_params": sizes.get(r["size"], r.get("n_params"))} for r in rows
                          if r["status"] == "ok"])
    fig.write_html(RESULTS / "scaling.html", include_plotlyjs="cdn")
    try:
        fig.write_image(RESULTS / "scaling.png", width=900, height=500)
    except Exception as e:
        print(f"[scaling] png export unavailable ({type(e).__name__}); wrote scaling.html", file=sys.stderr)


if __name__ == "__main__":
    main()
