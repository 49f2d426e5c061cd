"""The STRIDE facade: one object per run directory, with methods named after the stages.

    run = Stride.create_or_open("runs/demo", load_model("demo"), load_pool("fortunes+facts"), FitConfig())
    run.fit()                                   # stages 1-2, once per model + pool + config
    [a] = run.attribute([Query("q", "The capital of Vorlandia is", " Quessit.")])   # stages 3-4
    a.top(10)                                   # proponents: w_i > 0 lowers the query's loss

Everything is written to the run directory (see :mod:`stride_viz.storage`) as it is computed,
so a killed fit resumes and every attribution can be reread without a model.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from stride_viz.config import ConfigError, FitConfig, RecoveryConfig
from stride_viz.method.measurement import QueryResponses, generate, generate_many, measure
from stride_viz.data.models import LoadedModel, load_model, resolve_device
from stride_viz.method import distributed
from stride_viz.method.allocator import keep_freed_memory
from stride_viz.method.frozen import FrozenLM
from stride_viz.method.operators import SteeringOperators
from stride_viz.data.pools import Pool, Query
from stride_viz.progress import StageTimer, no_progress
from stride_viz.method.recovery import Recoverer, Recovery, load_recovery, save_recovery
from stride_viz.method.tokens import TOKENS_FILE, TokenRecovery, load_tokens, recover_tokens, save_tokens
from stride_viz.integrity import RunDamaged, read_checked, set_aside, warn
from stride_viz.runlock import run_lock
from stride_viz.storage import RunMismatch, RunStore, read_json, write_json
from stride_viz.method.subsets import design_subsets
from stride_viz.data.tokenize import encode
from stride_viz.method.cache import build_cache, tokenize_pool
from stride_viz.method.checkpoint import CHECKPOINT, PREVIOUS
from stride_viz.method.training import Trainer
from stride_viz.method.newton import gauss_newton_operators

__all__ = ["Stride", "Attribution", "read_attribution", "RunMismatch", "QueryError"]

_PACKAGES = ("torch", "transformers", "tokenizers", "numpy", "scipy", "scikit-learn", "stride_viz")
GENERATED_TOKENS = 24          # bound of a generated query completion
CONTINUATION_TOKENS = 32       # length of base/steered continuations shown in the app
CONTINUATION_OPERATORS = 3     # most and least responsive operators continued by the job
CONTINUATION_BATCH = 8         # queries whose continuations are generated in one batch


class QueryError(ValueError):
    """A query that cannot be explained (too long, empty completion); the message says why."""


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "source"
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Attribution:
    """One query explained: what was measured (responses) and recovered (scores).

    scores: float32 (n,), nats of mean per-token completion loss; > 0 means training example i
    helps (lowers the loss: a proponent), < 0 means it hurts (an opponent).
    responses: float32 (K,), Loss_base - Loss_k in nats.
    tokens: each completion token's own scores (nats of that token's loss; see
    :mod:`stride_viz.method.tokens`), or None when the attribution was made without them.
    """

    query: Query
    responses: np.ndarray
    recovery: Recovery
    info: dict
    folder: Path
    tokens: Optional[TokenRecovery] = None

    @property
    def scores(self) -> np.ndarray:
        return self.recovery.scores

    def order(self, sign: int = 1) -> np.ndarray:
        """All pool indices from the strongest proponent (sign=1) or opponent (sign=-1) down;
        examples the Lasso left at 0 are ordered by their back-projection."""
        key = sign * self.recovery.scores.astype(np.float64)
        tie = sign * self.recovery.backprojection.astype(np.float64)
        return np.lexsort((-tie, -key))

    def top(self, n: int = 10, sign: int = 1) -> np.ndarray:
        """Pool indices of the ``n`` strongest proponents (sign=1) or opponents (sign=-1)."""
        return self.order(sign)[:n]

    def ranking(self) -> np.ndarray:
        """float64 (n,): higher = more helpful, consistent with :meth:`order` (for rank metrics)."""
        rank = np.empty(self.scores.shape[0])
        rank[self.order(1)] = -np.arange(self.scores.shape[0], dtype=np.float64)
        return rank


class Stride:
    """A STRIDE run: a model, a pool, a FitConfig and a run directory."""

    def __init__(self, store: RunStore, model: LoadedModel, pool: Pool, config: FitConfig) -> None:
        self.store, self.model, self.pool, self.config = store, model, pool, config
        keep_freed_memory()               # large per-step tensors: no page faults each step
        self.lm = FrozenLM(model.model, config.layer)
        distributed.init(self.lm.device)  # joins a torchrun launch; nothing for one process
        self._operators: Optional[SteeringOperators] = None
        self._recoverer: Optional[Recoverer] = None
        self._recoverer_config: Optional[RecoveryConfig] = None

    # ------------------------------------------------------------------ opening
    @classmethod
    def create_or_open(cls, run_dir: str | Path, model: LoadedModel, pool: Pool,
                       config: FitConfig) -> "Stride":
        """Open ``run_dir`` if it was made with the same model, pool and config (refused with
        the list of differences otherwise), or create it: design the subsets and write the
        metadata."""
        if len(pool) == 0:
            raise ConfigError("The training pool is empty: give a pool with at least one example.")
        need = -(-config.subsets // config.per_example)
        if len(pool) < need:
            raise ConfigError(
                f"The pool has {len(pool)} examples, fewer than the {need} that {config.subsets} "
                f"subsets with {config.per_example} subsets per example need. Lower --subsets "
                f"(at most {len(pool) * config.per_example}) or use a larger pool.")
        store = RunStore(run_dir)
        self = cls(store, model, pool, config)
        meta = self._meta()
        design = lambda: design_subsets(len(pool), config.subsets, config.per_example, config.seed)

        def prepare():
            if store.exists():
                # a damaged run.json, pool or design is repaired from what was given (one warning)
                store.check_meta(meta, repair=True)
                store.check_pool(pool)
            else:
                store.root.mkdir(parents=True, exist_ok=True)
                store.write_pool(pool)
                store.write_membership(design())
                store.write_meta(meta)  # last: a run.json means the rest is on disk
            return store.read_membership(rebuild=design)

        # under torchrun rank 0 alone writes the run folder; the others receive the design
        self.membership = distributed.from_writer(prepare)
        return self

    @classmethod
    def open(cls, run_dir: str | Path, device: str = "auto", trust_remote_code: bool = False,
             repair: bool = False) -> "Stride":
        """Reopen a run from its directory alone (loads the model named in run.json). Its
        files are checked first: a damaged one raises RunDamaged naming the fix, or, with
        ``repair`` (a fit), run.json and the design are restored with a warning."""
        store = RunStore(run_dir)
        distributed.init(resolve_device(device))

        def read():
            meta = store.read_meta(repair=repair)
            config = FitConfig.from_stored({**meta["config"], "device": device})
            problem = store.operators_problem() if store.is_fitted() and not repair else None
            if problem:  # found before the model is loaded; a fit (repair) rebuilds them
                raise store.damaged_operators(problem)
            pool = store.read_pool()
            design = lambda: design_subsets(len(pool), config.subsets, config.per_example, config.seed)
            return meta, config, pool, store.read_membership(rebuild=design if repair else None)

        # under torchrun rank 0 reads (and repairs) the folder; the others receive what it read
        meta, config, pool, membership = distributed.from_writer(read)
        model = load_model(meta["model"]["spec"], device=device, trust_remote_code=trust_remote_code)
        if model.hash != meta["model"]["hash"]:
            raise RunMismatch(f"The model {meta['model']['spec']} has changed since the run "
                              f"{store.root} was fitted (weights hash {model.hash}, run has "
                              f"{meta['model']['hash']}). Fit a new run for the new weights.")
        self = cls(store, model, pool, config)
        self.membership = membership
        return self

    def _meta(self) -> dict:
        cut = self.lm.cut
        return {
            "config": self.config.fingerprint(),
            "model": {"spec": self.model.spec, "hash": self.model.hash},
            "pool": {"spec": self.pool.name, "hash": self.pool.hash, "n": len(self.pool)},
            "packages": _versions(), "created": _now(),
            "layer": cut.layer, "n_layers": cut.n_layers, "d_model": cut.d_model, "vocab": cut.vocab,
        }

    @property
    def max_tokens(self) -> int:
        cfg = self.model.model.config
        return int(getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None) or 1024)

    # ------------------------------------------------------------------ stages 1-2
    def fit(self, progress: Callable[..., None] = no_progress,
            should_stop: Callable[[], bool] = lambda: False, wait: bool = False,
            restart: bool = False) -> None:
        """Train the operators, resuming from the newest intact checkpoint; a no-op when the
        run is already fitted (damaged operators are set aside and rebuilt).

        The fit holds the run folder's writer lock (:mod:`stride_viz.runlock`): while another
        process fits this folder it raises RunLocked, or with ``wait`` waits for it and then
        reuses its result. ``restart`` discards the checkpoints and the operators first (run.json,
        the pool, the design and the attributions are kept)."""
        # under torchrun rank 0 alone takes the lock, decides and writes; the others follow it
        if not restart and distributed.from_writer(lambda: self._reusable(progress)):
            return
        with distributed.writer_context(lambda: run_lock(self.store.root, "fit", wait=wait,
                                                         should_stop=should_stop)):
            if restart:
                distributed.from_writer(self.store.discard_fit)
                self._operators = None
            elif distributed.from_writer(lambda: self._reusable(progress, repair=True)):
                return                                   # the fit we waited for wrote them
            self._fit(progress, should_stop)

    def _reusable(self, progress: Callable[..., None], repair: bool = False) -> bool:
        """Whether intact operators are already on disk; with ``repair`` (under the lock),
        damaged ones are set aside with a warning so that the fit rebuilds them."""
        if not self.store.is_fitted():
            return False
        problem = self.store.operators_problem()
        if problem is None:
            progress("fit", 1.0, 0.0, "operators already fitted: reused")
            return True
        if repair:
            warn(f"warning: {self.store.operators_path} is damaged ({problem}); set aside as "
                 f"{set_aside(self.store.operators_path).name}, rebuilding it")
        return False

    def _fit(self, progress: Callable[..., None], should_stop: Callable[[], bool]) -> None:
        t0 = time.monotonic()
        torch.manual_seed(self.config.seed)
        max_len = min(self.config.max_length, self.max_tokens)
        tokens = tokenize_pool(self.model.tokenizer, self.pool.prompts, self.pool.completions, max_len)
        if not tokens.scored.any():
            raise ConfigError("No training example has a token to learn from (all completions are "
                              "empty or cut off): check the pool's completion column and --max-length.")
        cfg = self.config
        cache = build_cache(self.lm, tokens, cfg.mode, cfg.vocabulary, memory_mb=cfg.cache_memory_mb,
                            work_dir=self.store.fit_dir, precision=cfg.precision, kind=cfg.cache,
                            progress=progress)
        record = None
        try:
            if cfg.solver == "gauss-newton":     # closed form: no optimiser, no checkpoint
                operators, record = gauss_newton_operators(self.lm, cache, self.membership, cfg,
                                                           progress, should_stop)
            else:
                trainer = Trainer(self.lm, cache, self.membership, cfg)
                trainer.train(self.store.fit_dir, progress=progress, should_stop=should_stop)
                operators = trainer.operators
        finally:
            cache.close()

        def write() -> None:  # rank 0 alone under torchrun: every rank holds these operators
            self.store.write_operators(operators.to_tensors())
            if not cfg.keep_checkpoint:   # the fit is done: its checkpoints are ~3x the operators
                for name in (CHECKPOINT, PREVIOUS):
                    (self.store.fit_dir / name).unlink(missing_ok=True)
            # the trainer's checkpoints keep state.json; the closed form has only its record
            state = record if record is not None else read_json(self.store.fit_dir / "state.json")
            state.update(seconds=time.monotonic() - t0, finished=_now(),
                         truncated_examples=tokens.truncated, processes=distributed.world_size())
            write_json(self.store.fit_dir / "state.json", state)

        distributed.from_writer(write)
        self._operators = operators.eval()

    @property
    def operators(self) -> SteeringOperators:
        if self._operators is None:
            if not self.store.is_fitted():
                raise RuntimeError(f"The run {self.store.root} has no fitted operators yet: run "
                                   "fit() (CLI: python -m stride_viz fit) first.")
            tensors = self.store.read_operators(device=str(self.lm.device))
            try:
                ops = SteeringOperators.from_tensors(tensors, rms_scale=self.config.mode == "residual")
                design = "memory" if ops.gated is not None else "linear"
                if self.config.mode == "residual" and design != self.config.residual_design:
                    raise ValueError(f"a {design} residual design, the run's settings say "
                                     f"{self.config.residual_design}")
            except (KeyError, ValueError, RuntimeError) as e:
                raise self.store.damaged_operators(f"not the operators of this run: "
                                                   f"{str(e).splitlines()[0][:120]}") from None
            if ops.n_operators != self.membership.shape[0]:
                raise self.store.damaged_operators(f"{ops.n_operators} operators, the design "
                                                   f"has {self.membership.shape[0]} subsets")
            self._operators = ops.to(self.lm.device).eval()
        return self._operators

    # ------------------------------------------------------------------ stages 3-4
    def recoverer(self, config: RecoveryConfig) -> Recoverer:
        if self._recoverer is None or self._recoverer_config != config:
            self._recoverer = Recoverer(self.membership, config)
            self._recoverer_config = config
        return self._recoverer

    def _complete(self, query: Query) -> tuple[Query, bool]:
        if query.completion:
            return query, False
        text = generate(self.lm, self.model.tokenizer, query.prompt, GENERATED_TOKENS,
                        max_length=self.max_tokens)[0]
        if not text.strip():
            raise QueryError(f"The model produced no completion for query {query.id!r}; give a "
                             "completion to explain.")
        return Query(query.id, query.prompt, text), True

    def _encode_query(self, query: Query):
        enc = encode(self.model.tokenizer, [query.prompt], [query.completion or ""], 10**9)
        n_tokens = int(enc.attention_mask.sum())
        if n_tokens > self.max_tokens:
            raise QueryError(f"Query {query.id!r} is {n_tokens} tokens long; this model reads at "
                             f"most {self.max_tokens}. Shorten the prompt or the completion.")
        if int(enc.loss_mask.sum()) == 0:
            raise QueryError(f"Query {query.id!r} has no completion token to explain: give a "
                             "non-empty completion (or none, to let the model complete it).")
        return enc

    def check_query(self, query: Query) -> None:
        """Raise :class:`QueryError` (one line saying what to change) if ``query``, which has a
        completion, cannot be explained by this run: too long for the model, or no completion
        token to score. Cheap (tokenisation only): check a batch before spending time on it."""
        self._encode_query(query)

    def measure(self, query: Query) -> QueryResponses:
        """Stage 3 alone: the K responses of a query with a completion."""
        return measure(self.lm, self.operators, self.config.mode, self._encode_query(query),
                       precision=self.config.precision)[0]

    def attribute(self, queries: Sequence[Query], recovery: RecoveryConfig = RecoveryConfig(),
                  progress: Callable[..., None] = no_progress,
                  continuations: bool = True, per_token: bool = False) -> list["Attribution"]:
        """Explain each query: generate a missing completion, measure the K responses, recover
        the scores, and write everything under ``attributions/<query id>/``. ``per_token``:
        also recover each completion token's own scores (tokens.npz, one recovery per token;
        see :mod:`stride_viz.method.tokens`)."""
        ops = self.operators
        ids = [q.id for q in queries]
        if len(set(ids)) != len(ids):
            raise QueryError("Query ids must be unique within one call; got duplicates: "
                             f"{sorted({i for i in ids if ids.count(i) > 1})}.")
        # validate every query before spending time on any of them
        for q in queries:
            if q.completion:
                self.check_query(q)
            elif not q.prompt:
                raise QueryError(f"Query {q.id!r} has neither a prompt nor a completion.")
        timer = StageTimer("attribute", len(queries), progress, min_interval=0.0)
        results, pending = [], []
        for done, q in enumerate(queries):
            t0 = time.monotonic()
            q, generated = self._complete(q)
            measured = measure(self.lm, ops, self.config.mode, self._encode_query(q),
                               precision=self.config.precision)[0]
            t1 = time.monotonic()
            rec = self.recoverer(recovery).recover(measured.responses)
            t2 = time.monotonic()
            tokens = self._recover_tokens(measured, rec, recovery) if per_token else None
            pending.append((q, generated, measured, rec, t1 - t0, t2 - t1, tokens))
            # continuations of up to CONTINUATION_BATCH queries share one generation batch
            # (one model pass per new token for all of them); each group is written before
            # the next is measured, so a stop loses at most one group
            if not continuations or len(pending) == CONTINUATION_BATCH or done == len(queries) - 1:
                texts = self._continuations([(p[0], p[2].responses) for p in pending]) if continuations \
                    else [None] * len(pending)
                for (q_, gen_, meas_, rec_, s_resp, s_rec, tok_), cont in zip(pending, texts):
                    results.append(self._write(q_, gen_, meas_, rec_, recovery, s_resp, s_rec, cont, tok_))
                pending = []
            timer.update(done + 1, f"explained {q.id}")
        return results

    def _write(self, q: Query, generated: bool, measured: QueryResponses, rec: Recovery,
               recovery: RecoveryConfig, s_resp: float, s_rec: float,
               continuations: Optional[dict],
               tokens: Optional[tuple[TokenRecovery, float]] = None) -> "Attribution":
        tok = self.model.tokenizer
        info = {"id": q.id, "prompt": q.prompt, "completion": q.completion,
                "completion_generated": generated,
                "tokens": [tok.decode([int(t)]) for t in measured.token_ids],
                "token_loss": [float(x) for x in measured.token_loss],
                "loss_base": measured.loss_base}
        # written whole into a private folder, then swapped in (see RunStore.writing_attribution)
        with self.store.writing_attribution(q.id) as folder:
            write_json(folder / "query.json", info)
            np.save(folder / "responses.npy", measured.responses.astype(np.float32))
            save_recovery(rec, folder)
            if tokens is not None:
                save_tokens(tokens[0], folder)
            if continuations is not None:
                write_json(folder / "continuations.json", continuations)
            write_json(folder / "meta.json", {"seconds_responses": s_resp, "seconds_recovery": s_rec,
                                              **({"seconds_tokens": tokens[1]} if tokens else {}),
                                              "recovery_config": recovery.to_dict(), "created": _now()})
        return Attribution(q, measured.responses, rec, info, self.store.attribution_dir(q.id),
                           tokens[0] if tokens else None)

    def _recover_tokens(self, measured: QueryResponses, rec: Recovery, recovery: RecoveryConfig,
                        should_stop: Callable[[], bool] = lambda: False) -> tuple[TokenRecovery, float]:
        """Each completion token's scores (same recoverer and lambda rule as the whole
        completion's) and the seconds they took."""
        t0 = time.monotonic()
        tok = recover_tokens(self.recoverer(recovery), measured.token_responses, rec, measured.responses,
                             should_stop)
        return tok, time.monotonic() - t0

    def attribute_tokens(self, query_id: str,
                         should_stop: Callable[[], bool] = lambda: False) -> "Attribution":
        """Add per-token scores (tokens.npz) to a query this run has explained already (an
        attribution made without them), with the RecoveryConfig it was explained with; the
        rest of its folder is kept as it is. Returns the attribution, re-read. ``should_stop``
        is asked before each token and within its solve: True raises Cancelled and writes nothing."""
        a = read_attribution(self.store.root, query_id)
        folder = self.store.attribution_dir(query_id)
        meta = read_json(folder / "meta.json", fix=self.store.attribution_fix(query_id))
        known = set(RecoveryConfig.__dataclass_fields__)
        recovery = RecoveryConfig(**{k: v for k, v in (meta.get("recovery_config") or {}).items()
                                     if k in known})
        t0 = time.monotonic()
        measured = self.measure(a.query)
        # the stored scores must come from these operators (a refit keeps old attributions)
        if (measured.responses.shape != a.responses.shape
                or not np.allclose(measured.responses, a.responses, rtol=1e-3, atol=1e-4)):
            raise QueryError(f"Query {query_id!r} was explained with other operators than the run's "
                             f"current ones (its stored responses differ): explain it again with "
                             f"per-token scores (`python -m stride_viz attribute --run {self.store.root} "
                             f"--queries FILE --per-token`, or the dashboard).")
        s_resp = time.monotonic() - t0
        tok, seconds = self._recover_tokens(measured, a.recovery, recovery, should_stop)
        with self.store.updating_attribution(query_id) as folder:
            save_tokens(tok, folder)
            meta = read_json(folder / "meta.json")
            meta.update(seconds_tokens=seconds, seconds_token_responses=s_resp)
            write_json(folder / "meta.json", meta)
        return read_attribution(self.store.root, query_id)

    def _continuations(self, items: Sequence[tuple[Query, np.ndarray]]) -> list[dict]:
        """Per (query, responses): the base continuation of its prompt and those steered by
        its CONTINUATION_OPERATORS most and least responsive operators (continuations.json),
        generated for all the queries in one batch."""
        picks = []
        for _q, responses in items:
            order = np.argsort(-responses)
            picks.append(list(dict.fromkeys(int(k) for k in list(order[:CONTINUATION_OPERATORS])
                                            + list(order[::-1][:CONTINUATION_OPERATORS]))))
        texts = generate_many(self.lm, self.model.tokenizer,
                              [(q.prompt, [None] + ks) for (q, _r), ks in zip(items, picks)],
                              CONTINUATION_TOKENS, operators=self.operators, mode=self.config.mode,
                              max_length=self.max_tokens)
        return [{"prompt": q.prompt, "base": t[0],
                 "operators": [{"k": k, "response": float(r[k]), "text": text} for k, text in zip(ks, t[1:])]}
                for (q, r), ks, t in zip(items, picks, texts)]

    def _generate(self, prompt: str, ks: list) -> list[str]:
        return generate(self.lm, self.model.tokenizer, prompt, CONTINUATION_TOKENS,
                        operators=self.operators, mode=self.config.mode, ks=ks,
                        max_length=self.max_tokens)

    def add_continuations(self, query_id: str) -> None:
        """Write the base and steered continuations of an explained query (what
        ``attribute(continuations=True)`` writes), e.g. after its scores are on screen."""
        a = read_attribution(self.store.root, query_id)
        data = self._continuations([(a.query, a.responses)])[0]
        with self.store.updating_attribution(query_id) as folder:
            write_json(folder / "continuations.json", data)

    def continuation(self, query_id: str, k: int) -> str:
        """The continuation of a query's prompt steered by operator ``k``; added to the query's
        continuations.json (the app's 'continue with this operator' job)."""
        K = self.membership.shape[0]
        if not 0 <= k < K:
            raise ConfigError(f"The operator index must be in [0, {K - 1}]. Got {k} instead.")
        folder = self.store.attribution_dir(query_id)
        if not (folder / "query.json").exists():
            raise QueryError(f"The run has no attribution for query {query_id!r}.")
        fix = self.store.attribution_fix(query_id)
        info = read_json(folder / "query.json", fix=fix)
        responses = read_checked(folder / "responses.npy", np.load, fix)
        text = self._generate(info["prompt"], [k])[0]
        with self.store.updating_attribution(query_id) as folder:  # one writer at a time
            path = folder / "continuations.json"
            data = read_json(path) if path.exists() else {"prompt": info["prompt"], "operators": []}
            data["operators"] = [o for o in data["operators"] if o["k"] != k]
            data["operators"].append({"k": k, "response": float(responses[k]), "text": text})
            write_json(path, data)
        return text


