"""Progress of whole jobs: the overall fraction and time left from the reports of their stages."""
from __future__ import annotations

import pytest

from stride_viz.config import FitConfig
from stride_viz.jobs.kinds import fit_plan, stage_position
from stride_viz.jobs.store import Job
from stride_viz.progress import JobProgress, Stage, overall_eta, overall_fraction

PLAN = (Stage("model", "loading", 10.0), Stage("cache", "reading", 30.0), Stage("fit", "fitting", 60.0))


def test_overall_fraction_weighs_each_stage_by_its_expected_seconds():
    assert overall_fraction(PLAN, 0, 0.0) == 0.0
    assert overall_fraction(PLAN, 0, 1.0) == pytest.approx(0.1)
    assert overall_fraction(PLAN, 1, 0.5) == pytest.approx(0.25)     # (10 + 15) / 100
    assert overall_fraction(PLAN, 2, 1.0) == pytest.approx(1.0)
    assert overall_fraction(PLAN, 1, 7.0) == pytest.approx(0.4)      # a fraction past 1 is clamped
    flat = (Stage("a", "a", 0.0), Stage("b", "b", 0.0))
    assert overall_fraction(flat, 1, 0.5) == pytest.approx(0.75)     # no weights: equal shares


def test_overall_eta_adds_the_stages_still_to_come_at_the_measured_speed():
    assert overall_eta(PLAN, 1, 0.5, 30.0, 2.0) == pytest.approx(30 + 2 * 60)
    assert overall_eta(PLAN, 1, 0.5, None, 2.0) == pytest.approx(2 * 15 + 2 * 60)
    assert overall_eta(PLAN, 1, 0.5, 30.0, None) is None     # later stages: speed unknown
    assert overall_eta(PLAN, 2, 0.5, 12.0, None) == 12.0     # the last stage knows its own


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_job_progress_reports_the_whole_job_not_each_stage():
    calls, clock = [], Clock()
    job = JobProgress(PLAN, lambda *a: calls.append(a), clock=clock)
    job("model", 0.0, None, "loading the demo model")
    assert calls[-1] == ("model", 0.0, None, "loading the demo model")
    clock.now = 5.0
    job("cache", 0.5, 30.0, "batch 4/8")          # 30 s left for 15 expected s: speed 2
    stage, fraction, eta, message = calls[-1]
    assert (stage, message) == ("cache", "batch 4/8")
    assert fraction == pytest.approx(0.25) and eta == pytest.approx(30 + 2 * 60)
    job("cache", 1.0, 0.0)
    assert calls[-1][1] == pytest.approx(0.4) and calls[-1][2] == pytest.approx(120)
    job("fit", 0.25, 90.0)                         # speed 90 / (60 x 0.75) = 2
    assert calls[-1][1] == pytest.approx(0.55) and calls[-1][2] == pytest.approx(90)
    job("generate", 0.9, 1.0, "a report from outside the plan")
    assert calls[-1][1] == pytest.approx(0.55) and calls[-1][2] == pytest.approx(2 * 45)


def test_skipped_stages_count_as_done_and_a_stage_over_at_once_measures_nothing():
    calls, clock = [], Clock()
    job = JobProgress(PLAN, lambda *a: calls.append(a), clock=clock)
    job("model", 0.5, 2.0)                          # speed 2 / (10 x 0.5) = 0.4
    job("fit", 1.0, 0.0, "operators already fitted: reused")   # the cache was skipped
    assert calls[-1][1] == pytest.approx(1.0) and calls[-1][2] == pytest.approx(0.0)
    assert job.speed == pytest.approx(0.4)
    # a stage without a time-left estimate is timed from its first report to its last
    job = JobProgress(PLAN, lambda *a: calls.append(a), clock=clock)
    job("cache", 0.0, None)
    clock.now += 45.0
    job("cache", 1.0, None)
    assert job.speed == pytest.approx(1.5) and calls[-1][2] == pytest.approx(1.5 * 60)


def test_a_resumed_stage_measures_its_speed_on_the_work_left():
    calls = []
    job = JobProgress(PLAN, lambda *a: calls.append(a), clock=Clock())
    job("fit", 0.5, 60.0, "step 500/1000")          # restored half-way; 60 s for 30 expected s
    assert job.speed == pytest.approx(2.0)
    assert calls[-1][1] == pytest.approx(0.7) and calls[-1][2] == pytest.approx(60.0)


def test_stage_plans_name_the_stages_of_each_kind():
    assert stage_position("demo", "fit") == (3, 4, "fitting operators")
    assert stage_position("attribute", "model") == (1, 4, "loading the model")
    assert stage_position("sleep", "sleep") == (1, 1, "waiting")
    assert stage_position("demo", "train-model") is None
    plan = fit_plan("attribute", 3115, FitConfig(), 4)
    assert [s.name for s in plan] == ["model", "cache", "fit", "attribute"]
    bigger = fit_plan("attribute", 6230, FitConfig(epochs=6.0), 4)
    assert bigger[1].seconds == pytest.approx(2 * plan[1].seconds)     # cache: pool size
    assert bigger[2].seconds == pytest.approx(4 * plan[2].seconds)     # fit: size x epochs
    assert bigger[3].seconds == pytest.approx(plan[3].seconds)


def _job(**kw) -> Job:
    return Job(**{"id": 1, "kind": "demo", "title": "demo", "params": {}, "heavy": True,
                  "state": "running", **kw})


def test_progress_text_says_the_stage_the_share_of_the_job_and_the_time_left():
    from stride_viz.app.ui import progress_text
    job = _job(stage="fit", fraction=0.62, eta_seconds=70, message="step 120/392")
    assert progress_text(job) == ("stage 3 of 4: fitting operators · 62% of the job · "
                                  "about 1 min 10 s left · step 120/392")
    assert progress_text(_job(kind="sleep", stage="sleep", fraction=0.5)) == "waiting · 50% of the job"
    assert progress_text(_job(stage="")) == "starting · 0% of the job"
    assert progress_text(_job(state="queued")) == "waiting for the job before it"
    assert progress_text(_job(state="queued", attempts=2, fraction=0.4)) == (
        "waiting for the job before it · 40% was done before it stopped")
