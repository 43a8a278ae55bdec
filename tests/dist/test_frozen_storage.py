"""Frozen weights in low precision, trained ones in fp32; gradient checkpointing under a freeze map.

2 workers on a local Ray (gloo), the tiny MiniCPM-V 4.6 checkpoint, a real processed batch (an
image and its question). One Ray Train run covers every case (a run costs ~20 s of fixed time):

* storage, bf16, FSDP2 / ZeRO-2 / ZeRO-3: after wrapping, frozen tensors (vision tower, LLM base
  weights under LoRA) are stored in bf16 and trained ones (LoRA adapters, projector) as fp32
  masters with fp32 optimizer state; a few steps lower the loss; the freeze audit passes and
  reports those dtypes; the frozen tensors stay bit-identical; a trainable-only gather is fp32.
* gradient checkpointing, fp32, FSDP2 / ZeRO-3, vision frozen, projector and embeddings frozen
  (so the first checkpointed LLM layer gets inputs that do not require grad), LoRA on the LLM
  and its last layer fully trained: loss and every trained gradient equal with it on and off.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

pytestmark = pytest.mark.dist

ENGINES = {"fsdp": {"name": "fsdp"}, "zero2": {"name": "deepspeed", "zero_stage": 2},
           "zero3": {"name": "deepspeed", "zero_stage": 3}}
STORAGE_CASES = ["fsdp", "zero2", "zero3"]
CHECKPOINTING_CASES = ["fsdp", "zero3"]
STEPS = 4
GRAD_RTOL = 1e-5


def run_config(model_dir: str, train_file: str, engine: str, **train) -> dict:
    return {
        "model": {"path": model_dir, "dtype": "float32"},
        "data": {"train": train_file, "model_max_length": 64},
        "freeze": {"vision": "frozen", "projector": "full", "llm": "lora"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"micro_batch_size": 2, "lr": 1e-3, "precision": "bf16", **train},
        "strategy": ENGINES[engine],
    }


def _wrapped(raw: dict):
    from omni_ray.config import load_config
    from omni_ray.freeze import param_groups
    from omni_ray.strategies import build_strategy
    from omni_ray.train.build import build_trainable_model

    cfg = load_config(raw)
    built = build_trainable_model(cfg.model, cfg.freeze, cfg.lora, cfg.train)
    engine = build_strategy(cfg.strategy, cfg.train, torch.device("cpu"))
    model = engine.wrap(built.model, built.spec)
    engine.setup_optimizer(param_groups(model, built.plan, 0.0), total_steps=STEPS)
    return built, engine


def _stored(param) -> torch.Tensor:
    """This rank's stored tensor: a ZeRO-3 partition, an FSDP2 shard, or the tensor itself."""
    if getattr(param, "ds_tensor", None) is not None:
        return param.ds_tensor
    return param.to_local() if hasattr(param, "to_local") else param.data


def _dtypes(tensors) -> list[str]:
    return sorted({str(t.dtype).removeprefix("torch.") for t in tensors})


def storage_case(raw: dict, batch: dict, rank: int) -> dict:
    from omni_ray.freeze import audit
    from omni_ray.train.step import train_step

    built, engine = _wrapped(raw)
    named = list(engine.unwrapped().named_parameters())
    frozen = {n: _stored(p).detach().clone() for n, p in named if not p.requires_grad}
    out = {"frozen_after_wrap": _dtypes(frozen.values()),
           "trained_after_wrap": _dtypes(_stored(p) for n, p in named if p.requires_grad),
           "trained_masters": sorted({str(engine.storage_dtype(p)).removeprefix("torch.") for n, p in named
                                      if p.requires_grad}),
           "losses": []}
    for step in range(STEPS):
        result = train_step(engine, [batch], float(batch["num_label_tokens"]), 2, torch.device("cpu"))
        out["losses"].append(result.loss_sum / result.label_tokens)
        if step == 0:  # the audit the loop runs after its first step, with the engine's storage dtypes
            rows = audit(engine.unwrapped(), built.plan, engine.optimizer_params, engine.optimizer_state(),
                         engine.storage_dtype)
            out["audit"] = {r.group: r.storage for r in rows}
            out["optimizer_state"] = _dtypes(v for state in engine.optimizer_state().values()
                                             for v in state.values() if torch.is_tensor(v) and v.ndim)
    after = {n: _stored(p) for n, p in engine.unwrapped().named_parameters() if not p.requires_grad}
    out["frozen_identical"] = all(torch.equal(frozen[n], after[n]) for n in frozen)
    out["n_frozen"] = len(frozen)
    out["gathered"] = _dtypes(engine.gather(rank, trainable_only=True).values())
    return out


def _full_grads(engine, engine_name: str) -> dict[str, torch.Tensor]:
    named = [(n, p) for n, p in engine.unwrapped().named_parameters() if p.requires_grad]
    if engine_name == "zero3":
        from deepspeed.utils import safe_get_full_grad

        return {n: safe_get_full_grad(p).detach().clone() for n, p in named}
    return {n: p.grad.full_tensor().detach().clone() for n, p in named}


