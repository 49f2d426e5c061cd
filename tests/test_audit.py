"""Contamination audit (stride_viz.downstream.audit): the statistic on planted score matrices,
a tiny fitted run with injected replicas of a benchmark item (the audit must flag them), the CLI
round trip and its bad inputs, CSV neutralisation, the audit job and the Audit page."""
from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from conftest import TINY_FIT
from dashboard_run import open_page
from stride_viz.config import ConfigError
from stride_viz.data.pools import Query, load_pool, make_pool
from stride_viz.data.qa_items import QA_ITEMS, qa_queries, replica_text
from stride_viz.downstream.audit import (AuditConfig, audit_scores, combine, document_statistic, flagged_csv,
                                         query_z, replica_recall, run_audit, safe_cell, word_overlap)

ROOT = Path(__file__).resolve().parents[1]
LEAKED = "qa-05"
COPIES = 3
# replica ids that a page or spreadsheet must show as text
HOSTILE_IDS = ['=HYPERLINK("https://evil.example/c","x")', '<a href="https://evil.example/r">r</a>',
               "[r](https://evil.example/md)"]


# ----------------------------------------------------------------------------- the statistic

def _planted(seed: int = 0, n_q: int = 8, n: int = 300):
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((n_q, n))
    s[3, 17] += 12.0          # a replica of query 3
    s[5, 42] -= 12.0          # an extreme opponent: not contamination under max-z
    return s, [f"d{i}" for i in range(n)], [f"text {i}" for i in range(n)], \
        [Query(f"q{i}", f"prompt {i}", " x") for i in range(n_q)]


def test_a_planted_extreme_proponent_is_ranked_first_and_flagged():
    s, ids, texts, qs = _planted()
    res = audit_scores(s, ids, texts, qs, AuditConfig())
    assert res.order[0] == 17 and res.flagged[0] == 17
    assert 42 not in res.flagged.tolist()     # max-z counts proponents only
    doc = res.documents[0]
    assert doc["flagged"] and doc["evidence"][0]["query_id"] == "q3" and doc["evidence"][0]["rank"] == 1
    # either sign: the opponent is extreme too
    both = audit_scores(s, ids, texts, qs, AuditConfig(statistic="max-abs-z"))
    assert {17, 42} <= set(both.flagged.tolist())
    assert doc["outlier"] > 3 * AuditConfig().threshold
    # pure noise: the maximum of noise is skewed, so a few pass the cut-off, far below the planted one
    noise = audit_scores(np.random.default_rng(1).standard_normal((8, 300)), ids, texts, qs)
    assert len(noise.flagged) <= 3 and noise.outlier.max() < 2 * AuditConfig().threshold


def test_robust_z_handles_sparse_lasso_scores():
    s = np.zeros((2, 100))
    s[0, :10] = 0.01
    s[0, 7] = 1.0             # more than half the scores are 0: the MAD is 0
    z = query_z(s)
    assert np.isfinite(z).all() and z[0].argmax() == 7 and z[0, 7] > 20
    assert (z[1] == 0).all()  # a query with all scores equal tells nothing apart


def test_best_rank_compares_documents_within_queries_not_across():
    rng = np.random.default_rng(3)
    s = np.vstack([rng.normal(0, 0.01, 50), rng.normal(0, 1.0, 50)])   # a quiet and a loud query
    s[0, 7] = 0.05                        # the quiet query's top document
    s[1, 3], s[1, 4] = 9.0, 8.0           # the loud query's first and second
    best = document_statistic(s, "best-rank")
    assert list(np.argsort(-best)[:3]) == [3, 7, 4]       # rank-1 documents first, louder first
    assert document_statistic(s, "max-score").argmax() == 3
    assert np.argsort(-document_statistic(s, "max-score"))[1] == 4   # max-score: the loud runner-up ahead of 7
    res = audit_scores(s, [f"d{i}" for i in range(50)], ["t"] * 50, [Query("a", "p", " x"), Query("b", "p", " y")],
                       AuditConfig(statistic="best-rank"))
    doc7 = next(d for d in res.documents if d["index"] == 7)
    assert doc7["evidence"][0]["query_id"] == "a" and doc7["evidence"][0]["rank"] == 1


def test_topk_count_and_combinations_and_recall():
    s, *_ = _planted()
    count = document_statistic(s, "topk-count", top_k=5)
    assert count.argmax() == 17 or count[17] >= 1
    a = np.arange(10, dtype=float)            # ranks document 9 first
    b = a[::-1].copy()                        # ranks document 0 first
    b[9] = 8.5                                # ... and document 9 second
    for how in ("rank-mean", "rrf", "z-sum"):
        assert combine(a, b, how).argmax() == 9
    assert replica_recall(a, [9, 8], budget=1) == 0.5 and replica_recall(a, [0], budget=3) == 0.0
    with pytest.raises(ConfigError):
        combine(a, b, "max")


