"""Run by tests/dist/test_preemption.py in its own process: a 2-node Ray cluster, one node drained.

A head node (the driver, Ray Data) and a "spot" node holding both training workers. Once both
workers run there, the spot node is drained with reason PREEMPTION (what the autoscaler and
cloud providers' termination notices do), through Ray's own ``ray drain-node``. Prints one JSON
line: the steps of every checkpoint in the run directory and the final metrics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path


def main(model_dir: str, train_jsonl: str, out: str) -> None:
    os.environ["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = "0.5"  # read by the controller's watcher
    os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "include_dashboard": False})
    try:
        run(cluster, model_dir, train_jsonl, out)
    finally:  # never leave a cluster behind, even when the run fails
        ray.shutdown()
        cluster.shutdown()


def run(cluster, model_dir: str, train_jsonl: str, out: str) -> None:
    import ray

    from omni_ray.config import load_config
    from omni_ray.launch.driver import train

    spot = cluster.add_node(num_cpus=2, resources={"spot": 2})
    ray.init(address=cluster.address)
    cfg = load_config({
        "model": {"path": model_dir, "dtype": "float32"},
        "data": {"train": train_jsonl, "model_max_length": 64},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 8, "micro_batch_size": 2, "lr": 1e-3, "precision": "fp32", "log_every": 1},
        "checkpoint": {"every_n_steps": None, "keep": None, "async_upload": False},
        "scaling": {"num_workers": 2, "resources_per_worker": {"CPU": 1, "spot": 1}, "max_failures": 0},
        "run": {"name": "preempted", "storage_path": out},
    })
    box: dict = {}
    runner = threading.Thread(target=lambda: box.update(result=train(cfg)))
    runner.start()
    # Ray leaves a fully used resource out of available_resources: absent means both workers hold it.
    while ray.available_resources().get("spot", 0.0) > 0 and runner.is_alive():
        time.sleep(0.2)
    print("workers placed on the spot node; draining it", file=sys.stderr, flush=True)
    time.sleep(2)
    subprocess.run(["ray", "drain-node", "--address", cluster.address, "--node-id", spot.node_id,
                    "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot instance reclaim",
                    "--deadline-remaining-seconds", "600"], check=True)
    runner.join()
    result = box["result"]
    steps = sorted(json.loads(m.read_text())["step"] for m in Path(out, "preempted").glob("checkpoint_*/manifest.json"))
    print(json.dumps({"checkpoint_steps": steps, "final_step": result.metrics["step"],
                      "error": None if result.error is None else str(result.error)}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
