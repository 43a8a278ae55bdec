"""Hostile images cost little and are rejected by reason (issue 19, item 6).

Each file is small on disk and built here (PIL, zlib, struct): a 20000x20000 single-colour PNG
(400M pixels), PNGs whose zTXt / iCCP chunk inflates to 64 MB, a GIF with 10,000 frames of 300x300
(900M pixels in all), a TIFF whose header claims 100000x100000 pixels, and a JPEG cut in half.

* ``decode_image`` (the one decoder for files and for bytes embedded in Parquet or tars)
  rejects each with its reason.
* One real Ray Data pass through ``Preprocess`` actors, with every file once by path and once
  as embedded bytes, rejects each row by reason while the actor's peak RSS stays under 2 GiB
  and grows by less than 256 MiB while it processes them (measured in the actor with
  ``resource.getrusage``); a good image in the same pass is processed.

Run: python -m pytest -q tests/hostile/test_hostile_images.py
"""

from __future__ import annotations

import io
import json
import struct
import zlib

import pytest
from PIL import Image

from omni_ray.config import ModelConfig
from omni_ray.data.errors import DataError
from omni_ray.data.images import decode_image

RSS_LIMIT_BYTES = 2 << 30
RSS_GROWTH_LIMIT_BYTES = 256 << 20


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width: int, height: int, bit_depth: int, rows: bytes, extra: bytes = b"") -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)  # greyscale
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra + _chunk(b"IDAT", rows) + _chunk(b"IEND", b""))


