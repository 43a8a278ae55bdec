"""ZeRO-3 with different image counts on the two ranks: MiniCPM-V 4.6's merger runs its MLPs once
per image, and ZeRO-3 gathers a module's parameters at each call, so without the merger marked as a
ZeRO-3 leaf (``ModelSpec.zero3_leaf_modules``) rank 1 (two images) issues all-gathers rank 0 (one
image) never joins, and the step hangs. Seen at 1.3B (``bench/realsize.py``); tiny models hide it
because their small weights stay whole under ZeRO-3's persistence threshold, so here the threshold
is 0 (every parameter partitioned, as a real model's large ones are). Without the leaf, rank 0
aborts in a mismatched all-gather here (SIGABRT, 22 s).

Two processes on gloo (``torch.multiprocessing``, no Ray), a 60 s collective timeout: a hang fails
the test instead of stalling the suite. Each rank's first-step loss must equal the same sample's
loss on the unsharded model.
"""

from __future__ import annotations

import datetime
import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from trainkit import free_port

pytestmark = pytest.mark.dist


def _config(model_dir: str):
    from omni_ray.config import load_config

    return load_config({
        "model": {"path": model_dir, "dtype": "float32"},
        "data": {"train": "unused.jsonl", "model_max_length": 256},
        # The merger frozen: DeepSpeed's CPU path cannot make a trained leaf (see DeepSpeedStrategy).
        "freeze": {"vision": "frozen", "projector": "frozen", "llm": "lora"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"precision": "fp32", "micro_batch_size": 1, "lr": 1e-3},
        "strategy": {"name": "deepspeed", "zero_stage": 3,
                     "deepspeed_extra": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}},
    })


def _sample(model_dir: str, images: int):
    """A processed sample with ``images`` images (the tiny processor: one slice each)."""
    from transformers import AutoProcessor

    from omni_ray.data.collate import collate
    from omni_ray.data.conversation import SampleProcessor
    from omni_ray.models.spec import get_spec

    spec = get_spec("minicpmv4_6")
    processor = SampleProcessor(AutoProcessor.from_pretrained(model_dir), 256, spec.image_inputs)
    colours = ["red", "blue", "green"][:images]
    messages = [{"role": "user", "content": "<image>\n" * images + "what colours are these?"},
                {"role": "assistant", "content": " and ".join(colours)}]
    arrays = processor(messages, [Image.new("RGB", (56, 56), c) for c in colours])
    return collate([arrays], spec.image_inputs, processor.tokenizer.pad_token_id or 0)


def _worker(rank: int, model_dir: str, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from omni_ray.freeze import param_groups
    from omni_ray.strategies import build_strategy
    from omni_ray.train.build import build_trainable_model
    from omni_ray.train.step import train_step

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        cfg = _config(model_dir)
        built = build_trainable_model(cfg.model, cfg.freeze, cfg.lora, cfg.train)
        engine = build_strategy(cfg.strategy, cfg.train, torch.device("cpu"))
        model = engine.wrap(built.model, built.spec)
        engine.setup_optimizer(param_groups(model, built.plan, 0.0), total_steps=2)
        leaves = [type(m).__name__ for m in model.modules() if getattr(m, "_z3_leaf", False)]
        batch = _sample(model_dir, images=rank + 1)  # rank 0: one image, rank 1: two
        result = train_step(engine, [batch], float(batch.label_tokens), 2, torch.device("cpu"))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"loss": result.loss_sum / result.label_tokens, "leaves": leaves}, f)
    finally:
        dist.destroy_process_group()


def test_ranks_with_different_image_counts_train_under_zero3(tmp_path, tiny_minicpmv):
    from omni_ray.train.build import build_trainable_model
    from omni_ray.train.step import model_loss

    mp.spawn(_worker, args=(str(tiny_minicpmv), free_port(), str(tmp_path)), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert got[0]["leaves"] == ["MiniCPMV4_6Merger"]
    # The same samples on the unsharded model (same initial weights: LoRA's B starts at zero).
    cfg = _config(str(tiny_minicpmv))
    built = build_trainable_model(cfg.model, cfg.freeze, cfg.lora, cfg.train)

    class Plain:
        def forward(self, inputs):
            return built.model(**inputs)

        def unwrapped(self):
            return built.model

    for rank in range(2):
        batch = _sample(str(tiny_minicpmv), images=rank + 1)
        with torch.no_grad():
            want = float(model_loss(Plain(), batch.model_inputs(), batch.labels)) / batch.label_tokens
        assert got[rank]["loss"] == pytest.approx(want, rel=1e-4), rank
