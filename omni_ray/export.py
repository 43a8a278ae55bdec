"""``omni-ray export``: a checkpoint -> something serving tools load unchanged.

* merged (default): a Hugging Face model directory (weights + config + processor) with the LoRA
  adapters merged into their base weights and the fully trained modules folded in;
  ``AutoModelForImageTextToText.from_pretrained`` (and vLLM) load it like the base checkpoint.
* ``--adapter``: a PEFT adapter directory. Modules trained fully beside LoRA (a projector,
  embeddings) travel in it as ``modules_to_save``, so ``PeftModel.from_pretrained(base, dir)``
  reproduces the trained model exactly; its ``adapter_config.json`` names them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from omni_ray import storage as st
from omni_ray.config import Config, ConfigError, load_config, parse_yaml
from omni_ray.errors import UserError


class ExportError(UserError, ValueError):
    pass


def _local_checkpoint(checkpoint: str, storage) -> Path:
    if st.is_remote(checkpoint):
        return Path(st.download_dir(checkpoint, tempfile.mkdtemp(prefix="omni_ray_export_"), storage))
    return Path(checkpoint).expanduser()


def _upload_dir(local: Path, out: str, storage) -> None:
    """Upload an export; its config files go last, so an upload cut short is not a loadable model."""
    files = sorted(p for p in local.rglob("*") if p.is_file())
    for path in sorted(files, key=lambda p: (p.name.endswith("config.json"), str(p))):
        st.write_bytes(st.join(out, str(path.relative_to(local))), path.read_bytes(), storage)


def checkpoint_config(local: Path, trust_remote_code: bool) -> Config:
    """The run's config from a checkpoint, verified by the manifest; remote code only on the user's word.

    The checkpoint's config.yaml is data someone else may have written: its
    ``model.trust_remote_code`` is never obeyed. A model that needs its own code is exported
    only when the user passes ``trust_remote_code=True`` (``--trust-remote-code``).
    """
    from omni_ray.train.checkpoint import CheckpointError, checkpoint_config_text

    try:
        cfg = load_config(parse_yaml(checkpoint_config_text(local)))
    except (CheckpointError, ConfigError) as err:
        raise ExportError(f"{local}: {err}") from None
    if cfg.model.trust_remote_code and not trust_remote_code:
        raise ExportError(f"{local}: its config sets model.trust_remote_code, which would run Python code from "
                          f"{cfg.model.path}; export does not do that on the checkpoint's word. Pass "
                          "--trust-remote-code if you trust that model's code")
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"trust_remote_code": trust_remote_code})})


def _check_out(out: str) -> None:
    if st.is_remote(out):
        return
    target = Path(out).expanduser()
    if target.exists() and not target.is_dir():
        raise ExportError(f"--out {out}: a file is already there; give a new directory (or remove the file)")
    if target.is_dir() and any(target.iterdir()):
        raise ExportError(f"--out {out}: the directory already holds files; give a new directory (or empty it), so "
                          "an export never mixes with what was there")


@contextlib.contextmanager
def _staging(out: str):
    """A directory to write the export into, removed unless it was published whole.

    Locally it sits beside ``out`` (same filesystem) and is renamed to ``out`` last, so ``out``
    either does not exist or holds a whole export; a read-only or full parent fails here or
    while writing, and the partial directory is removed.
    """
    if st.is_remote(out):
        stage = Path(tempfile.mkdtemp(prefix="omni_ray_out_"))
    else:
        target = Path(out).expanduser().absolute()
        target.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        umask = os.umask(0)
        os.umask(umask)
        stage.chmod(0o777 & ~umask)  # mkdtemp's 0700 would hide the export from everyone else
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _publish(stage: Path, out: str, storage) -> None:
    if st.is_remote(out):
        _upload_dir(stage, out, storage)
        return
    target = Path(out).expanduser()
    if target.is_dir():
        target.rmdir()  # empty (checked before the export began); a file put there since fails here
    os.rename(stage, target)


def _manifest_files(local: Path) -> dict:
    from omni_ray.train.checkpoint import CheckpointError, read_manifest

    try:
        return dict(read_manifest(local)["files"])
    except CheckpointError as err:
        raise ExportError(str(err)) from None


def export(checkpoint: str, out: str, *, adapter: bool = False, storage: st.StorageConfig | None = None,
           trust_remote_code: bool = False) -> str:
    """Write ``checkpoint`` as a model (or adapter) directory at ``out``: whole, or not at all.

    The checkpoint must be finished (its manifest written last, every file matching its checksum)
    and must not change while it is exported; the export is written beside ``out`` and renamed
    (or uploaded, config files last) only once it is complete.
    """
    _check_out(out)
    local = _local_checkpoint(checkpoint, storage)
    files = _manifest_files(local)  # a checkpoint still being written has no manifest yet
    cfg = checkpoint_config(local, trust_remote_code)
    storage = storage or cfg.storage
    with _staging(out) as stage:
        _write_export(local, stage, cfg, adapter, storage, checkpoint)
        if _manifest_files(local) != files:
            raise ExportError(f"{checkpoint}: the checkpoint changed while it was exported; export it again once "
                              "nothing writes to it (a finished checkpoint is never rewritten)")
        _publish(stage, out, storage)
    return out


def _write_export(local: Path, target: Path, cfg: Config, adapter: bool, storage, checkpoint: str) -> None:
    from omni_ray.models.loading import load_processor, local_model_dir
    from omni_ray.train.checkpoint import CheckpointError, load_trainable, restore_model

    try:
        model, _, plan = restore_model(cfg.model, cfg.freeze, cfg.lora, cfg.train, storage, local)
        tensors = load_trainable(local) if adapter else None
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    if adapter:
        if not plan.lora_modules:
            raise ExportError(f"{checkpoint}: no LoRA adapters were trained (freeze map has no lora group); "
                              "export the merged model instead (drop --adapter)")
        model = _adapter_model(cfg.model, cfg.lora, plan, tensors, storage)
        model.save_pretrained(target)
    else:
        if plan.lora_modules:
            model = model.merge_and_unload()
        model.save_pretrained(target)
        load_processor(cfg.model, local_model_dir(cfg.model, storage)).save_pretrained(target)


def _adapter_model(model_cfg, lora, plan, tensors: dict, storage):
    """A fresh PeftModel whose modules_to_save are the fully trained modules, filled from ``tensors``."""
    import torch
    from peft import LoraConfig, get_peft_model

    from omni_ray.freeze import PEFT_PREFIX, base_name
    from omni_ray.models.loading import load_model, local_model_dir, read_hf_config, resolve_spec

    spec = resolve_spec(model_cfg, read_hf_config(model_cfg, storage))
    base = load_model(model_cfg, spec, local_model_dir(model_cfg, storage))
    full_modules = sorted({name.rpartition(".")[0] for name in plan.full_names})
    peft_model = get_peft_model(base, LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=list(plan.lora_modules), use_dora=lora.dora, use_rslora=lora.rslora,
        rank_pattern=plan.rank_pattern, alpha_pattern=plan.alpha_pattern,
        modules_to_save=full_modules or None,
    ))
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            base, is_lora = base_name(name)
            if is_lora:
                params[name].copy_(value)
                continue
            if base not in plan.full_names:  # a full checkpoint also holds the frozen weights
                continue
            base_name_ = base
            module, _, leaf = base_name_.rpartition(".")
            copy = f"{PEFT_PREFIX}{module}.modules_to_save.default.{leaf}"
            if copy not in params:
                raise ExportError(f"trained tensor {base_name_} has no place in the adapter")
            params[copy].copy_(value)
    return peft_model
