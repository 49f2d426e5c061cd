"""Peer attribution methods, run on the same model, pool and queries as STRIDE.

Every method returns ``scores``: float32 (n_queries, n_pool) with STRIDE's sign convention,
``scores[q, i] > 0`` when training on example i lowers query q's completion loss (a
proponent). The peers come from the installed libraries, not re-implementations:

- ``trak``, ``tracin``, ``logra``, ``if-arnoldi``: dattri (``TRAKAttributor``,
  ``TracInAttributor``, ``LoGraAttributor``, ``IFAttributorArnoldi``);
- ``ekfac``: kronfluence (EK-FAC influence functions);
- simple baselines: ``random``, ``tfidf`` (scikit-learn TF-IDF cosine of the texts),
  ``repsim`` (cosine of the mean last-layer hidden states).

All gradient methods score the loss STRIDE explains: mean next-token cross-entropy over the
completion tokens (``stride_viz.data.tokenize``). Each result records the settings used, each
library's documented defaults, and the wall time split into the one-off part (run once per
model and pool) and the per-query part.

Run one method from the command line (the benchmark does, one process per method, so that
peak memory is per method):  python -m stride_viz.evaluation.baselines --help
"""
from __future__ import annotations

import copy
import logging
import math
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import psutil
import torch
from torch import nn

from stride_viz.data.tokenize import Encoded, encode, sequence_losses

__all__ = ["METHODS", "GRADIENT_METHODS", "MethodResult", "run_method", "to_linear",
           "PeakRss", "MethodFailed", "default_settings"]

METHODS = ("random", "tfidf", "repsim", "trak", "tracin", "logra", "if-arnoldi", "ekfac")
GRADIENT_METHODS = ("trak", "tracin", "logra", "if-arnoldi", "ekfac")


@dataclass
class MethodResult:
    """scores: float32 (n_queries, n_pool), >0 = the example lowers the query's loss (nats
    for STRIDE; the peers' units are their own, only their order and sign matter for LDS)."""

    method: str
    scores: np.ndarray
    seconds_fit: float
    seconds_per_query: float
    peak_rss_mb: float
    settings: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"seconds_fit": round(self.seconds_fit, 3),
                "seconds_per_query": round(self.seconds_per_query, 5),
                "peak_rss_mb": round(self.peak_rss_mb, 1), "settings": self.settings}


class MethodFailed(RuntimeError):
    """A peer that ran but cannot give valid scores on this model (the message says why)."""


class PeakRss:
    """Samples this process's resident memory in a thread; ``peak_mb`` after the block."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._proc.memory_info().rss / 2**20)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRss":
        self.peak_mb = self._proc.memory_info().rss / 2**20
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._proc.memory_info().rss / 2**20)


# ---------------------------------------------------------------------------------------------
# shared helpers

def to_linear(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose HF ``Conv1D`` layers (GPT-2) are ``nn.Linear`` with the same
    function (weight transposed): dattri's LoGra and kronfluence only hook ``nn.Linear``.
    This is what kronfluence's own GPT-2 example does."""
    from transformers.pytorch_utils import Conv1D

    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                lin = nn.Linear(child.weight.shape[0], child.weight.shape[1],
                                bias=child.bias is not None)
                with torch.no_grad():
                    lin.weight.copy_(child.weight.T)
                    if child.bias is not None:
                        lin.bias.copy_(child.bias)
                setattr(module, child_name, lin)
    return model


def _trainable_copy(model: nn.Module, linear: bool = False) -> nn.Module:
    m = to_linear(model) if linear else copy.deepcopy(model)
    m = m.float().cpu().eval()
    # plain attention: torch.func transforms (vmap, forward-mode AD) do not all support the
    # fused scaled-dot-product kernels; the function is the same
    if hasattr(m, "set_attn_implementation"):
        m.set_attn_implementation("eager")
    for p in m.parameters():
        p.requires_grad_(True)
    if hasattr(m, "config"):
        m.config.use_cache = False
        # HF's "padding without attention mask" warning tests the input ids' values, which
        # vmap (TRAK, TracIn, IF) cannot trace; padding is on the right, so it is harmless
        m.config.pad_token_id = None
    return m


def _labels(enc: Encoded) -> torch.Tensor:
    """HF-style labels: the scored next tokens keep their id, the rest is -100 (HF shifts)."""
    labels = torch.full_like(enc.input_ids, -100)
    scored = torch.nn.functional.pad(enc.loss_mask[:, :-1], (1, 0)) > 0
    labels[scored] = enc.input_ids[scored]
    return labels


