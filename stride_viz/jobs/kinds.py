"""What a job can do: each kind validates its parameters when it is launched (bad input is
refused before anything starts) and runs inside the worker process.

Kinds:

- ``demo``: build (or reuse) the built-in demo model on the ``fortunes+facts`` pool, fit the
  operators, and attribute a few planted-fact queries plus one free prompt.
- ``attribute``: any model + pool + queries + settings: fit the operators if this model, pool
  and configuration have none yet (the run directory name is derived from their hashes, so a
  second launch reuses them and finishes in seconds), then attribute the queries.
- ``continuation``: a short job that generates the continuation of a query's prompt steered
  by one operator (pages never load a model).
- ``explain``: one new prompt on a fitted run (the Explore page's "Explain" box), served by
  the run's warm explainer process (:mod:`stride_viz.jobs.explainer`), which keeps the model
  and the operators loaded between requests.
- ``audit``: a contamination audit of a fitted run (the Audit page): explain every benchmark
  query, rank the pool's documents by how extreme their scores are, write
  ``RUN/audits/<audit id>/`` (:mod:`stride_viz.downstream.audit`).
- ``sleep``: waits in steps and reports progress; a real, engine-free job used to exercise the
  runner (queueing, cancel, resume from its step checkpoint).

Demo size can be reduced through environment variables read when the job is launched (the
browser test and quick trials use them): ``STRIDE_VIZ_DEMO_PRESET`` (demo model preset),
``STRIDE_VIZ_DEMO_POOL_LIMIT`` (keep the first N pool rows), ``STRIDE_VIZ_DEMO_FIT`` (JSON
object of FitConfig overrides, e.g. ``{"subsets": 32, "epochs": 1}``) and
``STRIDE_VIZ_DEMO_QUERIES`` (number of planted-fact queries, default 3) and
``STRIDE_VIZ_DEMO_MODEL`` (JSON object of demo-model overrides for ``train_demo_model``, e.g.
``{"n_layer": 1, "n_embd": 32, "steps": 20}``; then the model is trained on the limited pool).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

from stride_viz.config import ConfigError, FitConfig, RecoveryConfig
from stride_viz.progress import Cancelled, JobProgress, Stage, StageTimer

from stride_viz.storage import RunStore

from .store import JobError

__all__ = ["JobKind", "JobContext", "KINDS", "get_kind", "check_fitted_run", "query_id_for", "DEMO_FREE_PROMPT", "demo_params_from_env",
           "check_new_prompt", "explain", "MAX_PROMPT_CHARS", "STAGES", "stage_position", "fit_plan"]

DEMO_FREE_PROMPT = "A fortune for today: "
_ID_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,80}$")


@dataclass
class JobContext:
    """What a running job may use: report progress, ask whether to stop, say where its run is."""

    job_id: int
    progress: Callable[..., None]
    should_stop: Callable[[], bool]
    set_run_dir: Callable[[Path], None]
    log: Callable[[str], None]


@dataclass(frozen=True)
class JobKind:
    name: str
    heavy: bool                                   # heavy jobs queue: one runs at a time
    validate: Callable[[dict], dict]              # normalised params, or JobError
    run: Callable[[dict, JobContext], dict]       # result (JSON-able)
    title: Callable[[dict], str]
    # served by the run's long-lived explainer process (jobs/explainer.py), which keeps the
    # model loaded, instead of a worker process of its own that would load it again
    warm: bool = False


# ----------------------------------------------------------------------------- stage plans

# The stages of each kind, in order, as (name reported in the job row, what the Runs page says):
# "stage 3 of 4: fitting operators". The row's fraction and time left are the whole job's.
STAGES: dict[str, tuple[tuple[str, str], ...]] = {
    "demo": (("model", "preparing the demo model"), ("cache", "reading the pool through the model"),
             ("fit", "fitting operators"), ("attribute", "explaining the queries")),
    "attribute": (("model", "loading the model"), ("cache", "reading the pool through the model"),
                  ("fit", "fitting operators"), ("attribute", "explaining the queries")),
    "continuation": (("generate", "generating the continuation"),),
    "sleep": (("sleep", "waiting"),),
    "explain": (("load", "loading the model and operators (first request of this run only)"),
                ("attribute", "explaining the prompt"),
                ("continuations", "writing the base and steered continuations")),
    "audit": (("load", "loading the model and operators"), ("attribute", "explaining the benchmark queries"),
              ("audit", "ranking the documents")),
}

# Seconds each stage of the demo took on the reference machine (2 CPU cores, one torch thread,
# `python -m stride_viz demo` from an empty data folder, the default FitConfig of the time:
# 3,115 documents, K 1024, 3 epochs; a demo:tiny training step 0.1 s). Other jobs scale them
# by their size; only the ratios matter, since JobProgress measures the job's own speed.
_DEMO_SECONDS = {"load": 3.0, "train_step": 0.1, "cache": 5.0, "fit": 125.0, "query": 0.65}
_DEMO_DOCS, _DEMO_EPOCHS, _DEMO_SUBSETS = 3115, 3.0, 1024


def stage_position(kind: str, stage: str) -> Optional[tuple[int, int, str]]:
    """``(number, of, label)`` of ``stage`` in the plan of job ``kind`` (1-based), or None
    for a stage the plan does not name."""
    names = [name for name, _ in STAGES.get(kind, ())]
    if stage not in names:
        return None
    i = names.index(stage)
    return i + 1, len(names), STAGES[kind][i][1]


def fit_plan(kind: str, n_docs: int, config: FitConfig, n_queries: int,
             model_seconds: float = _DEMO_SECONDS["load"]) -> tuple[Stage, ...]:
    """The four stages of a ``demo`` or ``attribute`` job with their expected seconds: the demo's
    measured durations scaled by pool size, epochs and K (``model_seconds``: loading, or
    training a demo model)."""
    size = n_docs / _DEMO_DOCS
    seconds = {"model": model_seconds, "cache": _DEMO_SECONDS["cache"] * size,
               "fit": _DEMO_SECONDS["fit"] * size * config.epochs / _DEMO_EPOCHS,
               "attribute": _DEMO_SECONDS["query"] * max(1, n_queries) * config.subsets / _DEMO_SUBSETS}
    return tuple(Stage(name, label, seconds[name]) for name, label in STAGES[kind])


def _with_plan(ctx: "JobContext", plan: tuple[Stage, ...]) -> "JobContext":
    """``ctx`` whose progress reports the whole job (see :class:`JobProgress`)."""
    return replace(ctx, progress=JobProgress(plan, ctx.progress))


def _as_stage(progress, stage: str):
    """A listener that passes every report on under the name ``stage``."""
    return lambda _stage, fraction, eta, message="": progress(stage, fraction, eta, message)


# ----------------------------------------------------------------------------- helpers

def query_id_for(prompt: str, completion: Optional[str]) -> str:
    """A stable id for a query typed by hand: ``q-`` + 10 hex digits of its text."""
    blob = json.dumps([prompt, completion])
    return "q-" + hashlib.sha256(blob.encode()).hexdigest()[:10]


def _need(params: dict, name: str, types: tuple, what: str) -> Any:
    if name not in params:
        raise JobError(f"Missing job parameter '{name}' ({what}).")
    value = params[name]
    if not isinstance(value, types) or isinstance(value, bool) and bool not in types:
        raise JobError(f"The '{name}' job parameter must be {what}. Got {value!r} instead.")
    return value


def _positive_int_or_none(params: dict, name: str) -> Optional[int]:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise JobError(f"The '{name}' job parameter must be a positive integer or empty. "
                       f"Got {value!r} instead.")
    return value


def _fit_config(data: Any) -> FitConfig:
    if not isinstance(data, dict):
        raise JobError(f"The 'fit' job parameter must be a mapping of FitConfig settings. Got {data!r}.")
    try:
        return FitConfig.from_dict(data)
    except ConfigError as e:
        raise JobError(str(e)) from e
    except TypeError as e:  # a value of the wrong type inside the dataclass checks
        raise JobError(f"Bad FitConfig setting: {e}") from e


def _recovery_config(data: Any) -> RecoveryConfig:
    if not isinstance(data, dict):
        raise JobError(f"The 'recovery' job parameter must be a mapping of RecoveryConfig settings. "
                       f"Got {data!r}.")
    try:
        return RecoveryConfig(**data)
    except ConfigError as e:
        raise JobError(str(e)) from e
    except TypeError as e:
        raise JobError(f"Bad RecoveryConfig setting: {e}") from e


def check_model_spec(spec: Any) -> str:
    """Refuse a model spec that cannot work before a job starts: empty, a missing local
    folder, or a string that is neither a path nor a hub id."""
    if not isinstance(spec, str) or not spec.strip():
        raise JobError("The 'model' job parameter must be 'demo', a local model folder or a "
                       "Hugging Face hub id such as 'gpt2'. Got an empty value.")
    spec = spec.strip()
    if spec == "demo" or spec.startswith("demo:"):
        return spec
    from stride_viz.data.models import model_spec_problem
    problem = model_spec_problem(spec)
    if problem:
        raise JobError(problem)
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.is_dir() else spec


def check_pool_spec(spec: Any) -> str:
    """Refuse a pool spec that is neither a built-in name nor an existing file or folder."""
    from stride_viz.data.pools import builtin_pools
    if not isinstance(spec, str) or not spec.strip():
        raise JobError(f"The 'pool' job parameter must be a built-in pool "
                       f"({', '.join(builtin_pools())}) or a path. Got an empty value.")
    spec = spec.strip()
    if spec in builtin_pools():
        return spec
    path = Path(spec).expanduser()
    if not path.exists():
        raise JobError(f"Pool '{spec}' is neither a built-in pool ({', '.join(builtin_pools())}) "
                       f"nor an existing file or folder.")
    return str(path.resolve())


def _check_queries(data: Any) -> list[dict]:
    if not isinstance(data, list) or not data:
        raise JobError("The 'queries' job parameter must be a non-empty list of "
                       "{'prompt', 'completion' (optional), 'id' (optional)}.")
    out, seen = [], set()
    for i, q in enumerate(data):
        if not isinstance(q, dict):
            raise JobError(f"Query {i + 1} must be a mapping with 'prompt'. Got {q!r}.")
        prompt = q.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise JobError(f"Query {i + 1}: the prompt is empty; type the text the model is given.")
        completion = q.get("completion")
        if completion is not None and not isinstance(completion, str):
            raise JobError(f"Query {i + 1}: the completion must be text or empty. Got {completion!r}.")
        if completion is not None and not completion.strip():
            completion = None  # blank means: let the model complete it
        qid = q.get("id") or query_id_for(prompt, completion)
        if not isinstance(qid, str) or not _ID_RE.match(qid):
            raise JobError(f"Query {i + 1}: the id {qid!r} must be 1-80 letters, digits, '_', '-' or '.'.")
        if qid in seen:
            raise JobError(f"Query id {qid!r} appears twice; ids must be unique.")
        seen.add(qid)
        out.append({"id": qid, "prompt": prompt, "completion": completion})
    return out


def _queries(data: list[dict]):
    from stride_viz.data.pools import Query
    return [Query(id=q["id"], prompt=q["prompt"], completion=q.get("completion")) for q in data]


def _fit_and_attribute(ctx: JobContext, model, pool, config: FitConfig, queries,
                       recovery: RecoveryConfig) -> dict:
    """Shared tail of ``demo`` and ``attribute``: open/reuse the run, fit (resumable), attribute.

    Queries with a completion are explained together; a query the model has to complete is
    explained on its own, so that a model that produces nothing for one prompt does not lose
    the others (it is reported under ``skipped``; when nothing could be explained the job fails).
    """
    from stride_viz.demo import default_run_dir  # one naming rule for the CLI demo and the jobs
    from stride_viz.engine import QueryError, Stride
    run_dir = default_run_dir(model.hash, pool.hash, config)
    ctx.set_run_dir(run_dir)
    ctx.log(f"run directory: {run_dir}\n")
    stride = Stride.create_or_open(run_dir, model, pool, config)
    t0 = time.monotonic()
    stride.fit(progress=ctx.progress, should_stop=ctx.should_stop, wait=True)  # waits for another fit of it
    if ctx.should_stop():
        raise Cancelled("stopped after the fit")
    fit_seconds = time.monotonic() - t0
    t1 = time.monotonic()
    given = [q for q in queries if q.completion]
    # one "attribute" stage over all the queries, though they are explained in several calls
    timer = StageTimer("attribute", len(queries), ctx.progress, min_interval=0.0)
    timer.update(0, f"{len(queries)} quer{'y' if len(queries) == 1 else 'ies'} to explain")

    def part(start: int, count: int):
        def report(stage: str, fraction: float, eta, message: str = "") -> None:
            if stage == "attribute":
                timer.update(start + fraction * count, message)
            else:
                ctx.progress(stage, fraction, eta, message)
        return report

    attributions = stride.attribute(given, recovery, progress=part(0, len(given))) if given else []
    skipped = []
    done = len(given)
    for q in queries:
        if q.completion:
            continue
        if ctx.should_stop():
            raise Cancelled("stopped between queries")
        try:
            attributions += stride.attribute([q], recovery, progress=part(done, 1))
        except QueryError as e:
            ctx.log(f"skipped query {q.id}: {e}\n")
            skipped.append({"id": q.id, "reason": str(e)})
        done += 1
    if not attributions:
        raise QueryError("; ".join(s["reason"] for s in skipped))
    result = {"run_dir": str(run_dir), "query_ids": [a.query.id for a in attributions], "skipped": skipped,
              "seconds_fit": round(fit_seconds, 2), "seconds_attribute": round(time.monotonic() - t1, 2)}
    if pool.facts:  # planted facts: how well their known sources were found
        from stride_viz.demo import fact_metrics
        result["facts"] = fact_metrics(pool, attributions)
    return result


# ----------------------------------------------------------------------------- sleep

def _validate_sleep(p: dict) -> dict:
    seconds = _need(p, "seconds", (int, float), "a number of seconds in (0, 3600]")
    if not 0 < seconds <= 3600:
        raise JobError(f"The 'seconds' job parameter must be in (0, 3600]. Got {seconds!r} instead.")
    steps = p.get("steps", 10)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 10_000:
        raise JobError(f"The 'steps' job parameter must be an integer in [1, 10000]. Got {steps!r} instead.")
    checkpoint = p.get("checkpoint")
    if checkpoint is not None and not isinstance(checkpoint, str):
        raise JobError(f"The 'checkpoint' job parameter must be a file path or empty. Got {checkpoint!r}.")
    return {"seconds": float(seconds), "steps": steps, "checkpoint": checkpoint,
            "heavy": bool(p.get("heavy", True))}


def _run_sleep(p: dict, ctx: JobContext) -> dict:
    """Sleep ``seconds`` in ``steps`` equal steps; with a checkpoint file, a resumed job
    continues after the last completed step."""
    ckpt = Path(p["checkpoint"]) if p.get("checkpoint") else None
    start = int(ckpt.read_text()) if ckpt is not None and ckpt.exists() else 0
    steps, dt = p["steps"], p["seconds"] / p["steps"]
    t0 = time.monotonic()
    for step in range(start, steps):
        if ctx.should_stop():
            raise Cancelled(f"stopped at step {step}")
        time.sleep(dt)
        if ckpt is not None:
            ckpt.write_text(str(step + 1))
        done_here = step + 1 - start
        eta = (time.monotonic() - t0) / done_here * (steps - step - 1)
        ctx.progress("sleep", (step + 1) / steps, eta, f"step {step + 1}/{steps}")
    return {"start_step": start, "steps_run": steps - start}


# ----------------------------------------------------------------------------- demo

def demo_params_from_env() -> dict:
    """Demo settings, shrunk by the STRIDE_VIZ_DEMO_* environment variables when set."""
    p: dict[str, Any] = {"preset": os.environ.get("STRIDE_VIZ_DEMO_PRESET", "tiny")}
    for name, key in (("STRIDE_VIZ_DEMO_POOL_LIMIT", "pool_limit"), ("STRIDE_VIZ_DEMO_QUERIES", "n_fact_queries")):
        if os.environ.get(name):
            try:
                p[key] = int(os.environ[name])
            except ValueError:
                raise JobError(f"{name} must be an integer. Got {os.environ[name]!r}.") from None
    for name, key in (("STRIDE_VIZ_DEMO_FIT", "fit"), ("STRIDE_VIZ_DEMO_MODEL", "model")):
        if os.environ.get(name):
            try:
                p[key] = json.loads(os.environ[name])
            except json.JSONDecodeError as e:
                raise JobError(f"{name} must be a JSON object ({e}). Got {os.environ[name]!r}.") from None
    return p


def _validate_demo(p: dict) -> dict:
    from stride_viz.data.models import DEMO_PRESETS
    preset = p.get("preset", "tiny")
    if preset not in DEMO_PRESETS:
        raise JobError(f"The 'preset' job parameter must be one of {', '.join(DEMO_PRESETS)}. Got {preset!r}.")
    fit = p.get("fit", {})
    _fit_config(fit)
    model = p.get("model", {})
    unknown = sorted(set(model) - set(DEMO_PRESETS[preset])) if isinstance(model, dict) else None
    if unknown is None or unknown:
        raise JobError(f"The 'model' job parameter of a demo must map demo model settings "
                       f"({', '.join(sorted(DEMO_PRESETS[preset]))}) to values. Got {model!r}.")
    n_fact = p.get("n_fact_queries", 3)
    if isinstance(n_fact, bool) or not isinstance(n_fact, int) or not 0 <= n_fact <= 100:
        raise JobError(f"The 'n_fact_queries' job parameter must be an integer in [0, 100]. Got {n_fact!r}.")
    return {"preset": preset, "pool_limit": _positive_int_or_none(p, "pool_limit"), "fit": fit,
            "model": model, "n_fact_queries": n_fact,
            "free_prompt": p.get("free_prompt", DEMO_FREE_PROMPT)}


def _run_demo(p: dict, ctx: JobContext) -> dict:
    from stride_viz.data import models
    from stride_viz.data import pools
    pool = pools.load_pool("fortunes+facts", limit=p["pool_limit"])
    config = FitConfig.from_dict(p["fit"])
    facts = pools.fact_queries(pool)[: p["n_fact_queries"]]
    queries = facts + [pools.Query(id="free-prompt", prompt=p["free_prompt"], completion=None)]
    standard = p["pool_limit"] is None and not p["model"]
    if standard:   # the standard demo model, shared with `load_model("demo")` and the CLI
        train = not models.demo_model_available(p["preset"])
    else:
        tag = hashlib.sha256(json.dumps([pool.hash, p["model"]], sort_keys=True).encode()).hexdigest()[:12]
        model_dir = models.data_home() / "models" / f"demo-{p['preset']}-{tag}"
        train = not (model_dir / "config.json").exists()
    model_seconds = (_DEMO_SECONDS["train_step"] * models.demo_training_steps(pool, p["preset"], **p["model"])
                     if train else _DEMO_SECONDS["load"])
    ctx = _with_plan(ctx, fit_plan("demo", len(pool), config, len(queries), model_seconds))
    model_progress = _as_stage(ctx.progress, "model")
    model_progress("model", 0.0, None, "training the demo model (first use)" if train else "loading the demo model")
    if standard:
        model = models.load_model(f"demo:{p['preset']}", progress=model_progress)
    else:
        if train:
            ctx.log(f"training a reduced demo model ({p['preset']}, {p['model']}) on {len(pool)} documents\n")
            models.train_demo_model(pool, model_dir, preset=p["preset"], progress=model_progress, **p["model"])
        model = models.load_model(str(model_dir))
    model_progress("model", 1.0, 0.0, f"model {model.hash[:10]} ready")
    if ctx.should_stop():
        raise Cancelled("stopped after loading the demo model")
    result = _fit_and_attribute(ctx, model, pool, config, queries, RecoveryConfig())
    result["demo"] = True
    return result


# ----------------------------------------------------------------------------- attribute

def _validate_attribute(p: dict) -> dict:
    fit = p.get("fit", {})
    _fit_config(fit)
    recovery = p.get("recovery", {})
    _recovery_config(recovery)
    return {"model": check_model_spec(p.get("model")), "pool": check_pool_spec(p.get("pool")),
            "pool_limit": _positive_int_or_none(p, "pool_limit"),
            "queries": _check_queries(p.get("queries")), "fit": fit, "recovery": recovery}


def _run_attribute(p: dict, ctx: JobContext) -> dict:
    from stride_viz.data import models
    from stride_viz.data import pools
    pool = pools.load_pool(p["pool"], limit=p["pool_limit"])
    if ctx.should_stop():
        raise Cancelled("stopped before loading the model")
    config = FitConfig.from_dict(p["fit"])
    ctx = _with_plan(ctx, fit_plan("attribute", len(pool), config, len(p["queries"])))
    ctx.progress("model", 0.0, None, f"loading {Path(p['model']).name}")
    model = models.load_model(p["model"], device=config.device)
    ctx.progress("model", 1.0, 0.0, f"model {model.hash[:10]} ready")
    return _fit_and_attribute(ctx, model, pool, config, _queries(p["queries"]),
                              _recovery_config(p["recovery"]))


# ----------------------------------------------------------------------------- continuation

def _validate_continuation(p: dict) -> dict:
    run_dir = _need(p, "run_dir", (str,), "the run directory")
    if not (Path(run_dir) / "run.json").exists():
        raise JobError(f"Run directory '{run_dir}' has no run.json; pick a run from the Explore page.")
    query_id = _need(p, "query_id", (str,), "the id of an attributed query")
    if not RunStore(run_dir).attribution_dir(query_id).is_dir():
        raise JobError(f"Query '{query_id}' has not been attributed in run '{run_dir}'.")
    k = _need(p, "k", (int,), "an operator index")
    if k < 0:
        raise JobError(f"The 'k' job parameter must be an operator index >= 0. Got {k}.")
    return {"run_dir": str(Path(run_dir).resolve()), "query_id": query_id, "k": k}


def _run_continuation(p: dict, ctx: JobContext) -> dict:
    from stride_viz.engine import Stride
    ctx.set_run_dir(p["run_dir"])
    ctx.progress("generate", 0.0, None, f"loading the model to steer with operator {p['k']}")
    stride = Stride.open(p["run_dir"])
    text = stride.continuation(p["query_id"], p["k"])  # also added to continuations.json
    ctx.progress("generate", 1.0, 0.0, "done")
    return {"query_id": p["query_id"], "k": p["k"], "text": text}


# ----------------------------------------------------------------------------- explain

MAX_PROMPT_CHARS = 2000  # the Explain box's bound; the model's context length is checked too


def _snippet(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def check_new_prompt(prompt: Any, completion: Any = None) -> tuple[str, Optional[str]]:
    """The Explain box's input as (prompt, completion or None), or a one-line JobError that
    says what to change. The text is kept as typed (a trailing space changes the tokens)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise JobError("Type a prompt to explain.")
    if completion is not None and not isinstance(completion, str):
        raise JobError(f"The completion must be text or empty. Got {type(completion).__name__}.")
    if completion is not None and not completion.strip():
        completion = None  # blank: the model completes the prompt
    for what, text in (("prompt", prompt), ("completion", completion)):
        if text is not None and len(text) > MAX_PROMPT_CHARS:
            raise JobError(f"The {what} is {len(text):,} characters long; shorten it to at most "
                           f"{MAX_PROMPT_CHARS:,}.")
    return prompt, completion


