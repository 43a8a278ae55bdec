"""``data_order``: a per-rank fingerprint of the row positions read, in order (EpochBatches.order_digest).

Equal digests mean the same rows in the same order; the same rows in another order, or one row
more, give another digest. Rows here are rejected ones (no sample to decode): they count in the
order like any other row, since they hold their place in the rank's stream.
"""

from __future__ import annotations

from omni_ray.config import DataConfig, TrainConfig
from omni_ray.train.batches import EpochBatches, TrainState
from omni_ray.train.loop import per_rank_digests
from omni_ray.train.session import ListIterator


def digest_after(positions: list[int], steps: int, shuffle: bool = False) -> str:
    rows = [{"row": p, "id": str(p), "sample": b"", "reason": "corrupt_image"} for p in positions]
    batches = EpochBatches(ListIterator(rows), batcher=None, train=TrainConfig(micro_batch_size=2, seed=1),
                           data=DataConfig(train="unused.jsonl", shuffle=shuffle, shuffle_buffer=4), state=TrainState())
    for _ in range(steps):
        next(batches._it)
    return batches.order_digest()


def test_digest_is_a_function_of_the_positions_in_order():
    assert digest_after([0, 1, 2, 3], 2) == digest_after([0, 1, 2, 3], 2)
    assert digest_after([0, 1, 2, 3], 2) != digest_after([1, 0, 2, 3], 2)  # same rows, other order
    assert digest_after([0, 1, 2, 3], 1) != digest_after([0, 1, 2, 3], 2)  # one batch more
    assert digest_after(list(range(12)), 3, shuffle=True) == digest_after(list(range(12)), 3, shuffle=True)
    assert len(digest_after([5], 1)) == 16


def test_one_rank_reports_its_own_digest():
    assert per_rank_digests("0123456789abcdef", 0, 1) == ["0123456789abcdef"]
    assert per_rank_digests("ffffffffffffffff", 0, 1) == ["ffffffffffffffff"]  # 32-bit halves survive float64

