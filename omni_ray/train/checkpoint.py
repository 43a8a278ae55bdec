"""Checkpoints: what a run writes at every_n_steps and at the end, and how it is read back.

A trainable-only checkpoint holds the parameters the freeze plan trains (full modules and LoRA
adapters, by their names in the wrapped model), the config, and the base model's location; the
frozen weights are read again from the base checkpoint. ``manifest.json`` is written last: a
directory without one is an interrupted write and is never loaded.

Checkpoints are data, never code. Nothing here unpickles an arbitrary object: tensors come from
safetensors, ``train_state.pt`` is read with ``torch.load(weights_only=True)`` (tensors and
plain containers only), DCP's pickled ``.metadata`` is screened by an allow-list unpickler
before DCP reads it, and every file read back (``config.yaml`` included) must match the
checksum in the manifest.

Resume is explicit about what it continues: the manifest records the run's *identity* (base
weights by content, architecture, freeze plan, LoRA settings, tokenizer); :func:`load` refuses a
checkpoint whose identity differs from the current run's, naming the changed keys, unless
``checkpoint.resume: weights_only`` asks for the trained tensors alone.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from omni_ray.config import CheckpointConfig, FreezeConfig, LoraConfig, ModelConfig, RunConfig, TrainConfig
from omni_ray.errors import UserError
from omni_ray.freeze import FreezePlan
from omni_ray.storage import StorageConfig, StorageError
from omni_ray.strategies.zero_state import ShardReader


log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE = "train_state.pt"
WEIGHTS = "weights.safetensors"  # trainable tensors only, or all (manifest says which)
CONFIG = "config.yaml"
FORMAT = "omni_ray.checkpoint/2"
ZERO_SHARDED = "zero-sharded"  # the layout DeepSpeedStrategy.save_sharded writes

# Files that make up a model's weights / tokenizer, hashed by content for the run's identity.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "chat_template.jinja",
                    "chat_template.json")


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used: unfinished, damaged, or made for another setup (names the way out)."""


class ResumeMismatch(CheckpointError):
    """The checkpoint was trained on another setup than this run's (see :func:`identity_changes`)."""


# --------------------------------------------------------------------------- identity


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _identity_cache_dir() -> Path:
    return Path(os.environ.get("OMNI_RAY_CACHE", "~/.cache/omni_ray")).expanduser() / "weights-identity"


def content_digest(local_dir: str | Path, names: list[str]) -> str:
    """sha256 over the named files' contents, each hashed once per (path, size, mtime).

    The per-file digests are cached in a sidecar under ``$OMNI_RAY_CACHE/weights-identity``
    (the model directory may be read-only), so a multi-GB base model is read once per node and
    version, not at every start; a changed file (new size or mtime) is hashed again. Models from
    S3 are hashed in their node-local download, once per download.
    """
    root = Path(local_dir).resolve()
    sidecar = _identity_cache_dir() / (hashlib.sha256(str(root).encode()).hexdigest()[:24] + ".json")
    try:
        cache = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        cache = {}
    digest, changed = hashlib.sha256(), False
    for name in sorted(names):
        stat = (root / name).stat()
        key = f"{name}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in cache:
            cache[key], changed = _sha256(root / name), True
        digest.update(f"{name}\0{cache[key]}\n".encode())
    if changed:
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        tmp = sidecar.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, sidecar)  # atomic: ranks on one node may race; either copy is right
    return digest.hexdigest()


