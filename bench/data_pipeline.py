"""How many preprocessing CPUs does one training worker need?

Measures, on the same tiny MiniCPM-V and the same samples (real photos from scikit-image plus
generated images, JPEG/PNG as users store them):

  pipeline  Ray Data's samples/s per CPU through decode -> processor (slicing, resize,
            placeholders) -> chat template + tokenize + labels, one actor on one CPU;
  training  samples/s one training process consumes (forward, backward, optimizer step).

and prints their ratio: training/pipeline = preprocessing CPUs to provision per trainer.

    python bench/data_pipeline.py [--samples 256] [--batch 8]      (GPU used when present)
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def make_dataset(root: Path, n: int) -> Path:
    import skimage.data
    from PIL import Image

    from omni_ray.data.synthetic import COLORS, draw

    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = list(COLORS)
    with open(root / "train.jsonl", "w") as f:
        for i in range(n):
            if i % 2:  # a real photo, stored as JPEG
                rel, image = f"img/{i}.jpg", Image.fromarray(photos[i % len(photos)])
                buf = io.BytesIO()
                image.save(buf, "JPEG", quality=90)
                (root / rel).write_bytes(buf.getvalue())
                answer = "a photo"
            else:
                rel, answer = f"img/{i}.png", names[i % len(names)]
                draw(answer, rng).save(root / rel)
            f.write(json.dumps({"id": str(i), "image": rel, "conversations": [
                {"role": "user", "content": "<image>\nWhat is in the picture?"},
                {"role": "assistant", "content": answer}]}) + "\n")
    return root / "train.jsonl"


def pipeline_rate(cfg, source: str) -> tuple[float, list[dict]]:
    import ray

    from omni_ray.data.pipeline import build_dataset

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ds = build_dataset(source, cfg.data, cfg.model, cfg.storage, concurrency=1)
    ds.take(1)  # actor start and model/processor load are not per-sample costs
    start = time.perf_counter()
    rows = ds.take_all()
    seconds = time.perf_counter() - start
    ray.shutdown()
    # One actor is one process on at most one core, whatever logical CPUs it reserves in Ray
    # (data.num_cpus_per_preprocess_task is fractional by default): the rate is per core.
    return len(rows) / seconds, rows


def training_rate(cfg, rows: list[dict], steps: int) -> float:
    from omni_ray.train.loop import run
    from omni_ray.train.session import ListIterator, LocalSession

    session = LocalSession(datasets={"train": ListIterator(rows, repeat=True)})
    # Skip the first two steps (allocation, first-call overheads): report() times each window.
    run(cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": steps, "log_every": 2})}),
        session, num_rows=len(rows))
    rates = [r["samples_per_s"] for r in session.reports[1:]]
    return float(np.median(rates))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    from omni_ray.config import load_config
    from omni_ray.models.tiny import build_tiny_minicpmv

    root = Path(tempfile.mkdtemp(prefix="omni_ray_bench_"))
    model = build_tiny_minicpmv(root / "model")
    source = make_dataset(root / "data", args.samples)
    cfg = load_config({
        "model": {"path": str(model), "dtype": "float32"},
        "data": {"train": str(source), "model_max_length": 128},
        "freeze": {"vision": "frozen", "projector": "full", "llm": "lora"},
        "train": {"micro_batch_size": args.batch, "precision": "fp32"},
        "checkpoint": {"async_upload": False},
    })
    pipeline, rows = pipeline_rate(cfg, str(source))
    training = training_rate(cfg, rows, args.steps)
    print(f"{'stage':<44} {'samples/s':>10}")
    print(f"{'Ray Data pipeline, per CPU (decode+process+tokenize)':<44} {pipeline:>10.1f}")
    print(f"{'training step consumption (1 worker)':<44} {training:>10.1f}")
    print(f"ratio training/pipeline = {training / pipeline:.2f} preprocessing CPUs per training worker")


if __name__ == "__main__":
    main()
