"""Spot nodes from zero: the autoscaler adds one, it is lost mid-run, a replacement comes, the run finishes.

Ray's fake multi-node autoscaler (the ``fake_multinode`` provider Ray's own autoscaler tests use)
starts each "node" as another raylet on this machine. The training worker asks for a custom
resource, ``spot_gpu``, that only the ``spot`` node type has (min_workers 0, like a GPU group
scaled to zero; a real GPU would make the worker use CUDA), so the run can only start after the
driver's wait (``scaling.gpu_wait_timeout_s``) has asked the autoscaler for a node. Once a
checkpoint exists, that node's raylet is SIGKILLed (a reclaimed spot instance: no notice, the
node is gone); Ray marks it dead, the autoscaler terminates it and launches a replacement for the
waiting worker group, and the run resumes from its checkpoint by itself.

The scenario needs a Ray cluster of its own with the autoscaler, so it runs in a child process
(this file run as a script), which kills every process it started, by id, when it ends.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist

SPOT_NODE = {"resources": {"CPU": 1, "spot_gpu": 1, "object_store_memory": 100 * 1024 * 1024},
             "node_config": {}, "min_workers": 0, "max_workers": 2}
MAX_STEPS = 6


def test_spot_node_lost_mid_run_is_replaced_and_the_run_finishes_from_its_checkpoint(
        tiny_minicpmv, color_data, tmp_path):
    proc = subprocess.run([sys.executable, __file__, str(tiny_minicpmv), str(color_data[0]), str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    log = tmp_path / "scenario.log"
    log.write_text(proc.stdout + proc.stderr)
    # Ray's own lines drown the scenario's: show its progress and the first error (full log kept).
    lines = [line for line in log.read_text().splitlines() if line.startswith(("[spot", "Traceback", "  File "))
             or "Error" in line]
    assert proc.returncode == 0, (f"full log: {log}\n" + "\n".join(lines[:60])
                                  + "\n--- last lines ---\n" + "\n".join(log.read_text().splitlines()[-30:]))
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    # Scaling from zero with no node type that has the resource: a named error, not a silent wait.
    assert got["infeasible_wait"].startswith("scaling.gpu_wait_timeout_s: waited 3s for 1 big_gpu and the cluster "
                                             "has 0 big_gpu"), got["infeasible_wait"]
    assert got["spot_gpu_before"] == 0, "the spot group starts at zero nodes"
    # The run's own wait brought the first spot node; the kill took it; the autoscaler launched another.
    lost, spot_nodes = got["lost_node"], got["spot_nodes"]
    assert spot_nodes[lost] is False and list(spot_nodes.values()).count(True) == 1, spot_nodes
    assert got["error"] is None and got["final_step"] == MAX_STEPS
    # It came back from the checkpoint taken before the kill (the node was frozen, then killed, so
    # no later one exists), not from scratch...
    assert got["resumed_from_step"] == got["killed_after_step"] < MAX_STEPS, got
    # ...and trained the schedule's samples once each across the loss: 2 per step, those before the
    # checkpoint not again.
    assert len(got["consumed"]) == MAX_STEPS * 2, got["consumed"]
    assert got["samples_seen"] == (MAX_STEPS - got["resumed_from_step"]) * 2, got
    # Weights equal to an uninterrupted run's after a kill and resume are asserted by
    # tests/dist/test_chaos.py (the same restart path); a reference run here would cost another minute.


def test_custom_resources_on_a_local_ray_are_refused_at_once():
    from omni_ray.config import ConfigError, ScalingConfig
    from omni_ray.launch.driver import check_local_gpus

    with pytest.raises(ConfigError, match=r"scaling.resources_per_worker: \['spot_gpu'\] are resources of a "
                                          r"cluster's node types and a local Ray has none"):
        check_local_gpus(ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1, "spot_gpu": 1}))


# ---- the scenario (child process) ----------------------------------------------------------------


_START = time.monotonic()


def _say(what: str) -> None:
    """Progress on stderr with seconds since the scenario started (where the time goes)."""
    print(f"[spot {time.monotonic() - _START:6.1f}s] {what}", file=sys.stderr, flush=True)


def _autoscaling_config(gcs_address: str) -> dict:
    """Ray's fake_multinode example config, with one spot node type that starts at zero."""
    return {
        "cluster_name": "spot-test", "max_workers": 2, "head_node_type": "ray.head.default",
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": {"ray.head.default": {"resources": {"CPU": 3}, "node_config": {}, "max_workers": 0},
                                 "spot": SPOT_NODE},
        "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 5, "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {},
        "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }


def _start_cluster(workdir: str):
    from ray._private.services import get_node_ip_address
    from ray.cluster_utils import Cluster

    # Read by the autoscaler (the monitor process inherits them): update every second, and a node
    # whose raylet stopped reporting for 10 s is terminated (default 30 s). Not shorter: with the
    # whole suite on 2 cores a live raylet can miss a few seconds of reports (CI lost the head
    # node that way with 3 s / 2 s below).
    os.environ.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                       "AUTOSCALER_HEARTBEAT_TIMEOUT_S": "10", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"})
    with socket.socket() as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    config = Path(workdir, "autoscaling.json")
    config.write_text(json.dumps(_autoscaling_config(f"{get_node_ip_address()}:{port}")))
    return Cluster(initialize_head=True, head_node_args={
        "num_cpus": 3, "gcs_server_port": port, "autoscaling_config": str(config), "include_dashboard": False,
        # A dead raylet is noticed in ~8 s (default ~15 s).
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 8}})


