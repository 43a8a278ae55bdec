"""A weighted mixture trains its plan exactly, through a killed worker and onto another world size.

Two JSONL sources of the colour set: ``a`` (40 rows, weight 1: the only weighted source, so all
40) and ``b`` (10 rows, ``b.jsonl#17``: every row once and a seeded 7 of them twice). Part one
runs on 2 workers and dies with a worker killed mid-epoch; the same command on 1 worker resumes
from its last checkpoint. Together they train exactly the epoch's planned positions, none twice;
reports, metrics.jsonl and ``omni-ray report`` count samples per source.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from omni_ray.config import load_config
from omni_ray.data.mixture import plan_data
from omni_ray.launch.driver import train
from omni_ray.observe.report import build_report, format_report
from test_fault_tolerance import checkpoints, kill_a_worker_after_checkpoint, positions, run_in_thread

pytestmark = pytest.mark.dist

A_ROWS, B_ROWS, B_SAMPLES = 40, 10, 17


@pytest.fixture(scope="module")
def mixture(color_data):
    train_jsonl, _ = color_data
    lines = train_jsonl.read_text().splitlines()
    a, b = train_jsonl.parent / "mix-a.jsonl", train_jsonl.parent / "mix-b.jsonl"
    a.write_text("\n".join(lines[:A_ROWS]) + "\n")
    b.write_text("\n".join(lines[A_ROWS:A_ROWS + B_ROWS]) + "\n")
    return [{"path": str(a), "weight": 1, "name": "a"}, f"{b}#{B_SAMPLES}"]


def planned_positions(plan) -> set[int]:
    """Every position the plan trains in one epoch, computed from the plan alone (no reading)."""
    out = set()
    for s, base in enumerate(plan.bases()):
        n = plan.size(s)
        copies, remainder = divmod(plan.counts[s], n)
        out |= {base + k * n + r for k in range(copies) for r in range(n)}
        subset = np.flatnonzero(plan.in_subset(s, np.arange(n))) if remainder else []
        out |= {base + copies * n + int(r) for r in subset}
    return out


def test_mixture_resumes_exactly_after_a_killed_worker_onto_one_worker(ray_local, tiny_minicpmv, mixture, tmp_path):
    cfg = load_config({
        "model": {"path": str(tiny_minicpmv), "dtype": "float32"},
        "data": {"train": mixture, "model_max_length": 64, "shuffle_buffer": 4},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"epochs": 1, "micro_batch_size": 1, "lr": 1e-3, "precision": "fp32", "log_every": 1, "seed": 5},
        "checkpoint": {"every_n_steps": 2, "keep": 10, "async_upload": False},
        "scaling": {"num_workers": 2, "max_failures": 0, "max_preemption_failures": 0},
        "run": {"name": "mixture", "storage_path": str(tmp_path / "runs")},
    })
    plan = plan_data(cfg.data, cfg.storage, cfg.train.seed)
    assert plan.counts == (A_ROWS, B_SAMPLES) and plan.rows == A_ROWS + B_SAMPLES
    planned = planned_positions(plan)
    assert len(planned) == plan.rows

    thread, box = run_in_thread(cfg)
    kill_a_worker_after_checkpoint(cfg, at_least_step=6)
    thread.join(timeout=600)
    assert "error" in box  # part one died with its worker (max_failures: 0)
    trained_by_step = {step: positions(torch.load(os.path.join(uri, "train_state.pt"), weights_only=True)["consumed"])
                       for step, uri in checkpoints(cfg)}

    one = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"num_workers": 1})})
    result = train(one)  # the same run again, on another world size
    m = result.metrics
    assert m["resumed_from_step"] in trained_by_step and m["resumed_from_step"] >= 2
    first_part = trained_by_step[m["resumed_from_step"]] & planned
    # Part two trains only planned positions not in part one's checkpoint, each once (the data
    # position): as many as the plan has left means exactly those, nothing twice, nothing skipped.
    assert m["epoch"] == 1 and len(first_part) + m["samples_seen"] == plan.rows
    # ... and so per source: part one's positions of each source plus part two's count of it.
    names = [e.label() for e in cfg.data.entries()]
    base_b = plan.bases()[1]
    before = {names[0]: sum(p < base_b for p in first_part), names[1]: sum(p >= base_b for p in first_part)}
    assert {n: before[n] + m["samples_by_source"][n] for n in names} == dict(zip(names, plan.counts))
    assert m["rejected_by_source"] == {n: 0 for n in names}

    run_dir = str(tmp_path / "runs" / "mixture")
    history = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert all("samples_by_source" in r for r in history)
    text = format_report(build_report(run_dir))
    assert "samples by source: a " in text


def test_data_check_counts_and_rejects_per_source(ray_local, tiny_minicpmv, mixture, tmp_path, capsys):
    from omni_ray.launch.cli import main

    first = json.loads(open(mixture[0]["path"]).readline())
    bad = os.path.join(os.path.dirname(mixture[0]["path"]), "mix-bad.jsonl")
    with open(bad, "w") as f:  # 3 records: one names an image that does not exist
        for i, image in enumerate([first["image"], "images/nope.png", first["image"]]):
            f.write(json.dumps({**first, "id": f"bad-{i}", "image": image}) + "\n")
    config = tmp_path / "check.yaml"
    config.write_text(json.dumps({"model": {"path": str(tiny_minicpmv)},
                                  "data": {"train": [*mixture, {"path": bad, "weight": 1, "name": "third"}],
                                           "model_max_length": 64, "max_bad_fraction": 0.5}}))
    assert main(["data", "check", "--config", str(config)]) == 0  # no PREFIX: the config's mixture
    out = capsys.readouterr().out
    # Every row of every source once (not the plan's draw), counted per source by name.
    assert f"samples {A_ROWS + B_ROWS + 3}: ok {A_ROWS + B_ROWS + 2}, rejected 1" in out
    assert f"source a (1 unit(s)): {A_ROWS} samples, ok {A_ROWS}, rejected 0" in out
    assert "source third (1 unit(s)): 3 samples, ok 2, rejected 1 (missing_image 1)" in out
