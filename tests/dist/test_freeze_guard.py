"""A frozen weight that moves on any rank stops every rank before the checkpoint is written.

Two gloo processes; rank 1 alone changes a frozen tensor. Both must raise FreezeAuditError from
the same collective check (a rank that raised alone would leave the other waiting forever).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from omni_ray.freeze import FreezeAuditError
from omni_ray.train.guard import FreezeGuard

pytestmark = pytest.mark.dist


class _Engine:
    def __init__(self, model):
        self.model = model

    def unwrapped(self):
        return self.model


def _rank(rank: int, port: int, out: str, tamper_rank: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    guard = FreezeGuard(_Engine(model), plan=None, rank=rank)
    guard.check_frozen()  # nothing moved yet
    model[1].weight.data += 1  # a trained tensor may move
    guard.check_frozen()
    if rank == tamper_rank:
        with torch.no_grad():
            model[0].weight[0, 0] += 1e-3
    try:
        guard.check_frozen()
        verdict = "ok"
    except FreezeAuditError as err:
        verdict = str(err)
    with open(os.path.join(out, f"rank{rank}"), "w") as f:
        f.write(verdict)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_frozen_tensor_changed_on_one_rank_stops_every_rank(tmp_path):
    mp.spawn(_rank, args=(_free_port(), str(tmp_path), 1), nprocs=2, join=True)
    verdicts = {r: (tmp_path / f"rank{r}").read_text() for r in (0, 1)}
    assert "frozen weights changed on this rank" in verdicts[1]
    assert "frozen weights changed on another rank" in verdicts[0]
