"""Shared test helpers for training in one process: processed rows and a local-session run."""

from __future__ import annotations

from omni_ray.config import Config
from omni_ray.data.pipeline import Preprocess
from omni_ray.data.reader import iter_rows
from omni_ray.train.loop import run
from omni_ray.train.session import ListIterator, LocalSession


def processed_rows(cfg: Config, files) -> list[dict]:
    """The rows Ray Data would stream to a worker for one annotation file or a list of them, read in
    order as one dataset (preprocessed in this process)."""
    pre = Preprocess(cfg.model, None, cfg.data.model_max_length)
    files = [str(f) for f in files] if isinstance(files, (list, tuple)) else [str(files)]
    return [pre.process_row(r) for r in iter_rows(files, None)]


def local_run(cfg: Config, rows: list[dict], checkpoint_dir: str | None = None) -> LocalSession:
    """Train ``cfg`` on ``rows`` in this process (world size 1); returns the session with its reports."""
    session = LocalSession(datasets={"train": ListIterator(rows)}, checkpoint_dir=checkpoint_dir)
    run(cfg, session, num_rows=len(rows))
    return session
