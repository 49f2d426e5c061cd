"""Figure builders on synthetic arrays with known content (no browser, no run directory)."""
from __future__ import annotations

import re

import numpy as np
import pytest

from stride_viz.app import plots


def _pool(n: int):
    return [f"d{i}" for i in range(n)], [f"text of document {i}" for i in range(n)]


def test_top_indices_ranks_each_sign_and_skips_zeros():
    s = np.array([0.0, 0.5, -0.2, 0.1, -0.9, 0.0, 0.3])
    pro, con = plots.top_indices(s, 2)
    assert pro.tolist() == [1, 6] and con.tolist() == [4, 2]
    pro, con = plots.top_indices(s, 10)
    assert pro.tolist() == [1, 6, 3] and con.tolist() == [4, 2]


def test_top_examples_bars_carry_sign_colour_rows_and_selection():
    ids, texts = _pool(8)
    s = np.array([0.0, 0.5, -0.2, 0.1, -0.9, 0.0, 0.3, 0.0])
    fig = plots.top_examples_figure(ids, s, texts, top=2, selected=6, marked={1})
    bar = fig.data[0]
    # opponents at the bottom (strongest last-but-first), proponents on top, strongest at the top
    assert list(bar.customdata) == [4, 2, 6, 1]
    assert list(bar.x) == [-0.9, -0.2, 0.3, 0.5]
    assert list(bar.marker.color) == [plots.OPPONENT, plots.OPPONENT, plots.PROPONENT, plots.PROPONENT]
    assert list(bar.marker.line.width) == [0, 0, 3, 0]           # the selected example is outlined
    labels = list(fig.layout.yaxis.ticktext)
    assert labels[3].startswith("★ d1") and labels[0].startswith("d4")
    assert "nats" in fig.layout.xaxis.title.text and "helps" in fig.layout.xaxis.title.text


def test_top_examples_all_zero_says_so_and_bad_lengths_are_refused():
    ids, texts = _pool(3)
    fig = plots.top_examples_figure(ids, np.zeros(3), texts)
    assert len(fig.data[0].x) == 0 and "No example" in fig.layout.annotations[0].text
    with pytest.raises(ValueError, match="same length"):
        plots.top_examples_figure(ids, np.zeros(4), texts)


def test_sparsity_path_draws_highlighted_lines_chosen_lambda_and_cv_curve():
    ids, _ = _pool(6)
    L = 12
    ratios = np.logspace(0, -3, L)
    w = np.array([0.4, 0.0, -0.2, 0.0, 0.05, 0.0])
    coefs = np.outer(np.clip(np.linspace(-0.2, 1, L), 0, None), w)      # zero at large λ
    nonzeros = (coefs != 0).sum(1)
    cv = np.linspace(1.0, 0.3, L)
    fig = plots.sparsity_path_figure(ratios, coefs, nonzeros, cv, np.full(L, 0.05), 7, ids,
                                     highlight=[0, 2], selected=4)
    by_row = {}
    for t in fig.data:
        if t.customdata is not None and len(t.customdata):
            by_row[int(t.customdata[0])] = t
    assert set(by_row) == {0, 2, 4}                   # the only examples ever non-zero
    np.testing.assert_allclose(by_row[2].y, coefs[:, 2])
    assert by_row[4].line.width == 4                  # the selected one is drawn thick
    assert fig.layout.xaxis.type == "log" and fig.layout.xaxis.autorange == "reversed"
    assert list(fig.layout.xaxis.ticktext) == ["1", "0.5", "0.2", "0.1", "0.05", "0.02", "0.01", "0.005",
                                               "0.002", "0.001"]
    cv_trace = next(t for t in fig.data if t.name and t.name.startswith("held-out"))
    np.testing.assert_allclose(cv_trace.y, cv)
    nz_trace = next(t for t in fig.data if t.name == "non-zero examples")
    assert list(nz_trace.y) == nonzeros.tolist()
    chosen = [s for s in fig.layout.shapes if s.type == "line"]
    assert len(chosen) == 2 and all(np.isclose(s.x0, ratios[7]) for s in chosen)
    with pytest.raises(ValueError, match="path length"):
        plots.sparsity_path_figure(ratios[:-1], coefs, nonzeros, cv, cv, 0, ids)
    # the counts (right axis) share the lower panel's x axis, and the top panel follows it
    assert nz_trace.yaxis == "y3" and fig.layout.yaxis3.overlaying == "y2" and fig.layout.xaxis.matches == "x2"


def test_sparsity_path_draws_the_other_examples_as_one_trace_that_still_names_each_point():
    ids, _ = _pool(8)
    L = 5
    ratios = np.logspace(0, -2, L)
    coefs = np.zeros((L, 8))
    coefs[2:, :] = np.arange(1, 9) * 0.01            # every example enters at the third λ
    fig = plots.sparsity_path_figure(ratios, coefs, (coefs != 0).sum(1), np.ones(L), np.zeros(L), 3, ids,
                                     highlight=[7], background=4)
    grey = [t for t in fig.data if t.name == "other examples"]
    assert len(grey) == 1                             # one trace, however many lines
    g = grey[0]
    x, y, rows = np.asarray(g.x, float), np.asarray(g.y, float), np.asarray(g.customdata)
    assert len(x) == 4 * (L + 1) and np.isnan(x[L::L + 1]).all()    # a gap after each line
    assert sorted(set(rows.tolist())) == [3, 4, 5, 6]  # the 4 largest after the highlighted one
    for i in (3, 6):                                   # each point carries its own example
        np.testing.assert_allclose(y[rows == i][:L], coefs[:, i])
        assert set(np.asarray(g.text)[rows == i]) == {ids[i]}