def test_word_overlap():
    assert word_overlap("Question: Who? Answer: Vess.", "Question: Who? Answer: Vess.") == {"share": 1.0, "run": 4}
    o = word_overlap("the red fox jumps", "a fox jumps over the red dog")
    assert o["share"] == 1.0 and o["run"] == 2
    assert word_overlap("", "anything")["share"] == 0.0


@pytest.mark.parametrize("bad", [dict(statistic="mean"), dict(threshold=0), dict(threshold=float("nan")),
                                 dict(top_k=0), dict(max_flagged=1.5), dict(evidence=True)])
def test_bad_settings_are_refused_in_one_line(bad):
    with pytest.raises(ConfigError) as e:
        AuditConfig(**bad)
    assert "\n" not in str(e.value) and "AuditConfig" in str(e.value)


def test_csv_cells_a_spreadsheet_would_run_are_neutralised():
    s, ids, texts, qs = _planted()
    ids[17] = '=HYPERLINK("https://evil.example","x")'
    texts[17] = "+cmd|' /C calc'!A0"
    res = audit_scores(s, ids, texts, qs)
    rows = list(csv.reader(io.StringIO(flagged_csv(res))))
    assert rows[0][:2] == ["doc_rank", "example_id"]
    first = rows[1]
    assert first[1] == "'" + ids[17] and first[-1] == "'" + texts[17]
    for row in rows[1:]:
        for cell in row:
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), cell
    assert safe_cell("-1") == "'-1" and safe_cell(-1.5) == -1.5 and safe_cell("ok") == "ok"


def test_builtin_items_are_held_out_of_the_builtin_pools():
    assert 40 <= len(QA_ITEMS) <= 60 and len({i for i, _, _ in QA_ITEMS}) == len(QA_ITEMS)
    text = " ".join(load_pool("fortunes").completions + load_pool("fortunes+facts").completions).lower()
    for _, _, answer in QA_ITEMS:
        assert not re.search(r"\b" + re.escape(answer.split()[-1].lower()) + r"\b", text), answer


def test_paraphrased_replicas_reword_the_item_but_keep_its_invented_words():
    import random

    from stride_viz.data.qa_items import PARAPHRASE_TEMPLATES, STATEMENTS, replica_texts
    assert set(STATEMENTS) == {i for i, _, _ in QA_ITEMS}
    for qid, question, answer in QA_ITEMS:
        # the statement keeps the answer but not the question's wording
        assert answer.lower() in STATEMENTS[qid].lower(), qid
        assert question.rstrip("?").lower() not in STATEMENTS[qid].lower(), qid
        texts = replica_texts(qid, 4, "paraphrase", random.Random(qid))
        assert len(set(texts)) == 4 and all(answer.lower() in t.lower() for t in texts)
        assert all(t != f"Question: {question} Answer: {answer}." for t in texts)
        # the invented entity words (capitalised, not the question's first word) are kept
        entity = {w.lower() for w in re.findall(r"\b[A-Z][a-z]+", question)[1:]} - {"the", "hall", "king"}
        assert entity and all(any(re.search(rf"\b{e}\b", t.lower()) for e in entity) for t in texts), qid
    item = qa_queries()[7]
    assert replica_texts(item.id, 2, "verbatim") == [replica_text(item)] * 2
    same = [replica_texts("qa-03", 3, "paraphrase", random.Random(5)) for _ in range(2)]
    assert same[0] == same[1]
    assert any(replica_texts("qa-03", 3, "paraphrase", random.Random(s)) != same[0] for s in range(6, 10))
    for bad in (dict(item_id="qa-99", copies=1), dict(item_id="qa-01", copies=0),
                dict(item_id="qa-01", copies=len(PARAPHRASE_TEMPLATES) + 1), dict(item_id="qa-01", copies=1, mode="x")):
        with pytest.raises(ValueError) as e:
            replica_texts(**bad)
        assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- a tiny run

