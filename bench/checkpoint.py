"""Bytes and save time of a trainable-only vs a full checkpoint: same model, same freeze map.

A VLM run usually freezes most of the model (vision encoder, often the LLM base under LoRA);
a trainable-only checkpoint then holds a small fraction of the bytes, and so uploads to S3
in a small fraction of the time. Both are written by omni_ray's own save path (gather ->
safetensors + optimizer/scheduler/RNG/data position + manifest), one after the other.

    python bench/checkpoint.py [--text-layers 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def dir_bytes(path: str) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text-layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lora-r", type=int, default=4)
    args = parser.parse_args()

    import torch

    from omni_ray.config import load_config
    from omni_ray.freeze import param_groups
    from omni_ray.models.tiny import build_tiny_minicpmv
    from omni_ray.strategies import build_strategy
    from omni_ray.train import checkpoint as ckpt
    from omni_ray.data.position import PositionSet
    from omni_ray.train.build import build_trainable_model
    from omni_ray.train.session import LocalSession

    root = Path(tempfile.mkdtemp(prefix="omni_ray_bench_ckpt_"))
    model_dir = build_tiny_minicpmv(root / "model", text_layers=args.text_layers)
    cfg = load_config({
        "model": {"path": str(model_dir), "dtype": "float32"},
        "data": {"train": "unused.jsonl"},
        "freeze": {"vision": "frozen", "projector": "full", "llm": "lora"},
        "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r},
        "train": {"precision": "fp32"},
    })
    session = LocalSession()
    built = build_trainable_model(cfg.model, cfg.freeze, cfg.lora, cfg.train)
    plan = built.plan
    strategy = build_strategy(cfg.strategy, cfg.train, session.device)
    model = strategy.wrap(built.model, built.spec)
    strategy.setup_optimizer(param_groups(model, plan, 0.0), 10)
    for p in strategy.optimizer_params:  # one step, so the optimizer holds its real state
        p.grad = torch.ones_like(p)
    strategy.step()

    identity = ckpt.run_identity(model_dir, spec.name, plan, cfg.lora)  # once per run, as in training
    rows = {}
    for trainable_only in (True, False):
        c = cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"trainable_only": trainable_only})})
        times, size = [], 0
        for _ in range(args.repeats):
            record = ckpt.run_record(c.run, c.model, "", identity)
            start = time.perf_counter()
            path = ckpt.save(strategy, plan, record, c.checkpoint, 1, 0,
                             {"epoch": 0, "consumed": PositionSet().to_json(), "rng": {}})
            times.append(time.perf_counter() - start)
            size = dir_bytes(path)
        rows["trainable-only" if trainable_only else "full"] = (size, statistics.median(times))

    total = sum(p.numel for p in plan.params)
    print(f"model: tiny MiniCPM-V 4.6, {total:,} parameters, {plan.trainable_numel():,} trainable "
          f"(vision frozen, projector full, LoRA r={cfg.lora.r} on the LLM)")
    print(f"{'checkpoint':<16} {'bytes':>12} {'save s':>9}")
    for name, (size, seconds) in rows.items():
        print(f"{name:<16} {size:>12,} {seconds:>9.4f}")
    (tb, ts), (fb, fs) = rows["trainable-only"], rows["full"]
    print(f"ratio trainable-only/full: bytes {tb / fb:.3f}, save time {ts / fs:.3f}")


if __name__ == "__main__":
    main()
