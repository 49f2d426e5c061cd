"""The cost-bounding machinery of stage 2: the restricted-vocabulary losses are exact, the
cache kinds (memory, disk, stream) do not change a fit, chunked losses equal unchunked ones,
and operator sizes do not grow with the vocabulary in factored mode."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_FIT
from stride_viz.config import FitConfig
from stride_viz.data.tokenize import encode
from stride_viz.engine import Stride
from stride_viz.method import logits as L
from stride_viz.method import training
from stride_viz.method.cache import build_cache, tokenize_pool
from stride_viz.method.frozen import FrozenLM
from stride_viz.method.subsets import design_subsets
from stride_viz.method.training import Trainer


def _restricted(V=50, C=12, shape=(3, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, V, generator=g, dtype=torch.float64) * 3
    cols = torch.randperm(V, generator=g)[:C].sort().values
    shift = torch.randn(*shape, C, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, shape, generator=g)
    outside = logits.clone()
    outside[..., cols] = float("-inf")
    rest = torch.logsumexp(outside, -1)
    full = logits.clone()
    full[..., cols] += shift
    return logits, cols, shift, targets, rest, full


def test_restricted_nll_equals_full_cross_entropy():
    logits, cols, shift, targets, rest, full = _restricted()
    col = L.target_columns(targets, cols, logits.shape[-1])
    assert (col >= 0).any() and (col < 0).any()      # targets inside and outside C
    base_t = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ours = L.steered_nll(logits[..., cols], shift, rest, base_t, col)
    ref = F.cross_entropy(full.flatten(0, -2), targets.flatten(), reduction="none").view_as(ours)
    torch.testing.assert_close(ours, ref)
    base = L.steered_nll(logits[..., cols], None, rest, base_t, col)
    torch.testing.assert_close(base, F.cross_entropy(logits.flatten(0, -2), targets.flatten(),
                                                     reduction="none").view_as(base))


def test_restricted_kl_equals_full_kl():
    logits, cols, shift, _, rest, full = _restricted(seed=1)
    ours = L.kl_to_steered(logits[..., cols], shift, rest)
    ref = F.kl_div(torch.log_softmax(full, -1), torch.log_softmax(logits, -1), log_target=True,
                   reduction="none").sum(-1)
    torch.testing.assert_close(ours, ref)
    assert (ours > 0).all()


def test_tokenize_pool_matches_encode(tiny_model, tiny_pool):
    tok = tiny_model.tokenizer
    tokens = tokenize_pool(tok, tiny_pool.prompts, tiny_pool.completions, 32)
    enc = encode(tok, tiny_pool.prompts, tiny_pool.completions, 32)
    for i in (0, 7, len(tiny_pool) - 1):
        L_ = int(enc.attention_mask[i].sum())
        lo, hi = tokens.offsets[i], tokens.offsets[i + 1]
        assert hi - lo == L_
        assert (tokens.ids[lo:hi] == enc.input_ids[i, :L_].numpy()).all()
        assert (tokens.scored[lo:hi] == (enc.loss_mask[i, :L_].numpy() > 0)).all()
    assert tokens.truncated == int(enc.truncated.sum())


def _fit_operators(tmp_path, tiny_model, tiny_pool, name, **kw):
    cfg = FitConfig(**{**TINY_FIT, "epochs": 1, **kw})
    run = Stride.create_or_open(tmp_path / name, tiny_model, tiny_pool, cfg)
    run.fit()
    assert not list(run.store.fit_dir.glob("cache-*")), "the disk cache is removed after the fit"
    return {k: v.clone() for k, v in run.operators.state_dict().items()}


@pytest.mark.parametrize("mode", ["factored", "residual"])
def test_cache_kinds_give_the_same_fit(tmp_path, tiny_model, tiny_pool, mode):
    memory = _fit_operators(tmp_path, tiny_model, tiny_pool, "memory", mode=mode, cache="memory")
    disk = _fit_operators(tmp_path, tiny_model, tiny_pool, "disk", mode=mode, cache="disk")
    stream = _fit_operators(tmp_path, tiny_model, tiny_pool, "stream", mode=mode, cache="stream")
    for k in memory:
        assert torch.equal(memory[k], disk[k]), k
        torch.testing.assert_close(memory[k], stream[k], atol=2e-4, rtol=1e-3)


def test_disk_cache_is_used_above_the_memory_limit(tmp_path, tiny_model, tiny_pool):
    lm = FrozenLM(tiny_model.model, layer=1)
    tokens = tokenize_pool(tiny_model.tokenizer, tiny_pool.prompts, tiny_pool.completions, 32)
    cache = build_cache(lm, tokens, "factored", memory_mb=0.001, work_dir=tmp_path)
    assert cache.on_disk and (tmp_path / "cache-final.f16").exists()
    mem = build_cache(lm, tokens, "factored", memory_mb=1e6, work_dir=tmp_path / "m")
    assert not mem.on_disk
    idx = np.array([[0, 5, 9], [3, 3, 1]])
    assert torch.equal(cache.final.take(idx), mem.final.take(idx))
    cache.close()
    assert not (tmp_path / "cache-final.f16").exists()


@pytest.mark.parametrize("mode", ["factored", "residual"])
def test_chunked_losses_equal_one_chunk(tiny_model, tiny_pool, monkeypatch, mode):
    lm = FrozenLM(tiny_model.model, layer=1)
    tokens = tokenize_pool(tiny_model.tokenizer, tiny_pool.prompts, tiny_pool.completions, 32)
    cache = build_cache(lm, tokens, mode)
    M = design_subsets(len(tiny_pool), 16, 4, seed=0)
    cfg = FitConfig(**{**TINY_FIT, "subsets": 16, "mode": mode, "stability_weight": 1.0})

    def grads(budget):
        monkeypatch.setattr(training, "LOSS_CHUNK_ELEMENTS", budget)
        trainer = Trainer(lm, cache, M, cfg)
        with torch.no_grad():
            trainer.operators.A.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
        loss, _ = trainer._loss(0)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in trainer.operators.parameters()]

    one, g_one = grads(1 << 30)
    many, g_many = grads(256)         # forces a chunk per (example, few operators)
    torch.testing.assert_close(one, many)
    for a, b in zip(g_one, g_many):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_factored_operators_do_not_grow_with_the_vocabulary(tmp_path, tiny_model, tiny_pool):
    cfg = FitConfig(**{**TINY_FIT, "epochs": 0.2, "mode": "factored", "vocabulary": "full"})
    run = Stride.create_or_open(tmp_path / "f", tiny_model, tiny_pool, cfg)
    run.fit()
    ops = run.operators
    K, r, r2, V = cfg.subsets, cfg.rank, cfg.inner_rank, run.lm.cut.vocab
    assert tuple(ops.A.shape) == (K, r, r2) and tuple(ops.U.shape) == (r2, V)
    pool_cfg = FitConfig(**{**TINY_FIT, "epochs": 0.2, "mode": "factored"})
    pooled = Stride.create_or_open(tmp_path / "p", tiny_model, tiny_pool, pool_cfg)
    pooled.fit()
    cols = pooled.operators.columns
    assert 0 < cols.numel() < V and pooled.operators.U.shape[1] == cols.numel()


def test_subset_losses_equal_full_cross_entropy():
    V, W = 40, 9
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, V, generator=g, dtype=torch.float64) * 2
    cols = torch.randperm(V, generator=g)[:W]
    for scale in (0.5, 30.0):                     # small shifts, and ones past the overflow guard
        shift = torch.randn(2, 3, W, generator=g, dtype=torch.float64) * scale
        target = torch.tensor([[cols[0], cols[3], 7], [cols[8], 1, cols[2]]])
        full = logits.clone()
        full[..., cols] += shift
        lp = torch.log_softmax(logits, -1)
        lp_k = lp[..., cols]
        is_t = cols.view(1, 1, W) == target.unsqueeze(-1)
        lp_t = lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        ref = F.cross_entropy(full.flatten(0, 1), target.flatten(), reduction="none").view(2, 3)
        torch.testing.assert_close(L.subset_nll(lp_k, shift, lp_t, is_t), ref)
        kl = F.kl_div(torch.log_softmax(full, -1), lp, log_target=True, reduction="none").sum(-1)
        torch.testing.assert_close(L.subset_kl(lp_k, shift), kl)
    zero = torch.zeros(2, 3, W, dtype=torch.float64)
    assert torch.equal(L.subset_terms(lp_k, zero), torch.zeros(2, 3, dtype=torch.float64))
