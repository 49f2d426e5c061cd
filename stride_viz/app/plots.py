"""Figure builders of the dashboard and the HTML report: arrays in, a Plotly figure out.

Pure functions (no Streamlit, no file access) so that they are tested without a browser and
shared by the pages and :mod:`stride_viz.app.report`. Every trace that shows training examples
carries the example's pool index in ``customdata`` (and every trace that shows operators the
operator index), so a selection event in one chart can highlight the same example in another.

Sign convention everywhere: a score ``w_i > 0`` means training example i helps (it lowers the
query's completion loss; a proponent), ``w_i < 0`` that it hurts (an opponent). Units: nats of
mean per-token loss. An operator response ``y_k > 0`` means operator k lowers the query's loss.
"""
from __future__ import annotations

import html
from typing import Optional, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

__all__ = ["top_examples_figure", "sparsity_path_figure", "responses_figure", "token_loss_html",
           "top_indices", "plot_text", "PLOTLY_CONFIG", "PROPONENT", "OPPONENT", "SELECTED", "SCORE_AXIS",
           "RESPONSE_AXIS"]

PROPONENT = "#1a9850"   # green: helps
OPPONENT = "#d73027"    # red: hurts
SELECTED = "#2b2b2b"    # near-black outline / line of the selected example
NEUTRAL = "#c8c8c8"
PALETTE = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6",
           "#9d755d", "#bab0ac", "#eeca3b")
SCORE_AXIS = "score w<sub>i</sub> (nats of mean per-token loss; > 0 helps, < 0 hurts)"
RESPONSE_AXIS = "response y<sub>k</sub> = Loss<sub>base</sub> − Loss<sub>k</sub> (nats; > 0: operator lowers the loss)"
# plotly.js options of every chart (pages and report): no Plotly logo link, no "send to Chart
# Studio" button that would upload the chart's data, no MathJax typesetting of text.
# (showLink / showEditInChartStudio are gone from plotly.js 3, which plotly.py warns about.)
PLOTLY_CONFIG = {"displaylogo": False, "showSendToCloud": False, "modeBarButtonsToRemove": ["sendDataToCloud"],
                 "typesetMath": False}


def plot_text(text: object) -> str:
    """``text`` (pool ids and documents, prompts, names from a URL) made inert for plotly.js,
    which turns ``<a href>``, ``<b>``, ``<br>``, ``<span style>`` into live SVG markup, treats
    ``$...$`` as LaTeX and ``%{...}`` in templates as fields: tags are HTML-escaped, ``$`` and
    ``%`` written as numeric entities. plotly.js shows every entity as its character."""
    return html.escape(str(text), quote=False).replace("$", "&#36;").replace("%", "&#37;")


def _label(text: str, width: int = 48) -> str:
    one_line = " ".join(text.split())
    return one_line if len(one_line) <= width else one_line[: width - 1] + "…"


