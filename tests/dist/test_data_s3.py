"""Data from a real S3 endpoint (moto_server) into training on 2 Ray workers, nothing lost.

* prepare + check through the CLI against S3, with every bad kind of sample;
* training straight from the raw JSONL on S3 (images read by Ray Data workers): each bad
  sample is counted under its reason while the rest trains, text-only and image samples are
  mixed with a trainable vision encoder (image-free batches run the vision keep-alive);
* training from the prepared Parquet shards, model and run storage in S3 too.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from badsamples import EXPECTED_REJECTS, MAX_PIXELS, _dataset_files
from omni_ray.config import load_config
from omni_ray.launch.cli import main
from omni_ray.launch.driver import train

pytestmark = pytest.mark.dist

LONG = "describe " * 80  # far beyond model_max_length=96 in the first round: rejected as too_long
TEXT_ONLY = [{"id": f"text-only-{i}", "conversations": [{"role": "user", "content": f"say {i}"},
                                                        {"role": "assistant", "content": str(i)}]} for i in range(8)]
EXTRA = [
    {"id": "too-long", "conversations": [{"role": "user", "content": LONG}, {"role": "assistant", "content": "ok"}]},
    # Fits after dropping its second round: kept, counted as truncated, its image intact.
    {"id": "truncated", "image": "img/astronaut.jpg", "conversations": [
        {"role": "user", "content": "<image>\nwho?"}, {"role": "assistant", "content": "an astronaut"},
        {"role": "user", "content": LONG}, {"role": "assistant", "content": "ok"}]},
]


@pytest.fixture(scope="module")
def s3_inputs(ray_local, s3, tiny_minicpmv, color_data):
    """Upload the tiny model and a raw dataset (bad kinds + colours + text-only) to S3."""
    client = s3.client()
    for f in Path(tiny_minicpmv).iterdir():
        client.put_object(Bucket=s3.bucket, Key=f"models/tiny/{f.name}", Body=f.read_bytes())
    train_jsonl, _ = color_data
    colours = [json.loads(line) for line in train_jsonl.read_text().splitlines()]
    for rec in colours:
        client.put_object(Bucket=s3.bucket, Key=f"raw/{rec['image']}", Body=(train_jsonl.parent / rec["image"]).read_bytes())
    files = _dataset_files()
    lines = files.pop("train.jsonl").splitlines()
    lines += [json.dumps(r).encode() for r in TEXT_ONLY + EXTRA + colours]
    for rel, data in files.items():
        client.put_object(Bucket=s3.bucket, Key=f"raw/{rel}", Body=data)
    client.put_object(Bucket=s3.bucket, Key="raw/train.jsonl", Body=b"\n".join(lines) + b"\n")
    return {"model": s3.uri("models/tiny"), "raw": s3.uri("raw/train.jsonl"), "rows": len(lines)}


def _config(s3, inputs, tmp_path, **overrides):
    raw = {
        "model": {"path": inputs["model"], "dtype": "float32"},
        "data": {"train": inputs["raw"], "model_max_length": 96, "max_bad_fraction": 0.5,
                 "max_image_pixels": MAX_PIXELS},
        "freeze": {"vision": "full", "projector": "full", "llm": "lora"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"micro_batch_size": 1, "lr": 1e-3, "precision": "fp32", "log_every": 10},
        "checkpoint": {"async_upload": False},
        "scaling": {"num_workers": 2, "max_failures": 0},
        "run": {"name": "s3-data", "storage_path": s3.uri("runs")},
        "storage": {"endpoint_url": s3.endpoint_url},
    }
    for section, values in overrides.items():
        raw[section] = {**raw.get(section, {}), **values}
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(raw))
    return path, load_config(raw)


def expected_reasons() -> Counter:
    return Counter(EXPECTED_REJECTS.values()) + Counter({"too_long": 1})


def test_prepare_and_check_on_s3(s3, s3_inputs, tmp_path, capsys):
    shards = s3.uri("shards")
    assert main(["data", "prepare", s3_inputs["raw"], "--out", shards, "--endpoint-url", s3.endpoint_url,
                 "--max-pixels", str(MAX_PIXELS)]) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert counts["rejected"] == len(EXPECTED_REJECTS)
    assert counts["by_reason"] == dict(Counter(EXPECTED_REJECTS.values()))

    config, _ = _config(s3, s3_inputs, tmp_path)
    assert main(["data", "check", shards, "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"samples {s3_inputs['rows']}: ok {s3_inputs['rows'] - sum(expected_reasons().values())}" in out
    for reason, n in expected_reasons().items():
        assert any(line.split()[:2] == [reason, str(n)] for line in out.splitlines()), (reason, out)
    assert "truncated (trailing rounds dropped to fit): 1" in out
    assert "too-long" in out  # the rejected sample is named, not just counted
    # Above the threshold the check fails the command.
    assert main(["data", "check", shards, "--config", str(config), "--set", "data.max_bad_fraction=0.05"]) == 1


def test_train_from_raw_s3_counts_every_bad_sample_and_mixes_text_only(s3, s3_inputs, tmp_path):
    assert s3_inputs["rows"] % 2 == 0, "an even row count keeps streaming_split from dropping rows"
    _, cfg = _config(s3, s3_inputs, tmp_path, train={"max_steps": s3_inputs["rows"] // 2},
                     run={"name": "s3-raw"})
    result = train(cfg)
    assert result.error is None
    m = result.metrics
    assert m["samples_seen"] == s3_inputs["rows"]
    assert Counter(m["rejected"]) == expected_reasons()
    # micro_batch_size 1: every text-only or rejected row makes an image-free batch, which ran
    # the trainable vision encoder on the keep-alive row instead of hanging the other rank.
    assert m["vision_keep_alive_batches"] >= len(TEXT_ONLY)
    assert m["audit"]["vision"]["trainable"] > 0
    assert str(result.checkpoint.path).startswith(f"{s3.bucket}/runs/s3-raw")


def test_train_from_prepared_shards(s3, s3_inputs, tmp_path):
    shards = s3.uri("shards2")
    assert main(["data", "prepare", s3_inputs["raw"], "--out", shards, "--endpoint-url", s3.endpoint_url,
                 "--max-pixels", str(MAX_PIXELS)]) == 0
    # One worker and no shuffle: the 8 rows trained are the first 8 of the shards, in file order
    # (good samples of tests/badsamples.py; the too-long one comes later), so there is one outcome.
    _, cfg = _config(s3, s3_inputs, tmp_path, data={"train": shards, "shuffle": False},
                     train={"max_steps": 4, "micro_batch_size": 2},
                     freeze={"vision": "frozen"}, run={"name": "s3-shards"}, scaling={"num_workers": 1})
    result = train(cfg)
    assert result.error is None
    assert result.metrics["step"] == 4
    assert result.metrics["samples_seen"] == 8
    assert result.metrics["rejected"] == {}
