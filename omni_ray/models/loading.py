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
from omni_ray.models.spec import SUCCESSORS, UNSUPPORTED, ModelSpec, get_spec
from omni_ray.storage import StorageConfig, download_dir, is_remote, read_bytes

CACHE_DIR = Path(os.environ.get("OMNI_RAY_CACHE", "~/.cache/omni_ray")).expanduser()


def read_hf_config(model: ModelConfig, storage: StorageConfig | None = None) -> dict:
    path = model.path.rstrip("/") + "/config.json"
    try:
        raw = read_bytes(path, storage) if is_remote(path) else Path(path).expanduser().read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        raise ConfigError(f"model.path: no config.json at {model.path!r}; point it at a Hugging Face checkpoint "
                          "directory (local or s3://bucket/prefix)") from None
    except OSError as err:  # S3: network, credentials, missing bucket; local: permissions
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"model.path: cannot read {path} ({first}); check the path, storage.endpoint_url and "
                          "this machine's storage credentials") from None
    try:
        return json.loads(raw)
    except ValueError as err:
        raise ConfigError(f"model.path: {path} is not valid JSON ({err}); is this a Hugging Face checkpoint?") from None


def resolve_spec(model: ModelConfig, hf_config: dict) -> ModelSpec:
    name = model.arch or hf_config.get("model_type")
    if not name:
        raise ConfigError("model.arch: config.json has no model_type; set model.arch explicitly")
    if name in UNSUPPORTED:
        raise ConfigError(
            f"model.path: {model.path!r} is {UNSUPPORTED[name]} (model_type {name!r}), which is not supported: its "
            "modeling code ships inside the checkpoint and targets transformers 4.4x, and it is not verified to run "
            f"under the transformers 5.x omni_ray uses. Fine-tune its successors instead: {SUCCESSORS}"
        )
    try:
        spec = get_spec(name)
    except KeyError as err:
        raise ConfigError(str(err.args[0])) from None
    model_config_overrides(model, spec)  # a bad value fails here, at validate
    if spec.remote_code and not model.trust_remote_code:
        raise ConfigError(
            f"model.trust_remote_code: {spec.name} runs the checkpoint's own Python code; set "
            "model.trust_remote_code: true if you trust it"
        )
    return spec


def model_config_overrides(model: ModelConfig, spec: ModelSpec) -> dict:
    """Processor settings the model's config must share (spec.config_from_processor), checked.

    MiniCPM-V 4.6's ``downsample_mode: 4x`` makes the processor emit 4x the image tokens and the
    model skip a merge step: set on one side only, tokens and features no longer match.
    """
    out = {}
    for key, allowed in spec.config_from_processor.items():
        if key not in model.processor:
            continue
        value = model.processor[key]
        if value not in allowed:
            raise ConfigError(f"model.processor.{key}: {value!r} is not one of {list(allowed)} for {spec.name}")
        out[key] = value
    return out


def local_model_dir(model: ModelConfig, storage: StorageConfig | None = None) -> str:
    """The checkpoint as a local directory; s3:// prefixes are downloaded once per node."""
    if not is_remote(model.path):
        return str(Path(model.path).expanduser())
    endpoint = storage.endpoint_url if storage else None
    digest = hashlib.sha256(f"{endpoint}|{model.path}".encode()).hexdigest()[:16]
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
        config_dict = {**hf_config, **model_config_overrides(model, spec)}
        config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    with torch.device("meta"):
        return _auto_class(spec).from_config(config, trust_remote_code=model.trust_remote_code)


SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
_MAX_HEADER = 100 << 20  # a safetensors header over 100 MiB is a corrupt file, not a checkpoint