def check_fitted_run(run_dir: str, hint: str, shown: str | None = None) -> None:
    """Refuse (JobError) a run directory without run.json (the message names it as ``shown``,
    default ``run_dir``, and ends with ``hint``: where to pick one) or without fitted operators."""
    store = RunStore(run_dir)
    if not store.meta_path.exists():
        raise JobError(f"Run directory '{shown or run_dir}' has no run.json; {hint}.")
    if not store.is_fitted():
        raise JobError("This run has no fitted operators yet; wait for its fit to finish.")


def _validate_explain(p: dict) -> dict:
    run_dir = _need(p, "run_dir", (str,), "the run directory")
    check_fitted_run(run_dir, "pick a run from the Explore page")
    prompt, completion = check_new_prompt(p.get("prompt"), p.get("completion"))
    recovery = p.get("recovery") or {}
    _recovery_config(recovery)
    return {"run_dir": str(Path(run_dir).resolve()), "prompt": prompt, "completion": completion,
            "id": query_id_for(prompt, completion), "recovery": recovery}


def explain(stride, p: dict, progress: Callable[..., None], continuations: bool = True) -> dict:
    """Explain the prompt of an ``explain`` job with an open :class:`Stride` (the warm
    explainer's, or one opened for this job alone by :func:`_run_explain`). Without
    ``continuations`` the scores are written first and :func:`add_continuations` follows."""
    from stride_viz.data.pools import Query
    t0 = time.monotonic()
    [a] = stride.attribute([Query(p["id"], p["prompt"], p["completion"])],
                           _recovery_config(p["recovery"]), progress=progress, continuations=continuations)
    return {"run_dir": p["run_dir"], "query_ids": [p["id"]],
            "completion_generated": bool(a.info.get("completion_generated")),
            "seconds_attribute": round(time.monotonic() - t0, 3)}


