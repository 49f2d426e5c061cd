"""Shared fixtures: a tiny model and pool built in the test session (no downloads).

``tiny_pool``: 150 fortunes plus the documents of 6 planted facts from the built-in
``fortunes+facts`` pool. ``tiny_model_dir``: a byte-level BPE tokenizer and a 2-layer,
width-32 GPT-2 trained on it for a few seconds and saved with ``save_pretrained``.
``fitted_run``: a STRIDE run on them with small settings, fitted once per session.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tiny models run fastest on one thread (measured 10-20x slower with two busy threads).
torch.set_num_threads(1)

N_FACTS = 6
N_FORTUNES = 150


@pytest.fixture(scope="session")
def tiny_pool():
    from stride_viz.data.pools import load_pool
    full = load_pool("fortunes+facts")
    facts = full.facts[:N_FACTS]
    keep = {full.index_of(s) for f in facts for s in f.source_ids}
    fortunes = [i for i, x in enumerate(full.ids) if x.startswith("fortune")][:N_FORTUNES]
    return full.subset(sorted(keep | set(fortunes)))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_pool) -> Path:
    from stride_viz.data.models import train_demo_model
    out = tmp_path_factory.mktemp("tiny-model") / "model"
    return train_demo_model(tiny_pool, out, preset="tiny", seed=0, n_layer=2, n_embd=32, n_head=2,
                            vocab_size=400, epochs=8, batch_size=16, lr=5e-3, max_length=64,
                            fact_repeats=1, weight_decay=0.01, prefix_space=False)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from stride_viz.data.models import load_model
    return load_model(str(tiny_model_dir), device="cpu")


TINY_FIT = dict(subsets=48, per_example=4, rank=4, epochs=6, batch_size=16, lr=3e-2,
                checkpoint_every=5, device="cpu")


@pytest.fixture(scope="session")
def fitted_run(tmp_path_factory, tiny_model, tiny_pool):
    """A fitted STRIDE run (logits mode) with the planted-fact queries attributed."""
    from stride_viz.config import FitConfig
    from stride_viz.engine import Stride
    from stride_viz.data.pools import fact_queries
    run = Stride.create_or_open(tmp_path_factory.mktemp("runs") / "run", tiny_model, tiny_pool,
                                FitConfig(**TINY_FIT))
    run.fit()
    run.attribute(fact_queries(tiny_pool))
    return run


@pytest.fixture
def page_home(tmp_path_factory, tmp_path, monkeypatch):
    """A data directory with a private copy of the tiny demo run of dashboard_run.py: (home,
    run folder); jobs still active at the end are cancelled."""
    import shutil
    from dashboard_run import tiny_demo_home, tiny_demo_info
    info = tiny_demo_info(tiny_demo_home(tmp_path_factory))
    monkeypatch.setenv("STRIDE_VIZ_HOME", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = tmp_path / "runs" / Path(info["run_dir"]).name
    shutil.copytree(info["run_dir"], run)
    yield tmp_path, run
    from stride_viz.jobs import JobStore, LocalProcessExecutor
    store = JobStore(tmp_path / "jobs.sqlite")
    for job in store.list():
        if job.active:
            LocalProcessExecutor(store).cancel(job.id)
