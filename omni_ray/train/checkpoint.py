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
STATE = "train_state.pt"
WEIGHTS = "weights.safetensors"  # trainable tensors only, or all (manifest says which)


def base_fingerprint(local_dir: str | Path) -> str:
    """Identify the base checkpoint cheaply: config.json plus every weight file's safetensors header.

    Headers list each tensor's name, dtype, shape and byte offsets, so another checkpoint (or a
    different revision of one) gives another fingerprint without hashing gigabytes of weights.
    """
    digest = hashlib.sha256()
    root = Path(local_dir)
    digest.update((root / "config.json").read_bytes())
    for weights in sorted(root.glob("*.safetensors")):
        with open(weights, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            digest.update(weights.name.encode() + f.read(size))
    return digest.hexdigest()


def save(strategy, plan: FreezePlan, cfg: Config, step: int, rank: int, train_state: dict,
         base_dir: str | Path) -> str | None:
    """Gather (collective) and write one checkpoint on rank 0; returns its directory there.

    Holds the trained tensors (or all, see checkpoint.trainable_only), the optimizer and
    scheduler state, RNG, the data position (epoch + ids already trained this epoch), the
    config and the base model's location and fingerprint. The manifest is written last.
    """
    trainable_only = cfg.checkpoint.trainable_only
    if trainable_only is None:  # default: save what trains when anything is frozen
        trainable_only = bool(plan.frozen_names)
    tensors = strategy.gather(rank, trainable_only)
    engine_state = strategy.save_state(rank)
    if rank != 0:
        return None
    from safetensors.torch import save_file

    path = Path(tempfile.mkdtemp(prefix=f"omni_ray_{cfg.run.name}_step{step:07d}_"))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / WEIGHTS))
    torch.save({**train_state, "step": step, "engine": engine_state}, path / STATE)
    (path / "config.yaml").write_text(dump_config(cfg))
    manifest = {
        "format": "omni_ray.checkpoint/1",
        "step": step,
        "epoch": train_state["epoch"],
        "created_at": time.time(),
        "base_model": cfg.model.path,
        "base_fingerprint": base_fingerprint(base_dir),
        "trainable_only": trainable_only,
        "tensors": sorted(tensors),
        "numel": sum(t.numel() for t in tensors.values()),
        "files": {name: _sha256(path / name) for name in (WEIGHTS, STATE)},
    }
    tmp = path / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path / MANIFEST)
    return str(path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(path: str | Path) -> dict:
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"{path}: no {MANIFEST}; this checkpoint was not finished and cannot be used")
    manifest = json.loads(manifest.read_text())
    for name, digest in manifest["files"].items():
        if _sha256(Path(path) / name) != digest:
            raise ValueError(f"{Path(path) / name}: checksum does not match the manifest; the checkpoint is damaged")
    return manifest


def load_trainable(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    read_manifest(path)
    return load_file(str(Path(path) / WEIGHTS))


def load(path: str | Path, base_dir: str | Path) -> dict:
    """Everything a resumed run needs; refuses a checkpoint made on another base model."""
    manifest = read_manifest(path)
    if manifest["base_fingerprint"] != base_fingerprint(base_dir):
        raise ValueError(
            f"{path} was trained from base model {manifest['base_model']} with another content fingerprint; "
            "resume with the same model.path, or start a new run (another run.name)"
        )
    from safetensors.torch import load_file

    state = torch.load(Path(path) / STATE, weights_only=False)
    return {"tensors": load_file(str(Path(path) / WEIGHTS)), "train_state": state["engine"], "step": state["step"],
            "epoch": state["epoch"], "consumed_ids": state["consumed_ids"], "rng": state["rng"]}


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


def find_latest(run_uri: str, storage=None) -> tuple[int, str] | None:
    """(step, uri) of the newest checkpoint under a run directory that has a manifest.

    Ray Train resumes from the checkpoints it registered; one whose upload finished but whose
    registration did not (the endpoint failed right after, the head went away) is still whole
    when its manifest is there, and is the better place to resume from.
    """
    from omni_ray import storage as st

    try:
        files = st.list_files(run_uri, storage)
    except (FileNotFoundError, OSError):
        return None
    present = set(files)
    best = None
    for rel in files:
        parts = rel.split("/")
        if len(parts) == 2 and parts[1] == MANIFEST and parts[0].startswith("checkpoint_"):
            uri = st.join(run_uri, parts[0])
            manifest = json.loads(st.read_bytes(st.join(uri, MANIFEST), storage))
            # Uploads copy files in no fixed order: a manifest whose files did not all arrive
            # marks an interrupted upload, not a checkpoint.
            if not all(f"{parts[0]}/{name}" in present for name in manifest["files"]):
                continue
            if best is None or manifest["step"] > best[0]:
                best = (manifest["step"], uri)
    return best
