"""The freeze map and finite numbers, enforced while training.

Freeze map: audit after the first step, fingerprint at every save. Finite numbers
(``FiniteGuard``): steps whose gradients are not finite are skipped by the engines and counted
here; too many in a row stop the run naming the step, and weights that are not finite are
never saved.

``audit`` (``omni_ray.freeze``) proves after wrapping and one optimizer step that exactly the
planned parameters train and frozen ones hold no gradient and no optimizer state. The
fingerprint (per-group sums over this rank's shard of frozen weights) proves later that frozen
weights did not move. A failure on any rank stops every rank: the verdict is all-reduced, so no
rank is left waiting in a collective for one that raised.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist

from omni_ray.errors import UserError
from omni_ray.freeze import FreezeAuditError, FreezePlan, audit, format_audit, frozen_fingerprint
from omni_ray.strategies.base import StepStats, Strategy

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


class NonFiniteError(UserError, RuntimeError):
    """Training diverged: gradients not finite for too many steps in a row, or weights not finite before a save."""


class FiniteGuard:
    """Counts optimizer steps skipped for non-finite gradients; stops a run that diverged.

    The engines skip such a step themselves (``StepStats.skipped``) from the global gradient norm,
    so every rank sees the same streak and stops at the same step. Weights are checked before
    every save by :func:`check_finite_weights` (``train.checkpoint.save``).
    """

    def __init__(self, max_nonfinite_steps: int):
        self.limit = max_nonfinite_steps
        self.streak, self.first_bad, self.applied = 0, 0, 0

    def after_step(self, step: int, stats: StepStats, last: bool = False) -> None:
        """Raise past ``limit`` non-finite steps in a row, or at the ``last`` step when none was applied."""
        if not (stats.skipped or not math.isfinite(stats.grad_norm)):
            self.streak, self.applied = 0, self.applied + 1
            return
        self.streak += 1
        self.first_bad = self.first_bad if self.streak > 1 else step
        if self.streak > self.limit:
            raise NonFiniteError(
                f"train.max_nonfinite_steps: stopped at step {step}: {self.streak} optimizer steps in a row (steps "
                f"{self.first_bad}-{step}) had gradients that are not finite (grad norm {stats.grad_norm}); each was "
                f"skipped, the run diverged: lower train.lr, use train.precision: bf16 or fp32 instead of fp16, or "
                f"raise train.max_nonfinite_steps (now {self.limit}). The checkpoints before step {self.first_bad} "
                "are whole")
        if last and self.applied == 0:
            raise NonFiniteError(
                f"step {step}: all {self.streak} optimizer steps since step {self.first_bad} were skipped for non-finite "
                "gradients, so nothing was trained and no checkpoint is written: lower train.lr, or use "
                "train.precision: bf16 or fp32 instead of fp16")


def check_finite_weights(engine: Strategy, step: int) -> None:
    """Raise on every rank if any rank's trained weights hold NaN or inf (collective; before a save)."""
    bad = any(not bool(torch.isfinite(t).all()) for t in engine.local_trained_tensors())
    if any_rank(bad):
        raise NonFiniteError(
            f"step {step}: trained weights hold NaN or inf ({'on this rank' if bad else 'on another rank'}), so no "
            "checkpoint is written for this step; the run diverged: lower train.lr or train.max_grad_norm, or use "
            "train.precision: bf16 or fp32; the earlier checkpoints are whole")
