"""Samples of every kind, good and bad, as raw files: shared by the prepare, check and train tests.

Real photographs from scikit-image (no download); each bad record carries the reason code
omni_ray must report for it.
"""

from __future__ import annotations

import io
import json

import numpy as np
import skimage.data as skimage_data
from PIL import Image


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _rgba_half_transparent() -> bytes:
    rgba = Image.fromarray(skimage_data.coffee()).convert("RGBA")
    alpha = np.full(rgba.size[::-1], 255, np.uint8)
    alpha[:, : rgba.size[0] // 2] = 0
    rgba.putalpha(Image.fromarray(alpha))
    return encode(rgba, "PNG")


def U(text):  # noqa: N802
    return {"role": "user", "content": text}


def A(text):  # noqa: N802
    return {"role": "assistant", "content": text}


ASTRONAUT_JPG = encode(Image.fromarray(skimage_data.astronaut()), "JPEG", quality=90)
IMAGES = {
    "img/astronaut.jpg": ASTRONAUT_JPG,
    "img/chelsea.png": encode(Image.fromarray(skimage_data.chelsea()), "PNG"),
    "img/rocket.jpg": encode(Image.fromarray(skimage_data.rocket()), "JPEG"),
    "img/cmyk.jpg": encode(Image.fromarray(skimage_data.astronaut()).convert("CMYK"), "JPEG"),
    "img/coffee_rgba.png": _rgba_half_transparent(),
    "img/corrupt.jpg": b"<html><body>404 Not Found</body></html>",
    "img/truncated.jpg": ASTRONAUT_JPG[: len(ASTRONAUT_JPG) // 2],
    "img/empty.jpg": b"",
    "img/bomb.png": encode(Image.new("L", (4000, 3000)), "PNG"),  # bomb under max_pixels=1e7
    "img/float.tif": encode(Image.fromarray(np.ones((8, 8), np.float32)), "TIFF"),
}
MAX_PIXELS = 10_000_000

# (record, expected reason or None for accepted)
RECORDS = [
    ({"id": "photo-single", "image": "img/astronaut.jpg",
      "conversations": [U("<image>\nWho is this?"), A("An astronaut.")]}, None),
    ({"id": "photo-multi", "image": {"<image_00>": "img/chelsea.png", "<image_01>": "img/rocket.jpg"},
      "conversations": [U("<image_01> vs <image_00>?"), A("A rocket, then a cat.")]}, None),
    ({"id": "photo-noplaceholder", "image": "img/rocket.jpg",
      "conversations": [U("What is it?"), A("A rocket."), U("Sure?"), A("Yes.")]}, None),
    ({"id": "sharegpt-rgba", "messages": [U("<image>Describe."), A("Coffee.")],
      "images": ["img/coffee_rgba.png"]}, None),
    ({"id": "photo-cmyk", "image": "img/cmyk.jpg",
      "conversations": [U("<image>"), A("The same astronaut.")]}, None),
    ({"id": "text-1", "conversations": [U("Hi"), A("Hello")]}, None),
    ({"id": "text-2", "messages": [{"role": "system", "content": "Be brief."}, U("2+2?"), A("4")]},
     None),
    ({"id": "bad-missing", "image": "img/nope.jpg", "conversations": [U("<image>"), A("?")]},
     "missing_image"),
    ({"id": "bad-corrupt", "image": "img/corrupt.jpg", "conversations": [U("q"), A("a")]},
     "corrupt_image"),
    ({"id": "bad-truncated", "image": "img/truncated.jpg", "conversations": [U("q"), A("a")]},
     "truncated_image"),
    ({"id": "bad-empty", "image": "img/empty.jpg", "conversations": [U("q"), A("a")]},
     "zero_size_image"),
    ({"id": "bad-bomb", "image": "img/bomb.png", "conversations": [U("q"), A("a")]},
     "decompression_bomb"),
    ({"id": "bad-mode", "image": "img/float.tif", "conversations": [U("q"), A("a")]},
     "unsupported_image_mode"),
    ({"id": "bad-second-image", "images": ["img/astronaut.jpg", "img/corrupt.jpg"],
      "messages": [U("<image><image>"), A("a")]}, "corrupt_image"),
    ({"id": "bad-placeholder", "image": "img/astronaut.jpg",
      "conversations": [U("<image><image>"), A("a")]}, "placeholder_mismatch"),
    ({"id": "bad-roles", "conversations": [A("a"), U("q")]}, "wrong_role_order"),
    ({"id": "bad-empty-conv", "conversations": []}, "empty_conversation"),
    ({"id": "bad-no-turns", "image": "img/astronaut.jpg"}, "missing_field"),
]
RAW_LINES = [
    (b"{this is not json", "sample-18", "malformed_conversation"),
    (b'{"id": "bad-latin1", "conversations": [{"role": "user", "content": "caf\xe9"}]}',
     "sample-19", "non_utf8_text"),
]
GOOD_IDS = {r["id"] for r, reason in RECORDS if reason is None}
EXPECTED_REJECTS = {
    **{r["id"]: reason for r, reason in RECORDS if reason},
    **{rid: reason for _, rid, reason in RAW_LINES},
}


def _dataset_files() -> dict[str, bytes]:
    lines = [json.dumps(r).encode() for r, _ in RECORDS] + [raw for raw, _, _ in RAW_LINES]
    return {"train.jsonl": b"\n".join(lines) + b"\n", **IMAGES}


