"""The job runner: real detached worker processes on a SQLite table in tmp_path.

Engine-free tests use the ``sleep`` kind (it waits in steps, reports progress and keeps a step
checkpoint); the last tests run the real ``attribute`` and ``continuation`` kinds against the
tiny demo run of :mod:`dashboard_run`.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from dashboard_run import TINY_DEMO, tiny_demo_home, tiny_demo_info, wait_job
from stride_viz.config import FitConfig
from stride_viz.demo import default_run_dir
from stride_viz.jobs import JobError, JobStore, LocalProcessExecutor
from stride_viz.jobs.store import process_alive


@pytest.fixture
def ex(tmp_path, monkeypatch):
    monkeypatch.setenv("STRIDE_VIZ_HOME", str(tmp_path))
    executor = LocalProcessExecutor(JobStore(tmp_path / "jobs.sqlite"))
    yield executor
    for job in executor.store.list():  # never leave a worker behind
        if job.active:
            executor.cancel(job.id)


def _running(job) -> bool:
    return job.state == "running" and job.fraction > 0


def test_job_goes_queued_running_done_with_progress_and_log(ex):
    job_id = ex.submit("sleep", {"seconds": 0.6, "steps": 3})
    assert ex.store.get(job_id).state in ("queued", "running")
    job = wait_job(ex.store, job_id, timeout=60)
    assert job.state == "done", job.error
    assert job.fraction == 1.0 and job.stage == "sleep" and job.message == "step 3/3"
    assert job.result == {"start_step": 0, "steps_run": 3}
    assert job.started is not None and job.finished >= job.started
    assert f"started sleep job {job_id}" in job.log and "done" in job.log
    assert ex.store.log_path(job_id).exists()


def test_bad_input_is_refused_and_nothing_is_queued(ex, tmp_path):
    with pytest.raises(JobError, match="'seconds'.*\\(0, 3600\\]"):
        ex.submit("sleep", {"seconds": -1})
    with pytest.raises(JobError, match="Unknown job kind 'train'.*attribute"):
        ex.submit("train", {})
    good = {"model": "demo", "pool": "fortunes+facts", "queries": [{"prompt": "The capital is"}]}
    with pytest.raises(JobError, match="neither a built-in pool"):
        ex.submit("attribute", {**good, "pool": str(tmp_path / "missing.jsonl")})
    with pytest.raises(JobError, match="Model folder .* does not exist"):
        ex.submit("attribute", {**good, "model": str(tmp_path / "no_model")})
    with pytest.raises(JobError, match="prompt is empty"):
        ex.submit("attribute", {**good, "queries": [{"prompt": "  "}]})
    with pytest.raises(JobError, match="'subsets' parameter of FitConfig"):
        ex.submit("attribute", {**good, "fit": {"subsets": 1}})
    with pytest.raises(JobError, match="'selection' parameter of RecoveryConfig"):
        ex.submit("attribute", {**good, "recovery": {"selection": "best"}})
    assert ex.store.list() == []


def test_cancel_stops_the_worker_and_stays_cancelled(ex):
    job_id = ex.submit("sleep", {"seconds": 60, "steps": 600})
    job = wait_job(ex.store, job_id, timeout=60, until=_running)
    pid = job.pid
    ex.cancel(job_id)
    assert ex.store.get(job_id).state == "cancelled"
    psutil.Process(pid).wait(timeout=20) if process_alive(pid, job.pid_created) else None
    assert not process_alive(pid, job.pid_created)
    job = ex.store.get(job_id)
    assert job.state == "cancelled" and job.fraction < 1.0 and "Resume" in job.error
    with pytest.raises(JobError, match="only queued or running"):
        ex.cancel(job_id)


def test_heavy_jobs_queue_one_at_a_time_light_jobs_do_not_wait(ex):
    first = ex.submit("sleep", {"seconds": 4, "steps": 8})
    second = ex.submit("sleep", {"seconds": 0.3, "steps": 1})
    light = ex.submit("sleep", {"seconds": 0.3, "steps": 1, "heavy": False})
    third = ex.submit("sleep", {"seconds": 30, "steps": 30})
    wait_job(ex.store, first, timeout=60, until=_running)
    assert ex.store.get(second).state == "queued"
    ex.cancel(third)  # a queued job can be cancelled before it starts
    jobs = {j: wait_job(ex.store, j, timeout=60) for j in (first, second, light)}
    assert all(j.state == "done" for j in jobs.values())
    assert jobs[second].started >= jobs[first].finished           # waited for the heavy one
    assert jobs[light].started < jobs[first].finished              # ran alongside it
    third_job = ex.store.get(third)
    assert third_job.state == "cancelled" and third_job.started is None


def test_more_heavy_slots_let_heavy_jobs_run_together(ex, monkeypatch):
    monkeypatch.setenv("STRIDE_VIZ_MAX_HEAVY_JOBS", "2")   # inherited by the workers
    a = ex.submit("sleep", {"seconds": 2, "steps": 4})
    b = ex.submit("sleep", {"seconds": 2, "steps": 4})
    ja, jb = wait_job(ex.store, a, timeout=60), wait_job(ex.store, b, timeout=60)
    assert ja.state == jb.state == "done"
    assert jb.started < ja.finished and ja.started < jb.finished


def test_resume_continues_from_the_checkpoint(ex, tmp_path):
    ckpt = tmp_path / "sleep.ckpt"
    job_id = ex.submit("sleep", {"seconds": 3, "steps": 30, "checkpoint": str(ckpt)})
    wait_job(ex.store, job_id, timeout=60, until=lambda j: j.fraction >= 0.2)
    ex.cancel(job_id)
    wait_job(ex.store, job_id, timeout=30, until=lambda j: not process_alive(j.pid, j.pid_created))
    saved = int(ckpt.read_text())
    assert 0 < saved < 30
    ex.resume(job_id)
    job = wait_job(ex.store, job_id, timeout=60)
    assert job.state == "done" and job.attempts == 2
    assert job.result == {"start_step": saved, "steps_run": 30 - saved}
    assert "resumed (attempt 2)" in job.log
    # both attempts count (no wall-clock bound: the machine may be slow or busy)
    assert job.elapsed_before > 0 and job.elapsed_seconds > job.elapsed_before
    with pytest.raises(JobError, match="only failed or cancelled"):
        ex.resume(job_id)


def test_a_resumed_job_keeps_the_time_its_earlier_attempts_ran(tmp_path, monkeypatch):
    from types import SimpleNamespace
    from stride_viz.jobs import store as store_module
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(store_module, "time", SimpleNamespace(time=lambda: clock.now))
    store = JobStore(tmp_path / "jobs.sqlite")
    job_id = store.create("sleep", {"seconds": 1})
    assert store.get(job_id).elapsed_seconds is None                 # never started
    assert store.try_start(job_id) == "started"
    clock.now = 1100.0
    assert store.get(job_id).elapsed_seconds == pytest.approx(100)    # running
    store.finish(job_id, "failed", error="killed")
    clock.now = 5000.0                                                # an hour later, resumed
    store.requeue(job_id)
    job = store.get(job_id)
    assert job.state == "queued" and job.started is None and job.elapsed_seconds == pytest.approx(100)
    clock.now = 5100.0
    store.try_start(job_id)
    clock.now = 5130.0
    assert store.get(job_id).elapsed_seconds == pytest.approx(130)    # the waiting time does not count
    store.request_cancel(job_id)
    clock.now = 6000.0
    store.requeue(job_id)
    assert store.get(job_id).elapsed_before == pytest.approx(130)


def test_an_older_job_table_gains_the_elapsed_column(tmp_path):
    import sqlite3
    from stride_viz.jobs.store import _SCHEMA
    path = tmp_path / "jobs.sqlite"
    con = sqlite3.connect(path)
    older = _SCHEMA.replace(",\n    elapsed_before REAL NOT NULL DEFAULT 0", "")
    assert "elapsed_before" not in older
    con.executescript(older)
    con.execute("INSERT INTO jobs (kind, params, state, created, queued_at) VALUES ('sleep', '{}', 'done', 1, 1)")
    con.commit()
    con.close()
    store = JobStore(path)
    assert store.get(1).elapsed_before == 0.0 and store.get(1).state == "done"
    JobStore(path)                                                    # a second open adds nothing


def test_killed_worker_shows_failed_and_can_be_resumed(ex, tmp_path):
    ckpt = tmp_path / "killed.ckpt"
    job_id = ex.submit("sleep", {"seconds": 2, "steps": 20, "checkpoint": str(ckpt)})
    job = wait_job(ex.store, job_id, timeout=60, until=_running)
    os.kill(job.pid, signal.SIGKILL)
    job = wait_job(ex.store, job_id, timeout=30)
    assert job.state == "failed" and "stopped without reporting" in job.error
    ex.resume(job_id)
    job = wait_job(ex.store, job_id, timeout=60)
    assert job.state == "done" and job.result["start_step"] > 0


def test_frozen_worker_is_stopped_and_shown_failed(ex):
    job_id = ex.submit("sleep", {"seconds": 60, "steps": 600})
    job = wait_job(ex.store, job_id, timeout=60, until=_running)
    os.kill(job.pid, signal.SIGSTOP)
    time.sleep(1.5)
    assert job_id in ex.store.reap(stale_seconds=1.0)
    job = ex.store.get(job_id)
    assert job.state == "failed" and "did not report" in job.error
    psutil.Process(job.pid).wait(timeout=20)


def test_job_that_never_got_a_worker_is_failed_not_queued_forever(ex, monkeypatch):
    job_id = ex.store.create("sleep", {"seconds": 1, "steps": 1})    # a row whose spawn never happened
    assert ex.store.reap() == [] and ex.store.get(job_id).state == "queued"
    monkeypatch.setattr("stride_viz.jobs.store.SPAWN_GRACE_SECONDS", 0.0)
    assert ex.store.reap() == [job_id]
    job = ex.store.get(job_id)
    assert job.state == "failed" and "No worker process" in job.error


def test_jobs_outlive_the_launching_process_and_its_store(ex):
    job_id = ex.submit("sleep", {"seconds": 1, "steps": 2})
    job = ex.store.get(job_id)
    # the worker is in its own session and not our child: a server restart does not stop it
    assert os.getsid(job.pid) != os.getsid(0)
    assert job.pid not in [c.pid for c in psutil.Process().children(recursive=True)]
    reopened = JobStore(ex.store.path)      # what a restarted server sees
    assert wait_job(reopened, job_id, timeout=60).state == "done"
    assert [j.id for j in reopened.list()] == [job_id]


# ----------------------------------------------------------------------------- real engine jobs

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    home = tiny_demo_home(tmp_path_factory)
    return home, tiny_demo_info(home)


def test_demo_job_wrote_a_complete_run(demo, monkeypatch):
    home, info = demo
    monkeypatch.setenv("STRIDE_VIZ_HOME", str(home))
    run = Path(info["run_dir"])
    assert run.parent == home / "runs"
    assert info["result"]["query_ids"] == ["fact-07", "fact-10"]
    meta = json.loads((run / "run.json").read_text())
    assert meta["config"]["subsets"] == TINY_DEMO["fit"]["subsets"] and meta["pool"]["n"] == 80
    # named like the CLI demo's runs, so both reuse each other's fits
    assert run == default_run_dir(meta["model"]["hash"], meta["pool"]["hash"], FitConfig(**TINY_DEMO["fit"]))
    for qid in info["result"]["query_ids"]:
        assert np.load(run / "attributions" / qid / "responses.npy").shape == (16,)


def test_attribute_job_reuses_fitted_operators(demo, monkeypatch):
    home, info = demo
    monkeypatch.setenv("STRIDE_VIZ_HOME", str(home))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ex = LocalProcessExecutor(JobStore(home / "jobs.sqlite"))
    model_dir = next((home / "models").glob("demo-tiny-*"))
    fit_state = (Path(info["run_dir"]) / "fit" / "state.json").read_text()
    job_id = ex.submit("attribute", {
        "model": str(model_dir), "pool": "fortunes+facts", "pool_limit": TINY_DEMO["pool_limit"],
        "fit": TINY_DEMO["fit"], "queries": [{"id": "reuse", "prompt": "Money is", "completion": " power."}]})
    job = wait_job(ex.store, job_id, timeout=120)
    assert job.state == "done", job.error
    assert job.run_dir == info["run_dir"]                       # same model, pool, config: same run
    assert "operators already fitted: reused" in job.log
    assert (Path(info["run_dir"]) / "fit" / "state.json").read_text() == fit_state
    assert (Path(info["run_dir"]) / "attributions" / "reuse" / "scores.npy").exists()


def test_continuation_job_adds_the_operator(demo, monkeypatch):
    home, info = demo
    monkeypatch.setenv("STRIDE_VIZ_HOME", str(home))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ex = LocalProcessExecutor(JobStore(home / "jobs.sqlite"))
    path = Path(info["run_dir"]) / "attributions" / "fact-07" / "continuations.json"
    have = {o["k"] for o in json.loads(path.read_text())["operators"]}
    k = min(set(range(16)) - have)
    with pytest.raises(JobError, match="has not been attributed"):
        ex.submit("continuation", {"run_dir": info["run_dir"], "query_id": "nope", "k": k})
    job = wait_job(ex.store, ex.submit("continuation", {"run_dir": info["run_dir"], "query_id": "fact-07", "k": k}),
                   timeout=120)
    assert job.state == "done", job.error
    ops = {o["k"]: o for o in json.loads(path.read_text())["operators"]}
    assert k in ops and ops[k]["text"] == job.result["text"]


@pytest.mark.slow  # about a minute on 2 busy cores; the sleep-job resume test covers the runner
def test_cancelled_real_fit_resumes_from_its_checkpoint(demo, monkeypatch):
    home, _ = demo
    monkeypatch.setenv("STRIDE_VIZ_HOME", str(home))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ex = LocalProcessExecutor(JobStore(home / "jobs.sqlite"))
    # the tiny demo's model and pool (reused), a longer fit with frequent checkpoints
    params = {**TINY_DEMO, "n_fact_queries": 1,
              "fit": {**TINY_DEMO["fit"], "epochs": 40, "checkpoint_every": 10}}
    job_id = ex.submit("demo", params)
    job = wait_job(ex.store, job_id, timeout=180, until=lambda j: j.stage == "fit" and j.fraction > 0.2)
    ex.cancel(job_id)
    job = wait_job(ex.store, job_id, timeout=60, until=lambda j: not process_alive(j.pid, j.pid_created))
    assert job.state == "cancelled"
    saved = json.loads((Path(job.run_dir) / "fit" / "state.json").read_text())
    assert saved["status"] == "running" and 0 < saved["step"] < saved["total_steps"]
    ex.resume(job_id)
    job = wait_job(ex.store, job_id, timeout=180)
    assert job.state == "done", job.error
    done = json.loads((Path(job.run_dir) / "fit" / "state.json").read_text())
    assert done["status"] == "done" and done["step"] == saved["total_steps"]
    # the resumed attempt started after the checkpoint, not from step 0
    resumed_log = job.log.split("resumed (attempt 2)")[1]
    first_step = int(resumed_log.split("fit ")[1].split("step ")[1].split("/")[0])
    assert first_step > saved["step"] - 1


def test_failing_job_keeps_message_and_traceback(demo, tmp_path, monkeypatch):
    home, _ = demo
    monkeypatch.setenv("STRIDE_VIZ_HOME", str(tmp_path))
    ex = LocalProcessExecutor(JobStore(tmp_path / "jobs.sqlite"))
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(40)))
    model_dir = next((home / "models").glob("demo-tiny-*"))
    blocker = ex.submit("sleep", {"seconds": 60, "steps": 600})  # holds the queue
    job_id = ex.submit("attribute", {"model": str(model_dir), "pool": str(pool),
                                     "queries": [{"prompt": "doc", "completion": " 1"}]})
    pool.unlink()  # valid when launched, gone before the worker reads it
    ex.cancel(blocker)
    job = wait_job(ex.store, job_id, timeout=60)
    assert job.state == "failed"
    assert job.error.startswith("PoolError") and "does not exist" in job.error
    assert "Traceback" in job.traceback and "load_pool" in job.traceback


# ----------------------------------------------------------------------------- the warm explainer

@pytest.fixture
def explain_ex(demo, tmp_path, monkeypatch):
    """An executor on a fresh job table, with a private copy of the tiny demo run (explained
    prompts are added to it), and explainers that exit after 4 idle seconds."""
    import shutil
    home, info = demo
    monkeypatch.setenv("STRIDE_VIZ_HOME", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("STRIDE_VIZ_EXPLAINER_IDLE", "4")
    run = tmp_path / "runs" / Path(info["run_dir"]).name
    shutil.copytree(info["run_dir"], run)
    executor = LocalProcessExecutor(JobStore(tmp_path / "jobs.sqlite"))
    yield executor, str(run)
    from stride_viz.jobs.explainer import explainer_record
    record = explainer_record(executor.store, run)
    if record is not None:                      # never leave an explainer behind
        os.kill(record["pid"], signal.SIGTERM)
        psutil.Process(record["pid"]).wait(timeout=30)


def test_explain_jobs_are_served_by_one_warm_explainer_per_run(explain_ex):
    from stride_viz.jobs import query_id_for
    from stride_viz.jobs.explainer import explainer_record
    ex, run = explain_ex
    first = wait_job(ex.store, ex.submit("explain", {"run_dir": run, "prompt": "Money is",
                                                     "completion": " power."}), timeout=180)
    assert first.state == "done", first.error + first.log
    record = explainer_record(ex.store, run)
    assert record is not None and record["state"] == "ready" and first.pid == record["pid"]
    # detached like a worker: not our child, in its own session
    assert os.getsid(record["pid"]) != os.getsid(0)
    assert record["pid"] not in [c.pid for c in psutil.Process().children(recursive=True)]
    qid = query_id_for("Money is", " power.")
    assert first.result["query_ids"] == [qid] and first.run_dir == run
    assert (Path(run) / "attributions" / qid / "meta.json").exists()

    # warm: the same process answers the next request, without loading anything again
    t0 = time.monotonic()
    second = wait_job(ex.store, ex.submit("explain", {"run_dir": run, "prompt": "Time is",
                                                      "completion": " money."}), timeout=60)
    warm_seconds = time.monotonic() - t0
    assert second.state == "done" and second.pid == record["pid"], second.error
    assert warm_seconds < 5.0, f"a warm request took {warm_seconds:.2f} s"

    # no completion: the model completes the prompt; this tiny model writes only spaces, so
    # the request fails with the engine's one-line reason and the explainer keeps serving
    blank = wait_job(ex.store, ex.submit("explain", {"run_dir": run, "prompt": "The capital of"}), timeout=60)
    assert blank.state == "failed" and "produced no completion" in blank.error and "\n" not in blank.error
    assert blank.pid == record["pid"]

    # a cancelled request does not stop the explainer that serves the others
    job_id = ex.submit("explain", {"run_dir": run, "prompt": "Cancel me", "completion": " now."})
    ex.cancel(job_id)
    assert ex.store.get(job_id).state == "cancelled"
    third = wait_job(ex.store, ex.submit("explain", {"run_dir": run, "prompt": "Still", "completion": " here."}),
                     timeout=60)
    assert third.state == "done" and third.pid == record["pid"]
    assert ex.store.get(job_id).state == "cancelled"

    # it exits by itself after the idle timeout (4 s here), and its record goes with it
    psutil.Process(record["pid"]).wait(timeout=60)
    assert explainer_record(ex.store, run) is None


def test_explain_refuses_bad_input_before_queueing(explain_ex, tmp_path):
    from stride_viz.jobs.kinds import MAX_PROMPT_CHARS
    ex, run = explain_ex
    for params, message in [({"run_dir": run, "prompt": "   "}, "Type a prompt"),
                            ({"run_dir": run, "prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "shorten it to at most"),
                            ({"run_dir": run, "prompt": "ok", "completion": "y" * (MAX_PROMPT_CHARS + 1)},
                             "The completion is"),
                            ({"run_dir": str(tmp_path / "nowhere"), "prompt": "ok"}, "has no run.json")]:
        with pytest.raises(JobError, match=message):
            ex.submit("explain", params)
    assert ex.store.list() == []
