"""The ``select`` and ``verify`` job kinds (registered in :mod:`stride_viz.jobs.kinds`).

- ``select``: explain a target set with a fitted run and write the data selection under
  ``<run>/selections/<name>.jsonl`` (+ ``.summary.json``) (:mod:`stride_viz.downstream.select`);
- ``verify``: retrain the run's model without an explained query's top-k proponents, without
  k random examples and on the full pool, and write ``<run>/verify/<query>-k<k>.json``
  (:mod:`stride_viz.downstream.verify`). Resumable: finished retrainings are kept.

Parameters are checked when the job is launched (bad input is refused before anything starts).
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from stride_viz.config import ConfigError
from stride_viz.storage import RunStore

from .store import JobError

__all__ = ["validate_select", "run_select_job", "select_title", "validate_verify", "run_verify_job",
           "verify_title", "selection_file", "list_selections"]

_ID_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,80}$")
MAX_TARGETS = 2000


def _run_dir(p: dict) -> str:
    run_dir = p.get("run_dir")
    if not isinstance(run_dir, str) or not run_dir:
        raise JobError("The 'run_dir' job parameter must be a run directory; pick a run.")
    from .kinds import check_fitted_run      # (kinds imports this module at its end)
    check_fitted_run(run_dir, "pick a fitted run", shown=Path(run_dir).name)
    return str(Path(run_dir).resolve())


# ----------------------------------------------------------------------------- select

def selection_file(run_dir: str | Path, name: str) -> Path:
    """Where a selection job writes: ``<run>/selections/<name>.jsonl``."""
    return Path(run_dir) / "selections" / f"{name}.jsonl"


def list_selections(run_dir: str | Path) -> list[Path]:
    """The run's finished selections (those with a summary), newest first."""
    folder = Path(run_dir) / "selections"
    if not folder.is_dir():
        return []
    files = [f for f in folder.glob("*.jsonl") if f.with_suffix(".summary.json").exists()]
    return sorted(files, key=lambda f: f.stat().st_mtime, reverse=True)


def _targets(data: Any) -> list[dict]:
    if not isinstance(data, list) or not data:
        raise JobError("The 'targets' job parameter must be a non-empty list of target examples "
                       "({'prompt' (may be empty), 'completion', 'id'}).")
    if len(data) > MAX_TARGETS:
        raise JobError(f"There are {len(data):,} target examples; give at most {MAX_TARGETS:,}.")
    out, seen = [], set()
    for i, t in enumerate(data):
        if not isinstance(t, dict):
            raise JobError(f"Target {i + 1} must be a mapping with 'completion'. Got {t!r}.")
        prompt, completion = t.get("prompt") or "", t.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion.strip():
            raise JobError(f"Target {i + 1} needs a non-empty text ('completion'; 'prompt' optional).")
        tid = str(t.get("id") if t.get("id") is not None else f"t{i}")
        if not _ID_RE.match(tid):
            tid = f"t{i}"   # ids only name targets in the summary; a safe one is enough
        if tid in seen:
            raise JobError(f"Target id {tid!r} appears twice; ids must be unique.")
        seen.add(tid)
        out.append({"id": tid, "prompt": prompt, "completion": completion})
    return out


def validate_select(p: dict) -> dict:
    from stride_viz.downstream.select import AGGREGATES, resolve_budget
    run_dir = _run_dir(p)
    targets = _targets(p.get("targets"))
    budget = p.get("budget")
    n_pool = int(RunStore(run_dir).read_meta()["pool"]["n"])
    try:
        kept = resolve_budget(budget, n_pool)
    except ConfigError as e:
        raise JobError(str(e)) from None
    how = p.get("aggregate", "mean")
    if how not in AGGREGATES:
        raise JobError(f"The 'aggregate' job parameter must be one of {', '.join(AGGREGATES)}. Got {how!r}.")
    recovery = p.get("recovery") or {}
    if not isinstance(recovery, dict):
        raise JobError(f"The 'recovery' job parameter must be a mapping. Got {recovery!r}.")
    blob = json.dumps([targets, kept, how, recovery], sort_keys=True)
    name = p.get("name") or "sel-" + hashlib.sha256(blob.encode()).hexdigest()[:10]
    if not isinstance(name, str) or not _ID_RE.match(name):
        raise JobError(f"The selection name {name!r} must be 1-80 letters, digits, '_', '-' or '.'.")
    return {"run_dir": run_dir, "targets": targets, "budget": budget, "n_keep": kept, "aggregate": how,
            "recovery": recovery, "name": name, "targets_label": str(p.get("targets_label") or "")[:200]}


