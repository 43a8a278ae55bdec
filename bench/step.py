"""Training-step speed: omni_ray vs MiniCPM-V's recipe (a plain HF ``Trainer``) vs a bare PyTorch loop.

The model is MiniCPM-V 4.6's architecture at its published text width (hidden 1024, MLP 3584,
head dim 256, Gated DeltaNet linear attention 16 x 128, three linear-attention layers per full
attention layer: the real ``text_config`` of ``omni_ray/models/reference/MiniCPM-V-4_6``) with
fewer layers (``--layers``, default 8: ~150M parameters) and a small vision tower, so the
matmuls dominate as they do at full size, and a step fits a CPU. Every side gets the same
weights, the same freeze map (vision frozen, merger full, LoRA r=16 on the LLM, as
``jobs/minicpmv46_lora.yaml``) and the same samples, processed by the model's own processor and
chat template: a long-tailed length mix like real SFT sets (most answers short, a few long).

  hf        ``transformers.Trainer`` the way MiniCPM-V's ``finetune.py`` trains: micro-batches of
            ``--batch`` samples padded to the longest (its default padding collator), the model's
            own loss; timed per optimizer step by a TrainerCallback;
  omni_ray  ``omni_ray.train.step.train_step`` (the function the training loop calls) on the FSDP2
            engine, world size 1, once with the same padded micro-batches and once packed
            (``data.packing``: the same samples padding-free in rows of ``--pack-tokens``);
  bare      the packed batches through the plain module: forward (model's own loss), backward,
            clip, AdamW, no engine.

The figure of merit is time per useful token (the samples' own tokens, padding excluded): the
same samples go through every side, so it is each side's time for the same optimizer steps.
Sides alternate in blocks so all see the same machine load. Prints, last,
``speedup vs HF Trainer = X`` (HF / omni_ray with packing) and ``overhead vs bare torch = Y%``.

    python bench/step.py [--layers 8] [--batch 8] [--steps 10] [--warmup 3] [--block 2]

Runs unchanged on a GPU host (cuda when available; bf16 there, fp32 on CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed

FREEZE = {"vision": "frozen", "projector": "full", "llm": "lora", "embeddings": "frozen", "lm_head": "frozen"}
REFERENCE = Path(__file__).resolve().parents[1] / "omni_ray/models/reference/MiniCPM-V-4_6/config.json"
# The published text model's shape; the layer count and the vocabulary are the benchmark's.
TEXT_SHAPE = ("hidden_size", "intermediate_size", "head_dim", "num_attention_heads", "num_key_value_heads",
              "linear_conv_kernel_dim", "linear_key_head_dim", "linear_num_key_heads", "linear_num_value_heads",
              "linear_value_head_dim", "attn_output_gate", "full_attention_interval", "partial_rotary_factor",
              "rope_parameters", "initializer_range")
WORDS = ("the red cat sat on a mat near one blue door while two small birds sang over green hills and "
         "a tall man read his old book by the warm fire in a quiet house").split()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(root: Path, layers: int) -> Path:
    from omni_ray.models.tiny import build_tiny_minicpmv

    text = json.loads(REFERENCE.read_text())["text_config"]
    overrides = {key: text[key] for key in TEXT_SHAPE if key in text}
    overrides.update(num_hidden_layers=layers, layer_types=text["layer_types"][:layers], initializer_range=0.02)
    return build_tiny_minicpmv(root / "model", text_layers=layers, text_overrides=overrides,
                               vision_overrides=dict(hidden_size=256, intermediate_size=1024))


def long_tailed_conversations(n: int, seed: int) -> list[list[dict]]:
    """Answers of lognormal length (median ~24 words, a few near 300), one image each."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=np.log(24), sigma=1.0, size=n), 4, 300).astype(int)
    return [[{"role": "user", "content": "<image>\nDescribe the picture."},
             {"role": "assistant", "content": " ".join(rng.choice(WORDS, size=length))}] for length in lengths]


def build(root: Path, layers: int, precision: str, lr: float, n_samples: int):
    """Config, processed samples (the training path's SampleProcessor) and the spec."""
    from PIL import Image

    from omni_ray.config import load_config
    from omni_ray.data.conversation import SampleProcessor
    from omni_ray.models.loading import load_processor, local_model_dir, read_hf_config, resolve_spec

    model_dir = build_model(root, layers)
    cfg = load_config({
        "model": {"path": str(model_dir), "dtype": "float32"},
        "data": {"train": str(root / "unused.jsonl"), "model_max_length": 1024},
        "freeze": FREEZE,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "train": {"precision": precision, "lr": lr, "max_grad_norm": 1.0},
    })
    spec = resolve_spec(cfg.model, read_hf_config(cfg.model))
    processor = load_processor(cfg.model, local_model_dir(cfg.model))
    sp = SampleProcessor(processor, cfg.data.model_max_length, spec.image_inputs)
    rng = np.random.default_rng(0)
    samples = []
    for messages in long_tailed_conversations(n_samples, seed=0):
        image = Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))
        samples.append(sp(messages, [image]))
    return cfg, spec, samples, sp.tokenizer.pad_token_id or 0


