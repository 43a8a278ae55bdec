"""Hub Parquet as published: recognise the layout from the schema, normalise each row into the
record dict :func:`~omni_ray.data.formats.normalize_record` takes.

Layouts recognised (the schema alone decides, so ``omni-ray validate`` needs only the footer):

==========================  ==================================================================
``record``                  columns of a record form formats already reads: LLaVA-OneVision-Data
                            (``image`` struct + ``conversations`` from/value), MiniCPM-V/LLaVA,
                            LLaMA-Factory ShareGPT, ms-swift (``messages``/``query``/``response``),
                            TRL (``images`` + ``messages`` whose image blocks carry no ref)
``the_cauldron``            ``images`` list + ``texts`` list of ``{user, assistant, source}``
``columns``                 any other layout, mapped by ``data.columns`` (:class:`ColumnsConfig`)
==========================  ==================================================================

Image columns are found from the ``huggingface`` key of the Parquet schema metadata (the
``datasets`` feature info: ``Image()`` or a list/``Sequence`` of it) before guessing by name
(``image``/``images``). An image column of another name becomes the record's ``images``.
Cells are ``{bytes, path}`` structs (what ``datasets.Image()`` writes); :mod:`omni_ray.data.embedded`
lifts their bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

import pyarrow as pa

from omni_ray.data.errors import DataError

__all__ = ["Layout", "image_columns", "layout_of", "to_record"]

# Columns normalize_record looks at; a record-form row reads only these (plus image columns).
_RECORD_COLUMNS = ("id", "conversations", "messages", "query", "response", "history", "system", "tools",
                   "image", "images", "video", "videos", "audios", "audio", "objects", "rejected_response",
                   "rejected_messages", "chosen", "rejected", "kto_tag")
_CONVERSATION_COLUMNS = ("conversations", "messages", "query", "response")


@dataclass(frozen=True)
class Layout:
    """How rows of one Parquet schema become records."""

    name: str  # "record", "the_cauldron" or "columns"
    columns: tuple[str, ...]  # the columns to read (never the whole file's)
    images: tuple[str, ...]  # image columns (HF Image features, or by name)
    mapping: Optional[dict] = None  # data.columns, for the "columns" layout


def _features(schema: pa.Schema) -> dict:
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return {}
    try:
        info = json.loads(meta)
    except ValueError:
        return {}
    return (info.get("info") or {}).get("features") or {}


def _is_image_feature(feature: Any) -> bool:
    if isinstance(feature, list):  # datasets writes [Image()] for a list feature
        return len(feature) == 1 and _is_image_feature(feature[0])
    if not isinstance(feature, dict):
        return False
    if feature.get("_type") == "Image":
        return True
    return feature.get("_type") in ("Sequence", "List", "LargeList") and _is_image_feature(feature.get("feature"))


def _is_struct_type(t: pa.DataType) -> bool:
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        t = t.value_type
    return pa.types.is_struct(t) and {t.field(i).name for i in range(t.num_fields)} <= {"bytes", "path"}


def image_columns(schema: pa.Schema) -> tuple[str, ...]:
    """Image columns: ``datasets`` Image features from the schema metadata, else by name and type."""
    features = _features(schema)
    found = tuple(name for name, f in features.items() if name in schema.names and _is_image_feature(f))
    if found:
        return found
    return tuple(n for n in ("image", "images") if n in schema.names and _is_struct_type(schema.field(n).type))


def layout_of(schema: pa.Schema, mapping: Optional[dict] = None) -> Layout:
    """The layout of a Parquet schema, or ``ValueError`` naming the columns found and the mapping to write."""
    names = schema.names
    images = image_columns(schema)
    if mapping:
        wanted = [c for c in (mapping.get("conversation"), mapping.get("images"), mapping.get("id")) if c]
        missing = [c for c in wanted if c not in names]
        if missing:
            raise ValueError(f"data.columns names {missing}, not in the file (columns: {names})")
        imgs = (mapping["images"],) if mapping.get("images") else images
        return Layout("columns", tuple(dict.fromkeys([*wanted, *imgs])), imgs, dict(mapping))
    if "texts" in names and _is_cauldron_texts(schema.field("texts").type):
        cols = [c for c in ("id", "texts", *images) if c in names]
        return Layout("the_cauldron", tuple(dict.fromkeys(cols)), images)
    if any(c in names for c in _CONVERSATION_COLUMNS):
        cols = [c for c in names if c in _RECORD_COLUMNS or c in images]
        return Layout("record", tuple(cols), images)
    raise ValueError(
        f"no conversation column among {names}: expected conversations/messages (LLaVA-OneVision, ShareGPT, "
        "ms-swift, TRL), texts (the_cauldron) or query/response; map the layout with data.columns, e.g. "
        "columns: {conversation: COLUMN, images: COLUMN, role_key: role, content_key: content, "
        "user: user, assistant: assistant}")


def _is_cauldron_texts(t: pa.DataType) -> bool:
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not pa.types.is_struct(t.value_type):
        return False
    fields = {t.value_type.field(i).name for i in range(t.value_type.num_fields)}
    return {"user", "assistant"} <= fields


def _drop_nulls(value: Any) -> Any:
    """Arrow structs hold every field of the union of rows: absent keys come back as None."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def to_record(row: dict, layout: Layout) -> dict:
    """One Parquet row as a record dict normalize_record reads (image cells stay ``{bytes, path}``)."""
    row = {k: _drop_nulls(v) for k, v in row.items() if v is not None}
    if layout.name == "the_cauldron":
        return _cauldron(row, layout)
    if layout.name == "columns":
        return _mapped(row, layout)
    extra = [c for c in layout.images if c not in ("image", "images")]
    if extra and not any(k in row for k in ("image", "images")):
        row["images"] = [cell for c in extra for cell in _as_list(row.pop(c, None))]
    if isinstance(row.get("messages"), list) and row.get("images"):
        row["messages"] = [_trl_turn(t) for t in row["messages"]]
    return row


