#!/usr/bin/env bash
# GPU readiness check for a CUDA host WITHOUT network (issue 12). Not yet run on a GPU.
#
# Beforehand, on a machine with network:  ../shared/tools/offline_wheelhouse.sh  (wheels for
# this project with the `test` and `gpu` extras), and copy the wheelhouse + this repo over.
#
#   bash bench/gpu_check.sh [WHEELHOUSE_DIR]
#
# Runs, writing each output under $OUT (or bench/gpu_out): the GPU tests (tests/gpu: bf16, fp16
# loss scaling, QLoRA, fused loss), bench/gpu_bench.py at full size (MiniCPM-V 4.6 vision frozen +
# LoRA r=64, and a ~3B full LLM tune: tokens/s, model TFLOP/s, MFU, peak memory beside the
# estimate) and bench/step.py (omni_ray vs HF Trainer vs bare torch). Record the figures in
# bench/RESULTS.md with the card's name. Not yet run on a GPU: none was lent to the sessions so far.
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
from omni_ray.train.loss import fast_paths
print("kernels:", fast_paths(torch.device("cuda")))
PY
OUT="${OUT:-bench/gpu_out}"
mkdir -p "$OUT"
python -m pytest -q tests/gpu 2>&1 | tee "$OUT/tests_gpu.txt"
python bench/gpu_bench.py --seq 2048 --batch 4 2>&1 | tee "$OUT/gpu_bench.txt"
python bench/step.py 2>&1 | tee "$OUT/step.txt"
