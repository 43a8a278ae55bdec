"""``omni-ray data prepare``: annotation file + images -> validated Parquet shards + manifest.

Why a separate step: preprocessing large multimodal sets inside the training job is where
other trainers blow up RAM, hit collective timeouts and show no progress (pain 9), and a
sample with a broken image crashes a run hours in or is silently swapped for another
(pain 1). Here every image is opened and decoded once, up front, on Ray Data CPU tasks
that scale past one machine; bad samples are written to ``rejects.jsonl`` with a reason
instead of crashing or vanishing, and training then streams shards that are known good
from object storage (pain 10).

Layout written under ``out`` (a local directory or an ``s3://`` prefix)::

    shard-00000.parquet ...   accepted samples, at most ``rows_per_shard`` rows each
    rejects.jsonl             {"id", "record", "source", "index", "reason", "detail"} per rejected sample
    manifest.json             written LAST: counts, shard list with sizes and sha256

Parquet row schema (:data:`ROW_SCHEMA`)::

    id: string            the user's id (or "sample-<record>"); may repeat, reported only
    messages: string      JSON list of {"role", "content"[, "loss"]}; images as "<image>"
    images: list<binary>  encoded image bytes, in placeholder order (original bytes, or
                          PNG when decoding needed conversion, see images.DecodedImage)
    num_images: int32     len(images); 0 for text-only samples
    video_refs: list<string>  resolved video URIs (checked to be regular files; decoded at training)
    tools: string         JSON list of tools, "" when none
    source_file: int32    index into the manifest's "sources"
    source_index: int64   the record's position in its file
    shard: int32, shard_row: int32   where the row lies; its dataset position ``row`` is
                          the manifest's ``first_row`` of the shard + ``shard_row``

``row`` numbers accepted samples 0..N-1 in shard order, the same every run: training
identifies rows by it (resume, skipping), never by the user's id, so two files that both
number ids from "0" lose nothing. Repeated ids are counted in the manifest's
``duplicate_ids`` (count and examples), never skipped.

How the work is split: the driver streams records from the annotation file (text only,
never images), normalizes them (rejecting malformed ones at once) and groups the good ones
into shard-sized groups with fixed shard numbers. A wave of up to ``shards_per_wave``
groups becomes a Ray Dataset (``ray.data.from_items``), and a ``map_batches`` CPU task per
group loads and decodes its images and writes its shard straight to storage. Only small
per-shard summaries come back to the driver, so driver memory holds at most one wave of
text and never image bytes. Shard numbers are fixed before validation, so a group whose
samples are all rejected leaves a gap in the numbering: the manifest, not a directory
listing, is the list of shards.

Rerunning into the same prefix is safe: the old ``manifest.json`` is deleted first, then
the old shards and rejects, and the new manifest is written only after every shard and
the rejects file are complete. A reader that finds a manifest therefore always sees a
finished, consistent set; one that finds none is told to wait or run ``prepare``
(:func:`read_manifest`). Two ``prepare`` runs into one prefix at the same time are not
supported.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import posixpath
import re
from collections import Counter
from datetime import datetime, timezone
from typing import Optional, Union

import pyarrow as pa
import pyarrow.parquet as pq

from omni_ray import storage as _storage
from omni_ray.data.errors import DataError, DataSourceError
from omni_ray.data.identity import DuplicateIds
from omni_ray.data.images import DEFAULT_MAX_PIXELS, decode_image_info, encode_png, load_image, probe_file
from omni_ray.data.reader import InputPolicy
from omni_ray.data.shards import MANIFEST_NAME, SCHEMA_VERSION, read_manifest, shard_uris, verify_shard_checksums
from omni_ray.data.sources import iter_source_rows, resolve_entry
from omni_ray.storage import StorageConfig

__all__ = [
    "SCHEMA_VERSION",
    "ROW_SCHEMA",
    "MANIFEST_NAME",
    "REJECTS_NAME",
    "prepare",
    "read_manifest",
    "verify_shard_checksums",
    "shard_name",
    "shard_uris",
]

log = logging.getLogger(__name__)

REJECTS_NAME = "rejects.jsonl"

#: Schema of every accepted row in the Parquet shards.
ROW_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("messages", pa.string(), nullable=False),
        pa.field("images", pa.list_(pa.binary()), nullable=False),
        pa.field("num_images", pa.int32(), nullable=False),
        pa.field("video_refs", pa.list_(pa.string()), nullable=False),
        pa.field("tools", pa.string(), nullable=False),
        pa.field("source_file", pa.int32(), nullable=False),
        pa.field("source_index", pa.int64(), nullable=False),
        pa.field("shard", pa.int32(), nullable=False),
        pa.field("shard_row", pa.int32(), nullable=False),
    ]
)

_SUMMARY_SCHEMA = pa.schema(
    [
        ("shard", pa.int64()),
        ("path", pa.string()),  # "" when every sample of the group was rejected
        ("rows", pa.int64()),
        ("bytes", pa.int64()),
        ("sha256", pa.string()),
        ("image_count", pa.int64()),
        ("text_only_count", pa.int64()),
        ("samples", pa.int64()),
        ("rejects", pa.string()),  # JSON list of reject entries
    ]
)

# What a previous run may have left: its outputs and, locally, write_bytes' temporary files.
_OUTPUT_FILE = re.compile(
    r"(shard-\d+\.parquet|rejects\.jsonl)"
    r"|\.(shard-\d+\.parquet|rejects\.jsonl|manifest\.json)\.tmp-[0-9a-f]+"
)
_ROW_GROUP_ROWS = 64  # readers stream a shard 64 rows (and their images) at a time


def shard_name(shard: int) -> str:
    """File name of shard number ``shard``: ``shard-00000.parquet``."""
    return f"shard-{shard:05d}.parquet"


# ------------------------------------------------------------------------------ driver


def prepare(
    src: Union[str, list[str]],
    out: str,
    *,
    storage: Optional[StorageConfig] = None,
    policy: Optional[InputPolicy] = None,
    rows_per_shard: int = 512,
    progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    shards_per_wave: int = 64,
    columns: Optional[dict] = None,
) -> dict:
    """Validate ``src`` (paths of any data form, read in order as one dataset) into ``out``.

    Returns the manifest (also written to ``out/manifest.json``). ``policy`` holds the input
    limits (``InputPolicy.from_data(data_config)``; image root, size caps, timeouts);
    ``rows_per_shard`` bounds the rows per shard, and so the image bytes one task holds in
    memory; ``max_pixels`` is the decompression-bomb limit per image; ``shards_per_wave``
    bounds how many shard groups the driver hands to Ray at once (and so the driver's memory
    for text); keep it at or above the cluster's CPU count so every CPU gets a shard.
    ``storage`` applies to ``src``, the images and ``out`` alike; its credentials reach the
    Ray tasks through their ``runtime_env``. A missing or unreadable source raises
    :class:`DataSourceError` before anything is written; so does a source of which nothing
    was accepted (after the manifest and rejects are written, so they can be read).
    ``columns`` is the ``data.columns`` mapping for hub Parquet in an unknown layout.
    """
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard={rows_per_shard}: must be at least 1")
    if shards_per_wave < 1:
        raise ValueError(f"shards_per_wave={shards_per_wave}: must be at least 1")
    sources = [src] if isinstance(src, str) else list(src)
    sources = [s if _storage.is_remote(s) else os.path.abspath(s) for s in sources]  # workers lack our cwd
    source = resolve_entry(sources, storage, key="data prepare SRC", columns=columns)
    if source.units[0].form == "prepared":
        raise DataSourceError(source.name, "is already prepared (has manifest.json); give the data it was "
                              "prepared from", "data prepare SRC")
    files = [u.uri for u in source.units]
    if not _storage.is_remote(out):
        out = os.path.abspath(out)
        _warn_if_multi_node(out)
    _clear_output(out, storage)
    policy = policy or InputPolicy()
    uses_s3 = storage is not None or any(map(_storage.is_remote, [*files, out]))
    env = (storage or StorageConfig()).worker_env() if uses_s3 else {}
    task_args = {"out": out, "storage": storage, "max_pixels": max_pixels, "policy": policy}
    state = _run_waves(source, storage, policy, task_args, env, rows_per_shard * shards_per_wave,
                       rows_per_shard, progress)
    manifest = _finish(files, out, storage, state, rows_per_shard)
    if not manifest["shards"]:
        counts = manifest["counts"]
        raise DataSourceError(source.name, f"nothing was accepted: all {counts['total']} samples were rejected "
                              f"({counts['by_reason']}); see {_storage.join(out, REJECTS_NAME)}", "data prepare SRC")
    return manifest


def _run_waves(source, storage, policy, task_args, env, wave_rows, rows_per_shard, progress) -> dict:
    """Stream records, reject bad text at once, hand shard groups to Ray in waves.

    Embedded images (hub Parquet, tars, data: URIs) travel to the tasks base64-encoded in the
    group's JSON, so a wave of such rows holds its images in driver memory: lower
    ``shards_per_wave`` for sources with large embedded images.
    """
    files = [u.uri for u in source.units]
    import ray.data
    from tqdm.auto import tqdm

    state = {"total": 0, "rejects": [], "summaries": [], "next_shard": 0, "dupes": DuplicateIds()}
    bar = tqdm(desc=f"prepare {files[0]}" + (f" (+{len(files) - 1})" if len(files) > 1 else ""),
               unit="sample", disable=not progress)
    ctx = ray.data.DataContext.get_current()
    saved_bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False  # one bar over all waves
    pending: list[dict] = []
    try:
        for row in iter_source_rows(source, storage, policy):
            state["total"] += 1
            state["dupes"].add(row["id"], row["row"])
            if not row["reason"] and any(len(v) for v in row["videos"]):
                row.update(reason="unsupported_field", detail="an embedded video (data: URI) cannot be stored in "
                           "prepared shards; write it to a file and reference its path")
            if row["reason"]:
                state["rejects"].append(_reject(row, files, DataError(row["reason"], row["detail"])))
                bar.update(1)
                continue
            pending.append(_portable(row))
            if len(pending) == wave_rows:
                _run_wave(pending, state, task_args, env, rows_per_shard, bar)
                pending = []
        if pending:
            _run_wave(pending, state, task_args, env, rows_per_shard, bar)
    finally:
        ctx.enable_progress_bars = saved_bars
        bar.close()
    for r in state["rejects"]:
        r["source"] = files[r["source"]] if isinstance(r["source"], int) else r["source"]
    return state


def _portable(row: dict) -> dict:
    """A row as JSON can carry it to a task: embedded image bytes base64-encoded."""
    out = {k: v for k, v in row.items() if k not in ("images", "videos")}
    out["images"] = [base64.b64encode(b).decode("ascii") if b else "" for b in row["images"]]
    return out


def _run_wave(samples: list[dict], state: dict, task_args: dict, env: dict, rows_per_shard: int, bar) -> None:
    import ray.data

    first = state["next_shard"]
    groups = [
        {"shard": first + k, "samples": json.dumps(samples[i: i + rows_per_shard], ensure_ascii=False)}
        for k, i in enumerate(range(0, len(samples), rows_per_shard))
    ]
    ds = ray.data.from_items(groups, override_num_blocks=len(groups)).map_batches(
        _process_groups,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs=task_args,
        num_cpus=1,
        runtime_env={"env_vars": env} if env else None,
    )
    for summary in ds.iter_rows():
        state["summaries"].append(summary)
        state["rejects"].extend(json.loads(summary["rejects"]))
        bar.update(summary["samples"])
    state["next_shard"] = first + len(groups)


def _finish(files: list[str], out: str, storage, state: dict, rows_per_shard: int) -> dict:
    rejects = sorted(state["rejects"], key=lambda r: r["record"])
    _storage.write_bytes(
        _storage.join(out, REJECTS_NAME),
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects).encode(),
        storage,
    )
    manifest = _manifest(files, state["total"], rejects, state["summaries"], rows_per_shard)
    manifest["duplicate_ids"] = state["dupes"].report()
    _storage.write_bytes(
        _storage.join(out, MANIFEST_NAME),
        (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode(),
        storage,
    )
    counts = manifest["counts"]
    log.info(
        "prepared %s -> %s: %d accepted, %d rejected %s, %d shards, %d repeated ids",
        files, out, counts["accepted"], counts["rejected"], counts["by_reason"],
        len(manifest["shards"]), manifest["duplicate_ids"]["count"],
    )
    return manifest


def _warn_if_multi_node(out: str) -> None:
    import ray

    if not ray.is_initialized():
        return
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    if nodes > 1:
        log.warning(
            "prepare: out=%s is a local path but the Ray cluster has %d nodes; each shard "
            "is written on the node whose task made it. Use an s3:// prefix or a filesystem "
            "mounted at the same path on every node.", out, nodes,
        )


def _clear_output(out: str, storage: Optional[StorageConfig]) -> None:
    """Remove a previous run's outputs, manifest first (see the module docstring)."""
    _storage.delete(_storage.join(out, MANIFEST_NAME), storage)
    for rel in _storage.list_files(out, storage):
        if "/" not in rel and _OUTPUT_FILE.fullmatch(rel):
            _storage.delete(_storage.join(out, rel), storage)