def fresh_model(cfg):
    """The base model with the freeze map applied (LoRA from the same seed), as training builds it."""
    from omni_ray.train.build import build_trainable_model

    built = build_trainable_model(cfg.model, cfg.freeze, cfg.lora, cfg.train)
    return built.model, built.plan


class Side:
    """Steps through a fixed cycle of optimizer steps (each a list of micro-batches) and times each."""

    name = ""

    def __init__(self, steps: list[list[dict]]):
        self.steps, self.next = steps, 0

    def one_step(self, micro_batches: list[dict]) -> None:
        raise NotImplementedError

    def run(self, n: int, device: torch.device) -> list[float]:
        times = []
        for _ in range(n):
            micro_batches = self.steps[self.next % len(self.steps)]
            self.next += 1
            sync(device)
            start = time.perf_counter()
            self.one_step(micro_batches)
            sync(device)
            times.append(time.perf_counter() - start)
        return times


class OmniRay(Side):
    """``train_step`` on the FSDP2 engine in a world-size-1 process group, as the loop runs it."""

    def __init__(self, name: str, cfg, spec, steps, total_steps: int, device):
        from omni_ray.freeze import param_groups
        from omni_ray.strategies import build_strategy

        super().__init__(steps)
        self.name, self.device = name, device
        model, plan = fresh_model(cfg)
        self.engine = build_strategy(cfg.strategy, cfg.train, device)
        model = self.engine.wrap(model, spec)
        self.engine.setup_optimizer(param_groups(model, plan, cfg.train.weight_decay), total_steps)

    def one_step(self, micro_batches):
        from omni_ray.train.step import train_step

        tokens = float(sum(int(b["num_label_tokens"]) for b in micro_batches))
        train_step(self.engine, micro_batches, tokens, 1, self.device)


class Bare(Side):
    """The plain module and torch AdamW: forward with the model's own loss, backward, clip, step."""

    name = "bare torch loop (packed)"

    def __init__(self, cfg, steps, device):
        super().__init__(steps)
        self.device = device
        self.model, _ = fresh_model(cfg)
        self.model.to(device).train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.autocast = cfg.train.precision == "bf16"

    def one_step(self, micro_batches):
        from omni_ray.data.batch import Batch
        from omni_ray.train.packing import packed_model_inputs

        self.optimizer.zero_grad(set_to_none=True)
        tokens = sum(int(b["num_label_tokens"]) for b in micro_batches)
        for batch in map(Batch, micro_batches):
            # positions per sample, per-sample linear attention for packed rows (omni_ray.train.packing)
            inputs = packed_model_inputs(self.model, batch, self.device) if batch.packed else batch.model_inputs(self.device)
            inputs["labels"] = batch.labels.to(self.device)  # the model computes its own loss, as HF Trainer's does
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
                out = self.model(**inputs)
            # The model's loss is a token mean per micro-batch; weigh it by the step's tokens.
            (out.loss * int(batch["num_label_tokens"]) / tokens).backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()