def test_responses_split_by_membership_and_sorted_with_operator_ids():
    rng = np.random.default_rng(0)
    y = rng.normal(0, 0.01, 40)
    member = np.zeros(40, bool)
    member[[3, 9, 20]] = True
    y[member] += 0.1                                   # the example's subsets lower the loss
    fig = plots.responses_figure(y, member=member, member_label="d7", selected_k=9)
    hists = [t for t in fig.data if t.type == "histogram"]
    assert sorted(len(h.x) for h in hists) == [3, 37]
    scatter = [t for t in fig.data if t.type == "scatter" and t.name and "subsets" in t.name]
    inside = next(t for t in scatter if "d7" in t.name)
    assert sorted(inside.customdata) == [3, 9, 20] and list(inside.x) == [0, 1, 2]   # ranked first
    note = fig.layout.annotations[-1].text
    assert "inside − outside" in note and float(note.split("=")[1].split()[0]) == pytest.approx(
        y[member].mean() - y[~member].mean(), abs=1e-3)
    marker = next(t for t in fig.data if t.name == "operator 9")
    assert list(marker.customdata) == [9] and marker.y[0] == pytest.approx(y[9])


def test_responses_without_selection_show_every_operator():
    y = np.array([0.3, -0.1, 0.2])
    fig = plots.responses_figure(y)
    sorted_trace = next(t for t in fig.data if t.type == "scatter")
    assert list(sorted_trace.customdata) == [0, 2, 1] and list(sorted_trace.y) == [0.3, 0.2, -0.1]
    assert "K = 3" in fig.layout.title.text
    with pytest.raises(ValueError, match="one entry per response"):
        plots.responses_figure(y, member=np.ones(2, bool))


def test_token_loss_html_escapes_and_shades_by_loss():
    out = plots.token_loss_html("<b>Q</b>: ", [" <script>", " ok"], [3.0, 0.0])
    assert "<script>" not in out and "&lt;script&gt;" in out and "&lt;b&gt;Q&lt;/b&gt;" in out
    assert out.count('title="') == 2 and 'title="3.000 nats"' in out
    alphas = [float(a) for a in re.findall(r"rgba\(215,48,39,([0-9.]+)\)", out)]
    assert alphas[0] > alphas[1]
    with pytest.raises(ValueError, match="same length"):
        plots.token_loss_html("p", ["a"], [1.0, 2.0])


HOSTILE = ['<a href="https://evil.example">x</a>', "[t](https://evil.example)", "![i](https://evil.example/i.png)",
           '=HYPERLINK("https://evil.example")', "<script>alert(1)</script>", "<b>bold</b><br>", "$x^2$", "%{x}"]


def _texts(fig) -> list[str]:
    """Every string of a figure that plotly.js draws as text (ticks, names, hovers, titles)."""
    out = []

    def walk(obj):
        if isinstance(obj, str):
            out.append(obj)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)
    walk(fig.to_plotly_json())
    return out


def _assert_inert(fig) -> None:
    for s in _texts(fig):
        if any(mark in s for mark in ("evil", "bold", "x^2", "alert")):     # holds hostile text
            assert not re.search(r"<(a|img|script)\b", s), s    # no tag plotly.js would draw live
            assert "<b>bold" not in s and "$x" not in s, s


def test_hostile_ids_and_texts_are_shown_as_text_in_every_chart():
    n = len(HOSTILE)
    ids, texts = HOSTILE, [h + " and more" for h in reversed(HOSTILE)]
    scores = np.linspace(-1, 1, n)
    top = plots.top_examples_figure(ids, scores, texts, top=n, marked={0})
    _assert_inert(top)
    assert any("&lt;a href=" in t for t in top.layout.yaxis.ticktext)         # shown, escaped
    assert any("&#36;x^2&#36;" in t for t in top.layout.yaxis.ticktext)        # plotly shows "$x^2$"
    assert any("&#37;{x}" in t for t in top.data[0].hovertext)                # not a template field
    L = 5
    coefs = np.outer(np.linspace(0, 1, L), scores)
    path = plots.sparsity_path_figure(np.logspace(0, -2, L), coefs, (coefs != 0).sum(1), np.ones(L),
                                      np.zeros(L), 2, ids, highlight=[0, 1], selected=2)
    _assert_inert(path)
    member = np.array([True, False, True, False])
    _assert_inert(plots.responses_figure(np.array([0.1, -0.2, 0.3, 0.0]), member=member,
                                         member_label=HOSTILE[0]))


def test_plot_text_leaves_plain_text_alone_and_config_offers_no_upload():
    assert plots.plot_text("fortune-00012: it's \"fine\"") == "fortune-00012: it's \"fine\""
    assert plots.plot_text("a < b & c") == "a &lt; b &amp; c"
    cfg = plots.PLOTLY_CONFIG
    assert cfg["displaylogo"] is False and cfg["showSendToCloud"] is False and cfg["typesetMath"] is False
    assert "sendDataToCloud" in cfg["modeBarButtonsToRemove"]


def test_eval_plots_escape_method_and_query_names():
    from stride_viz.app import eval_plots
    fig = eval_plots.lds_distribution({HOSTILE[0]: [0.1, 0.2], "stride": [0.3]})
    _assert_inert(fig)
    _assert_inert(eval_plots.prediction_scatter(np.arange(3.0), np.arange(3.0), method=HOSTILE[1], query=HOSTILE[4]))