def png_huge_pixels(side: int = 20000) -> bytes:
    """One colour, 1 bit per pixel: ~50 MB of zero rows deflate to ~50 KB."""
    squeeze, row = zlib.compressobj(9), b"\x00" * (1 + (side + 7) // 8)
    rows = b"".join(squeeze.compress(row * 100) for _ in range(side // 100)) + squeeze.flush()
    return _png(side, side, 1, rows)


def png_with_bomb_chunk(kind: bytes, inflated: int = 64 << 20) -> bytes:
    """An 8x8 PNG with one zTXt (text) or iCCP (colour profile) chunk that inflates to ``inflated`` bytes."""
    squeeze = zlib.compressobj(9)
    blob = b"".join(squeeze.compress(b"\0" * (1 << 20)) for _ in range(inflated >> 20)) + squeeze.flush()
    head = b"Comment\0\0" if kind == b"zTXt" else b"icc\0\0"  # keyword / profile name, NUL, method 0
    return _png(8, 8, 8, zlib.compress(b"\x00" * 9 * 8), _chunk(kind, head + blob))


def _skip_sub_blocks(data: bytes, i: int) -> int:
    while data[i]:
        i += data[i] + 1
    return i + 1


def gif_many_frames(frames: int = 10000, side: int = 300) -> bytes:
    """PIL writes a two-frame GIF; its second frame's blocks are then repeated ``frames - 1`` times."""
    buf = io.BytesIO()
    first, second = (Image.new("P", (side, side), c) for c in (0, 1))
    first.save(buf, "GIF", save_all=True, append_images=[second], optimize=False)
    data = buf.getvalue()
    flags = data[10]
    i = block = 13 + (3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0)
    spans = []
    while data[i] != 0x3B:  # trailer
        if data[i] == 0x21:  # extension: label, then sub-blocks
            i = _skip_sub_blocks(data, i + 2)
        else:  # 0x2C image descriptor, optional local colour table, LZW code size, sub-blocks
            local = data[i + 9]
            i = _skip_sub_blocks(data, i + 10 + (3 * 2 ** ((local & 7) + 1) if local & 0x80 else 0) + 1)
            spans.append((block, i))
            block = i
    start, end = spans[1]
    return data[:start] + data[start:end] * (frames - 1) + data[end:]


def tiff_huge_dims(side: int = 100000) -> bytes:
    """A 4x4 TIFF whose ImageWidth / ImageLength tags are rewritten to ``side``."""
    buf = io.BytesIO()
    Image.new("L", (4, 4)).save(buf, "TIFF")
    data = bytearray(buf.getvalue())
    order = "<" if data[:2] == b"II" else ">"
    ifd = struct.unpack(order + "I", data[4:8])[0]
    for n in range(struct.unpack(order + "H", data[ifd:ifd + 2])[0]):
        entry = ifd + 2 + 12 * n
        (tag,) = struct.unpack(order + "H", data[entry:entry + 2])
        if tag in (256, 257):  # ImageWidth, ImageLength: retyped as LONG to hold any value
            data[entry + 2:entry + 4] = struct.pack(order + "H", 4)
            data[entry + 8:entry + 12] = struct.pack(order + "I", side)
    return bytes(data)


def jpeg_truncated() -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((256, 256), 64).convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()[: len(buf.getvalue()) // 2]


@pytest.fixture(scope="module")
def hostile() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, the reason it must be rejected for)."""
    return {
        "huge_pixels.png": (png_huge_pixels(), "decompression_bomb"),
        "ztxt_bomb.png": (png_with_bomb_chunk(b"zTXt"), "decompression_bomb"),
        "iccp_bomb.png": (png_with_bomb_chunk(b"iCCP"), "decompression_bomb"),
        "many_frames.gif": (gif_many_frames(), "decompression_bomb"),
        "huge_dims.tiff": (tiff_huge_dims(), "decompression_bomb"),
        "truncated.jpg": (jpeg_truncated(), "truncated_image"),
    }


def test_hostile_files_are_small(hostile):
    # The point of each: little on disk, a lot when decoded.
    assert all(len(data) < 8 << 20 for data, _ in hostile.values()), {k: len(v[0]) for k, v in hostile.items()}


@pytest.mark.parametrize("name", ["huge_pixels.png", "ztxt_bomb.png", "iccp_bomb.png", "many_frames.gif",
                                  "huge_dims.tiff", "truncated.jpg"])
def test_decode_image_rejects_by_reason(hostile, name):
    data, reason = hostile[name]
    with pytest.raises(DataError) as caught:
        decode_image(data)
    assert caught.value.reason == reason, str(caught.value)


def test_decode_image_counts_frames_from_the_header(hostile):
    data, _ = hostile["many_frames.gif"]
    with pytest.raises(DataError, match="has 10000 frames, above 1000"):
        decode_image(data)
    decode_image(gif_many_frames(frames=3, side=64))  # a short animation still gives its first frame


def test_preprocess_actor_rejects_with_bounded_memory(ray_local, tiny_minicpmv, hostile, tmp_path):
    """Every hostile file by path and as embedded bytes through real Preprocess actors on Ray Data."""
    import resource

    from omni_ray.data.pipeline import Preprocess

    class MeasuredPreprocess(Preprocess):  # defined here so Ray ships it by value
        def __call__(self, batch):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
            out = super().__call__(batch)
            out["maxrss"] = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024] * len(out["id"])
            out["before"] = [before] * len(out["id"])
            return out

    good = io.BytesIO()
    Image.new("RGB", (40, 32), (200, 30, 30)).save(good, "PNG")
    files = {**hostile, "good.png": (good.getvalue(), "")}
    rows = []
    for name, (data, _) in files.items():
        (tmp_path / name).write_bytes(data)
        for how, ref, blob in (("path", str(tmp_path / name), b""), ("bytes", "", data)):
            rows.append({"row": len(rows), "id": f"{how}:{name}", "image_refs": [ref], "images": [blob],
                         "messages": json.dumps([{"role": "user", "content": "<image>\nwhat colour?"},
                                                 {"role": "assistant", "content": "red"}]),
                         "video_refs": [], "videos": [], "tools": ""})
    model = ModelConfig(path=str(tiny_minicpmv), dtype="float32")
    ds = ray_local.data.from_items(rows).map_batches(
        MeasuredPreprocess, fn_constructor_args=(model, None, 512), batch_size=1,
        compute=ray_local.data.ActorPoolStrategy(size=1), num_cpus=1)
    out = {r["id"]: r for r in ds.take_all()}
    assert len(out) == len(rows)
    for name, (_, reason) in files.items():
        for how in ("path", "bytes"):
            row = out[f"{how}:{name}"]
            assert row["reason"] == reason, (how, name, row["reason"], row["detail"])
    assert out["path:good.png"]["num_images"] == 1 and out["bytes:good.png"]["num_image_tokens"] > 0
    # The actor's own imports (torch, transformers, the processor) are most of it; decoding any
    # of the bombs would add hundreds of MiB (400M one-byte pixels for the PNG alone).
    peak, start = max(r["maxrss"] for r in out.values()), min(r["before"] for r in out.values())
    print(f"preprocessing actor peak RSS: {peak / 2**20:.0f} MiB, {(peak - start) / 2**20:.0f} MiB above the "
          "RSS before its first batch")
    assert peak < RSS_LIMIT_BYTES and peak - start < RSS_GROWTH_LIMIT_BYTES
