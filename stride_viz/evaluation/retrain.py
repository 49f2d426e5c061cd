"""Ground truth for the LDS: retrain the model from scratch on random subsets of the pool.

A ground-truth directory (format in ``stride_viz.evaluation.metrics``) is first *prepared* with the
pool, the queries, the tokenizer and the training recipe; then any number of processes fill
it, each taking the subsets j with ``j % n == i`` (``--shard i/n``) and appending one JSON
line per retrained subset to its own part file. A killed process loses only the subset it
was training: rerunning skips every subset already recorded.

The recipe is the project's single training recipe (``stride_viz.data.models.train_lm``) applied
to a GPT-2 initialised from ``recipe["seed"]``: the same seed and schedule for every subset,
so subsets differ only in their data. The tokenizer is trained once on the whole pool and
kept fixed (it is not what the LDS measures).

The noise ceiling: ``fill_noise`` retrains the first subsets again with other recipe seeds
(initial weights and batch order) into ``GT_DIR/noise/seed-<s>.jsonl``; the LDS of one seed's
losses as predictions of another's (``stats.noise_ceiling``) is the scale of training noise, a
reference for the methods' LDS (not a hard limit: see its docstring).

    python -m stride_viz.evaluation.retrain GT_DIR [--shard 0/2] [--threads 1]
    python -m stride_viz.evaluation.retrain GT_DIR --noise-seeds 1,2 --noise-subsets 8
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from stride_viz.evaluation import metrics as ev
from stride_viz.data.pools import Pool, Query, make_pool
from stride_viz.progress import StageTimer, no_progress, print_progress
from stride_viz.data.tokenize import encode, sequence_losses

__all__ = ["draw_subsets", "query_losses", "init_model", "train_recipe", "prepare", "fill", "open_inputs",
           "RECIPE_KEYS", "fill_noise", "read_noise", "NOISE_DIR"]

RECIPE_KEYS = ("n_layer", "n_embd", "n_head", "n_positions", "epochs", "batch_size", "lr",
               "max_length", "seed")
LOSS_DOC = "mean next-token cross-entropy over the completion tokens, nats"


def draw_subsets(n_pool: int, n_subsets: int, fraction: float, seed: int) -> list[np.ndarray]:
    """M' sorted index arrays, each ``round(fraction * n_pool)`` distinct pool indices.

    Subset j depends only on (seed, j), so every shard draws the same subsets."""
    if not 0 < fraction < 1:
        raise ValueError(f"The 'fraction' parameter must be in (0, 1). Got {fraction!r} instead.")
    if n_subsets < 3:
        raise ValueError(f"The 'n_subsets' parameter must be >= 3 (LDS ranks subsets). "
                         f"Got {n_subsets!r} instead.")
    size = max(1, round(fraction * n_pool))
    return [np.sort(np.random.default_rng([seed, j]).choice(n_pool, size=size, replace=False))
            for j in range(n_subsets)]


@torch.no_grad()
def query_losses(model, tokenizer, queries: Sequence[Query], max_length: int,
                 batch_size: int = 64) -> np.ndarray:
    """float64 (n_queries,): each query's mean completion loss (nats) under ``model``."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(queries), batch_size):
        qs = queries[start:start + batch_size]
        enc = encode(tokenizer, [q.prompt for q in qs], [q.completion or "" for q in qs],
                     max_length, device=device)
        logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
        out.append(sequence_losses(logits, enc.input_ids, enc.loss_mask).double().cpu())
    return torch.cat(out).numpy()