def _architecture(local_dir: Path, arch: str) -> str:
    """The spec name plus config.json without fields that do not change the network."""
    config = json.loads((local_dir / "config.json").read_text())
    for noise in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        config.pop(noise, None)
    return f"{arch}:" + hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def run_identity(base_dir: str | Path, arch: str, plan: FreezePlan, lora: LoraConfig) -> dict:
    """What the trained state depends on; recorded in every checkpoint and checked on resume.

    ``base_weights`` is a content hash, so a same-shape different model does not pass; the
    freeze plan is its hash plus the trained parameter names (for the message); LoRA settings
    are those that change what the adapter tensors mean.
    """
    root = Path(base_dir)
    weights = [p.name for p in root.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)]
    tokenizer = [n for n in _TOKENIZER_FILES if (root / n).is_file()]
    trained = sorted(p.name for p in plan.params if p.mode == "full")
    modes = "\n".join(f"{p.name}:{p.mode}" for p in sorted(plan.params, key=lambda p: p.name))
    identity = {
        "base_weights": content_digest(root, weights),
        "architecture": _architecture(root, arch),
        "freeze_plan": {"hash": hashlib.sha256(modes.encode()).hexdigest()[:16], "trained": trained,
                        "lora_modules": sorted(plan.lora_modules)},
        "tokenizer": content_digest(root, tokenizer) if tokenizer else None,
        "lora": None,
    }
    if plan.lora_modules:
        identity["lora"] = {"r": lora.r, "alpha": lora.alpha, "dora": lora.dora, "rslora": lora.rslora,
                            "qlora": lora.qlora, "rank_pattern": dict(plan.rank_pattern),
                            "alpha_pattern": dict(plan.alpha_pattern)}
    return identity


def identity_changes(saved: dict | None, current: dict) -> list[str]:
    """Human-readable differences, one per changed key (``lora.alpha: 32 -> 16``); [] if equal."""
    if not saved:
        return ["identity: not recorded (a checkpoint from an older omni_ray)"]
    changes = []
    for key in ("base_weights", "architecture", "tokenizer"):
        if saved.get(key) != current.get(key):
            changes.append(f"{key}: {str(saved.get(key))[:12]} -> {str(current.get(key))[:12]}")
    old_plan, new_plan = saved.get("freeze_plan") or {}, current["freeze_plan"]
    if old_plan.get("hash") != new_plan["hash"]:
        gained = sorted(set(new_plan["trained"]) - set(old_plan.get("trained", [])))
        lost = sorted(set(old_plan.get("trained", [])) - set(new_plan["trained"]))
        lora_diff = sorted(set(new_plan["lora_modules"]) ^ set(old_plan.get("lora_modules", [])))
        changes.append(f"freeze_plan: {len(gained)} parameters newly trained {gained[:2]}, {len(lost)} no longer "
                       f"{lost[:2]}, LoRA targets changed {lora_diff[:2]}")
    old_lora, new_lora = saved.get("lora") or {}, current.get("lora") or {}
    for key in sorted(set(old_lora) | set(new_lora)):
        if old_lora.get(key) != new_lora.get(key):
            changes.append(f"lora.{key}: {old_lora.get(key)!r} -> {new_lora.get(key)!r}")
    return changes


def check_resume(path: str | Path, manifest: dict, identity: dict) -> None:
    """Raise :class:`ResumeMismatch` naming every changed key and the two ways forward."""
    changes = identity_changes(manifest.get("identity"), identity)
    if changes:
        raise ResumeMismatch(
            f"checkpoint {path} was trained on another setup than this config: {'; '.join(changes)}. "
            "Continuing it would apply the old optimizer state and schedule to a different model. Either "
            "start fresh under a new run.name, or set checkpoint.resume: weights_only to load only its "
            "trained tensors (new optimizer, from step 0)")


# ------------------------------------------------------------------------------ save


@dataclass(frozen=True)
class RunRecord:
    """What every checkpoint of one run records beside its tensors; made once when the run starts."""

    run_name: str
    base_model: str  # model.path as configured
    config_text: str  # the run's config.yaml (the config forbids secrets, so it carries none)
    identity: dict
    run_uri: str | None = None  # where Ray Train copies each checkpoint (run.storage_path/run.name)


def run_record(run: RunConfig, model: ModelConfig, config_text: str, identity: dict,
               run_uri: str | None = None) -> RunRecord:
    return RunRecord(run.name, model.path, config_text, identity, run_uri)


