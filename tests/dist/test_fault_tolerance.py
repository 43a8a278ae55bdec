"""Runs that lose a worker, or the whole run, come back from the latest checkpoint in S3.

All runs store checkpoints in a real S3 endpoint (moto_server) reached through a TCP proxy the
test can switch off, to take the endpoint away in the middle of an upload without losing what
moto holds.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from omni_ray import storage as st
from omni_ray.config import load_config
from omni_ray.launch.driver import train
from omni_ray.train.checkpoint import find_latest

pytestmark = pytest.mark.dist


class Proxy:
    """A TCP forwarder to moto that can go down (refuse and cut connections) and come back."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.server = None
        self.up()

    def up(self):
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", self.port))
        self.server.listen(64)
        threading.Thread(target=self._accept, args=(self.server,), daemon=True).start()

    def down(self):
        try:  # wakes the thread blocked in accept(), so the port is free to listen on again at once
            self.server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.server.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass
        self.conns.clear()

    def _accept(self, server):
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass

    @property
    def endpoint_url(self):
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def proxy(s3):
    p = Proxy(s3.port)
    yield p
    p.down()


def make_config(s3, proxy, tiny_minicpmv, color_data, name, **train_overrides):
    train_jsonl, _ = color_data
    return load_config({
        "model": {"path": str(tiny_minicpmv), "dtype": "float32"},
        "data": {"train": str(train_jsonl), "model_max_length": 64},
        "freeze": {"vision": "frozen", "projector": "full", "llm": "lora"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"epochs": 1, "micro_batch_size": 2, "lr": 2e-3, "precision": "fp32", "log_every": 2,
                  **train_overrides},
        "checkpoint": {"every_n_steps": 2, "keep": 3, "async_upload": False},
        "scaling": {"num_workers": 2, "max_failures": 0},
        "run": {"name": name, "storage_path": s3.uri("ft-runs")},
        "storage": {"endpoint_url": proxy.endpoint_url, "max_attempts": 2},
    })


def checkpoints(cfg) -> list[tuple[int, str]]:
    """(step, uri) of every complete checkpoint (one with a manifest) of the run in S3."""
    prefix = f"{cfg.run.storage_path}/{cfg.run.name}"
    found = []
    try:
        files = st.list_files(prefix, cfg.storage)
    except (FileNotFoundError, OSError):
        return []
    for rel in files:
        if rel.endswith("/manifest.json"):
            uri = f"{prefix}/{rel.rsplit('/', 1)[0]}"
            found.append((json.loads(st.read_bytes(f"{uri}/manifest.json", cfg.storage))["step"], uri))
    return sorted(found)


def kill_a_worker_after_checkpoint(cfg, at_least_step: int = 6, timeout: float = 240) -> int:
    """SIGKILL one training worker once a checkpoint at >= at_least_step exists (so an earlier one is
    surely registered with Ray Train: a checkpoint counts only once every rank has reported it)."""
    deadline = time.time() + timeout
    prefix = f"{cfg.run.storage_path}/{cfg.run.name}"
    needed = at_least_step // cfg.checkpoint.every_n_steps
    while time.time() < deadline:
        try:  # a listing only (cheap), so the kill lands mid-run
            done = sum(f.endswith("/manifest.json") for f in st.list_files(prefix, cfg.storage))
        except (FileNotFoundError, OSError):
            done = 0
        if done >= needed:
            # Only this test's own Ray cluster: its processes descend from this process.
            workers = [p for p in psutil.Process(os.getpid()).children(recursive=True)
                       if "RayTrainWorker" in " ".join(p.cmdline())]
            if workers:
                workers[-1].send_signal(signal.SIGKILL)
                return workers[-1].pid
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared to kill after")


def run_in_thread(cfg):
    """train(cfg) in a thread; box gets "result", or "error" when fit() raised."""
    box = {}

    def target():
        try:
            box["result"] = train(cfg)
        except Exception as err:  # Ray Train raises TrainingFailedError for a failed run
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def trained_tensors(result) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(result.checkpoint.to_directory(), "weights.safetensors"))