def _config(model_dir: str, train_jsonl: str, out: str, name: str):
    from omni_ray.config import load_config

    return load_config({
        "model": {"path": model_dir, "dtype": "float32"},
        "data": {"train": train_jsonl, "model_max_length": 64},
        "freeze": {"vision": "frozen", "projector": "full", "llm": "lora"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": MAX_STEPS, "micro_batch_size": 2, "lr": 2e-3, "precision": "fp32", "log_every": 2},
        "checkpoint": {"every_n_steps": 2, "keep": None, "async_upload": False},
        "scaling": {"num_workers": 1, "resources_per_worker": {"CPU": 1, "spot_gpu": 1}, "max_failures": 2,
                    "gpu_wait_timeout_s": 120},
        "run": {"name": name, "storage_path": out},
    })


def _checkpoint_steps(out: str, name: str) -> list[int]:
    """Steps of the whole checkpoints (the resume's own test: a manifest, every file it lists, checksums).
    Not any directory with a manifest: Ray Train copies a checkpoint's files in no fixed order, and a
    kill after the manifest but before the weights leaves a checkpoint the resume rightly skips."""
    from omni_ray.train.checkpoint import find_latest

    latest = find_latest(str(Path(out, name))) if Path(out, name).exists() else None
    return [] if latest is None else [latest[0]]


def _kill_spot_node_after_a_checkpoint(out: str, name: str, runner: threading.Thread) -> tuple[int, str]:
    """Once a checkpoint exists, SIGKILL the spot node's raylet and every process it started (the
    training worker among them), as a reclaimed instance takes them all; returns that checkpoint's step
    and the node's id."""
    import psutil

    while runner.is_alive():
        steps = _checkpoint_steps(out, name)
        raylets = [p for p in psutil.Process(os.getpid()).children(recursive=True) if _is_spot_raylet(p)]
        if steps and raylets:
            import ray

            lost = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("spot_gpu"))
            node = [raylets[0], *raylets[0].children(recursive=True)]
            for sig in (signal.SIGSTOP, signal.SIGKILL):  # stopped first: no worker outlives its raylet
                for proc in node:
                    try:
                        proc.send_signal(sig)
                    except psutil.Error:
                        pass
                steps = _checkpoint_steps(out, name)
            _say(f"killed the spot node (raylet {raylets[0].pid}, {len(node) - 1} workers) after the checkpoint "
                 f"at step {steps[-1]}")
            return steps[-1], lost

        time.sleep(0.05)
    raise AssertionError("the run ended before a checkpoint to kill after")


def _is_spot_raylet(proc) -> bool:
    import psutil

    try:
        return proc.name() == "raylet" and "spot_gpu" in " ".join(proc.cmdline())
    except psutil.Error:  # exited while we looked
        return False


def _infeasible_wait() -> str:
    from omni_ray.config import ConfigError, ScalingConfig
    from omni_ray.launch.driver import wait_for_gpus

    scaling = ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1, "big_gpu": 1}, gpu_wait_timeout_s=3)
    try:
        wait_for_gpus(scaling, poll_s=0.5)
    except ConfigError as err:
        return str(err)
    return "no error"


def scenario(model_dir: str, train_jsonl: str, out: str) -> dict:
    import ray
    import torch

    from omni_ray.data.position import PositionSet
    from omni_ray.launch.driver import train

    head = ray.get_runtime_context().get_node_id()  # the driver's: every other node is a spot node
    found: dict = {"infeasible_wait": _infeasible_wait(), "spot_gpu_before": ray.cluster_resources().get("spot_gpu", 0)}
    box: dict = {}
    runner = threading.Thread(target=lambda: box.update(result=train(_config(model_dir, train_jsonl, out, "spot"))))
    _say("cluster up, infeasible wait done; training starts")
    runner.start()
    found["killed_after_step"], found["lost_node"] = _kill_spot_node_after_a_checkpoint(out, "spot", runner)
    runner.join()
    _say("run finished")
    result = box["result"]
    found.update(final_step=result.metrics["step"], resumed_from_step=result.metrics["resumed_from_step"],
                 samples_seen=result.metrics["samples_seen"],
                 error=None if result.error is None else str(result.error),
                 spot_nodes={n["NodeID"]: n["Alive"] for n in ray.nodes() if n["NodeID"] != head})
    state = torch.load(os.path.join(result.checkpoint.to_directory(), "train_state.pt"), weights_only=True)
    found["consumed"] = sorted(i for start, stop in PositionSet.from_json(state["consumed"]).ranges()
                               for i in range(start, stop))
    return found


def main(model_dir: str, train_jsonl: str, out: str) -> None:
    import psutil
    import ray

    workdir = tempfile.mkdtemp(prefix="spot-cluster-")
    cluster = _start_cluster(workdir)
    try:
        os.environ["RAY_ADDRESS"] = cluster.address  # Ray's own helper actors look for "the" cluster otherwise
        ray.init(address=cluster.address)
        print(json.dumps(scenario(model_dir, train_jsonl, out)), flush=True)
    finally:
        # The fake nodes are the autoscaler's children, not the cluster's: note every process this
        # scenario started before stopping anything, then end the ones still running, by id.
        started = psutil.Process(os.getpid()).children(recursive=True)
        ray.shutdown()
        cluster.shutdown()
        for proc in started:
            try:
                proc.kill()
            except psutil.Error:
                pass


if __name__ == "__main__":
    main(*sys.argv[1:4])