def save(strategy, plan: FreezePlan, record: RunRecord, checkpoint: CheckpointConfig, step: int, rank: int,
         train_state: dict) -> str | None:
    """Write one checkpoint (collective); returns this rank's directory to report, or None.

    Three layouts, one manifest:

    * ``gathered`` (FSDP2, trainable-only: the default when anything is frozen): the trained
      tensors gathered to rank 0 as safetensors, with the optimizer as a full, name-keyed state
      dict (loads onto any world size); only rank 0 has files.
    * ``sharded`` (FSDP2, everything trains): a torch.distributed.checkpoint (DCP) written by
      every rank into its own directory with rank-unique file names; Ray Train uploads all of
      them into one checkpoint directory, and DCP reshards on load, onto any number of workers.
    * ``zero-sharded`` (DeepSpeed, always): every rank writes the fp32 masters and Adam moments of
      the parameter slices it owns (and, unless trainable-only, its part of the frozen weights)
      into ``zero_rankRRRRR-of-WWWWW.safetensors``, keyed by parameter name and offset. No rank
      gathers the optimizer state (12 bytes per trained parameter on rank 0 for a full tune);
      the reader reassembles any range on any world size (``zero_state.ShardReader``).

    Rank 0 adds the scheduler/RNG/data position (``train_state.pt``), the config, the run's
    identity, and ``manifest.json`` with every file's checksum, last.

    Refused before anything is kept: trained weights holding NaN or inf (every rank checks its
    part), a full disk while writing (the partial directory is removed; the error names the path
    and the bytes), and a local ``run_uri`` without room for the checkpoint Ray Train copies there.
    """
    from omni_ray.train.guard import check_finite_weights

    check_finite_weights(strategy, step)
    trainable_only = checkpoint.trainable_only
    if trainable_only is None:  # default: save what trains when anything is frozen
        trainable_only = bool(plan.frozen_names)
    path = None
    sharded = strategy.supports_sharded_checkpoint and (not trainable_only or strategy.shards_trainable_only)
    if sharded or rank == 0:
        path = Path(tempfile.mkdtemp(prefix=f"omni_ray_{record.run_name}_step{step:07d}_r{rank}_"))
    try:
        written = _write(strategy, record, step, rank, train_state, path, sharded, trainable_only)
    except Exception as err:
        # torch.save reports a full disk as "unexpected pos", safetensors in its own error type: a
        # filesystem left with (almost) nothing free is the sign, checked before the cleanup.
        full = getattr(err, "errno", None) == errno.ENOSPC or (path is not None and _free_bytes(path) < 1 << 20)
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)
        if not full:
            raise
        needed = 3 * sum(t.numel() * t.element_size() for t in strategy.local_trained_tensors())
        raise CheckpointError(
            f"{path}: no space left on device while writing the checkpoint of step {step}: it needs about {needed} "
            f"bytes (trained weights and Adam's two moments), {_free_bytes(path)} are free; free space there or "
            "point TMPDIR at a larger disk. The run's earlier checkpoints are whole") from None
    _check_room(record.run_uri, written, step)
    return written


def _free_bytes(path: str | Path) -> int:
    """Free bytes on the filesystem holding ``path`` (or its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _dir_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _check_room(run_uri: str | None, written: str | None, step: int) -> None:
    """Refuse on every rank when a local run directory cannot hold what a rank is about to copy there (collective).

    Ray Train copies each rank's directory into ``run_uri`` when it is reported; a copy that runs
    out of space would leave a partial checkpoint there (never resumed from: ``find_latest``
    checks every file's checksum), so a run that cannot fit stops before the copy, naming the
    path and the bytes. S3 has no such limit."""
    from omni_ray import storage as st
    from omni_ray.train.guard import any_rank

    problem = None
    if run_uri and not st.is_remote(run_uri) and written:
        needed, free = _dir_bytes(written), _free_bytes(run_uri)
        if needed > free:
            problem = (f"run.storage_path: {run_uri} has {free} bytes free, the checkpoint of step {step} needs "
                       f"{needed}: free space there or set run.storage_path to a larger disk (or s3://...); the run's "
                       "earlier checkpoints are whole and the same command resumes from the newest")
    if any_rank(problem is not None):
        if written:
            shutil.rmtree(written, ignore_errors=True)
        raise CheckpointError(problem or f"run.storage_path: {run_uri}: no room for another rank's part of the "
                              f"checkpoint of step {step}; see that rank's error")


def _write(strategy, record: RunRecord, step: int, rank: int, train_state: dict, path: Path | None, sharded: bool,
           trainable_only: bool) -> str | None:
    """Write this rank's part of the checkpoint into ``path`` (collective); the manifest last, on rank 0."""
    if sharded:
        strategy.save_sharded(str(path), trainable_only)
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
    torch.save({**train_state, "step": step, "engine": engine_state}, path / STATE)
    (path / CONFIG).write_text(record.config_text)
    for name in (WEIGHTS, STATE, CONFIG):
        if (path / name).is_file():
            files[name] = _sha256(path / name)
    _write_manifest(path, {
        "format": FORMAT, "layout": strategy.sharded_layout if sharded else "gathered", "step": step,
        "epoch": train_state["epoch"], "created_at": time.time(), "base_model": record.base_model,
        "identity": record.identity, "trainable_only": trainable_only, "tensors": sorted(tensors), "files": files,
    })
    return str(path)


def _write_manifest(path: Path, manifest: dict) -> None:
    tmp = path / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path / MANIFEST)


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


