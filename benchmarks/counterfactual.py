"""Counterfactual removal (the STRIDE paper's top-k test): does removing what a method calls a
query's proponents really raise the query's loss?

For a sample of test queries of the LDS ground truth and each method, the model is retrained
with the ground truth's recipe on the whole pool **minus the k examples with the highest
scores** for that query (k = 10, 50, 100), and minus k random examples for comparison; the
query's completion loss under the retrained model minus its loss under the base model
(trained on the whole pool with the same recipe and seed) is the **loss rise** (nats; higher
= the removed examples mattered more).

Methods: a plain name (``stride``, ``ekfac``, ``trak``, ``logra``) is that method's **choice**
of the tuning on the development queries (``lds.json`` -> ``tuning.methods.<name>.chosen``,
e.g. ``stride:e6``), the setting the test LDS reports; ``NAME:SETTING`` (``stride:e6``,
``ekfac:d1e-6``; ``stride:default`` = the untuned defaults) names one setting; an untuned
method (``tfidf``, ``repsim``) is its committed defaults; ``random`` removes k examples drawn
by ``numpy.random.default_rng([query index, k])``. Scores: the method's committed
``lds.json -> methods.<setting>.scores_file`` (``benchmarks/results/lds_scores``); each row of
the log records the setting and the file it used.

Each retrain is one JSON line in ``--log`` (resumable: a rerun skips what is recorded; where
the log is missing, as on a fresh clone, it is first restored from the committed json's
``rows`` and ``noise_rows``, so a rerun extends the committed sample). The
work is done in the order (k, query, method), so a run stopped early leaves every query it
reached with every method at the smaller k (a paired sample). ``--noise-seed S`` retrains the
base model once on the whole pool with recipe seed S instead (nothing removed): the change of
each query's loss is what training noise alone does to one retrain. ``--assemble`` writes
``benchmarks/results/counterfactual.json``: per method and k the mean rise with its 95%
bootstrap interval over queries and minus random (paired), the paired difference STRIDE minus
each peer (bootstrap interval, Wilcoxon signed-rank p), the same by query group (planted facts,
held-out text), the target check at k = 10 and the seed noise.

    python benchmarks/counterfactual.py --queries 16 --methods stride,ekfac,random --k 10
    python benchmarks/counterfactual.py --noise-seed 1 --queries 16
    python benchmarks/counterfactual.py --queries 16 --methods tfidf --k 10
    python benchmarks/counterfactual.py --queries 16 --methods stride,ekfac,random --k 50
    python benchmarks/counterfactual.py --assemble   # writes the json, prints the README tables

Each retrain is a full-pool training (~45-90 s on one core): the sample is small, and the
report says how small.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stride_viz.evaluation import stats  # noqa: E402
from stride_viz.integrity import append_jsonl, read_jsonl  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
GT_DIR = RESULTS / "lds_ground_truth"
MODEL_DIR = ROOT / "benchmarks" / "work" / "lds_model"
LOG = ROOT / "benchmarks" / "work" / "counterfactual.jsonl"
OUT = RESULTS / "counterfactual.json"


def sample_queries(meta: dict, n: int) -> list[int]:
    """n test queries, alternating held-out text and planted facts, in query order."""
    dev = stats.development_mask(meta)
    ids = [q["id"] for q in meta["queries"]]
    facts = [i for i in range(len(ids)) if not dev[i] and ids[i].startswith("fact")]
    held = [i for i in range(len(ids)) if not dev[i] and not ids[i].startswith("fact")]
    out = []
    for a, b in zip(held, facts):
        out += [a, b]
    return out[:n]


RANDOM = "random"
REFERENCE = "stride"  # the method the paired differences and the target are about
TARGET_K = 10


class MethodError(ValueError):
    """A --methods name with no committed scores (one-line message)."""


def query_group(query_id: str) -> str:
    """'facts' (planted facts) or 'heldout' (held-out text), as ``sample_queries`` splits them."""
    return "facts" if query_id.startswith("fact") else "heldout"


def resolve_method(name: str, report: dict) -> dict:
    """What a --methods name means, from ``lds.json`` (``report``): {"method": the setting's key
    in ``report['methods']`` (the log's key, e.g. 'stride:e6'), "family", "scores_file" (None for
    random), "changes" (the setting's changes over the defaults), "chosen_by"}.

    'NAME' = the tuning's choice for a tuned method (``tuning.methods.NAME.chosen``), the
    committed defaults for an untuned one; 'NAME:default' = the defaults; 'NAME:SETTING' = that
    setting; 'random' = k random examples."""
    name = name.strip()
    if name == RANDOM:
        return {"method": RANDOM, "family": RANDOM, "scores_file": None, "changes": None,
                "chosen_by": "k examples drawn by numpy.random.default_rng([query index, k])"}
    family, _, setting = name.partition(":")
    tuned = report.get("tuning", {}).get("methods", {}).get(family)
    if not setting:
        if tuned is not None:
            key = tuned.get("chosen")
            if not key:
                raise MethodError(f"lds.json's tuning of {family!r} records no choice; name a "
                                  f"setting instead ({family}:SETTING).")
            chosen_by = f"the tuning's choice on the development queries (lds.json tuning.methods.{family}.chosen)"
        else:
            key, chosen_by = family, "the committed defaults (not tuned)"
    elif setting == "default":
        key, chosen_by = family, "the committed defaults (named on the command line)"
    else:
        key, chosen_by = name, "named on the command line"
    methods = report.get("methods", {})
    entry = methods.get(key) or {}
    if entry.get("status") != "ok" or not entry.get("scores_file"):
        known = sorted(m for m, e in methods.items() if m != RANDOM and e.get("status") == "ok" and e.get("scores_file"))
        raise MethodError(f"No committed scores for method {name!r} (lds.json methods.{key}); "
                          f"known: {', '.join(known + [RANDOM])}.")
    changes = {}
    for s in (tuned or {}).get("settings", []):
        if s.get("method") == key:
            changes = s.get("changes", {})
    return {"method": key, "family": family, "scores_file": entry["scores_file"], "changes": changes,
            "chosen_by": chosen_by}


def removed(spec: dict, scores: dict, q: int, k: int, n_pool: int) -> np.ndarray:
    """The k pool indices removed for query index q: the method's k highest scores (ties by
    index), or k random ones for 'random'."""
    if spec["method"] == RANDOM:
        return np.random.default_rng([q, k]).choice(n_pool, size=k, replace=False)
    return np.argsort(-scores[spec["method"]][q], kind="stable")[:k]


def read_log(log: Path) -> list[dict]:
    """The rows of a log; a torn last line (a run killed mid-write) is skipped: not done."""
    if not log.exists():
        return []
    return [row for _ln, row in read_jsonl(log, error=SystemExit, fix="remove it and rerun")]


def restore_log(log: Path, out: Path = OUT) -> int:
    """A fresh clone has no log (``benchmarks/work`` is git-ignored): write the committed
    json's rows (removals and seed-noise retrains) into it, so that a rerun extends the
    committed sample instead of redoing it. An existing log is left alone. Returns the rows
    written."""
    if log.exists() or not out.exists():
        return 0
    doc = json.loads(out.read_text())
    rows = list(doc.get("rows", [])) + list(doc.get("noise_rows", []))
    for row in rows:
        append_row(log, row)
    return len(rows)


def append_row(log: Path, row: dict) -> None:
    """Append one row (flushed at once), cutting a torn last line off first."""
    log.parent.mkdir(parents=True, exist_ok=True)
    append_jsonl(log, row)


def check_base_model(mean_loss: float, report: dict, tol: float = 1e-6) -> None:
    """Refuse a base model other than the one the scores explain: its mean query loss must be
    lds.json's ``setting.retrained_loss.base_model_mean`` (training is deterministic: the
    recipe retrained on the whole pool reproduces it to all digits)."""
    want = report.get("setting", {}).get("retrained_loss", {}).get("base_model_mean")
    if want is not None and abs(mean_loss - want) > tol:
        raise SystemExit(f"{MODEL_DIR}: mean query loss {mean_loss:.6f} nats, but the LDS benchmark's base "
                         f"model has {want:.6f}: a model of another recipe; move it away and retrain it "
                         f"with `python benchmarks/lds.py --steps model`.")


def work_order(sample: list[int], methods: list[str], ks: list[int]) -> list[tuple[int, int, str]]:
    """(k, query, method), smallest k first and every method of a query together: a run
    stopped anywhere leaves a paired sample at every k it finished."""
    return [(k, q, m) for k in sorted(ks) for q in sample for m in methods]


def run(n_queries: int, names: list[str], ks: list[int], log: Path, noise_seed: Optional[int] = None) -> None:
    import torch

    from stride_viz.data.models import load_model
    from stride_viz.evaluation import metrics as ev
    from stride_viz.evaluation.retrain import open_inputs, query_losses, train_recipe

    torch.set_num_threads(1)
    report = json.loads((RESULTS / "lds.json").read_text())
    specs = [resolve_method(n, report) for n in names]
    meta, pool, queries, tok = open_inputs(GT_DIR)
    ids = [q.id for q in queries]
    max_length = meta["recipe"]["max_length"]
    if not (MODEL_DIR / "config.json").exists():
        raise SystemExit(f"No base model in {MODEL_DIR}: train it with `python benchmarks/lds.py` "
                         f"(its model step) or copy it there.")
    base = load_model(str(MODEL_DIR), device="cpu")
    base_loss = query_losses(base.model, base.tokenizer, queries, max_length)
    check_base_model(float(base_loss.mean()), report)
    if restore_log(log):
        print(f"{log}: restored from {OUT.relative_to(ROOT)}", flush=True)
    rows = read_log(log)

    if noise_seed is not None:
        if noise_seed == meta["recipe"]["seed"]:
            raise SystemExit(f"--noise-seed must differ from the recipe's seed {noise_seed}.")
        if any(r.get("kind") == "noise" and r["seed"] == noise_seed for r in rows):
            print(f"seed {noise_seed}: done", flush=True)
            return
        t0 = time.monotonic()
        model = train_recipe({**meta["recipe"], "seed": noise_seed}, tok, pool)
        loss = query_losses(model, tok, queries, max_length)
        append_row(log, {"kind": "noise", "seed": noise_seed, "queries": ids,
                         "loss": [float(v) for v in loss], "base_loss": [float(v) for v in base_loss],
                         "seconds": round(time.monotonic() - t0, 1)})
        print(f"seed {noise_seed} on the whole pool: mean |loss change| "
              f"{np.abs(loss - base_loss).mean():.3f} nats ({time.monotonic() - t0:.0f} s)", flush=True)
        return

    scores = {s["method"]: ev.load_scores(ROOT / s["scores_file"], len(ids), ids) for s in specs if s["scores_file"]}
    by_name = {s["method"]: s for s in specs}
    done = {(r["query"], r["method"], r["k"]) for r in rows if r.get("kind", "removal") == "removal"}
    sample = sample_queries(meta, n_queries)
    for k, q, m in work_order(sample, list(by_name), ks):
        if (ids[q], m, k) in done:
            continue
        spec = by_name[m]
        drop = set(removed(spec, scores, q, k, len(pool)).tolist())
        keep = [i for i in range(len(pool)) if i not in drop]
        t0 = time.monotonic()
        model = train_recipe(meta["recipe"], tok, pool.subset(keep))
        loss = query_losses(model, tok, [queries[q]], max_length)[0]
        row = {"kind": "removal", "query": ids[q], "group": query_group(ids[q]), "method": m,
               "family": spec["family"], "scores_file": spec["scores_file"], "changes": spec["changes"],
               "k": k, "loss": float(loss), "base_loss": float(base_loss[q]),
               "rise": float(loss - base_loss[q]), "removed": sorted(int(i) for i in drop),
               "seconds": round(time.monotonic() - t0, 1)}
        append_row(log, row)
        print(f"k {k:3d} {ids[q]:24s} {m:12s} rise {row['rise']:+.3f} nats ({row['seconds']:.0f} s)", flush=True)


def _interval(values: list[float], n_boot: int) -> dict:
    b = stats.bootstrap_queries(values, n_boot=n_boot)
    return {"mean": b["mean"], "ci95": [b["low"], b["high"]]}


def paired(a: dict, b: dict, n_boot: int = stats.N_BOOT) -> Optional[dict]:
    """a minus b (query -> rise) on their common queries: mean difference, 95% bootstrap
    interval over queries, Wilcoxon signed-rank p, counts, and the same per query group."""
    common = sorted(set(a) & set(b))
    if not common:
        return None

    def one(qs: list[str]) -> dict:
        d = [a[q] - b[q] for q in qs]
        iv = _interval(d, n_boot)
        return {"mean_difference": iv["mean"], "ci95": iv["ci95"], "wilcoxon_p": stats.wilcoxon_p(d),
                "n_queries": len(qs), "a_higher": int(sum(x > 0 for x in d)),
                "b_higher": int(sum(x < 0 for x in d))}

    out = one(common)
    out["groups"] = {g: one(qs) for g in ("facts", "heldout")
                     if (qs := [q for q in common if query_group(q) == g])}
    return out


def verdict(ci95: list[float]) -> str:
    """'met' (the interval of STRIDE minus the best peer lies above 0), 'not met' (below 0) or
    'not established' (it straddles 0)."""
    if ci95[0] > 0:
        return "met"
    if ci95[1] < 0:
        return "not met"
    return "not established"


def summarize(rows: list[dict], reference: str, n_boot: int = stats.N_BOOT) -> dict:
    """The statistics of removal rows (see the module docstring); ``reference``: STRIDE's
    setting key (e.g. 'stride:e6'), which the paired differences and the target are about."""
    removal = [r for r in rows if r.get("kind", "removal") == "removal"]
    rises: dict[str, dict[int, dict[str, float]]] = {}
    info: dict[str, dict] = {}
    for r in removal:
        rises.setdefault(r["method"], {}).setdefault(r["k"], {})[r["query"]] = r["rise"]
        info.setdefault(r["method"], {"family": r.get("family", r["method"].split(":")[0]),
                                      "scores_file": r.get("scores_file"), "changes": r.get("changes")})
    ks = sorted({r["k"] for r in removal})
    methods = {}
    for m in sorted(rises):
        table = {}
        for k in ks:
            got = rises[m].get(k)
            if not got:
                continue
            v = list(got.values())
            iv = _interval(v, n_boot)
            entry = {"mean_rise": iv["mean"], "ci95": iv["ci95"], "n_queries": len(v),
                     "min": float(np.min(v)), "max": float(np.max(v)), "groups": {}}
            for g in ("facts", "heldout"):
                gv = [x for q, x in got.items() if query_group(q) == g]
                if gv:
                    giv = _interval(gv, n_boot)
                    entry["groups"][g] = {"mean_rise": giv["mean"], "ci95": giv["ci95"], "n_queries": len(gv)}
            if m != RANDOM and rises.get(RANDOM, {}).get(k):
                entry["minus_random"] = paired(got, rises[RANDOM][k], n_boot)
            table[str(k)] = entry
        methods[m] = {**info[m], "k": table}

    pairs, target = {}, None
    peers = [m for m in rises if m != reference and info[m]["family"] not in (REFERENCE, RANDOM)]
    for k in ks:
        ref = rises.get(reference, {}).get(k)
        if not ref:
            continue
        pairs[str(k)] = {f"{reference} - {m}": p for m in sorted(peers + [RANDOM])
                         if (p := paired(ref, rises.get(m, {}).get(k, {}), n_boot))}
        if k == TARGET_K:
            ranked = sorted((np.mean([rises[m][k][q] for q in set(ref) & set(rises[m].get(k, {}))]), m)
                            for m in peers if set(ref) & set(rises[m].get(k, {})))
            if ranked:
                best = ranked[-1][1]
                d = pairs[str(k)][f"{reference} - {best}"]
                target = {"text": f"STRIDE's counterfactual loss rise at k = {TARGET_K} at least the best peer's",
                          "k": TARGET_K, "stride": reference, "best_peer": best,
                          "rule": "best peer = the peer with the highest mean rise on the queries it shares with "
                                  "STRIDE; 'met' if the 95% interval of STRIDE minus it lies above 0, 'not met' "
                                  "if below, 'not established' if it straddles 0",
                          "stride_mean_rise": float(np.mean([ref[q] for q in set(ref) & set(rises[best][k])])),
                          "best_peer_mean_rise": float(ranked[-1][0]),
                          "difference": {x: d[x] for x in ("mean_difference", "ci95", "wilcoxon_p", "n_queries")},
                          "verdict": verdict(d["ci95"])}
    secs = [r["seconds"] for r in removal if "seconds" in r]
    return {"methods": methods, "paired": pairs, "target": target,
            "queries": sorted({r["query"] for r in removal}),
            "seconds_per_retrain": ({"median": float(np.median(secs)), "mean": float(np.mean(secs)),
                                     "min": float(np.min(secs)), "max": float(np.max(secs)), "n": len(secs)}
                                    if secs else None)}


def seed_noise(rows: list[dict], sample: list[str], test: list[str]) -> Optional[dict]:
    """The loss change of each query when the base model is retrained on the whole pool with
    another recipe seed (nothing removed), on the sampled queries and on every test query."""
    noise = [r for r in rows if r.get("kind") == "noise"]
    if not noise:
        return None
    out = {"what": "loss under the base recipe retrained on the whole pool with another seed (initial "
                   "weights and batch order), nothing removed, minus the base model's loss (nats): what "
                   "training noise alone does to one retrain", "seeds": {}}
    for r in noise:
        delta = {q: lo - b for q, lo, b in zip(r["queries"], r["loss"], r["base_loss"])}

        def describe(qs: list[str]) -> dict:
            v = np.array([delta[q] for q in qs if q in delta])
            return {"n_queries": int(v.size), "mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
                    "mean_abs": float(np.abs(v).mean()), "max_abs": float(np.abs(v).max())}

        out["seeds"][str(r["seed"])] = {"sampled_queries": describe(sample), "test_queries": describe(test),
                                        "per_sampled_query": {q: delta[q] for q in sample if q in delta},
                                        "seconds": r.get("seconds")}
    return out


def other_stride_pairs(rows: list[dict], reference: str, n_boot: int = stats.N_BOOT) -> dict:
    """The paired differences (as ``summarize``'s ``paired``) of every other STRIDE setting in the
    log, e.g. the tuning's choice before a later round changed it: {setting: {k: {pair: ...}}}."""
    others = sorted({r["method"] for r in rows if r.get("kind", "removal") == "removal"
                     and r.get("family", r["method"].split(":")[0]) == REFERENCE and r["method"] != reference})
    return {m: summarize(rows, m, n_boot)["paired"] for m in others}


def assemble(log: Path, out: Path) -> dict:
    from stride_viz.evaluation import metrics as ev

    restore_log(log, out)
    rows = read_log(log)
    if not rows:
        raise SystemExit(f"{log}: no retrains recorded; run the removals first (see --help).")
    report = json.loads((RESULTS / "lds.json").read_text())
    reference = resolve_method(REFERENCE, report)["method"]
    meta = ev.read_metadata(GT_DIR)
    dev = stats.development_mask(meta)
    test = [q["id"] for q, d in zip(meta["queries"], dev) if not d]
    result = summarize(rows, reference)
    earlier = json.loads(out.read_text()).get("earlier_default_settings") if out.exists() else None
    doc = {
        "what": "Counterfactual removal: the rise of a test query's completion loss (nats) when the model "
                "is retrained with the LDS ground truth's recipe on the whole pool minus the method's k "
                "highest-scored examples for that query, against the base model trained on the whole pool; "
                "'random': k random examples removed (seeded by query and k). Higher = the removed "
                "examples mattered more. Each method is the setting the test LDS reports (the tuning's "
                "choice on the development queries; 'methods.<m>.scores_file' names the scores used).",
        "command": "python benchmarks/counterfactual.py (see its docstring)",
        "statistics": "ci95: 95% percentile bootstrap interval over queries (stride_viz.evaluation.stats."
                      "bootstrap_queries, 2000 resamples, seed 0); paired: STRIDE minus the peer on the same "
                      "queries, with the two-sided Wilcoxon signed-rank p (stats.wilcoxon_p); groups: planted "
                      "facts ('fact-*') and held-out text; minus_random: the method minus random on the same "
                      "queries and k",
        **result,
        "paired_other_stride_settings": other_stride_pairs(rows, reference),
        "seed_noise": seed_noise(rows, result["queries"], test),
        "rows": [r for r in rows if r.get("kind", "removal") == "removal"],
        # the seed-noise retrains, so that a fresh clone can assemble this file again
        "noise_rows": [r for r in rows if r.get("kind") == "noise"],
        "note": "one retrain per cell (~45-90 s on one shared core); the sample size is in each entry's n_queries",
    }
    if earlier is not None:
        doc["earlier_default_settings"] = earlier
    out.write_text(json.dumps(doc, indent=1))
    return doc


def _p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _ci(x: dict, key: str = "mean_rise") -> str:
    return f"{x[key]:+.3f} [{x['ci95'][0]:+.3f}, {x['ci95'][1]:+.3f}]"


def markdown(doc: dict) -> str:
    """The README's tables of an assembled report: mean rise per method and k (95% interval,
    n, minus random), then STRIDE minus each peer (paired), then the target and the seed noise."""
    ks = sorted({int(k) for m in doc["methods"].values() for k in m["k"]})
    lines = ["| method (scores) | " + " | ".join(f"k = {k}: mean rise [95% CI]; n; minus random [95% CI]"
                                                for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
    order = sorted(doc["methods"], key=lambda m: (doc["methods"][m]["family"] != REFERENCE, m == RANDOM, m))
    for m in order:
        e = doc["methods"][m]
        cells = []
        for k in ks:
            c = e["k"].get(str(k))
            if c is None:
                cells.append("not run")
                continue
            mr = c.get("minus_random")
            cells.append(f"{_ci(c)}; n {c['n_queries']}" + (f"; {_ci(mr, 'mean_difference')}" if mr else ""))
        src = f" (`{Path(e['scores_file']).name}`)" if e.get("scores_file") else ""
        lines.append(f"| {m}{src} | " + " | ".join(cells) + " |")
    lines += ["", "| k | pair | mean difference [95% CI] | Wilcoxon p | n | a higher / b higher | planted facts | held-out text |",
              "|---|---|---|---|---|---|---|---|"]
    every = [doc["paired"], *(doc.get("paired_other_stride_settings") or {}).values()]
    for k, pairs in ((k, p) for paired_ in every for k, p in paired_.items()):
        for name, d in pairs.items():
            g = {x: (f"{_ci(d['groups'][x], 'mean_difference')} (n {d['groups'][x]['n_queries']})"
                     if x in d["groups"] else "-") for x in ("facts", "heldout")}
            lines.append(f"| {k} | {name} | {_ci(d, 'mean_difference')} | {_p(d['wilcoxon_p'])} | {d['n_queries']} | "
                         f"{d['a_higher']} / {d['b_higher']} | {g['facts']} | {g['heldout']} |")
    t = doc.get("target")
    if t:
        lines += ["", f"Target ({t['text']}): **{t['verdict']}**: {t['stride']} {t['stride_mean_rise']:+.3f} against "
                      f"{t['best_peer']} {t['best_peer_mean_rise']:+.3f} nats, difference "
                      f"{_ci(t['difference'], 'mean_difference')}, Wilcoxon p {_p(t['difference']['wilcoxon_p'])}, "
                      f"n {t['difference']['n_queries']}."]
    for seed, n in ((doc.get("seed_noise") or {}).get("seeds") or {}).items():
        a, b = n["sampled_queries"], n["test_queries"]
        lines += ["", f"Seed noise (recipe seed {seed}, whole pool, nothing removed): sampled queries mean "
                      f"{a['mean']:+.3f}, sd {a['std']:.3f}, mean |change| {a['mean_abs']:.3f}, max {a['max_abs']:.3f} "
                      f"nats (n {a['n_queries']}); all test queries sd {b['std']:.3f}, mean |change| "
                      f"{b['mean_abs']:.3f} (n {b['n_queries']})."]
    if doc.get("seconds_per_retrain"):
        r = doc["seconds_per_retrain"]
        lines += ["", f"Seconds per retrain: median {r['median']:.0f}, {r['min']:.0f}-{r['max']:.0f} ({r['n']} retrains)."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=16,
                    help="how many test queries (held-out text and planted facts alternate)")
    ap.add_argument("--methods", default="stride,ekfac,random",
                    help="comma-separated: NAME (the tuning's choice), NAME:SETTING, NAME:default, random")
    ap.add_argument("--k", default="10,50,100")
    ap.add_argument("--noise-seed", type=int, default=None,
                    help="instead of removals: retrain on the whole pool once with this recipe seed")
    ap.add_argument("--log", default=str(LOG))
    ap.add_argument("--assemble", action="store_true")
    a = ap.parse_args()
    if a.assemble:
        print(markdown(assemble(Path(a.log), OUT)))
        return
    try:
        ks = [int(x) for x in a.k.split(",") if x]
    except ValueError:
        ap.error(f"--k must be comma-separated integers; got {a.k!r}")
    if a.queries < 1 or not ks or min(ks) < 1:
        ap.error("--queries and every --k must be >= 1")
    names = [m for m in a.methods.split(",") if m.strip()]
    if not names:
        ap.error("--methods names no method")
    try:
        run(a.queries, names, ks, Path(a.log), a.noise_seed)
    except MethodError as e:
        ap.error(str(e))


if __name__ == "__main__":
    main()
