"""Audit: which training documents have extreme scores across a benchmark's queries?

Pick a fitted run and a benchmark (the built-in 48 invented question/answer items, an uploaded
JSONL file, or the queries the run has already explained), launch an ``audit`` job (it runs in
a background worker: stride_viz.downstream.audit), and browse the flagged documents with
their evidence. The page only reads the run's ``audits/`` folder and launches jobs.
"""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from stride_viz.app import audit_view, ui
from stride_viz.data.pools import PoolError
from stride_viz.downstream.audit import STATISTICS, AuditConfig
from stride_viz.jobs import JobError

ui.page_setup("Audit")
st.title("Contamination audit")
st.markdown(
    "A training document that copies a benchmark item makes the model answer that item well, so its "
    "attribution score for the item's query stands far above the other documents'. The audit explains "
    "every benchmark query with the run's operators and ranks the documents by a **statistic** of their "
    "scores over the queries: by default their **largest score** (nats of the query's completion loss the "
    "document removes; > 0: it helps); `max-z` uses each query's **robust z-scores** instead (score minus "
    "the query's median, over a robust standard deviation). A document is **flagged** when its statistic is "
    "an outlier among all documents' (its own robust z, the *outlier z*, at least the threshold).")

fitted = ui.fitted_runs_or_stop()

ui.init_from_url({"run": "audit_run"})
by_name = {r.name: r for r in fitted}
ui.keep_linked_run("audit_run", by_name, fitted[0].name, "fitted run")
with st.sidebar:
    st.selectbox("Run", list(by_name), key="audit_run", format_func=lambda n: by_name[n].label(),
                 help="A model + pool + settings whose operators are fitted.")
run = by_name[st.session_state["audit_run"]]
run_dir = str(run.path)
ui.set_url(run=run.name)

# ----------------------------------------------------------------------------- launch
st.markdown("#### 1. Benchmark queries")
explained = ui.query_infos(run_dir)
sources = ["Built-in: 48 invented question/answer items", "Upload a JSONL file"]
if explained:
    sources.append(f"The {len(explained)} queries this run has explained")
source = st.radio("Queries", sources, key="audit_source", horizontal=True,
                  help="JSONL: one {\"prompt\": ..., \"completion\": ..., \"id\": ...} per line; without a "
                       "completion the model's own greedy answer is explained.")
if source == sources[1]:
    st.file_uploader("Benchmark file", type=["jsonl", "ndjson", "json"], key="audit_upload")

cols = st.columns(3)
with cols[0]:
    st.selectbox("Statistic", STATISTICS, key="audit_statistic",
                 help="max-score: the document's largest score over the queries (proponents only); max-z: "
                      "its largest robust z over the queries; max-abs-z: either sign; topk-count: in how many "
                      "queries the document is among the top k; best-rank: 1 / its best rank within a query. "
                      "max-score is the default: on the contamination benchmark it found more of STRIDE's "
                      "paraphrased replicas than max-z did, fewer of the verbatim ones (see the README).")
with cols[1]:
    st.number_input("Threshold (outlier z)", min_value=0.5, max_value=100.0, value=AuditConfig().threshold,
                    step=0.5, key="audit_threshold",
                    help="Flag a document when the robust z of its statistic among all documents is at "
                         "least this (default 5: chosen on the contamination benchmark).")
with cols[2]:
    st.number_input("Flag at most", min_value=1, max_value=10_000, value=AuditConfig().max_flagged, step=10,
                    key="audit_max_flagged", help="Documents flagged at most, strongest first.")


