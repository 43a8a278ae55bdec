"""Tiny random-initialised checkpoints for tests, benchmarks and the demo.

Nothing can be downloaded at run time, so a tiny model is built from the real transformers
classes, with a byte-level BPE tokenizer trained here and the architecture's stock processor,
and saved with ``save_pretrained``: it then loads through exactly the code path a real
checkpoint takes (``omni_ray.models.loading``).

    python -m omni_ray.models.tiny minicpmv4_6 /tmp/tiny-minicpmv
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TEMPLATES_DIR = Path(__file__).parent / "templates"

# A generic ChatML template for tiny models of families without a published template on file.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Written here, NOT published: no byte-exact copy of MiniCPM-V 4.6/4.7's own template could be found
# (see templates/PROVENANCE.json). It renders content blocks the way the processor expects (one
# image/video token per item, which the processor expands and frames), so the pipeline can run.
MINICPMV_STANDIN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|image_pad|>"
    "{% elif c['type'] == 'video' %}<|video_pad|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def standin_chat_template(image: str, video: str = "") -> str:
    """A ChatML stand-in that renders content blocks with the family's own image/video text.

    Written here, NOT published: for Idefics3, whose published template could not be found with
    provenance (see templates/PROVENANCE.json). ``image`` / ``video`` are what the
    family's processor expects in the text for one image or video (it expands them).
    """
    return (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
        "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}" + image
        + "{% elif c['type'] == 'video' %}" + video + "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def published_chat_template(family: str) -> str:
    """The family's published chat template, as stored byte for byte under ``templates/<family>/``."""
    path = TEMPLATES_DIR / family / "chat_template.jinja"
    if not path.is_file():
        raise KeyError(f"no published chat template on file for {family!r} (see {TEMPLATES_DIR / 'PROVENANCE.json'})")
    return path.read_bytes().decode("utf-8")


def published_special_tokens(family: str) -> dict:
    """The special tokens recorded beside the family's published template."""
    return json.loads((TEMPLATES_DIR / "PROVENANCE.json").read_text())[family]["special_tokens"]

_MINICPMV_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "image_start_token": "<image>",
    "image_end_token": "</image>",
    "slice_start_token": "<slice>",
    "slice_end_token": "</slice>",
    "image_id_start_token": "<image_id>",
    "image_id_end_token": "</image_id>",
}
_CORPUS = (
    "user assistant system what is the color of the shape in the picture? it is red green blue yellow "
    "purple orange white black cyan magenta brown pink gray. the answer is one word. "
    "a cat a dog an astronaut coffee a rocket a horse. describe the image. how many objects are there? "
    "0 1 2 3 4 5 6 7 8 9 yes no left right top bottom circle square triangle star"
)


