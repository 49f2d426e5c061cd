"""Fault injection: kills, torn files, full disks and two writers on one run folder.

Every case ends in the right result (the operators bit-for-bit equal to an uninterrupted fit)
or in one clear line (exit 2, no traceback), and nothing already computed is lost. Kills run
``python -m stride_viz fit`` on the tiny model of conftest.py in a subprocess (one thread);
the test hook ``STRIDE_VIZ_FAULT`` kills or pauses a fit in the middle of a checkpoint write.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stride_viz import cli
from stride_viz.config import FitConfig
from stride_viz.data.pools import Query, load_pool
from stride_viz.engine import Stride, read_attribution
from stride_viz.integrity import RunDamaged
from stride_viz.jobs import JobError, JobStore
from stride_viz.method.checkpoint import CHECKPOINT, PREVIOUS
from stride_viz.progress import Cancelled
from stride_viz.runlock import RunLocked, lock_holder, run_lock
from stride_viz.storage import RunStore, write_json

from conftest import TINY_FIT

REPO = Path(__file__).resolve().parents[1]
# the checkpoints are kept after the fit (deleted by default) so the tests can damage them
CONFIG = {**TINY_FIT, "epochs": 2, "checkpoint_every": 2, "keep_checkpoint": True}


def _flags() -> list[str]:
    return [a for k, v in CONFIG.items() for a in ("--" + k.replace("_", "-"), str(v))]


@pytest.fixture(scope="module")
def pool_file(tmp_path_factory, tiny_pool) -> Path:
    path = tmp_path_factory.mktemp("pool") / "pool.jsonl"
    path.write_text("".join(json.dumps({"id": tiny_pool.ids[i], "text": tiny_pool.completions[i]}) + "\n"
                            for i in range(len(tiny_pool))))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, pool_file) -> Path:
    """An uninterrupted fit with one attribution (query id q0, as the CLI's --prompt names it)."""
    root = tmp_path_factory.mktemp("faults") / "reference"
    run = Stride.create_or_open(root, tiny_model, load_pool(str(pool_file)), FitConfig(**CONFIG))
    run.fit()
    run.attribute([Query("q0", "The sky is", " blue.")], continuations=False)
    return root


@pytest.fixture
def fit_args(tmp_path, tiny_model_dir, pool_file):
    def make(run: Path, *extra: str) -> list[str]:
        return ["fit", "--model", str(tiny_model_dir), "--pool", str(pool_file), "--run", str(run),
                *_flags(), *extra]
    return make


def _copy(reference: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(reference, tmp_path / "run"))


def _same_operators(run: Path, reference: Path) -> bool:
    a, b = load_file(str(run / "operators.safetensors")), load_file(str(reference / "operators.safetensors"))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _step(run: Path) -> int:
    return json.loads((run / "fit" / "state.json").read_text())["step"]


def _cut(path: Path, size: int | bytes | None = None) -> None:
    """Truncate ``path`` to ``size`` bytes (default: half), or replace it by the bytes given."""
    data = path.read_bytes()
    path.write_bytes(size if isinstance(size, bytes) else data[: len(data) // 2 if size is None else size])


def _one_line(capsys, prefix: str = "error: ") -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(prefix), err
    return line


def _spawn(args: list[str], fault: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("STRIDE_VIZ_FAULT", None)
    if fault:
        env["STRIDE_VIZ_FAULT"] = fault
    return subprocess.Popen([sys.executable, "-m", "stride_viz", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not condition():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.005)


# ------------------------------------------------------------------ kills and signals
def test_kills_mid_checkpoint_and_at_a_random_step_resume_bit_for_bit(tmp_path, fit_args, reference,
                                                                     capsys):
    run, fit = tmp_path / "run", tmp_path / "run" / "fit"
    args = fit_args(run)
    total = json.loads((reference / "fit" / "state.json").read_text())["total_steps"]
    rng = random.Random(12)
    a, b = 2 * rng.randrange(2, 4), 2 * rng.randrange(4, 6)          # checkpoint steps
    # killed once the new checkpoint is on disk under its temporary name, before any rename
    first = _spawn(args, fault=f"written:{a}")
    assert first.wait(timeout=300) == -signal.SIGKILL, first.stderr.read()
    assert _step(run) == a - 2 and list(fit.glob(f".{CHECKPOINT}.tmp-{first.pid}-*"))
    # killed between the renames: the checkpoint has become the previous one, no new one yet
    second = _spawn(args, fault=f"rotated:{b}")
    assert second.wait(timeout=300) == -signal.SIGKILL
    assert "took over the stale lock" in second.stderr.read()
    assert not (fit / CHECKPOINT).exists() and (fit / PREVIOUS).exists() and _step(run) == b - 2
    assert not list(fit.glob(f".{CHECKPOINT}.tmp-{first.pid}-*"))   # the dead writer's leftovers
    # SIGKILL from outside at a random later step (possibly mid-step)
    target = rng.randrange(b + 1, total - 6)
    third = _spawn(args)
    _wait_for(lambda: (fit / "state.json").exists() and _step(run) >= target)
    third.kill()
    assert third.wait(timeout=60) == -signal.SIGKILL
    assert not (run / "operators.safetensors").exists()
    capsys.readouterr()
    assert cli.main(args) == 0
    assert "starts again from step 0" not in capsys.readouterr().err
    assert _same_operators(run, reference)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_write_a_checkpoint_and_say_how_to_resume(sig, tmp_path, fit_args,
                                                                    reference, capsys, monkeypatch):
    def signal_at_first_step(stage, fraction, eta, message=""):
        if stage == "fit" and message.startswith("step"):
            os.kill(os.getpid(), sig)
    monkeypatch.setattr(cli, "print_progress", signal_at_first_step)
    run = tmp_path / "run"
    assert cli.main(fit_args(run)) == 130
    line = _one_line(capsys, "stopped: ")
    assert re.fullmatch(rf"stopped: fit interrupted by {sig.name} at step 1 of \d+; its checkpoint "
                        r"\S+checkpoint.safetensors is saved: run the same command .*", line), line
    assert _step(run) == 1
    monkeypatch.undo()
    assert cli.main(fit_args(run)) == 0 and _same_operators(run, reference)


# ------------------------------------------------------------------ torn and missing files
def test_damaged_checkpoints_fall_back_to_the_previous_one_then_to_scratch(tmp_path, fit_args,
                                                                         reference, capsys):
    run = _copy(reference, tmp_path)
    fit = run / "fit"
    (run / "operators.safetensors").unlink()
    _cut(fit / CHECKPOINT)
    assert cli.main(fit_args(run)) == 0
    err = capsys.readouterr().err
    assert re.search(r"warning: \S+checkpoint.safetensors is damaged \(truncated: [\d,]+ of [\d,]+ "
                     r"bytes\): set aside as .damaged; resuming from checkpoint.prev.safetensors", err)
    assert (fit / (CHECKPOINT + ".damaged")).exists() and _same_operators(run, reference)
    # both checkpoints torn: from step 0, with one warning, to the same result
    (run / "operators.safetensors").unlink()
    for name in (CHECKPOINT, PREVIOUS):
        _cut(fit / name, 5000)
    (fit / "state.json").write_text("{torn")
    assert cli.main(fit_args(run)) == 0
    assert "no intact checkpoint is left, so the fit starts again from step 0" in capsys.readouterr().err
    assert _same_operators(run, reference)


def test_fit_restart_discards_the_fit_and_keeps_the_rest(tmp_path, fit_args, reference, capsys):
    run = _copy(reference, tmp_path)
    _cut(run / "fit" / CHECKPOINT)
    assert cli.main(fit_args(run, "--restart")) == 0
    assert "damaged" not in capsys.readouterr().err          # the torn checkpoint was discarded
    assert _same_operators(run, reference) and _step(run) == json.loads(
        (reference / "fit" / "state.json").read_text())["total_steps"]
    assert read_attribution(run, "q0").scores.shape == read_attribution(reference, "q0").scores.shape


@pytest.mark.parametrize("name, cut, pattern, repair", [
    ("operators.safetensors", 1000,
     r"operators.safetensors is damaged \(truncated: 1,000 of [\d,]+ bytes\); rebuild it with "
     r"`python -m stride_viz fit --run \S+` \(from the last checkpoint", "fit-run"),
    ("run.json", 10, r"run.json is damaged \(not valid JSON: .*\); restore its copy with `cp \S+"
                     r"run.json.bak \S+run.json`", "fit-run"),
    ("membership.npz", 100, r"membership.npz is damaged \(.*\); rebuild it \(from the seed in "
                            r"run.json\) with `python -m stride_viz fit --run \S+`", "fit-run"),
    ("pool.jsonl", None, r"pool.jsonl is damaged \(.*\); rewrite it from the original pool with "
                         r"`python -m stride_viz fit --model \S+ --pool \S+ --run \S+`", "fit"),
    ("facts.json", b"[{", r"facts.json is damaged \(not valid JSON.*\); rewrite it from the original "
                      r"pool with `python -m stride_viz fit --model", "fit"),
])
def test_each_damaged_run_file_is_one_line_then_repaired(name, cut, pattern, repair, tmp_path,
                                                        fit_args, reference, capsys):
    run = _copy(reference, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != name}
    _cut(run / name, cut)
    attribute = ["attribute", "--run", str(run), "--prompt", "The sky is", "--completion", " blue.",
                 "--out", str(tmp_path / "out"), "--no-continuations"]
    assert cli.main(attribute) == 2
    assert re.search(pattern, _one_line(capsys)), name
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name in before} == before
    # the fix the line names: `fit --run RUN` alone, or fit with the original model and pool
    assert cli.main(["fit", "--run", str(run)] if repair == "fit-run" else fit_args(run)) == 0
    assert f"warning: {run / name}" in capsys.readouterr().err
    assert _same_operators(run, reference)
    assert cli.main(attribute) == 0
    assert np.array_equal(read_attribution(run, "q0").scores, read_attribution(reference, "q0").scores)


def test_lost_run_json_without_its_copy_is_one_line(tmp_path, fit_args, reference, capsys):
    run = _copy(reference, tmp_path)
    (run / "run.json").unlink()
    _cut(run / "run.json.bak", 5)
    assert cli.main(fit_args(run)) == 2
    assert re.search(r"run.json is missing; no intact copy \(run.json.bak\) is left", _one_line(capsys))
    assert (run / "operators.safetensors").exists()            # kept for whoever restores run.json


@pytest.mark.parametrize("name", ["responses.npy", "scores.npy", "path.npz", "query.json"])
def test_damaged_attribution_file_is_named_and_rewritten_by_attribute(name, tmp_path, reference,
                                                                     capsys):
    run = _copy(reference, tmp_path)
    folder = RunStore(run).attribution_dir("q0")
    _cut(folder / name, 60)
    with pytest.raises(RunDamaged, match=rf"{name} is damaged .*explain query 'q0' again"):
        read_attribution(run, "q0")
    assert cli.main(["attribute", "--run", str(run), "--prompt", "The sky is", "--completion",
                     " blue.", "--out", str(tmp_path / "out"), "--no-continuations"]) == 0
    assert np.array_equal(read_attribution(run, "q0").scores, read_attribution(reference, "q0").scores)
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]


# ------------------------------------------------------------------ full disk
def _mount_tmpfs(where: Path, size: int) -> bool:
    where.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                         capture_output=True)
    return res.returncode == 0


@pytest.mark.parametrize("disk", ["tmpfs", "patched"])
def test_full_disk_keeps_the_last_checkpoint_and_says_what_is_needed(disk, tmp_path, fit_args,
                                                                    reference, capsys, monkeypatch):
    ckpt = (reference / "fit" / CHECKPOINT).stat().st_size
    small = tmp_path / "small"
    if disk == "tmpfs":
        # room for the pool, the design and one checkpoint, not for the next one beside it
        if not _mount_tmpfs(small, (ckpt * 3 // 2 + 65535) // 4096 * 4096):
            pytest.skip("cannot mount a tmpfs here")
    else:
        small.mkdir()
        import stride_viz.method.checkpoint as checkpoint
        real, calls = checkpoint.save_file, []

        def full_after_one(tensors, path, metadata=None):
            calls.append(path)
            if len(calls) > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            real(tensors, path, metadata=metadata)
        monkeypatch.setattr(checkpoint, "save_file", full_after_one)
    try:
        run = small / "run"
        assert cli.main(fit_args(run)) == 2
        line = _one_line(capsys)
        assert re.search(rf"no space left to write {re.escape(str(run / 'fit' / CHECKPOINT))} \(needs "
                         rf"[\d.]+ [KM]B, [\d.,]+ \w+ free on \S+\); free some space .* the earlier "
                         r"files are intact", line), line
        assert _step(run) == 2 and not list((run / "fit").glob(".*tmp*"))
        moved = Path(shutil.copytree(run, tmp_path / "bigger"))
    finally:
        if disk == "tmpfs":
            subprocess.run(["umount", str(small)], check=True)
    monkeypatch.undo()
    assert cli.main(fit_args(moved)) == 0 and _same_operators(moved, reference)


def test_full_disk_while_attributing_keeps_the_previous_attribution(tmp_path, reference, capsys,
                                                                   monkeypatch):
    run = _copy(reference, tmp_path)
    folder = RunStore(run).attribution_dir("q0")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def no_space(*args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("stride_viz.engine.save_recovery", no_space)
    assert cli.main(["attribute", "--run", str(run), "--prompt", "The sky is", "--completion", " blue.",
                     "--out", str(tmp_path / "out"), "--no-continuations"]) == 2
    assert re.search(r"no space left to write \S+q0 \(needs more than [\d,]+ \w+, .* free on ",
                     _one_line(capsys))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]


# ------------------------------------------------------------------ two writers
def test_a_second_fit_refuses_or_waits_and_never_repeats_the_work(tmp_path, fit_args, reference,
                                                                 capsys):
    run = tmp_path / "run"
    # the first fit pauses 6 s inside its step-2 checkpoint, holding the run's lock
    first = _spawn(fit_args(run), fault="written:2:6")
    _wait_for(lambda: list((run / "fit").glob(f".{CHECKPOINT}.tmp-*")))
    assert lock_holder(run)["pid"] == first.pid
    assert cli.main(fit_args(run)) == 2
    assert re.search(rf"\S+run is being written by another fit \(pid {first.pid}, since \S+\); wait "
                     r"for it to finish \(or stop it\), or add --wait", _one_line(capsys))
    assert cli.main(fit_args(run, "--wait")) == 0
    err = capsys.readouterr().err
    assert f"waiting for {run}: it is being written by another fit (pid {first.pid}" in err
    assert "operators already fitted: reused" in err and "step 1/" not in err
    assert first.wait(timeout=120) == 0 and _same_operators(run, reference)
    assert lock_holder(run) is None


def test_dashboard_fit_waits_for_the_lock_and_can_be_cancelled(tmp_path, tiny_model, pool_file):
    run = Stride.create_or_open(tmp_path / "run", tiny_model, load_pool(str(pool_file)),
                                FitConfig(**CONFIG))
    with run_lock(run.store.root, "fit"):
        with pytest.raises(RunLocked, match=rf"another fit \(pid {os.getpid()}"):
            run.fit()
        polls = iter(range(100))
        with pytest.raises(Cancelled, match="stopped while waiting"):
            run.fit(wait=True, should_stop=lambda: next(polls) >= 3)
    assert not run.store.is_fitted()


def test_two_writers_of_one_attribution_never_mix_their_files(tmp_path):
    store = RunStore(tmp_path / "run")

    def write(tag: str) -> None:
        for i in range(25):
            with store.writing_attribution("q") as folder:
                for name in ("query.json", "scores.json", "meta.json"):
                    write_json(folder / name, [tag, i])

    threads = [threading.Thread(target=write, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    folder = store.attribution_dir("q")
    contents = {json.loads((folder / n).read_text())[0] for n in ("query.json", "scores.json", "meta.json")}
    assert len(contents) == 1 and json.loads((folder / "meta.json").read_text())[1] == 24
    assert sorted(p.name for p in folder.parent.iterdir()) == [".q.lock", "q"]


# ------------------------------------------------------------------ the jobs database
def test_jobs_db_survives_a_writer_killed_mid_transaction(tmp_path):
    db = tmp_path / "jobs.sqlite"
    store = JobStore(db)
    job_id = store.create("sleep", {"seconds": 1}, title="kept")
    code = ("import os, signal, sqlite3, sys\n"
            "con = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "con.execute('BEGIN IMMEDIATE')\n"
            "con.execute(\"UPDATE jobs SET title = 'torn'\")\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    assert subprocess.run([sys.executable, "-c", code, str(db)]).returncode == -signal.SIGKILL
    assert store.get(job_id).title == "kept"
    assert store.get(store.create("sleep", {"seconds": 1})).state == "queued"


def test_jobs_db_locked_too_long_is_one_line(tmp_path):
    db = tmp_path / "jobs.sqlite"
    store = JobStore(db, timeout=0.2)
    job_id = store.create("sleep", {"seconds": 1})
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(JobError, match=r"stayed locked by another process for 0.2 s") as e:
            store.create("sleep", {"seconds": 1})
        assert "\n" not in str(e.value)
        assert store.get(job_id).state == "queued"             # readers are not blocked (WAL)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    store.create("sleep", {"seconds": 1})


def test_damaged_jobs_db_is_moved_aside_and_replaced(tmp_path):
    db = tmp_path / "jobs.sqlite"
    JobStore(db).create("sleep", {"seconds": 1})
    db.write_bytes(b"not a database" * 300)
    store = JobStore(db)
    assert re.fullmatch(r"the job database \S+ was damaged \(.*\); it was moved to "
                        r"jobs.sqlite.damaged-[\d-]+ and a fresh one started \(the run folders "
                        r"are untouched\)", store.notice)
    assert len(list(tmp_path.glob("jobs.sqlite.damaged-*"))) >= 1 and store.list() == []
    job_id = store.create("sleep", {"seconds": 1})
    db.write_bytes(b"\0garbage" * 1000)                           # damaged while in use
    with pytest.raises(JobError, match="was damaged .* try it again"):
        store.get(job_id)
    assert store.get(store.create("sleep", {"seconds": 1})).state == "queued"
