"""The loop's decisions as pure functions, and the local session's data order."""

from __future__ import annotations

import pytest

from omni_ray.config import TrainConfig
from omni_ray.train.policy import bad_data_error, checkpoint_due, schedule_done, should_log, total_optimizer_steps
from omni_ray.train.session import ListIterator


@pytest.mark.parametrize("rows, world, mbs, accum, epochs, expected", [
    (64, 2, 4, 2, 1, 4),     # 16 samples per step
    (65, 2, 4, 2, 1, 5),     # the last step of the epoch is short
    (64, 1, 4, 1, 3, 48),
    (1, 8, 4, 8, 1, 1),      # fewer rows than one step still trains one step
])
def test_total_optimizer_steps(rows, world, mbs, accum, epochs, expected):
    train = TrainConfig(micro_batch_size=mbs, grad_accum=accum, epochs=epochs)
    assert total_optimizer_steps(train, rows, world) == expected


def test_max_steps_overrides_epochs():
    train = TrainConfig(max_steps=7, epochs=3)
    assert total_optimizer_steps(train, 10_000, 4) == 7
    assert not schedule_done(6, 5, 7, train)  # epochs do not end a max_steps run
    assert schedule_done(7, 0, 7, train)


def test_schedule_ends_when_epochs_run_out_first():
    train = TrainConfig(epochs=2)
    assert not schedule_done(3, 1, 10, train)
    assert schedule_done(3, 2, 10, train)


@pytest.mark.parametrize("step, every, preempted, expected", [
    (4, 2, False, True), (5, 2, False, False), (5, 2, True, True), (10, None, False, True), (3, None, False, False),
])
def test_checkpoint_due(step, every, preempted, expected):
    assert checkpoint_due(step, 10, every, preempted) is expected


def test_should_log_on_schedule_and_at_the_end():
    assert [s for s in range(1, 11) if should_log(s, 10, 4)] == [4, 8, 10]


def test_bad_data_error_names_the_key_and_the_fix():
    assert bad_data_error({"too_long": 1}, 100, 0.01) is None
    message = bad_data_error({"too_long": 1, "missing_image": 1}, 100, 0.01)
    assert message.startswith("data.max_bad_fraction: 2.0%") and "omni-ray data check" in message


def rows(n):
    return [{"id": str(i), "x": i} for i in range(n)]


def ids(iterator, **kwargs):
    return [int(v) for batch in iterator.iter_batches(batch_size=3, **kwargs) for v in batch["id"]]


def test_list_iterator_shuffles_like_ray_seeded_and_complete():
    it = ListIterator(rows(20))
    assert ids(it) == list(range(20))
    first = ids(it, local_shuffle_buffer_size=8, local_shuffle_seed=1)
    assert sorted(first) == list(range(20)) and first != list(range(20))
    assert ids(it, local_shuffle_buffer_size=8, local_shuffle_seed=1) == first  # same seed, same order
    assert ids(it, local_shuffle_buffer_size=8, local_shuffle_seed=2) != first  # next epoch, new order
