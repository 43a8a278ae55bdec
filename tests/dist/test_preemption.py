"""A drain notice (spot reclaim) makes the run checkpoint at the next report step, once.

The scenario runs in its own process (tests/dist/preemption_scenario.py): it needs a two-node
Ray cluster of its own, which cannot share a process with the session's local Ray. Checkpoints
are otherwise only taken at the end (checkpoint.every_n_steps: null), so a checkpoint before
the last step can only come from the notice.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist

STEPS = 8  # train.max_steps in preemption_scenario.py


def test_drain_notice_triggers_one_checkpoint(tiny_minicpmv, color_data, tmp_path):
    script = Path(__file__).with_name("preemption_scenario.py")
    proc = subprocess.run([sys.executable, str(script), str(tiny_minicpmv), str(color_data[0]), str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["error"] is None and result["final_step"] == STEPS
    steps = result["checkpoint_steps"]
    assert steps[-1] == STEPS
    assert len(steps) == 2 and 1 <= steps[0] < STEPS, f"one checkpoint on the notice, one at the end: {steps}"
