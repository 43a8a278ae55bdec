"""Throttled and flaky S3: prepare, training with S3 checkpoints and export finish, and match an undisturbed run (issue 19, item 5).

Every request to the real moto endpoint goes through ``s3faults.FaultyS3``: a seeded quarter of
the distinct requests is answered ``503 SlowDown`` or has its connection cut in the middle of
the upload or download on its first attempt. The AWS SDK's retries (``storage.max_attempts``,
used by every S3 client omni_ray makes: pyarrow's filesystem in the driver, in Ray Data tasks
and for Ray Train's checkpoint uploads) carry each one through:

* ``data prepare`` through the faults writes the same shards (sha256) as without them;
* training from those shards with checkpoints in S3, then ``export``: the exported weights equal
  those of the same run against the endpoint directly;
* the retries are bounded: a request that fails as many times as ``storage.max_attempts`` fails
  for good, with S3's own error.

Run: python -m pytest -q tests/hostile/test_hostile_s3_faults.py
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from omni_ray import storage as st
from omni_ray.config import load_config
from omni_ray.data.prepare import prepare
from omni_ray.export import export
from omni_ray.launch.driver import train
from omni_ray.train.checkpoint import find_latest
from s3faults import FaultyS3


@pytest.fixture(scope="module")
def faulty(s3):
    proxy = FaultyS3(s3.port, seed=0, fraction=0.25, fail_attempts=1)
    yield proxy
    proxy.close()


def test_retries_are_bounded_by_max_attempts(s3, tmp_path):
    # Over 1 KB: the AWS SDK writes a 503's body into the read buffer of the ranged GET, and a
    # retry of a read smaller than that body fails ("Failed to flush response stream").
    payload = os.urandom(4096)
    s3.client().put_object(Bucket=s3.bucket, Key="bounded/obj", Body=payload)
    proxy = FaultyS3(s3.port, seed=1, fraction=1.0, fail_attempts=2, kinds=("slowdown",))
    try:
        with pytest.raises(OSError, match="503"):  # 2 attempts, both throttled (HEAD answers have no body)
            st.read_bytes(s3.uri("bounded/obj"), st.StorageConfig(endpoint_url=proxy.endpoint_url, max_attempts=2))
        proxy.attempts.clear()
        assert st.read_bytes(s3.uri("bounded/obj"),
                             st.StorageConfig(endpoint_url=proxy.endpoint_url, max_attempts=3)) == payload
    finally:
        proxy.close()


@pytest.fixture(scope="module")
def shards(ray_local, s3, faulty, color_data):
    """The colour dataset prepared into S3 twice: through the faults and directly."""
    train_jsonl, _ = color_data
    through = st.StorageConfig(endpoint_url=faulty.endpoint_url, max_attempts=4)
    flaky = prepare(str(train_jsonl), s3.uri("faults/flaky"), storage=through, rows_per_shard=16, progress=False)
    clean = prepare(str(train_jsonl), s3.uri("faults/clean"), storage=s3.storage, rows_per_shard=16, progress=False)
    return flaky, clean


def test_prepare_through_faults_writes_the_same_shards(shards, faulty):
    flaky, clean = shards
    assert [(s["path"], s["sha256"]) for s in flaky["shards"]] == [(s["path"], s["sha256"]) for s in clean["shards"]]
    assert flaky["counts"] == clean["counts"]
    assert faulty.stats["slowdown"] and faulty.stats["cut_upload"] + faulty.stats["cut_download"], faulty.stats


def _config(s3, model, endpoint: str, name: str):
    return load_config({
        "model": {"path": str(model), "dtype": "float32"},
        "data": {"train": s3.uri("faults/clean"), "model_max_length": 64, "shuffle": False},
        "freeze": {"vision": "frozen", "projector": "full", "llm": "frozen"},
        "train": {"max_steps": 2, "micro_batch_size": 2, "lr": 1e-3, "precision": "fp32"},
        "checkpoint": {"every_n_steps": 1, "async_upload": False},
        "scaling": {"num_workers": 1, "max_failures": 0},
        "run": {"name": name, "storage_path": s3.uri("faults/runs")},
        "storage": {"endpoint_url": endpoint, "max_attempts": 4},
    })


def _train_and_export(cfg, out) -> dict[str, torch.Tensor]:
    result = train(cfg)
    assert result.error is None
    storage = cfg.storage
    step, uri = find_latest(st.join(cfg.run.storage_path, cfg.run.name), storage)
    assert step == 2
    export(uri, str(out), storage=storage)
    return {k: v for f in sorted(os.listdir(out)) if f.endswith(".safetensors") for k, v in load_file(out / f).items()}


def test_training_and_export_through_faults_match_a_clean_run(shards, s3, faulty, tiny_minicpmv, tmp_path):
    before = sum(faulty.stats.values())
    flaky = _train_and_export(_config(s3, tiny_minicpmv, faulty.endpoint_url, "flaky"), tmp_path / "flaky")
    assert sum(faulty.stats.values()) > before  # the run's own requests went through the faults
    clean = _train_and_export(_config(s3, tiny_minicpmv, s3.endpoint_url, "clean"), tmp_path / "clean")
    assert flaky.keys() == clean.keys() and flaky
    for name in clean:
        assert torch.equal(flaky[name], clean[name]), name
