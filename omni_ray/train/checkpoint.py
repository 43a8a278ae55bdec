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
from omni_ray.errors import UserError
from omni_ray.freeze import FreezePlan

class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used: unfinished, damaged, or made for another model."""


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
    """Write one checkpoint (collective); returns this rank's directory to report, or None.

    Two layouts, one manifest:

    * trainable-only (default when anything is frozen): the trained tensors gathered to rank 0
      as safetensors, with the optimizer as a full, name-keyed state dict (loads onto any
      world size); only rank 0 has files.
    * sharded (everything trains, FSDP2): a torch.distributed.checkpoint (DCP) written by every
      rank into its own directory with rank-unique file names; Ray Train uploads all of them
      into one checkpoint directory, and DCP reshards on load, onto any number of workers.

    Rank 0 adds the scheduler/RNG/data position (``train_state.pt``), the config, the base
    model's location and fingerprint, and ``manifest.json`` with every file's checksum, last.
    """
    trainable_only = cfg.checkpoint.trainable_only
    if trainable_only is None:  # default: save what trains when anything is frozen
        trainable_only = bool(plan.frozen_names)
    sharded = not trainable_only and strategy.supports_sharded_checkpoint
    if sharded or rank == 0:
        path = Path(tempfile.mkdtemp(prefix=f"omni_ray_{cfg.run.name}_step{step:07d}_r{rank}_"))
    if sharded:
        strategy.save_sharded(str(path))
        engine_state = strategy.save_state(rank, include_optimizer=False)
        files = _gather_checksums({p.name: _sha256(p) for p in path.iterdir() if p.is_file()})
        tensors: dict = {}
    else:
        tensors = strategy.gather(rank, trainable_only)
        engine_state = strategy.save_state(rank)
        files = {}
    if rank != 0:
        return str(path) if sharded else None
    if not sharded:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / WEIGHTS))
        files[WEIGHTS] = _sha256(path / WEIGHTS)
    torch.save({**train_state, "step": step, "engine": engine_state}, path / STATE)
    files[STATE] = _sha256(path / STATE)
    (path / "config.yaml").write_text(dump_config(cfg))
    manifest = {
        "format": "omni_ray.checkpoint/1",
        "layout": "sharded" if sharded else "gathered",
        "step": step,
        "epoch": train_state["epoch"],
        "created_at": time.time(),
        "base_model": cfg.model.path,
        "base_fingerprint": base_fingerprint(base_dir),
        "trainable_only": trainable_only,
        "tensors": sorted(tensors),
        "files": files,
    }
    tmp = path / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path / MANIFEST)
    return str(path)


def _gather_checksums(local: dict[str, str]) -> dict[str, str]:
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return dict(local)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    merged: dict[str, str] = {}
    for part in parts:
        merged.update(part)
    return merged


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_step(path: str | Path) -> int:
    """The step a checkpoint directory holds, without checking its files (read_manifest does)."""
    return json.loads((Path(path) / MANIFEST).read_text())["step"]


def read_manifest(path: str | Path) -> dict:
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST}; this checkpoint was not finished and cannot be used; "
                              "pick an earlier checkpoint_* directory of the run")
    manifest = json.loads(manifest.read_text())
    for name, digest in manifest["files"].items():
        if _sha256(Path(path) / name) != digest:
            raise CheckpointError(f"{Path(path) / name}: checksum does not match the manifest; the checkpoint is "
                                  "damaged: pick an earlier checkpoint_* directory of the run")
    return manifest


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The checkpoint's model tensors by parameter name, whichever layout it has (no process group)."""
    manifest = json.loads((Path(path) / MANIFEST).read_text())
    if manifest.get("layout") == "sharded":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(str(path), f"{tmp}/full.pt")
            return torch.load(f"{tmp}/full.pt", weights_only=False)["model"]
    from safetensors.torch import load_file

    return load_file(str(Path(path) / WEIGHTS))


def load_trainable(path: str | Path) -> dict[str, torch.Tensor]:
    read_manifest(path)
    return load_tensors(path)


def load(path: str | Path, base_dir: str | Path) -> dict:
    """Everything a resumed run needs; refuses a checkpoint made on another base model."""
    manifest = read_manifest(path)
    if manifest["base_fingerprint"] != base_fingerprint(base_dir):
        raise CheckpointError(
            f"{path} was trained from base model {manifest['base_model']} with another content fingerprint; "
            "resume with the same model.path, or start a new run (another run.name)"
        )
    state = torch.load(Path(path) / STATE, weights_only=False)
    sharded = manifest.get("layout") == "sharded"
    return {"tensors": {} if sharded else load_tensors(path), "sharded_dir": str(path) if sharded else None,
            "train_state": state["engine"], "step": state["step"], "epoch": state["epoch"],
            "consumed": state["consumed"], "rng": state["rng"]}


def restore_model(cfg: Config, checkpoint_dir: str | Path | None = None):
    """Base model + freeze plan (LoRA adapters) + the checkpoint's trained tensors, on CPU.

    Returns (model, spec, plan). Without a checkpoint this is the model as training starts.
    """
    from omni_ray.train.build import build_trainable_model

    # Outside training: a full-precision base (a QLoRA run's adapters merge into it), no checkpointing.
    built = build_trainable_model(cfg.model, cfg.freeze, cfg.lora.model_copy(update={"qlora": False}),
                                  cfg.train.model_copy(update={"gradient_checkpointing": False}), cfg.storage)
    model, spec, plan = built.model, built.spec, built.plan
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
