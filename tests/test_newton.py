"""Operators in closed form (FitConfig.solver = 'gauss-newton', stride_viz.method.newton):
the operators equal the damped Gauss-Newton step computed here independently (autograd
gradients of each example's loss, the curvature from the model's own forward pass), their
responses are linear in the subsets, and they find the planted facts."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stride_viz.cli import main
from stride_viz.config import ConfigError, FitConfig
from stride_viz.data.pools import fact_queries
from stride_viz.data.tokenize import encode
from stride_viz.demo import fact_metrics
from stride_viz.engine import Stride, read_attribution
from stride_viz.method.newton import STEP_RMS

GN_FIT = dict(subsets=48, per_example=4, rank=4, solver="gauss-newton", device="cpu")


@pytest.fixture(scope="module")
def gn_run(tmp_path_factory, tiny_model, tiny_pool):
    run = Stride.create_or_open(tmp_path_factory.mktemp("gn") / "run", tiny_model, tiny_pool,
                                FitConfig(**GN_FIT))
    run.fit()
    return run


def _examples(run, tiny_pool):
    """Per pool example: RMS-normalised h_L (m, D), full-vocabulary logits (m, V) and targets (m,)
    of its scored tokens, from the model's own forward pass (float32, no cache)."""
    lm = run.lm
    enc = encode(run.model.tokenizer, list(tiny_pool.prompts), list(tiny_pool.completions),
                 min(run.config.max_length, run.max_tokens))
    out = []
    with torch.no_grad():
        _, final = lm.hidden(enc.input_ids, enc.attention_mask)
        for i in range(len(tiny_pool)):
            L = int(enc.attention_mask[i].sum())
            where = torch.nonzero(enc.loss_mask[i, :L] > 0).squeeze(1)
            h = final[i, where].float()
            hn = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
            out.append((hn, lm.logits(h).float(), enc.input_ids[i, where + 1]))
    return out


def _assert_additive(run, query) -> np.ndarray:
    """The response to the sum of operators 0 and 1 is the sum of their responses (the linear
    regime y = M w needs); returns the run's responses to ``query``."""
    ops = run.operators
    y = run.measure(query).responses
    A = ops.A.detach().clone()
    try:
        ops.A.data[0] = A[0] + A[1]
        y01 = run.measure(query).responses[0]
    finally:
        ops.A.data.copy_(A)
    assert abs(y01 - (y[0] + y[1])) <= 0.02 * (abs(y[0]) + abs(y[1])) + 1e-6
    return y


def test_operators_are_the_damped_gauss_newton_step(gn_run, tiny_pool):
    ops, state = gn_run.operators, json.loads((gn_run.store.fit_dir / "state.json").read_text())
    assert state["solver"] == "gauss-newton" and state["history"] == []
    cols = ops.columns
    B = ops.basis.detach()                                        # (r, D)
    assert torch.allclose(B @ B.T, torch.eye(B.shape[0]), atol=1e-4)
    ex = _examples(gn_run, tiny_pool)
    H = torch.cat([e[0] for e in ex])
    second = (H.T @ H / len(H)).double()
    top = torch.linalg.eigvalsh(second).flip(0)[:B.shape[0]]
    # the basis spans the top principal directions: its features are uncorrelated, with the top variances
    feat = (B.double() @ second @ B.double().T)
    assert torch.allclose(torch.diagonal(feat), top, rtol=2e-2)
    assert (feat - torch.diag(torch.diagonal(feat))).abs().max() < 2e-2 * top[0]
    # gradients by autograd: d(mean token loss of example i)/dA at A = 0, logits + z A on C
    r, C = B.shape[0], cols.numel()
    grads, p_sum, n_tok = [], torch.zeros(C), 0
    for hn, logits, tg in ex:
        A0 = torch.zeros(r, C, requires_grad=True)
        z = hn @ B.T
        steered = logits.index_add(1, cols, z @ A0)
        F.cross_entropy(steered, tg).backward()
        grads.append(A0.grad.clone())
        p_sum += torch.softmax(logits, -1)[:, cols].sum(0)
        n_tok += len(tg)
    grads = torch.stack(grads)                                    # (n, r, C)
    a, d = torch.diagonal(feat).float(), p_sum / n_tok
    M = torch.as_tensor(gn_run.membership.toarray(), dtype=torch.float32)
    size = float(M.sum()) / M.shape[0]
    lam = GN_FIT.get("damping", FitConfig().damping) * float(a.mean()) * float(d.mean())
    expected = -(torch.einsum("kn,nrc->krc", M, grads) / size) / (a[:, None] * d[None, :] + lam)
    got = ops.A.detach() / state["step_scale"]
    cos = F.cosine_similarity(got.reshape(len(got), -1), expected.reshape(len(got), -1), dim=1)
    assert cos.min() > 0.99, cos.min()
    assert torch.allclose(got.norm(), expected.norm(), rtol=2e-2)
    # the step size: the median operator moves a typical token's logits by STEP_RMS
    rms = torch.sqrt((a[None, :, None] * ops.A.detach().pow(2)).sum((1, 2)) / C)
    assert float(rms.median()) == pytest.approx(STEP_RMS, rel=2e-2)


