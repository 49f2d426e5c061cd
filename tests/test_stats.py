"""stride_viz.evaluation.stats against known cases: Spearman, bootstrap intervals, Wilcoxon."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import norm, spearmanr

from stride_viz.evaluation import metrics as ev
from stride_viz.evaluation import stats


def test_spearman_rows_matches_scipy_with_ties_and_constant_rows():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4, size=(5, 12)).astype(float)   # many ties
    b = rng.normal(size=(5, 12))
    got = stats.spearman_rows(a, b)
    want = [spearmanr(a[q], b[q]).statistic for q in range(5)]
    np.testing.assert_allclose(got, want, atol=1e-12)
    a[2] = 1.0                                            # constant: no rank order -> 0
    assert stats.spearman_rows(a, b)[2] == 0.0
    with pytest.raises(ValueError, match="one shape"):
        stats.spearman_rows(a, b[:, :3])


def test_resampled_spearman_equals_the_resample_written_out():
    rng = np.random.default_rng(7)
    a = rng.integers(0, 5, size=(4, 10)).astype(float)    # ties in the data
    b = rng.normal(size=(4, 10))
    a[3] = 2.0                                             # a constant row
    cols = rng.integers(0, 10, size=(30, 10))              # resamples with repeated columns
    w = np.zeros((30, 10))
    np.add.at(w, (np.arange(30)[:, None], cols), 1.0)
    got = stats.resampled_spearman(a, b, w)
    want = np.stack([stats.spearman_rows(a[:, c], b[:, c]) for c in cols], axis=1)
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert (got[3] == 0).all()
    np.testing.assert_allclose(stats.resampled_spearman(a, b, np.ones((1, 10)))[:, 0],
                               stats.spearman_rows(a, b), atol=1e-12)
    with pytest.raises(ValueError, match="w \\(B, m\\)"):
        stats.resampled_spearman(a, b, w[:, :3])


def test_bootstrap_queries_constant_values_and_the_normal_width():
    c = stats.bootstrap_queries([0.25] * 9, n_boot=200)
    assert c == {"mean": 0.25, "low": 0.25, "high": 0.25}
    v = np.random.default_rng(1).normal(0.3, 1.0, size=400)
    r = stats.bootstrap_queries(v, n_boot=4000, seed=3)
    assert r["mean"] == pytest.approx(v.mean())
    # the percentile interval of a mean of 400 draws is close to mean +- 1.96 sd / sqrt(n)
    half = 1.96 * v.std() / math.sqrt(v.size)
    assert (r["high"] - r["low"]) / 2 == pytest.approx(half, rel=0.1)
    assert r["low"] < r["mean"] < r["high"]
    assert stats.bootstrap_queries(v, n_boot=300, seed=3) == stats.bootstrap_queries(v, n_boot=300, seed=3)
    with pytest.raises(ValueError, match="n_boot"):
        stats.bootstrap_queries(v, n_boot=0)
    with pytest.raises(ValueError, match="level"):
        stats.percentile_interval(v, level=1.5)


def test_bootstrap_subsets_known_cases_and_agreement_with_lds():
    rng = np.random.default_rng(2)
    n_q, n_pool, m = 6, 30, 20
    member = rng.random((m, n_pool)) < 0.3
    loss = rng.normal(size=(m, n_q))
    s_a, s_b = rng.normal(size=(n_q, n_pool)), rng.normal(size=(n_q, n_pool))
    pred_a, pred_b = s_a @ member.T, s_b @ member.T
    target = -loss.T
    # the point estimate is the difference of the LDS of metrics.lds
    want = (ev.lds(s_a, member, loss).per_query - ev.lds(s_b, member, loss).per_query).mean()
    r = stats.bootstrap_subsets(pred_a, target, pred_b, n_boot=300)
    assert r["mean"] == pytest.approx(want)
    assert r["low"] <= r["high"]
    # a method against itself: exactly 0 on every resample
    same = stats.bootstrap_subsets(pred_a, target, pred_a, n_boot=100)
    assert same == {"mean": 0.0, "low": 0.0, "high": 0.0}
    # a perfect predictor alone: rho 1 on every resample (duplicated subsets tie on both sides)
    perfect = stats.bootstrap_subsets(target * 3 + 1, target, None, n_boot=100)
    assert perfect["mean"] == pytest.approx(1.0) and perfect["low"] == pytest.approx(1.0)
    # the interval over subsets narrows when there are more retrained subsets to resample
    big_t = rng.normal(size=(n_q, 400))
    noisy = big_t + 2 * rng.normal(size=big_t.shape)
    wide = stats.bootstrap_subsets(noisy[:, :25], big_t[:, :25], n_boot=400)
    narrow = stats.bootstrap_subsets(noisy, big_t, n_boot=400)
    assert narrow["high"] - narrow["low"] < 0.6 * (wide["high"] - wide["low"])
    with pytest.raises(ValueError, match="pred_b"):
        stats.bootstrap_subsets(pred_a, target, pred_b[:, :3])


def test_wilcoxon_exact_and_normal_cases():
    # n = 5, all positive: the exact two-sided p is 2 / 2^5
    assert stats.wilcoxon_p([1, 2, 3, 4, 5]) == pytest.approx(0.0625)
    assert stats.wilcoxon_p([-1, -2, -3, -4, -5]) == pytest.approx(0.0625)
    assert stats.wilcoxon_p([0, 0, 1, 2, 3, 4, 5]) == pytest.approx(0.0625)  # zeros dropped
    assert stats.wilcoxon_p([0.0, 0.0]) == 1.0
    assert math.isnan(stats.wilcoxon_p([]))
    # n = 60 (normal approximation): T = the smaller signed-rank sum, z = (T - n(n+1)/4) / sd
    d = np.arange(1, 61) * np.where(np.arange(60) % 3 == 0, -1, 1)
    ranks = np.arange(1, 61)
    t = min(ranks[d > 0].sum(), ranks[d < 0].sum())
    z = (t - 60 * 61 / 4) / math.sqrt(60 * 61 * 121 / 24)
    assert stats.wilcoxon_p(d) == pytest.approx(2 * norm.sf(abs(z)), rel=1e-9)


def test_paired_comparison_counts_groups_and_validates():
    rng = np.random.default_rng(4)
    target = rng.normal(size=(8, 15))
    good = target + 0.3 * rng.normal(size=target.shape)
    bad = rng.normal(size=target.shape)
    facts = np.arange(8) < 3
    r = stats.paired_comparison(good, bad, target, {"facts": facts, "heldout": ~facts,
                                                    "all": np.ones(8, bool), "none": np.zeros(8, bool)},
                                n_boot=200)
    d = stats.spearman_rows(good, target) - stats.spearman_rows(bad, target)
    assert r["mean_difference"] == pytest.approx(d.mean())
    assert (r["a_better"], r["b_better"], r["n_queries"]) == (int((d > 0).sum()), int((d < 0).sum()), 8)
    assert r["wilcoxon_p"] == pytest.approx(stats.wilcoxon_p(d))
    assert r["ci_queries"][0] <= r["mean_difference"] <= r["ci_queries"][1]
    assert r["groups"]["facts"]["mean_difference"] == pytest.approx(d[facts].mean())
    assert r["groups"]["facts"]["n_queries"] == 3
    assert r["groups"]["all"]["ci_subsets"] == r["ci_subsets"]
    assert "none" not in r["groups"]
    with pytest.raises(ValueError, match="Group 'x'"):
        stats.paired_comparison(good, bad, target, {"x": np.ones(3, bool)}, n_boot=10)


def test_mean_summary_has_both_intervals():
    rng = np.random.default_rng(5)
    target = rng.normal(size=(10, 12))
    pred = target + rng.normal(size=target.shape)
    rho = stats.spearman_rows(pred, target)
    s = stats.mean_summary(rho, pred, target, n_boot=200)
    assert s["mean"] == pytest.approx(rho.mean()) and s["n_queries"] == 10
    for key in ("ci_queries", "ci_subsets"):
        assert s[key][0] <= s["mean"] <= s[key][1]


def test_development_mask_reads_the_recorded_split():
    ids = [f"q{i}" for i in range(20)]
    meta = {"queries": [{"id": q} for q in ids]}
    np.testing.assert_array_equal(stats.development_mask(meta), ev.query_split(ids))
    recorded = {**meta, "split": stats.split_metadata(ids)}
    np.testing.assert_array_equal(stats.development_mask(recorded), ev.query_split(ids))
    # the recorded split wins over the rule (it is what the ground truth fixed)
    flipped = {**meta, "split": {"development": ids[:5], "test": ids[5:]}}
    assert stats.development_mask(flipped).tolist() == [True] * 5 + [False] * 15
    with pytest.raises(ev.GroundTruthError, match="q5"):
        stats.development_mask({**meta, "split": {"development": ids[:5], "test": ids[8:]}})


# ------------------------------------------------------------------ the committed report

from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _report() -> dict:
    import json

    return json.loads((RESULTS / "lds.json").read_text())


def test_committed_statistics_recompute_from_the_committed_files():
    """Every statistic of benchmarks/results/lds.json (test queries) from the committed ground
    truth and the committed 16-bit scores alone."""
    report = _report()
    doc = report["statistics"]
    assert doc["split"] == "test"
    gt = ev.read_ground_truth(ROOT / report["ground_truth"])
    ids = [q["id"] for q in gt.metadata["queries"]]
    test = ~stats.development_mask(gt.metadata)
    assert "split" in gt.metadata  # fixed in the committed metadata
    np.testing.assert_array_equal(~test, ev.query_split(ids))
    group = np.array(report["setting"]["query_group"])[test]
    target = -gt.test_loss.T[test]
    member = gt.membership().T.astype(float)
    with_stats = {m: r for m, r in report["methods"].items() if r["status"] == "ok" and "test" in r}
    assert {"stride", "ekfac", "tfidf"} <= set(with_stats)
    pred = {m: ev.load_scores(ROOT / r["scores_file"], len(ids), ids).astype(float)[test] @ member
            for m, r in with_stats.items()}
    for m, r in with_stats.items():
        rho = stats.spearman_rows(pred[m], target)
        s = stats.mean_summary(rho, pred[m], target, doc["n_boot"], doc["seed"])
        for key in ("mean", "ci_queries", "ci_subsets"):
            assert s[key] == pytest.approx(r["test"][key], abs=1e-9), (m, key)
        if m == "stride":
            continue
        groups = {g: group == g for g in ("heldout", "facts")}
        v = stats.paired_comparison(pred[m], pred["stride"], target, groups, doc["n_boot"], doc["seed"])
        for key in ("mean_difference", "ci_queries", "ci_subsets", "wilcoxon_p", "a_better"):
            assert v[key] == pytest.approx(r["vs_stride"][key], abs=1e-9), (m, key)
            for g in groups:
                assert v["groups"][g][key] == pytest.approx(r["vs_stride"]["groups"][g][key], abs=1e-9)


def test_evaluate_page_shows_the_committed_statistics(tmp_path, monkeypatch):
    from dashboard_run import fresh_clone, open_page

    report = _report()
    clone = fresh_clone(tmp_path)       # what a fresh clone holds: pages + committed results
    monkeypatch.setenv("STRIDE_VIZ_HOME", str(tmp_path / "home"))
    at = open_page("pages/4_Evaluate.py", root=clone)
    frames = [f.value for f in at.dataframe if "Wilcoxon p" in f.value.columns]
    # the committed defaults' statistics, then (if the report has them) the tuned choices', then
    # the second corpus's (benchmarks/results/lds_wordnet.json)
    # (and, when committed, the same corpus with the demo's tuned choices, lds_wordnet_choices.json)
    seconds = [json.loads((RESULTS / n).read_text()) for n in ("lds_wordnet.json", "lds_wordnet_choices.json")
               if (RESULTS / n).exists()]
    assert len(frames) == 1 + bool((report.get("tuning") or {}).get("test")) + len(seconds)
    for second, frame in zip(seconds, frames[-len(seconds):]):
        shown = frame.set_index("method")
        for m, r in second["methods"].items():
            assert shown.loc[m, "LDS (test)"] == pytest.approx(r["test"]["mean"])
            if m != "stride":
                assert shown.loc[m, "minus STRIDE"] == pytest.approx(r["vs_stride"]["mean_difference"])
        assert any(second["command"] in md.value for md in at.markdown)
    assert any("WordNet" in s.value for s in at.subheader)
    table = frames[0].set_index("method")
    for m, r in report["methods"].items():
        if r["status"] != "ok" or "test" not in r or m.startswith("stride:"):
            continue
        assert table.loc[m, "LDS (test)"] == pytest.approx(r["test"]["mean"])
        if m == "stride":
            assert table.loc[m, "minus STRIDE"] == 0.0
            continue
        v = r["vs_stride"]
        assert table.loc[m, "minus STRIDE"] == pytest.approx(v["mean_difference"])
        assert table.loc[m, "Δ 95% CI, subsets"] == f"[{v['ci_subsets'][0]:+.3f}, {v['ci_subsets'][1]:+.3f}]"
        assert table.loc[m, "Wilcoxon p"] == pytest.approx(v["wilcoxon_p"])
        assert table.loc[m, "minus STRIDE, planted facts"] == pytest.approx(v["groups"]["facts"]["mean_difference"])
    assert any("test queries" in s.value for s in at.subheader if "sure" in s.value)
    n_test = report["setting"]["split"]["n_test"]
    assert any(f"**{n_test} test queries**" in md.value for md in at.markdown)
    # the split radio changes the charts above, not these test-split statistics
    at.radio(key="eval_split").set_value("development").run()
    assert not at.exception
    again = [f.value for f in at.dataframe if "Wilcoxon p" in f.value.columns][0].set_index("method")
    assert again.loc["stride", "LDS (test)"] == table.loc["stride", "LDS (test)"]


def test_stats_frame_and_difference_figure_from_report_entries():
    from stride_viz.app import eval_plots

    def entry(mean, diff=None):
        e = {"status": "ok", "test": {"mean": mean, "n_queries": 9, "ci_queries": [mean - 0.1, mean + 0.1],
                                      "ci_subsets": [mean - 0.05, mean + 0.05], "groups": {"facts": mean}}}
        if diff is not None:
            one = {"mean_difference": diff, "ci_queries": [diff - 0.2, diff + 0.1],
                   "ci_subsets": [diff - 0.1, diff + 0.05], "wilcoxon_p": 0.01, "n_queries": 9,
                   "a_better": 2, "b_better": 7}
            e["vs_stride"] = {**one, "groups": {"facts": one}}
        return e

    methods = {"stride": entry(0.5), "<b>peer</b>": entry(0.3, -0.2), "gone": {"status": "failed"}}
    df = eval_plots.stats_frame(methods).set_index("method")
    assert list(df.index) == ["stride", "<b>peer</b>"]
    assert df.loc["<b>peer</b>", "Δ 95% CI, queries"] == "[-0.400, -0.100]"
    assert df.loc["<b>peer</b>", "better / worse than STRIDE (queries)"] == "2 / 7"
    assert df.loc["<b>peer</b>", "minus STRIDE, planted facts"] == -0.2
    assert df.loc["stride", "minus STRIDE"] == 0.0
    fig = eval_plots.difference_figure(methods)
    assert len(fig.data) == 2  # interval over queries, interval over subsets
    q = fig.data[0]
    assert list(q.x) == [-0.2] and list(q.error_x.arrayminus) == pytest.approx([0.2])
    assert "<b>" not in "".join(fig.layout.yaxis.ticktext)  # user text is escaped


def test_noise_ceiling_known_cases_and_validation():
    rng = np.random.default_rng(0)
    signal = rng.normal(size=(40, 3))                       # (subsets, queries)
    # the same losses under both seeds: a perfect ceiling
    np.testing.assert_allclose(stats.noise_ceiling([signal, signal.copy()]), 1.0)
    # seeds that share nothing: about 0; a monotone transform keeps the ranks (Spearman)
    np.testing.assert_allclose(stats.noise_ceiling([signal, np.exp(signal)]), 1.0)
    a, b = rng.normal(size=(400, 200)), rng.normal(size=(400, 200))
    assert abs(stats.noise_ceiling([a, b]).mean()) < 0.02
    # three seeds: the mean of the three pairwise rho
    c = signal + rng.normal(size=signal.shape)
    pairs = [stats.spearman_rows(x.T, y.T) for x, y in ((signal, c), (signal, -c), (c, -c))]
    np.testing.assert_allclose(stats.noise_ceiling([signal, c, -c]), np.mean(pairs, axis=0))
    for bad in ([signal], [signal, signal[:5]], [signal[:2], signal[:2]]):
        with pytest.raises(ValueError, match="noise_ceiling"):
            stats.noise_ceiling(bad)


def test_committed_noise_ceiling_and_twin_recompute_from_the_committed_files():
    """lds.json's noise ceiling from the committed ground truth (its noise/ retrains) and the
    random-weight twin's LDS from the committed twin scores."""
    from stride_viz.evaluation.retrain import read_noise

    report = _report()
    gt = ev.read_ground_truth(ROOT / report["ground_truth"])
    ids = [q["id"] for q in gt.metadata["queries"]]
    test = ~stats.development_mask(gt.metadata)
    nc = report.get("noise_ceiling")
    assert nc, "lds.json must report the noise ceiling"
    noise = read_noise(ROOT / report["ground_truth"])
    row = {int(j): r for r, j in enumerate(gt.subset_index)}
    losses = [gt.test_loss[[row[j] for j in nc["subsets"]]]]
    for seed in nc["seeds"][1:]:
        js, l = noise[seed]
        at = {int(j): r for r, j in enumerate(js)}
        losses.append(l[[at[j] for j in nc["subsets"]]])
    ceiling = stats.noise_ceiling(losses)
    np.testing.assert_allclose(ceiling, nc["per_query"], atol=1e-6)
    assert ceiling[test].mean() == pytest.approx(nc["lds_mean_test"], abs=1e-9)
    twin = report.get("twin")
    assert twin and twin["methods"]["stride"]["status"] == "ok"
    for m, r in twin["methods"].items():
        if r["status"] != "ok":
            continue
        path = ROOT / r["scores_file"]
        assert path.is_relative_to(RESULTS) and path.suffix == ".npz", m
        res = ev.lds(ev.load_scores(path, len(ids), ids), gt.train_subsets, gt.test_loss)
        np.testing.assert_allclose(res.per_query, r["lds_per_query"], atol=1e-6, err_msg=m)
        assert res.per_query[test].mean() == pytest.approx(r["lds_mean_test"], abs=1e-9)
        trained = report["methods"][m]
        assert r["trained_lds_mean_test"] == pytest.approx(trained["lds_mean_test"], abs=1e-12)
    t = twin["target"]
    assert t["met"] == (t["stride_twin"] <= 0.5 * t["stride_trained"])
    # every tuned method's choice (other than its default) ran on the twin as well, and the
    # target is checked on STRIDE's choice too
    chosen = {b: c["chosen"] for b, c in report["tuning"]["methods"].items() if c["chosen"] != b}
    assert chosen and twin["choices"]["chosen"] == chosen and not twin["choices"]["missing"]
    for b, m in chosen.items():
        r = twin["methods"][m]
        assert r["status"] == "ok" and r["choice_of"] == b
        assert r["twin_over_trained"] == pytest.approx(r["lds_mean_test"] / r["trained_lds_mean_test"])
        assert report["methods"][m]["twin"]["lds_mean_test"] == r["lds_mean_test"]
    c = t["choice"]
    assert c["stride_method"] == chosen["stride"]
    assert c["stride_twin"] == twin["methods"][chosen["stride"]]["lds_mean_test"]
    assert c["met"] == (c["stride_twin"] <= 0.5 * c["stride_trained"])


