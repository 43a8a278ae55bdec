"""The memory estimate is within 25% of the measured peak of a real CPU step on tiny models.

Measured: live tensor bytes above the loaded weights, over two real training steps (the second
runs with the optimizer state the first created), from ``LiveTensorBytes`` on real tensors. The
estimate never sees the weights: its activation term comes from a forward+backward on fake
tensors, its gradient and optimizer terms from the freeze plan's parameter counts.
"""

from __future__ import annotations

import pytest
import torch

from omni_ray.config import FreezeConfig, LoraConfig
from omni_ray.freeze import apply_plan, plan_freeze
from omni_ray.memory import GiB, Layout, estimate_memory, fits_warning, measured_peak
from omni_ray.models.spec import get_spec
from trainkit import tiny_minicpmv_model

VOCAB, BATCH, SEQ = 300, 2, 64
LORA = LoraConfig(r=4, alpha=8, dropout=0.0)
FREEZE_MAPS = {
    "vision frozen + LoRA": {"llm": "lora"},
    "last 2 llm layers": {"llm": {"mode": "full", "last_n_layers": 2}},
    "full": {"vision": "full", "llm": "full", "embeddings": "full", "lm_head": "full"},
}


def tiny_minicpmv():
    return tiny_minicpmv_model(VOCAB)


def measured_step_peak(model, chunked: bool) -> int:
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    return measured_peak(model, ids, chunked=chunked)


# Three freeze maps, each with one loss path (each fake step costs seconds on 2 cores).
@pytest.mark.parametrize(("freeze", "chunked"), [("vision frozen + LoRA", True), ("last 2 llm layers", False),
                                                 ("full", True)])
def test_estimate_within_25_percent_of_measured(freeze, chunked):
    torch.manual_seed(0)
    model = tiny_minicpmv()
    plan = plan_freeze(((n, tuple(p.shape)) for n, p in model.named_parameters()), get_spec("minicpmv4_6"),
                       FreezeConfig(**FREEZE_MAPS[freeze]), LORA, 1e-3)
    estimate = estimate_memory(tiny_minicpmv, lambda m: apply_plan(m, plan, LORA), plan, Layout(chunked_loss=chunked),
                               batch=BATCH, seq_len=SEQ, vocab=VOCAB, compare_checkpointing=False)
    measured = measured_step_peak(apply_plan(model, plan, LORA), chunked)
    ratio = estimate.step_bytes / measured
    print(f"{freeze} {'chunked' if chunked else 'full logits'}: estimate/measured = {ratio:.2f}")
    assert 0.75 <= ratio <= 1.25, (estimate, measured)
    weights = sum(p.numel for p in plan.params) * 4 + sum(plan.lora_numel.values()) * 4
    assert sum(estimate.weights.values()) == weights  # fp32 everything, one worker


def test_gradient_checkpointing_keeps_less():
    model_plan = plan_freeze(((n, tuple(p.shape)) for n, p in tiny_minicpmv().named_parameters()),
                             get_spec("minicpmv4_6"), FreezeConfig(llm="full"), LORA, 1e-3)
    est = estimate_memory(tiny_minicpmv, lambda m: apply_plan(m, model_plan, LORA), model_plan,
                          Layout(gradient_checkpointing=True), batch=BATCH, seq_len=2 * SEQ, vocab=VOCAB)
    assert est.activations < 0.6 * est.activations_other
    assert "gradient checkpointing on" in est.format()


def test_sharding_and_low_precision_frozen_weights():
    plan = plan_freeze(((n, tuple(p.shape)) for n, p in tiny_minicpmv().named_parameters()),
                       get_spec("minicpmv4_6"), FreezeConfig(llm="lora"), LORA, 1e-3)
    one = estimate_memory(tiny_minicpmv, lambda m: apply_plan(m, plan, LORA), plan, Layout(), batch=1, seq_len=32,
                          vocab=VOCAB, compare_checkpointing=False)
    four = estimate_memory(tiny_minicpmv, lambda m: apply_plan(m, plan, LORA), plan,
                           Layout(world=4, frozen_dtype=torch.bfloat16), batch=1, seq_len=32, vocab=VOCAB,
                           compare_checkpointing=False)
    assert four.optimizer == one.optimizer // 4 and four.gradients == one.gradients // 4
    frozen = sum(p.numel for p in plan.params if p.mode != "full")  # base weights under LoRA included
    assert four.weights["bfloat16"] == frozen * 2 // 4  # frozen bf16, sharded 4 ways
    warning = fits_warning(one, one.total - 1, "scaling.gpu_memory_gb")
    assert warning.startswith("memory: the estimate") and "scaling.gpu_memory_gb" in warning
    assert fits_warning(one, 80 * GiB, "x") is None


def test_validate_memory_prints_the_estimate(tmp_path, capsys):
    """`omni-ray validate --memory` on a tiny checkpoint: the table, and the warning above the device."""
    import yaml

    from omni_ray.launch import cli
    from omni_ray.models.tiny import build_tiny_minicpmv

    model_dir = build_tiny_minicpmv(tmp_path / "model", text_layers=4)
    (tmp_path / "train.jsonl").write_text('{"messages": [{"role": "user", "content": "q"}, '
                                          '{"role": "assistant", "content": "a"}]}\n')
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": str(model_dir), "dtype": "float32"},
        "data": {"train": str(tmp_path / "train.jsonl"), "model_max_length": 64},
        "train": {"micro_batch_size": 2, "precision": "fp32"},
        "scaling": {"num_workers": 2, "gpu_memory_gb": 0.001},
    }))
    assert cli.main(["validate", str(config), "--memory"]) == 0
    out = capsys.readouterr().out
    assert "memory per worker (estimate)" in out and "optimizer state" in out
    assert "memory: the estimate" in out and "above 0.0 GiB (scaling.gpu_memory_gb)" in out
