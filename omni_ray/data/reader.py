"""The one streaming reader for annotation files: JSON arrays and JSONL, local or S3.

``data prepare``, ``data check`` and training all read through here, so the limits that keep
one hostile record from crashing or hanging a run live in one place:

* records stream: JSONL line by line, top-level JSON arrays with ``ijson`` (a maintained
  incremental parser), never the whole file in memory;
* a record nested deeper than ``data.max_json_depth`` is rejected as ``record_too_deep`` (a
  200,000-deep record would otherwise raise ``RecursionError``) and one larger than
  ``data.max_record_bytes`` as ``record_too_large``, each without building it;
* only regular files are read: a FIFO would block forever, ``/dev/zero`` never ends;
* a source that is missing, unreadable or of an unknown format raises
  :class:`~omni_ray.data.errors.DataSourceError` (a ``ConfigError``: the CLI exits 2 with one
  line naming the path).

Rows carry ``row``: the record's position in the whole dataset (all sources in order), the
same every run, unique even when two files both number their ``id`` from ``"0"``. The
user's ``id`` is kept for reports. ``pipeline.JsonRowsDatasource`` feeds these rows into Ray
Data from a read task, in bounded blocks, so the driver never holds the dataset.
"""

from __future__ import annotations

import codecs
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional, Union

import pyarrow as pa

from omni_ray import storage as _storage
from omni_ray.config import ANNOTATION_SUFFIXES, DataConfig
from omni_ray.data.errors import DataError, DataSourceError
from omni_ray.storage import StorageConfig

__all__ = [
    "InputPolicy",
    "ROW_COLUMNS",
    "iter_records",
    "iter_rows",
]

_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_LOCATE_LIMIT = 64 << 20  # a broken .json up to this size is parsed again to name the line and column


@dataclass(frozen=True)
class InputPolicy:
    """The input limits of :class:`~omni_ray.config.DataConfig`, small enough to ship to Ray tasks."""

    max_json_depth: int = 64
    max_record_bytes: int = 16 << 20
    max_image_bytes: int = 64 << 20
    read_timeout_s: float = 60.0
    image_root: Optional[str] = None
    allow_absolute_paths: bool = False
    pairs: bool = False
    """Records are preference pairs (``train.objective: dpo``): read with ``pairs.normalize_pair``."""

    @classmethod
    def from_data(cls, data: DataConfig, pairs: bool = False) -> "InputPolicy":
        return cls(data.max_json_depth, data.max_record_bytes, data.max_image_bytes, data.read_timeout_s,
                   data.image_root, data.allow_absolute_paths, pairs)


# ---------------------------------------------------------------------------- sources


def check_file(uri: str, storage: Optional[StorageConfig], key: str) -> None:
    """Raise unless ``uri`` is a readable regular file (or an S3 object)."""
    if _storage.is_remote(uri):
        fs, path = _storage.resolve(uri, storage)
        try:
            info = fs.get_file_info(path)
        except OSError as err:
            raise DataSourceError(uri, f"cannot be read ({err}); check storage.endpoint_url and credentials", key) from None
        if info.type.name != "File":
            raise DataSourceError(uri, "no such object; check the bucket and key", key)
        return
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DataSourceError(uri, "does not exist; check the path (relative paths are relative to the "
                              "current directory)", key) from None
    except OSError as err:
        raise DataSourceError(uri, f"cannot be opened ({err.strerror}); check the path", key) from None
    if not stat.S_ISREG(mode):
        raise DataSourceError(uri, "is not a regular file (a FIFO, device or socket); give a regular file", key)
    if not os.access(path, os.R_OK):
        raise DataSourceError(uri, "cannot be read (permission denied); check its permissions", key)


def check_source_file(uri: str, storage: Optional[StorageConfig] = None, key: str = "data.train") -> None:
    """Raise :class:`DataSourceError` unless ``uri`` is a readable regular JSON/JSONL file (or S3 object)."""
    if not uri.lower().endswith(ANNOTATION_SUFFIXES):
        raise DataSourceError(uri, "unknown annotation format; give a .json file (a list of records) or a "
                              ".jsonl file (one record per line)", key)
    check_file(uri, storage, key)


# ---------------------------------------------------------------------------- records


