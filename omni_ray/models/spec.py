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
    sequence_parallel: bool = False
    """``strategy.sequence_parallel`` > 1 is supported: omni_ray.train.sequence's hooks were checked
    against this architecture (N ranks give the loss and gradients of one, tests/dist)."""
    sequence_parallel_blocker: str = ""
    """Why not, when there is a reason beyond "not checked yet" (shown at validate)."""
    zero3_leaf_modules: tuple[str, ...] = ()
    """Classes whose forward calls a submodule a data-dependent number of times (once per image):
    ZeRO-3 gathers parameters per submodule call, so two ranks with different image counts would
    issue different all-gathers and hang. Marked as ZeRO-3 leaves, each gathers its parameters once
    per forward. (Tiny test models never show it: their small weights stay whole under ZeRO-3's
    persistence threshold; found at 1.3B.)"""
    config_from_processor: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """``model.processor`` keys that change the model as well as the processor -> allowed values.
    They are passed to the model's config too, so both sides agree (MiniCPM-V's downsample_mode)."""

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
        # "4x" skips the ViT's insert merger: 4x the image tokens (the model card's finer-detail
        # option). The processor counts tokens and the model merges patches by this one setting.
        config_from_processor={"downsample_mode": ("16x", "4x")},
        zero3_leaf_modules=(f"MiniCPMV{version.upper()}Merger",),  # its MLPs run once per image
        sequence_parallel_blocker="its Gated DeltaNet (linear-attention) layers carry a recurrent and a conv state "
        "along the sequence, and passing that state from rank to rank (with its gradient) is not implemented yet",
    )


MINICPMV_4_6 = register(_native_minicpmv("minicpmv4_6", "4_6"))
MINICPMV_4_7 = register(_native_minicpmv("minicpmv4_7", "4_7"))

# Checkpoints refused by name at validate: model_type -> what they are. Their modeling code ships
# inside the checkpoint (trust_remote_code), written for transformers 4.4x; omni_ray pins 5.x,
# where that code is not verified to run (and cannot be run here), and their image inputs
# (image_bound, tgt_sizes) are not wired into the data path. Training them would be a claim
# nothing here checks, so they are named and refused with their native successors.
UNSUPPORTED = {
    "minicpmv": "MiniCPM-V 2.x (2.0, 2.5, 2.6) and 1.0",
    "minicpmo": "MiniCPM-o (2.6)",
    "omnilmm": "OmniLMM-12B",
}
SUCCESSORS = "MiniCPM-V 4.6 or 4.7 (transformers-native model types minicpmv4_6, minicpmv4_7)"


def _qwen_vl(name: str, model_type: str, block: str, layer: str, sequence_parallel: bool = False) -> ModelSpec:
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
        sequence_parallel=sequence_parallel,
    )


QWEN2_VL = register(_qwen_vl("qwen2_vl", "qwen2_vl", "Qwen2VLVisionBlock", "Qwen2VLDecoderLayer"))
QWEN2_5_VL = register(_qwen_vl("qwen2_5_vl", "qwen2_5_vl", "Qwen2_5_VLVisionBlock", "Qwen2_5_VLDecoderLayer",
                               sequence_parallel=True))

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

_SIGLIP_LORA = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _groups(vision: str, projector: tuple[str, ...], llm: str) -> dict[str, tuple[str, ...]]:
    return {
        "vision": (vision,),
        "projector": projector,
        "llm": (llm,),
        "embeddings": (llm + ".embed_tokens",),
        "lm_head": ("lm_head",),
    }


QWEN3_VL = register(
    ModelSpec(
        name="qwen3_vl",
        model_types=("qwen3_vl",),
        # DeepStack: mergers that feed vision features into early LLM layers sit beside the main one.
        groups=_groups("model.visual", ("model.visual.merger", "model.visual.deepstack_merger_list"),
                       "model.language_model"),
        layer_lists={"llm": "model.language_model.layers", "vision": "model.visual.blocks"},
        layer_classes=("Qwen3VLVisionBlock", "Qwen3VLTextDecoderLayer"),
        lora_targets={
            "llm": _ATTN_MLP,
            "vision": ("qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2"),
            "projector": ("linear_fc1", "linear_fc2"),
        },
        image_inputs={"pixel_values": 0, "image_grid_thw": 0, "pixel_values_videos": 0, "video_grid_thw": 0},
    )
)

INTERNVL = register(
    ModelSpec(
        name="internvl",
        model_types=("internvl",),
        groups=_groups("model.vision_tower", ("model.multi_modal_projector",), "model.language_model"),
        layer_lists={"llm": "model.language_model.layers", "vision": "model.vision_tower.encoder.layer"},
        # InternVL 3 pairs InternViT with Qwen2.5, 3.5 with Qwen3; older releases with Llama-style LLMs.
        layer_classes=("InternVLVisionLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer", "LlamaDecoderLayer"),
        lora_targets={
            "llm": _ATTN_MLP,
            "vision": ("q_proj", "k_proj", "v_proj", "projection_layer", "fc1", "fc2"),
            "projector": ("linear_1", "linear_2"),
        },
    )
)

GEMMA3 = register(
    ModelSpec(
        name="gemma3",
        model_types=("gemma3",),
        groups=_groups("model.vision_tower", ("model.multi_modal_projector",), "model.language_model"),
        layer_lists={"llm": "model.language_model.layers", "vision": "model.vision_tower.encoder.layers"},
        layer_classes=("SiglipEncoderLayer", "Gemma3DecoderLayer"),
        # The projector is one bare weight matrix (mm_input_projection_weight), not a Linear module:
        # it trains in full or stays frozen.
        lora_targets={"llm": _ATTN_MLP, "vision": _SIGLIP_LORA},
    )
)


def _idefics(name: str, encoder_layer: str) -> ModelSpec:
    return ModelSpec(
        name=name,
        model_types=(name,),
        groups=_groups("model.vision_model", ("model.connector",), "model.text_model"),
        layer_lists={"llm": "model.text_model.layers", "vision": "model.vision_model.encoder.layers"},
        layer_classes=(encoder_layer, "LlamaDecoderLayer"),
        lora_targets={"llm": _ATTN_MLP, "vision": _SIGLIP_LORA, "projector": ("modality_projection.proj",)},
        # One sample's images arrive as (1, images, 3, H, W): a batch concatenates along the
        # image dim, and the model matches features to image tokens in order over the batch.
        image_inputs={"pixel_values": 1, "pixel_attention_mask": 1},
    )


IDEFICS3 = register(_idefics("idefics3", "Idefics3EncoderLayer"))
SMOLVLM = register(_idefics("smolvlm", "SmolVLMEncoderLayer"))

LLAVA_ONEVISION = register(
    ModelSpec(
        name="llava_onevision",
        model_types=("llava_onevision",),
        # image_newline is the learned row separator the projector's output is framed with.
        groups=_groups("model.vision_tower", ("model.multi_modal_projector", "model.image_newline"),
                       "model.language_model"),
        layer_lists={"llm": "model.language_model.layers", "vision": "model.vision_tower.encoder.layers"},
        layer_classes=("SiglipEncoderLayer", "Qwen2DecoderLayer"),
        lora_targets={"llm": _ATTN_MLP, "vision": _SIGLIP_LORA, "projector": ("linear_1", "linear_2")},
        # batch_num_images: single-image samples are tiled (anyres), multi-image ones are not. Videos
        # arrive as (1, frames, 3, H, W) per sample and concatenate along the sample dim.
        image_inputs={"pixel_values": 0, "image_sizes": 0, "batch_num_images": 0, "pixel_values_videos": 0},
    )
)
