"""stride_viz dashboard: `streamlit run app.py`.

The home page (the other pages are the scripts in pages/: Launch, Runs, Explore, Evaluate),
from which a first-time visitor launches the built-in demo with one click.
Data lives under $STRIDE_VIZ_HOME (default ~/.stride_viz): runs/, jobs.sqlite, models/.
"""
from __future__ import annotations

import streamlit as st

from stride_viz.app import ui

ui.page_setup("Home")


def home() -> None:
    st.title("stride_viz")
    st.subheader("Which training examples made my language model say this?")
    st.markdown(
        "stride_viz answers that with **STRIDE**: it trains one small *steering operator* per random "
        "subset of your training pool (once per model and pool), measures how each operator moves the "
        "loss of your prompt's completion, and solves a sparse regression that gives each training "
        "example a score with a sign: **helps** (lowers the loss) or **hurts** (raises it), or exactly "
        "0 when the responses show no evidence of it. Explore ranks them and says how much of the "
        "explanation the top ones carry: a few examples, or many small effects.")
    left, right = st.columns([3, 2])
    with left:
        st.markdown("#### New here? Run the built-in demo")
        st.markdown("One click trains a small GPT-2 on quotations plus a few invented facts, fits STRIDE "
                    "and explains where the model learnt those facts. It runs in the background "
                    "(a few minutes on a laptop); the page updates by itself.")
        job_id = ui.launch_demo_button("home_demo")
        if job_id is not None:
            ui.live_job(job_id, key="home_job")
        st.markdown("#### Or explain your own model")
        st.page_link("pages/1_Launch.py", label="Launch an attribution", icon=":material/rocket_launch:")
        st.page_link("pages/2_Runs.py", label="Follow running jobs", icon=":material/pending_actions:")
    with right:
        st.markdown("#### Finished runs")
        runs = [r for r in ui.runs() if r.query_ids]
        if not runs:
            st.info("No finished run yet: launch the demo on the left.")
        for r in runs[:6]:
            st.markdown(f"**{ui.md(r.label())}**")
            st.page_link("pages/3_Explore.py", label=f"Explore {r.name}", icon=":material/travel_explore:",
                         query_params={"run": r.name, "query": r.query_ids[0]})


home()
