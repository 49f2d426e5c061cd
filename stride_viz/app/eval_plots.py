"""Figure builders of the Evaluate page and the benchmark plots: arrays in, Plotly figure out.

Pure functions (no files, no Streamlit), testable without a browser.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from stride_viz.app.plots import plot_text

__all__ = ["lds_distribution", "methods_frame", "ablation_frame", "prediction_scatter",
           "scaling_figure", "method_color", "stats_frame", "difference_figure", "twin_frame",
           "GROUP_LABELS"]

GROUP_LABELS = {"heldout": "held-out text", "facts": "planted facts"}

_PALETTE = ("#636EFA", "#EF553B", "#00CC96", "#AB63FA", "#FFA15A", "#19D3F3", "#FF6692",
            "#B6E880", "#FF97FF", "#FECB52")
LDS_AXIS = "LDS per query (Spearman ρ; higher is better, 0 = no information)"


def method_color(name: str, names: Sequence[str]) -> str:
    """STRIDE is always the same colour; the others follow their order."""
    if name.startswith("stride"):
        return "#2CA02C"
    others = [n for n in names if not n.startswith("stride")]
    return _PALETTE[others.index(name) % len(_PALETTE)] if name in others else "#888888"


def lds_distribution(per_query: Mapping[str, Sequence[float]], kind: str = "box") -> go.Figure:
    """One box (or violin) of per-query LDS per method, ordered by mean LDS (best on top).

    per_query: method -> LDS values (one per query)."""
    if kind not in ("box", "violin"):
        raise ValueError(f"The 'kind' parameter must be 'box' or 'violin'. Got {kind!r} instead.")
    names = sorted(per_query, key=lambda m: float(np.mean(per_query[m])) if len(per_query[m]) else -9)
    fig = go.Figure()
    for m in names:
        vals = np.asarray(per_query[m], dtype=float)
        label = f"{plot_text(m)} (mean {vals.mean():+.3f})" if vals.size else plot_text(m)
        common = dict(x=vals, name=label, orientation="h", marker_color=method_color(m, names),
                      hovertemplate="LDS %{x:.3f}<extra>" + plot_text(m) + "</extra>")
        if kind == "box":
            fig.add_trace(go.Box(boxmean=True, boxpoints="all", jitter=0.4, pointpos=0,
                                 marker=dict(size=3, opacity=0.5), **common))
        else:
            fig.add_trace(go.Violin(meanline_visible=True, points="all", pointpos=0, jitter=0.4,
                                    marker=dict(size=3, opacity=0.5), **common))
    fig.add_vline(x=0, line_dash="dot", line_color="gray")
    fig.update_layout(xaxis_title=LDS_AXIS, showlegend=False, height=max(300, 60 * len(names) + 120),
                      margin=dict(l=10, r=10, t=30, b=40))
    return fig


def methods_frame(methods: Mapping[str, dict]) -> pd.DataFrame:
    """The methods table: one row per method of an lds.json report, best LDS first.

    methods: name -> {"lds_mean", "lds_std", optional "lds_mean_heldout", "lds_mean_facts",
    "recall_at_10", "mrr", "seconds_fit", "seconds_per_query", "peak_rss_mb", "note"}, or
    {"status": "failed", "error"}."""
    rows = []
    for m, r in methods.items():
        if r.get("status", "ok") != "ok":
            rows.append({"method": m, "LDS mean": np.nan, "LDS std": np.nan, "held-out text": np.nan,
                         "planted facts": np.nan, "recall@10": np.nan,
                         "MRR": np.nan, "one-off (s)": np.nan, "per query (s)": np.nan,
                         "peak RSS (MiB)": np.nan, "note": f"failed: {r.get('error', '')}"[:200]})
            continue
        rows.append({"method": m, "LDS mean": r["lds_mean"], "LDS std": r["lds_std"],
                     "held-out text": r.get("lds_mean_heldout"), "planted facts": r.get("lds_mean_facts"),
                     "recall@10": r.get("recall_at_10"), "MRR": r.get("mrr"),
                     "one-off (s)": r.get("seconds_fit"), "per query (s)": r.get("seconds_per_query"),
                     "peak RSS (MiB)": r.get("peak_rss_mb"), "note": r.get("note", "")})
    df = pd.DataFrame(rows)
    if len(df):
        df = df.sort_values("LDS mean", ascending=False, na_position="last").reset_index(drop=True)
    return df


def ablation_frame(rows: Sequence[dict]) -> pd.DataFrame:
    """The ablation table of an lds.json report (its "ablation" list), on the development
    queries, best first: what each variant changes, its LDS, and its paired difference to the
    defaults (mean and standard error over queries)."""
    out = []
    for r in rows:
        changes = r.get("changes_from_defaults") or {}
        diff = r.get("minus_defaults_dev") or {}
        note = [] if r.get("scores_kept", True) else ["earlier run, scores not kept"]
        if r.get("not_recorded"):
            note.append("not recorded: " + ", ".join(r["not_recorded"]))
        out.append({"variant": r["method"],
                    "changes": ", ".join(f"{k} {v}" for k, v in changes.items()) or
                               ("(the defaults)" if r["method"] == "stride" else "(no recorded setting differs)"),
                    "LDS (dev)": r.get("lds_mean_dev"), "held-out text (dev)": r.get("lds_mean_dev_heldout"),
                    "planted facts (dev)": r.get("lds_mean_dev_facts"),
                    "vs defaults (dev)": diff.get("mean"), "± stderr": diff.get("stderr"),
                    "LDS (all)": r.get("lds_mean"), "one-off (s)": r.get("seconds_fit"),
                    "per query (s)": r.get("seconds_per_query"), "note": "; ".join(note)})
    df = pd.DataFrame(out)
    if len(df):
        df = df.sort_values("LDS (dev)", ascending=False, na_position="last").reset_index(drop=True)
    return df


def _changes(spec: Mapping) -> str:
    """A tuning setting's changes ({"fit": {...}} for STRIDE, flat for a peer) as plain text."""
    flat = {}
    for k, v in spec.items():
        if isinstance(v, Mapping):
            flat.update({(kk if k == "fit" else f"{k}.{kk}"): vv for kk, vv in v.items()})
        else:
            flat[k] = v
    return ", ".join(f"{k} {v}" for k, v in flat.items())


