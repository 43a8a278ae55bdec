"""What reaches the console when Ray misbehaves: its transient internal tracebacks do not (they stay
in Ray's session logs, and show with --verbose), and a Ray that cannot start is one line with the
cause and what to try, exit 2, for ``train`` and ``data check``.

The filter is checked on the text Ray forwards (split between batches as the log monitor may
split it) and once through a real actor on a local Ray; the failed start is a real one (Ray's
temp directory is a file) in one subprocess, plus Ray's "timed out during startup" exception.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from omni_ray.observe.console import drop_transient

ROOT = Path(__file__).resolve().parents[2]

TIMEOUT_TRACEBACK = """Exception in thread PlacementGroupCleanerMonitor:
Traceback (most recent call last):
  File "/ray/train/v2/_internal/execution/controller/placement_group_cleaner.py", line 80, in _monitor_loop
    alive = is_actor_alive(
            ^^^^^^^^^^^^^^^
ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.""".splitlines()

MULTIPLE_RAYS = """Traceback (most recent call last):
  File "/ray/dashboard/utils.py", line 687, in ray_address_to_api_server_url
    address = services.canonicalize_bootstrap_address_or_die(address)
ValueError: first

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "/ray/_private/services.py", line 760, in canonicalize_bootstrap_address_or_die
    raise ConnectionError(
ConnectionError: Found multiple active Ray instances: {'10.0.0.1:6379', '10.0.0.1:6380'}. Please specify""".splitlines()

GCS_TIMEOUT = """Exception in thread PlacementGroupCleanerMonitor:
Traceback (most recent call last):
  File "/ray/train/v2/_internal/execution/controller/placement_group_cleaner.py", line 80, in _monitor_loop
    alive = is_actor_alive(
  File "/ray/dashboard/utils.py", line 688, in ray_address_to_api_server_url
    gcs_client = GcsClient(address=address)
  File "python/ray/includes/common.pxi", line 144, in ray._raylet.check_status_timeout_as_rpc_error
ray.exceptions.RpcError: Timed out while waiting for GCS to become available.""".splitlines()

REAL_ERROR = """Traceback (most recent call last):
  File "/omni_ray/train/loop.py", line 90, in run
    raise RuntimeError(stop)
RuntimeError: data.max_bad_fraction: 3.0% of samples rejected""".splitlines()


def test_transient_tracebacks_are_dropped_and_real_ones_kept():
    lines = ["[omni-ray] step 3/8", *TIMEOUT_TRACEBACK, "plain line", *MULTIPLE_RAYS, *GCS_TIMEOUT, *REAL_ERROR,
             "after"]
    kept, held = drop_transient(lines)
    assert held == []
    assert kept == ["[omni-ray] step 3/8", "plain line", *REAL_ERROR, "after"]


def test_a_traceback_split_between_batches_is_judged_whole():
    first, second = TIMEOUT_TRACEBACK[:3], TIMEOUT_TRACEBACK[3:] + ["next line"]
    kept, held = drop_transient(["before", *first])
    assert kept == ["before"] and held == first
    kept, held = drop_transient(second, held)
    assert kept == ["next line"] and held == []
    kept, held = drop_transient(REAL_ERROR[:2])
    kept, held = drop_transient(REAL_ERROR[2:], held)
    assert kept == REAL_ERROR


def actor_lines(tag: str) -> str:
    """The traceback and a marker, each line ending in ``tag``: Ray holds back a line it printed a
    moment ago from another process (its log de-duplication), so each round's lines must differ."""
    return "\n".join(f"{line} {tag}" for line in TIMEOUT_TRACEBACK + ["omni-ray-console-marker"])


def test_a_real_actor_s_transient_traceback_stays_in_the_log_file(ray_local, capfd):
    import ray

    from omni_ray.observe.console import quiet_worker_logs

    @ray.remote(num_cpus=0)
    class Noisy:
        def speak(self, text: str) -> int:
            print(text, file=sys.stderr, flush=True)
            return os.getpid()

    def console_after(verbose: bool) -> tuple[str, int]:
        quiet_worker_logs(verbose)
        actor = Noisy.remote()
        pid = ray.get(actor.speak.remote(actor_lines("loudly" if verbose else "quietly")))
        deadline, seen = time.monotonic() + 60, ""
        while "omni-ray-console-marker" not in seen and time.monotonic() < deadline:
            time.sleep(0.2)
            seen += capfd.readouterr().err
        ray.kill(actor)
        assert "omni-ray-console-marker" in seen, seen
        return seen, pid

    try:
        quiet, pid = console_after(verbose=False)
        assert "GetTimeoutError" not in quiet and "Traceback" not in quiet, quiet
        logs = Path(ray._private.worker._global_node.get_logs_dir_path())
        assert any("GetTimeoutError" in p.read_text(errors="replace") for p in logs.glob(f"*{pid}*.err")), \
            sorted(p.name for p in logs.glob(f"*{pid}*"))
        loud, _ = console_after(verbose=True)
        assert "GetTimeoutError" in loud
    finally:
        quiet_worker_logs(verbose=True)  # Ray's own printer back, for the tests after this one


def test_ray_timing_out_at_startup_is_one_line(monkeypatch):
    import ray

    from omni_ray.ray_init import RayStartError, connect_or_start

    def times_out(**_):
        raise Exception("The current node timed out during startup. This could happen because some of the raylet "
                        "failed to startup or the GCS has become overloaded.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", times_out)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(RayStartError) as err:
        connect_or_start(2, {})
    message = str(err.value)
    assert "\n" not in message and "timed out during startup" in message
    assert "a local Ray did not start" in message and "try again" in message and "RAY_ADDRESS" in message


BOTH = """
import contextlib, io, json, sys
from omni_ray.launch.cli import main
out = {}
for name, argv in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    out[name] = [code, err.getvalue()]
print(json.dumps(out))
"""


def test_train_and_data_check_when_ray_cannot_start(tmp_path, tiny_minicpmv, color_data):
    (tmp_path / "not-a-dir").write_text("Ray's temp directory cannot be made under a file")
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": str(tiny_minicpmv)}, "data": {"train": str(color_data[0])},
                                      "run": {"storage_path": str(tmp_path / "runs"), "loggers": []}}))
    commands = {"train": ["train", str(config)],
                "data check": ["data", "check", str(color_data[0]), "--config", str(config)]}
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path / "not-a-dir"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", BOTH, json.dumps(commands)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, (code, err) in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert code == 2 and len(errors) == 1, (name, err)
        assert "a local Ray did not start" in errors[0] and "not-a-dir" in errors[0], (name, errors)
        assert "Traceback" not in err, (name, err)
