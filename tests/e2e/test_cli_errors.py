"""Every command's expected failures: exit 2, one line naming the key or path, no traceback.

The table runs ``omni_ray.launch.cli.main`` in this process (the code path of the ``omni-ray``
script) against real files, a real moto_server S3 endpoint and a closed port.
"""

from __future__ import annotations

import json
import socket

import pytest
import yaml

from omni_ray.launch.cli import main

pytestmark = pytest.mark.e2e


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def write_config(path, model_path, train="train.jsonl", **sections):
    cfg = {"model": {"path": str(model_path)}, "data": {"train": str(train)}, **sections}
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def damaged_checkpoint(root, model_dir, name="checkpoint_000001"):
    ckpt = root / name
    ckpt.mkdir()
    (ckpt / "weights.safetensors").write_bytes(b"not what the manifest says")
    write_config(ckpt / "config.yaml", model_dir)
    (ckpt / "manifest.json").write_text(json.dumps({
        "format": "omni_ray.checkpoint/1", "layout": "gathered", "step": 1, "epoch": 0, "trainable_only": True,
        "files": {"weights.safetensors": "0" * 64}, "tensors": [], "base_model": str(model_dir)}))
    return str(ckpt)


def cases(tmp, model_dir, s3):
    dead = f"http://127.0.0.1:{closed_port()}"
    (tmp / "file_model").write_text("a file, not a checkpoint directory")
    (tmp / "badjson").mkdir()
    (tmp / "badjson" / "config.json").write_text("{not json")
    (tmp / "taken").write_text("an existing file")
    good = write_config(tmp / "good.yaml", model_dir, train=tmp / "missing.jsonl")
    return {
        "validate: config file missing": (["validate", str(tmp / "nope.yaml")], "nope.yaml"),
        "validate: unknown key": (["validate", write_config(tmp / "k.yaml", model_dir, trian={})], "trian"),
        "validate: model dir without config.json": (["validate", write_config(tmp / "m.yaml", tmp)], "model.path"),
        "validate: model.path is a file": (["validate", write_config(tmp / "f.yaml", tmp / "file_model")],
                                           "model.path"),
        "validate: config.json is not JSON": (["validate", write_config(tmp / "j.yaml", tmp / "badjson")],
                                              "not valid JSON"),
        "validate: S3 endpoint unreachable": (["validate", write_config(
            tmp / "s3dead.yaml", "s3://models/m", storage={"endpoint_url": dead, "max_attempts": 1})],
            "s3://models/m/config.json"),
        "validate: S3 bucket missing": (["validate", write_config(
            tmp / "s3nob.yaml", "s3://no-such-bucket/m", storage={"endpoint_url": s3.endpoint_url})],
            "s3://no-such-bucket/m"),
        "train: data.train missing": (["train", good], "missing.jsonl"),
        "data prepare: source missing": (["data", "prepare", str(tmp / "absent.json"), "--out", str(tmp / "o")],
                                         "absent.json"),
        "data prepare: source is a directory": (["data", "prepare", str(tmp), "--out", str(tmp / "o2")], str(tmp)),
        "data check: prefix missing": (["data", "check", str(tmp / "noshards"), "--config", good], "noshards"),
        "export: checkpoint missing": (["export", str(tmp / "no_ckpt"), "--out", str(tmp / "x")], "no_ckpt"),
        "export: checkpoint damaged": (["export", damaged_checkpoint(tmp, model_dir), "--out", str(tmp / "y")],
                                       "checksum"),
        "export: output path taken": (["export", damaged_checkpoint(tmp, model_dir, "checkpoint_000002"),
                                       "--out", str(tmp / "taken")], "taken"),
    }


CASES = ["validate: config file missing", "validate: unknown key", "validate: model dir without config.json",
         "validate: model.path is a file", "validate: config.json is not JSON", "validate: S3 endpoint unreachable",
         "validate: S3 bucket missing", "train: data.train missing", "data prepare: source missing",
         "data prepare: source is a directory", "data check: prefix missing", "export: checkpoint missing",
         "export: checkpoint damaged", "export: output path taken"]


@pytest.mark.parametrize("case", CASES)
def test_expected_failures_exit_2_with_one_line(case, tmp_path, tiny_minicpmv, s3, capsys):
    argv, must_name = cases(tmp_path, tiny_minicpmv, s3)[case]
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(lines) == 1 and must_name in lines[0], err
    assert "Traceback" not in err, err
