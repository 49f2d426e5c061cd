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

from dashboard_run import HOSTILE, TINY_DEMO, TINY_DEMO_ENV, hostile_copy, open_page, tiny_demo_home, tiny_demo_info
from stride_viz.jobs import JobError, JobStore, LocalProcessExecutor
from stride_viz.app import launch, plots
from stride_viz.app.report import build_report, csv_text, fact_ranks, query_snippet, ranks_of, read_run

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


_app = open_page


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


def _plain(markdown: str) -> str:
    """Markdown as read: ui.md's backslash escapes removed."""
    return re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", markdown)


def _text(at: AppTest) -> str:
    return _plain("\n".join(m.value for m in at.markdown) + "\n".join(c.value for c in at.caption))


def _errors(at: AppTest) -> list[str]:
    return [_plain(e.value) for e in at.error]


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
    errors = _errors(at)
    assert any("Model folder" in e and "does not exist" in e for e in errors)
    assert any("Type the prompt" in e for e in errors)
    # named as in the form, not as the dataclass field or a CLI flag
    assert any(e.startswith("“subsets” must be an integer in the range [2, 1000000]. Got 1") for e in errors)
    assert any("Nothing was launched" in e and "1. Model" in e and "▸ subsets" in e for e in errors)
    assert next(x for x in at.expander if x.label.startswith("Advanced")).proto.expanded  # in view
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


def test_runs_page_shows_the_whole_jobs_progress_and_its_time_over_all_attempts(home, monkeypatch):
    from types import SimpleNamespace
    from stride_viz.jobs import store as store_module
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(store_module, "time", SimpleNamespace(time=lambda: clock.now))
    store = JobStore(home / "jobs.sqlite")
    job_id = store.create("demo", {"preset": "tiny"}, title="demo (resumed)")
    store.try_start(job_id)
    clock.now = 1100.0                                   # ran 100 s, then its worker died
    store.finish(job_id, "failed", error="killed")
    clock.now = 1200.0
    store.requeue(job_id)
    store.try_start(job_id)
    store.progress(job_id, "fit", 0.62, 70.0, "step 120/392")
    clock.now = 1210.0                                   # 10 s into the second attempt
    at = _app("pages/2_Runs.py")
    bars = [_plain(b.proto.text) for b in at.get("progress")]
    assert ("stage 3 of 4: fitting operators · 62% of the job · about 1 min 10 s left · "
            "step 120/392") in bars
    assert "ran 1 min 50 s in all" in _text(at)


def test_explore_draws_the_three_charts_from_the_run(home, demo):
    _, info = demo
    run = Path(info["run_dir"])
    at = _app("pages/3_Explore.py", run=run.name, query="fact-07")
    assert at.selectbox(key="explore_run").value == run.name
    assert at.selectbox(key="explore_query").value == "fact-07"
    top, path, resp = _figures(at)
    scores = np.load(run / "attributions" / "fact-07" / "scores.npy")
    bars = top["data"][0]
    assert len(bars["x"]) == min(10, int((scores > 0).sum())) + min(10, int((scores < 0).sum())) > 0
    np.testing.assert_allclose(bars["x"], scores[bars["customdata"]], rtol=1e-6)
    coef_lines = [t for t in path["data"] if t.get("customdata")]
    assert coef_lines and path["layout"]["xaxis"]["type"] == "log"
    responses = np.load(run / "attributions" / "fact-07" / "responses.npy")
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
    at = _app("pages/3_Explore.py", run=run.name, query="fact-07", example="fact-07-5")
    assert at.selectbox(key="explore_example").value == "fact-07-5"       # URL -> state
    top, path, resp = _figures(at)
    row = pool_ids.index("fact-07-5")
    thick = [t for t in path["data"] if t.get("customdata") and t["customdata"][0] == row]
    assert thick and thick[0]["line"]["width"] == 4
    inside = [t for t in resp["data"] if t["type"] == "histogram" and "fact-07-5" in t.get("name", "")]
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
    assert "fact-07" in out and "nats" in out and "helps" in out


