"""Contamination audit: which training documents have extreme scores across a benchmark's queries?

A training document that is a copy of a benchmark item (a *replica*) makes the model answer
that item well: its attribution score for the item's query is far above the scores of the
other documents for that query. The audit explains every benchmark query with a fitted run,
turns each query's scores into robust z-scores, and ranks the documents by how extreme they
are across the queries (the STRIDE paper's memorisation experiment: the recall of injected
replicas among the extreme-score documents).

    python -m stride_viz audit --run runs/demo --queries benchmark.jsonl --out audit/

The statistic (ours; the paper does not define one), per document i, from the scores
``w[q, i]`` (float (n_queries, n_pool), > 0 = the document lowers the query's loss):

1. ``max-score`` (the default): ``statistic[i] = max_q w[q, i]``, the document's largest score
   over the queries, in the method's units (nats for STRIDE, comparable across queries). Only
   proponents count, since a replica *lowers* its item's loss.
2. ``max-z``: the same over robust z-scores, ``z[q, i] = (w[q, i] - median_q) / scale_q``, with
   ``scale_q`` = 1.4826 x the median absolute deviation of query q's scores, or, when more than
   half of them are equal (STRIDE's Lasso leaves most scores at exactly 0, so the MAD is 0),
   1.2533 x their mean absolute deviation from the median; ``max-abs-z`` (either sign) and
   ``topk-count`` (in how many queries the document is among the ``top_k`` proponents) too.
   ``best-rank``: ``1 / min_q rank[q, i]``, the document's best rank among the pool over the
   queries (1 = some query's strongest proponent), equal best ranks ordered by ``max-score``:
   it compares documents by where they stand within each query, never by the scores' size
   across queries. On the paraphrased contamination benchmark's development items it raised
   TF-IDF's recall@budget (0.625 to 0.681, mean of the three leak rates) and lowered STRIDE's
   (0.736 to 0.556); the benchmark offers it to every method, which keeps it where it wins.
   On the contamination benchmark's development items STRIDE's recall@budget (mean of the
   three leak rates) is 0.74 with ``max-score`` and 0.71 with ``max-z`` for paraphrased
   replicas (``benchmarks/results/contamination.json``), 0.88 and 1.00 for verbatim ones
   (``contamination_verbatim.json``); an earlier 1,000-fortune verbatim run had 1.00 and 0.00
   (a query whose Lasso keeps a few tiny non-zero scores gets a tiny scale, and its z-scores
   dwarf the replicas'). ``max-score`` stays the default; the benchmark picks per method.
3. a document is **flagged** when its statistic is an outlier among the documents' statistics:
   ``(statistic - median) / (1.4826 MAD) >= threshold`` (default 5; 2.5, 3.5, 5 and 8 were
   compared on the development items of the earlier 1,000-fortune verbatim run, where 5 was
   the smallest with no false flag), at most ``max_flagged`` of them, strongest first. (The
   2,000-fortune benchmark runs' development items prefer 8 for STRIDE by F1, in both replica
   modes; the default is kept.)

Per flagged document the evidence lists the queries where it is most extreme: the query id,
its score there (the method's units; nats for STRIDE), its z, its rank among the pool for
that query (1 = strongest proponent) and how much of the query's text it contains (the share
of the query's distinct words found in the document, and the longest run of the query's words
it repeats in order).

``audit_scores`` works on any method's score matrix (the benchmark audits the peers with it);
``run_audit`` attributes the queries with a run and writes ``audit.json``, ``flagged.csv``
(text cells that a spreadsheet would run are prefixed with ``'``), ``scores.npy`` and
``statistic.npy`` into the output folder.
"""
from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import io
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from stride_viz.config import ConfigError, RecoveryConfig
from stride_viz.data.records import Query
from stride_viz.integrity import atomic_write, write_text_atomic
from stride_viz.progress import Cancelled, no_progress
from stride_viz.export import safe_cell

__all__ = ["AuditConfig", "AuditResult", "STATISTICS", "COMBINATIONS", "query_z", "document_statistic",
           "outlier_scores", "audit_scores", "word_overlap", "combine", "replica_recall", "safe_cell",
           "flagged_csv", "write_audit", "run_audit", "audit_id", "audits_dir", "read_audit", "FORMAT"]

