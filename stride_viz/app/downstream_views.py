"""Pure views of the downstream results (no Streamlit): the verification's summary text and
figure, and the selection's table. Only numbers and fixed words go into Markdown here; user
text (ids, pool texts) goes into table cells and Plotly hovers as data, escaped by the caller
or by Plotly's text rendering of customdata-free labels."""
from __future__ import annotations

import html
from typing import Optional

import numpy as np
import pandas as pd
import plotly.graph_objects as go

__all__ = ["verify_summary", "verify_figure", "selection_table", "verdict", "targets_from_upload"]


def verdict(result: dict) -> str:
    """One of 'confirmed', 'not confirmed', 'opposite' for a verification result: the top-k
    change against the random draws and the seed noise (both taken as the noise floor)."""
    top = result["top"]["change"]
    floor = [abs(x) for x in result["random"]["changes"]] + [abs(x) for x in result["seed_noise"]["changes"]]
    bound = max(floor) if floor else 0.0
    if top > bound:
        return "confirmed"
    if top < -bound:
        return "opposite"
    return "not confirmed"


def verify_summary(result: dict) -> str:
    """Markdown: what was retrained and what the query's loss did (numbers only)."""
    k, top, rnd, noise = result["k"], result["top"], result["random"], result["seed_noise"]
    std = f" ± {rnd['std']:.4f} (standard deviation)" if rnd.get("std") is not None else ""
    noise_txt = (f" Retraining on the full pool with another seed alone moved it by "
                 f"{', '.join(f'{x:+.4f}' for x in noise['changes'])} nats." if noise["changes"] else "")
    repro = ("reproduces the model's weights exactly" if result.get("baseline_reproduces_model")
             else "does **not** reproduce the model's weights (other hardware or library versions): "
                  "the changes below are still measured against this retrained baseline")
    word = {"confirmed": "**Confirmed:** removing the top examples raised the loss more than any random removal "
                         "or reseeding did.",
            "opposite": "**Opposite:** removing the top examples lowered the loss beyond the noise.",
            "not confirmed": "**Not confirmed:** the change is within what random removals and reseeding do."}
    return (f"Change of the query's loss (nats per completion token) when the model is retrained from its "
            f"recipe **without** the examples; **> 0: removing them made the completion less likely, i.e. "
            f"they helped.** The baseline, retrained on the full pool with the same recipe and seed (loss "
            f"{result['loss_full']:.4f} nats; the model itself: {result['loss_model']:.4f}), {repro}.\n\n"
            f"- without the top {k} proponents: **{top['change']:+.4f} nats** (STRIDE's prediction, the sum of "
            f"their scores: {top['predicted_change']:+.4f}; {top['n_positive_scores']} of them have a score > 0)\n"
            f"- without {k} random examples ({len(rnd['changes'])} draws): mean **{rnd['mean']:+.4f} nats**{std}; "
            f"each: {', '.join(f'{x:+.4f}' for x in rnd['changes'])}\n\n"
            f"{noise_txt}\n\n{word[verdict(result)]}")


def verify_figure(result: dict) -> go.Figure:
    """Dots: the loss change (nats) of each retraining, top-k removal vs random removals vs
    reseeding on the full pool; the zero line is the baseline."""
    groups = [(f"without top {result['k']}", [result["top"]["change"]], "#2ca02c"),
              (f"without {result['k']} random", result["random"]["changes"], "#7f7f7f"),
              ("full pool, other seed", result["seed_noise"]["changes"], "#1f77b4")]
    fig = go.Figure()
    for name, values, colour in groups:
        if not values:
            continue
        fig.add_trace(go.Scatter(x=[name] * len(values), y=values, mode="markers", name=name,
                                 marker=dict(size=12, color=colour),
                                 hovertemplate="%{y:+.4f} nats<extra>" + html.escape(name) + "</extra>"))
    fig.add_hline(y=0, line_dash="dash", line_color="#999",
                  annotation_text="baseline: full pool, same seed", annotation_position="top left")
    fig.update_layout(height=320, showlegend=False, margin=dict(l=10, r=10, t=30, b=10),
                      yaxis_title="change of the query's loss (nats; > 0: they helped)")
    return fig


def selection_table(rows: list[dict], limit: Optional[int] = None) -> pd.DataFrame:
    """The selected rows as a table: rank, id, score (nats, > 0 helps), back-projection, text."""
    rows = rows[:limit] if limit else rows
    return pd.DataFrame({"rank": [int(r["rank"]) for r in rows], "id": [str(r["id"]) for r in rows],
                         "score_nats": np.array([float(r["score"]) for r in rows]),
                         "backprojection_nats": np.array([float(r.get("backprojection", np.nan)) for r in rows]),
                         "text": [str(r.get("prompt", "")) + str(r.get("completion", "")) for r in rows]})


def targets_from_upload(name: str, data: bytes) -> list[dict]:
    """Target examples of an uploaded file (JSONL, CSV or TXT in the pool formats) as job
    parameters; errors name the file as the user did (SelectionError, one line)."""
    import tempfile
    from pathlib import Path

    from stride_viz.downstream.select import SelectionError, load_targets
    base = Path(str(name).replace("\\", "/")).name or "targets.jsonl"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / base
        path.write_bytes(data)
        try:
            targets = load_targets(path)
        except SelectionError as e:
            raise SelectionError(str(e).replace(str(path), base)) from None
    return [{"id": q.id, "prompt": q.prompt, "completion": q.completion} for q in targets]