def tuning_frame(tuning: Mapping[str, dict]) -> pd.DataFrame:
    """The tuning table of an lds.json report (its "tuning"["methods"]), development queries
    only: one row per method and setting in the order tried, with what it changes, its LDS,
    its paired difference to the method's default (mean and standard error over queries) and
    whether it is the method's choice."""
    out = []
    for method, t in tuning.items():
        for e in t.get("settings", []):
            diff = e.get("minus_default_dev") or {}
            out.append({"method": method, "setting": e["name"], "round": e.get("round"),
                        "changes": _changes(e.get("changes") or {}) or "(the committed default)",
                        "LDS (dev)": e.get("lds_mean_dev"),
                        "held-out text (dev)": e.get("lds_mean_dev_heldout"),
                        "planted facts (dev)": e.get("lds_mean_dev_facts"),
                        "vs default (dev)": diff.get("mean"), "± stderr": diff.get("stderr"),
                        "chosen": e["method"] == t.get("chosen"),
                        "one-off (s)": e.get("seconds_fit"), "per query (s)": e.get("seconds_per_query"),
                        "status": e.get("status", "ok") if e.get("status") != "ok" else ""})
    return pd.DataFrame(out)


def _interval(ci) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""


def stats_frame(methods: Mapping[str, dict]) -> pd.DataFrame:
    """The statistics table of an lds.json report, test queries: one row per method that has
    them ("test" and, except STRIDE, "vs_stride", see ``stride_viz.evaluation.stats``), best
    mean first. Intervals are strings "[low, high]"; group columns follow GROUP_LABELS."""
    rows = []
    for m, r in methods.items():
        t = r.get("test") if r.get("status", "ok") == "ok" else None
        if not t:
            continue
        v = r.get("vs_stride") or {}
        row = {"method": m, "LDS (test)": t["mean"], "95% CI, queries": _interval(t.get("ci_queries")),
               "95% CI, subsets": _interval(t.get("ci_subsets")),
               "minus STRIDE": v.get("mean_difference", np.nan if m != "stride" else 0.0),
               "Δ 95% CI, queries": _interval(v.get("ci_queries")),
               "Δ 95% CI, subsets": _interval(v.get("ci_subsets")),
               "Wilcoxon p": v.get("wilcoxon_p", np.nan),
               "better / worse than STRIDE (queries)": (f"{v['a_better']} / {v['b_better']}"
                                                       if "a_better" in v else "")}
        for g, label in GROUP_LABELS.items():
            gv = (v.get("groups") or {}).get(g)
            if gv is not None or g in (t.get("groups") or {}):
                row[f"LDS {label}"] = (t.get("groups") or {}).get(g, np.nan)
                row[f"minus STRIDE, {label}"] = gv["mean_difference"] if gv else (0.0 if m == "stride" else np.nan)
                row[f"Δ 95% CI, {label}, queries"] = _interval(gv.get("ci_queries")) if gv else ""
                row[f"Wilcoxon p, {label}"] = gv["wilcoxon_p"] if gv else np.nan
        rows.append(row)
    df = pd.DataFrame(rows)
    if len(df):
        df = df.sort_values("LDS (test)", ascending=False).reset_index(drop=True)
    return df


