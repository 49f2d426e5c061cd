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
    bar = dict(type="bar", x=scores[idx], y=list(range(len(idx))), orientation="h",
               marker=dict(color=colors, line=dict(color=SELECTED, width=widths)), customdata=idx,
               text=[f"{scores[i]:+.3g}" for i in idx], textposition="outside", cliponaxis=False,
               hovertext=[f"<b>{plot_text(ids[i])}</b> (pool row {i})<br>w = {scores[i]:+.4g} nats"
                          f"<br>{plot_text(_label(texts[i], 200))}" for i in idx],
               hoverinfo="text", name="examples")
    notes = [] if len(idx) else [dict(text="No example has a non-zero score at the chosen λ (the Lasso kept "
                                           "none: the responses look like noise).", showarrow=False,
                                      xref="paper", yref="paper", x=0.5, y=0.5)]
    return go.Figure(data=[bar], layout=dict(
        yaxis=dict(tickmode="array", tickvals=list(range(len(idx))), ticktext=labels, automargin=True),
        xaxis=dict(title=dict(text=SCORE_AXIS), zeroline=True, zerolinecolor="#888"), annotations=notes,
        title=dict(text=title or "Top influential examples"), height=max(320, 28 * len(idx) + 140),
        margin=dict(l=10, r=40, t=50, b=60), showlegend=False, clickmode="event+select"))


def _rows(heights: Sequence[float], spacing: float) -> list[list[float]]:
    """Domains [lo, hi] of stacked rows, top first (as make_subplots lays them out)."""
    free = 1.0 - spacing * (len(heights) - 1)
    out, hi = [], 1.0
    for h in heights:
        out.append([max(0.0, hi - h * free), hi])
        hi -= h * free + spacing
    return out


def _vline(x: float, xref: str, yref: str, color: str = "#888", dash: Optional[str] = None) -> dict:
    return dict(type="line", xref=xref, yref=f"{yref} domain", x0=x, x1=x, y0=0, y1=1,
                line=dict(color=color, width=1, dash=dash))


def _hline(y: float, xref: str, yref: str) -> dict:
    return dict(type="line", xref=f"{xref} domain", yref=yref, x0=0, x1=1, y0=y, y1=y,
                line=dict(color="#888", width=1))


# The two multi-panel figures below are built as one data list and one layout (axes placed by
# hand, as make_subplots would): a new prompt's page draws them on every click, and building
# them trace by trace through make_subplots, add_trace and add_vline cost ~4x the time.


