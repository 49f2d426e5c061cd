"""The one Streamlit helper module of the dashboard: shared widgets, cached file readers and
URL state. The library stays Streamlit-free; pages stay short scripts that call these.

Nothing here loads a model or computes an attribution: pages read run directories and the
job table, and start jobs through :class:`stride_viz.jobs.Executor`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import streamlit as st

from stride_viz.jobs import Executor, Job, JobError, JobStore, LocalProcessExecutor, demo_params_from_env
from stride_viz.data.models import data_home
from stride_viz.app import report

__all__ = ["executor", "SIGN_NOTE", "RESPONSE_NOTE", "DEMO_EXPLANATION", "page_setup", "fmt_seconds",
           "state_label", "explore_link", "render_job", "live_job", "launch_demo_button", "runs",
           "run_info", "pool_rows", "query_view", "fact_ranks", "membership", "init_from_url", "set_url"]

SIGN_NOTE = ("**Sign and units.** A score **w > 0** (green) means the training example **helps**: "
             "training on it lowers the loss of the query's completion (a *proponent*). **w < 0** "
             "(red) means it **hurts** (an *opponent*). Units: nats of mean per-token loss.")
RESPONSE_NOTE = ("**Operator response** y<sub>k</sub> = Loss<sub>base</sub> − Loss<sub>k</sub>, in nats: how "
                 "much steering the model with the operator of training subset k lowers (> 0) or raises "
                 "(< 0) the loss of the query's completion.")
DEMO_EXPLANATION = """
**What you are looking at (the built-in demo).** A small GPT-2 was trained from scratch on
{n} short texts: quotations from the BSD `fortune` program, plus invented facts (for example
*"The capital of Vorlandia is Quessit"*) that each appear in 3-5 documents only. STRIDE then
trained one steering operator per random subset of the pool (K = {K}) and, for each query
below, measured how every operator changes the loss of the query's answer and solved a sparse
regression to find the few training examples that explain those changes.