def train_tokenizer(extra_special: list[str], named_special: dict[str, str], vocab_size: int = 512, *,
                    eos_token: str = "<|im_end|>", pad_token: str = "<pad>", bos_token: str | None = None,
                    unk_token: str | None = None, add_bos: bool = False, chat_template: str = CHAT_TEMPLATE):
    """A byte-level BPE tokenizer trained on a tiny corpus, with the given special tokens.

    ``add_bos`` makes encoding prepend ``bos_token`` as Llama-style tokenizers (LLaVA-1.5) do, so the
    processor path (which relies on the tokenizer for BOS) behaves as with the real checkpoint.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    named = [t for t in (bos_token, eos_token, pad_token, unk_token) if t]
    specials = list(dict.fromkeys(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>", *named, *extra_special]))
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([_CORPUS] * 20, trainer)
    if add_bos:
        bos = (bos_token, tok.token_to_id(bos_token))
        tok.post_processor = processors.TemplateProcessing(single=f"{bos_token} $A", pair=f"{bos_token} $A $B",
                                                           special_tokens=[bos])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos_token, pad_token=pad_token, bos_token=bos_token, unk_token=unk_token,
        extra_special_tokens=named_special,
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def _text_config(model_type: str, vocab: int, layers: int) -> dict:
    cfg = dict(
        model_type=model_type, vocab_size=vocab, hidden_size=64, intermediate_size=128,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        # ~1/sqrt(hidden): at the usual 0.02 a 64-wide random lm_head caps logits near 1, and a
        # tiny model could then never become confident, whatever it learns.
        initializer_range=0.125,
    )
    if model_type == "qwen3_5_text":
        # Qwen3.5 interleaves linear-attention (Gated DeltaNet) and full-attention layers.
        cfg.update(linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=16)
    return cfg


def tiny_minicpmv_processor(version: str = "4_6", scale_resolution: int = 112):
    """The stock MiniCPM-V 4.x processor around a tiny tokenizer; images and frames cost 4 tokens each."""
    import importlib

    # MiniCPM-V 4.7 reuses the 4.6 image and video processors.
    from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil
    from transformers.models.minicpmv4_6.video_processing_minicpmv4_6 import MiniCPMV4_6VideoProcessor

    if version == "4_6":  # the published template and special tokens (templates/PROVENANCE.json)
        special = published_special_tokens("minicpmv4_6")
        template = published_chat_template("minicpmv4_6")
        # Qwen3.5's tokenizer holds <think> and </think> as single added tokens.
        extra = [*special["additional_special_tokens"], *special["extra_special_tokens"].values(), "<think>", "</think>"]
        tokenizer = train_tokenizer(extra, special["extra_special_tokens"], eos_token=special["eos_token"],
                                    pad_token=special["pad_token"], bos_token=special["bos_token"],
                                    unk_token=special["unk_token"], chat_template=template)
    else:  # MiniCPM-V 4.7: no published copy found yet
        template = MINICPMV_STANDIN_TEMPLATE
        tokenizer = train_tokenizer(list(_MINICPMV_TOKENS.values()), _MINICPMV_TOKENS,
                                    pad_token="<|endoftext|>", chat_template=template)
    # Small images keep the tiny model fast: 112 px / 14 px patches = 8x8 patches -> 4 image tokens.
    small = dict(scale_resolution=scale_resolution, max_slice_nums=1, slice_mode=False, patch_size=14)
    processor_cls = getattr(importlib.import_module(f"transformers.models.minicpmv{version}"),
                            f"MiniCPMV{version.upper()}Processor")
    return processor_cls(image_processor=MiniCPMV4_6ImageProcessorPil(**small),
                         video_processor=MiniCPMV4_6VideoProcessor(**small), tokenizer=tokenizer,
                         chat_template=template)


def tiny_qwen_vl_processor(model_type: str = "qwen2_5_vl"):
    """Qwen2(.5)-VL's stock processor, the published chat template and special tokens, small images/frames."""
    import transformers

    named = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
             "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
    special = published_special_tokens(model_type)
    template = published_chat_template(model_type)
    tokenizer = train_tokenizer(special["additional_special_tokens"], named, eos_token=special["eos_token"],
                                pad_token=special["pad_token"], chat_template=template)
    processor_cls = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}[model_type]
    pixels = dict(min_pixels=28 * 28 * 4, max_pixels=56 * 56 * 4)
    return getattr(transformers, processor_cls)(
        image_processor=transformers.Qwen2VLImageProcessor(**pixels),
        video_processor=transformers.Qwen2VLVideoProcessor(**pixels), tokenizer=tokenizer, chat_template=template,
    )


