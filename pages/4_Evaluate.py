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
from stride_viz.evaluation import stats as evstats
from stride_viz.data.models import data_home

ROOT = Path(__file__).resolve().parent.parent
WORK_SCORES = ROOT / "benchmarks" / "work" / "lds_scores"
SPLITS = ("test", "development", "all")

ui.page_setup("Evaluate", icon="📏")
st.title("Evaluate")
st.markdown(
    "**Linear Datamodeling Score (LDS).** Models were retrained from scratch on $M'$ random "
    "subsets $S'_j$ of the pool and the loss $\\ell_j(x)$ of each query $x$ was recorded. A "
    "method's scores $w_i(x)$ ($w_i > 0$: example $i$ lowers the query's loss) predict the "
    "effect of training on $S'_j$ by their sum over the subset; per query, LDS is the Spearman "
    "rank correlation $\\rho$ of that prediction with $-\\ell_j(x)$ over the subsets:")
st.latex(r"\mathrm{LDS}(x) \;=\; \rho\Big(\big(\textstyle\sum_{i \in S'_j} w_i(x)\big)_{j=1}^{M'},"
         r"\; \big(-\ell_j(x)\big)_{j=1}^{M'}\Big)")
st.markdown("1 = the subsets are ranked perfectly, 0 = no information, below 0 = backwards.")


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


@st.cache_data(show_spinner=False, max_entries=32)
def _method_scores(path: str, stamp: float, query_ids: tuple[str, ...]) -> np.ndarray:
    return evaluation.load_scores(path, len(query_ids), query_ids)


def _score_file(method: str, entry: dict) -> Path | None:
    """A report method's scores: the committed copy (benchmarks/results/lds_scores/), else the
    benchmark's float32 work copy (benchmarks/work/lds_scores/, not in a fresh clone)."""
    for f in (ROOT / (entry.get("scores_file") or ""), WORK_SCORES / f"{method}.npy"):
        if f.is_file():
            return f
    return None


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
query_ids = tuple(q["id"] for q in queries)
try:  # the development/test split fixed in the ground truth's metadata
    dev = evstats.development_mask(meta)
except evaluation.GroundTruthError as e:
    st.error(f"This ground truth's split cannot be read: {e}")
    st.stop()
with st.sidebar:
    split = st.radio("Queries", SPLITS, key="eval_split", horizontal=True,
                     help="A fixed half of the queries (chosen by a hash of each id, "
                          "stride_viz.evaluation.metrics.query_split) is for development: every "
                          "setting is chosen on it. Results are reported on the other half, the "
                          "test queries.")
shown = {"test": ~dev, "development": dev, "all": np.ones(len(dev), dtype=bool)}[split]
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
# STRIDE's ablation variants and the methods' tuning settings: 'METHOD:NAME'
variants = [m for m in (report or {}).get("methods", {}) if ":" in m]
with st.sidebar:
    show_variants = st.toggle(f"Show ablation and tuning variants ({len(variants)})", value=False,
                              key="eval_variants", disabled=not variants,
                              help="Other settings of STRIDE and of the peers measured on this ground "
                                   "truth (the report's 'ablation' and 'tuning' list how each differs "
                                   "from the defaults).")
if report:
    for m, r in report["methods"].items():
        if m in variants and not show_variants:
            continue
        table[m] = r
        f = _score_file(m, r) if r.get("status") == "ok" else None
        if f is not None:
            try:
                methods[m] = _method_scores(str(f), f.stat().st_mtime, query_ids)
            except evaluation.GroundTruthError as e:
                table[m] = {**r, "status": "failed", "error": str(e)}
# the query groups of the benchmark's report (planted facts, held-out text), one per query
group_of = (report or {}).get("setting", {}).get("query_group") or []
groups = ({"heldout": np.array([g == "heldout" for g in group_of]),
           "facts": np.array([g == "facts" for g in group_of])} if len(group_of) == len(queries) else {})

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
            "--steps methods,report` (it writes them to benchmarks/results/lds_scores/).")
    st.stop()


def _lds(scores: np.ndarray) -> np.ndarray:
    """Per-query LDS (NaN where the method has no scores for the query); milliseconds."""
    ok = ~np.isnan(scores).any(axis=1)
    per = np.full(len(ok), np.nan)
    if ok.any():
        per[ok] = evaluation.lds(scores[ok], gt.train_subsets, gt.test_loss[:, ok]).per_query
    return per


def _mean(v: np.ndarray, std: bool = False) -> float:
    v = v[~np.isnan(v)]
    return float(v.std() if std else v.mean()) if v.size else float("nan")


def _summary(v: np.ndarray) -> dict:
    """Per-query LDS (n_queries,) summarised over the queries shown, and per query group."""
    return {"lds_mean": _mean(v[shown]), "lds_std": _mean(v[shown], std=True),
            **{f"lds_mean_{g}": _mean(v[shown & mask]) for g, mask in groups.items()}}


