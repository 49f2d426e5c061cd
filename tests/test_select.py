"""Data selection (stride_viz.downstream.select): aggregation, ranking, budgets, the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest

from stride_viz.cli import main
from stride_viz.downstream.select import (SelectionError, aggregate, load_targets, read_selection,
                                          resolve_budget, run_select, select_from_scores, summary_path)


def test_aggregates_are_what_their_names_say():
    scores = np.array([[0.5, -1.0, 0.0, 0.2], [0.0, 2.0, 0.0, -0.4]])
    bp = np.array([[0.1, 0.0, 0.3, 0.0], [0.1, 0.0, 0.1, 0.0]])
    np.testing.assert_allclose(aggregate(scores, bp, "positive-sum"), [0.5, 2.0, 0.0, 0.2])
    np.testing.assert_allclose(aggregate(scores, bp, "mean"), [0.25, 0.5, 0.0, -0.1])
    np.testing.assert_allclose(aggregate(scores, bp, "backprojection"), [0.1, 0.0, 0.2, 0.0])
    with pytest.raises(SelectionError, match="mean, positive-sum, backprojection"):
        aggregate(scores, bp, "max")


def test_ranking_follows_the_aggregate_and_ties_follow_the_backprojection():
    rng = np.random.default_rng(0)
    scores = np.where(rng.random((5, 40)) < 0.2, rng.normal(size=(5, 40)), 0.0)
    bp = rng.normal(size=(5, 40))
    sel = select_from_scores(scores, bp, 25, "positive-sum")
    agg = np.clip(scores, 0, None).sum(0)
    assert len(sel.rows) == 25 and len(set(sel.rows.tolist())) == 25
    kept = agg[sel.rows]
    assert np.all(np.diff(kept) <= 0)                       # best first
    assert kept.min() >= np.max(np.delete(agg, sel.rows))   # nothing better left out
    tied = sel.rows[kept == 0]                              # zero aggregate: by back-projection
    assert len(tied) > 1 and np.all(np.diff(bp.mean(0)[tied]) <= 0)


def test_budget_forms_and_bad_budgets():
    assert resolve_budget(30, 300) == 30
    assert resolve_budget("10%", 300) == 30
    assert resolve_budget(0.1, 300) == 30
    assert resolve_budget("0.1", 300) == 30
    assert resolve_budget("100%", 7) == 7
    assert resolve_budget(0.001, 300) == 1
    for bad, msg in ((301, "larger than the pool"), (0, "whole number"), ("0%", r"\(0%, 100%\]"),
                     ("ten", "number of examples"), (2.5, "whole number"), (True, "number of examples")):
        with pytest.raises(SelectionError, match=msg):
            resolve_budget(bad, 300)


def test_targets_are_read_as_documents_or_pairs(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"id": "a", "text": "Some target text."}\n{"prompt": "Q:", "completion": " A."}\n')
    qs = load_targets(f)
    assert [(q.id, q.prompt, q.completion) for q in qs] == [("a", "", "Some target text."), ("1", "Q:", " A.")]
    f.write_text('{"prompt": "only a prompt"}\n')
    with pytest.raises(SelectionError, match="expected 'text', or 'prompt' and 'completion'"):
        load_targets(f)
    f.write_text("")
    with pytest.raises(SelectionError, match="no examples"):
        load_targets(f)
    with pytest.raises(SelectionError, match="does not exist"):
        load_targets(tmp_path / "missing.jsonl")


@pytest.fixture(scope="module")
def targets_file(tmp_path_factory, fitted_run):
    from stride_viz.data.pools import fact_queries
    f = tmp_path_factory.mktemp("targets") / "targets.jsonl"
    f.write_text("".join(json.dumps({"id": q.id, "prompt": q.prompt, "completion": q.completion}) + "\n"
                         for q in fact_queries(fitted_run.pool)[:3]))
    return f


def test_select_on_a_run_writes_the_ranked_rows_and_a_summary(fitted_run, targets_file, tmp_path):
    out = tmp_path / "sel.jsonl"
    summary = run_select(fitted_run.store.root, targets_file, "10%", out, device="cpu")
    rows, saved = read_selection(out)
    n = len(fitted_run.pool)
    assert len(rows) == round(0.1 * n) == summary["budget"] == saved["budget"]
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    pool = fitted_run.pool
    for r in rows:
        i = pool.index_of(r["id"])
        assert (r["prompt"], r["completion"]) == (pool.prompts[i], pool.completions[i])
    assert saved["n_targets"] == 3 and saved["n_pool"] == n and saved["aggregate"] == "mean"
    # the ranking is the aggregate of the targets' own attributions (same operators and Lasso)
    from stride_viz.engine import read_attribution
    from stride_viz.data.pools import fact_queries
    agg = np.mean([read_attribution(fitted_run.store.root, q.id).scores.astype(np.float64)
                   for q in fact_queries(pool)[:3]], axis=0)
    top = [pool.ids[i] for i in np.argsort(-agg, kind="stable")[: int((agg > 0).sum())]][: len(rows)]
    assert {r["id"] for r in rows[: len(top)]} == set(top)
    # the planted facts' documents are among the selected rows
    sources = {s for f in pool.facts[:3] for s in f.source_ids}
    assert sources & {r["id"] for r in rows}
    # nothing was written into the run's attributions
    assert not (fitted_run.store.root / "attributions" / "sel").exists()


def test_select_cli_round_trip_and_one_line_errors(fitted_run, targets_file, tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    run = str(fitted_run.store.root)
    assert main(["select", "--run", run, "--queries", str(targets_file), "--budget", "12", "--out", str(out),
                 "--aggregate", "positive-sum", "--device", "cpu"]) == 0
    rows, summary = read_selection(out)
    assert len(rows) == 12 and summary["aggregate"] == "positive-sum" and summary_path(out).exists()
    assert "kept 12 of" in capsys.readouterr().out
    cases = [(["--budget", str(len(fitted_run.pool) + 1)], "larger than the pool"),
             (["--run", str(tmp_path / "nope")], "not a run directory"),
             (["--queries", str(tmp_path / "missing.jsonl")], "does not exist"),
             (["--out", str(tmp_path / "sel.csv")], "must end in .jsonl")]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases.append((["--queries", str(empty)], "no examples"))
    for change, msg in cases:
        args = {"--run": run, "--queries": str(targets_file), "--budget": "5", "--out": str(tmp_path / "x.jsonl")}
        args.update(dict(zip(change[::2], change[1::2])))
        code = main(["select", *[v for kv in args.items() for v in kv], "--device", "cpu"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and msg in err and len(err.splitlines()) == 1, (change, err)
        assert not (tmp_path / "x.jsonl").exists()


# ----------------------------------------------------------------------------- the Select page



def _select_page():
    from dashboard_run import open_page
    return open_page("pages/6_Select.py")


def test_select_page_launches_a_selection_and_shows_it(page_home):
    from dashboard_run import wait_job
    from stride_viz.jobs import JobStore
    home, run = page_home
    store = JobStore(home / "jobs.sqlite")
    at = _select_page()
    assert "No selection for this run yet." in [i.value for i in at.info]
    at.radio(key="select_source").set_value("This run's explained queries").run()
    at.text_input(key="select_budget").set_value("1000").run()     # more than the 80 examples
    at.button(key="select_launch").click().run()
    assert any("larger than the pool" in e.value for e in at.error) and store.list() == []
    at.text_input(key="select_budget").set_value("10%").run()
    at.button(key="select_launch").click().run()
    [job] = store.list()
    from stride_viz.storage import RunStore
    explained = RunStore(run).query_ids()          # other tests may have explained more on this run
    assert job.kind == "select" and job.params["n_keep"] == 8
    assert sorted(t["id"] for t in job.params["targets"]) == sorted(explained) and len(explained) >= 2
    assert wait_job(store, job.id).state == "done", store.get(job.id).log
    at.run()
    [table] = at.dataframe
    df = table.value
    assert len(df) == 8 and df["rank"].tolist() == list(range(1, 9))
    assert df["score_nats"].is_monotonic_decreasing
    assert any("8 of 80 examples" in m.value.replace("\\", "") for m in at.markdown)


def test_selection_csv_keeps_formula_cells_inert():
    from stride_viz.app.downstream_views import selection_table
    from stride_viz.app.report import csv_text
    rows = [{"rank": 1, "id": '=HYPERLINK("https://evil.example","x")', "score": 0.5, "backprojection": 0.1,
             "prompt": "", "completion": "+1 and @cmd"}]
    text = csv_text(selection_table(rows))
    assert "'=HYPERLINK" in text and "'+1 and @cmd" in text and "0.5" in text


def test_upload_errors_name_the_file_as_uploaded():
    from stride_viz.app.downstream_views import targets_from_upload
    with pytest.raises(SelectionError, match="mine.jsonl") as e:
        targets_from_upload("mine.jsonl", b'{"prompt": "no completion"}\n')
    assert "/tmp" not in str(e.value)
    assert targets_from_upload("t.txt", b"First doc.\n\nSecond doc.\n")[1]["completion"] == "Second doc."
