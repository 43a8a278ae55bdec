"""Clean stops: SIGINT to a training driver checkpoints at the next step boundary, exits 130, and the
same command resumes at exactly the next step with the losses of a run that never stopped.

The real case runs ``omni-ray train`` as a subprocess (the signal goes to that driver only, as
``kill -INT`` would send it) on the module's local Ray (``RAY_ADDRESS``: no Ray start per run);
the run that never stopped is trained in this process on the same cluster. The signal plumbing
(second signal, deadline, SIGTERM's 143) is checked without training, on this process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from omni_ray.launch.stops import StopNow, Stopped, Stopper, stopped_message

ROOT = Path(__file__).resolve().parents[2]
STEPS = 12


# --- the signal plumbing, on this process ----------------------------------------------------------


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_first_signal_asks_for_a_stop_and_fit_runs_on(signum, code):
    asked, said = [], []
    with Stopper(lambda: asked.append(1), deadline_s=60, say=said.append) as stopper:
        result = stopper.run(lambda: (os.kill(os.getpid(), signum), time.sleep(0.5), "finished")[-1])
    assert result == "finished" and asked == [1] and stopper.signum == signum
    assert "checkpoint.stop_deadline_s=60s" in said[0] and "again to stop at once" in said[0]
    assert Stopped(signum, "x").exit_code == code
    assert signal.getsignal(signum) is not stopper._handle  # handlers put back


def test_second_signal_or_the_deadline_stops_at_once():
    def interrupted_twice():
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.3)
        time.sleep(30)

    with Stopper(lambda: None, deadline_s=60, say=lambda _: None) as stopper:
        with pytest.raises(StopNow, match="SIGINT again"):
            stopper.run(interrupted_twice)
    with Stopper(lambda: None, deadline_s=0.5, say=lambda _: None) as stopper:
        with pytest.raises(StopNow, match="checkpoint.stop_deadline_s=0.5s") as err:
            stopper.run(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(30)))
    assert err.value.signum == signal.SIGTERM


def test_stopped_messages_say_where_the_run_resumes_and_what_was_lost():
    assert stopped_message(signal.SIGINT, 4, 4) == ("stopped on SIGINT: steps up to 4 are in a checkpoint; run the "
                                                    "same command to resume from step 5")
    at_once = stopped_message(signal.SIGINT, 4, 7, "SIGINT again")
    assert "stopped at once (SIGINT again)" in at_once and "steps 5..7" in at_once and "not saved" in at_once
    assert "nothing to save" in stopped_message(signal.SIGTERM, 0, 0)


# --- a real driver, stopped and resumed ---------------------------------------------------------


def job(tmp_path, tiny_minicpmv, color_data) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"path": str(tiny_minicpmv), "dtype": "float32"},
        "data": {"train": str(color_data[0]), "model_max_length": 64},
        "freeze": {"vision": "frozen", "projector": "full", "llm": "lora"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": STEPS, "micro_batch_size": 2, "lr": 1e-2, "precision": "fp32", "log_every": 1},
        "checkpoint": {"async_upload": False, "stop_deadline_s": 240},
        "scaling": {"num_workers": 2, "max_failures": 0},
        "run": {"storage_path": str(tmp_path / "runs"), "loggers": []},
    }))
    return path


def history(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def driver(config: Path, name: str, address: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": address,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "omni_ray.launch.cli", "train", str(config), "--set",
                             f"run.name={name}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while not any(r.get("step", 0) >= step for r in history(run_dir)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no report of step %d" % step
        time.sleep(0.2)


@pytest.mark.timeout(900)
def test_sigint_checkpoints_and_the_same_command_resumes_with_the_same_losses(tmp_path, tiny_minicpmv, color_data,
                                                                              ray_local):
    from omni_ray.config import load_config
    from omni_ray.launch.driver import train

    config = job(tmp_path, tiny_minicpmv, color_data)
    address = ray_local.get_runtime_context().gcs_address
    straight = train(load_config(config, ["run.name=straight"]))
    assert straight.checkpoint is not None
    expected = {r["step"]: r["loss"] for r in history(tmp_path / "runs" / "straight")}
    assert sorted(expected) == list(range(1, STEPS + 1))

    run_dir = tmp_path / "runs" / "stopped"
    proc = driver(config, "stopped", address)
    wait_for_step(run_dir, proc, 2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 130, err[-3000:]
    stopped = history(run_dir)
    saved = max((r["step"] for r in stopped if r.get("checkpoint")), default=0)
    assert 2 <= saved < STEPS, (stopped, err[-3000:])
    assert f"steps up to {saved} are in a checkpoint; run the same command to resume from step {saved + 1}" in err
    assert "Traceback" not in err, err[-3000:]

    proc = driver(config, "stopped", address)
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    resumed = history(run_dir)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))  # each step once, none skipped
    assert next(r for r in resumed if r["step"] == saved + 1)["resumed_from_step"] == saved
    assert {r["step"]: r["loss"] for r in resumed} == pytest.approx(expected, rel=1e-5, abs=0)