def test_responses_are_linear_in_the_subsets(gn_run, tiny_pool):
    """The operators sit in the linear regime: the response to the sum of two operators is the
    sum of their responses (what y = M w needs)."""
    y = _assert_additive(gn_run, fact_queries(tiny_pool)[0])
    assert np.abs(y).max() < 0.5      # small steps: far below a trained operator's nats


def test_gauss_newton_finds_the_planted_facts(gn_run, tiny_pool):
    atts = gn_run.attribute(fact_queries(tiny_pool), continuations=False)
    metrics = fact_metrics(tiny_pool, atts)
    chance = 10 / len(tiny_pool)
    assert metrics["recall_at_10"] >= 5 * chance, metrics
    assert metrics["mrr"] >= 0.4, metrics


def test_settings_check_the_solver():
    with pytest.raises(ConfigError, match="'solver'"):
        FitConfig(solver="lbfgs")
    with pytest.raises(ConfigError, match="gauss-newton.*mode 'logits'.*use solver 'adam'"):
        FitConfig(solver="gauss-newton", mode="residual")
    with pytest.raises(ConfigError, match="or in mode 'residual' with residual_design 'linear'"):
        FitConfig(solver="gauss-newton", mode="residual", residual_design="memory")
    assert FitConfig(solver="gauss-newton", mode="residual", residual_design="linear").mode == "residual"
    with pytest.raises(ConfigError, match="gauss-newton.*vocabulary 'subset'"):
        FitConfig(solver="gauss-newton", vocabulary="subset")
    with pytest.raises(ConfigError, match="'damping'"):
        FitConfig(solver="gauss-newton", damping=0)
    # runs fitted before the setting existed (adam) keep their fingerprint and folder names
    assert "solver" not in FitConfig().fingerprint() and "damping" not in FitConfig().fingerprint()
    assert FitConfig(solver="gauss-newton").fingerprint()["solver"] == "gauss-newton"


def test_rank_above_the_hidden_size_is_refused(tmp_path, tiny_model, tiny_pool):
    run = Stride.create_or_open(tmp_path / "r", tiny_model, tiny_pool,
                                FitConfig(**{**GN_FIT, "rank": tiny_model.model.config.n_embd + 1}))
    with pytest.raises(ConfigError, match="'rank'.*at most the model's hidden size"):
        run.fit()


def test_cli_fits_in_closed_form(tmp_path, tiny_model_dir, tiny_pool, capsys):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"id": tiny_pool.ids[i], "text": tiny_pool.completions[i]}) + "\n"
                            for i in range(len(tiny_pool))))
    run = tmp_path / "run"
    assert main(["fit", "--model", str(tiny_model_dir), "--pool", str(pool), "--run", str(run),
                 "--subsets", "48", "--per-example", "4", "--rank", "4", "--solver", "gauss-newton",
                 "--damping", "0.3", "--device", "cpu"]) == 0
    meta = json.loads((run / "run.json").read_text())
    assert meta["config"]["solver"] == "gauss-newton" and meta["config"]["damping"] == 0.3
    assert json.loads((run / "fit" / "state.json").read_text())["solver"] == "gauss-newton"
    assert (run / "operators.safetensors").exists()


RESIDUAL_GN = dict(GN_FIT, mode="residual", residual_design="linear", rank=16)


@pytest.fixture(scope="module")
def residual_gn_run(tmp_path_factory, tiny_model, tiny_pool):
    run = Stride.create_or_open(tmp_path_factory.mktemp("rgn") / "run", tiny_model, tiny_pool,
                                FitConfig(**RESIDUAL_GN))
    run.fit()
    return run