def iter_records(
    uri: str, storage: Optional[StorageConfig] = None, policy: Optional[InputPolicy] = None
) -> Iterator[tuple[int, Union[Any, DataError]]]:
    """Yield ``(index, record)`` or ``(index, DataError)`` for each record of one file, streaming.

    ``.jsonl``: one record per non-blank line; a line that is not UTF-8 yields
    ``non_utf8_text``, one that is not JSON ``malformed_conversation``, for that line only.
    ``.json``: a top-level list; bytes that are not UTF-8 become U+FFFD, so only the records
    holding them are rejected (``non_utf8_text``, by ``normalize_record``). A ``.json`` file
    that is not a valid JSON list raises :class:`DataSourceError`: nothing in it can be trusted.
    """
    policy = policy or InputPolicy()
    check_source_file(uri, storage)
    if uri.lower().endswith(".jsonl"):
        yield from _iter_jsonl(uri, storage, policy)
    else:
        yield from _iter_json(uri, storage, policy)


def _iter_jsonl(uri: str, storage: Optional[StorageConfig], policy: InputPolicy):
    if _utf16(uri, storage):
        yield from _iter_utf16_lines(uri, storage)
        return
    index = 0
    for line_no, raw in _iter_lines(uri, storage, policy.max_record_bytes):
        if raw is None:
            yield index, DataError("record_too_large", f"{uri} line {line_no}: longer than data.max_record_bytes="
                                   f"{policy.max_record_bytes}; split the record or raise the limit")
            index += 1
            continue
        if line_no == 1 and raw.startswith(_BOM):
            raw = raw[3:]  # UTF-8 byte order mark written by some editors
        if not raw.strip():
            continue
        yield index, _parse_line(raw, f"{uri} line {line_no}", policy)
        index += 1


def _utf16(uri: str, storage: Optional[StorageConfig]) -> bool:
    with _storage.open_input_stream(uri, storage) as f:
        return f.read(2) in _UTF16_BOMS


def _iter_utf16_lines(uri: str, storage: Optional[StorageConfig]):
    """A UTF-16 file (byte order mark): each record is rejected once, naming the fix."""
    with _storage.open_input_stream(uri, storage) as f:
        text = codecs.getreader("utf-16")(f, errors="replace")
        index = 0
        for line_no, line in enumerate(text, 1):
            if line.strip():
                yield index, DataError("non_utf8_text", f"{uri} line {line_no}: the file is UTF-16 (it starts with a "
                                       "UTF-16 byte order mark); re-encode it as UTF-8")
                index += 1


def _iter_lines(uri: str, storage: Optional[StorageConfig], max_bytes: int, chunk: int = 1 << 20):
    """``(line_no, bytes)`` per line; ``None`` for a line over ``max_bytes``, which is never buffered whole."""
    line_no, pending, skipping = 0, b"", False
    with _storage.open_input_stream(uri, storage) as f:
        while data := f.read(chunk):
            *complete, tail = data.split(b"\n")
            for part in complete:
                line_no += 1
                line = None if skipping else pending + part
                yield line_no, (None if line is None or len(line) > max_bytes else line)
                pending, skipping = b"", False
            if not skipping:
                pending += tail
                if len(pending) > max_bytes:
                    pending, skipping = b"", True
    if pending or skipping:
        yield line_no + 1, None if skipping else pending


def _parse_line(raw: bytes, where: str, policy: InputPolicy) -> Union[Any, DataError]:
    try:
        text = raw.decode("utf-8", errors="strict")
    except UnicodeDecodeError as e:
        return DataError("non_utf8_text", f"{where}: byte {e.start} is not valid UTF-8 ({e.reason}); "
                         "re-encode the file as UTF-8")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        return DataError("malformed_conversation", f"{where}: not valid JSON ({e.msg} at column {e.colno})")
    except RecursionError:
        return _too_deep(where, policy)
    if _depth_over(record, policy.max_json_depth):
        return _too_deep(where, policy)
    return record


def _too_deep(where: str, policy: InputPolicy) -> DataError:
    return DataError("record_too_deep", f"{where}: nested deeper than data.max_json_depth={policy.max_json_depth}; "
                     "flatten the record or raise the limit")


