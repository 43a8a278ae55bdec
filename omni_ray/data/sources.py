"""Data sources: every form of training data a user already has, as units Ray Data can stream.

A *source* is one entry of ``data.train``: a prepared prefix, JSON/JSONL annotation files, hub
Parquet (``datasets``-written, image bytes embedded) or WebDataset tar shards, local or
``s3://``, as one file, a folder/prefix or a glob. A plain list of paths is ONE source read in
order (its files may be of different forms); a list of ``{path, weight}`` / ``{path, samples}``
entries (or ``path#N``) is a *mixture* of sources (``omni_ray.data.mixture``).

A source is split into *units*: pieces read independently by one Ray Data read task each, in
order within the unit (a JSON/JSONL file, a Parquet file, a tar shard, a prepared shard). Every
unit knows its row count once counted (:func:`count_units`), so a row's position in its source
(``source_row`` = the unit's ``offset`` + the row's index in the unit) is the same every run,
with no global counting pass at read time. Training identifies rows by position, never by the
user's id (see ``omni_ray.data.position``).

Every unit yields rows of :data:`omni_ray.data.reader.ROW_COLUMNS` (``images``/``videos`` hold
embedded bytes aligned with ``image_refs``/``video_refs``: per item exactly one of the two is
non-empty), with ``reason`` set for a rejected record: rejected rows flow on and are counted
by reason and by source, never dropped.

Contract (the mixture layer and the pipeline rely on exactly this):

* :func:`resolve_entry` - existence, form and layout checks only (no counting, no Ray): what
  ``omni-ray validate`` runs. Errors are :class:`DataSourceError` naming the path and the fix.
* :func:`count_units` - the same source with every unit's ``rows`` and ``offset`` filled.
* :func:`read_unit` - the rows of one unit, streamed, in a stable order; ``source_row`` set.

How each form is read (one Ray Data read task per unit, ``pipeline.PlanDatasource``; a mixture's
tasks interleave units of every source, ``omni_ray.data.mixture``):

* JSON/JSONL: ``reader.iter_records`` (streaming, limits per record);
* hub Parquet: ``pyarrow.parquet.ParquetFile.iter_batches`` per file, 64 rows a batch, only the
  columns the layout needs (``omni_ray.data.hub``). Not Ray Data's ``read_parquet``: it splits
  files into fragments/row groups in its own order and gives a row no position in its file,
  which ``source_row`` (resume, mixtures) needs; one task per file keeps both;
* WebDataset tars: ``omni_ray.data.tars`` (own streaming reader: see why there);
* prepared shards: the shard's Parquet, rows numbered from the manifest's ``first_row``.

Counting (:func:`count_units`) runs on the driver: Parquet reads each footer, prepared shards
the manifest (free), JSON/JSONL one streaming pass over the text, tars one streaming pass
over the whole shard (from S3 that is a full download of every shard: prepare the data once
with ``omni-ray data prepare`` when that cost matters).
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Optional

from omni_ray import storage as _storage
from omni_ray.config import DATA_FORMS_HELP
from omni_ray.data.errors import DataSourceError
from omni_ray.data.reader import check_file
from omni_ray.storage import StorageConfig

__all__ = ["FORMS", "Source", "Unit", "count_units", "form_of", "iter_source_rows", "read_unit", "resolve_entry"]

#: The forms a unit can take.
FORMS = ("json", "jsonl", "parquet", "webdataset", "prepared")


@dataclass(frozen=True)
class Unit:
    """One independently readable piece of a source: a file, a tar shard or a prepared shard."""

    uri: str
    form: str  # one of FORMS
    rows: Optional[int] = None  # records in the unit (rejected ones included); None until counted
    offset: Optional[int] = None  # position of the unit's first row in its source
    extra: dict = field(default_factory=dict, compare=False, hash=False)  # form-specific (prepared: shard no.)


@dataclass(frozen=True)
class Source:
    """One entry of ``data.train`` (or the whole plain list), resolved to units in reading order."""

    name: str  # the entry as the user wrote it: reports and errors name sources by it
    units: tuple[Unit, ...]
    weight: Optional[float] = None  # mixture: relative sampling ratio
    samples: Optional[int] = None  # mixture: absolute rows per epoch
    columns: Optional[dict] = None  # Parquet/WebDataset: the data.columns mapping for this source

    @property
    def rows(self) -> int:
        """Rows in the source (every unit must be counted)."""
        if any(u.rows is None for u in self.units):
            raise ValueError(f"{self.name}: units not counted yet; call count_units first")
        return sum(u.rows for u in self.units)

    def with_units(self, units) -> "Source":
        return replace(self, units=tuple(units))


_MANIFEST = "manifest.json"
_SUFFIXES = ((".jsonl", "jsonl"), (".json", "json"), (".parquet", "parquet"), (".tar", "webdataset"),
             (".tar.gz", "webdataset"), (".tgz", "webdataset"))
_GLOB = set("*?[")


def form_of(uri: str) -> Optional[str]:
    """The form a file's name says (``.json``, ``.jsonl``, ``.parquet``, ``.tar[.gz]``), else None."""
    lower = uri.lower()
    return next((form for suffix, form in _SUFFIXES if lower.endswith(suffix)), None)


