"""Load a checkpoint (local directory or s3:// prefix): its spec, skeleton, weights, processor.

An ``s3://`` checkpoint is fetched once per node into a local cache (a file lock makes the
other workers on the node wait for the first one), then loaded like a local directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from omni_ray.config import ConfigError, ModelConfig
from omni_ray.models.spec import ModelSpec, get_spec
from omni_ray.storage import StorageConfig, download_dir, is_remote, read_bytes

CACHE_DIR = Path(os.environ.get("OMNI_RAY_CACHE", "~/.cache/omni_ray")).expanduser()


def read_hf_config(model: ModelConfig, storage: StorageConfig | None = None) -> dict:
    path = model.path.rstrip("/") + "/config.json"
    try:
        if is_remote(path):
            return json.loads(read_bytes(path, storage))
        return json.loads(Path(path).expanduser().read_text())
    except FileNotFoundError:
        raise ConfigError(f"model.path: no config.json at {model.path!r}; point it at a Hugging Face checkpoint "
                          "directory (local or s3://bucket/prefix)") from None


def resolve_spec(model: ModelConfig, hf_config: dict) -> ModelSpec:
    name = model.arch or hf_config.get("model_type")
    if not name:
        raise ConfigError("model.arch: config.json has no model_type; set model.arch explicitly")
    try:
        spec = get_spec(name)
    except KeyError as err:
        raise ConfigError(str(err.args[0])) from None
    if spec.remote_code and not model.trust_remote_code:
        raise ConfigError(
            f"model.trust_remote_code: {spec.name} runs the checkpoint's own Python code; set "
            "model.trust_remote_code: true if you trust it"
        )
    return spec


def local_model_dir(model: ModelConfig, storage: StorageConfig | None = None) -> str:
    """The checkpoint as a local directory; s3:// prefixes are downloaded once per node."""
    if not is_remote(model.path):
        return str(Path(model.path).expanduser())
    digest = hashlib.sha256(model.path.encode()).hexdigest()[:16]
    target = CACHE_DIR / "models" / digest
    download_dir(model.path, str(target), storage)
    return str(target)


def _auto_class(spec: ModelSpec):
    from transformers import AutoModel, AutoModelForImageTextToText

    return AutoModel if spec.remote_code else AutoModelForImageTextToText


def build_skeleton(model: ModelConfig, spec: ModelSpec, hf_config: dict):
    """The model on the meta device: names and shapes, no memory, no weights, no GPU."""
    import torch
    from transformers import AutoConfig

    if spec.remote_code:
        config = AutoConfig.from_pretrained(model.path, trust_remote_code=True)
    else:
        config_dict = dict(hf_config)
        config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    with torch.device("meta"):
        return _auto_class(spec).from_config(config, trust_remote_code=model.trust_remote_code)


def load_model(model: ModelConfig, spec: ModelSpec, local_dir: str):
    import torch

    return _auto_class(spec).from_pretrained(
        local_dir,
        dtype=getattr(torch, model.dtype),
        attn_implementation=model.attn_implementation,
        trust_remote_code=model.trust_remote_code,
    )


def load_processor(model: ModelConfig, local_dir: str):
    from transformers import AutoProcessor

    kwargs = dict(model.processor)
    if model.max_slice_nums is not None:
        kwargs["max_slice_nums"] = model.max_slice_nums
    return AutoProcessor.from_pretrained(local_dir, trust_remote_code=model.trust_remote_code, **kwargs)
