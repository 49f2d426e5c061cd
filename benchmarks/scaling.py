"""Cost of every attribution method as the model grows (time only, no LDS).

STRIDE's promise is that it never takes per-example gradients of all the model's parameters,
so its cost should grow more slowly with the model than the gradient peers'. This script
times, on GPT-2s of increasing size (random weights: the cost does not depend on them), a
small pool and a few queries:

- one-off: STRIDE's operator fit (engine defaults, ``FitConfig()``); the peers' caching of
  gradients / factors (see ``stride_viz.evaluation.baselines``);
- per query: STRIDE's responses + sparse recovery; the peers' attribute call, amortised over
  the queries (for TracIn and the IFs that recompute a pass over the pool per call, this part
  is the whole pass: see ``per_query_recomputes_pool_pass`` in the results).

Each (size, method) runs in its own process with a time limit; a method that runs out of time
or memory is reported as such. Results: benchmarks/results/scaling.json and scaling.html/png.

    python benchmarks/scaling.py [--sizes tiny,small,medium,large] [--methods stride,trak] [--pool 512] [--limit 600]
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
    "large": dict(n_layer=8, n_embd=768, n_head=12),   # ~58M
}
N_POOL = 512      # --pool
N_QUERIES = 4
MAX_LENGTH = 64
METHODS = ("stride", "random", "tfidf", "repsim", "trak", "tracin", "logra", "ekfac", "if-arnoldi")


def _inputs(n_pool: int = N_POOL):
    """The first ``n_pool`` documents of the benchmark pool and N_QUERIES of its queries."""
    from stride_viz.evaluation.retrain import open_inputs

    _, pool, queries, tok = open_inputs(ROOT / "benchmarks" / "results" / "lds_ground_truth")
    return pool.subset(range(n_pool)), queries[:N_QUERIES], tok


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


def worker(size: str, method: str, n_pool: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from stride_viz.evaluation.baselines import PeakRss, run_method
    from stride_viz.data.models import load_model

    pool, queries, _ = _inputs(n_pool)
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


def _out_of_budget(row: dict, limit: float) -> bool:
    """Ran out of time (with at least this limit) or of memory."""
    if row["status"] == "timeout":
        return row.get("limit", 0) >= limit
    return row["status"] == "failed" and "out-of-memory" in row.get("error", "")


def total_seconds(row: dict, n_queries: int) -> float:
    """One-off plus ``n_queries`` queries: what a user waits for to explain that many queries."""
    return row["seconds_fit"] + n_queries * row["seconds_per_query"]


def target_check(rows: list[dict], limit: float, n_queries: int) -> dict:
    """STRIDE's total against the fastest gradient peer at the largest size measured. A peer
    that ran out of time counts with ``limit`` seconds, a lower bound of its total."""
    by_size: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_size.setdefault(r["size"], {})[r["method"]] = r
    order = [s for s in SIZES if s in by_size and by_size[s].get("stride", {}).get("status") == "ok"]
    if not order:
        return {}
    size = order[-1]
    stride = total_seconds(by_size[size]["stride"], n_queries)
    peers = {}
    from stride_viz.evaluation.baselines import GRADIENT_METHODS

    for m in GRADIENT_METHODS:
        r = by_size[size].get(m)
        if r is None:
            continue
        if r["status"] == "ok":
            peers[m] = {"seconds_total": total_seconds(r, n_queries), "lower_bound": False}
        elif r["status"] == "timeout":
            peers[m] = {"seconds_total": r.get("limit", limit), "lower_bound": True}
        else:
            peers[m] = {"seconds_total": None, "lower_bound": False, "error": r.get("error")}
    timed = {m: v for m, v in peers.items() if v["seconds_total"] is not None}
    best = min(timed, key=lambda m: timed[m]["seconds_total"]) if timed else None
    ratio = stride / timed[best]["seconds_total"] if best else None
    return {"size": size, "n_queries": n_queries, "stride_seconds_total": stride, "peers": peers,
            "fastest_gradient_peer": best,
            "stride_over_fastest_peer": ratio,
            "ratio_is_upper_bound": bool(best and timed[best]["lower_bound"]),
            "target": "stride_over_fastest_peer <= 1/3",
            "met": None if ratio is None else bool(ratio <= 1 / 3)}


def _write(out_file: Path, rows: list[dict], a: argparse.Namespace) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps({
        "what": "wall time of each method's one-off part (seconds_fit) and per-query part "
                f"(seconds_per_query, amortised over {N_QUERIES} queries) on GPT-2s with random "
                f"weights, pool of {a.pool} documents, 1 torch thread per process; 2 CPU cores, "
                "the other one busy with one other single-threaded job",
        "n_pool": a.pool, "n_queries": N_QUERIES,
        "sizes": SIZES, "rows": rows,
        "target": target_check(rows, a.limit, N_QUERIES)}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--pool", type=int, default=N_POOL, help="pool documents (first N of the LDS pool)")
    ap.add_argument("--limit", type=float, default=600, help="seconds allowed per (size, method)")
    ap.add_argument("--no-skip", action="store_true",
                    help="also run a method on a size after it ran out of time on a smaller one")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(worker(a.worker[0], a.worker[1], int(a.worker[2])), default=str))
        return
    out_file = RESULTS / "scaling.json"
    old = json.loads(out_file.read_text()) if out_file.exists() else {}
    # rows measured on another pool size are not comparable: start afresh
    rows = old.get("rows", []) if old.get("n_pool") == a.pool else []
    for size in a.sizes.split(","):
        _model_dir(size)
        for m in a.methods.split(","):
            rows = [r for r in rows if not (r["size"] == size and r["method"] == m)]
            smaller = [(s, r) for s in list(SIZES)[:list(SIZES).index(size)] for r in rows
                       if r["size"] == s and r["method"] == m and _out_of_budget(r, a.limit)]
            if smaller and not a.no_skip:
                # its time and memory only grow with the model: it would run out again
                s, r = smaller[-1]
                rows.append({"size": size, "method": m, "status": "skipped", "n_params": None,
                             "error": f"not run: on the smaller '{s}' model: {r['error']} "
                                      "(--no-skip runs it anyway)"})
                print(f"[scaling] {size:6s} {m:10s} skipped (out of time or memory at {s})",
                      file=sys.stderr, flush=True)
                _write(out_file, rows, a)
                continue
            load = os.getloadavg()[0]
            t0 = time.monotonic()
            try:
                proc = subprocess.run([sys.executable, __file__, "--worker", size, m, str(a.pool)],
                                      timeout=a.limit, capture_output=True, text=True,
                                      env={**os.environ, "PYTHONPATH": str(ROOT)})
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
                row = {"size": size, "method": m, "status": "timeout", "limit": a.limit,
                       "error": f"did not finish within {a.limit:.0f} s"}
            row.setdefault("n_params", None)
            row["wall_seconds"] = round(time.monotonic() - t0, 1)
            row["load_average_at_start"] = round(load, 2)
            rows.append(row)
            print(f"[scaling] {size:6s} {m:10s} {row['status']:7s} "
                  + (f"fit {row['seconds_fit']:.1f}s per query {row['seconds_per_query']:.3f}s"
                     if row["status"] == "ok" else row["error"]), file=sys.stderr, flush=True)
            _write(out_file, rows, a)
    from stride_viz.app.eval_plots import scaling_figure

    sizes = {}
    for r in rows:  # a failed row has no n_params: take it from a sibling
        if r.get("n_params"):
            sizes[r["size"]] = r["n_params"]
    fig = scaling_figure([{**r, "n_params": sizes.get(r["size"], r.get("n_params"))} for r in rows
                          if r["status"] in ("ok", "timeout")])
    fig.write_html(RESULTS / "scaling.html", include_plotlyjs="cdn")
    try:
        fig.write_image(RESULTS / "scaling.png", width=900, height=500)
    except Exception as e:
        print(f"[scaling] png export unavailable ({type(e).__name__}); wrote scaling.html", file=sys.stderr)


if __name__ == "__main__":
    main()
