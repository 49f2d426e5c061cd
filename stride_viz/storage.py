"""The run directory: everything a fit and its attributions wrote, self-describing on disk.

Layout (pages and reports read only these files, never a model):

    RUN/run.json                 config, package versions, model and pool hashes, model shape
    RUN/pool.jsonl               the pool's rows, so views need no original file
    RUN/facts.json               planted-fact ground truth, when the pool has any
    RUN/membership.npz           subset design, int8 CSR (K, n)
    RUN/fit/checkpoint.safetensors, RUN/fit/state.json   resumable training state
    RUN/operators.safetensors    the fitted basis and operators (no pickle anywhere)
    RUN/attributions/<query>/    query.json, responses.npy, scores.npy, backprojection.npy,
                                 path.npz, continuations.json, meta.json
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import scipy.sparse as sp

from stride_viz.config import ConfigError, config_diff
from stride_viz.data.pools import Fact, Pool, Query, make_pool

__all__ = ["RunStore", "RunMismatch", "write_json", "read_json", "safe_name"]

FORMAT_VERSION = 1


class RunMismatch(ConfigError):
    """A run directory reopened with another model, pool or configuration."""


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename): readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, ensure_ascii=False)
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def safe_name(text: str) -> str:
    """A query id usable as a folder name (other characters become '_')."""
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", text)[:100]
    return name if name not in ("", ".", "..") else "_" + name


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


class RunStore:
    """Paths and readers/writers of one run directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # ------------------------------------------------------------ paths
    @property
    def meta_path(self) -> Path:
        return self.root / "run.json"

    @property
    def fit_dir(self) -> Path:
        return self.root / "fit"

    @property
    def operators_path(self) -> Path:
        return self.root / "operators.safetensors"

    def attribution_dir(self, query_id: str) -> Path:
        return self.root / "attributions" / safe_name(query_id)

    def exists(self) -> bool:
        return self.meta_path.exists()

    def is_fitted(self) -> bool:
        return self.operators_path.exists()

    # ------------------------------------------------------------ metadata
    def read_meta(self) -> dict:
        if not self.exists():
            raise FileNotFoundError(f"{self.root} is not a STRIDE run directory (no run.json). "
                                    "Create one with `python -m stride_viz fit`.")
        return read_json(self.meta_path)

    def write_meta(self, meta: dict) -> None:
        write_json(self.meta_path, {"version": FORMAT_VERSION, **meta})

    def check_meta(self, expected: dict) -> None:
        """Refuse to reuse a run whose model, pool or configuration differ from ``expected``."""
        meta = self.read_meta()
        problems = []
        for key, label in (("model", "model"), ("pool", "pool")):
            old_hash, new_hash = meta[key]["hash"], expected[key]["hash"]
            if old_hash != new_hash:
                problems.append(f"{label}: {meta[key]['spec']} ({old_hash}) -> "
                                f"{expected[key]['spec']} ({new_hash})")
        problems += config_diff(meta["config"], expected["config"])
        if problems:
            raise RunMismatch(
                f"The run directory {self.root} was made with other settings; "
                f"differences: {'; '.join(problems)}. Use a new --run directory for the new "
                "settings, or the original settings to reuse this run.")

    # ------------------------------------------------------------ pool and design
    def write_pool(self, pool: Pool) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / "pool.jsonl.tmp"
        with open(tmp, "w") as f:
            for i, p, c in zip(pool.ids, pool.prompts, pool.completions):
                f.write(json.dumps({"id": i, "prompt": p, "completion": c}, ensure_ascii=False) + "\n")
        os.replace(tmp, self.root / "pool.jsonl")
        write_json(self.root / "facts.json", [
            {"query": {"id": f.query.id, "prompt": f.query.prompt, "completion": f.query.completion},
             "source_ids": list(f.source_ids)} for f in pool.facts])

    def read_pool(self) -> Pool:
        ids, prompts, completions = [], [], []
        with open(self.root / "pool.jsonl") as f:
            for line in f:
                row = json.loads(line)
                ids.append(row["id"]), prompts.append(row["prompt"]), completions.append(row["completion"])
        facts_path = self.root / "facts.json"
        facts = []
        if facts_path.exists():
            facts = [Fact(Query(**f["query"]), tuple(f["source_ids"])) for f in read_json(facts_path)]
        name = self.read_meta()["pool"]["spec"]
        return make_pool(name, ids, prompts, completions, facts=facts)

    def write_membership(self, M: sp.csr_matrix) -> None:
        tmp = self.root / "membership.tmp.npz"
        sp.save_npz(tmp, M)
        os.replace(tmp, self.root / "membership.npz")

    def read_membership(self) -> sp.csr_matrix:
        return sp.load_npz(self.root / "membership.npz").tocsr()

    # ------------------------------------------------------------ attributions
    def query_ids(self) -> list[str]:
        """Ids of the finished attributions, oldest first."""
        base = self.root / "attributions"
        if not base.exists():
            return []
        done = [d for d in base.iterdir() if (d / "meta.json").exists()]
        done.sort(key=lambda d: (d / "meta.json").stat().st_mtime)
        return [read_json(d / "query.json")["id"] for d in done]

    def save_array(self, query_id: str, name: str, array: np.ndarray) -> None:
        folder = self.attribution_dir(query_id)
        folder.mkdir(parents=True, exist_ok=True)
        _save_npy(folder / name, array)