def read_attribution(run_dir: str | Path, query_id: str) -> Attribution:
    """Reread a finished attribution from disk (numpy only, no model); a damaged file raises
    RunDamaged naming it."""
    store = RunStore(run_dir)
    folder = store.attribution_dir(query_id)
    if not (folder / "meta.json").exists():
        raise FileNotFoundError(f"No finished attribution for query {query_id!r} in {run_dir}.")
    fix = store.attribution_fix(query_id)
    info = read_json(folder / "query.json", fix=fix)
    arrays = {name: read_checked(folder / name, np.load, fix)
              for name in ("responses.npy", "scores.npy", "backprojection.npy")}
    recovery = read_checked(folder / "path.npz", lambda p: load_recovery(p.parent), fix)
    if arrays["scores.npy"].shape != arrays["backprojection.npy"].shape:
        raise RunDamaged(folder / "scores.npy", "is damaged (its shape differs from "
                         "backprojection.npy's)", fix)
    query = Query(info["id"], info["prompt"], info["completion"])
    tokens = read_checked(folder / TOKENS_FILE, lambda p: load_tokens(p.parent), fix) \
        if (folder / TOKENS_FILE).exists() else None    # None: made without per-token scores
    return Attribution(query, arrays["responses.npy"], recovery, info, folder, tokens)
