"""Memory: ``omni_ray.memory``'s estimate beside the measured peak of real training steps.

Model: MiniCPM-V 4.6's architecture (Qwen3.5 text with linear + full attention, tied head) at a
CPU-sized width but the real 248,094-token vocabulary (so the loss dominates as it does at full
size), ~70M parameters. Three freeze maps (vision frozen + LLM LoRA; last 2 LLM layers; full),
each with the chunked loss (what ``train_step`` runs) and with full logits.

Measured: live tensor bytes above the loaded weights over two real steps (forward, backward,
AdamW step; the second step runs with the optimizer state the first made), from
``omni_ray.memory.LiveTensorBytes`` (a dispatch mode that counts each tensor storage while it is
referenced; not process RSS). Estimated: ``estimate_memory`` from the config and the freeze plan
only (its activation term is a forward+backward on fake tensors; gradients and AdamW state from
the plan's counts). Both are the step's bytes above the weights, world size 1, fp32.

Low-precision frozen weights: the same three freeze maps with the chunked loss, trained by the
FSDP2 engine itself (one process, world size 1, gloo) under bf16 precision, so frozen weights are
stored in bf16 and trained ones in fp32 (``train.frozen_dtype: auto``); the estimate uses the
layout ``layout_of`` derives from those settings. Each row also prints the weight bytes as the
engine stores them beside an all-fp32 copy.

Evaluation beside training (same model, same tokens): the eval loss through the chunked loss,
the eval loss from full logits (the previous way), and KV-cache generation of 64 tokens, each
with no gradients; prints ``eval peak / training step peak = X`` (X <= 1: evaluation never needs
more than the step the run is sized for).

Then the real MiniCPM-V 4.6 at full size (1.30B, random init from its config; bf16 frozen base,
vision and projector frozen, fp32 LoRA r=64 on the LLM): two measured steps, and the estimate
for a 24 GiB GPU at its training shape (2048 tokens).

    python bench/memory.py [--seq 256] [--full-config PATH/config.json] [--skip-full] [--only-low-precision]
                           [--only-eval]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from omni_ray.config import FreezeConfig, LoraConfig
from omni_ray.freeze import apply_plan, plan_freeze
from omni_ray.memory import GiB, Layout, estimate_memory, measured_peak
from omni_ray.models.spec import get_spec

MiB = 2**20
VOCAB = 248_094
FREEZE_MAPS = {
    "vision frozen + LoRA": {"llm": "lora"},
    "last 2 LLM layers": {"llm": {"mode": "full", "last_n_layers": 2}},
    "full": {"vision": "full", "projector": "full", "llm": "full", "embeddings": "full", "lm_head": "full"},
}
FULL_CONFIG_CANDIDATES = ("omni_ray/models/reference/MiniCPM-V-4_6/config.json",)  # the repository's copy


def bench_config() -> dict:
    """MiniCPM-V 4.6's config shape at CPU width, real vocabulary."""
    text = {"model_type": "qwen3_5_text", "vocab_size": VOCAB, "hidden_size": 256, "intermediate_size": 768,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
            "linear_num_key_heads": 4, "linear_num_value_heads": 4, "linear_key_head_dim": 32,
            "linear_value_head_dim": 32, "tie_word_embeddings": True}
    vision = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
              "patch_size": 14, "image_size": 112}
    return {"model_type": "minicpmv4_6", "text_config": text, "vision_config": vision, "tie_word_embeddings": True}


def model_factory(config: dict, dtype: torch.dtype = torch.float32):
    from transformers import AutoConfig, AutoModelForImageTextToText

    cfg = dict(config)
    hf = AutoConfig.for_model(cfg.pop("model_type"), **{k: v for k, v in cfg.items()
                                                        if k not in ("architectures", "transformers_version")})
    return lambda: AutoModelForImageTextToText.from_config(hf, dtype=dtype)


def measure(model, chunked: bool, seq: int, steps: int = 2) -> int:
    """Peak live tensor bytes above the weights over ``steps`` real training steps."""
    ids = torch.randint(0, VOCAB, (1, seq), generator=torch.Generator().manual_seed(0))
    return measured_peak(model, ids, chunked=chunked, steps=steps)


