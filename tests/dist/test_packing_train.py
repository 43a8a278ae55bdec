"""``data.packing: true`` trains through the real loop and takes the same steps as padded batches.

One process (``LocalSession`` + ``loop.run``: FSDP2 at world size 1, gloo), tiny MiniCPM-V 4.6
(Gated DeltaNet + full attention), fp32. A step reads the same samples packed or not and the loss
is normalised by the same label tokens, so the two runs' per-step losses must agree (the
parameters after every step are the same up to float rounding); the packed run computes only real
tokens (``useful_token_fraction`` 1.0), the padded one pads a mixed-length batch.

Run: python -m pytest -q tests/dist/test_packing_train.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from omni_ray.config import load_config
from omni_ray.models.tiny import build_tiny
from local_training import processed_rows, train_locally, write_dataset

STEPS = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("packing_train")
    return build_tiny("minicpmv4_6", root / "model"), write_dataset(root)


def _losses(model_dir, dataset, tmp_path, packing: bool) -> list[dict]:
    cfg = load_config({
        "model": {"path": str(model_dir), "dtype": "float32"},
        "data": {"train": dataset, "model_max_length": 256, "shuffle": False, "packing": packing,
                 "pack_tokens": 512},
        "freeze": {"vision": "frozen", "projector": "full", "llm": "full", "embeddings": "frozen",
                   "lm_head": "frozen"},
        # 4 samples per step in 2 micro-batches of 2: packed, they fit one row.
        "train": {"max_steps": STEPS, "micro_batch_size": 2, "grad_accum": 2, "lr": 5e-3, "precision": "fp32",
                  "seed": 0},
        "run": {"name": f"pack-{packing}", "storage_path": str(tmp_path / f"runs-{packing}")},
    })
    rows, _ = processed_rows(cfg)
    session, _ = train_locally(cfg, rows)
    return [r for r in session.reports if "loss" in r]


def test_packed_training_takes_the_same_steps(setup, tmp_path):
    model_dir, dataset = setup
    padded = _losses(model_dir, dataset, tmp_path, packing=False)
    packed = _losses(model_dir, dataset, tmp_path, packing=True)
    assert len(packed) == len(padded) == STEPS
    for a, b in zip(packed, padded):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(b["loss"]), (a["loss"], b["loss"])
        assert a["samples_seen"] == b["samples_seen"]
    assert packed[-1]["loss"] < packed[0]["loss"]
    assert all(r["useful_token_fraction"] == 1.0 for r in packed)
    assert all(r["useful_token_fraction"] < 1.0 for r in padded)
    assert all(r["tokens_per_step"] > 0 for r in packed)


@pytest.mark.dist
def test_two_workers_train_packed_rows(ray_local, tiny_minicpmv, color_data, tmp_path):
    """FSDP2 on 2 Ray workers with packing, where the ranks need different numbers of rows.

    Four samples, two per rank: three short (~40 tokens) and one long. Rows of 80 tokens hold two
    short samples but not the long one with another, so whichever rank gets the long sample runs
    two forwards and the other one. The loop gives the other rank an empty (keep-alive) batch so
    both run two (FSDP2 gathers and reduces per forward and backward): without it the run hangs.
    """
    from omni_ray.launch.driver import train, validate

    train_jsonl, _ = color_data
    records = [json.loads(line) for line in Path(train_jsonl).read_text().splitlines()[:4]]
    records[3]["conversations"][1]["content"] = "it is " + " and ".join(["red green blue yellow"] * 3)
    data = Path(train_jsonl).parent / "mixed.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    cfg = load_config({
        "model": {"path": str(tiny_minicpmv), "dtype": "float32"},
        "data": {"train": str(data), "model_max_length": 80, "packing": True, "pack_tokens": 80, "shuffle": False},
        "freeze": {"vision": "frozen", "projector": "full", "llm": "full"},
        "train": {"max_steps": 1, "micro_batch_size": 2, "lr": 5e-3, "precision": "fp32", "log_every": 1},
        "checkpoint": {"async_upload": False},
        "scaling": {"num_workers": 2, "max_failures": 0},
        "run": {"name": "packed-2w", "storage_path": str(tmp_path / "runs")},
    })
    validate(cfg)
    result = train(cfg)
    assert result.error is None
    metrics = result.metrics
    assert metrics["step"] == 1 and metrics["samples_seen"] == 4 and metrics["useful_token_fraction"] == 1.0
    assert metrics["vision_keep_alive_batches"] == 1  # the rank with one row ran one empty batch
