"""The run directory: everything a fit and its attributions wrote, self-describing on disk.

Layout (pages and reports read only these files, never a model):

    RUN/run.json                 config, package versions, model and pool hashes, model shape
    RUN/pool.jsonl               the pool's rows, so views need no original file
    RUN/facts.json               planted-fact ground truth, when the pool has any
    RUN/membership.npz           subset design, int8 CSR (K, n)
    RUN/fit/checkpoint.safetensors, RUN/fit/state.json   resumable training state
    RUN/operators.safetensors    the fitted basis and operators (no pickle anywhere)
    RUN/attributions/<query>/    query.json, responses.npy, scores.npy, backprojection.npy,
                                 path.npz, continuations.json, meta.json, and tokens.npz when
                                 per-token scores were asked for (stride_viz.method.tokens)
    RUN/run.json.bak             a copy of run.json (the one file nothing else can rebuild)
    RUN/writer.lock              held by the one process that fits (see stride_viz.runlock)

Every write is atomic (:mod:`stride_viz.integrity`): a killed or out-of-space write leaves the
previous file. Every read is checked: a missing or damaged file raises ``RunDamaged`` with
the command that repairs it. An attribution is written into a private folder and swapped in
whole, under a short per-query lock, so two processes explaining the same query never mix
their files.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import scipy.sparse as sp

from stride_viz.config import ConfigError, FitConfig, config_diff
from stride_viz.data.pools import Fact, Pool, Query, make_pool
from stride_viz.integrity import (RunDamaged, atomic_write, disk_full, is_enospc, pid_alive,
                                  read_checked, safetensors_problem, sweep_temporaries, temp_owner, temp_path,
                                  warn, write_text_atomic)
from stride_viz.runlock import file_lock

__all__ = ["RunStore", "RunMismatch", "RunDamaged", "write_json", "read_json", "safe_name"]

FORMAT_VERSION = 1


class RunMismatch(ConfigError):
    """A run directory reopened with another model, pool or configuration."""


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename): readers never see half a file."""
    write_text_atomic(path, json.dumps(data, indent=1, ensure_ascii=False))


def read_json(path: Path, fix: Optional[str] = None) -> Any:
    """Parse a JSON file; with ``fix``, a missing or damaged file raises RunDamaged naming it."""
    if fix is None:
        return json.loads(Path(path).read_text())
    return read_checked(path, lambda p: json.loads(p.read_text()), fix)


def safe_name(text: str) -> str:
    """A query id usable as a folder name (other characters become '_')."""
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", text)[:100]
    return name if name not in ("", ".", "..") else "_" + name


def _save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda tmp: np.save(tmp, array), nbytes=array.nbytes, suffix=".npy")


def _fingerprint_free(config: dict) -> dict:
    """A stored config without the fields that do not change a fit's result (device,
    checkpoint interval): older runs stored some of them."""
    free = {f.name for f in fields(FitConfig) if not f.metadata.get("fingerprint", True)}
    return {k: v for k, v in config.items() if k not in free}