def _per_example_loss_from_labels(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over the scored tokens of each row: (B, T, V), (B, T) -> (B,)."""
    lg = logits[:, :-1].float()
    lb = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1),
                                            ignore_index=-100, reduction="none").view(lb.shape)
    count = (lb != -100).sum(-1).clamp_min(1)
    return nll.sum(-1) / count


def _encode_all(tokenizer, pool, queries, max_length: int) -> tuple[Encoded, Encoded]:
    for q in queries:
        if q.completion is None:
            raise ValueError(f"Query {q.id!r} has no completion: peers score a given completion; "
                             f"generate it first (STRIDE does so when explaining).")
    train = encode(tokenizer, list(pool.prompts), list(pool.completions), max_length)
    test = encode(tokenizer, [q.prompt for q in queries], [q.completion for q in queries], max_length)
    return train, test


def _tuple_loader(enc: Encoded, batch_size: int):
    ds = torch.utils.data.TensorDataset(enc.input_ids, enc.loss_mask)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)


def _dattri_loss(model: nn.Module) -> Callable:
    """loss(params, (input_ids, loss_mask)) in torch.func style; accepts one example (T,) or a
    batch (B, T) and returns the mean completion loss. No attention mask is passed: padding is
    on the right, so a causal model's scored positions never see it."""

    def loss(params, data):
        ids, mask = data
        if ids.dim() == 1:
            ids, mask = ids.unsqueeze(0), mask.unsqueeze(0)
        logits = torch.func.functional_call(model, params, (ids,), {"use_cache": False}).logits
        return sequence_losses(logits, ids, mask).mean()

    return loss


# ---------------------------------------------------------------------------------------------
# simple baselines

def _random(model, tokenizer, pool, queries, s: dict, train, test):
    rng = np.random.default_rng(s["seed"])
    t0 = time.perf_counter()
    scores = rng.standard_normal((len(queries), len(pool))).astype(np.float32)
    return scores, 0.0, time.perf_counter() - t0


def _tfidf(model, tokenizer, pool, queries, s: dict, train, test):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics.pairwise import linear_kernel

    t0 = time.perf_counter()
    vec = TfidfVectorizer(sublinear_tf=True)
    docs = vec.fit_transform([pool.text(i) for i in range(len(pool))])
    fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    qv = vec.transform([q.prompt + (q.completion or "") for q in queries])
    scores = linear_kernel(qv, docs).astype(np.float32)  # rows are l2-normalised: cosine
    return scores, fit, time.perf_counter() - t0


@torch.no_grad()
def _mean_hidden(model, enc: Encoded, batch_size: int) -> torch.Tensor:
    out = []
    for start in range(0, len(enc), batch_size):
        b = enc.select(range(start, min(len(enc), start + batch_size)))
        h = model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                  output_hidden_states=True).hidden_states[-1].float()
        m = b.attention_mask.unsqueeze(-1).float()
        out.append((h * m).sum(1) / m.sum(1).clamp_min(1.0))
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


def _repsim(model, tokenizer, pool, queries, s: dict, train, test):
    model = model.eval()
    t0 = time.perf_counter()
    # the whole text of each example, prompt included (the loss mask is irrelevant here)
    docs = _mean_hidden(model, train, s["batch_size"])
    fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = (_mean_hidden(model, test, s["batch_size"]) @ docs.T).numpy().astype(np.float32)
    return scores, fit, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# dattri

def _dattri_task(model: nn.Module):
    from dattri.task import AttributionTask

    m = _trainable_copy(model)
    return AttributionTask(loss_func=_dattri_loss(m), model=m,
                           checkpoints=copy.deepcopy(m.state_dict())), m


def _trak(model, tokenizer, pool, queries, s: dict, train, test):
    from dattri.algorithm import TRAKAttributor

    task, m = _dattri_task(model)
    if s["checkpoints"]:  # an ensemble: more independently trained models of the same shape
        from stride_viz.data.models import load_model

        task.checkpoints = task.checkpoints + [
            _trainable_copy(load_model(str(path), device="cpu").model).state_dict()
            for path in s["checkpoints"]]
    loss = _dattri_loss(m)

    def correct_probability(params, data):  # TRAK's p: probability of the completion
        return torch.exp(-loss(params, data))

    t0 = time.perf_counter()
    att = TRAKAttributor(task=task, correct_probability_func=correct_probability, device="cpu",
                         regularization=s["regularization"],
                         projector_kwargs={"proj_dim": s["proj_dim"], "proj_max_batch_size": 32,
                                           "proj_seed": s["seed"], "device": "cpu"})
    att.cache(_tuple_loader(train, s["batch_size"]))
    fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = att.attribute(_tuple_loader(test, s["batch_size"])).T  # (n_test, n_train)
    return scores.detach().numpy().astype(np.float32), fit, time.perf_counter() - t0