FORMAT = "stride_viz-audit-1"
STATISTICS = ("max-score", "max-z", "max-abs-z", "topk-count", "best-rank")   # the default first
COMBINATIONS = ("rank-mean", "rrf", "z-sum")
_WORD = re.compile(r"[a-z0-9']+")


@dataclass(frozen=True)
class AuditConfig:
    """How documents are ranked and flagged (see the module docstring)."""

    statistic: str = field(default="max-score", metadata={"help": "per-document statistic: max-score "
                           "(largest score over the queries), max-z (largest robust z of the score over the "
                           "queries), max-abs-z (either sign), topk-count, best-rank (1 / the document's best "
                           "rank within a query)"})
    top_k: int = field(default=10, metadata={"help": "top proponents per query counted by topk-count"})
    threshold: float = field(default=5.0, metadata={"help": "flag documents whose statistic has a robust "
                             "z among all documents' statistics at least this"})
    max_flagged: int = field(default=100, metadata={"help": "flag at most this many documents"})
    evidence: int = field(default=5, metadata={"help": "queries listed as evidence per document"})

    def __post_init__(self) -> None:
        if self.statistic not in STATISTICS:
            raise ConfigError(f"The 'statistic' parameter of AuditConfig must be one of "
                              f"{', '.join(STATISTICS)}. Got {self.statistic!r} instead.")
        for name, lo in (("top_k", 1), ("max_flagged", 1), ("evidence", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"The '{name}' parameter of AuditConfig must be an integer of at "
                                  f"least {lo}. Got {v!r} instead.")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not np.isfinite(t) or t <= 0:
            raise ConfigError(f"The 'threshold' parameter of AuditConfig must be a number in (0, inf). "
                              f"Got {t!r} instead.")


@dataclass
class AuditResult:
    """statistic, outlier: float64 (n_pool,); order: int (n_pool,), strongest first;
    flagged: int array of pool indices (strongest first); documents: the report rows."""

    statistic: np.ndarray
    outlier: np.ndarray
    order: np.ndarray
    flagged: np.ndarray
    documents: list[dict]
    config: AuditConfig


# ----------------------------------------------------------------------------- the statistic

def _robust_scale(x: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Per row: 1.4826 MAD, or 1.2533 x mean absolute deviation where the MAD is 0."""
    dev = np.abs(x - centre)
    mad = 1.4826 * np.median(dev, axis=-1, keepdims=True)
    mean_dev = 1.2533 * dev.mean(axis=-1, keepdims=True)
    return np.where(mad > 0, mad, mean_dev)


def query_z(scores: np.ndarray) -> np.ndarray:
    """Robust z-scores of each query's row: float64 (n_queries, n_pool); rows whose scores are
    all equal (nothing to tell apart) are 0."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] == 0 or s.shape[1] == 0:
        raise ValueError(f"The 'scores' parameter must be a non-empty (n_queries, n_pool) matrix. "
                         f"Got shape {s.shape} instead.")
    s = np.nan_to_num(s)
    med = np.median(s, axis=1, keepdims=True)
    scale = _robust_scale(s, med)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(scale > 0, (s - med) / np.where(scale > 0, scale, 1.0), 0.0)
    return z


def document_statistic(scores: np.ndarray, statistic: str = "max-score", top_k: int = 10,
                       z: Optional[np.ndarray] = None) -> np.ndarray:
    """How extreme each document is across the queries: float64 (n_pool,), higher = more
    extreme (see the module docstring for the definitions)."""
    if statistic not in STATISTICS:
        raise ConfigError(f"The 'statistic' parameter must be one of {', '.join(STATISTICS)}. "
                          f"Got {statistic!r} instead.")
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64))
    if statistic == "max-score":
        return s.max(axis=0)
    if statistic == "best-rank":
        best = _ranks(s).min(axis=0).astype(np.float64)
        # equal best ranks: the larger max-score first, a shift too small to cross a rank level
        tie = (np.argsort(np.argsort(s.max(axis=0), kind="stable"), kind="stable") + 1) / (s.shape[1] + 1)
        return 1.0 / best + tie / (2.0 * best * (best + 1))
    if statistic == "topk-count":
        k = min(top_k, s.shape[1])
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        count = np.bincount(top.ravel(), minlength=s.shape[1]).astype(np.float64)
        zmax = (query_z(s) if z is None else z).max(axis=0).clip(min=0)
        return count + 0.5 * zmax / (1.0 + zmax.max())   # equal counts: the larger z first
    z = query_z(s) if z is None else z
    return np.abs(z).max(axis=0) if statistic == "max-abs-z" else z.max(axis=0)