def _depth_over(value: Any, limit: int) -> bool:
    """Whether ``value`` nests deeper than ``limit`` (iterative: no recursion on hostile input)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


class _Utf8Repair:
    """A byte stream in which invalid UTF-8 (and a BOM) is replaced, so ijson never fails on it."""

    def __init__(self, raw, chunk: int = 1 << 20):
        self._raw, self._chunk = raw, chunk
        self._decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")

    def read(self, size: int = -1) -> bytes:
        if size == 0:  # ijson probes the stream type with read(0)
            return b""
        while True:
            data = self._raw.read(size if size and size > 0 else self._chunk)
            out = self._decoder.decode(data, final=not data).encode("utf-8")
            if out or not data:
                return out


def _iter_json(uri: str, storage: Optional[StorageConfig], policy: InputPolicy):
    import ijson

    if _utf16(uri, storage):
        raise DataSourceError(uri, "is UTF-16 (it starts with a UTF-16 byte order mark); re-encode it as UTF-8")
    with _storage.open_input_stream(uri, storage) as f:
        events = ijson.basic_parse(_Utf8Repair(f), use_float=True)
        try:
            first = next(events, (None, None))[0]
            if first != "start_array":
                hint = (" (one record per file: a folder of KEY.json + KEY.jpg is an untarred WebDataset; tar "
                        "the pairs into .tar shards, or list the records in one .json file)") if first == "start_map" else ""
                raise DataSourceError(uri, f"top level is {first or 'empty'}, not a list; a .json annotation file "
                                      f"must be a list of records (or write one record per line as .jsonl){hint}")
            index = 0
            for record in _records(events, uri, policy):
                yield index, record
                index += 1
            for _ in events:  # anything after the list is an error ijson raises while draining
                pass
        except (ijson.JSONError, UnicodeDecodeError) as err:
            detail = _locate_json_error(uri, storage) or str(err).splitlines()[0][:200]
            raise DataSourceError(uri, f"not valid JSON ({detail}); fix the file, or write one record per line as "
                                  ".jsonl so a bad line rejects only itself") from None


def _locate_json_error(uri: str, storage: Optional[StorageConfig]) -> Optional[str]:
    """``"<what> at line L column C"`` for a broken .json file (parsed again whole, up to a size cap)."""
    with _storage.open_input_stream(uri, storage) as f:
        data = f.read(_LOCATE_LIMIT + 1)
    if len(data) > _LOCATE_LIMIT:
        return None
    try:
        json.loads(data.decode("utf-8-sig", errors="replace"))
    except json.JSONDecodeError as e:
        return f"{e.msg} at line {e.lineno} column {e.colno}"
    except RecursionError:
        return None
    return None


def _records(events, uri: str, policy: InputPolicy):
    """Records of the top-level list, each built from parser events within the limits."""
    index = 0
    for event, value in events:
        if event == "end_array":
            return
        if event in ("start_map", "start_array"):
            yield _build(event, events, f"{uri} record {index}", policy)
        else:
            yield value  # a scalar record: normalize_record rejects it
        index += 1


def _build(first: str, events, where: str, policy: InputPolicy) -> Union[Any, DataError]:
    """One container from events; past the depth or size limit only consume its events."""
    root: Any = {} if first == "start_map" else []
    stack, key, depth, size, error = [root], None, 1, 2, None
    for event, value in events:
        if event in ("end_map", "end_array"):
            depth -= 1
            if error is None:
                stack.pop()
            if depth == 0:
                return error or root
            continue
        if event == "map_key":
            key, size = value, size + len(value) + 4
            continue
        opens = event in ("start_map", "start_array")
        depth += opens
        if error is not None:
            continue
        node = ({} if event == "start_map" else []) if opens else value
        size += len(value) + 2 if isinstance(value, str) else 8
        if depth > policy.max_json_depth:
            error = _too_deep(where, policy)
        elif size > policy.max_record_bytes:
            error = DataError("record_too_large", f"{where}: larger than data.max_record_bytes="
                              f"{policy.max_record_bytes}; split the record or raise the limit")
        else:
            parent = stack[-1]
            if isinstance(parent, dict):
                parent[key] = node
            else:
                parent.append(node)
            if opens:
                stack.append(node)
    raise DataSourceError(where, "the file ends inside this record; fix the file")


# ------------------------------------------------------------------------------- rows

#: Columns of the rows :func:`iter_rows` yields (and of the JSON training path's dataset).
ROW_COLUMNS = pa.schema([
    ("row", pa.int64()),  # position in the whole dataset: the identity for resume
    ("id", pa.string()),  # the user's id, for reports (may repeat)
    ("messages", pa.string()),  # JSON list of {"role", "content"[, "loss"]}; a pair: {"prompt", "chosen", "rejected"}
    ("image_refs", pa.list_(pa.string())),  # resolved URIs, in placeholder order
    ("video_refs", pa.list_(pa.string())),
    # Embedded bytes (hub Parquet, WebDataset members, data: URIs), aligned with image_refs /
    # video_refs: per item exactly one of ref and bytes is non-empty. Empty lists: all by ref.
    ("images", pa.list_(pa.binary())),
    ("videos", pa.list_(pa.binary())),
    ("tools", pa.string()),  # JSON list, "" when the sample has none
    ("source_file", pa.int32()),  # index into the list of sources
    ("source_index", pa.int64()),  # the record's position in its file
    ("source", pa.int32()),  # which data.train entry (mixture source) the row came from; 0 without a mixture
    ("source_row", pa.int64()),  # the row's position in its source (sources.Unit.offset + index in the unit)
    ("reason", pa.string()),  # "" for a good row
    ("detail", pa.string()),
])


def iter_rows(files: list[str], storage: Optional[StorageConfig] = None,
              policy: Optional[InputPolicy] = None) -> Iterator[dict]:
    """One normalized row per record of ``files`` (in order), rejected ones with ``reason`` set."""
    policy = policy or InputPolicy()
    row = 0
    for file_no, uri in enumerate(files):
        for index, item in iter_records(uri, storage, policy):
            yield to_row(item, row, file_no, index, uri, policy)
            row += 1


def to_row(item: Any, row: int, file_no: int, index: int, uri: str, policy: InputPolicy) -> dict:
    """Normalize one record into a row; any problem becomes the row's ``reason``.

    Embedded media (``{bytes, path}`` structs, raw bytes, base64 ``data:`` URIs) go into
    ``images``/``videos`` aligned with the refs (see :mod:`omni_ray.data.embedded`). Under
    ``policy.pairs`` each record is a preference pair (``omni_ray.data.pairs``) and ``messages``
    holds ``{"prompt": [turns], "chosen": str, "rejected": str}``.
    """
    from omni_ray.data.embedded import lift_media, split_media
    from omni_ray.data.formats import normalize_record
    from omni_ray.data.pairs import normalize_pair

    user_id = item.get("id") if isinstance(item, dict) else None
    out = {"row": row, "id": f"sample-{row}" if user_id in (None, "") else str(user_id), "messages": "[]",
           "image_refs": [], "video_refs": [], "images": [], "videos": [], "tools": "", "source_file": file_no,
           "source_index": index, "source": 0, "source_row": row, "reason": "", "detail": ""}
    try:
        if isinstance(item, DataError):
            raise item
        record, blobs = lift_media(item)
        sample = normalize_pair(record, row) if policy.pairs else normalize_record(record, row)
        where = f"sample {out['id']}"
        images = split_media(sample["image_refs"], blobs, policy.max_image_bytes, where)
        videos = split_media(sample["video_refs"], blobs, policy.max_image_bytes, where)
        text = ({k: sample[k] for k in ("prompt", "chosen", "rejected")} if policy.pairs else sample["messages"])
        out.update(
            messages=json.dumps(text, ensure_ascii=False),
            tools=json.dumps(sample["tools"], ensure_ascii=False) if sample["tools"] else "",
            **_media_columns("image", images, uri, policy), **_media_columns("video", videos, uri, policy),
        )
    except DataError as err:
        out.update(reason=err.reason, detail=err.detail)
    except Exception as err:  # noqa: BLE001 - one record must never stop the run; it is reported
        out.update(reason="processing_error", detail=f"{type(err).__name__}: {err}"[:500])
    return out


def _media_columns(kind: str, items: list[tuple[str, bytes]], uri: str, policy: InputPolicy) -> dict:
    """``{kind}_refs`` (resolved, confined) and ``{kind}s`` (bytes; [] when every item is a ref)."""
    from omni_ray.data.formats import resolve_ref
    from omni_ray.data.images import check_confined

    resolve = {"root": policy.image_root, "allow_absolute": policy.allow_absolute_paths}
    refs = [resolve_ref(ref, uri, **resolve) if ref else "" for ref, _ in items]
    if not policy.allow_absolute_paths:  # a symlink inside the root may still point out of it
        root = policy.image_root or os.path.dirname(uri)
        for ref in refs:
            if ref:
                check_confined(ref, root)
    blobs = [data for _, data in items] if any(data for _, data in items) else []
    return {f"{kind}_refs": refs, f"{kind}s": blobs}
