"""What the training loop needs from an engine, and the pieces engines share.

The loop calls ``wrap``, ``setup_optimizer``, ``forward``, ``backward``, ``step``,
``zero_grad``; it never branches on which engine it has.
"""

from __future__ import annotations

import math

import torch

from omni_ray.config import TrainConfig


class Strategy:
    name: str
    optimizer_params: list

    def wrap(self, model, spec):  # pragma: no cover - interface
        raise NotImplementedError

    def setup_optimizer(self, param_groups: list[dict], total_steps: int):  # pragma: no cover
        raise NotImplementedError


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
