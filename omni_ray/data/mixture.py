"""Weighted mixtures: which rows of each source one epoch trains, at which position, in what order.

``data.train`` as a list of source entries (``{path, weight}``, ``{path, samples}``, ``path#N``)
is a *mixture*. Per epoch, source ``s`` (``n_s`` rows, counted by ``sources.count_units``)
contributes ``c_s`` rows:

* ``samples: N`` (or ``path#N``): ``c_s = N``, whatever the other sources are;
* ``weight: w``: the weighted sources share the rows they hold together, ``T = sum n_s`` over
  them, in proportion to weight: ``c_s = T * w_s / sum w`` (rounded by largest remainder, so the
  shares add up to ``T`` exactly). ``weight`` is a relative sampling ratio, not a repeat count:
  two sources of 1,000 and 9,000 rows with weights 1 and 1 give 5,000 rows each (the small
  one is repeated, the large one subsampled); weights proportional to the sizes keep each
  source as it is. A plain string item beside entries is ``weight: 1``; an entry with neither
  key too.

``c_s <= n_s`` trains a seeded subset of exactly ``c_s`` rows; ``c_s > n_s`` trains every row
``c_s // n_s`` times plus a seeded subset of ``c_s % n_s`` rows once more. A subset is the rows
whose image under a seeded bijection of ``[0, n_s)`` (:class:`Permutation`, a Feistel network
with cycle walking) falls below its size: exact, O(1) memory, so a 100M-row source costs
nothing. The seed is ``train.seed`` (and the source's index). The subset is the same every
epoch: the dataset is built once per run and re-read per epoch.

Positions (the ``row`` column the data position records, ``omni_ray.data.position``): copy ``k``
of source row ``r`` of source ``s`` is ``base[s] + k * n_s + r``, where ``base[s]`` leaves each
earlier source ``ceil(c / n)`` copies of room. Positions are unique and the same on every run
and world size; without a mixture (one source) the position is the source row, as before.
A planned row also carries ``row_from``: the position right after the previous planned row of
its read (the rows a subset leaves out between them), so the loop records consumed positions as
few ranges even for a subset (see ``train.batches``); no other planned row lies in that range.

Order: a read is one (unit, copy); each source's reads stay in order (copy by copy, unit by
unit). Read tasks are *lanes* (:meth:`Plan.lanes`): each holds a stretch of every source's reads
and interleaves their rows one by one by a seeded draw proportional to the rows each has left
(:func:`merge`), so a mixture is mixed in the stream even when each source is one file; lanes
run in parallel and arrive in order; each training worker's shuffle buffer mixes further.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Optional

import numpy as np

from omni_ray.config import ConfigError

__all__ = ["Item", "Permutation", "Plan", "Subset", "check_sources", "item_rows", "make_plan", "merge",
           "plan_data", "plan_rows", "planned_counts"]

_M64 = (1 << 64) - 1


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer over uint64 arrays (wrapping arithmetic)."""
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class Permutation:
    """A seeded bijection of ``[0, n)``: a balanced Feistel network on the smallest even number of
    bits covering ``n``, walking the cycle until the image falls inside ``[0, n)`` (fewer than 4
    rounds of the network on average, since the bit domain is under ``4 n``).

    >>> p = Permutation(10, seed=3); sorted(p(np.arange(10)).tolist()) == list(range(10))
    True
    """

    ROUNDS = 6

    def __init__(self, n: int, seed: int):
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        keys = _mix64(np.asarray([(seed * 0x9E3779B97F4A7C15 + r + 1) & _M64 for r in range(self.ROUNDS)],
                                 dtype=np.uint64))
        self.keys = [np.uint64(k) for k in keys]

    def _rounds(self, x: np.ndarray) -> np.ndarray:
        half = np.uint64(self.half)
        left, right = x >> half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix64(right ^ key) & self.mask)
        return (left << half) | right

    def __call__(self, rows) -> np.ndarray:
        x = np.asarray(rows, dtype=np.uint64)
        if self.n <= 1:
            return x.astype(np.int64)
        y = self._rounds(x)
        out = y >= np.uint64(self.n)
        while out.any():  # cycle walking: the image of a value in [0, n) comes back into [0, n)
            y[out] = self._rounds(y[out])
            out = y >= np.uint64(self.n)
        return y.astype(np.int64)


