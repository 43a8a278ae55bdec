"""Throughput, MFU and peak memory beside the estimate, at full size, for a GPU host (issue 12).

Two runs, each through omni_ray's own step (``train_step`` on the FSDP2 engine, world size 1,
bf16 compute, frozen weights stored in bf16, trained ones as fp32 masters):

  minicpmv46-lora  the real MiniCPM-V 4.6 (random init from the published config kept in
                   ``omni_ray/models/reference/``, 1.30B parameters), vision and merger frozen,
                   LoRA r=64 on the LLM (``jobs/minicpmv46_lora.yaml``'s freeze map);
  llm3b-full       a ~3B LLM trained in full: Qwen2.5-VL with Qwen2.5-3B's published text shape
                   (hidden 2048, 36 layers, MLP 11008, 16 heads / 2 KV heads, vocabulary 151,936,
                   tied embeddings) and a small frozen vision tower.

Batches are random token ids (``--batch`` x ``--seq``; every token labelled), so the figures are
the model's, not the data pipeline's. Printed per run: tokens/s, model TFLOP/s, MFU against the
card's dense bf16 peak (``--peak-tflops``, known for H100/H200/A100), ``torch.cuda.max_memory_allocated``
over the timed steps and omni_ray's estimate for the same step (``omni_ray.memory``), and last
``estimate/measured = R``.

Model FLOPs per token (the usual accounting, causal attention counted once):
2 N (forward) + 2 N (input gradients) + 2 N_trained (weight gradients) + 6 L_full s d_attn / 2,
N = parameters the tokens go through (text layers + output projection), L_full the full-attention
layers, s the sequence length, d_attn heads x head dim. Gated DeltaNet's own state updates are
not counted (they are small beside the projections), so MFU is slightly understated for 4.6.

    python bench/gpu_bench.py [--runs minicpmv46-lora llm3b-full] [--seq 2048] [--batch 4]

On a CPU it runs with ``--tiny`` (a few layers, short sequences) to check the code path only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

REFERENCE = Path(__file__).resolve().parents[1] / "omni_ray/models/reference/MiniCPM-V-4_6/config.json"
# Qwen2.5-3B's published text shape (its config.json on the Hub).
QWEN25_3B = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                 rms_norm_eps=1e-6, tie_word_embeddings=True)
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense, SXM


def minicpmv46_config(tiny: bool) -> dict:
    config = json.loads(REFERENCE.read_text())
    if tiny:  # the code path only: two text layers (one of each kind), one vision layer
        text = config["text_config"]
        text.update(num_hidden_layers=4, layer_types=text["layer_types"][:4], vocab_size=4096)
        config["vision_config"].update(num_hidden_layers=1)
        config["insert_layer_id"] = 0
    return config


def llm3b_config(tiny: bool) -> dict:
    text = dict(QWEN25_3B, model_type="qwen2_5_vl_text")
    if tiny:
        text.update(num_hidden_layers=2, hidden_size=512, intermediate_size=1024, num_attention_heads=4,  # head dim 128, as mrope needs
                    vocab_size=4096)
    vision = dict(depth=2, hidden_size=256, intermediate_size=512, num_heads=4, out_hidden_size=text["hidden_size"])
    return {"model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "text_config": text, "vision_config": vision, "tie_word_embeddings": True,
            "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652}


RUNS = {
    "minicpmv46-lora": (minicpmv46_config, {"vision": "frozen", "projector": "frozen", "llm": "lora"}),
    "llm3b-full": (llm3b_config, {"vision": "frozen", "projector": "frozen", "llm": "full",
                                  "embeddings": "full", "lm_head": "full"}),
}


def save_random_model(config: dict, out: Path) -> Path:
    """Random weights from ``config``, saved as a checkpoint the training path loads as it would a real one."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    cfg = AutoConfig.for_model(**config)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    return out