def test_ranks_break_score_ties_by_backprojection():
    scores = np.array([0.0, 0.5, 0.0, -0.2, 0.0])
    backprojection = np.array([0.1, 0.0, 0.3, 0.9, -0.1])
    # order: 1 (0.5), then the zeros by back-projection 2 (0.3), 0 (0.1), 4 (-0.1), then 3 (-0.2)
    assert ranks_of(scores, backprojection, [1, 2, 0, 4, 3]) == [1, 2, 3, 4, 5]


def test_fact_ranks_of_the_demo_run(demo):
    _, info = demo
    found = {f["query"]: f for f in fact_ranks(info["run_dir"])}
    assert set(found) == {"fact-07", "fact-10"}                      # the free prompt has no facts
    for f in found.values():
        assert 1 <= f["best_rank"] <= TINY_DEMO["pool_limit"] and f["best_id"].startswith(f["query"])



# ----------------------------------------------------------------------------- Launch checks

def _launch_form(at: AppTest, model_dir: Path, pool_kind: str = "Built-in") -> AppTest:
    at.radio(key="launch_model_kind").set_value("Local folder").run()
    at.text_input(key="launch_model_path").set_value(str(model_dir))
    at.radio(key="launch_pool_kind").set_value(pool_kind)
    at.text_area(key="launch_prompt").set_value("Money is")
    return at.run()


def test_launch_refuses_a_model_folder_that_is_not_a_causal_lm(home, tmp_path):
    n_jobs = len(JobStore(home / "jobs.sqlite").list())
    no_type = tmp_path / "no-type"
    no_type.mkdir()
    (no_type / "config.json").write_text(json.dumps({"n_layer": 2, "vocab_size": 300}))
    at = _launch_form(_app("pages/1_Launch.py"), no_type)
    at.button(key="launch_submit").click().run()
    assert any("config.json has no 'model_type'" in e for e in _errors(at)), _errors(at)
    assert len(JobStore(home / "jobs.sqlite").list()) == n_jobs       # refused before queueing
    for config, words in (({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, "bidirectional encoder"),
                          ({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}, "encoder-decoder"),
                          ({"model_type": "vit"}, "'vit' model, which has no causal language model head")):
        folder = tmp_path / config["model_type"]
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(JobError, match=re.escape(words)):
            launch.check_model_config(str(folder))
    launch.check_model_config(str(next((home / "models").glob("demo-tiny-*"))))   # a GPT-2: accepted


def test_launch_says_which_field_to_change_when_the_pool_is_too_small(home, tmp_path):
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(20)))
    at = _launch_form(_app("pages/1_Launch.py"), next((home / "models").glob("demo-tiny-*")), "Path on this machine")
    at.text_input(key="launch_pool_path").set_value(str(small)).run()
    at.button(key="launch_submit").click().run()
    pool_error = next(e for e in _errors(at) if "fewer than the 128" in e)
    assert "“subsets” = 1024" in pool_error and "at most 160" in pool_error and "--subsets" not in pool_error
    # several bad settings are reported at once, each in the form's words
    at.number_input(key="fit_subsets").set_value(1)
    at.number_input(key="fit_lr").set_value(0.0)
    at.number_input(key="rec_cv_folds").set_value(1).run()
    at.button(key="launch_submit").click().run()
    errors = _errors(at)
    for label in ("“subsets”", "“lr”", "“cv folds”"):
        assert any(e.startswith(label + " must be") for e in errors), (label, errors)


def test_launch_deletes_a_rejected_upload_and_names_it_as_the_user_did(home):
    uploads = home / "uploads"
    before = set(uploads.rglob("*")) if uploads.exists() else set()
    at = _launch_form(_app("pages/1_Launch.py"), next((home / "models").glob("demo-tiny-*")), "Upload a file")
    at.get("file_uploader")[0].set_value(("my pool.jsonl", b'{"text": "fine"}\n{"txt": "no text column"}\n',
                                          "application/json")).run()
    at.button(key="launch_submit").click().run()
    pool_error = next(e for e in _errors(at) if "line 2 of" in e.lower())
    assert "'my pool.jsonl'" in pool_error and str(home) not in pool_error and "uploads" not in pool_error
    assert (set(uploads.rglob("*")) if uploads.exists() else set()) == before    # nothing left behind


