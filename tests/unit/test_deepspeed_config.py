"""The DeepSpeed config generated from omni_ray's config, and the errors for what cannot work."""

from __future__ import annotations

import pytest
import torch

from omni_ray.config import ConfigError, StrategyConfig, TrainConfig
from omni_ray.strategies.deepspeed import deep_merge, deepspeed_config


def ds(strategy: dict | None = None, **train) -> dict:
    return deepspeed_config(StrategyConfig(name="deepspeed", **(strategy or {})), TrainConfig(**train))


@pytest.mark.parametrize("stage", [2, 3])
def test_stage_and_loop_owned_accumulation(stage):
    cfg = ds({"zero_stage": stage}, micro_batch_size=3, grad_accum=4, max_grad_norm=0.5, precision="fp32")
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["train_micro_batch_size_per_gpu"] == 3
    # The loop accumulates grad_accum micro-batches itself and calls engine.step() once per
    # optimizer step: DeepSpeed must neither divide the loss by GAS nor wait for more steps.
    assert cfg["gradient_accumulation_steps"] == 1
    assert cfg["managed_gradient_accumulation"] is False
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"] == {"enabled": False} and cfg["fp16"] == {"enabled": False}
    assert "communication_data_type" not in cfg
    assert cfg["steps_per_print"] >= 1 << 30 and cfg["wall_clock_breakdown"] is False
    assert "offload_optimizer" not in cfg["zero_optimization"] and "offload_param" not in cfg["zero_optimization"]
    # ZeRO-3 keeps torch's F.linear (no process-wide patch); ZeRO-2 has no such setting.
    assert ("memory_efficient_linear" in cfg["zero_optimization"]) == (stage == 3)


def test_no_clipping_is_zero():
    assert ds(max_grad_norm=None)["gradient_clipping"] == 0.0


def test_bf16():
    cfg = ds(precision="bf16")
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    assert cfg["communication_data_type"] == "fp32"


def test_fp16_dynamic_loss_scaling():
    cfg = ds(precision="fp16")
    assert cfg["bf16"] == {"enabled": False}
    assert cfg["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                           "hysteresis": 2, "min_loss_scale": 1}
    assert cfg["communication_data_type"] == "fp32"


def test_offload_optimizer_any_stage_params_stage3_only():
    for stage in (2, 3):
        cfg = ds({"zero_stage": stage, "offload_optimizer": True})
        assert cfg["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    cfg = ds({"zero_stage": 3, "offload_params": True, "offload_optimizer": True})
    assert cfg["zero_optimization"]["offload_param"] == {"device": "cpu"}
    with pytest.raises(ConfigError, match=r"strategy\.offload_params: ZeRO-2 .*zero_stage: 3"):
        ds({"zero_stage": 2, "offload_params": True})


def test_extra_keys_merge_deeply():
    cfg = ds({"zero_stage": 3, "deepspeed_extra": {
        "zero_optimization": {"stage3_prefetch_bucket_size": 1000, "memory_efficient_linear": True},
        "fp16": {"initial_scale_power": 8},
        "gradient_clipping": 2.0,
        "flops_profiler": {"enabled": False},
    }}, precision="fp16")
    zero = cfg["zero_optimization"]
    assert zero == {"stage": 3, "memory_efficient_linear": True, "stage3_prefetch_bucket_size": 1000}
    assert cfg["fp16"]["initial_scale_power"] == 8 and cfg["fp16"]["loss_scale_window"] == 1000  # merged, not replaced
    assert cfg["gradient_clipping"] == 2.0
    assert cfg["flops_profiler"] == {"enabled": False}


def test_deep_merge_does_not_alias():
    base = {"a": {"b": 1}}
    extra = {"a": {"c": [1]}, "d": {"e": 2}}
    out = deep_merge(base, extra)
    assert out == {"a": {"b": 1, "c": [1]}, "d": {"e": 2}}
    out["a"]["c"].append(2)
    out["d"]["e"] = 3
    assert base == {"a": {"b": 1}} and extra == {"a": {"c": [1]}, "d": {"e": 2}}


def test_config_is_accepted_by_deepspeed():
    """DeepSpeed's own config parser takes every generated variant (world size 1, no process group)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    class OneRank:  # DeepSpeedConfig asks an mpu for the data-parallel world size
        def get_data_parallel_world_size(self):
            return 1

        def get_model_parallel_world_size(self):
            return 1

    for stage in (2, 3):
        for precision in ("bf16", "fp16", "fp32"):
            parsed = DeepSpeedConfig(ds({"zero_stage": stage, "offload_optimizer": True,
                                         "offload_params": stage == 3}, precision=precision, grad_accum=3,
                                        micro_batch_size=2), mpu=OneRank())
            assert parsed.zero_optimization_stage == stage
            assert parsed.gradient_accumulation_steps == 1 and parsed.managed_gradient_accumulation is False
            assert parsed.train_batch_size == 2
            assert parsed.bfloat16_config.enabled == (precision == "bf16")
            assert parsed.float16_config.enabled == (precision == "fp16")


def test_fp16_on_cpu_without_kernels_names_the_key(monkeypatch):
    from deepspeed.accelerator import get_accelerator

    from omni_ray.strategies import deepspeed as ds_strategy

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: False)
    with pytest.raises(ConfigError, match=r"train\.precision: fp16 .*CPU"):
        ds_strategy.check_precision_supported("fp16", torch.device("cpu"))
    ds_strategy.check_precision_supported("bf16", torch.device("cpu"))
    ds_strategy.check_precision_supported("fp16", torch.device("cuda", 0))  # GPUs: DeepSpeed's business


def test_strategy_checks_config_before_building(monkeypatch):
    from omni_ray.strategies import build_strategy

    with pytest.raises(ConfigError, match="strategy.offload_params"):
        build_strategy(StrategyConfig(name="deepspeed", zero_stage=2, offload_params=True), TrainConfig(),
                       torch.device("cpu"))


def test_offload_optimizer_without_cpu_adam_is_a_clear_error(monkeypatch):
    import deepspeed.ops.adam as adam

    from omni_ray.strategies.deepspeed import build_cpu_adam

    class Unbuildable:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("Error building extension 'cpu_adam'")

    monkeypatch.setattr(adam, "DeepSpeedCPUAdam", Unbuildable)
    param = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(RuntimeError, match=r"strategy\.offload_optimizer: .*DeepSpeedCPUAdam.*cpu_adam.*"
                                           r"DS_BUILD_CPU_ADAM=1.*offload_optimizer: false"):
        build_cpu_adam([{"params": [param], "lr": 1e-3, "weight_decay": 0.0}], TrainConfig())