def add_continuations(stride, query_id: str) -> None:
    """Write the base and steered continuations of an explained query (what
    ``Stride.attribute(continuations=True)`` writes), after its scores are on screen."""
    stride.add_continuations(query_id)


def _run_explain(p: dict, ctx: JobContext) -> dict:
    """An explain job run by a worker of its own (``python -m stride_viz.jobs.worker``): loads
    the run for this one prompt. The executor hands explain jobs to the warm explainer instead."""
    from stride_viz.engine import Stride
    ctx.set_run_dir(p["run_dir"])
    ctx.progress("load", 0.0, None, "loading the model and operators")
    return explain(Stride.open(p["run_dir"]), p, ctx.progress)


# ----------------------------------------------------------------------------- audit

def _validate_audit(p: dict) -> dict:
    """A contamination audit of a fitted run (stride_viz.downstream.audit): its folder is
    ``RUN/audits/<audit id>``, named after the queries and settings."""
    from stride_viz.downstream.audit import AuditConfig, audit_id, audits_dir
    run_dir = _need(p, "run_dir", (str,), "the run directory")
    check_fitted_run(run_dir, "pick a run on the Audit page")
    queries = _check_queries(p.get("queries"))
    audit = p.get("audit") or {}
    try:
        config = AuditConfig(**audit) if isinstance(audit, dict) else None
    except (ConfigError, TypeError) as e:
        raise JobError(f"Bad audit setting: {e}") from e
    if config is None:
        raise JobError(f"The 'audit' job parameter must be a mapping of AuditConfig settings. Got {audit!r}.")
    recovery = p.get("recovery") or {}
    name = p.get("name") or "benchmark"
    if not isinstance(name, str) or len(name) > 200:
        raise JobError("The 'name' job parameter must be text of at most 200 characters.")
    aid = audit_id(_queries(queries), config, _recovery_config(recovery))
    return {"run_dir": str(Path(run_dir).resolve()), "queries": queries, "audit": audit, "recovery": recovery,
            "name": name, "out": str(audits_dir(Path(run_dir).resolve()) / aid)}


