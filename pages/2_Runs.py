"""Runs: every background job with live progress, cancel and resume buttons, log and errors.

Jobs run in detached worker processes: closing the browser or restarting the app does not
stop them. The list refreshes every second while a job is queued or running, then stops.
"""
from __future__ import annotations

import streamlit as st

from stride_viz.app import ui
from stride_viz.jobs import ACTIVE_STATES

ui.page_setup("Runs")
st.title("Runs")
st.markdown("Background jobs, newest first. Heavy jobs (demo, attribution) run **one at a time**; the "
            "others wait in the queue. **Cancel** keeps a fit's last checkpoint; **Resume** continues "
            "from it. A job whose worker process died is shown as failed and can be resumed.")

ex = ui.executor()
show = st.radio("Show", ["all", "active", "finished", "failed or cancelled"], key="runs_filter", horizontal=True)
active_now = any(j.active for j in ex.store.list())


@st.fragment(run_every=1.0 if active_now else None)
def job_list() -> None:
    jobs = ex.store.list()
    still_active = any(j.active for j in jobs)
    keep = {"all": lambda j: True, "active": lambda j: j.state in ACTIVE_STATES,
            "finished": lambda j: j.state == "done",
            "failed or cancelled": lambda j: j.state in ("failed", "cancelled")}[show]
    jobs = [j for j in jobs if keep(j)]
    if not jobs:
        st.info("No job to show. Launch one from the Launch page (or the demo from Home).")
    for job in jobs[:50]:
        with st.container(border=True):
            ui.render_job(job, ex, key="runs")
    if active_now and not still_active:
        st.rerun()  # redraw the page once more without polling


job_list()

st.markdown("#### Run directories")
st.caption("Fitted operators and attributions on disk (under the data directory); a run is reused by "
           "every later launch with the same model, pool and settings.")
rows = [{"run": r.name, "model": r.meta["model"]["spec"], "pool": r.meta["pool"]["spec"],
         "examples": r.n, "K": r.K, "fitted": r.fitted, "queries": len(r.query_ids)} for r in ui.runs()]
if rows:
    st.dataframe(rows, key="runs_table", hide_index=True, width="stretch")
else:
    st.caption("None yet.")