def planned_counts(sizes: Sequence[int], weights: Sequence[Optional[float]],
                   samples: Sequence[Optional[int]]) -> list[int]:
    """Rows per epoch of each source (see the module docstring): ``samples`` where given, else the
    weighted sources' total shared by weight, by largest remainder (ties to the earlier source)."""
    counts = [int(s) if s is not None else 0 for s in samples]
    weighted = [i for i, s in enumerate(samples) if s is None]
    if not weighted:
        return counts
    total = sum(int(sizes[i]) for i in weighted)
    wsum = sum(Fraction(weights[i] if weights[i] is not None else 1) for i in weighted)
    exact = {i: total * Fraction(weights[i] if weights[i] is not None else 1) / wsum for i in weighted}
    for i in weighted:
        counts[i] = math.floor(exact[i])
    left = total - sum(counts[i] for i in weighted)
    for i in sorted(weighted, key=lambda i: (-(exact[i] - counts[i]), i))[:left]:
        counts[i] += 1
    return counts


@dataclass(frozen=True)
class Subset:
    """The rows of a source whose permuted index falls below ``size``: small enough to ship to a read task."""

    n: int
    size: int
    seed: int

    def __call__(self, source_rows) -> np.ndarray:
        return Permutation(self.n, self.seed)(source_rows) < self.size


@dataclass(frozen=True)
class Item:
    """One read: a unit of a source, as copy ``copy`` (all its rows, or only the subset's)."""

    source: int
    unit: int
    copy: int
    first: int  # position of source row 0 in this copy: base[source] + copy * n_source
    partial: bool  # the remainder copy: only rows whose permuted index < the source's remainder


