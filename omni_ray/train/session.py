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
    """Ray's DataIterator, for in-memory processed rows (the local session).

    Yields numpy batches like ``iter_batches(batch_format="numpy")`` and shuffles like Ray's
    local shuffle: a buffer of ``local_shuffle_buffer_size`` rows, drawn from at random by a
    generator seeded with ``local_shuffle_seed``, so local runs see the same kind of seeded,
    per-epoch order a Ray run does. ``repeat`` cycles the rows (benchmarks).
    """

    def __init__(self, rows: list[dict], repeat: bool = False):
        self.rows, self.repeat = rows, repeat

    def iter_batches(self, batch_size: int, local_shuffle_buffer_size: int | None = None,
                     local_shuffle_seed: int | None = None, **_: Any) -> Iterator[dict]:
        import numpy as np

        while True:
            rows = list(self._order(local_shuffle_buffer_size, local_shuffle_seed))
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                yield {key: np.array([row[key] for row in chunk], dtype=object) for key in chunk[0]}
            if not self.repeat:
                return

    def _order(self, buffer_size: int | None, seed: int | None) -> Iterator[dict]:
        if not buffer_size:
            yield from self.rows
            return
        import random

        rng, buffer = random.Random(seed), []
        for row in self.rows:
            buffer.append(row)
            if len(buffer) >= buffer_size:
                yield buffer.pop(rng.randrange(len(buffer)))
        while buffer:
            yield buffer.pop(rng.randrange(len(buffer)))


@dataclass
class LocalSession:
    datasets: dict[str, Iterable] = field(default_factory=dict)
    checkpoint_dir: str | None = None
    reports: list[dict] = field(default_factory=list)
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    stop: bool = False  # set (a signal handler, a test) to checkpoint at the next step boundary and end

    def __post_init__(self):
        import torch.distributed as dist

        if not dist.is_initialized():
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            # What a launcher sets: DeepSpeed's engine refuses to start without LOCAL_RANK.
            for name in ("RANK", "LOCAL_RANK"):
                os.environ.setdefault(name, "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend, rank=0, world_size=1)

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")

    def dataset_shard(self, name: str):
        return self.datasets[name]

    def report(self, metrics: dict, checkpoint_dir: str | None = None, async_upload: bool = False) -> None:
        self.reports.append({**metrics, "checkpoint": checkpoint_dir})

    def latest_checkpoint(self) -> str | None:
        return self.checkpoint_dir

    def preemption_notice(self) -> bool:
        return False

    def stop_requested(self) -> bool:
        return self.stop


class RaySession:
    def __init__(self, stop_box=None):
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()
        # The driver's inbox actor (observe.watch): rank 0 asks it whether the driver got SIGINT/SIGTERM.
        self.stop_box = stop_box if self.rank == 0 else None
        self._asked = None
        self._stop = False

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

    def preemption_notice(self) -> bool:
        """True on every rank once any worker's node is being reclaimed (a barrier across ranks)."""
        import ray.train

        return ray.train.get_preemption_info() is not None

    def stop_requested(self) -> bool:
        """Whether the driver asked to stop (rank 0's view; the loop shares it with every rank).

        Never waits: the question is sent at one step boundary and its answer read at a later
        one, so a step costs no round trip to the driver's node.
        """
        if self.stop_box is None or self._stop:
            return self._stop
        import ray

        if self._asked is None:
            self._asked = self.stop_box.stop_requested.remote()
        ready, _ = ray.wait([self._asked], timeout=0)
        if ready:
            self._stop, self._asked = bool(ray.get(self._asked)), None
        return self._stop

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
