"""The mixture plan (pure): counts per source, seeded subsets, unique positions, repeats, mixed order."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from omni_ray.config import ConfigError
from omni_ray.data.mixture import Permutation, make_plan, merge, plan_rows, planned_counts
from omni_ray.data.sources import Source, Unit


def source(name: str, unit_rows: list[int], weight=None, samples=None) -> Source:
    units, offset = [], 0
    for i, rows in enumerate(unit_rows):
        units.append(Unit(f"{name}/{i}.jsonl", "jsonl", rows=rows, offset=offset))
        offset += rows
    return Source(name, tuple(units), weight=weight, samples=samples)


def read_all(plan) -> list[dict]:
    """Every planned row of the epoch, in stream order (fake unit reads: one dict per source row)."""
    def read(item):
        unit = plan.sources[item.source].units[item.unit]
        rows = ({"source_row": unit.offset + i, "id": f"{item.source}:{unit.offset + i}"} for i in range(unit.rows))
        return plan_rows(plan, item, rows, block=7)

    return [row for j, lane in enumerate(plan.lanes()) for row in merge(lane, read, plan.seed, j)]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 1000, 4097])
def test_permutation_is_a_bijection(n):
    for seed in (0, 1, 12345):
        assert sorted(Permutation(n, seed)(np.arange(n)).tolist()) == list(range(n))


def test_permutation_depends_on_the_seed_and_handles_huge_domains():
    a, b = Permutation(1000, 0)(np.arange(1000)), Permutation(1000, 1)(np.arange(1000))
    assert (a != b).sum() > 900
    big = Permutation(100_000_000, 7)(np.arange(0, 100_000_000, 1_000_003))
    assert big.max() < 100_000_000 and len(set(big.tolist())) == len(big)


def test_planned_counts_follow_weights_and_samples_exactly():
    # Weighted sources share their total (1000 + 9000) by weight; samples are absolute.
    assert planned_counts([1000, 9000], [1, 1], [None, None]) == [5000, 5000]
    assert planned_counts([1000, 9000], [1, 9], [None, None]) == [1000, 9000]
    assert planned_counts([10, 10, 10], [1, 1, 1], [None, None, None]) == [10, 10, 10]
    assert planned_counts([10, 0, 10], [2.0, None, 1], [None, 7, None]) == [13, 7, 7]  # 20 * 2/3, 20 * 1/3
    assert planned_counts([5, 5], [None, None], [3, 12]) == [3, 12]
    counts = planned_counts([7, 3, 1], [1, 1, 1], [None, None, None])
    assert sum(counts) == 11 and counts == [4, 4, 3]  # largest remainder, ties to the earlier source


def test_subsample_is_exact_deterministic_and_differs_by_seed():
    srcs = [source("a", [40, 60], samples=30), source("b", [25], weight=1)]
    rows = read_all(make_plan(srcs, seed=0, mixture=True))
    by_source = Counter(r["source"] for r in rows)
    assert by_source == {0: 30, 1: 25}
    picked = sorted(r["source_row"] for r in rows if r["source"] == 0)
    assert len(set(picked)) == 30  # a subset: no row twice
    again = sorted(r["source_row"] for r in read_all(make_plan(srcs, seed=0, mixture=True)) if r["source"] == 0)
    other = sorted(r["source_row"] for r in read_all(make_plan(srcs, seed=1, mixture=True)) if r["source"] == 0)
    assert picked == again and picked != other


def test_oversampling_repeats_every_row_and_positions_stay_unique():
    srcs = [source("small", [3, 4], samples=17), source("big", [10, 10], weight=1)]
    plan = make_plan(srcs, seed=3, mixture=True)
    rows = read_all(plan)
    assert len(rows) == plan.rows == 37
    times = Counter(r["source_row"] for r in rows if r["source"] == 0)
    assert sorted(times) == list(range(7))  # every row of the small source at least twice...
    assert sorted(times.values()) == [2] * 4 + [3] * 3  # ...and a seeded 3 of them once more (17 = 2*7 + 3)
    positions = [r["row"] for r in rows]
    assert len(set(positions)) == len(positions)
    # Copy k of row r of source s sits at base[s] + k * n_s + r: small keeps room for 3 copies.
    assert plan.bases() == [0, 21]
    assert {r["row"] for r in rows if r["source"] == 1} == set(range(21, 41))
    for r in rows:
        assert (r["row"] - plan.bases()[r["source"]]) % plan.size(r["source"]) == r["source_row"]


def test_row_from_covers_only_unplanned_positions():
    srcs = [source("a", [50, 50], samples=20), source("b", [30], samples=45)]
    rows = read_all(make_plan(srcs, seed=9, mixture=True))
    planned = {r["row"] for r in rows}
    for r in rows:
        assert r["row_from"] <= r["row"]
        assert not planned & set(range(r["row_from"], r["row"]))  # never covers another planned row


@pytest.mark.parametrize("units", [1, 40])
def test_sources_are_mixed_row_by_row_in_proportion(units):
    # One file per source (the common case) or 40 shards each: the stream is mixed either way.
    srcs = [source("a", [400 // units] * units, weight=1), source("b", [400 // units] * units, weight=3)]
    plan = make_plan(srcs, seed=5, mixture=True)
    stream = read_all(plan)
    # 800 rows shared 1:3 -> a: a 200-row subset; b: all 400 once + a 200-row subset.
    assert Counter(r["source"] for r in stream) == {0: 200, 1: 600}
    for part in range(8):  # every stretch of 100 rows holds both, near 1:3
        share = [r["source"] for r in stream[part * 100:(part + 1) * 100]].count(0) / 100
        assert 0.1 <= share <= 0.4, (part, share)
    for s in (0, 1):  # each source's own rows stay in order, copy by copy
        mine = [r["row"] for r in stream if r["source"] == s]
        assert mine == sorted(mine)
    assert [r["row"] for r in read_all(make_plan(srcs, seed=5, mixture=True))] == [r["row"] for r in stream]
    assert [r["source"] for r in read_all(make_plan(srcs, seed=6, mixture=True))] != [r["source"] for r in stream]


def test_lanes_hold_every_source_and_one_source_keeps_one_task_per_unit():
    plan = make_plan([source("a", [10] * 6, weight=2), source("b", [10] * 3, weight=1)], seed=0, mixture=True)
    lanes = plan.lanes()
    assert len(lanes) == 3 and all(all(reads) for reads in lanes)
    alone = make_plan([source("all", [5, 5, 5])], seed=0, mixture=False).lanes()
    assert [[[item.unit for item, _ in reads] for reads in lane] for lane in alone] == [[[0]], [[1]], [[2]]]


def test_one_source_without_mixture_reads_as_before():
    plan = make_plan([source("all", [4, 0, 6])], seed=11, mixture=False)
    rows = read_all(plan)
    assert [r["row"] for r in rows] == list(range(10)) == [r["source_row"] for r in rows]
    assert [r["row_from"] for r in rows] == list(range(10))
    assert plan.rows == 10


def test_an_empty_source_in_a_mixture_is_named():
    with pytest.raises(ConfigError, match=r"data.train\[1\] \(b\): has no records"):
        make_plan([source("a", [3]), source("b", [0], weight=2)], seed=0, mixture=True)


# ------------------------------------------------------------------------------- config


def load(train, overrides=None):
    from omni_ray.config import load_config

    return load_config({"model": {"path": "m"}, "data": {"train": train}}, overrides)


def test_plain_lists_stay_one_dataset_and_entries_make_a_mixture():
    assert load(["a.jsonl", "b.jsonl"]).data.train == ["a.jsonl", "b.jsonl"]
    assert not load(["a.jsonl", "b.jsonl"]).data.is_mixture()
    data = load(["a.jsonl", {"path": ["b.jsonl", "c.jsonl"], "weight": 2}, "d.jsonl#100"]).data
    assert data.is_mixture()
    got = [(e.path, e.weight, e.samples, e.label()) for e in data.entries()]
    # A plain path beside entries is weight 1 (weight None); path#N is samples N.
    assert got == [("a.jsonl", None, None, "a.jsonl"), (["b.jsonl", "c.jsonl"], 2.0, None, "b.jsonl + c.jsonl"),
                   ("d.jsonl", None, 100, "d.jsonl")]
    assert load("s3://b/x.jsonl#7").data.entries()[0].samples == 7


def test_a_mixture_survives_the_round_trip_to_the_workers():
    from omni_ray.config import Config

    cfg = load([{"path": "a.jsonl", "weight": 0.5, "name": "A"}, "b.jsonl#3"])
    again = Config.model_validate(cfg.model_dump(mode="json"))
    assert again.data.train == cfg.data.train


def test_set_takes_entries_on_the_command_line():
    cfg = load("x.jsonl", ["data.train=[{path: a.jsonl, weight: 2}, b.jsonl#10]"])
    assert [(e.path, e.weight, e.samples) for e in cfg.data.entries()] == [("a.jsonl", 2.0, None),
                                                                          ("b.jsonl", None, 10)]
    assert load("x.jsonl", ["data.train={path: a.jsonl, samples: 4}"]).data.entries()[0].samples == 4


@pytest.mark.parametrize("train, message", [
    ([{"path": "a.jsonl", "weight": 0}], r"data.train: \[0\] \(a.jsonl\): weight must be a number > 0, got 0; give"),
    (["z.jsonl", {"path": "a.jsonl", "weight": -1.5}], r"\[1\] \(a.jsonl\): weight must be a number > 0"),
    ([{"path": "a.jsonl", "samples": 0}], r"\[0\] \(a.jsonl\): samples must be a whole number > 0, got 0"),
    ([{"path": "a.jsonl", "samples": 2.5}], r"samples must be a whole number > 0, got 2.5"),
    ([{"path": "a.jsonl", "weight": 1, "samples": 3}], r"\[0\] \(a.jsonl\): both weight and samples; give one"),
    ([{"path": "a.jsonl#3", "weight": 1}], r"`path#N` already gives samples"),
    ([{"path": "a.jsonl", "wieght": 2}], r"\[0\] \(a.jsonl\): unknown key\(s\) \['wieght'\]; an entry takes path, weight"),
    ([{"weight": 2}], r"\[0\] \(None\): path must be a path"),
    (["a.jsonl", "a.jsonl#3"], r"both called 'a.jsonl'; give them distinct `name:`s"),
    ([{"path": "a.csv", "weight": 1}], r"\[0\] \(a.csv\): 'a.csv' is not a data form omni_ray reads"),
])
def test_bad_entries_name_the_entry_and_the_fix(train, message):
    from omni_ray.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load(train)


# ------------------------------------------------------------------ the loop's side of a plan


def epoch_rows(plan) -> list[dict]:
    """What Preprocess would emit for the plan's rows: every 5th rejected, the rest a tiny sample."""
    from omni_ray.data.conversation import encode

    blob = encode({"input_ids": np.arange(3)})
    return [{"row": r["row"], "row_from": r["row_from"], "source": r["source"], "id": r["id"],
             "reason": "bad_path" if r["source_row"] % 5 == 0 else "", "sample": blob} for r in read_all(plan)]


