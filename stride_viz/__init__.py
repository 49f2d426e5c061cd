"""stride_viz: which training examples made my language model say this?

STRIDE training-data attribution as a library (this package), a CLI (``python -m
stride_viz``) and a Streamlit dashboard (``app.py``). The pipeline, one module per stage:

    data/ (pools, models)  ->  method/subsets  ->  method/operators + training  ->
    method/measurement  ->  method/recovery        (engine.Stride: .fit once, .attribute per query)

Packages by concern: ``method/`` the four STRIDE stages, ``data/`` pools, facts,
tokenisation and models, ``evaluation/`` LDS, retraining and the peer methods, ``app/`` the
dashboard's helpers, figures and report, ``jobs/`` background work. ``engine`` (the facade),
``storage`` (run folders), ``config`` and ``cli`` sit at the root.

Names are imported lazily so that ``import stride_viz.app.plots`` (the dashboard) does not load
torch and transformers.
"""
from __future__ import annotations

import importlib
import os
from typing import Any

# Deterministic cuBLAS (a resumed GPU fit must end where an uninterrupted one ends): the
# workspace setting has to be in place before the first CUDA matmul of the process.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

__all__ = ["FitConfig", "RecoveryConfig", "Pool", "Query", "load_pool", "load_queries",
           "load_model", "Stride", "Attribution", "read_attribution"]

_WHERE = {"FitConfig": "config", "RecoveryConfig": "config", "Pool": "data.pools",
          "Query": "data.pools", "load_pool": "data.pools", "load_queries": "data.pools",
          "load_model": "data.models",
          "Stride": "engine", "Attribution": "engine", "read_attribution": "engine"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'stride_viz' has no attribute {name!r}")
