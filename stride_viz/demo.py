"""The built-in demo: the demo model and the ``fortunes+facts`` pool, fitted and explained.

The pool plants invented facts, each stated by 7-8 documents, so the demo can say how often
STRIDE finds a fact's own source documents among its top 10 (recall@10) and how high the
first one ranks (MRR). Used by ``python -m stride_viz demo`` and by the dashboard's demo job.
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from stride_viz.config import FitConfig, RecoveryConfig
from stride_viz.engine import Attribution, QueryError, Stride
from stride_viz.evaluation.metrics import mrr, recall_at_k
from stride_viz.data.models import LoadedModel, data_home, load_model
from stride_viz.data.pools import Pool, Query, fact_queries, load_pool
from stride_viz.progress import no_progress
from stride_viz.storage import write_json

__all__ = ["run_demo", "DEMO_POOL", "FREE_PROMPT", "fact_metrics", "facts_said", "default_run_dir"]

DEMO_POOL = "fortunes+facts"
FREE_PROMPT = "A wise man once said"


def default_run_dir(model_hash: str, pool_hash: str, config: FitConfig) -> Path:
    """Deterministic run folder for a model + pool + config, so later jobs reuse the fit."""
    import hashlib
    import json
    key = hashlib.sha256(json.dumps(config.fingerprint(), sort_keys=True).encode()).hexdigest()[:10]
    return data_home() / "runs" / f"{model_hash[:10]}-{pool_hash[:10]}-{key}"


def fact_metrics(pool: Pool, attributions: list[Attribution], k: int = 10) -> dict:
    """recall@k and MRR of the planted facts' source documents (queries without facts skipped)."""
    by_query = {f.query.id: [pool.index_of(s) for s in f.source_ids] for f in pool.facts}
    rows = [(a.ranking(), by_query[a.query.id]) for a in attributions if a.query.id in by_query]
    if not rows:
        return {}
    scores = np.stack([r for r, _ in rows])
    relevant = [rel for _, rel in rows]
    return {f"recall_at_{k}": recall_at_k(scores, relevant, k), "mrr": mrr(scores, relevant),
            "queries": len(rows)}


def facts_said(model: LoadedModel, pool: Pool, max_new_tokens: int = 8) -> dict:
    """Whether the model *says* each planted fact: its greedy continuation of the fact's query
    prompt starts with the answer word (``" Quessit."`` -> ``Quessit``; punctuation after it
    is ignored). Returns ``{"said": n, "of": n_facts, "rate": n / n_facts, "queries": [{"id",
    "prompt", "answer", "continuation", "said"}, ...]}``."""
    from stride_viz.method.frozen import FrozenLM
    from stride_viz.method.measurement import generate

    lm = FrozenLM(model.model)
    rows = []
    for fact in pool.facts:
        q = fact.query
        answer = (q.completion or "").strip().rstrip(".")
        text = generate(lm, model.tokenizer, q.prompt, max_new_tokens)[0]
        first = re.match(r"\s*([^\s.,;:!?]+)", text)
        rows.append({"id": q.id, "prompt": q.prompt, "answer": answer, "continuation": text,
                     "said": bool(first) and first.group(1) == answer})
    said = sum(r["said"] for r in rows)
    return {"said": said, "of": len(rows), "rate": said / max(1, len(rows)), "queries": rows}


def run_demo(preset: str = "tiny", config: Optional[FitConfig] = None,
             run_dir: Optional[str | Path] = None, n_queries: Optional[int] = None,
             recovery: RecoveryConfig = RecoveryConfig(),
             progress: Callable[..., None] = no_progress,
             echo: Callable[[str], None] = lambda s: None, pool_limit: Optional[int] = None,
             should_stop: Callable[[], bool] = lambda: False) -> dict:
    """Build (or reuse) the demo model, fit the operators, explain the fact queries and one
    free prompt; returns and writes ``demo.json`` with the planted-fact metrics and timings."""
    t0 = time.monotonic()
    config = config or FitConfig()
    pool = load_pool(DEMO_POOL, limit=pool_limit)
    model = load_model(f"demo:{preset}", device=config.device, progress=progress)
    t_model = time.monotonic()
    run_dir = Path(run_dir) if run_dir else default_run_dir(model.hash, pool.hash, config)
    run = Stride.create_or_open(run_dir, model, pool, config)
    run.fit(progress=progress, should_stop=should_stop)
    t_fit = time.monotonic()
    queries = fact_queries(pool)[:n_queries]
    attributions = run.attribute(queries, recovery, progress=progress)
    try:   # the model's own continuation of a free prompt (a weak model may produce none)
        attributions += run.attribute([Query("free-prompt", FREE_PROMPT, None)], recovery,
                                      progress=progress)
    except QueryError as e:
        echo(f"free prompt skipped: {e}")
    t_done = time.monotonic()
    summary = {"run": str(run_dir), "model": model.spec, "pool": DEMO_POOL, "n_pool": len(pool),
               **fact_metrics(pool, attributions),
               "seconds_model": t_model - t0, "seconds_fit": t_fit - t_model,
               "seconds_attribute": t_done - t_fit, "seconds_total": t_done - t0,
               "seconds_per_query": (t_done - t_fit) / max(1, len(attributions))}
    if pool.facts:   # after the timings: does the model itself say what it is explained for?
        said = facts_said(model, pool)
        summary.update(facts_said=said["said"], facts=said["of"])
    write_json(run_dir / "demo.json", summary)
    echo(f"run directory: {run_dir}")
    for a in attributions[:3] + attributions[-1:]:
        echo(f"\n{a.query.id}: {a.query.prompt!r} -> {a.query.completion!r}")
        for i in a.top(3):
            echo(f"  {a.scores[i]:+.4f} nats  {pool.ids[i]:>14}  {pool.text(i)[:70]!r}")
    if "mrr" in summary:
        echo(f"\nplanted facts: recall@10 {summary['recall_at_10']:.2f}, MRR {summary['mrr']:.2f} "
             f"over {summary['queries']} queries")
    if "facts_said" in summary:
        echo(f"the model says {summary['facts_said']} of its {summary['facts']} planted facts "
             f"(greedy continuation of the fact's prompt starts with the answer)")
    echo(f"time: model {summary['seconds_model']:.0f} s, fit {summary['seconds_fit']:.0f} s, "
         f"attribution {summary['seconds_attribute']:.1f} s ({summary['seconds_per_query']:.2f} s/query)")
    return summary
