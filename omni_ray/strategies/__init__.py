"""Training engines behind one seam: FSDP2 or DeepSpeed ZeRO-2/3, chosen by ``strategy.name``."""

from __future__ import annotations

from omni_ray.config import StrategyConfig, TrainConfig


def build_strategy(cfg: StrategyConfig, train: TrainConfig, device):
    if cfg.name == "fsdp":
        from omni_ray.strategies.fsdp import FSDPStrategy

        return FSDPStrategy(cfg, train, device)
    from omni_ray.strategies.deepspeed import DeepSpeedStrategy

    return DeepSpeedStrategy(cfg, train, device)
