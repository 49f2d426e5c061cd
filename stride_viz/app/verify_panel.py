"""The Explore page's "Verify by retraining" panel (Streamlit): launch a ``verify`` job for the
shown query and show its result when done. The page calls :func:`render` once; nothing is
trained here (the job does it, see :mod:`stride_viz.downstream.verify`)."""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from stride_viz.app import downstream_views, plots, ui
from stride_viz.jobs import JobError

__all__ = ["render"]


@st.cache_data(show_spinner=False, max_entries=16)
def _plan(run_dir: str, k: int, random_seeds: int, noise_seeds: int, stamp: float) -> dict:
    """The retraining plan, or {"error": why this run cannot be verified}."""
    from stride_viz.config import ConfigError
    from stride_viz.downstream.verify import plan
    try:
        return plan(run_dir, k, random_seeds, noise_seeds)
    except (ConfigError, OSError, ValueError) as e:
        return {"error": str(e)}


def render(run_dir: str, query_id: str) -> None:
    """The panel for one explained query of one run."""
    from stride_viz.downstream.verify import read_result
    st.subheader("Verify by retraining")
    st.markdown("The counterfactual test of this attribution: retrain the model from its recipe **without "
                "the query's top-k proponents**, and, for comparison, without k examples drawn at random "
                "and on the full pool with other seeds (the retraining noise), then compare the query's "
                "loss with the full-pool retrain. A background job; only small models trained by stride_viz "
                "carry the recipe this needs.")
    c1, c2, c3 = st.columns(3)
    k = int(c1.number_input("k (examples removed)", 1, 1000, 10, key="explore_verify_k"))
    draws = int(c2.number_input("random draws", 1, 20, 3, key="explore_verify_draws",
                                help="Retrainings without k random examples: the spread shows what removing "
                                     "any k examples does."))
    noise = int(c3.number_input("other seeds", 0, 20, 1, key="explore_verify_noise",
                                help="Full-pool retrainings with another training seed: the loss moves this "
                                     "much by retraining alone."))
    stamp = (Path(run_dir) / "run.json").stat().st_mtime if (Path(run_dir) / "run.json").exists() else 0.0
    p = _plan(run_dir, k, draws, noise, stamp)
    result = read_result(run_dir, query_id, k)
    if result is not None:
        st.markdown(downstream_views.verify_summary(result))
        st.plotly_chart(downstream_views.verify_figure(result), key="explore_verify_chart",
                        config=plots.PLOTLY_CONFIG, width="stretch")
        st.caption(f"{result['plan']['retrains']} retrainings of {result['plan']['steps_per_retrain']:,} steps "
                   f"took {ui.fmt_seconds(result['seconds_retraining'])}.")
    if "error" in p:
        st.info(f"This run cannot be verified by retraining: {ui.md(p['error'])}")
        return
    job_key = f"verify_job::{run_dir}::{query_id}::{k}::{draws}::{noise}"
    label = "Verify again" if result is not None else "Verify"
    if st.button(f"{label} (about {ui.fmt_seconds(p['estimated_seconds'])} on a 2-core CPU)", key="explore_verify",
                 help=f"{p['retrains']} retrainings of {p['steps_per_retrain']:,} steps of a model with "
                      f"{p['n_parameters']:,} parameters on {p['n_pool']:,} examples."):
        try:
            st.session_state[job_key] = ui.executor().submit(
                "verify", {"run_dir": run_dir, "query_id": query_id, "k": k, "random_seeds": draws,
                           "noise_seeds": noise})
        except JobError as e:
            st.error(ui.md(str(e)))
    if st.session_state.get(job_key) is not None:
        ui.live_job(st.session_state[job_key], key="explore_verify_job")