def _ranks(scores: np.ndarray) -> np.ndarray:
    """Each document's rank among the pool in each query: int (n_queries, n_pool), 1 = the
    query's largest score (equal scores share the better rank)."""
    srt = np.sort(-scores, axis=1)
    return np.stack([np.searchsorted(srt[q], -scores[q], side="left") for q in range(len(scores))]) + 1


def outlier_scores(statistic: np.ndarray) -> np.ndarray:
    """Robust z of each document's statistic among all documents': float64 (n_pool,)."""
    x = np.asarray(statistic, dtype=np.float64)[None, :]
    med = np.median(x, axis=1, keepdims=True)
    scale = _robust_scale(x, med)
    if scale[0, 0] <= 0:
        return np.zeros(x.shape[1])
    return ((x - med) / scale)[0]


def _order(statistic: np.ndarray) -> np.ndarray:
    """Pool indices from the most extreme down (ties: lower index first)."""
    return np.lexsort((np.arange(len(statistic)), -np.asarray(statistic, dtype=np.float64)))


# ----------------------------------------------------------------------------- evidence

def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def word_overlap(query_text: str, doc_text: str) -> dict:
    """How much of a query's text a document contains: ``share`` = distinct query words found
    in the document / distinct query words (0-1); ``run`` = the longest run of consecutive query
    words that the document repeats in the same order (in words)."""
    q, d = _words(query_text), _words(doc_text)
    if not q:
        return {"share": 0.0, "run": 0}
    share = len(set(q) & set(d)) / len(set(q))
    best, prev = 0, [0] * (len(d) + 1)
    for a in q:                      # longest common substring over words (small texts)
        cur = [0] * (len(d) + 1)
        for j, b in enumerate(d, start=1):
            if a == b:
                cur[j] = prev[j - 1] + 1
                best = max(best, cur[j])
        prev = cur
    return {"share": round(share, 4), "run": best}


def _evidence(i: int, scores: np.ndarray, z: np.ndarray, queries: Sequence[Query], text: str,
              n: int, statistic: str) -> list[dict]:
    """The ``n`` queries where document i is most extreme by ``statistic``'s measure."""
    key = {"max-score": scores[:, i], "max-abs-z": np.abs(z[:, i]),
           "best-rank": 1.0 / (1 + (scores > scores[:, i:i + 1]).sum(axis=1))}.get(statistic, z[:, i])
    rows = []
    for q in np.argsort(-key, kind="stable")[:n]:
        if key[q] <= 0 and rows:
            break
        rank = 1 + int((scores[q] > scores[q, i]).sum())
        rows.append({"query_id": queries[q].id, "score": float(scores[q, i]), "z": round(float(z[q, i]), 3),
                     "rank": rank, "overlap": word_overlap(queries[q].text, text)})
    return rows


