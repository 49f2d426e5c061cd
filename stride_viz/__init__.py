"""stride_viz: which training examples made my language model say this?

STRIDE training-data attribution as a library (this package), a CLI (``python -m
stride_viz``) and a Streamlit dashboard (``app.py``). The pipeline, one module per stage:

    pools, models  ->  subsets  ->  operators + training  ->  measurement  ->  recovery
                                     (fit once: engine.Stride.fit)     (per query: .attribute)

Names are imported lazily so that ``import stride_viz.plots`` (the dashboard) does not load
torch and transformers.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["FitConfig", "RecoveryConfig", "Pool", "Query", "load_pool", "load_queries",
           "load_model", "Stride", "Attribution", "read_attribution"]

_WHERE = {"FitConfig": "config", "RecoveryConfig": "config", "Pool": "pools", "Query": "pools",
          "load_pool": "pools", "load_queries": "pools", "load_model": "models",
          "Stride": "engine", "Attribution": "engine", "read_attribution": "engine"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'stride_viz' has no attribute {name!r}")