@dataclass(frozen=True)
class Plan:
    """An epoch over counted sources: rows per source, positions, the subsets and the read order."""

    sources: tuple  # sources.Source, every unit counted, in data.train order
    counts: tuple[int, ...]  # planned rows per epoch, per source
    seed: int
    mixture: bool  # False: one source read as it is (row = source row)

    @property
    def rows(self) -> int:
        """Rows per epoch: what the schedule counts (``num_rows``)."""
        return sum(self.counts)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    def census(self) -> "Plan":
        """Every row of every source once (``data check``: counts and rejects per source)."""
        return Plan(self.sources, tuple(s.rows for s in self.sources), self.seed, self.mixture)

    def size(self, s: int) -> int:
        return self.sources[s].rows

    def bases(self) -> list[int]:
        """Position of each source's first row: earlier sources keep room for all their copies."""
        out, at = [], 0
        for s, planned in enumerate(self.counts):
            out.append(at)
            at += -(-planned // max(self.size(s), 1)) * self.size(s)
        return out

    def subset(self, s: int) -> "Subset":
        """Source ``s``'s remainder subset (``counts % rows`` of its rows)."""
        n = self.size(s)
        return Subset(n, self.counts[s] % max(n, 1), (self.seed * 1_000_003 + s) & _M64)

    def in_subset(self, s: int, source_rows) -> np.ndarray:
        """Whether each source row is in source ``s``'s remainder subset."""
        return self.subset(s)(source_rows)

    def reads(self, s: int) -> list[tuple[Item, float]]:
        """Source ``s``'s reads in order, each with the rows it is expected to give."""
        n, planned, base = self.size(s), self.counts[s], self.bases()[s]
        copies, remainder = divmod(planned, n) if n else (0, 0)
        out = []
        for copy in range(copies + (remainder > 0)):
            partial = copy == copies
            for u, unit in enumerate(self.sources[s].units):
                if unit.rows:
                    out.append((Item(s, u, copy, base + copy * n, partial),
                                unit.rows * (remainder / n if partial else 1.0)))
        return out

    def lanes(self) -> list[list[list[tuple[Item, float]]]]:
        """The epoch's read tasks, in stream order: lane -> per source -> its reads in order.

        Each source's reads are cut into as many contiguous stretches as the source with the
        fewest reads has (at least one), and lane ``j`` gets stretch ``j`` of every source, so every
        lane holds every source and :func:`merge` mixes them row by row; lanes run in parallel.
        One source: one lane per unit, as before.
        """
        reads = [self.reads(s) for s in range(len(self.sources))]
        k = max(1, min((len(r) for r in reads if r), default=1))
        return [[r[j * len(r) // k:(j + 1) * len(r) // k] for r in reads] for j in range(k)]


def merge(lane: Sequence[Sequence[tuple[Any, float]]], read, seed: int, lane_no: int) -> Iterator[dict]:
    """One lane's rows: each source's reads in order (``read(what)`` streams one: ``what`` is the
    first of each ``(what, expected rows)`` pair, e.g. an :class:`Item`), the sources
    interleaved row by row by a seeded draw proportional to the rows each has left, so every
    stretch of the stream holds the sources in about their shares."""
    rng = random.Random(f"omni_ray-mixture:{seed}:{lane_no}")  # str seeds hash the same on every run
    streams = {s: itertools.chain.from_iterable(read(item) for item, _ in reads)
               for s, reads in enumerate(lane) if reads}
    left = {s: sum(rows for _, rows in lane[s]) for s in streams}
    while streams:
        open_ = sorted(streams)
        weights = [max(left[s], 0.5) for s in open_]  # estimates for subsets: a stream may outlast its own
        s = open_[-1]
        pick, acc = rng.random() * sum(weights), 0.0
        for candidate, weight in zip(open_, weights):
            acc += weight
            if pick < acc:
                s = candidate
                break
        row = next(streams[s], None)
        if row is None:
            del streams[s]
            continue
        left[s] -= 1
        yield row


def make_plan(sources: Sequence, seed: int, mixture: bool) -> Plan:
    """The plan over counted sources (``Source.weight`` / ``Source.samples`` as the user gave them).

    A source with no rows cannot be drawn from: a ConfigError naming it.
    """
    sources = tuple(sources)
    for i, src in enumerate(sources):
        if mixture and src.rows == 0:
            raise ConfigError(f"data.train[{i}] ({src.name}): has no records, so nothing can be drawn from it; "
                              "fix the path or remove the entry")
    if not mixture:
        return Plan(sources, tuple(s.rows for s in sources), seed, False)
    counts = planned_counts([s.rows for s in sources], [s.weight for s in sources], [s.samples for s in sources])
    return Plan(sources, tuple(counts), seed, True)


def plan_rows(plan: Plan, item: Item, rows: Iterable[dict], block: int = 256) -> Iterator[dict]:
    """The rows of one read as the plan wants them (see :func:`item_rows`)."""
    unit = plan.sources[item.source].units[item.unit]
    return item_rows(item, unit.offset, plan.subset(item.source) if item.partial else None, rows, block)


def item_rows(item: Item, unit_offset: int, subset: Optional[Subset], rows: Iterable[dict],
              block: int = 256) -> Iterator[dict]:
    """The rows of one read: a partial copy keeps its ``subset`` only; each kept row gets its
    position (``row``), ``row_from`` and ``source`` (the entry's index). What a read task runs."""
    cover = item.first + unit_offset  # the next position no planned row of this read has covered yet
    buffer: list[dict] = []

    def flush():
        nonlocal cover
        keep = subset([r["source_row"] for r in buffer]) if subset is not None else np.ones(len(buffer), dtype=bool)
        for row, kept in zip(buffer, keep):
            if kept:
                position = item.first + int(row["source_row"])
                yield {**row, "row": position, "row_from": cover, "source": item.source}
                cover = position + 1
        buffer.clear()

    for row in rows:
        buffer.append(row)
        if len(buffer) >= block:
            yield from flush()
    yield from flush()


# ------------------------------------------------------------------ from data.train to a plan


def _resolved(data, storage) -> list:
    """``data.train``'s sources resolved (uncounted), each with the name, weight and samples of its entry."""
    from dataclasses import replace

    from omni_ray.data.sources import resolve_entry

    mixture, out = data.is_mixture(), []
    for i, entry in enumerate(data.entries()):
        columns = entry.columns if entry.columns is not None else data.columns  # per source, else data.columns
        columns = columns.model_dump() if columns is not None else None
        source = resolve_entry(entry.path, storage, f"data.train[{i}]" if mixture else "data.train", columns=columns)
        out.append(replace(source, name=entry.label(), weight=entry.weight, samples=entry.samples) if mixture
                   else source)
    return out


def check_sources(data, storage=None) -> list:
    """What ``omni-ray validate`` checks of ``data.train``: every source exists and is in a known form
    (each mixture entry named by its index on error). Returns the sources, uncounted."""
    return _resolved(data, storage)


def plan_data(data, storage=None, seed: int = 0) -> Plan:
    """``data.train`` (a DataConfig) resolved, counted (one streaming pass over annotation files;
    prepared shards and Parquet footers are counted from metadata) and planned with ``seed``."""
    from omni_ray.data.reader import InputPolicy
    from omni_ray.data.sources import count_units

    policy = InputPolicy.from_data(data)
    sources = [count_units(s, storage, policy) for s in _resolved(data, storage)]
    return make_plan(sources, seed, data.is_mixture())
