"""benchmarks/counterfactual.py without retraining: which scores a method name means, the work
order, the log, and the statistics of the removal rows."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stride_viz.evaluation import stats

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "counterfactual.py"

REPORT = {
    "methods": {
        "stride": {"status": "ok", "scores_file": "s/stride.npz"},
        "stride:e6": {"status": "ok", "scores_file": "s/stride-e6.npz"},
        "ekfac": {"status": "ok", "scores_file": "s/ekfac.npz"},
        "ekfac:d1e-6": {"status": "ok", "scores_file": "s/ekfac-d1e-6.npz"},
        "tfidf": {"status": "ok", "scores_file": "s/tfidf.npz"},
        "tracin": {"status": "failed", "scores_file": None},
    },
    "tuning": {"methods": {
        "stride": {"chosen": "stride:e6", "settings": [
            {"name": "default", "method": "stride", "changes": {}},
            {"name": "e6", "method": "stride:e6", "changes": {"fit": {"epochs": 6.0}}}]},
        "ekfac": {"chosen": "ekfac:d1e-6", "settings": [
            {"name": "d1e-6", "method": "ekfac:d1e-6", "changes": {"damping_factor": 1e-06}}]},
        "trak": {"chosen": None, "settings": []},
    }},
}


@pytest.fixture(scope="module")
def cf():
    spec = importlib.util.spec_from_file_location("counterfactual_benchmark", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_a_plain_name_is_the_tuning_choice_and_a_setting_name_is_that_setting(cf):
    s = cf.resolve_method("stride", REPORT)
    assert (s["method"], s["scores_file"], s["changes"]) == ("stride:e6", "s/stride-e6.npz", {"fit": {"epochs": 6.0}})
    assert "tuning" in s["chosen_by"]
    assert cf.resolve_method("ekfac", REPORT)["method"] == "ekfac:d1e-6"
    assert cf.resolve_method("stride:e6", REPORT)["scores_file"] == "s/stride-e6.npz"
    d = cf.resolve_method("stride:default", REPORT)
    assert (d["method"], d["scores_file"], d["changes"]) == ("stride", "s/stride.npz", {})
    t = cf.resolve_method("tfidf", REPORT)          # not tuned: its committed defaults
    assert (t["method"], t["family"], t["scores_file"]) == ("tfidf", "tfidf", "s/tfidf.npz")
    r = cf.resolve_method("random", REPORT)
    assert r["method"] == "random" and r["scores_file"] is None


@pytest.mark.parametrize("name, says", [("stride:zz", "No committed scores for method 'stride:zz'"),
                                        ("tracin", "No committed scores for method 'tracin'"),
                                        ("trak", "records no choice")])
def test_a_name_without_scores_is_refused_in_one_line(cf, name, says):
    with pytest.raises(cf.MethodError, match=says) as e:
        cf.resolve_method(name, REPORT)
    assert "\n" not in str(e.value)


def test_the_committed_report_resolves_to_its_choices_and_their_files(cf):
    report = json.loads((ROOT / "benchmarks" / "results" / "lds.json").read_text())
    for family in report["tuning"]["methods"]:
        s = cf.resolve_method(family, report)
        assert s["method"] == report["tuning"]["methods"][family]["chosen"]
        assert (ROOT / s["scores_file"]).exists()


def test_removed_takes_the_top_k_or_a_seeded_random_draw(cf):
    scores = {"m": np.array([[0.1, 0.9, 0.5, 0.9, -1.0]])}
    assert cf.removed({"method": "m"}, scores, 0, 3, 5).tolist() == [1, 3, 2]   # ties by index
    a = cf.removed({"method": "random"}, {}, 0, 3, 50)
    assert a.tolist() == cf.removed({"method": "random"}, {}, 0, 3, 50).tolist()
    assert len(set(a.tolist())) == 3
    assert a.tolist() != cf.removed({"method": "random"}, {}, 1, 3, 50).tolist()


def test_the_work_order_finishes_every_query_with_every_method_before_the_next_k(cf):
    order = cf.work_order([5, 2, 9], ["a", "b", "c"], [50, 10])
    assert [k for k, _q, _m in order] == [10] * 9 + [50] * 9
    for stop in range(0, len(order) + 1, 3):      # stopped after any whole query: paired
        seen: dict = {}
        for k, q, m in order[:stop]:
            seen.setdefault((k, q), set()).add(m)
        assert all(v == {"a", "b", "c"} for v in seen.values())


def test_the_log_skips_a_torn_last_line_and_appending_cuts_it(cf, tmp_path):
    log = tmp_path / "cf.jsonl"
    cf.append_row(log, {"query": "q0", "rise": 1.0})
    with open(log, "a") as f:
        f.write('{"query": "q1", "ri')                 # killed mid-write
    assert [r["query"] for r in cf.read_log(log)] == ["q0"]
    cf.append_row(log, {"query": "q2", "rise": 2.0})
    assert [r["query"] for r in cf.read_log(log)] == ["q0", "q2"]


def _rows(rises: dict, k: int = 10) -> list[dict]:
    return [{"kind": "removal", "query": q, "method": m, "family": m.split(":")[0], "k": k, "rise": v,
             "scores_file": None, "changes": None, "seconds": 40.0}
            for m, per in rises.items() for q, v in per.items()]


QUERIES = ["fact-00", "heldout-a", "fact-01", "heldout-b", "fact-02", "heldout-c"]


def test_summary_pairs_stride_with_each_peer_and_checks_the_target(cf):
    rng = np.random.default_rng(0)
    peer = {q: float(v) for q, v in zip(QUERIES, rng.normal(size=6))}
    rises = {"stride:e6": {q: v + 1.0 for q, v in peer.items()},          # always 1 nat above
             "ekfac:d1e-6": peer,
             "tfidf": {q: v - 2.0 for q, v in peer.items()},
             "stride": {q: 9.0 for q in QUERIES},                        # another STRIDE setting: no peer
             "random": {q: 0.1 * i for i, q in enumerate(QUERIES)}}
    out = cf.summarize(_rows(rises), "stride:e6", n_boot=200)
    e = out["methods"]["ekfac:d1e-6"]["k"]["10"]
    assert e["n_queries"] == 6 and e["mean_rise"] == pytest.approx(np.mean(list(peer.values())))
    assert e["ci95"][0] <= e["mean_rise"] <= e["ci95"][1]
    assert e["groups"]["facts"]["n_queries"] == 3
    assert e["groups"]["facts"]["mean_rise"] == pytest.approx(np.mean([peer[q] for q in QUERIES[::2]]))
    diffs = [peer[q] - rises["random"][q] for q in QUERIES]
    assert e["minus_random"]["mean_difference"] == pytest.approx(np.mean(diffs))
    assert e["minus_random"]["wilcoxon_p"] == pytest.approx(stats.wilcoxon_p(diffs))
    assert "minus_random" not in out["methods"]["random"]["k"]["10"]

    p = out["paired"]["10"]
    assert set(p) == {"stride:e6 - ekfac:d1e-6", "stride:e6 - tfidf", "stride:e6 - random"}
    d = p["stride:e6 - ekfac:d1e-6"]
    assert d["mean_difference"] == pytest.approx(1.0) and d["ci95"] == pytest.approx([1.0, 1.0])
    assert (d["a_higher"], d["b_higher"], d["n_queries"]) == (6, 0, 6)
    assert d["groups"]["heldout"]["n_queries"] == 3
    t = out["target"]
    assert (t["best_peer"], t["verdict"], t["k"]) == ("ekfac:d1e-6", "met", 10)
    assert t["stride_mean_rise"] - t["best_peer_mean_rise"] == pytest.approx(1.0)
    assert out["seconds_per_retrain"]["median"] == 40.0


def test_the_target_is_not_met_below_and_not_established_across_zero(cf):
    peer = {q: 1.0 for q in QUERIES}
    below = cf.summarize(_rows({"stride:e6": {q: 0.5 for q in QUERIES}, "ekfac": peer}), "stride:e6", n_boot=200)
    assert below["target"]["verdict"] == "not met"
    mixed = {q: 1.0 + (0.5 if i % 2 else -0.5) for i, q in enumerate(QUERIES)}
    across = cf.summarize(_rows({"stride:e6": mixed, "ekfac": peer}), "stride:e6", n_boot=200)
    assert across["target"]["verdict"] == "not established"
    lo, hi = across["target"]["difference"]["ci95"]
    assert lo < 0 < hi


def test_a_peer_is_paired_only_on_the_queries_both_have(cf):
    rows = _rows({"stride:e6": {q: 1.0 for q in QUERIES}, "ekfac": {q: 0.0 for q in QUERIES[:4]}})
    out = cf.summarize(rows, "stride:e6", n_boot=100)
    assert out["paired"]["10"]["stride:e6 - ekfac"]["n_queries"] == 4
    assert out["target"]["difference"]["n_queries"] == 4


def test_seed_noise_is_the_loss_change_with_nothing_removed(cf):
    rows = [{"kind": "noise", "seed": 1, "queries": ["a", "b", "c"], "loss": [1.5, 2.0, 2.5],
             "base_loss": [1.0, 2.5, 2.5], "seconds": 41.0}]
    out = cf.seed_noise(rows, sample=["a", "b"], test=["a", "b", "c"])["seeds"]["1"]
    assert out["per_sampled_query"] == {"a": 0.5, "b": -0.5}
    assert out["sampled_queries"]["mean_abs"] == pytest.approx(0.5)
    assert out["test_queries"]["n_queries"] == 3 and out["test_queries"]["max_abs"] == pytest.approx(0.5)
    assert cf.seed_noise(_rows({"x": {"a": 1.0}}), ["a"], ["a"]) is None


def test_assemble_keeps_the_earlier_default_rows_apart(cf, tmp_path):
    log, out = tmp_path / "cf.jsonl", tmp_path / "cf.json"
    for r in _rows({"stride:e6": {"fact-00": 1.0, "heldout-x": 0.5}, "random": {"fact-00": 0.0, "heldout-x": 0.1}}):
        cf.append_row(log, r)
    earlier = {"note": "default settings", "rows": [{"query": "fact-00", "method": "stride", "k": 10, "rise": 7.0}]}
    out.write_text(json.dumps({"earlier_default_settings": earlier}))
    doc = cf.assemble(log, out)
    assert json.loads(out.read_text()) == doc
    assert doc["earlier_default_settings"] == earlier
    assert {r["method"] for r in doc["rows"]} == {"stride:e6", "random"}
    assert doc["methods"]["stride:e6"]["k"]["10"]["mean_rise"] == pytest.approx(0.75)


def test_a_fresh_clone_restores_the_log_from_the_committed_json(cf, tmp_path):
    """benchmarks/work is git-ignored: the committed json alone must assemble again, seed noise
    included, and a rerun must extend its sample rather than redo it."""
    log, out = tmp_path / "cf.jsonl", tmp_path / "cf.json"
    noise = {"kind": "noise", "seed": 1, "queries": ["fact-00", "heldout-x"], "loss": [1.5, 2.0],
             "base_loss": [1.0, 2.5], "seconds": 41.0}
    for r in _rows({"stride:e6": {"fact-00": 1.0, "heldout-x": 0.5}, "random": {"fact-00": 0.0, "heldout-x": 0.1}}):
        cf.append_row(log, r)
    cf.append_row(log, noise)
    doc = cf.assemble(log, out)
    assert doc["noise_rows"] == [noise]
    log.unlink()                                     # what a fresh clone holds: the json only
    assert cf.restore_log(log, out) == len(doc["rows"]) + 1
    assert cf.read_log(log) == doc["rows"] + [noise]
    assert cf.restore_log(log, out) == 0             # an existing log is never overwritten
    again = cf.assemble(log, out)
    assert again["seed_noise"] == doc["seed_noise"] and again["seed_noise"] is not None
    assert again["methods"] == doc["methods"]


def test_the_command_refuses_an_unknown_method_before_any_retrain(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), "--methods", "stride,nosuch", "--k", "10",
                          "--log", str(tmp_path / "cf.jsonl")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert "No committed scores for method 'nosuch'" in res.stderr
    assert not (tmp_path / "cf.jsonl").exists()


def test_a_base_model_of_another_recipe_is_refused(cf):
    report = {"setting": {"retrained_loss": {"base_model_mean": 4.948}}}
    cf.check_base_model(4.948, report)
    cf.check_base_model(9.0, {})                    # a report without the figure: nothing to check
    with pytest.raises(SystemExit, match="mean query loss 5.978871 nats, but the LDS benchmark's base model has 4.948000"):
        cf.check_base_model(5.978871, report)


def test_the_readme_tables_show_every_method_pair_and_the_verdict(cf):
    rows = _rows({"stride:e6": {q: 1.0 + 0.1 * i for i, q in enumerate(QUERIES)},
                  "ekfac": {q: 0.0 for q in QUERIES}, "random": {q: 0.0 for q in QUERIES}})
    doc = {**cf.summarize(rows, "stride:e6", n_boot=100), "seed_noise": None}
    text = cf.markdown(doc)
    assert "| stride:e6 | +1.250 [" in text and "| 10 | stride:e6 - ekfac | +1.250 [" in text
    assert "**met**" in text and "k = 50" not in text


def test_other_stride_settings_keep_their_own_pairs(cf):
    """A log holding the choice before a later tuning round (stride:e6) and the new one
    (stride:gn): each is paired with the peers, never with the other STRIDE setting."""
    rows = _rows({"stride:gn": {q: 2.0 for q in QUERIES}, "stride:e6": {q: 1.0 for q in QUERIES},
                  "ekfac": {q: 0.5 for q in QUERIES}, "random": {q: 0.0 for q in QUERIES}})
    other = cf.other_stride_pairs(rows, "stride:gn", n_boot=100)
    assert set(other) == {"stride:e6"}
    assert set(other["stride:e6"]["10"]) == {"stride:e6 - ekfac", "stride:e6 - random"}
    assert other["stride:e6"]["10"]["stride:e6 - ekfac"]["mean_difference"] == pytest.approx(0.5)
    main = cf.summarize(rows, "stride:gn", n_boot=100)
    assert set(main["paired"]["10"]) == {"stride:gn - ekfac", "stride:gn - random"}
    text = cf.markdown({**main, "paired_other_stride_settings": other, "seed_noise": None})
    assert "| 10 | stride:e6 - ekfac | +0.500 [" in text and "| 10 | stride:gn - ekfac | +1.500 [" in text
