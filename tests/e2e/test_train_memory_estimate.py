"""`omni-ray train` prints the per-worker memory estimate before it asks Ray for GPUs.

The run asks for a GPU on this CPU-only machine, so the driver stops with its named error at the
first thing that needs one (``scaling.use_gpu`` against the local Ray): everything printed before
that is what a user sees before any GPU is requested. The estimate block must be there, the
warning naming ``scaling.gpu_memory_gb`` must be there when the configured device is tiny, and
both must come before the GPU error. The warning's absence on a large device is checked on the
driver function itself (no second process).
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


def write_config(tmp_path: Path, model_dir: Path, gpu_memory_gb: float, train: Path) -> str:
    config = tmp_path / f"run-{gpu_memory_gb:g}.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": str(model_dir)},
        "data": {"train": str(train), "model_max_length": 64},
        "freeze": {"vision": "frozen", "projector": "full", "llm": "lora"},
        "train": {"micro_batch_size": 2, "precision": "bf16"},
        "scaling": {"num_workers": 1, "use_gpu": True, "gpu_memory_gb": gpu_memory_gb},
        "run": {"storage_path": str(tmp_path / "runs")},
    }))
    return str(config)


def train_output(tmp_path: Path, model_dir: Path, gpu_memory_gb: float, train: Path) -> tuple[int, str]:
    config = write_config(tmp_path, model_dir, gpu_memory_gb, train)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "RAY_ADDRESS": ""}
    proc = subprocess.run([sys.executable, "-m", "omni_ray.launch.cli", "train", config], env=env,
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def test_train_prints_the_estimate_before_asking_for_gpus(tmp_path, tiny_minicpmv, color_data):
    # real data: the driver plans it (and refuses a missing file) before it asks Ray for anything
    code, out = train_output(tmp_path, tiny_minicpmv, gpu_memory_gb=0.001, train=color_data[0])
    print(out)
    assert code == 2, out  # the named GPU error, not a traceback
    gpu_error = out.index("scaling.use_gpu:")
    block = out.index("memory per worker (estimate)")
    assert block < gpu_error
    # frozen weights (vision, LoRA base) in bf16, trained ones (projector, adapters) as fp32 masters
    assert "weights bfloat16" in out[block:gpu_error] and "weights float32" in out[block:gpu_error]
    warning = out.index("memory: the estimate")
    assert block < warning < gpu_error and "(scaling.gpu_memory_gb)" in out[warning:gpu_error]



def test_no_warning_when_the_estimate_fits(tmp_path, tiny_minicpmv, color_data):
    from omni_ray.config import load_config
    from omni_ray.launch.driver import memory_estimate, validate

    config = yaml.safe_load(Path(write_config(tmp_path, tiny_minicpmv, gpu_memory_gb=1000, train=color_data[0])).read_text())
    cfg = load_config(config)
    text, warning = memory_estimate(cfg, validate(cfg))
    assert text.startswith("memory per worker (estimate)") and warning is None
    _, warning = memory_estimate(cfg.model_copy(update={"scaling": cfg.scaling.model_copy(
        update={"gpu_memory_gb": 0.001})}), validate(cfg))
    assert warning is not None and "(scaling.gpu_memory_gb)" in warning