# ------------------------------------------------------------------------------ read


def manifest_step(path: str | Path) -> int | None:
    """The step a checkpoint directory holds (files unchecked: read_manifest does); None without a manifest."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return None
    return json.loads(manifest.read_text())["step"]


def read_manifest(path: str | Path) -> dict:
    """The manifest, after checking every file it lists against its checksum."""
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST}; this checkpoint was not finished and cannot be used; "
                              "pick an earlier checkpoint_* directory of the run")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = dict(manifest["files"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{manifest_path}: not a checkpoint manifest ({err}); the checkpoint is damaged") from None
    for name, digest in files.items():
        file = Path(path) / name
        if not file.is_file() or _sha256(file) != digest:
            raise CheckpointError(f"{file}: missing or its checksum does not match the manifest; the checkpoint "
                                  "is damaged or was modified: pick an earlier checkpoint_* directory of the run")
    return manifest


def checked_file(path: str | Path, manifest: dict, name: str) -> Path:
    """A file of the checkpoint that the (verified) manifest covers; refuses any other."""
    if name not in manifest["files"]:
        raise CheckpointError(f"{Path(path) / name}: not covered by the manifest's checksums, so it is not read; "
                              "the checkpoint is from an older omni_ray or was modified")
    return Path(path) / name


# Classes DCP's pickled .metadata is made of (torch 2.x); anything else is refused unread.
_DCP_MODULES = ("torch.distributed.checkpoint.",)
_DCP_NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
              ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = (module + ".").startswith(_DCP_MODULES) or (module, name) in _DCP_NAMES or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        if not allowed:
            raise CheckpointError(f"DCP metadata refers to {module}.{name}, which is not checkpoint metadata; "
                                  "the checkpoint was modified and is not loaded")
        return super().find_class(module, name)


def screen_dcp_metadata(path: str | Path) -> None:
    """Unpickle a sharded checkpoint's ``.metadata`` with an allow-list first.

    DCP reads it with plain ``pickle.load``; the checksums prove only that files match the
    manifest, and whoever can write one can write the other, so the content is screened too.
    """
    data = (Path(path) / ".metadata").read_bytes()
    _MetadataUnpickler(io.BytesIO(data)).load()


def load_tensors(path: str | Path, manifest: dict | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's model tensors by parameter name, whichever layout it has (no process group)."""
    manifest = manifest or read_manifest(path)
    if manifest.get("layout") == ZERO_SHARDED:
        reader = _shard_reader(path, manifest)
        return {name: reader.full("param", name) for name in sorted(reader.shapes)}
    if manifest.get("layout") == "sharded":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        screen_dcp_metadata(path)
        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(str(path), f"{tmp}/full.pt")
            return torch.load(f"{tmp}/full.pt", weights_only=True)["model"]
    from safetensors.torch import load_file

    return load_file(str(checked_file(path, manifest, WEIGHTS)))


def _shard_reader(path: str | Path, manifest: dict) -> ShardReader:
    """The ZeRO rank files the (verified) manifest lists, nothing else in the directory."""
    return ShardReader.from_dir(path, list(manifest["files"]))


def load_trainable(path: str | Path) -> dict[str, torch.Tensor]:
    return load_tensors(path, read_manifest(path))