per_query = {m: _lds(s) for m, s in methods.items()}
n_group = {g: int((shown & mask).sum()) for g, mask in groups.items()}
st.caption(f"Showing the **{int(shown.sum())}** {split} queries"
           + (f" ({n_group['heldout']} held-out text, {n_group['facts']} planted facts)" if groups else "")
           + f". Every setting is chosen on the {int(dev.sum())} development queries; results are "
             f"reported on the {int((~dev).sum())} test queries.")

st.subheader("LDS per query, by method")
kind = st.radio("Chart", ["box", "violin"], horizontal=True, key="eval_kind")
st.plotly_chart(eval_plots.lds_distribution({m: v[shown & ~np.isnan(v)] for m, v in per_query.items()},
                                            kind=kind),
                width="stretch", key="eval_dist", config=plots.PLOTLY_CONFIG)

st.subheader("Methods")
suffix = {"test": "_test", "development": "_dev", "all": ""}[split]
for m, r in table.items():
    if r.get("status", "ok") != "ok":
        continue
    if m in per_query:  # recomputed from the score files: the table agrees with the chart
        v = per_query[m]
    elif len(r.get("lds_per_query") or []) == len(queries):
        v = np.asarray(r["lds_per_query"], dtype=float)
        r = {**r, "note": "earlier run, scores not kept: LDS as lds.json recorded it"}
    else:
        continue
    table[m] = {**r, **_summary(v), "recall_at_10": r.get("recall_at_10" + suffix),
                "mrr": r.get("mrr" + suffix)}
frame = eval_plots.methods_frame(table)
st.dataframe(frame, hide_index=True, width="stretch", key="eval_table",
             column_config={"LDS mean": st.column_config.NumberColumn(format="%+.3f"),
                            "LDS std": st.column_config.NumberColumn(format="%.3f"),
                            "held-out text": st.column_config.NumberColumn(format="%+.3f", help="mean LDS of the held-out fortunes among the queries shown"),
                            "planted facts": st.column_config.NumberColumn(format="%+.3f", help="mean LDS of the planted-fact queries among the queries shown"),
                            "recall@10": st.column_config.NumberColumn(format="%.2f", help="planted facts among the queries shown: share of a fact's source documents in the top 10"),
                            "MRR": st.column_config.NumberColumn(format="%.2f", help="planted facts among the queries shown: mean reciprocal rank of the first source document"),
                            "one-off (s)": st.column_config.NumberColumn(format="%.1f", help="once per model + pool (STRIDE: fitting the operators; peers: caching gradients/factors)"),
                            "per query (s)": st.column_config.NumberColumn(format="%.4f", help="per query, amortised over a batch of all queries"),
                            "peak RSS (MiB)": st.column_config.NumberColumn(format="%.0f")})
if report:
    st.caption("Times: wall clock on the machine that ran the benchmark (" +
               report.get("setting", {}).get("machine", "?") + "). Each method's settings and its library's "
               "documented defaults are in benchmarks/results/lds.json.")

def _settings_columns(*signed: str) -> dict:
    """Column formats of a table of settings scored on the development queries (the ablation,
    the tuning): LDS and the ``signed`` columns with a sign, then the error and the times."""
    return {**{c: st.column_config.NumberColumn(format="%+.3f")
               for c in ("LDS (dev)", "held-out text (dev)", "planted facts (dev)", *signed)},
            "± stderr": st.column_config.NumberColumn(format="%.3f"),
            "one-off (s)": st.column_config.NumberColumn(format="%.1f"),
            "per query (s)": st.column_config.NumberColumn(format="%.4f")}


if show_variants and report and report.get("ablation"):
    st.subheader("STRIDE ablation (development queries)")
    st.caption("Each variant changes the listed settings of STRIDE's defaults; its LDS and its paired "
               "difference to the defaults (mean ± standard error over queries) are on the "
               "development queries, where settings are chosen. Variants of earlier runs kept no "
               "scores; the settings their record lacks are those of the code they ran with.")
    st.dataframe(eval_plots.ablation_frame(report["ablation"]), hide_index=True, width="stretch",
                 key="eval_ablation",
                 column_config=_settings_columns("vs defaults (dev)", "LDS (all)"))

stat_rows = {m: r for m, r in (report or {}).get("methods", {}).items()
             if r.get("status") == "ok" and r.get("test") and ":" not in m}
