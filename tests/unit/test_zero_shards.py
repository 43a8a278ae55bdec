"""The sharded ZeRO checkpoint reader, without DeepSpeed or a process group (what export runs).

Rank files are written here the way ``zero_state.save_local_shard`` lays them out (tensors
``{kind}/{name}``, an ``omni_ray`` metadata entry with each fragment's offset and full shape), so
the reader's reassembly and its refusals are checked on their own; the files DeepSpeed writes are
checked end to end in tests/dist/test_deepspeed_resume.py and test_engine_interface.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from omni_ray.strategies.zero_state import SHARD_FORMAT, ShardError, ShardReader, shard_file_name

FULL = torch.arange(24, dtype=torch.float32).reshape(4, 6)
BIAS = torch.arange(5, dtype=torch.float32) + 100


def write_rank(directory, rank: int, world: int, parts: dict[str, tuple[int, torch.Tensor, list]]) -> None:
    """parts: name -> (offset, flat fragment of the weight, full shape); moments = fragment * 2, * 3."""
    tensors, index = {}, {}
    for name, (offset, fragment, shape) in parts.items():
        tensors.update({f"param/{name}": fragment, f"exp_avg/{name}": fragment * 2, f"exp_avg_sq/{name}": fragment * 3})
        index[name] = {"offset": offset, "shape": shape, "trained": True}
    meta = {"format": SHARD_FORMAT, "rank": rank, "world_size": world, "adam_step": 7.0, "index": index}
    save_file(tensors, str(directory / shard_file_name(rank, world)), metadata={"omni_ray": json.dumps(meta)})


def two_ranks(directory) -> None:
    """ZeRO-2-like split: the weight cut at element 10, the bias wholly on rank 1."""
    flat = FULL.flatten()
    write_rank(directory, 0, 2, {"w": (0, flat[:10].clone(), [4, 6])})
    write_rank(directory, 1, 2, {"w": (10, flat[10:].clone(), [4, 6]), "b": (0, BIAS.clone(), [5])})


def test_reassembles_full_tensors_and_any_range_across_rank_files(tmp_path):
    two_ranks(tmp_path)
    reader = ShardReader.from_dir(tmp_path)
    assert torch.equal(reader.full("param", "w"), FULL) and torch.equal(reader.full("param", "b"), BIAS)
    assert torch.equal(reader.full("exp_avg_sq", "w"), FULL * 3)
    assert torch.equal(reader.read("exp_avg", "w", 8, 5), FULL.flatten()[8:13] * 2)  # spans both files
    assert reader.read("param", "w", 3, 0).numel() == 0
    assert reader.adam_step == 7.0 and reader.trained == {"w": True, "b": True}


def test_refuses_an_incomplete_or_foreign_set_of_files(tmp_path):
    two_ranks(tmp_path)
    (tmp_path / shard_file_name(1, 2)).unlink()
    with pytest.raises(ShardError, match="not one file per rank"):
        ShardReader.from_dir(tmp_path)

    gap = tmp_path / "gap"
    gap.mkdir()
    flat = FULL.flatten()
    write_rank(gap, 0, 2, {"w": (0, flat[:10].clone(), [4, 6])})
    write_rank(gap, 1, 2, {"w": (12, flat[12:].clone(), [4, 6])})  # elements 10, 11 written by nobody
    with pytest.raises(ShardError, match="hold 22 of elements"):
        ShardReader.from_dir(gap).full("param", "w")

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    save_file({"x": torch.zeros(2)}, str(foreign / shard_file_name(0, 1)))
    with pytest.raises(ShardError, match="not an omni_ray ZeRO shard"):
        ShardReader.from_dir(foreign)
    with pytest.raises(ShardError, match="no ZeRO shard files"):
        ShardReader.from_dir(tmp_path / "gap", names=["manifest.json"])
