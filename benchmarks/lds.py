"""LDS benchmark of STRIDE against its peers on the built-in demo setting.

One command builds (or reuses) everything, in steps that each skip what is already done:

1. prepare: the pool (built-in ``fortunes+facts`` minus held-out fortunes), >=100 queries
   (held-out fortunes split into prompt/completion, and every planted-fact query), a
   byte-level BPE tokenizer and the training recipe -> a ground-truth directory;
2. model: the GPT-2 trained from scratch on the whole pool with that recipe;
3. retrain: the ground truth, >=64 models retrained on random 30% subsets (resumable; more
   processes can help: ``python -m stride_viz.evaluation.retrain GT_DIR --shard 1/2``);
4. methods: every peer in ``stride_viz.evaluation.baselines`` and STRIDE (engine defaults), one process
   per method so that peak memory is per method; scores saved as .npy;
5. report: every method's scores, compressed (float16, rows scaled), into the committed
   ``benchmarks/results/lds_scores/<method>.npz``; ``benchmarks/results/lds.json`` (LDS
   computed from those files, on all queries and on each side of the fixed development/test
   split of ``metrics.query_split``) and ``benchmarks/results/lds.png`` (test queries).
   A method whose scores are gone (an earlier run's) keeps its entry from the previous report.

    python benchmarks/lds.py                      # everything
    python benchmarks/lds.py --steps retrain      # only some steps
    python benchmarks/lds.py --methods trak,tfidf # only some methods

Where things go: the ground truth and the compressed scores (committed) in benchmarks/results/;
the model, the STRIDE run and the float32 scores in benchmarks/work/ (gitignored).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stride_viz.evaluation import metrics as ev  # noqa: E402
from stride_viz.evaluation.baselines import GRADIENT_METHODS, METHODS  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / "work"
GT_DIR = RESULTS / "lds_ground_truth"
MODEL_DIR = WORK / "lds_model"
SCORES = WORK / "lds_scores"
COMMITTED_SCORES = RESULTS / "lds_scores"
RUN_DIR = WORK / "lds_stride_run"

# Sized so that one retraining takes ~20 s on a shared 2-core CPU (64 of them in ~25 min).
RECIPE = dict(n_layer=2, n_embd=64, n_head=4, n_positions=64, epochs=2.0, batch_size=32,
              lr=3e-3, max_length=64, seed=0)
VOCAB = 2048
N_HELDOUT = 80
N_SUBSETS = 64
FRACTION = 0.3
ALL_METHODS = ("stride",) + METHODS
# The benchmark's settings for peers where they differ from baselines.default_settings: the
# library's own documented heuristics, not values tuned here (LDS_PEER_SETTINGS overrides).
PEER_SETTINGS = {"ekfac": {"damping_factor": None}}  # kronfluence: 0.1 x mean eigenvalue
# Seeds torch before each method: kronfluence's EK-FAC samples labels (true Fisher) and
# differs from run to run otherwise.
TORCH_SEED = 0


def _log(msg: str) -> None:
    print(f"[lds {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_inputs(seed: int = 0):
    """(pool, queries): fortunes+facts minus N_HELDOUT fortunes; those fortunes (prompt = the
    first three words, completion = the rest) and the fact queries are the queries."""
    from stride_viz.data.pools import Query, fact_queries, load_pool

    full = load_pool("fortunes+facts")
    sources = {s for f in full.facts for s in f.source_ids}
    rng = np.random.default_rng(seed)
    candidates = [i for i in range(len(full)) if full.ids[i] not in sources
                  and not full.prompts[i] and len(full.completions[i].split()) >= 6]
    held = set(rng.choice(candidates, size=N_HELDOUT, replace=False).tolist())
    pool = full.subset([i for i in range(len(full)) if i not in held])
    queries = []
    for i in sorted(held):
        words = full.completions[i].split(" ")
        queries.append(Query(id=f"heldout-{full.ids[i]}", prompt=" ".join(words[:3]),
                             completion=" " + " ".join(words[3:])))
    return pool, queries + fact_queries(pool)


def step_prepare() -> None:
    from stride_viz.data.models import train_tokenizer
    from stride_viz.evaluation.retrain import prepare

    if (GT_DIR / "metadata.json").exists():
        _log(f"ground truth prepared already: {GT_DIR}")
        return
    pool, queries = build_inputs()
    tok = train_tokenizer([pool.text(i) for i in range(len(pool))], VOCAB)
    prepare(GT_DIR, pool, queries, tok, RECIPE, n_subsets=N_SUBSETS, fraction=FRACTION, seed=0)
    _log(f"prepared {GT_DIR}: pool {len(pool)}, queries {len(queries)}")


def step_model() -> None:
    from stride_viz.evaluation.retrain import open_inputs, train_recipe

    if (MODEL_DIR / "config.json").exists():
        _log(f"model exists: {MODEL_DIR}")
        return
    meta, pool, queries, tok = open_inputs(GT_DIR)
    t0 = time.monotonic()
    model = train_recipe(meta["recipe"], tok, pool)
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(MODEL_DIR)
    tok.save_pretrained(MODEL_DIR)
    (MODEL_DIR / "train_seconds.txt").write_text(f"{time.monotonic() - t0:.1f}\n")
    _log(f"model trained in {time.monotonic() - t0:.0f} s -> {MODEL_DIR}")


def step_retrain() -> None:
    from stride_viz.progress import print_progress
    from stride_viz.evaluation.retrain import fill

    fill(GT_DIR, (0, 1), progress=print_progress)


VARIANTS = WORK / "lds_variants.json"


def _variant(method: str) -> tuple[dict, dict]:
    """FitConfig and RecoveryConfig overrides of 'stride' (defaults) or 'stride:<name>'
    (an ablation registered with --variant)."""
    if method == "stride":
        return {}, {}
    if method == "stride:backprojection":
        return {}, {}
    spec = json.loads(VARIANTS.read_text())[method.split(":", 1)[1]]
    return spec.get("fit", {}), spec.get("recovery", {})


def _fit_query(q, tokenizer, max_tokens: int):
    """The query as the ground truth scored it: texts longer than the model's context were cut
    to ``max_tokens`` tokens (BOS included) there, so cut the completion the same way here
    (the engine refuses over-long queries instead of cutting them)."""
    from stride_viz.data.pools import Query

    p = tokenizer(q.prompt, add_special_tokens=False)["input_ids"] if q.prompt else []
    c = tokenizer(q.completion, add_special_tokens=False)["input_ids"]
    room = max_tokens - 1 - len(p)
    if len(c) <= room:
        return q
    return Query(id=q.id, prompt=q.prompt, completion=tokenizer.decode(c[:room]))


def _stride_scores(method: str) -> dict:
    """STRIDE (engine defaults, or an ablation variant): fit (one-off), then every query."""
    from stride_viz.evaluation.baselines import PeakRss
    from stride_viz.config import FitConfig, RecoveryConfig
    from stride_viz.engine import Stride
    from stride_viz.data.models import load_model
    from stride_viz.evaluation.retrain import open_inputs

    import hashlib

    _, pool, queries, _ = open_inputs(GT_DIR)
    lm = load_model(str(MODEL_DIR), device="cpu")
    fit_over, rec_over = _variant(method)
    config, recovery = FitConfig(**fit_over), RecoveryConfig(**rec_over)
    # one run directory per fit setting: variants that change only the recovery share a fit
    run_dir = RUN_DIR if not fit_over else RUN_DIR.with_name(
        RUN_DIR.name + "-" + hashlib.sha1(json.dumps(fit_over, sort_keys=True).encode()).hexdigest()[:8])
    queries = [_fit_query(q, lm.tokenizer, config.max_length) for q in queries]
    with PeakRss() as rss:
        t0 = time.perf_counter()
        run = Stride.create_or_open(run_dir, lm, pool, config)
        run.fit()
        fit = time.perf_counter() - t0
        t0 = time.perf_counter()
        atts = run.attribute(queries, recovery, continuations=False)
        per = (time.perf_counter() - t0) / len(queries)
    scores = np.stack([a.scores for a in atts]).astype(np.float32)
    fit_state = json.loads((run_dir / "fit" / "state.json").read_text())
    # a resumed or reused fit took its time in an earlier process: report the recorded time
    fit = max(fit, float(fit_state.get("seconds", 0.0)))
    return {"scores": scores, "seconds_fit": fit, "seconds_per_query": per, "peak_rss_mb": rss.peak_mb,
            "settings": {"fit": config.to_dict(), "recovery": recovery.to_dict(),
                         "overrides": {"fit": fit_over, "recovery": rec_over},
                         "note": "engine defaults (FitConfig(), RecoveryConfig()) + overrides"}}


def _backprojection(queries) -> dict:
    """STRIDE's fast estimate (no Lasso): w_i = (1/d) sum_{k containing i} (y_k - mean y), read
    from the default run's attributions (run 'stride' first)."""
    rows = [np.load(RUN_DIR / "attributions" / q.id / "backprojection.npy") for q in queries]
    info = json.loads((SCORES / "stride.json").read_text())
    return {"scores": np.stack(rows).astype(np.float32), "seconds_fit": info["seconds_fit"],
            "seconds_per_query": info["seconds_per_query"], "peak_rss_mb": info["peak_rss_mb"],
            "settings": {**info["settings"], "note": "back-projection of the default run's "
                         "responses instead of the Lasso (times: the default run's, an upper bound)"}}


