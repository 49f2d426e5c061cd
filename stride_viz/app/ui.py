"""The one Streamlit helper module of the dashboard: shared widgets, cached file readers and
URL state. The library stays Streamlit-free; pages stay short scripts that call these.

Nothing here loads a model or computes an attribution: pages read run directories and the
job table, and start jobs through :class:`stride_viz.jobs.Executor`.
"""
from __future__ import annotations

import functools
import re
import time
from pathlib import Path
from typing import Any, Optional

import streamlit as st

from stride_viz.jobs import (Executor, Job, JobError, JobStore, LocalProcessExecutor, demo_params_from_env,
                             stage_position)
from stride_viz.data.models import data_home
from stride_viz.app import launch, report

__all__ = ["executor", "SIGN_NOTE", "RESPONSE_NOTE", "DEMO_EXPLANATION", "page_setup", "fmt_seconds",
           "md", "md_code", "state_label", "explore_link", "progress_text", "render_job", "live_job",
           "launch_demo_button",
           "runs", "run_info", "pool_rows", "query_view", "query_infos", "fact_ranks", "membership",
           "init_from_url", "set_url"]

SIGN_NOTE = ("**Sign and units.** A score **w > 0** (green) means the training example **helps**: "
             "training on it lowers the loss of the query's completion (a *proponent*). **w < 0** "
             "(red) means it **hurts** (an *opponent*). Units: nats of mean per-token loss.")
RESPONSE_NOTE = ("**Operator response** y<sub>k</sub> = Loss<sub>base</sub> − Loss<sub>k</sub>, in nats: how "
                 "much steering the model with the operator of training subset k lowers (> 0) or raises "
                 "(< 0) the loss of the query's completion.")