def resolve_entry(entry, storage: Optional[StorageConfig] = None, key: str = "data.train",
                  columns: Optional[dict] = None) -> Source:
    """A :class:`Source` for one ``data.train`` entry (or a plain list of paths), uncounted.

    ``entry`` is a path/URI/glob or a list of them (one source, read in order). ``columns`` is
    the ``data.columns`` mapping (a dict) for Parquet layouts no preset knows. Prepared shards
    come counted (their manifest holds the rows). Hub Parquet's layout is checked on the first
    file's schema (its footer only).
    """
    paths = [entry] if isinstance(entry, str) else list(entry)
    if not paths:
        raise DataSourceError("[]", "an empty list; give at least one path", key)
    name = paths[0] if len(paths) == 1 else ", ".join(paths)
    units = [u for path in paths for u in _units_of(path, storage, key)]
    if any(u.form == "prepared" for u in units) and len(paths) > 1:
        raise DataSourceError(
            name, "a prepared prefix cannot be combined with other paths in one source; prepare them together "
            "(`omni-ray data prepare A B --out PREFIX`) and train from PREFIX", key)
    source = Source(name, tuple(units), columns=dict(columns) if columns else None)
    _check_layouts(source, storage, key)
    return source


def _units_of(path: str, storage: Optional[StorageConfig], key: str) -> list[Unit]:
    form = form_of(path)
    if form is not None and not _GLOB & set(path):
        check_file(path, storage, key)
        return [Unit(path, form)]
    if _GLOB & set(path):
        return _glob(path, storage, key)
    if _storage.exists(_storage.join(path, _MANIFEST), storage):
        return _prepared_units(path, storage, key)
    if not _storage.is_remote(path) and os.path.isfile(path):
        raise DataSourceError(path, f"not a data form omni_ray reads; give {DATA_FORMS_HELP}", key)
    return _folder(path, storage, key)


def _folder(path: str, storage: Optional[StorageConfig], key: str) -> list[Unit]:
    names = _storage.list_files(path, storage)
    top = [n for n in names if "/" not in n]
    if "state.json" in top and any(n.endswith(".arrow") for n in top):
        raise DataSourceError(path, "is a `datasets` save_to_disk folder (Arrow files); write it as Parquet "
                              "(`datasets.load_from_disk(PATH).to_parquet('train.parquet')`) and give that", key)
    if "dataset_info.json" in top:
        raise DataSourceError(path, "holds dataset_info.json, LLaMA-Factory's registry of datasets (not data); "
                              "give the dataset's own file, e.g. " + _storage.join(path, "NAME.json"), key)
    found = [n for n in top if form_of(n)]
    if not found:
        deeper = [n for n in names if form_of(n)]
        hint = (f"; files lie in sub-folders (e.g. {deeper[0]}): give that folder or a glob such as "
                f"{_storage.join(path, '**', '*' + posixpath.splitext(deeper[0])[1])}") if deeper else ""
        raise DataSourceError(path, "no such file, and no data files (.json/.jsonl/.parquet/.tar) or manifest.json "
                              f"directly under it{hint}; check the path (relative paths are relative to the "
                              "current directory)", key)
    return [Unit(_storage.join(path, n), form_of(n)) for n in found]