def _read_safetensors_header(uri: str, storage: StorageConfig | None) -> dict:
    """The JSON header of one safetensors file, read without its tensor data.

    A safetensors file starts with an 8-byte little-endian header length N, then N bytes of
    JSON ``{name: {dtype, shape, data_offsets}, "__metadata__": {...}}``. Only those 8 + N
    bytes are read: ranged reads (``read_at``) on S3, a seek on local disk, never the shard.
    """
    import struct

    from omni_ray.storage import resolve

    fs, path = resolve(uri, storage)
    try:
        f = fs.open_input_file(path)
    except FileNotFoundError:
        raise ConfigError(f"model.path: {uri} is listed in the checkpoint's index but does not exist") from None
    with f:
        head = f.read_at(8, 0)
        if len(head) < 8:
            raise ConfigError(f"model.path: {uri} is not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > _MAX_HEADER or length > f.size() - 8:
            raise ConfigError(f"model.path: {uri} is not a safetensors file (header length {length})")
        raw = f.read_at(length, 8)
    try:
        return json.loads(bytes(raw))
    except ValueError as err:
        raise ConfigError(f"model.path: {uri}: safetensors header is not JSON ({err})") from None


def named_shapes_from_index(model_path: str, storage: StorageConfig | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor a checkpoint stores, from its safetensors headers only.

    For checkpoints whose model class lives in the checkpoint's own Python code (remote code:
    MiniCPM-V 2.x, MiniCPM-o), the freeze plan is made from what the checkpoint stores instead
    of from a skeleton, so validating never downloads the weights and never runs that code.
    Reads ``model.safetensors.index.json`` (its ``weight_map``: tensor name -> shard file) and
    the header of each shard it names, or the single ``model.safetensors`` when there is no
    index. Names come in the index's order (the file's order for a single file).

    Caveats: tied weights saved once appear once (as they do in ``named_parameters()``), and
    persistent buffers saved with the weights appear as tensors too.
    """
    from omni_ray.storage import exists, join

    base = model_path.rstrip("/") if is_remote(model_path) else str(Path(model_path).expanduser())
    index_uri = join(base, SAFETENSORS_INDEX)
    if exists(index_uri, storage):
        try:
            weight_map = json.loads(read_bytes(index_uri, storage))["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"model.path: {index_uri} has no valid weight_map ({err!r})") from None
        shards = list(dict.fromkeys(weight_map.values()))
    elif exists(join(base, SAFETENSORS_SINGLE), storage):
        weight_map, shards = None, [SAFETENSORS_SINGLE]
    else:
        raise ConfigError(
            f"model.path: {model_path!r} has neither {SAFETENSORS_INDEX} nor {SAFETENSORS_SINGLE}; a remote-code "
            "checkpoint is planned from its safetensors files (convert .bin checkpoints to safetensors)"
        )
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        header = _read_safetensors_header(join(base, shard), storage)
        for name, info in header.items():
            if name != "__metadata__":
                shapes[name] = tuple(int(d) for d in info["shape"])
    if weight_map is None:
        return list(shapes.items())
    missing = [name for name in weight_map if name not in shapes]
    if missing:
        raise ConfigError(f"model.path: {len(missing)} tensor(s) in {SAFETENSORS_INDEX} are missing from their "
                          f"shards, e.g. {missing[0]!r} in {weight_map[missing[0]]}; the upload is incomplete")
    return [(name, shapes[name]) for name in weight_map]


def qlora_config():
    """4-bit NF4 base weights for QLoRA; stored as bf16 so FSDP2 shards them like any tensor."""
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("lora.qlora: 4-bit QLoRA needs CUDA GPUs (bitsandbytes kernels); set "
                          "scaling.use_gpu: true on a GPU cluster, or lora.qlora: false")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("lora.qlora: bitsandbytes is not installed; pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)


def load_model(model: ModelConfig, spec: ModelSpec, local_dir: str, *, qlora: bool = False):
    import torch

    kwargs = {"quantization_config": qlora_config()} if qlora else {}
    kwargs.update(model_config_overrides(model, spec))  # from_pretrained sets these on the config
    return _auto_class(spec).from_pretrained(
        local_dir,
        dtype=getattr(torch, model.dtype),
        attn_implementation=model.attn_implementation,
        trust_remote_code=model.trust_remote_code,
        **kwargs,
    )


def load_processor(model: ModelConfig, local_dir: str):
    from transformers import AutoProcessor

    kwargs = dict(model.processor)
    if model.max_slice_nums is not None:
        kwargs["max_slice_nums"] = model.max_slice_nums
    return AutoProcessor.from_pretrained(local_dir, trust_remote_code=model.trust_remote_code, **kwargs)
