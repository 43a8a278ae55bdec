"""Decode image bytes into RGB safely, or say exactly why not.

Vision encoders want 8-bit RGB. Real datasets hold CMYK JPEGs, palette PNGs with a
transparent colour, 16-bit scans, images with alpha, cut-off downloads, HTML error pages
saved as ``.jpg`` and the odd decompression bomb. A bare ``Image.open(p).convert("RGB")``
turns some of these into wrong pixels (alpha dropped onto black, 16-bit values clipped to
white) and the rest into exceptions that, in other trainers, crash a run hours in or make
the sample silently disappear.

:func:`decode_image` converts what can be converted soundly and raises
:class:`~omni_ray.data.errors.DataError` with a precise reason otherwise:

================  ==============================================================
source mode       result
================  ==============================================================
RGB               unchanged
L, 1              grey copied to R, G and B
CMYK, YCbCr       PIL's colour conversion (no ICC colour management)
P without alpha   palette looked up
P/PA with alpha   palette looked up to RGBA, then composited on white
LA, RGBA, La,     composited on white: transparent pixels become white, the usual
RGBa              background a transparent image is shown on, not black
I;16 (and B/L/N)  16-bit values scaled to 8 bits (``v / 257``, rounded)
I (32-bit int)    as I;16 when every value is in 0..65535 (how PIL opens many 16-bit
                  TIFF/PNG files); otherwise ``unsupported_image_mode``
F (32-bit float)  ``unsupported_image_mode``: floats (depth maps, HDR) have no canonical
                  range, so any scaling would invent contrast; convert them upstream
anything else     ``unsupported_image_mode`` unless PIL converts it to RGB directly
================  ==============================================================

Multi-frame files (GIF, APNG, TIFF stacks) contribute their first frame; one with more than
``max_frames`` frames is a ``decompression_bomb`` (10,000 frames of a few bytes each decode to
thousands of full images for whatever reads past the first).

Hostile files cost a bounded amount: the pixel limit and the frame count are read from the
header before any pixel is decoded; PIL caps each PNG text/ICC chunk at ``MAX_TEXT_CHUNK`` (1 MB)
decompressed and all of them at ``MAX_TEXT_MEMORY`` (64 MB), reported as ``decompression_bomb``;
a cut-off file is ``truncated_image``. ``tests/hostile/test_hostile_images.py`` measures the
peak memory of a preprocessing actor fed such files. EXIF orientation
is not applied, matching Hugging Face image processors, so training sees what inference
sees. ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set: a cut-off file is rejected, not
padded with grey.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import threading
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from omni_ray import storage as _storage
from omni_ray.data.errors import DataError
from omni_ray.storage import StorageConfig

__all__ = [
    "DEFAULT_MAX_FRAMES",
    "DEFAULT_MAX_IMAGE_BYTES",
    "DEFAULT_MAX_PIXELS",
    "check_confined",
    "probe_file",
    "DecodedImage",
    "decode_image",
    "decode_image_info",
    "encode_png",
    "load_image",
]

#: Same default as PIL's ``Image.MAX_IMAGE_PIXELS`` (about 9458 x 9458).
DEFAULT_MAX_PIXELS = 89_478_485
#: Most frames a multi-frame image may have (only the first is trained on).
DEFAULT_MAX_FRAMES = 1000
#: ``data.max_image_bytes``'s default: far above any photo, far below what would hurt a worker.
DEFAULT_MAX_IMAGE_BYTES = 64 << 20
DEFAULT_READ_TIMEOUT_S = 60.0

_WHITE = (255, 255, 255)
_ALPHA_MODES = {"LA", "RGBA", "La", "RGBa", "PA"}
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N"}


@dataclass(frozen=True)
class DecodedImage:
    """An RGB image plus what it was before, so callers know whether bytes changed."""

    image: Image.Image
    source_format: Optional[str]  # "JPEG", "PNG", ... as PIL identified it
    source_mode: str  # PIL mode before conversion
    #: True when a plain ``Image.open(data).convert("RGB")`` would NOT give these pixels
    #: (alpha composited on white, 16-bit scaled). Only such images need re-encoding
    #: before a reader that knows nothing of these rules sees them; L, CMYK, ... do not.
    converted: bool


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``data`` into a loaded RGB :class:`PIL.Image.Image`; see the module table.

    Raises :class:`DataError` with reason ``zero_size_image``, ``corrupt_image``,
    ``truncated_image``, ``decompression_bomb`` or ``unsupported_image_mode``.
    """
    return decode_image_info(data, max_pixels=max_pixels).image