class _Shard:
    """Ray's DataIterator over in-memory rows, cut into ``ranks`` strided shards like streaming_split."""

    def __init__(self, rows, rank=0, ranks=1):
        from omni_ray.train.session import ListIterator

        self.it = ListIterator(rows[rank::ranks])

    def iter_batches(self, **kw):
        return self.it.iter_batches(**kw)


def consume(rows, state, steps=None, rank=0, ranks=1):
    """Run EpochBatches over one rank's shard for ``steps`` micro-batches (all when None)."""
    from types import SimpleNamespace

    from omni_ray.config import DataConfig, TrainConfig
    from omni_ray.train.batches import EpochBatches

    batches = EpochBatches(_Shard(rows, rank, ranks), SimpleNamespace(pack_tokens=None),
                           TrainConfig(micro_batch_size=3, seed=4), DataConfig(train="x.jsonl", shuffle_buffer=8), state)
    for n, _ in enumerate(batches._it):
        if steps is not None and n + 1 >= steps:
            break
    return batches


def test_resume_over_a_mixture_is_exact_and_counts_per_source():
    from omni_ray.train.batches import TrainState

    plan = make_plan([source("a", [40, 60], samples=35), source("b", [9], samples=20)], seed=2, mixture=True)
    rows = epoch_rows(plan)
    planned = {r["row"] for r in rows}
    state = TrainState()
    first = consume(rows, state, steps=6)
    before = {p for p in planned if p in state.consumed}
    assert len(before) == first.seen == 18
    # A subset's consumed positions stay few ranges: covers fill the gaps left by unplanned rows.
    assert len(state.consumed.ranges()) <= 8, state.consumed.ranges()
    # Resumed onto 2 ranks: each skips what was trained; together they train the rest, once.
    second = [consume(rows, state, rank=r, ranks=2) for r in range(2)]
    assert sum(b.seen for b in second) == len(planned) - len(before)
    assert {p for p in planned if p in state.consumed} == planned
    seen, rejected = Counter(), Counter()
    for b in [first, *second]:
        seen.update(b.seen_by_source)
        rejected.update(b.rejected_by_source)
    assert seen == {0: 35, 1: 20}
    expected_rejects = Counter(r["source"] for r in rows if r["reason"])
    assert rejected == expected_rejects and sum(first.rejected.values()) + sum(
        sum(b.rejected.values()) for b in second) == sum(expected_rejects.values())


def test_the_census_reads_every_row_of_every_source_once():
    plan = make_plan([source("a", [30, 20], samples=7), source("b", [4], samples=9)], seed=1, mixture=True)
    rows = read_all(plan.census())
    assert sorted((r["source"], r["source_row"]) for r in rows) == [(0, i) for i in range(50)] + [(1, i) for i in range(4)]
