"""The engine interface: every member the training loop, checkpoints and the audit use.

Both engines (``FSDPStrategy``, ``DeepSpeedStrategy``) implement all of it with the same
signatures and the same meanings, so the loop never asks which engine it has and never probes
with ``hasattr``. What an engine can or cannot do is a declared attribute
(``supports_sharded_checkpoint``), not a missing method.

Lifecycle, on every rank::

    engine = build_strategy(strategy_cfg, train_cfg, device)
    model = engine.wrap(model, spec)                  # training layout (sharded, dtype)
    engine.setup_optimizer(param_groups, total_steps)  # optimizer + LR schedule (+ DeepSpeed engine)
    engine.load_trainable(...) / engine.load_state(...)   # on resume
    loop: engine.forward(batch); engine.backward(loss) x grad_accum; stats = engine.step(); engine.zero_grad()
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from omni_ray.config import TrainConfig


@dataclass(frozen=True)
class StepStats:
    """What one optimizer step reports, with one meaning in every engine.

    ``grad_norm``: the global L2 norm of the trainable gradients before clipping.
    ``skipped``: this step's update was skipped: its gradients were not finite (an fp16 overflow, a
    diverged loss), so weights, optimizer state and schedule were left as they were.
    ``skipped_total``: steps skipped since the run started (restored on resume).
    """

    grad_norm: float
    skipped: bool
    skipped_total: int


class Strategy(ABC):
    name: str
    supports_sharded_checkpoint: bool = False
    """True when ``save_sharded``/``load_sharded`` write and read a per-rank checkpoint."""
    sharded_layout: str = ""
    """The manifest's ``layout`` for what ``save_sharded`` writes ("sharded": DCP; "zero-sharded")."""
    shards_trainable_only: bool = False
    """True when ``save_sharded`` can write the trainable tensors alone, so trainable-only checkpoints
    are sharded too (otherwise they are gathered to rank 0)."""
    optimizer_params: list
    """The tensors the optimizer updates (as the engine holds them), for the freeze audit."""

    @abstractmethod
    def wrap(self, model, spec):
        """Put the model into its training layout on this rank's device; returns the model to train."""

    @abstractmethod
    def setup_optimizer(self, param_groups: list[dict], total_steps: int) -> None:
        """AdamW over ``param_groups`` (``freeze.param_groups``) and the warmup + cosine schedule."""

    @abstractmethod
    def forward(self, batch: dict):
        """The model's forward on a batch already on the device; returns the model output."""

    def generate(self, batch: dict, **kwargs):
        """``model.generate`` on a batch already on the device (KV cache; collective under sharding:
        pass ``synced_gpus=True`` so every rank runs the same number of forwards)."""
        return self.unwrapped().generate(**batch, **kwargs)

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of an already normalised loss; gradients accumulate until ``step``."""

    @abstractmethod
    def step(self) -> StepStats:
        """Clip, update, advance the LR schedule."""

    @abstractmethod
    def zero_grad(self) -> None:
        """Drop the gradients of the step just taken."""

    @abstractmethod
    def current_lr(self) -> float:
        """The learning rate of the first parameter group for the next step."""

    @abstractmethod
    def unwrapped(self):
        """The module whose ``named_parameters`` the freeze plan names (peft names included)."""

    @abstractmethod
    def optimizer_state(self) -> dict:
        """Parameter -> its optimizer state (this rank's part), for every parameter that has some."""

    @abstractmethod
    def gather(self, rank: int, trainable_only: bool = True) -> dict[str, torch.Tensor]:
        """Full tensors by parameter name on rank 0 (empty elsewhere). Collective."""

    @abstractmethod
    def load_trainable(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy full tensors into the trainable parameters. Every rank, after ``setup_optimizer``."""

    @abstractmethod
    def save_state(self, rank: int, include_optimizer: bool = True) -> dict | None:
        """Optimizer (full, by parameter name), schedule, loss scaler, skipped steps; on rank 0. Collective."""

    @abstractmethod
    def load_state(self, state: dict) -> None:
        """Restore what ``save_state`` wrote (either engine's). Every rank, after ``setup_optimizer``."""

    @abstractmethod
    def local_trained_tensors(self) -> list[torch.Tensor]:
        """This rank's part of the tensors the optimizer updates (its master weights), as stored."""

    def storage_dtype(self, param) -> torch.dtype:
        """The dtype this engine keeps ``param`` in: a trained one's master weights, a frozen one's tensor."""
        return param.dtype

    def save_sharded(self, path: str, trainable_only: bool = False) -> None:
        """Every rank writes its part into ``path`` (rank-unique file names), optimizer included. Collective."""
        raise NotImplementedError(f"{self.name}: no sharded checkpoints (supports_sharded_checkpoint is False)")

    def load_sharded(self, path: str) -> None:
        """Read a checkpoint ``save_sharded`` wrote, on any world size. Every rank, after ``setup_optimizer``."""
        raise NotImplementedError(f"{self.name}: no sharded checkpoints (supports_sharded_checkpoint is False)")


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total`` (multiplier of each group's lr)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer, train: TrainConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, train.warmup_steps, total_steps, train.min_lr_ratio)
    )
