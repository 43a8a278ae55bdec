"""Seeded chaos: three worker kills at random steps and one S3 outage during an upload.

The run must finish by itself (Ray Train replaces the workers, the loop resumes from the newest
whole checkpoint) and land on the same trainable tensors as an uninterrupted run. The seed is
printed (and taken from OMNI_RAY_CHAOS_SEED when set), so a failure can be replayed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time

import psutil
import pytest

from omni_ray.launch.driver import train
from test_fault_tolerance import make_config, proxy, run_in_thread, trained_tensors  # noqa: F401 (fixture)

pytestmark = pytest.mark.dist


_MANIFEST_STEPS: dict[str, int] = {}  # checkpoint dir -> its manifest's step (manifests never change)


def latest_step(s3, cfg) -> tuple[int, bool]:
    """(newest checkpoint step with a manifest, whether some checkpoint directory lacks one: an upload).

    Read straight from moto with boto3 (not through the proxy the test switches off, and not
    through pyarrow's C++ client, which the run itself is using at the same time).
    """
    client, prefix = s3.client(), cfg.run.storage_path.removeprefix(f"s3://{s3.bucket}/") + f"/{cfg.run.name}/"
    keys = [o["Key"][len(prefix):] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=s3.bucket, Prefix=prefix) for o in page.get("Contents", [])]
    dirs = {k.split("/")[0] for k in keys if k.startswith("checkpoint_")}
    whole = {k.split("/")[0] for k in keys if k.endswith("/manifest.json")}
    for d in whole:
        if prefix + d not in _MANIFEST_STEPS:
            body = client.get_object(Bucket=s3.bucket, Key=f"{prefix}{d}/manifest.json")["Body"].read()
            _MANIFEST_STEPS[prefix + d] = json.loads(body)["step"]
    return max((_MANIFEST_STEPS[prefix + d] for d in whole), default=-1), bool(dirs - whole)


def kill_a_worker(rng: random.Random, timeout: float = 300) -> int:
    """SIGKILL one of this test's own training workers (its Ray cluster descends from this process).

    Right after an earlier kill the worker group may still be restarting: wait for its workers."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        workers = []
        for proc in psutil.Process(os.getpid()).children(recursive=True):
            try:
                if "RayTrainWorker" in " ".join(proc.cmdline()):
                    workers.append(proc)
            except psutil.Error:  # exited (or a zombie) while we looked
                continue
        if workers:
            victim = rng.choice(workers)
            victim.send_signal(signal.SIGKILL)
            return victim.pid
        time.sleep(0.1)
    raise AssertionError("no training worker to kill")


def wait_for(condition, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


STEPS = 10  # of the 16 in one epoch: enough for four events at random steps, short enough for CI


def chaos_config(s3, proxy, tiny_minicpmv, color_data, name):
    cfg = make_config(s3, proxy, tiny_minicpmv, color_data, name, max_steps=STEPS)
    return cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"every_n_steps": 1})})


def test_three_kills_and_an_s3_outage_end_on_the_uninterrupted_weights(
        ray_local, s3, proxy, tiny_minicpmv, color_data):
    seed = int(os.environ.get("OMNI_RAY_CHAOS_SEED", time.time_ns() % 100_000))
    print(f"chaos seed {seed} (replay with OMNI_RAY_CHAOS_SEED={seed})")
    rng = random.Random(seed)
    reference = train(chaos_config(s3, proxy, tiny_minicpmv, color_data, "chaos-reference"))
    assert reference.error is None
    total = reference.metrics["step"]
    assert total == STEPS

    cfg = chaos_config(s3, proxy, tiny_minicpmv, color_data, f"chaos-{seed}")
    cfg = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"max_failures": 6})})
    # A checkpoint every step: kill after three random ones, cut S3 during another's upload.
    events = sorted(rng.sample(range(1, total - 1), 4))
    outage_at = rng.choice(events)
    print(f"chaos seed {seed}: kills after steps {[e for e in events if e != outage_at]}, S3 outage after {outage_at}")
    thread, box = run_in_thread(cfg)
    for step in events:
        if step == outage_at:
            wait_for(lambda: latest_step(s3, cfg)[0] >= step - 1 and latest_step(s3, cfg)[1],
                     f"an upload after step {step}")
            proxy.down()
            time.sleep(1.5)
            proxy.up()
        else:
            wait_for(lambda: latest_step(s3, cfg)[0] >= step, f"the checkpoint at step {step}")
            kill_a_worker(rng)
    thread.join(timeout=900)
    assert "error" not in box, f"seed {seed}: {box.get('error')}"
    result = box["result"]
    assert result.metrics["step"] == total and result.metrics["resumed_from_step"] is not None
    ref, got = trained_tensors(reference), trained_tensors(result)
    assert ref.keys() == got.keys()
    worst = max(float((ref[k] - got[k]).abs().max()) for k in ref)
    assert worst <= 1e-5, f"seed {seed}: max |diff| {worst}"
