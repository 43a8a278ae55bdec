"""Data position (consumed rows as ranges) and repeated-id counting."""

from __future__ import annotations

import random

import numpy as np
import pytest

from omni_ray.data.identity import DuplicateIds
from omni_ray.data.position import PositionSet


def test_matches_a_plain_set_under_random_adds():
    rng = random.Random(0)
    ours, plain = PositionSet(), set()
    for _ in range(3000):
        if rng.random() < 0.3:
            start = rng.randrange(2000)
            stop = start + rng.randrange(20)
            ours.add_range(start, stop)
            plain.update(range(start, stop))
        else:
            row = rng.randrange(2000)
            ours.add(row)
            plain.add(row)
    assert len(ours) == len(plain)
    assert all((r in ours) == (r in plain) for r in range(-1, 2100))
    ranges = ours.ranges()
    assert all(a < b for a, b in ranges)
    assert all(b1 < a2 for (_, b1), (a2, _) in zip(ranges, ranges[1:])), "disjoint and not touching"
    assert PositionSet.from_json(ours.to_json()) == ours


def test_ten_thousand_rows_in_random_order_stay_under_64_kib():
    order = list(range(10_000))
    random.Random(1).shuffle(order)
    consumed, largest = PositionSet(), 0
    for k, row in enumerate(order, start=1):
        consumed.add(row)
        if k % 250 == 0:
            largest = max(largest, len(consumed.to_json()))
    assert len(consumed) == 10_000 and consumed.ranges() == [(0, 10_000)]
    assert largest < 64 * 1024, largest
    worst = PositionSet()
    worst.add_many(range(0, 10_000, 2))  # every other row: the most ranges possible
    assert len(worst.to_json()) < 64 * 1024


def test_ten_million_rows_mostly_in_order_are_tiny():
    """8 ranks stream their blocks in order through a 256-row shuffle buffer, stopped mid-epoch."""
    rng = np.random.default_rng(0)
    consumed, block, ranks = PositionSet(), 4096, 8
    blocks = np.arange(10_000_000 // block)
    for rank in range(ranks):
        mine = blocks[rank::ranks]
        done = int(len(mine) * (0.9 + 0.01 * rank))  # ranks run at slightly different speeds
        for b in mine[:done]:
            consumed.add_range(b * block, (b + 1) * block)
        frontier = mine[done] * block  # the shuffle buffer: some of the next 256 rows already trained
        consumed.add_many(frontier + rng.choice(256, size=200, replace=False))
    text = consumed.to_json()
    assert len(text) < 16 * 1024, len(text)
    assert PositionSet.from_json(text) == consumed
    assert 9_000_000 < len(consumed) < 10_000_000


def test_from_json_rejects_damage():
    for bad in ['{"format": 2, "deltas": []}', '{"deltas": [1]}', '[1, 2]', '{"format": 1, "deltas": [-1, 2]}']:
        with pytest.raises(ValueError, match="PositionSet"):
            PositionSet.from_json(bad)
    with pytest.raises(ValueError, match="bad range"):
        PositionSet().add_range(5, 3)


def test_duplicate_ids_are_counted_with_examples():
    dup = DuplicateIds(max_examples=2, chunk=4)  # tiny chunks: repeats found across chunk merges too
    ids = ["0", "1", "2", "0", "3", "1", "4", "5", "6", "0"]
    for row, sample_id in enumerate(ids):
        dup.add(sample_id, row)
    report = dup.report()
    assert report["count"] == 3
    assert report["examples"] == [{"id": "0", "rows": [0, 3]}, {"id": "1", "rows": [1, 5]}]
    clean = DuplicateIds()
    for row in range(1000):
        clean.add(f"id-{row}", row)
    assert clean.report() == {"count": 0, "examples": []}
