"""``data.packing: true`` trains through the real loop and takes the same steps as padded batches.

One process (``LocalSession`` + ``loop.run``: FSDP2 at world size 1, gloo), tiny MiniCPM-V 4.6
(Gated DeltaNet + full attention), fp32. A step reads the same samples packed or not and the loss
is normalised by the same label tokens, so the two runs' per-step losses must agree (the
parameters after every step are the same up to float rounding); the packed run computes only real
tokens (``useful_token_fraction`` 1.0), the padded one pads a mixed-length batch.

Run: python -m pytest -q tests/dist/test_packing_train.py
"""

from __future__ import annotations

import pytest

from omni_ray.config import load_config
from omni_ray.models.tiny import build_tiny
from local_training import processed_rows, train_locally, write_dataset

STEPS = 3


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
