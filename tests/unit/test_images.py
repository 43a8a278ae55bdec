"""Image decoding: one case per kind of broken or unusual file, on real photographs."""

from __future__ import annotations

import io
import os
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

import skimage.data as skimage_data  # a test dependency: a missing one must fail, not skip

from omni_ray.data.errors import DataError  # noqa: E402
from omni_ray.data.images import _with_timeout, decode_image, decode_image_info, load_image, probe_file  # noqa: E402

ASTRONAUT = skimage_data.astronaut()  # 512x512 RGB photograph
CAMERA = skimage_data.camera()  # 512x512 grayscale photograph


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A syntactically valid PNG that claims ``width x height`` but holds no pixels."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload)))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


RGB_JPEG = encode(Image.fromarray(ASTRONAUT), "JPEG", quality=90)
RGB_PNG = encode(Image.fromarray(ASTRONAUT), "PNG")


def half_transparent(mode: str) -> bytes:
    """The photo with its left half fully transparent, in ``mode`` (RGBA or LA)."""
    rgba = Image.fromarray(ASTRONAUT).convert("RGBA")
    alpha = np.full(ASTRONAUT.shape[:2], 255, np.uint8)
    alpha[:, :256] = 0
    rgba.putalpha(Image.fromarray(alpha))
    return encode(rgba.convert(mode), "PNG")


def palette_with_transparency() -> bytes:
    palette = Image.fromarray(ASTRONAUT).quantize(colors=64)
    index = np.asarray(palette)[0, 0]  # the colour of the top-left pixel becomes transparent
    return encode(palette, "PNG", transparency=int(index))


