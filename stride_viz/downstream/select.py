"""Data selection: rank a run's pool by its aggregated influence on a target set, keep a budget.

The STRIDE paper's protocol (../shared/STRIDE.md, "Downstream uses"): rank the candidates by
their attribution to the task's queries, keep the top ones, train on them, and compare with
random and other selectors. Here the candidates are a fitted run's pool, the task is a file
of target examples (documents, or prompt/completion pairs), and each target is explained
with the run's operators (stages 3-4, nothing is retrained and nothing is written into the
run's attributions).

Aggregation **(ours)**, one number per pool example i over the target queries q (nats):

- ``mean`` (default): ``mean_q w_q,i`` (opponents count against an example);
- ``positive-sum``: ``Σ_q max(w_q,i, 0)``, the proponent mass: an example that helps some
  targets is not cancelled by targets it hurts;
- ``backprojection``: ``mean_q bp_q,i``, the dense back-projection preview instead of the Lasso.

Ties (many examples keep a Lasso score of exactly 0) are broken by the mean back-projection,
as the Explore page orders examples. benchmarks/selection.py measures the three on a
development split of each target domain (benchmarks/results/selection.json): ``mean`` was
best on ``definitions`` (dev loss 0.044 nats below positive-sum), ``positive-sum`` on
``computers`` (0.010 below mean), ``backprojection`` worst on both; ``mean`` is the default as
the better of the two on average.

    python -m stride_viz select --run RUN --queries TARGET.jsonl --budget 10% --out selection.jsonl [--aggregate mean]

writes ``selection.jsonl`` (one selected pool row per line, best first: ``rank``, ``id``,
``score``, ``prompt``, ``completion``) and ``selection.summary.json`` (what was done).
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from stride_viz.config import ConfigError, RecoveryConfig
from stride_viz.data.pools import Pool, PoolError, Query, load_pool
from stride_viz.integrity import write_text_atomic
from stride_viz.progress import Cancelled, StageTimer, no_progress

__all__ = ["AGGREGATES", "SelectionError", "Selection", "aggregate", "resolve_budget", "load_targets",
           "select_from_scores", "select", "write_selection", "summary_path", "read_selection", "run_select"]

AGGREGATES = ("mean", "positive-sum", "backprojection")
SIGN_NOTE = ("score: the pool example's aggregated influence on the target queries, nats of mean "
             "per-token loss; > 0: training on it lowers the targets' loss (helps)")


class SelectionError(ConfigError):
    """A selection request that cannot be served (bad budget, empty targets, ...)."""


@dataclass
class Selection:
    """The ranked selection of one run for one target set.

    rows: int64 (budget,) pool rows, best first. aggregated: float64 (n,) the aggregated score
    of every pool example (nats, > 0 helps). tiebreak: float64 (n,) mean back-projection.
    """

    rows: np.ndarray
    aggregated: np.ndarray
    tiebreak: np.ndarray
    how: str
    info: dict = field(default_factory=dict)


def resolve_budget(budget: Union[int, float, str], n_pool: int) -> int:
    """How many examples a budget keeps: an integer N (1..n_pool), a fraction in (0, 1) or a
    percentage such as ``"10%"`` (rounded, at least 1)."""
    fraction: Optional[float] = None
    if isinstance(budget, str):
        text = budget.strip()
        m = re.fullmatch(r"(\d+(?:\.\d*)?)\s*%", text)
        try:
            value: float = float(m[1]) / 100 if m else float(text)
        except ValueError:
            raise SelectionError(f"The budget must be a number of examples (200), a fraction (0.1) or a "
                                 f"percentage (10%). Got {budget!r} instead.") from None
        if m:
            if not 0 < value <= 1:
                raise SelectionError(f"The budget percentage must be in (0%, 100%]. Got {budget!r} instead.")
            fraction = value
    elif isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise SelectionError(f"The budget must be a number of examples or a fraction. Got {budget!r} instead.")
    else:
        value = float(budget)
    if fraction is None and 0 < value < 1:
        fraction = value
    if fraction is not None:
        return max(1, round(fraction * n_pool))
    if not value.is_integer() or value < 1:
        raise SelectionError(f"The budget must be a whole number of examples >= 1, a fraction in (0, 1) "
                             f"or a percentage. Got {budget!r} instead.")
    if value > n_pool:
        raise SelectionError(f"The budget ({int(value)} examples) is larger than the pool ({n_pool} examples); "
                             f"ask for at most {n_pool}, or a fraction such as 10%.")
    return int(value)


def load_targets(path: Union[str, Path]) -> list[Query]:
    """Target examples from a JSONL, CSV or TXT file in the pool formats (README, "Training
    pools"): ``text`` (a document: its whole text is the target) or ``prompt`` + ``completion``
    (the completion's loss is the target), ``id`` optional. Errors are one line."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise SelectionError(f"Target file '{path}' does not exist; give a JSONL, CSV or TXT file of "
                             f"target examples ('text', or 'prompt' and 'completion').")
    try:
        pool = load_pool(str(p))
    except PoolError as e:
        raise SelectionError(f"Target file: {e}") from None
    return [Query(pool.ids[i], pool.prompts[i], pool.completions[i]) for i in range(len(pool))]


def aggregate(scores: np.ndarray, backprojection: np.ndarray, how: str = "mean") -> np.ndarray:
    """float64 (n,) aggregated influence from scores and backprojection, both (n_queries, n)."""
    scores = np.asarray(scores, dtype=np.float64)
    bp = np.asarray(backprojection, dtype=np.float64)
    if scores.ndim != 2 or scores.shape != bp.shape or scores.shape[0] == 0:
        raise SelectionError(f"aggregate needs scores and backprojection of the same shape (n_queries >= 1, "
                             f"n); got {scores.shape} and {bp.shape}.")
    if how == "positive-sum":
        return np.clip(scores, 0, None).sum(0)
    if how == "mean":
        return scores.mean(0)
    if how == "backprojection":
        return bp.mean(0)
    raise SelectionError(f"The aggregate must be one of {', '.join(AGGREGATES)}. Got {how!r} instead.")


def select_from_scores(scores: np.ndarray, backprojection: np.ndarray, budget: Union[int, float, str],
                       how: str = "mean") -> Selection:
    """Rank by the aggregate (ties by mean back-projection, then by row) and keep the budget."""
    agg = aggregate(scores, backprojection, how)
    tie = np.asarray(backprojection, dtype=np.float64).mean(0)
    k = resolve_budget(budget, agg.shape[0])
    order = np.lexsort((np.arange(agg.shape[0]), -tie, -agg))
    return Selection(order[:k].astype(np.int64), agg, tie, how)


def select(run, targets: Sequence[Query], budget: Union[int, float, str], how: str = "mean",
           recovery: RecoveryConfig = RecoveryConfig(), progress: Callable[..., None] = no_progress,
           should_stop: Callable[[], bool] = lambda: False) -> Selection:
    """Explain every target with an open :class:`stride_viz.engine.Stride` run (responses +
    Lasso; nothing is written into the run), aggregate and keep the budget."""
    if not targets:
        raise SelectionError("The target set is empty: give at least one target example.")
    if how not in AGGREGATES:
        raise SelectionError(f"The aggregate must be one of {', '.join(AGGREGATES)}. Got {how!r} instead.")
    resolve_budget(budget, len(run.pool))           # refuse a bad budget before any work
    for q in targets:
        if not q.completion:
            raise SelectionError(f"Target {q.id!r} has no completion: a target must be text to make "
                                 f"likely ('text', or 'prompt' and 'completion').")
        run.check_query(q)                          # too long / nothing to score: QueryError now
    timer = StageTimer("select", len(targets), progress, min_interval=0.0)
    recoverer = run.recoverer(recovery)
    scores, bps, losses = [], [], []
    t0 = time.monotonic()
    for done, q in enumerate(targets):
        if should_stop():
            raise Cancelled(f"stopped after {done} of {len(targets)} targets")
        measured = run.measure(q)
        rec = recoverer.recover(measured.responses)
        scores.append(rec.scores)
        bps.append(rec.backprojection)
        losses.append(float(measured.loss_base))
        timer.update(done + 1, f"explained target {done + 1}/{len(targets)}")
    sel = select_from_scores(np.stack(scores), np.stack(bps), budget, how)
    sel.info = {"n_targets": len(targets), "target_ids": [q.id for q in targets],
                "target_loss_base": losses, "seconds_attribute": round(time.monotonic() - t0, 2),
                "recovery": recovery.to_dict(),
                "nonzero_per_target": [int(np.count_nonzero(s)) for s in scores]}
    return sel


def summary_path(out_file: Union[str, Path]) -> Path:
    """``selection.jsonl`` -> ``selection.summary.json`` (next to it)."""
    out = Path(out_file)
    return out.with_name(out.name[: -len(out.suffix)] if out.suffix else out.name).with_suffix(".summary.json")


def write_selection(out_file: Union[str, Path], pool: Pool, sel: Selection, extra: Optional[dict] = None) -> dict:
    """Write the selected rows (JSONL, best first) and the summary JSON; returns the summary.
    Both files are written whole to a temporary name first, so a failure leaves no half file."""
    out = Path(out_file)
    if out.suffix.lower() not in (".jsonl", ".ndjson"):
        raise SelectionError(f"The output file must end in .jsonl (one selected example per line). "
                             f"Got '{out}'.")
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"rank": r + 1, "id": pool.ids[i], "score": float(sel.aggregated[i]),
                         "backprojection": float(sel.tiebreak[i]), "prompt": pool.prompts[i],
                         "completion": pool.completions[i]}, ensure_ascii=False)
             for r, i in enumerate(sel.rows.tolist())]
    agg = sel.aggregated
    summary = {"what": "data selection by STRIDE influence on a target set", "sign": SIGN_NOTE,
               "aggregate": sel.how, "budget": int(len(sel.rows)), "n_pool": len(pool),
               "fraction": round(len(sel.rows) / len(pool), 6), "pool": pool.name, "pool_hash": pool.hash,
               "selection_file": out.name,
               "n_positive": int((agg > 0).sum()), "n_negative": int((agg < 0).sum()),
               "score_of_last_kept": float(agg[sel.rows[-1]]),
               "selected_ids_head": [pool.ids[i] for i in sel.rows[:10].tolist()],
               **sel.info, **(extra or {})}
    write_text_atomic(out, "".join(line + "\n" for line in lines))
    write_text_atomic(summary_path(out), json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    return summary


def read_selection(out_file: Union[str, Path]) -> tuple[list[dict], dict]:
    """(selected rows, summary) as written by :func:`write_selection`."""
    out = Path(out_file)
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    return rows, json.loads(summary_path(out).read_text())


def run_select(run_dir: Union[str, Path], targets_file: Optional[Union[str, Path]], budget: Union[int, float, str],
               out_file: Union[str, Path], how: str = "mean", recovery: RecoveryConfig = RecoveryConfig(),
               device: str = "auto", progress: Callable[..., None] = no_progress,
               should_stop: Callable[[], bool] = lambda: False,
               targets: Optional[Sequence[Query]] = None) -> dict:
    """The ``select`` command: check every input, open the run, select, write the two files.
    ``targets`` replaces ``targets_file`` when the caller has them already (a job)."""
    from stride_viz.engine import Stride
    from stride_viz.storage import RunStore
    store = RunStore(run_dir)
    if not store.meta_path.exists():
        raise SelectionError(f"'{run_dir}' is not a run directory (no run.json); give a fitted run made by "
                             f"python -m stride_viz fit.")
    if not store.is_fitted():
        raise SelectionError(f"The run '{run_dir}' has no fitted operators yet; finish its fit first "
                             f"(python -m stride_viz fit --run {run_dir}).")
    if how not in AGGREGATES:
        raise SelectionError(f"The aggregate must be one of {', '.join(AGGREGATES)}. Got {how!r} instead.")
    if Path(out_file).suffix.lower() not in (".jsonl", ".ndjson"):
        raise SelectionError(f"The output file must end in .jsonl (one selected example per line). Got '{out_file}'.")
    targets = list(targets) if targets is not None else load_targets(targets_file)
    resolve_budget(budget, int(store.read_meta()["pool"]["n"]))
    t0 = time.monotonic()
    run = Stride.open(run_dir, device=device)
    sel = select(run, targets, budget, how, recovery, progress=progress, should_stop=should_stop)
    extra = {"run": str(Path(run_dir)), "targets_file": str(targets_file) if targets_file else None,
             "budget_asked": budget, "model": run.store.read_meta()["model"],
             "seconds_total": round(time.monotonic() - t0, 2),
             "command": None if targets_file is None else
                        f"python -m stride_viz select --run {run_dir} --queries {targets_file} "
                        f"--budget {budget} --out {out_file} --aggregate {how}",
             "summary_file": str(summary_path(out_file))}
    return write_selection(out_file, run.pool, sel, extra)