def flops_per_token(plan, text: dict, seq: int) -> float:
    """Model FLOPs per trained token (module docstring)."""
    lm = sum(p.numel for p in plan.params if p.group in ("llm", "lm_head"))
    if text.get("tie_word_embeddings"):
        lm += text["vocab_size"] * text["hidden_size"]  # the tied matrix also projects every token
    trained = plan.trainable_numel()
    layer_types = text.get("layer_types") or ["full_attention"] * text["num_hidden_layers"]
    full = sum(t == "full_attention" for t in layer_types)
    d_attn = text["num_attention_heads"] * text.get("head_dim", text["hidden_size"] // text["num_attention_heads"])
    return 4 * lm + 2 * trained + 3 * full * seq * d_attn


def one_run(name: str, args, root: Path) -> float:
    from omni_ray.config import load_config
    from omni_ray.freeze import apply_plan, param_groups
    from omni_ray.memory import estimate_memory, layout_of, unsharded_numels
    from omni_ray.models.loading import build_skeleton, read_hf_config
    from omni_ray.strategies import build_strategy
    from omni_ray.train.build import build_trainable_model
    from omni_ray.train.session import LocalSession
    from omni_ray.train.step import train_step

    make_config, freeze = RUNS[name]
    config = make_config(args.tiny)
    path = save_random_model(config, root / name)
    cfg = load_config({
        "model": {"path": str(path), "dtype": "bfloat16"}, "freeze": freeze,
        "lora": {"r": 64, "alpha": 128, "dropout": 0.0},
        "data": {"train": str(root / "unused.jsonl"), "model_max_length": args.seq},
        "train": {"precision": "bf16" if args.device == "cuda" else "fp32", "micro_batch_size": args.batch,
                  "gradient_checkpointing": args.gradient_checkpointing},
    })
    session = LocalSession()
    device = session.device
    built = build_trainable_model(cfg.model, cfg.freeze, cfg.lora, cfg.train)
    engine = build_strategy(cfg.strategy, cfg.train, device)
    model = engine.wrap(built.model, built.spec)
    engine.setup_optimizer(param_groups(model, built.plan, cfg.train.weight_decay), args.warmup + args.steps)
    text = config["text_config"]
    hf_config = read_hf_config(cfg.model)
    estimate = estimate_memory(lambda: build_skeleton(cfg.model, built.spec, hf_config),
                               lambda m: apply_plan(m, built.plan, cfg.lora), built.plan,
                               layout_of(cfg.train, cfg.strategy, cfg.scaling), batch=args.batch, seq_len=args.seq,
                               vocab=text["vocab_size"], **unsharded_numels(built.plan, built.spec),
                               compare_checkpointing=False)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, text["vocab_size"], (args.batch, args.seq), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
             "num_label_tokens": torch.tensor(ids.numel()), "keep_alive": torch.tensor(0)}
    times = []
    for step in range(args.warmup + args.steps):
        if step == args.warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        train_step(engine, [batch], float(ids.numel()), 1, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times[args.warmup:])
    tokens_per_s = ids.numel() / seconds
    tflops = tokens_per_s * flops_per_token(built.plan, text, args.seq) / 1e12
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    total = sum(p.numel for p in built.plan.params)
    print(f"{name}: {total / 1e9:.2f}B parameters, {built.plan.trainable_numel() / 1e6:.1f}M trained, batch "
          f"{args.batch} x {args.seq} tokens, gradient checkpointing {args.gradient_checkpointing}", flush=True)
    line = f"  {seconds:.3f} s/step  {tokens_per_s:,.0f} tokens/s  {tflops:.1f} model TFLOP/s"
    if args.peak_tflops:
        line += f"  MFU {100 * tflops / args.peak_tflops:.1f}%"
    print(line, flush=True)
    print(f"  peak allocated {peak / 2**30:.2f} GiB, estimate {estimate.total / 2**30:.2f} GiB", flush=True)
    torch.distributed.destroy_process_group()
    return estimate.total / peak if peak else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", choices=sorted(RUNS), default=sorted(RUNS, reverse=True))
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak")
    parser.add_argument("--tiny", action="store_true", help="a few layers: check the code path on a CPU")
    args = parser.parse_args()
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and args.peak_tflops is None:
        card = torch.cuda.get_device_name(0)
        args.peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in card), None)
        print(f"device {card}, dense bf16 peak {args.peak_tflops} TFLOP/s (--peak-tflops to set)", flush=True)
    elif args.device == "cpu" and not args.tiny:
        raise SystemExit("no CUDA device: this benchmark is for a GPU host (use --tiny to check the code path)")
    root = Path(tempfile.mkdtemp(prefix="omni_ray_gpu_bench_"))
    ratios = {name: one_run(name, args, root) for name in args.runs}
    for name, ratio in ratios.items():
        print(f"{name}: estimate/measured = {ratio:.2f}")


if __name__ == "__main__":
    main()
