"""Select: choose the training examples that most help a target set (data selection).

Pick a fitted run and a target set (an uploaded file of target examples, or the queries the
run has already explained), a budget, and launch a ``select`` job: it explains every target
with the run's operators, aggregates each pool example's scores over the targets and keeps
the best (stride_viz.downstream.select). The page only reads the run's ``selections/`` folder
and launches jobs.
"""
from __future__ import annotations

import json

import streamlit as st

from stride_viz.app import downstream_views, ui
from stride_viz.app.report import csv_text
from stride_viz.config import ConfigError
from stride_viz.downstream.select import AGGREGATES, read_selection
from stride_viz.jobs import JobError
from stride_viz.jobs.downstream_kinds import list_selections

ui.page_setup("Select", icon="🎯")
st.title("Data selection")
st.markdown(
    "Which training examples would help a **target set** most? Each target example is explained with the "
    "run's operators (its loss is the target), each pool example's scores are **aggregated over the "
    "targets**, and the best-ranked examples within the budget are kept. Scores are in nats of mean "
    "per-token loss; **> 0: training on the example lowers the targets' loss (helps)**.\n\n"
    "- **mean** (default): the mean score over targets (opponents count against an example);\n"
    "- **positive-sum**: the sum over targets of the positive scores (the proponent mass);\n"
    "- **backprojection**: the mean of the dense back-projection estimate instead of the Lasso scores.\n\n"
    "Ties (examples with no evidence for any target) are broken by the mean back-projection.")

fitted = ui.fitted_runs_or_stop()

by_name = {r.name: r for r in fitted}
if st.session_state.get("select_run") not in by_name:
    st.session_state["select_run"] = fitted[0].name
st.selectbox("Run", list(by_name), key="select_run", format_func=lambda n: by_name[n].label(),
             help="A model + pool whose operators are fitted: its pool is what is selected from.")
run = by_name[st.session_state["select_run"]]
run_dir = str(run.path)

# ----------------------------------------------------------------------------- the request
st.subheader("New selection")
source = st.radio("Target examples", ["Upload a file", "This run's explained queries"], key="select_source",
                  horizontal=True)
targets, problem, label = None, None, ""
if source == "Upload a file":
    up = st.file_uploader("Target file", type=["jsonl", "ndjson", "csv", "txt"], key="select_upload",
                          help="Examples of what the model should get better at: a `text` column (documents), "
                               "or `prompt` and `completion` columns (the completion's loss is the target); "
                               "optional `id`. TXT: one document per blank-line-separated paragraph.")
    if up is not None:
        try:
            targets = downstream_views.targets_from_upload(up.name, up.getvalue())
            label = up.name
        except ConfigError as e:
            problem = str(e)
else:
    infos = ui.query_infos(run_dir)
    targets = [{"id": i, "prompt": q.get("prompt", ""), "completion": q.get("completion")}
               for i, q in infos.items() if q.get("completion")]
    label = f"the {len(targets)} explained queries of {run.name}"
    if not targets:
        problem = "This run has no explained query with a completion yet; upload a target file instead."
if problem:
    st.error(ui.md(problem))
elif targets:
    st.caption(f"{len(targets)} target example{'s' if len(targets) != 1 else ''} read.")
c1, c2 = st.columns(2)
budget = c1.text_input("Budget", "10%", key="select_budget",
                       help=f"Examples to keep from the {run.n:,} of the pool: a number (200), a fraction "
                            f"(0.1) or a percentage (10%).")
how = c2.selectbox("Aggregation", AGGREGATES, key="select_aggregate")
if st.button("Select", key="select_launch", type="primary", disabled=not targets or bool(problem)):
    try:
        value = int(budget) if budget.strip().isdigit() else budget.strip()
        st.session_state["select_job"] = ui.executor().submit(
            "select", {"run_dir": run_dir, "targets": targets, "budget": value, "aggregate": how,
                       "targets_label": label})
    except JobError as e:
        st.error(ui.md(str(e)))
if st.session_state.get("select_job") is not None:
    ui.live_job(st.session_state["select_job"], key="select_job_panel")

# ----------------------------------------------------------------------------- results
st.subheader("Selections of this run")
files = list_selections(run_dir)
if not files:
    st.info("No selection for this run yet.")
    st.stop()
names = [f.stem for f in files]
if st.session_state.get("select_shown") not in names:
    st.session_state["select_shown"] = names[0]
st.selectbox("Selection", names, key="select_shown", help="Newest first.")
path = files[names.index(st.session_state["select_shown"])]
rows, summary = read_selection(path)
st.markdown(
    f"**{summary['budget']:,} of {summary['n_pool']:,} examples** ({100 * summary['fraction']:.1f}%) kept for "
    f"**{summary['n_targets']} target examples** by **{ui.md(summary['aggregate'])}**; "
    f"{summary['n_positive']:,} pool examples have an aggregated score > 0 (help), {summary['n_negative']:,} < 0 "
    f"(hurt). The last kept example's score: {summary['score_of_last_kept']:+.4g} nats. Targets: "
    f"{ui.md(summary.get('targets_file') or 'given directly')}. Explaining them took "
    f"{ui.fmt_seconds(summary.get('seconds_attribute'))}.")
table = downstream_views.selection_table(rows)
st.dataframe(table, key="select_table", hide_index=True, width="stretch", height=360,
             column_config={"score_nats": st.column_config.NumberColumn(
                                "score (nats)", format="%+.4g",
                                help="Aggregated influence on the targets; > 0 helps."),
                            "backprojection_nats": st.column_config.NumberColumn(
                                "back-projection (nats)", format="%+.3g",
                                help="Mean fast estimate over the targets (the tie-break).")})
d1, d2, d3, _ = st.columns([1, 1, 1, 2])
d1.download_button("Download CSV", csv_text(table), f"{run.name}-{path.stem}.csv", "text/csv", key="select_dl_csv")
d2.download_button("Download JSONL", path.read_text(), f"{run.name}-{path.stem}.jsonl", "application/jsonl",
                   key="select_dl_jsonl")
d3.download_button("Download summary", json.dumps(summary, indent=1), f"{run.name}-{path.stem}.summary.json",
                   "application/json", key="select_dl_summary")
