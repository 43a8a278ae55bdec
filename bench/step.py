"""Training-step time: omni_ray's loop vs a plain Hugging Face ``Trainer`` (MiniCPM-V's recipe).

Same tiny MiniCPM-V (``omni_ray.models.tiny``), same batch (synthetic colour samples through
``SampleProcessor`` and ``collate``), same freeze map (``plan_freeze`` + ``apply_plan``: vision
frozen, projector full, LLM LoRA), same precision, one process, side by side:

  omni_ray  ``omni_ray.train.step.train_step``, the function the training loop calls for each
            optimizer step, in a ``LocalSession`` (world size 1, gloo or nccl) with the FSDP2 engine:
            zero_grad, batch to device, forward, token loss, backward, clip + AdamW step + LR schedule;
  hf        ``transformers.Trainer.train()``, timed per optimizer step by a TrainerCallback
            (``on_step_begin`` .. ``on_step_end``: batch to device, forward with the model's own
            loss, backward, clip, optimizer and scheduler step, zero_grad).

Batch loading is outside both windows (the Trainer fetches a step's batches before
``on_step_begin``). Each side warms up, then the median of the timed steps is reported.

    python bench/step.py [--batch 4] [--steps 40] [--block 5] [--warmup 3] [--precision auto|fp32|bf16]

Runs unchanged on a GPU host (cuda when available; ``auto`` precision is bf16 there, fp32 on CPU).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed

FREEZE = {"vision": "frozen", "projector": "full", "llm": "lora", "embeddings": "frozen", "lm_head": "frozen"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(root: Path, batch: int, precision: str, lr: float):
    """Config, processed samples, collate function (as the loop builds them)."""
    import json

    from PIL import Image

    from omni_ray.config import load_config
    from omni_ray.data.collate import collate
    from omni_ray.data.conversation import SampleProcessor
    from omni_ray.data.synthetic import make_color_dataset
    from omni_ray.models.loading import load_processor, local_model_dir, read_hf_config, resolve_spec
    from omni_ray.models.tiny import build_tiny_minicpmv
    from omni_ray.train.batches import keep_alive_sample

    model_dir = build_tiny_minicpmv(root / "model")
    train_jsonl, _ = make_color_dataset(root / "data", n_train=batch, n_eval=1)
    cfg = load_config({
        "model": {"path": str(model_dir), "dtype": "float32"},
        "data": {"train": str(train_jsonl), "model_max_length": 128},
        "freeze": FREEZE,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"micro_batch_size": batch, "precision": precision, "lr": lr, "max_grad_norm": 1.0},
    })
    spec = resolve_spec(cfg.model, read_hf_config(cfg.model))
    processor = load_processor(cfg.model, local_model_dir(cfg.model))
    sp = SampleProcessor(processor, cfg.data.model_max_length, spec.image_inputs)
    samples = []
    for line in train_jsonl.read_text().splitlines():
        rec = json.loads(line)
        image = Image.open(train_jsonl.parent / rec["image"]).convert("RGB")
        messages = [{"role": t["role"], "content": t["content"]} for t in rec["conversations"]]
        samples.append(sp(messages, [image]))
    keep_alive = keep_alive_sample(sp)
    pad_id = sp.tokenizer.pad_token_id or 0

    def collate_fn(items):
        return collate(items, spec.image_inputs, pad_id, keep_alive)

    return cfg, spec, samples, collate_fn


def fresh_model(cfg, spec):
    """The base model with the freeze map applied (LoRA adapters from the same seed), as training builds it."""
    from omni_ray.train.build import build_trainable_model

    built = build_trainable_model(cfg.model, cfg.freeze, cfg.lora, cfg.train)
    return built.model, built.plan


class OmniRayStep:
    """``omni_ray.train.step.train_step``, the function the loop calls, on the FSDP2 engine, world size 1."""

    def __init__(self, cfg, spec, batch: dict, total_steps: int):
        from omni_ray.freeze import param_groups
        from omni_ray.strategies import build_strategy
        from omni_ray.train.session import LocalSession

        self.session = LocalSession()  # a world-size-1 process group, as the loop runs outside Ray
        self.device = self.session.device
        model, plan = fresh_model(cfg, spec)
        self.strategy = build_strategy(cfg.strategy, cfg.train, self.device)
        model = self.strategy.wrap(model, spec)
        self.strategy.setup_optimizer(param_groups(model, plan, cfg.train.weight_decay), total_steps)
        self.batch = batch

    def run(self, steps: int) -> list[float]:
        from omni_ray.train.step import train_step

        times = []
        for _ in range(steps):
            sync(self.device)
            start = time.perf_counter()
            # World size 1: the step's label tokens are this batch's (the loop all-reduces them).
            train_step(self.strategy, [self.batch], float(self.batch["num_label_tokens"]), 1, self.device)
            sync(self.device)
            times.append(time.perf_counter() - start)
        return times


class HFStep:
    """``Trainer.train()`` for a few steps at a time, timed per optimizer step by a callback."""

    def __init__(self, cfg, spec, samples: list[dict], collate_fn, root: Path):
        from transformers import TrainerCallback

        self.device = device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cfg, self.samples, self.root = cfg, samples, root
        self.model, _ = fresh_model(cfg, spec)

        class StepTimer(TrainerCallback):
            def __init__(self):
                self.times, self.start = [], 0.0

            def on_step_begin(self, args, state, control, **kwargs):
                sync(device)
                self.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                sync(device)
                self.times.append(time.perf_counter() - self.start)

        def hf_collate(items):  # the same batch; the model computes its own (shifted, token-mean) loss
            batch = collate_fn(items)
            batch.pop("num_label_tokens")
            return batch

        self.timer, self.collate = StepTimer(), hf_collate
        self.optim = None

    def run(self, steps: int) -> list[float]:
        """``steps`` timed steps; each train() call starts with one more (optimizer set-up), not counted."""
        from transformers import Trainer, TrainingArguments

        cfg = self.cfg
        args = TrainingArguments(
            output_dir=str(self.root / "hf"),
            per_device_train_batch_size=len(self.samples),
            max_steps=steps + 1,
            learning_rate=cfg.train.lr,
            lr_scheduler_type="cosine",
            weight_decay=cfg.train.weight_decay,
            max_grad_norm=cfg.train.max_grad_norm or 0.0,
            bf16=cfg.train.precision == "bf16",
            fp16=cfg.train.precision == "fp16",
            use_cpu=self.device.type == "cpu",
            train_sampling_strategy="sequential",  # every step sees the same samples in the same order
            remove_unused_columns=False,
            dataloader_num_workers=0,
            logging_strategy="no",
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            seed=cfg.train.seed,
        )
        self.optim = str(args.optim)
        self.timer.times = []
        trainer = Trainer(model=self.model, args=args, train_dataset=self.samples * (steps + 1),
                          data_collator=self.collate, callbacks=[self.timer])
        trainer.train()
        return self.timer.times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--block", type=int, default=5, help="steps per engine before switching to the other")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--lr", type=float, default=1e-4)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    precision = args.precision if args.precision != "auto" else ("bf16" if cuda and torch.cuda.is_bf16_supported()
                                                                 else "fp32")
    root = Path(tempfile.mkdtemp(prefix="omni_ray_bench_step_"))
    cfg, spec, samples, collate_fn = build(root, args.batch, precision, args.lr)
    batch = collate_fn(samples)
    rounds = max(1, -(-args.steps // args.block))
    omni_step = OmniRayStep(cfg, spec, batch, total_steps=args.warmup + rounds * args.block)
    omni_step.run(args.warmup)
    hf_step = HFStep(cfg, spec, samples, collate_fn, root)
    hf_step.run(args.warmup)
    # Alternate blocks of steps, so both see the same machine (other load, clock, caches).
    omni, hf = [], []
    for _ in range(rounds):
        omni += omni_step.run(args.block)
        hf += hf_step.run(args.block)
    torch.distributed.destroy_process_group()

    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    tokens = int(batch["attention_mask"].sum())
    print(f"device {device}, torch {torch.__version__}, precision {precision}, batch {args.batch} samples "
          f"({tokens} tokens), freeze {FREEZE}")
    print(f"{args.warmup} warm-up steps each, then {len(omni)} timed steps each in alternating blocks of "
          f"{args.block}; optimizers: omni_ray torch AdamW (foreach={torch.cuda.is_available()}), HF {hf_step.optim}")
    print(f"{'engine':<34} {'median ms/step':>15} {'min':>8} {'max':>8}")
    for name, times in (("omni_ray loop (FSDP2, LocalSession)", omni), ("HF Trainer", hf)):
        ms = [t * 1000 for t in times]
        print(f"{name:<34} {statistics.median(ms):>15.1f} {min(ms):>8.1f} {max(ms):>8.1f}")
    print(f"ratio omni_ray/hf = {statistics.median(omni) / statistics.median(hf):.2f}")


if __name__ == "__main__":
    main()