def launch_audit() -> None:
    s = st.session_state
    s["audit_error"], name = None, "built-in QA items"
    try:
        if s["audit_source"] == sources[0]:
            queries = audit_view.builtin_queries()
        elif s["audit_source"] == sources[1]:
            upload = s.get("audit_upload")
            if upload is None:
                raise JobError("Choose a JSONL file of benchmark queries to upload.")
            queries, name = audit_view.queries_from_upload(upload.name, upload.getvalue()), upload.name
        else:
            queries = [{"id": i, "prompt": q["prompt"], "completion": q.get("completion")}
                       for i, q in explained.items()]
            name = "the run's explained queries"
        params = {"run_dir": run_dir, "queries": queries, "name": name,
                  "audit": {"statistic": s["audit_statistic"], "threshold": float(s["audit_threshold"]),
                            "max_flagged": int(s["audit_max_flagged"])}}
        s["audit_job_id"] = ui.executor().submit("audit", params)
    except (JobError, PoolError) as e:
        s["audit_error"] = str(e)


st.button("Launch the audit", key="audit_launch", type="primary", on_click=launch_audit)
if st.session_state.get("audit_error"):
    st.error(ui.md(st.session_state["audit_error"]), icon=":material/error:")
elif st.session_state.get("audit_job_id") is not None:
    st.caption("The audit runs in the background (also listed on the Runs page); its result appears below "
               "when it is done.")
    ui.live_job(st.session_state["audit_job_id"], key="audit_job")

# ----------------------------------------------------------------------------- browse
st.markdown("#### 2. Flagged documents")
audits = audit_view.list_audits(run_dir)
if not audits:
    st.info("This run has no finished audit yet: launch one above.")
    st.stop()
labels = {str(folder): data for folder, data in audits}
st.selectbox("Audit", list(labels), key="audit_pick", format_func=lambda f: audit_view.audit_label(labels[f]),
             help="The finished audits of this run, newest first.")
data = labels[st.session_state["audit_pick"]]
cfg = data["config"]
st.markdown(f"**{data['n_flagged']}** of {data['n_pool']:,} documents flagged from {data['n_queries']} queries "
            f"(statistic {ui.md_code(cfg['statistic'])}, outlier z ≥ {cfg['threshold']:g}, at most "
            f"{cfg['max_flagged']}). Scores are in nats of mean per-token completion loss; > 0: the document "
            f"lowers the query's loss (helps). *Rank in that query*: 1 = the query's strongest proponent. "
            f"*Share of the query's words*: distinct words of the query found in the document (0-1).")
only = st.toggle("Flagged only", value=True, key="audit_flagged_only")
table = audit_view.documents_table(data, flagged_only=only)
if table.empty:
    st.info("No document passed the threshold in this audit: none has scores far out of line with the "
            "others'. Untick *Flagged only* to see the strongest documents anyway.")
    st.stop()
st.dataframe(table, hide_index=True, width="stretch", key="audit_table")
flagged_csv = Path(st.session_state["audit_pick"]) / "flagged.csv"
if flagged_csv.exists():
    st.download_button("Download flagged.csv", flagged_csv.read_bytes(), file_name="flagged.csv",
                       mime="text/csv", key="audit_download",
                       help="One row per flagged document and evidence query; text cells that a "
                            "spreadsheet would run start with '.")

docs = {d["id"]: d for d in data["documents"] if d["flagged"] or not only}
st.selectbox("Document", list(docs), key="audit_doc", help="Its full text and all its evidence.")
doc = docs[st.session_state["audit_doc"]]
st.markdown(f"**#{doc['rank']} · {ui.md_code(doc['id'])}** · statistic {doc['statistic']:.2f} · outlier z "
            f"{doc['outlier']:.2f} · " + ("flagged" if doc["flagged"] else "not flagged"))
st.markdown(ui.md(doc["text"]))
st.dataframe(audit_view.evidence_table(doc), hide_index=True, width="stretch", key="audit_evidence")
questions = {q["id"]: q for q in data.get("queries", [])}
for e in doc["evidence"][:3]:
    q = questions.get(e["query_id"])
    if q:
        st.caption(f"{ui.md(e['query_id'])}: {ui.md(q['prompt'])} → {ui.md(q.get('completion') or '')}")