def decode_image_info(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Like :func:`decode_image`, also returning the source format/mode and whether the
    pixels were converted (the data preparation step re-encodes only those).

    The pixel limit is checked from the header, before any pixel is decoded. PIL's own
    guard still applies on top: above twice ``Image.MAX_IMAGE_PIXELS`` it refuses to open
    the file, which is also reported as ``decompression_bomb``; its warning between one and
    two times the limit is silenced here because ``max_pixels`` decides.
    """
    if not data:
        raise DataError("zero_size_image", "the image file is empty (0 bytes)")
    im = _open(data)
    width, height = im.size
    if width == 0 or height == 0:
        raise DataError("zero_size_image", f"image is {width}x{height} pixels")
    if width * height > max_pixels:
        raise DataError(
            "decompression_bomb",
            f"image is {width}x{height} = {width * height} pixels, above max_pixels="
            f"{max_pixels}; downscale it or raise the limit",
        )
    frames = _frame_count(im)
    if frames > DEFAULT_MAX_FRAMES:
        raise DataError("decompression_bomb", f"{im.format} image has {frames} frames, above {DEFAULT_MAX_FRAMES}; "
                        "only the first is trained on: save that frame as the image")
    _load(im)
    source_format, source_mode = im.format, im.mode
    rgb, converted = _to_rgb(im)
    return DecodedImage(rgb, source_format, source_mode, converted)


def _open(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise DataError("decompression_bomb", str(e)) from e
    except UnidentifiedImageError as e:
        raise DataError(
            "corrupt_image",
            # Never the bytes themselves: reject reports must not leak a file's content.
            f"not a known image format ({len(data)} bytes)",
        ) from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise _load_error(e) from e


def _frame_count(im: Image.Image) -> int:
    """Frames in the file, from its header or a walk over frame headers (no pixel is decoded)."""
    try:
        return int(getattr(im, "n_frames", 1))
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
        raise _load_error(e) from e


def _load(im: Image.Image) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.load()
    except Image.DecompressionBombError as e:
        raise DataError("decompression_bomb", str(e)) from e
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
        raise _load_error(e) from e


def _load_error(e: BaseException) -> DataError:
    message = str(e) or type(e).__name__
    if "MAX_TEXT_CHUNK" in message or "text chunks" in message:  # PIL's caps on PNG zTXt/iTXt/iCCP chunks
        return DataError("decompression_bomb", f"a PNG text or ICC profile chunk decompresses past PIL's limit "
                         f"({message}); strip the metadata from the file")
    if isinstance(e, EOFError) or "truncated" in message.lower():
        return DataError("truncated_image", f"image data ends early: {message}")
    return DataError("corrupt_image", f"image data cannot be decoded: {message}")


def _to_rgb(im: Image.Image) -> tuple[Image.Image, bool]:
    """Convert a loaded image to RGB by the rules in the module docstring.

    Returns the image and whether it differs from PIL's plain ``convert("RGB")``.
    """
    mode = im.mode
    if mode == "RGB":
        return im, False
    if mode in ("L", "1", "CMYK", "YCbCr"):
        return im.convert("RGB"), False
    if mode == "P":
        if "transparency" in im.info:
            return _on_white(im.convert("RGBA")), True
        return im.convert("RGB"), False
    if mode in _ALPHA_MODES:
        return _on_white(im.convert("RGBA")), True
    if mode in _SIXTEEN_BIT or mode == "I":
        values = np.asarray(im)
        if mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise DataError(
                "unsupported_image_mode",
                f"32-bit integer image with values {values.min()}..{values.max()} outside "
                "0..65535; scale it to 8 or 16 bits upstream",
            )
        grey = np.rint(values.astype(np.float64) / 257.0).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB"), True
    if mode == "F":
        raise DataError(
            "unsupported_image_mode",
            "32-bit float image (mode F): no canonical range to map to 8 bits; convert it "
            "to an 8-bit image upstream",
        )
    try:
        return im.convert("RGB"), True
    except (ValueError, OSError) as e:
        raise DataError(
            "unsupported_image_mode",
            f"PIL mode {mode!r} cannot be converted to RGB ({e}); convert it upstream",
        ) from e


def _on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def encode_png(image: Image.Image) -> bytes:
    """Lossless PNG bytes of ``image`` (used for images that had to be converted)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def load_image(
    ref: str,
    storage: Optional[StorageConfig] = None,
    *,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    timeout_s: float = DEFAULT_READ_TIMEOUT_S,
) -> bytes:
    """The raw bytes of the image at ``ref`` (local path or ``s3://`` URI), or a reason why not.

    Only regular files are read (a FIFO would block forever, ``/dev/zero`` never ends): others
    are ``not_a_regular_file``. Files over ``max_bytes`` are ``image_too_large``; a read
    that takes longer than ``timeout_s`` (a hung network mount) is ``read_timeout``, and the
    stuck thread is abandoned. Absent files are ``missing_image``; NUL bytes, over-long paths
    and symlink loops ``bad_path``; anything else (permissions, network) ``unreadable_file``.
    """
    if _storage.is_remote(ref):
        return _with_timeout(lambda: _read_object(ref, storage, max_bytes), timeout_s, ref)
    path = ref[len("file://"):] if ref.startswith("file://") else ref
    return _with_timeout(lambda: _read_local(path, max_bytes), timeout_s, ref)


def _with_timeout(read, timeout_s: float, ref: str) -> bytes:
    # A daemon thread, not a pool: a read stuck in the kernel must not block interpreter exit.
    result: dict = {}

    def target() -> None:
        try:
            result["data"] = read()
        except BaseException as err:  # noqa: BLE001 - handed to the caller below
            result["error"] = err

    thread = threading.Thread(target=target, name="omni-ray-image-read", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise DataError("read_timeout", f"{ref}: reading took longer than data.read_timeout_s={timeout_s}")
    if "error" in result:
        raise result["error"]
    return result["data"]


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def probe_file(ref: str, storage: Optional[StorageConfig] = None, *,
               timeout_s: float = DEFAULT_READ_TIMEOUT_S) -> int:
    """The size of the regular file or object at ``ref``, with :func:`load_image`'s reasons but
    without reading it (videos are often far larger than any image cap; their decoder reads them)."""
    if _storage.is_remote(ref):
        def stat_object() -> int:
            fs, path = _storage.resolve(ref, storage)
            try:
                info = fs.get_file_info(path)
            except OSError as err:
                raise DataError("unreadable_file", f"{ref}: {str(err)[:300]}") from None
            if info.type.name != "File":
                raise DataError("missing_image", f"no file at {ref}")
            return int(info.size)

        return _with_timeout(stat_object, timeout_s, ref)
    path = ref[len("file://"):] if ref.startswith("file://") else ref
    return _with_timeout(lambda: _open_regular(path, lambda fd, f: os.fstat(fd).st_size), timeout_s, ref)


def _read_local(path: str, max_bytes: int) -> bytes:
    return _open_regular(path, lambda fd, f: _read_capped(f, path, max_bytes))


def _open_regular(path: str, use):
    """Open ``path`` only if it is a regular file and call ``use(fd, file)``; reasons otherwise."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat below refuses it anyway.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except ValueError as err:  # "embedded null byte"
        raise DataError("bad_path", f"image path {path[:200]!r}: {err}") from None
    except FileNotFoundError:
        raise DataError("missing_image", f"no image at {path}") from None
    except OSError as err:
        raise _os_error(path, err) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
            raise DataError("not_a_regular_file", f"{path} is {kind}, not an image file")
        f = os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise
    with f:
        try:
            return use(fd, f)
        except OSError as err:
            raise _os_error(path, err) from None


def _os_error(path: str, err: OSError) -> DataError:
    if err.errno in (errno.ELOOP, errno.ENAMETOOLONG):
        return DataError("bad_path", f"{path[:200]}: {err.strerror}")
    if err.errno in (errno.ENOTDIR,):
        return DataError("missing_image", f"no image at {path} ({err.strerror})")
    return DataError("unreadable_file", f"{path}: {err.strerror or err}")


def _read_capped(f, ref: str, max_bytes: int) -> bytes:
    """At most ``max_bytes``; one byte more means the file is too large (it may grow or lie)."""
    chunks, total = [], 0
    while total <= max_bytes:
        chunk = f.read(min(1 << 20, max_bytes + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    if total > max_bytes:
        raise DataError("image_too_large", f"{ref} is larger than data.max_image_bytes={max_bytes}; "
                        "downscale it or raise the limit")
    return b"".join(chunks)


def _read_object(ref: str, storage: Optional[StorageConfig], max_bytes: int) -> bytes:
    try:
        with _storage.open_input_stream(ref, storage) as f:
            return _read_capped(f, ref, max_bytes)
    except FileNotFoundError:
        raise DataError("missing_image", f"no image at {ref}") from None
    except OSError as err:
        # pyarrow reports "is a directory" / "not a regular file" as plain OSError.
        text = str(err)
        if "is a directory" in text or "Not a regular file" in text:
            raise DataError("not_a_regular_file", f"{ref} is a directory, not an image") from None
        raise DataError("unreadable_file", f"{ref}: {text[:300]}") from None


def check_confined(ref: str, root: str) -> None:
    """``unsafe_path`` if local ``ref``, symlinks followed, lies outside ``root``; S3 has no links."""
    if _storage.is_remote(ref) or _storage.is_remote(root):
        return
    try:
        real, real_root = os.path.realpath(ref), os.path.realpath(root)
    except (OSError, ValueError):
        return  # the read reports it (bad_path)
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise DataError(
            "unsafe_path",
            f"{ref} leads (through a symlink) to {real}, outside the dataset folder {root}; copy the file "
            "in, set data.image_root, or set data.allow_absolute_paths: true",
        )