def _run_audit(p: dict, ctx: JobContext) -> dict:
    import shutil
    from stride_viz.downstream.audit import AuditConfig, read_audit, run_audit
    ctx.set_run_dir(p["run_dir"])
    out = Path(p["out"])
    if (out / "audit.json").exists():      # the same audit was finished before
        data = read_audit(out)
        ctx.progress("audit", 1.0, 0.0, "already audited: reused")
        return {"run_dir": p["run_dir"], "audit_dir": str(out), "n_flagged": data["n_flagged"], "reused": True}
    if out.exists():                       # a killed audit: audit.json is written last, the rest is partial
        shutil.rmtree(out)
    n = len(p["queries"])
    ctx = _with_plan(ctx, (Stage("load", STAGES["audit"][0][1], _DEMO_SECONDS["load"]),
                           Stage("attribute", STAGES["audit"][1][1], _DEMO_SECONDS["query"] * n),
                           Stage("audit", STAGES["audit"][2][1], 0.5)))
    result = run_audit(p["run_dir"], _queries(p["queries"]), out, AuditConfig(**p["audit"]),
                       _recovery_config(p["recovery"]), progress=ctx.progress, should_stop=ctx.should_stop,
                       name=p["name"])
    return {"run_dir": p["run_dir"], "audit_dir": str(out), "n_flagged": int(len(result.flagged)), "reused": False}


