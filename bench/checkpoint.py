"""Checkpoint bytes and save time at a realistic shape: omni_ray's trainable-only checkpoint beside
the one MiniCPM-V's own recipe writes for the same run.

Model: MiniCPM-V 4.6 at full size from its real config (``omni_ray/models/reference/
MiniCPM-V-4_6/config.json``: 1.30B parameters), random init, base weights in bf16. Freeze map,
LoRA, precision and engine: those of ``jobs/minicpmv46_lora.yaml`` (vision frozen, merger
trained, LoRA r=64 on the LLM, bf16, FSDP2), one process. One real training step (a short text
batch through the engine's forward/backward/step) so the optimizer holds its real state.

* omni_ray: ``omni_ray.train.checkpoint.save`` as training calls it: the trained tensors (fp32
  masters), their AdamW moments, schedule, RNG, data position, config and manifest.
* recipe: what MiniCPM-V's finetune script (Hugging Face ``Trainer``) writes for the same run:
  every weight in the training dtype (``model.safetensors``, bf16) plus ``optimizer.pt`` (the
  fp32 AdamW moments of the trained parameters, as torch's ``optimizer.state_dict()``),
  ``scheduler.pt``, ``rng_state.pth`` and ``trainer_state.json``. (Its DeepSpeed configs would
  also write fp32 master copies of the trained weights; not counted, so the recipe side is the
  smaller one it could be.)

``ideal``: the recipe's bytes over the least a resumable trainable-only checkpoint can hold,
trained parameters x (4 bytes fp32 weight + 8 bytes AdamW moments). Goal: the measured ratio
``full/trainable-only`` is at least 0.95 x ideal (omni_ray's checkpoint carries less than 5%
overhead over the trained state itself).

    python bench/checkpoint.py [--repeats 2] [--strategy fsdp|deepspeed] [--config PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "omni_ray/models/reference/MiniCPM-V-4_6"
JOB = ROOT / "jobs/minicpmv46_lora.yaml"


def dir_bytes(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def random_model(config_path: Path, dtype: torch.dtype):
    """MiniCPM-V 4.6 from its config, random weights (transformers' own init)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = json.loads(config_path.read_text())
    hf = AutoConfig.for_model(config.pop("model_type"), **{k: v for k, v in config.items()
                                                            if k not in ("architectures", "transformers_version")})
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(hf, dtype=dtype)


def job_config(path: Path, model_dir: Path, strategy: str):
    from omni_ray.config import load_config

    raw = yaml.safe_load(path.read_text())
    return load_config({
        "model": {"path": str(model_dir), "dtype": raw["model"]["dtype"]},
        "data": {"train": "unused.jsonl"},
        "freeze": raw["freeze"], "lora": raw["lora"], "train": {**raw["train"], "gradient_checkpointing": False},
        "strategy": {"name": strategy} if strategy != raw["strategy"]["name"] else raw["strategy"],
    })


def trained_engine(cfg, config_path: Path, session):
    """The model in the engine's training layout after one real step; returns (engine, plan, spec)."""
    from omni_ray.freeze import apply_plan, param_groups, plan_freeze
    from omni_ray.models.spec import get_spec
    from omni_ray.strategies import build_strategy

    model = random_model(config_path, getattr(torch, cfg.model.dtype))
    spec = get_spec("minicpmv4_6")
    plan = plan_freeze(((n, tuple(p.shape)) for n, p in model.named_parameters()), spec, cfg.freeze, cfg.lora,
                       cfg.train.lr)
    model = apply_plan(model, plan, cfg.lora)
    for param in model.parameters():  # trained tensors in fp32 (masters), the frozen base in bf16
        if param.requires_grad:
            param.data = param.data.float()
    engine = build_strategy(cfg.strategy, cfg.train, session.device)
    model = engine.wrap(model, spec)
    engine.setup_optimizer(param_groups(engine.unwrapped(), plan, cfg.train.weight_decay), 100)
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    logits = engine.forward({"input_ids": ids, "use_cache": False}).logits
    engine.backward(logits.float().square().mean())
    if engine.name == "fsdp":
        # A text batch does not reach the merger; torch's AdamW would skip it and keep no state.
        # Zero gradients make it create the state an image batch would (ZeRO holds it for all).
        for param in engine.optimizer_params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
    engine.step()
    engine.zero_grad()
    return engine, plan, spec


def omni_ray_save(engine, plan, cfg, identity, session) -> tuple[str, float]:
    from omni_ray.data.position import PositionSet
    from omni_ray.train import checkpoint as ckpt

    record = ckpt.run_record(cfg.run, cfg.model, yaml.safe_dump(cfg.model_dump(mode="json")), identity)
    start = time.perf_counter()
    path = ckpt.save(engine, plan, record, cfg.checkpoint, 1, session.rank,
                     {"epoch": 0, "consumed": PositionSet().to_json(), "rng": {"torch": torch.get_rng_state()}})
    return path, time.perf_counter() - start


def recipe_save(engine, train_dtype: torch.dtype) -> tuple[str, float]:
    """HF Trainer's checkpoint of the same run: every weight in the training dtype + optimizer.pt etc."""
    from safetensors.torch import save_file

    path = Path(tempfile.mkdtemp(prefix="omni_ray_bench_recipe_"))
    start = time.perf_counter()
    weights = engine.gather(0, trainable_only=False)  # full tensors by name (one process: the model itself)
    save_file({n: t.to(train_dtype).contiguous() for n, t in weights.items()}, str(path / "model.safetensors"))
    del weights
    state = engine.save_state(0)
    moments = state["optimizer"]["state"]
    # optimizer.state_dict() numbers parameters instead of naming them; the tensors are the same.
    torch.save({"state": {i: moments[n] for i, n in enumerate(sorted(moments))},
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in
                                 state["optimizer"]["param_groups"]]}, path / "optimizer.pt")
    torch.save(state["scheduler"], path / "scheduler.pt")
    torch.save({"cpu": torch.get_rng_state()}, path / "rng_state.pth")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": 1, "log_history": []}))
    return str(path), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--strategy", default="fsdp", choices=("fsdp", "deepspeed"))
    parser.add_argument("--config", type=Path, default=REFERENCE / "config.json")
    parser.add_argument("--job", type=Path, default=JOB)
    args = parser.parse_args()

    import shutil

    from omni_ray.train import checkpoint as ckpt
    from omni_ray.train.session import LocalSession

    session = LocalSession()
    cfg = job_config(args.job, args.config.parent, args.strategy)
    engine, plan, spec = trained_engine(cfg, args.config, session)
    identity = ckpt.run_identity(args.config.parent, spec.name, plan, cfg.lora)  # once per run, as in training
    rows = {}
    for name, save in (("omni_ray trainable-only", lambda: omni_ray_save(engine, plan, cfg, identity, session)),
                       ("recipe (HF Trainer)", lambda: recipe_save(engine, getattr(torch, cfg.model.dtype)))):
        times, size = [], 0
        for _ in range(args.repeats):
            path, seconds = save()
            times.append(seconds)
            size = dir_bytes(path)
            shutil.rmtree(path, ignore_errors=True)
        rows[name] = (size, statistics.median(times))

    total, trained = sum(p.numel for p in plan.params), plan.trainable_numel()
    print(f"model: MiniCPM-V 4.6 full size ({total:,} parameters, random init, {cfg.model.dtype} base), "
          f"{trained:,} trained ({100 * trained / total:.1f}%: vision frozen, merger full, LoRA r={cfg.lora.r} "
          f"on the LLM), {cfg.strategy.name}, 1 process, one step taken")
    print(f"{'checkpoint':<24} {'bytes':>15} {'save s':>8}")
    for name, (size, seconds) in rows.items():
        print(f"{name:<24} {size:>15,} {seconds:>8.2f}")
    (ours, our_s), (full, full_s) = rows["omni_ray trainable-only"], rows["recipe (HF Trainer)"]
    ideal_bytes = trained * (4 + 8)  # fp32 weight + AdamW exp_avg, exp_avg_sq
    print(f"ideal trainable-only bytes (trained x 12 B) {ideal_bytes:,}; omni_ray overhead over it "
          f"{100 * (ours / ideal_bytes - 1):.2f}%")
    print(f"save time full/trainable-only = {full_s / our_s:.2f}")
    print(f"size ratio full/trainable-only = {full / ours:.2f}")
    print(f"ideal = {full / ideal_bytes:.2f}")


if __name__ == "__main__":
    main()
