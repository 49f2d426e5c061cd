"""Peer methods on a tiny GPT-2 (1 layer, width 32) trained for a few steps on 24 texts.

Known answer used throughout: a training example queried with its own text is among its
own strongest proponents (its loss gradient aligns with itself), so every method except
``random`` must give it a positive score near the top. This checks the sign convention
(>0 = lowers the query's loss) of each adapter.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from stride_viz.evaluation import baselines as B
from stride_viz.data.models import train_lm, train_tokenizer
from stride_viz.data.pools import Query, make_pool

WORDS = ("apple banana cherry dog eagle fish grape house island jungle kite lemon moon "
         "night ocean piano quartz river salt tiger").split()
# small settings so that the whole file runs in well under a minute on 2 cores
SMALL = {"trak": {"proj_dim": 16}, "tracin": {"proj_dim": 256}, "logra": {"proj_dim": 64},
         "if-arnoldi": {"proj_dim": 8, "max_iter": 30, "regularization": 1e-2}}
# a rank-8 Hessian approximation ranks less sharply than the exact gradient products
TOP = {"if-arnoldi": 5}


@pytest.fixture(scope="module")
def setup():
    from transformers import GPT2Config, GPT2LMHeadModel

    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, 6)) for _ in range(24)]
    heads = [" ".join(t.split()[:2]) + " " for t in texts]
    tails = [" ".join(t.split()[2:]) for t in texts]
    pool = make_pool("toy", [str(i) for i in range(24)], heads, tails)
    tok = train_tokenizer(texts, 300)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=32, n_layer=1,
                                       n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id))
    train_lm(model, tok, pool, steps=20, batch_size=8, lr=3e-3, seed=0, max_length=16)
    queries = [Query(id=str(i), prompt=heads[i], completion=tails[i]) for i in range(4)]
    return model, tok, pool, queries


# dattri's Arnoldi IF takes ~30 Hessian-vector products through forward-mode AD: over a
# minute even here, so it runs only when STRIDE_VIZ_SLOW_TESTS=1 (benchmarks/lds.py runs it)
SLOW = pytest.mark.skipif(os.environ.get("STRIDE_VIZ_SLOW_TESTS") != "1",
                          reason="slow; set STRIDE_VIZ_SLOW_TESTS=1")


@pytest.mark.parametrize("method", [pytest.param(m, marks=SLOW) if m == "if-arnoldi" else m
                                    for m in B.METHODS if m != "random"])
def test_self_is_a_top_positive_proponent(setup, method):
    model, tok, pool, queries = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # LoGra's hooks are compiled with torch.compile; compiling costs more than this tiny run
    with torch.compiler.set_stance("force_eager"):
        res = B.run_method(method, model, tok, pool, queries, max_length=16,
                           settings=SMALL.get(method))
    s = res.scores
    assert s.shape == (4, 24) and s.dtype == np.float32 and np.isfinite(s).all()
    for q in range(4):
        assert s[q, q] > 0, f"{method}: self score of query {q} is not positive"
        top = TOP.get(method, 3)
        assert (s[q] > s[q, q]).sum() < top, f"{method}: self is not among the top {top} for {q}"
    assert res.seconds_fit >= 0 and res.seconds_per_query > 0 and res.peak_rss_mb > 0
    assert res.settings["max_length"] == 16
    # the caller's model is untouched (gradient methods work on a copy)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_library_defaults_are_stated():
    for m in B.GRADIENT_METHODS:
        assert "library_defaults" in B.default_settings(m)


def test_random_is_seeded(setup):
    model, tok, pool, queries = setup
    a = B.run_method("random", model, tok, pool, queries, settings={"seed": 1}).scores
    b = B.run_method("random", model, tok, pool, queries, settings={"seed": 1}).scores
    c = B.run_method("random", model, tok, pool, queries, settings={"seed": 2}).scores
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_to_linear_keeps_the_function(setup):
    model, tok, pool, queries = setup
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    lin = B.to_linear(model)
    assert not any(type(m).__name__ == "Conv1D" for m in lin.modules())
    torch.testing.assert_close(lin(input_ids=ids).logits, model(input_ids=ids).logits)


def test_bad_input_is_refused(setup):
    model, tok, pool, queries = setup
    with pytest.raises(ValueError, match="'method'"):
        B.run_method("nope", model, tok, pool, queries)
    with pytest.raises(ValueError, match="Unknown setting 'proj'"):
        B.run_method("trak", model, tok, pool, queries, settings={"proj": 3})
    with pytest.raises(ValueError, match="no completion"):
        B.run_method("tfidf", model, tok, pool, [Query(id="x", prompt="apple")])


def test_trak_checkpoint_ensemble_averages_more_models(setup, tmp_path):
    """A TRAK ensemble (``checkpoints``: folders of more models of the same shape) still ranks
    each example first for its own text, and its scores are not the single model's."""
    model, tok, pool, queries = setup
    other = B._trainable_copy(model)
    with torch.no_grad():  # another model of the same shape: the same weights, perturbed
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    other.save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    one = B.run_method("trak", model, tok, pool, queries, max_length=16, settings=SMALL["trak"])
    two = B.run_method("trak", model, tok, pool, queries, max_length=16,
                       settings={**SMALL["trak"], "checkpoints": [str(tmp_path / "other")]})
    assert two.settings["checkpoints"] == [str(tmp_path / "other")]
    assert two.scores.shape == one.scores.shape and np.isfinite(two.scores).all()
    assert not np.allclose(two.scores, one.scores)
    for q in range(4):
        assert two.scores[q, q] > 0 and (two.scores[q] > two.scores[q, q]).sum() < 3


def test_ekfac_empirical_fisher_is_a_setting(setup):
    """EK-FAC with the empirical Fisher (observed labels, nothing sampled) gives the same scores
    twice and differs from the true Fisher's (sampled labels, the same under the same torch seed);
    both rank the example's own text first."""
    model, tok, pool, queries = setup
    runs = []
    for emp in (True, True, False, False):
        torch.manual_seed(0)  # as benchmarks/lds.py seeds every method: the sampled labels repeat
        runs.append(B.run_method("ekfac", model, tok, pool, queries, max_length=16,
                                 settings={"use_empirical_fisher": emp, "damping_factor": None}))
    assert runs[0].settings["use_empirical_fisher"] is True
    np.testing.assert_allclose(runs[0].scores, runs[1].scores, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(runs[2].scores, runs[3].scores, rtol=1e-5, atol=1e-7)
    assert not np.allclose(runs[0].scores, runs[2].scores)
    for r in runs:
        for q in range(4):
            assert r.scores[q, q] > 0 and (r.scores[q] > r.scores[q, q]).sum() < 3


def test_trak_batch_size_does_not_change_the_scores(setup):
    """TRAK's batch_size only sets how many gradients dattri projects at once (the benchmark
    raises it for speed): the projection, hence the scores, stay the same."""
    model, tok, pool, queries = setup
    a = B.run_method("trak", model, tok, pool, queries, max_length=16, settings={**SMALL["trak"], "batch_size": 4})
    b = B.run_method("trak", model, tok, pool, queries, max_length=16, settings={**SMALL["trak"], "batch_size": 24})
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-3, atol=1e-5 * np.abs(a.scores).max())