KINDS: dict[str, JobKind] = {
    "sleep": JobKind("sleep", True, _validate_sleep, _run_sleep,
                     lambda p: f"sleep {p['seconds']:g} s"),
    "demo": JobKind("demo", True, _validate_demo, _run_demo,
                    lambda p: f"demo ({p['preset']}" + (f", {p['pool_limit']} docs)" if p.get("pool_limit") else ")")),
    "attribute": JobKind("attribute", True, _validate_attribute, _run_attribute,
                         lambda p: f"{Path(p['model']).name} on {Path(p['pool']).name}: "
                                   f"{len(p['queries'])} quer{'y' if len(p['queries']) == 1 else 'ies'}"),
    "continuation": JobKind("continuation", False, _validate_continuation, _run_continuation,
                            lambda p: f"continuation of {p['query_id']} with operator {p['k']}"),
    "explain": JobKind("explain", False, _validate_explain, _run_explain,
                       lambda p: f"explain “{_snippet(p['prompt'], 50)}”", warm=True),
    "audit": JobKind("audit", True, _validate_audit, _run_audit,
                     lambda p: f"audit of {Path(p['run_dir']).name} with {_snippet(p['name'], 40)} "
                               f"({len(p['queries'])} quer{'y' if len(p['queries']) == 1 else 'ies'})"),
}

# data selection and verification by retraining: stride_viz/jobs/downstream_kinds.py
from . import downstream_kinds as _downstream  # noqa: E402  (it needs JobError only)

STAGES.update({"select": (("load", "loading the model and operators"), ("select", "explaining the targets")),
               "verify": (("retrain", "retraining the model"),)})
KINDS.update({"select": JobKind("select", True, _downstream.validate_select, _downstream.run_select_job,
                                _downstream.select_title),
              "verify": JobKind("verify", True, _downstream.validate_verify, _downstream.run_verify_job,
                                _downstream.verify_title)})


def get_kind(name: str) -> JobKind:
    if name not in KINDS:
        raise JobError(f"Unknown job kind {name!r}; known kinds: {', '.join(sorted(KINDS))}.")
    return KINDS[name]
