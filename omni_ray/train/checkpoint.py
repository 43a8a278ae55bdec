"""Checkpoints: what a run writes at every_n_steps and at the end.

A trainable-only checkpoint holds the parameters the freeze plan trains (full modules and LoRA
adapters, by their names in the wrapped model), the config, and the base model's location; the
frozen weights are read again from the base checkpoint. ``manifest.json`` is written last: a
directory without one is an interrupted write and is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from omni_ray.config import Config, dump_config
from omni_ray.freeze import FreezePlan

MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"  # trainable tensors only, or all (manifest says which)


def save(strategy, plan: FreezePlan, cfg: Config, step: int, rank: int) -> str | None:
    """Gather trainable tensors (collective), write them on rank 0; returns the directory there."""
    trainable_only = cfg.checkpoint.trainable_only
    if trainable_only is None:  # default: save what trains when anything is frozen
        trainable_only = bool(plan.frozen_names)
    tensors = strategy.gather(rank, trainable_only)
    if rank != 0:
        return None
    from safetensors.torch import save_file

    path = Path(tempfile.mkdtemp(prefix=f"omni_ray_{cfg.run.name}_step{step:07d}_"))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / WEIGHTS))
    (path / "config.yaml").write_text(dump_config(cfg))
    digest = hashlib.sha256((path / WEIGHTS).read_bytes()).hexdigest()
    manifest = {
        "format": "omni_ray.trainable/1",
        "step": step,
        "created_at": time.time(),
        "base_model": cfg.model.path,
        "files": {WEIGHTS: digest},
        "tensors": sorted(tensors),
        "trainable_only": trainable_only,
        "numel": sum(t.numel() for t in tensors.values()),
    }
    tmp = path / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path / MANIFEST)
    return str(path)


def read_manifest(path: str | Path) -> dict:
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"{path}: no {MANIFEST}; this checkpoint was not finished and cannot be used")
    return json.loads(manifest.read_text())


def load_trainable(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    manifest = read_manifest(path)
    weights = Path(path) / WEIGHTS
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    if digest != manifest["files"][WEIGHTS]:
        raise ValueError(f"{weights}: checksum does not match the manifest; the checkpoint is damaged")
    return load_file(str(weights))


def restore_model(cfg: Config, checkpoint_dir: str | Path | None = None):
    """Base model + freeze plan (LoRA adapters) + the checkpoint's trained tensors, on CPU.

    Returns (model, spec, plan). Without a checkpoint this is the model as training starts.
    """
    from omni_ray.freeze import apply_plan, plan_freeze
    from omni_ray.models.loading import load_model, local_model_dir, read_hf_config, resolve_spec

    spec = resolve_spec(cfg.model, read_hf_config(cfg.model, cfg.storage))
    torch.manual_seed(cfg.train.seed)
    model = load_model(cfg.model, spec, local_model_dir(cfg.model, cfg.storage))
    plan = plan_freeze(((n, tuple(p.shape)) for n, p in model.named_parameters()), spec, cfg.freeze, cfg.lora,
                       cfg.train.lr)
    model = apply_plan(model, plan, cfg.lora)
    if checkpoint_dir is not None:
        tensors = load_trainable(checkpoint_dir)
        result = model.load_state_dict(tensors, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"{checkpoint_dir}: tensors {result.unexpected_keys[:3]} do not exist in the model "
                             "built from this config; was the checkpoint written with another freeze map?")
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if trainable - set(tensors):
            raise ValueError(f"{checkpoint_dir}: holds no value for trained tensors {sorted(trainable - set(tensors))[:3]}")
    return model, spec, plan
