"""Training input on Ray Data: read, preprocess on CPU workers, stream to the trainers.

    source (any form of omni_ray.data.sources: one read task per unit, streamed in order)
      -> map_batches(Preprocess)   decode images, chat template, processor, labels (CPU actors)
      -> streaming_split by Ray Train to the training workers

Preprocessing runs in Ray Data actors, off the training processes. A sample that cannot be
trained on is not dropped here: it flows on as a row with ``reason`` set, so every rank sees
the same number of rows (collectives stay in step) and the training loop counts it by reason
and stops past ``data.max_bad_fraction``.
"""

from __future__ import annotations

import functools
import json
from typing import Optional

import numpy as np
import pyarrow as pa
from ray.data.datasource import Datasource

from omni_ray.config import DataConfig, ModelConfig
from omni_ray.data.conversation import SampleProcessor, encode
from omni_ray.data.errors import DataError
from omni_ray.data.images import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_PIXELS, decode_image, load_image
from omni_ray.data.mixture import Plan, item_rows, make_plan, merge, plan_data
from omni_ray.data.reader import ROW_COLUMNS, InputPolicy
from omni_ray.data.sources import Source, count_units, read_unit
from omni_ray.data.video import decode_video, load_video
from omni_ray.storage import StorageConfig

# row: the position the data position records; row_from: the first position it covers (a mixture's
# subset leaves some out, see data.mixture); source: the data.train entry it came from.
OUTPUT_COLUMNS = ("row", "row_from", "source", "id", "sample", "reason", "detail", "num_tokens", "num_images",
                  "num_image_tokens", "dropped_rounds")


class Preprocess:
    """Ray Data callable class: one processor per actor, rows in, processed rows out."""

    def __init__(self, model: ModelConfig, storage: StorageConfig | None, model_max_length: int,
                 max_image_pixels: int = DEFAULT_MAX_PIXELS, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                 read_timeout_s: float = 60.0, video_fps: float = 2.0, video_max_frames: int = 16,
                 pairs: bool = False):
        from omni_ray.data.pair_processor import PairProcessor
        from omni_ray.models.loading import load_processor, local_model_dir, read_hf_config, resolve_spec

        spec = resolve_spec(model, read_hf_config(model, storage))
        processor = load_processor(model, local_model_dir(model, storage))
        self.sample_processor = SampleProcessor(processor, model_max_length, spec.image_inputs)
        # train.objective: dpo: rows are pairs (reader.to_row), processed with their images once.
        self.pair_processor = PairProcessor(processor, model_max_length, spec.image_inputs) if pairs else None
        self.storage = storage
        self.max_image_pixels = max_image_pixels
        self.read_limits = {"max_bytes": max_image_bytes, "timeout_s": read_timeout_s}
        self.video_fps, self.video_max_frames = video_fps, video_max_frames

    def _inputs(self, row: dict) -> tuple[list, list, list | None]:
        """Images, videos (sampled frames) and tools of a row: bytes from the shard, else read from their refs."""
        if row.get("audio_refs"):
            raise DataError("unsupported_modality", "audio is not supported: no model family here takes audio input")
        # Per item: the embedded bytes when present (prepared shards, hub Parquet, tars, data: URIs),
        # else the file or object its ref names (reader.ROW_COLUMNS).
        blobs = [b if b is not None and len(b) else load_image(ref, self.storage, **self.read_limits)
                 for ref, b in _aligned(row.get("image_refs"), row.get("images"))]
        images = [decode_image(bytes(b), max_pixels=self.max_image_pixels) for b in blobs]
        clips = [c if c is not None and len(c) else load_video(ref, self.storage, **self.read_limits)
                 for ref, c in _aligned(row.get("video_refs"), row.get("videos"))]
        videos = [decode_video(bytes(c), fps=self.video_fps, max_frames=self.video_max_frames) for c in clips]
        tools = row.get("tools")  # a JSON list, "" when the sample has none (reader.ROW_COLUMNS)
        if isinstance(tools, str):
            tools = json.loads(tools) if tools else None
        return images, videos, tools or None

    def process_row(self, row: dict) -> dict:
        position = int(row.get("row", -1))
        out = {"row": position, "row_from": int(row.get("row_from", position)), "source": int(row.get("source") or 0),
               "id": str(row["id"]), "sample": b"", "reason": "", "detail": "", "num_tokens": 0,
               "num_images": 0, "num_image_tokens": 0, "dropped_rounds": 0}
        if row.get("reason"):
            return {**out, "reason": row["reason"], "detail": row.get("detail", "")}
        try:
            images, videos, tools = self._inputs(row)
            if self.pair_processor is not None:
                return {**out, **self._pair(json.loads(row["messages"]), images, videos, tools)}
            arrays = self.sample_processor(json.loads(row["messages"]), images, videos, tools)
        except DataError as err:
            return {**out, "reason": err.reason, "detail": err.detail}
        except Exception as err:  # noqa: BLE001 - one sample must never kill the run; it is counted
            return {**out, "reason": "processing_error", "detail": f"{type(err).__name__}: {err}"[:500]}
        ids = arrays["input_ids"]
        # num_image_tokens counts video tokens too: both are what the vision tower feeds the LLM.
        return {**out, "sample": encode(arrays), "num_tokens": len(ids), "num_images": int(arrays["num_images"]),
                "num_image_tokens": self.sample_processor.visual_tokens(ids),
                "dropped_rounds": int(arrays["dropped_rounds"])}

    def _pair(self, pair: dict, images: list, videos: list, tools: list | None) -> dict:
        """The processed columns of one preference pair (``num_tokens``: both answers' rows)."""
        arrays = self.pair_processor(pair["prompt"], pair["chosen"], pair["rejected"], images, videos, tools)
        chosen = arrays["chosen_input_ids"]
        return {"sample": encode(arrays), "num_tokens": len(chosen) + len(arrays["rejected_input_ids"]),
                "num_images": int(arrays["num_images"]),
                "num_image_tokens": self.sample_processor.visual_tokens(chosen), "dropped_rounds": 0}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        n = len(batch["id"])
        rows = [self.process_row({k: _item(v[i]) for k, v in batch.items()}) for i in range(n)]
        return {key: [r[key] for r in rows] for key in OUTPUT_COLUMNS}


