"""How far to trust an attribution: the Linear Datamodeling Score and planted-fact retrieval.

LDS (Park et al. 2023, as used by the STRIDE paper): models are retrained from scratch on M'
random subsets ``S'_j`` of the pool and each query's loss ``l_j(x)`` is recorded (see
``stride_viz.evaluation.retrain``). An attribution ``w(x)`` predicts the effect of training on ``S'_j``
as ``sum_{i in S'_j} w_i(x)``; since ``w_i > 0`` means "example i lowers the loss", the
prediction should rank the subsets like ``-l_j(x)``. Per query, LDS is the Spearman rank
correlation between the two over j; the benchmark reports its mean, standard deviation and
the per-query values.

Ground truth on disk (the format of the paper's release), in one directory:

    metadata.json    {"version", "pool": {"spec","hash","n"}, "queries": [{"id","prompt",
                     "completion"}...], "recipe": {...}, "seed", "fraction", "n_subsets",
                     "loss": "<what test_loss measures>"}
    pool.jsonl       (optional) the pool, one {"id","prompt","completion"} per line
    *.jsonl          (any other name) one line per retrained subset: {"train_subset": [pool indices],
                     "test_loss": [one float per query]} (+ "subset_index": j, ours, so that
                     several processes can write parts and a killed job can resume)

Planted facts: ``recall_at_k`` and ``mrr`` measure whether the documents that state a fact
are ranked on top for the fact's query.
"""
from __future__ import annotations

import io
import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
from scipy.stats import rankdata

from stride_viz.integrity import append_jsonl, read_jsonl

__all__ = [
    "LdsResult", "GroundTruth", "GroundTruthError", "lds", "subset_sums", "recall_at_k", "mrr",
    "write_metadata", "read_metadata", "append_result", "read_ground_truth", "export_jsonl",
    "done_subsets", "read_part", "load_scores", "save_scores", "query_split", "split_means",
]

GT_VERSION = 1
METADATA = "metadata.json"
NOT_PARTS = {"pool.jsonl"}  # the pool a ground truth was built on may sit next to the parts


