"""Token-level views of an attribution: pure helpers and figure builders (no Streamlit).

A token's score ``W[t, i]`` (:mod:`stride_viz.method.tokens`) is in nats of *that token's*
loss: ``> 0`` training example i lowers the loss of completion token t (a proponent of that
token), ``< 0`` raises it (an opponent). The whole completion's scores are in nats of the mean
per-token loss; their back-projection is the mean of the tokens' (the Lasso's scores are close
to, not equal to, that mean).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from stride_viz.app.plots import plot_text, top_examples_figure
from stride_viz.integrity import read_checked
from stride_viz.method.tokens import TOKENS_FILE, TokenRecovery, load_tokens
from stride_viz.storage import RunStore

__all__ = ["TOKEN_AXIS", "TOKEN_NOTE", "token_label", "read_tokens", "tokens_command", "token_table",
           "token_top_figure", "word_top_figure", "token_matrix_figure", "source_rank", "token_summary",
           "scores_summary"]

TOKEN_AXIS = "score W<sub>t,i</sub> (nats of this token's loss; > 0 helps, < 0 hurts)"
TOKEN_NOTE = ("**A token's score** W<sub>t,i</sub> > 0 means training example i **helps** that one "
              "completion token: training on it lowers the token's loss (−log p of the token given "
              "everything before it), in **nats of that token's loss**; < 0: it hurts. Each token's "
              "scores come from its own operator responses y<sub>k,t</sub> = loss<sub>base</sub>(t) − "
              "loss<sub>k</sub>(t), recovered like the whole completion's (same Lasso, same choice "
              "of λ by held-out operators); the whole completion's responses are the mean of the "
              "tokens'.")


def token_label(token: str) -> str:
    """A completion token made visible as a label (plain text, not yet escaped): spaces as
    ``␣``, line breaks as ``↵``, tabs as ``⇥``, an empty token as ``∅``."""
    text = str(token).replace(" ", "␣").replace("\n", "↵").replace("\r", "").replace("\t", "⇥")
    return text or "∅"


def read_tokens(run_dir: str | Path, query_id: str) -> Optional[TokenRecovery]:
    """The per-token scores of an explained query, or None when its folder has none; a
    damaged tokens.npz raises RunDamaged naming the fix."""
    store = RunStore(run_dir)
    path = store.attribution_dir(query_id) / TOKENS_FILE
    if not path.exists():
        return None
    return read_checked(path, lambda p: load_tokens(p.parent), store.attribution_fix(query_id))


def tokens_command(run_dir: str | Path, query_id: str) -> str:
    """The CLI command that adds per-token scores to an explained query (shell-quoted)."""
    import shlex
    return (f"python -m stride_viz attribute --run {shlex.quote(str(run_dir))} --query-id "
            f"{shlex.quote(query_id)} --per-token --out {shlex.quote(str(Path('out') / 'tokens'))}")


def token_table(pool: pd.DataFrame, token_scores: np.ndarray, whole_scores: np.ndarray,
                sources: Sequence[str] = ()) -> pd.DataFrame:
    """The examples with a non-zero score for one token, ranked (proponents first, then
    opponents from the most harmful), with the whole completion's score alongside.

    pool: DataFrame with ``id`` and ``text`` (n rows); token_scores, whole_scores: float (n,).
    Columns: rank, id, token_score_nats, whole_score_nats, effect, planted_source, text, row.
    """
    s = np.asarray(token_scores, dtype=float)
    w = np.asarray(whole_scores, dtype=float)
    if s.shape != (len(pool),) or w.shape != (len(pool),):
        raise ValueError(f"token_scores {s.shape} and whole_scores {w.shape} must both have one value "
                         f"per pool row ({len(pool)}).")
    pos = np.flatnonzero(s > 0)
    pos = pos[np.argsort(-s[pos], kind="stable")]
    neg = np.flatnonzero(s < 0)
    neg = neg[np.argsort(s[neg], kind="stable")]
    order = np.concatenate([pos, neg]).astype(int)
    src = set(sources)
    ids = pool["id"].to_numpy()[order]
    return pd.DataFrame({
        "rank": np.concatenate([np.arange(1, len(pos) + 1), -np.arange(1, len(neg) + 1)]).astype(int),
        "id": ids, "token_score_nats": s[order], "whole_score_nats": w[order],
        "effect": np.where(s[order] > 0, "helps this token", "hurts this token"),
        "planted_source": [i in src for i in ids],
        "text": pool["text"].to_numpy()[order], "row": order})


def token_top_figure(ids: Sequence[str], token_scores: np.ndarray, texts: Sequence[str], token: str, *,
                     index: int, top: int = 10, selected: Optional[int] = None,
                     marked: Optional[set[int]] = None) -> go.Figure:
    """The strongest proponents and opponents of one completion token (bars as in
    :func:`stride_viz.app.plots.top_examples_figure`; x in nats of that token's loss)."""
    fig = top_examples_figure(ids, token_scores, texts, top=top, selected=selected, marked=marked,
                              title=f"Token {index}: {plot_text(token_label(token))}")
    fig.update_xaxes(title_text=TOKEN_AXIS)
    fig.update_traces(hovertext=[h.replace(" nats<br>", " nats of this token's loss<br>")
                                 for h in fig.data[0].hovertext or ()])
    return fig


def word_top_figure(ids: Sequence[str], scores: np.ndarray, texts: Sequence[str], tokens: Sequence[str],
                    span: Sequence[int], *, top: int = 10, selected: Optional[int] = None,
                    marked: Optional[set[int]] = None) -> go.Figure:
    """:func:`token_top_figure` for a word of several tokens (``span``): its scores are the mean
    of its tokens' (x in nats of the word's mean token loss)."""
    word = "".join(tokens[t] for t in span)
    fig = top_examples_figure(ids, scores, texts, top=top, selected=selected, marked=marked,
                              title=f"Word, tokens {span[0]}-{span[-1]}: {plot_text(token_label(word))}")
    fig.update_xaxes(title_text="score (nats of the word's mean token loss; > 0 helps)")
    fig.update_traces(hovertext=[h.replace(" nats<br>", " nats of this word's mean token loss<br>")
                                 for h in fig.data[0].hovertext or ()])
    return fig


def scores_summary(scores: np.ndarray, whole_scores: np.ndarray, top: int = 10) -> dict:
    """Proponents / opponents of a score vector and how many of the whole completion's ``top``
    proponents are among its ``top`` (what :func:`token_summary` says of one token)."""
    s, whole = np.asarray(scores, dtype=float), np.asarray(whole_scores, dtype=float)
    best = {int(i) for i in np.argsort(-s, kind="stable")[:top] if s[i] > 0}
    whole_top = {int(i) for i in np.argsort(-whole, kind="stable")[:top] if whole[i] > 0}
    return {"helps": int((s > 0).sum()), "hurts": int((s < 0).sum()),
            "shared_top": len(whole_top & best), "whole_top": len(whole_top)}


def token_matrix_figure(ids: Sequence[str], tokens: Sequence[str], tok: TokenRecovery,
                        whole_scores: np.ndarray, *, per_token: int = 3,
                        selected_token: Optional[int] = None, marked: Optional[set[int]] = None) -> go.Figure:
    """Which token each top example supports: a heatmap of scores, one row per example (the
    ``per_token`` strongest proponents of every token and of the whole completion), one column
    per completion token plus the whole completion. Green > 0 helps, red < 0 hurts; cell
    customdata = pool row (a click selects the example)."""
    T = tok.n_tokens
    if len(tokens) != T:
        raise ValueError(f"tokens ({len(tokens)}) must have one entry per recovered token ({T}).")
    whole = np.asarray(whole_scores, dtype=float)
    dense = tok.scores.toarray().astype(float)                                 # (T, n)
    pro_whole = np.argsort(-whole, kind="stable")[:per_token]
    rows = list(dict.fromkeys([int(i) for i in pro_whole if whole[i] > 0]
                              + [int(i) for t in range(T) for i in tok.top(t, per_token, 1)]))
    marked = marked or set()
    z = np.column_stack([dense[:, rows].T, whole[rows]]) if rows else np.zeros((0, T + 1))
    cols = [f"{t}: {plot_text(token_label(x))}" for t, x in enumerate(tokens)] + ["whole completion"]
    labels = [("★ " if i in marked else "") + plot_text(str(ids[i])) for i in rows]
    units = ["nats of this token's loss"] * T + ["nats of mean per-token loss"]
    hover = [[f"<b>{plot_text(ids[i])}</b> (pool row {i})<br>{cols[c]}<br>score {z[r, c]:+.4g} {units[c]}"
              for c in range(T + 1)] for r, i in enumerate(rows)]
    vmax = float(np.abs(z).max()) if z.size and np.abs(z).max() > 0 else 1.0
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(T + 1)), y=list(range(len(rows))), zmin=-vmax, zmax=vmax, zmid=0,
        colorscale=[[0, "#d73027"], [0.5, "#f7f7f7"], [1, "#1a9850"]],
        customdata=[[i] * (T + 1) for i in rows], hovertext=hover, hoverinfo="text",
        colorbar=dict(title=dict(text="score (nats)"))))
    fig.update_xaxes(tickmode="array", tickvals=list(range(T + 1)), ticktext=cols, side="top")
    fig.update_yaxes(tickmode="array", tickvals=list(range(len(rows))), ticktext=labels,
                     autorange="reversed", automargin=True)
    if selected_token is not None and 0 <= selected_token < T:
        fig.add_vrect(x0=selected_token - 0.5, x1=selected_token + 0.5, line=dict(color="#2b2b2b", width=2))
    if not rows:
        fig.add_annotation(text="No token has a proponent at its chosen λ.", showarrow=False,
                           xref="paper", yref="paper", x=0.5, y=0.5)
    fig.update_layout(title="Top proponents, token by token", height=max(300, 24 * len(rows) + 160),
                      margin=dict(l=10, r=10, t=110, b=20), clickmode="event+select")
    return fig


def source_rank(scores: np.ndarray, rows: Sequence[int]) -> Optional[int]:
    """Best rank (1 = highest score) among ``rows`` of the examples with a positive score, or
    None when none of them is a proponent. Ties count against them."""
    s = np.asarray(scores, dtype=float)
    pos = [int(r) for r in rows if s[int(r)] > 0]
    if not pos:
        return None
    return min(int((s >= s[r]).sum()) for r in pos)


def token_summary(tok: TokenRecovery, t: int, whole_scores: np.ndarray, top: int = 10) -> dict:
    """Numbers shown above a token's charts: proponents / opponents of token t at its chosen
    λ, λ/λ_max, and how many of the whole completion's ``top`` proponents are among the
    token's ``top``."""
    s = tok.token_scores(t)
    whole = np.asarray(whole_scores, dtype=float)
    whole_top = {int(i) for i in np.argsort(-whole, kind="stable")[:top] if whole[i] > 0}
    return {"helps": int((s > 0).sum()), "hurts": int((s < 0).sum()), "ratio": float(tok.chosen_ratio[t]),
            "shared_top": len(whole_top & set(tok.top(t, top, 1).tolist())), "whole_top": len(whole_top)}
