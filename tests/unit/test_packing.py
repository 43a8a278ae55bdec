"""Packing logic without a model: row planning, one packed row's arrays, the config keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omni_ray.config import ConfigError, load_config
from omni_ray.data.conversation import IGNORE_INDEX
from omni_ray.data.packing import check_packing, pack_row, pack_samples, plan_rows
from omni_ray.train.packing import varlen_kwargs

IMAGE_INPUTS = {"pixel_values": -1, "target_sizes": 0}  # MiniCPM-V's NaViT layout


def sample(n: int, images: int = 0, first: int = 10) -> dict:
    ids = np.arange(first, first + n, dtype=np.int64)
    labels = ids.copy()
    labels[: n // 2] = IGNORE_INDEX  # the prompt
    out = {"input_ids": ids, "labels": labels, "num_images": np.int64(images), "num_videos": np.int64(0)}
    if images:
        out["pixel_values"] = np.full((1, 3, 14, 14 * 4 * images), first, dtype=np.float32)
        out["target_sizes"] = np.tile(np.array([[2, 2]], dtype=np.int32), (images, 1))
    return out


def test_first_fit_in_stream_order():
    assert plan_rows([5, 4, 3, 2, 6], 8) == [[0, 2], [1, 3], [4]]
    assert plan_rows([8, 8], 8) == [[0], [1]]
    assert plan_rows([], 8) == []


def test_a_sample_longer_than_a_row_is_an_error_not_a_cut():
    with pytest.raises(ValueError, match="data.pack_tokens"):
        plan_rows([3, 9], 8)


def test_packed_row_restarts_positions_and_ignores_each_first_token():
    a, b = sample(4, images=1, first=10), sample(6, first=20)
    row = pack_row([a, b], IMAGE_INPUTS)
    assert row["input_ids"].tolist() == [[10, 11, 12, 13, 20, 21, 22, 23, 24, 25]]
    assert row["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]]
    # Each sample keeps its own labels; the first token of every sample is never a target.
    assert row["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 12, 13, IGNORE_INDEX, IGNORE_INDEX,
                                       IGNORE_INDEX, 23, 24, 25]]
    assert int(row["num_label_tokens"]) == 5
    assert "attention_mask" not in row
    assert row["seq_lens"].tolist() == [4, 6] and row["seq_images"].tolist() == [1, 0]
    assert row["pixel_values"].shape == (1, 3, 14, 56) and row["target_sizes"].tolist() == [[2, 2]]
    assert int(row["keep_alive"]) == 0


def test_images_of_all_samples_go_along_in_order():
    rows = pack_samples([sample(3, 1, first=1), sample(3, 2, first=2)], 16, IMAGE_INPUTS)
    assert len(rows) == 1
    pixels = rows[0]["pixel_values"]
    assert pixels.shape == (1, 3, 14, 56 * 3)
    assert torch.equal(pixels[..., :56], torch.full((1, 3, 14, 56), 1.0))
    assert rows[0]["target_sizes"].shape == (3, 2)


def test_row_without_images_gets_the_vision_keep_alive():
    keep_alive = sample(2, images=1, first=90)
    row = pack_row([sample(4)], IMAGE_INPUTS, keep_alive)
    assert int(row["keep_alive"]) == 1
    assert row["seq_lens"].tolist() == [4, 2]
    assert (row["labels"][0, 4:] == IGNORE_INDEX).all()  # the keep-alive sample trains nothing
    assert int(row["num_label_tokens"]) == 2
    with_image = pack_row([sample(4, images=1)], IMAGE_INPUTS, keep_alive)
    assert int(with_image["keep_alive"]) == 0 and with_image["seq_lens"].tolist() == [4]


def test_varlen_kwargs_are_cumulative_lengths():
    kw = varlen_kwargs(torch.tensor([4, 6, 3]))
    assert kw["cu_seq_lens_q"].tolist() == [0, 4, 10, 13] and kw["cu_seq_lens_q"].dtype == torch.int32
    assert kw["max_length_q"] == kw["max_length_k"] == 6


def _cfg(**data):
    return {"model": {"path": "/m"}, "data": {"train": "/d/train.jsonl", **data}}


def test_config_keys():
    assert load_config(_cfg()).data.row_tokens() is None  # off by default
    assert load_config(_cfg(packing=True, model_max_length=1024)).data.row_tokens() == 1024
    assert load_config(_cfg(packing=True, pack_tokens=4096, model_max_length=1024)).data.row_tokens() == 4096
    with pytest.raises(ConfigError, match="data.pack_tokens: 512 is below data.model_max_length"):
        load_config(_cfg(packing=True, pack_tokens=512, model_max_length=1024))
    with pytest.raises(ConfigError, match="pack_tokens"):
        load_config(_cfg(packing=True, pack_tokens=0))


def test_untested_architectures_are_refused_by_name():
    check_packing("minicpmv4_6", True)
    check_packing("gemma3", False)
    for arch in ("gemma3", "minicpmv4_7"):
        with pytest.raises(ConfigError, match=f"data.packing: not supported for '{arch}'"):
            check_packing(arch, True)
