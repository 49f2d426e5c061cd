"""Stages 1-3 and the facade, on the tiny model and pool of conftest.py (known answers)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from stride_viz.config import ConfigError, FitConfig, RecoveryConfig
from stride_viz.demo import fact_metrics
from stride_viz.engine import QueryError, RunMismatch, Stride, read_attribution
from stride_viz.method.measurement import steered_logits
from stride_viz.method.frozen import FrozenLM
from stride_viz.method.operators import SteeringOperators
from stride_viz.data.pools import Query, fact_queries
from stride_viz.progress import Cancelled
from stride_viz.method.subsets import design_subsets, subsets_of

from conftest import TINY_FIT


# ------------------------------------------------------------------ stage 1
def test_design_is_left_regular_balanced_and_seeded():
    M = design_subsets(500, 64, 6, seed=3)
    assert M.shape == (64, 500)
    assert (np.asarray(M.sum(0)).ravel() == 6).all()            # every example in exactly d
    rows = np.asarray(M.sum(1)).ravel()
    assert rows.max() - rows.min() <= 1                          # subsets balanced
    assert len({tuple(r) for r in subsets_of(M)}) > 450          # no degenerate repetition
    assert (design_subsets(500, 64, 6, seed=3) != M).nnz == 0    # same seed, same design
    assert (design_subsets(500, 64, 6, seed=4) != M).nnz > 0     # other seed, other design


def test_design_refuses_a_pool_too_small():
    with pytest.raises(ValueError, match="at least 16 examples"):
        design_subsets(10, 64, 4, seed=0)


# ------------------------------------------------------------------ stage 2-3 building blocks
@pytest.mark.parametrize("mode", ["logits", "residual"])
def test_zero_operator_leaves_logits_bit_for_bit_unchanged(tiny_model, mode):
    lm = FrozenLM(tiny_model.model, layer=1)
    out = lm.cut.vocab if mode == "logits" else lm.cut.d_model
    ops = SteeringOperators(8, lm.cut.d_model, 4, out, torch.Generator().manual_seed(0))
    ids = torch.tensor([[0, 5, 9, 23, 41, 7]])
    att = torch.ones_like(ids)
    base = steered_logits(lm, None, mode, ids, att, torch.tensor([-1]))
    steered = steered_logits(lm, ops, mode, ids, att, torch.tensor([3]))
    assert torch.equal(base, steered)
    reference = tiny_model.model(input_ids=ids, attention_mask=att).logits
    assert torch.equal(base, reference)
    with torch.no_grad():
        ops.A.normal_()
    assert not torch.equal(base, steered_logits(lm, ops, mode, ids, att, torch.tensor([3])))


def test_upper_stack_from_cache_matches_full_forward(tiny_model):
    lm = FrozenLM(tiny_model.model, layer=1)
    ids = torch.tensor([[0, 5, 9, 23, 41, 7], [0, 8, 8, 3, 0, 0]])
    att = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])
    lower, final = lm.hidden(ids, att)
    again = lm.upper_hidden(lower, ids, att)
    assert torch.allclose(again[0], final[0], atol=1e-5)
    assert torch.allclose(again[1, :4], final[1, :4], atol=1e-5)
    # the swapped blocks are back in place afterwards
    assert torch.equal(tiny_model.model(input_ids=ids).logits, lm.logits(lm.hidden(ids, torch.ones_like(ids))[1]))


def test_layer_out_of_range_is_refused(tiny_model):
    with pytest.raises(ValueError, match=r"'layer' parameter must be in \[1, 2\]"):
        FrozenLM(tiny_model.model, layer=5)


# ------------------------------------------------------------------ fitting
def _fit(tmp_path, model, pool, name, **kw):
    cfg = FitConfig(**{**TINY_FIT, "epochs": 2, **kw})
    run = Stride.create_or_open(tmp_path / name, model, pool, cfg)
    run.fit()
    return run


def test_same_seed_same_operators_other_seed_differs(tmp_path, tiny_model, tiny_pool):
    a = _fit(tmp_path, tiny_model, tiny_pool, "a", seed=1).operators.A.detach()
    b = _fit(tmp_path, tiny_model, tiny_pool, "b", seed=1).operators.A.detach()
    c = _fit(tmp_path, tiny_model, tiny_pool, "c", seed=2).operators.A.detach()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("mode", ["logits", "residual"])
def test_killed_fit_resumes_to_the_uninterrupted_result(tmp_path, tiny_model, tiny_pool, mode):
    # with the stability loss on (off by default), so its random outside draws resume too
    kw = dict(mode=mode, epochs=2, checkpoint_every=3, stability_weight=1.0)
    whole = _fit(tmp_path, tiny_model, tiny_pool, "whole", **kw)
    import json
    hist = json.loads((whole.store.fit_dir / "state.json").read_text())["history"]
    # KL >= 0 up to float rounding (residual mode recomputes the upper blocks: ~1e-9 at step 0)
    assert all(h["stab"] >= -1e-6 for h in hist) and max(h["stab"] for h in hist) > 0
    cfg = FitConfig(**{**TINY_FIT, **kw})
    run = Stride.create_or_open(tmp_path / "killed", tiny_model, tiny_pool, cfg)
    calls = iter(range(1000))
    with pytest.raises(Cancelled):
        run.fit(should_stop=lambda: next(calls) >= 7)           # stop after 7 steps
    assert not run.store.is_fitted()
    state = (run.store.fit_dir / "state.json").read_text()
    assert '"step": 7' in state
    resumed = Stride.create_or_open(tmp_path / "killed", tiny_model, tiny_pool, cfg)
    resumed.fit()
    assert torch.equal(resumed.operators.A, whole.operators.A)
    assert torch.equal(resumed.operators.basis, whole.operators.basis)


@pytest.mark.parametrize("mode", ["logits", "residual"])
def test_training_lowers_the_fidelity_loss(tmp_path, tiny_model, tiny_pool, mode):
    run = _fit(tmp_path, tiny_model, tiny_pool, f"loss-{mode}", mode=mode, epochs=4)
    import json
    hist = json.loads((run.store.fit_dir / "state.json").read_text())["history"]
    per_epoch = len(hist) // 4          # each epoch visits every example once: comparable
    first = np.mean([h["fid"] for h in hist[:per_epoch]])
    last = np.mean([h["fid"] for h in hist[-per_epoch:]])
    # residual operators of rank 4 on a width-32 model learn slowly (see the README's mode
    # comparison); both must still lower the loss of their own subsets
    assert last < first - (0.02 if mode == "logits" else 0.005), (mode, first, last)


def _drop_setting(run_dir, name: str, **replace) -> None:
    """Edit the stored config of a run (run.json and its copy) as an older version wrote it."""
    import json
    for file in ("run.json", "run.json.bak"):
        path = run_dir / file
        meta = json.loads(path.read_text())
        meta["config"].pop(name, None)
        meta["config"].update(replace)
        path.write_text(json.dumps(meta))


def test_residual_run_from_before_the_memory_design_still_opens(tmp_path, tiny_model, tiny_pool):
    run = _fit(tmp_path, tiny_model, tiny_pool, "old", mode="residual", residual_design="linear", epochs=1)
    assert run.operators.basis.dim() == 2 and run.operators.gated is None     # shared basis, linear
    before = run.attribute([Query("q", "The sky is", " blue")], continuations=False)[0].scores
    _drop_setting(run.store.root, "residual_design")
    old = Stride.open(run.store.root)
    assert old.config.residual_design == "linear"
    again = old.attribute([Query("q2", "The sky is", " blue")], continuations=False)[0].scores
    assert np.allclose(before, again)
    # the same settings reopen it; the new default (memory) is refused, naming the difference
    Stride.create_or_open(run.store.root, tiny_model, tiny_pool,
                          FitConfig(**{**TINY_FIT, "epochs": 1, "mode": "residual", "residual_design": "linear"}))
    with pytest.raises(RunMismatch, match=r"residual_design: None -> 'memory'"):
        Stride.create_or_open(run.store.root, tiny_model, tiny_pool,
                              FitConfig(**{**TINY_FIT, "epochs": 1, "mode": "residual"}))


def test_operators_of_another_residual_design_are_refused(tmp_path, tiny_model, tiny_pool):
    from stride_viz.integrity import RunDamaged
    run = _fit(tmp_path, tiny_model, tiny_pool, "lin", mode="residual", residual_design="linear", epochs=1)
    _drop_setting(run.store.root, "residual_design", residual_design="memory", memory_slots=64)
    with pytest.raises(RunDamaged, match="a linear residual design, the run's settings say memory"):
        Stride.open(run.store.root).operators


def test_memory_design_gives_every_operator_its_own_keys(tmp_path, tiny_model, tiny_pool):
    run = _fit(tmp_path, tiny_model, tiny_pool, "mem", mode="residual", memory_slots=5, epochs=1)
    ops = run.operators
    K = TINY_FIT["subsets"]
    assert ops.gated is not None and tuple(ops.basis.shape) == (K, 5, 32) and tuple(ops.A.shape) == (K, 5, 32)
    assert not torch.equal(ops.basis[0], ops.basis[1])          # trained, each its own
    assert run.config.fingerprint()["memory_slots"] == 5
    assert "memory_slots" not in FitConfig(**TINY_FIT).fingerprint()      # logits mode: not used
    assert "residual_design" not in FitConfig(mode="residual", residual_design="linear").fingerprint()


@pytest.mark.parametrize("design", ["memory", "linear"])
def test_residual_steered_loss_of_training_equals_the_measurement(tiny_model, tiny_pool, design):
    # the loss the operators are trained on is the one the responses report (same positions,
    # same shift), up to the 16-bit cache of the hidden states
    from stride_viz.data.tokenize import encode
    from stride_viz.method.cache import build_cache, tokenize_pool
    from stride_viz.method.measurement import measure
    from stride_viz.method.training import Trainer

    cfg = FitConfig(**{**TINY_FIT, "mode": "residual", "residual_design": design, "epochs": 1})
    lm = FrozenLM(tiny_model.model, 1)
    pool = tiny_pool.subset(range(6))
    tokens = tokenize_pool(tiny_model.tokenizer, pool.prompts, pool.completions, cfg.max_length)
    cache = build_cache(lm, tokens, cfg.mode)
    trainer = Trainer(lm, cache, design_subsets(len(tiny_pool), cfg.subsets, cfg.per_example, 0)[:, :6], cfg)
    with torch.no_grad():
        for p in trainer.operators.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(7))
        ops = torch.tensor([[0, 5, 11]] * 6)
        nll, _, base = trainer._pair_losses(np.arange(6), ops)
    enc = encode(tiny_model.tokenizer, pool.prompts, pool.completions, cfg.max_length)
    res = measure(lm, trainer.operators, "residual", enc)
    measured = torch.tensor([[r.loss_base - r.responses[k] for k in (0, 5, 11)] for r in res])
    assert (nll - base.unsqueeze(1)).abs().max() > 0.01          # the operators do shift
    torch.testing.assert_close(nll, measured, atol=2e-3, rtol=0)
    torch.testing.assert_close(base, torch.tensor([r.loss_base for r in res]), atol=2e-3, rtol=0)


def test_reopening_with_other_settings_is_refused_with_the_differences(tmp_path, tiny_model, tiny_pool):
    _fit(tmp_path, tiny_model, tiny_pool, "r", epochs=1)
    with pytest.raises(RunMismatch, match=r"rank: 4 -> 6.*new --run directory"):
        Stride.create_or_open(tmp_path / "r", tiny_model, tiny_pool, FitConfig(**{**TINY_FIT, "epochs": 1, "rank": 6}))
    with pytest.raises(RunMismatch, match="pool"):
        Stride.create_or_open(tmp_path / "r", tiny_model, tiny_pool.subset(range(100)),
                              FitConfig(**{**TINY_FIT, "epochs": 1}))


def test_pool_smaller_than_the_design_needs_is_refused(tmp_path, tiny_model, tiny_pool):
    small = tiny_pool.subset(range(5))
    with pytest.raises(ConfigError, match="fewer than the 12.*Lower --subsets"):
        Stride.create_or_open(tmp_path / "s", tiny_model, small, FitConfig(**TINY_FIT))
    assert not (tmp_path / "s").exists()


def test_config_out_of_range_names_the_parameter():
    with pytest.raises(ConfigError, match=r"'subsets' parameter of FitConfig must be an integer in the range \[2, 1000000\]. Got 0"):
        FitConfig(subsets=0)
    with pytest.raises(ConfigError, match="'mode'"):
        FitConfig(mode="middle")
    with pytest.raises(ConfigError, match="'selection'"):
        RecoveryConfig(selection="best")


# ------------------------------------------------------------------ stages 3-4 end to end
def test_planted_facts_are_found(fitted_run, tiny_pool):
    attributions = [read_attribution(fitted_run.store.root, q.id) for q in fact_queries(tiny_pool)]
    metrics = fact_metrics(tiny_pool, attributions)
    chance = 10 / len(tiny_pool)
    assert metrics["queries"] == len(tiny_pool.facts)
    assert metrics["recall_at_10"] >= 5 * chance, metrics
    assert metrics["mrr"] >= 0.4, metrics


def test_attribution_files_are_self_describing(fitted_run, tiny_pool):
    q = fact_queries(tiny_pool)[0]
    a = read_attribution(fitted_run.store.root, q.id)
    K = fitted_run.membership.shape[0]
    assert a.responses.shape == (K,) and a.responses.dtype == np.float32
    assert a.scores.shape == (len(tiny_pool),) and np.isfinite(a.scores).all()
    assert a.info["completion"] == q.completion and len(a.info["tokens"]) == len(a.info["token_loss"])
    import json
    cont = json.loads((a.folder / "continuations.json").read_text())
    assert cont["base"] is not None and len(cont["operators"]) >= 2
    assert fitted_run.store.query_ids()[0] == q.id


def test_missing_completion_is_generated_then_explained(fitted_run):
    [a] = fitted_run.attribute([Query("free", "A wise man", None)], continuations=False)
    assert a.info["completion_generated"] and a.info["completion"]
    assert np.isfinite(a.responses).all()


def test_operator_continuation_on_request(fitted_run, tiny_pool):
    q = fact_queries(tiny_pool)[0]
    text = fitted_run.continuation(q.id, 0)
    import json
    cont = json.loads((fitted_run.store.attribution_dir(q.id) / "continuations.json").read_text())
    assert any(o["k"] == 0 and o["text"] == text for o in cont["operators"])
    with pytest.raises(ConfigError, match="operator index"):
        fitted_run.continuation(q.id, 10_000)


def test_bad_queries_are_refused_before_any_work(fitted_run):
    before = set(fitted_run.store.query_ids())
    with pytest.raises(QueryError, match="this model reads at most 128"):
        fitted_run.attribute([Query("ok", "Hello", " there"), Query("long", "word " * 400, " end")])
    with pytest.raises(QueryError, match="unique"):
        fitted_run.attribute([Query("a", "x", " y"), Query("a", "x", " z")])
    # the same check, public for callers that batch queries (select, audit)
    with pytest.raises(QueryError, match="no completion token"):
        fitted_run.check_query(Query("empty", "Hello", ""))
    with pytest.raises(QueryError, match="reads at most 128"):
        fitted_run.check_query(Query("long", "word " * 400, " end"))
    fitted_run.check_query(Query("ok", "Hello", " there"))
    assert set(fitted_run.store.query_ids()) == before


@pytest.mark.parametrize("mode", ["logits", "residual"])
def test_generation_with_the_key_value_cache_equals_full_recomputation(tiny_model, mode):
    from stride_viz.method.measurement import generate, steered_logits
    lm = FrozenLM(tiny_model.model, layer=1)
    out = lm.cut.vocab if mode == "logits" else lm.cut.d_model
    ops = SteeringOperators(4, lm.cut.d_model, 4, out, torch.Generator().manual_seed(0))
    with torch.no_grad():
        ops.A.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    tok = tiny_model.tokenizer
    ks = [None, 2]
    texts = generate(lm, tok, "The sky is", 8, operators=ops, mode=mode, ks=ks)
    ids = tok("The sky is", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[tok.bos_token_id] + ids] * 2)
    sel = torch.tensor([-1, 2])
    new = [[], []]
    for _ in range(8):                    # greedy, recomputing the whole sequence every token
        nxt = steered_logits(lm, ops, mode, ids, torch.ones_like(ids), sel)[:, -1].argmax(-1)
        for b in range(2):
            new[b].append(int(nxt[b]))
        ids = torch.cat([ids, nxt.unsqueeze(1)], 1)
    expected = []
    for row in new:
        row = row[:row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
        expected.append(tok.decode(row, skip_special_tokens=True))
    assert texts == expected


def test_fidelity_temperature_softens_the_base_in_the_fidelity_loss_only(tiny_model, tiny_pool):
    from stride_viz.method.cache import build_cache, tokenize_pool
    from stride_viz.method.training import Trainer

    cfg = FitConfig(**TINY_FIT)
    lm = FrozenLM(tiny_model.model, cfg.layer)
    tokens = tokenize_pool(tiny_model.tokenizer, tiny_pool.prompts, tiny_pool.completions, cfg.max_length)
    cache = build_cache(lm, tokens, cfg.mode, cfg.vocabulary)
    membership = design_subsets(len(tiny_pool), cfg.subsets, cfg.per_example, cfg.seed)
    trainer = Trainer(lm, cache, membership, cfg)
    examples = np.arange(6)
    ops = trainer.member_of[torch.as_tensor(examples)][:, :2]
    # zero operators: the steered loss is the base model's cross-entropy at temperature T
    ids, msk = cache.scored_rows(examples, None, None)
    base_c = lm.column_logits(cache.final.take(ids), cache.columns).double()
    _, col = cache.targets_at(ids)
    rest = cache.rest_at(ids)
    msk = torch.as_tensor(msk, dtype=torch.float64)
    for t in (1.0, 2.5):
        logits = base_c / t
        full = torch.logsumexp(logits, -1)
        if rest is not None:
            full = torch.logaddexp(full, rest.double() / t)
        nll_t = full - torch.gather(logits, -1, col.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        want = (nll_t * msk).sum(-1) / msk.sum(-1)
        steered, _, base = trainer._pair_losses(examples, ops, temperature=t)
        assert torch.allclose(steered.double(), want.unsqueeze(1).expand(-1, 2), atol=1e-4), t
        # the base loss (what responses and the linearity loss compare with) stays at T = 1
        assert torch.allclose(base.double(), ((base_c.logsumexp(-1) if rest is None else
                                               torch.logaddexp(base_c.logsumexp(-1), rest.double()))
                                              - torch.gather(base_c, -1, col.clamp_min(0).unsqueeze(-1)).squeeze(-1)
                                              ).mul(msk).sum(-1).div(msk.sum(-1)), atol=1e-4)
    cache.close()


def test_fidelity_temperature_changes_the_fit_but_not_the_default_fingerprint(tmp_path, tiny_model, tiny_pool):
    assert "fidelity_temperature" not in FitConfig().fingerprint()       # older runs reopen unchanged
    assert FitConfig(fidelity_temperature=2.0).fingerprint()["fidelity_temperature"] == 2.0
    a = _fit(tmp_path, tiny_model, tiny_pool, "t1", epochs=1).operators.A.detach()
    b = _fit(tmp_path, tiny_model, tiny_pool, "t3", epochs=1, fidelity_temperature=3.0).operators.A.detach()
    assert not torch.equal(a, b)
    with pytest.raises(ConfigError, match="'fidelity_temperature' parameter of FitConfig must be a number"):
        FitConfig(fidelity_temperature=0)
    with pytest.raises(ConfigError, match="'fidelity_temperature'.*logits-space modes"):
        FitConfig(mode="residual", fidelity_temperature=2.0)
    with pytest.raises(ConfigError, match="'fidelity_temperature'.*logits-space modes"):
        FitConfig(vocabulary="subset", fidelity_temperature=2.0)
