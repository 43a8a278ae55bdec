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
from omni_ray.config import load_config
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


def export(checkpoint: str, out: str, *, adapter: bool = False, storage=None) -> str:
    from omni_ray.models.loading import load_processor, local_model_dir
    from omni_ray.train.checkpoint import load_trainable, restore_model

    if not st.is_remote(out) and Path(out).expanduser().exists() and not Path(out).expanduser().is_dir():
        raise ExportError(f"--out {out}: a file is already there; give a new directory (or remove the file)")
    local = _local_checkpoint(checkpoint, storage)
    cfg = load_config(local / "config.yaml")
    storage = storage or cfg.storage
    model, spec, plan = restore_model(cfg, local)
    target = Path(tempfile.mkdtemp(prefix="omni_ray_out_")) if st.is_remote(out) else Path(out).expanduser()
    target.mkdir(parents=True, exist_ok=True)

    if adapter:
        if not plan.lora_modules:
            raise ExportError(f"{checkpoint}: no LoRA adapters were trained (freeze map has no lora group); "
                              "export the merged model instead (drop --adapter)")
        model = _adapter_model(cfg, plan, load_trainable(local))
        model.save_pretrained(target)
    else:
        if plan.lora_modules:
            model = model.merge_and_unload()
        model.save_pretrained(target)
        load_processor(cfg.model, local_model_dir(cfg.model, cfg.storage)).save_pretrained(target)
    if st.is_remote(out):
        _upload_dir(target, out, storage)
    return out


def _adapter_model(cfg, plan, tensors: dict):
    """A fresh PeftModel whose modules_to_save are the fully trained modules, filled from ``tensors``."""
    import torch
    from peft import LoraConfig, get_peft_model

    from omni_ray.freeze import PEFT_PREFIX, base_name
    from omni_ray.models.loading import load_model, local_model_dir, read_hf_config, resolve_spec

    spec = resolve_spec(cfg.model, read_hf_config(cfg.model, cfg.storage))
    base = load_model(cfg.model, spec, local_model_dir(cfg.model, cfg.storage))
    full_modules = sorted({name.rpartition(".")[0] for name in plan.full_names})
    peft_model = get_peft_model(base, LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=list(plan.lora_modules), use_dora=cfg.lora.dora, use_rslora=cfg.lora.rslora,
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
