"""MiniCPM-V's finetune flags mean what its finetune.py makes them mean (issue 10, defect 5).

Reference: OpenBMB/MiniCPM-V ``finetune/finetune.py`` and the flags ``finetune_ds.sh`` (full)
and ``finetune_lora.sh`` (LoRA) pass to it. There: ``tune_vision`` and ``tune_llm`` default to
true; ``tune_llm`` trains the whole ``llm`` (embeddings and lm_head included); ``use_lora``
freezes the ``llm``, adds LoRA and sets ``embed_tokens.weight.requires_grad_(True)``; the
resampler always trains; shell booleans are ``true``/``false``.

Run: python -m pytest -q tests/unit/test_minicpmv_flags.py
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import pytest

from omni_ray.config import ConfigError, load_config
from omni_ray.freeze import format_plan, plan_freeze
from omni_ray.models.spec import get_spec

BASE = {"model": {"path": "/m"}, "data": {"train": "/d.jsonl"}}
REFERENCE_46 = Path(__file__).resolve().parents[2] / "omni_ray/models/reference/MiniCPM-V-4_6/config.json"

# Every flag finetune_ds.sh passes to finetune.py, with the values it passes (strings, as a shell
# hands them over), except the model and data paths, which are the test's.
FINETUNE_DS = {
    "model_name_or_path": "/models/MiniCPM-V-4_6", "llm_type": "qwen", "data_path": "/data/train.json",
    "eval_data_path": "/data/eval.json", "remove_unused_columns": "false", "label_names": "labels",
    "prediction_loss_only": "false", "bf16": "true", "bf16_full_eval": "true", "fp16": "false",
    "fp16_full_eval": "false", "do_train": "true", "do_eval": "true", "tune_vision": "true", "tune_llm": "true",
    "model_max_length": "2048", "max_slice_nums": "9", "max_steps": "10000", "eval_steps": "1000",
    "output_dir": "output/output_minicpmv2", "logging_dir": "output/output_minicpmv2", "logging_strategy": "steps",
    "per_device_train_batch_size": "1", "per_device_eval_batch_size": "1", "gradient_accumulation_steps": "1",
    "evaluation_strategy": "steps", "save_strategy": "steps", "save_steps": "1000", "save_total_limit": "10",
    "learning_rate": "1e-6", "weight_decay": "0.1", "adam_beta2": "0.95", "warmup_ratio": "0.01",
    "lr_scheduler_type": "cosine", "logging_steps": "1", "gradient_checkpointing": "true",
    "deepspeed": "ds_config_zero2.json", "report_to": "tensorboard",
}
# finetune_lora.sh: the same, LoRA instead of tune_llm, fp16 instead of bf16.
FINETUNE_LORA = {
    **{k: v for k, v in FINETUNE_DS.items()},
    "bf16": "false", "bf16_full_eval": "false", "fp16": "true", "fp16_full_eval": "true",
    "tune_llm": "false", "use_lora": "true", "per_device_train_batch_size": "2",
    "lora_target_modules": r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)",
}


def test_every_finetune_ds_flag_validates_and_maps():
    cfg = load_config(dict(FINETUNE_DS))
    assert cfg.model.path == "/models/MiniCPM-V-4_6" and cfg.model.max_slice_nums == 9
    assert (cfg.data.train, cfg.data.eval, cfg.data.model_max_length) == ("/data/train.json", "/data/eval.json", 2048)
    t = cfg.train
    assert (t.precision, t.max_steps, t.micro_batch_size, t.grad_accum) == ("bf16", 10000, 1, 1)
    assert (t.lr, t.weight_decay, t.adam_beta2, t.log_every, t.gradient_checkpointing) == (1e-6, 0.1, 0.95, 1, True)
    assert t.warmup_steps == math.ceil(0.01 * 10000)  # Trainer's warmup_ratio over max_steps
    assert (cfg.strategy.name, cfg.strategy.zero_stage) == ("deepspeed", 2)
    assert (cfg.checkpoint.every_n_steps, cfg.checkpoint.keep) == (1000, 10)
    assert cfg.run.storage_path == "output/output_minicpmv2"
    # tune_llm: the whole LLM, its embeddings and lm_head included; tune_vision: the vision tower.
    assert {g: cfg.freeze.group(g).mode for g in ("vision", "projector", "llm", "embeddings", "lm_head")} == \
        {"vision": "full", "projector": "full", "llm": "full", "embeddings": "full", "lm_head": "full"}


def test_every_finetune_lora_flag_validates_and_maps():
    cfg = load_config(dict(FINETUNE_LORA))
    assert cfg.train.precision == "fp16" and cfg.train.micro_batch_size == 2
    assert {g: cfg.freeze.group(g).mode for g in ("vision", "projector", "llm", "embeddings", "lm_head")} == \
        {"vision": "full", "projector": "full", "llm": "lora", "embeddings": "full", "lm_head": "frozen"}
    assert cfg.lora.target_modules == FINETUNE_LORA["lora_target_modules"]


@pytest.mark.parametrize("value, expect", [
    ("false", "frozen"), ("False", "frozen"), ("FALSE", "frozen"), (False, "frozen"),
    ("true", "full"), ("True", "full"), (" TRUE ", "full"), (True, "full"),
])
def test_quoted_booleans_in_any_case(value, expect):
    """A quoted tune_vision: "false" means false (on main it was read as true)."""
    assert load_config({**BASE, "tune_vision": value, "tune_llm": "false"}).freeze.vision.mode == expect


@pytest.mark.parametrize("value", ["yes", "no", "1", "0", "flase", "", 1, 0, None, [True]])
def test_other_boolean_values_are_errors_naming_the_flag(value):
    with pytest.raises(ConfigError, match=r"tune_vision: .* is not a boolean; write true or false"):
        load_config({**BASE, "tune_vision": value})


def test_tune_flags_default_to_true():
    cfg = load_config({**BASE, "tune_llm": False})
    assert cfg.freeze.vision.mode == "full"  # tune_vision defaults to true in finetune.py
    cfg = load_config({**BASE, "tune_vision": "false"})
    assert (cfg.freeze.llm.mode, cfg.freeze.embeddings.mode, cfg.freeze.lm_head.mode) == ("full", "full", "full")


def test_use_lora_trains_embeddings_and_defaults_to_attention_targets():
    cfg = load_config({**BASE, "use_lora": "true", "tune_llm": "false", "tune_vision": "false"})
    assert (cfg.freeze.llm.mode, cfg.freeze.embeddings.mode, cfg.freeze.lm_head.mode) == ("lora", "full", "frozen")
    assert cfg.lora.target_modules == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    # use_lora alone: finetune.py would stop (tune_llm defaults true); the evident intent is LoRA.
    assert load_config({**BASE, "use_lora": True}).freeze.llm.mode == "lora"


def test_use_lora_with_tune_llm_true_is_refused_like_finetune_py():
    with pytest.raises(ConfigError, match=r"tune_llm and use_lora are both true.*set tune_llm: false"):
        load_config({**BASE, "use_lora": "true", "tune_llm": "true"})


@pytest.mark.parametrize("flags, message", [
    ({"llm_type": "gpt"}, r"llm_type: 'gpt' is not supported; use one of \['minicpm', 'llama3', 'qwen', 'qwen2'\]"),
    ({"lora_bias": "some"}, r"lora_bias: 'some' is not supported"),
    ({"lora_r": "sixty"}, r"lora_r: 'sixty' is not an integer"),
    ({"learning_rate": "fast"}, r"learning_rate: 'fast' is not a number"),
    ({"q_lora": "maybe"}, r"q_lora: 'maybe' is not a boolean"),
    ({"deepspeed": "ds_config.json"}, r"deepspeed: cannot tell a ZeRO stage"),
    ({"warmup_ratio": "0.1"}, r"warmup_ratio: needs max_steps"),
    ({"lr_scheduler_type": "linear"}, r"lr_scheduler_type: 'linear' is not supported"),
    ({"bf16": "true", "fp16": "true"}, r"bf16 and fp16 are both true"),
    ({"lora_r": 8, "lora": {"r": 16}}, r"lora_r conflicts with lora.r=16"),
])
def test_bad_flag_values_name_the_flag(flags, message):
    with pytest.raises(ConfigError, match=message):
        load_config({**BASE, **flags})


def test_lora_and_processor_flags_map():
    cfg = load_config({**BASE, "use_lora": "true", "tune_llm": "false", "q_lora": "false", "lora_bias": "all",
                       "lora_modules_to_save": "embed_tokens, norm", "scale_resolution": "448", "llm_type": "qwen2",
                       "lora_r": "8", "lora_alpha": "16", "lora_dropout": "0.1"})
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.qlora, cfg.lora.bias) == (8, 16, 0.1, False, "all")
    assert cfg.model.processor == {"scale_resolution": 448}
    assert [o.pattern for o in cfg.freeze.overrides] == [r"(^|\.)embed_tokens\.", r"(^|\.)norm\."]


@lru_cache(maxsize=None)
def real_46_names() -> tuple:
    """Parameter names and shapes of the published MiniCPM-V 4.6, on the meta device (no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.for_model(**json.loads(REFERENCE_46.read_text()))
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    return tuple((n, tuple(p.shape)) for n, p in model.named_parameters())


def plan_46(raw: dict):
    cfg = load_config({**BASE, **raw})
    return plan_freeze(real_46_names(), get_spec("minicpmv4_6"), cfg.freeze, cfg.lora, cfg.train.lr)


def test_use_lora_plan_trains_embed_tokens_on_real_46():
    plan = plan_46({"use_lora": "true", "tune_llm": "false", "tune_vision": "false"})
    by = {p.name: p for p in plan.params}
    assert by["model.language_model.embed_tokens.weight"].mode == "full"
    # finetune.py's default targets: q/k/v of the LLM's self-attention (4.6: its 6 full-attention layers).
    assert len(plan.lora_modules) == 6 * 3
    assert all(m.startswith("model.language_model.layers.") for m in plan.lora_modules)


def test_lora_bias_all_and_lora_only():
    names = [("model.language_model.layers.0.self_attn.q_proj.weight", (8, 8)),
             ("model.language_model.layers.0.self_attn.q_proj.bias", (8,)),
             ("model.language_model.layers.0.mlp.up_proj.weight", (8, 8)),
             ("model.language_model.layers.0.mlp.up_proj.bias", (8,)),
             ("model.vision_tower.post_layernorm.bias", (8,))]
    spec = get_spec("minicpmv4_6")

    def full(bias):
        cfg = load_config({**BASE, "freeze": {"llm": "lora", "vision": "frozen"},
                           "lora": {"target_modules": ["q_proj"], "bias": bias}})
        return plan_freeze(names, spec, cfg.freeze, cfg.lora, 1e-4).full_names

    assert full("none") == set()
    assert full("lora_only") == {"model.language_model.layers.0.self_attn.q_proj.bias"}
    assert full("all") == {n for n, _ in names if n.endswith(".bias")}


# --- defect 7: the tied lm_head of the real MiniCPM-V 4.6 -------------------------------------------------


def test_tied_lm_head_full_trains_the_shared_matrix_and_says_so():
    """lm_head: full on the real 4.6 (tied embeddings) trains embed_tokens.weight; on main it trained nothing."""
    plan = plan_46({"freeze": {"vision": "frozen", "projector": "frozen", "llm": "frozen", "lm_head": "full"}})
    by = {p.name: p for p in plan.params}
    shared = by["model.language_model.embed_tokens.weight"]
    assert shared.mode == "full" and "lm_head" in shared.why
    assert plan.trainable_numel() == shared.numel == 248_094 * 1024
    text = format_plan(plan)
    assert "lm_head is tied to the input embeddings" in text and "trainable" in text


def test_tied_lm_head_frozen_with_full_embeddings_is_explicit():
    plan = plan_46({"freeze": {"embeddings": "full", "lm_head": "frozen"}})
    assert any("lm_head is tied" in n and "is full with it" in n for n in plan.notes)


def test_tied_lm_head_lora_is_an_error():
    with pytest.raises(ConfigError, match=r"freeze.lm_head: minicpmv4_6 ties lm_head to the input embeddings"):
        plan_46({"freeze": {"lm_head": "lora"}})


# --- finetune.py's other LoraArguments ----------------------------------------------------------------------


def test_peft_filters_layers_only_for_a_list_of_targets():
    """The premise of refusing lora_layers_to_transform: finetune.py's lora_target_modules is a string regex,
    and peft (installed here) refuses layers_to_transform beside one; older peft applied the layer filter
    only to a list of names, so in MiniCPM-V's recipe the flag never selected anything."""
    from peft import LoraConfig as PeftLoraConfig

    with pytest.raises(ValueError, match="layers_to_transform"):
        PeftLoraConfig(target_modules=FINETUNE_LORA["lora_target_modules"], layers_to_transform=[0, 1])


@pytest.mark.parametrize("flags, message", [
    ({"use_lora": "true", "lora_layers_to_transform": [0, 3]},
     r"lora_layers_to_transform: finetune.py hands it to peft beside its regex lora_target_modules.*selects "
     r"nothing there; to adapt some layers only, put their indices in lora_target_modules .*last_n_layers"),
    ({"lora_layers_to_transform": "0 1"}, r"lora_layers_to_transform: finetune.py hands it to peft"),
    ({"lora_weight_path": "/ckpt/adapter"}, r"lora_weight_path: MiniCPM-V's finetune.py declares it but never "
                                            r"uses it \(LoRA starts from fresh adapters\); to continue"),
    ({"lora_layer_replication": [[0, 4], [2, 5]]}, r"lora_layer_replication: MiniCPM-V's finetune.py declares it "
                                                   r"but never hands it to peft \(no layer is replicated\); remove it"),
])
def test_lora_arguments_without_effect_in_finetune_py_are_refused_by_reason(flags, message):
    with pytest.raises(ConfigError, match=message):
        load_config({**BASE, **flags})


def test_lora_arguments_without_effect_at_their_defaults_are_accepted():
    cfg = load_config({**BASE, "use_lora": "true", "lora_weight_path": "", "lora_layer_replication": None,
                       "lora_layers_to_transform": None})
    assert cfg.lora.target_modules == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
