"""The epoch's batches on one rank: read the shard, skip what was trained, count rejects, collate.

Rows arrive preprocessed (``omni_ray.data.pipeline``): each has an ``id``, a ``sample`` blob and
a ``reason`` that is empty unless the sample was rejected. Rejected rows still flow, so every
rank sees the same number of rows; here they are counted by reason, never trained on and never
replaced by another sample.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from omni_ray.config import DataConfig, TrainConfig
from omni_ray.data.batch import IGNORE_INDEX, Batch
from omni_ray.data.collate import collate
from omni_ray.data.conversation import SampleProcessor, decode
from omni_ray.data.pair_processor import PairProcessor, collate_pairs
from omni_ray.data.packing import pack_samples
from omni_ray.data.position import PositionSet
from omni_ray.models.spec import ModelSpec


def keep_alive_sample(sample_processor: SampleProcessor) -> dict:
    """A processed one-image sample used to run the vision path in image-free batches (see collate)."""
    from PIL import Image

    image = Image.new("RGB", (28, 28))
    messages = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "."}]
    return sample_processor(messages, [image])


class Batcher:
    """Collates processed samples for one architecture (padding, image inputs, keep-alive row).

    ``pack_tokens`` (``data.row_tokens()``): when set, ``pack`` lays a step's samples end to end in
    rows of that many tokens instead (``omni_ray.data.packing``).
    """

    def __init__(self, sample_processor: SampleProcessor, spec: ModelSpec, pack_tokens: int | None = None):
        self.image_inputs = spec.image_inputs
        self.pad_id = sample_processor.tokenizer.pad_token_id or 0
        self.keep_alive = keep_alive_sample(sample_processor)
        self.pack_tokens = pack_tokens
        self.empty = self(())  # what a rank whose data ran out trains on (labels all ignored)

    def __call__(self, samples) -> dict:
        return collate(list(samples), self.image_inputs, self.pad_id, self.keep_alive)

    def pack(self, samples: list[dict]) -> list[dict]:
        """Packed rows of ``samples``; the keep-alive-only batch when every sample was rejected."""
        if not samples:
            return [self(())]
        return pack_samples(samples, self.pack_tokens, self.image_inputs, keep_alive=self.keep_alive)


class PairBatcher:
    """Collates processed preference pairs (``train.objective: dpo``): ``micro_batch_size`` counts pairs,
    a batch is 2P rows (``collate_pairs``). A batch without an image gets one extra pair whose labels
    are all ignored (the vision keep-alive, as ``collate``'s row), which the loss leaves out."""

    pack_tokens = None  # data.packing is refused with DPO

    def __init__(self, pair_processor: PairProcessor, spec: ModelSpec):
        from PIL import Image

        self.image_inputs = spec.image_inputs
        self.pad_id = pair_processor.processor.tokenizer.pad_token_id or 0
        pair = pair_processor([{"role": "user", "content": "<image>"}], ".", ",", [Image.new("RGB", (28, 28))])
        self.keep_alive = {**pair, **{f"{side}_labels": np.full_like(pair[f"{side}_labels"], IGNORE_INDEX)
                                      for side in ("chosen", "rejected")}}
        self.empty = self(())

    def __call__(self, pairs) -> Batch:
        pairs = list(pairs)
        real = len(pairs)
        needs_keep_alive = not any(int(p["num_images"]) + int(p["num_videos"]) > 0 for p in pairs)
        batch = collate_pairs(pairs + [self.keep_alive] * needs_keep_alive, self.image_inputs, self.pad_id)
        batch["pairs"], batch["keep_alive"] = torch.tensor(real), torch.tensor(int(needs_keep_alive))
        return batch


@dataclass
class TrainState:
    """Where the run is: optimizer steps taken, the epoch, and the rows of this epoch already trained.

    Rows are identified by their position in the dataset (the ``row`` column: 0..N-1, the same
    every run), never by the user's ids, which repeat across files.
    """

    step: int = 0
    epoch: int = 0
    consumed: PositionSet = field(default_factory=PositionSet)
    resumed_from: int | None = None
    saved_at: int = -1
    # Reports since the last checkpoint; a checkpoint keeps them, because a worker that dies can
    # take reports Ray Train had not yet collected with it, and the resumed run sends them again.
    reports: list = field(default_factory=list)
    under_notice: bool = False
    """A preemption notice was seen at the last report (its checkpoint is taken once)."""


class EpochBatches:
    """This rank's micro-batches, epoch after epoch.

    The shuffle is a function of (seed, epoch) over this rank's stream, and skipping trained
    rows happens after it, so a resumed run sees exactly the rows the interrupted one had not
    reached.

    ``order_digest`` fingerprints the positions this rank has read, in order, since the process
    started: two runs of one config, seed and world size read the same rows on every rank in the
    same order exactly when their digests agree at every report (metrics ``data_order``).
    """

    def __init__(self, shard, batcher: Batcher, train: TrainConfig, data: DataConfig, state: TrainState):
        self.shard, self.batcher, self.train, self.data, self.state = shard, batcher, train, data, state
        self.seen = 0
        self.rejected: Counter = Counter()
        # Per data.train source (its index; 0 without a mixture): rows seen, rows rejected.
        self.seen_by_source: Counter = Counter()
        self.rejected_by_source: Counter = Counter()
        self._order = hashlib.blake2b(digest_size=8)
        self._it = self._epoch(state.epoch)

    def order_digest(self) -> str:
        """Hex fingerprint of the row positions read so far, in the order they were read."""
        return self._order.hexdigest()

    def next_step(self, grad_accum: int) -> list[dict]:
        """Up to ``grad_accum`` micro-batches; fewer (or none) when this rank's epoch runs out.

        Packing: the same samples (``grad_accum`` reads of ``micro_batch_size`` rows, so the
        schedule, the data position and the loss normalisation are those of the unpacked run),
        laid end to end in as many packed rows as they need; each row is one forward.
        """
        groups = list(itertools.islice(self._it, grad_accum))
        if self.batcher.pack_tokens is None or not groups:
            return [self.batcher(samples) for samples in groups]
        return self.batcher.pack([sample for samples in groups for sample in samples])

    def next_epoch(self) -> None:
        self.state.epoch += 1
        self.state.consumed = PositionSet()
        self._it = self._epoch(self.state.epoch)

    def _rows(self, epoch: int):
        shuffle = self.data.shuffle
        return self.shard.iter_batches(
            batch_size=self.train.micro_batch_size, batch_format="numpy", prefetch_batches=2,
            local_shuffle_buffer_size=self.data.shuffle_buffer if shuffle else None,
            local_shuffle_seed=self.train.seed + epoch if shuffle else None)

    def _epoch(self, epoch: int):
        for rows in self._rows(epoch):
            samples, fresh = [], 0
            # row_from: a mixture's subset leaves positions out; a row covers those before it
            # (never another planned row), so the consumed set stays a few ranges.
            covers, sources = rows.get("row_from", rows["row"]), rows.get("source")
            for i, reason in enumerate(rows["reason"]):
                position = int(rows["row"][i])
                if position in self.state.consumed:
                    continue
                self.state.consumed.add_range(min(int(covers[i]), position), position + 1)
                self._order.update(position.to_bytes(8, "little"))
                fresh += 1
                source = int(sources[i]) if sources is not None else 0
                self.seen_by_source[source] += 1
                if reason:
                    self.rejected[str(reason)] += 1
                    self.rejected_by_source[source] += 1
                else:
                    samples.append(decode(rows["sample"][i]))
            self.seen += fresh
            if fresh:
                yield samples