def run_one_method(method: str) -> None:
    """Worker (own process): compute one method's scores and save them."""
    import torch

    torch.set_num_threads(int(os.environ.get("LDS_THREADS", "1")))
    torch.manual_seed(TORCH_SEED)
    from stride_viz.evaluation.retrain import open_inputs

    meta, pool, queries, _ = open_inputs(GT_DIR)
    if method == "stride:backprojection":
        out = _backprojection(queries)
    elif method.startswith("stride"):
        out = _stride_scores(method)
    else:
        from stride_viz.evaluation.baselines import run_method
        from stride_viz.data.models import load_model

        lm = load_model(str(MODEL_DIR), device="cpu")
        # e.g. LDS_PEER_SETTINGS='{"if-arnoldi": {"precompute_data_ratio": 0.1}}'
        over = {**PEER_SETTINGS.get(method, {}),
                **json.loads(os.environ.get("LDS_PEER_SETTINGS", "{}")).get(method, {})}
        res = run_method(method, lm.model, lm.tokenizer, pool, queries,
                         max_length=meta["recipe"]["max_length"], settings=over)
        out = {"scores": res.scores, **res.summary()}
        out["settings"] = {**out["settings"], "torch_seed": TORCH_SEED,
                           "differs_from_default_settings": over}
    SCORES.mkdir(parents=True, exist_ok=True)
    np.save(SCORES / f"{method}.npy", out.pop("scores"))
    (SCORES / f"{method}.json").write_text(json.dumps(out, indent=1, default=str))


