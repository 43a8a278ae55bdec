"""The data position is a set of row positions: duplicate ids train, and resume skips exactly what ran.

Two MiniCPM-V files that both number ids from "0" (as its README examples do) are one dataset of
12 rows. In one process (the local session runs the same loop as a Ray worker): a fresh run
trains all 12 once per epoch (it trained 6 and stopped, exit 0, when rows were keyed by id); a
run stopped after 2 steps and resumed from its checkpoint trains the other rows, none twice.
"""

from __future__ import annotations

import json

import pytest
import torch

from omni_ray.config import load_config
from omni_ray.data.position import PositionSet
from trainkit import local_run, processed_rows

pytestmark = pytest.mark.dist

N = 6  # rows per file


@pytest.fixture(scope="module")
def two_files(color_data):
    train_jsonl, _ = color_data
    lines = [json.loads(line) for line in train_jsonl.read_text().splitlines()]
    files = []
    for name, part in (("a.json", lines[:N]), ("b.json", lines[N:2 * N])):
        records = [{**rec, "id": str(i)} for i, rec in enumerate(part)]  # both files number ids from 0
        (train_jsonl.parent / name).write_text(json.dumps(records))
        files.append(str(train_jsonl.parent / name))
    return files


def config(tiny_minicpmv, files, tmp_path, **train):
    return load_config({
        "model": {"path": str(tiny_minicpmv), "dtype": "float32"},
        "data": {"train": files, "model_max_length": 64, "shuffle_buffer": 4},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"epochs": 1, "micro_batch_size": 2, "lr": 1e-3, "precision": "fp32", **train},
        "run": {"name": "position", "storage_path": str(tmp_path)},
    })


@pytest.fixture(scope="module")
def rows(tiny_minicpmv, two_files, tmp_path_factory):
    """Processed once for both tests (the preprocessing does not depend on the run folder)."""
    return processed_rows(config(tiny_minicpmv, two_files, tmp_path_factory.mktemp("rows")), two_files)


def trained_positions(report: dict) -> set[int]:
    state = torch.load(f"{report['checkpoint']}/train_state.pt", weights_only=True)
    return {i for a, b in PositionSet.from_json(state["consumed"]).ranges() for i in range(a, b)}


def test_duplicate_ids_train_every_row_once_per_epoch(tiny_minicpmv, two_files, rows, tmp_path):
    cfg = config(tiny_minicpmv, two_files, tmp_path)
    assert [r["id"] for r in rows] == [str(i) for i in range(N)] * 2
    last = local_run(cfg, rows).reports[-1]
    assert (last["step"], last["samples_seen"]) == (2 * N // 2, 2 * N)
    assert trained_positions(last) == set(range(2 * N))


def test_resume_skips_exactly_the_rows_already_trained(tiny_minicpmv, two_files, rows, tmp_path):
    cfg = config(tiny_minicpmv, two_files, tmp_path)
    first = local_run(cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 2})}), rows)
    part1 = trained_positions(first.reports[-1])
    assert len(part1) == 4
    second = local_run(cfg, rows, checkpoint_dir=first.reports[-1]["checkpoint"])
    last = second.reports[-1]
    assert last["resumed_from_step"] == 2 and last["samples_seen"] == 2 * N - 4  # nothing twice
    assert trained_positions(last) == set(range(2 * N))  # nothing skipped