def _tracin(model, tokenizer, pool, queries, s: dict, train, test):
    from dattri.algorithm import TracInAttributor

    task, _ = _dattri_task(model)
    att = TracInAttributor(task=task, weight_list=torch.tensor([s["lr"]]),
                           normalized_grad=s["normalized_grad"], device="cpu",
                           projector_kwargs={"proj_dim": s["proj_dim"], "proj_max_batch_size": 32,
                                             "proj_seed": s["seed"], "device": "cpu"})
    t0 = time.perf_counter()
    # dattri's TracIn has no cache: every call takes the gradient of the whole pool again
    scores = att.attribute(_tuple_loader(train, s["batch_size"]), _tuple_loader(test, s["batch_size"])).T
    return scores.detach().numpy().astype(np.float32), 0.0, time.perf_counter() - t0


def _if_arnoldi(model, tokenizer, pool, queries, s: dict, train, test):
    from dattri.algorithm import IFAttributorArnoldi

    task, _ = _dattri_task(model)
    att = IFAttributorArnoldi(task=task, device="cpu", proj_dim=s["proj_dim"],
                              max_iter=s["max_iter"], regularization=s["regularization"],
                              precompute_data_ratio=s["precompute_data_ratio"], seed=s["seed"])
    t0 = time.perf_counter()
    att.cache(_tuple_loader(train, s["batch_size"]))
    n_params = sum(p.numel() for p in task.get_model().parameters() if p.requires_grad)
    for project in att.arnoldi_projectors:  # the eigenspace is built lazily on first use
        project(torch.zeros(1, n_params))
    fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = att.attribute(_tuple_loader(train, s["batch_size"]), _tuple_loader(test, s["batch_size"])).T
    scores = scores.detach().numpy().astype(np.float32)
    if not np.isfinite(scores).all():
        raise MethodFailed(
            "dattri's Arnoldi influence function returned NaN: among the top-|eigenvalue| "
            "directions of this model's Hessian some are negative (the loss is not convex "
            "here) and their inverse square root is undefined. Raise its 'regularization' "
            "above the largest negative eigenvalue's magnitude, or use 'ekfac'.")
    return scores, fit, time.perf_counter() - t0


class _DictDataset(torch.utils.data.Dataset):
    def __init__(self, **tensors: torch.Tensor) -> None:
        self.t = tensors

    def __len__(self) -> int:
        return len(next(iter(self.t.values())))

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.t.items()}


def _logra(model, tokenizer, pool, queries, s: dict, train, test):
    from dattri.algorithm import LoGraAttributor
    from dattri.task import AttributionTask

    m = _trainable_copy(model, linear=True)

    def loss(model_, batch, device="cpu"):  # LoGra's signature: (model, batch, device)
        logits = model_(input_ids=batch["input_ids"].to(device)).logits
        # sum of per-example means: the hooks then see each example's own gradient
        return _per_example_loss_from_labels(logits, batch["labels"].to(device)).sum()

    task = AttributionTask(loss_func=loss, model=m, checkpoints=copy.deepcopy(m.state_dict()))
    layers = None if s["layer_names"] == "all-linear" else s["layer_names"]
    with tempfile.TemporaryDirectory() as tmp:
        att = LoGraAttributor(task=task, layer_names=layers, hessian=s["hessian"],
                              damping=s["damping"], device="cpu", proj_dim=s["proj_dim"],
                              offload="cpu", cache_dir=tmp)
        tr = torch.utils.data.DataLoader(_DictDataset(input_ids=train.input_ids, labels=_labels(train)),
                                         batch_size=s["batch_size"], shuffle=False)
        # batch size 1 for queries: LoGra takes the model's own (batch-mean) loss there
        te = torch.utils.data.DataLoader(_DictDataset(input_ids=test.input_ids, labels=_labels(test)),
                                         batch_size=1, shuffle=False)
        t0 = time.perf_counter()
        att.cache(tr)
        fit = time.perf_counter() - t0
        t0 = time.perf_counter()
        scores = att.attribute(tr, te).T
        per = time.perf_counter() - t0
    return scores.detach().cpu().numpy().astype(np.float32), fit, per