def top_indices(scores: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``top`` largest positive and ``top`` most negative scores.

    scores: float array of shape (n,). Returns (proponents, opponents), each sorted by
    decreasing |score|; zeros are never included.
    """
    scores = np.asarray(scores, dtype=float)
    order = np.argsort(-scores, kind="stable")
    pro = order[scores[order] > 0][:top]
    order = np.argsort(scores, kind="stable")
    con = order[scores[order] < 0][:top]
    return pro, con


def top_examples_figure(ids: Sequence[str], scores: np.ndarray, texts: Sequence[str], *,
                        top: int = 10, selected: Optional[int] = None,
                        marked: Optional[set[int]] = None, title: str = "") -> go.Figure:
    """Horizontal bars of the strongest proponents (green, right) and opponents (red, left).

    ids, texts: length n; scores: float array of shape (n,); selected: pool index drawn with a
    dark outline; marked: pool indices flagged with a star (e.g. known sources of a planted
    fact). Bar customdata = pool index.
    """
    scores = np.asarray(scores, dtype=float)
    if len(ids) != scores.shape[0] or len(texts) != scores.shape[0]:
        raise ValueError(f"ids ({len(ids)}), texts ({len(texts)}) and scores ({scores.shape[0]}) "
                         f"must have the same length.")
    marked = marked or set()
    pro, con = top_indices(scores, top)
    # opponents first (drawn at the bottom), proponents on top, strongest at the extremes
    idx = np.concatenate([con, pro[::-1]]).astype(int)
    labels = [("★ " if i in marked else "") + plot_text(f"{ids[i]}: {_label(texts[i])}") for i in idx]
    colors = [PROPONENT if scores[i] > 0 else OPPONENT for i in idx]
    widths = [3 if selected is not None and i == selected else 0 for i in idx]
    fig = go.Figure(go.Bar(
        x=scores[idx], y=list(range(len(idx))), orientation="h", marker_color=colors,
        marker_line_color=SELECTED, marker_line_width=widths, customdata=idx,
        text=[f"{scores[i]:+.3g}" for i in idx], textposition="outside", cliponaxis=False,
        hovertext=[f"<b>{plot_text(ids[i])}</b> (pool row {i})<br>w = {scores[i]:+.4g} nats"
                   f"<br>{plot_text(_label(texts[i], 200))}" for i in idx],
        hoverinfo="text", name="examples"))
    fig.update_yaxes(tickmode="array", tickvals=list(range(len(idx))), ticktext=labels,
                     automargin=True)
    fig.update_xaxes(title_text=SCORE_AXIS, zeroline=True, zerolinecolor="#888")
    if len(idx) == 0:
        fig.add_annotation(text="No example has a non-zero score at the chosen λ "
                                "(the Lasso kept none: the responses look like noise).",
                           showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    fig.update_layout(title=title or "Top influential examples", height=max(320, 28 * len(idx) + 140),
                      margin=dict(l=10, r=40, t=50, b=60), showlegend=False, clickmode="event+select")
    return fig


def sparsity_path_figure(ratios: np.ndarray, coefs: np.ndarray, nonzeros: np.ndarray,
                         cv_mean: np.ndarray, cv_std: np.ndarray, chosen_index: int,
                         ids: Sequence[str], *, highlight: Sequence[int] = (),
                         selected: Optional[int] = None, background: int = 40) -> go.Figure:
    """The Lasso regularisation path of one query.

    ratios: λ/λ_max, shape (L,); coefs: shape (L, n); nonzeros, cv_mean, cv_std: shape (L,);
    chosen_index: index into the path of the chosen λ; highlight: pool indices drawn in colour
    (the top examples); up to ``background`` other non-zero examples are drawn in grey;
    selected: pool index drawn as a thick dark line. Line customdata = pool index.
    Top panel: coefficients; bottom panel: held-out error (left axis) and the non-zero count
    (right axis). λ decreases to the right, so examples enter the model left to right.
    """
    ratios = np.asarray(ratios, dtype=float)
    coefs = np.asarray(coefs, dtype=float)
    L = ratios.shape[0]
    if coefs.shape[0] != L or np.shape(nonzeros)[0] != L or np.shape(cv_mean)[0] != L:
        raise ValueError(f"ratios ({L}), coefs ({coefs.shape[0]}), nonzeros and cv_mean must "
                         f"share the path length.")
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.62, 0.38],
                        vertical_spacing=0.06, specs=[[{}], [{"secondary_y": True}]])
    highlight = [int(i) for i in highlight]
    special = set(highlight) | ({int(selected)} if selected is not None else set())
    ever = np.flatnonzero(np.any(coefs != 0, axis=0))
    rest = [int(i) for i in ever[np.argsort(-np.abs(coefs[:, ever]).max(axis=0))] if int(i) not in special]
    for j, i in enumerate(rest[:background]):
        fig.add_trace(go.Scatter(x=ratios, y=coefs[:, i], mode="lines", line=dict(color=NEUTRAL, width=1),
                                 customdata=[i] * L, name=plot_text(ids[i]), showlegend=j == 0,
                                 legendgroup="other", hovertemplate=f"{plot_text(ids[i])}"
                                 "<br>λ/λ_max=%{x:.3g}<br>w=%{y:+.4g} nats<extra></extra>"),
                      row=1, col=1)
    if rest[:background]:
        fig.data[0].name = "other examples"
    for j, i in enumerate(highlight):
        is_sel = selected is not None and i == selected
        # markers make the line clickable (plotly selects points, not line segments)
        fig.add_trace(go.Scatter(x=ratios, y=coefs[:, i], mode="lines+markers", marker=dict(size=4),
                                 line=dict(color=SELECTED if is_sel else PALETTE[j % len(PALETTE)],
                                           width=4 if is_sel else 2),
                                 customdata=[i] * L, name=plot_text(_label(str(ids[i]), 24)),
                                 hovertemplate=f"{plot_text(ids[i])}<br>λ/λ_max=%{{x:.3g}}"
                                               "<br>w=%{y:+.4g} nats<extra></extra>"), row=1, col=1)
    if selected is not None and selected not in highlight:
        i = int(selected)
        fig.add_trace(go.Scatter(x=ratios, y=coefs[:, i], mode="lines+markers", marker=dict(size=4),
                                 line=dict(color=SELECTED, width=4),
                                 customdata=[i] * L, name=f"selected: {plot_text(_label(str(ids[i]), 20))}",
                                 hovertemplate=f"{plot_text(ids[i])}<br>λ/λ_max=%{{x:.3g}}"
                                               "<br>w=%{y:+.4g} nats<extra></extra>"), row=1, col=1)
    cv_mean = np.asarray(cv_mean, dtype=float)
    cv_std = np.asarray(cv_std, dtype=float)
    fig.add_trace(go.Scatter(x=np.concatenate([ratios, ratios[::-1]]),
                             y=np.concatenate([cv_mean + cv_std, (cv_mean - cv_std)[::-1]]),
                             mode="lines", fill="toself", fillcolor="rgba(76,120,168,0.18)", line=dict(width=0),
                             hoverinfo="skip", showlegend=False), row=2, col=1)
    fig.add_trace(go.Scatter(x=ratios, y=cv_mean, mode="lines+markers", marker=dict(size=4),
                             line=dict(color=PALETTE[0]), name="held-out error (± 1 sd)",
                             hovertemplate="λ/λ_max=%{x:.3g}<br>held-out MSE=%{y:.4g} nats²<extra></extra>"),
                  row=2, col=1)
    fig.add_trace(go.Scatter(x=ratios, y=np.asarray(nonzeros), mode="lines", line=dict(color=PALETTE[1], dash="dot"),
                             name="non-zero examples",
                             hovertemplate="λ/λ_max=%{x:.3g}<br>%{y} non-zero<extra></extra>"),
                  row=2, col=1, secondary_y=True)
    chosen = float(ratios[int(chosen_index)])
    for row in (1, 2):
        fig.add_vline(x=chosen, line=dict(color="#555", dash="dash", width=1), row=row, col=1)
    fig.add_annotation(x=np.log10(chosen), y=1, xref="x", yref="paper", yanchor="bottom", showarrow=False,
                       text=f"chosen λ/λ_max = {chosen:.3g} ({int(np.asarray(nonzeros)[int(chosen_index)])} non-zero)")
    # plain ticks (1, 0.5, 0.2, 0.1, ...): plotly's log labels ("9 8 7 ... 2") read as nonsense here
    lo, hi = float(ratios.min()), float(ratios.max())
    ticks = [m * 10.0 ** e for e in range(0, -9, -1) for m in (1, 0.5, 0.2) if lo <= m * 10.0 ** e <= hi * 1.0001]
    fig.update_xaxes(type="log", autorange="reversed", tickvals=ticks, ticktext=[f"{t:g}" for t in ticks])
    fig.update_xaxes(title_text="λ / λ_max (log scale; weaker regularisation to the right)", row=2, col=1)
    fig.update_yaxes(title_text="coefficient w<sub>i</sub> (nats)", row=1, col=1)
    fig.update_yaxes(title_text="held-out MSE (nats²)", row=2, col=1, secondary_y=False)
    fig.update_yaxes(title_text="non-zero", row=2, col=1, secondary_y=True, rangemode="tozero")
    fig.update_layout(title="Sparsity path", height=560, margin=dict(l=10, r=10, t=60, b=50),
                      legend=dict(orientation="h", y=-0.18), clickmode="event+select")
    return fig


def responses_figure(responses: np.ndarray, *, member: Optional[np.ndarray] = None,
                     member_label: str = "", selected_k: Optional[int] = None) -> go.Figure:
    """The K operator responses of one query: histogram (left) and sorted values (right).

    responses: float array of shape (K,); member: optional bool array of shape (K,), True for
    the subsets that contain the selected training example (they are split out in both panels);
    selected_k: an operator drawn as a large dark marker. Sorted-panel customdata = operator k.
    """
    y = np.asarray(responses, dtype=float)
    K = y.shape[0]
    if member is not None and np.shape(member)[0] != K:
        raise ValueError(f"member ({np.shape(member)[0]}) must have one entry per response ({K}).")
    fig = make_subplots(rows=1, cols=2, column_widths=[0.42, 0.58], horizontal_spacing=0.08,
                        subplot_titles=("Distribution", "Sorted (one point per operator)"))
    order = np.argsort(-y, kind="stable")
    rank = np.arange(K)
    if member is None:
        fig.add_trace(go.Histogram(x=y, nbinsx=min(60, max(10, K // 8)), marker_color=PALETTE[0],
                                   name="all operators", hovertemplate="%{x}<br>%{y} operators<extra></extra>"),
                      row=1, col=1)
        fig.add_trace(go.Scatter(x=rank, y=y[order], mode="markers", marker=dict(size=5, color=PALETTE[0]),
                                 customdata=order, name="operators",
                                 hovertemplate="operator %{customdata}<br>y=%{y:+.4g} nats<extra></extra>"),
                      row=1, col=2)
    else:
        m = np.asarray(member, dtype=bool)
        inside = m[order]
        name_in = f"subsets containing {plot_text(member_label)}" if member_label else "subsets containing it"
        # counts on shared bins, stacked: the few subsets holding the example stay visible
        nbins = min(60, max(10, K // 8))
        lo, hi = float(y.min()), float(y.max())
        bins = dict(start=lo, end=hi + 1e-12, size=max((hi - lo) / nbins, 1e-12))
        for mask, name, color in ((~m, "other subsets", NEUTRAL), (m, name_in, PROPONENT)):
            fig.add_trace(go.Histogram(x=y[mask], name=name, marker_color=color, xbins=bins, legendgroup=name,
                                       hovertemplate="%{x}<br>%{y} operators<extra></extra>"), row=1, col=1)
        for mask, name, color, size in ((~inside, "other subsets", NEUTRAL, 5), (inside, name_in, PROPONENT, 9)):
            fig.add_trace(go.Scatter(x=rank[mask], y=y[order][mask], mode="markers", name=name, legendgroup=name,
                                     showlegend=False, marker=dict(size=size, color=color),
                                     customdata=order[mask],
                                     hovertemplate="operator %{customdata}<br>y=%{y:+.4g} nats<extra></extra>"),
                          row=1, col=2)
        fig.update_layout(barmode="stack")
        if m.any() and (~m).any():
            diff = y[m].mean() - y[~m].mean()
            fig.add_annotation(text=f"mean inside − outside = {diff:+.3g} nats", showarrow=False,
                               xref="x domain", yref="y domain", x=0.02, y=0.98, xanchor="left", row=1, col=1)
    if selected_k is not None and 0 <= selected_k < K:
        pos = int(np.flatnonzero(order == selected_k)[0])
        fig.add_trace(go.Scatter(x=[pos], y=[y[selected_k]], mode="markers", name=f"operator {selected_k}",
                                 marker=dict(size=14, color="rgba(0,0,0,0)", line=dict(color=SELECTED, width=3)),
                                 customdata=[selected_k], hoverinfo="skip"), row=1, col=2)
    fig.add_vline(x=0, line=dict(color="#888", width=1), row=1, col=1)
    fig.add_hline(y=0, line=dict(color="#888", width=1), row=1, col=2)
    fig.update_xaxes(title_text="y<sub>k</sub> (nats; > 0 lowers the loss)", row=1, col=1)
    fig.update_yaxes(title_text="operators", row=1, col=1)
    fig.update_xaxes(title_text="rank (largest response first)", row=1, col=2)
    fig.update_yaxes(title_text="y<sub>k</sub> (nats)", row=1, col=2)
    fig.update_layout(title=f"Operator responses (K = {K})", height=420,
                      margin=dict(l=10, r=10, t=70, b=50), legend=dict(orientation="h", y=-0.2),
                      clickmode="event+select")
    return fig


def token_loss_html(prompt: str, tokens: Sequence[str], losses: Sequence[float],
                    vmax: Optional[float] = None) -> str:
    """The query as HTML: the prompt in grey, then each completion token on a background whose
    red intensity grows with its loss (nats; hover shows the value). vmax: loss of full red
    (default: the largest loss, at least 1 nat)."""
    losses = np.asarray(losses, dtype=float)
    if len(tokens) != losses.shape[0]:
        raise ValueError(f"tokens ({len(tokens)}) and losses ({losses.shape[0]}) must have the same length.")
    top = float(vmax) if vmax is not None else max(1.0, float(losses.max()) if losses.size else 1.0)
    spans = []
    for tok, loss in zip(tokens, losses):
        a = min(1.0, max(0.0, loss / top))
        text = html.escape(tok).replace("\n", "↵<br>")
        spans.append(f'<span title="{loss:.3f} nats" style="background: rgba(215,48,39,{0.08 + 0.8 * a:.2f});'
                     f' border-radius: 3px; padding: 1px 0; white-space: pre-wrap">{text}</span>')
    legend = (f'<div style="font-size: 0.8em; color: #666; margin-top: 6px">Completion tokens shaded by '
              f'the base model\'s loss (nats, −log p); white ≈ 0, full red ≥ {top:.2g}. Hover a token '
              f'for its value.</div>')
    prompt_html = html.escape(prompt).replace("\n", "<br>")
    return (f'<div style="font-family: monospace; line-height: 1.9; font-size: 0.95em">'
            f'<span style="color: #777; white-space: pre-wrap">{prompt_html}</span>{"".join(spans)}</div>{legend}')