def _glob(pattern: str, storage: Optional[StorageConfig], key: str) -> list[Unit]:
    parts = pattern.split("/")
    fixed = next(i for i, p in enumerate(parts) if _GLOB & set(p))
    base = "/".join(parts[:fixed]) or "."
    rest = "/".join(parts[fixed:])
    matched = [n for n in _storage.list_files(base, storage)
               if form_of(n) and (fnmatch.fnmatchcase(n, rest) or (rest.startswith("**/")
                                                                   and fnmatch.fnmatchcase(n, rest[3:])))]
    if not matched:
        raise DataSourceError(pattern, f"the pattern matches no data file; give {DATA_FORMS_HELP}", key)
    return [Unit(_storage.join(base, n) if base != "." else n, form_of(n)) for n in matched]


def _prepared_units(prefix: str, storage: Optional[StorageConfig], key: str) -> list[Unit]:
    from omni_ray.data.shards import read_manifest, shard_uris

    try:
        manifest = read_manifest(prefix, storage)
    except ValueError as err:
        raise DataSourceError(prefix, str(err), key) from None
    if not manifest["shards"]:
        counts = manifest["counts"]
        raise DataSourceError(prefix, f"nothing to train: data prepare accepted none of its {counts['total']} "
                              f"samples (rejected by reason: {counts['by_reason']}); see "
                              f"{_storage.join(prefix, 'rejects.jsonl')}", key)
    return [Unit(uri, "prepared", rows=int(s["rows"]), offset=int(s["first_row"]), extra={"shard": int(s["shard"])})
            for uri, s in zip(shard_uris(prefix, manifest), manifest["shards"])]


def _check_layouts(source: Source, storage: Optional[StorageConfig], key: str) -> None:
    """Hub Parquet: the first file's schema must map to a layout (see omni_ray.data.hub)."""
    first = next((u for u in source.units if u.form == "parquet"), None)
    if first is None:
        return
    from omni_ray.data.hub import layout_of

    try:
        layout_of(_parquet_file(first.uri, storage).schema_arrow, source.columns)
    except ValueError as err:
        raise DataSourceError(first.uri, str(err), key) from None


def _parquet_file(uri: str, storage: Optional[StorageConfig]):
    import pyarrow.parquet as pq

    fs, path = _storage.resolve(uri, storage)
    try:
        return pq.ParquetFile(fs.open_input_file(path))
    except (OSError, ValueError) as err:  # pyarrow.ArrowInvalid is a ValueError
        raise DataSourceError(uri, f"is not a readable Parquet file ({str(err)[:200]})") from None


# ------------------------------------------------------------------------------ counting


def count_units(source: Source, storage: Optional[StorageConfig] = None, policy=None) -> Source:
    """``source`` with every unit's ``rows`` and ``offset`` set."""
    from omni_ray.data.reader import InputPolicy

    policy = policy or InputPolicy()
    units, offset = [], 0
    for unit in source.units:
        rows = unit.rows if unit.rows is not None else _count(unit, storage, policy)
        units.append(replace(unit, rows=rows, offset=offset))
        offset += rows
    return source.with_units(units)


def _count(unit: Unit, storage: Optional[StorageConfig], policy) -> int:
    if unit.form == "parquet":
        return int(_parquet_file(unit.uri, storage).metadata.num_rows)
    if unit.form == "webdataset":
        from omni_ray.data.tars import count_samples

        return count_samples(unit.uri, storage, max_image_bytes=policy.max_image_bytes,
                             max_record_bytes=policy.max_record_bytes)
    from omni_ray.data.reader import iter_records

    return sum(1 for _ in iter_records(unit.uri, storage, policy))


# ------------------------------------------------------------------------------- reading


