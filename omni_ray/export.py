"""``omni-ray export``: a checkpoint -> something serving tools load unchanged.

* merged (default): a Hugging Face model directory (weights + config + processor) with the LoRA
  adapters merged into their base weights and the fully trained modules folded in;
  ``AutoModelForImageTextToText.from_pretrained`` (and vLLM) load it like the base checkpoint.
* ``--adapter``: a PEFT adapter directory. Modules trained fully beside LoRA (a projector,
  embeddings) travel in it as ``modules_to_save``, so ``PeftModel.from_pretrained(base, dir)``
  reproduces the trained model exactly; its ``adapter_config.json`` names them.
"""

from __future__ import annotations

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
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
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


def _target(out: str) -> Path:
    if st.is_remote(out):
        return Path(tempfile.mkdtemp(prefix="omni_ray_out_"))
    target = Path(out).expanduser()
    target.mkdir(parents=True, exist_ok=True)
    return target


def export(checkpoint: str, out: str, *, adapter: bool = False, storage: st.StorageConfig | None = None,
           trust_remote_code: bool = False) -> str:
    from omni_ray.models.loading import load_processor, local_model_dir
    from omni_ray.train.checkpoint import CheckpointError, load_trainable, restore_model

    if not st.is_remote(out) and Path(out).expanduser().exists() and not Path(out).expanduser().is_dir():
        raise ExportError(f"--out {out}: a file is already there; give a new directory (or remove the file)")
    local = _local_checkpoint(checkpoint, storage)
    cfg = checkpoint_config(local, trust_remote_code)
    storage = storage or cfg.storage
    target = _target(out)
    try:
        model, spec, plan = restore_model(cfg.model, cfg.freeze, cfg.lora, cfg.train, storage, local)
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
    if st.is_remote(out):
        _upload_dir(target, out, storage)
    return out


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