@pytest.fixture(scope="module")
def audit_run(tmp_path_factory, tiny_model, tiny_pool):
    """A fitted tiny run on tiny_pool plus COPIES replicas of one QA item (hostile ids), and a
    benchmark file of six items, the leaked one among them. The tiny model was trained without
    the replicas: the operators learn from the pool's documents themselves."""
    from stride_viz.config import FitConfig
    from stride_viz.engine import Stride
    item = {q.id: q for q in qa_queries()}[LEAKED]
    ids, comps = list(tiny_pool.ids), list(tiny_pool.completions)
    for c, rid in enumerate(HOSTILE_IDS[:COPIES]):
        at = (c + 1) * len(ids) // (COPIES + 1)
        ids.insert(at, rid)
        comps.insert(at, replica_text(item))
    pool = make_pool("tiny+replicas", ids, [""] * len(ids), comps)
    root = tmp_path_factory.mktemp("audit")
    run = Stride.create_or_open(root / "run", tiny_model, pool, FitConfig(**TINY_FIT))
    run.fit()
    bench = root / "bench.jsonl"
    items = [q for q in qa_queries() if q.id in ("qa-01", "qa-02", LEAKED, "qa-20", "qa-33", "qa-40")]
    bench.write_text("".join(json.dumps({"id": q.id, "prompt": q.prompt, "completion": q.completion}) + "\n"
                             for q in items))
    return root, run, bench


def test_the_audit_flags_the_injected_replicas(audit_run, tmp_path):
    root, run, bench = audit_run
    from stride_viz.data.pools import load_queries
    res = run_audit(run.store.root, load_queries(bench), tmp_path / "out", device="cpu")
    replicas = [run.pool.index_of(r) for r in HOSTILE_IDS[:COPIES]]
    top = res.order[:COPIES].tolist()
    assert set(top) & set(replicas), [run.pool.ids[i] for i in res.order[:10]]
    assert set(res.flagged.tolist()) & set(replicas)
    # the evidence of a flagged replica points at the leaked item, with its whole text
    doc = next(d for d in res.documents if d["index"] in replicas and d["flagged"])
    assert doc["evidence"][0]["query_id"] == LEAKED
    assert doc["evidence"][0]["overlap"] == {"share": 1.0, "run": len(re.findall(r"[a-z0-9']+",
                                                                                   replica_text(qa_queries()[5]).lower()))}
    data = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert data["n_flagged"] == len(res.flagged) and data["n_queries"] == 6
    assert np.load(tmp_path / "out" / "scores.npy").shape == (6, len(run.pool))