def read_unit(unit: Unit, source: Source, storage: Optional[StorageConfig] = None, policy=None) -> Iterator[dict]:
    """The rows of ``unit`` in order (ROW_COLUMNS; ``source_row`` = ``unit.offset`` + index).

    ``row`` equals ``source_row`` (a single source); ``source`` is 0 and ``source_file`` the
    unit's index in ``source.units``: the mixture layer sets its own.
    """
    from omni_ray.data.reader import InputPolicy, to_row

    if unit.offset is None:
        raise ValueError(f"{unit.uri}: unit not counted yet; call count_units first")
    policy = policy or InputPolicy()
    file_no = source.units.index(unit)
    if unit.form == "prepared":
        yield from _prepared_rows(unit, file_no, storage)
        return
    for index, item in _records(unit, source, storage, policy):
        yield to_row(item, unit.offset + index, file_no, index, unit.uri, policy)


def first_records(source: Source, storage: Optional[StorageConfig] = None, n: int = 16) -> list:
    """The first ``n`` raw records of ``source``'s first unit (what ``omni-ray validate`` tells the objective
    from); none for prepared shards, which hold processed conversations."""
    from omni_ray.data.reader import InputPolicy

    units = [u for u in source.units if u.form != "prepared"][:1]
    records = (record for unit in units for _, record in _records(unit, source, storage, InputPolicy()))
    return [record for _, record in zip(range(n), records)]


def _records(unit: Unit, source: Source, storage: Optional[StorageConfig], policy):
    """``(index, record | DataError)`` of one JSON/JSONL, Parquet or tar unit."""
    if unit.form == "parquet":
        yield from _parquet_records(unit.uri, source.columns, storage)
    elif unit.form == "webdataset":
        from omni_ray.data.tars import iter_samples

        yield from iter_samples(unit.uri, storage, max_image_bytes=policy.max_image_bytes,
                                max_record_bytes=policy.max_record_bytes)
    else:
        from omni_ray.data.reader import iter_records

        yield from iter_records(unit.uri, storage, policy)


def _parquet_records(uri: str, columns: Optional[dict], storage: Optional[StorageConfig], batch_rows: int = 64):
    from omni_ray.data.errors import DataError
    from omni_ray.data.hub import layout_of, to_record

    pf = _parquet_file(uri, storage)
    try:
        layout = layout_of(pf.schema_arrow, columns)
    except ValueError as err:
        raise DataSourceError(uri, str(err)) from None
    index = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=list(layout.columns)):
        for row in batch.to_pylist():
            try:
                yield index, to_record(row, layout)
            except DataError as err:
                yield index, err
            index += 1


def _prepared_rows(unit: Unit, file_no: int, storage: Optional[StorageConfig]) -> Iterator[dict]:
    import pyarrow.parquet as pq

    fs, path = _storage.resolve(unit.uri, storage)
    pf = pq.ParquetFile(fs.open_input_file(path))
    cols = ["id", "messages", "images", "video_refs", "tools", "source_index", "shard_row"]
    for batch in pf.iter_batches(batch_size=64, columns=cols):
        for r in batch.to_pylist():
            row = unit.offset + int(r["shard_row"])
            yield {"row": row, "id": r["id"], "messages": r["messages"], "image_refs": [""] * len(r["images"]),
                   "video_refs": r["video_refs"], "images": r["images"], "videos": [], "tools": r["tools"],
                   "source_file": file_no, "source_index": r["source_index"], "source": 0, "source_row": row,
                   "reason": "", "detail": ""}


def iter_source_rows(source: Source, storage: Optional[StorageConfig] = None, policy=None) -> Iterator[dict]:
    """Every row of ``source`` in order, on this process (prepare, eval): units counted on the way."""
    offset = 0
    for unit in source.units:
        counted = replace(unit, offset=offset if unit.form != "prepared" else unit.offset)
        source = source.with_units([counted if u == unit else u for u in source.units])
        n = 0
        for row in read_unit(counted, source, storage, policy):
            n += 1
            yield row
        offset = counted.offset + n