if stat_rows:
    sdoc = report.get("statistics", {})
    st.subheader("How sure are the differences? (test queries)")
    n_test = next(iter(stat_rows.values()))["test"]["n_queries"]
    st.markdown(
        f"Statistics of the **{n_test} test queries** (whatever the sidebar shows), as the "
        f"report recorded them from its ground truth and scores "
        f"({ui.md_code(report.get('command', 'python benchmarks/lds.py'))}; "
        f"{len(gt.train_subsets)} retrained subsets now on disk). "
        "**LDS (test)**: mean LDS over the test queries. **minus STRIDE**: mean over the test queries "
        "of the method's LDS minus STRIDE's on the same query (below 0: STRIDE is better). "
        "**95% CI, queries**: percentile interval of "
        f"{sdoc.get('n_boot', '?')} paired bootstrap resamples of the queries; **95% CI, subsets**: the same, "
        "resampling the retrained models instead (every query's Spearman ρ recomputed on each "
        "resample): how much the number depends on which subsets happened to be retrained. "
        "**Wilcoxon p**: two-sided Wilcoxon signed-rank test of the per-query differences (small: "
        "the difference is unlikely to be chance). The group columns repeat this on the planted-fact "
        "queries and on the held-out text.")
    st.plotly_chart(eval_plots.difference_figure(stat_rows), width="stretch", key="eval_diff",
                    config=plots.PLOTLY_CONFIG)
    sframe = eval_plots.stats_frame(stat_rows)
    fmt = {c: st.column_config.NumberColumn(format="%+.3f") for c in sframe.columns
           if c.startswith("LDS") or c.startswith("minus STRIDE")}
    fmt.update({c: st.column_config.NumberColumn(format="%.2g") for c in sframe.columns
                if c.startswith("Wilcoxon p")})
    st.dataframe(sframe, hide_index=True, width="stretch", key="eval_stats", column_config=fmt)

tuning = (report or {}).get("tuning") or {}
if tuning.get("methods"):
    st.subheader("Tuned on the development queries, reported on the test queries")
    budget = tuning.get("budget", {})
    per = budget.get("settings_per_method", {})
    st.markdown(
        f"Each tuned method tried {' / '.join(f'{n} ({ui.md(m)})' for m, n in per.items())} settings, the "
        f"first being its committed default; each was scored on the {int(dev.sum())} development queries "
        "only, and the best mean development LDS is the method's choice (✓). **vs default (dev)**: mean "
        "over the development queries of the setting's LDS minus the default's (± standard error).")
    st.dataframe(eval_plots.tuning_frame(tuning["methods"]), hide_index=True, width="stretch",
                 key="eval_tuning",
                 column_config={**_settings_columns("vs default (dev)"),
                                "chosen": st.column_config.CheckboxColumn(
                                    help="the method's choice: best mean development LDS")})
    if tuning.get("test"):
        tgt = tuning.get("target") or {}
        st.markdown(
            "The choices on the **test queries** (columns as in the table above; **minus STRIDE**: against "
            "STRIDE's choice)"
            + (f": the best tuned peer, {ui.md(tgt['best_peer'])}, scores {tgt['best_peer_lds']:+.3f} against "
               f"STRIDE's {tgt['stride_lds']:+.3f} (target: STRIDE at least the best tuned peer, "
               f"{'met' if tgt.get('met') else 'not met'})." if tgt else "."))
        tframe = eval_plots.stats_frame(tuning["test"])
        tfmt = {c: st.column_config.NumberColumn(format="%+.3f") for c in tframe.columns
                if c.startswith("LDS") or c.startswith("minus STRIDE")}
        tfmt.update({c: st.column_config.NumberColumn(format="%.2g") for c in tframe.columns
                     if c.startswith("Wilcoxon p")})
        st.dataframe(tframe, hide_index=True, width="stretch", key="eval_tuned_stats", column_config=tfmt)

