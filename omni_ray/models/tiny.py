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
                        scale_resolution: int = 112, seed: int = 0) -> Path:
    import importlib

    import torch

    mod = importlib.import_module(f"transformers.models.minicpmv{version}")
    ver = version.upper()
    processor = tiny_minicpmv_processor(version, scale_resolution)
    tokenizer = processor.tokenizer
    config = getattr(mod, f"MiniCPMV{ver}Config")(
        text_config=_text_config("qwen3_5_text", len(tokenizer), text_layers),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=vision_layers,
                           num_attention_heads=4, patch_size=14, image_size=scale_resolution),
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
}


PROCESSORS = {
    "minicpmv4_6": lambda: tiny_minicpmv_processor("4_6"),
    "minicpmv4_7": lambda: tiny_minicpmv_processor("4_7"),
    "qwen2_vl": lambda: tiny_qwen_vl_processor("qwen2_vl"),
    "qwen2_5_vl": lambda: tiny_qwen_vl_processor("qwen2_5_vl"),
    "llava": tiny_llava_processor,
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
