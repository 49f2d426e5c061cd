"""Read a finished run for viewing, and write it as one self-contained interactive HTML file.

The readers here (``list_runs``, ``read_run``, ``read_query``, ``membership_of``) only read the
files of the run directory (see :mod:`stride_viz.storage`): no model, no torch, no Lasso. The
dashboard pages and the report both use them.

    python -m stride_viz.app.report RUN_DIR [-o report.html]

The report embeds plotly.js once, so it opens offline in any browser; every chart keeps its
hover, zoom and legend toggles.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pandas as pd

from stride_viz.app import plots
from stride_viz.storage import RunStore, read_json
from stride_viz.export import csv_text  # noqa: F401  (re-exported: the pages import it from here)

__all__ = ["RunInfo", "QueryView", "list_runs", "read_run", "read_query", "read_pool_rows",
           "membership_of", "top_table", "fact_sources", "ranks_of", "fact_ranks", "query_infos",
           "query_snippet", "csv_text", "build_report", "write_report"]


@dataclass
class RunInfo:
    """What a run directory holds, from run.json and fit/state.json."""

    path: Path
    meta: dict
    fit_state: dict
    fitted: bool
    query_ids: list[str]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def K(self) -> int:
        return int(self.meta["config"]["subsets"])

    @property
    def n(self) -> int:
        return int(self.meta["pool"]["n"])

    @property
    def is_demo(self) -> bool:
        return self.meta["pool"]["spec"] == "fortunes+facts"

    @property
    def model_name(self) -> str:
        """The model's hub id, or its folder's name (not the full path on this machine)."""
        return Path(str(self.meta["model"]["spec"])).name

    @property
    def pool_name(self) -> str:
        """The built-in pool's name or the pool file's own name (an upload's included)."""
        return Path(str(self.meta["pool"]["spec"])).name

    def label(self) -> str:
        model = "demo model" if self.is_demo else self.model_name
        pool = self.pool_name
        status = f"{len(self.query_ids)} quer{'y' if len(self.query_ids) == 1 else 'ies'}" if self.fitted \
            else f"fit {self.fit_state.get('status', 'not started')}"
        return f"{model} · {pool} ({self.n} examples) · K={self.K} · {status}"


@dataclass
class QueryView:
    """One explained query, as plain arrays.

    responses: (K,) nats; scores, backprojection: (n,) nats; path: ratios, alphas, nonzeros,
    cv_mean, cv_std (L,), coefs (L, n), chosen_index (int).
    """

    id: str
    info: dict
    responses: np.ndarray
    scores: np.ndarray
    backprojection: np.ndarray
    path: dict[str, Any]
    continuations: Optional[dict]
    meta: dict = field(default_factory=dict)

    @property
    def chosen_ratio(self) -> float:
        return float(self.path["ratios"][self.path["chosen_index"]])


def read_run(run_dir: str | Path) -> RunInfo:
    store = RunStore(run_dir)
    meta = store.read_meta()
    state_path = store.fit_dir / "state.json"
    state = read_json(state_path) if state_path.exists() else {}
    return RunInfo(Path(run_dir), meta, state, store.is_fitted(), store.query_ids())


def list_runs(home: str | Path) -> list[RunInfo]:
    """Run directories under ``home/runs``, most recently changed first."""
    base = Path(home) / "runs"
    if not base.is_dir():
        return []
    runs = []
    for d in base.iterdir():
        if (d / "run.json").exists():
            try:
                runs.append(read_run(d))
            except (OSError, ValueError, KeyError):  # a run being written right now
                continue
    def changed(r: RunInfo) -> float:
        att = r.path / "attributions"
        return max((r.path / "run.json").stat().st_mtime, att.stat().st_mtime if att.exists() else 0)
    return sorted(runs, key=changed, reverse=True)


def read_pool_rows(run_dir: str | Path) -> pd.DataFrame:
    """The run's pool as a table with columns id, prompt, completion, text (row i = pool index i)."""
    df = pd.read_json(Path(run_dir) / "pool.jsonl", lines=True, dtype={"id": str})
    df["id"] = df["id"].astype(str)
    df["text"] = df["prompt"].fillna("") + df["completion"].fillna("")
    return df


def _facts_by_query(run_dir: str | Path) -> dict[tuple, list[str]]:
    """(prompt, completion) of each planted fact's query -> its source ids (facts.json)."""
    path = Path(run_dir) / "facts.json"
    if not path.exists():
        return {}
    return {(f["query"]["prompt"], f["query"]["completion"]): list(f["source_ids"]) for f in read_json(path)}


def fact_sources(run_dir: str | Path, query: dict) -> list[str]:
    """Pool ids of the documents that state a planted fact whose prompt and completion match
    ``query`` (empty when the pool has no planted facts or the query is not one)."""
    return list(_facts_by_query(run_dir).get((query.get("prompt"), query.get("completion")), []))


def ranks_of(scores: np.ndarray, backprojection: np.ndarray, rows: Sequence[int]) -> list[int]:
    """1-based rank of pool rows ``rows`` when examples are sorted by score (descending), ties
    (e.g. the many exact zeros) broken by the back-projection estimate, as Attribution.top does."""
    order = np.lexsort((-np.asarray(backprojection, float), -np.asarray(scores, float)))
    position = np.empty_like(order)
    position[order] = np.arange(1, order.size + 1)
    return [int(position[r]) for r in rows]


def source_ranks(run_dir: str | Path, query_id: str, rows: Sequence[int]) -> list[int]:
    """Ranks (``ranks_of``) of pool rows ``rows`` in one explained query's scores; reads the
    scores alone, not the whole path."""
    folder = RunStore(run_dir).attribution_dir(query_id)
    return ranks_of(np.load(folder / "scores.npy"), np.load(folder / "backprojection.npy"), rows)


def fact_ranks(run_dir: str | Path, ranks: Callable[[str, tuple], list[int]] | None = None,
               ids: Optional[list[str]] = None) -> list[dict]:
    """For every explained query of the run that asks for a planted fact: the rank of its best
    known source document. Rows: {"query", "best_rank", "sources", "best_id"}. ``ranks(query
    id, source rows)``: how to rank them (default ``source_ranks``; the dashboard passes a cached
    one, since this runs again whenever a query is added); ``ids``: the pool's ids in order, if
    already read."""
    facts = _facts_by_query(run_dir)
    if not facts:
        return []
    ids = ids if ids is not None else read_pool_rows(run_dir)["id"].tolist()
    row_of = {e: i for i, e in enumerate(ids)}
    rank = ranks or (lambda qid, rows: source_ranks(run_dir, qid, rows))
    out = []
    for qid, info in query_infos(run_dir).items():   # query.json alone: most queries are no fact
        sources = facts.get((info.get("prompt"), info.get("completion")), [])
        rows = tuple(row_of[s] for s in sources if s in row_of)
        if rows:
            r = rank(qid, rows)
            best = int(np.argmin(r))
            out.append({"query": qid, "best_rank": r[best], "sources": len(rows), "best_id": ids[rows[best]]})
    return out


def query_infos(run_dir: str | Path) -> dict[str, dict]:
    """query id -> the query's query.json (prompt, completion, ...) for every explained query."""
    store = RunStore(run_dir)
    out = {}
    for qid in store.query_ids():
        try:
            out[qid] = read_json(store.attribution_dir(qid) / "query.json")
        except (OSError, ValueError):  # being written right now
            continue
    return out


def query_snippet(info: dict, width: int = 72) -> str:
    """A query as a person recognises it: “prompt” → “completion”, shortened to about
    ``width`` characters (plain text: escape it for where it is shown)."""
    prompt = " ".join(str(info.get("prompt", "")).split())
    completion = " ".join(str(info.get("completion") or "").split())
    room = max(12, width - min(len(completion), width // 3))
    if len(prompt) > room:
        prompt = "…" + prompt[-(room - 1):]           # the end of a prompt is what is completed
    if len(prompt) + len(completion) > width:
        completion = completion[: max(8, width - len(prompt)) - 1] + "…"
    return f"“{prompt}” → “{completion}”" if completion else f"“{prompt}”"


def read_query(run_dir: str | Path, query_id: str) -> QueryView:
    folder = RunStore(run_dir).attribution_dir(query_id)
    if not (folder / "meta.json").exists():
        raise FileNotFoundError(f"Run {run_dir} has no finished attribution for query {query_id!r}.")
    with np.load(folder / "path.npz") as z:
        path = {k: z[k] for k in z.files}
    path["chosen_index"] = int(path["chosen_index"])
    cont_path = folder / "continuations.json"
    return QueryView(
        id=query_id, info=read_json(folder / "query.json"),
        responses=np.load(folder / "responses.npy"), scores=np.load(folder / "scores.npy"),
        backprojection=np.load(folder / "backprojection.npy"), path=path,
        continuations=read_json(cont_path) if cont_path.exists() else None,
        meta=read_json(folder / "meta.json"))


def membership_of(run_dir: str | Path, example: int) -> np.ndarray:
    """Bool (K,): which subsets contain pool example ``example``."""
    M = RunStore(run_dir).read_membership()
    return np.asarray(M[:, int(example)].toarray()).ravel() > 0


def top_table(pool: pd.DataFrame, scores: np.ndarray, backprojection: Optional[np.ndarray] = None,
              sources: Sequence[str] = ()) -> pd.DataFrame:
    """Every example with a non-zero score, ranked by score (proponents first, then opponents
    from the most harmful). Columns: rank, id, score_nats, effect, backprojection_nats,
    planted_source, text, row (pool index)."""
    scores = np.asarray(scores, dtype=float)
    nz = np.flatnonzero(scores != 0)
    pos = nz[scores[nz] > 0][np.argsort(-scores[nz][scores[nz] > 0], kind="stable")]
    neg = nz[scores[nz] < 0][np.argsort(scores[nz][scores[nz] < 0], kind="stable")]
    order = np.concatenate([pos, neg]).astype(int)
    src = set(sources)
    df = pd.DataFrame({
        "rank": np.concatenate([np.arange(1, len(pos) + 1), -np.arange(1, len(neg) + 1)]).astype(int),
        "id": pool["id"].to_numpy()[order],
        "score_nats": scores[order],
        "effect": np.where(scores[order] > 0, "helps (proponent)", "hurts (opponent)"),
        "text": pool["text"].to_numpy()[order],
        "row": order,
    })
    if backprojection is not None:
        df.insert(4, "backprojection_nats", np.asarray(backprojection, dtype=float)[order])
    if src:
        df.insert(5, "planted_source", df["id"].isin(src))
    return df


# ----------------------------------------------------------------------------- HTML report

_CSS = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em } h2 { border-top: 1px solid #ddd; padding-top: 1em; margin-top: 2em }
.meta { color: #666; font-size: 0.9em } table { border-collapse: collapse; font-size: 0.85em; width: 100% }
td, th { border-bottom: 1px solid #eee; padding: 4px 6px; text-align: left; vertical-align: top }
.pos { color: #1a9850; font-weight: 600 } .neg { color: #d73027; font-weight: 600 }
.note { background: #f6f8fa; border-left: 4px solid #4c78a8; padding: 0.6em 1em; margin: 1em 0 }
.cont { display: grid; grid-template-columns: 1fr 1fr; gap: 1em } .cont pre { white-space: pre-wrap;
       background: #fafafa; padding: 0.6em; border: 1px solid #eee; margin: 0 }
"""


def _table_html(df: pd.DataFrame, limit: int) -> str:
    rows = []
    for _, r in df.head(limit).iterrows():
        cls = "pos" if r["score_nats"] > 0 else "neg"
        star = " ★" if r.get("planted_source", False) else ""
        rows.append(f"<tr><td>{r['rank']}</td><td>{html.escape(str(r['id']))}{star}</td>"
                    f"<td class='{cls}'>{r['score_nats']:+.4g}</td><td>{html.escape(str(r['text']))}</td></tr>")
    return ("<table><tr><th>rank</th><th>id</th><th>score (nats)</th><th>text</th></tr>"
            + "".join(rows) + "</table>")


def build_report(run_dir: str | Path, query_ids: Optional[Sequence[str]] = None, top: int = 10) -> str:
    """The whole run (or the given queries) as one HTML document with plotly.js inlined."""
    run = read_run(run_dir)
    ids = list(query_ids) if query_ids is not None else run.query_ids
    pool = read_pool_rows(run_dir)
    cfg = run.meta["config"]
    parts = [f"<h1>STRIDE attribution report</h1><div class='meta'>Run <code>{html.escape(run.name)}</code> · "
             f"model <code>{html.escape(run.model_name)}</code> · pool "
             f"<code>{html.escape(run.pool_name)}</code> ({run.n} examples) · K = {run.K} "
             f"subsets, d = {cfg['per_example']}, rank {cfg['rank']}, mode {cfg['mode']}"
             f"{', closed-form Gauss-Newton operators' if cfg.get('solver') == 'gauss-newton' else ''} · written "
             f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC</div>",
             "<div class='note'>A <b>score w<sub>i</sub> &gt; 0</b> means training example i <b>helps</b>: "
             "training on it lowers the loss of the query's completion (a proponent); <b>w<sub>i</sub> &lt; 0"
             "</b> means it hurts (an opponent). Units: nats of mean per-token loss. An operator response "
             "y<sub>k</sub> = Loss<sub>base</sub> − Loss<sub>k</sub> &gt; 0 means steering the model with the "
             "operator of subset k lowers the loss. ★ marks known sources of a planted fact.</div>"]
    found = fact_ranks(run_dir)
    if found:
        hits = sum(f["best_rank"] <= 10 for f in found)
        parts.append(f"<p>Planted facts: for <b>{hits} of {len(found)}</b> fact queries a known source "
                     f"document is among the top 10 of {run.n} examples (best ranks: "
                     f"{', '.join(str(f['best_rank']) for f in found)}).</p>")
    first = True
    for qid in ids:
        q = read_query(run_dir, qid)
        sources = fact_sources(run_dir, q.info)
        marked = set(np.flatnonzero(pool["id"].isin(sources)).tolist())
        pro, con = plots.top_indices(q.scores, top)
        figs = [plots.top_examples_figure(pool["id"].tolist(), q.scores, pool["text"].tolist(), top=top,
                                          marked=marked),
                plots.sparsity_path_figure(q.path["ratios"], q.path["coefs"], q.path["nonzeros"],
                                           q.path["cv_mean"], q.path["cv_std"], q.path["chosen_index"],
                                           pool["id"].tolist(), highlight=list(pro[:5]) + list(con[:3])),
                plots.responses_figure(q.responses)]
        divs = []
        for fig in figs:
            # plotly.js inlined (never a CDN), no Chart Studio button, no MathJax
            divs.append(fig.to_html(full_html=False, include_plotlyjs=True if first else False,
                                    include_mathjax=False, config=dict(plots.PLOTLY_CONFIG)))  # to_html edits it
            first = False
        gen = " (generated by the model)" if q.info.get("completion_generated") else ""
        parts.append(f"<h2>Query {html.escape(query_snippet(q.info))} <code>{html.escape(qid)}</code></h2>"
                     f"<p>Base loss of the completion{gen}: <b>{q.info['loss_base']:.3f} nats</b> per token.</p>"
                     + plots.token_loss_html(q.info["prompt"], q.info["tokens"], q.info["token_loss"]))
        parts.append(divs[0])
        parts.append(_table_html(top_table(pool, q.scores, sources=sources), 2 * top))
        parts += divs[1:]
        if q.continuations:
            ops = "".join(f"<div><b>operator {o['k']}</b> (y = {o['response']:+.3g} nats)"
                          f"<pre>{html.escape(q.info['prompt'])}<b>{html.escape(o['text'])}</b></pre></div>"
                          for o in q.continuations.get("operators", []))
            base = html.escape(q.continuations.get("base", ""))
            parts.append(f"<h3>Continuations: base model and steered by single operators</h3><div class='cont'>"
                         f"<div><b>base model</b><pre>{html.escape(q.info['prompt'])}<b>{base}</b></pre></div>"
                         f"{ops}</div>")
    body = "\n".join(parts)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>STRIDE report: {html.escape(run.name)}"
            f"</title><style>{_CSS}</style></head><body>{body}</body></html>")


def write_report(run_dir: str | Path, out: str | Path, query_ids: Optional[Sequence[str]] = None) -> Path:
    out = Path(out)
    out.write_text(build_report(run_dir, query_ids), encoding="utf-8")
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Write a run as one self-contained HTML report.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("-o", "--out", type=Path, default=None, help="default: RUN_DIR/report.html")
    parser.add_argument("--query", action="append", default=None, help="only these query ids (repeatable)")
    args = parser.parse_args(argv)
    path = write_report(args.run_dir, args.out or args.run_dir / "report.html", args.query)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
