"""A tiny finished demo run made through the real job runner, shared by the dashboard tests.

``tiny_demo_home(tmp_path_factory)`` returns a data directory (for STRIDE_VIZ_HOME) holding a
finished ``demo`` job: a 1-layer, width-32 GPT-2 whose tokenizer and weights are trained in
the test on the first 80 documents of ``fortunes+facts``, operators fitted with K = 16, and two
planted-fact queries explained. It is built once per test session (about half a minute on
two busy cores) and reused by every module that asks for it.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TINY_DEMO = {
    "pool_limit": 80,
    "n_fact_queries": 2,
    "model": {"n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 300, "steps": 20, "max_length": 48,
              "fact_repeats": 1, "weight_decay": 0.01, "prefix_space": False},
    # stability on (off by default): without it, this 16-operator, one-epoch run leaves the
    # Lasso at all-zero scores for the fact queries (the defaults are tuned on real sizes)
    "fit": {"subsets": 16, "per_example": 2, "rank": 4, "epochs": 1, "batch_size": 16, "max_length": 48,
            "stability_weight": 1.0},
}
# the same settings as STRIDE_VIZ_DEMO_* environment variables (the browser test uses them)
TINY_DEMO_ENV = {
    "STRIDE_VIZ_DEMO_POOL_LIMIT": str(TINY_DEMO["pool_limit"]),
    "STRIDE_VIZ_DEMO_QUERIES": str(TINY_DEMO["n_fact_queries"]),
    "STRIDE_VIZ_DEMO_MODEL": json.dumps(TINY_DEMO["model"]),
    "STRIDE_VIZ_DEMO_FIT": json.dumps(TINY_DEMO["fit"]),
    # tiny models on a shared CPU: one thread per worker avoids oversubscription (5x faster)
    "OMP_NUM_THREADS": "1",
}


def wait_job(store, job_id: int, timeout: float = 240.0, until=lambda j: not j.active):
    """Poll the job row until ``until(job)`` holds; fail with the job's log on timeout."""
    t0 = time.monotonic()
    while True:
        store.reap()
        job = store.get(job_id)
        if until(job):
            return job
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"job {job_id} still {job.state} after {timeout} s; log:\n{job.log}")
        time.sleep(0.2)


def tiny_demo_home(tmp_path_factory) -> Path:
    """The data directory with the finished tiny demo run (built on first use)."""
    home = tmp_path_factory.getbasetemp() / "dashboard_home"
    marker = home / "tiny_demo_job.json"
    if marker.exists():
        return home
    home.mkdir(parents=True, exist_ok=True)
    old = {k: os.environ.get(k) for k in ("STRIDE_VIZ_HOME", "OMP_NUM_THREADS")}
    os.environ["STRIDE_VIZ_HOME"] = str(home)
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        from stride_viz.jobs import JobStore, LocalProcessExecutor
        ex = LocalProcessExecutor(JobStore(home / "jobs.sqlite"))
        job = wait_job(ex.store, ex.submit("demo", TINY_DEMO))
        assert job.state == "done", f"tiny demo failed: {job.error}\n{job.traceback}"
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    marker.write_text(json.dumps({"job_id": job.id, "run_dir": job.run_dir, "result": job.result}))
    return home


def tiny_demo_info(home: Path) -> dict:
    """{"job_id", "run_dir", "result"} of the tiny demo job."""
    return json.loads((home / "tiny_demo_job.json").read_text())


# Text that must stay text wherever the dashboard shows it (Markdown, Plotly, HTML, CSV).
HOSTILE = ('<a href="https://evil.example/a">link</a> [t](https://evil.example/md) '
           '![i](https://evil.example/i.png) <img src="https://evil.example/img.png"> '
           '<script>window.pwned = 1</script> www.evil.example :red[x] $x^2$ %{x}')
HOSTILE_CELL = '=HYPERLINK("https://evil.example/c","x")'


def hostile_copy(run_dir: str | Path, home: Path) -> Path:
    """A copy of a finished run under ``home/runs`` whose pool ids and texts are hostile: ids
    ``<b>i</b>…``-style HTML and Markdown plus a formula cell, texts :data:`HOSTILE` before the
    original text. Returns the copy's folder (the newest run of ``home``)."""
    import shutil
    src = Path(run_dir)
    dst = home / "runs" / f"{src.name}-hostile"
    shutil.copytree(src, dst)
    rows = [json.loads(line) for line in (dst / "pool.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        row["id"] = (f'<a href="https://evil.example/{i}">id{i}</a>' if i % 2 else
                     f"[id{i}](https://evil.example/{i})" if i % 3 else f"{HOSTILE_CELL[:-1]}{i})")
        row["prompt"] = HOSTILE + " " + (row.get("prompt") or "")
    (dst / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    facts = dst / "facts.json"
    if facts.exists():
        facts.unlink()  # its source ids name the original pool
    now = time.time()
    os.utime(dst / "run.json", (now, now))
    return dst


def open_page(page: str | None = None, root: Path = ROOT, **params: str):
    """The app through Streamlit's AppTest, as a user arrives: ``app.py`` (of ``root``) run with
    the URL's query ``params``, then switched to ``page`` (e.g. "pages/3_Explore.py") and run
    again; fails on any exception. Returns the AppTest."""
    from streamlit.testing.v1 import AppTest
    at = AppTest.from_file(str(Path(root) / "app.py"), default_timeout=120)
    for k, v in params.items():
        at.query_params[k] = v
    at.run()
    if page is not None:
        at.switch_page(page)
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def fresh_clone(tmp_path: Path) -> Path:
    """What a fresh clone holds for the Evaluate page: the pages and the committed LDS results
    (lds.json, its ground truth, the scores, the second corpus's lds_wordnet*.json), no
    benchmarks/work/; returns the clone's root."""
    clone = tmp_path / "clone"
    clone.mkdir()
    for name in ("app.py", "pages", ".streamlit"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, clone / name)
    results = ROOT / "benchmarks" / "results"
    dst = clone / "benchmarks" / "results"
    dst.mkdir(parents=True)
    shutil.copy(results / "lds.json", dst / "lds.json")
    ground_truth = json.loads((results / "lds.json").read_text())["ground_truth"]
    shutil.copytree(ROOT / ground_truth, clone / ground_truth)
    shutil.copytree(results / "lds_scores", dst / "lds_scores")
    for name in ("lds_wordnet.json", "lds_wordnet_choices.json"):   # the second corpus
        if (results / name).exists():
            shutil.copy(results / name, dst / name)
    return clone