def test_cli_round_trip_and_bad_inputs(audit_run, tmp_path, capsys):
    from stride_viz.cli import main
    root, run, bench = audit_run
    out = tmp_path / "cli"
    assert main(["audit", "--run", str(run.store.root), "--queries", str(bench), "--out", str(out),
                 "--device", "cpu", "--threshold", "3", "--evidence", "2"]) == 0
    printed = capsys.readouterr().out
    assert "documents flagged" in printed and "wrote" in printed
    data = json.loads((out / "audit.json").read_text())
    assert data["config"]["threshold"] == 3 and all(len(d["evidence"]) <= 2 for d in data["documents"])
    rows = list(csv.DictReader(io.StringIO((out / "flagged.csv").read_text())))
    assert {r["example_id"] for r in rows} == {"'" + i if i.startswith("=") else i for i in data["flagged_ids"]}
    before = (out / "audit.json").read_bytes()

    def refused(*argv: str) -> str:
        assert main(["audit", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
        return err

    # the same folder again: refused, the earlier audit untouched
    assert "not an empty folder" in refused("--run", str(run.store.root), "--queries", str(bench), "--out", str(out))
    assert (out / "audit.json").read_bytes() == before
    assert "does not exist" in refused("--run", str(run.store.root), "--queries", str(tmp_path / "nope.jsonl"),
                                       "--out", str(tmp_path / "o1"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"question": "x"}\n')
    assert "Line 2" in refused("--run", str(run.store.root), "--queries", str(bad), "--out", str(tmp_path / "o2"))
    assert "not a run folder" in refused("--run", str(tmp_path), "--queries", str(bench), "--out", str(tmp_path / "o3"))
    assert "threshold" in refused("--run", str(run.store.root), "--queries", str(bench), "--out",
                                  str(tmp_path / "o4"), "--threshold", "-1")
    assert "statistic" in refused("--run", str(run.store.root), "--queries", str(bench), "--out",
                                  str(tmp_path / "o5"), "--statistic", "median")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


# ----------------------------------------------------------------------------- job and page

@pytest.fixture(scope="module")
def audit_home(audit_run, tmp_path_factory):
    """A data directory whose runs/ holds a copy of the tiny audit run (no audit yet)."""
    root, run, bench = audit_run
    home = tmp_path_factory.mktemp("audit_home")
    shutil.copytree(run.store.root, home / "runs" / "audit-run")
    return home


def test_audit_job_validates_then_writes_the_runs_audit(audit_home, monkeypatch):
    from dashboard_run import wait_job
    from stride_viz.jobs import JobError, JobStore, LocalProcessExecutor
    monkeypatch.setenv("STRIDE_VIZ_HOME", str(audit_home))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ex = LocalProcessExecutor(JobStore(audit_home / "jobs.sqlite"))
    run_dir = str(audit_home / "runs" / "audit-run")
    queries = [{"id": q.id, "prompt": q.prompt, "completion": q.completion} for q in qa_queries()[:6]]
    for params, words in (({"run_dir": str(audit_home), "queries": queries}, "no run.json"),
                          ({"run_dir": run_dir, "queries": []}, "non-empty list"),
                          ({"run_dir": run_dir, "queries": queries, "audit": {"threshold": -2}}, "threshold"),
                          ({"run_dir": run_dir, "queries": [{"prompt": " "}]}, "prompt is empty")):
        with pytest.raises(JobError, match=words):
            ex.submit("audit", params)
    job = wait_job(ex.store, ex.submit("audit", {"run_dir": run_dir, "queries": queries, "name": "six items"}))
    assert job.state == "done", f"{job.error}\n{job.traceback}"
    folder = Path(job.result["audit_dir"])
    assert folder.parent == Path(run_dir).resolve() / "audits" and (folder / "audit.json").exists()
    again = wait_job(ex.store, ex.submit("audit", {"run_dir": run_dir, "queries": queries, "name": "six items"}))
    assert again.state == "done" and again.result["reused"] and again.result["audit_dir"] == str(folder)


def _page(home: Path) -> AppTest:
    return open_page("pages/5_Audit.py")


def test_audit_page_launches_and_shows_flagged_documents_as_text(audit_home, audit_run, monkeypatch):
    from stride_viz.data.pools import load_queries
    from stride_viz.downstream.audit import audit_id, audits_dir
    from stride_viz.config import RecoveryConfig
    monkeypatch.setenv("STRIDE_VIZ_HOME", str(audit_home))
    _, _, bench = audit_run
    run_dir = audit_home / "runs" / "audit-run"
    queries = load_queries(bench)
    folder = audits_dir(run_dir) / audit_id(queries, AuditConfig(), RecoveryConfig())
    if not (folder / "audit.json").exists():
        run_audit(run_dir, queries, folder, device="cpu", name="bench.jsonl")
    at = _page(audit_home)
    text = "\n".join(m.value for m in at.markdown)
    assert "flagged" in text and "robust z" in text
    assert len(at.dataframe) >= 2                      # the documents and one document's evidence
    table = at.dataframe[0].value
    assert set(HOSTILE_IDS[:COPIES]) & set(table["example_id"])
    # hostile ids and texts are shown as text: no live link or tag in any Markdown
    for m in list(at.markdown) + list(at.caption):
        assert "<a href" not in m.value and "](https://" not in m.value, m.value
    # upload without a file: one line, nothing queued
    at.radio(key="audit_source").set_value("Upload a JSONL file").run()
    at.button(key="audit_launch").click().run()
    assert any("Choose a JSONL file" in e.value for e in at.error)
    # the built-in items: an audit job is queued
    at.radio(key="audit_source").set_value("Built-in: 48 invented question/answer items").run()
    at.button(key="audit_launch").click().run()
    assert not at.exception and at.session_state["audit_job_id"] is not None
    from stride_viz.jobs import JobStore, LocalProcessExecutor
    ex = LocalProcessExecutor(JobStore(audit_home / "jobs.sqlite"))
    job = ex.store.get(at.session_state["audit_job_id"])
    assert job.kind == "audit" and len(job.params["queries"]) == len(QA_ITEMS)
    if job.active:
        ex.cancel(job.id)


def test_audit_page_without_fitted_runs_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("STRIDE_VIZ_HOME", str(tmp_path))
    at = _page(tmp_path)
    assert any("No fitted run" in i.value for i in at.info)


def test_uploaded_benchmark_errors_name_the_file_as_the_user_did():
    from stride_viz.app.audit_view import queries_from_upload
    from stride_viz.data.pools import PoolError
    assert queries_from_upload("b.jsonl", b'{"prompt": "Q?", "completion": " A."}\n')[0]["prompt"] == "Q?"
    with pytest.raises(PoolError) as e:
        queries_from_upload("my bench.jsonl", b'{"prompt": "Q?"}\nnot json\n')
    assert "my bench.jsonl" in str(e.value) and "/tmp" not in str(e.value)
