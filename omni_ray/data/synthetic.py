"""A small image-question dataset whose answers can only come from the image.

Each image is a shape (circle or square, random size and place) of one of six colours on a
noisy grey background; the question is always the same, so the text alone gives chance (1/6).
Written in MiniCPM-V's finetune format (JSONL with relative image paths), so the demo reads it
through the same code path as a user's data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# Six corners of the RGB cube, far from each other and from the grey background. With orange
# beside red and purple beside blue, the demo's held-out accuracy hung on the data order: 0.95
# for one, 0.65 (about 4 colours of 6) for another, its loss stuck near 0.6 from step 80 on.
COLORS = {
    "red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220),
    "yellow": (235, 220, 30), "cyan": (30, 210, 220), "magenta": (220, 40, 210),
}
QUESTION = "What color is the shape?"


def draw(color: str, rng: np.random.Generator, size: int = 112):
    from PIL import Image, ImageDraw

    background = rng.normal(128, 25, (size, size, 3)).clip(0, 255).astype("uint8")
    image = Image.fromarray(background)
    draw_ = ImageDraw.Draw(image)
    r = int(rng.integers(size // 6, size // 3))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    box = (cx - r, cy - r, cx + r, cy + r)
    (draw_.ellipse if rng.random() < 0.5 else draw_.rectangle)(box, fill=COLORS[color])
    return image


def write_split(out: Path, name: str, n: int, rng: np.random.Generator) -> Path:
    (out / "images").mkdir(parents=True, exist_ok=True)
    names = list(COLORS)
    with open(out / f"{name}.jsonl", "w") as f:
        for i in range(n):
            color = names[i % len(names)]
            rel = f"images/{name}-{i:05d}.png"
            draw(color, rng).save(out / rel)
            f.write(json.dumps({
                "id": f"{name}-{i}",
                "image": rel,
                "conversations": [
                    {"role": "user", "content": f"<image>\n{QUESTION}"},
                    {"role": "assistant", "content": color},
                ],
            }) + "\n")
    return out / f"{name}.jsonl"


def make_color_dataset(out: str | Path, n_train: int = 480, n_eval: int = 60, seed: int = 0) -> tuple[Path, Path]:
    out = Path(out)
    rng = np.random.default_rng(seed)
    return write_split(out, "train", n_train, rng), write_split(out, "eval", n_eval, rng)


def write_pair_split(out: Path, name: str, n: int, rng: np.random.Generator) -> Path:
    """Preference pairs in RLAIF-V's format: the chosen answer names the shape's colour, the rejected
    one another colour (drawn at random), so only the image tells them apart."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    names = list(COLORS)
    with open(out / f"{name}.jsonl", "w") as f:
        for i in range(n):
            color = names[i % len(names)]
            wrong = names[(i + int(rng.integers(1, len(names)))) % len(names)]
            rel = f"images/{name}-{i:05d}.png"
            draw(color, rng).save(out / rel)
            f.write(json.dumps({"id": f"{name}-{i}", "image": rel, "question": QUESTION, "chosen": color,
                                "rejected": wrong}) + "\n")
    return out / f"{name}.jsonl"


def make_color_pairs(out: str | Path, n_train: int = 240, n_eval: int = 60, seed: int = 0) -> tuple[Path, Path]:
    """Train and held-out preference pairs over the colour images (``write_pair_split``)."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    return write_pair_split(out, "train", n_train, rng), write_pair_split(out, "eval", n_eval, rng)