def sparsity_path_figure(ratios: np.ndarray, coefs: np.ndarray, nonzeros: np.ndarray,
                         cv_mean: np.ndarray, cv_std: np.ndarray, chosen_index: int,
                         ids: Sequence[str], *, highlight: Sequence[int] = (),
                         selected: Optional[int] = None, background: int = 40) -> go.Figure:
    """The Lasso regularisation path of one query.

    ratios: λ/λ_max, shape (L,); coefs: shape (L, n); nonzeros, cv_mean, cv_std: shape (L,);
    chosen_index: index into the path of the chosen λ; highlight: pool indices drawn in colour
    (the top examples); up to ``background`` other non-zero examples are drawn in grey (one
    trace, the lines separated by gaps); selected: pool index drawn as a thick dark line. Every
    point's customdata = its pool index. Top panel: coefficients; bottom panel: held-out error
    (left axis) and the non-zero count (right axis). λ decreases to the right, so examples
    enter the model left to right.
    """
    ratios = np.asarray(ratios, dtype=float)
    coefs = np.asarray(coefs, dtype=float)
    L = ratios.shape[0]
    if coefs.shape[0] != L or np.shape(nonzeros)[0] != L or np.shape(cv_mean)[0] != L:
        raise ValueError(f"ratios ({L}), coefs ({coefs.shape[0]}), nonzeros and cv_mean must "
                         f"share the path length.")
    highlight = [int(i) for i in highlight]
    special = set(highlight) | ({int(selected)} if selected is not None else set())
    ever = np.flatnonzero(np.any(coefs != 0, axis=0))
    rest = [int(i) for i in ever[np.argsort(-np.abs(coefs[:, ever]).max(axis=0))] if int(i) not in special]
    others = rest[:background]
    hover = "<br>λ/λ_max=%{x:.3g}<br>w=%{y:+.4g} nats<extra></extra>"
    data: list[dict] = []
    if others:
        # every grey line in one trace (gaps between them): one trace draws far faster than 40,
        # in Python and in the browser; each point's customdata is still its pool index
        gap = np.full(1, np.nan)
        data.append(dict(
            type="scatter", x=np.concatenate([np.concatenate([ratios, gap]) for _ in others]),
            y=np.concatenate([np.concatenate([coefs[:, i], gap]) for i in others]),
            customdata=np.repeat(np.asarray(others, dtype=int), L + 1),
            text=np.repeat(np.asarray([plot_text(ids[i]) for i in others], dtype=object), L + 1),
            mode="lines", line=dict(color=NEUTRAL, width=1), connectgaps=False, name="other examples",
            legendgroup="other", hovertemplate="%{text}" + hover, xaxis="x", yaxis="y"))
    lines = [(i, SELECTED if i == selected else PALETTE[j % len(PALETTE)], 4 if i == selected else 2,
              plot_text(_label(str(ids[i]), 24))) for j, i in enumerate(highlight)]
    if selected is not None and int(selected) not in highlight:
        i = int(selected)
        lines.append((i, SELECTED, 4, f"selected: {plot_text(_label(str(ids[i]), 20))}"))
    for i, color, width, name in lines:
        # markers make the line clickable (plotly selects points, not line segments)
        data.append(dict(type="scatter", x=ratios, y=coefs[:, i], mode="lines+markers", marker=dict(size=4),
                         line=dict(color=color, width=width), customdata=[i] * L, name=name,
                         hovertemplate=plot_text(ids[i]) + hover, xaxis="x", yaxis="y"))
    cv_mean = np.asarray(cv_mean, dtype=float)
    cv_std = np.asarray(cv_std, dtype=float)
    data += [
        dict(type="scatter", x=np.concatenate([ratios, ratios[::-1]]),
             y=np.concatenate([cv_mean + cv_std, (cv_mean - cv_std)[::-1]]), mode="lines", fill="toself",
             fillcolor="rgba(76,120,168,0.18)", line=dict(width=0), hoverinfo="skip", showlegend=False,
             xaxis="x2", yaxis="y2"),
        dict(type="scatter", x=ratios, y=cv_mean, mode="lines+markers", marker=dict(size=4),
             line=dict(color=PALETTE[0]), name="held-out error (± 1 sd)", xaxis="x2", yaxis="y2",
             hovertemplate="λ/λ_max=%{x:.3g}<br>held-out MSE=%{y:.4g} nats²<extra></extra>"),
        dict(type="scatter", x=ratios, y=np.asarray(nonzeros), mode="lines",
             line=dict(color=PALETTE[1], dash="dot"), name="non-zero examples", xaxis="x2", yaxis="y3",
             hovertemplate="λ/λ_max=%{x:.3g}<br>%{y} non-zero<extra></extra>")]
    chosen = float(ratios[int(chosen_index)])
    # plain ticks (1, 0.5, 0.2, 0.1, ...): plotly's log labels ("9 8 7 ... 2") read as nonsense here
    lo, hi = float(ratios.min()), float(ratios.max())
    ticks = [m * 10.0 ** e for e in range(0, -9, -1) for m in (1, 0.5, 0.2) if lo <= m * 10.0 ** e <= hi * 1.0001]
    lam = dict(type="log", autorange="reversed", tickvals=ticks, ticktext=[f"{t:g}" for t in ticks])
    top, bottom = _rows([0.62, 0.38], 0.06)
    layout = dict(
        xaxis=dict(**lam, domain=[0, 1], anchor="y", matches="x2", showticklabels=False),
        xaxis2=dict(**lam, domain=[0, 1], anchor="y2",
                    title=dict(text="λ / λ_max (log scale; weaker regularisation to the right)")),
        yaxis=dict(domain=top, anchor="x", title=dict(text="coefficient w<sub>i</sub> (nats)")),
        yaxis2=dict(domain=bottom, anchor="x2", title=dict(text="held-out MSE (nats²)")),
        yaxis3=dict(anchor="x2", overlaying="y2", side="right", rangemode="tozero", title=dict(text="non-zero")),
        shapes=[_vline(chosen, "x", "y", "#555", "dash"), _vline(chosen, "x2", "y2", "#555", "dash")],
        annotations=[dict(x=np.log10(chosen), y=1, xref="x", yref="paper", yanchor="bottom", showarrow=False,
                          text=f"chosen λ/λ_max = {chosen:.3g} "
                               f"({int(np.asarray(nonzeros)[int(chosen_index)])} non-zero)")],
        title=dict(text="Sparsity path"), height=560, margin=dict(l=10, r=10, t=60, b=50),
        legend=dict(orientation="h", y=-0.18), clickmode="event+select")
    return go.Figure(data=data, layout=layout)


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
    order = np.argsort(-y, kind="stable")
    rank = np.arange(K)
    nbins = min(60, max(10, K // 8))
    left = dict(xaxis="x", yaxis="y")
    right = dict(xaxis="x2", yaxis="y2")
    sorted_hover = "operator %{customdata}<br>y=%{y:+.4g} nats<extra></extra>"
    hist_hover = "%{x}<br>%{y} operators<extra></extra>"
    layout: dict = {}
    notes: list[dict] = []
    if member is None:
        data = [dict(type="histogram", x=y, nbinsx=nbins, marker=dict(color=PALETTE[0]), name="all operators",
                     hovertemplate=hist_hover, **left),
                dict(type="scatter", x=rank, y=y[order], mode="markers", marker=dict(size=5, color=PALETTE[0]),
                     customdata=order, name="operators", hovertemplate=sorted_hover, **right)]
    else:
        m = np.asarray(member, dtype=bool)
        inside = m[order]
        name_in = f"subsets containing {plot_text(member_label)}" if member_label else "subsets containing it"
        # counts on shared bins, stacked: the few subsets holding the example stay visible
        lo, hi = float(y.min()), float(y.max())
        bins = dict(start=lo, end=hi + 1e-12, size=max((hi - lo) / nbins, 1e-12))
        data = [dict(type="histogram", x=y[mask], name=name, marker=dict(color=color), xbins=bins,
                     legendgroup=name, hovertemplate=hist_hover, **left)
                for mask, name, color in ((~m, "other subsets", NEUTRAL), (m, name_in, PROPONENT))]
        data += [dict(type="scatter", x=rank[mask], y=y[order][mask], mode="markers", name=name, legendgroup=name,
                      showlegend=False, marker=dict(size=size, color=color), customdata=order[mask],
                      hovertemplate=sorted_hover, **right)
                 for mask, name, color, size in ((~inside, "other subsets", NEUTRAL, 5),
                                                 (inside, name_in, PROPONENT, 9))]
        layout["barmode"] = "stack"
        if m.any() and (~m).any():
            diff = y[m].mean() - y[~m].mean()
            notes.append(dict(text=f"mean inside − outside = {diff:+.3g} nats", showarrow=False,
                              xref="x domain", yref="y domain", x=0.02, y=0.98, xanchor="left"))
    if selected_k is not None and 0 <= selected_k < K:
        pos = int(np.flatnonzero(order == selected_k)[0])
        data.append(dict(type="scatter", x=[pos], y=[y[selected_k]], mode="markers", name=f"operator {selected_k}",
                         marker=dict(size=14, color="rgba(0,0,0,0)", line=dict(color=SELECTED, width=3)),
                         customdata=[selected_k], hoverinfo="skip", **right))
    split = 0.42 * (1 - 0.08)
    columns = ([0, split], [split + 0.08, 1])
    titles = [dict(text=text, x=(a + b) / 2, y=1, xref="paper", yref="paper", xanchor="center",
                   yanchor="bottom", showarrow=False, font=dict(size=16))
              for text, (a, b) in zip(("Distribution", "Sorted (one point per operator)"), columns)]
    layout.update(
        xaxis=dict(domain=columns[0], anchor="y", title=dict(text="y<sub>k</sub> (nats; > 0 lowers the loss)")),
        yaxis=dict(domain=[0, 1], anchor="x", title=dict(text="operators")),
        xaxis2=dict(domain=columns[1], anchor="y2", title=dict(text="rank (largest response first)")),
        yaxis2=dict(domain=[0, 1], anchor="x2", title=dict(text="y<sub>k</sub> (nats)")),
        shapes=[_vline(0, "x", "y"), _hline(0, "x2", "y2")], annotations=titles + notes,
        title=dict(text=f"Operator responses (K = {K})"), height=420, margin=dict(l=10, r=10, t=70, b=50),
        legend=dict(orientation="h", y=-0.2), clickmode="event+select")
    return go.Figure(data=data, layout=layout)


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
