"""Prepared shards damaged after ``data prepare``: named with the damage, exit 2, never a pyarrow traceback (issue 19, item 7).

Two prepare runs (two colour datasets, 4 shards each); copies of the first then get one shard
truncated, one deleted, one swapped in from the other run, or one byte flipped in place (same
size). ``omni-ray data check`` and ``omni-ray train`` on each stop before any row is read, with
one line naming the shard and what happened to it, and exit 2.

What catches what: every read of the manifest compares each shard's byte size with the one
recorded (one listing of the prefix; train and check): truncated, deleted, and swapped shards
of another size. ``data check`` also compares each shard's sha256, which finds a same-size swap
or damage in place; ``train`` does not read whole shards up front for that.

Run: python -m pytest -q tests/hostile/test_hostile_shards.py
"""

from __future__ import annotations

import shutil

import pytest
import yaml

from omni_ray.data.prepare import prepare
from omni_ray.data.synthetic import make_color_dataset
from omni_ray.launch.cli import main

DAMAGE = {
    "truncated": "shard-00001.parquet is truncated (or replaced)",
    "deleted": "shard-00001.parquet is missing",
    "swapped": "shard-00001.parquet is",  # another run's shard: its size differs (either way)
    "flipped": "shard-00001.parquet has other contents than `data prepare` wrote",
}


@pytest.fixture(scope="module")
def prepared(ray_local, color_data, tiny_minicpmv, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shards")
    prepare(str(color_data[0]), str(tmp / "first"), rows_per_shard=16, progress=False)
    other, _ = make_color_dataset(tmp / "other_data", n_train=64, n_eval=0, seed=7)
    prepare(str(other), str(tmp / "other"), rows_per_shard=16, progress=False)
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": str(tiny_minicpmv), "dtype": "float32"},
        "data": {"train": str(tmp / "first"), "model_max_length": 512},
        "freeze": {"vision": "frozen", "projector": "full", "llm": "frozen"},
        "train": {"max_steps": 1, "micro_batch_size": 2, "precision": "fp32"},
        "scaling": {"num_workers": 1},
        "run": {"name": "damaged", "storage_path": str(tmp / "runs")},
    }))
    for how in DAMAGE:
        out = tmp / how
        shutil.copytree(tmp / "first", out)
        shard = out / "shard-00001.parquet"
        if how == "truncated":
            shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        elif how == "deleted":
            shard.unlink()
        elif how == "swapped":
            shutil.copyfile(tmp / "other" / "shard-00001.parquet", shard)
        else:
            data = bytearray(shard.read_bytes())
            data[len(data) // 2] ^= 0xFF
            shard.write_bytes(bytes(data))
    return tmp, config


@pytest.fixture(autouse=True)
def fresh_log_handler():
    """The CLI's log handler writes to the sys.stderr of the first test that made it; each test captures its own."""
    import logging

    logger = logging.getLogger("omni_ray")
    for handler in [h for h in logger.handlers if getattr(h, "_omni_ray", False)]:
        logger.removeHandler(handler)


def _one_line_exit_2(capsys, argv: list[str]) -> str:
    """The error's one line, last; progress lines before it (train logs its memory estimate) are fine."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith("error: "), err
    assert sum(line.startswith("error: ") for line in err.splitlines()) == 1, err
    return err.splitlines()[-1]


@pytest.mark.parametrize("how", list(DAMAGE))
def test_data_check_names_the_shard_and_the_damage(prepared, capsys, how):
    tmp, config = prepared
    err = _one_line_exit_2(capsys, ["data", "check", str(tmp / how), "--config", str(config)])
    assert DAMAGE[how] in err and str(tmp / how) in err and "omni-ray data prepare" in err, err


@pytest.mark.parametrize("how", ["truncated", "deleted", "swapped"])
def test_train_names_the_shard_before_training(prepared, capsys, how):
    tmp, config = prepared
    err = _one_line_exit_2(capsys, ["train", str(config), "--set", f"data.train={tmp / how}"])
    assert DAMAGE[how] in err, err
    assert not (tmp / "runs" / "damaged").exists() or not any((tmp / "runs" / "damaged").glob("checkpoint_*"))


def test_whole_shards_pass(prepared):
    from omni_ray.data.prepare import read_manifest, verify_shard_checksums

    tmp, _ = prepared
    manifest = read_manifest(str(tmp / "first"))
    verify_shard_checksums(str(tmp / "first"), manifest)
    assert len(manifest["shards"]) == 4
