"""Token-level attribution: per-token responses, per-token recovery, its files, the CLI flag
and the Explore view, on the tiny fitted run of conftest.py (known answers: planted facts)."""
from __future__ import annotations

import csv
import shutil
import threading

import numpy as np
import pytest
import torch

from stride_viz.cli import main
from stride_viz.config import RecoveryConfig
from stride_viz.data.pools import Query, fact_queries
from stride_viz.engine import QueryError, Stride, read_attribution
from stride_viz.method.measurement import steered_logits
from stride_viz.method.recovery import RecoveryError
from conftest import TINY_FIT
from stride_viz.method.tokens import TOKENS_FILE, first_word_token, load_tokens, recover_tokens, save_tokens


@pytest.fixture(scope="module")
def token_model(tmp_path_factory, tiny_pool):
    """conftest's tiny model, but trained as the demo is (each fact document 4 times, a word at
    the start of a text the same token as inside one): its tokenizer makes each planted answer
    word one token, so a fact's answer has a token of its own. (8 times, with the facts' 7-8
    wordings, memorises the answers and the answer token's recall@10 fell to 0.67.)"""
    from stride_viz.data.models import load_model, train_demo_model
    out = tmp_path_factory.mktemp("token-model") / "model"
    train_demo_model(tiny_pool, out, preset="tiny", seed=0, n_layer=2, n_embd=32, n_head=2, vocab_size=500,
                     epochs=8, batch_size=16, lr=5e-3, max_length=64, fact_repeats=4, weight_decay=0.01,
                     prefix_space=True)
    return load_model(str(out), device="cpu")


@pytest.fixture(scope="module")
def token_run(tmp_path_factory, token_model, tiny_pool):
    """A fitted run on it: the fact queries explained without per-token scores (as before this
    existed) under their own ids, and with them under ``tok-<id>``."""
    from stride_viz.config import FitConfig
    run = Stride.create_or_open(tmp_path_factory.mktemp("tokens") / "tokrun", token_model, tiny_pool,
                                FitConfig(**TINY_FIT))
    run.fit()
    facts = fact_queries(tiny_pool)
    run.attribute(facts)
    run.attribute([Query(f"tok-{q.id}", q.prompt, q.completion) for q in facts], per_token=True,
                  continuations=False)
    return run


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


# ------------------------------------------------------------------ stage 3, per token
def test_per_token_responses_are_the_per_token_loss_differences(token_run, tiny_pool):
    fitted_run = token_run
    q = fact_queries(tiny_pool)[0]
    measured = fitted_run.measure(q)
    K = fitted_run.membership.shape[0]
    T = len(measured.token_ids)
    assert measured.token_responses.shape == (K, T) and T >= 2
    # directly: the full forward of the base and of operator k, the loss of each completion token
    enc = fitted_run._encode_query(q)
    L = int(enc.attention_mask[0].sum())
    ids, att = enc.input_ids[:, :L], enc.attention_mask[:, :L]
    where = torch.nonzero(enc.loss_mask[0, :L] > 0).squeeze(1)
    targets = ids[0, where + 1]
    ops = fitted_run.operators
    for k in (0, 7, K - 1):
        logits = steered_logits(fitted_run.lm, ops, fitted_run.config.mode, ids.expand(2, -1),
                                att.expand(2, -1), torch.tensor([-1, k]))
        base, steered = (_nll(logits[b, where], targets) for b in (0, 1))
        np.testing.assert_allclose(measured.token_responses[k], (base - steered).numpy(), atol=2e-4)
        np.testing.assert_allclose(measured.token_loss, base.numpy(), atol=2e-4)
    # the whole completion's response is the mean over its tokens (loss = mean token loss)
    np.testing.assert_allclose(measured.token_responses.mean(axis=1), measured.responses, atol=1e-5)
    assert abs(measured.token_loss.mean() - measured.loss_base) < 1e-5
    assert not np.allclose(measured.token_responses[:, 0], measured.token_responses[:, -1])


