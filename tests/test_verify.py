"""Verify by retraining (stride_viz.downstream.verify) on the tiny fitted run of conftest.py."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from stride_viz.downstream.verify import VerifyError, model_recipe, plan, read_result, result_path, verify
from stride_viz.progress import Cancelled


@pytest.fixture(scope="module")
def fact_query(fitted_run):
    return fitted_run.pool.facts[0].query.id


@pytest.fixture(scope="module")
def verified(fitted_run, fact_query):
    return verify(fitted_run.store.root, fact_query, k=3, random_seeds=2, noise_seeds=1)


def test_verify_retrains_without_the_top_and_random_examples(fitted_run, fact_query, verified):
    from stride_viz.engine import read_attribution
    r = verified
    a = read_attribution(fitted_run.store.root, fact_query)
    assert r["top"]["ids"] == [fitted_run.pool.ids[i] for i in a.top(3)]
    # same recipe and seed on the full pool: the model itself, bit for bit
    assert r["baseline_reproduces_model"] is True
    assert r["loss_full"] == pytest.approx(r["loss_model"], abs=1e-5)
    assert r["top"]["change"] == pytest.approx(r["top"]["loss"] - r["loss_full"])
    assert len(r["random"]["changes"]) == 2 and r["random"]["std"] is not None
    assert r["random"]["changes"] == pytest.approx([x - r["loss_full"] for x in r["random"]["losses"]])
    assert len(r["seed_noise"]["changes"]) == 1 and r["seed_noise"]["seeds"] == [r["plan"]["seed"] + 1]
    assert r["seed_noise"]["changes"][0] != 0.0          # another seed does give another model
    assert r["top"]["predicted_change"] == pytest.approx(float(np.sum(a.scores[a.top(3)])), rel=1e-5)
    assert set(r["retrains"]) == {"full", "without-top", "random-0", "random-1", "seed-1"}
    # the two random draws remove different examples, none of them all of the top
    assert read_result(fitted_run.store.root, fact_query, 3) == json.loads(json.dumps(r))
    assert not result_path(fitted_run.store.root, fact_query, 3).with_name(
        result_path(fitted_run.store.root, fact_query, 3).stem + ".partial.json").exists()


def test_a_stopped_verification_resumes_with_what_it_had(fitted_run, fact_query, verified, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(fitted_run.store.root, run)
    shutil.rmtree(run / "verify", ignore_errors=True)
    calls = []

    def stop_after_two() -> bool:
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled, match="stopped after 2 of 5"):
        verify(run, fact_query, k=3, random_seeds=2, noise_seeds=1, should_stop=stop_after_two)
    partial = json.loads(result_path(run, fact_query, 3).with_name(
        result_path(run, fact_query, 3).stem + ".partial.json").read_text())
    assert set(partial["units"]) == {"full", "without-top"}
    seen = []
    r = verify(run, fact_query, k=3, random_seeds=2, noise_seeds=1,
               progress=lambda stage, f, eta, msg="": seen.append(msg))
    assert not any("retraining full" in m or "retraining without-top" in m for m in seen)
    assert r["top"]["change"] == pytest.approx(verified["top"]["change"])   # deterministic retraining
    assert r["random"]["changes"] == pytest.approx(verified["random"]["changes"])


def test_models_without_a_recipe_are_refused(fitted_run, tmp_path):
    with pytest.raises(VerifyError, match="not a local folder with a training recipe"):
        model_recipe("gpt2")
    model_dir = tmp_path / "model"
    shutil.copytree(fitted_run.store.read_meta()["model"]["spec"], model_dir)
    (model_dir / "stride_viz_model.json").unlink()
    with pytest.raises(VerifyError, match="no readable stride_viz_model.json recipe"):
        model_recipe(str(model_dir))
    run = tmp_path / "run"
    shutil.copytree(fitted_run.store.root, run)
    meta = json.loads((run / "run.json").read_text())
    meta["model"]["spec"] = str(model_dir)
    (run / "run.json").write_text(json.dumps(meta))
    with pytest.raises(VerifyError, match="cannot be retrained"):
        plan(run)


def test_limits_and_bad_parameters_are_refused_with_one_line(fitted_run):
    root = fitted_run.store.root
    p = plan(root, k=3, random_seeds=2, noise_seeds=1)
    assert p["retrains"] == 5 and p["estimated_seconds"] > 0 and p["n_parameters"] > 0
    cases = [(dict(max_seconds=1e-3), "on a 2-core CPU; the limit is 0.0 s"),
             (dict(k=len(fitted_run.pool)), "smaller than the pool"),
             (dict(k=0), "'k' parameter"), (dict(random_seeds=0), "'random_seeds' parameter")]
    for kwargs, msg in cases:
        with pytest.raises(VerifyError, match=msg) as e:
            plan(root, **kwargs)
        assert "\n" not in str(e.value)
    with pytest.raises(VerifyError, match="not a run directory"):
        plan(root.parent / "no-such-run")
    with pytest.raises(VerifyError, match="has not been explained"):
        verify(root, "no-such-query", k=3)


# ----------------------------------------------------------------------------- the Explore panel



def _explore(run_name: str, query: str):
    from dashboard_run import open_page
    return open_page("pages/3_Explore.py", run=run_name, query=query)


def test_explore_verify_button_runs_the_job_and_shows_both_changes(page_home):
    from dashboard_run import wait_job
    from stride_viz.jobs import JobStore
    home, run = page_home
    store = JobStore(home / "jobs.sqlite")
    query = sorted(p.name for p in (run / "attributions").iterdir() if p.name.startswith("fact"))[0]
    at = _explore(run.name, query)
    at.number_input(key="explore_verify_k").set_value(5)
    at.number_input(key="explore_verify_draws").set_value(2).run()
    at.button(key="explore_verify").click().run()
    [job] = [j for j in store.list() if j.kind == "verify"]
    assert job.params == {**job.params, "query_id": query, "k": 5, "random_seeds": 2, "noise_seeds": 1}
    assert wait_job(store, job.id, timeout=400).state == "done", store.get(job.id).log
    at.run()
    text = "\n".join(m.value for m in at.markdown).replace("\\", "")
    assert "without the top 5 proponents" in text and "without 5 random examples (2 draws)" in text
    assert "> 0: removing them made the completion less likely" in text
    assert "reproduces the model's weights exactly" in text
    fig = [c for c in at.get("plotly_chart") if "change of the query" in c.proto.spec]
    assert len(fig) == 1


def test_explore_says_why_a_run_cannot_be_verified(page_home):
    home, run = page_home
    meta = json.loads((run / "run.json").read_text())
    meta["model"]["spec"] = "gpt2"      # a hub model: no recipe to retrain it with
    (run / "run.json").write_text(json.dumps(meta))
    query = sorted(p.name for p in (run / "attributions").iterdir() if p.name.startswith("fact"))[0]
    at = _explore(run.name, query)
    assert any("cannot be verified by retraining" in i.value and "training recipe" in i.value for i in at.info)
    assert not [b for b in at.button if b.key == "explore_verify"]


def test_verdict_compares_the_top_change_with_the_noise_floor():
    from stride_viz.app.downstream_views import verdict, verify_summary
    r = {"k": 4, "loss_full": 2.0, "loss_model": 2.0, "baseline_reproduces_model": True,
         "top": {"change": 0.30, "predicted_change": 0.25, "n_positive_scores": 4},
         "random": {"changes": [0.02, -0.05, 0.01], "mean": -0.0067, "std": 0.036},
         "seed_noise": {"changes": [0.04]}}
    assert verdict(r) == "confirmed" and "**Confirmed:**" in verify_summary(r)
    r["top"]["change"] = 0.045                        # inside the largest random change (0.05)
    assert verdict(r) == "not confirmed"
    r["top"]["change"] = -0.2
    assert verdict(r) == "opposite"
    text = verify_summary(r)
    assert "-0.2000 nats" in text and "+0.2500" in text and "+0.0400 nats" in text


def test_a_run_whose_model_changed_since_the_fit_is_refused(fitted_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(fitted_run.store.root, run)
    meta = json.loads((run / "run.json").read_text())
    meta["model"]["hash"] = "0" * 16
    (run / "run.json").write_text(json.dumps(meta))
    with pytest.raises(VerifyError, match="has changed since the run was fitted"):
        plan(run)
