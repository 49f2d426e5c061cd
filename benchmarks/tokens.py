"""Token-level attribution on the demo: does the answer token of a planted fact point at the
fact's documents, and a function word not? And what do per-token scores cost?

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/tokens.py            # fits the demo run once
    python benchmarks/tokens.py --run benchmarks/work/tokens-demo --out benchmarks/results/tokens.json

Fits (or reuses) the demo run (demo:tiny, fortunes+facts, default FitConfig) in --run, explains
its 34 planted-fact queries with per-token scores (``Stride.attribute(per_token=True)``), and
reports, with the same rule for every row (recall@10 = share of a fact's source documents among
the 10 highest scores; ties counted against the method, so an all-zero row finds nothing):

- answer token: the first completion token holding a letter or digit (" Quessit" of
  " Quessit."); its own top-10 recall of the fact's sources (target: >= 0.9);
- answer word: the tokens the answer word is split into (" Qu", "ess", "it" with the shipped
  demo tokenizer; ``tokens.word_span``), scored by the mean of their scores
  (``TokenRecovery.span_scores``, what Explore's "Score the whole word" shows);
- last token (the final "." of every fact): its recall, and how many sources are among its
  positive proponents at all;
- the whole completion's recall, for comparison (also by the demo's rule, which breaks ties
  among zero scores by the back-projection: ``recall10_whole_demo_rule``).

Cost: seconds of the whole recovery and of the per-token recoveries per query, and the time a
per-token recovery adds to a prompt explained from Explore (the free prompt's 24-token
generated completion, through ``Stride.attribute_tokens`` as the warm explainer does it).
Writes one JSON document to --out with the exact command and the machine's load.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _recall(scores: np.ndarray, sources: list[int], k: int = 10) -> float:
    from stride_viz.evaluation.metrics import recall_at_k
    return recall_at_k(scores[None, :], [sources], k)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=str(ROOT / "benchmarks" / "work" / "tokens-demo"),
                   help="run folder (fitted here on first use)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tokens.json"))
    p.add_argument("--queries", type=int, default=None, help="only the first N fact queries")
    a = p.parse_args()

    import torch
    torch.set_num_threads(1)
    from stride_viz.config import FitConfig
    from stride_viz.data.models import load_model
    from stride_viz.data.pools import Query, fact_queries, load_pool
    from stride_viz.demo import FREE_PROMPT
    from stride_viz.engine import Stride
    from stride_viz.method.tokens import first_word_token, word_span

    load_start = os.getloadavg()
    t0 = time.monotonic()
    pool = load_pool("fortunes+facts")
    model = load_model("demo:tiny")
    run = Stride.create_or_open(a.run, model, pool, FitConfig())
    fitted_before = run.store.is_fitted()
    run.fit()
    seconds_fit = time.monotonic() - t0

    sources = {f.query.id: [pool.index_of(s) for s in f.source_ids] for f in pool.facts}
    rows = []
    for q in fact_queries(pool)[: a.queries]:
        [att] = run.attribute([q], per_token=True, continuations=False)
        meta = json.loads((att.folder / "meta.json").read_text())
        tok, src = att.tokens, sources[q.id]
        t_ans, t_last = first_word_token(att.info["tokens"]), tok.n_tokens - 1
        last = tok.token_scores(t_last)
        rows.append({
            "query": q.id, "completion": q.completion, "tokens": att.info["tokens"],
            "answer_token": t_ans, "sources": len(src),
            "recall10_answer_token": _recall(tok.token_scores(t_ans), src),
            "answer_word_tokens": word_span(att.info["tokens"], t_ans),
            "recall10_answer_word": _recall(tok.span_scores(word_span(att.info["tokens"], t_ans)), src),
            "recall10_last_token": _recall(last, src) if t_last != t_ans else None,
            "sources_among_last_token_proponents": int(sum(last[i] > 0 for i in src)),
            "last_token_proponents": int((last > 0).sum()),
            "recall10_whole": _recall(att.scores, src),
            "recall10_whole_demo_rule": _recall(att.ranking(), src),
            "nonzeros_tokens": tok.nonzeros.tolist(), "nonzeros_whole": att.recovery.chosen_nonzeros,
            "seconds_recovery_whole": meta["seconds_recovery"], "seconds_tokens": meta["seconds_tokens"]})
        print(f"{q.id} {att.info['tokens']}: answer-token recall@10 {rows[-1]['recall10_answer_token']:.2f}, "
              f"answer word {rows[-1]['recall10_answer_word']:.2f}, "
              f"last-token {rows[-1]['recall10_last_token']}, whole {rows[-1]['recall10_whole']:.2f}, "
              f"tokens {meta['seconds_tokens']:.2f} s", flush=True)

    # what a prompt explained from Explore pays on top (the warm explainer's order: scores, then tokens)
    [free] = run.attribute([Query("free-prompt", FREE_PROMPT, None)], continuations=False)
    t1 = time.monotonic()
    free = run.attribute_tokens("free-prompt")
    seconds_free_tokens = time.monotonic() - t1
    free_meta = json.loads((free.folder / "meta.json").read_text())

    def mean(key):
        vals = [r[key] for r in rows if r[key] is not None]
        return float(np.mean(vals)) if vals else None

    result = {
        "what": "Token-level attribution on the demo run: each planted fact's answer-token top-10 "
                "recall of the fact's source documents (target >= 0.9; the answer's first token, and the "
                "answer word: the mean of the scores of the tokens it is split into), the final '.' token's, the whole "
                "completion's (same rule: ties against the method), and the cost of per-token scores.",
        "command": (f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if os.environ.get("OMP_NUM_THREADS") else "")
                   + (f"nice -n {os.nice(0)} " if os.nice(0) else "")
                   + " ".join(["python"] + [shlex.quote(x) for x in sys.argv]),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_at_start": load_start, "load_average_at_end": os.getloadavg(),
                    "niceness": os.nice(0), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "run": str(a.run), "model": model.spec, "model_hash": model.hash, "pool": pool.name,
        "n_pool": len(pool), "K": run.membership.shape[0], "fit_reused": fitted_before,
        "seconds_fit_or_open": seconds_fit,
        "seconds_fit_recorded": json.loads((run.store.fit_dir / "state.json").read_text()).get("seconds"),
        "summary": {
            "queries": len(rows),
            "recall10_answer_token": mean("recall10_answer_token"),
            "recall10_answer_word": mean("recall10_answer_word"),
            "answers_of_one_token": int(sum(len(r["answer_word_tokens"]) == 1 for r in rows)),
            "recall10_last_token": mean("recall10_last_token"),
            "recall10_whole": mean("recall10_whole"),
            "recall10_whole_demo_rule": mean("recall10_whole_demo_rule"),
            "queries_with_a_source_among_last_token_proponents":
                int(sum(r["sources_among_last_token_proponents"] > 0 for r in rows)),
            "mean_tokens_per_completion": float(np.mean([len(r["tokens"]) for r in rows])),
            "seconds_recovery_whole_mean": mean("seconds_recovery_whole"),
            "seconds_tokens_mean": mean("seconds_tokens"),
            "seconds_tokens_per_token": float(np.sum([r["seconds_tokens"] for r in rows])
                                              / max(1, sum(len(r["tokens"]) for r in rows))),
            "free_prompt_tokens": free.tokens.n_tokens,
            "free_prompt_seconds_added_by_tokens": seconds_free_tokens,
            "free_prompt_seconds_token_recoveries": free_meta.get("seconds_tokens"),
            "free_prompt_seconds_recovery_whole": free_meta.get("seconds_recovery"),
        },
        "queries": rows,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