# ------------------------------------------------------------------ stage 4, per token
def test_answer_token_points_at_the_fact_documents_and_the_full_stop_does_not(token_run):
    pool = token_run.pool
    found_answer, found_stop, facts = 0.0, 0.0, pool.facts
    for f in facts:
        a = read_attribution(token_run.store.root, f"tok-{f.query.id}")
        src = {pool.index_of(s) for s in f.source_ids}
        tokens = a.info["tokens"]
        assert tokens[-1] == "." and a.tokens.n_tokens == len(tokens)
        answer = first_word_token(tokens)
        assert answer < len(tokens) - 1
        found_answer += len(src & set(a.tokens.top(answer, 10).tolist())) / len(src)
        found_stop += len(src & set(a.tokens.top(len(tokens) - 1, 10).tolist())) / len(src)
    recall_answer, recall_stop = found_answer / len(facts), found_stop / len(facts)
    # measured 0.87 against 0.02 (seeded; 0.86 against 0.22 with the facts' first wordings
    # only); 10 of about 195 examples at random: about 0.05
    assert recall_answer >= 0.7, recall_answer
    assert recall_stop <= 0.4 and recall_stop < recall_answer - 0.4, (recall_answer, recall_stop)


def test_token_scores_are_each_tokens_own_recovery(token_run):
    """Each row is what the run's recoverer gives for that token's responses alone."""
    a = read_attribution(token_run.store.root, f"tok-{token_run.pool.facts[0].query.id}")
    rec = token_run.recoverer(RecoveryConfig())
    for t in range(a.tokens.n_tokens):
        alone = rec.recover(a.tokens.token_responses[:, t])
        np.testing.assert_array_equal(a.tokens.token_scores(t), alone.scores)
        assert a.tokens.chosen_alpha[t] == alone.chosen_alpha
        assert a.tokens.nonzeros[t] == alone.chosen_nonzeros
    with pytest.raises(IndexError, match=r"token index must be an integer in \[0, "):
        a.tokens.token_scores(a.tokens.n_tokens)


def test_a_one_token_completion_reuses_the_whole_recovery(token_run):
    measured = token_run.measure(Query("one", "The capital of Vorlandia is", " Q"))
    assert measured.token_responses.shape[1] == 1
    rec = token_run.recoverer(RecoveryConfig())
    whole = rec.recover(measured.responses)
    tok = recover_tokens(rec, measured.token_responses, whole, measured.responses)
    np.testing.assert_array_equal(tok.token_scores(0), whole.scores)
    with pytest.raises(RecoveryError, match=r"shape \(K, T\)"):
        recover_tokens(rec, measured.responses)


# ------------------------------------------------------------------ files
def test_tokens_file_round_trips_and_old_attributions_still_open(token_run, tmp_path):
    fact = token_run.pool.facts[1].query.id
    a = read_attribution(token_run.store.root, f"tok-{fact}")
    save_tokens(a.tokens, tmp_path)
    back = load_tokens(tmp_path)
    assert (back.scores != a.tokens.scores).nnz == 0
    np.testing.assert_array_equal(back.token_responses, a.tokens.token_responses)
    np.testing.assert_array_equal(back.chosen_ratio, a.tokens.chosen_ratio)
    assert load_tokens(tmp_path / "nothing-here") is None
    # an attribution made without per-token scores (the session run's) reads as before
    old = read_attribution(token_run.store.root, fact)
    assert old.tokens is None and not (old.folder / TOKENS_FILE).exists()
    scores_before = (old.folder / "scores.npy").read_bytes()
    cont_before = (old.folder / "continuations.json").read_bytes()
    added = token_run.attribute_tokens(fact)
    assert added.tokens is not None and added.tokens.n_tokens == len(added.info["tokens"])
    assert (old.folder / "scores.npy").read_bytes() == scores_before           # the rest is kept
    assert (old.folder / "continuations.json").read_bytes() == cont_before
    assert (added.tokens.scores != a.tokens.scores).nnz == 0                 # same as attribute(per_token)


