"""`omni-ray train` prints the per-worker memory estimate before it asks Ray for GPUs.

The run asks for a GPU on this CPU-only machine, so the driver stops with its named error at the
first thing that needs one (``scaling.use_gpu`` against the local Ray): everything printed before
that is what a user sees before any GPU is requested. The estimate block must be there, the
warning naming ``scaling.gpu_memory_gb`` must be there when the configured device is tiny and
absent when it is large, and both must come before the GPU error.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def train_output(tmp_path: Path, model_dir: Path, gpu_memory_gb: float) -> tuple[int, str]:
    config = tmp_path / f"run-{gpu_memory_gb:g}.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": str(model_dir)},
        "data": {"train": str(tmp_path / "train.jsonl"), "model_max_length": 64},
        "freeze": {"vision": "frozen", "projector": "full", "llm": "lora"},
        "train": {"micro_batch_size": 2, "precision": "bf16"},
        "scaling": {"num_workers": 1, "use_gpu": True, "gpu_memory_gb": gpu_memory_gb},
        "run": {"storage_path": str(tmp_path / "runs")},
    }))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "RAY_ADDRESS": ""}
    proc = subprocess.run([sys.executable, "-m", "omni_ray.launch.cli", "train", str(config)], env=env,
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def test_train_prints_the_estimate_before_asking_for_gpus(tmp_path, tiny_minicpmv):
    code, out = train_output(tmp_path, tiny_minicpmv, gpu_memory_gb=0.001)
    print(out)
    assert code == 2, out  # the named GPU error, not a traceback
    gpu_error = out.index("scaling.use_gpu:")
    block = out.index("memory per worker (estimate)")
    assert block < gpu_error
    # frozen weights (vision, LoRA base) in bf16, trained ones (projector, adapters) as fp32 masters
    assert "weights bfloat16" in out[block:gpu_error] and "weights float32" in out[block:gpu_error]
    warning = out.index("memory: the estimate")
    assert block < warning < gpu_error and "(scaling.gpu_memory_gb)" in out[warning:gpu_error]

    code, out = train_output(tmp_path, tiny_minicpmv, gpu_memory_gb=1000)
    assert code == 2 and "memory per worker (estimate)" in out, out
    assert "memory: the estimate" not in out, out
