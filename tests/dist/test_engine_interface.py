"""Every engine implements the whole interface the loop uses, with the same metrics and meanings.

One process (world size 1, gloo): the engine interface is exercised directly (wrap,
setup_optimizer, the real ``train_step``, optimizer state, gather, save/load state) on FSDP2,
ZeRO-2 and ZeRO-3, and the freeze audit is shown to catch a frozen parameter that holds
optimizer state, from each engine's own ``optimizer_state()`` translation.
"""

from __future__ import annotations

import math

import pytest
import torch

from omni_ray.config import load_config
from omni_ray.data.conversation import SampleProcessor, decode
from omni_ray.freeze import FreezeAuditError, audit, base_name, param_groups
from omni_ray.models.loading import load_processor
from omni_ray.strategies import build_strategy
from omni_ray.strategies.base import StepStats, Strategy, lr_lambda
from omni_ray.train.batches import Batcher
from omni_ray.train.build import build_trainable_model
from omni_ray.train.session import LocalSession
from omni_ray.train.step import train_step
from trainkit import processed_rows

pytestmark = pytest.mark.dist

ENGINES = {
    "fsdp": {"name": "fsdp"},
    "zero2": {"name": "deepspeed", "zero_stage": 2},
    "zero3": {"name": "deepspeed", "zero_stage": 3},
}


@pytest.fixture(scope="module")
def session():
    return LocalSession()


def build(engine: str, tiny_minicpmv, train_jsonl):
    cfg = load_config({
        "model": {"path": str(tiny_minicpmv), "dtype": "float32"},
        "data": {"train": str(train_jsonl), "model_max_length": 64},
        "freeze": {"vision": "frozen", "projector": "full", "llm": "lora"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 4, "micro_batch_size": 2, "lr": 1e-3, "warmup_steps": 2, "precision": "fp32"},
        "strategy": ENGINES[engine],
    })
    built = build_trainable_model(cfg.model, cfg.freeze, cfg.lora, cfg.train)
    engine_ = build_strategy(cfg.strategy, cfg.train, torch.device("cpu"))
    model = engine_.wrap(built.model, built.spec)
    engine_.setup_optimizer(param_groups(model, built.plan, 0.0), total_steps=4)
    rows = processed_rows(cfg, train_jsonl)[:4]
    batcher = Batcher(SampleProcessor(load_processor(cfg.model, built.local_dir), 64, built.spec.image_inputs),
                      built.spec)
    batch = batcher([decode(r["sample"]) for r in rows])
    return cfg, built, engine_, batch


def trainable_names(engine: Strategy) -> set[str]:
    return {n for n, p in engine.unwrapped().named_parameters() if p.requires_grad}


@pytest.mark.parametrize("engine_name", list(ENGINES))
def test_engine_interface(engine_name, session, tiny_minicpmv, color_data):
    cfg, built, engine, batch = build(engine_name, tiny_minicpmv, color_data[0])
    assert isinstance(engine, Strategy)
    assert engine.supports_sharded_checkpoint is True
    assert engine.shards_trainable_only is (engine_name != "fsdp")  # ZeRO shards trainable-only checkpoints too
    tokens = float(batch["num_label_tokens"])
    first = train_step(engine, [batch], tokens, 1, session.device)
    assert isinstance(first.stats, StepStats)
    assert math.isfinite(first.stats.grad_norm) and first.stats.grad_norm > 0
    assert (first.stats.skipped, first.stats.skipped_total) == (False, 0)
    assert first.label_tokens == tokens and first.loss_sum > 0
    # The schedule has advanced one step: warmup 2 -> the next step's lr is 2/2 of train.lr.
    assert engine.current_lr() == pytest.approx(cfg.train.lr * lr_lambda(1, 2, 4, 0.0))

    trained = trainable_names(engine)
    state = engine.optimizer_state()
    with_state = {n for n, p in engine.unwrapped().named_parameters() if p in state}
    assert with_state == trained, "optimizer_state() must cover exactly the trained parameters"
    audit(engine.unwrapped(), built.plan, engine.optimizer_params, state)  # passes

    gathered = engine.gather(rank=0)
    assert set(gathered) == trained
    saved = engine.save_state(rank=0)
    assert set(saved["optimizer"]["state"]) == trained and saved["skipped_total"] == 0
    assert set(engine.save_state(rank=0, include_optimizer=False)) >= {"scheduler", "skipped_total"}
    before = engine.current_lr()
    if engine_name != "fsdp":
        zero_checkpoint_round_trip(cfg, built, engine, gathered, saved)
    train_step(engine, [batch], tokens, 1, session.device)
    engine.load_state(saved)  # back to the state after step 1: the schedule too
    assert engine.current_lr() == pytest.approx(before)


