"""Every jobs/*.yaml trains, not only validates: 2 steps on a tiny model of its architecture.

Each job's own config (freeze map, LoRA, flags, strategy, precision, gradient checkpointing) runs
through the real loop in this process (``LocalSession``, world size 1, gloo); only what names the
cluster is replaced: the checkpoint (a tiny model of the job's architecture), the data (a small
mixed dataset), one CPU worker, a local run folder, 2 steps.

Run: python -m pytest -q tests/dist/test_jobs_train.py
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from local_training import processed_rows, train_locally, write_dataset
from omni_ray.config import load_config
from omni_ray.models.tiny import build_tiny

REPO_ROOT = Path(__file__).resolve().parents[2]
JOB_CONFIGS = sorted((REPO_ROOT / "jobs").glob("*.yaml"))
# The job's checkpoint -> the tiny model standing in for it. 12 text layers, so a job's
# last_n_layers: 8 leaves layers frozen in front of the trained ones, as on the real 24.
TINY = {
    "MiniCPM-V-4_6": ("minicpmv4_6", {"text_layers": 12}),
    "Qwen2.5-VL-7B-Instruct": ("qwen2_5_vl", {}),
}


def _overrides(path: Path, values: dict) -> list[str]:
    """``--set`` items; a key the job sets through a MiniCPM-V flag is set through that flag."""
    from omni_ray.config import _FLAG_KEYS

    raw = yaml.safe_load(path.read_text())
    by_key = {dotted: flag for flag, (_, dotted) in _FLAG_KEYS.items() if flag in raw}
    items = []
    for key, value in values.items():
        if key == "train.warmup_steps" and "warmup_ratio" in raw:
            continue  # the job's warmup_ratio turns into steps of the overridden max_steps
        items.append(f"{by_key.get(key, key)}={value}")
    return items


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {name: build_tiny(arch, root / arch, **kw) for name, (arch, kw) in TINY.items()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("mixed"))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Preference pairs (RLAIF-V format) for the jobs with train.objective: dpo."""
    from omni_ray.data.synthetic import make_color_pairs

    return make_color_pairs(tmp_path_factory.mktemp("pairs"), n_train=8, n_eval=1)[0]


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=[p.name for p in JOB_CONFIGS])
def test_job_trains_on_a_tiny_model(path, tiny_models, dataset, pairs, tmp_path):
    job = load_config(path)
    checkpoint = job.model.path.rstrip("/").rsplit("/", 1)[-1]
    assert checkpoint in TINY, f"{path.name}: add a tiny stand-in for {job.model.path} to TINY"
    cfg = load_config(path, _overrides(path, {
        "model.path": tiny_models[checkpoint], "data.train": pairs if job.train.objective == "dpo" else dataset,
        "data.model_max_length": 512,
        "scaling.num_workers": 1, "scaling.use_gpu": "false", "run.storage_path": tmp_path / "runs",
        "train.max_steps": 2, "train.micro_batch_size": 2, "train.grad_accum": 1, "train.warmup_steps": 0,
    }))
    assert cfg.freeze == job.freeze and cfg.lora == job.lora and cfg.strategy == job.strategy  # the job's own map
    rows, _ = processed_rows(cfg)
    session, model = train_locally(cfg, rows)
    last = [r for r in session.reports if "loss" in r][-1]
    assert last["step"] == 2 and math.isfinite(last["loss"]), last
    assert last["frozen_unchanged"] is True
    if job.train.objective == "dpo":
        assert 0.0 <= last["rewards_accuracy"] <= 1.0 and math.isfinite(last["rewards_margin"]), last
    trained = {g: row["trainable"] for g, row in last["audit"].items()}
    assert sum(trained.values()) > 0 and trained == {g: row["planned"] for g, row in last["audit"].items()}
    assert session.reports[-1]["checkpoint"], "the run ends with a checkpoint"
