"""``prepare`` end to end on local Ray: real photos, every kind of bad sample, S3 and disk."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pyarrow.parquet as pq

from badsamples import (  # tests/badsamples.py: the shared catalogue of good and bad samples
    ASTRONAUT_JPG, EXPECTED_REJECTS, GOOD_IDS, IMAGES, LOCAL_EXPECTED_REJECTS, MAX_IMAGE_BYTES, MAX_PIXELS,
    RAW_IDS, _dataset_files, write_local,
)
from omni_ray import storage as st
from omni_ray.data.images import decode_image
from omni_ray.data.prepare import ROW_SCHEMA, prepare, read_manifest, shard_uris
from omni_ray.data.reader import InputPolicy

POLICY = InputPolicy(max_image_bytes=MAX_IMAGE_BYTES, read_timeout_s=20)

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def local_src(tmp_path_factory) -> str:
    return str(write_local(tmp_path_factory.mktemp("raw")))  # with the FIFO, symlinks, a directory


@pytest.fixture(scope="module")
def s3_src(ray_local, s3) -> str:
    # ray_local first: Ray's workers start without AWS variables, like on a real cluster,
    # so prepare must hand them over explicitly.
    client = s3.client()
    for rel, data in _dataset_files().items():
        client.put_object(Bucket=s3.bucket, Key=f"raw/{rel}", Body=data)
    return s3.uri("raw/train.jsonl")


def _check_manifest(manifest: dict, src: str, expected: dict) -> None:
    assert manifest["schema_version"] == 2
    assert manifest["source"] == src and manifest["sources"] == [src]
    assert manifest["counts"] == {
        "total": len(GOOD_IDS) + len(expected),
        "accepted": len(GOOD_IDS),
        "rejected": len(expected),
        "by_reason": {
            reason: sorted(expected.values()).count(reason)
            for reason in sorted(set(expected.values()))
        },
    }
    assert manifest["text_only_count"] == 2
    assert manifest["image_count"] == 6  # 1 + 2 + 1 + 1 + 1
    assert all(0 < s["rows"] <= 3 for s in manifest["shards"])
    assert sum(s["rows"] for s in manifest["shards"]) == len(GOOD_IDS)
    assert len({s["path"] for s in manifest["shards"]}) == len(manifest["shards"])
    # Rows are numbered 0..N-1 over accepted samples, in shard order.
    firsts = [s["first_row"] for s in manifest["shards"]]
    assert firsts == [sum(s["rows"] for s in manifest["shards"][:k]) for k in range(len(firsts))]
    assert manifest["duplicate_ids"] == {"count": 0, "examples": []}


def _check_rejects(data: bytes, src: str, expected: dict) -> None:
    rejects = [json.loads(line) for line in data.decode().splitlines()]
    assert {r["id"]: r["reason"] for r in rejects} == expected
    assert all(set(r) == {"id", "record", "source", "index", "reason", "detail"} and r["detail"] for r in rejects)
    assert all(r["source"] == src for r in rejects)
    assert "root:" not in data.decode(), "no file content (here /etc/passwd) in the reject report"
    by_id = {r["id"]: r for r in rejects}
    assert "img/nope.jpg" in by_id["bad-missing"]["detail"]
    assert "corrupt.jpg" in by_id["bad-second-image"]["detail"]
    assert by_id["bad-url"]["detail"].startswith("https://example.com/cat.jpg")
    latin1 = by_id[RAW_IDS[1]]
    assert latin1["index"] == latin1["record"] == int(RAW_IDS[1].split("-")[1])
    assert f"line {latin1['index'] + 1}" in latin1["detail"]


def _check_rows(rows: list[dict]) -> None:
    assert sorted(r["id"] for r in rows) == sorted(GOOD_IDS), "no duplicates, nothing lost"
    by_id = {r["id"]: r for r in rows}
    for row in rows:
        messages = json.loads(row["messages"])
        text = "".join(m["content"] for m in messages)
        assert text.count("<image>") == row["num_images"] == len(row["images"])
        for data in row["images"]:
            image = decode_image(data)
            assert image.mode == "RGB" and min(image.size) > 100
    assert by_id["photo-single"]["images"] == [ASTRONAUT_JPG], "unconverted bytes kept as is"
    assert by_id["photo-multi"]["images"] == [IMAGES["img/rocket.jpg"], IMAGES["img/chelsea.png"]]
    assert json.loads(by_id["photo-noplaceholder"]["messages"])[0]["content"].startswith("<image>\n")
    assert by_id["photo-cmyk"]["images"] == [IMAGES["img/cmyk.jpg"]]
    rgba_stored = by_id["sharegpt-rgba"]["images"][0]
    assert rgba_stored != IMAGES["img/coffee_rgba.png"], "converted image re-encoded"
    stored = Image.open(io.BytesIO(rgba_stored))
    assert stored.format == "PNG" and stored.mode == "RGB"
    assert (np.asarray(stored)[:, :10] == 255).all(), "transparent half composited on white"
    assert by_id["text-1"]["num_images"] == 0 and by_id["text-1"]["images"] == []
    assert by_id["photo-single"]["source_index"] == 0 and by_id["photo-single"]["source_file"] == 0
    assert sorted((r["shard"], r["shard_row"]) for r in rows) == sorted({(r["shard"], r["shard_row"]) for r in rows})


def _read_shards(prefix: str, manifest: dict, storage) -> list[dict]:
    rows = []
    for shard, uri in zip(manifest["shards"], shard_uris(prefix, manifest)):
        data = st.read_bytes(uri, storage)
        assert len(data) == shard["bytes"]
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        fs, path = st.resolve(uri, storage)
        table = pq.read_table(path, filesystem=fs)
        assert table.schema.equals(ROW_SCHEMA)
        assert table.num_rows == shard["rows"]
        rows.extend(table.to_pylist())
    return rows


def test_prepare_into_s3_and_rerun(ray_local, s3, s3_src):
    out = s3.uri("prepared/v1")
    with pytest.raises(FileNotFoundError, match="no manifest.json under .*omni-ray data prepare"):
        read_manifest(out, s3.storage)
    # A stale shard and a manifest from some older run must not survive.
    st.write_bytes(st.join(out, "shard-00099.parquet"), b"stale", s3.storage)
    st.write_bytes(st.join(out, "manifest.json"), b"{}", s3.storage)

    manifest = prepare(s3_src, out, storage=s3.storage, rows_per_shard=3, shards_per_wave=2,
                       progress=False, max_pixels=MAX_PIXELS, policy=POLICY)
    _check_manifest(manifest, s3_src, EXPECTED_REJECTS)
    assert read_manifest(out, s3.storage) == manifest
    _check_rejects(st.read_bytes(st.join(out, "rejects.jsonl"), s3.storage), s3_src, EXPECTED_REJECTS)
    _check_rows(_read_shards(out, manifest, s3.storage))
    assert not st.exists(st.join(out, "shard-00099.parquet"), s3.storage)

    # Ray Data reads the prefix directly (manifest.json/rejects.jsonl are skipped by
    # extension) with an explicit filesystem that carries the credentials to its workers.
    fs = st.s3_filesystem(s3.storage)
    ds = ray_local.data.read_parquet(out, filesystem=fs)
    assert ds.count() == len(GOOD_IDS)
    assert sorted(ds.unique("id")) == sorted(GOOD_IDS)

    # Rerun into the same prefix: same shards, no duplicate rows.
    again = prepare(s3_src, out, storage=s3.storage, rows_per_shard=3, progress=False,
                    max_pixels=MAX_PIXELS, policy=POLICY)
    assert again["shards"] == manifest["shards"], "deterministic shards (same bytes, sha256)"
    files = st.list_files(out, s3.storage)
    assert sorted(files) == sorted(
        ["manifest.json", "rejects.jsonl", *(s["path"] for s in again["shards"])]
    )
    assert ray_local.data.read_parquet(out, filesystem=fs).count() == len(GOOD_IDS)


@pytest.mark.timeout(300)  # a FIFO among the images must not hang it
def test_prepare_local(ray_local, local_src, tmp_path):
    out = str(tmp_path / "prepared")
    manifest = prepare(local_src, out, rows_per_shard=3, progress=True, max_pixels=MAX_PIXELS, policy=POLICY)
    _check_manifest(manifest, local_src, LOCAL_EXPECTED_REJECTS)
    _check_rejects(Path(out, "rejects.jsonl").read_bytes(), local_src, LOCAL_EXPECTED_REJECTS)
    _check_rows(_read_shards(out, manifest, None))
    # Nothing but the outputs: no temporary files left behind.
    assert sorted(os.listdir(out)) == sorted(
        ["manifest.json", "rejects.jsonl", *(s["path"] for s in manifest["shards"])]
    )
    ds = ray_local.data.read_parquet(shard_uris(out, manifest))
    assert ds.count() == len(GOOD_IDS)


# ------------------------------------------------ storage helpers that prepare relies on


@pytest.fixture(params=["local", "s3"])
def prefix(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store"), None
    s3 = request.getfixturevalue("s3")
    return s3.uri(f"store-{request.node.name.split('[')[0]}"), s3.storage


def test_storage_roundtrip(prefix):
    base, storage = prefix
    uri = st.join(base, "a", "b.bin")
    assert not st.exists(uri, storage)
    with pytest.raises(FileNotFoundError, match="no such file or object: .*b.bin"):
        st.read_bytes(uri, storage)
    st.write_bytes(uri, b"one", storage)
    st.write_bytes(uri, b"two", storage)  # overwrite
    st.write_bytes(st.join(base, "c.txt"), b"", storage)
    assert st.read_bytes(uri, storage) == b"two"
    assert st.exists(uri, storage) and st.exists(st.join(base, "a"), storage)
    assert st.list_files(base, storage) == ["a/b.bin", "c.txt"]  # no temporary files
    st.delete(uri, storage)
    st.delete(uri, storage)  # deleting twice is fine
    assert st.list_files(base, storage) == ["c.txt"]
    assert st.list_files(st.join(base, "nothing-here"), storage) == []


def test_download_dir_once_per_node(s3, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    src = s3.uri("download-test/tiny")  # its own prefix: the session bucket is shared
    files = {"config.json": b"{}", "weights/part-0.bin": os.urandom(3 << 20), "tok.json": b"t"}
    for rel, data in files.items():
        st.write_bytes(st.join(src, rel), data, s3.storage)
    cache = str(tmp_path / "cache" / "tiny")
    # Concurrent callers on one node: the flock makes them wait for one download.
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: st.download_dir(src, cache, s3.storage), range(4)))
    assert results == [cache] * 4
    for rel, data in files.items():
        assert Path(cache, rel).read_bytes() == data
    assert sorted(p.name for p in Path(cache).rglob("*") if p.is_file()) == sorted(
        [".complete", ".lock", "config.json", "part-0.bin", "tok.json"]
    )
    # The marker means done: a later call does not touch storage at all.
    s3.client().delete_object(Bucket=s3.bucket, Key="download-test/tiny/config.json")
    assert st.download_dir(src, cache, s3.storage) == cache
    assert Path(cache, "config.json").exists()
    with pytest.raises(FileNotFoundError, match="nothing to download under"):
        st.download_dir(s3.uri("download-test/absent"), str(tmp_path / "other"), s3.storage)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"endpoint_url": "127.0.0.1:9000"}, "endpoint_url.*http://HOST:PORT"),
        ({"endpoint_url": "http://host:9000/bucket"}, "endpoint_url.*has a path"),
        ({"access_key": "x"}, "access_key"),  # credentials are not config fields
    ],
)
def test_storage_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        st.StorageConfig(**kwargs)


def test_worker_env_carries_endpoint_and_region_but_no_credentials(s3):
    env = s3.storage.worker_env()  # the s3 fixture has AWS_* credentials in this environment
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & env.keys()
    assert st.secret_env_names(env) == []
    assert env["AWS_ENDPOINT_URL"] == s3.endpoint_url and env["AWS_REGION"] == "us-east-1"
    assert "AWS_ENDPOINT_URL" not in st.StorageConfig().worker_env()


def test_s3_fixture_restarts_on_same_port(s3):
    """Last in this module: a restart empties moto (in-memory state)."""
    uri = s3.uri("restart/x")
    st.write_bytes(uri, b"x", s3.storage)
    s3.stop()
    try:
        # One attempt: the default 8, with the SDK's backoff, only make the outage take longer to show.
        with pytest.raises(OSError, match="NETWORK_CONNECTION|connect"):
            st.read_bytes(uri, s3.storage.model_copy(update={"max_attempts": 1}))
    finally:
        s3.start()
    assert not st.exists(uri, s3.storage)  # state lost, bucket recreated
    st.write_bytes(uri, b"y", s3.storage)
    assert st.read_bytes(uri, s3.storage) == b"y"