def zero_checkpoint_round_trip(cfg, built, engine, gathered: dict, saved: dict) -> None:
    """ZeRO's checkpoint through the real save/load: sharded (one safetensors file per rank, listed
    and checksummed in the manifest), read back as full tensors without a process group (what
    export does), and resumed into a fresh engine of the other stage with the same state, exactly."""
    from omni_ray.data.position import PositionSet
    from omni_ray.train import checkpoint as ckpt

    identity = ckpt.run_identity(cfg.model.path, built.spec.name, built.plan, cfg.lora)
    record = ckpt.run_record(cfg.run, cfg.model, "{}", identity)
    path = ckpt.save(engine, built.plan, record, cfg.checkpoint, 1, 0,
                     {"epoch": 0, "consumed": PositionSet().to_json(), "rng": {"torch": torch.get_rng_state()}})
    manifest = ckpt.read_manifest(path)
    assert manifest["layout"] == "zero-sharded" and manifest["trainable_only"] is True
    assert "zero_rank00000-of-00001.safetensors" in manifest["files"] and "weights.safetensors" not in manifest["files"]
    tensors = ckpt.load_trainable(path)  # no process group needed: export's path
    assert set(tensors) == set(gathered) and all(torch.equal(tensors[n], gathered[n]) for n in gathered)

    # Into the other ZeRO stage (its own sharded reader), and into FSDP2 (reassembled, gathered layout).
    for other in ("zero2" if engine.stage == 3 else "zero3", "fsdp"):
        fresh_cfg = cfg.model_copy(update={"strategy": cfg.strategy.model_copy(update=ENGINES[other])})
        fresh_built = build_trainable_model(fresh_cfg.model, fresh_cfg.freeze, fresh_cfg.lora, fresh_cfg.train)
        fresh = build_strategy(fresh_cfg.strategy, fresh_cfg.train, torch.device("cpu"))
        fresh.wrap(fresh_built.model, fresh_built.spec)
        fresh.setup_optimizer(param_groups(fresh.unwrapped(), fresh_built.plan, 0.0), total_steps=4)
        loaded = ckpt.load(path, identity, "auto", fresh.sharded_layout)
        if other == "fsdp":
            assert loaded["sharded_dir"] is None and set(loaded["tensors"]) == set(gathered)
            fresh.load_trainable(loaded["tensors"])
        else:
            assert loaded["sharded_dir"] == path and loaded["tensors"] == {}
            fresh.load_sharded(loaded["sharded_dir"])
        fresh.load_state(loaded["train_state"])
        again, state = fresh.gather(rank=0), fresh.save_state(rank=0)
        assert all(torch.equal(again[n], gathered[n]) for n in gathered), other
        for name, entry in saved["optimizer"]["state"].items():
            for key, value in entry.items():
                assert torch.equal(state["optimizer"]["state"][name][key].reshape(value.shape), value), \
                    (other, name, key)
        assert fresh.current_lr() == engine.current_lr()


@pytest.mark.parametrize("engine_name", list(ENGINES))
def test_audit_catches_a_frozen_parameter_with_optimizer_state(engine_name, session, tiny_minicpmv, color_data):
    """A parameter the optimizer holds state for, frozen behind its back: each engine's own
    optimizer_state() translation (ZeRO: flat partitions back to parameters) must expose it."""
    _, built, engine, batch = build(engine_name, tiny_minicpmv, color_data[0])
    train_step(engine, [batch], float(batch["num_label_tokens"]), 1, session.device)
    name, victim = next((n, p) for n, p in engine.unwrapped().named_parameters()
                        if p.requires_grad and built.spec.group_of(base_name(n)[0]) == "projector")
    victim.requires_grad_(False)
    plan = built.plan
    frozen_plan = type(plan)(tuple(p if p.name != base_name(name)[0] else type(p)(p.name, p.group, "frozen", p.numel,
                                                                                   p.lr, "test")
                                   for p in plan.params), plan.lora_modules, plan.lora_numel)
    with pytest.raises(FreezeAuditError, match="frozen tensors have optimizer state"):
        audit(engine.unwrapped(), frozen_plan, [], engine.optimizer_state())
