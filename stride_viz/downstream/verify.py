"""Verify an attribution by retraining: the counterfactual test, on demand, for small models.

For one explained query of a run, retrain the run's model from its recipe

- on the full pool (the baseline: same recipe and seed as the model, so it should reproduce
  the model's weights; the check is reported),
- without the query's top-k proponents (the examples STRIDE ranks first),
- without k examples drawn at random (``random_seeds`` draws: what removing *any* k examples
  does),
- on the full pool with other training seeds (``noise_seeds``: how much the loss moves by
  retraining alone),

and report the change of the query's loss (mean next-token cross-entropy over the completion
tokens, nats) from the baseline: ``change = loss(retrained without the examples) −
loss(retrained on the full pool)``. **change > 0: removing the examples made the completion
less likely, i.e. they helped** (what STRIDE claims of proponents: its linear prediction of the
change is the sum of their scores). A top-k change well above the random changes and the seed
noise confirms the attribution; one inside them does not.

Only models whose folder carries the recipe that made them can be retrained: the
``stride_viz_model.json`` manifest written by ``train_demo_model`` (``python -m stride_viz
train-model``, the demo models). Models from elsewhere (a hub checkpoint, a folder saved by
hand) are refused with a message saying so. Retraining uses the model's own tokenizer, kept
fixed, and :func:`stride_viz.data.models.fit_demo_lm`, the function the manifest's model was
trained with (``stride_viz.evaluation.retrain.train_recipe`` is the LDS ground truth's
narrower recipe without weight decay or fact repeats); the query's loss is measured with
``stride_viz.evaluation.retrain.query_losses``, as for the LDS ground truth.

Limits **(ours)**: at most ``MAX_PARAMETERS`` parameters, ``MAX_POOL`` pool examples and an
estimated ``max_seconds`` of retraining in all (default ``MAX_SECONDS``), estimated from the
demo model's measured step time on the reference machine (2 shared CPU cores) scaled by the
parameter count and batch. Each retrained model's loss is saved as soon as it is known, so a
stopped job resumes where it stopped.

    from stride_viz.downstream.verify import verify
    result = verify("runs/demo", "fact-03", k=10)
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from stride_viz.config import ConfigError
from stride_viz.progress import Cancelled, no_progress

__all__ = ["VerifyError", "MAX_PARAMETERS", "MAX_POOL", "MAX_SECONDS", "model_recipe", "plan", "verify",
           "result_path", "read_result", "CHANGE_NOTE"]

MAX_PARAMETERS = 20_000_000
MAX_POOL = 20_000
MAX_SECONDS = 2 * 3600.0
# demo:tiny (675,072 parameters, batch 32, max_length 96): 0.1 s a training step on the
# reference machine (stride_viz.jobs.kinds._DEMO_SECONDS["train_step"])
_REF_STEP_SECONDS, _REF_PARAMETERS, _REF_TOKENS = 0.1, 675_072, 32 * 96
CHANGE_NOTE = ("change = the query's loss after retraining without the examples − its loss after "
               "retraining on the full pool (same recipe and seed), nats per completion token; > 0: "
               "removing them made the completion less likely, i.e. they helped")


class VerifyError(ConfigError):
    """A run or query that cannot be verified by retraining (the message says why)."""


# ----------------------------------------------------------------------------- the recipe

def _model_folder(spec: str) -> Optional[Path]:
    from stride_viz.data.models import DEMO_PRESETS, demo_model_source
    if spec == "demo" or spec.startswith("demo:"):
        preset = spec.partition(":")[2] or "tiny"
        return demo_model_source(preset) if preset in DEMO_PRESETS else None
    path = Path(spec).expanduser()
    return path if path.is_dir() else None


def model_recipe(spec: str) -> tuple[Path, dict]:
    """(model folder, manifest) of a model made by ``train_demo_model``; VerifyError for a
    model without a recipe (a hub id, a folder saved by hand) or a recipe of another version."""
    from stride_viz.data.models import DEMO_PRESETS, MANIFEST, demo_settings
    folder = _model_folder(spec)
    if folder is None:
        raise VerifyError(f"The model {spec!r} is not a local folder with a training recipe, so it cannot be "
                          f"retrained here; only models trained by stride_viz (python -m stride_viz "
                          f"train-model, the demo models) can be verified.")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        raise VerifyError(f"The model folder '{folder.name}' has no readable {MANIFEST} recipe, so it cannot "
                          f"be retrained; only models trained by stride_viz (python -m stride_viz "
                          f"train-model, the demo models) can be verified.") from None
    preset = manifest.get("preset") if isinstance(manifest, dict) else None
    if preset not in DEMO_PRESETS or not isinstance(manifest.get("settings"), dict):
        raise VerifyError(f"The recipe in '{folder.name}/{MANIFEST}' names no known preset and settings; "
                          f"retrain the model with python -m stride_viz train-model to verify it.")
    try:
        demo_settings(preset, **manifest["settings"])
    except ValueError as e:
        raise VerifyError(f"The recipe in '{folder.name}/{MANIFEST}' is from another version of stride_viz "
                          f"({e}); retrain the model with python -m stride_viz train-model to verify it.") from None
    return folder, manifest


def _parameters(folder: Path) -> int:
    """Parameters of the GPT-2 in ``folder`` from its config.json (tied output embedding)."""
    c = json.loads((folder / "config.json").read_text())
    e, v, p, n = int(c["n_embd"]), int(c["vocab_size"]), int(c["n_positions"]), int(c["n_layer"])
    return v * e + p * e + n * (12 * e * e + 13 * e) + 2 * e


def plan(run_dir: Union[str, Path], k: int = 10, random_seeds: int = 3, noise_seeds: int = 1,
         max_seconds: float = MAX_SECONDS) -> dict:
    """What verifying a query of this run takes, checked against the limits (VerifyError when
    over one): parameters, pool size, steps per retraining, retrainings, estimated seconds."""
    from stride_viz.data.models import demo_training_steps
    from stride_viz.storage import RunStore
    for name, value, lo in (("k", k, 1), ("random_seeds", random_seeds, 1), ("noise_seeds", noise_seeds, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise VerifyError(f"The '{name}' parameter of verify must be an integer >= {lo}. Got {value!r} instead.")
    store = RunStore(run_dir)
    if not store.meta_path.exists():
        raise VerifyError(f"'{run_dir}' is not a run directory (no run.json); pick a fitted run.")
    meta = store.read_meta()
    folder, manifest = model_recipe(str(meta["model"]["spec"]))
    n_pool = int(meta["pool"]["n"])
    if manifest.get("pool_hash") != meta["pool"]["hash"]:
        raise VerifyError(f"The run's pool (hash {meta['pool']['hash']}) is not the pool its model was trained on "
                          f"(hash {manifest.get('pool_hash')}): retraining without some of the run's examples "
                          f"would change more than those examples. Verify runs whose pool trained the model.")
    if manifest.get("weights_hash") != meta["model"]["hash"]:
        raise VerifyError(f"The model in '{folder.name}' has changed since the run was fitted (weights "
                          f"{manifest.get('weights_hash')}, the run's {meta['model']['hash']}): its recipe would "
                          f"verify another model. Fit a new run for the new weights.")
    if k >= n_pool:
        raise VerifyError(f"k ({k}) must be smaller than the pool ({n_pool} examples).")
    n_params = _parameters(folder)
    if n_params > MAX_PARAMETERS:
        raise VerifyError(f"The model has {n_params:,} parameters; retraining here is limited to "
                          f"{MAX_PARAMETERS:,}. Verify a smaller model (e.g. the demo model).")
    if n_pool > MAX_POOL:
        raise VerifyError(f"The pool has {n_pool:,} examples; retraining here is limited to {MAX_POOL:,}.")
    settings = manifest["settings"]
    pool = store.read_pool()
    steps = demo_training_steps(pool, manifest["preset"], **settings)
    retrains = 2 + random_seeds + noise_seeds
    step_seconds = (_REF_STEP_SECONDS * n_params / _REF_PARAMETERS
                    * settings["batch_size"] * settings["max_length"] / _REF_TOKENS)
    seconds = retrains * steps * step_seconds
    if seconds > max_seconds:
        raise VerifyError(f"Verifying needs {retrains} retrainings of {steps:,} steps, about "
                          f"{_duration(seconds)} on a 2-core CPU; the limit is {_duration(max_seconds)}. Lower "
                          f"the random draws or the seed-noise retrainings, or verify a smaller model.")
    return {"model_folder": str(folder), "preset": manifest["preset"], "settings": settings,
            "seed": int(manifest.get("seed", 0)), "model_weights_hash": manifest.get("weights_hash"),
            "n_parameters": n_params, "n_pool": n_pool, "steps_per_retrain": steps, "retrains": retrains,
            "estimated_seconds": round(seconds, 1), "limits": {"parameters": MAX_PARAMETERS, "pool": MAX_POOL,
                                                               "seconds": max_seconds}}


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:,.0f} minutes"


# ----------------------------------------------------------------------------- results on disk

def result_path(run_dir: Union[str, Path], query_id: str, k: int) -> Path:
    """``<run>/verify/<query id>-k<k>.json``: the finished verification."""
    from stride_viz.storage import RunStore
    folder = RunStore(run_dir).attribution_dir(query_id)   # the safe folder name of the id
    return Path(run_dir) / "verify" / f"{folder.name}-k{k}.json"


def read_result(run_dir: Union[str, Path], query_id: str, k: int) -> Optional[dict]:
    """The finished verification of a query, or None."""
    path = result_path(run_dir, query_id, k)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- verifying

def _units(k: int, random_seeds: int, noise_seeds: int, seed: int) -> list[tuple[str, str, int]]:
    """(name, removed set, training seed) of every retraining, baseline first."""
    return ([("full", "none", seed), ("without-top", "top", seed)]
            + [(f"random-{j}", f"random-{j}", seed) for j in range(random_seeds)]
            + [(f"seed-{j + 1}", "none", seed + j + 1) for j in range(noise_seeds)])


def verify(run_dir: Union[str, Path], query_id: str, k: int = 10, random_seeds: int = 3, noise_seeds: int = 1,
           max_seconds: float = MAX_SECONDS, progress: Callable[..., None] = no_progress,
           should_stop: Callable[[], bool] = lambda: False, threads: Optional[int] = None) -> dict:
    """Retrain as described in the module docstring and return (and write to
    :func:`result_path`) the changes of the query's loss, nats."""
    import torch
    from transformers import AutoTokenizer

    from stride_viz.data.models import fit_demo_lm, load_model, weights_hash
    from stride_viz.engine import read_attribution
    from stride_viz.evaluation.retrain import query_losses
    from stride_viz.storage import RunStore, read_json, write_json

    p = plan(run_dir, k, random_seeds, noise_seeds, max_seconds)
    store = RunStore(run_dir)
    try:
        a = read_attribution(run_dir, query_id)
    except FileNotFoundError:
        raise VerifyError(f"Query {query_id!r} has not been explained in this run; explain it first.") from None
    if threads:
        torch.set_num_threads(threads)
    pool = store.read_pool()
    meta = store.read_meta()
    query = a.query
    n = len(pool)
    top = [int(i) for i in a.top(k, 1)]
    removed = {"top": top, "none": []}
    for j in range(random_seeds):
        removed[f"random-{j}"] = sorted(int(i) for i in np.random.default_rng([j, n, k]).choice(n, k, replace=False))
    units = _units(k, random_seeds, noise_seeds, p["seed"])
    fingerprint = {"query_id": query_id, "k": k, "pool_hash": meta["pool"]["hash"],
                   "model_hash": meta["model"]["hash"], "top": [pool.ids[i] for i in top],
                   "settings": p["settings"], "seed": p["seed"]}
    final = result_path(run_dir, query_id, k)
    partial = final.with_name(final.stem + ".partial.json")
    done: dict[str, dict] = {}
    if partial.exists():
        try:
            saved = read_json(partial)
            if saved.get("fingerprint") == fingerprint:
                done = saved.get("units", {})
        except (OSError, ValueError):
            done = {}
    final.parent.mkdir(parents=True, exist_ok=True)

    tokenizer = AutoTokenizer.from_pretrained(p["model_folder"])
    max_tokens = int(json.loads((Path(p["model_folder"]) / "config.json").read_text())["n_positions"])
    original = load_model(p["model_folder"], device="cpu")
    loss_model = float(query_losses(original.model, original.tokenizer, [query], max_tokens)[0])
    del original
    t_start, done_before = time.monotonic(), len(done)
    progress("retrain", len(done) / len(units), None, f"{len(units)} retrainings of {p['steps_per_retrain']} steps")
    for name, which, seed in units:
        if name in done:
            continue
        if should_stop():
            raise Cancelled(f"stopped after {len(done)} of {len(units)} retrainings (kept; resume continues)")
        drop = set(removed[which])
        subset = pool.subset([i for i in range(n) if i not in drop]) if drop else pool
        t0 = time.monotonic()
        model = fit_demo_lm(subset, tokenizer, p["preset"], seed,
                            progress=_unit_progress(progress, name, len(done), done_before, len(units), t_start),
                            **p["settings"])
        loss = float(query_losses(model, tokenizer, [query], max_tokens)[0])
        done[name] = {"loss": loss, "seed": seed, "removed_ids": [pool.ids[i] for i in sorted(drop)],
                      "seconds": round(time.monotonic() - t0, 1)}
        if name == "full":
            done[name]["weights_hash"] = weights_hash(model)
        write_json(partial, {"fingerprint": fingerprint, "units": done})
        progress("retrain", len(done) / len(units), None, f"retrained {name}: query loss {loss:.4f} nats")
    result = _summarise(query, a.scores, pool, done, removed, units, loss_model, p, k)
    result["seconds_this_attempt"] = round(time.monotonic() - t_start, 1)
    write_json(final, result)
    partial.unlink(missing_ok=True)
    return result