def checkpointing_case(raw: dict, batch: dict, engine_name: str) -> dict:
    """One forward+backward with and without gradient checkpointing on the same model and batch."""
    from omni_ray.data.batch import Batch
    from omni_ray.train.step import model_loss

    runs = {}
    for on in (False, True):
        built, engine = _wrapped({**raw, "train": {**raw["train"], "gradient_checkpointing": on}})
        model = engine.unwrapped()
        # Inside a checkpointed layer, modules run twice: in the forward, and again in the backward.
        layer0 = next(m for n, m in model.named_modules() if n.endswith("language_model.layers.0.mlp"))
        calls = []
        hook = layer0.register_forward_pre_hook(lambda *_: calls.append(1))
        inputs = Batch(batch).model_inputs()
        loss = model_loss(engine, inputs, batch["labels"])
        engine.backward(loss / float(batch["num_label_tokens"]))
        hook.remove()
        runs[on] = (float(loss.detach()), _full_grads(engine, engine_name), len(calls))
    (loss_off, grads_off, calls_off), (loss_on, grads_on, calls_on) = runs[False], runs[True]
    # LoRA's B starts at zero, so every A has a zero gradient either way: compare what reaches B.
    lost = sorted(n for n, g in grads_off.items() if g.abs().sum() and not grads_on[n].abs().sum())
    first_layer = [n for n, g in grads_on.items() if ".layers.0." in n and g.abs().sum()]
    errors = {n: float((grads_on[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)) for n, g in grads_off.items()}
    return {"loss_off": loss_off, "loss_on": loss_on, "names": sorted(grads_off) == sorted(grads_on),
            "n_grads": len(grads_off), "lost_grads": lost[:5], "first_layer_grads": len(first_layer), "max_grad_err": max(errors.values()),
            "layer0_calls": [calls_off, calls_on]}


def _worker(config: dict) -> None:
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    out = {}
    for engine in STORAGE_CASES:
        out[f"storage-{engine}"] = storage_case(run_config(config["model"], config["train"], engine), config["batch"], rank)
    for engine in CHECKPOINTING_CASES:
        raw = run_config(config["model"], config["train"], engine, precision="fp32")
        raw["freeze"] = {"vision": "frozen", "projector": "frozen", "embeddings": "frozen", "llm": "lora",
                         "overrides": [{"pattern": r"language_model\.layers\.3\.", "mode": "full"}]}
        out[f"checkpointing-{engine}"] = checkpointing_case(raw, config["batch"], engine)
    # Ray Train keeps reported metrics only with a checkpoint: the ranks write theirs to a file.
    with open(f"{config['out']}/rank{rank}.json", "w") as f:
        json.dump(out, f)


@pytest.fixture(scope="module")
def results(ray_local, tiny_minicpmv, color_data, tmp_path_factory) -> list[dict]:
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from omni_ray.config import load_config
    from omni_ray.data.conversation import SampleProcessor, decode
    from omni_ray.models.loading import load_processor
    from omni_ray.models.spec import get_spec
    from omni_ray.train.batches import Batcher
    from trainkit import processed_rows

    cfg = load_config(run_config(str(tiny_minicpmv), str(color_data[0]), "fsdp"))
    rows = processed_rows(cfg, color_data[0])[:2]
    spec = get_spec("minicpmv4_6")

    batcher = Batcher(SampleProcessor(load_processor(cfg.model, str(tiny_minicpmv)), 64, spec.image_inputs), spec)
    batch = batcher([decode(r["sample"]) for r in rows])
    assert "pixel_values" in batch  # the frozen vision tower runs
    out = tmp_path_factory.mktemp("frozen-storage")
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    trainer = TorchTrainer(_worker, train_loop_config={"out": str(out), "model": str(tiny_minicpmv),
                                                       "train": str(color_data[0]), "batch": batch},
                           scaling_config=ScalingConfig(num_workers=2), torch_config=TorchConfig(backend="gloo"),
                           run_config=RunConfig(name="frozen-storage", storage_path=str(out)))
    result = trainer.fit()
    assert result.error is None, result.error
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.parametrize("engine", STORAGE_CASES)
def test_frozen_weights_stored_in_bf16_trained_in_fp32(results, engine):
    for rank, cases in enumerate(results):
        case = cases[f"storage-{engine}"]
        print(rank, engine, case)
        assert case["n_frozen"] > 0 and case["frozen_after_wrap"] == ["bfloat16"], case
        # FSDP2 holds the trained tensors themselves in fp32; DeepSpeed holds a bf16 compute copy in
        # the module and the fp32 masters in its optimizer.
        assert case["trained_after_wrap"] == (["float32"] if engine == "fsdp" else ["bfloat16"]), case
        assert case["trained_masters"] == ["float32"] and case["optimizer_state"] == ["float32"], case
        assert case["audit"]["vision"] == "bf16" and case["audit"]["projector"] == "fp32", case
        assert case["audit"]["llm"] == "bf16/fp32", case  # frozen base weights, fp32 LoRA adapters
        assert case["frozen_identical"], case
        assert case["losses"][-1] < 0.9 * case["losses"][0], case
        assert case["gathered"] == (["float32"] if rank == 0 else []), case


@pytest.mark.parametrize("engine", CHECKPOINTING_CASES)
def test_gradient_checkpointing_keeps_loss_and_gradients(results, engine):
    for rank, cases in enumerate(results):
        case = cases[f"checkpointing-{engine}"]
        print(rank, engine, case)
        assert case["layer0_calls"] == [1, 2], case  # checkpointing is really on (recomputed in the backward)
        assert case["names"] and case["n_grads"] > 0, case
        # Layer 0 is checkpointed and its inputs (frozen embeddings) do not require grad: its
        # adapters still get gradients, and no trained tensor lost its gradient.
        assert case["first_layer_grads"] > 0 and case["lost_grads"] == [], case
        assert case["loss_on"] == pytest.approx(case["loss_off"], rel=GRAD_RTOL), case
        assert case["max_grad_err"] < GRAD_RTOL, case
