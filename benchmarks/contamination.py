"""Contamination benchmark: are replicas of leaked benchmark items among the extreme-score documents?

The STRIDE paper's memorisation experiment, at this project's scale: replicas of held-out
question/answer items are injected into a training pool at 0.5%, 1% and 1.5% of its size, a
model is trained on each contaminated pool, every benchmark item is explained by each
attribution method, and we measure the recall of the injected replicas among the documents
that the audit (``stride_viz.downstream.audit``) ranks as most extreme.

    nice -n 10 python benchmarks/contamination.py                # the benchmark: 2,000 fortunes, paraphrased replicas
    nice -n 10 python benchmarks/contamination.py --replicas verbatim --out benchmarks/results/contamination_verbatim.json
    python benchmarks/contamination.py --fortunes 400 --leaked 2 --methods stride,tfidf,random --small --out /tmp/c.json  # a quick trial

Set-up (the paper's protocol where it says something, ours elsewhere):

- **Items**: the 48 invented question/answer items of ``stride_viz.data.qa_items`` (answers are
  made-up words found nowhere in the built-in pools). ``--leaked`` of them (default 10,
  drawn with ``--seed``) leak; the other items are clean controls **(ours)**. ``tfidf_keys`` in
  the results measures what TF-IDF's match rests on: the share of the query-replica cosine
  from words found in no clean document (the invented words), and its recall once the
  queries lose those words.
- **Pool**: the first ``--fortunes`` documents of the built-in ``fortunes`` pool (default
  2,000; the full 11,085 does not fit this machine's time budget: ours) plus the replicas.
  ``--replicas paraphrase`` (the default) makes each copy of a leaked item a different seeded
  rewording (``qa_items.replica_texts``: ``Q:``/``A:`` or quiz framing, the answer first, or
  the fact restated in other words, some with an explanation sentence; the invented entity
  and answer words kept), because leaked benchmark items mostly reach a crawled corpus
  restated (quiz sites, study notes, forum answers) rather than as the benchmark file itself;
  ``--replicas verbatim`` injects exact copies (``Question: ... Answer: <answer>.``) **(ours:
  the paper says "replicated problems" without saying how they were replicated)**. At rate r
  every leaked item gets ``r x fortunes / leaked`` copies: 1, 2 and 3 copies at 0.5%, 1% and
  1.5% with the defaults (10, 20, 30 replicas), at seeded random positions **(ours)**.
- **Model**: a GPT-2 of the demo:tiny shape (2 layers, width 128, 4 heads, context 128)
  trained from scratch on each pool with the project's recipe (``fit_demo_lm``; ``--epochs``,
  default 12), with one byte-level BPE tokenizer (2,048 tokens) trained on the clean fortunes
  and shared by every pool, so the items tokenise the same way in every model **(ours)**.
  Memorisation is measured per model: mean completion loss (nats per token) of the leaked and
  of the clean items, and greedy exact-match accuracy (the greedy continuation of the question
  starts with the answer).
- **Methods**: STRIDE (engine ``FitConfig()`` and ``RecoveryConfig()`` defaults), kronfluence
  EK-FAC (its damping heuristic, as in the LDS benchmark), dattri LoGra, TF-IDF and random
  (``stride_viz.evaluation.baselines`` defaults), torch seeded before each. Each explains all
  48 items (the auditor does not know which leaked).
- **Audit**: per method, each per-document statistic of ``stride_viz.downstream.audit``
  (``max-score``, ``max-z``, ``max-abs-z``, ``topk-count``), each method keeping the one that
  is best on the development items (see below), and the flag thresholds 2.5, 3.5, 5 and 8;
  **recall@budget** = share of the replicas among the ``budget`` most extreme documents, with
  budget = the number of injected replicas (ours: the paper reports recall among its
  extreme-score examples without saying how many it takes); also the recall and precision of
  the documents the threshold flags.
- **STRIDE + peer**: the two methods' per-document statistics (each its own chosen one)
  combined by ``rank-mean`` (the mean of the two ranks), ``rrf`` (reciprocal-rank fusion) or
  ``z-sum`` (the sum of the two robust z among documents), the rule chosen on the development
  items **(ours: the paper does not say how it combines them)**.
- **Development / test**: the items are split by ``metrics.query_split`` on their ids; the
  statistic, threshold and combination are chosen on the development items (their queries and
  their replicas only) and the headline numbers are the test items' (and all items').

Every step saves what it computed under ``--work`` (models, runs, scores) and is skipped on a
rerun; ``benchmarks/results/contamination.json`` is rewritten after every leak rate, with the
command, settings, times and machine load.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from stride_viz.downstream.audit import (COMBINATIONS, STATISTICS, AuditConfig, audit_scores,  # noqa: E402
                                         combine, document_statistic, outlier_scores, replica_recall)
from stride_viz.data.qa_items import REPLICA_MODES, qa_queries, replica_texts  # noqa: E402

RATES = (0.005, 0.01, 0.015)
PEERS = ("ekfac", "logra", "tfidf", "random")
PEER_SETTINGS = {"ekfac": {"damping_factor": None}}   # kronfluence's heuristic, as in lds.py
TORCH_SEED = 0
MODEL = dict(n_layer=2, n_embd=128, n_head=4, n_positions=128, vocab_size=2048, batch_size=32, lr=3e-3,
             max_length=96, fact_repeats=1, weight_decay=0.1, prefix_space=True)
THRESHOLDS = (2.5, 3.5, 5.0, 8.0)
REPLICA_DESCRIPTION = {
    "verbatim": "verbatim copy of the item (prompt + completion)",
    "paraphrase": "each copy of an item a different rewording (qa_items.PARAPHRASE_TEMPLATES, seeded): "
                  "Q:/A: or quiz framing, answer first, or the fact restated (qa_items.STATEMENTS), "
                  "some with an explanation sentence; the invented entity and answer words kept"}


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def build_pool(fortunes: int, leaked: list[str], rate: float, seed: int, mode: str = "paraphrase"):
    """The contaminated pool and the pool indices of its replicas: {item id: [indices]}.
    ``mode``: ``paraphrase`` (each copy a different seeded rewording) or ``verbatim``."""
    from stride_viz.data.pools import load_pool, make_pool
    base = load_pool("fortunes", limit=fortunes)
    copies = rate * fortunes / len(leaked)
    if abs(copies - round(copies)) > 1e-9 or round(copies) < 1:
        raise SystemExit(f"error: {rate:.1%} of {fortunes} fortunes over {len(leaked)} leaked items is "
                         f"{copies:g} copies per item; choose --fortunes and --leaked so that it is a "
                         f"whole number of at least 1.")
    rng = random.Random(seed * 1000 + round(rate * 1e4))
    reps = [(f"replica-{qid}-{c}", text) for qid in leaked
            for c, text in enumerate(replica_texts(qid, round(copies), mode, rng))]
    rows = list(zip(base.ids, base.completions))
    for rid, text in reps:
        rows.insert(rng.randrange(len(rows) + 1), (rid, text))
    pool = make_pool(f"fortunes[:{fortunes}]+{mode}-replicas@{rate:g}", [r[0] for r in rows], [""] * len(rows),
                     [r[1] for r in rows])
    where = {qid: [i for i, x in enumerate(pool.ids) if x.startswith(f"replica-{qid}-")] for qid in leaked}
    return pool, where, round(copies)


def memorisation(run, queries, leaked: set[str]) -> dict:
    """Mean completion loss (nats/token) and greedy exact match, leaked vs clean items."""
    from stride_viz.data.tokenize import encode, sequence_losses
    from stride_viz.method.measurement import generate
    tok, model = run.model.tokenizer, run.model.model
    enc = encode(tok, [q.prompt for q in queries], [q.completion for q in queries], 128)
    with torch.no_grad():
        logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
        loss = sequence_losses(logits.float(), enc.input_ids, enc.loss_mask).numpy()
    exact = []
    for q in queries:
        text = generate(run.lm, tok, q.prompt, 8, max_length=run.max_tokens)[0]
        exact.append(text.strip().lower().startswith(q.completion.strip().rstrip(".").lower()))
    per = [{"id": q.id, "leaked": q.id in leaked, "loss": round(float(l), 4), "exact": bool(e)}
           for q, l, e in zip(queries, loss, exact)]
    out = {}
    for side, keep in (("leaked", True), ("clean", False)):
        rows = [p for p in per if p["leaked"] == keep]
        out[side] = {"n": len(rows), "loss_mean": round(float(np.mean([p["loss"] for p in rows])), 4),
                     "loss_std": round(float(np.std([p["loss"] for p in rows])), 4),
                     "exact_match": round(float(np.mean([p["exact"] for p in rows])), 4)}
    out["loss_gap_nats"] = round(out["clean"]["loss_mean"] - out["leaked"]["loss_mean"], 4)
    out["per_item"] = per
    return out


def method_scores(name: str, run, pool, queries, folder: Path) -> tuple[np.ndarray, dict]:
    """(n_queries, n_pool) scores of one method, cached as .npy with its timing."""
    from stride_viz.evaluation.baselines import run_method
    path, meta_path = folder / f"{name}.npy", folder / f"{name}.json"
    if path.exists() and meta_path.exists():
        return np.load(path), json.loads(meta_path.read_text())
    torch.manual_seed(TORCH_SEED)
    load0, t0 = _load(), time.monotonic()
    if name == "stride":
        from stride_viz.config import RecoveryConfig
        atts = run.attribute(queries, RecoveryConfig(), continuations=False)
        scores = np.stack([a.scores for a in atts]).astype(np.float32)
        meta = {"seconds_fit": run_fit_seconds(run), "seconds_per_query": (time.monotonic() - t0) / len(queries),
                "settings": run.config.fingerprint()}
    else:
        res = run_method(name, run.model.model, run.model.tokenizer, pool, queries, max_length=MODEL["max_length"],
                         settings=PEER_SETTINGS.get(name), threads=1)
        scores, meta = res.scores, res.summary()
    meta.update(wall_seconds=round(time.monotonic() - t0, 2), load_at_start=load0, load_at_end=_load())
    folder.mkdir(parents=True, exist_ok=True)
    np.save(path, scores)
    meta_path.write_text(json.dumps(meta, indent=1, default=str))
    return scores, meta


def tfidf_keys(pool, queries, replicas: dict[str, list[int]]) -> dict:
    """What TF-IDF keys on, per leaked item: the share of the query-replica cosine that comes
    from words found in no clean document (the invented entity and answer words), and the
    replicas' recall@budget (``max-score`` over all the queries, as the benchmark ranks) when
    every query keeps only its other words (same vectoriser as the ``tfidf`` baseline, fitted on
    the whole contaminated pool)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    texts = [pool.text(i) for i in range(len(pool))]
    vec = TfidfVectorizer(sublinear_tf=True)
    docs = vec.fit_transform(texts).tocsr()
    clean = np.array([not x.startswith("replica-") for x in pool.ids])
    seen = np.asarray((docs[np.flatnonzero(clean)] > 0).sum(axis=0)).ravel() > 0
    row_of = {q.id: n for n, q in enumerate(queries)}
    qv = vec.transform([q.prompt + (q.completion or "") for q in queries]).tocsr()
    shares, reps_all = [], []
    for qid, rows in replicas.items():
        q = qv[row_of[qid]].toarray().ravel()
        reps_all += rows
        for i in rows:
            contrib = q * docs[i].toarray().ravel()
            total = contrib.sum()
            shares.append(float(contrib[~seen].sum() / total) if total > 0 else 0.0)
    q_common = qv.multiply(seen[None, :]).tocsr()                       # the invented words removed
    norms = np.sqrt(np.asarray(q_common.multiply(q_common).sum(axis=1))).ravel()
    sims = (q_common @ docs.T).toarray() / np.where(norms > 0, norms, 1.0)[:, None]
    stat = sims.max(axis=0)
    leaked_rows = [row_of[qid] for qid in replicas]
    return {"n_replicas": len(shares), "cosine_share_from_unseen_words_mean": round(float(np.mean(shares)), 4),
            "cosine_share_from_unseen_words_min": round(float(np.min(shares)), 4),
            "unseen_words": sorted(np.asarray(vec.get_feature_names_out())[~seen & (np.asarray(
                (qv[leaked_rows] > 0).sum(axis=0)).ravel() > 0)].tolist()),
            "recall@budget_max-score_without_unseen_words": round(replica_recall(stat, reps_all, len(reps_all)), 4)}


