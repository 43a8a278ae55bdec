"""A full disk while saving a checkpoint: a clear error, the previous checkpoint whole, the rerun resumes from it (issue 19, item 4).

The disks are real: small tmpfs mounts (root only; skipped elsewhere). The tiny MiniCPM-V 4.6
trains through the real loop in this process (``LocalSession``); its checkpoint is ~1 MB.

* The checkpoint's own directory (``TMPDIR``) fills while step 2 is written: the error names
  the path, the bytes needed and the bytes free; nothing of step 2 is left, step 1 reads back
  whole, and the same run resumed from it finishes.
* The run directory (``run.storage_path``, where Ray Train copies each checkpoint) has no room
  for step 2: refused before the copy, naming ``run.storage_path`` and the bytes. A copy that
  ran out of space anyway (pyarrow's ``copy_files``, what Ray Train uses, into the full disk)
  leaves a partial ``checkpoint_*`` directory, and ``find_latest`` passes over it to step 1.

Run: python -m pytest -q tests/hostile/test_hostile_diskfull.py
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from local_training import write_dataset
from omni_ray.config import load_config
from omni_ray.models.tiny import build_tiny_minicpmv
from omni_ray.train import checkpoint as ckpt
from omni_ray.train.loop import run
from omni_ray.train.session import ListIterator, LocalSession
from trainkit import processed_rows


@contextlib.contextmanager
def tmpfs(path: Path, size_kib: int):
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("diskfull")
    model = build_tiny_minicpmv(tmp / "model")
    data = write_dataset(tmp)
    return tmp, model, data


def _config(setup, max_steps: int):
    tmp, model, data = setup
    return load_config({
        "model": {"path": str(model), "dtype": "float32"},
        "data": {"train": data, "model_max_length": 512, "shuffle": False},
        "freeze": {"vision": "frozen", "projector": "full", "llm": "frozen"},
        "train": {"max_steps": max_steps, "micro_batch_size": 2, "lr": 1e-3, "precision": "fp32"},
        "checkpoint": {"every_n_steps": 1},
        "run": {"name": "diskfull", "storage_path": str(tmp / "runs")},
    })


def _run(cfg, rows, checkpoint_dir=None, run_uri=None) -> tuple[LocalSession, Exception | None]:
    session = LocalSession(datasets={"train": ListIterator(rows)}, checkpoint_dir=checkpoint_dir)
    try:
        run(cfg, session, num_rows=len(rows), run_uri=run_uri)
    except ckpt.CheckpointError as err:
        return session, err
    return session, None


def _saved(session) -> dict[int, str]:
    return {r["step"]: r["checkpoint"] for r in session.reports if r.get("checkpoint")}


def test_disk_full_while_writing_keeps_the_last_checkpoint(setup, monkeypatch):
    tmp, _, data = setup
    cfg = _config(setup, 2)
    rows = processed_rows(cfg, data)
    with tmpfs(tmp / "small_tmp", 1536) as small:  # room for one ~1 MB checkpoint, not two
        monkeypatch.setattr(tempfile, "tempdir", str(small))
        session, err = _run(cfg, rows)
        monkeypatch.setattr(tempfile, "tempdir", None)
        assert err is not None, session.reports
        message = str(err)
        assert "no space left on device while writing the checkpoint of step 2" in message
        assert str(small) in message and "bytes" in message and "are free" in message
        saved = _saved(session)
        assert list(saved) == [1]
        assert [p.name for p in small.iterdir()] == [Path(saved[1]).name]  # nothing of step 2 is left
        assert ckpt.read_manifest(saved[1])["step"] == 1  # every file matches its checksum
        first = str(tmp / "step1")
        shutil.copytree(saved[1], first)
    # The same run, given room, resumes from step 1 and finishes.
    session, err = _run(cfg, rows, checkpoint_dir=first)
    assert err is None
    steps = [r for r in session.reports if "loss" in r]
    assert [r["step"] for r in steps] == [2] and steps[0]["resumed_from_step"] == 1


def test_run_storage_without_room_refuses_and_partial_copies_are_skipped(setup):
    tmp, _, data = setup
    rows = processed_rows(_config(setup, 1), data)
    first, _ = _run(_config(setup, 1), rows)
    second, _ = _run(_config(setup, 2), rows, checkpoint_dir=_saved(first)[1])  # a step-2 checkpoint to copy
    step1, step2 = _saved(first)[1], _saved(second)[2]
    local = pafs.LocalFileSystem()
    with tmpfs(tmp / "small_runs", 2048) as runs:
        run_dir = runs / "diskfull"
        (run_dir / "checkpoint_000000").mkdir(parents=True)
        pafs.copy_files(step1, str(run_dir / "checkpoint_000000"), source_filesystem=local,
                        destination_filesystem=local)
        filler = runs / "filler"
        filler.write_bytes(b"\0" * (ckpt._free_bytes(runs) - 400_000))  # ~0.4 MB left: less than a checkpoint
        # The run resumes from the checkpoint in its run directory; step 2's does not fit there.
        session, err = _run(_config(setup, 2), rows, run_uri=str(run_dir))
        assert err is not None and f"run.storage_path: {run_dir} has" in str(err), session.reports
        assert "the checkpoint of step 2 needs" in str(err) and "bytes free" in str(err)
        assert session.reports[0]["resumed_from_step"] == 1 and not _saved(session)
        # A copy that runs out of space anyway (another writer filled the disk) leaves a partial directory.
        (run_dir / "checkpoint_000001").mkdir()
        with pytest.raises(OSError):
            pafs.copy_files(step2, str(run_dir / "checkpoint_000001"), source_filesystem=local,
                            destination_filesystem=local)
        assert (run_dir / "checkpoint_000001").is_dir()
        assert ckpt.find_latest(str(run_dir)) == (1, str(run_dir / "checkpoint_000000"))
        # Space freed: the same command resumes from step 1 and saves step 2 whole.
        filler.unlink()
        shutil.rmtree(run_dir / "checkpoint_000001")
        session, err = _run(_config(setup, 2), rows, run_uri=str(run_dir))
        assert err is None and [r["step"] for r in session.reports if "loss" in r] == [2]
        assert ckpt.read_manifest(_saved(session)[2])["step"] == 2
