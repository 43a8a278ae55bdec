"""Training input on Ray Data: read, preprocess on CPU workers, stream to the trainers.

    source (prepared Parquet shards on S3/local, or a MiniCPM-V JSON/JSONL file)
      -> map_batches(Preprocess)   decode images, chat template, processor, labels (CPU actors)
      -> streaming_split by Ray Train to the training workers

Preprocessing runs in Ray Data actors, off the training processes. A sample that cannot be
trained on is not dropped here: it flows on as a row with ``reason`` set, so every rank sees
the same number of rows (collectives stay in step) and the training loop counts it by reason
and stops past ``data.max_bad_fraction``.
"""

from __future__ import annotations

import json

import numpy as np

from omni_ray.config import DataConfig, ModelConfig
from omni_ray.data.conversation import SampleProcessor, encode
from omni_ray.data.errors import DataError
from omni_ray.data.images import DEFAULT_MAX_PIXELS, decode_image, load_image
from omni_ray.storage import StorageConfig

OUTPUT_COLUMNS = ("id", "sample", "reason", "detail", "num_tokens", "num_images", "num_image_tokens", "dropped_rounds")


class Preprocess:
    """Ray Data callable class: one processor per actor, rows in, processed rows out."""

    def __init__(self, model: ModelConfig, storage: StorageConfig | None, model_max_length: int,
                 max_image_pixels: int = DEFAULT_MAX_PIXELS):
        from omni_ray.models.loading import load_processor, local_model_dir, read_hf_config, resolve_spec

        spec = resolve_spec(model, read_hf_config(model, storage))
        processor = load_processor(model, local_model_dir(model, storage))
        self.sample_processor = SampleProcessor(processor, model_max_length, spec.image_inputs)
        self.storage = storage
        self.max_image_pixels = max_image_pixels

    def process_row(self, row: dict) -> dict:
        out = {"id": str(row["id"]), "sample": b"", "reason": "", "detail": "", "num_tokens": 0,
               "num_images": 0, "num_image_tokens": 0, "dropped_rounds": 0}
        if row.get("reason"):
            return {**out, "reason": row["reason"], "detail": row.get("detail", "")}
        try:
            messages = json.loads(row["messages"])
            blobs = row.get("images")
            if blobs is None:
                blobs = [load_image(ref, self.storage) for ref in row.get("image_refs") or []]
            images = [decode_image(bytes(b), max_pixels=self.max_image_pixels) for b in blobs]
            arrays = self.sample_processor(messages, images)
        except DataError as err:
            return {**out, "reason": err.reason, "detail": err.detail}
        ids = arrays["input_ids"]
        return {**out, "sample": encode(arrays), "num_tokens": len(ids), "num_images": int(arrays["num_images"]),
                "num_image_tokens": int((ids == self.sample_processor.image_token_id).sum()),
                "dropped_rounds": int(arrays["dropped_rounds"])}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        n = len(batch["id"])
        rows = [self.process_row({k: _item(v[i]) for k, v in batch.items()}) for i in range(n)]
        return {key: [r[key] for r in rows] for key in OUTPUT_COLUMNS}


def _item(value):
    if isinstance(value, np.ndarray) and value.dtype == object:
        return list(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def json_rows(uri: str, storage: StorageConfig | None) -> list[dict]:
    """Normalize a MiniCPM-V / ShareGPT JSON(L) file into rows (image files are read later, by workers)."""
    from omni_ray.data.formats import iter_records, normalize_record, resolve_ref

    rows = []
    for index, record in iter_records(uri, storage):
        row = {"id": f"sample-{index}", "messages": "[]", "image_refs": [], "reason": "", "detail": ""}
        try:
            if isinstance(record, DataError):
                raise record
            sample = normalize_record(record, index)
            row.update(id=sample["id"], messages=json.dumps(sample["messages"]),
                       image_refs=[resolve_ref(r, uri) for r in sample["image_refs"]])
        except DataError as err:
            row.update(reason=err.reason, detail=err.detail)
        rows.append(row)
    return rows


def preprocess_pool(data: DataConfig, num_workers: int) -> tuple[int, int]:
    """(min, max) preprocessing actors for ``num_workers`` training workers.

    One actor per cluster would feed a 64-GPU run from a single CPU process: the pool scales
    with the training workers, and Ray Data's autoscaler grows it between the bounds.
    """
    low = max(1, round(num_workers * data.preprocess_actors_per_worker))
    return low, max(low, round(num_workers * data.preprocess_max_actors_per_worker))


def build_dataset(source: str, data: DataConfig, model: ModelConfig, storage: StorageConfig | None,
                  *, num_workers: int = 1, concurrency: int | tuple[int, int] | None = None):
    """A Ray Dataset of processed rows for ``source`` (prepared prefix or JSON/JSONL file).

    ``concurrency`` (a fixed actor count, or bounds) overrides the pool sized for ``num_workers``.
    """
    import ray.data

    from omni_ray import storage as st

    context = ray.data.DataContext.get_current()
    # Training prints its own progress line per report; Ray Data's bars would interleave with it.
    context.enable_progress_bars = False
    # A deterministic order per worker: runs are reproducible, and a resumed run skips exactly
    # the rows the interrupted one trained on (see train.loop.epoch_batches).
    context.execution_options.preserve_order = True
    if source.endswith((".json", ".jsonl")):
        ds = ray.data.from_items(json_rows(source, storage))
    else:
        from omni_ray.data.prepare import read_manifest, shard_uris

        manifest = read_manifest(source, storage)
        fs, _ = st.resolve(source, storage)
        paths = [st.resolve(u, storage)[1] for u in shard_uris(source, manifest)]
        ds = ray.data.read_parquet(paths, filesystem=fs, columns=["id", "messages", "images"])
    return ds.map_batches(
        Preprocess,
        fn_constructor_args=(model, storage, data.model_max_length, data.max_image_pixels),
        batch_size=16,
        concurrency=concurrency or preprocess_pool(data, num_workers),
        num_cpus=data.num_cpus_per_preprocess_task,
        runtime_env={"env_vars": storage.worker_env()} if storage else None,
    )