def test_adding_tokens_to_an_attribution_of_other_operators_is_refused(token_run):
    fact = token_run.pool.facts[2].query.id
    folder = token_run.store.attribution_dir(fact)
    responses = np.load(folder / "responses.npy")
    np.save(folder / "responses.npy", responses + 0.5)
    try:
        with pytest.raises(QueryError, match="other operators.*--per-token"):
            token_run.attribute_tokens(fact)
        assert not (folder / TOKENS_FILE).exists()
    finally:
        np.save(folder / "responses.npy", responses)


def test_a_damaged_tokens_file_names_the_fix(token_run):
    from stride_viz.integrity import RunDamaged
    fact = f"tok-{token_run.pool.facts[3].query.id}"
    path = token_run.store.attribution_dir(fact) / TOKENS_FILE
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    try:
        with pytest.raises(RunDamaged, match="tokens.npz.*explain query"):
            read_attribution(token_run.store.root, fact)
    finally:
        path.write_bytes(good)


# ------------------------------------------------------------------ command line
def test_cli_attribute_per_token_writes_and_rereads(token_run, tmp_path, capsys):
    run = str(token_run.store.root)
    out = tmp_path / "out"
    assert main(["attribute", "--run", run, "--prompt", "The capital of Vorlandia is", "--completion",
                 " Quessit.", "--per-token", "--no-continuations", "--out", str(out), "--top", "5"]) == 0
    a = read_attribution(run, "q0")
    assert a.tokens is not None and a.tokens.n_tokens == len(a.info["tokens"])
    assert (out / "tokens" / "q0.npz").is_file()
    rows = list(csv.DictReader(open(out / "topk_tokens.csv")))
    assert {int(r["token_index"]) for r in rows} <= set(range(a.tokens.n_tokens)) and rows
    for r in rows:
        t = int(r["token_index"])
        i = token_run.pool.index_of(r["example_id"])
        assert r["token"] == a.info["tokens"][t]
        assert abs(float(r["score"]) - float(a.tokens.token_scores(t)[i])) < 1e-5
        assert (float(r["score"]) > 0) == (int(r["rank"]) > 0)
    assert "per token:" in capsys.readouterr().out
    # an explained query without per-token scores gets them, the rest kept
    fact = token_run.pool.facts[4].query.id
    assert read_attribution(run, fact).tokens is None
    assert main(["attribute", "--run", run, "--query-id", fact, "--per-token", "--out", str(tmp_path / "o2")]) == 0
    assert read_attribution(run, fact).tokens is not None
    assert (tmp_path / "o2" / "topk_tokens.csv").is_file()


