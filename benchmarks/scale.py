"""STRIDE at real sizes: real vocabularies, and pools from a thousand to a million examples.

Three parts, each (setting, method) in its own process, peak memory read from the kernel
(``ru_maxrss`` of that process):

- ``vocab``: random-weight models of real shapes with their real vocabularies, 1,000
  fortunes, STRIDE with the default settings next to the fastest gradient peers (LoGra,
  kronfluence EK-FAC) on the same model, pool and queries. GPT-2 small: 12 x 768, vocabulary
  50,257; Qwen2.5-0.5B: 24 x 896, vocabulary 151,936 (on CPU with a smaller pool,
  ``--qwen-pool``). The tokenizer is a byte-level BPE trained on the pool (8,192 tokens);
  the other ids of the model's vocabulary are placeholders that the text never produces,
  but the LM head and every log-sum-exp still run over the whole vocabulary. Recorded: fit
  time, peak RSS, run-folder size after the fit, 3 queries from a fresh process (``python -m
  stride_viz attribute``: model loading included), and the peers' one-off and per-query time.
- ``pool``: the demo model (``demo:tiny``) on pools of 1,000 to 1,000,000 examples (the
  fortunes, repeated with a numbered suffix beyond their 11,085): set-up (pool, subset
  design, tokenisation, cache) time, time per training step over ``--steps`` steps, peak RSS.
  Pools of 100,000 and more use ``cache="stream"`` (no pass over the pool first).

    python benchmarks/scale.py --parts vocab,pool
    python benchmarks/scale.py --parts vocab --methods stride --limit 2400
    python benchmarks/scale.py --parts vocab --shapes gpt2-small --methods stride:gn   # closed-form operators
    python benchmarks/scale.py --parts vocab --shapes gpt2-small --methods stride:rgn  # the same, residual mode
    python benchmarks/scale.py --parts cold     # only re-time the 3 cold queries of the runs

Results: benchmarks/results/scale.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / "work" / "scale"
SHAPES = {
    "gpt2-small": dict(family="gpt2", n_layer=12, n_embd=768, n_head=12, vocab_size=50257),
    "qwen2.5-0.5b": dict(family="qwen2", num_hidden_layers=24, hidden_size=896, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, vocab_size=151936),
}
# STRIDE's settings by method name: the defaults, and the operators in closed form
# "layer": "last" -> the shape's own depth (the residual shift after the last block)
STRIDE_VARIANTS = {"stride": {}, "stride:gn": {"solver": "gauss-newton"},
                   "stride:rgn": {"solver": "gauss-newton", "mode": "residual", "residual_design": "linear",
                                  "rank": 64, "damping": 0.01, "layer": "last"}}
TOKENIZER_VOCAB = 8192
MAX_LENGTH = 64
N_QUERIES = 4
POOL_SIZES = (1_000, 10_000, 100_000, 1_000_000)
STREAM_FROM = 100_000
PEERS = ("logra", "ekfac")


def _log(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _fortunes(n: int):
    """The first n fortunes; beyond the 11,085 the same texts again with ' (#j)' appended."""
    from stride_viz.data.pools import load_pool, make_pool

    base = load_pool("fortunes")
    ids, texts = [], []
    j = 0
    while len(ids) < n:
        for i in range(len(base)):
            if len(ids) == n:
                break
            ids.append(base.ids[i] if j == 0 else f"{base.ids[i]}#{j}")
            texts.append(base.completions[i] if j == 0 else f"{base.completions[i]} (#{j})")
        j += 1
    return make_pool(f"fortunes-x{n}", ids, [""] * n, texts)


def _queries(pool):
    """N_QUERIES held-out-style queries: fortunes after the pool, split after three words."""
    from stride_viz.data.pools import Query, load_pool

    base = load_pool("fortunes")
    out = []
    for i in range(len(base) - 1, 0, -1):
        words = base.completions[i].split(" ")
        if len(words) >= 8 and base.ids[i] not in set(pool.ids[:2000]):
            out.append(Query(f"q{len(out)}", " ".join(words[:3]), " " + " ".join(words[3:12])))
        if len(out) == N_QUERIES:
            return out
    return out


def _model_dir(shape: str, n_pool: int) -> Path:
    """A random-weight model of this shape with a tokenizer trained on the pool, saved once."""
    out = WORK / f"model-{shape}"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    from stride_viz.data.models import BOS, train_tokenizer

    pool = _fortunes(n_pool)
    tok = train_tokenizer(list(pool.completions), TOKENIZER_VOCAB)
    spec = dict(SHAPES[shape])
    family = spec.pop("family")
    torch.manual_seed(0)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_positions=1024, **ids, **spec))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(max_position_embeddings=1024, tie_word_embeddings=True,
                                             **ids, **spec))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    _log(f"{shape}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
         f"tokenizer {len(tok)} of {spec['vocab_size']} ids ({BOS} as BOS) -> {out}")
    return out


def _du_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------ workers
def worker_vocab(shape: str, method: str, n_pool: int) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("SCALE_THREADS", "1")))
    from stride_viz.data.models import load_model

    pool = _fortunes(n_pool)
    queries = _queries(pool)
    lm = load_model(str(_model_dir(shape, n_pool)), device="cpu")
    n_params = sum(p.numel() for p in lm.model.parameters())
    if not method.startswith("stride"):
        from stride_viz.evaluation.baselines import run_method
        res = run_method(method, lm.model, lm.tokenizer, pool, queries, max_length=MAX_LENGTH)
        return {"n_params": n_params, **res.summary(), "peak_rss_mb": _peak_rss_mb()}
    from stride_viz.config import FitConfig
    from stride_viz.engine import Stride

    run_dir = WORK / f"run-{shape}-{n_pool}{method[len('stride'):].replace(':', '-')}"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = dict(STRIDE_VARIANTS[method])
    if overrides.get("layer") == "last":
        overrides["layer"] = lm.model.config.get_text_config().num_hidden_layers
    config = FitConfig(max_length=MAX_LENGTH, **overrides)
    stages: dict[str, float] = {}
    t0 = time.perf_counter()

    def progress(stage, fraction, eta, message=""):
        stages.setdefault(stage, time.perf_counter() - t0)

    run = Stride.create_or_open(run_dir, lm, pool, config)
    run.fit(progress=progress)
    fit = time.perf_counter() - t0
    t1 = time.perf_counter()
    run.attribute(queries, continuations=False)
    per = (time.perf_counter() - t1) / len(queries)
    return {"n_params": n_params, "seconds_fit": fit, "seconds_setup": stages.get("fit", fit),
            "seconds_per_query": per, "peak_rss_mb": _peak_rss_mb(),
            "run_folder_mb": _du_mb(run_dir), "operators_mb": run.store.operators_path.stat().st_size / 2**20,
            "n_columns": int(run.operators.out_dim), "settings": config.to_dict(), "run_dir": str(run_dir)}


def worker_pool(n_pool: int, steps: int) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("SCALE_THREADS", "1")))
    from stride_viz.config import FitConfig
    from stride_viz.data.models import load_model
    from stride_viz.engine import Stride

    lm = load_model("demo:tiny", device="cpu")
    t0 = time.perf_counter()
    pool = _fortunes(n_pool)
    t_pool = time.perf_counter() - t0
    run_dir = WORK / f"pool-{n_pool}"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = FitConfig(epochs=steps * FitConfig().batch_size / n_pool,
                       cache="stream" if n_pool >= STREAM_FROM else "auto",
                       checkpoint_every=10**6)
    marks: dict[str, float] = {}

    def progress(stage, fraction, eta, message=""):
        marks.setdefault(stage, time.perf_counter())

    t1 = time.perf_counter()
    run = Stride.create_or_open(run_dir, lm, pool, config)
    t_design = time.perf_counter() - t1
    run.fit(progress=progress)
    t_end = time.perf_counter()
    state = json.loads((run_dir / "fit" / "state.json").read_text())
    fit_start = marks.get("fit", t_end)
    n_steps = int(state["step"])
    return {"n_pool": n_pool, "cache": config.cache, "steps": n_steps,
            "seconds_pool": t_pool, "seconds_design": t_design,
            "seconds_setup": t_pool + t_design + (fit_start - t1 - t_design),
            "seconds_per_step": (t_end - fit_start) / max(1, n_steps),
            "peak_rss_mb": _peak_rss_mb()}


# ------------------------------------------------------------------------------ driver
def _spawn(args: list[str], limit: float) -> dict:
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", *args], timeout=limit,
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "limit": limit, "error": f"did not finish within {limit:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode == 0 and lines:
        return {"status": "ok", "wall_seconds": round(time.monotonic() - t0, 1), **json.loads(lines[-1][7:])}
    err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    if proc.returncode == -9:
        err.append("killed by signal 9 (the kernel's out-of-memory killer on this machine)")
    return {"status": "failed", "error": (err or [f"exit code {proc.returncode}"])[-1][:400]}


def _queries_cold(run_dir: str, n_pool: int, limit: float) -> dict:
    """3 queries from a fresh process with `python -m stride_viz attribute` (model loading
    included), with its default continuations and with --no-continuations."""
    qfile = WORK / "queries3.jsonl"
    pool = _fortunes(n_pool)
    qfile.write_text("".join(json.dumps({"id": q.id, "prompt": q.prompt, "completion": q.completion}) + "\n"
                             for q in _queries(pool)[:3]))
    out = {"status": "ok", "load_average_before_cold_queries": round(os.getloadavg()[0], 2)}
    for name, extra in (("seconds_3_queries_cold", []),
                        ("seconds_3_queries_cold_no_continuations", ["--no-continuations"])):
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "stride_viz", "attribute", "--run", run_dir, "--queries",
                               str(qfile), "--out", str(WORK / "queries3-out"), *extra],
                              timeout=limit, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            return {"status": "failed", "error": proc.stderr.strip().splitlines()[-1][:300]}
        out[name] = time.monotonic() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="vocab,pool")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--methods", default="stride," + ",".join(PEERS))
    ap.add_argument("--pool", type=int, default=1000, help="fortunes in the vocab part (GPT-2 shape)")
    ap.add_argument("--qwen-pool", type=int, default=500, help="fortunes in the vocab part (Qwen shape)")
    ap.add_argument("--pool-sizes", default=",".join(str(n) for n in POOL_SIZES))
    ap.add_argument("--steps", type=int, default=100, help="training steps timed in the pool part")
    ap.add_argument("--limit", type=float, default=3600, help="seconds per (setting, method)")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        kind, *rest = a.worker
        out = worker_vocab(rest[0], rest[1], int(rest[2])) if kind == "vocab" else worker_pool(int(rest[0]), int(rest[1]))
        print("RESULT " + json.dumps(out, default=str))
        return
    WORK.mkdir(parents=True, exist_ok=True)
    out_file = RESULTS / "scale.json"
    report = json.loads(out_file.read_text()) if out_file.exists() else {}
    report["what"] = ("STRIDE at real sizes on 2 shared CPU cores, 1 torch thread per process; peak RSS "
                      "= ru_maxrss of the method's process; see benchmarks/scale.py's docstring")
    if "vocab" in a.parts.split(","):
        rows = {(r["shape"], r["method"]): r for r in report.get("vocab", [])}
        for shape in a.shapes.split(","):
            n_pool = a.pool if shape == "gpt2-small" else a.qwen_pool
            _model_dir(shape, n_pool)
            for m in a.methods.split(","):
                load = os.getloadavg()[0]
                _log(f"vocab {shape} {m}: running (pool {n_pool})")
                row = {"shape": shape, "method": m, "n_pool": n_pool, "load_average_at_start": round(load, 2),
                       **_spawn(["vocab", shape, m, str(n_pool)], a.limit)}
                if m in STRIDE_VARIANTS and row["status"] == "ok":
                    row.update(_queries_cold(row["run_dir"], n_pool, a.limit))
                rows[(shape, m)] = row
                _log(f"vocab {shape} {m}: {json.dumps({k: v for k, v in row.items() if k != 'settings'})}")
                _save(out_file, report, "vocab", list(rows.values()))
    if "cold" in a.parts.split(","):        # re-measure the cold queries of the existing runs
        rows = json.loads(out_file.read_text()).get("vocab", []) if out_file.exists() else []
        for row in rows:
            if row["method"] in STRIDE_VARIANTS and row.get("status") == "ok" and Path(row["run_dir"]).exists():
                row.update(_queries_cold(row["run_dir"], row["n_pool"], a.limit))
                _log(f"cold queries {row['shape']}: {row.get('seconds_3_queries_cold')}")
        _save(out_file, report, "vocab", rows)
    if "pool" in a.parts.split(","):
        rows = {r["n_pool"]: r for r in report.get("pool", []) if "n_pool" in r}
        for n in (int(x) for x in a.pool_sizes.split(",")):
            _log(f"pool {n}: running ({a.steps} steps)")
            row = {"n_pool": n, **_spawn(["pool", str(n), str(a.steps)], a.limit)}
            rows[n] = row
            _log(f"pool {n}: {json.dumps(row)}")
            _save(out_file, report, "pool", [rows[k] for k in sorted(rows)])


def _save(out_file: Path, report: dict, part: str, rows: list[dict]) -> None:
    """Write this part's rows into the results file, re-read first: another run of this script
    may have written the other part meanwhile."""
    current = json.loads(out_file.read_text()) if out_file.exists() else {}
    current.update({k: v for k, v in report.items() if k not in ("vocab", "pool", "vocab_target")})
    current[part] = rows
    if part == "vocab":
        current["vocab_target"] = _vocab_target(rows)
    out_file.write_text(json.dumps(current, indent=1))


def _vocab_target(rows: list[dict]) -> dict:
    """The issue's targets at the GPT-2 shape: fit <= 25 min, RSS <= 4 GiB, folder <= 300 MB,
    3 cold queries <= 30 s, and STRIDE's fit + 4 queries <= 1/3 of the fastest gradient peer's."""
    by = {r["method"]: r for r in rows if r["shape"] == "gpt2-small"}
    s = by.get("stride")
    if not s or s.get("status") != "ok":
        return {}
    total = s["seconds_fit"] + N_QUERIES * s["seconds_per_query"]
    peers = {}
    for m in PEERS:
        r = by.get(m)
        if r and r.get("status") == "ok":
            peers[m] = {"seconds_total": r["seconds_fit"] + N_QUERIES * r["seconds_per_query"], "lower_bound": False}
        elif r and r.get("status") == "timeout":
            peers[m] = {"seconds_total": r["limit"], "lower_bound": True}
    best = min(peers, key=lambda m: peers[m]["seconds_total"]) if peers else None
    ratio = total / peers[best]["seconds_total"] if best else None
    return {"fit_minutes": s["seconds_fit"] / 60, "fit_ok": s["seconds_fit"] <= 25 * 60,
            "peak_rss_gib": s["peak_rss_mb"] / 1024, "rss_ok": s["peak_rss_mb"] <= 4096,
            "run_folder_mb": s["run_folder_mb"], "folder_ok": s["run_folder_mb"] <= 300,
            "seconds_3_queries_cold": s.get("seconds_3_queries_cold"),
            "seconds_3_queries_cold_no_continuations": s.get("seconds_3_queries_cold_no_continuations"),
            "queries_ok": s.get("seconds_3_queries_cold") is not None and s["seconds_3_queries_cold"] <= 30,
            "stride_seconds_total": total, "peers": peers, "fastest_gradient_peer": best,
            "stride_over_fastest_peer": ratio, "ratio_is_upper_bound": bool(best and peers[best]["lower_bound"]),
            "ratio_ok": None if ratio is None else ratio <= 1 / 3}


if __name__ == "__main__":
    main()