BAD = [
    ("empty bytes", b"", {}, "zero_size_image"),
    ("html error page saved as jpg", b"<html><body>403 Forbidden</body></html>", {},
     "corrupt_image"),
    ("random bytes", bytes(range(256)) * 4, {}, "corrupt_image"),
    ("truncated jpeg (half)", RGB_JPEG[: len(RGB_JPEG) // 2], {}, "truncated_image"),
    ("truncated jpeg (header only)", RGB_JPEG[:300], {}, "truncated_image"),
    ("truncated png (half)", RGB_PNG[: len(RGB_PNG) // 2], {}, "truncated_image"),
    ("png with zeroed pixel data", RGB_PNG[:1000] + b"\0" * 5000 + RGB_PNG[6000:], {},
     "corrupt_image"),
    ("png header claims 100000x100000", png_header_only(100_000, 100_000), {},
     "decompression_bomb"),
    ("png header claims 12000x12000 (between PIL's warning and error)",
     png_header_only(12_000, 12_000), {}, "decompression_bomb"),
    ("real photo above a small max_pixels", RGB_JPEG, {"max_pixels": 512 * 511},
     "decompression_bomb"),
    ("png header claims 0 width", png_header_only(0, 10), {}, "corrupt_image"),
    ("32-bit float tiff", encode(Image.fromarray(CAMERA.astype(np.float32) / 255), "TIFF"), {},
     "unsupported_image_mode"),
    ("32-bit int tiff outside 16-bit range",
     encode(Image.fromarray(CAMERA.astype(np.int32) * 1000), "TIFF"), {},
     "unsupported_image_mode"),
]


@pytest.mark.parametrize("data,kwargs,reason", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_images_are_rejected_with_reason(data, kwargs, reason):
    with pytest.raises(DataError) as info:
        decode_image(data, **kwargs)
    assert info.value.reason == reason
    assert info.value.detail


def test_bomb_is_refused_before_decoding(recwarn):
    # 144M pixels would take 432 MB to decode; the header check must stop it first.
    with pytest.raises(DataError, match="12000x12000"):
        decode_image(png_header_only(12_000, 12_000))
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def _mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def check_rgb_jpeg(rgb: np.ndarray) -> None:
    assert _mean_abs_diff(rgb, ASTRONAUT) < 4  # lossy, but the same photo


def check_cmyk(rgb: np.ndarray) -> None:
    assert _mean_abs_diff(rgb, ASTRONAUT) < 6, "CMYK must not come out inverted or shifted"


def check_grey(rgb: np.ndarray) -> None:
    assert (rgb[..., 0] == CAMERA).all()
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def check_half_transparent(rgb: np.ndarray) -> None:
    assert (rgb[:, :256] == 255).all(), "transparent pixels must become white, not black"
    assert _mean_abs_diff(rgb[:, 256:], ASTRONAUT[:, 256:]) < 1  # opaque half kept


def check_half_transparent_grey(rgb: np.ndarray) -> None:
    assert (rgb[:, :256] == 255).all()
    grey = np.asarray(Image.fromarray(ASTRONAUT).convert("L"))
    assert (rgb[:, 256:, 0] == grey[:, 256:]).all()


def check_palette(rgb: np.ndarray) -> None:
    assert tuple(rgb[0, 0]) == (255, 255, 255), "the transparent palette entry becomes white"
    assert _mean_abs_diff(rgb, ASTRONAUT) < 25  # 64-colour quantization of the same photo


def check_16bit(rgb: np.ndarray) -> None:
    assert (rgb[..., 0] == CAMERA).all(), "16-bit values scale to 8 bits, not clip to 255"


CONVERSIONS = [
    ("rgb jpeg", RGB_JPEG, "RGB", False, check_rgb_jpeg),
    ("rgb png", RGB_PNG, "RGB", False, lambda rgb: np.testing.assert_array_equal(rgb, ASTRONAUT)),
    ("cmyk jpeg", encode(Image.fromarray(ASTRONAUT).convert("CMYK"), "JPEG", quality=95),
     "CMYK", False, check_cmyk),
    ("grey png (L)", encode(Image.fromarray(CAMERA), "PNG"), "L", False, check_grey),
    ("rgba png", half_transparent("RGBA"), "RGBA", True, check_half_transparent),
    ("la png", half_transparent("LA"), "LA", True, check_half_transparent_grey),
    ("palette png with transparency", palette_with_transparency(), "P", True, check_palette),
    ("16-bit grey png (I;16)", encode(Image.fromarray(CAMERA.astype(np.uint16) * 257), "PNG"),
     "I;16", True, check_16bit),
    ("32-bit int tiff within 16-bit range",
     encode(Image.fromarray(CAMERA.astype(np.int32) * 257), "TIFF"), "I", True, check_16bit),
]


@pytest.mark.parametrize(
    "data,source_mode,converted,check",
    [c[1:] for c in CONVERSIONS],
    ids=[c[0] for c in CONVERSIONS],
)
def test_conversions_give_sound_rgb(data, source_mode, converted, check):
    info = decode_image_info(data)
    assert info.source_mode == source_mode
    assert info.converted is converted
    assert info.image.mode == "RGB"
    assert info.image.size == (512, 512)
    rgb = np.asarray(info.image)
    assert rgb.dtype == np.uint8 and rgb.shape == (512, 512, 3)
    check(rgb)
    assert decode_image(data).mode == "RGB"


def test_converted_images_need_reencoding():
    """``converted`` is exactly: plain PIL ``convert('RGB')`` gives different pixels."""
    for _, data, _, converted, _ in CONVERSIONS:
        ours = np.asarray(decode_image(data))
        try:
            plain = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        except ValueError:
            plain = None
        assert (plain is None or not np.array_equal(ours, plain)) is converted


def test_load_image_missing(tmp_path):
    with pytest.raises(DataError) as info:
        load_image(str(tmp_path / "nope.jpg"))
    assert info.value.reason == "missing_image"
    (tmp_path / "a.jpg").write_bytes(RGB_JPEG)
    assert load_image(str(tmp_path / "a.jpg")) == RGB_JPEG


@pytest.mark.timeout(30)
def test_load_image_reads_only_regular_files_within_limits(tmp_path):
    """Issue 11: each of these crashed or hung prepare, check and training."""
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)  # no writer: a plain open() blocks forever
    loop = tmp_path / "loop.jpg"
    loop.symlink_to(loop)
    (tmp_path / "big.jpg").write_bytes(RGB_JPEG)
    cases = [
        (str(fifo), {}, "not_a_regular_file", "a FIFO"),
        ("/dev/zero", {}, "not_a_regular_file", "a character device"),
        (str(tmp_path), {}, "not_a_regular_file", "a directory"),
        (str(loop), {}, "bad_path", "symbolic links"),
        (str(tmp_path / "a\x00.jpg"), {}, "bad_path", "null byte"),
        ("/" + "a/" * 2100 + "x.jpg", {}, "bad_path", "too long"),
        (str(tmp_path / "big.jpg"), {"max_bytes": 1000}, "image_too_large", "max_image_bytes=1000"),
    ]
    for ref, kwargs, reason, detail in cases:
        with pytest.raises(DataError) as info:
            load_image(ref, **kwargs)
        assert (info.value.reason, detail.lower() in info.value.detail.lower()) == (reason, True), info.value


def test_probe_file_checks_without_reading(tmp_path):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\0" * 5000)
    assert probe_file(str(video)) == 5000
    fifo = tmp_path / "fifo.mp4"
    os.mkfifo(fifo)
    for ref, reason in [(str(fifo), "not_a_regular_file"), ("/dev/zero", "not_a_regular_file"),
                        (str(tmp_path / "nope.mp4"), "missing_image"), (str(tmp_path), "not_a_regular_file")]:
        with pytest.raises(DataError) as info:
            probe_file(ref)
        assert info.value.reason == reason


def test_read_timeout_becomes_a_reason():
    started = time.monotonic()
    with pytest.raises(DataError) as info:
        _with_timeout(lambda: time.sleep(30), 0.2, "slow.jpg")  # a read stuck on a hung mount
    assert info.value.reason == "read_timeout" and "slow.jpg" in info.value.detail
    assert time.monotonic() - started < 10


def test_corrupt_image_report_holds_no_file_content():
    secret = b"root:x:0:0:root:/root:/bin/bash\n"
    with pytest.raises(DataError) as info:
        decode_image(secret)
    assert "root" not in str(info.value) and str(len(secret)) in info.value.detail