def test_twin_frame_lists_trained_twin_and_ceiling_share():
    from stride_viz.app.eval_plots import twin_frame

    twin = {"stride": {"status": "ok", "trained_lds_mean_test": 0.5, "lds_mean_test": 0.1,
                       "ci_queries": [0.05, 0.15], "twin_over_trained": 0.2,
                       "groups": {"heldout": 0.05, "facts": 0.2}},
            "tfidf": {"status": "ok", "trained_lds_mean_test": 0.3, "lds_mean_test": 0.3,
                      "ci_queries": [0.2, 0.4], "twin_over_trained": 1.0, "groups": {"heldout": 0.3}},
            "trak": {"status": "failed", "error": "x"},
            "stride:e6": {"status": "ok", "trained_lds_mean_test": 0.4, "lds_mean_test": 0.3, "choice_of": "stride",
                          "ci_queries": [0.2, 0.4], "twin_over_trained": 0.75, "groups": {}}}
    ceiling = {"methods_same_subsets": {"stride": {"lds_mean_test": 0.45, "fraction_of_ceiling": 0.6}}}
    df = twin_frame(twin, ceiling)
    assert list(df["method"]) == ["stride", "stride:e6", "tfidf"]  # best trained first, failures left out
    assert list(df["settings"]) == ["committed default", "tuned choice of stride (development queries)",
                                    "committed default"]
    assert df.loc[0, "twin / trained"] == 0.2 and df.loc[0, "twin 95% CI, queries"] == "[+0.050, +0.150]"
    assert df.loc[0, "share of the noise ceiling"] == 0.6 and np.isnan(df.loc[2, "share of the noise ceiling"])
    assert df.loc[0, "twin, planted facts"] == 0.2 and np.isnan(df.loc[2, "twin, planted facts"])