def test_residual_operators_are_the_damped_kfac_step(residual_gn_run, tiny_pool):
    """Residual mode: each operator is the damped step of its subset's mean token loss in A
    (r x D), the gradient by autograd through the blocks above the cut, the curvature K-FAC's
    E[u u^T] (x) E[g~ g~^T] with g~ for next tokens sampled from the model (here 16 draws per
    position, the fit draws one)."""
    run = residual_gn_run
    lm, ops = run.lm, run.operators
    state = json.loads((run.store.fit_dir / "state.json").read_text())
    assert state["solver"] == "gauss-newton" and state["curvature"] == "kfac-sampled"
    B = ops.basis.detach()
    r, D = B.shape
    assert ops.A.shape[1:] == (r, D)                       # whatever the vocabulary
    enc = encode(run.model.tokenizer, list(tiny_pool.prompts), list(tiny_pool.completions),
                 min(run.config.max_length, run.max_tokens))
    gen = torch.Generator().manual_seed(1)
    grads, f_in, f_out, n_rows = [], torch.zeros(r, r), torch.zeros(D, D), 0
    for i in range(len(tiny_pool)):
        L = int(enc.attention_mask[i].sum())
        ids, att = enc.input_ids[i:i + 1, :L], enc.attention_mask[i:i + 1, :L]
        where = torch.nonzero(enc.loss_mask[i, :L] > 0).squeeze(1)
        with torch.no_grad():
            h = lm.hidden(ids, att)[0].float()[0]                  # (L, D) after block `layer`
        rms = torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        u = rms * ((h / rms) @ B.T)                                # (L, r)
        A0 = torch.zeros(r, D, requires_grad=True)
        hh = h.clone().requires_grad_(True)
        logp = torch.log_softmax(lm.logits(lm.upper_hidden((hh + u @ A0)[None], ids, att))[0], -1)[where]
        loss = F.nll_loss(logp, ids[0, where + 1])
        grads.append(torch.autograd.grad(loss, A0, retain_graph=True)[0])
        for _ in range(16):
            drawn = torch.multinomial(logp.detach().exp(), 1, generator=gen).squeeze(1)
            g = torch.autograd.grad(F.nll_loss(logp, drawn), hh, retain_graph=True)[0]
            f_out += g.T @ g / 16
        f_in += u.T @ u
        n_rows += L
    e_in, q_in = torch.linalg.eigh(f_in / n_rows)
    e_out, q_out = torch.linalg.eigh(f_out / n_rows)
    M = torch.as_tensor(run.membership.toarray(), dtype=torch.float32)
    G = torch.einsum("kn,nrd->krd", M, torch.stack(grads)) / (float(M.sum()) / M.shape[0])
    lam = FitConfig().damping * float(e_in.mean()) * float(e_out.mean())
    X = torch.einsum("sr,ksd,de->kre", q_in, G, q_out) / (e_in[:, None] * e_out[None, :] + lam)
    expected = -torch.einsum("rs,kse,de->krd", q_in, X, q_out)
    got = ops.A.detach() / state["step_scale"]
    cos = F.cosine_similarity(got.reshape(len(got), -1), expected.reshape(len(got), -1), dim=1)
    plain = F.cosine_similarity(got.reshape(len(got), -1), -G.reshape(len(got), -1), dim=1)
    assert cos.median() > 0.97 and cos.min() > 0.9, cos
    assert plain.median() < 0.8, plain         # the curvature matters: not the plain gradient
    assert torch.allclose(got.norm(), expected.norm(), rtol=0.1)
    # the step size: the median operator moves the stream by STEP_RMS of its RMS
    a = torch.as_tensor(state["basis_variance"])
    shift = torch.sqrt((a[None, :, None] * ops.A.detach().pow(2)).sum((1, 2)) / D)
    assert float(shift.median()) == pytest.approx(STEP_RMS, rel=2e-2)


def test_residual_responses_are_linear_and_find_the_facts(residual_gn_run, tiny_pool):
    run = residual_gn_run
    _assert_additive(run, fact_queries(tiny_pool)[0])
    metrics = fact_metrics(tiny_pool, run.attribute(fact_queries(tiny_pool), continuations=False))
    assert metrics["recall_at_10"] >= 5 * 10 / len(tiny_pool), metrics
