"""WebDataset tar shards, streamed: ``KEY.json`` + ``KEY.jpg|jpeg|png|webp`` (several images as
``KEY.0.jpg``, ``KEY.1.jpg``, ...), plain or gzipped (``.tar.gz``/``.tgz``), local or ``s3://``.

The JSON of a sample is in any record form :func:`~omni_ray.data.formats.normalize_record`
accepts. Its images are the key's image members, in order (``KEY.jpg`` first, then ``KEY.N.ext``
by N): when the JSON names them (``"image": "KEY.jpg"``, by member or file name) the names are
replaced by the bytes; when it has no ``image``/``images`` key they become its ``images``, and
without placeholders they go before the first user turn (MiniCPM-V's binding).

Why our own reader and not Ray Data's ``read_webdataset``: it gives a row no position in its
shard (``source_row``, which resume and mixtures need), it decodes images itself (its default
decoder turns a PNG into an array that Ray then fails to cast: ``ValueError: Tried to cast column
png to the TensorArray tensor extension type``, seen with ray 2.60), and nothing in it turns a cut
or damaged shard into a counted reject: an error fails the read task, and ``tarfile`` itself
stops silently at a damaged header or at a cut between members, losing the rest uncounted.
Here the shard is read with ``tarfile`` in stream mode (``r|*``: forward only, over the storage
input stream, one member in memory at a time) and everything that can go wrong becomes a
counted reject row:

* a shard cut short (a partial upload, a killed writer) or a gzip stream that ends early ->
  one ``truncated_shard`` row (for the sample being read, or the lost tail);
* a damaged header or garbage after the last good member (tarfile stops there silently; we
  look at the block where it stopped: zeros are the end marker, nothing is a cut) -> one
  ``corrupt_member`` row (a cut between members: ``truncated_shard``);
* a key without ``.json`` -> ``missing_field``; a JSON member that does not parse ->
  ``malformed_conversation``; an image member over ``data.max_image_bytes`` -> ``image_too_large``
  (not read); a corrupt image -> ``corrupt_image`` when it is decoded, like any file.

Counting a shard (:func:`count_samples`) runs the same iterator without parsing JSON: one streaming
pass that downloads the whole shard from S3 once (tar has no index; the member data must be
read to reach the next header). Count and read therefore agree exactly, damaged shards included.
"""

from __future__ import annotations

import json
import re
import tarfile
import zlib
from collections.abc import Iterator
from typing import Any, Optional, Union

from omni_ray import storage as _storage
from omni_ray.data.errors import DataError
from omni_ray.storage import StorageConfig

__all__ = ["IMAGE_EXTENSIONS", "TAR_SUFFIXES", "count_samples", "iter_samples"]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_KEY = re.compile(r"^((?:.*/)?[^./]+)\.([^/]*)$")  # webdataset's split: key up to the first dot of the name
_TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)


class _Group:
    """The members of one key, as read."""

    def __init__(self, key: str):
        self.key, self.members, self.error = key, {}, None  # members: ext -> bytes | DataError

    def record(self, max_record_bytes: int) -> Union[dict, DataError]:
        if self.error is not None:
            return self.error
        raw = self.members.get("json")
        if raw is None:
            return DataError("missing_field", f"{self.key}: no {self.key}.json member in the shard; every "
                             "sample needs its record as KEY.json")
        if isinstance(raw, DataError):
            return raw
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            return DataError("malformed_conversation", f"{self.key}.json: not valid UTF-8 JSON ({err})"[:300])
        if not isinstance(record, dict):
            return DataError("malformed_conversation", f"{self.key}.json is a {type(record).__name__}, not a record")
        if record.get("id") in (None, ""):
            record["id"] = self.key  # reports name the sample by its key in the shard
        return _attach(record, self.key, self._images())

    def _images(self) -> list[tuple[str, Any]]:
        def order(ext: str):
            head = ext.split(".")[0]
            return (-1, "") if "." not in ext else ((int(head), "") if head.isdigit() else (1 << 30, head))

        exts = [e for e in self.members if e.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS]
        return [(e, self.members[e]) for e in sorted(exts, key=order)]


def _attach(record: dict, key: str, images: list[tuple[str, Any]]) -> Union[dict, DataError]:
    for ext, data in images:
        if isinstance(data, DataError):
            return data
    if not images:
        return record
    base = key.rsplit("/", 1)[-1]
    by_name = {}
    for ext, data in images:
        by_name[f"{key}.{ext}"] = by_name[f"{base}.{ext}"] = by_name[ext] = {"bytes": data, "path": f"{key}.{ext}"}
    present = [k for k in ("image", "images") if record.get(k) not in (None, "", [], {})]
    if not present:
        return {**record, "images": [cell for _, cell in ((e, by_name[e]) for e, _ in images)]}

    def swap(value):
        return by_name.get(value, value) if isinstance(value, str) else value

    value = record[present[0]]
    if isinstance(value, list):
        value = [swap(v) for v in value]
    elif isinstance(value, dict) and not {"bytes", "path"} >= set(value):
        value = {k: swap(v) for k, v in value.items()}
    else:
        value = swap(value)
    return {**record, present[0]: value}


