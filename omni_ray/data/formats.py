"""Read the annotation formats users already have, into one normalized sample.

Two formats are accepted, so users of MiniCPM-V's ``finetune/`` and of LLaMA-Factory can
bring their files unchanged:

MiniCPM-V finetune format::

    {"id": "0", "image": "path/to/img.jpg",
     "conversations": [{"role": "user", "content": "<image>\\nWhat is this?"},
                       {"role": "assistant", "content": "A cat."}]}
    {"id": "1", "image": {"<image_00>": "a.jpg", "<image_01>": "b.jpg"},
     "conversations": [{"role": "user", "content": "<image_00>\\n<image_01>\\nSame?"}, ...]}

ShareGPT / LLaMA-Factory format::

    {"messages": [{"role": "user", "content": "<image>Describe."}, ...],
     "images": ["img.jpg"]}

ShareGPT turn keys (``{"from": "human"|"gpt", "value": ...}``) are accepted in either.
Every sample becomes::

    {"id": str, "messages": [{"role": "system"|"user"|"assistant", "content": str}],
     "image_refs": [str]}

with each image written as :data:`IMAGE_PLACEHOLDER` in the text and ``image_refs`` in the
order the placeholders appear. Text-only samples (no image field) are valid and have
``image_refs == []``: mixing them with image samples is a supported case (pain 1), not an
error.

Unlike MiniCPM-V's loader, which swaps a failing sample for a random other one, every
problem raises :class:`~omni_ray.data.errors.DataError` with a reason code, so the
preparation step can report each rejected sample. All functions here are pure except
:func:`iter_records`, which reads one file.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Iterator
from typing import Any, Optional, Union

from omni_ray import storage as _storage
from omni_ray.data.errors import DataError
from omni_ray.storage import StorageConfig

__all__ = [
    "IMAGE_PLACEHOLDER",
    "normalize_record",
    "iter_records",
    "resolve_ref",
]

#: The one image placeholder in normalized text; the tokenizer code expands it.
IMAGE_PLACEHOLDER = "<image>"

_NUMBERED = re.compile(r"<image_\d+>")
_ANY_PLACEHOLDER = re.compile(r"<image>|<image_\d+>")
_ROLE_ALIASES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "system": "system",
}
# Lone surrogates come from JSON "\udcXX" escapes or from bytes decoded with
# errors="surrogateescape"; U+FFFD from bytes decoded with errors="replace" upstream.
_BAD_TEXT = re.compile("[\ud800-\udfff\ufffd]")


# --------------------------------------------------------------------------- records


def normalize_record(record: Any, index: int) -> dict:
    """Validate one raw record and return the normalized sample (see module docstring).

    ``index`` is the record's position in its file; it names samples that have no
    ``id``. Raises :class:`DataError` with reason ``missing_field``,
    ``empty_conversation``, ``malformed_conversation``, ``wrong_role_order``,
    ``placeholder_mismatch`` or ``non_utf8_text``.
    """
    if not isinstance(record, dict):
        raise DataError(
            "malformed_conversation",
            f"record {index} is a JSON {type(record).__name__}, expected an object with "
            "'conversations' (MiniCPM-V) or 'messages' (ShareGPT)",
        )
    sample_id = record.get("id")
    sample_id = f"sample-{index}" if sample_id is None or sample_id == "" else str(sample_id)

    turns_key = _pick_key(record, ("conversations", "messages"), sample_id)
    if turns_key is None:
        raise DataError(
            "missing_field",
            f"sample {sample_id}: no 'conversations' (MiniCPM-V format) or 'messages' "
            "(ShareGPT format) key; add the list of turns under one of them",
        )
    messages = _normalize_turns(record[turns_key], turns_key, sample_id)
    _check_role_order(messages, sample_id)
    for turn_no, message in enumerate(messages):
        if _BAD_TEXT.search(message["content"]):
            raise DataError(
                "non_utf8_text",
                f"sample {sample_id}: {turns_key}[{turn_no}].content holds bytes that were "
                "not valid UTF-8 (lone surrogate or U+FFFD); re-encode the file as UTF-8",
            )

    image_key = _pick_key(record, ("image", "images"), sample_id)
    image = record.get(image_key) if image_key else None
    messages, refs = _bind_images(messages, image, image_key, sample_id)
    return {"id": sample_id, "messages": messages, "image_refs": refs}


def _pick_key(record: dict, keys: tuple[str, str], sample_id: str) -> Optional[str]:
    present = [k for k in keys if k in record]
    if len(present) > 1:
        raise DataError(
            "malformed_conversation",
            f"sample {sample_id}: has both {present[0]!r} and {present[1]!r}; keep one",
        )
    return present[0] if present else None


def _normalize_turns(turns: Any, key: str, sample_id: str) -> list[dict]:
    if not isinstance(turns, list):
        raise DataError(
            "malformed_conversation",
            f"sample {sample_id}: {key!r} is a {type(turns).__name__}, expected a list of "
            "{role, content} objects",
        )
    if not turns:
        raise DataError("empty_conversation", f"sample {sample_id}: {key!r} is empty")
    out = []
    for turn_no, turn in enumerate(turns):
        where = f"sample {sample_id}: {key}[{turn_no}]"
        if not isinstance(turn, dict):
            raise DataError(
                "malformed_conversation",
                f"{where} is a {type(turn).__name__}, expected an object with role/content "
                "(or from/value)",
            )
        if "role" in turn or "content" in turn:
            role, content = turn.get("role"), turn.get("content")
        else:
            role, content = turn.get("from"), turn.get("value")
        if role not in _ROLE_ALIASES:
            raise DataError(
                "malformed_conversation",
                f"{where} has role {role!r}; use one of user/assistant/system "
                "(ShareGPT: human/gpt/system)",
            )
        if not isinstance(content, str):
            raise DataError(
                "malformed_conversation",
                f"{where}.content is {type(content).__name__}, expected a string",
            )
        out.append({"role": _ROLE_ALIASES[role], "content": content})
    return out


def _check_role_order(messages: list[dict], sample_id: str) -> None:
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles[0] == "system" else roles
    if not body:
        raise DataError(
            "empty_conversation", f"sample {sample_id}: only a system prompt, no user turn"
        )
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(body))]
    if body != expected or body[-1] != "assistant":
        raise DataError(
            "wrong_role_order",
            f"sample {sample_id}: roles are {roles}; expected an optional system turn, then "
            "user/assistant alternating, starting with user and ending with assistant",
        )


def _bind_images(
    messages: list[dict], image: Any, key: Optional[str], sample_id: str
) -> tuple[list[dict], list[str]]:
    """Match placeholders with images; return the rewritten messages and ordered refs."""
    found = [(i, m.group()) for i, msg in enumerate(messages)
             for m in _ANY_PLACEHOLDER.finditer(msg["content"])]
    numbered = [p for _, p in found if p != IMAGE_PLACEHOLDER]
    plain = len(found) - len(numbered)

    if image is None or image == [] or image == {}:
        if found:
            raise DataError(
                "placeholder_mismatch",
                f"sample {sample_id}: text has {len(found)} image placeholder(s) but the "
                "sample has no images; add the image path(s) or remove the placeholder(s)",
            )
        return messages, []

    if isinstance(image, dict) and list(image) != [IMAGE_PLACEHOLDER]:
        return _bind_numbered(messages, image, found, sample_id)

    if isinstance(image, dict):  # {"<image>": path} is the single-image form
        image = image[IMAGE_PLACEHOLDER]
    refs = [image] if isinstance(image, str) else image
    if not isinstance(refs, list):
        raise DataError(
            "malformed_conversation",
            f"sample {sample_id}: {key!r} is a {type(image).__name__}; expected a path, a "
            "list of paths or a {'<image_00>': path, ...} object",
        )
    for ref in refs:
        _check_ref(ref, key, sample_id)
    if numbered:
        raise DataError(
            "placeholder_mismatch",
            f"sample {sample_id}: text uses {numbered[0]} but {key!r} is not a "
            "{'<image_00>': path, ...} object; use <image> or give the object form",
        )
    if plain == 0:
        # MiniCPM-V's behaviour: images without placeholders go before the first user turn.
        first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
        messages = [dict(m) for m in messages]
        messages[first_user]["content"] = (
            "".join(f"{IMAGE_PLACEHOLDER}\n" for _ in refs) + messages[first_user]["content"]
        )
    elif plain != len(refs):
        raise DataError(
            "placeholder_mismatch",
            f"sample {sample_id}: text has {plain} {IMAGE_PLACEHOLDER} placeholder(s) but "
            f"{key!r} lists {len(refs)} image(s); make them equal",
        )
    return messages, list(refs)


def _bind_numbered(
    messages: list[dict], image: dict, found: list[tuple[int, str]], sample_id: str
) -> tuple[list[dict], list[str]]:
    for name, ref in image.items():
        if not _NUMBERED.fullmatch(name):
            raise DataError(
                "placeholder_mismatch",
                f"sample {sample_id}: image key {name!r} is not of the form <image_XX>; "
                "name multi-image keys <image_00>, <image_01>, ...",
            )
        _check_ref(ref, "image", sample_id)
    names = [p for _, p in found]
    if IMAGE_PLACEHOLDER in names:
        raise DataError(
            "placeholder_mismatch",
            f"sample {sample_id}: text uses {IMAGE_PLACEHOLDER} but 'image' is a "
            "{'<image_XX>': path} object; write <image_XX> for each image",
        )
    for name in image:
        count = names.count(name)
        if count != 1:
            raise DataError(
                "placeholder_mismatch",
                f"sample {sample_id}: image {name} appears {count} times in the text; "
                "put its placeholder exactly once",
            )
    unknown = sorted(set(names) - set(image))
    if unknown:
        raise DataError(
            "placeholder_mismatch",
            f"sample {sample_id}: text uses {', '.join(unknown)} but 'image' has no such "
            "key; add it or remove the placeholder",
        )
    refs = [image[name] for name in names]
    messages = [
        {"role": m["role"], "content": _NUMBERED.sub(IMAGE_PLACEHOLDER, m["content"])}
        for m in messages
    ]
    return messages, refs


def _check_ref(ref: Any, key: Optional[str], sample_id: str) -> None:
    if not isinstance(ref, str) or not ref.strip():
        raise DataError(
            "malformed_conversation",
            f"sample {sample_id}: image reference {ref!r} in {key!r} is not a non-empty "
            "path string",
        )
    if _BAD_TEXT.search(ref):
        raise DataError(
            "non_utf8_text",
            f"sample {sample_id}: image path {ref!r} holds bytes that were not valid UTF-8",
        )


# ----------------------------------------------------------------------------- files


def iter_records(
    uri: str, storage: Optional[StorageConfig] = None
) -> Iterator[tuple[int, Union[dict, DataError]]]:
    """Yield ``(index, record)`` or ``(index, DataError)`` for each record in a file.

    ``.jsonl``: one record per non-blank line, read in a stream so the file never has to
    fit in memory; a line that is not UTF-8 yields ``non_utf8_text`` and a line that is
    not JSON yields ``malformed_conversation``, for that line only. ``.json``: a list of
    records; the file is parsed whole, with undecodable bytes kept as lone surrogates so
    that only the records holding them are rejected (as ``non_utf8_text``, by
    :func:`normalize_record`). A ``.json`` file that is not valid JSON, or not a list,
    raises :class:`ValueError` naming the file: no record in it can be trusted.
    """
    name = uri.rsplit("/", 1)[-1].lower()
    if name.endswith(".jsonl"):
        yield from _iter_jsonl(uri, storage)
    elif name.endswith(".json"):
        yield from _iter_json(uri, storage)
    else:
        raise ValueError(
            f"{uri}: unknown annotation format; give a .json file (a list of records) or a "
            ".jsonl file (one record per line)"
        )


def _iter_jsonl(uri: str, storage: Optional[StorageConfig]):
    index = 0
    for line_no, raw in enumerate(_iter_lines(uri, storage), start=1):
        if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # UTF-8 byte order mark written by some editors
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8", errors="strict")
        except UnicodeDecodeError as e:
            yield index, DataError(
                "non_utf8_text",
                f"{uri} line {line_no}: byte {e.start} is not valid UTF-8 ({e.reason}); "
                "re-encode the file as UTF-8",
            )
        else:
            try:
                yield index, json.loads(text)
            except json.JSONDecodeError as e:
                yield index, DataError(
                    "malformed_conversation",
                    f"{uri} line {line_no}: not valid JSON ({e.msg} at column {e.colno})",
                )
        index += 1


def _iter_lines(uri: str, storage: Optional[StorageConfig], chunk: int = 1 << 20):
    with _storage.open_input_stream(uri, storage) as f:
        pending = b""
        while data := f.read(chunk):
            pending += data
            *lines, pending = pending.split(b"\n")
            yield from lines
        if pending:
            yield pending


def _iter_json(uri: str, storage: Optional[StorageConfig]):
    data = _storage.read_bytes(uri, storage)
    text = data.decode("utf-8-sig", errors="surrogateescape")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{uri}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); fix the "
            "file, or write one record per line as .jsonl so a bad line rejects only itself"
        ) from e
    if not isinstance(records, list):
        raise ValueError(
            f"{uri}: top level is a JSON {type(records).__name__}; a .json annotation file "
            "must be a list of records"
        )
    yield from enumerate(records)


def resolve_ref(ref: str, base_uri: str) -> str:
    """Resolve an image reference against the annotation file at ``base_uri``.

    ``s3://`` references and absolute local paths are returned unchanged; relative ones are
    joined to the annotation file's directory (a local directory or an S3 prefix), so a
    dataset directory can be moved or uploaded as a whole.
    """
    if _storage.is_remote(ref) or ref.startswith("file://") or os.path.isabs(ref):
        return ref
    if _storage.is_remote(base_uri):
        bucket_key = base_uri[len("s3://") :]
        bucket, _, key = bucket_key.partition("/")
        joined = posixpath.normpath(posixpath.join(posixpath.dirname(key), ref))
        if joined == ".." or joined.startswith("../"):
            raise DataError(
                "missing_image",
                f"image path {ref!r} climbs above the bucket root of {base_uri}",
            )
        return f"s3://{bucket}/{joined}"
    base = base_uri[len("file://") :] if base_uri.startswith("file://") else base_uri
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(base)), ref))