def side_by_side(seq: int) -> dict:
    build = model_factory(bench_config())
    spec, lora = get_spec("minicpmv4_6"), LoraConfig(r=16, alpha=32, dropout=0.0)
    measured_by = {}
    for name, freeze in FREEZE_MAPS.items():
        for chunked in (True, False):
            torch.manual_seed(0)
            model = build()
            plan = plan_freeze(((n, tuple(p.shape)) for n, p in model.named_parameters()), spec,
                               FreezeConfig(**freeze), lora, 1e-4)
            start = time.perf_counter()
            est = estimate_memory(build, lambda m, plan=plan: apply_plan(m, plan, lora), plan,
                                  Layout(chunked_loss=chunked), batch=1, seq_len=seq, vocab=VOCAB,
                                  compare_checkpointing=False)
            est_s = time.perf_counter() - start
            measured = measure(apply_plan(model, plan, lora), chunked, seq)
            measured_by[(name, chunked)] = measured
            total = sum(p.numel() for p in model.parameters())
            print(f"{name:<22} {'chunked loss' if chunked else 'full logits':<13} params {total / 1e6:5.1f}M "
                  f"trainable {plan.trainable_numel() / 1e6:5.1f}M  estimate {est.step_bytes / MiB:7.1f} MiB "
                  f"({est_s:.0f} s)  measured {measured / MiB:7.1f} MiB  "
                  f"estimate/measured = {est.step_bytes / measured:.2f}", flush=True)
            del model
    return measured_by


def eval_beside_training(seq: int, new_tokens: int = 64) -> float:
    """Peak live bytes of evaluation beside a training step, same model and tokens (vision frozen + LoRA).

    Training: two steps with the chunked loss (what ``train_step`` runs). Evaluation: the eval loss
    as ``train/evaluation.py`` takes it (no gradients, the same chunked loss), the eval loss the
    previous way (full logits), and greedy generation of ``new_tokens`` with the KV cache after a
    ``seq``-token prompt. Returns evaluation's peak (loss or generation) / the training step's.
    """
    from omni_ray.memory import LiveTensorBytes
    from omni_ray.train.loss import head_loss, token_loss_sum

    torch.manual_seed(0)
    build = model_factory(bench_config())
    spec, lora = get_spec("minicpmv4_6"), LoraConfig(r=16, alpha=32, dropout=0.0)
    model = build()
    plan = plan_freeze(((n, tuple(p.shape)) for n, p in model.named_parameters()), spec,
                       FreezeConfig(**FREEZE_MAPS["vision frozen + LoRA"]), lora, 1e-4)
    model = apply_plan(model, plan, lora)
    ids = torch.randint(0, VOCAB, (1, seq), generator=torch.Generator().manual_seed(0))
    train_peak = measure(model, True, seq)
    model.eval()
    peaks = {}
    with torch.no_grad():
        for name in ("eval loss, chunked", "eval loss, full logits", f"generation, {new_tokens} tokens"):
            tracker = LiveTensorBytes()
            with tracker:
                if name.startswith("generation"):
                    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
                elif "chunked" in name:
                    with head_loss(model.get_output_embeddings(), ids):
                        model(input_ids=ids, use_cache=False)
                else:
                    token_loss_sum(model(input_ids=ids, use_cache=False).logits, ids)
            peaks[name] = tracker.peak
    print(f"training step (chunked loss)   {train_peak / MiB:8.1f} MiB", flush=True)
    for name, peak in peaks.items():
        print(f"{name:<30} {peak / MiB:8.1f} MiB  ({peak / train_peak:.2f} x the training step)", flush=True)
    worst = max(peaks["eval loss, chunked"], peaks[f"generation, {new_tokens} tokens"])
    print(f"eval peak / training step peak = {worst / train_peak:.2f}", flush=True)
    return worst / train_peak


def low_precision_frozen(seq: int) -> None:
    """Estimate vs measured with bf16 frozen weights, each model wrapped by the FSDP2 engine."""
    from omni_ray.config import ScalingConfig, StrategyConfig, TrainConfig
    from omni_ray.memory import layout_of, unsharded_numels
    from omni_ray.strategies import build_strategy
    from omni_ray.train.session import LocalSession

    LocalSession()  # a world-1 process group for fully_shard
    build = model_factory(bench_config())
    spec, lora = get_spec("minicpmv4_6"), LoraConfig(r=16, alpha=32, dropout=0.0)
    train, strategy = TrainConfig(precision="bf16"), StrategyConfig(name="fsdp")
    layout = layout_of(train, strategy, ScalingConfig(num_workers=1))
    for name, freeze in FREEZE_MAPS.items():
        torch.manual_seed(0)
        model = build()
        plan = plan_freeze(((n, tuple(p.shape)) for n, p in model.named_parameters()), spec,
                           FreezeConfig(**freeze), lora, 1e-4)
        est = estimate_memory(build, lambda m, plan=plan: apply_plan(m, plan, lora), plan, layout, batch=1,
                              seq_len=seq, vocab=VOCAB, **unsharded_numels(plan, spec),
                              compare_checkpointing=False)
        wrapped = build_strategy(strategy, train, torch.device("cpu")).wrap(apply_plan(model, plan, lora), spec)
        stored = sum(p.to_local().nbytes for p in wrapped.parameters())
        all_fp32 = sum(4 * p.numel() for p in wrapped.parameters())
        measured = measure(wrapped, True, seq)
        print(f"{name:<22} bf16 frozen   weights {stored / MiB:6.1f} MiB (all fp32: {all_fp32 / MiB:6.1f} MiB)  "
              f"estimate {est.step_bytes / MiB:7.1f} MiB  measured {measured / MiB:7.1f} MiB  "
              f"estimate/measured = {est.step_bytes / measured:.2f}", flush=True)
        del model, wrapped


