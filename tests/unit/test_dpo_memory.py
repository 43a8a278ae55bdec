"""The memory estimate counts DPO's reference snapshot: the fully trained parameters' initial values,
as each engine stores them; it equals what ReferencePolicy holds on the real (tiny) model."""

from __future__ import annotations

import dataclasses

import torch

from omni_ray.config import FreezeConfig, LoraConfig
from omni_ray.freeze import apply_plan, plan_freeze
from omni_ray.memory import GiB, Layout, MemoryEstimate, reference_snapshot_bytes
from omni_ray.models.spec import get_spec
from omni_ray.train.reference import ReferencePolicy
from trainkit import tiny_minicpmv_model

LORA = LoraConfig(r=4, alpha=8, dropout=0.0)


def _plan(model, **freeze):
    return plan_freeze(((n, tuple(p.shape)) for n, p in model.named_parameters()), get_spec("minicpmv4_6"),
                       FreezeConfig(**freeze), LORA, 1e-3)


def test_reference_bytes_by_freeze_map_and_engine():
    torch.manual_seed(0)
    model = tiny_minicpmv_model(300)
    lora_only = _plan(model, vision="frozen", projector="frozen", llm="lora")
    assert reference_snapshot_bytes(lora_only, Layout()) == 0  # adapters off: the base model, no copy

    plan = _plan(model, vision="frozen", projector="full", llm="lora")
    projector = sum(p.numel for p in plan.params if p.group == "projector")
    assert projector > 0
    assert reference_snapshot_bytes(plan, Layout()) == projector * 4  # FSDP2 keeps trained weights in fp32
    assert reference_snapshot_bytes(plan, Layout(world=4)) == projector * 4 // 4  # sharded as they are
    zero2 = Layout(world=4, shard_weights=False, engine="deepspeed", compute_dtype=torch.bfloat16)
    assert reference_snapshot_bytes(plan, zero2) == projector * 2  # ZeRO-2: whole bf16 module copies
    assert reference_snapshot_bytes(plan, dataclasses.replace(zero2, shard_weights=True)) == projector * 2 // 4
    assert reference_snapshot_bytes(plan, Layout(), reference_free=True) == 0

    # What the estimate says is what ReferencePolicy holds on the model (one process, fp32).
    peft_model = apply_plan(model, plan, LORA)
    assert ReferencePolicy(peft_model).nbytes == reference_snapshot_bytes(plan, Layout())


def test_the_estimate_adds_the_reference_to_its_total():
    estimate = MemoryEstimate(weights={"float32": GiB}, gradients=0, optimizer=0, optimizer_step=0, activations=GiB,
                              activations_other=None, logits=0, gradient_checkpointing=False)
    with_reference = dataclasses.replace(estimate, reference=GiB // 2)
    assert with_reference.total == estimate.total + GiB // 2
    assert "DPO reference" in with_reference.format() and "DPO reference" not in estimate.format()


def test_run_estimate_for_dpo_counts_two_rows_per_pair_and_the_reference(tmp_path):
    import json

    from omni_ray.config import ModelConfig
    from omni_ray.memory import memory_report, run_estimate
    from omni_ray.models.loading import build_skeleton
    from omni_ray.models.tiny import build_tiny_minicpmv

    path = build_tiny_minicpmv(tmp_path / "m", text_layers=1, vision_layers=1)
    model_cfg, spec = ModelConfig(path=str(path)), get_spec("minicpmv4_6")
    hf_config = json.loads((path / "config.json").read_text())
    plan = _plan(build_skeleton(model_cfg, spec, hf_config), vision="frozen", projector="full", llm="lora")
    args = (model_cfg, hf_config, spec, plan, LORA, Layout())
    sft = run_estimate(*args, batch=1, seq_len=32)
    dpo = run_estimate(*args, batch=1, seq_len=32, dpo=True)
    simpo = run_estimate(*args, batch=1, seq_len=32, dpo=True, reference_free=True)
    assert sft.reference == simpo.reference == 0 and dpo.reference == reference_snapshot_bytes(plan, Layout()) > 0
    assert dpo.activations > 1.5 * sft.activations  # chosen and rejected rows: twice the tokens
    assert dpo.total - dpo.reference == simpo.total
    text, _ = memory_report(*args, batch=1, seq_len=32, gpu_memory_gb=None, dpo=True)
    assert "DPO reference" in text