def run_select_job(p: dict, ctx) -> dict:
    from stride_viz.config import RecoveryConfig
    from stride_viz.data.pools import Query
    from stride_viz.downstream.select import run_select
    ctx.set_run_dir(p["run_dir"])
    ctx.progress("load", 0.0, None, "loading the model and operators")
    out = selection_file(p["run_dir"], p["name"])
    targets = [Query(t["id"], t["prompt"], t["completion"]) for t in p["targets"]]

    def progress(stage: str, fraction: float, eta, message: str = "") -> None:
        ctx.progress("select" if stage == "select" else stage, fraction, eta, message)

    summary = run_select(p["run_dir"], p["targets_label"] or None, p["budget"], out, p["aggregate"],
                         RecoveryConfig(**p["recovery"]), progress=progress, should_stop=ctx.should_stop,
                         targets=targets)
    return {"run_dir": p["run_dir"], "selection_file": str(out), "summary_file": summary["summary_file"],
            "budget": summary["budget"], "n_pool": summary["n_pool"], "aggregate": summary["aggregate"]}


def select_title(p: dict) -> str:
    n = len(p["targets"])
    return f"select {p['n_keep']} examples for {n} target{'s' if n != 1 else ''} ({p['aggregate']})"


# ----------------------------------------------------------------------------- verify

def _int(p: dict, name: str, default: int, lo: int, hi: int) -> int:
    value = p.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise JobError(f"The '{name}' job parameter must be an integer in [{lo}, {hi}]. Got {value!r} instead.")
    return value


def validate_verify(p: dict) -> dict:
    from stride_viz.downstream.verify import plan
    run_dir = _run_dir(p)
    query_id = p.get("query_id")
    if not isinstance(query_id, str) or not (RunStore(run_dir).attribution_dir(query_id) / "meta.json").exists():
        raise JobError(f"Query {query_id!r} has not been explained in this run; explain it first.")
    k = _int(p, "k", 10, 1, 10_000)
    random_seeds = _int(p, "random_seeds", 3, 1, 20)
    noise_seeds = _int(p, "noise_seeds", 1, 0, 20)
    try:
        estimate = plan(run_dir, k, random_seeds, noise_seeds)
    except ConfigError as e:
        raise JobError(str(e)) from None
    return {"run_dir": run_dir, "query_id": query_id, "k": k, "random_seeds": random_seeds,
            "noise_seeds": noise_seeds, "estimated_seconds": estimate["estimated_seconds"]}


def run_verify_job(p: dict, ctx) -> dict:
    from stride_viz.downstream.verify import result_path, verify
    ctx.set_run_dir(p["run_dir"])
    ctx.progress("retrain", 0.0, p.get("estimated_seconds"), "loading the pool and the recipe")
    r = verify(p["run_dir"], p["query_id"], p["k"], p["random_seeds"], p["noise_seeds"],
               progress=ctx.progress, should_stop=ctx.should_stop)
    return {"run_dir": p["run_dir"], "query_id": p["query_id"], "k": p["k"],
            "result_file": str(result_path(p["run_dir"], p["query_id"], p["k"])),
            "top_change": r["top"]["change"], "random_mean_change": r["random"]["mean"]}


def verify_title(p: dict) -> str:
    return f"verify {p['query_id']} by retraining (top {p['k']} vs {p['random_seeds']} random draws)"
