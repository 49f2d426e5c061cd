"""Evaluate: how far to trust an attribution, measured against models really retrained.

Reads files only: a ground-truth directory (models retrained on random subsets of the pool,
``python -m stride_viz.evaluation.retrain``), the LDS report of ``benchmarks/lds.py`` with every method's
saved scores, and optionally a STRIDE run on the same pool. Nothing is trained or scored here.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import streamlit as st

from stride_viz.app import eval_plots, plots, ui
from stride_viz.evaluation import metrics as evaluation
from stride_viz.data.models import data_home

ROOT = Path(__file__).resolve().parent.parent

ui.page_setup("Evaluate", icon="📏")
st.title("Evaluate")
st.markdown(
    "**Linear Datamodeling Score (LDS).** Models were retrained from scratch on random subsets "
    "S′ⱼ of the pool and each query's loss ℓⱼ was recorded. A method's scores w predict the "
    "effect of training on S′ⱼ as Σ_{i∈S′ⱼ} wᵢ (w > 0: the example lowers the query's loss). "
    "Per query, LDS is the Spearman correlation of that prediction with −ℓⱼ over the subsets: "
    "1 = perfect ranking of the subsets, 0 = no information, < 0 = backwards.")


def _ground_truths() -> dict[str, Path]:
    bases = [ROOT / "benchmarks" / "results", data_home() / "ground_truth"]
    found = {}
    for base in bases:
        if base.is_dir():
            for meta in sorted(base.glob("*/metadata.json")):
                found[str(meta.parent.relative_to(base.parent))] = meta.parent
    return found


@st.cache_data(show_spinner=False, max_entries=4)
def _gt(path: str, stamp: float) -> evaluation.GroundTruth:
    return evaluation.read_ground_truth(path)


@st.cache_data(show_spinner=False, max_entries=4)
def _report_for(gt_path: str, stamp: float) -> dict | None:
    """The lds.json report whose ground truth is this directory (benchmarks/results/ or next
    to it)."""
    gt_path = Path(gt_path)
    for cand in (gt_path.parent / "lds.json", gt_path / "lds.json"):
        if cand.exists():
            rep = json.loads(cand.read_text())
            if Path(rep.get("ground_truth", "")).name == gt_path.name:
                return rep
    return None


@st.cache_data(show_spinner=False, max_entries=32)
def _scores(path: str, stamp: float) -> np.ndarray:
    return np.load(path)


def _stamp(p: Path) -> float:
    try:
        return max(f.stat().st_mtime for f in [p, *p.iterdir()]) if p.is_dir() else p.stat().st_mtime
    except (FileNotFoundError, ValueError):
        return 0.0


gts = _ground_truths()
if not gts:
    st.info("No ground truth found. Build the benchmark's with `python benchmarks/lds.py` (it "
            "retrains the demo model on 64 subsets: about half an hour on a laptop CPU), or "
            "your own with `python -m stride_viz.evaluation.retrain`.")
    st.stop()

with st.sidebar:
    gt_name = st.selectbox("Ground truth", list(gts), key="eval_gt",
                           help="A directory of models retrained on random subsets of a pool.")
gt_dir = gts[gt_name]
try:
    gt = _gt(str(gt_dir), _stamp(gt_dir))
except evaluation.GroundTruthError as e:
    st.error(f"This ground truth cannot be read: {e}")
    st.stop()
meta = gt.metadata
queries = meta["queries"]
st.caption(f"Pool **{ui.md(meta['pool']['spec'])}** ({meta['pool']['n']} examples, hash {ui.md(meta['pool']['hash'])}), "
           f"**{len(queries)}** queries, **{len(gt.train_subsets)}** retrained subsets of "
           f"{100 * meta.get('fraction', 0):.0f}% · recipe: "
           + ui.md(", ".join(f"{k} {v}" for k, v in meta["recipe"].items() if k not in ("trainer",))))
if len(gt.train_subsets) < meta.get("n_subsets", 0):
    st.warning(f"Retraining is not finished: {len(gt.train_subsets)} of {meta['n_subsets']} subsets "
               f"so far. The numbers below use those only.")

# ----------------------------------------------------------------------------- methods
report = _report_for(str(gt_dir), _stamp(gt_dir.parent / "lds.json"))
methods: dict[str, np.ndarray] = {}      # name -> scores (n_queries, n_pool)
table: dict[str, dict] = {}
variants = [m for m in (report or {}).get("methods", {}) if m.startswith("stride:")]
with st.sidebar:
    show_variants = st.toggle(f"Show STRIDE ablation variants ({len(variants)})", value=False,
                              key="eval_variants", disabled=not variants,
                              help="Other STRIDE settings measured on this ground truth (the "
                                   "report's 'ablation' lists how each differs from the defaults).")
if report:
    for m, r in report["methods"].items():
        if m in variants and not show_variants:
            continue
        table[m] = r
        f = ROOT / r.get("scores_file", "")
        if r.get("status") == "ok" and f.is_file():
            methods[m] = _scores(str(f), f.stat().st_mtime)

# a STRIDE run on the same pool adds its own attributions of the ground truth's queries
same_pool = [r for r in ui.runs() if r.meta.get("pool", {}).get("hash") == meta["pool"]["hash"]]
with st.sidebar:
    run_name = st.selectbox("STRIDE run (same pool)", ["none"] + [r.name for r in same_pool], key="eval_run",
                            help="Runs whose pool has the same hash as the ground truth's pool.")
if run_name != "none":
    run = next(r for r in same_pool if r.name == run_name)
    wanted = {(q["prompt"], q["completion"]): k for k, q in enumerate(queries)}
    rows = np.full((len(queries), gt.n_pool), np.nan, dtype=np.float32)
    for qid in run.query_ids:
        qdir = run.path / "attributions" / qid
        try:
            info = json.loads((qdir / "query.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            continue
        k = wanted.get((info.get("prompt"), info.get("completion")))
        if k is not None and (qdir / "scores.npy").exists():
            rows[k] = _scores(str(qdir / "scores.npy"), (qdir / "scores.npy").stat().st_mtime)
    covered = ~np.isnan(rows).any(axis=1)
    if covered.any():
        name = f"stride (run {run_name})"
        methods[name] = rows
        table[name] = {"status": "ok", "note": f"{int(covered.sum())} of {len(queries)} queries explained in the run"}
    else:
        st.info(f"Run {ui.md_code(run_name)} has not explained any of this ground truth's queries yet. Explain "
                f"them from the Launch page (same prompt and completion) to see its LDS here.")

if not methods:
    st.info("No method's scores are on disk for this ground truth yet: run `python benchmarks/lds.py "
            "--steps methods,report`.")
    st.stop()


def _lds(scores: np.ndarray) -> np.ndarray:
    """Per-query LDS (NaN where the method has no scores for the query); milliseconds."""
    ok = ~np.isnan(scores).any(axis=1)
    per = np.full(len(ok), np.nan)
    if ok.any():
        per[ok] = evaluation.lds(scores[ok], gt.train_subsets, gt.test_loss[:, ok]).per_query
    return per


per_query = {m: _lds(s) for m, s in methods.items()}

st.subheader("LDS per query, by method")
kind = st.radio("Chart", ["box", "violin"], horizontal=True, key="eval_kind")
st.plotly_chart(eval_plots.lds_distribution({m: v[~np.isnan(v)] for m, v in per_query.items()}, kind=kind),
                width="stretch", key="eval_dist", config=plots.PLOTLY_CONFIG)

st.subheader("Methods")
for m, v in per_query.items():  # recomputed from the files: the table agrees with the chart
    table.setdefault(m, {"status": "ok"})
    table[m] = {**table[m], "lds_mean": float(np.nanmean(v)), "lds_std": float(np.nanstd(v))}
frame = eval_plots.methods_frame(table)
st.dataframe(frame, hide_index=True, width="stretch", key="eval_table",
             column_config={"LDS mean": st.column_config.NumberColumn(format="%+.3f"),
                            "LDS std": st.column_config.NumberColumn(format="%.3f"),
                            "recall@10": st.column_config.NumberColumn(format="%.2f", help="planted facts: share of a fact's source documents in the top 10"),
                            "MRR": st.column_config.NumberColumn(format="%.2f", help="planted facts: mean reciprocal rank of the first source document"),
                            "one-off (s)": st.column_config.NumberColumn(format="%.1f", help="once per model + pool (STRIDE: fitting the operators; peers: caching gradients/factors)"),
                            "per query (s)": st.column_config.NumberColumn(format="%.4f", help="per query, amortised over a batch of all queries"),
                            "peak RSS (MiB)": st.column_config.NumberColumn(format="%.0f")})
if report:
    st.caption("Times: wall clock on the machine that ran the benchmark (" +
               report.get("setting", {}).get("machine", "?") + "). Each method's settings and its library's "
               "documented defaults are in benchmarks/results/lds.json.")

# ----------------------------------------------------------------------------- one query
st.subheader("One query: predicted effect vs. retrained loss")
labels = [f"{q['id']}: {q['prompt']}▸{q['completion']}"[:120] for q in queries]
c1, c2 = st.columns([3, 1])
with c1:
    qi = st.selectbox("Query", range(len(queries)), format_func=lambda k: labels[k], key="eval_query")
with c2:
    m = st.selectbox("Method", list(methods), key="eval_method")
s = methods[m][qi]
if np.isnan(s).any():
    st.info(f"{ui.md(m)} has no scores for this query.")
else:
    pred = evaluation.subset_sums(s[None, :], gt.train_subsets)[0]
    st.plotly_chart(eval_plots.prediction_scatter(pred, gt.test_loss[:, qi], method=m, query=queries[qi]["id"],
                                                  rho=float(per_query[m][qi])),
                    width="stretch", key="eval_scatter", config=plots.PLOTLY_CONFIG)
    st.caption("Each dot is one retrained model. A useful attribution puts the subsets it predicts to help "
               "most (right) at the lowest retrained loss (bottom): the dots fall from left to right.")
