"""The README's main command: `omni-ray demo` must really learn (held-out accuracy >= 0.9), and a
person watching it must be able to follow: each step line once, no Ray report dumps, and at the
end the paths of the curves and of a page of the model's answers, both there."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(1800)  # five epochs on two CPU workers, on a shared, loaded 2-core machine
def test_demo_learns(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "omni_ray.launch.cli", "demo", "--workdir", str(tmp_path), "--min-accuracy", "0.9"],
        capture_output=True, text=True, timeout=1700, env=env,
    )
    summary_line = [l for l in proc.stdout.splitlines() if l.startswith("[demo] {")]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(summary_line[-1].removeprefix("[demo] "))
    assert summary["accuracy_before"] <= 0.5
    assert summary["accuracy_after"] >= 0.9
    assert summary["frozen_unchanged"] is True
    assert os.path.isdir(summary["checkpoint"])

    # The console: progress lines from the driver, each step at most once; Ray's per-report
    # TrainingReport(...) dumps and known-harmless notices are gone without --verbose.
    console = proc.stdout + proc.stderr
    assert "TrainingReport(" not in console and "Reporting training result" not in console
    assert "Failed to query Ray Train Controller" not in console
    steps = Counter(m.group(1) for m in re.finditer(r"\bstep (\d+)/\d+\b", console))
    assert steps and max(steps.values()) == 1, steps
    assert f"step {summary['steps']}/{summary['steps']}" in console  # the last step is always shown

    # What to open: curves.png and the last eval page (image inline, the model's answer), paths printed.
    assert open(summary["curves"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert f"[demo] curves (open in any image viewer): {summary['curves']}" in proc.stdout
    page = open(summary["eval_page"]).read()
    assert page.count("<div class='sample'") == 3 and "data:image/png;base64," in page
    assert re.search(r"<pre class='answer'>[^<]+</pre>", page)
    losses = [v for _, v in sorted((int(k), v) for k, v in summary["eval_losses"].items())]
    assert len(losses) >= 2 and losses[-1] < losses[0], losses  # eval loss falls on the demo task
    assert os.listdir(summary["tensorboard"])