For a planted fact, the documents that state it are the known right answer: they are marked
with ★. If STRIDE works, they appear among the top proponents (green bars, w > 0). The free
prompt has no known answer: its completion was written by the model itself.
"""

_STATE_ICONS = {"queued": ":material/hourglass_empty:", "running": ":blue[:material/progress_activity:]",
                "done": ":green[:material/check_circle:]", "failed": ":red[:material/error:]",
                "cancelled": ":orange[:material/cancel:]"}


_NAV = (("app.py", "Home", ":material/home:"), ("pages/1_Launch.py", "Launch", ":material/rocket_launch:"),
        ("pages/2_Runs.py", "Runs", ":material/pending_actions:"),
        ("pages/3_Explore.py", "Explore", ":material/travel_explore:"),
        ("pages/4_Evaluate.py", "Evaluate", ":material/rule:"))
_ROOT = Path(__file__).resolve().parents[1]


def page_setup(title: str, icon: str = ":material/travel_explore:") -> None:
    """Page config shared by every page (wide layout: the charts need the width) and the
    sidebar navigation with readable names (Streamlit's own list is hidden in
    .streamlit/config.toml because it would call the home page 'app')."""
    try:
        st.set_page_config(page_title=f"{title} · stride_viz", page_icon=icon, layout="wide")
    except st.errors.StreamlitAPIException:  # set already in this run
        pass
    with st.sidebar:
        st.markdown("### stride_viz")
        for path, label, nav_icon in _NAV:
            if (_ROOT / path).exists():
                st.page_link(path, label=label, icon=nav_icon)
        st.divider()


@st.cache_resource
def _executor(db: str) -> Executor:
    return LocalProcessExecutor(JobStore(db))


def executor() -> Executor:
    """The job executor of this data directory (shared by all sessions; it holds no state
    besides the path of the SQLite file, every call opens its own connection)."""
    return _executor(str(data_home() / "jobs.sqlite"))


def fmt_seconds(s: Optional[float]) -> str:
    if s is None:
        return "unknown"
    s = float(s)
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s // 60:.0f} min {s % 60:02.0f} s"
    return f"{s // 3600:.0f} h {(s % 3600) // 60:02.0f} min"


def state_label(job: Job) -> str:
    return f"{_STATE_ICONS.get(job.state, '')} {job.state}"


def explore_link(run_dir: str, query: Optional[str] = None) -> None:
    """A link to the Explore page showing ``run_dir`` (and ``query``)."""
    params = {"run": Path(run_dir).name}
    if query:
        params["query"] = query
    st.page_link("pages/3_Explore.py", label="Open in Explore", icon=":material/travel_explore:", query_params=params)


def render_job(job: Job, ex: Executor, key: str, compact: bool = False) -> None:
    """One job: state, live progress, buttons (cancel / resume / explore), log and error."""
    head = st.columns([5, 2, 2, 2]) if not compact else st.columns([6, 2, 2])
    with head[0]:
        st.markdown(f"**#{job.id} · {job.title}** — {state_label(job)}"
                    + (f" · attempt {job.attempts}" if job.attempts > 1 else ""))
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(job.created))
        elapsed = job.elapsed_seconds
        st.caption(f"{job.kind} job launched {when}"
                   + (f" · ran {fmt_seconds(elapsed)}" if elapsed is not None else ""))
    if job.active:
        with head[1]:
            if st.button("Cancel", key=f"{key}_cancel_{job.id}", help="Stop the job; a fit keeps its "
                         "last checkpoint and can be resumed."):
                try:
                    ex.cancel(job.id)
                except JobError as e:
                    st.error(str(e))
                st.rerun()
    if job.resumable:
        with head[1]:
            if st.button("Resume", key=f"{key}_resume_{job.id}", help="Run the job again; a fit "
                         "continues from its last checkpoint."):
                try:
                    ex.resume(job.id)
                except JobError as e:
                    st.error(str(e))
                st.rerun()
    if job.state == "done" and job.run_dir and job.kind in ("demo", "attribute"):
        with head[2]:
            queries = job.result.get("query_ids") or [None]
            explore_link(job.run_dir, queries[0])
    if job.state == "running" or (job.state == "queued"):
        stage = job.stage or ("waiting for the job before it" if job.state == "queued" else "starting")
        eta = f" · about {fmt_seconds(job.eta_seconds)} left" if job.eta_seconds is not None else ""
        st.progress(min(1.0, max(0.0, job.fraction)),
                    text=f"{stage}: {100 * job.fraction:.0f}%{eta} {job.message}")
    if job.state == "failed":
        st.error(job.error or "failed")
        if job.traceback:
            with st.expander("Traceback"):
                st.code(job.traceback, language="text")
    elif job.state == "cancelled":
        st.warning(job.error or "cancelled")
    for s in job.result.get("skipped", []):
        st.warning(f"Query {s['id']} was skipped: {s['reason']}")
    if job.log and not compact:
        with st.expander("Log (last lines)"):
            st.code("\n".join(job.log.splitlines()[-30:]), language="text")


def live_job(job_id: int, key: str, compact: bool = True) -> None:
    """Show one job and refresh it every second while it is queued or running; polling stops
    (and the page reruns once) when it ends."""
    ex = executor()
    active = ex.store.get(job_id).active

    @st.fragment(run_every=1.0 if active else None)
    def _panel() -> None:
        ex.store.reap()
        job = ex.store.get(job_id)
        render_job(job, ex, key, compact=compact)
        if active and not job.active:
            st.rerun()

    _panel()


def launch_demo_button(key: str) -> Optional[int]:
    """The one-click demo. Returns the id of the demo job to follow: the one launched from this
    session, else a demo job still queued or running (another tab, before a reload), else None.
    The button is disabled while a demo job is queued or running."""
    ex = executor()
    active = [j.id for j in ex.store.list(kind="demo", limit=5) if j.active]
    if st.button("▶ Launch the demo", key=key, type="primary", disabled=bool(active),
                 help="A demo is already running: follow it below or on the Runs page." if active else
                 "Builds a small GPT-2 on the built-in fortunes+facts pool (reused if it exists), fits "
                 "the STRIDE operators and explains a few planted facts and one free prompt. Runs in "
                 "the background; you can close the browser."):
        try:
            st.session_state["demo_job_id"] = ex.submit("demo", demo_params_from_env())
        except JobError as e:
            st.error(str(e))
    mine = st.session_state.get("demo_job_id")
    return mine if mine is not None else (active[0] if active else None)


# ----------------------------------------------------------------------------- cached readers

def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


@st.cache_data(show_spinner=False, max_entries=64)
def _run_info(path: str, stamp: tuple) -> report.RunInfo:
    return report.read_run(path)


def runs() -> list[report.RunInfo]:
    """Every run under the data directory, newest first (cheap: reads small JSON files)."""
    return report.list_runs(data_home())


def run_info(path: str) -> report.RunInfo:
    p = Path(path)
    return _run_info(path, (_mtime(p / "run.json"), _mtime(p / "operators.safetensors"),
                            _mtime(p / "attributions"), _mtime(p / "fit" / "state.json")))


@st.cache_data(show_spinner=False, max_entries=8)
def _pool_rows(path: str, stamp: float):
    return report.read_pool_rows(path)


def pool_rows(path: str):
    return _pool_rows(path, _mtime(Path(path) / "pool.jsonl"))


@st.cache_data(show_spinner=False, max_entries=32)
def _query_view(path: str, query_id: str, stamp: tuple) -> report.QueryView:
    return report.read_query(path, query_id)


def query_view(path: str, query_id: str) -> report.QueryView:
    from stride_viz.storage import RunStore
    folder = RunStore(path).attribution_dir(query_id)
    return _query_view(path, query_id, (_mtime(folder / "meta.json"), _mtime(folder / "continuations.json")))


@st.cache_data(show_spinner=False, max_entries=16)
def _fact_ranks(path: str, stamp: float) -> list[dict]:
    return report.fact_ranks(path)


def fact_ranks(path: str) -> list[dict]:
    """report.fact_ranks, recomputed only when an attribution is added."""
    return _fact_ranks(path, _mtime(Path(path) / "attributions"))


@st.cache_data(show_spinner=False, max_entries=64)
def membership(path: str, example: int):
    return report.membership_of(path, example)


def init_from_url(mapping: dict[str, str]) -> None:
    """On the first run of a page in a session, copy URL query parameters into the session
    state of the widgets they drive (``mapping``: query param -> widget key)."""
    flag = "_url_loaded_" + "_".join(sorted(mapping.values()))
    if st.session_state.get(flag):
        return
    st.session_state[flag] = True
    for param, key in mapping.items():
        if param in st.query_params:
            st.session_state[key] = st.query_params[param]


def set_url(**params: Any) -> None:
    """Write the view's state into the URL (None removes a parameter), so the link can be shared."""
    for k, v in params.items():
        if v is None or v == "":
            if k in st.query_params:
                del st.query_params[k]
        elif st.query_params.get(k) != str(v):
            st.query_params[k] = str(v)