def _aligned(refs, blobs) -> list[tuple[str, bytes | None]]:
    """(ref, bytes) per item of a row; either list may be missing or empty (all of the other kind)."""
    refs, blobs = list(refs if refs is not None else []), list(blobs if blobs is not None else [])
    n = max(len(refs), len(blobs))
    return [(refs[i] if i < len(refs) else "", blobs[i] if i < len(blobs) else None) for i in range(n)]


def _item(value):
    if isinstance(value, np.ndarray) and value.dtype == object:
        return list(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def json_rows(uri: str, storage: StorageConfig | None, policy: Optional[InputPolicy] = None):
    """Normalized rows of one JSON/JSONL file, streamed (image files are read later, by workers)."""
    from omni_ray.data.reader import iter_rows

    return iter_rows([uri], storage, policy)


def preprocess_pool(data: DataConfig, num_workers: int) -> tuple[int, int]:
    """(min, max) preprocessing actors for ``num_workers`` training workers.

    One actor per cluster would feed a 64-GPU run from a single CPU process: the pool scales
    with the training workers, and Ray Data's autoscaler grows it between the bounds.
    """
    low = max(1, round(num_workers * data.preprocess_actors_per_worker))
    return low, max(low, round(num_workers * data.preprocess_max_actors_per_worker))


#: What a read task yields: ROW_COLUMNS and ``row_from``, the first position a row covers
#: (a mixture's subset leaves positions out; see omni_ray.data.mixture).
PLANNED_COLUMNS = ROW_COLUMNS.append(pa.field("row_from", pa.int64()))


class PlanDatasource(Datasource):
    """A plan over counted sources into Ray Data: one read task per lane of the plan.

    Without a mixture a lane is one unit of the source (a file, a tar shard, a prepared shard),
    read in order; with one, a lane holds a stretch of every source's reads (unit x copy) and
    interleaves their rows (data.mixture). A task streams its rows, keeps those the plan trains
    and gives each its position, in blocks of ``rows_per_block``, holding one block of text (and,
    for hub Parquet and tars, that block's embedded images) at a time; neither the driver nor
    the object store ever holds the dataset at once. With ``preserve_order`` (build_dataset) the
    tasks' blocks arrive in the plan's order, the same every run.
    """

    def __init__(self, plan: Plan, storage: Optional[StorageConfig], policy: InputPolicy, rows_per_block: int = 256):
        self.plan, self.storage, self.policy, self.rows_per_block = plan, storage, policy, rows_per_block

    def estimate_inmemory_data_size(self) -> Optional[int]:
        return None

    def get_name(self) -> str:
        return "OmniRayPlan"

    def get_read_tasks(self, parallelism: int, per_task_row_limit: Optional[int] = None, data_context=None):
        from ray.data.block import BlockMetadata
        from ray.data.datasource import ReadTask

        plan, tasks = self.plan, []
        for lane_no, lane in enumerate(plan.lanes()):
            reads = [[(_read_of(plan, item), rows) for item, rows in source_reads] for source_reads in lane]
            uris = tuple(what[1].uri for source_reads in reads for what, _ in source_reads)
            meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=uris)
            read_fn = functools.partial(lane_blocks, reads, plan.seed, lane_no, self.storage, self.policy,
                                        self.rows_per_block, self.schema)
            tasks.append(ReadTask(read_fn, meta, schema=self.schema))
        return tasks

    @property
    def schema(self) -> pa.Schema:
        # row_from only where a subset can leave positions out: one source reads as it always did.
        return PLANNED_COLUMNS if self.plan.mixture else ROW_COLUMNS


