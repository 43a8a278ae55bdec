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
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Optional

from omni_ray.storage import StorageConfig

__all__ = ["FORMS", "Source", "Unit", "count_units", "read_unit", "resolve_entry"]

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


def resolve_entry(entry, storage: Optional[StorageConfig] = None, key: str = "data.train") -> Source:
    """A :class:`Source` for one ``data.train`` entry (or a plain list of paths), uncounted."""
    raise NotImplementedError


def count_units(source: Source, storage: Optional[StorageConfig] = None, policy=None) -> Source:
    """``source`` with every unit's ``rows`` and ``offset`` set."""
    raise NotImplementedError


def read_unit(unit: Unit, source: Source, storage: Optional[StorageConfig] = None, policy=None) -> Iterator[dict]:
    """The rows of ``unit`` in order (ROW_COLUMNS; ``source_row`` = ``unit.offset`` + index)."""
    raise NotImplementedError