# ---------------------------------------------------------------------------------------------
# kronfluence

def _ekfac(model, tokenizer, pool, queries, s: dict, train, test):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class LMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch["input_ids"]).logits
            labels = batch["labels"]
            if sample:  # true Fisher: labels drawn from the model's own predictions
                with torch.no_grad():
                    probs = torch.softmax(logits.detach().float(), dim=-1)
                    drawn = torch.multinomial(probs.view(-1, probs.shape[-1]), 1).view(labels.shape)
                    # position t predicts token t+1: move the draw one step right
                    drawn = torch.nn.functional.pad(drawn[:, :-1], (1, 0))
                    labels = torch.where(labels != -100, drawn, labels)
            return _per_example_loss_from_labels(logits, labels).sum()

        def compute_measurement(self, batch, model):
            logits = model(input_ids=batch["input_ids"]).logits
            return _per_example_loss_from_labels(logits, batch["labels"]).sum()

    m = prepare_model(_trainable_copy(model, linear=True), task=LMTask())
    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    tr = _DictDataset(input_ids=train.input_ids, labels=_labels(train))
    te = _DictDataset(input_ids=test.input_ids, labels=_labels(test))
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer(analysis_name="stride_viz", model=m, task=LMTask(), cpu=True,
                            disable_tqdm=True, output_dir=tmp)
        t0 = time.perf_counter()
        analyzer.fit_all_factors(factors_name="ekfac", dataset=tr,
                                 per_device_batch_size=s["batch_size"],
                                 factor_args=FactorArguments(strategy=s["strategy"],
                                                             use_empirical_fisher=s["use_empirical_fisher"]),
                                 overwrite_output_dir=True)
        fit = time.perf_counter() - t0
        t0 = time.perf_counter()
        analyzer.compute_pairwise_scores(
            scores_name="scores", factors_name="ekfac", query_dataset=te, train_dataset=tr,
            per_device_query_batch_size=s["batch_size"], per_device_train_batch_size=s["batch_size"],
            score_args=ScoreArguments(damping_factor=s["damping_factor"]), overwrite_output_dir=True)
        scores = analyzer.load_pairwise_scores("scores")["all_modules"]
        per = time.perf_counter() - t0
    return scores.detach().cpu().numpy().astype(np.float32), fit, per


# ---------------------------------------------------------------------------------------------
# registry: each method's settings, with the library's documented defaults named

_DEFAULTS: dict[str, dict] = {
    "random": {"seed": 0},
    "tfidf": {"vectorizer": "sklearn TfidfVectorizer(sublinear_tf=True)", "similarity": "cosine"},
    "repsim": {"batch_size": 64, "representation": "mean over tokens of the last hidden state",
               "similarity": "cosine"},
    "trak": {"proj_dim": 512, "regularization": 0.0, "batch_size": 32, "seed": 0, "checkpoints": [],
             "library_defaults": "dattri TRAKAttributor: proj_dim 512, regularization 0.0, one "
                                 "checkpoint; target = loss gradient (task default), "
                                 "p = exp(-completion loss); checkpoints: folders of more models "
                                 "of the same shape (trained with other seeds) for an ensemble, "
                                 "averaged by dattri (none: the model alone)"},
    "tracin": {"lr": 1.0, "normalized_grad": False, "proj_dim": 512, "batch_size": 32, "seed": 0,
               "library_defaults": "dattri TracInAttributor: projection dim 512; weight_list "
                                   "and normalized_grad have no default. Only the final "
                                   "checkpoint exists (train_lm keeps no intermediate ones), "
                                   "so this is TracIn-CP with one checkpoint = gradient dot "
                                   "product"},
    "logra": {"proj_dim": 4096, "hessian": "eFIM", "damping": None, "layer_names": "all-linear",
              "batch_size": 32,
              "library_defaults": "dattri LoGraAttributor: proj_dim 4096 (64 x 64 "
                                  "Kronecker), hessian eFIM, damping None (1e-5 x mean "
                                  "eigenvalue), all nn.Linear layers (GPT-2 Conv1D converted)"},
    "if-arnoldi": {"proj_dim": 100, "max_iter": 100, "regularization": 0.0,
                   "precompute_data_ratio": 1.0, "batch_size": 64, "seed": 0,
                   "library_defaults": "dattri IFAttributorArnoldi: proj_dim 100, max_iter 100, "
                                       "regularization 0.0, precompute_data_ratio 1.0"},
    "ekfac": {"strategy": "ekfac", "damping_factor": 1e-8, "use_empirical_fisher": False, "batch_size": 32,
              "library_defaults": "kronfluence FactorArguments() (strategy ekfac, true Fisher "
                                  "with sampled labels unless use_empirical_fisher, "
                                  "covariance/lambda max examples 100000) "
                                  "and ScoreArguments() (damping_factor 1e-8); all nn.Linear "
                                  "modules (GPT-2 Conv1D converted)"},
}