def own_query_ranks(replicas: dict[str, list[int]], queries, scores: dict[str, np.ndarray], memo: dict,
                    dev: np.ndarray) -> dict:
    """Per leaked item: how much the model learned it (the clean items' mean loss minus its
    loss, nats/token) and each method's rank of each of its replicas among the pool for the
    item's own query (1 = the strongest proponent); and per side (test / all) and method the
    share of the replicas among the top c of their own item's query (c = copies per item):
    the ranking within a query, apart from how the audit compares documents across queries."""
    row_of = {q.id: n for n, q in enumerate(queries)}
    loss = {p["id"]: p["loss"] for p in memo["per_item"]}
    out = {}
    for qid, rows in replicas.items():
        out[qid] = {"loss_gap_nats": round(memo["clean"]["loss_mean"] - loss[qid], 4),
                    **{m: [1 + int((s[row_of[qid]] > s[row_of[qid], i]).sum()) for i in rows]
                       for m, s in scores.items()}}
    copies = len(next(iter(replicas.values())))
    is_dev = {q.id: bool(d) for q, d in zip(queries, dev)}
    recall = {side: {m: round(float(np.mean([r <= copies for qid, v in out.items() if keep(qid) for r in v[m]])), 4)
                     for m in scores}
              for side, keep in (("test", lambda q: not is_dev[q]), ("all", lambda q: True))}
    return {"items": out, "recall_at_copies": recall}


