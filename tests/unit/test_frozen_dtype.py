"""train.frozen_dtype: resolved from the precision, refused where it cannot compute, shown by group.

Pure: the config, DeepSpeed's generated config, the storage cast FSDP2 applies before sharding
(``cast_storage``, on a plain module), the plan table and the audit's storage column.
"""

from __future__ import annotations

import pytest
import torch

from omni_ray.config import ConfigError, FreezeConfig, LoraConfig, StrategyConfig, TrainConfig, load_config
from omni_ray.freeze import audit, format_audit, format_plan, plan_freeze
from omni_ray.models.spec import get_spec
from omni_ray.strategies.deepspeed import deepspeed_config
from omni_ray.strategies.fsdp import cast_storage


@pytest.mark.parametrize(("precision", "frozen_dtype", "stored"),
                         [("bf16", "auto", "bf16"), ("fp16", "auto", "fp16"), ("fp32", "auto", "fp32"),
                          ("bf16", "fp32", "fp32"), ("bf16", "bf16", "bf16")])
def test_frozen_storage_resolves_auto_to_the_precision(precision, frozen_dtype, stored):
    assert TrainConfig(precision=precision, frozen_dtype=frozen_dtype).frozen_storage == stored


@pytest.mark.parametrize(("precision", "frozen_dtype"), [("fp32", "bf16"), ("fp16", "bf16"), ("bf16", "fp16")])
def test_frozen_dtype_that_cannot_compute_is_refused_naming_the_key(tmp_path, precision, frozen_dtype):
    with pytest.raises(ConfigError, match=r"train\.frozen_dtype: .*cannot compute with train\.precision.*auto"):
        load_config({"model": {"path": str(tmp_path)}, "data": {"train": "t.jsonl"},
                     "train": {"precision": precision, "frozen_dtype": frozen_dtype}})


def test_deepspeed_refuses_fp32_frozen_weights_beside_16_bit_compute():
    with pytest.raises(ConfigError, match=r"train\.frozen_dtype: DeepSpeed .*strategy\.name: fsdp"):
        deepspeed_config(StrategyConfig(name="deepspeed"), TrainConfig(precision="bf16", frozen_dtype="fp32"))
    assert deepspeed_config(StrategyConfig(name="deepspeed"), TrainConfig(precision="bf16"))["bf16"]["enabled"]


def test_cast_storage_frozen_low_trained_fp32_buffers_kept():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)).to(torch.bfloat16)
    model[0].weight.requires_grad_(False)
    model.register_buffer("inv_freq", torch.ones(2))
    cast_storage(model, torch.bfloat16)
    assert model[0].weight.dtype == torch.bfloat16  # frozen
    assert {model[0].bias.dtype, model[1].weight.dtype, model[1].bias.dtype} == {torch.float32}  # masters
    assert model.inv_freq.dtype == torch.float32
    cast_storage(model, torch.float32)
    assert model[0].weight.dtype == torch.float32


def _tiny_plan():
    from omni_ray.models.tiny import _text_config
    from transformers.models.minicpmv4_6 import MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration

    cfg = MiniCPMV4_6Config(text_config=_text_config("qwen3_5_text", 300, 2),
                            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, patch_size=14, image_size=56))
    model = MiniCPMV4_6ForConditionalGeneration(cfg)
    lora = LoraConfig(r=4, alpha=8)
    plan = plan_freeze(((n, tuple(p.shape)) for n, p in model.named_parameters()), get_spec("minicpmv4_6"),
                       FreezeConfig(vision="frozen", projector="full", llm="lora"), lora, 1e-3)
    return model, plan, lora


def test_plan_and_audit_show_storage_dtypes_by_group():
    from omni_ray.freeze import apply_plan

    model, plan, lora = _tiny_plan()
    table = format_plan(plan, "bf16")
    rows = {line.split()[0]: line.split()[-1] for line in table.splitlines()[1:] if not line.startswith("total")}
    assert rows["vision"] == "bf16" and rows["projector"] == "fp32" and rows["llm"] == "bf16/fp32", table
    model = apply_plan(model, plan, lora)
    cast_storage(model, torch.bfloat16)
    trained = [p for p in model.parameters() if p.requires_grad]
    by_group = {r.group: r.storage for r in audit(model, plan, trained)}
    assert by_group["vision"] == "bf16" and by_group["projector"] == "fp32" and by_group["llm"] == "bf16/fp32"
    assert "storage frozen/trained" in format_audit(audit(model, plan, trained))