def twin_frame(twin: Mapping[str, dict], ceiling: Optional[Mapping] = None) -> pd.DataFrame:
    """Model dependence, test queries: per method (the "twin"."methods" entries of an lds.json
    report) its settings (the committed default, or the tuned choice of ``choice_of``), its LDS
    on the trained model and on the random-weight twin, their ratio and the twin's LDS by query
    group; with ``ceiling`` (the report's "noise_ceiling"), each method's LDS on the ceiling's
    subsets and its share of the ceiling. Best trained LDS first."""
    same = (ceiling or {}).get("methods_same_subsets", {})
    rows = []
    for m, r in twin.items():
        if r.get("status", "ok") != "ok":
            continue
        row = {"method": m,
               "settings": (f"tuned choice of {r['choice_of']} (development queries)" if r.get("choice_of")
                            else "committed default"),
               "LDS trained (test)": r.get("trained_lds_mean_test", np.nan),
               "LDS twin (test)": r["lds_mean_test"], "twin 95% CI, queries": _interval(r.get("ci_queries")),
               "twin / trained": r.get("twin_over_trained", np.nan)}
        for g, label in GROUP_LABELS.items():
            if g in (r.get("groups") or {}):
                row[f"twin, {label}"] = r["groups"][g]
        if m in same:
            row["LDS on the ceiling's subsets"] = same[m]["lds_mean_test"]
            row["share of the noise ceiling"] = same[m].get("fraction_of_ceiling", np.nan)
        rows.append(row)
    df = pd.DataFrame(rows)
    if len(df):
        df = df.sort_values("LDS trained (test)", ascending=False, na_position="last").reset_index(drop=True)
    return df


def difference_figure(methods: Mapping[str, dict]) -> go.Figure:
    """Each method's paired difference to STRIDE on the test queries (x; < 0: STRIDE is
    better), with its 95% bootstrap intervals over queries (thick bar) and over retrained
    subsets (thin bar, just below). methods: name -> an lds.json entry with "vs_stride"."""
    rows = [(m, r["vs_stride"]) for m, r in methods.items()
            if r.get("status", "ok") == "ok" and r.get("vs_stride")]
    rows.sort(key=lambda mr: mr[1]["mean_difference"])
    names = [m for m, _ in rows]
    fig = go.Figure()
    for k, (label, key, off, width) in enumerate((("over queries", "ci_queries", 0.0, 4),
                                                  ("over retrained subsets", "ci_subsets", -0.22, 1.5))):
        x = [v["mean_difference"] for _, v in rows]
        fig.add_trace(go.Scatter(
            x=x, y=[i + off for i in range(len(rows))], mode="markers", name=f"95% interval {label}",
            marker=dict(size=9 if k == 0 else 5, color=[method_color(m, names) for m in names]),
            error_x=dict(type="data", symmetric=False, thickness=width, width=0,
                         array=[v[key][1] - v["mean_difference"] for _, v in rows],
                         arrayminus=[v["mean_difference"] - v[key][0] for _, v in rows]),
            customdata=[[plot_text(m), v[key][0], v[key][1], v["wilcoxon_p"]] for m, v in rows],
            hovertemplate="%{customdata[0]} minus STRIDE: %{x:+.3f} LDS<br>95% interval " + label
                          + ": [%{customdata[1]:+.3f}, %{customdata[2]:+.3f}]<br>Wilcoxon p %{customdata[3]:.2g}"
                          "<extra></extra>"))
    fig.add_vline(x=0, line_dash="dot", line_color="gray")
    fig.update_layout(xaxis_title="mean over test queries of (method's LDS − STRIDE's LDS); < 0: STRIDE is better",
                      yaxis=dict(tickvals=list(range(len(rows))), ticktext=[plot_text(m) for m in names]),
                      height=max(260, 50 * len(rows) + 120), legend=dict(orientation="h", y=1.12),
                      margin=dict(l=10, r=10, t=40, b=40))
    return fig