def run_fit_seconds(run) -> float | None:
    state = run.store.fit_dir / "state.json"
    return json.loads(state.read_text()).get("seconds") if state.exists() else None


def evaluate(replicas: dict[str, list[int]], queries, dev: np.ndarray, scores: dict[str, np.ndarray]) -> dict:
    """Recall of the replicas for every method, statistic and side (dev / test / all), the
    threshold-flagged sets, and every combination of STRIDE with a peer."""
    out = {}
    sides = {"dev": dev, "test": ~dev, "all": np.ones_like(dev)}
    for side, mask in sides.items():
        side_ids = {q.id for q, m in zip(queries, mask) if m}
        reps = [i for qid, rows in replicas.items() if qid in side_ids for i in rows]
        if not reps:
            continue
        qidx = np.flatnonzero(mask)
        row = {"n_queries": int(mask.sum()), "n_replicas": len(reps)}
        stats = {m: {st: document_statistic(s[qidx], st) for st in STATISTICS} for m, s in scores.items()}
        for method, by_stat in stats.items():
            entry = {}
            for st, values in by_stat.items():
                entry[f"recall@budget[{st}]"] = round(replica_recall(values, reps, len(reps)), 4)
                entry[f"recall@2budget[{st}]"] = round(replica_recall(values, reps, 2 * len(reps)), 4)
                out_z = outlier_scores(values)
                for t in THRESHOLDS:
                    flagged = set(np.flatnonzero(out_z >= t).tolist())
                    hit = sum(i in flagged for i in reps)
                    entry[f"flagged@{t:g}[{st}]"] = len(flagged)
                    entry[f"recall_flagged@{t:g}[{st}]"] = round(hit / len(reps), 4)
                    entry[f"precision_flagged@{t:g}[{st}]"] = round(hit / len(flagged), 4) if flagged else 0.0
            row[method] = entry
        if "stride" in stats:
            for peer in stats:
                if peer == "stride":
                    continue
                row[f"stride+{peer}"] = {
                    f"recall@budget[{how}|{a}|{b}]": round(replica_recall(
                        combine(stats["stride"][a], stats[peer][b], how), reps, len(reps)), 4)
                    for how in COMBINATIONS for a in STATISTICS for b in STATISTICS}
        out[side] = row
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fortunes", type=int, default=2000, help="clean documents (first N of 'fortunes')")
    ap.add_argument("--leaked", type=int, default=10, help="items whose replicas are injected")
    ap.add_argument("--replicas", default="paraphrase", choices=REPLICA_MODES,
                    help="paraphrase: each copy a seeded rewording (default); verbatim: exact copies")
    ap.add_argument("--rates", default="0.005,0.01,0.015", help="replicas as a share of the clean pool")
    ap.add_argument("--epochs", type=float, default=12, help="epochs of the model's training")
    ap.add_argument("--methods", default="stride," + ",".join(PEERS))
    ap.add_argument("--fit", default="{}", help="JSON FitConfig overrides for STRIDE (default: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--small", action="store_true", help="quick trial: a 1 x 32 model, K 64, 1 epoch")
    ap.add_argument("--work", default=str(ROOT / "benchmarks/work/contamination"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/contamination.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from stride_viz.config import FitConfig
    from stride_viz.data.models import fit_demo_lm, load_model, train_tokenizer
    from stride_viz.data.pools import load_pool
    from stride_viz.engine import Stride
    from stride_viz.evaluation.metrics import query_split

    methods = [m for m in a.methods.split(",") if m]
    rates = [float(r) for r in a.rates.split(",")]
    model_cfg = dict(MODEL, epochs=a.epochs)
    fit_over = json.loads(a.fit)
    if a.small:
        model_cfg.update(n_layer=1, n_embd=32, n_head=2, vocab_size=512, epochs=min(a.epochs, 4))
        fit_over = {"subsets": 64, "per_example": 4, "epochs": 1, **fit_over}
    fit_cfg = FitConfig(**fit_over)
    queries = qa_queries()
    rng = random.Random(a.seed)
    leaked = sorted(rng.sample([q.id for q in queries], a.leaked))
    dev = query_split([q.id for q in queries])
    tag = hashlib.sha256(json.dumps([a.fortunes, a.leaked, a.epochs, a.seed, model_cfg, fit_cfg.fingerprint(),
                                     a.replicas],
                                    sort_keys=True, default=str).encode()).hexdigest()[:8]
    work = Path(a.work) / tag
    work.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "contamination", "command": "python " + " ".join(shlex.quote(x) for x in sys.argv),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": 1,
                          "load_at_start": _load()},
              "settings": {"fortunes": a.fortunes, "leaked_items": leaked, "n_items": len(queries),
                           "dev_items": [q.id for q, d in zip(queries, dev) if d], "rates": rates,
                           "model": model_cfg, "stride_fit": fit_cfg.fingerprint(), "methods": methods,
                           "peer_settings": PEER_SETTINGS, "torch_seed": TORCH_SEED, "seed": a.seed,
                           "replica": a.replicas, "replica_description": REPLICA_DESCRIPTION[a.replicas],
                           "budget": "number of injected replicas", "combination_default": "rank-mean",
                           "statistic_default": AuditConfig().statistic,
                           "threshold_default": AuditConfig().threshold, "work": str(work)},
              "rates": {}}
    out_path = Path(a.out)
    t_start = time.monotonic()

    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        clean = load_pool("fortunes", limit=a.fortunes)
        train_tokenizer([clean.text(i) for i in range(len(clean))], model_cfg["vocab_size"],
                        model_cfg["prefix_space"]).save_pretrained(tok_dir)
    from transformers import PreTrainedTokenizerFast
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)

    for rate in rates:
        rdir = work / f"rate-{rate:g}"
        pool, replicas, copies = build_pool(a.fortunes, leaked, rate, a.seed, a.replicas)
        entry = {"rate": rate, "copies_per_leaked_item": copies, "n_replicas": sum(map(len, replicas.values())),
                 "n_pool": len(pool), "replica_share_of_pool": round(sum(map(len, replicas.values())) / len(pool), 5),
                 "times": {}, "load": {"start": _load()}}
        t0 = time.monotonic()
        model_dir = rdir / "model"
        if not (model_dir / "config.json").exists():
            over = {k: v for k, v in model_cfg.items() if k != "epochs"}
            model = fit_demo_lm(pool, tokenizer, "tiny", seed=a.seed, epochs=model_cfg["epochs"], **over)
            model.save_pretrained(model_dir)
            tokenizer.save_pretrained(model_dir)
            (rdir / "train_model.json").write_text(json.dumps({"seconds": round(time.monotonic() - t0, 1),
                                                               "load_at_end": _load()}))
        if (rdir / "train_model.json").exists():   # kept from the call that trained it
            entry["times"]["train_model"] = json.loads((rdir / "train_model.json").read_text())
        lm = load_model(str(model_dir), device="cpu")
        run = Stride.create_or_open(rdir / "run", lm, pool, fit_cfg)
        memo_path = rdir / "memorisation.json"
        if not memo_path.exists():
            memo_path.write_text(json.dumps(memorisation(run, queries, set(leaked)), indent=1))
        entry["memorisation"] = json.loads(memo_path.read_text())
        print(f"[{rate:.1%}] memorisation: leaked {entry['memorisation']['leaked']} clean "
              f"{entry['memorisation']['clean']}", flush=True)
        t1 = time.monotonic()
        run.fit()
        entry["times"]["stride_fit_this_call"] = round(time.monotonic() - t1, 1)
        scores, entry["methods"] = {}, {}
        for m in methods:
            print(f"[{rate:.1%}] {m} (load {_load()})", flush=True)
            scores[m], entry["methods"][m] = method_scores(m, run, pool, queries, rdir / "scores")
        texts = [pool.text(i) for i in range(len(pool))]
        entry["recall"] = evaluate(replicas, queries, dev, scores)
        entry["tfidf_keys"] = tfidf_keys(pool, queries, replicas)
        entry["own_query_rank"] = own_query_ranks(replicas, queries, scores, entry["memorisation"], dev)
        # what the audit reports for STRIDE's flagged documents (default settings)
        if "stride" in scores:
            res = audit_scores(scores["stride"], pool.ids, texts, queries, AuditConfig())
            entry["stride_audit"] = {"n_flagged": int(len(res.flagged)),
                                     "replicas_flagged": int(sum(pool.ids[i].startswith("replica-") for i in res.flagged)),
                                     "top": [{k: d[k] for k in ("rank", "id", "statistic", "outlier", "flagged")}
                                             for d in res.documents[:15]]}
        entry["load"]["end"] = _load()
        entry["times"]["total_this_call"] = round(time.monotonic() - t0, 1)
        result["rates"][f"{rate:g}"] = entry
        result["machine"]["load_at_end"] = _load()
        result["seconds_this_call"] = round(time.monotonic() - t_start, 1)
        result["summary"] = summarise(result)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1, default=str))
        print(json.dumps(result["summary"], indent=1), flush=True)


