"""The freeze map, enforced while training: audit after the first step, fingerprint at every save.

``audit`` (``omni_ray.freeze``) proves after wrapping and one optimizer step that exactly the
planned parameters train and frozen ones hold no gradient and no optimizer state. The
fingerprint (per-group sums over this rank's shard of frozen weights) proves later that frozen
weights did not move. A failure on any rank stops every rank: the verdict is all-reduced, so no
rank is left waiting in a collective for one that raised.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from omni_ray.freeze import FreezeAuditError, FreezePlan, audit, format_audit, frozen_fingerprint
from omni_ray.strategies.base import Strategy

log = logging.getLogger(__name__)


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (collective)."""
    t = torch.tensor([int(flag)], dtype=torch.int64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class FreezeGuard:
    def __init__(self, engine: Strategy, plan: FreezePlan, rank: int):
        self.engine, self.plan, self.rank = engine, plan, rank
        self.fingerprint = frozen_fingerprint(engine.unwrapped())
        self.summary: dict | None = None

    def after_step(self) -> None:
        """Audit once, after the first optimizer step of this process (gradients and state exist)."""
        if self.summary is not None:
            return
        error = None
        try:
            rows = audit(self.engine.unwrapped(), self.plan, self.engine.optimizer_params,
                         self.engine.optimizer_state(), self.engine.storage_dtype)
        except FreezeAuditError as err:
            error = err
        if any_rank(error is not None):
            raise error or FreezeAuditError("freeze audit failed on another rank; see that rank's log")
        if self.rank == 0:
            log.info("%s", format_audit(rows))
        self.summary = {r.group: {"planned": r.planned_trainable, "trainable": r.trainable} for r in rows}

    def check_frozen(self) -> None:
        """Raise on every rank if any rank's frozen weights moved since wrapping (collective)."""
        moved = frozen_fingerprint(self.engine.unwrapped()) != self.fingerprint
        if any_rank(moved):
            raise FreezeAuditError(
                ("frozen weights changed on this rank" if moved else "frozen weights changed on another rank")
                + "; a frozen parameter was updated (a bug in the freeze map or engine): stopping before it is saved")
