"""Build the model a run trains: load the checkpoint, plan the freeze map, apply it.

One function for every place that needs "the model as training sees it": the worker loop,
checkpoint restore, export and the benchmarks. Wrapping (FSDP2 / ZeRO) is the engine's job and
happens after this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omni_ray.config import FreezeConfig, LoraConfig, ModelConfig, TrainConfig
from omni_ray.freeze import FreezePlan, apply_plan, plan_freeze
from omni_ray.models.spec import ModelSpec
from omni_ray.storage import StorageConfig


@dataclass
class TrainableModel:
    model: torch.nn.Module
    """The base model with the freeze map applied (requires_grad set, LoRA adapters injected)."""
    spec: ModelSpec
    plan: FreezePlan
    local_dir: str
    """The base checkpoint as a local directory (downloaded once per node from s3://)."""


def build_trainable_model(model_cfg: ModelConfig, freeze: FreezeConfig, lora: LoraConfig, train: TrainConfig,
                          storage: StorageConfig | None = None) -> TrainableModel:
    """Load the base model on the CPU, plan the freeze map from its parameter names and apply it.

    The seed is set first, so LoRA adapters start identical on every rank and in every process
    that rebuilds the model (restore, export).
    """
    from omni_ray.models.loading import load_model, local_model_dir, read_hf_config, resolve_spec

    local_dir = local_model_dir(model_cfg, storage)
    spec = resolve_spec(model_cfg, read_hf_config(model_cfg, storage))
    torch.manual_seed(train.seed)
    model = load_model(model_cfg, spec, local_dir, qlora=lora.qlora)
    if lora.qlora:  # norms in fp32, input grads on, for training adapters over a 4-bit base
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=train.gradient_checkpointing)
    plan = plan_freeze(((n, tuple(p.shape)) for n, p in model.named_parameters()), spec, freeze, lora, train.lr)
    model = apply_plan(model, plan, lora)
    # from_pretrained returns the model in eval mode: without this, dropout would stay off and
    # transformers' checkpointed layers (active only while training) would never checkpoint.
    model.train()
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return TrainableModel(model, spec, plan, local_dir)
