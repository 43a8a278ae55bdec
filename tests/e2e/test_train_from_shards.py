"""``omni-ray train`` from prepared shards finishes on a 2-CPU machine with 1 and with 2 workers.

The CLI starts its own local Ray (no RAY_ADDRESS), as a user's laptop or CI box would: Ray sized
exactly to the training workers and the preprocessing actors left no CPU for the Parquet read
tasks, and training waited forever. Each run is bounded by a timeout, so a hang fails the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def shards(ray_local, color_data, tmp_path_factory):
    """Prepared once, in this process (the session's local Ray): only the training runs under test need
    a CLI process of their own, each starting its own Ray as on a user's machine."""
    from omni_ray.launch.cli import main

    out = tmp_path_factory.mktemp("shards")
    assert main(["data", "prepare", str(color_data[0]), "--out", str(out), "--rows-per-shard", "16"]) == 0
    return str(out)


@pytest.mark.parametrize("workers", [1, 2])
def test_train_from_shards_finishes_on_two_cpus(workers, shards, tiny_minicpmv, tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": str(tiny_minicpmv), "dtype": "float32"},
        "data": {"train": shards, "model_max_length": 64},
        "train": {"max_steps": 2, "micro_batch_size": 2, "precision": "fp32"},
        "scaling": {"num_workers": workers, "max_failures": 0},
        "run": {"name": f"shards-{workers}", "storage_path": str(tmp_path / "runs")},
    }))
    proc = subprocess.run([sys.executable, "-m", "omni_ray.launch.cli", "train", str(config)],
                          capture_output=True, text=True, timeout=420, env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    # The result line; Ray may still flush worker log lines to stdout after it.
    result = json.loads(next(line for line in reversed(proc.stdout.splitlines()) if line.startswith('{"metrics"')))
    assert result["metrics"]["step"] == 2 and result["checkpoint"]
