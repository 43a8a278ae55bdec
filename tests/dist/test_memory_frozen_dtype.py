"""The memory estimate with low-precision frozen weights is within 25% of a measured FSDP2 step.

One process, world size 1 (gloo), so the measured step is the engine's own: ``FSDPStrategy.wrap``
stores the frozen weights in bf16 and the trained ones in fp32, and the forward and backward run
in bf16 under its mixed-precision policy. Measured: peak live tensor bytes above the wrapped
model over two real steps (``measured_peak``, an allocation tracker, not RSS). The estimate sees
only the config and the freeze plan (its activations from a fake-tensor step).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from omni_ray.config import FreezeConfig, LoraConfig, ScalingConfig, StrategyConfig, TrainConfig
from omni_ray.freeze import apply_plan, plan_freeze
from omni_ray.memory import estimate_memory, layout_of, measured_peak, unsharded_numels
from omni_ray.models.spec import get_spec
from omni_ray.strategies import build_strategy
from omni_ray.train.session import LocalSession
from trainkit import tiny_minicpmv_model

pytestmark = pytest.mark.dist

VOCAB, BATCH, SEQ = 300, 2, 64
LORA = LoraConfig(r=4, alpha=8, dropout=0.0)
FREEZE_MAPS = {"vision frozen + LoRA": {"llm": "lora"}, "last 2 llm layers": {"llm": {"mode": "full", "last_n_layers": 2}}}


def tiny_minicpmv():
    return tiny_minicpmv_model(VOCAB)


@pytest.mark.parametrize(("freeze", "chunked"), [("vision frozen + LoRA", True), ("last 2 llm layers", False)])
def test_estimate_with_bf16_frozen_weights_within_25_percent(freeze, chunked):
    LocalSession()  # a world-1 process group for fully_shard
    spec, train = get_spec("minicpmv4_6"), TrainConfig(precision="bf16")
    torch.manual_seed(0)
    model = tiny_minicpmv()
    plan = plan_freeze(((n, tuple(p.shape)) for n, p in model.named_parameters()), spec,
                       FreezeConfig(**FREEZE_MAPS[freeze]), LORA, 1e-3)
    layout = layout_of(train, StrategyConfig(name="fsdp"), ScalingConfig(num_workers=1))
    assert layout.frozen_dtype == torch.bfloat16  # train.frozen_dtype: auto under bf16
    layout = replace(layout, chunked_loss=chunked)
    estimate = estimate_memory(tiny_minicpmv, lambda m: apply_plan(m, plan, LORA), plan, layout, batch=BATCH,
                               seq_len=SEQ, vocab=VOCAB, **unsharded_numels(plan, spec),
                               compare_checkpointing=False)
    engine = build_strategy(StrategyConfig(name="fsdp"), train, torch.device("cpu"))
    wrapped = engine.wrap(apply_plan(model, plan, LORA), spec)
    frozen_bytes = sum(p.to_local().nbytes for p in wrapped.parameters() if not p.requires_grad)
    assert {p.dtype for p in wrapped.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert estimate.weights["bfloat16"] == frozen_bytes  # the estimate's frozen weights are what FSDP2 stores
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    measured = measured_peak(wrapped, ids, chunked=chunked)
    ratio = estimate.step_bytes / measured
    print(f"{freeze} {'chunked' if chunked else 'full logits'} bf16 frozen: estimate/measured = {ratio:.2f}")
    assert 0.75 <= ratio <= 1.25, (estimate, measured)