@pytest.mark.parametrize("args, message", [
    (["--query-id", "fact-00"], "give --per-token too"),
    (["--query-id", "no-such-query", "--per-token"], "no attribution for --query-id 'no-such-query'"),
])
def test_cli_per_token_bad_input_is_one_line(token_run, tmp_path, capsys, args, message):
    before = sorted(p.name for p in (token_run.store.root / "attributions").iterdir())
    assert main(["attribute", "--run", str(token_run.store.root), *args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in (token_run.store.root / "attributions").iterdir()) == before


# ------------------------------------------------------------------ views
def test_token_figures_escape_tokens_and_say_their_units(token_run):
    from stride_viz.app import tokens as views
    a = read_attribution(token_run.store.root, f"tok-{token_run.pool.facts[0].query.id}")
    ids, texts = token_run.pool.ids, [token_run.pool.text(i) for i in range(len(token_run.pool))]
    fig = views.token_top_figure(ids, a.tokens.token_scores(0), texts, "<b>x</b> $y$", index=0)
    assert "<b>x" not in fig.layout.title.text and "&lt;b&gt;x" in fig.layout.title.text
    assert "this token's loss" in fig.layout.xaxis.title.text
    heat = views.token_matrix_figure(ids, a.info["tokens"], a.tokens, a.scores, selected_token=0)
    assert heat.data[0].z.shape[1] == a.tokens.n_tokens + 1
    rows = [c[0] for c in heat.data[0].customdata]
    src = {token_run.pool.index_of(s) for s in token_run.pool.facts[0].source_ids}
    assert src & set(rows)                               # the answer token's sources are drawn
    assert views.token_label(" a\nb") == "␣a↵b" and views.token_label("") == "∅"
    assert first_word_token([" ", ".", " Quess", "it"]) == 2 and first_word_token([".", ","]) == 0


def test_explore_shows_the_token_view_and_keeps_the_token_in_the_url(token_run, tmp_path, monkeypatch):
    from dashboard_run import open_page
    home = tmp_path / "home"
    shutil.copytree(token_run.store.root, home / "runs" / "tokrun")
    monkeypatch.setenv("STRIDE_VIZ_HOME", str(home))
    fact = token_run.pool.facts[0].query.id
    at = open_page("pages/3_Explore.py", run="tokrun", query=f"tok-{fact}", token="1")
    pills = at.pills(key="explore_token")
    tokens = read_attribution(home / "runs" / "tokrun", f"tok-{fact}").info["tokens"]
    assert len(pills.options) == len(tokens)
    assert pills.value == 1                                                 # from the link
    titles = [c.proto.spec for c in at.get("plotly_chart")]
    assert any("Token 1" in s for s in titles) and any("Whole completion" in s for s in titles)
    text = "\n".join(m.value for m in at.markdown)
    assert "nats of that token" in text and "Token 1" in text
    pills.set_value(0).run()                                               # a click on another token
    assert not at.exception, [e.value for e in at.exception]
    assert at.query_params["token"] in ("0", ["0"])
    assert any("Token 0" in c.proto.spec for c in at.get("plotly_chart"))
    n_with = len(at.get("plotly_chart"))
    at.toggle(key="explore_tokens_on").set_value(False).run()              # the view turned off
    assert not at.exception and "token" not in at.query_params
    assert len(at.get("plotly_chart")) == n_with - 3 and not [p for p in at.pills if p.key == "explore_token"]
    at.toggle(key="explore_tokens_on").set_value(True).run()               # and on again
    assert at.pills(key="explore_token").value is not None and "token" in at.query_params
    # without &token= in the link the view starts off: the page draws its three main charts
    at = open_page("pages/3_Explore.py", run="tokrun", query=f"tok-{fact}")
    assert at.toggle(key="explore_tokens_on").value is False
    assert len(at.get("plotly_chart")) == 3
    # a query explained without per-token scores (a link to it) says so and gives the command;
    # (its prompt and completion are those of tok-<fact>: the query selectbox shows both alike)
    at = open_page("pages/3_Explore.py", run="tokrun", query=fact)
    assert at.selectbox(key="explore_query").value == fact
    assert not [p for p in at.pills if p.key == "explore_token"]
    assert any("--per-token" in c.value and fact in c.value for c in at.code)


def test_the_warm_explainer_adds_tokens_last_and_yields_to_a_new_request(token_run, tmp_path):
    from stride_viz.jobs import JobStore
    from stride_viz.jobs.explainer import Explainer
    fact = token_run.pool.facts[5].query.id
    path = token_run.store.attribution_dir(fact) / TOKENS_FILE
    ex = Explainer(JobStore(tmp_path / "jobs.sqlite"), token_run.store.root)
    ex.stride, ex.state = token_run, "ready"
    ex.tokens_due = [fact]
    ex.claimed = {99: {}}                        # a request waits: the tokens give way to it
    ex.add_tokens()
    assert not path.exists() and ex.tokens_due == [fact]
    ex.claimed = {}
    ex.add_tokens()
    assert path.exists() and ex.tokens_due == []
    assert read_attribution(token_run.store.root, fact).tokens.n_tokens == 2


def test_a_wake_up_signal_left_pending_stops_the_tokens_once_not_forever(token_run, tmp_path):
    """The executor's SIGUSR1 of a request the explainer has already claimed (it never idled
    in between) stops the per-token work once and is taken; it must not stop every later try
    (the explainer then spun without ever reaching its idle timeout)."""
    import signal
    from stride_viz.jobs import JobStore
    from stride_viz.jobs.explainer import Explainer
    q = token_run.pool.facts[4].query
    fact = "signal-" + q.id                      # explained here without per-token scores
    token_run.attribute([Query(fact, q.prompt, q.completion)], continuations=False)
    path = token_run.store.attribution_dir(fact) / TOKENS_FILE
    ex = Explainer(JobStore(tmp_path / "jobs.sqlite"), token_run.store.root)
    ex.stride, ex.state = token_run, "ready"
    ex.tokens_due = [fact]
    old = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])      # as the explainer's main does
    try:
        signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
        assert signal.SIGUSR1 in signal.sigpending()
        ex.add_tokens()                                   # stopped by the signal, which it takes
        assert not path.exists() and ex.tokens_due == [fact]
        assert signal.SIGUSR1 not in signal.sigpending()
        ex.add_tokens()                                   # the next try runs to the end
        assert path.exists() and ex.tokens_due == []
    finally:
        signal.sigtimedwait([signal.SIGUSR1], 0)
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def test_a_word_split_into_tokens_is_one_span_scored_by_the_mean_of_its_tokens():
    import numpy as np
    import scipy.sparse as sp
    from stride_viz.method.tokens import TokenRecovery, word_span
    tokens = [" Qu", "ess", "it", ".", " and", " so", "-", "on"]
    assert [word_span(tokens, t) for t in range(len(tokens))] == \
        [[0, 1, 2], [0, 1, 2], [0, 1, 2], [3], [4], [5], [6], [7]]
    assert word_span(["Hello", " wor", "ld", "!"], 2) == [1, 2]
    with pytest.raises(IndexError):
        word_span(tokens, 8)
    scores = sp.csr_matrix(np.array([[1.0, 0.0, -2.0], [3.0, 0.0, 0.0], [2.0, 6.0, 0.0], [0.0, 0.0, 9.0]]))
    T = scores.shape[0]
    tok = TokenRecovery(np.zeros((4, T), np.float32), scores, np.ones(T), np.ones(T), np.ones(T, np.int64),
                        np.zeros(T), np.ones(T, np.int64))
    np.testing.assert_allclose(tok.span_scores([0, 1, 2]), [2.0, 2.0, -2 / 3], rtol=1e-6)
    np.testing.assert_allclose(tok.span_scores([3]), tok.token_scores(3))
    with pytest.raises(IndexError):
        tok.span_scores([])