_RUNNERS = {"random": _random, "tfidf": _tfidf, "repsim": _repsim, "trak": _trak,
            "tracin": _tracin, "logra": _logra, "if-arnoldi": _if_arnoldi, "ekfac": _ekfac}

# whether the per-query part recomputes something over the whole pool (no reusable cache)
_PER_QUERY_TOUCHES_POOL = {"tracin": True, "trak": False, "logra": False, "if-arnoldi": True,
                           "ekfac": True, "random": False, "tfidf": False, "repsim": False}


def default_settings(method: str) -> dict:
    if method not in _DEFAULTS:
        raise ValueError(f"The 'method' parameter must be one of {', '.join(METHODS)}. "
                         f"Got {method!r} instead.")
    return copy.deepcopy(_DEFAULTS[method])


def run_method(method: str, model: nn.Module, tokenizer, pool, queries: Sequence,
               *, max_length: int = 64, settings: Optional[dict] = None,
               threads: Optional[int] = None) -> MethodResult:
    """Score every pool example for every query with one method.

    model: a HF causal LM (not modified: gradient methods work on a copy); pool: a
    ``stride_viz.data.pools.Pool``; queries: ``Query`` objects with completions. ``settings``
    overrides the method's defaults (unknown keys are refused). Returns a ``MethodResult``
    with scores float32 (n_queries, n_pool).
    """
    s = default_settings(method)
    for k, v in (settings or {}).items():
        if k not in s:
            raise ValueError(f"Unknown setting {k!r} for method {method!r}. Known: "
                             f"{', '.join(sorted(s))}.")
        s[k] = v
    if not queries:
        raise ValueError("The 'queries' parameter is empty: give at least one query.")
    if threads:
        torch.set_num_threads(threads)
    train, test = _encode_all(tokenizer, pool, queries, max_length)
    with PeakRss() as rss, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores, fit, per_all = _RUNNERS[method](model, tokenizer, pool, queries, s, train, test)
    scores = np.nan_to_num(np.asarray(scores, dtype=np.float32))
    if scores.shape != (len(queries), len(pool)):
        raise RuntimeError(f"{method} returned scores of shape {scores.shape}; expected "
                           f"{(len(queries), len(pool))}.")
    s = {**s, "max_length": max_length, "n_queries_batched": len(queries),
         "per_query_recomputes_pool_pass": _PER_QUERY_TOUCHES_POOL[method]}
    return MethodResult(method, scores, float(fit), float(per_all) / len(queries), rss.peak_mb, s)


def _main(argv: Optional[Sequence[str]] = None) -> None:
    import argparse
    import json

    from stride_viz.data.models import load_model
    from stride_viz.data.pools import load_pool, load_queries

    ap = argparse.ArgumentParser(prog="python -m stride_viz.evaluation.baselines", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", required=True, choices=METHODS)
    ap.add_argument("--model", required=True, help="model spec for stride_viz.data.models.load_model")
    ap.add_argument("--pool", required=True, help="pool spec for stride_viz.data.pools.load_pool")
    ap.add_argument("--queries", required=True, help="queries JSONL (prompt, completion, id)")
    ap.add_argument("--out", required=True, help="folder: writes <method>.npy and <method>.json")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--settings", default="{}", help="JSON object overriding the defaults")
    a = ap.parse_args(argv)
    lm = load_model(a.model, device="cpu")
    res = run_method(a.method, lm.model, lm.tokenizer, load_pool(a.pool), load_queries(a.queries),
                     max_length=a.max_length, settings=json.loads(a.settings))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / f"{a.method}.npy", res.scores)
    (out / f"{a.method}.json").write_text(json.dumps(res.summary(), indent=1))


if __name__ == "__main__":
    _main()
