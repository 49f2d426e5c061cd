"""What the Audit page shows, Streamlit-free so it is tested without a browser: the finished
audits of a run, their documents and evidence as tables, and an uploaded benchmark file read
as queries (its messages name the file as the user called it, never a path on the server)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd

from stride_viz.data.pools import PoolError, load_queries
from stride_viz.data.qa_items import qa_queries
from stride_viz.downstream.audit import audits_dir, read_audit

__all__ = ["list_audits", "documents_table", "evidence_table", "queries_from_upload", "builtin_queries",
           "audit_label"]


def builtin_queries() -> list[dict]:
    """The built-in contamination benchmark's 48 invented question/answer items."""
    return [{"id": q.id, "prompt": q.prompt, "completion": q.completion} for q in qa_queries()]


def queries_from_upload(name: str, data: bytes) -> list[dict]:
    """The queries of an uploaded JSONL file (``load_queries``' format); PoolError in one line,
    naming the file by ``name``."""
    shown = Path(str(name).replace("\\", "/")).name or "upload.jsonl"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("queries" + Path(shown).suffix.lower())
        path.write_bytes(data)
        try:
            queries = load_queries(path)
        except PoolError as e:
            raise PoolError(str(e).replace(f"'{path}'", f"'{shown}'").replace(str(path), shown)) from None
    return [{"id": q.id, "prompt": q.prompt, "completion": q.completion} for q in queries]


def list_audits(run_dir: str | Path) -> list[tuple[Path, dict]]:
    """(folder, audit.json) of every finished audit of a run, newest first; damaged ones are
    left out (the page says how many)."""
    root = audits_dir(run_dir)
    found = []
    for folder in sorted(root.glob("*/")) if root.is_dir() else []:
        try:
            found.append((folder, read_audit(folder)))
        except (FileNotFoundError, ValueError):
            continue
    return sorted(found, key=lambda fd: str(fd[1].get("created", "")), reverse=True)


def audit_label(data: dict) -> str:
    """How an audit is listed: name, queries, flagged documents, time (plain text)."""
    return (f"{data.get('name') or 'benchmark'} · {data.get('n_queries', '?')} queries · "
            f"{data.get('n_flagged', '?')} flagged · {str(data.get('created', ''))[:16].replace('T', ' ')}")


def documents_table(data: dict, flagged_only: bool = False) -> pd.DataFrame:
    """One row per reported document, strongest first, with its strongest evidence."""
    rows = []
    statistic = f"statistic ({(data.get('config') or {}).get('statistic', 'max-z')})"
    for d in data.get("documents", []):
        if flagged_only and not d.get("flagged"):
            continue
        e = (d.get("evidence") or [{}])[0]
        rows.append({"rank": d["rank"], "flagged": bool(d["flagged"]), "example_id": d["id"],
                     statistic: d["statistic"], "outlier z": d["outlier"],
                     "strongest query": e.get("query_id", ""), "score there": e.get("score"),
                     "rank in that query": e.get("rank"),
                     "share of the query's words": (e.get("overlap") or {}).get("share"),
                     "text": " ".join(str(d.get("text", "")).split())[:200]})
    return pd.DataFrame(rows)


def evidence_table(doc: dict) -> pd.DataFrame:
    """The evidence of one document: the queries where it is most extreme."""
    return pd.DataFrame([{"query_id": e["query_id"], "score": e["score"], "z": e["z"], "rank in query": e["rank"],
                          "share of the query's words": e["overlap"]["share"],
                          "longest run of query words": e["overlap"]["run"]} for e in doc.get("evidence", [])])
