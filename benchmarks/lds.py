"""LDS benchmark of STRIDE against its peers: the built-in demo setting, or any pool.

**Any pool, the committed defaults** (item 7 of issue 10)::

    python benchmarks/lds.py --pool POOL [--queries QUERIES.jsonl] --retrains 32 --seed 0 \
        --work DIR --out RESULT.json --methods stride,ekfac,tfidf

builds the ground truth on POOL (any ``stride_viz.data.pools.load_pool`` spec: a .jsonl/.csv/
.txt file, a ``datasets`` folder or a built-in name) with the project's recipe (``RECIPE``: a
byte-level BPE tokenizer of ``VOCAB`` tokens trained on the pool, a GPT-2 trained from scratch
on the whole pool, and ``--retrains`` more trained on random 30% subsets, ``--seed`` drawing the
subsets), then runs every named method with its committed defaults (STRIDE: the engine's
``FitConfig()``/``RecoveryConfig()``; peers: ``baselines.default_settings`` with
``PEER_SETTINGS``), nothing tuned on that pool, and writes RESULT.json in the schema of
``benchmarks/results/lds.json`` (``methods.<name>.lds_mean, lds_std, lds_per_query, times,
settings``, the test-split statistics ``test`` and ``vs_stride``) with the wall time of every
step. QUERIES.jsonl holds one ``{"prompt", "completion", "id"}`` per line (a completion is
required); without ``--queries``, ``N_HELDOUT_GENERAL`` documents of the pool (seeded by
``--seed``) are held out of it and become the queries (prompt = their first three words,
completion = the rest; a prompt/completion pair is used as it is), plus the pool's planted-fact
queries if it has any. The development/test split of the queries (``metrics.query_split``)
is written into the ground truth's metadata. Every step resumes: rerunning the command skips
what DIR already holds. Method names: stride, ekfac, trak, logra, tracin, tfidf, repsim,
random (and if-arnoldi).

**The demo setting** (the committed ``benchmarks/results/lds.json``): one command builds (or
reuses) everything, in steps that each skip what is already done:

1. prepare: the pool (built-in ``fortunes+facts`` minus held-out fortunes), >=100 queries
   (held-out fortunes split into prompt/completion, and every planted-fact query), a
   byte-level BPE tokenizer and the training recipe -> a ground-truth directory;
2. model: the GPT-2 trained from scratch on the whole pool with that recipe;
3. retrain: the ground truth, >=64 models retrained on random 30% subsets (resumable; more
   processes can help: ``python -m stride_viz.evaluation.retrain GT_DIR --shard 1/2``);
4. noise: the first ``N_NOISE_SUBSETS`` subsets retrained with each of ``NOISE_SEEDS`` as the
   recipe's seed (``retrain.fill_noise``, files under ``GT_DIR/noise/``): the noise ceiling,
   the LDS one seed's retrained losses reach as predictions of another's;
5. methods: every peer in ``stride_viz.evaluation.baselines`` and STRIDE (engine defaults), one process
   per method so that peak memory is per method; scores saved as .npy;
6. twin: every method again on the random-weight twin of the model (``retrain.init_model``:
   the recipe's GPT-2 as initialised, never trained), and each tuned method's choice
   (``tuning_choices``: lds.json's tuning) with its settings, a TRAK ensemble member
   ``seed:N`` being the recipe's model as initialised from seed N, never trained; compressed
   scores committed in ``benchmarks/results/lds_scores_twin/`` (a choice as
   ``METHOD-NAME.npz``); ``--methods`` may name the defaults and the choices;
7. report: every method's scores, compressed (float16, rows scaled), into the committed
   ``benchmarks/results/lds_scores/<method>.npz``; ``benchmarks/results/lds.json`` (LDS
   computed from those files, on all queries and on each side of the fixed development/test
   split, with the statistics of ``stride_viz.evaluation.stats`` on the test queries) and
   ``benchmarks/results/lds.png`` (test queries), with ``noise_ceiling`` and ``twin`` (each
   method's twin LDS next to its trained LDS). A report on a ground truth of another recipe
   than the previous report's carries none of its numbers over (its failures and ablation
   are kept under ``earlier_ground_truth``).
   A method whose scores are gone (an earlier run's) keeps its entry from the previous report.

**Tuning** (issue 10, items 2-3): ``--steps tune`` scores every setting of the plan ``TUNING``
(STRIDE, EK-FAC, TRAK and LoGra, the same number of settings each, the committed default
first) that has no scores yet, round by round with the methods in turn; the report's
``tuning`` then lists every setting with its development LDS, each method's choice (the best
mean development LDS) and the choices' statistics on the test queries (against STRIDE's
choice). ``--variant PEER:NAME=JSON`` adds a peer variant outside the plan (run as method
``PEER:NAME``), as ``--variant NAME=JSON`` does for STRIDE.

    python benchmarks/lds.py                      # everything
    python benchmarks/lds.py --steps tune,report  # the tuning plan, then the report
    python benchmarks/lds.py --steps retrain      # only some steps
    python benchmarks/lds.py --methods trak,tfidf # only some methods
    python benchmarks/lds.py --stats-only         # lds.json again from the committed files only

Where things go: the ground truth and the compressed scores (committed) in benchmarks/results/;
the model, the STRIDE run and the float32 scores in benchmarks/work/ (gitignored).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stride_viz.evaluation import metrics as ev  # noqa: E402
from stride_viz.evaluation import stats  # noqa: E402
from stride_viz.evaluation.baselines import GRADIENT_METHODS, METHODS  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / "work"
GT_DIR = RESULTS / "lds_ground_truth"
MODEL_DIR = WORK / "lds_model"
SCORES = WORK / "lds_scores"
COMMITTED_SCORES = RESULTS / "lds_scores"
RUN_DIR = WORK / "lds_stride_run"

# 10 epochs (was 2): the held-out query loss of a 30% subset's model falls from 6.39 to 5.75
# nats (benchmarks/results/lds_loss_curve.json; 5.66 after 12, so not fully plateaued); one
# retraining takes ~20-35 s on a shared 2-core CPU, 64 of them ~30 min.
RECIPE = dict(n_layer=2, n_embd=64, n_head=4, n_positions=64, epochs=10.0, batch_size=32,
              lr=3e-3, max_length=64, seed=0)
VOCAB = 2048
N_HELDOUT = 80
N_SUBSETS = 64
FRACTION = 0.3
ALL_METHODS = ("stride",) + METHODS
# The benchmark's settings for peers where they differ from baselines.default_settings: the
# library's own documented heuristics, not values tuned here (LDS_PEER_SETTINGS overrides).
PEER_SETTINGS = {"ekfac": {"damping_factor": None}}  # kronfluence: 0.1 x mean eigenvalue
# Seeds torch before each method: kronfluence's EK-FAC samples labels (true Fisher) and
# differs from run to run otherwise.
TORCH_SEED = 0
# the general command: queries held out of the pool when no --queries file is given
N_HELDOUT_GENERAL = 60
GENERAL_METHODS = ("stride", "ekfac", "trak", "logra", "tracin", "tfidf", "repsim", "random",
                   "if-arnoldi")
# bootstrap resamples of the statistics (stride_viz.evaluation.stats), fixed seed
N_BOOT = 2000
STATS_SEED = 0


@dataclass(frozen=True)
class Layout:
    """Where one benchmark keeps its ground truth, model, STRIDE run and float32 scores;
    ``overrides``: a JSON file of per-method settings differing from the committed defaults
    (the general command's --settings; None for the demo)."""

    gt: Path
    model: Path
    scores: Path
    run: Path
    overrides: Optional[Path] = None

    def method_overrides(self) -> dict:
        if self.overrides is None or not self.overrides.exists():
            return {}
        return json.loads(self.overrides.read_text())


DEMO = Layout(GT_DIR, MODEL_DIR, SCORES, RUN_DIR)
# the random-weight twin of the demo's model: the recipe's GPT-2 as initialised, never trained
# (same shape, tokenizer and initial weights as the trained model), scored by every method
TWIN = Layout(GT_DIR, WORK / "lds_model_twin", WORK / "lds_scores_twin", WORK / "lds_stride_run_twin")
COMMITTED_TWIN_SCORES = RESULTS / "lds_scores_twin"
# the noise ceiling: the first N_NOISE_SUBSETS subsets retrained with each of NOISE_SEEDS
NOISE_SEEDS = (1,)
N_NOISE_SUBSETS = 8


def work_layout(work: Path) -> Layout:
    """The general command's layout: everything under its --work directory."""
    work = Path(work)
    return Layout(work / "ground_truth", work / "model", work / "scores", work / "stride_run",
                  work / "settings.json")


def _log(msg: str) -> None:
    print(f"[lds {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_inputs(seed: int = 0):
    """(pool, queries): fortunes+facts minus N_HELDOUT fortunes; those fortunes (prompt = the
    first three words, completion = the rest) and the fact queries are the queries."""
    from stride_viz.data.pools import Query, fact_queries, load_pool

    full = load_pool("fortunes+facts")
    sources = {s for f in full.facts for s in f.source_ids}
    rng = np.random.default_rng(seed)
    candidates = [i for i in range(len(full)) if full.ids[i] not in sources
                  and not full.prompts[i] and len(full.completions[i].split()) >= 6]
    held = set(rng.choice(candidates, size=N_HELDOUT, replace=False).tolist())
    pool = full.subset([i for i in range(len(full)) if i not in held])
    queries = []
    for i in sorted(held):
        words = full.completions[i].split(" ")
        queries.append(Query(id=f"heldout-{full.ids[i]}", prompt=" ".join(words[:3]),
                             completion=" " + " ".join(words[3:])))
    return pool, queries + fact_queries(pool)


def step_prepare() -> None:
    from stride_viz.data.models import train_tokenizer
    from stride_viz.evaluation.retrain import prepare

    if (GT_DIR / "metadata.json").exists():
        _log(f"ground truth prepared already: {GT_DIR}")
        return
    pool, queries = build_inputs()
    tok = train_tokenizer([pool.text(i) for i in range(len(pool))], VOCAB)
    prepare(GT_DIR, pool, queries, tok, RECIPE, n_subsets=N_SUBSETS, fraction=FRACTION, seed=0)
    _log(f"prepared {GT_DIR}: pool {len(pool)}, queries {len(queries)}")


def step_model(L: Layout = DEMO) -> None:
    from stride_viz.evaluation.retrain import open_inputs, train_recipe

    if (L.model / "config.json").exists():
        _log(f"model exists: {L.model}")
        return
    meta, pool, queries, tok = open_inputs(L.gt)
    t0 = time.monotonic()
    model = train_recipe(meta["recipe"], tok, pool)
    L.model.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(L.model)
    tok.save_pretrained(L.model)
    (L.model / "train_seconds.txt").write_text(f"{time.monotonic() - t0:.1f}\n")
    _log(f"model trained in {time.monotonic() - t0:.0f} s -> {L.model}")


def step_retrain(L: Layout = DEMO) -> int:
    from stride_viz.progress import print_progress
    from stride_viz.evaluation.retrain import fill

    return fill(L.gt, (0, 1), progress=print_progress)


def step_noise() -> int:
    """The noise ceiling's retrains (``retrain.fill_noise``): N_NOISE_SUBSETS subsets again
    with each of NOISE_SEEDS as the recipe's seed."""
    from stride_viz.progress import print_progress
    from stride_viz.evaluation.retrain import fill_noise

    return fill_noise(GT_DIR, NOISE_SEEDS, N_NOISE_SUBSETS, progress=print_progress)


def step_twin_model() -> None:
    """The random-weight twin: ``retrain.init_model`` of the ground truth's recipe, saved."""
    from stride_viz.data.models import weights_hash
    from stride_viz.evaluation.retrain import init_model, open_inputs

    if (TWIN.model / "config.json").exists():
        _log(f"twin exists: {TWIN.model}")
        return
    meta, _, _, tok = open_inputs(GT_DIR)
    model = init_model(meta["recipe"], tok)
    TWIN.model.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(TWIN.model)
    tok.save_pretrained(TWIN.model)
    _log(f"random-weight twin (weights {weights_hash(model)}) -> {TWIN.model}")


VARIANTS = WORK / "lds_variants.json"

# Tuning (issue 10, items 2-3): the methods whose settings are chosen on the development
# queries, each with the same number of settings tried, the first being the committed default.
# A setting is (name, spec, round): STRIDE's spec {"fit": {...}, "recovery": {...}} overrides
# FitConfig()/RecoveryConfig(); a peer's overrides its benchmark settings (PEER_SETTINGS on
# baselines.default_settings). Round 1 was fixed before any variant was scored; round 2 was
# added after reading round 1's development LDS (and nothing else). The setting with the best
# mean development LDS is each method's choice; only the choices are reported on the test
# queries (``tuning`` in lds.json). ``--steps tune`` runs what is missing, round by round and
# method by method in turn, so that a stopped run leaves every method with as many settings.
TUNING: dict[str, list[tuple[str, dict, int]]] = {
    # round 2, from round 1's development LDS: K 2048 and T 2 did not help STRIDE, and exact
    # responses through its design keep 97% of EK-FAC's LDS (benchmarks/lds_diagnosis.py), so
    # the operators are what to train more; EK-FAC's best damping lies between 1e-8 and the
    # heuristic; TRAK gained from a larger projection and from a second model; LoGra from
    # every tenfold rise of its damping. Round 3, from rounds 1-2: STRIDE gained from 6 epochs
    # (not from lr 3e-2), EK-FAC's heuristic stayed best (1e-4 and the empirical Fisher lost),
    # TRAK gained most from more models (3 > 2 > 1), LoGra peaked near damping 0.1 (1 and 10
    # lost). Round 4, from rounds 1-3 and benchmarks/lds_diagnosis.py (development queries
    # only): STRIDE's operators were what lost LDS, and Gauss-Newton influence in the
    # operators' own logit space, through STRIDE's design and Lasso, kept it; so STRIDE's
    # operators in closed form (solver 'gauss-newton', its damping as the help text says).
    # For the same budget every peer got one more setting: EK-FAC a damping between its two
    # best (1e-6, the heuristic) and the nearest lower one that lost (1e-8), TRAK more models
    # (its gain every time), LoGra the damping below its plateau (0.1 to 0.3). Round 5, from
    # rounds 1-4 (development LDS only; two settings each): STRIDE's closed form had its
    # first rank and K; its rank (8 -> 32: the PCA basis holds more of the gradient; on the
    # demo model's planted facts, not LDS data, recall@10 rose 0.90 -> 0.97) and its K (1024
    # -> 2048: the diagnosis's exact responses kept 0.529 at K 1024 and all 0.546 at K 2048).
    # EK-FAC the two untried dampings next to its best (1e-6, flat down to 1e-7, 1e-4 lost):
    # 3e-6 and 1e-5. TRAK more models again (12) and a larger projection at its 8 models
    # (1024; 2048 helped at 1 and 2 models). LoGra its projection, never tried, at the two
    # dampings of its plateau (0.1, 0.3): 96 x 96 = 9216 (128 x 128 = 16384 was tried first
    # and stopped: after 15 minutes, 7 of its 9 layer inverses, it held 22.4 of this
    # machine's 24 GB; its Hessians grow as proj_dim squared, so 9216 needs about a third).
    "stride": [("default", {}, 1),
               ("k2048", {"fit": {"subsets": 2048}}, 1),
               ("t2", {"fit": {"fidelity_temperature": 2.0}}, 1),
               ("e6", {"fit": {"epochs": 6.0}}, 2),
               ("lr3e-2", {"fit": {"lr": 3e-2}}, 2),
               ("e12", {"fit": {"epochs": 12.0}}, 3),
               ("gn", {"fit": {"solver": "gauss-newton"}}, 4),
               ("gn-r32", {"fit": {"solver": "gauss-newton", "rank": 32}}, 5),
               ("gn-k2048", {"fit": {"solver": "gauss-newton", "subsets": 2048}}, 5)],
    "ekfac": [("default", {}, 1),                               # damping: kronfluence's heuristic
              ("d1e-8", {"damping_factor": 1e-8}, 1),           # kronfluence's ScoreArguments() default
              ("d1e-2", {"damping_factor": 1e-2}, 1),
              ("d1e-4", {"damping_factor": 1e-4}, 2),
              ("efisher", {"use_empirical_fisher": True}, 2),   # observed labels, heuristic damping
              ("d1e-6", {"damping_factor": 1e-6}, 3),
              ("d1e-7", {"damping_factor": 1e-7}, 4),
              ("d3e-6", {"damping_factor": 3e-6}, 5),
              ("d1e-5", {"damping_factor": 1e-5}, 5)],
    # batch_size only sets how many gradients dattri projects at once (its CPU projector
    # regenerates the random matrix per batch): 256 is faster, the scores are the same
    "trak": [("default", {}, 1),                                # proj_dim 512, one model
             ("p2048", {"proj_dim": 2048, "batch_size": 256}, 1),
             ("ens2", {"checkpoints": ["seed:1"], "batch_size": 256}, 1),
             ("p2048ens2", {"proj_dim": 2048, "checkpoints": ["seed:1"], "batch_size": 256}, 2),
             ("ens3", {"checkpoints": ["seed:1", "seed:2"], "batch_size": 256}, 2),
             ("ens5", {"checkpoints": ["seed:1", "seed:2", "seed:3", "seed:4"], "batch_size": 256}, 3),
             ("ens8", {"checkpoints": [f"seed:{s}" for s in range(1, 8)], "batch_size": 256}, 4),
             ("ens12", {"checkpoints": [f"seed:{s}" for s in range(1, 12)], "batch_size": 256}, 5),
             ("p1024ens8", {"proj_dim": 1024, "checkpoints": [f"seed:{s}" for s in range(1, 8)],
                            "batch_size": 256}, 5)],
    "logra": [("default", {}, 1),                               # damping 1e-5 x mean eigenvalue
              ("d1e-3", {"damping": 1e-3}, 1),
              ("d1e-1", {"damping": 1e-1}, 1),
              ("d1", {"damping": 1.0}, 2),
              ("d10", {"damping": 10.0}, 2),
              ("d3e-1", {"damping": 0.3}, 3),
              ("d3e-2", {"damping": 3e-2}, 4),
              ("d1e-1p9216", {"damping": 0.1, "proj_dim": 9216}, 5),
              ("d3e-1p9216", {"damping": 0.3, "proj_dim": 9216}, 5)],
}
TUNED_METHODS = tuple(TUNING)


def tuning_name(method: str, name: str) -> str:
    """The method name a tuning setting is run and reported as ('default': the method itself)."""
    return method if name == "default" else f"{method}:{name}"


def _tuning_specs() -> dict[str, dict]:
    return {tuning_name(m, n): spec for m, rows in TUNING.items() for n, spec, _ in rows}


def tuning_order() -> list[str]:
    """The tuning plan's methods to run: round by round, and within a round the methods in
    turn (stride, ekfac, trak, logra, stride, ...). A default whose committed scores exist is
    not run again (the report reads them)."""
    rounds = sorted({r for rows in TUNING.values() for _, _, r in rows})
    order = [tuning_name(m, rows[k][0]) for r in rounds for k in range(max(map(len, TUNING.values())))
             for m, rows in TUNING.items() if k < len(rows) and rows[k][2] == r]
    return [m for m in order if ":" in m or not (COMMITTED_SCORES / f"{m}.npz").exists()]


def parse_variant(text: str) -> tuple[str, dict]:
    """``--variant`` text -> (method name, spec). 'NAME=JSON' or 'stride:NAME=JSON': a STRIDE
    variant ({"fit": {...}, "recovery": {...}}); 'PEER:NAME=JSON' (PEER one of
    baselines.METHODS): the peer with these settings on top of its benchmark settings. Raises
    ValueError (one line) on anything else."""
    from stride_viz.config import ConfigError, FitConfig, RecoveryConfig
    from stride_viz.evaluation.baselines import default_settings

    name, eq, body = text.partition("=")
    base, colon, short = name.partition(":")
    if not colon:
        base, short = "stride", name
    if not eq or not short or not all(c.isalnum() or c in "-_." for c in short):
        raise ValueError(f"--variant must be NAME=JSON or METHOD:NAME=JSON (NAME of letters, digits, "
                         f"'-', '_', '.'); got {text!r}.")
    if base not in ALL_METHODS:
        raise ValueError(f"--variant {name!r}: unknown method {base!r}; choose from {', '.join(ALL_METHODS)}.")
    try:
        spec = json.loads(body)
    except json.JSONDecodeError as e:
        raise ValueError(f"--variant {name!r}: the settings are not JSON ({e}).")
    if not isinstance(spec, dict):
        raise ValueError(f"--variant {name!r}: the settings must be a JSON object; got {body!r}.")
    if base == "stride":
        bad = sorted(set(spec) - {"fit", "recovery"})
        if bad:
            raise ValueError(f"--variant {name!r}: STRIDE's settings are {{\"fit\": {{...}}, "
                             f"\"recovery\": {{...}}}}; got key(s) {bad}.")
        try:
            FitConfig(**spec.get("fit", {})), RecoveryConfig(**spec.get("recovery", {}))
        except (ConfigError, TypeError) as e:
            raise ValueError(f"--variant {name!r}: {e}")
    else:
        known = default_settings(base)
        bad = sorted(set(spec) - set(known))
        if bad:
            raise ValueError(f"--variant {name!r}: unknown setting(s) {bad} of {base}; known: "
                             f"{', '.join(sorted(k for k in known if k != 'library_defaults'))}.")
    return f"{base}:{short}", spec


def _registered() -> dict:
    """Variants registered with --variant (benchmarks/work/lds_variants.json): STRIDE's under
    their NAME (as earlier sessions wrote them), peers' under 'PEER:NAME'."""
    return json.loads(VARIANTS.read_text()) if VARIANTS.exists() else {}


def _spec(method: str) -> dict:
    """The spec of a variant method 'BASE:NAME': the tuning plan's, else a registered one."""
    specs = _tuning_specs()
    if method in specs:
        return specs[method]
    reg = _registered()
    base, _, short = method.partition(":")
    return reg[short] if base == "stride" and short in reg else reg[method]


def _variant(method: str) -> tuple[dict, dict]:
    """FitConfig and RecoveryConfig overrides of 'stride' (defaults) or 'stride:<name>'
    (an ablation registered with --variant, or a setting of the tuning plan)."""
    if method in ("stride", "stride:backprojection"):
        return {}, {}
    spec = _spec(method)
    return spec.get("fit", {}), spec.get("recovery", {})


def _ensemble_model(seed: int, trained: bool = True) -> Path:
    """A TRAK ensemble member: the recipe's model trained on the whole pool with another seed
    (WORK/lds_model_seed<seed>, trained once, about a minute), or, for the random-weight twin
    (``trained`` False), the recipe's model as initialised from ``seed`` (``retrain.init_model``),
    never trained, like the twin itself (WORK/lds_model_twin_seed<seed>)."""
    from stride_viz.evaluation.retrain import init_model, open_inputs, train_recipe

    base = MODEL_DIR if trained else TWIN.model
    path = base.with_name(f"{base.name}_seed{seed}")
    if not (path / "config.json").exists():
        meta, pool, _, tok = open_inputs(GT_DIR)
        recipe = {**meta["recipe"], "seed": seed}
        model = train_recipe(recipe, tok, pool) if trained else init_model(recipe, tok)
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        _log(f"{'ensemble' if trained else 'twin ensemble'} member (recipe seed {seed}"
             f"{'' if trained else ', never trained'}) -> {path}")
    return path


def peer_settings(method: str, L: "Layout") -> tuple[str, dict]:
    """(base method, settings over baselines.default_settings) of a peer or a peer variant
    'PEER:NAME': PEER_SETTINGS, then LDS_PEER_SETTINGS, then the general command's
    --settings, then the variant's spec. A TRAK checkpoint 'seed:S' is the recipe's model
    trained with seed S (``_ensemble_model``); on the random-weight twin (``L`` is TWIN), the
    recipe's model as initialised from seed S, never trained."""
    base = method.split(":", 1)[0]
    over = {**PEER_SETTINGS.get(base, {}),
            **json.loads(os.environ.get("LDS_PEER_SETTINGS", "{}")).get(base, {}),
            **L.method_overrides().get(base, {})}
    if method != base:
        over.update(_spec(method))
    if over.get("checkpoints"):
        over["checkpoints"] = [_rel(_ensemble_model(int(c.split(":", 1)[1]), trained=L is not TWIN))
                               if str(c).startswith("seed:")
                               else c for c in over["checkpoints"]]
    return base, over


def _fit_query(q, tokenizer, max_tokens: int):
    """The query as the ground truth scored it: texts longer than the model's context were cut
    to ``max_tokens`` tokens (BOS included) there, so cut the completion the same way here
    (the engine refuses over-long queries instead of cutting them)."""
    from stride_viz.data.pools import Query

    p = tokenizer(q.prompt, add_special_tokens=False)["input_ids"] if q.prompt else []
    c = tokenizer(q.completion, add_special_tokens=False)["input_ids"]
    room = max_tokens - 1 - len(p)
    if len(c) <= room:
        return q
    return Query(id=q.id, prompt=q.prompt, completion=tokenizer.decode(c[:room]))


def _stride_scores(method: str, L: Layout = DEMO) -> dict:
    """STRIDE (engine defaults, or an ablation variant): fit (one-off), then every query."""
    from stride_viz.evaluation.baselines import PeakRss
    from stride_viz.config import FitConfig, RecoveryConfig
    from stride_viz.engine import Stride
    from stride_viz.data.models import load_model
    from stride_viz.evaluation.retrain import open_inputs

    import hashlib

    _, pool, queries, _ = open_inputs(L.gt)
    lm = load_model(str(L.model), device="cpu")
    if L is DEMO or L is TWIN:  # the twin runs the defaults and the tuning choices
        fit_over, rec_over = _variant(method)
    else:  # the general command: the committed defaults, unless --settings changed them
        over = L.method_overrides().get("stride", {})
        fit_over, rec_over = over.get("fit", {}), over.get("recovery", {})
    config, recovery = FitConfig(**fit_over), RecoveryConfig(**rec_over)
    # one run directory per fit setting: variants that change only the recovery share a fit
    run_dir = L.run if not fit_over else L.run.with_name(
        L.run.name + "-" + hashlib.sha1(json.dumps(fit_over, sort_keys=True).encode()).hexdigest()[:8])
    queries = [_fit_query(q, lm.tokenizer, config.max_length) for q in queries]
    with PeakRss() as rss:
        t0 = time.perf_counter()
        run = Stride.create_or_open(run_dir, lm, pool, config)
        run.fit()
        fit = time.perf_counter() - t0
        t0 = time.perf_counter()
        atts = run.attribute(queries, recovery, continuations=False)
        per = (time.perf_counter() - t0) / len(queries)
    scores = np.stack([a.scores for a in atts]).astype(np.float32)
    fit_state = json.loads((run_dir / "fit" / "state.json").read_text())
    # a resumed or reused fit took its time in an earlier process: report the recorded time
    fit = max(fit, float(fit_state.get("seconds", 0.0)))
    return {"scores": scores, "seconds_fit": fit, "seconds_per_query": per, "peak_rss_mb": rss.peak_mb,
            "settings": {"fit": config.to_dict(), "recovery": recovery.to_dict(),
                         "overrides": {"fit": fit_over, "recovery": rec_over},
                         "note": "engine defaults (FitConfig(), RecoveryConfig()) + overrides"}}


def _backprojection(queries, L: Layout = DEMO) -> dict:
    """STRIDE's fast estimate (no Lasso): w_i = (1/d) sum_{k containing i} (y_k - mean y), read
    from the default run's attributions (run 'stride' first)."""
    rows = [np.load(L.run / "attributions" / q.id / "backprojection.npy") for q in queries]
    info = json.loads((L.scores / "stride.json").read_text())
    return {"scores": np.stack(rows).astype(np.float32), "seconds_fit": info["seconds_fit"],
            "seconds_per_query": info["seconds_per_query"], "peak_rss_mb": info["peak_rss_mb"],
            "settings": {**info["settings"], "note": "back-projection of the default run's "
                         "responses instead of the Lasso (times: the default run's, an upper bound)"}}


def run_one_method(method: str, L: Layout = DEMO) -> None:
    """Worker (own process): compute one method's scores and save them."""
    import torch

    torch.set_num_threads(int(os.environ.get("LDS_THREADS", "1")))
    torch.manual_seed(TORCH_SEED)
    from stride_viz.evaluation.retrain import open_inputs

    meta, pool, queries, _ = open_inputs(L.gt)
    if method == "stride:backprojection":
        out = _backprojection(queries, L)
    elif method.startswith("stride"):
        out = _stride_scores(method, L)
    else:
        from stride_viz.evaluation.baselines import run_method
        from stride_viz.data.models import load_model

        lm = load_model(str(L.model), device="cpu")
        # e.g. LDS_PEER_SETTINGS='{"if-arnoldi": {"precompute_data_ratio": 0.1}}'
        base, over = peer_settings(method, L)
        res = run_method(base, lm.model, lm.tokenizer, pool, queries,
                         max_length=meta["recipe"]["max_length"], settings=over)
        out = {"scores": res.scores, **res.summary()}
        out["settings"] = {**out["settings"], "torch_seed": TORCH_SEED,
                           "differs_from_default_settings": over}
    L.scores.mkdir(parents=True, exist_ok=True)
    np.save(L.scores / f"{method}.npy", out.pop("scores"))
    (L.scores / f"{method}.json").write_text(json.dumps(out, indent=1, default=str))


def step_methods(methods, force: bool = False, timeout: float = 3600, L: Layout = DEMO,
                 work: Optional[Path] = None) -> None:
    """Each method in its own process (``--worker``); ``work``: the general command's --work
    directory (None: the demo). A method's wall time (process start to scores saved) is added
    to its .json as ``wall_seconds``."""
    SCORES = L.scores
    for m in methods:
        if (SCORES / f"{m}.npy").exists() and not force:
            _log(f"{m}: scores exist, skipped")
            continue
        _log(f"{m}: running")
        t0 = time.monotonic()
        try:
            cmd = ([sys.executable, __file__, "--worker", m] + (["--work", str(work)] if work else [])
                   + (["--twin"] if L is TWIN else []))
            proc = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            SCORES.mkdir(parents=True, exist_ok=True)
            (SCORES / f"{m}.failed").write_text(f"timeout: did not finish within {timeout:.0f} s\n")
            _log(f"{m}: TIMEOUT after {timeout:.0f} s")
            continue
        if proc.returncode != 0:
            err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            # the exception line, not a progress bar printed after it
            errs = [ln for ln in err if ("Error" in ln or "Exception" in ln or "Failed" in ln)
                    and not ln.startswith(" ")]
            msg = (errs or err or [f"exit code {proc.returncode}"])[-1]
            if proc.returncode == -9 and not errs:
                msg = ("killed by signal 9 (on this machine: the kernel's out-of-memory killer; "
                       "see dmesg)")
            (SCORES / f"{m}.stderr.txt").parent.mkdir(parents=True, exist_ok=True)
            (SCORES / f"{m}.stderr.txt").write_text(proc.stderr[-20000:])
            SCORES.mkdir(parents=True, exist_ok=True)
            (SCORES / f"{m}.failed").write_text(msg + "\n")
            _log(f"{m}: FAILED ({msg})")
        else:
            (SCORES / f"{m}.failed").unlink(missing_ok=True)
            info = json.loads((SCORES / f"{m}.json").read_text())
            info["wall_seconds"] = round(time.monotonic() - t0, 1)
            (SCORES / f"{m}.json").write_text(json.dumps(info, indent=1, default=str))
            _log(f"{m}: done in {time.monotonic() - t0:.0f} s")


def _ensure_split(gt_dir: Path) -> None:
    """Write the development/test split into a ground truth's metadata if it lacks one (the
    demo's was prepared before the split was recorded; the rule is the same)."""
    path = gt_dir / "metadata.json"
    meta = json.loads(path.read_text())
    if "split" in meta:
        return
    meta["split"] = stats.split_metadata([q["id"] for q in meta["queries"]])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(path)
    _log(f"recorded the development/test split in {path}")


def step_report(committed_only: bool = False) -> dict:
    """lds.json from the ground truth and the scores: the work folder's float32 scores (saved
    to the committed .npz first), else the committed .npz; ``committed_only``: the committed
    files alone (what a fresh clone holds; no method is run, the work folder is not read)."""
    load_start = os.getloadavg()
    _ensure_split(GT_DIR)
    gt = ev.read_ground_truth(GT_DIR)
    meta = gt.metadata
    queries = meta["queries"]
    from stride_viz.evaluation.retrain import open_inputs

    _, pool, _, _ = open_inputs(GT_DIR)
    from stride_viz.data.pools import load_pool

    # planted facts: relevant pool indices of each fact query (by id, through the full pool)
    facts = {f.query.id: f.source_ids for f in load_pool("fortunes+facts").facts}
    fact_rows = [q for q, item in enumerate(queries) if item["id"] in facts]
    # restricted to the ids in the ground truth's own pool: facts added to the built-in pool
    # later must not change this benchmark
    in_pool = set(pool.ids)
    relevant = [[pool.index_of(s) for s in facts[queries[q]["id"]] if s in in_pool] for q in fact_rows]
    heldout_rows = [q for q in range(len(queries)) if q not in set(fact_rows)]
    ids = [item["id"] for item in queries]
    dev = stats.development_mask(meta)
    is_fact = np.isin(np.arange(len(queries)), fact_rows)
    groups = {"heldout": ~is_fact, "facts": is_fact}
    previous = _previous_methods()
    previous_report = _previous_report()
    previous_setting = previous_report.get("setting", {})
    earlier_gt = None
    if previous_setting and previous_setting.get("recipe") != meta["recipe"]:
        # the previous report scored another ground truth: none of its numbers carry over (its
        # committed score files are other models' scores); its failures and ablation are kept,
        # labelled, under "earlier_ground_truth"
        earlier_gt = {"recipe": previous_setting.get("recipe"),
                      "note": "measured on the earlier ground truth (its recipe above), not "
                              "comparable with this report's numbers; kept for the record",
                      "failed": {m: r for m, r in previous.items() if r["status"] != "ok"},
                      "ablation": previous_report.get("ablation", []),
                      "lds_mean_test": {m: r.get("lds_mean_test") for m, r in previous.items()
                                        if r["status"] == "ok" and m in ALL_METHODS}}
        previous = {}
    methods, loaded = {}, {}
    # STRIDE's ablation variants and every method's tuning settings ('METHOD:NAME')
    variants = sorted({p.stem for ext in ("npy", "failed") for p in SCORES.glob(f"*:*.{ext}")
                       if p.stem.split(":", 1)[0] in ALL_METHODS}
                      if SCORES.exists() and not committed_only else [])
    for m in dict.fromkeys(list(ALL_METHODS) + variants + list(previous)):
        old, failed = previous.get(m), SCORES / f"{m}.failed"
        committed = COMMITTED_SCORES / f"{m.replace(':', '-')}.npz"
        if (SCORES / f"{m}.npy").exists() and not committed_only:
            # LDS from the committed (16-bit) copy, so that the repository reproduces lds.json
            scores = ev.save_scores(committed, ev.load_scores(SCORES / f"{m}.npy", len(ids)), ids)
            info = json.loads((SCORES / f"{m}.json").read_text())
        elif old and old.get("scores_file") == _rel(committed) and committed.exists():
            # e.g. a fresh clone: the committed scores and what the previous report said of their run
            scores = ev.load_scores(committed, len(ids), ids)
            info = {k: old[k] for k in ("seconds_fit", "seconds_per_query", "peak_rss_mb", "settings",
                                        "wall_seconds") if k in old}
        elif failed.exists() and not committed_only and not (old and old["status"] == "ok"):
            methods[m] = {"status": "failed", "error": failed.read_text().strip(),
                          "settings": _settings_of(m)}
            continue
        elif old:
            methods[m] = _carried(old, None if committed_only else failed)
            continue
        else:
            continue
        res = ev.lds(scores, gt.train_subsets, gt.test_loss)
        loaded[m] = scores
        methods[m] = {"status": "ok", **res.to_dict(),
                      "lds_mean_heldout": float(res.per_query[heldout_rows].mean()),
                      "lds_mean_facts": float(res.per_query[fact_rows].mean()),
                      **ev.split_means(res.per_query, dev, groups),
                      "recall_at_10": ev.recall_at_k(scores[fact_rows], relevant, 10),
                      "mrr": ev.mrr(scores[fact_rows], relevant)}
        for side, mask in (("test", ~dev), ("dev", dev)):
            keep = [k for k, q in enumerate(fact_rows) if mask[q]]
            rows, rel = [fact_rows[k] for k in keep], [relevant[k] for k in keep]
            methods[m][f"recall_at_10_{side}"] = ev.recall_at_k(scores[rows], rel, 10)
            methods[m][f"mrr_{side}"] = ev.mrr(scores[rows], rel)
        methods[m].update({**info, "scores_file": _rel(committed)})
    for m, r in (earlier_gt or {}).get("failed", {}).items():
        if m not in methods:
            methods[m] = {**r, "not_rerun": "not rerun on this ground truth: the failure recorded on "
                                            "the earlier one (see earlier_ground_truth)"}
    old, new = previous.get("stride"), methods.get("stride")
    if old and new and old["status"] == new["status"] == "ok" and old.get("settings") != new.get("settings"):
        # the defaults changed (their scores file now holds the new ones): keep the earlier
        # defaults' numbers as a row of the ablation, the reference of the variants run with them
        methods["stride:previous-defaults"] = _carried({**old, "scores_file": None}, failed=None)
    for r in methods.values():
        if r["status"] == "ok" and "lds_mean_test" not in r:  # entries of earlier reports
            r.update(ev.split_means(r["lds_per_query"], dev, groups))
    # the statistics of the methods (not of every ablation variant), on the test queries
    _log("statistics (bootstrap over queries and over retrained subsets, Wilcoxon)")
    for m, entry in method_statistics({m: s for m, s in loaded.items() if m in ALL_METHODS},
                                      gt, dev, groups).items():
        methods[m].update(entry)
    report = {
        "what": "Linear Datamodeling Score (Spearman, per query, between the sum of a method's "
                "scores over a retrained subset and minus the query's loss under the model "
                "retrained on it; higher is better, 0 = no information), planted-fact recall@10 "
                "and MRR (fact queries only), wall time (one-off fit, and per query amortised "
                "over a batch of all queries) and peak resident memory of the method's process.",
        "setting": {"pool": meta["pool"], "n_queries": len(queries), "n_fact_queries": len(fact_rows),
                    "n_heldout_queries": len(heldout_rows), "n_subsets": len(gt.train_subsets),
                    "fraction": meta.get("fraction"), "recipe": meta["recipe"],
                    "loss": meta.get("loss"),
                    "model_train_seconds": (_read_float(MODEL_DIR / "train_seconds.txt")
                                            or previous_setting.get("model_train_seconds")),
                    "machine": "2 shared CPU cores, torch threads 1 per method",
                    "split": {"rule": "stride_viz.evaluation.metrics.query_split(query ids): settings "
                                      "are chosen on the development queries, results reported on "
                                      "the test queries",
                              "n_dev": int(dev.sum()), "n_test": int((~dev).sum()),
                              "n_dev_facts": int((dev & is_fact).sum()),
                              "n_test_facts": int((~dev & is_fact).sum())},
                    "query_group": ["facts" if f else "heldout" for f in is_fact]},
        "command": _command(),
        "machine_load": _machine(load_start),
        "statistics": STATISTICS_DOC,
        "ground_truth": str(GT_DIR.relative_to(ROOT)),
        "scores": str(COMMITTED_SCORES.relative_to(ROOT)) + "/<method>.npz (metrics.load_scores)",
        "methods": methods,
        "target": target_check(methods, dev),
        "ablation": ablation_table(methods, dev),
    }
    report["tuning"] = tuning_report(methods, loaded, gt, dev, groups)
    if report["tuning"].get("target"):
        report["target"]["tuned"] = report["tuning"]["target"]
    report["noise_ceiling"] = noise_report(gt, loaded, dev, groups)
    report["twin"] = twin_report(gt, methods, dev, groups, ids, fact_rows, relevant, committed_only,
                                 choices=tuning_choices(report))
    report["setting"]["retrained_loss"] = retrained_loss(gt, dev, committed_only)
    if earlier_gt is not None:
        report["earlier_ground_truth"] = earlier_gt
    elif "earlier_ground_truth" in previous_report:
        report["earlier_ground_truth"] = previous_report["earlier_ground_truth"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lds.json").write_text(json.dumps(report, indent=1))
    _plot(report, ~dev)
    _log(f"wrote {RESULTS / 'lds.json'}")
    for m, r in methods.items():
        if r["status"] == "ok" and ":" in m:  # a variant: its development LDS (what it is chosen on)
            _log(f"{m:11s} LDS dev {r['lds_mean_dev']:+.3f} (held-out {r['lds_mean_dev_heldout']:+.3f} / "
                 f"facts {r['lds_mean_dev_facts']:+.3f})  fit {r['seconds_fit']:.1f}s  per query "
                 f"{r['seconds_per_query']:.3f}s")
        elif r["status"] == "ok":
            _log(f"{m:11s} LDS test {r['lds_mean_test']:+.3f} ± {r['lds_std_test']:.3f} "
                 f"(held-out {r['lds_mean_test_heldout']:+.3f} / facts {r['lds_mean_test_facts']:+.3f}), "
                 f"dev {r['lds_mean_dev']:+.3f}, all {r['lds_mean']:+.3f}  recall@10 {r['recall_at_10']:.2f}"
                 f"  MRR {r['mrr']:.2f}  fit {r['seconds_fit']:.1f}s  per query {r['seconds_per_query']:.3f}s"
                 + ("" if r.get("scores_file") else "  (earlier run, scores not kept)"))
        else:
            _log(f"{m:11s} FAILED: {r['error']}")
    return report


def paired_difference(a: list, b: list) -> dict:
    """Mean of the per-query differences a - b and its standard error (queries paired)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return {"mean": float(d.mean()), "stderr": float(d.std(ddof=1) / np.sqrt(d.size))}


def target_check(methods: dict, dev: np.ndarray) -> dict:
    """STRIDE (defaults) against the best peer library method by mean LDS on the test queries
    (dev: bool (n_queries,), True = development query)."""
    peers = {m: r for m, r in methods.items() if m in GRADIENT_METHODS and r["status"] == "ok"}
    stride = methods.get("stride")
    if not peers or not stride or stride["status"] != "ok":
        return {}
    best = max(peers, key=lambda m: peers[m]["lds_mean_test"])
    test = ~dev
    diff = paired_difference(np.asarray(stride["lds_per_query"])[test],
                             np.asarray(peers[best]["lds_per_query"])[test])
    return {"queries": "test", "best_peer": best, "best_peer_lds": peers[best]["lds_mean_test"],
            "stride_lds": stride["lds_mean_test"], "stride_minus_best_peer": diff,
            "target": "stride_lds >= best_peer_lds",
            "met": stride["lds_mean_test"] >= peers[best]["lds_mean_test"]}


def ablation_table(methods: dict, dev: np.ndarray) -> list[dict]:
    """Every STRIDE variant: how its recorded settings differ from today's defaults, its LDS
    (all queries, and the development queries on which settings are chosen), and its paired
    difference to the defaults' LDS; best on the development queries first. A variant of an
    earlier run lists under ``not_recorded`` the settings its record lacks (those of the code
    it ran with)."""
    from stride_viz.config import FitConfig, RecoveryConfig

    base_fit, base_rec = FitConfig().to_dict(), RecoveryConfig().to_dict()
    ref = methods.get("stride")
    rows = []
    for m, r in methods.items():
        if not m.startswith("stride") or r["status"] != "ok":
            continue
        fit, rec = r["settings"].get("fit", {}), r["settings"].get("recovery", {})
        changes = {k: v for k, v in fit.items() if k != "device" and base_fit.get(k) != v}
        changes.update({f"recovery.{k}": v for k, v in rec.items() if base_rec.get(k) != v})
        if m == "stride:backprojection":
            changes["recovery"] = "back-projection instead of the Lasso"
        row = {"method": m, "changes_from_defaults": changes,
               "not_recorded": sorted(k for k in base_fit if k != "device" and k not in fit),
               "scores_kept": bool(r.get("scores_file")),
               "lds_mean": r["lds_mean"], "lds_std": r["lds_std"], "lds_mean_heldout": r["lds_mean_heldout"],
               "lds_mean_facts": r["lds_mean_facts"], "lds_mean_dev": r["lds_mean_dev"],
               "lds_std_dev": r["lds_std_dev"], "lds_mean_dev_heldout": r["lds_mean_dev_heldout"],
               "lds_mean_dev_facts": r["lds_mean_dev_facts"], "seconds_fit": r["seconds_fit"],
               "seconds_per_query": r["seconds_per_query"]}
        if ref and ref["status"] == "ok" and m != "stride":
            a, b = np.asarray(r["lds_per_query"]), np.asarray(ref["lds_per_query"])
            row["minus_defaults"] = paired_difference(a, b)
            row["minus_defaults_dev"] = paired_difference(a[dev], b[dev])
        rows.append(row)
    return sorted(rows, key=lambda row: -row["lds_mean_dev"])


def choose_settings(methods: dict, dev: np.ndarray) -> dict:
    """Per tuned method (TUNING): every setting tried, with its development LDS (mean, std, by
    query group, paired difference to the method's default on the development queries) and
    its cost, and the choice: the best mean development LDS (ties: the earlier setting). Only
    development numbers are read. methods: lds.json's entries; dev: bool (n_queries,)."""
    dev = np.asarray(dev, dtype=bool)
    out = {}
    for base, rows in TUNING.items():
        ref = methods.get(base) if (methods.get(base) or {}).get("status") == "ok" else None
        entries = []
        for name, spec, rnd in rows:
            m = tuning_name(base, name)
            r = methods.get(m)
            e = {"name": name, "method": m, "round": rnd, "changes": spec,
                 "status": r["status"] if r else "not run"}
            if r and r["status"] == "ok":
                e.update({k: r.get(k) for k in ("lds_mean_dev", "lds_std_dev", "lds_mean_dev_heldout",
                                                "lds_mean_dev_facts", "seconds_fit", "seconds_per_query")})
                if ref is not None and m != base:
                    a, b = np.asarray(r["lds_per_query"])[dev], np.asarray(ref["lds_per_query"])[dev]
                    e["minus_default_dev"] = paired_difference(a, b)
            elif r:
                e["error"] = r.get("error")
            entries.append(e)
        ok = [e for e in entries if e["status"] == "ok"]
        best = max(ok, key=lambda e: e["lds_mean_dev"]) if ok else None  # max keeps the first of ties
        out[base] = {"settings": entries, "n_settings": len(rows), "n_scored": len(ok),
                     "chosen": best["method"] if best else None,
                     "chosen_changes": best["changes"] if best else None,
                     "seconds": round(sum((e.get("seconds_fit") or 0.0) + (e.get("seconds_per_query") or 0.0)
                                          * int(len(dev)) for e in ok), 1)}
    return out


def tuning_report(methods: dict, loaded: dict, gt, dev: np.ndarray, groups: dict) -> dict:
    """lds.json's ``tuning``: the settings of every tuned method and their development LDS
    (``choose_settings``), then the chosen setting of each on the test queries with the
    statistics of ``method_statistics`` against the chosen STRIDE, and the target on them."""
    choice = choose_settings(methods, dev)
    n_scored = {b: c["n_scored"] for b, c in choice.items()}
    chosen = {b: c["chosen"] for b, c in choice.items() if c["chosen"] in loaded}
    out = {"what": "every tuned method's settings, each scored on the development queries only; the best "
                   "mean development LDS is the method's choice, and only the choices are reported on the "
                   "test queries (statistics as in 'statistics', vs_stride: against STRIDE's choice)",
           "rule": "choice = argmax over the method's settings of the mean LDS on the development queries",
           "budget": {"settings_per_method": n_scored, "equal": len(set(n_scored.values())) == 1,
                      "rounds": "round 1 fixed before any setting was scored; each later round chosen after "
                                "reading the earlier rounds' development LDS only",
                      "plan": "benchmarks/lds.py TUNING"},
           "methods": choice}
    if "stride" not in chosen:
        return out
    st_ = method_statistics({b: loaded[m] for b, m in chosen.items()}, gt, dev, groups)
    test = {}
    for b, m in chosen.items():
        r = methods[m]
        test[b] = {"status": "ok", "method": m, "changes": choice[b]["chosen_changes"],
                   "lds_mean_test": r["lds_mean_test"], "lds_mean_test_heldout": r["lds_mean_test_heldout"],
                   "lds_mean_test_facts": r["lds_mean_test_facts"], "recall_at_10_test": r.get("recall_at_10_test"),
                   **st_[b]}
    out["test"] = test
    peers = [b for b in test if b != "stride"]
    if peers:
        best = max(peers, key=lambda b: test[b]["lds_mean_test"])
        v = test[best]["vs_stride"]
        out["target"] = {"queries": "test", "settings": "each method's choice on the development queries",
                         "best_peer": best, "best_peer_method": test[best]["method"],
                         "best_peer_lds": test[best]["lds_mean_test"], "stride_method": test["stride"]["method"],
                         "stride_lds": test["stride"]["lds_mean_test"],
                         "best_peer_minus_stride": {k: v[k] for k in ("mean_difference", "ci_queries",
                                                                       "ci_subsets", "wilcoxon_p")},
                         "groups": {g: {k: gv[k] for k in ("mean_difference", "ci_queries", "ci_subsets")}
                                    for g, gv in v.get("groups", {}).items()},
                         "target": "stride_lds >= best_peer_lds",
                         "met": test["stride"]["lds_mean_test"] >= test[best]["lds_mean_test"]}
    return out


def tuning_choices(report: Optional[dict] = None) -> dict:
    """{base method: chosen setting's method name} of the tuned methods whose choice (on the
    development queries, ``choose_settings``) is not the default, read from a report's
    ``tuning`` (default: the committed lds.json). The twin step runs these besides the
    defaults."""
    report = _previous_report() if report is None else report
    return {b: c["chosen"] for b, c in (report.get("tuning") or {}).get("methods", {}).items()
            if c.get("chosen") and c["chosen"] != b}


def _previous_report() -> dict:
    """The lds.json this run replaces (empty if there is none)."""
    try:
        return json.loads((RESULTS / "lds.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _previous_methods() -> dict:
    """The methods of the lds.json this run replaces (empty if there is none)."""
    return _previous_report().get("methods", {})


def _carried(old: dict, failed) -> dict:
    """A previous report's entry for a method whose scores are no longer on disk: its numbers
    stay, marked as not recomputable (and the failure of a later attempt, if any)."""
    entry = {**old}
    kept = ROOT / (entry.get("scores_file") or "")
    if not (kept.is_file() and kept.is_relative_to(COMMITTED_SCORES)):  # a work file is another run's
        entry["scores_file"] = None
    if entry["status"] == "ok" and not entry.get("scores_file"):
        entry["carried_over"] = ("measured by an earlier run whose scores were not kept: these "
                                 "numbers cannot be recomputed from the repository")
    if failed is not None and failed.exists():
        entry["last_attempt"] = failed.read_text().strip()
    return entry


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _settings_of(m: str) -> dict:
    from stride_viz.evaluation.baselines import default_settings

    if m.startswith("stride"):
        return {}
    base, _, short = m.partition(":")
    settings = default_settings(base)
    if short:
        try:
            settings.update(_spec(m))
        except (KeyError, OSError, json.JSONDecodeError):
            pass
    return settings


def _read_float(path: Path):
    try:
        return float(path.read_text())
    except (OSError, ValueError):
        return None


def _plot(report: dict, test: np.ndarray) -> None:
    """The LDS distribution of every method on the test queries (test: bool (n_queries,))."""
    from stride_viz.app.eval_plots import lds_distribution

    # the methods, not every ablation variant (those are in report["ablation"])
    fig = lds_distribution({m: np.asarray(r["lds_per_query"])[test] for m, r in report["methods"].items()
                            if r["status"] == "ok" and m in ALL_METHODS})
    st = report["setting"]
    fig.update_layout(title=f"LDS on the demo setting: {int(test.sum())} test queries of {st['n_queries']}, {st['n_subsets']} "
                            f"models retrained on {100 * st['fraction']:.0f}% subsets of "
                            f"{st['pool']['n']} documents")
    try:
        fig.write_image(RESULTS / "lds.png", width=900, height=500)
    except Exception as e:  # kaleido/chrome missing: keep the interactive html only
        _log(f"png export unavailable ({type(e).__name__}); wrote lds.html only")
    fig.write_html(RESULTS / "lds.html", include_plotlyjs="cdn")


# ---------------------------------------------------------------------------------------------
# statistics (stride_viz.evaluation.stats), on the test queries


def method_statistics(scores: dict, gt, dev: np.ndarray, groups: dict, reference: str = "stride") -> dict:
    """Per method, on the test queries: ``test`` (mean LDS with its 95% bootstrap intervals
    over queries and over retrained subsets) and ``vs_stride`` (the paired difference to
    ``reference``, its two intervals, the Wilcoxon p and the same by query group; absent for
    the reference itself or without it). scores: name -> (n_queries, n_pool)."""
    test = ~np.asarray(dev, dtype=bool)
    target = -gt.test_loss.T[test]                     # (n_test, M')
    member = gt.membership()
    pred = {m: (np.asarray(s, dtype=np.float64)[test] @ member.T.astype(np.float64))
            for m, s in scores.items()}
    test_groups = {g: np.asarray(mask, dtype=bool)[test] for g, mask in groups.items()}
    out = {}
    for m, p in pred.items():
        rho = stats.spearman_rows(p, target)
        entry = {"test": stats.mean_summary(rho, p, target, N_BOOT, STATS_SEED)}
        entry["test"]["groups"] = {g: float(rho[mask].mean()) for g, mask in test_groups.items() if mask.any()}
        if reference in pred and m != reference:
            entry["vs_stride"] = stats.paired_comparison(p, pred[reference], target, test_groups,
                                                         N_BOOT, STATS_SEED)
        out[m] = entry
    return out


def retrained_loss(gt, dev: np.ndarray, committed_only: bool = False) -> dict:
    """How trained the ground truth's models are: their mean query loss (nats) over the
    retrained subsets, next to the base model's and the uniform guess's."""
    import math

    from stride_viz.data.models import load_model
    from stride_viz.evaluation.retrain import open_inputs, query_losses

    _, _, queries, tok = open_inputs(GT_DIR)
    out = {"retrained_mean": float(gt.test_loss.mean()), "retrained_mean_test": float(gt.test_loss[:, ~dev].mean()),
           "uniform": math.log(len(tok)), "unit": "nats per completion token"}
    if (MODEL_DIR / "config.json").exists() and not committed_only:
        lm = load_model(str(MODEL_DIR), device="cpu")
        out["base_model_mean"] = float(query_losses(lm.model, lm.tokenizer, queries,
                                                    gt.metadata["recipe"]["max_length"]).mean())
    else:
        out["base_model_mean"] = _previous_report().get("setting", {}).get("retrained_loss", {}).get("base_model_mean")
    return out


def noise_report(gt, scores: dict, dev: np.ndarray, groups: dict) -> Optional[dict]:
    """The noise ceiling on the test queries: the LDS of the retrained losses of one training
    seed as predictions of another's on the same subsets (``stats.noise_ceiling``), with every
    method's LDS on the same subsets beside it (a fair comparison: fewer subsets, noisier rho)."""
    from stride_viz.evaluation.retrain import read_noise

    noise = read_noise(GT_DIR)
    if not noise:
        return None
    base_seed = gt.metadata["recipe"]["seed"]
    row_of = {int(j): r for r, j in enumerate(gt.subset_index)}
    common = sorted(set(row_of).intersection(*[set(js.tolist()) for js, _ in noise.values()]))
    if len(common) < 3:
        return None
    losses = [gt.test_loss[[row_of[j] for j in common]]]
    for s_, (js, l) in sorted(noise.items()):
        where = {int(j): r for r, j in enumerate(js)}
        losses.append(l[[where[j] for j in common]])
    test = ~np.asarray(dev, dtype=bool)
    ceiling = stats.noise_ceiling(losses)
    q = stats.bootstrap_queries(ceiling[test], N_BOOT, STATS_SEED)
    rows = [row_of[j] for j in common]
    member = gt.membership()[rows].astype(np.float64)
    target = -gt.test_loss[rows].T
    same = {}
    for m, sc in scores.items():
        rho = stats.spearman_rows(np.asarray(sc, dtype=np.float64) @ member.T, target)
        same[m] = {"lds_mean_test": float(rho[test].mean()),
                   "fraction_of_ceiling": float(rho[test].mean() / ceiling[test].mean())
                   if ceiling[test].mean() > 0 else None}
    return {"what": "per query, Spearman rho over the same retrained subsets between the query losses of "
                    "models trained with one recipe seed (initial weights and batch order) and another; "
                    "mean over the test queries: the scale of training noise, what a method that reproduced "
                    "one retrained model exactly would score; a method predicting the loss averaged over seeds "
                    "could score more (under independent additive noise about its square root), so it is a "
                    "reference, not a hard limit (methods' LDS on the same subsets beside it)",
            "seeds": [base_seed] + sorted(noise), "subsets": common, "n_subsets": len(common),
            "lds_mean_test": q["mean"], "ci_queries": [q["low"], q["high"]],
            "groups": {g: float(ceiling[test & np.asarray(mk)].mean()) for g, mk in groups.items()
                       if (test & np.asarray(mk)).any()},
            "per_query": [round(float(v), 6) for v in ceiling],
            "methods_same_subsets": same,
            "code": "stride_viz.evaluation.stats.noise_ceiling; retrains: stride_viz.evaluation.retrain.fill_noise"}


def twin_report(gt, methods: dict, dev: np.ndarray, groups: dict, ids: list, fact_rows: list,
                relevant: list, committed_only: bool, choices: Optional[dict] = None) -> Optional[dict]:
    """Model dependence: every method's LDS from scores computed on the random-weight twin
    (``TWIN``), next to its LDS on the trained model; each method's entry also gets ``twin``.
    ``choices``: {base: method} of the tuned methods' choices (``tuning_choices``), reported
    the same way (entry ``choice_of``: the base method) and STRIDE's in the target as well.
    Scores: the work folder's float32 ones (saved compressed to COMMITTED_TWIN_SCORES first),
    else the committed ones."""
    test = ~np.asarray(dev, dtype=bool)
    choices = dict(choices or {})
    choice_of = {m: b for b, m in choices.items()}
    out = {}
    for m in list(ALL_METHODS) + [m for m in choices.values() if m not in ALL_METHODS]:
        work, committed = TWIN.scores / f"{m}.npy", COMMITTED_TWIN_SCORES / f"{m.replace(':', '-')}.npz"
        if work.exists() and not committed_only:
            sc = ev.save_scores(committed, ev.load_scores(work, len(ids)), ids)
            info = json.loads((TWIN.scores / f"{m}.json").read_text())
        elif committed.exists():
            sc = ev.load_scores(committed, len(ids), ids)
            info = (_previous_report().get("twin") or {}).get("methods", {}).get(m, {}).get("run", {})
        else:
            if (TWIN.scores / f"{m}.failed").exists() and not committed_only:
                out[m] = {"status": "failed", "error": (TWIN.scores / f"{m}.failed").read_text().strip()}
            continue
        res = ev.lds(sc, gt.train_subsets, gt.test_loss)
        rho = res.per_query
        q = stats.bootstrap_queries(rho[test], N_BOOT, STATS_SEED)
        entry = {"status": "ok", "lds_mean_test": q["mean"], "ci_queries": [q["low"], q["high"]],
                 "groups": {g: float(rho[test & np.asarray(mk)].mean()) for g, mk in groups.items()},
                 "lds_mean_dev": float(rho[dev].mean()),
                 "recall_at_10_test": ev.recall_at_k(sc[[r for r in fact_rows if test[r]]],
                                                     [rel for r, rel in zip(fact_rows, relevant) if test[r]], 10),
                 "lds_per_query": [round(float(v), 6) for v in rho],
                 "scores_file": _rel(committed),
                 "run": {k: info.get(k) for k in ("seconds_fit", "seconds_per_query", "peak_rss_mb", "wall_seconds")}}
        if m in choice_of:
            entry["choice_of"] = choice_of[m]
        if info.get("settings") is not None or m in choice_of:
            entry["run"]["settings"] = info.get("settings")
        trained = methods.get(m, {})
        if trained.get("status") == "ok":
            t = trained["lds_mean_test"]
            entry["trained_lds_mean_test"] = t
            entry["twin_over_trained"] = float(entry["lds_mean_test"] / t) if t > 0 else None
            trained["twin"] = {k: entry[k] for k in ("lds_mean_test", "ci_queries", "groups",
                                                     "recall_at_10_test", "twin_over_trained")}
        out[m] = entry
    if not out:
        return None

    def target(m: str) -> dict:
        e = out.get(m, {})
        return {"stride_method": m, "stride_twin": e.get("lds_mean_test"),
                "stride_trained": e.get("trained_lds_mean_test"), "twin_over_trained": e.get("twin_over_trained"),
                "met": (e.get("twin_over_trained") is not None and e["twin_over_trained"] <= 0.5)
                if e.get("status") == "ok" else None}

    tgt = {"what": "STRIDE's test LDS on the twin <= half of its test LDS on the trained model",
           **target("stride")}
    if "stride" in choices:  # the same check on STRIDE's tuned choice
        tgt["choice"] = target(choices["stride"])
    return {"what": "every method's scores computed on a random-weight twin of the benchmark's model (the "
                    "recipe's GPT-2 as initialised from its seed: same shape, tokenizer and initial "
                    "weights, never trained), scored against the same ground truth; a method that "
                    "explains what the model learnt loses most of its LDS on the twin",
            "model": str(TWIN.model.relative_to(ROOT)) + " (git-ignored; rebuilt by --steps twin)",
            "choices": {"what": "each tuned method's choice on the development queries (tuning.methods.<m>.chosen), "
                                "run on the twin with the same settings and reported like the defaults "
                                "(methods.<choice>, choice_of: the method); a TRAK checkpoint 'seed:N' is, on "
                                "the twin, the recipe's model as initialised from seed N, never trained "
                                "(benchmarks/work/lds_model_twin_seed<N>), like the twin itself (seed "
                                f"{gt.metadata['recipe']['seed']})",
                        "chosen": choices,
                        "missing": sorted(m for m in choices.values() if m not in out)},
            "target": tgt,
            "methods": out}


STATISTICS_DOC = {
    "split": "test",
    "n_boot": N_BOOT, "seed": STATS_SEED, "level": 0.95,
    "what": {
        "test.mean": "mean LDS over the test queries",
        "test.ci_queries": "95% percentile bootstrap interval of that mean, resampling the test queries",
        "test.ci_subsets": "95% percentile bootstrap interval of that mean, resampling the retrained "
                           "subsets and recomputing every query's Spearman rho",
        "vs_stride.mean_difference": "mean over the test queries of (this method's LDS - STRIDE's LDS); "
                                     "< 0: STRIDE is better",
        "vs_stride.ci_queries / ci_subsets": "95% paired bootstrap intervals of that difference, over "
                                             "queries / over retrained subsets (both methods on the same resample)",
        "vs_stride.wilcoxon_p": "two-sided Wilcoxon signed-rank p-value of the per-query differences "
                                "(scipy.stats.wilcoxon, zeros dropped)",
        "vs_stride.groups": "the same on each query group (facts: planted-fact queries; heldout: "
                            "held-out text)",
    },
    "code": "stride_viz.evaluation.stats",
}


def _machine(load_start) -> dict:
    return {"cpu_cores": os.cpu_count(), "torch_threads_per_method": int(os.environ.get("LDS_THREADS", "1")),
            "load_average_1_5_15_at_start": [round(x, 2) for x in load_start] if load_start else None,
            "load_average_1_5_15_at_end": [round(x, 2) for x in os.getloadavg()],
            "note": "CPU only; the cores are shared with other work (see the load averages)"}


def _command() -> str:
    return "python benchmarks/lds.py " + shlex.join(sys.argv[1:])


# ---------------------------------------------------------------------------------------------
# the general command: any pool, the committed defaults


def _held_out_queries(pool, n: int, seed: int):
    """(pool without n held-out rows, their queries + the pool's planted-fact queries): a
    document of >= 6 words becomes prompt = its first three words, completion = the rest; a
    prompt/completion pair is used as it is. Sources of planted facts are never held out."""
    from stride_viz.data.pools import Query, fact_queries

    sources = {s for f in pool.facts for s in f.source_ids}
    cand = [i for i in range(len(pool)) if pool.ids[i] not in sources
            and (pool.prompts[i] or len(pool.completions[i].split()) >= 6)]
    if len(cand) < n:
        raise SystemExit(f"lds.py: the pool has only {len(cand)} documents of 6 words or more to "
                         f"hold out as queries (need {n}); give --queries QUERIES.jsonl instead.")
    held = set(np.random.default_rng(seed).choice(cand, size=n, replace=False).tolist())
    rest = pool.subset([i for i in range(len(pool)) if i not in held])
    queries = []
    for i in sorted(held):
        if pool.prompts[i]:
            queries.append(Query(id=f"heldout-{pool.ids[i]}", prompt=pool.prompts[i],
                                 completion=pool.completions[i]))
        else:
            words = pool.completions[i].split(" ")
            queries.append(Query(id=f"heldout-{pool.ids[i]}", prompt=" ".join(words[:3]),
                                 completion=" " + " ".join(words[3:])))
    return rest, queries + fact_queries(rest)


def general_prepare(L: Layout, pool_spec: str, queries_path: Optional[str], retrains: int, seed: int,
                    recipe: dict) -> None:
    """The ground truth's inputs in L.gt, with the split and the query groups in its metadata;
    a directory prepared with other inputs is refused (nothing in it is touched)."""
    from stride_viz.data.models import train_tokenizer
    from stride_viz.data.pools import PoolError, load_pool, load_queries
    from stride_viz.evaluation.retrain import prepare

    try:
        pool = load_pool(pool_spec)
        if queries_path:
            queries = load_queries(queries_path)
            source = f"{queries_path} (given)"
        else:
            pool, queries = _held_out_queries(pool, N_HELDOUT_GENERAL, seed)
            source = (f"{N_HELDOUT_GENERAL} documents held out of the pool (seed {seed}; prompt = "
                      f"first three words, completion = the rest) + the pool's planted-fact queries")
    except PoolError as e:
        raise SystemExit(f"lds.py: {e}")
    bad = [q.id for q in queries if not q.completion]
    if bad:
        raise SystemExit(f"lds.py: query {bad[0]!r} has no completion; the ground truth scores a fixed "
                         f"completion per query: add \"completion\" to every line of {queries_path}.")
    if len(pool) < 10:
        raise SystemExit(f"lds.py: the pool has {len(pool)} documents; the benchmark needs at least 10.")
    facts = {f.query.id for f in pool.facts}
    ids = [q.id for q in queries]
    extra = {"split": stats.split_metadata(ids), "queries_source": source,
             "query_group": ["facts" if q in facts else "heldout" for q in ids]}
    meta_path = L.gt / "metadata.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        want = {"pool_hash": pool.hash, "queries": [[q.id, q.prompt, q.completion] for q in queries],
                "n_subsets": retrains, "seed": seed, "recipe": {k: recipe[k] for k in RECIPE}}
        have = {"pool_hash": old["pool"]["hash"], "queries": [[q["id"], q["prompt"], q["completion"]]
                                                              for q in old["queries"]],
                "n_subsets": old.get("n_subsets"), "seed": old.get("seed"),
                "recipe": {k: old["recipe"].get(k) for k in RECIPE}}
        diff = [k for k in want if want[k] != have[k]]
        if diff:
            raise SystemExit(f"lds.py: {L.gt} holds a ground truth built with other {', '.join(diff)}; "
                             f"give another --work directory, or delete it to start over.")
        _log(f"ground truth prepared already: {L.gt}")
        return
    tok = train_tokenizer([pool.text(i) for i in range(len(pool))], VOCAB)
    prepare(L.gt, pool, queries, tok, recipe, n_subsets=retrains, fraction=FRACTION, seed=seed)
    meta = json.loads(meta_path.read_text())
    meta.update(extra)
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(meta_path)
    _log(f"prepared {L.gt}: pool {len(pool)}, queries {len(queries)} "
         f"({len(extra['split']['development'])} development, {len(extra['split']['test'])} test)")


def _timings(work: Path) -> dict:
    try:
        return json.loads((work / "timings.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _add_timing(work: Path, step: str, seconds: float) -> None:
    t = _timings(work)
    t[step] = round(t.get(step, 0.0) + seconds, 1)
    (work / "timings.json").write_text(json.dumps(t, indent=1))


def general_report(L: Layout, out: Path, methods: list[str], work: Path, load_start=None) -> dict:
    """RESULT.json of the general command from the ground truth and the scores in ``work``."""
    gt = ev.read_ground_truth(L.gt)
    meta = gt.metadata
    ids = [q["id"] for q in meta["queries"]]
    dev = stats.development_mask(meta)
    group_of = meta.get("query_group") or ["heldout"] * len(ids)
    groups = {g: np.array([x == g for x in group_of]) for g in ("heldout", "facts")}
    groups = {g: m for g, m in groups.items() if m.any()}
    entries, scores = {}, {}
    for m in methods:
        failed = L.scores / f"{m}.failed"
        if (L.scores / f"{m}.npy").exists():
            scores[m] = ev.load_scores(L.scores / f"{m}.npy", len(ids))
            info = json.loads((L.scores / f"{m}.json").read_text())
            res = ev.lds(scores[m], gt.train_subsets, gt.test_loss)
            entries[m] = {"status": "ok", **res.to_dict(), **ev.split_means(res.per_query, dev, groups),
                          "times": {"fit_s": info.get("seconds_fit"),
                                    "per_query_s": info.get("seconds_per_query"),
                                    "all_queries_s": (round(info["seconds_per_query"] * len(ids), 1)
                                                      if info.get("seconds_per_query") is not None else None),
                                    "process_wall_s": info.get("wall_seconds")},
                          "peak_rss_mb": info.get("peak_rss_mb"), "settings": info.get("settings", {})}
        elif failed.exists():
            entries[m] = {"status": "failed", "error": failed.read_text().strip(),
                          "settings": _settings_of(m)}
    for m, st_ in method_statistics(scores, gt, dev, groups).items():
        entries[m].update(st_)
    t = _timings(work)
    gt_seconds = sum(t.get(k, 0.0) for k in ("prepare_s", "model_s", "retrain_s"))
    method_seconds = {m: e["times"]["process_wall_s"] for m, e in entries.items() if e["status"] == "ok"}
    report = {
        "what": "Linear Datamodeling Score on the test queries of a pool (see benchmarks/results/lds.json "
                "for the definitions); every method ran with the project's committed defaults, "
                "nothing tuned on this pool.",
        "command": _command(),
        "machine": _machine(load_start),
        "setting": {"pool": meta["pool"], "queries": meta.get("queries_source"), "n_queries": len(ids),
                    "n_subsets": len(gt.train_subsets), "fraction": meta.get("fraction"),
                    "seed": meta.get("seed"), "recipe": meta["recipe"], "loss": meta.get("loss"),
                    "split": {"rule": stats.SPLIT_RULE, "n_dev": int(dev.sum()), "n_test": int((~dev).sum())},
                    "query_group": group_of,
                    "overrides": L.method_overrides() or None},
        "ground_truth": str(L.gt),
        "scores": str(L.scores) + "/<method>.npy (float32)",
        "statistics": STATISTICS_DOC,
        "methods": entries,
        "timings": {"ground_truth_s": round(gt_seconds, 1), "ground_truth_steps_s": t,
                    "methods_s": method_seconds,
                    "total_s": round(gt_seconds + sum(v or 0.0 for v in method_seconds.values()), 1),
                    "note": "wall seconds summed over every invocation of the command on this --work "
                            "directory (a resumed run adds up); methods_s: each method's process"},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    _log(f"wrote {out} (total {report['timings']['total_s']:.0f} s: ground truth {gt_seconds:.0f} s, "
         + ", ".join(f"{m} {s:.0f} s" for m, s in method_seconds.items() if s is not None) + ")")
    for m, e in entries.items():
        if e["status"] != "ok":
            _log(f"{m:8s} FAILED: {e['error']}")
            continue
        line = (f"{m:8s} LDS test {e['test']['mean']:+.3f} [{e['test']['ci_queries'][0]:+.3f}, "
                f"{e['test']['ci_queries'][1]:+.3f}]")
        if "vs_stride" in e:
            v = e["vs_stride"]
            line += (f"  minus STRIDE {v['mean_difference']:+.3f} queries [{v['ci_queries'][0]:+.3f}, "
                     f"{v['ci_queries'][1]:+.3f}] subsets [{v['ci_subsets'][0]:+.3f}, "
                     f"{v['ci_subsets'][1]:+.3f}] Wilcoxon p {v['wilcoxon_p']:.3g}")
        _log(line)
    return report


def run_general(a) -> None:
    """The general command (--pool given)."""
    import torch

    torch.set_num_threads(int(os.environ.get("LDS_THREADS", "1")))
    load_start = os.getloadavg()
    if not a.work:
        raise SystemExit("lds.py: --pool needs --work DIR (where the ground truth, the model and the "
                         "scores go).")
    work = Path(a.work)
    out = Path(a.out) if a.out else work / "lds.json"
    methods = [m for m in a.methods.split(",") if m]
    unknown = [m for m in methods if m not in GENERAL_METHODS]
    if unknown or not methods:
        raise SystemExit(f"lds.py: unknown method(s) {unknown}; choose from {', '.join(GENERAL_METHODS)}.")
    if a.retrains < 3:
        raise SystemExit(f"lds.py: --retrains must be >= 3 (LDS ranks the retrained subsets); got {a.retrains}.")
    try:
        recipe = {**RECIPE, **json.loads(a.recipe)}
        overrides = json.loads(a.settings)
    except json.JSONDecodeError as e:
        raise SystemExit(f"lds.py: --recipe and --settings must be JSON objects ({e}).")
    bad = sorted(set(recipe) - set(RECIPE))
    if bad or not isinstance(overrides, dict):
        raise SystemExit(f"lds.py: unknown recipe key(s) {bad}; known: {', '.join(RECIPE)}."
                         if bad else "lds.py: --settings must be a JSON object {method: settings}.")
    L = work_layout(work)
    work.mkdir(parents=True, exist_ok=True)
    if L.method_overrides() != overrides and any((L.scores / f"{m}.npy").exists() for m in methods) \
            and not a.force and not a.stats_only:
        raise SystemExit(f"lds.py: {work} holds scores computed with --settings "
                         f"{json.dumps(L.method_overrides())}; give the same, or --force to recompute.")
    if not a.stats_only:
        L.overrides.write_text(json.dumps(overrides, indent=1))
        t0 = time.monotonic()
        general_prepare(L, a.pool, a.queries, a.retrains, a.seed, recipe)
        _add_timing(work, "prepare_s", time.monotonic() - t0)
        t0 = time.monotonic()
        step_model(L)
        _add_timing(work, "model_s", time.monotonic() - t0)
        t0 = time.monotonic()
        step_retrain(L)
        _add_timing(work, "retrain_s", time.monotonic() - t0)
        step_methods(methods, a.force, a.timeout, L, work)
    elif not (L.gt / "metadata.json").exists():
        raise SystemExit(f"lds.py: {work} holds no ground truth yet; run without --stats-only first.")
    general_report(L, out, methods, work, load_start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("any pool (the general command; --pool selects it)")
    g.add_argument("--pool", help="a pool spec (file, datasets folder or built-in name)")
    g.add_argument("--queries", help="QUERIES.jsonl: one {\"prompt\", \"completion\", \"id\"} per line; "
                                     f"default: {N_HELDOUT_GENERAL} documents held out of the pool")
    g.add_argument("--retrains", type=int, default=32, help="models retrained on random 30%% subsets (default 32)")
    g.add_argument("--seed", type=int, default=0, help="seed of the subsets and of the held-out queries")
    g.add_argument("--work", help="directory of the ground truth, model and scores (resumable)")
    g.add_argument("--out", help="RESULT.json (default WORK/lds.json)")
    g.add_argument("--recipe", default="{}", help="JSON overriding RECIPE keys (tests use a tiny one; "
                                                  "the committed results use none)")
    g.add_argument("--settings", default="{}",
                   help='JSON {method: settings} differing from the committed defaults, e.g. '
                        '\'{"stride": {"fit": {"solver": "gauss-newton"}}}\' (recorded in RESULT.json): the demo\'s '
                        'tuned choices carried to another pool (lds_wordnet_choices.json), tiny fits in tests')
    ap.add_argument("--steps", default="prepare,model,retrain,noise,methods,twin,report",
                    help="the demo's steps (twin: every --methods on the random-weight twin, "
                         "the tuning choices too when --methods is not given; "
                         "tune: every setting of the tuning plan TUNING not yet scored)")
    ap.add_argument("--methods", default=None,
                    help=f"comma-separated (demo default: all of {','.join(ALL_METHODS)}; "
                         f"--pool default: stride,ekfac,tfidf)")
    ap.add_argument("--stats-only", action="store_true",
                    help="only the report and its statistics, from the ground truth and the scores "
                         "on disk (demo: the committed files only); runs no method")
    ap.add_argument("--force", action="store_true", help="recompute method scores that exist")
    ap.add_argument("--timeout", type=float, default=3600,
                    help="seconds one method may run before it is recorded as failed (default 3600)")
    ap.add_argument("--variant", action="append", default=[],
                    help='an ablation of STRIDE: NAME=JSON, e.g. k256=\'{"fit": {"subsets": 256}}\' '
                         'or cv1se=\'{"recovery": {"selection": "cv-1se"}}\'; run as method stride:NAME; '
                         'or of a peer: PEER:NAME=JSON of its settings, e.g. '
                         'ekfac:d1e-3=\'{"damping_factor": 1e-3}\'; run as method PEER:NAME')
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--twin", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        run_one_method(a.worker, work_layout(Path(a.work)) if a.work else (TWIN if a.twin else DEMO))
        return
    if a.pool:
        a.methods = a.methods or "stride,ekfac,tfidf"
        run_general(a)
        return
    if a.queries or a.work or a.out:
        ap.error("--queries, --work and --out belong to the general command: give --pool too")
    given = a.methods is not None
    a.methods = a.methods or ",".join(ALL_METHODS)
    if a.stats_only:
        step_report(committed_only=True)
        return
    steps = a.steps.split(",")
    registered = _registered()
    for v in a.variant:
        try:
            name, spec = parse_variant(v)
        except ValueError as e:
            ap.error(str(e))
        if name in _tuning_specs():
            ap.error(f"--variant {name!r} is a setting of the tuning plan (TUNING); give another name.")
        # STRIDE's under their bare NAME (the file earlier sessions wrote), peers' under PEER:NAME
        registered[name.split(":", 1)[1] if name.startswith("stride:") else name] = spec
        WORK.mkdir(parents=True, exist_ok=True)
        VARIANTS.write_text(json.dumps(registered, indent=1))
    methods = [m for m in a.methods.split(",") if m]
    if "tune" in steps:  # the tuning plan, round by round, the methods in turn
        methods = (methods if given else []) + tuning_order()
        methods = list(dict.fromkeys(methods))
    known = set(_tuning_specs())
    unknown = [m for m in methods if m not in ALL_METHODS and m not in known
               and m != "stride:backprojection"
               and not (m.startswith("stride:") and m.split(":", 1)[1] in registered)
               and m not in registered]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {', '.join(ALL_METHODS)}, a setting of "
                 f"the tuning plan or a --variant")
    if "prepare" in steps:
        step_prepare()
    if "model" in steps:
        step_model()
    if "retrain" in steps:
        step_retrain()
    if "noise" in steps:
        step_noise()
    if "methods" in steps or "tune" in steps:
        step_methods(methods, a.force, a.timeout)
    if "twin" in steps:
        # the defaults and each tuned method's choice (lds.json's tuning); without --methods,
        # all of them
        choices = list(tuning_choices().values())
        others = [m for m in methods if m not in ALL_METHODS and m not in choices]
        if given and others and not ({"methods", "tune"} & set(steps)):
            ap.error(f"--steps twin runs the defaults ({', '.join(ALL_METHODS)}) and the tuning "
                     f"choices ({', '.join(choices) or 'none recorded'}); not {', '.join(others)}.")
        step_twin_model()
        step_methods([m for m in methods if m in ALL_METHODS or m in choices]
                     + ([] if given else choices), a.force, a.timeout, TWIN)
    if "report" in steps:
        step_report()


if __name__ == "__main__":
    main()
