"""The command line: every subcommand on the tiny model, and one clear line per bad input."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from stride_viz.cli import main

from conftest import TINY_FIT


def _flags(**overrides):
    cfg = {**TINY_FIT, "epochs": 1, **overrides}
    cfg.pop("checkpoint_every")
    out = []
    for k, v in cfg.items():
        out += ["--" + k.replace("_", "-"), str(v)]
    return out


@pytest.fixture(scope="module")
def pool_file(tmp_path_factory, tiny_pool):
    path = tmp_path_factory.mktemp("pool") / "pool.jsonl"
    with open(path, "w") as f:
        for i in range(len(tiny_pool)):
            f.write(json.dumps({"id": tiny_pool.ids[i], "text": tiny_pool.completions[i]}) + "\n")
    return path


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, tiny_model_dir, pool_file):
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["fit", "--model", str(tiny_model_dir), "--pool", str(pool_file), "--run", str(run),
                 *_flags()]) == 0
    return run


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ")
    return err[-1]


def test_fit_then_attribute_writes_every_output(cli_run, tmp_path, capsys, tiny_pool):
    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"id": "vor", "prompt": tiny_pool.facts[0].query.prompt,
                                   "completion": tiny_pool.facts[0].query.completion}) + "\n"
                       + json.dumps({"prompt": "A wise man"}) + "\n")
    out = tmp_path / "out"
    assert main(["attribute", "--run", str(cli_run), "--queries", str(queries), "--out", str(out),
                 "--top", "3", "--no-continuations"]) == 0
    scores, responses = np.load(out / "scores.npy"), np.load(out / "responses.npy")
    assert scores.shape == (2, len(tiny_pool)) and scores.dtype == np.float32
    assert responses.shape == (2, TINY_FIT["subsets"]) and responses.dtype == np.float32
    rows = list(csv.DictReader(open(out / "topk.csv")))
    assert {r["query_id"] for r in rows} <= {"vor", "q1"} and rows
    assert set(rows[0]) == {"query_id", "rank", "example_id", "score", "text"}
    for r in rows:
        assert (float(r["score"]) > 0) == (int(r["rank"]) > 0)
    assert (out / "paths" / "vor.npz").exists() and (out / "paths" / "q1.npz").exists()
    assert "nats" in capsys.readouterr().out


def test_single_prompt_with_completion(cli_run, tmp_path):
    out = tmp_path / "one"
    assert main(["attribute", "--run", str(cli_run), "--prompt", "The sky is", "--completion",
                 " blue.", "--out", str(out), "--no-continuations"]) == 0
    assert np.load(out / "scores.npy").shape[0] == 1


def test_rerunning_fit_reuses_the_run(cli_run, tiny_model_dir, pool_file, capsys):
    before = (cli_run / "operators.safetensors").stat().st_mtime_ns
    assert main(["fit", "--model", str(tiny_model_dir), "--pool", str(pool_file), "--run",
                 str(cli_run), *_flags()]) == 0
    assert (cli_run / "operators.safetensors").stat().st_mtime_ns == before


@pytest.mark.parametrize("case, pattern", [
    ("missing_pool", "does not exist|not found|No such"),
    ("malformed_pool", "not valid JSON"),
    ("unknown_column", "columns"),
    ("empty_pool", "empty|no example|no documents"),
    ("flag_out_of_range", "'subsets' parameter of FitConfig"),
    ("too_few_examples", "fewer than the"),
    ("not_a_model", "config.json|model"),
    ("other_settings", "differences: rank"),
])
def test_bad_fit_input_exits_2_with_one_line(case, pattern, tmp_path, tiny_model_dir, pool_file,
                                            cli_run, capsys):
    pool, model, run, flags = str(pool_file), str(tiny_model_dir), str(tmp_path / "r"), _flags()
    if case == "missing_pool":
        pool = str(tmp_path / "nope.jsonl")
    elif case == "malformed_pool":
        (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
        pool = str(tmp_path / "bad.jsonl")
    elif case == "unknown_column":
        (tmp_path / "col.jsonl").write_text('{"body": "x"}\n')
        pool = str(tmp_path / "col.jsonl")
    elif case == "empty_pool":
        (tmp_path / "empty.jsonl").write_text("")
        pool = str(tmp_path / "empty.jsonl")
    elif case == "flag_out_of_range":
        flags = _flags(subsets=0)
    elif case == "too_few_examples":
        flags = _flags(subsets=4000)
    elif case == "not_a_model":
        (tmp_path / "m").mkdir()
        model = str(tmp_path / "m")
    elif case == "other_settings":
        run, flags = str(cli_run), _flags(rank=7)
    assert main(["fit", "--model", model, "--pool", pool, "--run", run, *flags]) == 2
    assert __import__("re").search(pattern, _error_line(capsys))


def test_bad_attribute_input_keeps_earlier_results(cli_run, tmp_path, capsys):
    out = tmp_path / "kept"
    assert main(["attribute", "--run", str(cli_run), "--prompt", "Hello", "--completion", " world",
                 "--out", str(out), "--no-continuations"]) == 0
    before = (out / "scores.npy").read_bytes()
    assert main(["attribute", "--run", str(cli_run), "--prompt", "word " * 500, "--completion",
                 " x", "--out", str(out)]) == 2
    assert "reads at most" in _error_line(capsys)
    (tmp_path / "q.jsonl").write_text('{"completion": "no prompt"}\n')
    assert main(["attribute", "--run", str(cli_run), "--queries", str(tmp_path / "q.jsonl"),
                 "--out", str(out)]) == 2
    assert "prompt" in _error_line(capsys)
    assert main(["attribute", "--run", str(tmp_path / "none"), "--prompt", "x", "--out", str(out)]) == 2
    assert "not a STRIDE run directory" in _error_line(capsys)
    assert main(["attribute", "--run", str(cli_run), "--prompt", "x", "--out", str(out),
                 "--selection", "best"]) == 2
    assert "'selection'" in _error_line(capsys)
    assert (out / "scores.npy").read_bytes() == before


def test_module_entry_point_has_help_for_every_command():
    for cmd in ([], ["train-model"], ["fit"], ["attribute"], ["demo"]):
        res = subprocess.run([sys.executable, "-m", "stride_viz", *cmd, "--help"],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0 and "usage" in res.stdout
    res = subprocess.run([sys.executable, "-m", "stride_viz", "fit", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert "--per-example" in res.stdout and "d: number of subsets" in res.stdout
