"""Fits on two processes with torchrun (gloo on CPU): the exact command line users type, the
same operators and planted-fact recall as one process, and a killed fit that resumes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stride_viz.cli import build_parser, main
from stride_viz.data.pools import fact_queries
from stride_viz.demo import fact_metrics
from stride_viz.engine import Stride
from stride_viz.method import distributed

from conftest import TINY_FIT

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
# small enough for ~2 s of training per fit; a checkpoint every 5 of the 44 steps
SETTINGS = {**TINY_FIT, "epochs": 4, "checkpoint_every": 5}


def _flags() -> list[str]:
    out = []
    for k, v in SETTINGS.items():
        out += ["--" + k.replace("_", "-"), str(v)]
    return out


def _fit_args(model_dir: Path, pool_file: Path, run: Path) -> list[str]:
    return ["fit", "--model", str(model_dir), "--pool", str(pool_file), "--run-dir", str(run), *_flags()]


def _torchrun(args: list[str], **env: str) -> subprocess.CompletedProcess:
    launcher = [str(TORCHRUN)] if TORCHRUN.exists() else [sys.executable, "-m", "torch.distributed.run"]
    cmd = [*launcher, "--standalone", "--nproc_per_node", "2", "-m", "stride_viz", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=300)


def _recall(run_dir: Path, pool) -> dict:
    run = Stride.open(run_dir, device="cpu")
    return fact_metrics(pool, run.attribute(fact_queries(pool), continuations=False))


@pytest.fixture(scope="module")
def pool_file(tmp_path_factory, tiny_pool) -> Path:
    path = tmp_path_factory.mktemp("pool") / "pool.jsonl"
    with open(path, "w") as f:
        for i in range(len(tiny_pool)):
            f.write(json.dumps({"id": tiny_pool.ids[i], "prompt": tiny_pool.prompts[i],
                                "completion": tiny_pool.completions[i]}) + "\n")
    return path


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model_dir, pool_file) -> Path:
    run = tmp_path_factory.mktemp("one") / "run"
    assert main(_fit_args(tiny_model_dir, pool_file, run)) == 0
    return run


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, tiny_model_dir, pool_file) -> Path:
    run = tmp_path_factory.mktemp("two") / "run"
    res = _torchrun(_fit_args(tiny_model_dir, pool_file, run))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == str(run)   # printed by rank 0 alone
    return run


def test_every_fit_flag_survives_torchruns_parser():
    # torchrun reads the whole command line, also after the module: `--run` is refused there
    # as an abbreviation of its --run-path, so the fit's flags must not be prefixes of its own
    from torch.distributed.run import get_args_parser
    fit = next(a for a in build_parser()._actions if getattr(a, "choices", None))._name_parser_map["fit"]
    flags = [s for a in fit._actions for s in a.option_strings if s.startswith("--")
             and s not in ("--help", "--run")]
    head = ["--standalone", "--nproc_per_node", "2", "-m", "stride_viz"]
    tail = ["fit", *(x for f in flags for x in (f, "1"))]
    assert get_args_parser().parse_args(head + tail).training_script_args == tail
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(head + ["--run", "R"])


def test_one_process_helpers_need_no_process_group():
    assert distributed.world_size() == 1 and distributed.is_writer()
    assert distributed.share(5).tolist() == [0, 1, 2, 3, 4] and distributed.owns(3)
    assert distributed.from_writer(lambda: 7) == 7 and distributed.any_rank(True)
    assert distributed.rank_suffix() == "" and not torch.distributed.is_initialized()


def test_two_process_fit_matches_one_process(one_process, two_processes, tiny_pool):
    state = json.loads((two_processes / "fit" / "state.json").read_text())
    assert state["status"] == "done" and state["processes"] == 2
    assert not list(two_processes.rglob("cache-*"))               # scratch files removed
    one = Stride.open(one_process, device="cpu").operators
    two = Stride.open(two_processes, device="cpu").operators
    for name in ("A", "basis"):                                   # the same gradients, summed
        a, b = getattr(one, name).detach(), getattr(two, name).detach()
        assert torch.allclose(a, b, atol=1e-4, rtol=0), (name, (a - b).abs().max())
    hist1 = json.loads((one_process / "fit" / "state.json").read_text())["history"]
    assert np.allclose([h["fid"] for h in hist1], [h["fid"] for h in state["history"]], atol=1e-4)
    m1, m2 = _recall(one_process, tiny_pool), _recall(two_processes, tiny_pool)
    chance = 10 / len(tiny_pool)
    assert m2["recall_at_10"] >= m1["recall_at_10"] - 0.05, (m1, m2)
    assert m2["recall_at_10"] >= 3 * chance, m2


def test_killed_two_process_fit_resumes(tmp_path, tiny_model_dir, pool_file, two_processes):
    run = tmp_path / "run"
    args = _fit_args(tiny_model_dir, pool_file, run)
    # rank 0 is SIGKILLed while writing the checkpoint of step 10: the one of step 5 is intact
    killed = _torchrun(args, STRIDE_VIZ_FAULT="written:10")
    assert killed.returncode != 0
    assert json.loads((run / "fit" / "state.json").read_text())["step"] == 5
    assert not (run / "operators.safetensors").exists()
    resumed = _torchrun(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step 6/" in resumed.stderr and "step 1/" not in resumed.stderr
    a = Stride.open(run, device="cpu").operators
    b = Stride.open(two_processes, device="cpu").operators
    assert torch.equal(a.A, b.A) and torch.equal(a.basis, b.basis)   # the uninterrupted fit


def test_two_process_closed_form_fit_matches_one_process(tmp_path, tiny_model_dir, pool_file):
    """solver 'gauss-newton' under torchrun: every rank holds the whole cache after the
    shared pass, so both ranks compute, and rank 0 writes, the one-process operators."""
    gn = ["--solver", "gauss-newton"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_fit_args(tiny_model_dir, pool_file, one) + gn) == 0
    res = _torchrun(_fit_args(tiny_model_dir, pool_file, two) + gn)
    assert res.returncode == 0, res.stderr[-3000:]
    state = json.loads((two / "fit" / "state.json").read_text())
    assert state["solver"] == "gauss-newton" and state["processes"] == 2
    a, b = Stride.open(one, device="cpu").operators, Stride.open(two, device="cpu").operators
    for name in ("A", "basis"):
        x, y = getattr(a, name).detach(), getattr(b, name).detach()
        assert torch.allclose(x, y, atol=1e-5 * float(x.abs().max()), rtol=0), (name, (x - y).abs().max())