def prediction_scatter(predicted: np.ndarray, losses: np.ndarray, *, method: str = "",
                       query: str = "", rho: Optional[float] = None) -> go.Figure:
    """Per retrained subset j: x = sum over i in S'_j of w_i(x) (the method's prediction), y =
    the query's loss under the model retrained on S'_j (nats). A good attribution slopes downwards (LDS
    correlates the prediction with minus the loss).

    predicted, losses: (M',)."""
    predicted = np.asarray(predicted, dtype=float)
    losses = np.asarray(losses, dtype=float)
    if predicted.shape != losses.shape:
        raise ValueError(f"predicted and losses must have the same shape; got {predicted.shape} "
                         f"and {losses.shape}.")
    fig = go.Figure(go.Scatter(
        x=predicted, y=losses, mode="markers", marker=dict(size=7, opacity=0.75),
        customdata=np.arange(len(losses)),
        hovertemplate="subset %{customdata}<br>Σ scores %{x:.4g}<br>loss %{y:.4f} nats<extra></extra>"))
    title = plot_text(f"{method}: {query}" if query else method)
    if rho is not None:
        title += f" · LDS ρ = {rho:+.3f}"
    # plain Unicode: Plotly shows TeX only where MathJax is loaded, and Streamlit does not load it
    fig.update_layout(title=title, xaxis_title="predicted effect: Σ wᵢ over i ∈ S′ⱼ (method's units; > 0 = helps)",
                      yaxis_title="loss after retraining on S′ⱼ (nats)", height=420,
                      margin=dict(l=10, r=10, t=50, b=40))
    return fig


def scaling_figure(rows: Sequence[dict]) -> go.Figure:
    """Time against model size. rows: {"method", "n_params", "status", "seconds_fit",
    "seconds_per_query"} (status "timeout" rows: {"limit"} instead of times); solid lines:
    one-off time, dotted: per-query time, triangles: ran out of time at the limit (log-log)."""
    names = sorted({r["method"] for r in rows})
    fig = go.Figure()
    for m in names:
        rs = sorted((r for r in rows if r["method"] == m and r.get("status", "ok") == "ok"),
                    key=lambda r: r["n_params"])
        color = method_color(m, names)
        x = [r["n_params"] for r in rs]
        if rs:
            fig.add_trace(go.Scatter(x=x, y=[max(r["seconds_fit"], 1e-3) for r in rs],
                                     mode="lines+markers", name=f"{plot_text(m)} one-off", line=dict(color=color)))
            fig.add_trace(go.Scatter(x=x, y=[max(r["seconds_per_query"], 1e-4) for r in rs],
                                     mode="lines+markers", name=f"{plot_text(m)} per query",
                                     line=dict(color=color, dash="dot")))
        # ran out of time: its one-off part took at least the limit (a lower bound)
        out = sorted((r for r in rows if r["method"] == m and r.get("status") == "timeout"
                      and r.get("n_params") and r.get("limit")), key=lambda r: r["n_params"])
        if out:
            nudge = 1.04 ** (names.index(m) - len(names) / 2)   # methods out at one size stay apart
            fig.add_trace(go.Scatter(
                x=[r["n_params"] * nudge for r in out], y=[r["limit"] for r in out], mode="markers",
                name=f"{plot_text(m)}: out of time", marker=dict(color=color, symbol="triangle-up", size=12),
                customdata=[r["n_params"] for r in out],
                hovertemplate="%{customdata:.3s} parameters: did not finish within %{y:.0f} s<extra>"
                              + plot_text(m) + "</extra>"))
    fig.update_layout(xaxis_type="log", yaxis_type="log", xaxis_title="model parameters",
                      yaxis_title="wall time (s, 2 shared CPU cores)", height=480,
                      margin=dict(l=10, r=10, t=30, b=40))
    return fig