def summarise(result: dict) -> dict:
    """Headline numbers. On the development items (mean over the leak rates) each method picks
    its statistic (the best recall@budget), and each STRIDE+peer pair its combination rule with
    the two methods' chosen statistics; the recall@budget of those choices is then reported on
    the test items and on all items, per rate. Also the threshold's recall/precision on the
    development items and the memorisation of each model."""
    rates = result["rates"]

    def dev_mean(method: str, key: str) -> float:
        vals = [e["recall"]["dev"][method][key] for e in rates.values()
                if "dev" in e["recall"] and method in e["recall"]["dev"]]
        return float(np.mean(vals)) if vals else float("nan")

    methods = [m for m in next(iter(rates.values()))["recall"]["all"] if isinstance(
        next(iter(rates.values()))["recall"]["all"][m], dict)]
    singles = [m for m in methods if not m.startswith("stride+")]
    chosen = {}
    for m in singles:   # ties: the order of STATISTICS (the audit's default first)
        chosen[m] = max(STATISTICS, key=lambda st: (dev_mean(m, f"recall@budget[{st}]"), -STATISTICS.index(st)))
    for m in methods:
        if m.startswith("stride+"):
            peer = m.split("+", 1)[1]
            how = max(COMBINATIONS, key=lambda h: (dev_mean(m, f"recall@budget[{h}|{chosen['stride']}|{chosen[peer]}]"),
                                                   -COMBINATIONS.index(h)))
            chosen[m] = f"{how}|{chosen['stride']}|{chosen[peer]}"
    table = {}
    for side in ("test", "all", "dev"):
        for m in methods:
            key = f"recall@budget[{chosen[m]}]"
            table.setdefault(side, {})[m] = {r: e["recall"][side][m][key] for r, e in rates.items()
                                             if side in e["recall"]}
    threshold = {m: {f"{t:g}": {"recall": round(dev_mean(m, f"recall_flagged@{t:g}[{chosen[m]}]"), 4),
                                "precision": round(dev_mean(m, f"precision_flagged@{t:g}[{chosen[m]}]"), 4)}
                     for t in THRESHOLDS} for m in singles}
    dev_by_statistic = {m: {st: round(dev_mean(m, f"recall@budget[{st}]"), 4) for st in STATISTICS} for m in singles}
    # the audit's own flags: each method's threshold chosen on the development items by F1
    def f1(m: str, t: float, side: str, e: dict) -> dict:
        row = e["recall"][side][m]
        r, p = row[f"recall_flagged@{t:g}[{chosen[m]}]"], row[f"precision_flagged@{t:g}[{chosen[m]}]"]
        return {"recall": r, "precision": p, "f1": round(2 * p * r / (p + r), 4) if p + r else 0.0,
                "n_flagged": row[f"flagged@{t:g}[{chosen[m]}]"]}

    flags = {}
    for m in singles:
        t = max(THRESHOLDS, key=lambda t: (np.mean([f1(m, t, "dev", e)["f1"] for e in rates.values()
                                                    if "dev" in e["recall"]]), -t))
        flags[m] = {"threshold_chosen_on_dev": t,
                    **{side: {r: f1(m, t, side, e) for r, e in rates.items() if side in e["recall"]}
                       for side in ("test", "all")}}
    memo = {rate: {"leaked_loss": e["memorisation"]["leaked"]["loss_mean"],
                   "clean_loss": e["memorisation"]["clean"]["loss_mean"],
                   "loss_gap_nats": e["memorisation"]["loss_gap_nats"],
                   "leaked_exact": e["memorisation"]["leaked"]["exact_match"],
                   "clean_exact": e["memorisation"]["clean"]["exact_match"]} for rate, e in rates.items()}
    return {"chosen_on_dev": chosen, "recall_at_budget": table, "dev_recall_by_statistic": dev_by_statistic,
            "dev_threshold_recall_precision": threshold, "flagged_at_dev_threshold": flags, "memorisation": memo}


if __name__ == "__main__":
    main()
