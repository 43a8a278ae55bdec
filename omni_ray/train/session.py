"""The one seam between the training loop and Ray Train.

``RaySession`` reads the Ray Train context; ``LocalSession`` is the same interface for one
plain process (a GPU host without Ray, a debugger). Everything below the loop gets plain
numbers (rank, world size) and plain objects from here; nothing else imports ``ray.train``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch


class ListIterator:
    """A minimal stand-in for Ray's DataIterator over in-memory processed rows (the local session).

    Yields numpy batches like ``iter_batches(batch_format="numpy")``; ``repeat`` cycles the rows
    (benchmarks). Shuffle arguments are ignored: the rows come in the order given.
    """

    def __init__(self, rows: list[dict], repeat: bool = False):
        self.rows, self.repeat = rows, repeat

    def iter_batches(self, batch_size: int, **_: Any) -> Iterator[dict]:
        import numpy as np

        while True:
            for start in range(0, len(self.rows), batch_size):
                chunk = self.rows[start : start + batch_size]
                yield {key: np.array([row[key] for row in chunk], dtype=object) for key in chunk[0]}
            if not self.repeat:
                return


@dataclass
class LocalSession:
    datasets: dict[str, Iterable] = field(default_factory=dict)
    checkpoint_dir: str | None = None
    reports: list[dict] = field(default_factory=list)
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self):
        import torch.distributed as dist

        if not dist.is_initialized():
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend, rank=0, world_size=1)

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")

    def dataset_shard(self, name: str):
        return self.datasets[name]

    def report(self, metrics: dict, checkpoint_dir: str | None = None, async_upload: bool = False) -> None:
        self.reports.append({**metrics, "checkpoint": checkpoint_dir})
        print({k: v for k, v in metrics.items() if not isinstance(v, dict)}, flush=True)

    def latest_checkpoint(self) -> str | None:
        return self.checkpoint_dir

    def preemption_notice(self) -> bool:
        return False


class RaySession:
    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()

    @property
    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def dataset_shard(self, name: str):
        import ray.train

        return ray.train.get_dataset_shard(name)

    def report(self, metrics: dict, checkpoint_dir: str | None = None, async_upload: bool = False) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        # ASYNC: the upload to storage runs in the background and training goes on; the local
        # directory is deleted once it is uploaded (each checkpoint has its own directory).
        mode = ray.train.CheckpointUploadMode.ASYNC if async_upload and checkpoint else ray.train.CheckpointUploadMode.SYNC
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_mode=mode,
                         delete_local_checkpoint_after_upload=bool(checkpoint))

    @staticmethod
    def run_uri(cfg) -> str:
        """Where Ray Train keeps this run: storage_path/name (local path or s3://)."""
        from omni_ray import storage as st

        base = cfg.run.storage_path
        return st.join(base if st.is_remote(base) else os.path.expanduser(base), cfg.run.name)

    def preemption_notice(self) -> bool:
        """True on every rank once any worker's node is being reclaimed (a barrier across ranks)."""
        import ray.train

        return ray.train.get_preemption_info() is not None

    def latest_checkpoint(self) -> str | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        return checkpoint.to_directory()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