def _members(uri: str, storage: Optional[StorageConfig], max_image_bytes: int, max_record_bytes: int) -> Iterator[tuple[str, str, Any]]:
    """``(key, ext, bytes | DataError | None)`` per member, then ``("", "", DataError)`` if the shard is damaged."""
    last_name = "the start"
    try:
        with _storage.open_input_stream(uri, storage) as raw, tarfile.open(fileobj=raw, mode="r|*") as tf:
            last = _record_reads(tf)
            for member in tf:
                if not member.isfile():
                    continue
                last_name = member.name
                match = _KEY.match(member.name)
                if match is None:
                    continue  # no extension: not part of any sample (webdataset skips these too)
                key, ext = match.group(1), match.group(2).lower()
                cap = max_record_bytes if ext == "json" else max_image_bytes
                if member.size > cap:
                    yield key, ext, _too_large(member.name, ext, cap)
                    continue
                # Read even when only counting: the stream must pass the data anyway, and a
                # short member must fail the same way in both passes.
                data = tf.extractfile(member).read()
                if len(data) < member.size:
                    raise EOFError("unexpected end of data")
                yield key, ext, data
            end = last["data"]  # the block tarfile read where it stopped (it stops silently on a bad one)
    except _TAR_ERRORS as err:
        yield "", "", DataError("truncated_shard", f"{uri}: the shard ends or breaks inside or after {last_name} "
                                f"({type(err).__name__}: {str(err)[:120]}); the rest of it is lost: re-upload it")
        return
    if end is None or len(end) < tarfile.BLOCKSIZE:  # no end-of-archive blocks: cut short at a member boundary
        yield "", "", DataError("truncated_shard", f"{uri}: the shard ends after {last_name} without the tar end "
                                "marker; the rest of it is lost: re-upload it")
    elif end.strip(b"\0"):
        yield "", "", DataError("corrupt_member", f"{uri}: a damaged tar header after {last_name}; the members after "
                                "it cannot be read: rewrite the shard")


def _too_large(name: str, ext: str, cap: int) -> DataError:
    if ext == "json":
        return DataError("record_too_large", f"{name}: larger than data.max_record_bytes={cap}")
    return DataError("image_too_large", f"{name} is larger than data.max_image_bytes={cap}; downscale it or "
                     "raise the limit")


def _record_reads(tf: tarfile.TarFile) -> dict:
    """Keep the last block tarfile reads: where iteration ends, it tells a clean end (zeros), a cut
    (short or nothing) and a damaged header (anything else) apart."""
    last: dict = {"data": None}
    read = tf.fileobj.read

    def recording(size=None):
        last["data"] = read(size)
        return last["data"]

    tf.fileobj.read = recording
    return last


def _groups(uri: str, storage: Optional[StorageConfig], max_image_bytes: int,
            max_record_bytes: int) -> Iterator[_Group]:
    group: Optional[_Group] = None
    for key, ext, data in _members(uri, storage, max_image_bytes, max_record_bytes):
        if not key:  # the shard is damaged: the sample being read (or the lost tail) is one reject
            if group is None:
                group = _Group("(tail)")
            group.error = data
            yield group
            return
        if group is not None and key != group.key:
            yield group
            group = None
        group = group or _Group(key)
        if ext in group.members:
            group.error = DataError("corrupt_member", f"{uri}: {key}.{ext} appears twice; keys must be unique")
        group.members[ext] = data
    if group is not None:
        yield group


def iter_samples(uri: str, storage: Optional[StorageConfig] = None, *, max_image_bytes: int = 64 << 20,
                 max_record_bytes: int = 16 << 20) -> Iterator[tuple[int, Union[dict, DataError]]]:
    """``(index, record | DataError)`` per sample of one shard, streamed (records carry image bytes)."""
    for index, group in enumerate(_groups(uri, storage, max_image_bytes, max_record_bytes)):
        yield index, group.record(max_record_bytes)


def count_samples(uri: str, storage: Optional[StorageConfig] = None, *, max_image_bytes: int = 64 << 20,
                  max_record_bytes: int = 16 << 20) -> int:
    """Samples :func:`iter_samples` yields for this shard (one streaming pass, images not kept)."""
    return sum(1 for _ in _groups(uri, storage, max_image_bytes, max_record_bytes))
