"""How many CPUs does it take to feed one GPU training MiniCPM-V 4.6?

Real photos of about one megapixel (scikit-image's retina photograph cut into 1224 x 816
crops, the Hubble deep field at 1000 x 872, and the two motorcycle photographs resized to
1224 x 826), stored as JPEG as users store them, go through the training path's Ray Data
pipeline (``omni_ray.data.pipeline.build_dataset``: read, decode, MiniCPM-V 4.6's processor with
its default slicing -- 448 px slices, up to 9 slices plus the overview image -- then the chat
template, tokenisation and labels) with 1 and then 2 preprocessing actors. Printed: samples/s
per CPU, and the CPUs per GPU needed to feed a GPU that trains MiniCPM-V 4.6 at the goal rate of
9,000 tokens/s (mean tokens per sample from the same data, image tokens included), last as
``CPUs per GPU needed = C``.

    python bench/data_pipeline.py [--samples 96] [--goal-tokens-per-s 9000]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from pathlib import Path

# The processor's defaults as published (MiniCPMV4_6ImageProcessor); the tiny factory's are smaller.
DEFAULT_SLICING = {"scale_resolution": 448, "max_slice_nums": 9, "slice_mode": True}
ANSWER = ("The photograph shows the scene in fine detail, with the main subject near the centre, soft light "
          "from the left, and a darker background that fades towards the edges of the frame.")


def photos() -> list:
    """About 1 MP each, from the real photographs scikit-image ships (no download)."""
    import skimage.data
    from PIL import Image

    folder = os.path.dirname(skimage.data.__file__)
    retina = Image.open(os.path.join(folder, "retina.jpg")).convert("RGB")  # 1411 x 1411
    out = [retina.crop((x, y, x + 1224, y + 816)) for x, y in ((0, 0), (187, 0), (0, 595), (187, 595))]
    out.append(Image.open(os.path.join(folder, "hubble_deep_field.jpg")).convert("RGB"))  # 1000 x 872
    for name in ("motorcycle_left.png", "motorcycle_right.png"):  # 741 x 500
        out.append(Image.open(os.path.join(folder, name)).convert("RGB").resize((1224, 826), Image.LANCZOS))
    return out


def make_dataset(root: Path, n: int) -> tuple[Path, float]:
    (root / "img").mkdir(parents=True, exist_ok=True)
    images = photos()
    for i, image in enumerate(images):
        image.save(root / "img" / f"{i}.jpg", "JPEG", quality=90)
    megapixels = sum(im.size[0] * im.size[1] for im in images) / len(images) / 1e6
    with open(root / "train.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": str(i), "image": f"img/{i % len(images)}.jpg", "conversations": [
                {"role": "user", "content": "<image>\nDescribe this photo in detail."},
                {"role": "assistant", "content": ANSWER}]}) + "\n")
    return root / "train.jsonl", megapixels


def cpu_seconds(stats: str) -> float:
    """Total "Remote cpu time" of every operator in Ray Data's stats (process CPU time of its tasks)."""
    units = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
    found = re.findall(r"Remote cpu time: .*? ([0-9.]+)(s|ms|us) total", stats)
    if not found:
        raise SystemExit("Ray Data's stats carry no 'Remote cpu time': cannot measure CPU per sample")
    return sum(float(value) * units[unit] for value, unit in found)


def pipeline_rate(cfg, source: str, actors: int) -> tuple[float, float, float]:
    """(samples/s with ``actors`` preprocessing actors, samples per CPU-second, mean tokens per sample).

    Samples per CPU-second come from the CPU time Ray Data's tasks report, which other load on
    the machine does not inflate; the wall-clock rate is what this machine delivered.
    """
    import ray

    from omni_ray.data.pipeline import build_dataset

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ds = build_dataset(source, cfg.data, cfg.model, cfg.storage, concurrency=actors)
        start = time.perf_counter()
        done = ds.materialize()
        seconds = time.perf_counter() - start
        rows, stats = done.take_all(), done.stats()
    finally:
        ray.shutdown()
    rejected = [r["reason"] for r in rows if r["reason"]]
    if rejected:
        raise SystemExit(f"{len(rejected)} samples rejected ({sorted(set(rejected))}): the rate would be wrong")
    return len(rows) / seconds, len(rows) / cpu_seconds(stats), sum(r["num_tokens"] for r in rows) / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--goal-tokens-per-s", type=float, default=9000.0)
    args = parser.parse_args()

    from omni_ray.config import load_config
    from omni_ray.models.tiny import build_tiny_minicpmv

    root = Path(tempfile.mkdtemp(prefix="omni_ray_bench_data_"))
    model = build_tiny_minicpmv(root / "model", scale_resolution=DEFAULT_SLICING["scale_resolution"])
    source, megapixels = make_dataset(root / "data", args.samples)
    cfg = load_config({
        "model": {"path": str(model), "dtype": "float32", "processor": DEFAULT_SLICING},
        "data": {"train": str(source), "model_max_length": 4096},
        "freeze": {"vision": "frozen", "projector": "full", "llm": "lora"},
    })
    rates, per_cpu = {}, {}
    for actors in (1, 2):
        rates[actors], per_cpu[actors], tokens = pipeline_rate(cfg, str(source), actors)
    load = os.getloadavg()[0]
    print(f"{args.samples} samples, photos of {megapixels:.2f} MP on average (JPEG), MiniCPM-V 4.6 processor "
          f"{DEFAULT_SLICING}; {os.cpu_count()} CPUs, load average {load:.1f} at the end")
    print(f"mean tokens per sample {tokens:.0f} (image slices included)")
    print(f"{'preprocessing actors':<22} {'samples/s (wall)':>17} {'samples per CPU-second':>23}")
    for actors in rates:
        print(f"{actors:<22} {rates[actors]:>17.2f} {per_cpu[actors]:>23.2f}")
    print(f"wall-clock scaling 1 -> 2 actors = {rates[2] / rates[1]:.2f}x (2 CPUs, shared with the driver)")
    needed_rate = args.goal_tokens_per_s / tokens
    print(f"samples/s one GPU consumes at {args.goal_tokens_per_s:.0f} tokens/s = {needed_rate:.2f}")
    print(f"CPUs per GPU needed = {needed_rate / min(per_cpu.values()):.1f}")


if __name__ == "__main__":
    main()