twin = (report or {}).get("twin")
ceiling = (report or {}).get("noise_ceiling")
if twin or ceiling:
    st.subheader("Does the score come from the model? (test queries)")
    parts = []
    if ceiling:
        parts.append(
            f"**Noise ceiling: LDS {ceiling['lds_mean_test']:+.3f}** (95% CI over queries "
            f"[{ceiling['ci_queries'][0]:+.3f}, {ceiling['ci_queries'][1]:+.3f}]): the first "
            f"{ceiling['n_subsets']} subsets were retrained with other training seeds "
            f"({', '.join(str(s) for s in ceiling['seeds'][1:])}); the LDS of one seed's retrained losses "
            "as predictions of another's on the same subsets: the scale of training noise, what a method that "
            "reproduced one retrained model exactly would score. The part of a retrained loss that changes "
            "with the seed alone is noise to every method; a method that predicted the loss averaged over "
            "seeds could score somewhat more (about the square root, with independent noise), so this is "
            "a reference, not a hard limit. Each method's LDS on those same subsets is shown beside it.")
    if twin:
        tgt = twin.get("target") or {}
        parts.append(
            "**Random-weight twin**: the same methods scored a twin of the model (same shape, "
            "tokenizer and initial weights, never trained) against the same retrained losses. What a "
            "method keeps on the twin comes from the text, not from what the model learnt"
            + (f"; STRIDE (defaults) keeps {tgt['stride_twin'] / tgt['stride_trained']:.0%} of its LDS "
               f"(target: at most 50%, {'met' if tgt.get('met') else 'not met'})"
               if tgt.get("stride_twin") is not None and tgt.get("stride_trained") else "")
            + (f", its tuned choice {ch['stride_method']} keeps {ch['stride_twin'] / ch['stride_trained']:.0%} "
               f"({'met' if ch.get('met') else 'not met'})"
               if (ch := tgt.get("choice") or {}).get("stride_twin") is not None and ch.get("stride_trained")
               else "")
            + "."
            + (" The tuned choices ran on the twin with the settings chosen on the trained model's "
               "development queries; on the twin, a TRAK ensemble member is the recipe's model as "
               "initialised from another seed, never trained." if (twin.get("choices") or {}).get("chosen")
               else ""))
    st.markdown("\n\n".join(parts))
    if twin:
        tframe = eval_plots.twin_frame(twin.get("methods", {}), ceiling)
        st.dataframe(tframe, hide_index=True, width="stretch", key="eval_twin",
                     column_config={c: st.column_config.NumberColumn(format="%.2f" if c in ("twin / trained", "share of the noise ceiling") else "%+.3f")
                                    for c in tframe.columns if c not in ("method", "settings") and "CI" not in c})

# ----------------------------------------------------------------------------- second corpus
RESULTS_DIR = ROOT / "benchmarks" / "results"
# (file, heading, what the methods ran with): the committed defaults, then the demo's choices
SECOND_CORPUS = (
    (RESULTS_DIR / "lds_wordnet.json", "A second corpus: WordNet noun glosses (test queries)",
     "every method with its committed defaults, nothing tuned on this pool"),
    (RESULTS_DIR / "lds_wordnet_choices.json",
     "The same corpus with the settings chosen on the demo's development queries (test queries)",
     "STRIDE and EK-FAC with their tuned choices of the demo benchmark above (carried over, "
     "nothing tuned on this pool; the settings are in the file's setting.overrides)"),
)


@st.cache_data(show_spinner=False, max_entries=4)
def _second_corpus(path: str, stamp: float) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


for n_second, (path, heading, how) in enumerate(SECOND_CORPUS):
    second = _second_corpus(str(path), _stamp(path)) if report and path.is_file() else None
    srows = {m: r for m, r in (second or {}).get("methods", {}).items()
             if r.get("status") == "ok" and r.get("test")}
    if not srows:
        continue
    sst = second.get("setting", {})
    rec = sst.get("recipe", {})
    load = (second.get("machine") or {})
    la, lb = load.get("load_average_1_5_15_at_start"), load.get("load_average_1_5_15_at_end")
    total = (second.get("timings") or {}).get("total_s")
    st.subheader(heading)
    st.markdown(
        f"The same protocol on a pool the project never saw ({sst.get('pool', {}).get('n', '?')} "
        f"WordNet glosses, {sst.get('n_queries', '?')} held-out glosses as queries, "
        f"{sst.get('n_subsets', '?')} retrained subsets, recipe {rec.get('epochs', '?')} epochs), {how}: "
        f"{ui.md_code(second.get('command', ''))}"
        + (f" ({total / 60:.0f} min wall in all on 2 shared CPU cores; load average "
           f"{la[0]:.1f} at the start, {lb[0]:.1f} at the end)" if total and la and lb else "")
        + ". Columns as in the statistics table above; the ground truth and the scores of this "
          "corpus are not in the repository (the command rebuilds them).")
    wframe = eval_plots.stats_frame(srows)
    wfmt = {c: st.column_config.NumberColumn(format="%+.3f") for c in wframe.columns
            if c.startswith("LDS") or c.startswith("minus STRIDE")}
    wfmt.update({c: st.column_config.NumberColumn(format="%.2g") for c in wframe.columns
                 if c.startswith("Wilcoxon p")})
    st.dataframe(wframe, hide_index=True, width="stretch", key=f"eval_second_corpus_{n_second}",
                 column_config=wfmt)

# ----------------------------------------------------------------------------- one query
st.subheader("One query: predicted effect vs. retrained loss")
labels = [f"{(q['prompt'] + '▸' + q['completion'])[:100]} ({q['id']})" for q in queries]
if not shown.any():
    st.info(f"This ground truth has no {split} queries: choose another set in the sidebar.")
    st.stop()
c1, c2 = st.columns([3, 1])
with c1:
    qi = st.selectbox("Query", [k for k in range(len(queries)) if shown[k]], format_func=lambda k: labels[k],
                      key="eval_query", help=f"The {split} queries.")
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