def init_model(recipe: dict, tokenizer):
    """The recipe's GPT-2 before training: initialised from ``recipe['seed']``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    missing = [k for k in RECIPE_KEYS if k not in recipe]
    if missing:
        raise ValueError(f"The recipe lacks {', '.join(missing)}; it needs {', '.join(RECIPE_KEYS)}.")
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=recipe["n_positions"],
                        n_embd=recipe["n_embd"], n_layer=recipe["n_layer"], n_head=recipe["n_head"],
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe["seed"])
        return GPT2LMHeadModel(config)


def train_recipe(recipe: dict, tokenizer, pool: Pool, progress: Callable = no_progress, model=None):
    """A GPT-2 initialised from ``recipe['seed']`` and trained with ``train_lm`` on ``pool``
    (``model``: that initial model, made by ``init_model``, when the caller wants to watch it
    train)."""
    from stride_viz.data.models import train_lm

    model = init_model(recipe, tokenizer) if model is None else model
    return train_lm(model, tokenizer, pool, epochs=recipe["epochs"], batch_size=recipe["batch_size"],
                    lr=recipe["lr"], seed=recipe["seed"],
                    max_length=min(recipe["max_length"], recipe["n_positions"]), progress=progress)


def prepare(gt_dir: str | Path, pool: Pool, queries: Sequence[Query], tokenizer, recipe: dict,
            n_subsets: int = 64, fraction: float = 0.3, seed: int = 0) -> Path:
    """Write the metadata, the pool and the tokenizer of a ground truth (refuses a directory
    prepared with other settings)."""
    gt_dir = Path(gt_dir)
    for q in queries:
        if q.completion is None:
            raise ValueError(f"Query {q.id!r} has no completion; the ground truth needs a fixed "
                             f"completion per query.")
    meta = {"pool": {"spec": pool.name, "hash": pool.hash, "n": len(pool)},
            "queries": [{"id": q.id, "prompt": q.prompt, "completion": q.completion} for q in queries],
            "recipe": {"architecture": "gpt2-from-scratch", "trainer": "stride_viz.data.models.train_lm",
                       **{k: recipe[k] for k in RECIPE_KEYS}},
            "seed": seed, "fraction": fraction, "n_subsets": n_subsets, "loss": LOSS_DOC}
    ev.write_metadata(gt_dir, meta)
    if not (gt_dir / "pool.jsonl").exists():
        with open(gt_dir / "pool.jsonl", "w") as f:
            for i in range(len(pool)):
                f.write(json.dumps({"id": pool.ids[i], "prompt": pool.prompts[i],
                                    "completion": pool.completions[i]}) + "\n")
    if not (gt_dir / "tokenizer").exists():
        tokenizer.save_pretrained(gt_dir / "tokenizer")
    return gt_dir


def open_inputs(gt_dir: str | Path):
    """(metadata, pool, queries, tokenizer) of a prepared ground-truth directory."""
    from transformers import AutoTokenizer

    gt_dir = Path(gt_dir)
    meta = ev.read_metadata(gt_dir)
    rows = [json.loads(line) for line in (gt_dir / "pool.jsonl").read_text().splitlines() if line]
    pool = make_pool(meta["pool"]["spec"], [r["id"] for r in rows], [r["prompt"] for r in rows],
                     [r["completion"] for r in rows])
    if pool.hash != meta["pool"]["hash"]:
        raise ev.GroundTruthError(f"{gt_dir}/pool.jsonl does not match the metadata's pool hash "
                                  f"({pool.hash} != {meta['pool']['hash']}).")
    queries = [Query(id=q["id"], prompt=q["prompt"], completion=q["completion"]) for q in meta["queries"]]
    tokenizer = AutoTokenizer.from_pretrained(gt_dir / "tokenizer")
    return meta, pool, queries, tokenizer


def fill(gt_dir: str | Path, shard: tuple[int, int] = (0, 1), limit: Optional[int] = None,
         progress: Callable = no_progress, should_stop: Callable[[], bool] = lambda: False) -> int:
    """Retrain the missing subsets of this shard; returns how many were added.

    shard (i, n): this process takes subsets j with j % n == i; limit: stop after this many."""
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"The 'shard' parameter must be i/n with 0 <= i < n. Got {i}/{n} instead.")
    gt_dir = Path(gt_dir)
    meta, pool, queries, tokenizer = open_inputs(gt_dir)
    subsets = draw_subsets(len(pool), meta["n_subsets"], meta["fraction"], meta["seed"])
    done = ev.done_subsets(gt_dir)
    todo = [j for j in range(len(subsets)) if j % n == i and j not in done]
    if limit is not None:
        todo = todo[:limit]
    part = gt_dir / f"part-{i}-of-{n}.jsonl"
    timer = StageTimer("retrain", len(todo), progress, min_interval=0.0)
    recipe = meta["recipe"]
    for count, j in enumerate(todo):
        if should_stop():
            break
        model = train_recipe(recipe, tokenizer, pool.subset(subsets[j]))
        losses = query_losses(model, tokenizer, queries, recipe["max_length"])
        ev.append_result(part, j, subsets[j], losses)
        timer.update(count + 1, f"subset {j}: mean query loss {losses.mean():.3f} nats", force=True)
    return len(todo)


NOISE_DIR = "noise"


def fill_noise(gt_dir: str | Path, seeds: Sequence[int], n_subsets: int,
               progress: Callable = no_progress, should_stop: Callable[[], bool] = lambda: False) -> int:
    """The noise ceiling's retrains: subsets 0..n_subsets-1 of the ground truth trained again
    with the recipe's ``seed`` (initial weights and batch order) set to each of ``seeds``, one
    line per subset in ``GT_DIR/noise/seed-<s>.jsonl`` (the part-file format; outside the
    ground truth's own parts). Resumes like ``fill``; returns how many were added."""
    gt_dir = Path(gt_dir)
    meta, pool, queries, tokenizer = open_inputs(gt_dir)
    if not 1 <= n_subsets <= meta["n_subsets"]:
        raise ValueError(f"The 'n_subsets' parameter must be in [1, {meta['n_subsets']}]. Got {n_subsets!r} instead.")
    if meta["recipe"]["seed"] in seeds:
        raise ValueError(f"The noise seeds must differ from the ground truth's own seed "
                         f"{meta['recipe']['seed']}; got {list(seeds)}.")
    subsets = draw_subsets(len(pool), meta["n_subsets"], meta["fraction"], meta["seed"])
    todo = []
    for s in seeds:
        done = ev.read_part(gt_dir / NOISE_DIR / f"seed-{s}.jsonl")
        todo += [(s, j) for j in range(n_subsets) if j not in done]
    (gt_dir / NOISE_DIR).mkdir(exist_ok=True)
    timer = StageTimer("noise retrain", len(todo), progress, min_interval=0.0)
    for count, (s, j) in enumerate(todo):
        if should_stop():
            break
        model = train_recipe({**meta["recipe"], "seed": s}, tokenizer, pool.subset(subsets[j]))
        losses = query_losses(model, tokenizer, queries, meta["recipe"]["max_length"])
        ev.append_result(gt_dir / NOISE_DIR / f"seed-{s}.jsonl", j, subsets[j], losses)
        timer.update(count + 1, f"seed {s} subset {j}: mean query loss {losses.mean():.3f} nats", force=True)
    return len(todo)


def read_noise(gt_dir: str | Path) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """The noise retrains: seed -> (subset indices (k,), query losses (k, n_queries)), rows
    sorted by subset index; {} when there are none."""
    out = {}
    for part in sorted((Path(gt_dir) / NOISE_DIR).glob("seed-*.jsonl")):
        rows = ev.read_part(part)
        js = sorted(rows)
        out[int(part.stem.split("-", 1)[1])] = (np.array(js, dtype=np.int64),
                                                np.array([rows[j] for j in js], dtype=np.float64))
    return out


def _main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stride_viz.evaluation.retrain", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gt_dir", help="a ground-truth directory prepared by benchmarks/lds.py or prepare()")
    ap.add_argument("--shard", default="0/1", help="i/n: take the subsets j with j %% n == i")
    ap.add_argument("--limit", type=int, default=None, help="stop after this many subsets")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--noise-seeds", default="",
                    help="comma-separated recipe seeds: retrain the first --noise-subsets subsets "
                         "with each (the noise ceiling) instead of filling the ground truth")
    ap.add_argument("--noise-subsets", type=int, default=8)
    a = ap.parse_args(argv)
    try:
        i, n = (int(x) for x in a.shard.split("/"))
    except ValueError:
        ap.error(f"--shard must look like 0/2; got {a.shard!r}")
    torch.set_num_threads(a.threads)
    t0 = time.monotonic()
    if a.noise_seeds:
        try:
            seeds = [int(x) for x in a.noise_seeds.split(",") if x]
        except ValueError:
            ap.error(f"--noise-seeds must be comma-separated integers; got {a.noise_seeds!r}")
        added = fill_noise(a.gt_dir, seeds, a.noise_subsets, progress=print_progress)
        print(f"added {added} noise retrains in {time.monotonic() - t0:.0f} s")
        return
    added = fill(a.gt_dir, (i, n), a.limit, progress=print_progress)
    print(f"added {added} retrained subsets in {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    _main()