def test_upload_storage_keeps_the_name_and_never_escapes_its_folder(tmp_path):
    path, created = launch.save_upload(tmp_path / "uploads", "../../etc/train.csv", b"text\nhello\n")
    assert created and path.name == "train.csv" and path.parent.parent == tmp_path / "uploads"
    assert launch.save_upload(tmp_path / "uploads", "train.csv", b"text\nhello\n") == (path, False)
    launch.discard_upload(path)
    assert not path.exists() and not path.parent.exists()


def test_failed_job_with_bad_input_offers_edit_settings_not_resume(home):
    store = JobStore(home / "jobs.sqlite")
    model_dir = str(next((home / "models").glob("demo-tiny-*")).resolve())
    params = {"model": model_dir, "pool": "fortunes+facts", "pool_limit": 76, "fit": {"subsets": 1024},
              "recovery": {}, "queries": [{"id": "q-x", "prompt": "Money is", "completion": None}]}
    bad = store.create("attribute", params, heavy=False, title="bad input")
    other = store.create("sleep", {"seconds": 1, "steps": 1}, heavy=False, title="crashed")
    for job_id, error in ((bad, "ConfigError: The pool has 76 examples, fewer than the 128 ... " + HOSTILE),
                          (other, "RuntimeError: out of memory")):
        assert store.try_start(job_id) == "started"
        store.finish(job_id, "failed", error=error)
    at = _app("pages/2_Runs.py")
    assert not _has(at, f"runs_resume_{bad}") and _has(at, f"runs_edit_{bad}")
    assert _has(at, f"runs_resume_{other}") and not _has(at, f"runs_edit_{other}")  # resuming may help there
    shown = next(e.value for e in at.error if "76 examples" in e.value)
    assert not _live_markdown(shown)                                             # the error is text
    at.button(key=f"runs_edit_{bad}").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.title[0].value == "Launch an attribution"
    assert at.text_area(key="launch_prompt").value == "Money is"
    assert at.text_input(key="launch_model_path").value == model_dir
    assert at.number_input(key="fit_subsets").value == 1024
    assert at.number_input(key="launch_pool_limit").value == 76
    assert any(f"job #{bad}" in i.value for i in at.info)


def _has(at: AppTest, key: str) -> bool:
    return any(b.key == key for b in at.button)


# ----------------------------------------------------------------------------- links

def test_every_link_opens_what_it_names_at_any_time_in_a_session(home, demo):
    _, info = demo
    run = Path(info["run_dir"]).name

    def follow(page: str, **params: str) -> None:   # what a page link with query_params does
        at.query_params.clear()
        at.query_params.update(params)
        at.switch_page(page)
        at.run()
        assert not at.exception, [e.value for e in at.exception]

    at = _app("pages/3_Explore.py", run=run, query="fact-07", example="fact-07-5")
    assert (at.selectbox(key="explore_query").value, at.selectbox(key="explore_example").value) == \
        ("fact-07", "fact-07-5")
    labels = at.selectbox(key="explore_query").options                   # prompts, not opaque ids
    fact = json.loads((Path(info["run_dir"]) / "attributions" / "fact-07" / "query.json").read_text())
    assert query_snippet(fact, 60) in labels and all(label.startswith("“") for label in labels)
    follow("pages/3_Explore.py", run=run, query="fact-10")               # a second link, same page
    assert at.selectbox(key="explore_query").value == "fact-10"
    assert at.selectbox(key="explore_example").value == "" and "example" not in at.query_params
    at.selectbox(key="explore_query").set_value("fact-07").run()         # the user's pick wins ...
    at.run()
    assert at.selectbox(key="explore_query").value == "fact-07" and at.query_params["query"] in ("fact-07", ["fact-07"])
    follow("app.py")
    follow("pages/3_Explore.py", run=run, query="fact-10")               # ... until a link from another page
    assert at.selectbox(key="explore_query").value == "fact-10"
    follow("pages/2_Runs.py")
    follow("pages/3_Explore.py")                                         # plain navigation keeps the view
    assert at.selectbox(key="explore_query").value == "fact-10"


