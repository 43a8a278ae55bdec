"""One ``ModelSpec`` per architecture: the differences between VLMs, kept as data.

A spec names, in base-model parameter names (what ``model.named_parameters()`` gives before any
wrapping), where each module group lives, which module lists hold the decoder/encoder layers
(for FSDP2 sharding and for ``last_n_layers``), and which Linear modules LoRA targets by default.
The training loop never asks which model it has; it asks the spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Group names are the freeze map's vocabulary (config.GROUPS).


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model_types: tuple[str, ...]
    """``model_type`` values in config.json that this spec serves."""
    groups: dict[str, tuple[str, ...]]
    """group -> module prefixes. A parameter belongs to the group with the longest matching prefix."""
    layer_lists: dict[str, str]
    """group -> path of the ModuleList holding that group's repeated layers."""
    layer_classes: tuple[str, ...]
    """Class names of repeated blocks, each wrapped with ``fully_shard`` on its own."""
    lora_targets: dict[str, tuple[str, ...]]
    """group -> Linear module name suffixes LoRA adapts by default."""
    image_inputs: dict[str, int] = field(default_factory=lambda: {"pixel_values": 0})
    """Processor outputs that carry image (or video) data -> the dim along which a batch concatenates them."""
    remote_code: bool = False
    """Loaded through the checkpoint's own code (requires model.trust_remote_code)."""
    notes: str = ""

    def group_of(self, param_name: str) -> str | None:
        best, best_len = None, -1
        for group, prefixes in self.groups.items():
            for prefix in prefixes:
                if (param_name == prefix or param_name.startswith(prefix + ".")) and len(prefix) > best_len:
                    best, best_len = group, len(prefix)
        return best

    def layer_index(self, group: str, param_name: str) -> int | None:
        """Index of the repeated layer a parameter sits in, or None outside the group's layer list."""
        container = self.layer_lists.get(group)
        if container is None or not param_name.startswith(container + "."):
            return None
        head = param_name[len(container) + 1 :].split(".", 1)[0]
        return int(head) if head.isdigit() else None


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model spec {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def get_spec(name: str) -> ModelSpec:
    if name in _REGISTRY:
        return _REGISTRY[name]
    for spec in _REGISTRY.values():
        if name in spec.model_types:
            return spec
    raise KeyError(
        f"model.arch: no spec for {name!r}; known: {sorted(_REGISTRY)} "
        f"(model types {sorted(t for s in _REGISTRY.values() for t in s.model_types)})"
    )


def all_specs() -> list[ModelSpec]:
    return list(_REGISTRY.values())


_ATTN_MLP = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Qwen3.5's linear-attention layers project through these instead of q/k/v/o.
_QWEN35_LINEAR_ATTN = ("in_proj_qkv", "in_proj_z", "out_proj")


def _native_minicpmv(name: str, version: str) -> ModelSpec:
    return ModelSpec(
        name=name,
        model_types=(f"minicpmv{version}",),
        groups={
            "vision": ("model.vision_tower",),
            "projector": ("model.merger",),
            "llm": ("model.language_model",),
            "embeddings": ("model.language_model.embed_tokens",),
            "lm_head": ("lm_head",),
        },
        layer_lists={"llm": "model.language_model.layers", "vision": "model.vision_tower.encoder.layers"},
        layer_classes=(f"MiniCPMV{version.upper()}VisionEncoderLayer", "Qwen3_5DecoderLayer"),
        lora_targets={
            "llm": _ATTN_MLP + _QWEN35_LINEAR_ATTN,
            "vision": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
            "projector": ("linear_1", "linear_2"),
        },
        # NaViT packing: every slice of every image (and video frame) in a batch is one long row of patches.
        image_inputs={"pixel_values": -1, "target_sizes": 0, "pixel_values_videos": -1, "target_sizes_videos": 0},
        notes="SigLIP-style ViT with a window-attention merger, MLP merger, Qwen3.5 text model",
    )


MINICPMV_4_6 = register(_native_minicpmv("minicpmv4_6", "4_6"))
MINICPMV_4_7 = register(_native_minicpmv("minicpmv4_7", "4_7"))

MINICPMV_REMOTE = register(
    ModelSpec(
        name="minicpmv_remote",
        model_types=("minicpmv", "minicpmo"),
        groups={
            "vision": ("vpm",),
            "projector": ("resampler",),
            "llm": ("llm",),
            "embeddings": ("llm.model.embed_tokens",),
            "lm_head": ("llm.lm_head",),
        },
        layer_lists={"llm": "llm.model.layers", "vision": "vpm.encoder.layers"},
        layer_classes=("SiglipEncoderLayer", "Qwen2DecoderLayer", "LlamaDecoderLayer", "Qwen3DecoderLayer"),
        lora_targets={
            "llm": _ATTN_MLP,
            "vision": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
            "projector": ("kv_proj",),
        },
        remote_code=True,
        image_inputs={"pixel_values": 0, "tgt_sizes": 0},
        notes="MiniCPM-V 2.x / MiniCPM-o through the checkpoint's own modeling code",
    )
)


def _qwen_vl(name: str, model_type: str, block: str, layer: str) -> ModelSpec:
    return ModelSpec(
        name=name,
        model_types=(model_type,),
        groups={
            "vision": ("model.visual",),
            "projector": ("model.visual.merger",),
            "llm": ("model.language_model",),
            "embeddings": ("model.language_model.embed_tokens",),
            "lm_head": ("lm_head",),
        },
        layer_lists={"llm": "model.language_model.layers", "vision": "model.visual.blocks"},
        layer_classes=(block, layer),
        lora_targets={
            "llm": _ATTN_MLP,
            "vision": ("qkv", "proj", "fc1", "fc2", "gate_proj", "up_proj", "down_proj"),
            "projector": ("mlp.0", "mlp.2"),
        },
        image_inputs={"pixel_values": 0, "image_grid_thw": 0, "pixel_values_videos": 0, "video_grid_thw": 0},
    )


QWEN2_VL = register(_qwen_vl("qwen2_vl", "qwen2_vl", "Qwen2VLVisionBlock", "Qwen2VLDecoderLayer"))
QWEN2_5_VL = register(_qwen_vl("qwen2_5_vl", "qwen2_5_vl", "Qwen2_5_VLVisionBlock", "Qwen2_5_VLDecoderLayer"))

LLAVA = register(
    ModelSpec(
        name="llava",
        model_types=("llava",),
        groups={
            "vision": ("model.vision_tower",),
            "projector": ("model.multi_modal_projector",),
            "llm": ("model.language_model",),
            "embeddings": ("model.language_model.embed_tokens",),
            "lm_head": ("lm_head",),
        },
        layer_lists={"llm": "model.language_model.layers", "vision": "model.vision_tower.encoder.layers"},
        layer_classes=("CLIPEncoderLayer", "SiglipEncoderLayer", "LlamaDecoderLayer", "MistralDecoderLayer"),
        lora_targets={
            "llm": _ATTN_MLP,
            "vision": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
            "projector": ("linear_1", "linear_2"),
        },
    )
)