def _unit_progress(progress: Callable[..., None], name: str, done: int, done_before: int, total: int,
                   t_start: float) -> Callable[..., None]:
    """Training steps of one retraining reported as the whole job's fraction and time left."""
    def report(_stage: str, fraction: float, _eta, message: str = "") -> None:
        work = done + min(1.0, max(0.0, fraction))
        here = work - done_before
        eta = (time.monotonic() - t_start) / here * (total - work) if here > 0.02 else None
        progress("retrain", work / total, eta, f"retraining {name} ({done + 1} of {total}): {message}")
    return report


def _summarise(query, scores: np.ndarray, pool, done: dict, removed: dict, units, loss_model: float,
               p: dict, k: int) -> dict:
    full = done["full"]["loss"]
    predicted = lambda rows: float(np.sum(scores[rows])) if rows else 0.0   # noqa: E731
    rand = [u for u, _, _ in units if u.startswith("random-")]
    noise = [u for u, _, _ in units if u.startswith("seed-")]
    r_changes = [done[u]["loss"] - full for u in rand]
    n_changes = [done[u]["loss"] - full for u in noise]
    top = removed["top"]
    return {
        "what": "verify by retraining: change of the query's loss when examples are removed from the pool",
        "change_note": CHANGE_NOTE,
        "query": {"id": query.id, "prompt": query.prompt, "completion": query.completion},
        "k": k, "loss_model": loss_model, "loss_full": full,
        "baseline_reproduces_model": done["full"].get("weights_hash") == p["model_weights_hash"],
        "top": {"ids": [pool.ids[i] for i in top], "n_positive_scores": int(np.sum(scores[top] > 0)),
                "loss": done["without-top"]["loss"], "change": done["without-top"]["loss"] - full,
                "predicted_change": predicted(top)},
        "random": {"changes": r_changes, "losses": [done[u]["loss"] for u in rand],
                   "predicted_changes": [predicted(removed[u]) for u in rand],
                   "mean": float(np.mean(r_changes)),
                   "std": float(np.std(r_changes, ddof=1)) if len(r_changes) > 1 else None,
                   "seeds": list(range(len(rand)))},
        "seed_noise": {"changes": n_changes, "losses": [done[u]["loss"] for u in noise],
                       "seeds": [done[u]["seed"] for u in noise],
                       "abs_max": float(max(map(abs, n_changes))) if n_changes else None},
        "retrains": {u: {key: v for key, v in done[u].items() if key != "removed_ids"} for u, _, _ in units},
        "plan": p, "seconds_retraining": round(sum(done[u]["seconds"] for u, _, _ in units), 1),
    }
