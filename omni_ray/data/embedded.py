"""Media carried inside the data: Hugging Face ``{bytes, path}`` image structs, raw bytes, and
base64 ``data:`` URIs, in every record form.

:func:`lift_media` runs on a raw record before :func:`~omni_ray.data.formats.normalize_record`
and replaces each embedded item by a marker string, keeping its bytes aside, so the record
forms' placeholder binding works unchanged; :func:`split_media` then turns the normalized refs
back into the aligned ``(ref, bytes)`` pairs of :data:`~omni_ray.data.reader.ROW_COLUMNS`.

* ``{"bytes": b"...", "path": "x.jpg"}`` (``datasets.Image()``): the bytes; ``{"bytes": null,
  "path": "x.jpg"}`` (LLaMA-Factory accepts it) is the path ``x.jpg``, never a multi-image map.
* ``data:image/png;base64,...``: decoded here, its size checked against ``data.max_image_bytes``
  from the base64 length BEFORE decoding (``image_too_large``); bad base64 is ``corrupt_image``.

Embedded bytes then meet the same checks as files (``corrupt_image``, ``decompression_bomb``,
... when the image is decoded). All functions here are pure.
"""

from __future__ import annotations

import binascii
import base64
from typing import Any

from omni_ray.data.errors import DataError

__all__ = ["MARKER", "is_hf_struct", "lift_media", "split_media", "decode_data_uri"]

#: Prefix of the marker that stands for embedded bytes in a record (a NUL: never a real path).
MARKER = "\x00omni-embedded:"
_MEDIA_KEYS = ("image", "images", "video", "videos")
_STRUCT_KEYS = {"bytes", "path"}


def is_hf_struct(value: Any) -> bool:
    """Whether ``value`` is a ``datasets.Image()`` cell: a dict with only ``bytes`` and/or ``path``."""
    return isinstance(value, dict) and bool(value) and set(value) <= _STRUCT_KEYS


def _lift_one(value: Any, blobs: list) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        blobs.append(bytes(value))
        return f"{MARKER}{len(blobs) - 1}"
    if is_hf_struct(value):
        data = value.get("bytes")
        if data is not None and len(data):
            return _lift_one(data, blobs)
        return value.get("path")  # a path only (None when neither: normalize_record names it)
    return value


def _lift_value(value: Any, blobs: list) -> Any:
    if isinstance(value, list):
        return [_lift_one(v, blobs) for v in value]
    lifted = _lift_one(value, blobs)
    if isinstance(lifted, dict) and not is_hf_struct(lifted):  # {"<image_00>": ..., ...}
        return {k: _lift_one(v, blobs) for k, v in lifted.items()}
    return lifted


def lift_media(record: Any) -> tuple[Any, list[bytes]]:
    """``record`` with embedded media replaced by markers, and the bytes in marker order."""
    blobs: list[bytes] = []
    if not isinstance(record, dict):
        return record, blobs
    out = dict(record)
    for key in _MEDIA_KEYS:
        if key in out:
            out[key] = _lift_value(out[key], blobs)
    for key in ("messages", "conversations"):
        turns = out.get(key)
        if isinstance(turns, list):
            out[key] = [_lift_blocks(t, blobs) for t in turns]
    return out, blobs


def _lift_blocks(turn: Any, blobs: list) -> Any:
    """Content blocks ``{"type": "image", "image": {bytes, path} | bytes}`` with the media lifted."""
    content = turn.get("content") if isinstance(turn, dict) else None
    if not isinstance(content, list):
        return turn
    blocks = []
    for block in content:
        if isinstance(block, dict) and block.get("type") in ("image", "video"):
            kind = block["type"]
            block = {**block, kind: _lift_one(block.get(kind), blobs)}
        blocks.append(block)
    return {**turn, "content": blocks}


def decode_data_uri(uri: str, max_bytes: int, where: str = "") -> bytes:
    """The bytes of a base64 ``data:`` URI; its size is checked before decoding."""
    head, sep, payload = uri.partition(",")
    label = f"{where}: " if where else ""
    if not sep or not head.lower().endswith(";base64"):
        raise DataError("corrupt_image", f"{label}data: URI {head[:60]!r} is not base64 "
                        "(expected data:image/...;base64,...)")
    if len(payload) // 4 * 3 > max_bytes + 3:  # 4 base64 characters carry 3 bytes
        raise DataError("image_too_large", f"{label}data: URI of about {len(payload) // 4 * 3} bytes is larger "
                        f"than data.max_image_bytes={max_bytes}; downscale it or raise the limit")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise DataError("corrupt_image", f"{label}data: URI is not valid base64 ({err})") from None
    if not data:
        raise DataError("zero_size_image", f"{label}data: URI holds no bytes")
    if len(data) > max_bytes:
        raise DataError("image_too_large", f"{label}data: URI of {len(data)} bytes is larger than "
                        f"data.max_image_bytes={max_bytes}; downscale it or raise the limit")
    return data


def split_media(refs: list[str], blobs: list[bytes], max_bytes: int, where: str = "") -> list[tuple[str, bytes]]:
    """``(ref, b"")`` for a reference still to resolve, ``("", bytes)`` for embedded media."""
    out = []
    for ref in refs:
        if ref.startswith(MARKER):
            data = blobs[int(ref[len(MARKER):])]
            if not data:
                raise DataError("zero_size_image", f"{where}: embedded image holds no bytes")
            if len(data) > max_bytes:
                raise DataError("image_too_large", f"{where}: embedded image of {len(data)} bytes is larger than "
                                f"data.max_image_bytes={max_bytes}; downscale it or raise the limit")
            out.append(("", data))
        elif ref[:5].lower() == "data:":
            out.append(("", decode_data_uri(ref, max_bytes, where)))
        else:
            out.append((ref, b""))
    return out