def _as_list(value: Any) -> list:
    return [] if value is None else value if isinstance(value, list) else [value]


def _trl_turn(turn: Any) -> Any:
    """TRL's ``{"type": "image"}`` block (no ref: the images column holds them) -> an <image> placeholder."""
    content = turn.get("content") if isinstance(turn, dict) else None
    if not isinstance(content, list):
        return turn
    blocks = [{"type": "text", "text": "<image>"} if isinstance(b, dict) and b.get("type") == "image"
              and not b.get("image") and not b.get("image_url") else b for b in content]
    return {**turn, "content": blocks}


def _cauldron(row: dict, layout: Layout) -> dict:
    texts = row.get("texts")
    if not isinstance(texts, list):
        raise DataError("missing_field", "the_cauldron row has no 'texts' list")
    messages = []
    for pair in texts:
        messages += [{"role": "user", "content": pair.get("user")}, {"role": "assistant", "content": pair.get("assistant")}]
    images = [cell for c in layout.images for cell in _as_list(row.get(c))]
    return {"id": row.get("id"), "messages": messages, "images": images}


def _mapped(row: dict, layout: Layout) -> dict:
    m = layout.mapping or {}
    roles = {m.get("user", "user"): "user", m.get("assistant", "assistant"): "assistant",
             m.get("system", "system"): "system"}
    turns = row.get(m["conversation"])
    if not isinstance(turns, list):
        raise DataError("missing_field", f"column {m['conversation']!r} (data.columns.conversation) is "
                        f"{type(turns).__name__}, expected a list of turns")
    role_key, content_key = m.get("role_key", "role"), m.get("content_key", "content")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise DataError("malformed_conversation", f"column {m['conversation']!r}: a turn is {type(turn).__name__}")
        role = turn.get(role_key)
        messages.append({"role": roles.get(role, role), "content": turn.get(content_key)})
    images = [cell for c in layout.images for cell in _as_list(row.get(c))]
    return {"id": row.get(m["id"]) if m.get("id") else None, "messages": messages, "images": images}
