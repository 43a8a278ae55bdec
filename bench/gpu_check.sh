#!/usr/bin/env bash
# GPU readiness check for a CUDA host WITHOUT network (issue 12). Not yet run on a GPU.
#
# Beforehand, on a machine with network:  ../shared/tools/offline_wheelhouse.sh  (wheels for
# this project with the `test` and `gpu` extras), and copy the wheelhouse + this repo over.
#
#   bash bench/gpu_check.sh [WHEELHOUSE_DIR]
#
# Runs: the GPU tests that exist (tests/gpu), the memory benchmark (estimate beside the live
# tensor bytes of real steps; it runs on the CPU as written: moving it to CUDA and reading
# torch.cuda.max_memory_allocated is still to do) and the step benchmark. Still missing from the
# issue's list: tokens/s, TFLOP/s and MFU at full MiniCPM-V 4.6 size, and the ~3B full LLM tune.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="${1:-../wheelhouse}"
if [ ! -d .venv-gpu ]; then
  python3 -m venv .venv-gpu
  . .venv-gpu/bin/activate
  pip install --no-index --find-links "$WHEELS" -e ".[test,gpu]"
else
  . .venv-gpu/bin/activate
fi
python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device visible"
print("device", torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
from omni_ray.train.loss import fused_loss_backend
print("loss backend:", fused_loss_backend(torch.device("cuda")))
PY
python -m pytest -q tests/gpu
python bench/memory.py --seq 1024 --full-seq 2048
python bench/step.py
