"""One batch type: every builder returns a ``Batch``, the model never sees the loop's entries, and no
module keeps its own list of which keys are which."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import torch

from omni_ray.data.batch import LOOP_KEYS, PACKING_KEYS, TOKEN_PADDING, Batch
from omni_ray.data.collate import collate
from omni_ray.data.conversation import IGNORE_INDEX
from omni_ray.data.packing import pack_row
from omni_ray.data.pair_processor import collate_pairs

PACKAGE = Path(__file__).resolve().parents[2] / "omni_ray"


def sample(n: int, images: int = 0) -> dict:
    labels = np.full(n, IGNORE_INDEX)
    labels[n // 2:] = np.arange(n - n // 2) + 5
    out = {"input_ids": np.arange(n) + 5, "labels": labels, "num_images": np.array(images)}
    if images:
        out["pixel_values"] = np.ones((images, 3, 4, 4), dtype=np.float32)
    return out


def test_every_builder_returns_a_batch_whose_model_inputs_hold_no_loop_entry():
    padded = collate([sample(6, 1), sample(4)], {"pixel_values": 0}, pad_token_id=0)
    packed = pack_row([sample(6, 1), sample(4)], {"pixel_values": 0})
    pair = {**{f"chosen_{k}": v for k, v in sample(6).items() if k in TOKEN_PADDING},
            **{f"rejected_{k}": v for k, v in sample(5).items() if k in TOKEN_PADDING}, "num_images": 0}
    pairs = collate_pairs([pair], {"pixel_values": 0})
    for batch in (padded, packed, pairs):
        assert isinstance(batch, Batch)
        assert not set(batch.model_inputs()) & set(LOOP_KEYS)
        assert batch.label_tokens == int((batch.labels != IGNORE_INDEX).sum())
    assert padded.model_inputs()["pixel_values"].shape[0] == 1 and not padded.packed and not padded.keep_alive
    assert padded.samples() == 2 and padded.real_tokens() == 10
    assert packed.packed and [t.tolist() for t in packed.packing()] == [[6, 4], [1, 0], [0, 0]]
    assert packed.samples() == 2
    assert int(pairs["pairs"]) == 1 and pairs["input_ids"].shape[0] == 2


def test_model_inputs_move_to_the_device_and_leave_the_batch_whole():
    batch = collate([sample(4)], {}, pad_token_id=0)
    inputs = batch.model_inputs(torch.device("cpu"))
    assert set(inputs) == {"input_ids", "attention_mask"} and "labels" in batch


def test_no_module_keeps_its_own_key_list():
    """A literal list of two or more batch keys outside data/batch.py is a second declaration."""
    declared = set(LOOP_KEYS) | set(TOKEN_PADDING) | set(PACKING_KEYS)
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "batch.py" and path.parent.name == "data":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                keys = {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
                if len(keys & declared) >= 2 and keys <= declared:
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {sorted(keys)}")
    assert found == [], "use omni_ray.data.batch instead:\n" + "\n".join(found)