def tiny_llava_processor():
    """LLaVA-1.5's stock processor, llava-hf's published chat template, a BOS-adding tokenizer, 28 px images."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    special = published_special_tokens("llava")
    template = published_chat_template("llava")
    tokenizer = train_tokenizer(["<image>"], {"image_token": "<image>"}, bos_token=special["bos_token"],
                                eos_token=special["eos_token"], pad_token=special["pad_token"],
                                unk_token=special["unk_token"], add_bos=special["add_bos_token"], chat_template=template)
    return LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
        tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=template,
    )


def build_tiny_minicpmv(out: str | Path, version: str = "4_6", *, text_layers: int = 4, vision_layers: int = 2,
                        scale_resolution: int = 112, tie_embeddings: bool = False, seed: int = 0,
                        text_overrides: dict | None = None, vision_overrides: dict | None = None) -> Path:
    """``tie_embeddings``: one matrix for input embeddings and lm_head, as the published 4.6 has.

    ``text_overrides`` / ``vision_overrides`` replace sub-config entries (e.g. the published text
    width, for benchmarks where the matmuls must dominate); the tokenizer stays the tiny one.
    """
    import importlib

    import torch

    mod = importlib.import_module(f"transformers.models.minicpmv{version}")
    ver = version.upper()
    processor = tiny_minicpmv_processor(version, scale_resolution)
    tokenizer = processor.tokenizer
    config = getattr(mod, f"MiniCPMV{ver}Config")(
        text_config={**_text_config("qwen3_5_text", len(tokenizer), text_layers), "tie_word_embeddings": tie_embeddings,
                     **(text_overrides or {})},
        tie_word_embeddings=tie_embeddings,
        vision_config={**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=vision_layers,
                              num_attention_heads=4, patch_size=14, image_size=scale_resolution),
                       **(vision_overrides or {})},
        insert_layer_id=0,
        image_size=scale_resolution,
        image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.video_token_id,
    )
    torch.manual_seed(seed)
    model = getattr(mod, f"MiniCPMV{ver}ForConditionalGeneration")(config)
    return _save(out, model, processor)


def build_tiny_qwen_vl(out: str | Path, model_type: str = "qwen2_5_vl", *, seed: int = 0) -> Path:
    import torch
    from transformers import CONFIG_MAPPING, AutoModelForImageTextToText

    processor = tiny_qwen_vl_processor(model_type)
    tokenizer = processor.tokenizer
    text = _text_config(model_type + "_text", len(tokenizer), 2)
    text["rope_parameters"] = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    vision = dict(depth=2, hidden_size=64, embed_dim=64, out_hidden_size=64, intermediate_size=128, num_heads=4,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1])
    config = CONFIG_MAPPING[model_type](
        text_config=text, vision_config=vision,
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
    )
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    return _save(out, model, processor)


def build_tiny_llava(out: str | Path, *, seed: int = 0) -> Path:
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    processor = tiny_llava_processor()
    tokenizer = processor.tokenizer
    config = LlavaConfig(
        text_config=_text_config("llama", len(tokenizer), 2),
        vision_config=dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, image_size=28, patch_size=14, projection_dim=64),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    return _save(out, model, processor)


def published_tokenizer(family: str, named: dict[str, str] | None = None, extra: tuple[str, ...] = ()):
    """A tiny tokenizer with the family's published chat template and special tokens (PROVENANCE.json).

    ``named`` are the tokens the family's processor looks up by attribute (``tokenizer.image_token``, ...);
    by default the recorded ``extra_special_tokens``.
    """
    special = published_special_tokens(family)
    named = dict(special.get("extra_special_tokens", {}) if named is None else named)
    tokens = [*special.get("additional_special_tokens", []), *named.values(), *extra]
    return train_tokenizer(tokens, named, eos_token=special["eos_token"], pad_token=special["pad_token"],
                           bos_token=special.get("bos_token"), unk_token=special.get("unk_token"),
                           add_bos=special.get("add_bos_token", False), chat_template=published_chat_template(family))


_QWEN_VISION_TOKENS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                       "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}


def tiny_qwen3_vl_processor():
    """Qwen3-VL's stock processor (16 px patches), the published template and special tokens."""
    import transformers

    tokenizer = published_tokenizer("qwen3_vl", _QWEN_VISION_TOKENS)
    image_processor = transformers.Qwen2VLImageProcessor(
        patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32 * 4, max_pixels=64 * 64 * 4)
    video_processor = transformers.Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2)
    return transformers.Qwen3VLProcessor(image_processor=image_processor, video_processor=video_processor,
                                         tokenizer=tokenizer, chat_template=tokenizer.chat_template)