class GroundTruthError(ValueError):
    """A ground-truth directory that is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class LdsResult:
    """LDS of one method.

    per_query: float64 (n_queries,), Spearman rho per query; a query whose prediction or
    retrained losses are constant over the subsets has no rank order and counts as 0.
    """

    per_query: np.ndarray
    mean: float
    std: float

    def to_dict(self) -> dict:
        return {"lds_mean": self.mean, "lds_std": self.std,
                "lds_per_query": [round(float(v), 6) for v in self.per_query]}


@dataclass
class GroundTruth:
    """Retrained losses.

    train_subsets: list of M' int arrays (pool indices of each retrained subset);
    test_loss: float64 (M', n_queries), mean per-token completion loss in nats;
    subset_index: int (M',), the j of each row; metadata: the metadata.json content.
    """

    train_subsets: list[np.ndarray]
    test_loss: np.ndarray
    subset_index: np.ndarray
    metadata: dict = field(default_factory=dict)

    @property
    def n_pool(self) -> int:
        return int(self.metadata["pool"]["n"])

    def membership(self) -> np.ndarray:
        """bool (M', n_pool): row j marks the examples of subset j."""
        m = np.zeros((len(self.train_subsets), self.n_pool), dtype=bool)
        for j, idx in enumerate(self.train_subsets):
            m[j, idx] = True
        return m


# ---------------------------------------------------------------------------------------------
# metrics

def _membership(subsets: np.ndarray | Sequence[Sequence[int]], n_pool: int) -> np.ndarray:
    arr = subsets if isinstance(subsets, np.ndarray) else None
    if arr is not None and arr.dtype == bool:
        if arr.ndim != 2 or arr.shape[1] != n_pool:
            raise ValueError(f"The 'subsets' membership matrix must have shape (M', {n_pool}). "
                             f"Got {arr.shape} instead.")
        return arr
    m = np.zeros((len(subsets), n_pool), dtype=bool)
    for j, idx in enumerate(subsets):
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n_pool):
            raise ValueError(f"The 'subsets' parameter: subset {j} holds indices outside "
                             f"[0, {n_pool}). Got min {idx.min()}, max {idx.max()}.")
        m[j, idx] = True
    return m


def subset_sums(scores: np.ndarray, subsets: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
    """Predicted effect of each subset: ``sum_{i in S'_j} w_i(x)``.

    scores: (n_queries, n_pool); subsets: bool (M', n_pool) or M' index lists.
    Returns float64 (n_queries, M').
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"The 'scores' parameter must be a 2-D array (n_queries, n_pool). "
                         f"Got shape {scores.shape} instead.")
    m = _membership(subsets, scores.shape[1])
    return scores @ m.T.astype(np.float64)


def _rowwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rho of a[q] vs b[q] per row (average ranks for ties, like scipy.spearmanr);
    rows with a constant side give 0."""
    ra = rankdata(a, axis=1)
    rb = rankdata(b, axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    den = np.sqrt((ra ** 2).sum(axis=1) * (rb ** 2).sum(axis=1))
    num = (ra * rb).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    return rho


def lds(scores: np.ndarray, subsets: np.ndarray | Sequence[Sequence[int]],
        test_loss: np.ndarray) -> LdsResult:
    """Linear Datamodeling Score.

    scores: (n_queries, n_pool), w_i(x) > 0 when example i lowers query x's loss;
    subsets: bool (M', n_pool) or M' index lists; test_loss: (M', n_queries), the loss of each
    query under the model retrained on subset j. Returns per-query Spearman rho between the
    subset sums of w(x) and -l_j(x), their mean and (population) standard deviation.
    """
    test_loss = np.asarray(test_loss, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if test_loss.ndim != 2 or test_loss.shape[1] != scores.shape[0]:
        raise ValueError(f"The 'test_loss' parameter must have shape (M', n_queries={scores.shape[0]}). "
                         f"Got {test_loss.shape} instead.")
    pred = subset_sums(scores, subsets)
    if pred.shape[1] != test_loss.shape[0]:
        raise ValueError(f"'subsets' has {pred.shape[1]} subsets but 'test_loss' has "
                         f"{test_loss.shape[0]} rows; they must match.")
    if pred.shape[1] < 3:
        raise ValueError(f"LDS needs at least 3 retrained subsets; got {pred.shape[1]}.")
    rho = _rowwise_spearman(pred, -test_loss.T)
    return LdsResult(per_query=rho, mean=float(rho.mean()), std=float(rho.std()))


def _ranks_of_relevant(scores_row: np.ndarray, relevant: Iterable[int]) -> np.ndarray:
    """1-based rank (descending score, ties broken pessimistically) of each relevant index."""
    rel = np.fromiter(relevant, dtype=np.int64)
    s = np.asarray(scores_row, dtype=np.float64)
    # rank = 1 + number of examples scoring at least as high, other than itself
    return np.array([1 + int(np.sum(s >= s[r])) - 1 for r in rel], dtype=np.int64)


def recall_at_k(scores: np.ndarray, relevant: Sequence[Iterable[int]], k: int = 10) -> float:
    """Mean over queries of |top-k ∩ relevant| / |relevant|.

    scores: (n_queries, n_pool) with higher = more helpful; relevant: per query the pool
    indices that truly support it (e.g. the sources of a planted fact). Ties are counted
    against the method, so constant scores get no credit.
    """
    if k < 1:
        raise ValueError(f"The 'k' parameter must be an integer >= 1. Got {k!r} instead.")
    vals = []
    for row, rel in zip(np.asarray(scores), relevant):
        rel = list(rel)
        if not rel:
            continue
        vals.append(float(np.mean(_ranks_of_relevant(row, rel) <= k)))
    return float(np.mean(vals)) if vals else math.nan


def mrr(scores: np.ndarray, relevant: Sequence[Iterable[int]]) -> float:
    """Mean reciprocal rank of the best-ranked relevant example per query (ties pessimistic)."""
    vals = []
    for row, rel in zip(np.asarray(scores), relevant):
        rel = list(rel)
        if not rel:
            continue
        vals.append(1.0 / float(_ranks_of_relevant(row, rel).min()))
    return float(np.mean(vals)) if vals else math.nan


# ---------------------------------------------------------------------------------------------
# ground-truth files

def write_metadata(gt_dir: str | Path, metadata: dict) -> None:
    """Create ``gt_dir/metadata.json``; if it exists, refuse different content (naming the
    keys that differ) so that parts of one ground truth never mix two settings."""
    gt_dir = Path(gt_dir)
    gt_dir.mkdir(parents=True, exist_ok=True)
    meta = {"version": GT_VERSION, **metadata}
    for key in ("pool", "queries", "recipe", "seed"):
        if key not in meta:
            raise GroundTruthError(f"Ground-truth metadata must name '{key}'. Got keys "
                                   f"{sorted(meta)} instead.")
    path = gt_dir / METADATA
    if path.exists():
        old = json.loads(path.read_text())
        # JSON round trip so tuples and lists compare equal
        new = json.loads(json.dumps(meta))
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            raise GroundTruthError(
                f"{path} exists with different settings ({', '.join(diff)}). Use another "
                f"directory, or delete it to start over.")
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(path)


def read_metadata(gt_dir: str | Path) -> dict:
    path = Path(gt_dir) / METADATA
    if not path.exists():
        raise GroundTruthError(f"No {METADATA} in {gt_dir}: not a ground-truth directory "
                               f"(build one with `python -m stride_viz.evaluation.retrain`).")
    return json.loads(path.read_text())


def append_result(part_file: str | Path, subset_index: int, train_subset: Sequence[int],
                  test_loss: Sequence[float]) -> None:
    """Append one retrained subset to a part file (one JSON line, flushed at once). A torn
    last line (no newline: a process killed mid-write, whose subset is not done) is cut off
    first; appended to, it would become an unreadable line in the middle of the file."""
    append_jsonl(part_file, {"subset_index": int(subset_index),
                             "train_subset": [int(i) for i in train_subset],
                             "test_loss": [float(v) for v in test_loss]})


def _part_rows(part: Path):
    """(line index, row) of one part file; a torn last line (a process killed mid-write) is
    skipped: its subset is simply not done."""
    for ln, row in read_jsonl(part, error=GroundTruthError):
        if "train_subset" not in row or "test_loss" not in row:
            raise GroundTruthError(f"{part}: line {ln + 1} lacks 'train_subset' or "
                                   f"'test_loss'.")
        yield ln, row


def _iter_rows(gt_dir: Path):
    for part in sorted(gt_dir.glob("*.jsonl")):
        if part.name in NOT_PARTS:
            continue
        for ln, row in _part_rows(part):
            yield part, ln, row


def read_part(part_file: str | Path) -> dict[int, list[float]]:
    """One part file written by :func:`append_result`: subset index -> its query losses (the
    first row of a j wins; {} when the file does not exist)."""
    part = Path(part_file)
    rows: dict[int, list[float]] = {}
    if part.exists():
        for _ln, row in _part_rows(part):
            if "subset_index" in row:
                rows.setdefault(int(row["subset_index"]), row["test_loss"])
    return rows


def done_subsets(gt_dir: str | Path) -> set[int]:
    """The subset indices j already recorded in any part file."""
    gt_dir = Path(gt_dir)
    if not gt_dir.exists():
        return set()
    return {int(r["subset_index"]) for _, _, r in _iter_rows(gt_dir) if "subset_index" in r}


def read_ground_truth(gt_dir: str | Path) -> GroundTruth:
    """Read every ``*.jsonl`` part of a ground-truth directory (the paper's files, which
    have no subset_index, are numbered in file order); duplicates of a j keep the first."""
    gt_dir = Path(gt_dir)
    meta = read_metadata(gt_dir)
    n_q = len(meta["queries"])
    n_pool = int(meta["pool"]["n"])
    rows: dict[int, dict] = {}
    auto = 0
    for part, ln, row in _iter_rows(gt_dir):
        j = int(row.get("subset_index", auto))
        auto += 1
        if len(row["test_loss"]) != n_q:
            raise GroundTruthError(f"{part}: line {ln + 1} has {len(row['test_loss'])} losses "
                                   f"but the metadata lists {n_q} queries.")
        idx = np.asarray(row["train_subset"], dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n_pool):
            raise GroundTruthError(f"{part}: line {ln + 1} has pool indices outside [0, {n_pool}).")
        rows.setdefault(j, {"idx": idx, "loss": row["test_loss"]})
    if not rows:
        raise GroundTruthError(f"{gt_dir} holds no retrained subset yet (no *.jsonl lines).")
    order = sorted(rows)
    return GroundTruth(train_subsets=[rows[j]["idx"] for j in order],
                       test_loss=np.asarray([rows[j]["loss"] for j in order], dtype=np.float64),
                       subset_index=np.asarray(order, dtype=np.int64), metadata=meta)


def export_jsonl(gt: GroundTruth, path: str | Path) -> None:
    """Write the paper's single-file form: one ``{"train_subset","test_loss"}`` line per subset."""
    with open(path, "w") as f:
        for idx, loss in zip(gt.train_subsets, gt.test_loss):
            f.write(json.dumps({"train_subset": [int(i) for i in idx],
                                "test_loss": [float(v) for v in loss]}) + "\n")


def save_scores(path: str | Path, scores: np.ndarray, query_ids: Sequence[str]) -> np.ndarray:
    """Write a method's scores small enough to commit: a compressed .npz of float16 values,
    each row divided by its largest magnitude (float16 alone would flush the small scores of
    some methods to 0 and overflow the large ones of others), the float32 row scales and the
    query ids. LDS, recall and MRR do not change when a row is multiplied by a positive number.

    scores: (n_queries, n_pool). Returns float32 (n_queries, n_pool), the scores as
    ``load_scores`` reads them back, so that a report computed from them is reproducible
    from the file alone."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != len(query_ids):
        raise ValueError(f"The 'scores' parameter must have shape (n_queries={len(query_ids)}, "
                         f"n_pool). Got {s.shape} instead.")
    if not np.isfinite(s).all():
        raise ValueError("The 'scores' parameter holds NaN or infinite values; replace them first.")
    scale = np.abs(s).max(axis=1)
    scale[scale == 0] = 1.0
    arrays = {"scores": (s / scale[:, None]).astype(np.float16), "scale": scale.astype(np.float32),
              "query_ids": np.asarray([str(q) for q in query_ids])}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # np.savez_compressed's zip entries carry the time of writing; fixed ones keep the file
    # byte-identical when the same scores are written again (no churn in git)
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.save(buf, arr, allow_pickle=False)
            z.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)),
                       buf.getvalue(), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    tmp.replace(path)
    return load_scores(path, len(query_ids))


def load_scores(path: str | Path, n_queries: Optional[int] = None,
                query_ids: Optional[Sequence[str]] = None) -> np.ndarray:
    """Read a method's saved scores: float32 (n_queries, n_pool), from a .npy (float32, the
    benchmark's work folder) or a .npz written by ``save_scores`` (the committed files).
    ``query_ids``, if given, must be those the .npz was written for."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as f:
            s = f["scores"].astype(np.float32) * f["scale"].astype(np.float32)[:, None]
            ids = [str(q) for q in f["query_ids"]]
        if query_ids is not None and ids != [str(q) for q in query_ids]:
            raise GroundTruthError(f"{path}: its rows are for other queries than the ground "
                                   f"truth's; recompute them with `python benchmarks/lds.py`.")
    else:
        s = np.load(path)
    if s.ndim != 2 or (n_queries is not None and s.shape[0] != n_queries):
        raise GroundTruthError(f"{path}: scores must have shape (n_queries, n_pool); got {s.shape}.")
    return s


def query_split(query_ids: Sequence[str], salt: str = "stride-viz-dev-test-v1") -> np.ndarray:
    """Development (True) or test (False) for each query, fixed by its id alone: the first 8
    hex digits of sha256(salt + id) even -> development. Settings are chosen on the development
    queries and results reported on the test queries; the split does not depend on the order
    or the number of queries, so a query keeps its side when others are added."""
    import hashlib

    return np.array([int(hashlib.sha256((salt + q).encode()).hexdigest()[:8], 16) % 2 == 0
                     for q in query_ids], dtype=bool)


def split_means(per_query: Sequence[float], dev: np.ndarray,
                groups: Optional[dict[str, np.ndarray]] = None) -> dict:
    """Per-query LDS summarised on each side of the development/test split.

    per_query: (n_queries,); dev: bool (n_queries,), from ``query_split``; groups: name ->
    bool (n_queries,) (e.g. "heldout", "facts"). Returns ``lds_mean_test``, ``lds_std_test``,
    ``lds_mean_dev``, ``lds_std_dev``, ``n_test``, ``n_dev`` and per group
    ``lds_mean_test_<group>``, ``lds_mean_dev_<group>`` (NaN where a side is empty)."""
    v = np.asarray(per_query, dtype=np.float64)
    dev = np.asarray(dev, dtype=bool)
    if v.shape != dev.shape:
        raise ValueError(f"The 'dev' parameter must have shape {v.shape}, like 'per_query'. "
                         f"Got {dev.shape} instead.")
    out: dict = {}
    for side, mask in (("test", ~dev), ("dev", dev)):
        out[f"n_{side}"] = int(mask.sum())
        out[f"lds_mean_{side}"] = float(v[mask].mean()) if mask.any() else math.nan
        out[f"lds_std_{side}"] = float(v[mask].std()) if mask.any() else math.nan
        for g, gm in (groups or {}).items():
            m = mask & np.asarray(gm, dtype=bool)
            out[f"lds_mean_{side}_{g}"] = float(v[m].mean()) if m.any() else math.nan
    return out
