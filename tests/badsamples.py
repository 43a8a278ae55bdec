"""Samples of every kind, good and bad, as raw files: shared by the prepare, check and train tests.

Real photographs from scikit-image (no download); each bad record carries the reason code
omni_ray must report for it. ``LOCAL_RECORDS`` need special files (a FIFO, symlinks, a
directory) that only a local folder can hold: :func:`write_local` makes them.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

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
# Issue 11's hostile inputs and the peer formats' fields no model here can take (issue 10).
RECORDS += [
    ({"id": "bad-absolute", "image": "/etc/passwd", "conversations": [U("<image>"), A("a")]}, "unsafe_path"),
    ({"id": "bad-climb", "image": "../../../../../../etc/passwd", "conversations": [U("<image>"), A("a")]},
     "unsafe_path"),
    ({"id": "bad-nul", "image": "img/astro\u0000naut.jpg", "conversations": [U("<image>"), A("a")]}, "bad_path"),
    ({"id": "bad-long-path", "image": "img/" + "a/" * 2100 + "x.jpg", "conversations": [U("<image>"), A("a")]},
     "bad_path"),
    ({"id": "bad-url", "image": "https://example.com/cat.jpg", "conversations": [U("<image>"), A("a")]},
     "remote_url"),
    ({"id": "bad-image-in-answer", "messages": [U("q"), A("here <image>")], "images": ["img/astronaut.jpg"]},
     "media_in_assistant_turn"),
    ({"id": "bad-audio", "messages": [U("<audio>What is said?"), A("hi")], "audios": ["a.wav"]},
     "unsupported_modality"),
    ({"id": "bad-objects", "messages": [U("<image>Find <ref-object>"), A("<bbox>")], "images": ["img/rocket.jpg"],
      "objects": {"ref": ["rocket"], "bbox": [[1, 2, 3, 4]]}}, "unsupported_field"),
    ({"id": "bad-video-count", "messages": [U("<video><video>"), A("a")], "videos": ["clip.mp4"]},
     "placeholder_mismatch"),
]
_DEEP = 200_000  # nesting that raised RecursionError in every reader
RAW_LINES = [
    (b"{this is not json", "malformed_conversation"),
    (b'{"id": "bad-latin1", "conversations": [{"role": "user", "content": "caf\xe9"}]}', "non_utf8_text"),
    (b'{"id": "deep", "x": ' + b"[" * _DEEP + b"]" * _DEEP + b"}", "record_too_deep"),
]
RAW_IDS = [f"sample-{len(RECORDS) + k}" for k in range(len(RAW_LINES))]

MAX_IMAGE_BYTES = 1 << 20  # the tests' data.max_image_bytes
LOCAL_RECORDS = [
    ({"id": "bad-fifo", "image": "img/fifo.jpg", "conversations": [U("<image>"), A("a")]}, "not_a_regular_file"),
    ({"id": "bad-dir", "image": "img", "conversations": [U("<image>"), A("a")]}, "not_a_regular_file"),
    ({"id": "bad-loop", "image": "img/loop.jpg", "conversations": [U("<image>"), A("a")]}, "bad_path"),
    ({"id": "bad-link-out", "image": "img/passwd.jpg", "conversations": [U("<image>"), A("a")]}, "unsafe_path"),
    ({"id": "bad-dev-zero", "image": "img/zero.jpg", "conversations": [U("<image>"), A("a")]}, "unsafe_path"),
    ({"id": "bad-huge", "image": "img/huge.png", "conversations": [U("<image>"), A("a")]}, "image_too_large"),
]

GOOD_IDS = {r["id"] for r, reason in RECORDS if reason is None}
EXPECTED_REJECTS = {
    **{r["id"]: reason for r, reason in RECORDS if reason},
    **{rid: reason for rid, (_, reason) in zip(RAW_IDS, RAW_LINES)},
}
LOCAL_EXPECTED_REJECTS = {**EXPECTED_REJECTS, **{r["id"]: reason for r, reason in LOCAL_RECORDS}}


def _dataset_files() -> dict[str, bytes]:
    lines = [json.dumps(r).encode() for r, _ in RECORDS] + [raw for raw, _ in RAW_LINES]
    return {"train.jsonl": b"\n".join(lines) + b"\n", **IMAGES}


def write_local(root: Path) -> Path:
    """Every record, the local-only kinds included, under ``root``; returns the JSONL path."""
    files = _dataset_files()
    files["train.jsonl"] += b"".join(json.dumps(r).encode() + b"\n" for r, _ in LOCAL_RECORDS)
    files["img/huge.png"] = b"\0" * (MAX_IMAGE_BYTES + 1)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    os.mkfifo(root / "img/fifo.jpg")  # no writer: a plain open() blocks forever
    (root / "img/loop.jpg").symlink_to("loop.jpg")
    (root / "img/passwd.jpg").symlink_to("/etc/passwd")
    (root / "img/zero.jpg").symlink_to("/dev/zero")
    return root / "train.jsonl"