def audit_scores(scores: np.ndarray, ids: Sequence[str], texts: Sequence[str], queries: Sequence[Query],
                 config: AuditConfig = AuditConfig(), report: Optional[int] = None) -> AuditResult:
    """Rank and flag the documents of one score matrix.

    scores: float (n_queries, n_pool), > 0 = the document lowers the query's loss; ids, texts:
    the pool's (n_pool,); queries: the (n_queries,) queries the rows explain. ``report``
    documents (default: ``max_flagged``) are described in ``documents``, flagged or not.
    """
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64))
    if s.ndim != 2 or s.shape != (len(queries), len(ids)) or len(texts) != len(ids):
        raise ValueError(f"The 'scores' parameter must have shape (n_queries, n_pool) = "
                         f"({len(queries)}, {len(ids)}) with {len(ids)} texts. Got {s.shape} and "
                         f"{len(texts)} texts instead.")
    z = query_z(s)
    stat = document_statistic(s, config.statistic, config.top_k, z=z)
    out = outlier_scores(stat)
    order = _order(stat)
    flagged = np.array([i for i in order[:config.max_flagged] if out[i] >= config.threshold], dtype=np.int64)
    shown = order[:report if report is not None else config.max_flagged]
    is_flagged = set(flagged.tolist())
    documents = [{"rank": r + 1, "index": int(i), "id": str(ids[i]), "statistic": round(float(stat[i]), 4),
                  "outlier": round(float(out[i]), 3), "flagged": int(i) in is_flagged, "text": texts[i],
                  "evidence": _evidence(int(i), s, z, queries, texts[i], config.evidence, config.statistic)}
                 for r, i in enumerate(shown)]
    return AuditResult(stat, out, order, flagged, documents, config)


# ----------------------------------------------------------------------------- benchmark helpers

def combine(a: np.ndarray, b: np.ndarray, how: str = "rank-mean") -> np.ndarray:
    """One ranking statistic from two methods' per-document statistics (higher = more extreme):
    ``rank-mean`` = minus the mean of the two ranks (ties broken by the better rank);
    ``rrf`` = reciprocal-rank fusion, 1/(60 + rank_a) + 1/(60 + rank_b); ``z-sum`` = the sum of
    the two statistics' robust z among documents (``outlier_scores``)."""
    if how not in COMBINATIONS:
        raise ConfigError(f"The 'how' parameter must be one of {', '.join(COMBINATIONS)}. Got {how!r} instead.")
    if how == "z-sum":
        return outlier_scores(a) + outlier_scores(b)
    ra, rb = np.empty(len(a)), np.empty(len(b))
    ra[_order(a)] = np.arange(1, len(a) + 1)
    rb[_order(b)] = np.arange(1, len(b) + 1)
    if how == "rrf":
        return 1.0 / (60 + ra) + 1.0 / (60 + rb)
    return -(ra + rb) / 2 - 1e-9 * np.minimum(ra, rb)


def replica_recall(statistic: np.ndarray, replicas: Sequence[int], budget: int) -> float:
    """Share of the replica documents among the ``budget`` most extreme documents."""
    if not len(replicas):
        raise ValueError("The 'replicas' parameter is empty: there is nothing to recall.")
    top = set(_order(statistic)[:budget].tolist())
    return sum(int(i) in top for i in replicas) / len(replicas)


# ----------------------------------------------------------------------------- files

def flagged_csv(result: AuditResult) -> str:
    """One row per (flagged document, evidence query), strongest document first."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["doc_rank", "example_id", "statistic", "outlier_z", "query_id", "score", "z",
                "rank_in_query", "query_words_share", "longest_word_run", "text"])
    for d in result.documents:
        if not d["flagged"]:
            continue
        for e in d["evidence"]:
            w.writerow([safe_cell(v) for v in (d["rank"], d["id"], d["statistic"], d["outlier"], e["query_id"],
                                               f"{e['score']:.6g}", e["z"], e["rank"], e["overlap"]["share"],
                                               e["overlap"]["run"], d["text"])])
    return buf.getvalue()


def write_audit(result: AuditResult, out: Path, meta: dict, scores: Optional[np.ndarray] = None) -> None:
    """audit.json (meta, config, every reported document), flagged.csv, statistic.npy and,
    when given, scores.npy (float32 (n_queries, n_pool)); each file written atomically,
    audit.json last (its presence means the folder is complete)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "statistic.npy", lambda p: np.save(p, result.statistic.astype(np.float32)), suffix=".npy")
    if scores is not None:
        atomic_write(out / "scores.npy", lambda p: np.save(p, np.asarray(scores, dtype=np.float32)), suffix=".npy")
    write_text_atomic(out / "flagged.csv", flagged_csv(result))
    data = {"format": FORMAT, **meta, "config": asdict(result.config), "n_flagged": int(len(result.flagged)),
            "flagged_ids": [d["id"] for d in result.documents if d["flagged"]],
            "documents": result.documents}
    write_text_atomic(out / "audit.json", json.dumps(data, indent=1, ensure_ascii=False))