def _reject(sample: dict, files: Optional[list[str]], err: DataError) -> dict:
    """One rejects.jsonl entry: ids and places only, never file content."""
    source = sample["source_file"]
    return {"id": sample["id"], "record": sample["row"], "source": files[source] if files else source,
            "index": sample["source_index"], "reason": err.reason, "detail": err.detail}


def _manifest(
    files: list[str], total: int, rejects: list[dict], summaries: list[dict], rows_per_shard: int
) -> dict:
    summaries = sorted(summaries, key=lambda s: s["shard"])
    shards, first_row = [], 0
    for s in summaries:
        if s["path"]:
            shards.append({"shard": s["shard"], "path": s["path"], "rows": s["rows"], "first_row": first_row,
                           "bytes": s["bytes"], "sha256": s["sha256"]})
            first_row += s["rows"]
    if first_row + len(rejects) != total:  # a bug here would silently lose samples
        raise RuntimeError(
            f"internal error: {total} records read but {first_row} accepted + "
            f"{len(rejects)} rejected"
        )
    return {
        "schema_version": SCHEMA_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": files[0] if len(files) == 1 else files,
        "sources": files,
        "counts": {
            "total": total,
            "accepted": first_row,
            "rejected": len(rejects),
            "by_reason": dict(sorted(Counter(r["reason"] for r in rejects).items())),
        },
        "shards": shards,
        "image_count": sum(s["image_count"] for s in summaries),
        "text_only_count": sum(s["text_only_count"] for s in summaries),
        "rows_per_shard": rows_per_shard,
        "row_schema": {f.name: str(f.type) for f in ROW_SCHEMA},
        "rejects": REJECTS_NAME,
    }