def build_tiny_qwen3_vl(out: str | Path, *, seed: int = 0) -> Path:
    """Qwen3-VL: SigLIP-2-style ViT with DeepStack mergers + Qwen3 text model (16 px patches)."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    processor = tiny_qwen3_vl_processor()
    tokenizer = processor.tokenizer
    text = _text_config("qwen3_vl_text", len(tokenizer), 2)
    text["rope_parameters"] = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16, deepstack_visual_indexes=[0])
    ids = {f"{k}_id": tokenizer.convert_tokens_to_ids(v) for k, v in _QWEN_VISION_TOKENS.items()}
    config = Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
    torch.manual_seed(seed)
    return _save(out, Qwen3VLForConditionalGeneration(config), processor)


def tiny_internvl_processor():
    """InternVL 3 (-hf)'s stock processor, the published template and special tokens, 28 px tiles."""
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    tokenizer = published_tokenizer("internvl")
    # 28 px tiles of 14 px patches: 2x2 patches, pixel shuffle 0.5 -> one token per tile.
    return InternVLProcessor(image_processor=GotOcr2ImageProcessor(size={"height": 28, "width": 28},
                                                                   crop_to_patches=False),
                             tokenizer=tokenizer,
                             video_processor=InternVLVideoProcessor(size={"height": 28, "width": 28}),
                             image_seq_length=1, chat_template=tokenizer.chat_template)


def build_tiny_internvl(out: str | Path, *, seed: int = 0) -> Path:
    """InternVL 3: InternViT + MLP projector (pixel shuffle 0.5) + Qwen2 text model."""
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    processor = tiny_internvl_processor()
    tokenizer = processor.tokenizer
    config = InternVLConfig(
        text_config=_text_config("qwen2", len(tokenizer), 2),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=[28, 28], patch_size=[14, 14]),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=1,
    )
    torch.manual_seed(seed)
    return _save(out, InternVLForConditionalGeneration(config), processor)


def tiny_gemma3_processor():
    """Gemma 3's stock processor, the published template and special tokens, 56 px images."""
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    tokenizer = published_tokenizer("gemma3")
    # 56 px, 14 px patches: 4x4 patches pooled 2x2 -> 4 tokens per image.
    image_processor = Gemma3ImageProcessor(size={"height": 56, "width": 56}, do_pan_and_scan=False)
    return Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=4,
                           chat_template=tokenizer.chat_template)