def full_size(config_path: str, seq: int) -> None:
    """One measured step of the real MiniCPM-V 4.6 (bf16, vision frozen + LoRA r=64) and its GPU estimate."""
    from omni_ray.memory import unsharded_numels

    config = json.loads(Path(config_path).read_text())
    build = model_factory(config, torch.bfloat16)
    spec, lora = get_spec("minicpmv4_6"), LoraConfig(r=64, alpha=128, dropout=0.0)
    torch.manual_seed(0)
    model = build()
    # Vision and projector frozen, LoRA on the LLM: the adapters are the only trained tensors, and
    # they are cast to fp32 below as the engines hold them (bf16 frozen base, fp32 adapters).
    freeze = FreezeConfig(projector="frozen")
    plan = plan_freeze(((n, tuple(p.shape)) for n, p in model.named_parameters()), spec, freeze, lora, 1e-4)
    total = sum(p.numel() for p in model.parameters())
    layout = Layout(compute_dtype=torch.bfloat16, frozen_dtype=torch.bfloat16)
    est = estimate_memory(build, lambda m: apply_plan(m, plan, lora), plan, layout, batch=1, seq_len=seq,
                          vocab=config["text_config"]["vocab_size"], compare_checkpointing=False)
    model = apply_plan(model, plan, lora)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    measured = measure(model, True, seq, steps=2)
    print(f"MiniCPM-V 4.6 full size ({total / 1e9:.2f}B params, bf16 base, fp32 LoRA r=64, {seq} tokens): "
          f"trainable {plan.trainable_numel() / 1e6:.1f}M  estimate {est.step_bytes / MiB:.0f} MiB  "
          f"measured {measured / MiB:.0f} MiB  estimate/measured = {est.step_bytes / measured:.2f}", flush=True)
    del model
    gpu = estimate_memory(build, lambda m: apply_plan(m, plan, lora), plan, layout, batch=1, seq_len=2048,
                          vocab=config["text_config"]["vocab_size"], **unsharded_numels(plan, spec),
                          compare_checkpointing=False)
    print(f"MiniCPM-V 4.6 on one GPU (bf16, 2048 tokens, vision + projector frozen, LoRA r=64): estimate "
          f"{gpu.total / GiB:.2f} GiB -> {'fits' if gpu.total <= 24 * GiB else 'does NOT fit'} in 24 GiB")
    print(gpu.format())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=256, help="tokens per sample (batch 1)")
    parser.add_argument("--full-config", default=None, help="MiniCPM-V 4.6 config.json (default: the repo's copy)")
    parser.add_argument("--full-seq", type=int, default=128)
    parser.add_argument("--skip-full", action="store_true")
    parser.add_argument("--only-low-precision", action="store_true", help="only the bf16-frozen rows")
    parser.add_argument("--only-eval", action="store_true", help="only evaluation beside a training step")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"device CPU ({torch.get_num_threads()} threads), torch {torch.__version__}, vocab {VOCAB}, "
          f"batch 1 x {args.seq} tokens, world size 1", flush=True)
    if args.only_low_precision:
        low_precision_frozen(args.seq)
        return
    if args.only_eval:
        eval_beside_training(args.seq)
        return
    measured = side_by_side(args.seq)
    eval_beside_training(args.seq)
    low_precision_frozen(args.seq)
    if not args.skip_full:
        path = args.full_config or next((p for p in FULL_CONFIG_CANDIDATES if Path(p).exists()), None)
        if path is None:
            print("full size: no MiniCPM-V 4.6 config.json found; pass --full-config")
        else:
            full_size(path, args.full_seq)
    chunked, full = measured[("vision frozen + LoRA", True)], measured[("vision frozen + LoRA", False)]
    print(f"peak memory saved by chunked loss = {100 * (1 - chunked / full):.0f}%")


if __name__ == "__main__":
    main()
