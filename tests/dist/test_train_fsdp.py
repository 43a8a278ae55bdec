"""A 2-worker FSDP2 run on a local Ray (gloo) trains the tiny MiniCPM-V with a freeze map.

The run saves full sharded checkpoints (trainable_only: false -> DCP, every rank its own
files), so the test can compare every tensor with the base checkpoint: frozen ones must be
bit-identical, trained ones must have moved. The same run then continues on one worker: DCP
reshards the model and optimizer onto the new world size.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from omni_ray.config import load_config
from omni_ray.freeze import base_name
from omni_ray.launch.driver import train, validate
from omni_ray.train.checkpoint import load_tensors, read_manifest

pytestmark = pytest.mark.dist


def test_fsdp_two_workers_freeze_map_holds(ray_local, tiny_minicpmv, color_data, tmp_path):
    train_jsonl, _ = color_data
    cfg = load_config({
        "model": {"path": str(tiny_minicpmv), "dtype": "float32"},
        "data": {"train": str(train_jsonl), "model_max_length": 64, "max_bad_fraction": 0.0},
        "freeze": {"vision": "frozen", "projector": "full", "llm": {"mode": "lora", "last_n_layers": 2},
                   "overrides": [{"pattern": r"language_model\.norm\.", "mode": "full"}]},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 4, "micro_batch_size": 4, "grad_accum": 2, "lr": 5e-3, "precision": "bf16",
                  "log_every": 2},
        "checkpoint": {"trainable_only": False, "async_upload": False, "every_n_steps": 2},
        "scaling": {"num_workers": 2, "max_failures": 0},
        "run": {"name": "fsdp-freeze", "storage_path": str(tmp_path / "runs")},
    })
    plan = validate(cfg).plan
    result = train(cfg)
    assert result.error is None
    metrics = result.metrics
    assert metrics["step"] == 4 and metrics["frozen_unchanged"] is True
    # The audit table (every rank checked it; rank 0 reports it) matches the plan per group.
    for row in plan.rows():
        assert metrics["audit"][row["group"]] == {"planned": row["trainable"], "trainable": row["trainable"]}, row

    ckpt = Path(result.checkpoint.to_directory())
    manifest = read_manifest(ckpt)  # checks every rank's file against its checksum
    assert manifest["trainable_only"] is False and manifest["layout"] == "sharded"
    assert {"__0_0.distcp", "__1_0.distcp"} <= set(manifest["files"])  # both ranks' shards arrived
    saved = {k: v for k, v in load_tensors(ckpt).items() if not k.endswith("_buffers")}
    base = load_file(str(Path(tiny_minicpmv) / "model.safetensors"))
    frozen_checked = trained_moved = 0
    for name, tensor in saved.items():
        base_key, is_lora = base_name(name)
        if is_lora:
            if ".lora_B." in name:  # B starts at zero; training must have moved it
                assert tensor.abs().sum() > 0, name
                trained_moved += 1
            continue
        before = base[base_key]
        if base_key in plan.full_names:
            assert not torch.equal(tensor, before), f"{base_key} was trained but did not change"
            trained_moved += 1
        else:
            # Frozen weights are stored in the precision's dtype (train.frozen_dtype: auto): the base
            # value rounded once to bf16, then never changed.
            assert tensor.dtype == torch.bfloat16, base_key
            assert torch.equal(tensor, before.to(tensor.dtype)), f"{base_key} is frozen but changed"
            frozen_checked += 1
    assert frozen_checked == len(plan.frozen_names)
    assert trained_moved == len(plan.full_names) + len(plan.lora_modules)

    # Continue the same run on one worker: resumes at step 4 from the 2-rank DCP checkpoint.
    one = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"num_workers": 1}),
                                 "train": cfg.train.model_copy(update={"max_steps": 6})})
    result = train(one)
    assert result.metrics["resumed_from_step"] == 4 and result.metrics["step"] == 6
    after = {base_name(k)[0]: v for k, v in load_tensors(Path(result.checkpoint.to_directory())).items()
             if not base_name(k)[1]}
    for name in plan.frozen_names:
        assert torch.equal(after[name], base[name].to(after[name].dtype)), name
