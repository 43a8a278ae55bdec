"""The README's main command: `omni-ray demo` must really learn (held-out accuracy >= 0.9)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def test_demo_learns(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "omni_ray.launch.cli", "demo", "--workdir", str(tmp_path), "--min-accuracy", "0.9"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    summary_line = [l for l in proc.stdout.splitlines() if l.startswith("[demo] {")]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(summary_line[-1].removeprefix("[demo] "))
    assert summary["chance"] <= 0.25
    assert summary["accuracy_before"] <= 0.5
    assert summary["accuracy_after"] >= 0.9
    assert summary["frozen_unchanged"] is True
    assert os.path.isdir(summary["checkpoint"])