def test_worker_killed_mid_run_recovers_to_the_same_weights(ray_local, s3, proxy, tiny_minicpmv, color_data):
    reference = train(make_config(s3, proxy, tiny_minicpmv, color_data, "ft-reference"))
    assert reference.error is None

    cfg = make_config(s3, proxy, tiny_minicpmv, color_data, "ft-killed")
    # A killed worker process is a worker failure: scaling.max_failures lets Ray Train replace it.
    cfg = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"max_failures": 2})})
    thread, box = run_in_thread(cfg)
    kill_a_worker_after_checkpoint(cfg)
    thread.join(timeout=600)
    assert "error" not in box, box.get("error")
    result = box["result"]
    assert result.metrics["resumed_from_step"] is not None  # it came back from a checkpoint by itself
    assert result.metrics["step"] == reference.metrics["step"]
    ref, got = trained_tensors(reference), trained_tensors(result)
    assert ref.keys() == got.keys()
    # Same seed, same per-worker data order (preserve_order + skip after the shuffle), exact
    # optimizer state: the recovered run lands on the reference weights up to float32 rounding.
    worst = max(float((ref[k] - got[k]).abs().max()) for k in ref)
    assert worst <= 1e-5, worst


def test_rerun_resumes_and_sees_every_sample_once(ray_local, s3, proxy, tiny_minicpmv, color_data, tmp_path):
    # No retries: the kill ends part 1. micro_batch_size 1 leaves many steps after the kill.
    cfg = make_config(s3, proxy, tiny_minicpmv, color_data, "ft-rerun", micro_batch_size=1)
    cfg = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"max_preemption_failures": 0})})
    thread, box = run_in_thread(cfg)
    kill_a_worker_after_checkpoint(cfg)
    thread.join(timeout=600)
    assert "error" in box  # part 1 died with its worker (max_failures: 0)
    # What each checkpoint of part 1 says was trained (read now: checkpoint.keep prunes them later).
    trained_by_step = {
        step: positions(torch.load(os.path.join(st.download_dir(uri, str(tmp_path / str(step)), cfg.storage),
                                                "train_state.pt"), weights_only=True)["consumed"])
        for step, uri in checkpoints(cfg)
    }

    result = train(cfg)  # the same command again
    m = result.metrics
    # It continues from a checkpoint part 1 completed: the latest one Ray Train registered (a
    # checkpoint counts once every rank reported it; the one being written at the kill may not).
    assert m["resumed_from_step"] in trained_by_step and m["resumed_from_step"] >= 2
    first_part = trained_by_step[m["resumed_from_step"]]
    all_ids = set(range(len(color_data[0].read_text().splitlines())))  # row positions 0..N-1
    final = torch.load(os.path.join(result.checkpoint.to_directory(), "train_state.pt"), weights_only=True)
    assert positions(final["consumed"]) == all_ids
    # Part two trained exactly the rows part one had not: nothing twice, nothing skipped.
    assert len(first_part) + m["samples_seen"] == len(all_ids)


def positions(saved: str) -> set[int]:
    """The row positions a checkpoint's data position holds."""
    from omni_ray.data.position import PositionSet

    return {i for start, stop in PositionSet.from_json(saved).ranges() for i in range(start, stop)}


def test_s3_outage_during_upload_fails_clearly_and_keeps_the_last_good_checkpoint(
        ray_local, s3, proxy, tiny_minicpmv, color_data):
    cfg = make_config(s3, proxy, tiny_minicpmv, color_data, "ft-outage")
    run_uri = f"{cfg.run.storage_path}/{cfg.run.name}"
    thread, box = run_in_thread(cfg)
    deadline = time.time() + 240
    while find_latest(run_uri, cfg.storage) is None and time.time() < deadline:
        time.sleep(0.05)
    proxy.down()  # one checkpoint is whole in S3; the next upload meets a dead endpoint
    try:
        thread.join(timeout=600)
    finally:
        proxy.up()
    error = str(box.get("error"))
    assert "error" in box, "the run must fail, not hang or pass, when S3 stays unreachable"
    # The storage failure itself, named: a network error from the S3 client on this run's checkpoint.
    assert "NETWORK_CONNECTION" in error or "Could not connect" in error, error
    good = find_latest(run_uri, cfg.storage)
    assert good, "the checkpoint written before the outage is still whole"
    # ...and it resumes: the same command finishes from it once the endpoint is back (an
    # upload cut off by the outage may have left a manifest without its files: never used).
    result = train(cfg)
    assert result.metrics["resumed_from_step"] == good[0]
