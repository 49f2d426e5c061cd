"""The general LDS command end to end on a tiny pool: ``benchmarks/lds.py --pool ...``
(tiny recipe and tiny STRIDE settings passed with --recipe / --settings, a few steps each)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stride_viz.evaluation import metrics as ev

ROOT = Path(__file__).resolve().parents[1]
LDS = ROOT / "benchmarks" / "lds.py"
TINY_RECIPE = {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 48, "max_length": 48,
               "epochs": 1.0, "batch_size": 8}
TINY_STRIDE = {"stride": {"fit": {"subsets": 12, "per_example": 3, "rank": 2, "epochs": 1,
                                  "batch_size": 8}}}


def _lds_module():
    spec = importlib.util.spec_from_file_location("lds_benchmark", LDS)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LDS_THREADS": "1"}
    return subprocess.run([sys.executable, str(LDS), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def _texts(n: int) -> list[str]:
    from stride_viz.data.pools import load_pool

    p = load_pool("fortunes")
    return [t for t in p.completions if 6 <= len(t.split()) <= 14][:n]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 36-document pool, 8 held-out queries in a JSONL file, and the command run once."""
    d = tmp_path_factory.mktemp("lds-cli")
    texts = _texts(44)
    with open(d / "pool.jsonl", "w") as f:
        for i, t in enumerate(texts[:36]):
            f.write(json.dumps({"id": f"doc{i}", "text": t}) + "\n")
    with open(d / "queries.jsonl", "w") as f:
        for i, t in enumerate(texts[36:]):
            w = t.split(" ")
            f.write(json.dumps({"id": f"q{i}", "prompt": " ".join(w[:3]), "completion": " " + " ".join(w[3:])}) + "\n")
    args = ["--pool", str(d / "pool.jsonl"), "--queries", str(d / "queries.jsonl"), "--retrains", "5",
            "--seed", "3", "--work", str(d / "work"), "--out", str(d / "result.json"),
            "--methods", "stride,tfidf,random", "--recipe", json.dumps(TINY_RECIPE),
            "--settings", json.dumps(TINY_STRIDE)]
    proc = _run(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d, args, json.loads((d / "result.json").read_text())


def test_the_command_writes_the_lds_schema_recomputable_from_its_files(tiny):
    d, _, report = tiny
    gt = ev.read_ground_truth(d / "work" / "ground_truth")
    ids = [q["id"] for q in gt.metadata["queries"]]
    assert len(gt.train_subsets) == 5 and gt.metadata["seed"] == 3 and len(ids) == 8
    assert gt.metadata["pool"]["n"] == 36 and gt.metadata["recipe"]["n_embd"] == 16
    # the development/test split is fixed in the ground truth's metadata
    dev = ev.query_split(ids)
    assert gt.metadata["split"]["development"] == [q for q, x in zip(ids, dev) if x]
    assert gt.metadata["split"]["test"] == [q for q, x in zip(ids, dev) if not x]
    assert report["setting"]["split"]["n_test"] == int((~dev).sum())
    assert report["command"].startswith("python benchmarks/lds.py --pool")
    assert report["machine"]["load_average_1_5_15_at_end"]
    assert set(report["methods"]) == {"stride", "tfidf", "random"}
    for m, r in report["methods"].items():
        assert r["status"] == "ok", r
        assert {"lds_mean", "lds_std", "lds_per_query", "times", "settings", "test"} <= set(r)
        scores = np.load(d / "work" / "scores" / f"{m}.npy")
        res = ev.lds(scores, gt.train_subsets, gt.test_loss)
        np.testing.assert_allclose(r["lds_per_query"], res.per_query, atol=1e-6)
        assert r["lds_mean"] == pytest.approx(res.mean) and r["lds_std"] == pytest.approx(res.std)
        assert r["lds_mean_test"] == pytest.approx(res.per_query[~dev].mean())
        assert r["test"]["mean"] == pytest.approx(res.per_query[~dev].mean())
        assert r["test"]["n_queries"] == int((~dev).sum())
        assert r["times"]["process_wall_s"] > 0 and r["times"]["fit_s"] is not None
    # paired statistics against STRIDE, on the test queries
    v = report["methods"]["tfidf"]["vs_stride"]
    per = {m: np.asarray(r["lds_per_query"])[~dev] for m, r in report["methods"].items()}
    assert v["mean_difference"] == pytest.approx((per["tfidf"] - per["stride"]).mean(), abs=1e-5)
    assert v["ci_queries"][0] <= v["mean_difference"] <= v["ci_queries"][1]
    assert 0 <= v["wilcoxon_p"] <= 1 and "vs_stride" not in report["methods"]["stride"]
    assert {"ground_truth_s", "methods_s", "total_s"} <= set(report["timings"])
    assert set(report["timings"]["methods_s"]) == {"stride", "tfidf", "random"}


def test_the_command_uses_the_committed_defaults(tiny):
    from stride_viz.config import FitConfig, RecoveryConfig
    from stride_viz.evaluation.baselines import default_settings

    _, _, report = tiny
    tfidf = report["methods"]["tfidf"]["settings"]
    assert {k: tfidf[k] for k in default_settings("tfidf")} == default_settings("tfidf")
    assert tfidf["differs_from_default_settings"] == {}
    stride = report["methods"]["stride"]["settings"]
    # only what --settings named differs from the engine defaults, and it is recorded
    assert stride["fit"] == {**FitConfig(**TINY_STRIDE["stride"]["fit"]).to_dict(), "device": stride["fit"]["device"]}
    assert stride["recovery"] == RecoveryConfig().to_dict()
    assert report["setting"]["overrides"] == TINY_STRIDE


def test_stats_only_recomputes_the_report_without_running_a_method(tiny):
    d, args, report = tiny
    npy = d / "work" / "scores" / "stride.npy"
    before = npy.stat().st_mtime_ns
    out = d / "again.json"
    proc = _run(*[a if a != str(d / "result.json") else str(out) for a in args], "--stats-only")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "running" not in proc.stderr  # no method process was started
    again = json.loads(out.read_text())
    assert npy.stat().st_mtime_ns == before
    for m, r in report["methods"].items():
        assert again["methods"][m]["lds_per_query"] == r["lds_per_query"]
        assert again["methods"][m]["test"] == r["test"]


def test_bad_inputs_get_one_line_errors_and_keep_the_work(tiny):
    d, args, _ = tiny
    gt_meta = (d / "work" / "ground_truth" / "metadata.json").read_text()
    other = [a if a != "5" else "6" for a in args]  # --retrains 6 on a ground truth of 5
    for argv, needle in ((other, "n_subsets"),
                         (["--pool", args[1], "--work", str(d / "w2"), "--methods", "stride,nope"], "unknown method"),
                         (["--pool", str(d / "missing.jsonl"), "--work", str(d / "w3")], "does not exist"),
                         (["--pool", args[1], "--work", str(d / "w4"), "--retrains", "2"], "--retrains")):
        proc = _run(*argv, timeout=300)
        assert proc.returncode != 0
        assert needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert (d / "work" / "ground_truth" / "metadata.json").read_text() == gt_meta
    bad = d / "noc.jsonl"
    bad.write_text(json.dumps({"id": "x", "prompt": "a prompt"}) + "\n")
    proc = _run("--pool", args[1], "--queries", str(bad), "--work", str(d / "w5"), timeout=300)
    assert proc.returncode != 0 and "no completion" in proc.stderr and "Traceback" not in proc.stderr


def test_without_queries_documents_are_held_out_of_the_pool():
    from stride_viz.data.pools import make_pool

    lds = _lds_module()
    texts = _texts(70)
    pool = make_pool("p", [f"d{i}" for i in range(70)], [""] * 70, texts)
    rest, queries = lds._held_out_queries(pool, 60, seed=1)
    assert len(rest) == 10 and len(queries) == 60
    held = {q.id.removeprefix("heldout-") for q in queries}
    assert not held & set(rest.ids)
    q = queries[0]
    src = texts[int(q.id.removeprefix("heldout-d"))]
    assert q.prompt + q.completion == src and len(q.prompt.split()) == 3
    assert [x.id for x in lds._held_out_queries(pool, 60, seed=1)[1]] == [x.id for x in queries]
    with pytest.raises(SystemExit, match="--queries"):
        lds._held_out_queries(pool, 71, seed=1)


# ------------------------------------------------------------------ tuning (issue 10, items 2-3)

def test_variants_of_stride_and_of_peers_are_parsed_and_checked():
    lds = _lds_module()
    assert lds.parse_variant('k256={"fit": {"subsets": 256}}') == ("stride:k256", {"fit": {"subsets": 256}})
    assert lds.parse_variant('stride:cv1se={"recovery": {"selection": "cv-1se"}}')[0] == "stride:cv1se"
    assert lds.parse_variant('ekfac:d1e-3={"damping_factor": 0.001}') == ("ekfac:d1e-3", {"damping_factor": 0.001})
    for bad, says in [("ekfac:x", "NAME=JSON"), ('nope:x={}', "unknown method 'nope'"),
                      ('ekfac:x={"damping": 1}', "unknown setting(s) ['damping'] of ekfac"),
                      ('trak:x=[1]', "JSON object"), ('logra:x={oops}', "not JSON"),
                      ('k={"fit": {"rank": 0}}', "'rank'"), ('k={"rank": 8}', "STRIDE's settings"),
                      ('ekfac:a b={}', "NAME of letters")]:
        with pytest.raises(ValueError, match=__import__("re").escape(says)):
            lds.parse_variant(bad)


def test_a_peer_variant_adds_its_settings_to_the_benchmark_settings(monkeypatch, tmp_path):
    lds = _lds_module()
    monkeypatch.delenv("LDS_PEER_SETTINGS", raising=False)
    assert lds.peer_settings("ekfac", lds.DEMO) == ("ekfac", {"damping_factor": None})
    assert lds.peer_settings("ekfac:d1e-8", lds.DEMO) == ("ekfac", {"damping_factor": 1e-8})
    monkeypatch.setattr(lds, "VARIANTS", tmp_path / "variants.json")
    (tmp_path / "variants.json").write_text(json.dumps({"logra:p1024": {"proj_dim": 1024}}))
    assert lds.peer_settings("logra:p1024", lds.DEMO) == ("logra", {"proj_dim": 1024})


def test_the_tuning_plan_gives_every_method_as_many_settings_in_turn():
    lds = _lds_module()
    sizes = {m: len(rows) for m, rows in lds.TUNING.items()}
    assert set(sizes) == {"stride", "ekfac", "trak", "logra"} and len(set(sizes.values())) == 1
    for m, rows in lds.TUNING.items():
        assert rows[0][:2] == ("default", {})  # the committed default is the first setting
        for name, spec, _ in rows[1:]:
            lds.parse_variant(f"{m}:{name}={json.dumps(spec)}")  # every setting is valid
    order = lds.tuning_order()
    assert len(order) == len(set(order))
    # round-robin: a run stopped anywhere leaves no method two settings behind another
    for cut in range(len(order) + 1):
        done = [m.split(":", 1)[0] for m in order[:cut]]
        counts = [done.count(m) for m in lds.TUNING]
        assert max(counts) - min(counts) <= 1


def test_settings_are_chosen_on_the_development_queries_only(monkeypatch):
    lds = _lds_module()
    monkeypatch.setattr(lds, "TUNING", {"stride": [("default", {}, 1), ("a", {"fit": {"rank": 4}}, 1),
                                                   ("b", {"fit": {"rank": 16}}, 2)],
                                        "ekfac": [("default", {}, 1), ("x", {"damping_factor": 1.0}, 1),
                                                  ("y", {"damping_factor": 0.1}, 1)]})
    dev = np.array([True, True, False, False])

    def entry(per):
        per = np.asarray(per, dtype=float)
        return {"status": "ok", "lds_per_query": per.tolist(), "lds_mean_dev": per[dev].mean(),
                "lds_std_dev": per[dev].std(), "lds_mean_dev_heldout": per[dev].mean(),
                "lds_mean_dev_facts": None, "seconds_fit": 1.0, "seconds_per_query": 0.5}

    methods = {"stride": entry([0.1, 0.1, 0.9, 0.9]),    # best on test, not on dev
               "stride:a": entry([0.4, 0.2, 0.0, 0.0]),  # best on dev
               "stride:b": entry([0.3, 0.3, 0.5, 0.5]),  # tied with a on dev: the earlier wins
               "ekfac": entry([0.5, 0.5, 0.5, 0.5]),
               "ekfac:x": {"status": "failed", "error": "boom"}}
    got = lds.choose_settings(methods, dev)
    assert got["stride"]["chosen"] == "stride:a" and got["stride"]["chosen_changes"] == {"fit": {"rank": 4}}
    assert got["ekfac"]["chosen"] == "ekfac"
    assert [e["status"] for e in got["ekfac"]["settings"]] == ["ok", "failed", "not run"]
    assert got["ekfac"]["n_scored"] == 1 and got["stride"]["n_scored"] == 3
    a = got["stride"]["settings"][1]
    assert a["minus_default_dev"]["mean"] == pytest.approx(0.2)
    assert "minus_default_dev" not in got["stride"]["settings"][0]
    assert got["stride"]["seconds"] == pytest.approx(3 * (1.0 + 0.5 * 4))


def test_on_the_twin_a_trak_ensemble_member_is_the_recipe_model_never_trained(monkeypatch, tmp_path):
    """The twin runs the tuned choices too: a TRAK checkpoint 'seed:N' is, on the twin, the
    recipe's model as initialised from seed N (not the trained ensemble member)."""
    import torch

    from stride_viz.data.models import load_model
    from stride_viz.evaluation.retrain import init_model, open_inputs

    lds = _lds_module()
    monkeypatch.delenv("LDS_PEER_SETTINGS", raising=False)
    monkeypatch.setattr(lds, "ROOT", tmp_path)
    twin = lds.Layout(lds.GT_DIR, tmp_path / "lds_model_twin", tmp_path / "scores", tmp_path / "run")
    monkeypatch.setattr(lds, "TWIN", twin)
    import stride_viz.evaluation.retrain as retrain
    monkeypatch.setattr(retrain, "train_recipe", lambda *a, **k: pytest.fail("the twin must not train a member"))
    base, over = lds.peer_settings("trak:ens2", twin)
    assert base == "trak" and over["checkpoints"] == ["lds_model_twin_seed1"]
    meta, _, _, tok = open_inputs(lds.GT_DIR)
    member = load_model(str(tmp_path / "lds_model_twin_seed1"), device="cpu").model.state_dict()
    want = init_model({**meta["recipe"], "seed": 1}, tok).state_dict()
    other = init_model({**meta["recipe"], "seed": meta["recipe"]["seed"]}, tok).state_dict()
    key = "transformer.h.0.attn.c_attn.weight"
    assert torch.equal(member[key], want[key]) and not torch.equal(member[key], other[key])


def test_the_twin_step_reads_the_tuning_choices_from_the_report():
    lds = _lds_module()
    report = {"tuning": {"methods": {"stride": {"chosen": "stride:e6"}, "ekfac": {"chosen": "ekfac"},
                                     "trak": {"chosen": None}}}}
    assert lds.tuning_choices(report) == {"stride": "stride:e6"}  # a default choice is run anyway
    committed = json.loads((ROOT / "benchmarks" / "results" / "lds.json").read_text())
    assert lds.tuning_choices() == {b: c["chosen"] for b, c in committed["tuning"]["methods"].items()
                                    if c["chosen"] != b}