def build_tiny_gemma3(out: str | Path, *, seed: int = 0) -> Path:
    """Gemma 3: SigLIP + pooled projector (fixed tokens per image) + Gemma 3 text model."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    processor = tiny_gemma3_processor()
    tokenizer = processor.tokenizer
    text = _text_config("gemma3_text", len(tokenizer), 2)
    text.update(sliding_window=64, query_pre_attn_scalar=16)
    config = Gemma3Config(
        text_config=text,
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=56, patch_size=14, vision_use_head=False),
        mm_tokens_per_image=4, image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
        boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
    )
    torch.manual_seed(seed)
    return _save(out, Gemma3ForConditionalGeneration(config), processor)


def tiny_idefics3_processor(model_type: str = "smolvlm"):
    """Idefics3 / SmolVLM's stock processor, 56 px images, no splitting.

    SmolVLM carries its published template and special tokens; for Idefics3 no published copy with
    provenance was found, so it keeps a stand-in written here (see PROVENANCE.json).
    """
    import transformers

    prefix = {"idefics3": "Idefics3", "smolvlm": "SmolVLM"}[model_type]
    named = {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
             "global_image_token": "<global-img>"}
    if model_type == "smolvlm":
        tokenizer = published_tokenizer("smolvlm", named)
    else:
        tokenizer = train_tokenizer([*named.values(), "<end_of_utterance>"], named,
                                    chat_template=standin_chat_template("<image>"))
    image_processor = getattr(transformers, f"{prefix}ImageProcessor")(
        do_image_splitting=False, size={"longest_edge": 56}, max_image_size={"longest_edge": 56})
    kwargs = {"video_processor": transformers.SmolVLMVideoProcessor()} if model_type == "smolvlm" else {}
    # 56 px, 14 px patches: 4x4 patches, pixel shuffle by 2 -> 4 tokens per image.
    return getattr(transformers, f"{prefix}Processor")(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
        chat_template=tokenizer.chat_template, **kwargs)


def build_tiny_idefics3(out: str | Path, model_type: str = "smolvlm", *, seed: int = 0) -> Path:
    """Idefics3 / SmolVLM: SigLIP + pixel-shuffle connector + Llama text model (no image splitting)."""
    import torch
    import transformers

    prefix = {"idefics3": "Idefics3", "smolvlm": "SmolVLM"}[model_type]
    processor = tiny_idefics3_processor(model_type)
    tokenizer = processor.tokenizer
    config = getattr(transformers, f"{prefix}Config")(
        text_config=_text_config("llama", len(tokenizer), 2),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=56, patch_size=14),
        scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config)
    return _save(out, model, processor)


def tiny_llava_onevision_processor():
    """LLaVA-OneVision's stock processor, llava-hf's published template, 28 px images and frames."""
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    tokenizer = published_tokenizer("llava_onevision")
    # One 28 px grid point: every image is a base view + one tile of 2x2 patches.
    image_processor = LlavaOnevisionImageProcessor(size={"height": 28, "width": 28}, image_grid_pinpoints=[[28, 28]])
    return LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   video_processor=LlavaOnevisionVideoProcessor(size={"height": 28, "width": 28}),
                                   num_image_tokens=4, vision_feature_select_strategy="full",
                                   chat_template=tokenizer.chat_template)


def build_tiny_llava_onevision(out: str | Path, *, seed: int = 0) -> Path:
    """LLaVA-OneVision: SigLIP + MLP projector (anyres tiles, newline token) + Qwen2 text model."""
    import torch
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    processor = tiny_llava_onevision_processor()
    tokenizer = processor.tokenizer
    config = LlavaOnevisionConfig(
        text_config=_text_config("qwen2", len(tokenizer), 2),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=14),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=[[28, 28]], vision_feature_select_strategy="full", vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    return _save(out, LlavaOnevisionForConditionalGeneration(config), processor)


def _save(out: str | Path, model, processor) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


BUILDERS = {
    "minicpmv4_6": lambda out, **kw: build_tiny_minicpmv(out, "4_6", **kw),
    "minicpmv4_7": lambda out, **kw: build_tiny_minicpmv(out, "4_7", **kw),
    "qwen2_vl": lambda out, **kw: build_tiny_qwen_vl(out, "qwen2_vl", **kw),
    "qwen2_5_vl": lambda out, **kw: build_tiny_qwen_vl(out, "qwen2_5_vl", **kw),
    "llava": build_tiny_llava,
    "qwen3_vl": build_tiny_qwen3_vl,
    "internvl": build_tiny_internvl,
    "gemma3": build_tiny_gemma3,
    "idefics3": lambda out, **kw: build_tiny_idefics3(out, "idefics3", **kw),
    "smolvlm": lambda out, **kw: build_tiny_idefics3(out, "smolvlm", **kw),
    "llava_onevision": build_tiny_llava_onevision,
}


PROCESSORS = {
    "minicpmv4_6": lambda: tiny_minicpmv_processor("4_6"),
    "minicpmv4_7": lambda: tiny_minicpmv_processor("4_7"),
    "qwen2_vl": lambda: tiny_qwen_vl_processor("qwen2_vl"),
    "qwen2_5_vl": lambda: tiny_qwen_vl_processor("qwen2_5_vl"),
    "llava": tiny_llava_processor,
    "qwen3_vl": tiny_qwen3_vl_processor,
    "internvl": tiny_internvl_processor,
    "gemma3": tiny_gemma3_processor,
    "idefics3": lambda: tiny_idefics3_processor("idefics3"),
    "smolvlm": lambda: tiny_idefics3_processor("smolvlm"),
    "llava_onevision": tiny_llava_onevision_processor,
}


def build_tiny_processor(arch: str):
    """The tiny model's processor alone (no weights): for tokenisation tests."""
    if arch not in PROCESSORS:
        raise KeyError(f"no tiny processor for {arch!r}; available: {sorted(PROCESSORS)}")
    return PROCESSORS[arch]()


def build_tiny(arch: str, out: str | Path, **kwargs) -> Path:
    if arch not in BUILDERS:
        raise KeyError(f"no tiny builder for {arch!r}; available: {sorted(BUILDERS)}")
    return BUILDERS[arch](out, **kwargs)


if __name__ == "__main__":
    print(build_tiny(sys.argv[1], sys.argv[2]))