def load(path: str | Path, identity: dict, resume: str = "auto", sharded_layout: str | None = None) -> dict:
    """Everything a resumed run needs, after the checksums and the identity check.

    ``resume="auto"``: the whole state, refused (:class:`ResumeMismatch`) when ``identity``
    differs from the one recorded. ``resume="weights_only"`` with a differing identity: the
    trained tensors only (always gathered into ``tensors``), ``train_state``/``rng`` None, step
    0, ``weights_only`` True: the caller keeps its fresh optimizer and schedule.

    ``sharded_layout``: the resuming engine's (``Strategy.sharded_layout``). A sharded checkpoint
    of the same layout comes back as ``sharded_dir`` for ``load_sharded``; a ZeRO-sharded one
    resumed by another engine (FSDP2) is reassembled into full tensors and a full, name-keyed
    optimizer state (the gathered layout), which every engine loads.
    """
    manifest = read_manifest(path)
    changes = identity_changes(manifest.get("identity"), identity)
    # weights_only acts only on a changed setup: once this run has written its own checkpoints,
    # a restart after a lost worker continues them whole instead of going back to step 0.
    if resume == "weights_only" and changes:
        log.warning("checkpoint.resume=weights_only: loading only the trained tensors of %s into a changed "
                    "setup (%s); optimizer and schedule start fresh", path, "; ".join(changes))
        return {"tensors": load_tensors(path, manifest), "sharded_dir": None, "train_state": None, "step": 0,
                "epoch": 0, "consumed": None, "rng": None, "weights_only": True}
    if changes:
        check_resume(path, manifest, identity)
    state = torch.load(checked_file(path, manifest, STATE), weights_only=True)
    layout = manifest.get("layout")
    if layout == ZERO_SHARDED and sharded_layout not in (None, ZERO_SHARDED):
        tensors, engine_state = _zero_as_gathered(path, manifest, state["engine"])
        return {**_resume_fields(state), "tensors": tensors, "sharded_dir": None, "train_state": engine_state}
    sharded = layout in ("sharded", ZERO_SHARDED)
    if layout == "sharded":
        screen_dcp_metadata(path)  # the strategy's DCP load unpickles it next
    return {**_resume_fields(state), "tensors": {} if sharded else load_tensors(path, manifest),
            "sharded_dir": str(path) if sharded else None, "train_state": state["engine"]}


def _resume_fields(state: dict) -> dict:
    return {"step": state["step"], "epoch": state["epoch"],
            "consumed": state["consumed"], "rng": state["rng"], "weights_only": False,
            "reports": state.get("reports", [])}


def _zero_as_gathered(path: str | Path, manifest: dict, engine_state: dict) -> tuple[dict, dict]:
    """A ZeRO-sharded checkpoint as full tensors and a full optimizer state by name (for FSDP2)."""
    from omni_ray.strategies.zero_state import ADAM_STATE

    reader = _shard_reader(path, manifest)
    tensors = {name: reader.full("param", name) for name in sorted(reader.shapes)}
    moments = {name: {"step": torch.tensor(float(reader.adam_step)), **{k: reader.full(k, name) for k in ADAM_STATE}}
               for name, trained in reader.trained.items() if trained}
    optimizer = {"state": moments, "param_groups": engine_state["optimizer_groups"]}
    return tensors, {**engine_state, "optimizer": optimizer}


def checkpoint_config_text(path: str | Path) -> str:
    """The run's config.yaml, only after the manifest's checksum vouches for it."""
    manifest = read_manifest(path)
    return checked_file(path, manifest, CONFIG).read_text()


