"""Every page through Streamlit's AppTest, against the tiny demo run made by the real job runner
(see dashboard_run.py); plus the HTML report of that run."""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from dashboard_run import TINY_DEMO, TINY_DEMO_ENV, tiny_demo_home, tiny_demo_info
from stride_viz.jobs import JobStore, LocalProcessExecutor
from stride_viz.app.report import build_report, fact_ranks, ranks_of, read_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    home = tiny_demo_home(tmp_path_factory)
    return home, tiny_demo_info(home)


@pytest.fixture
def home(demo, monkeypatch):
    path, _ = demo
    monkeypatch.setenv("STRIDE_VIZ_HOME", str(path))
    for k, v in TINY_DEMO_ENV.items():
        monkeypatch.setenv(k, v)
    store = JobStore(path / "jobs.sqlite")
    before = {j.id for j in store.list()}
    yield path
    ex = LocalProcessExecutor(store)
    for job in store.list():  # stop whatever a test launched
        if job.id not in before and job.active:
            ex.cancel(job.id)


def _app(page: str | None = None, **params: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    for k, v in params.items():
        at.query_params[k] = v
    at.run()
    if page is not None:
        at.switch_page(page)
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _decode(obj):
    """Plotly's JSON writes numpy arrays as {"dtype", "bdata": base64}: turn them back into lists."""
    if isinstance(obj, dict):
        if set(obj) >= {"dtype", "bdata"}:
            return np.frombuffer(base64.b64decode(obj["bdata"]), dtype=obj["dtype"]).tolist()
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


def _figures(at: AppTest) -> list[dict]:
    return [_decode(json.loads(c.proto.spec)) for c in at.get("plotly_chart")]


def _text(at: AppTest) -> str:
    return "\n".join(m.value for m in at.markdown) + "\n".join(c.value for c in at.caption)


def test_home_offers_the_one_click_demo_and_lists_finished_runs(home):
    at = _app()
    assert at.title[0].value == "stride_viz"
    assert at.button(key="home_demo").label.endswith("Launch the demo")
    assert "demo model · fortunes+facts (80 examples) · K=16" in _text(at)
    at.button(key="home_demo").click().run()
    assert not at.exception
    jobs = JobStore(home / "jobs.sqlite").list()
    assert jobs[0].kind == "demo" and jobs[0].params["pool_limit"] == TINY_DEMO["pool_limit"]
    assert jobs[0].params["fit"] == TINY_DEMO["fit"]                  # from STRIDE_VIZ_DEMO_FIT


def test_launch_reports_bad_fields_and_launches_nothing(home):
    at = _app("pages/1_Launch.py")
    n_jobs = len(JobStore(home / "jobs.sqlite").list())
    # the key widgets, each with its explicit key
    assert at.radio(key="launch_model_kind") and at.radio(key="launch_pool_kind")
    assert at.selectbox(key="launch_pool_builtin").value == "fortunes+facts"
    assert at.text_area(key="launch_prompt") and at.text_area(key="launch_completion")
    assert at.button(key="launch_submit") and at.button(key="launch_demo")
    assert at.selectbox(key="rec_selection").value == "cv"
    assert at.number_input(key="fit_subsets").help.startswith("K: number of random training subsets")
    assert at.number_input(key="fit_subsets").value == 1024 and at.selectbox(key="fit_mode").value == "logits"
    at.radio(key="launch_model_kind").set_value("Local folder").run()
    at.text_input(key="launch_model_path").set_value(str(home / "no_such_model")).run()
    at.number_input(key="fit_subsets").set_value(1).run()
    at.button(key="launch_submit").click().run()
    errors = [e.value for e in at.error]
    assert any("Model folder" in e and "does not exist" in e for e in errors)
    assert any("Type the prompt" in e for e in errors)
    assert any("'subsets' parameter of FitConfig" in e for e in errors)
    assert any("Nothing was launched" in e for e in errors)
    assert len(JobStore(home / "jobs.sqlite").list()) == n_jobs


def test_launch_valid_input_queues_an_attribute_job(home):
    at = _app("pages/1_Launch.py")
    model_dir = next((home / "models").glob("demo-tiny-*"))
    at.radio(key="launch_model_kind").set_value("Local folder").run()
    at.text_input(key="launch_model_path").set_value(str(model_dir))
    at.number_input(key="launch_pool_limit").set_value(TINY_DEMO["pool_limit"])
    at.text_area(key="launch_prompt").set_value("Money is")
    at.text_area(key="launch_completion").set_value(" power.")
    for name, value in TINY_DEMO["fit"].items():
        at.number_input(key=f"fit_{name}").set_value(value)
    at.run()
    at.button(key="launch_submit").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    job = JobStore(home / "jobs.sqlite").list()[0]
    assert job.kind == "attribute" and job.params["model"] == str(model_dir.resolve())
    assert job.params["pool"] == "fortunes+facts" and job.params["pool_limit"] == TINY_DEMO["pool_limit"]
    assert job.params["fit"] == TINY_DEMO["fit"]      # only the changed settings travel
    assert job.params["queries"][0]["prompt"] == "Money is"
    assert any(f"Job #{job.id} launched" in s.value for s in at.success)


def test_runs_page_shows_jobs_with_progress_controls_and_resume(home):
    ex = LocalProcessExecutor(JobStore(home / "jobs.sqlite"))
    sleeper = ex.submit("sleep", {"seconds": 30, "steps": 300})
    ex.cancel(sleeper)
    at = _app("pages/2_Runs.py")
    text = _text(at)
    assert "demo (tiny, 80 docs)" in text and "done" in text
    assert at.button(key=f"runs_resume_{sleeper}")
    assert any("Cancelled by the user" in w.value for w in at.warning)
    assert at.get("dataframe")                                    # the run directories table
    at.button(key=f"runs_resume_{sleeper}").click().run()
    assert ex.store.get(sleeper).state in ("queued", "running")
    at.run()
    assert at.button(key=f"runs_cancel_{sleeper}")                 # now cancellable
    at.button(key=f"runs_cancel_{sleeper}").click().run()
    assert ex.store.get(sleeper).state == "cancelled"


def test_explore_draws_the_three_charts_from_the_run(home, demo):
    _, info = demo
    run = Path(info["run_dir"])
    at = _app("pages/3_Explore.py", run=run.name, query="fact-06")
    assert at.selectbox(key="explore_run").value == run.name
    assert at.selectbox(key="explore_query").value == "fact-06"
    top, path, resp = _figures(at)
    scores = np.load(run / "attributions" / "fact-06" / "scores.npy")
    bars = top["data"][0]
    assert len(bars["x"]) == min(10, int((scores > 0).sum())) + min(10, int((scores < 0).sum())) > 0
    np.testing.assert_allclose(bars["x"], scores[bars["customdata"]], rtol=1e-6)
    coef_lines = [t for t in path["data"] if t.get("customdata")]
    assert coef_lines and path["layout"]["xaxis"]["type"] == "log"
    responses = np.load(run / "attributions" / "fact-06" / "responses.npy")
    sorted_pts = [t for t in resp["data"] if t["type"] == "scatter" and t.get("name") == "operators"][0]
    np.testing.assert_allclose(sorted_pts["y"], np.sort(responses)[::-1], rtol=1e-6)
    text = _text(at)
    assert "Sign and units" in text and "nats" in text and "What you are looking at" in text
    assert at.get("html")                                          # the query, tokens shaded by loss
    assert at.get("download_button") and at.get("dataframe")
    assert at.query_params["run"] == [run.name] or at.query_params["run"] == run.name


def test_explore_selection_is_shared_by_charts_and_url(home, demo):
    _, info = demo
    run = Path(info["run_dir"])
    pool_ids = [json.loads(line)["id"] for line in (run / "pool.jsonl").read_text().splitlines()]
    at = _app("pages/3_Explore.py", run=run.name, query="fact-06", example="fact-06-3")
    assert at.selectbox(key="explore_example").value == "fact-06-3"       # URL -> state
    top, path, resp = _figures(at)
    row = pool_ids.index("fact-06-3")
    thick = [t for t in path["data"] if t.get("customdata") and t["customdata"][0] == row]
    assert thick and thick[0]["line"]["width"] == 4
    inside = [t for t in resp["data"] if t["type"] == "histogram" and "fact-06-3" in t.get("name", "")]
    assert len(inside[0]["x"]) == TINY_DEMO["fit"]["per_example"]        # d subsets hold it
    other = pool_ids[int(top["data"][0]["customdata"][-1])]
    at.selectbox(key="explore_example").set_value(other).run()
    assert not at.exception
    assert at.query_params["example"] in (other, [other])                  # state -> URL
    assert any(f"Selected example `{other}`" in m.value for m in at.markdown)


def test_explore_without_runs_explains_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("STRIDE_VIZ_HOME", str(tmp_path))
    at = _app("pages/3_Explore.py")
    assert any("No finished run yet" in i.value for i in at.info)
    assert not at.get("plotly_chart")


def test_html_report_is_self_contained_and_interactive(demo):
    _, info = demo
    out = build_report(info["run_dir"])
    n_queries = len(read_run(info["run_dir"]).query_ids)   # other tests may have added some
    assert out.startswith("<!DOCTYPE html>") and "</html>" in out
    assert out.count('class="plotly-graph-div"') == 3 * n_queries
    assert not re.search(r"<script[^>]*\bsrc=", out)                  # nothing fetched from a CDN
    assert out.count("plotly.js v") >= 1 and len(out) > 1_000_000      # plotly.js itself is inlined, once
    assert out.count("Plotly.newPlot") == 3 * n_queries
    assert "fact-06" in out and "nats" in out and "helps" in out


def test_ranks_break_score_ties_by_backprojection():
    scores = np.array([0.0, 0.5, 0.0, -0.2, 0.0])
    backprojection = np.array([0.1, 0.0, 0.3, 0.9, -0.1])
    # order: 1 (0.5), then the zeros by back-projection 2 (0.3), 0 (0.1), 4 (-0.1), then 3 (-0.2)
    assert ranks_of(scores, backprojection, [1, 2, 0, 4, 3]) == [1, 2, 3, 4, 5]


def test_fact_ranks_of_the_demo_run(demo):
    _, info = demo
    found = {f["query"]: f for f in fact_ranks(info["run_dir"])}
    assert set(found) == {"fact-06", "fact-26"}                      # the free prompt has no facts
    for f in found.values():
        assert 1 <= f["best_rank"] <= TINY_DEMO["pool_limit"] and f["best_id"].startswith(f["query"])