class UnitsDatasource(PlanDatasource):
    """One counted source read as it is: one read task per unit, in order (a plan of one source)."""

    def __init__(self, source: Source, storage: Optional[StorageConfig], policy: InputPolicy,
                 rows_per_block: int = 256):
        super().__init__(make_plan([source], 0, mixture=False), storage, policy, rows_per_block)


def _read_of(plan: Plan, item) -> tuple:
    """What one read needs in its task: the item, its unit, its source holding that unit alone (a
    source of 100k shards is not shipped to every task; ``source_file`` is then 0, which nothing
    after the reader uses) and the source's subset for a partial copy."""
    source = plan.sources[item.source]
    unit = source.units[item.unit]
    return item, unit, source.with_units((unit,)), plan.subset(item.source) if item.partial else None


def lane_blocks(reads: list, seed: int, lane_no: int, storage: Optional[StorageConfig], policy: InputPolicy,
                rows_per_block: int = 256, schema: pa.Schema = PLANNED_COLUMNS):
    """One read task's body: a lane's planned rows as Arrow tables of at most ``rows_per_block`` rows
    (``reads``: per source, ``(_read_of(...), expected rows)`` in order; see mixture.merge)."""

    def read(what):
        item, unit, source, subset = what
        return item_rows(item, unit.offset, subset, read_unit(unit, source, storage, policy), rows_per_block)

    block = []
    for row in merge(reads, read, seed, lane_no):
        block.append(row)
        if len(block) == rows_per_block:
            yield pa.Table.from_pylist(block, schema=schema)
            block = []
    if block:
        yield pa.Table.from_pylist(block, schema=schema)


def as_plan(source, data: DataConfig, storage: StorageConfig | None, seed: int = 0) -> Plan:
    """``source`` as a plan: a Plan as it is; a Source counted, read as it is; a data.train value
    (a path, a list, mixture entries) resolved, counted and planned with ``seed``."""
    if isinstance(source, Plan):
        return source
    if isinstance(source, Source):
        if any(u.offset is None for u in source.units):
            source = count_units(source, storage, InputPolicy.from_data(data))
        return make_plan([source], seed, mixture=False)
    if source is not data.train:
        data = data.model_copy()
        data.train = source  # validated on assignment: mixture entries parsed
    return plan_data(data, storage, seed)


def read_source(source, data: DataConfig, storage: StorageConfig | None, seed: int = 0, pairs: bool = False):
    """The unprocessed rows of ``source`` (see :func:`as_plan`) as a Ray Dataset, each with its ``row`` position
    (``pairs``: records are preference pairs, ``train.objective: dpo``)."""
    import ray.data

    env = {"env_vars": storage.worker_env()} if storage else None
    plan = as_plan(source, data, storage, seed)
    return ray.data.read_datasource(PlanDatasource(plan, storage, InputPolicy.from_data(data, pairs)), runtime_env=env)


def count_rows(source, data: DataConfig, storage: StorageConfig | None, seed: int = 0) -> int:
    """Rows in one epoch of ``source``: every record of every unit (rejected ones flow through as
    rows), or a mixture's planned rows."""
    return as_plan(source, data, storage, seed).rows


def _actor_pool(bounds: int | tuple[int, int]):
    import ray.data

    low, high = (bounds, bounds) if isinstance(bounds, int) else bounds
    # Start at the lower bound: every training worker has an actor feeding it from the first step.
    return ray.data.ActorPoolStrategy(min_size=low, max_size=high, initial_size=low)


def build_dataset(source, data: DataConfig, model: ModelConfig, storage: StorageConfig | None,
                  *, num_workers: int = 1, concurrency: int | tuple[int, int] | None = None, seed: int = 0,
                  pairs: bool = False):
    """A Ray Dataset of processed rows for ``source`` (a data.train value, a Source or a Plan; see
    :func:`as_plan`; ``seed`` draws a mixture's plan).

    ``concurrency`` (a fixed actor count, or bounds) overrides the pool sized for ``num_workers``;
    ``pairs``: the records are preference pairs (``train.objective: dpo``), processed as pairs.
    """
    import ray.data

    context = ray.data.DataContext.get_current()
    # Training prints its own progress line per report; Ray Data's bars would interleave with it.
    context.enable_progress_bars = False
    # A deterministic order per worker: runs are reproducible, and a resumed run skips exactly
    # the rows the interrupted one trained on (see train.loop.epoch_batches).
    context.execution_options.preserve_order = True
    ds = read_source(source, data, storage, seed, pairs)
    return ds.map_batches(
        Preprocess,
        fn_constructor_args=(model, storage, data.model_max_length, data.max_image_pixels,
                             data.max_image_bytes, data.read_timeout_s, data.video_fps, data.video_max_frames, pairs),
        batch_size=16,
        compute=_actor_pool(concurrency or preprocess_pool(data, num_workers)),
        num_cpus=data.num_cpus_per_preprocess_task,
        runtime_env={"env_vars": storage.worker_env()} if storage else None,
    )