def restore_model(model_cfg: ModelConfig, freeze: FreezeConfig, lora: LoraConfig, train: TrainConfig,
                  storage: StorageConfig | None, checkpoint_dir: str | Path | None = None):
    """Base model + freeze plan (LoRA adapters) + the checkpoint's trained tensors, on CPU.

    Returns (model, spec, plan). Without a checkpoint this is the model as training starts.
    """
    from omni_ray.train.build import build_trainable_model

    # Outside training: a full-precision base (a QLoRA run's adapters merge into it), no checkpointing.
    built = build_trainable_model(model_cfg, freeze, lora.model_copy(update={"qlora": False}),
                                  train.model_copy(update={"gradient_checkpointing": False}), storage)
    model, spec, plan = built.model, built.spec, built.plan
    if checkpoint_dir is not None:
        tensors = load_trainable(checkpoint_dir)
        result = model.load_state_dict(tensors, strict=False)
        if result.unexpected_keys:
            raise CheckpointError(f"{checkpoint_dir}: tensors {result.unexpected_keys[:3]} do not exist in the model "
                                  "built from this config; was the checkpoint written with another freeze map?")
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if trainable - set(tensors):
            raise CheckpointError(f"{checkpoint_dir}: holds no value for trained tensors "
                                  f"{sorted(trainable - set(tensors))[:3]}")
    return model, spec, plan


# ---------------------------------------------------------------------------- discover


def find_latest(run_uri: str, storage: StorageConfig | None = None) -> tuple[int, str] | None:
    """(step, uri) of the newest whole checkpoint under a run directory, or None when there is none.

    Ray Train resumes from the checkpoints it registered; one whose upload finished but whose
    registration did not (the endpoint failed right after, the head went away) is still whole
    when its manifest and every file it lists are there, and is the better place to resume
    from. Newer directories without a manifest (an interrupted write or upload) are skipped
    with a warning. A run directory that does not exist means no checkpoint; any other storage
    error (credentials, network, a missing bucket) is raised as :class:`StorageError`, never
    read as "no checkpoint", which would silently restart a run from step 0.
    """
    from omni_ray import storage as st

    try:
        files = st.list_files(run_uri, storage)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise StorageError(f"{run_uri}: cannot list the run's checkpoints ({err}); check storage.endpoint_url, "
                           "the bucket and this node's credentials (AWS_* environment, instance profile, IRSA)") from err
    present = set(files)
    candidates, unfinished = [], []
    for directory in sorted({rel.split("/")[0] for rel in files if rel.startswith("checkpoint_") and "/" in rel}):
        if f"{directory}/{MANIFEST}" not in present:
            unfinished.append(directory)
            continue
        uri = st.join(run_uri, directory)
        try:
            manifest = json.loads(st.read_bytes(st.join(uri, MANIFEST), storage))
        except ValueError:
            manifest = None
        if not (isinstance(manifest, dict) and "step" in manifest and "files" in manifest):
            # A copy cut short (a full disk, a lost node) can leave the manifest itself empty or partial.
            unfinished.append(directory)
            continue
        # Uploads copy files in no fixed order: a manifest whose files did not all arrive
        # marks an interrupted upload, not a checkpoint.
        if not all(f"{directory}/{name}" in present for name in manifest["files"]):
            unfinished.append(directory)
            continue
        candidates.append((manifest["step"], uri, directory))
    best = None
    for step, uri, directory in sorted(candidates, reverse=True):
        # An S3 object appears whole or not at all; a file on a shared filesystem appears under
        # its name while it is still being copied (a node lost mid-copy leaves it short), so
        # local checkpoints are checked against their checksums, newest first, until one passes.
        if not st.is_remote(uri):
            try:
                read_manifest(uri)
            except CheckpointError:
                unfinished.append(directory)
                continue
        best = (step, uri)
        break
    if unfinished:
        log.warning("skipping unfinished checkpoint(s) under %s (no manifest, files missing or cut short): %s; "
                    "using %s",
                    run_uri, ", ".join(unfinished), best[1] if best else "none")
    return best


def choose_resume(registered: str | None, found: tuple[int, str] | None) -> str | None:
    """The checkpoint to resume from: the newer of Ray's registered one and the newest whole one found.

    A registered directory without a manifest (a write cut short) is skipped with a warning,
    as the README promises, instead of failing the run.
    """
    registered_step = manifest_step(registered) if registered else None
    if registered and registered_step is None:
        log.warning("checkpoint %s has no %s (an interrupted write); resuming from the last whole one instead",
                    registered, MANIFEST)
        registered = None
    if found and (registered is None or found[0] > registered_step):
        return found[1]
    return registered
