"""MiniCPM-V 4.6 model options that change the model as well as the processor (issue 10, defects 6, 7).

* ``model.processor.downsample_mode: 4x`` (the model card's finer-detail option): the processor
  emits 4x the image tokens and the model skips its ViT insert merger; on main only the processor
  changed and training crashed ("features and tokens do not match").
* A tied lm_head (the published 4.6 ties it to the input embeddings): ``lm_head: full`` trains
  that one matrix; on main it trained nothing.

Both train through the real loop in this process (``LocalSession``).

Run: python -m pytest -q tests/dist/test_minicpmv_options.py
"""

from __future__ import annotations

import math

import pytest
import torch

from local_training import processed_rows, train_locally, write_dataset
from omni_ray.config import ConfigError, ModelConfig, load_config
from omni_ray.models.loading import resolve_spec
from omni_ray.models.tiny import build_tiny_minicpmv


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory):
    return build_tiny_minicpmv(tmp_path_factory.mktemp("tied") / "m", tie_embeddings=True)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("mixed"))


def _config(model_dir, dataset, tmp_path, freeze: dict, processor: dict | None = None):
    return load_config({
        "model": {"path": str(model_dir), "dtype": "float32", "processor": processor or {}},
        "data": {"train": dataset, "model_max_length": 512, "shuffle": False},
        "freeze": freeze,
        "train": {"max_steps": 2, "micro_batch_size": 4, "lr": 1e-2, "precision": "fp32"},
        "run": {"name": "options", "storage_path": str(tmp_path / "runs")},
    })


def test_downsample_4x_trains_with_4x_image_tokens(tied_model, dataset, tmp_path):
    freeze = {"vision": "full", "projector": "full", "llm": "frozen"}
    rows_16x, _ = processed_rows(_config(tied_model, dataset, tmp_path, freeze))
    cfg = _config(tied_model, dataset, tmp_path, freeze, {"downsample_mode": "4x"})
    rows_4x, _ = processed_rows(cfg)
    by_id = {r["id"]: r for r in rows_16x}
    # One 2x2 merge instead of two: about 4x the tokens (each side rounds to 2 patches, not 4).
    for row in rows_4x:
        assert row["num_image_tokens"] >= 3 * by_id[row["id"]]["num_image_tokens"], row["id"]
    assert sum(r["num_image_tokens"] for r in rows_4x) > 0
    session, _ = train_locally(cfg, rows_4x)
    losses = [r["loss"] for r in session.reports if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_downsample_mode_value_is_checked_at_validate(tied_model):
    model = ModelConfig(path=str(tied_model), processor={"downsample_mode": "8x"})
    with pytest.raises(ConfigError, match=r"model.processor.downsample_mode: '8x' is not one of \['16x', '4x'\]"):
        resolve_spec(model, {"model_type": "minicpmv4_6"})


def test_tied_lm_head_full_trains_the_shared_matrix(tied_model, dataset, tmp_path):
    freeze = {"vision": "frozen", "projector": "frozen", "llm": "frozen", "embeddings": "frozen", "lm_head": "full"}
    cfg = _config(tied_model, dataset, tmp_path, freeze)
    rows, _ = processed_rows(cfg)
    session, model = train_locally(cfg, rows)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["model.language_model.embed_tokens.weight"]
    assert model.lm_head.weight is model.get_input_embeddings().weight  # still one tensor
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(tied_model).lm_head.weight
    head = model.lm_head.weight
    head = head.full_tensor() if hasattr(head, "full_tensor") else head
    assert not torch.equal(head.detach(), base)  # the output projection trained
