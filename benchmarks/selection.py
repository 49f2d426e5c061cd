"""Data-selection benchmark: does STRIDE's selection lower a target domain's held-out loss
more than random, TF-IDF and EK-FAC selections of the same size?

The STRIDE paper's protocol (../shared/STRIDE.md, "Downstream uses"): rank the candidates by
their attribution to the task's queries, keep the top ones, fine-tune on them, compare with
random and other selectors. Here, at CPU size, with our choices marked (ours):

- target domain (ours): the fortunes of one source file of the ``fortune`` package (the
  files are its categories: ``definitions``, ``computers``, ``food``, ...); each fortune of
  the built-in ``fortunes`` pool is given the first file that holds its text. Each category of
  ``--categories`` (default ``definitions`` and ``computers``) is a separate experiment;
- base model (ours): a small GPT-2 (the demo recipe, ``train_demo_model``) trained on
  ``--base`` general fortunes *without* the target category, so that the domain is new to it;
- candidate pool: ``--pool`` other fortunes drawn at random from the rest, in their natural mix
  of categories (the target category is 140 of 2,000 for ``definitions``, 90 for ``computers``);
- target fortunes held out of both, split three ways: ``--targets`` examples are the task's
  queries (the only thing a selector sees), ``--dev`` examples choose each method's
  aggregation (STRIDE: positive-sum, mean or back-projection of the Lasso scores; EK-FAC:
  positive-sum or mean), ``--test`` examples give the reported loss;
- selection: ``--fraction`` (10%) of the pool by each method; random draws ``--seeds`` times;
- fine-tuning (ours): the base model trained further on the selection with
  ``stride_viz.data.models.train_lm`` (``FINETUNE`` below), ``--seeds`` training seeds;
- measured: the mean, over the test fortunes, of each one's mean next-token loss (nats),
  after fine-tuning; lower is better. References: the base model, fine-tuning on the whole
  pool, and on the pool's own fortunes of the target category (an oracle that reads labels no
  selector has, filled up to the budget by random others if the pool has fewer).

    nice -n 10 python benchmarks/selection.py                 # writes benchmarks/results/selection.json
    python benchmarks/selection.py --quick --out benchmarks/work/selection_quick.json   # minutes, tiny

The model, the STRIDE run and the peers' scores are kept in benchmarks/work/selection/<category and settings>/
(gitignored) and reused by a rerun with the same settings.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stride_viz.config import FitConfig, RecoveryConfig  # noqa: E402
from stride_viz.data import pools as P  # noqa: E402
from stride_viz.data.pools import Query  # noqa: E402
from stride_viz.downstream.select import AGGREGATES, select_from_scores  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / "work"
# base model: the demo preset's shape (ours: 8 epochs on the base set, no fact repeats)
BASE_MODEL = dict(n_layer=2, n_embd=128, n_head=4, vocab_size=2048, epochs=8, batch_size=32, lr=3e-3,
                  max_length=64, fact_repeats=1, weight_decay=0.1, prefix_space=True)
# fine-tuning on a selection (ours): same number of epochs for every selection of one size
FINETUNE = dict(epochs=4, batch_size=16, lr=1e-3, max_length=64, weight_decay=0.01)
PEER_AGGREGATES = {"ekfac": ("positive-sum", "mean")}
QUICK = dict(base=200, pool=300, targets=8, dev=10, test=20, subsets=64, epochs=1, base_epochs=2)


def _log(msg: str) -> None:
    print(f"[selection {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fortune_categories() -> dict[str, str]:
    """Text of every built-in fortune -> the name of the first ``fortune`` file that holds it
    (the same reading and cleaning as ``stride_viz.data.pools._fortune_texts``)."""
    import fortune as fortune_pkg
    folder = Path(fortune_pkg.__file__).parent / "datfiles"
    files = sorted(f for f in folder.iterdir() if f.is_file() and not f.suffix and f.name != "LICENSE"
                   and f.name not in P._SKIPPED_CATEGORIES)
    first: dict[str, str] = {}
    for f in files:
        for entry in re.split(r"\n%\n", f.read_text(encoding="latin-1")):
            entry = entry.strip("\n")
            if re.search(r"\n[ \t]*\n", entry):
                continue
            text = " ".join(entry.split())
            if P.FORTUNE_MIN_CHARS <= len(text) <= P.FORTUNE_MAX_CHARS and all(32 <= ord(c) < 127 for c in text):
                first.setdefault(text, f.name)
    return first


def build_split(category: str, n_base: int, n_pool: int, n_targets: int, n_dev: int, n_test: int, seed: int):
    """(base pool, candidate pool, targets, dev, test, pool categories) from the built-in fortunes."""
    full = P.load_pool("fortunes")
    cats = fortune_categories()
    cat = [cats[t] for t in full.completions]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(full))
    domain = [int(i) for i in order if cat[i] == category]
    other = [int(i) for i in order if cat[i] != category]
    n_held = n_targets + n_dev + n_test
    if len(domain) < n_held:
        raise SystemExit(f"category {category!r} has {len(domain)} fortunes; {n_held} are needed")
    held, rest_domain = domain[:n_held], domain[n_held:]
    base_rows = other[:n_base]
    # the candidates: drawn at random from all the remaining fortunes (their natural category mix)
    left = np.array(sorted(set(other[n_base:]) | set(rest_domain)))
    pool_rows = [int(i) for i in np.random.default_rng([seed, 1]).permutation(left)[:n_pool]]
    as_queries = lambda rows, tag: [Query(f"{tag}-{full.ids[i]}", "", full.completions[i]) for i in rows]  # noqa: E731
    return (full.subset(base_rows), full.subset(pool_rows), as_queries(held[:n_targets], "target"),
            as_queries(held[n_targets:n_targets + n_dev], "dev"), as_queries(held[n_targets + n_dev:], "test"),
            [cat[i] for i in pool_rows])


def mean_loss(model, tokenizer, queries) -> float:
    from stride_viz.evaluation.retrain import query_losses
    return float(np.mean(query_losses(model, tokenizer, queries, FINETUNE["max_length"])))


def finetune(base_dir: Path, tokenizer, pool, rows, seed: int):
    """The base model (fresh from disk) trained further on ``pool`` rows ``rows``."""
    from transformers import AutoModelForCausalLM

    from stride_viz.data.models import train_lm
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    return train_lm(model, tokenizer, pool.subset(sorted(int(i) for i in rows)), seed=seed, **FINETUNE)


def run_category(a: argparse.Namespace, category: str, methods: list[str]) -> dict:
    """Everything for one target category; the model, run and scores are kept in a work folder
    named after the settings, so a rerun reuses them."""
    t_all = time.monotonic()
    times: dict[str, float] = {}
    base_pool, pool, targets, dev, test, pool_cats = build_split(category, a.base, a.pool, a.targets, a.dev,
                                                                 a.test, seed=0)
    key = f"{category}-{base_pool.hash[:8]}-{pool.hash[:8]}-t{a.targets}-K{a.subsets}-e{a.epochs:g}"
    work = WORK / "selection" / (key + ("-quick" if a.quick else ""))
    work.mkdir(parents=True, exist_ok=True)
    budget = max(1, round(a.fraction * len(pool)))
    _log(f"{category}: {len(base_pool)} base, {len(pool)} candidates ({pool_cats.count(category)} of the "
         f"category), {len(targets)}/{len(dev)}/{len(test)} target/dev/test, budget {budget}")

    # 1. the base model (trained once, reused)
    from stride_viz.data.models import load_model, train_demo_model
    base_dir = work / "base_model"
    base_settings = dict(BASE_MODEL, epochs=QUICK["base_epochs"] if a.quick else BASE_MODEL["epochs"])
    t0 = time.monotonic()
    if not (base_dir / "config.json").exists():
        train_demo_model(base_pool, base_dir, preset="tiny", seed=0, **base_settings)
    lm = load_model(str(base_dir), device="cpu")
    times["base_model"] = time.monotonic() - t0
    tok = lm.tokenizer

    # 2. each method's scores (n_targets, n_pool) of the target queries: all a selector sees
    scores: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if "stride" in methods:
        from stride_viz.engine import Stride
        t0 = time.monotonic()
        cfg = FitConfig(subsets=a.subsets, epochs=a.epochs, device="cpu", max_length=64)
        run = Stride.create_or_open(work / "stride_run", lm, pool, cfg)
        run.fit()
        times["stride_fit"] = time.monotonic() - t0
        t0 = time.monotonic()
        rec = run.recoverer(RecoveryConfig())
        ws, bs = [], []
        for q in targets:
            r = rec.recover(run.measure(q).responses)
            ws.append(r.scores)
            bs.append(r.backprojection)
        scores["stride"] = (np.stack(ws), np.stack(bs))
        times["stride_targets"] = time.monotonic() - t0
    for peer in ("tfidf", "ekfac"):
        if peer not in methods:
            continue
        cache = work / f"{peer}.npy"
        t0 = time.monotonic()
        if cache.exists():
            s = np.load(cache)
        else:
            from stride_viz.evaluation.baselines import run_method
            torch.manual_seed(0)  # kronfluence samples labels (true Fisher)
            settings = {"damping_factor": None} if peer == "ekfac" else None  # as benchmarks/lds.py
            s = run_method(peer, lm.model, tok, pool, targets, max_length=64, settings=settings).scores
            np.save(cache, s)
        scores[peer] = (s, s)   # no back-projection: ties broken by the score itself
        times[peer] = time.monotonic() - t0

    # 3. choose each method's aggregation on the dev fortunes (one fine-tuning, seed 0)
    t0 = time.monotonic()
    base_test, base_dev = mean_loss(lm.model, tok, test), mean_loss(lm.model, tok, dev)
    chosen, dev_losses = {}, {}
    for m, (w, b) in scores.items():
        options = AGGREGATES if m == "stride" else PEER_AGGREGATES.get(m, ("mean",))
        dev_losses[m] = {}
        for how in options:
            rows = select_from_scores(w, b, budget, how).rows
            dev_losses[m][how] = mean_loss(finetune(base_dir, tok, pool, rows, 0), tok, dev)
            _log(f"{category} dev {m}/{how}: {dev_losses[m][how]:.4f} nats")
        chosen[m] = min(dev_losses[m], key=dev_losses[m].get)
    times["dev_choice"] = time.monotonic() - t0

    # 4. the reported losses: every selection fine-tuned with each seed, measured on test
    t0 = time.monotonic()
    n = len(pool)
    oracle_rows = [i for i in range(n) if pool_cats[i] == category]
    rng = np.random.default_rng(12345)
    if len(oracle_rows) >= budget:
        oracle_rows = sorted(rng.choice(oracle_rows, budget, replace=False).tolist())
    else:
        fill = rng.choice([i for i in range(n) if i not in set(oracle_rows)], budget - len(oracle_rows), replace=False)
        oracle_rows = sorted(oracle_rows + fill.tolist())
    per: dict[str, dict] = {}

    def record(name: str, rows_for_seed, note: str) -> None:
        losses, shares = [], []
        for seed in range(a.seeds):
            rows = rows_for_seed(seed)
            losses.append(mean_loss(finetune(base_dir, tok, pool, rows, seed), tok, test))
            shares.append(float(np.mean([pool_cats[i] == category for i in rows])))
        per[name] = {"test_loss": losses, "mean": float(np.mean(losses)), "std": float(np.std(losses, ddof=1))
                     if len(losses) > 1 else None, "target_category_share": shares, "note": note}
        _log(f"{category} test {name}: {per[name]['mean']:.4f} ± {per[name]['std'] or 0:.4f} nats")

    for m, (w, b) in scores.items():
        rows = select_from_scores(w, b, budget, chosen[m]).rows
        record(m, lambda seed, rows=rows: rows, f"aggregation {chosen[m]} (chosen on dev); one selection, "
                                                f"{a.seeds} fine-tuning seeds")
    if "random" in methods:
        record("random", lambda seed: np.random.default_rng([7, seed]).choice(n, budget, replace=False),
               f"a new random draw for each of the {a.seeds} seeds")
    record("oracle-category", lambda seed: oracle_rows, "reference, not a selector: the pool's own fortunes "
           "of the target category (read from labels no selector has), filled up by random others")
    full_losses = [mean_loss(finetune(base_dir, tok, pool, range(n), 0), tok, test)]
    times["finetune_and_test"] = time.monotonic() - t0

    selectors = [m for m in ("stride", "random", "tfidf", "ekfac") if m in per]
    target_met = None
    if "stride" in per and "random" in per and "tfidf" in per:
        target_met = per["stride"]["mean"] < per["random"]["mean"] and per["stride"]["mean"] < per["tfidf"]["mean"]
    return {
        "settings": {"category": category, "n_base": len(base_pool), "n_pool": n, "n_targets": len(targets),
                     "n_dev": len(dev), "n_test": len(test), "budget": budget,
                     "pool_category_count": pool_cats.count(category), "work": str(work.relative_to(ROOT))},
        "base_model_test_loss": base_test, "base_model_dev_loss": base_dev,
        "full_pool_finetune_test_loss": full_losses,
        "dev_losses": dev_losses, "chosen_aggregation": chosen,
        "methods": per,
        "ranking_by_mean": sorted(selectors, key=lambda m: per[m]["mean"]),
        "target_met": target_met,
        "stride_minus_random": per["stride"]["mean"] - per["random"]["mean"] if "stride" in per and "random" in per
        else None,
        "stride_minus_tfidf": per["stride"]["mean"] - per["tfidf"]["mean"] if "stride" in per and "tfidf" in per
        else None,
        "stride_minus_ekfac": per["stride"]["mean"] - per["ekfac"]["mean"] if "stride" in per and "ekfac" in per
        else None,
        "seconds": {k: round(v, 1) for k, v in times.items()} | {"total": round(time.monotonic() - t_all, 1)},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--categories", default="definitions,computers",
                    help="target domains: fortune file names, comma-separated (each is a separate experiment)")
    ap.add_argument("--base", type=int, default=1000, help="fortunes the base model is trained on")
    ap.add_argument("--pool", type=int, default=2000, help="candidate pool size")
    ap.add_argument("--targets", type=int, default=30, help="target queries the selectors see")
    ap.add_argument("--dev", type=int, default=50, help="held-out target fortunes that choose the aggregation")
    ap.add_argument("--test", type=int, default=100, help="held-out target fortunes of the reported loss")
    ap.add_argument("--fraction", type=float, default=0.1, help="share of the pool selected")
    ap.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds (and random draws)")
    ap.add_argument("--subsets", type=int, default=1024, help="STRIDE K")
    ap.add_argument("--epochs", type=float, default=3.0, help="STRIDE operator epochs")
    ap.add_argument("--methods", default="stride,random,tfidf,ekfac")
    ap.add_argument("--quick", action="store_true", help=f"tiny sizes to check the code: {QUICK}")
    ap.add_argument("--out", default=str(RESULTS / "selection.json"))
    a = ap.parse_args(argv)
    if a.quick:
        for key in ("base", "pool", "targets", "dev", "test", "subsets", "epochs"):
            setattr(a, key, QUICK[key])
    torch.set_num_threads(1)
    t_all, load_start = time.monotonic(), os.getloadavg()
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    categories = [c.strip() for c in a.categories.split(",") if c.strip()]
    per_category = {c: run_category(a, c, methods) for c in categories}
    met = [r["target_met"] for r in per_category.values()]
    result = {
        "what": "Data selection: mean per-token loss (nats) of held-out fortunes of one category after "
                "fine-tuning the base model on 10% of the candidate pool chosen by each method; lower is better",
        "command": "python " + " ".join(shlex.quote(x) for x in
                                        [sys.argv[0]] + list(argv if argv is not None else sys.argv[1:])),
        "protocol": "see the docstring of benchmarks/selection.py",
        "settings": {"categories": categories, "n_base": a.base, "n_pool": a.pool, "n_targets": a.targets,
                     "n_dev": a.dev, "n_test": a.test, "fraction": a.fraction, "seeds": a.seeds,
                     "base_model": dict(BASE_MODEL, epochs=QUICK["base_epochs"] if a.quick else BASE_MODEL["epochs"]),
                     "finetune": FINETUNE,
                     "stride_fit": {"subsets": a.subsets, "epochs": a.epochs, "other": "FitConfig defaults"},
                     "recovery": RecoveryConfig().to_dict(), "ekfac": {"damping_factor": None}, "quick": a.quick},
        "categories": per_category,
        "target": {"text": "STRIDE's selection lowers the target's held-out loss more than random and TF-IDF "
                           "selections, averaged over seeds", "met_per_category": dict(zip(categories, met)),
                   "met": all(m is True for m in met) if met else None},
        "seconds_total": round(time.monotonic() - t_all, 1),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": 1,
                    "load_average_at_start": load_start, "load_average_at_end": os.getloadavg(),
                    "note": "2 CPU cores shared with other processes; run under nice -n 10"},
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    _log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