DEMO_EXPLANATION = """
**What you are looking at (the built-in demo).** A small GPT-2 was trained from scratch on
{n} short texts: quotations from the BSD `fortune` program, plus invented facts (for example
*"The capital of Vorlandia is Quessit"*) that each appear in 7-8 documents only. STRIDE then
trained one steering operator per random subset of the pool (K = {K}) and, for each query
below, measured how every operator changes the loss of the query's answer and solved a sparse
regression that scores every training example by how much it explains of those changes (many
scores are exactly 0; the page says how much of the total the top ones carry).

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
        ("pages/4_Evaluate.py", "Evaluate", ":material/rule:"),
        ("pages/5_Audit.py", "Audit", ":material/policy:"),
        ("pages/6_Select.py", "Select", ":material/filter_alt:"))
_ROOT = Path(__file__).resolve().parents[2]   # the repository: app.py and pages/


def page_setup(title: str, icon: str = "🔎") -> None:
    """Page config shared by every page (wide layout: the charts need the width) and the
    sidebar navigation with readable names (Streamlit's own list is hidden in
    .streamlit/config.toml because it would call the home page 'app').

    icon: the tab's icon, an emoji (drawn locally; a ``:material/...:`` page icon would make
    the browser fetch it from fonts.gstatic.com, and nothing here may leave the machine)."""
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


def md(text: object) -> str:
    """``text`` (a name from a URL, a pool id, a prompt, an error message) as inert Markdown for
    st.markdown / st.caption / st.error...: every ASCII punctuation character is
    backslash-escaped, so no link, image, HTML tag, ``:color[...]`` or ``$math$`` can form,
    and whitespace is collapsed (no headings, lists or code blocks either)."""
    return re.sub(r"([!-/:-@\[-`{-~])", r"\\\1", " ".join(str(text).split()))


def md_code(text: object) -> str:
    """``text`` as a Markdown code span (shown verbatim, in monospace), whatever backticks it holds."""
    text = " ".join(str(text).split())
    if not text:
        return ""
    fence = "`" * (max((len(r) for r in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if len(fence) > 1 else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def state_label(job: Job) -> str:
    return f"{_STATE_ICONS.get(job.state, '')} {job.state}"


def explore_link(run_dir: str, query: Optional[str] = None) -> None:
    """A link to the Explore page showing ``run_dir`` (and ``query``)."""
    params = {"run": Path(run_dir).name}
    if query:
        params["query"] = query
    st.page_link("pages/3_Explore.py", label="Open in Explore", icon=":material/travel_explore:", query_params=params)


def progress_text(job: Job) -> str:
    """The line under an active job's progress bar: where it is in the stages of its kind, the
    share of the whole job done and the whole job's time left, then the stage's own message
    ("stage 3 of 4: fitting operators · 62% of the job · about 1 min 10 s left · step 120/392 ...")."""
    if job.state == "queued":
        before = (f" · {100 * job.fraction:.0f}% was done before it stopped"
                  if job.attempts > 1 and job.fraction > 0 else "")
        return "waiting for the job before it" + before
    position = stage_position(job.kind, job.stage)
    if position is None:
        where = job.stage or "starting"
    elif position[1] == 1:
        where = position[2]
    else:
        where = f"stage {position[0]} of {position[1]}: {position[2]}"
    parts = [where, f"{100 * job.fraction:.0f}% of the job"]
    if job.eta_seconds is not None:
        parts.append(f"about {fmt_seconds(job.eta_seconds)} left")
    if job.message:
        parts.append(job.message)
    return " · ".join(parts)


def render_job(job: Job, ex: Executor, key: str, compact: bool = False) -> None:
    """One job: state, live progress, buttons (cancel / resume / explore), log and error."""
    head = st.columns([5, 2, 2, 2]) if not compact else st.columns([6, 2, 2])
    with head[0]:
        st.markdown(f"**#{job.id} · {md(job.title)}** — {state_label(job)}"
                    + (f" · attempt {job.attempts}" if job.attempts > 1 else ""))
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(job.created))
        elapsed = job.elapsed_seconds
        st.caption(f"{job.kind} job launched {when}"
                   + (f" · ran {fmt_seconds(elapsed)}" if elapsed is not None else "")
                   + (" in all" if elapsed is not None and job.attempts > 1 else ""))
    if job.active:
        with head[1]:
            if st.button("Cancel", key=f"{key}_cancel_{job.id}", help="Stop the job; a fit keeps its "
                         "last checkpoint and can be resumed."):
                try:
                    ex.cancel(job.id)
                except JobError as e:
                    st.error(str(e))
                st.rerun()
    input_error = launch.is_input_error(job)
    if job.resumable and not input_error:  # a bad input fails again: resuming cannot help
        with head[1]:
            if st.button("Resume", key=f"{key}_resume_{job.id}", help="Run the job again; a fit "
                         "continues from its last checkpoint."):
                try:
                    ex.resume(job.id)
                except JobError as e:
                    st.error(str(e))
                st.rerun()
    if input_error and job.kind == "attribute":
        with head[1]:
            if st.button("Edit settings", key=f"{key}_edit_{job.id}", help="Open the Launch page with "
                         "this job's settings, to change what the error names and launch again."):
                st.session_state["launch_prefill"] = {
                    "job": job.id, "error": job.error,
                    "values": launch.form_values(job.params, data_home() / "uploads")}
                st.switch_page("pages/1_Launch.py")
    if job.state == "done" and job.run_dir and job.kind in ("demo", "attribute", "explain"):
        with head[2]:
            queries = job.result.get("query_ids") or [None]
            explore_link(job.run_dir, queries[0])
    if job.active:
        st.progress(min(1.0, max(0.0, job.fraction)), text=md(progress_text(job)))
    if job.state == "failed":
        st.error(md(job.error or "failed"))
        if job.traceback:
            with st.expander("Traceback"):
                st.code(job.traceback, language="text")
    elif job.state == "cancelled":
        st.warning(md(job.error or "cancelled"))
    for s in job.result.get("skipped", []):
        st.warning(md(f"Query {s['id']} was skipped: {s['reason']}"))
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


def fitted_runs_or_stop() -> list[report.RunInfo]:
    """The fitted runs, newest first; with none, the page says how to get one and stops."""
    fitted = [r for r in runs() if r.fitted]
    if not fitted:
        st.info("No fitted run yet. Launch one from the Launch page (or the demo); it appears here once its "
                "operators are fitted.")
        st.page_link("pages/1_Launch.py", label="Go to Launch", icon=":material/rocket_launch:")
        st.stop()
    return fitted


def keep_linked_run(key: str, names: Any, default: str, what: str = "run") -> None:
    """Make ``st.session_state[key]`` one of ``names``: a run named by a link that is not here is
    replaced by ``default`` (the most recent ``what``) with a warning saying so."""
    if st.session_state.get(key) not in names:
        if st.session_state.get(key):
            st.warning(f"Run {md_code(st.session_state[key])} from the link was not found here; "
                       f"showing the most recent {what} instead.")
        st.session_state[key] = default


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
def _query_infos(path: str, stamp: float) -> dict[str, dict]:
    return report.query_infos(path)


def query_infos(path: str) -> dict[str, dict]:
    """query id -> its prompt and completion (query.json), reread when a query is added."""
    return _query_infos(path, _mtime(Path(path) / "attributions"))


@functools.lru_cache(maxsize=4096)     # st.cache_data's hashing would cost more than the lookup
def _source_ranks(path: str, query_id: str, rows: tuple, stamp: float) -> list[int]:
    return report.source_ranks(path, query_id, rows)


@st.cache_data(show_spinner=False, max_entries=16)
def _fact_ranks(path: str, stamp: float) -> list[dict]:
    from stride_viz.storage import RunStore
    store = RunStore(path)
    return report.fact_ranks(path, lambda qid, rows: _source_ranks(
        path, qid, rows, _mtime(store.attribution_dir(qid) / "meta.json")),
        ids=pool_rows(path)["id"].tolist())


def fact_ranks(path: str) -> list[dict]:
    """report.fact_ranks, recomputed only when an attribution is added, and then only for the
    fact queries whose scores changed (a new prompt is explained without reading every fact's
    scores again)."""
    return _fact_ranks(path, _mtime(Path(path) / "attributions"))


@st.cache_data(show_spinner=False, max_entries=64)
def membership(path: str, example: int):
    return report.membership_of(path, example)


_URL_SEEN = "_url_seen"  # session state: each query parameter as last applied or written


def init_from_url(mapping: dict[str, str]) -> None:
    """Make the URL the source of truth of the widgets it names (``mapping``: query param ->
    widget key) whenever it changes: a link followed at any time in the session (Home's,
    Runs' "Open in Explore", a page link with parameters) opens the view it names, and a link
    that names only some of the parameters resets the others.

    Parameters equal to those last applied or written by :func:`set_url` are not applied again,
    so a widget the user has just changed is not overridden by the URL it is about to update;
    an address with none of the parameters (plain navigation between pages) brings back the
    view last shown (Streamlit forgets the state of widgets while another page is open).
    """
    seen = st.session_state.setdefault(_URL_SEEN, {})
    now = {param: st.query_params.get(param) for param in mapping}
    if all(v is None for v in now.values()):
        for param, key in mapping.items():
            if key not in st.session_state and seen.get(param) is not None:
                st.session_state[key] = seen[param]
        return
    if all(now[p] == seen.get(p) for p in mapping):
        return
    for param, key in mapping.items():
        if now[param] is None:
            st.session_state.pop(key, None)
        else:
            st.session_state[key] = now[param]
        seen[param] = now[param]


def set_url(**params: Any) -> None:
    """Write the view's state into the URL (None removes a parameter), so the link can be shared."""
    seen = st.session_state.setdefault(_URL_SEEN, {})
    for k, v in params.items():
        value = None if v is None or v == "" else str(v)
        if value is None:
            if k in st.query_params:
                del st.query_params[k]
        elif st.query_params.get(k) != value:
            st.query_params[k] = value
        seen[k] = value
