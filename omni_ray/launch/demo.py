"""``omni-ray demo``: fine-tune a tiny MiniCPM-V 4.6 on 2 CPU workers and show that it learned.

Builds a random-initialised MiniCPM-V 4.6 (real transformers classes, tokenizer trained here,
stock processor), a colour-question dataset in MiniCPM-V's format, and trains with the vision
encoder frozen, the merger (projector) fully trained and LoRA on the language model, on a local
Ray with FSDP2 over gloo. Held-out accuracy is measured before and after training.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from omni_ray.config import Config, load_config


def demo_config(workdir: Path, num_workers: int, max_steps: int | None) -> Config:
    return load_config({
        "model": {"path": str(workdir / "model"), "dtype": "float32"},
        "data": {"train": str(workdir / "data" / "train.jsonl"), "eval": str(workdir / "data" / "eval.jsonl"),
                 "model_max_length": 64, "max_bad_fraction": 0.0},
        "freeze": {"vision": "frozen", "projector": "full", "llm": "lora", "lr": {"projector": 1e-2}},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"epochs": 5, "max_steps": max_steps, "micro_batch_size": 8, "lr": 1e-2, "warmup_steps": 5,
                  "precision": "fp32", "log_every": 5, "seed": 0, "eval_every": 60},
        # Eval loss over the held-out set, and a page of what the model answers for 3 of its images.
        "eval": {"num_samples": 3, "max_new_tokens": 6},
        "strategy": {"name": "fsdp"},
        "scaling": {"num_workers": num_workers, "max_failures": 0},
        "run": {"name": f"demo-{int(time.time())}", "storage_path": str(workdir / "runs")},
    })


def eval_items(eval_jsonl: Path) -> list[dict]:
    from PIL import Image

    from omni_ray.data.formats import normalize_record
    from omni_ray.data.synthetic import COLORS

    items = []
    for i, line in enumerate(eval_jsonl.read_text().splitlines()):
        sample = normalize_record(json.loads(line), i)
        images = [Image.open(eval_jsonl.parent / ref).convert("RGB") for ref in sample["image_refs"]]
        items.append({"messages": sample["messages"][:-1], "images": images, "choices": list(COLORS),
                      "answer": sample["messages"][-1]["content"]})
    return items


def accuracy(cfg: Config, items: list[dict], checkpoint: str | None) -> float:
    from omni_ray.data.conversation import SampleProcessor
    from omni_ray.evaluate import choice_accuracy
    from omni_ray.models.loading import load_processor, local_model_dir
    from omni_ray.train.checkpoint import restore_model

    model, spec, _ = restore_model(cfg.model, cfg.freeze, cfg.lora, cfg.train, cfg.storage, checkpoint)
    processor = load_processor(cfg.model, local_model_dir(cfg.model, cfg.storage))
    sp = SampleProcessor(processor, cfg.data.model_max_length, spec.image_inputs)
    return choice_accuracy(model, sp, items, spec.image_inputs, sp.tokenizer.pad_token_id or 0)


def eval_losses(run_dir: str) -> dict[int, float]:
    from omni_ray.observe.report import build_report

    return build_report(run_dir)["eval_losses"]


def where(run_dir: str, metrics: dict) -> dict:
    """Where the demo's pictures are: curves, the last eval page, the TensorBoard folder."""
    page = metrics.get("eval_page")
    return {"curves": str(Path(run_dir) / "curves.png"), "tensorboard": str(Path(run_dir) / "tensorboard"),
            "eval_page": str(Path(run_dir) / page) if page else None}


def run_demo(workdir: str | Path, num_workers: int = 2, max_steps: int | None = None,
             n_train: int = 480, n_eval: int = 60, verbose: bool = False) -> dict:
    from omni_ray.data.synthetic import COLORS, make_color_dataset
    from omni_ray.launch.driver import train
    from omni_ray.models.tiny import build_tiny_minicpmv
    from omni_ray.observe.console import quiet_driver

    quiet_driver(verbose)  # before the first model load: its progress bars and notices
    workdir = Path(workdir).expanduser().resolve()
    t0 = time.perf_counter()
    if not (workdir / "model" / "config.json").exists():
        build_tiny_minicpmv(workdir / "model")
    _, eval_path = make_color_dataset(workdir / "data", n_train=n_train, n_eval=n_eval)
    cfg = demo_config(workdir, num_workers, max_steps)
    items = eval_items(eval_path)
    before = accuracy(cfg, items, None)
    print(f"[demo] held-out accuracy before training: {before:.3f} (chance {1 / len(COLORS):.3f})", flush=True)
    result = train(cfg, verbose=verbose)
    if result.error:
        raise result.error
    checkpoint = result.checkpoint.to_directory()
    after = accuracy(cfg, items, checkpoint)
    summary = {
        "accuracy_before": before, "accuracy_after": after, "chance": 1 / len(COLORS),
        "final_loss": result.metrics.get("loss"), "steps": result.metrics.get("step"),
        "frozen_unchanged": result.metrics.get("frozen_unchanged"),
        "run_dir": str(result.path), "checkpoint": str(result.checkpoint.path),
        "eval_losses": eval_losses(str(result.path)), "seconds": round(time.perf_counter() - t0, 1),
        **where(str(result.path), result.metrics),
    }
    print(f"[demo] held-out accuracy after training:  {after:.3f} (before {before:.3f}, chance {1 / len(COLORS):.3f})")
    print(f"[demo] eval loss by step: {summary['eval_losses']}")
    print(f"[demo] run files: {summary['run_dir']}\n[demo] checkpoint: {summary['checkpoint']}")
    print(f"[demo] curves (open in any image viewer): {summary['curves']}")
    print(f"[demo] what the model answers (open in a browser): {summary['eval_page']}")
    print(f"[demo] TensorBoard: tensorboard --logdir {summary['tensorboard']}   |   omni-ray report {summary['run_dir']}")
    print(f"[demo] {json.dumps(summary)}", flush=True)
    return summary