class RunStore:
    """Paths and checked readers / atomic writers of one run directory.

    Readers raise :class:`RunDamaged` (the file and the fix in one line); writers that can
    repair a file (a fit) pass ``repair`` / ``rebuild`` and get a one-line warning instead.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # ------------------------------------------------------------ paths
    @property
    def meta_path(self) -> Path:
        return self.root / "run.json"

    @property
    def meta_backup_path(self) -> Path:
        return self.root / "run.json.bak"

    @property
    def fit_dir(self) -> Path:
        return self.root / "fit"

    @property
    def operators_path(self) -> Path:
        return self.root / "operators.safetensors"

    def attribution_dir(self, query_id: str) -> Path:
        return self.root / "attributions" / safe_name(query_id)

    def exists(self) -> bool:
        """Whether the folder is a run (also when its run.json is lost but its work is not)."""
        return any(p.exists() for p in (self.meta_path, self.meta_backup_path,
                                        self.operators_path, self.fit_dir / "state.json"))

    def is_fitted(self) -> bool:
        return self.operators_path.exists()

    # ------------------------------------------------------------ fixes named in messages
    def fit_command(self, meta: Optional[dict] = None) -> str:
        """The fit command that repairs this run (with the model and pool when ``meta`` is given)."""
        if meta is None:
            return f"python -m stride_viz fit --run {self.root}"
        return (f"python -m stride_viz fit --model {meta['model']['spec']} --pool "
                f"{meta['pool']['spec']} --run {self.root}")

    def _operators_fix(self) -> str:
        return (f"rebuild it with `{self.fit_command()}` (from the last checkpoint when one is "
                "intact, else by fitting again)")

    # ------------------------------------------------------------ metadata
    def read_meta(self, repair: bool = False) -> dict:
        """run.json; when it is damaged, its copy run.json.bak is restored with a warning
        (``repair``) or named in the error."""
        if not self.exists():
            raise FileNotFoundError(f"{self.root} is not a STRIDE run directory (no run.json). "
                                    "Create one with `python -m stride_viz fit`.")
        try:
            return read_checked(self.meta_path, _parse_meta, "")
        except RunDamaged as e:
            try:
                meta = read_checked(self.meta_backup_path, _parse_meta, "")
            except RunDamaged:
                raise RunDamaged(e.path, e.problem, "no intact copy (run.json.bak) is left to "
                                 "restore it from: restore it from a backup, or fit a new run "
                                 "with another --run folder") from None
            if not repair:
                raise RunDamaged(e.path, e.problem, f"restore its copy with `cp "
                                 f"{self.meta_backup_path} {self.meta_path}` (any fit of this "
                                 "run does it for you)") from None
            warn(f"warning: {e.path} {e.problem}; restored it from {self.meta_backup_path}")
            write_json(self.meta_path, meta)
            return meta

    def write_meta(self, meta: dict) -> None:
        data = {"version": FORMAT_VERSION, **meta}
        write_json(self.meta_path, data)
        write_json(self.meta_backup_path, data)

    def check_meta(self, expected: dict, repair: bool = False) -> None:
        """Refuse to reuse a run whose model, pool or configuration differ from ``expected``."""
        meta = self.read_meta(repair=repair)
        problems = []
        for key, label in (("model", "model"), ("pool", "pool")):
            old_hash, new_hash = meta[key]["hash"], expected[key]["hash"]
            if old_hash != new_hash:
                problems.append(f"{label}: {meta[key]['spec']} ({old_hash}) -> "
                                f"{expected[key]['spec']} ({new_hash})")
        problems += config_diff(_fingerprint_free(meta["config"]),
                                _fingerprint_free(expected["config"]))
        if problems:
            raise RunMismatch(
                f"The run directory {self.root} was made with other settings; "
                f"differences: {'; '.join(problems)}. Use a new --run directory for the new "
                "settings, or the original settings to reuse this run.")

    # ------------------------------------------------------------ pool and design
    def write_pool(self, pool: Pool) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps({"id": i, "prompt": p, "completion": c}, ensure_ascii=False) + "\n"
                       for i, p, c in zip(pool.ids, pool.prompts, pool.completions))
        write_text_atomic(self.root / "pool.jsonl", text)
        write_json(self.root / "facts.json", [
            {"query": {"id": f.query.id, "prompt": f.query.prompt, "completion": f.query.completion},
             "source_ids": list(f.source_ids)} for f in pool.facts])

    def read_pool(self) -> Pool:
        """pool.jsonl and facts.json, checked against the pool's hash in run.json."""
        meta = self.read_meta()
        fix = f"rewrite it from the original pool with `{self.fit_command(meta)}`"
        path = self.root / "pool.jsonl"

        def parse(p: Path) -> Pool:
            rows = [json.loads(line) for line in p.read_text().splitlines()]
            return make_pool(meta["pool"]["spec"], [r["id"] for r in rows],
                             [r["prompt"] for r in rows], [r["completion"] for r in rows])

        pool = read_checked(path, parse, fix)
        if pool.hash != meta["pool"]["hash"]:
            raise RunDamaged(path, f"is damaged (its {len(pool)} rows are not the pool of run.json: "
                             f"{meta['pool']['n']} rows, hash {meta['pool']['hash']})", fix)
        facts_path = self.root / "facts.json"
        if facts_path.exists():
            facts = read_checked(facts_path, lambda p: [Fact(Query(**f["query"]), tuple(f["source_ids"]))
                                                        for f in json.loads(p.read_text())], fix)
            pool = make_pool(pool.name, pool.ids, pool.prompts, pool.completions, facts=facts)
        return pool

    def check_pool(self, pool: Pool) -> None:
        """Rewrite pool.jsonl / facts.json from ``pool`` (the run's own) when they are damaged."""
        try:
            self.read_pool()
        except RunDamaged as e:
            warn(f"warning: {e.path} {e.problem}; rewrote it from the pool given")
            self.write_pool(pool)

    def write_membership(self, M: sp.csr_matrix) -> None:
        atomic_write(self.root / "membership.npz", lambda tmp: sp.save_npz(tmp, M),
                     nbytes=M.data.nbytes + M.indices.nbytes + M.indptr.nbytes, suffix=".npz")

    def read_membership(self, rebuild: Optional[Callable[[], sp.csr_matrix]] = None) -> sp.csr_matrix:
        """The (K, n) design; when damaged, ``rebuild()`` makes it again (with a warning)."""
        meta = self.read_meta()
        shape = (int(meta["config"]["subsets"]), int(meta["pool"]["n"]))

        def parse(p: Path) -> sp.csr_matrix:
            M = sp.load_npz(p).tocsr()
            if M.shape != shape:
                raise ValueError(f"a {M.shape[0]} x {M.shape[1]} design, run.json says "
                                 f"{shape[0]} x {shape[1]}")
            return M

        path = self.root / "membership.npz"
        try:
            return read_checked(path, parse, f"rebuild it (from the seed in run.json) with "
                                             f"`{self.fit_command()}`")
        except RunDamaged as e:
            if rebuild is None:
                raise
            warn(f"warning: {e.path} {e.problem}; rebuilt it from the seed in run.json")
            M = rebuild()
            self.write_membership(M)
            return M

    # ------------------------------------------------------------ operators
    def read_operators(self, device: str = "cpu") -> dict:
        """The tensors of operators.safetensors, or RunDamaged (truncated, unreadable)."""
        from safetensors.torch import load_file

        def parse(p: Path) -> dict:
            problem = safetensors_problem(p)
            if problem:
                raise ValueError(problem)
            return load_file(str(p), device=device)

        return read_checked(self.operators_path, parse, self._operators_fix())

    def write_operators(self, tensors: dict) -> None:
        from safetensors.torch import save_file
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values()) + 4096
        atomic_write(self.operators_path, lambda tmp: save_file(tensors, str(tmp)), nbytes=nbytes)

    def discard_fit(self) -> None:
        """Remove the checkpoints and the operators (``fit --restart``); run.json, the pool,
        the design and the attributions stay."""
        shutil.rmtree(self.fit_dir, ignore_errors=True)
        self.operators_path.unlink(missing_ok=True)

    def operators_problem(self) -> Optional[str]:
        """Why operators.safetensors is unusable (None when it looks whole; no tensor is read)."""
        try:
            return safetensors_problem(self.operators_path)
        except OSError as e:
            return str(e)

    def damaged_operators(self, problem: str) -> RunDamaged:
        return RunDamaged(self.operators_path, f"is damaged ({problem})", self._operators_fix())

    # ------------------------------------------------------------ attributions
    def query_ids(self) -> list[str]:
        """Ids of the finished attributions, oldest first (damaged ones are left out)."""
        base = self.root / "attributions"
        if not base.exists():
            return []
        done = [d for d in base.iterdir()
                if not d.name.startswith(".") and (d / "meta.json").exists()]
        done.sort(key=lambda d: (d / "meta.json").stat().st_mtime)
        ids = []
        for d in done:
            try:
                ids.append(read_json(d / "query.json")["id"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return ids

    def attribution_fix(self, query_id: str) -> str:
        return (f"explain query {query_id!r} again (`python -m stride_viz attribute --run "
                f"{self.root} ...` or the dashboard); the other queries are not affected")

    @contextmanager
    def writing_attribution(self, query_id: str) -> Iterator[Path]:
        """A private folder to write one query's files into; on a clean exit it replaces
        ``attributions/<query>/`` whole, under a short per-query lock, so that a reader or a
        second writer never sees a mix of two attributions, and a killed or out-of-space write
        leaves the previous attribution intact."""
        final = self.attribution_dir(query_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        lock = final.with_name(f".{final.name}.lock")
        with file_lock(lock):
            _restore_swapped(final)
        sweep_temporaries(final.parent, final.name)
        tmp = temp_path(final)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            yield tmp
            with file_lock(lock):
                old = temp_path(final, ".old")
                if final.exists():
                    os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
        except BaseException as e:
            written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) if tmp.exists() else 0
            shutil.rmtree(tmp, ignore_errors=True)
            if is_enospc(e):
                raise disk_full(final, written, at_least=True) from None
            raise

    @contextmanager
    def updating_attribution(self, query_id: str) -> Iterator[Path]:
        """Hold the per-query lock to read-modify-write a file of a finished attribution."""
        final = self.attribution_dir(query_id)
        with file_lock(final.with_name(f".{final.name}.lock")):
            yield final

    def save_array(self, query_id: str, name: str, array: np.ndarray) -> None:
        folder = self.attribution_dir(query_id)
        folder.mkdir(parents=True, exist_ok=True)
        _save_npy(folder / name, array)


def _parse_meta(path: Path) -> dict:
    meta = json.loads(path.read_text())
    missing = [k for k in ("config", "model", "pool") if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ValueError(f"no {', '.join(missing)} in it")
    return meta


def _restore_swapped(final: Path) -> None:
    """An attribution whose writer was killed between its two renames: put the old one back."""
    if final.exists():
        return
    for old in final.parent.glob(f".{final.name}.tmp-*.old"):
        pid = temp_owner(old)
        if pid is not None and not pid_alive(pid):
            os.replace(old, final)
            return
