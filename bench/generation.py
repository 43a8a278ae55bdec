"""Evaluation's generation: KV cache and vision once per prompt, beside a full recompute per token.

Model: MiniCPM-V 4.6 at its published widths (``omni_ray/models/reference/MiniCPM-V-4_6``:
text 1024 wide, 248k vocabulary, tied embeddings, the 3:1 Gated-DeltaNet / full-attention
pattern; SigLIP vision 1152 wide) with random weights and the stock image processor at one
448-px slice (1,024 patches, 64 image tokens). On this 2-core CPU machine the depth is cut to
``--text-layers`` of 24 and ``--vision-layers`` of 27 (default 4 and 4) so the full recompute
finishes in minutes; ``--full-depth`` builds all 24 + 27 (GPU). The cut does not flatter the
ratio: the 248k-vocabulary output projection, which the cached path pays per token as well, keeps
its full size while the layers both paths scale with shrink.

* cached: ``omni_ray.train.evaluation.generate_tokens``, what evaluation runs (``model.generate``,
  KV cache, pixel values only in the first forward).
* full recompute: ``generate_recompute``, the previous evaluation: the whole sequence, the
  vision encoder included, forwarded again for every new token.

Both decode the same prompt greedily to exactly ``--new-tokens`` (stop tokens off) and must give
the same tokens. Prints seconds for each, then ``generation: cached / full recompute = X`` last
(goal: X <= 0.2 at 64 new tokens).

    python bench/generation.py [--new-tokens 64] [--text-layers 4] [--vision-layers 4] [--full-depth]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "omni_ray/models/reference/MiniCPM-V-4_6/config.json"


def real_shape_model(out: Path, text_layers: int, vision_layers: int) -> Path:
    from omni_ray.models.tiny import build_tiny_minicpmv

    published = json.loads(REFERENCE.read_text())
    text = {k: v for k, v in published["text_config"].items() if k not in ("model_type", "architectures")}
    text.update(num_hidden_layers=text_layers, layer_types=text["layer_types"][:text_layers])
    text.pop("mtp_num_hidden_layers", None)
    vision = {k: v for k, v in published["vision_config"].items() if k != "model_type"}
    vision.update(num_hidden_layers=vision_layers, image_size=448)
    return build_tiny_minicpmv(out, "4_6", scale_resolution=448, tie_embeddings=True,
                               text_overrides=text, vision_overrides=vision)


def photo_data(out: Path) -> tuple[Path, Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    # A smooth gradient with noise: a photo-like 448 x 448 image (one slice at the stock settings).
    y, x = np.mgrid[0:448, 0:448]
    pixels = np.stack([x / 448 * 255, y / 448 * 255, (x + y) / 896 * 255], -1) + rng.normal(0, 20, (448, 448, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out / "photo.png")
    row = {"id": "photo", "image": "photo.png", "conversations": [
        {"role": "user", "content": "<image>\nDescribe this photo in detail: the colours, the light and what it shows."},
        {"role": "assistant", "content": "A gradient."}]}
    path = out / "eval.jsonl"
    path.write_text(json.dumps(row) + "\n")
    return path, path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--full-depth", action="store_true", help="all 24 text and 27 vision layers")
    args = parser.parse_args()
    if args.full_depth:
        args.text_layers, args.vision_layers = 24, 27

    from omni_ray.config import load_config
    from omni_ray.train.evaluation import EvalSet, SingleProcess, generate_recompute, generate_tokens
    from omni_ray.train.checkpoint import restore_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = real_shape_model(tmp / "model", args.text_layers, args.vision_layers)
        train, eval_file = photo_data(tmp)
        cfg = load_config({"model": {"path": str(model_dir)},
                           "data": {"train": str(train), "eval": str(eval_file), "model_max_length": 1024}})
        model, _, _ = restore_model(cfg.model, cfg.freeze, cfg.lora, cfg.train, cfg.storage)
        model.to(device).eval()
        params = sum(p.numel() for p in model.parameters())
        evalset = EvalSet.load(cfg.data, cfg.model, cfg.storage, num_samples=1)
        prompt = dataclasses.replace(evalset.prompts[0], stop_ids=())  # exactly --new-tokens tokens
        engine = SingleProcess(model)
        print(f"model: MiniCPM-V 4.6 widths, {args.text_layers} text + {args.vision_layers} vision layers, "
              f"{params / 1e9:.2f}B parameters, {device}; prompt {len(prompt.arrays['input_ids'])} tokens "
              f"(one 448-px slice); {args.new_tokens} new tokens", flush=True)

        generate_tokens(engine, [prompt], evalset, device, 2, 1)  # warm-up (allocator, kernels)
        start = time.perf_counter()
        cached = generate_tokens(engine, [prompt], evalset, device, args.new_tokens, 1)[0]
        cached_s = time.perf_counter() - start
        print(f"cached:         {cached_s:8.2f} s ({len(cached)} tokens)", flush=True)
        start = time.perf_counter()
        full = generate_recompute(engine, prompt, evalset, device, args.new_tokens)
        full_s = time.perf_counter() - start
        print(f"full recompute: {full_s:8.2f} s ({len(full)} tokens)")
        print(f"same tokens: {cached == full}")
        if cached != full:
            raise SystemExit("the cached answer differs from the full recompute: the ratio would compare two things")
        print(f"generation: cached / full recompute = {cached_s / full_s:.3f}")


if __name__ == "__main__":
    main()