def step_methods(methods, force: bool = False, timeout: float = 3600) -> None:
    for m in methods:
        if (SCORES / f"{m}.npy").exists() and not force:
            _log(f"{m}: scores exist, skipped")
            continue
        _log(f"{m}: running")
        t0 = time.monotonic()
        try:
            proc = subprocess.run([sys.executable, __file__, "--worker", m], timeout=timeout,
                                  capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            SCORES.mkdir(parents=True, exist_ok=True)
            (SCORES / f"{m}.failed").write_text(f"timeout: did not finish within {timeout:.0f} s\n")
            _log(f"{m}: TIMEOUT after {timeout:.0f} s")
            continue
        if proc.returncode != 0:
            err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            # the exception line, not a progress bar printed after it
            errs = [ln for ln in err if ("Error" in ln or "Exception" in ln or "Failed" in ln)
                    and not ln.startswith(" ")]
            msg = (errs or err or [f"exit code {proc.returncode}"])[-1]
            if proc.returncode == -9 and not errs:
                msg = ("killed by signal 9 (on this machine: the kernel's out-of-memory killer; "
                       "see dmesg)")
            (SCORES / f"{m}.stderr.txt").parent.mkdir(parents=True, exist_ok=True)
            (SCORES / f"{m}.stderr.txt").write_text(proc.stderr[-20000:])
            SCORES.mkdir(parents=True, exist_ok=True)
            (SCORES / f"{m}.failed").write_text(msg + "\n")
            _log(f"{m}: FAILED ({msg})")
        else:
            (SCORES / f"{m}.failed").unlink(missing_ok=True)
            _log(f"{m}: done in {time.monotonic() - t0:.0f} s")


def step_report() -> dict:
    gt = ev.read_ground_truth(GT_DIR)
    meta = gt.metadata
    queries = meta["queries"]
    from stride_viz.evaluation.retrain import open_inputs

    _, pool, _, _ = open_inputs(GT_DIR)
    from stride_viz.data.pools import load_pool

    # planted facts: relevant pool indices of each fact query (by id, through the full pool)
    facts = {f.query.id: f.source_ids for f in load_pool("fortunes+facts").facts}
    fact_rows = [q for q, item in enumerate(queries) if item["id"] in facts]
    relevant = [[pool.index_of(s) for s in facts[queries[q]["id"]]] for q in fact_rows]
    heldout_rows = [q for q in range(len(queries)) if q not in set(fact_rows)]
    ids = [item["id"] for item in queries]
    dev = ev.query_split(ids)
    is_fact = np.isin(np.arange(len(queries)), fact_rows)
    groups = {"heldout": ~is_fact, "facts": is_fact}
    previous = _previous_methods()
    methods = {}
    variants = sorted({p.stem for ext in ("npy", "failed") for p in SCORES.glob(f"stride:*.{ext}")}
                      if SCORES.exists() else [])
    for m in dict.fromkeys(list(ALL_METHODS) + variants + list(previous)):
        old, failed = previous.get(m), SCORES / f"{m}.failed"
        committed = COMMITTED_SCORES / f"{m.replace(':', '-')}.npz"
        if (SCORES / f"{m}.npy").exists():
            # LDS from the committed (16-bit) copy, so that the repository reproduces lds.json
            scores = ev.save_scores(committed, ev.load_scores(SCORES / f"{m}.npy", len(ids)), ids)
            info = json.loads((SCORES / f"{m}.json").read_text())
        elif old and old.get("scores_file") == _rel(committed) and committed.exists():
            # e.g. a fresh clone: the committed scores and what the previous report said of their run
            scores = ev.load_scores(committed, len(ids), ids)
            info = {k: old[k] for k in ("seconds_fit", "seconds_per_query", "peak_rss_mb", "settings")
                    if k in old}
        elif failed.exists() and not (old and old["status"] == "ok"):
            methods[m] = {"status": "failed", "error": failed.read_text().strip(),
                          "settings": _settings_of(m)}
            continue
        elif old:
            methods[m] = _carried(old, failed)
            continue
        else:
            continue
        res = ev.lds(scores, gt.train_subsets, gt.test_loss)
        methods[m] = {"status": "ok", **res.to_dict(),
                      "lds_mean_heldout": float(res.per_query[heldout_rows].mean()),
                      "lds_mean_facts": float(res.per_query[fact_rows].mean()),
                      **ev.split_means(res.per_query, dev, groups),
                      "recall_at_10": ev.recall_at_k(scores[fact_rows], relevant, 10),
                      "mrr": ev.mrr(scores[fact_rows], relevant)}
        for side, mask in (("test", ~dev), ("dev", dev)):
            keep = [k for k, q in enumerate(fact_rows) if mask[q]]
            rows, rel = [fact_rows[k] for k in keep], [relevant[k] for k in keep]
            methods[m][f"recall_at_10_{side}"] = ev.recall_at_k(scores[rows], rel, 10)
            methods[m][f"mrr_{side}"] = ev.mrr(scores[rows], rel)
        methods[m].update({**info, "scores_file": _rel(committed)})
    old, new = previous.get("stride"), methods.get("stride")
    if old and new and old["status"] == new["status"] == "ok" and old.get("settings") != new.get("settings"):
        # the defaults changed (their scores file now holds the new ones): keep the earlier
        # defaults' numbers as a row of the ablation, the reference of the variants run with them
        methods["stride:previous-defaults"] = _carried({**old, "scores_file": None}, failed=None)
    for r in methods.values():
        if r["status"] == "ok" and "lds_mean_test" not in r:  # entries of earlier reports
            r.update(ev.split_means(r["lds_per_query"], dev, groups))
    report = {
        "what": "Linear Datamodeling Score (Spearman, per query, between the sum of a method's "
                "scores over a retrained subset and minus the query's loss under the model "
                "retrained on it; higher is better, 0 = no information), planted-fact recall@10 "
                "and MRR (fact queries only), wall time (one-off fit, and per query amortised "
                "over a batch of all queries) and peak resident memory of the method's process.",
        "setting": {"pool": meta["pool"], "n_queries": len(queries), "n_fact_queries": len(fact_rows),
                    "n_heldout_queries": len(heldout_rows), "n_subsets": len(gt.train_subsets),
                    "fraction": meta.get("fraction"), "recipe": meta["recipe"],
                    "loss": meta.get("loss"),
                    "model_train_seconds": _read_float(MODEL_DIR / "train_seconds.txt"),
                    "machine": "2 shared CPU cores, torch threads 1 per method",
                    "split": {"rule": "stride_viz.evaluation.metrics.query_split(query ids): settings "
                                      "are chosen on the development queries, results reported on "
                                      "the test queries",
                              "n_dev": int(dev.sum()), "n_test": int((~dev).sum()),
                              "n_dev_facts": int((dev & is_fact).sum()),
                              "n_test_facts": int((~dev & is_fact).sum())},
                    "query_group": ["facts" if f else "heldout" for f in is_fact]},
        "ground_truth": str(GT_DIR.relative_to(ROOT)),
        "scores": str(COMMITTED_SCORES.relative_to(ROOT)) + "/<method>.npz (metrics.load_scores)",
        "methods": methods,
        "target": target_check(methods, dev),
        "ablation": ablation_table(methods, dev),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lds.json").write_text(json.dumps(report, indent=1))
    _plot(report, ~dev)
    _log(f"wrote {RESULTS / 'lds.json'}")
    for m, r in methods.items():
        if r["status"] == "ok":
            _log(f"{m:11s} LDS test {r['lds_mean_test']:+.3f} ± {r['lds_std_test']:.3f} "
                 f"(held-out {r['lds_mean_test_heldout']:+.3f} / facts {r['lds_mean_test_facts']:+.3f}), "
                 f"dev {r['lds_mean_dev']:+.3f}, all {r['lds_mean']:+.3f}  recall@10 {r['recall_at_10']:.2f}"
                 f"  MRR {r['mrr']:.2f}  fit {r['seconds_fit']:.1f}s  per query {r['seconds_per_query']:.3f}s"
                 + ("" if r.get("scores_file") else "  (earlier run, scores not kept)"))
        else:
            _log(f"{m:11s} FAILED: {r['error']}")
    return report


def paired_difference(a: list, b: list) -> dict:
    """Mean of the per-query differences a - b and its standard error (queries paired)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return {"mean": float(d.mean()), "stderr": float(d.std(ddof=1) / np.sqrt(d.size))}


def target_check(methods: dict, dev: np.ndarray) -> dict:
    """STRIDE (defaults) against the best peer library method by mean LDS on the test queries
    (dev: bool (n_queries,), True = development query)."""
    peers = {m: r for m, r in methods.items() if m in GRADIENT_METHODS and r["status"] == "ok"}
    stride = methods.get("stride")
    if not peers or not stride or stride["status"] != "ok":
        return {}
    best = max(peers, key=lambda m: peers[m]["lds_mean_test"])
    test = ~dev
    diff = paired_difference(np.asarray(stride["lds_per_query"])[test],
                             np.asarray(peers[best]["lds_per_query"])[test])
    return {"queries": "test", "best_peer": best, "best_peer_lds": peers[best]["lds_mean_test"],
            "stride_lds": stride["lds_mean_test"], "stride_minus_best_peer": diff,
            "target": "stride_lds >= best_peer_lds",
            "met": stride["lds_mean_test"] >= peers[best]["lds_mean_test"]}


def ablation_table(methods: dict, dev: np.ndarray) -> list[dict]:
    """Every STRIDE variant: how its recorded settings differ from today's defaults, its LDS
    (all queries, and the development queries on which settings are chosen), and its paired
    difference to the defaults' LDS; best on the development queries first. A variant of an
    earlier run lists under ``not_recorded`` the settings its record lacks (those of the code
    it ran with)."""
    from stride_viz.config import FitConfig, RecoveryConfig

    base_fit, base_rec = FitConfig().to_dict(), RecoveryConfig().to_dict()
    ref = methods.get("stride")
    rows = []
    for m, r in methods.items():
        if not m.startswith("stride") or r["status"] != "ok":
            continue
        fit, rec = r["settings"].get("fit", {}), r["settings"].get("recovery", {})
        changes = {k: v for k, v in fit.items() if k != "device" and base_fit.get(k) != v}
        changes.update({f"recovery.{k}": v for k, v in rec.items() if base_rec.get(k) != v})
        if m == "stride:backprojection":
            changes["recovery"] = "back-projection instead of the Lasso"
        row = {"method": m, "changes_from_defaults": changes,
               "not_recorded": sorted(k for k in base_fit if k != "device" and k not in fit),
               "scores_kept": bool(r.get("scores_file")),
               "lds_mean": r["lds_mean"], "lds_std": r["lds_std"], "lds_mean_heldout": r["lds_mean_heldout"],
               "lds_mean_facts": r["lds_mean_facts"], "lds_mean_dev": r["lds_mean_dev"],
               "lds_std_dev": r["lds_std_dev"], "lds_mean_dev_heldout": r["lds_mean_dev_heldout"],
               "lds_mean_dev_facts": r["lds_mean_dev_facts"], "seconds_fit": r["seconds_fit"],
               "seconds_per_query": r["seconds_per_query"]}
        if ref and ref["status"] == "ok" and m != "stride":
            a, b = np.asarray(r["lds_per_query"]), np.asarray(ref["lds_per_query"])
            row["minus_defaults"] = paired_difference(a, b)
            row["minus_defaults_dev"] = paired_difference(a[dev], b[dev])
        rows.append(row)
    return sorted(rows, key=lambda row: -row["lds_mean_dev"])


def _previous_methods() -> dict:
    """The methods of the lds.json this run replaces (empty if there is none)."""
    try:
        return json.loads((RESULTS / "lds.json").read_text()).get("methods", {})
    except (OSError, json.JSONDecodeError):
        return {}


def _carried(old: dict, failed) -> dict:
    """A previous report's entry for a method whose scores are no longer on disk: its numbers
    stay, marked as not recomputable (and the failure of a later attempt, if any)."""
    entry = {**old}
    kept = ROOT / (entry.get("scores_file") or "")
    if not (kept.is_file() and kept.is_relative_to(COMMITTED_SCORES)):  # a work file is another run's
        entry["scores_file"] = None
    if entry["status"] == "ok" and not entry.get("scores_file"):
        entry["carried_over"] = ("measured by an earlier run whose scores were not kept: these "
                                 "numbers cannot be recomputed from the repository")
    if failed is not None and failed.exists():
        entry["last_attempt"] = failed.read_text().strip()
    return entry


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _settings_of(m: str) -> dict:
    from stride_viz.evaluation.baselines import default_settings

    return {} if m.startswith("stride") else default_settings(m)


def _read_float(path: Path):
    try:
        return float(path.read_text())
    except (OSError, ValueError):
        return None


def _plot(report: dict, test: np.ndarray) -> None:
    """The LDS distribution of every method on the test queries (test: bool (n_queries,))."""
    from stride_viz.app.eval_plots import lds_distribution

    # the methods, not every ablation variant (those are in report["ablation"])
    fig = lds_distribution({m: np.asarray(r["lds_per_query"])[test] for m, r in report["methods"].items()
                            if r["status"] == "ok" and m in ALL_METHODS})
    st = report["setting"]
    fig.update_layout(title=f"LDS on the demo setting: {int(test.sum())} test queries of {st['n_queries']}, {st['n_subsets']} "
                            f"models retrained on {100 * st['fraction']:.0f}% subsets of "
                            f"{st['pool']['n']} documents")
    try:
        fig.write_image(RESULTS / "lds.png", width=900, height=500)
    except Exception as e:  # kaleido/chrome missing: keep the interactive html only
        _log(f"png export unavailable ({type(e).__name__}); wrote lds.html only")
    fig.write_html(RESULTS / "lds.html", include_plotlyjs="cdn")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="prepare,model,retrain,methods,report")
    ap.add_argument("--methods", default=",".join(ALL_METHODS))
    ap.add_argument("--force", action="store_true", help="recompute method scores that exist")
    ap.add_argument("--timeout", type=float, default=3600,
                    help="seconds one method may run before it is recorded as failed (default 3600)")
    ap.add_argument("--variant", action="append", default=[],
                    help='an ablation of STRIDE: NAME=JSON, e.g. k256=\'{"fit": {"subsets": 256}}\' '
                         'or cv1se=\'{"recovery": {"selection": "cv-1se"}}\'; run as method stride:NAME')
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        run_one_method(a.worker)
        return
    steps = a.steps.split(",")
    registered = json.loads(VARIANTS.read_text()) if VARIANTS.exists() else {}
    for v in a.variant:
        name, _, spec = v.partition("=")
        spec = json.loads(spec)
        from stride_viz.config import FitConfig, RecoveryConfig

        FitConfig(**spec.get("fit", {})), RecoveryConfig(**spec.get("recovery", {}))  # validate
        registered[name] = spec
        WORK.mkdir(parents=True, exist_ok=True)
        VARIANTS.write_text(json.dumps(registered, indent=1))
    methods = [m for m in a.methods.split(",") if m]
    unknown = [m for m in methods if m not in ALL_METHODS
               and m != "stride:backprojection"
               and not (m.startswith("stride:") and m.split(":", 1)[1] in registered)]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {', '.join(ALL_METHODS)}")
    if "prepare" in steps:
        step_prepare()
    if "model" in steps:
        step_model()
    if "retrain" in steps:
        step_retrain()
    if "methods" in steps:
        step_methods(methods, a.force, a.timeout)
    if "report" in steps:
        step_report()


if __name__ == "__main__":
    main()
