"""Read the annotation formats users already have, into one normalized sample.

Users of MiniCPM-V's ``finetune/``, LLaVA, LLaMA-Factory and ms-swift bring their files
unchanged. Accepted shapes (detected per record, so one file may mix them):

MiniCPM-V / LLaVA::

    {"id": "0", "image": "img.jpg",
     "conversations": [{"role": "user", "content": "<image>\\nWhat is this?"},   # LLaVA:
                       {"role": "assistant", "content": "A cat."}]}             # from/value,
    {"id": "1", "image": {"<image_00>": "a.jpg", "<image_01>": "b.jpg"}, ...}   # human/gpt

LLaMA-Factory ShareGPT::

    {"conversations" | "messages": [...], "system": "...", "tools": "[...]" | [...],
     "images": [...], "videos": [...]}

ms-swift::

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..." | [
        {"type": "text", "text": "..."}, {"type": "image", "image": "a.jpg"},
        {"type": "image_url", "image_url": {"url": "a.jpg"}}, {"type": "video", "video": "v.mp4"}],
        "loss": false}],                                         # per-turn loss (assistant)
     "images": [...], "videos": [...], "tools": [...]}
    {"system": "...", "query": "...", "response": "...", "history": [["q", "r"], ...]}

Every sample becomes::

    {"id": str,
     "messages": [{"role": "system"|"user"|"assistant", "content": str,
                   "loss": bool}],   # "loss" only when the source said so
     "image_refs": [str], "video_refs": [str], "tools": list | None}

with each image written as :data:`IMAGE_PLACEHOLDER` and each video as
:data:`VIDEO_PLACEHOLDER` in the text, refs in the order their placeholders appear.
Text-only samples are valid (``image_refs == []``). Images given without placeholders go
before the first user turn, one per line (MiniCPM-V's behaviour); videos likewise.

What no model here can take is rejected by reason, never dropped or left as literal text:
audio (``audios``, ``<audio>``, audio blocks) is ``unsupported_modality``; ms-swift grounding
``objects`` and preference-data keys are ``unsupported_field``; ``<image>``/``<video>`` in an
assistant turn is ``media_in_assistant_turn`` (its tokens would become labels). Every problem
raises :class:`~omni_ray.data.errors.DataError` with a reason code; all functions here are
pure (files are read by :mod:`omni_ray.data.reader`, which calls these).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from typing import Any, Optional

from omni_ray import storage as _storage
from omni_ray.data.errors import DataError

__all__ = [
    "IMAGE_PLACEHOLDER",
    "VIDEO_PLACEHOLDER",
    "normalize_record",
    "resolve_ref",
]

#: The one image placeholder in normalized text; the tokenizer code expands it.
IMAGE_PLACEHOLDER = "<image>"
#: The one video placeholder in normalized text.
VIDEO_PLACEHOLDER = "<video>"

_NUMBERED = re.compile(r"<image_\d+>")
_ANY_IMAGE = re.compile(r"<image>|<image_\d+>")
_MEDIA = re.compile(r"<image>|<image_\d+>|<video>")
_ROLE_ALIASES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "system": "system",
}
_TOOL_ROLES = {"tool", "observation", "function_call", "function", "tool_call", "tool_response"}
# Keys we know and cannot honour: training on the rest of the record would silently drop them.
_UNSUPPORTED_KEYS = {
    "objects": "ms-swift grounding 'objects' (<ref-object>/<bbox>) are not supported",
    "rejected_response": "preference data (rejected_response) is for RLHF, not supervised fine-tuning",
    "rejected_messages": "preference data (rejected_messages) is for RLHF, not supervised fine-tuning",
    "chosen": "preference data (chosen/rejected) is for RLHF, not supervised fine-tuning",
    "rejected": "preference data (chosen/rejected) is for RLHF, not supervised fine-tuning",
    "kto_tag": "KTO labels are for preference training, not supervised fine-tuning",
}
# Lone surrogates come from JSON "\udcXX" escapes or from bytes decoded with
# errors="surrogateescape"; U+FFFD from bytes decoded with errors="replace" (the reader).
_BAD_TEXT = re.compile("[\ud800-\udfff\ufffd]")


# --------------------------------------------------------------------------- records


def normalize_record(record: Any, index: int) -> dict:
    """Validate one raw record and return the normalized sample (see module docstring).

    ``index`` is the record's position in the dataset; it names samples that have no
    ``id``. Raises :class:`DataError` (``missing_field``, ``empty_conversation``,
    ``malformed_conversation``, ``wrong_role_order``, ``placeholder_mismatch``,
    ``non_utf8_text``, ``unsupported_modality``, ``unsupported_field``,
    ``media_in_assistant_turn``).
    """
    if not isinstance(record, dict):
        raise DataError(
            "malformed_conversation",
            f"record {index} is a JSON {type(record).__name__}, expected an object with "
            "'conversations' (MiniCPM-V, LLaVA) or 'messages' (ShareGPT, ms-swift)",
        )
    sample_id = record.get("id")
    sample_id = f"sample-{index}" if sample_id is None or sample_id == "" else str(sample_id)
    _reject_unsupported(record, sample_id)

    turns_key, turns = _turns(record, sample_id)
    media = {"image": [], "video": []}
    messages = _normalize_turns(turns, turns_key, sample_id, media)
    messages = _with_system(record, messages, sample_id)
    _check_role_order(messages, sample_id)
    _check_text(messages, turns_key, sample_id)

    image_key = _pick_key(record, ("image", "images"), sample_id)
    images = _media_value(record, image_key, media["image"], sample_id)
    messages, image_refs = _bind_media(messages, images, image_key or "images", sample_id, IMAGE_PLACEHOLDER)
    video_key = _pick_key(record, ("video", "videos"), sample_id)
    videos = _media_value(record, video_key, media["video"], sample_id)
    messages, video_refs = _bind_media(messages, videos, video_key or "videos", sample_id, VIDEO_PLACEHOLDER)
    _check_answers(messages, sample_id)
    return {"id": sample_id, "messages": messages, "image_refs": image_refs,
            "video_refs": video_refs, "tools": _tools(record.get("tools"), sample_id)}


def _reject_unsupported(record: dict, sample_id: str) -> None:
    audios = record.get("audios", record.get("audio"))
    if audios not in (None, [], ""):
        raise DataError(
            "unsupported_modality",
            f"sample {sample_id}: has audio ('audios'); no model omni_ray trains takes audio input, "
            "remove the audio or the sample",
        )
    for key, why in _UNSUPPORTED_KEYS.items():
        if record.get(key) not in (None, [], {}, ""):
            raise DataError("unsupported_field", f"sample {sample_id}: {why}; remove {key!r} or the sample")


def _turns(record: dict, sample_id: str) -> tuple[str, Any]:
    """The record's list of turns, building it from ms-swift's query/response/history."""
    key = _pick_key(record, ("conversations", "messages"), sample_id)
    if key is not None:
        if "query" in record or "response" in record:
            raise DataError(
                "malformed_conversation",
                f"sample {sample_id}: has both {key!r} and query/response; keep one form",
            )
        return key, record[key]
    if "query" not in record and "response" not in record:
        raise DataError(
            "missing_field",
            f"sample {sample_id}: no 'conversations' (MiniCPM-V, LLaVA), 'messages' (ShareGPT, "
            "ms-swift) or query/response key; add the list of turns under one of them",
        )
    history = record.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2 for h in history):
        raise DataError(
            "malformed_conversation",
            f"sample {sample_id}: 'history' must be a list of [query, response] pairs",
        )
    turns = []
    for query, response in [*history, [record.get("query"), record.get("response")]]:
        turns += [{"role": "user", "content": query}, {"role": "assistant", "content": response}]
    return "query/response", turns


def _with_system(record: dict, messages: list[dict], sample_id: str) -> list[dict]:
    system = record.get("system")
    if system in (None, ""):
        return messages
    if not isinstance(system, str):
        raise DataError("malformed_conversation", f"sample {sample_id}: 'system' is not a string")
    if messages and messages[0]["role"] == "system":
        raise DataError(
            "malformed_conversation",
            f"sample {sample_id}: has a top-level 'system' and a system turn; keep one",
        )
    return [{"role": "system", "content": system}, *messages]


def _tools(tools: Any, sample_id: str) -> Optional[list]:
    if tools in (None, "", []):
        return None
    if isinstance(tools, str):  # LLaMA-Factory stores tools as a JSON string
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise DataError(
                "malformed_conversation", f"sample {sample_id}: 'tools' is a string but not JSON"
            ) from None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(
            "malformed_conversation",
            f"sample {sample_id}: 'tools' must be a list of tool (function) objects",
        )
    return tools


def _pick_key(record: dict, keys: tuple[str, str], sample_id: str) -> Optional[str]:
    present = [k for k in keys if k in record]
    if len(present) > 1:
        raise DataError(
            "malformed_conversation",
            f"sample {sample_id}: has both {present[0]!r} and {present[1]!r}; keep one",
        )
    return present[0] if present else None


def _media_value(record: dict, key: Optional[str], from_blocks: list, sample_id: str) -> Any:
    value = record.get(key) if key else None
    if from_blocks and value not in (None, [], {}, ""):
        raise DataError(
            "malformed_conversation",
            f"sample {sample_id}: media given both in content blocks and in {key!r}; keep one",
        )
    return from_blocks or value


def _normalize_turns(turns: Any, key: str, sample_id: str, media: dict) -> list[dict]:
    if not isinstance(turns, list):
        raise DataError(
            "malformed_conversation",
            f"sample {sample_id}: {key!r} is a {type(turns).__name__}, expected a list of "
            "{role, content} objects",
        )
    if not turns:
        raise DataError("empty_conversation", f"sample {sample_id}: {key!r} is empty")
    return [_normalize_turn(turn, f"sample {sample_id}: {key}[{n}]", media) for n, turn in enumerate(turns)]


def _normalize_turn(turn: Any, where: str, media: dict) -> dict:
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
    if role in _TOOL_ROLES:
        raise DataError(
            "malformed_conversation",
            f"{where} has role {role!r}: tool-call turns are not supported yet; keep tools in "
            "'tools' and remove the call/result turns, or drop the sample",
        )
    if role not in _ROLE_ALIASES:
        raise DataError(
            "malformed_conversation",
            f"{where} has role {role!r}; use one of user/assistant/system "
            "(ShareGPT: human/gpt/system)",
        )
    if isinstance(content, list):
        content = _join_blocks(content, where, media)
    if not isinstance(content, str):
        raise DataError(
            "malformed_conversation",
            f"{where}.content is {type(content).__name__}, expected a string",
        )
    if "<audio>" in content:
        raise DataError(
            "unsupported_modality",
            f"{where} has an <audio> placeholder; no model omni_ray trains takes audio input",
        )
    message = {"role": _ROLE_ALIASES[role], "content": content}
    loss = turn.get("loss")
    if loss is not None:
        if not isinstance(loss, bool) or message["role"] != "assistant":
            raise DataError(
                "malformed_conversation",
                f"{where}.loss is {loss!r}; 'loss' is true or false, on assistant turns only",
            )
        message["loss"] = loss
    return message


def _join_blocks(blocks: list, where: str, media: dict) -> str:
    """OpenAI/ms-swift content blocks -> text with placeholders; media refs appended in order."""
    parts = []
    for n, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            parts.append(block["text"])
        elif kind in ("image", "image_url", "video", "video_url"):
            kind = kind.split("_")[0]
            ref = block.get(kind, block.get(f"{kind}_url"))
            ref = ref.get("url") if isinstance(ref, dict) else ref
            media[kind].append(ref)
            parts.append(IMAGE_PLACEHOLDER if kind == "image" else VIDEO_PLACEHOLDER)
        elif kind in ("audio", "input_audio", "audio_url"):
            raise DataError(
                "unsupported_modality",
                f"{where}.content[{n}] is an audio block; no model omni_ray trains takes audio input",
            )
        else:
            raise DataError(
                "malformed_conversation",
                f"{where}.content[{n}] is not a text/image/image_url/video block ({kind!r})",
            )
    return "".join(parts)


def _check_text(messages: list[dict], key: str, sample_id: str) -> None:
    for turn_no, message in enumerate(messages):
        if _BAD_TEXT.search(message["content"]):
            raise DataError(
                "non_utf8_text",
                f"sample {sample_id}: {key}[{turn_no}].content holds bytes that were "
                "not valid UTF-8 (lone surrogate or U+FFFD); re-encode the file as UTF-8",
            )


def _check_answers(messages: list[dict], sample_id: str) -> None:
    for message in messages:
        found = _MEDIA.search(message["content"]) if message["role"] == "assistant" else None
        if found:
            raise DataError(
                "media_in_assistant_turn",
                f"sample {sample_id}: {found.group()} in an assistant turn would make the image's "
                "tokens labels; move it into the user turn before",
            )


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


def _bind_media(
    messages: list[dict], value: Any, key: str, sample_id: str, placeholder: str
) -> tuple[list[dict], list[str]]:
    """Match placeholders with media refs; return the rewritten messages and ordered refs."""
    pattern = _ANY_IMAGE if placeholder == IMAGE_PLACEHOLDER else re.compile(re.escape(placeholder))
    found = [(i, m.group()) for i, msg in enumerate(messages) for m in pattern.finditer(msg["content"])]
    numbered = [p for _, p in found if p != placeholder]
    plain = len(found) - len(numbered)
    noun = placeholder.strip("<>")

    if value is None or value == [] or value == {} or value == "":
        if found:
            raise DataError(
                "placeholder_mismatch",
                f"sample {sample_id}: text has {len(found)} {noun} placeholder(s) but the "
                f"sample has no {noun}s; add the {noun} path(s) or remove the placeholder(s)",
            )
        return messages, []

    if placeholder == IMAGE_PLACEHOLDER and isinstance(value, dict) and list(value) != [placeholder]:
        return _bind_numbered(messages, value, found, sample_id)
    if isinstance(value, dict) and list(value) == [placeholder]:  # {"<image>": path}: one image
        value = value[placeholder]
    refs = [value] if isinstance(value, str) else value
    if not isinstance(refs, list):
        raise DataError(
            "malformed_conversation",
            f"sample {sample_id}: {key!r} is a {type(value).__name__}; expected a path, a "
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
        # MiniCPM-V's behaviour: media without placeholders go before the first user turn.
        first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
        messages = [dict(m) for m in messages]
        messages[first_user]["content"] = (
            "".join(f"{placeholder}\n" for _ in refs) + messages[first_user]["content"]
        )
    elif plain != len(refs):
        raise DataError(
            "placeholder_mismatch",
            f"sample {sample_id}: text has {plain} {placeholder} placeholder(s) but "
            f"{key!r} lists {len(refs)} {noun}(s); make them equal",
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
    messages = [{**m, "content": _NUMBERED.sub(IMAGE_PLACEHOLDER, m["content"])} for m in messages]
    return messages, refs


def _check_ref(ref: Any, key: Optional[str], sample_id: str) -> None:
    if not isinstance(ref, str) or not ref.strip():
        raise DataError(
            "malformed_conversation",
            f"sample {sample_id}: media reference {ref!r} in {key!r} is not a non-empty "
            "path string",
        )
    if _BAD_TEXT.search(ref):
        raise DataError(
            "non_utf8_text",
            f"sample {sample_id}: image path {ref!r} holds bytes that were not valid UTF-8",
        )


# ----------------------------------------------------------------------------- paths


_MAX_PATH = 4095  # PATH_MAX - 1: longer paths cannot be opened on Linux
_MAX_NAME = 255  # NAME_MAX: the longest one path component may be


def resolve_ref(ref: str, base_uri: str, *, root: Optional[str] = None, allow_absolute: bool = False) -> str:
    """Resolve a media reference from the annotation file at ``base_uri``; pure (no I/O).

    Relative references join ``root`` (``data.image_root``) when given, else the annotation
    file's folder (a local folder or an S3 prefix), so a dataset folder can be moved or
    uploaded as a whole. Unless ``allow_absolute``, the result must stay inside that root:
    absolute paths, ``s3://`` URIs elsewhere and ``..`` climbing out are ``unsafe_path``.
    http(s) URLs are ``remote_url``; a NUL byte or an over-long path is ``bad_path``.
    """
    if "\x00" in ref:
        raise DataError("bad_path", f"image path {ref[:200]!r} contains a NUL byte")
    if len(ref) > _MAX_PATH or any(len(p.encode("utf-8", "surrogateescape")) > _MAX_NAME for p in ref.split("/")):
        raise DataError(
            "bad_path",
            f"image path of {len(ref)} characters starting {ref[:80]!r} is longer than the system allows "
            f"({_MAX_PATH} per path, {_MAX_NAME} bytes per name)",
        )
    if ref.lower().startswith(("http://", "https://")):
        raise DataError(
            "remote_url",
            f"{ref}: omni_ray does not download images from the web; download them and reference the "
            "local path or s3:// URI",
        )
    if ref[:5].lower() == "data:":
        raise DataError("bad_path", "inline data: URI images are not supported; write the image to a file "
                        "and reference its path")
    if "://" in ref and not ref.startswith(("s3://", "file://")):
        raise DataError("bad_path", f"{ref}: unsupported URI scheme; use a path or s3://BUCKET/KEY")
    base_dir = root if root is not None else _parent(base_uri)
    if _storage.is_remote(ref) or ref.startswith("file://") or os.path.isabs(ref):
        target = _normalize(ref)
    elif _storage.is_remote(base_dir):
        target = "s3://" + posixpath.normpath(posixpath.join(base_dir[len("s3://"):], ref))
    else:
        target = os.path.normpath(os.path.join(_normalize(base_dir), ref))
    if not allow_absolute and not _inside(target, _normalize(base_dir)):
        raise DataError(
            "unsafe_path",
            f"image path {ref!r} points outside the dataset folder {base_dir} (absolute or climbing "
            "with ..); move the images under it, set data.image_root to a folder holding them, or "
            "set data.allow_absolute_paths: true",
        )
    return target


def _parent(uri: str) -> str:
    if _storage.is_remote(uri):
        return "s3://" + posixpath.dirname(uri[len("s3://"):])
    return os.path.dirname(_normalize(uri))


def _normalize(uri: str) -> str:
    if _storage.is_remote(uri):
        return "s3://" + posixpath.normpath(uri[len("s3://"):]).lstrip("/")
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return os.path.normpath(os.path.abspath(os.path.expanduser(path)))


def _inside(target: str, root: str) -> bool:
    if _storage.is_remote(target) != _storage.is_remote(root):
        return False
    sep = "/" if _storage.is_remote(root) else os.sep
    return target == root or target.startswith(root.rstrip(sep) + sep)