def test_explore_scores_a_word_split_into_tokens_as_a_whole(token_run, tmp_path, monkeypatch):
    """A completion word the tokenizer splits (an unseen word): Explore's token view offers the
    whole word, scored by the mean of its tokens' scores."""
    from dashboard_run import open_page
    from stride_viz.method.tokens import word_span
    [a] = token_run.attribute([Query("tok-split", "The capital of Vorlandia is", " Zqxvorlund.")],
                              per_token=True, continuations=False)
    tokens = a.info["tokens"]
    multi = [t for t in range(len(tokens)) if len(word_span(tokens, t)) > 1]
    assert multi, tokens
    home = tmp_path / "home"
    shutil.copytree(token_run.store.root, home / "runs" / "tokrun")
    monkeypatch.setenv("STRIDE_VIZ_HOME", str(home))
    at = open_page("pages/3_Explore.py", run="tokrun", query="tok-split", token=str(multi[0]))
    assert at.toggle(key="explore_token_word").value is False           # the token alone first
    at.toggle(key="explore_token_word").set_value(True).run()
    assert not at.exception, [e.value for e in at.exception]
    span = word_span(tokens, multi[0])
    assert any(f"Word, tokens {span[0]}-{span[-1]}" in c.proto.spec for c in at.get("plotly_chart"))
    assert "this word (the mean of its tokens' scores)" in "\n".join(m.value for m in at.markdown)
