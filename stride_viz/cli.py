"""Command-line interface: ``python -m stride_viz <command> --help``.

    python -m stride_viz train-model --pool fortunes+facts --out models/tiny --preset tiny
    python -m stride_viz fit --model models/tiny --pool fortunes+facts --run runs/demo
    torchrun --standalone --nproc_per_node 2 -m stride_viz fit --model models/tiny --pool fortunes+facts --run-dir runs/demo
    python -m stride_viz attribute --run runs/demo --prompt "The capital of Vorlandia is" --out out/
    python -m stride_viz demo

Every bad input exits with status 2 and one line on stderr that says what to fix; results
already on disk are never touched by a failed command.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from stride_viz.config import ConfigError, FitConfig, RecoveryConfig, help_of
from stride_viz.progress import Cancelled, print_progress

__all__ = ["main", "build_parser"]

_FIT_FLAGS = ("subsets", "per_example", "rank", "layer", "mode", "inner_rank", "vocabulary", "solver",
              "damping", "seed",
              "epochs", "batch_size", "lr", "warmup", "stability_weight", "linearity_weight",
              "max_length", "tokens_per_example", "fidelity_temperature", "linearity_every", "probe_queries",
              "linearity_operators", "cache", "cache_memory_mb", "precision", "checkpoint_every",
              "keep_checkpoint", "device")
# settings that do not change a fit's result: allowed when `fit --run` continues a run alone
_RESUME_FLAGS = ("checkpoint_every", "keep_checkpoint", "cache", "cache_memory_mb", "precision", "device")
_RECOVERY_FLAGS = ("selection", "cv_folds", "target_nonzeros", "path_length", "eps")


def _add_config_flags(parser: argparse.ArgumentParser, cls: type, names: Sequence[str]) -> None:
    defaults = cls()
    for f in dataclasses.fields(cls):
        if f.name not in names:
            continue
        default = getattr(defaults, f.name)
        kind = {int: int, float: float, bool: _boolean}.get(type(default), str)
        if f.name == "layer":
            kind = int
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None,
                            help=f"{help_of(cls, f.name)} (default: {default})")


def _boolean(text: str) -> bool:
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


def _config_from(args: argparse.Namespace, cls: type, names: Sequence[str]):
    values = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    return cls(**values)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stride_viz",
                                description="STRIDE training-data attribution: which training "
                                            "examples made the model say this?")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train-model", help="train the built-in demo model (tokenizer + GPT-2) on a pool")
    t.add_argument("--pool", required=True, help="pool file, folder or built-in name (fortunes, fortunes+facts)")
    t.add_argument("--out", required=True, help="folder to save the model in (save_pretrained)")
    t.add_argument("--preset", default="tiny", choices=["tiny", "small"], help="model size (default: tiny)")
    t.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")

    f = sub.add_parser("fit", help="design the subsets and train the steering operators (stages 1-2)")
    f.add_argument("--model", help="hub id, local folder, or demo / demo:tiny / demo:small "
                                   "(leave out with --pool to continue the run in --run)")
    f.add_argument("--pool", help="pool file, folder or built-in name")
    f.add_argument("--run-dir", "--run", dest="run", required=True,
                   help="run directory (created, or resumed if it exists); under torchrun write "
                        "--run-dir: torchrun's own parser rejects --run")
    f.add_argument("--restart", action="store_true",
                   help="discard the run's checkpoints and operators and fit from step 0 "
                        "(run.json, the pool, the design and the attributions are kept)")
    f.add_argument("--wait", action="store_true",
                   help="when another process is fitting this run, wait for it (and reuse its "
                        "result) instead of refusing")
    f.add_argument("--limit", type=int, default=None, help="use only the first N pool examples")
    f.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    _add_config_flags(f, FitConfig, _FIT_FLAGS)

    a = sub.add_parser("attribute", help="explain queries with a fitted run (stages 3-4)")
    a.add_argument("--run", "--run-dir", dest="run", required=True, help="a fitted run directory")
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--queries", help="JSONL file: prompt, optional completion and id per line")
    src.add_argument("--prompt", help="one query prompt")
    src.add_argument("--query-id", action="append", dest="query_id", metavar="ID",
                     help="a query this run has explained already, by id (repeatable): with --per-token, "
                          "adds its per-token scores and keeps the rest of its attribution")
    a.add_argument("--completion", help="the completion to explain (default: the model's greedy continuation)")
    a.add_argument("--out", required=True, help="folder for scores.npy, responses.npy, topk.csv, paths/")
    a.add_argument("--top", type=int, default=10, help="examples per sign in topk.csv (default: 10)")
    a.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    a.add_argument("--no-continuations", action="store_true", help="skip the base/steered continuations")
    a.add_argument("--per-token", action="store_true",
                   help="also score the training examples for each completion token on its own (one "
                        "recovery per token; tokens.npz in the run, topk_tokens.csv and tokens/ in --out)")
    _add_config_flags(a, RecoveryConfig, _RECOVERY_FLAGS)

    d = sub.add_parser("demo", help="built-in model + fortunes+facts pool, fitted and explained end to end")
    d.add_argument("--preset", default="tiny", choices=["tiny", "small"], help="demo model size (default: tiny)")
    d.add_argument("--run", default=None, help="run directory (default: under $STRIDE_VIZ_HOME/runs)")
    d.add_argument("--queries", type=int, default=None, help="explain only the first N fact queries")
    _add_config_flags(d, FitConfig, _FIT_FLAGS)

    from stride_viz.downstream.audit import AuditConfig
    au = sub.add_parser("audit", help="contamination audit: flag pool documents whose scores are extreme "
                                      "across a benchmark's queries")
    au.add_argument("--run", "--run-dir", dest="run", required=True, help="a fitted run directory")
    au.add_argument("--queries", required=True, help="the benchmark: JSONL with prompt, completion (optional) "
                                                    "and id (optional) per line")
    au.add_argument("--out", required=True, help="new folder for audit.json, flagged.csv, scores.npy, statistic.npy")
    au.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    _add_config_flags(au, AuditConfig, [f.name for f in dataclasses.fields(AuditConfig)])
    _add_config_flags(au, RecoveryConfig, _RECOVERY_FLAGS)

    s = sub.add_parser("select", help="data selection: rank the pool by influence on a target set, keep a budget")
    s.add_argument("--run", "--run-dir", dest="run", required=True, help="a fitted run directory")
    s.add_argument("--queries", required=True, help="target examples: JSONL/CSV/TXT with 'text', or 'prompt' "
                                                   "and 'completion' (optional 'id')")
    s.add_argument("--budget", required=True, help="examples to keep: a number (200), a fraction (0.1) or a "
                                                  "percentage (10%%)")
    s.add_argument("--out", required=True, help="selection file (.jsonl); a .summary.json is written next to it")
    s.add_argument("--aggregate", default="mean", choices=["mean", "positive-sum", "backprojection"],
                   help="how each example's scores over the targets are combined (default: mean)")
    s.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    _add_config_flags(s, RecoveryConfig, _RECOVERY_FLAGS)
    return p


# ---------------------------------------------------------------------------- commands
def _train_model(args: argparse.Namespace) -> None:
    from stride_viz.data.models import train_demo_model
    from stride_viz.data.pools import load_pool
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} exists and is not empty; choose a new folder so that "
                          "nothing there is overwritten.")
    path = train_demo_model(load_pool(args.pool), out, preset=args.preset, seed=args.seed,
                            progress=print_progress)
    print(path)


def _fit(args: argparse.Namespace) -> None:
    from stride_viz.engine import Stride
    from stride_viz.data.models import load_model
    from stride_viz.data.pools import load_pool
    from stride_viz.method import distributed
    from stride_viz.progress import no_progress
    config = _config_from(args, FitConfig, _FIT_FLAGS)
    # under torchrun: one GPU per process, and rank 0 alone reports
    config = dataclasses.replace(config, device=distributed.local_device(config.device))
    progress = print_progress if distributed.is_writer() else no_progress
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be at least 1. Got {args.limit} instead.")
    try:
        if args.model is None and args.pool is None:
            run = _continue_run(args, config)
        elif args.model is None or args.pool is None:
            raise ConfigError("Give both --model and --pool (to create or reuse a run), or neither "
                              "(to continue the run in --run with the settings of its run.json).")
        else:
            pool = load_pool(args.pool, limit=args.limit)
            model = load_model(args.model, device=config.device, trust_remote_code=args.trust_remote_code)
            run = Stride.create_or_open(args.run, model, pool, config)
        run.fit(progress=progress, wait=args.wait, restart=args.restart)
    finally:
        distributed.close()  # leave a torchrun launch's process group (nothing for one process)
    if distributed.is_writer():
        print(run.store.root)


def _continue_run(args: argparse.Namespace, config: FitConfig):
    """``fit --run R`` alone: the model, pool and settings come from R (repaired if damaged)."""
    from stride_viz.engine import Stride
    fixed = [n for n in _FIT_FLAGS if n not in _RESUME_FLAGS and getattr(args, n, None) is not None]
    if fixed or args.limit is not None:
        names = ", ".join("--" + n.replace("_", "-") for n in fixed + (["limit"] if args.limit else []))
        raise ConfigError(f"{names} can only be given with --model and --pool: a run's settings "
                          f"are fixed in {Path(args.run) / 'run.json'}; leave them out to continue it.")
    run = Stride.open(args.run, device=config.device, trust_remote_code=args.trust_remote_code,
                      repair=True)
    run.config = dataclasses.replace(run.config, checkpoint_every=config.checkpoint_every)
    return run


def _queries_from(args: argparse.Namespace):
    from stride_viz.data.pools import Query, load_queries
    if args.queries:
        return load_queries(args.queries)
    if args.completion is not None and args.completion == "":
        raise ConfigError("--completion is empty: give the text to explain, or leave the flag out "
                          "to let the model complete the prompt.")
    return [Query("q0", args.prompt, args.completion)]


def write_outputs(out: Path, run, attributions, top: int) -> None:
    """scores.npy (Q, n) float32, responses.npy (Q, K) float32, topk.csv, paths/<query>.npz."""
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "scores.npy", np.stack([a.scores for a in attributions]).astype(np.float32))
    np.save(out / "responses.npy", np.stack([a.responses for a in attributions]).astype(np.float32))
    (out / "paths").mkdir(exist_ok=True)
    for a in attributions:
        src = a.folder / "path.npz"
        (out / "paths" / f"{a.folder.name}.npz").write_bytes(src.read_bytes())
    pool = run.pool
    with open(out / "topk.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["query_id", "rank", "example_id", "score", "text"])
        for a in attributions:
            for sign in (1, -1):
                for rank, i in enumerate(a.top(top, sign), start=1):
                    if a.scores[i] * sign <= 0:
                        break
                    w.writerow([a.query.id, sign * rank, pool.ids[i], f"{a.scores[i]:.6g}", pool.text(i)])
    (out / "queries.json").write_text(json.dumps([a.info for a in attributions], indent=1))


def _attribute(args: argparse.Namespace) -> None:
    from stride_viz.engine import Stride
    if args.top < 1:
        raise ConfigError(f"--top must be at least 1. Got {args.top} instead.")
    recovery = _config_from(args, RecoveryConfig, _RECOVERY_FLAGS)
    if args.query_id:
        if not args.per_token:
            raise ConfigError("--query-id adds per-token scores to queries this run has explained: give "
                              "--per-token too (to explain a new query, use --prompt or --queries).")
        attributions, run = _add_tokens(args)
    else:
        queries = _queries_from(args)
        run = Stride.open(args.run, device=args.device)
        attributions = run.attribute(queries, recovery, progress=print_progress,
                                     continuations=not args.no_continuations, per_token=args.per_token)
    write_outputs(Path(args.out), run, attributions, args.top)
    _print_top(run, attributions, min(args.top, 5))
    if args.per_token:
        write_token_outputs(Path(args.out), run, attributions, args.top)
        _print_token_top(run, attributions, 3)
    print(f"wrote {args.out}/scores.npy, responses.npy, topk.csv, paths/"
          + (", topk_tokens.csv, tokens/" if args.per_token else ""))


def _add_tokens(args: argparse.Namespace):
    """``attribute --query-id ID --per-token``: per-token scores for explained queries."""
    from stride_viz.engine import Stride
    from stride_viz.storage import RunStore
    known = RunStore(args.run).query_ids()
    missing = [i for i in args.query_id if i not in known]
    if missing:
        raise ConfigError(f"The run {args.run} has no attribution for --query-id "
                          f"{', '.join(map(repr, missing))}; its queries: "
                          f"{', '.join(known[:10]) or 'none'}{' ...' if len(known) > 10 else ''}.")
    run = Stride.open(args.run, device=args.device)
    out = []
    for n, query_id in enumerate(dict.fromkeys(args.query_id)):
        out.append(run.attribute_tokens(query_id))
        print_progress("tokens", (n + 1) / len(args.query_id), None, f"per-token scores of {query_id}")
    return out, run


def write_token_outputs(out: Path, run, attributions, top: int) -> None:
    """topk_tokens.csv (query_id, token_index, token, rank, example_id, score, text; score in
    nats of that token's loss) and tokens/<query>.npz (each query's tokens.npz)."""
    (out / "tokens").mkdir(parents=True, exist_ok=True)
    pool = run.pool
    with open(out / "topk_tokens.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["query_id", "token_index", "token", "rank", "example_id", "score", "text"])
        for a in attributions:
            (out / "tokens" / f"{a.folder.name}.npz").write_bytes((a.folder / "tokens.npz").read_bytes())
            for t, token in enumerate(a.info["tokens"]):
                row = a.tokens.token_scores(t)
                for sign in (1, -1):
                    for rank, i in enumerate(a.tokens.top(t, top, sign), start=1):
                        w.writerow([a.query.id, t, token, sign * rank, pool.ids[i], f"{row[i]:.6g}", pool.text(i)])


def _print_token_top(run, attributions, n: int) -> None:
    print("\nper token: score = nats of that token's loss removed by training on the example")
    for a in attributions:
        print(f"query {a.query.id}:")
        for t, token in enumerate(a.info["tokens"]):
            row = a.tokens.token_scores(t)
            best = ", ".join(f"{run.pool.ids[i]} {row[i]:+.3f}" for i in a.tokens.top(t, n, 1))
            print(f"  token {t} {token!r}: {best or 'no proponent at its chosen lambda'}")


def _print_top(run, attributions, n: int) -> None:
    for a in attributions:
        print(f"\nquery {a.query.id}: {a.query.prompt!r} -> {a.query.completion!r}")
        print("  score = nats of completion loss removed by training on the example "
              "(+ helps, - hurts)")
        for i in a.top(n, 1):
            if a.scores[i] <= 0:
                break
            print(f"  +{a.scores[i]:.4f}  {run.pool.ids[i]:>16}  {run.pool.text(i)[:80]!r}")


def _select(args: argparse.Namespace) -> None:
    from stride_viz.downstream.select import run_select
    summary = run_select(args.run, args.queries, args.budget, args.out, args.aggregate,
                         _config_from(args, RecoveryConfig, _RECOVERY_FLAGS), device=args.device,
                         progress=print_progress)
    print(f"kept {summary['budget']} of {summary['n_pool']} examples ({summary['aggregate']}); wrote "
          f"{args.out} and {Path(summary['summary_file']).name}")


def _audit(args: argparse.Namespace) -> None:
    from stride_viz.data.pools import load_queries
    from stride_viz.downstream.audit import AuditConfig, run_audit
    config = _config_from(args, AuditConfig, [f.name for f in dataclasses.fields(AuditConfig)])
    recovery = _config_from(args, RecoveryConfig, _RECOVERY_FLAGS)
    result = run_audit(args.run, load_queries(args.queries), args.out, config, recovery, device=args.device,
                       progress=print_progress, name=Path(args.queries).name)
    print(f"{len(result.flagged)} of {len(result.statistic)} documents flagged "
          f"(statistic {config.statistic}, outlier z >= {config.threshold:g}):")
    for d in result.documents[:10]:
        if d["flagged"]:
            e = d["evidence"][0]
            print(f"  #{d['rank']} {d['id']}: score {e['score']:+.4g} (z {e['z']:.1f}) on query {e['query_id']} (rank {e['rank']}, "
                  f"{e['overlap']['share']:.0%} of its words)  {d['text'][:60]!r}")
    print(f"wrote {args.out}/audit.json, flagged.csv, scores.npy, statistic.npy")


def _demo(args: argparse.Namespace) -> None:
    from stride_viz.demo import run_demo
    config = _config_from(args, FitConfig, _FIT_FLAGS)
    run_demo(preset=args.preset, config=config, run_dir=args.run, n_queries=args.queries,
             progress=print_progress, echo=print)


# ---------------------------------------------------------------------------- entry point
def _user_errors() -> tuple[type, ...]:
    from stride_viz.engine import QueryError, RunMismatch
    from stride_viz.data.models import ModelError
    from stride_viz.data.pools import PoolError
    from stride_viz.method.recovery import RecoveryError
    from stride_viz.integrity import DiskFull, RunDamaged
    from stride_viz.runlock import RunLocked
    from stride_viz.method.distributed import PeerFailed
    return (ConfigError, PoolError, ModelError, QueryError, RunMismatch, RecoveryError,
            RunDamaged, DiskFull, RunLocked, PeerFailed, FileNotFoundError, NotADirectoryError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    command = {"train-model": _train_model, "fit": _fit, "attribute": _attribute,
               "demo": _demo, "select": _select, "audit": _audit}[args.command]
    try:
        command(args)
    except Cancelled as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted: the fit's last checkpoint is kept; run the same command to resume",
              file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - user errors become one line, the rest a traceback
        if isinstance(e, _user_errors()):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    return 0