# ----------------------------------------------------------------------------- hostile text

def _live_markdown(source: str) -> list[str]:
    """The pieces of a Markdown source that a renderer would turn into a link, an image, HTML,
    a colour directive or math (code spans removed: they show their text verbatim)."""
    text = re.sub(r"(`+)(?!`).*?(?<!`)\1(?!`)", "", source)
    return re.findall(r"(?<!\\)(?:\]\(|<[a-zA-Z/]|https?://|www\.|:red\[|\$)", text)


def _strings(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


@pytest.fixture
def hostile_home(demo, tmp_path, monkeypatch):
    """A data directory whose only run has hostile pool ids and texts."""
    _, info = demo
    monkeypatch.setenv("STRIDE_VIZ_HOME", str(tmp_path))
    return tmp_path, hostile_copy(info["run_dir"], tmp_path)


def test_explore_shows_hostile_link_and_pool_text_as_text(hostile_home):
    home, run = hostile_home
    pool_ids = [json.loads(line)["id"] for line in (run / "pool.jsonl").read_text().splitlines()]
    at = _app("pages/3_Explore.py", run=HOSTILE, query=HOSTILE, example=HOSTILE)
    assert "from the link was not found" in at.warning[0].value
    assert at.selectbox(key="explore_run").value == run.name             # the newest run instead
    hostile_id = pool_ids[1]                                             # <a href="https://evil...">
    at.selectbox(key="explore_example").set_value(hostile_id).run()      # a hostile id selected
    assert not at.exception
    assert at.query_params["example"] in (hostile_id, [hostile_id])
    shown = [e.value for kind in ("markdown", "caption", "warning", "info", "error", "success")
             for e in at.get(kind)]
    assert any("evil.example" in s for s in shown)
    for s in shown:
        if "evil" in s:
            assert not _live_markdown(s), (s, _live_markdown(s))
    figures = _figures(at)
    assert len(figures) == 3
    for fig in figures:
        for s in _strings(fig):
            if "evil" in s:
                assert not re.search(r"<(a|img|script)\b", s) and "$" not in s and "%{x}" not in s, s
    assert any("&lt;a href=" in s for fig in figures for s in _strings(fig))   # shown, as text
    for chart in at.get("plotly_chart"):
        assert json.loads(chart.proto.config) == plots.PLOTLY_CONFIG


def test_downloads_and_report_keep_hostile_text_inert(hostile_home):
    _, run = hostile_home
    import pandas as pd
    table = pd.DataFrame({"id": ["=1+2", "+x", "-y", "@z", "\tt", "\rr", "ok"], "score": [-0.5] * 7})
    rows = csv_text(table).splitlines()[1:]
    assert [r.split(",")[0] for r in rows[:4]] == ["'=1+2", "'+x", "'-y", "'@z"]
    assert rows[-1] == "ok,-0.5"                                          # numbers stay numbers
    out = build_report(run)
    assert '<a href="https://evil' not in out.replace("\\u003c", "<")
    assert '<img src="https://evil' not in out.replace("\\u003c", "<")
    assert "<script>window.pwned" not in out.replace("\\u003c", "<")
    assert out.count('"displaylogo": false') == out.count("Plotly.newPlot") > 0
    assert out.count('"showSendToCloud": false') == out.count("Plotly.newPlot")
    assert "MathJax.Hub" not in out and not re.search(r"<script[^>]*\bsrc=", out)


def test_query_snippet_reads_as_the_prompt():
    info = {"prompt": "The capital of Vorlandia is", "completion": " Quessit."}
    assert query_snippet(info) == "“The capital of Vorlandia is” → “Quessit.”"
    long = query_snippet({"prompt": "word " * 40, "completion": "x " * 40}, width=60)
    assert len(long) < 80 and long.startswith("“…")


# ----------------------------------------------------------------------------- a new prompt

@pytest.fixture
def explain_home(demo, tmp_path, monkeypatch):
    """A data directory with a private copy of the tiny demo run (explained prompts are added
    to it); its explainer exits after 4 idle seconds and is stopped at the end in any case."""
    import os
    import shutil
    import signal
    import psutil
    _, info = demo
    monkeypatch.setenv("STRIDE_VIZ_HOME", str(tmp_path))
    monkeypatch.setenv("STRIDE_VIZ_EXPLAINER_IDLE", "4")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = tmp_path / "runs" / Path(info["run_dir"]).name
    shutil.copytree(info["run_dir"], run)
    yield tmp_path, run
    from stride_viz.jobs.explainer import explainer_record
    record = explainer_record(JobStore(tmp_path / "jobs.sqlite"), run)
    if record is not None:
        os.kill(record["pid"], signal.SIGTERM)
        psutil.Process(record["pid"]).wait(timeout=30)


def _explain(at: AppTest, prompt: str, completion: str = "") -> AppTest:
    at.text_area(key="explore_new_prompt").input(prompt)
    at.text_input(key="explore_new_completion").input(completion)
    at.button(key="explore_explain_submit").click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_explore_explains_a_new_prompt_and_names_it_in_the_url(explain_home):
    import time
    from stride_viz.jobs import query_id_for
    from stride_viz.jobs.kinds import MAX_PROMPT_CHARS
    home, run = explain_home
    at = _app("pages/3_Explore.py", run=run.name, query="fact-07")
    assert at.text_area(key="explore_new_prompt").label == "Explain a new prompt"
    store = JobStore(home / "jobs.sqlite")
    # bad input: one line, nothing queued
    assert _errors(_explain(at, "   ")) == ["Type a prompt to explain."]
    assert "at most 2,000" in _errors(_explain(at, "x" * (MAX_PROMPT_CHARS + 1)))[0]
    assert store.list() == []

    # the prompt is user text: shown as text while it is explained, never as a link or HTML.
    # The run's explainer is held at its lock while the page waits for a warm answer (5 s; it
    # waits 10 s for the lock), so that the page shows the request as waiting however fast
    # the explainer would start
    import fcntl
    import os
    from stride_viz.jobs import explainer
    lock = explainer._paths(store, run)[0]
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        prompt = "[Money](https://evil.example/m) <b>is</b>"
        at = _explain(at, prompt, " power.")
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    [job] = store.list()
    assert job.kind == "explain" and job.params["prompt"] == prompt
    waiting = [i.value for i in at.info if "Explaining" in i.value]
    assert waiting and "evil.example/m" in _plain(waiting[0]) and not _live_markdown(waiting[0]), waiting
    assert wait_job_done(store, job.id).state == "done"
    at.run()                                      # the page's next poll: the new query is shown
    qid = query_id_for(prompt, " power.")
    assert at.session_state["explore_query"] == qid and at.query_params["query"] in (qid, [qid])
    assert at.selectbox(key="explore_query").value == qid
    assert len(_figures(at)) == 3 and not at.exception
    # the explainer wrote the continuations after the scores: the base one is shown
    base = [c.value for c in at.code if c.value.startswith(prompt)]
    assert base and "(not generated)" not in base[0], base

    # the same prompt again is shown at once, without a new job
    at.selectbox(key="explore_query").set_value("fact-07").run()
    at = _explain(at, prompt, " power.")
    assert at.session_state["explore_query"] == qid and len(store.list()) == 1

    # no completion: the tiny model writes only spaces, which the page says in one line
    at = _explain(at, "The capital of")
    [blank] = [j for j in store.list() if j.params["completion"] is None]
    assert wait_job_done(store, blank.id).state == "failed"
    at.run()
    assert any("produced no completion" in e for e in _errors(at)), _errors(at)


def wait_job_done(store: JobStore, job_id: int, timeout: float = 180.0):
    import time
    t0 = time.monotonic()
    while store.get(job_id).active:
        assert time.monotonic() - t0 < timeout, store.get(job_id).log
        time.sleep(0.2)
    return store.get(job_id)