def read_audit(folder: Path) -> dict:
    """A finished audit's audit.json; FileNotFoundError / ValueError in one line otherwise."""
    path = Path(folder) / "audit.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no finished audit (no audit.json).")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is damaged ({str(e).splitlines()[0][:100]}); run the audit again.") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a stride_viz audit; run the audit again.")
    return data


def audits_dir(run_dir: str | Path) -> Path:
    """Where the dashboard keeps a run's audits: ``RUN/audits/<audit id>/``."""
    return Path(run_dir) / "audits"


def audit_id(queries: Sequence[Query], config: AuditConfig, recovery: RecoveryConfig) -> str:
    """``a-`` + 10 hex digits of the queries and settings: the same audit twice is one folder."""
    blob = json.dumps([[q.id, q.prompt, q.completion] for q in queries]
                      + [asdict(config), recovery.to_dict()], sort_keys=True)
    return "a-" + hashlib.sha256(blob.encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------- with a run

def run_audit(run_dir: str | Path, queries: Sequence[Query], out: str | Path,
              config: AuditConfig = AuditConfig(), recovery: RecoveryConfig = RecoveryConfig(),
              device: str = "auto", progress: Callable[..., None] = no_progress,
              should_stop: Callable[[], bool] = lambda: False, name: str = "") -> AuditResult:
    """Explain every query with the fitted run in ``run_dir`` (the engine's ``attribute``; a
    query without a completion is completed by the model first), rank and flag the run's pool
    documents, and write the audit into ``out``. Refuses an ``out`` that already holds files."""
    from stride_viz.engine import Stride
    from stride_viz.storage import RunStore

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not an empty folder; choose a new folder so "
                          f"that nothing there is overwritten.")
    if not queries:
        raise ConfigError("The benchmark has no queries; give a JSONL file with one "
                          "{\"prompt\": ..., \"completion\": ...} object per line.")
    store = RunStore(run_dir)
    if not store.meta_path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no run.json); give the folder of a "
                                f"fitted run (python -m stride_viz fit ... --run {run_dir}).")
    if not store.is_fitted():
        raise ConfigError(f"The run {run_dir} has no fitted operators yet: fit it first "
                          f"(python -m stride_viz fit --run {run_dir}).")
    t0 = time.monotonic()
    progress("load", 0.0, None, "loading the model and operators")
    stride = Stride.open(run_dir, device=device)
    progress("load", 1.0, 0.0, "loaded")
    if should_stop():
        raise Cancelled("stopped before the queries were explained")
    attributions = []
    for n, q in enumerate(queries):   # one at a time: a cancel is seen between queries
        if should_stop():
            raise Cancelled(f"stopped after {n} of {len(queries)} queries")
        attributions += stride.attribute([q], recovery, continuations=False)
        progress("attribute", (n + 1) / len(queries), None, f"explained {n + 1}/{len(queries)} queries")
    t1 = time.monotonic()
    scores = np.stack([a.scores for a in attributions])
    explained = [a.query for a in attributions]
    pool = stride.pool
    progress("audit", 0.0, None, "ranking the documents")
    result = audit_scores(scores, pool.ids, [pool.text(i) for i in range(len(pool))], explained, config)
    meta = {"name": name, "run_dir": str(Path(run_dir).resolve()), "method": "stride",
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "n_queries": len(explained), "n_pool": len(pool), "pool": stride.pool.name,
            "queries": [{"id": q.id, "prompt": q.prompt, "completion": q.completion} for q in explained],
            "recovery": recovery.to_dict(), "seconds_attribute": round(t1 - t0, 2),
            "seconds_total": round(time.monotonic() - t0, 2),
            "score_units": "nats of mean per-token completion loss; > 0: the document lowers the "
                           "query's loss (helps)"}
    write_audit(result, out, meta, scores)
    progress("audit", 1.0, 0.0, f"{len(result.flagged)} documents flagged")
    return result