@contextlib.contextmanager
def single_process_env():
    """Hide the launcher variables the omni_ray sides' process group set, as a one-device HF run has none.

    With LOCAL_RANK set, accelerate (under the Trainer) would take the run for a distributed one and
    wrap the model in DistributedDataParallel, an overhead MiniCPM-V's one-GPU recipe does not pay.
    """
    saved = {k: os.environ.pop(k) for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


class HF(Side):
    """``Trainer.train()`` over the same padded micro-batches, timed per optimizer step by a callback."""

    name = "HF Trainer (padding collator)"

    def __init__(self, cfg, micro_batches: list[dict], accumulation: int, root: Path, device):
        from transformers import TrainerCallback

        super().__init__([])
        self.cfg, self.micro_batches, self.accumulation, self.root = cfg, micro_batches, accumulation, root
        self.model, _ = fresh_model(cfg)
        self.optim = None

        class StepTimer(TrainerCallback):
            def __init__(self):
                self.times, self.start = [], 0.0

            def on_step_begin(self, args, state, control, **kwargs):
                sync(device)
                self.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                sync(device)
                self.times.append(time.perf_counter() - self.start)

        self.timer, self.device = StepTimer(), device

    def run(self, n: int, device: torch.device) -> list[float]:
        """``n`` timed steps; each train() call adds one first step (optimizer set-up), not counted."""
        from transformers import Trainer, TrainingArguments

        cfg, per_step = self.cfg, self.accumulation
        order = [self.micro_batches[(self.next * per_step + i) % len(self.micro_batches)]
                 for i in range((n + 1) * per_step)]
        self.next += n
        self.timer.times = []
        with single_process_env():
            args = TrainingArguments(
                output_dir=str(self.root / "hf"), per_device_train_batch_size=1, gradient_accumulation_steps=per_step,
                max_steps=n + 1, learning_rate=cfg.train.lr, lr_scheduler_type="cosine",
                weight_decay=cfg.train.weight_decay, max_grad_norm=cfg.train.max_grad_norm or 0.0,
                bf16=cfg.train.precision == "bf16", use_cpu=self.device.type == "cpu",
                train_sampling_strategy="sequential", remove_unused_columns=False, dataloader_num_workers=0,
                logging_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True, seed=cfg.train.seed,
            )
            self.optim = str(args.optim)
            # Each "example" is one already-padded micro-batch (the padding collator's output).
            trainer = Trainer(model=self.model, args=args, train_dataset=order,
                              data_collator=lambda items: {k: v for k, v in items[0].items() if k not in
                                                           ("num_label_tokens", "keep_alive")},
                              callbacks=[self.timer])
            trainer.train()
        if trainer.model_wrapped is not trainer.model:
            raise SystemExit(f"the HF side ran wrapped in {type(trainer.model_wrapped).__name__}: not a one-device run")
        return self.timer.times[1:]


def step_batches(samples, spec, pad_id, batch: int, accumulation: int, pack_tokens: int | None):
    """The optimizer steps' micro-batches: padded groups of ``batch`` samples, or those packed."""
    from omni_ray.data.collate import collate
    from omni_ray.data.packing import pack_samples

    groups = [samples[i:i + batch] for i in range(0, len(samples) - batch + 1, batch)]
    if pack_tokens is None:
        micro = [[collate(g, spec.image_inputs, pad_id)] for g in groups]
    else:  # the same samples per micro-batch, padding-free in rows of pack_tokens
        micro = [pack_samples(g, pack_tokens, spec.image_inputs) for g in groups]
    return [sum(micro[i:i + accumulation], []) for i in range(0, len(micro), accumulation)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8, help="samples per micro-batch")
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--pack-tokens", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--block", type=int, default=2, help="steps per side before switching to the next")
    parser.add_argument("--distinct-steps", type=int, default=4, help="optimizer steps of distinct samples, cycled")
    parser.add_argument("--lr", type=float, default=1e-4)
    args = parser.parse_args()

    from omni_ray.train.session import LocalSession

    cuda = torch.cuda.is_available()
    precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    root = Path(tempfile.mkdtemp(prefix="omni_ray_bench_step_"))
    n = args.batch * args.accumulation * args.distinct_steps
    cfg, spec, samples, pad_id = build(root, args.layers, precision, args.lr, n)
    device = LocalSession().device
    padded = step_batches(samples, spec, pad_id, args.batch, args.accumulation, None)
    packed = step_batches(samples, spec, pad_id, args.batch, args.accumulation, args.pack_tokens)
    useful = sum(len(s["input_ids"]) for s in samples) / len(padded)  # per optimizer step
    padded_tokens = sum(b["input_ids"].numel() for step in padded for b in step) / len(padded)
    packed_tokens = sum(b["input_ids"].numel() for step in packed for b in step) / len(packed)
    total = args.warmup + args.steps + args.block
    sides = [
        HF(cfg, [b for step in padded for b in step], args.accumulation, root, device),
        OmniRay("omni_ray, padded (no packing)", cfg, spec, padded, total, device),
        OmniRay("omni_ray, packed", cfg, spec, packed, total, device),
        Bare(cfg, packed, device),
    ]
    params = sum(p.numel() for p in sides[-1].model.parameters())
    trainable = sum(p.numel() for p in sides[-1].params)
    times = {side.name: [] for side in sides}
    for side in sides:
        side.run(args.warmup, device)
    while min(len(t) for t in times.values()) < args.steps:
        for side in sides:  # alternate blocks, so every side sees the same machine
            times[side.name] += side.run(args.block, device)
            print(f"  {side.name}: {len(times[side.name])} timed steps, last {times[side.name][-1]:.2f} s",
                  file=sys.stderr, flush=True)
    torch.distributed.destroy_process_group()

    name = torch.cuda.get_device_name(0) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device {name}, torch {torch.__version__}, precision {precision}; MiniCPM-V 4.6 text shape, "
          f"{args.layers} layers, {params / 1e6:.1f}M parameters ({trainable / 1e6:.1f}M trainable), freeze {FREEZE}")
    print(f"per optimizer step: {args.batch * args.accumulation} samples, {useful:.0f} useful tokens; "
          f"padded {padded_tokens:.0f} tokens, packed {packed_tokens:.0f} (rows of {args.pack_tokens})")
    print(f"{args.warmup} warm-up + {args.steps} timed steps per side in alternating blocks of {args.block}; "
          f"HF optimizer {sides[0].optim}, omni_ray/bare torch AdamW")
    print(f"{'side':<34} {'median s/step':>14} {'min':>8} {'max':>8} {'useful tok/s':>13}")
    median = {}
    for side in sides:
        t = times[side.name][: args.steps]
        median[side.name] = statistics.median(t)
        print(f"{side.name:<34} {median[side.name]:>14.3f} {min(t):>8.3f} {max(t):>8.3f} "
              f"{useful / median[side.name]:>13.1f}")
    hf, padded_s, packed_s, bare = (median[s.name] for s in sides)
    print(f"speedup vs HF Trainer without packing = {hf / padded_s:.2f}")
    print(f"speedup vs HF Trainer = {hf / packed_s:.2f}")
    print(f"overhead vs bare torch = {100 * (packed_s / bare - 1):.1f}%")


if __name__ == "__main__":
    main()