def test_committed_tuning_is_chosen_on_development_and_recomputes_on_test():
    """lds.json's ``tuning`` (issue 10, items 2-3) from the committed files alone: every
    setting's development LDS, the choice (the best of them on the development queries), and
    the chosen settings' test statistics against STRIDE's choice."""
    report = _report()
    tuning, doc = report["tuning"], report["statistics"]
    gt = ev.read_ground_truth(ROOT / report["ground_truth"])
    ids = [q["id"] for q in gt.metadata["queries"]]
    dev = stats.development_mask(gt.metadata)
    test = ~dev
    assert tuning["budget"]["equal"] and {"stride", "ekfac", "trak", "logra"} <= set(tuning["methods"])
    assert len(set(tuning["budget"]["settings_per_method"].values())) == 1
    member = gt.membership().T.astype(float)
    target = -gt.test_loss.T[test]
    pred = {}
    for base, t in tuning["methods"].items():
        dev_lds = {}
        for e in t["settings"]:
            assert e["status"] == "ok", (base, e["name"])
            r = report["methods"][e["method"]]
            s = ev.load_scores(ROOT / r["scores_file"], len(ids), ids)
            per = ev.lds(s, gt.train_subsets, gt.test_loss).per_query
            assert per[dev].mean() == pytest.approx(e["lds_mean_dev"], abs=1e-9), e["method"]
            dev_lds[e["method"]] = per[dev].mean()
            if e["method"] == t["chosen"]:
                pred[base] = s.astype(float)[test] @ member
        assert t["chosen"] == max(dev_lds, key=dev_lds.get)
    group = np.array(report["setting"]["query_group"])[test]
    groups = {g: group == g for g in ("heldout", "facts")}
    for base, r in tuning["test"].items():
        rho = stats.spearman_rows(pred[base], target)
        s = stats.mean_summary(rho, pred[base], target, doc["n_boot"], doc["seed"])
        assert s["mean"] == pytest.approx(r["lds_mean_test"], abs=1e-9)
        for key in ("mean", "ci_queries", "ci_subsets"):
            assert s[key] == pytest.approx(r["test"][key], abs=1e-9), (base, key)
        if base != "stride":
            v = stats.paired_comparison(pred[base], pred["stride"], target, groups, doc["n_boot"], doc["seed"])
            for key in ("mean_difference", "ci_queries", "ci_subsets", "wilcoxon_p"):
                assert v[key] == pytest.approx(r["vs_stride"][key], abs=1e-9), (base, key)
    tgt = tuning["target"]
    best = max((b for b in tuning["test"] if b != "stride"), key=lambda b: tuning["test"][b]["lds_mean_test"])
    assert tgt["best_peer"] == best and tgt["met"] == (tgt["stride_lds"] >= tgt["best_peer_lds"])