# ---------------------------------------------------------------------- Ray Data tasks


def _process_groups(
    batch: pa.Table, *, out: str, storage: Optional[StorageConfig], max_pixels: int, policy: InputPolicy
) -> pa.Table:
    """map_batches UDF: validate each group's images and write its shard; return summaries."""
    summaries = [
        _process_group(shard, samples, out, storage, max_pixels, policy)
        for shard, samples in zip(
            batch.column("shard").to_pylist(), batch.column("samples").to_pylist()
        )
    ]
    return pa.Table.from_pylist(summaries, schema=_SUMMARY_SCHEMA)


def _process_group(
    shard: int, samples_json: str, out: str, storage: Optional[StorageConfig], max_pixels: int,
    policy: InputPolicy,
) -> dict:
    samples = json.loads(samples_json)
    rows, rejects = [], []
    for sample in samples:
        try:
            embedded = sample.get("images") or [""] * len(sample["image_refs"])
            images = [_validated_image(ref, storage, max_pixels, policy, base64.b64decode(b) if b else None)
                      for ref, b in zip(sample["image_refs"], embedded)]
            for ref in sample["video_refs"]:  # decoded at training; here only checked to be a regular file
                probe_file(ref, storage, timeout_s=policy.read_timeout_s)
        except DataError as err:
            rejects.append(_reject(sample, None, err))
            continue
        rows.append({
            "id": sample["id"], "messages": sample["messages"], "images": images, "num_images": len(images),
            "video_refs": sample["video_refs"], "tools": sample["tools"], "source_file": sample["source_file"],
            "source_index": sample["source_index"], "shard": shard, "shard_row": len(rows),
        })
    summary = {
        "shard": shard,
        "path": "",
        "rows": len(rows),
        "bytes": 0,
        "sha256": "",
        "image_count": sum(r["num_images"] for r in rows),
        "text_only_count": sum(1 for r in rows if r["num_images"] == 0),
        "samples": len(samples),
        "rejects": json.dumps(rejects, ensure_ascii=False),
    }
    if rows:
        data = _parquet_bytes(rows)
        name = shard_name(shard)
        _storage.write_bytes(_storage.join(out, name), data, storage)
        summary.update(path=name, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    return summary


def _read(ref: str, storage: Optional[StorageConfig], policy: InputPolicy) -> bytes:
    return load_image(ref, storage, max_bytes=policy.max_image_bytes, timeout_s=policy.read_timeout_s)


def _validated_image(ref: str, storage: Optional[StorageConfig], max_pixels: int, policy: InputPolicy,
                     data: Optional[bytes] = None) -> bytes:
    """Bytes to store for ``ref`` (or for the embedded ``data``): the original, or PNG when decoding had to convert."""
    ref = ref or "embedded image"
    try:
        data = data if data is not None else _read(ref, storage, policy)
        decoded = decode_image_info(data, max_pixels=max_pixels)
    except DataError as err:
        raise DataError(err.reason, err.detail if ref in err.detail else f"{ref}: {err.detail}") from err
    except Exception as err:  # noqa: BLE001 - one broken image must not stop prepare; it is reported
        raise DataError("processing_error", f"{ref}: {type(err).__name__}: {err}"[:500]) from err
    return encode_png(decoded.image) if decoded.converted else data


def _parquet_bytes(rows: list[dict]) -> bytes:
    """One Parquet file in memory, written in row groups so no Arrow array nears 2 GiB."""
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, ROW_SCHEMA, compression="zstd") as writer:
        for i in range(0, len(rows), _ROW_GROUP_ROWS):
            writer.write_table(
                pa.Table.from_pylist(rows[i : i + _ROW_GROUP_ROWS], schema=ROW_SCHEMA)
            )
    return sink.getvalue().to_pybytes()
