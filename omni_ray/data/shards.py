"""Prepared shards as readers see them: the manifest ``omni-ray data prepare`` writes last, and the
checks that the shards it lists are still the ones it wrote.

Below both the writer (``data/prepare.py``) and the readers (``data/sources.py``, ``data check``),
so neither has to import the other.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from typing import Optional

from omni_ray import storage as _storage
from omni_ray.data.errors import DataSourceError
from omni_ray.storage import StorageConfig

#: Bumped when the manifest or row layout changes incompatibly.
SCHEMA_VERSION = 2
MANIFEST_NAME = "manifest.json"


def read_manifest(prefix: str, storage: Optional[StorageConfig] = None) -> dict:
    """The manifest of a prepared dataset; it exists only once ``prepare`` has finished.

    Every shard it lists must be there at the size it was written (one listing of the prefix:
    a deleted or truncated shard stops the reader here, naming it, instead of deep inside a
    Parquet read); :func:`verify_shard_checksums` also compares the contents."""
    uri = _storage.join(prefix, MANIFEST_NAME)
    try:
        manifest = json.loads(_storage.read_bytes(uri, storage))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} under {prefix}: run `omni-ray data prepare` first or wait "
            "for it to finish"
        ) from None
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"{uri} has schema_version={version!r}, this omni_ray reads {SCHEMA_VERSION}: "
            "rerun `omni-ray data prepare` with this version"
        )
    _check_shard_sizes(prefix, manifest, storage)
    return manifest


def _damaged(prefix: str, problems: list[str]) -> DataSourceError:
    more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
    return DataSourceError(prefix, f"{len(problems)} damaged shard(s) since `data prepare` wrote them: "
                           f"{'; '.join(problems[:5])}{more}. Rerun `omni-ray data prepare` into this prefix")


def _check_shard_sizes(prefix: str, manifest: dict, storage: Optional[StorageConfig]) -> None:
    """Each listed shard exists with the byte size the manifest records (one listing, no reads)."""
    try:
        sizes = {rel: info.size for rel, info in _storage.list_file_infos(prefix, storage)}
    except OSError as err:
        raise DataSourceError(prefix, f"cannot list the shards ({str(err)[:300]})") from None
    problems = []
    for shard in manifest.get("shards", []):
        name, want = posixpath.normpath(shard["path"]), shard.get("bytes")
        size = sizes.get(name)
        if size is None:
            problems.append(f"{name} is missing (deleted or never copied)")
        elif want is not None and size != want:
            kind = "truncated (or replaced)" if size < want else "replaced or appended to"
            problems.append(f"{name} is {kind}: {size} bytes, the manifest says {want}")
    if problems:
        raise _damaged(prefix, problems)


def verify_shard_checksums(prefix: str, manifest: dict, storage: Optional[StorageConfig] = None,
                           threads: int = 4) -> None:
    """Each shard's sha256 equals the manifest's: catches a shard of the right size swapped in from
    another prepare run, or damaged in place. Reads every shard once (``data check`` does)."""
    from concurrent.futures import ThreadPoolExecutor

    def mismatch(shard: dict) -> Optional[str]:
        digest = hashlib.sha256()
        with _storage.open_input_stream(_storage.join(prefix, posixpath.normpath(shard["path"])), storage) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() == shard["sha256"]:
            return None
        return (f"{shard['path']} has other contents than `data prepare` wrote (sha256 differs from the manifest's: "
                "swapped in from another prepare run, or damaged in place)")

    with ThreadPoolExecutor(max_workers=threads) as pool:
        problems = [p for p in pool.map(mismatch, [s for s in manifest.get("shards", []) if s.get("sha256")]) if p]
    if problems:
        raise _damaged(prefix, problems)


def shard_uris(prefix: str, manifest: dict) -> list[str]:
    """Full URIs of a manifest's shards, for ``ray.data.read_parquet(paths)``."""
    return [_storage.join(prefix, posixpath.normpath(s["path"])) for s in manifest["shards"]]


__all__ = ["MANIFEST_NAME", "SCHEMA_VERSION", "read_manifest", "shard_uris", "verify_shard_checksums"]
