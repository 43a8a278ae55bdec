"""One writer per run: the lease on run.storage_path/run.name, on local disk and on a real moto S3.

Holders are real processes (``HOLDER`` below: take the lease, say so, hold it) so that SIGKILL and
"two drivers started in the same second" are what the kernel and the endpoint see; no training
is needed to hold a lease. One CLI case checks what a refused ``omni-ray train`` prints and
its exit code (1: the run is refused, the config is fine).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from omni_ray.launch.lease import LEASE_NAME, Holder, LeaseHeld, acquire

ROOT = Path(__file__).resolve().parents[2]

# argv: RUN_URI EXPIRY_S HOST(- = this one) START_AT(wall clock) [ENDPOINT]
HOLDER = """
import sys, time
from omni_ray.launch.lease import Holder, LeaseHeld, acquire
from omni_ray.storage import StorageConfig
uri, expiry, host, start_at = sys.argv[1], float(sys.argv[2]), sys.argv[3], float(sys.argv[4])
storage = StorageConfig(endpoint_url=sys.argv[5]) if len(sys.argv) > 5 else None
holder = Holder() if host == "-" else Holder(host=host)
time.sleep(max(0.0, start_at - time.time()))  # both contenders ask at the same instant
try:
    with acquire(uri, storage, expiry, holder):
        print("held", flush=True)
        time.sleep(600)
except LeaseHeld as err:
    print("refused", err, flush=True)
    sys.exit(1)
"""


def start_holders(uri: str, count: int = 1, expiry_s: float = 60.0, host: str = "-", endpoint: str | None = None,
                  delay_s: float = 4.0) -> list[subprocess.Popen]:
    """``count`` holder processes that all ask for the lease ``delay_s`` from now (after their imports)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start_at = time.time() + delay_s
    args = [uri, str(expiry_s), host, str(start_at)] + ([endpoint] if endpoint else [])
    return [subprocess.Popen([sys.executable, "-c", HOLDER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env) for _ in range(count)]


def first_line(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline().strip()
    assert line, proc.stderr.read() if proc.poll() is not None else "no output"
    return line


def winner_of(procs: list[subprocess.Popen]) -> subprocess.Popen:
    """Exactly one holder holds; every other one was refused naming the winner's pid."""
    lines = {proc.pid: first_line(proc) for proc in procs}
    winners = [proc for proc in procs if lines[proc.pid] == "held"]
    assert len(winners) == 1, lines
    for proc in procs:
        if proc is not winners[0]:
            assert lines[proc.pid].startswith("refused") and f"pid {winners[0].pid}" in lines[proc.pid], lines
            assert proc.wait(timeout=60) == 1
    return winners[0]


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


# --- local disk ----------------------------------------------------------------------------------


def test_local_lease_refuses_a_second_holder_until_released(tmp_path):
    run = str(tmp_path / "runs" / "r1")
    with acquire(run) as first:
        with pytest.raises(LeaseHeld) as refused:
            with acquire(run):
                pass
        message = str(refused.value)
        for words in (f"host {socket.gethostname()}", f"pid {os.getpid()}", first.holder.started, "run.name", run):
            assert words in message, (words, message)
    with acquire(run):  # released on exit: the next driver gets it
        assert (Path(run) / LEASE_NAME).exists()


def test_local_same_second_one_wins_and_sigkill_frees_at_once(tmp_path):
    run = str(tmp_path / "runs" / "r2")
    winner = winner_of(start_holders(run, count=2))
    with pytest.raises(LeaseHeld, match=f"pid {winner.pid}"):
        with acquire(run):
            pass
    kill(winner)  # the kernel drops a dead process's lock: no expiry to wait for on local disk
    with acquire(run) as lease:
        assert f'"pid": {os.getpid()}' in (Path(run) / LEASE_NAME).read_text()
        assert lease.holder.pid == os.getpid()


# --- S3 (moto_server) ----------------------------------------------------------------------------


def test_s3_lease_heartbeat_keeps_it_and_release_frees_it(s3):
    run = s3.uri("runs", "h1")
    with acquire(run, s3.storage, expiry_s=1.5):
        time.sleep(3.0)  # two expiries: only the heartbeat keeps it alive
        with pytest.raises(LeaseHeld, match=r"renewed \d+s ago.*run.lease_expiry_s"):
            with acquire(run, s3.storage, expiry_s=1.5, holder=Holder(host="another-host")):
                pass
    with acquire(run, s3.storage, expiry_s=1.5):
        pass
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=s3.bucket, Prefix="runs/h1/").get("Contents", [])]
    assert keys == []  # released: the object is gone


def test_s3_same_second_one_wins_and_a_killed_holder_expires(s3, caplog):
    run = s3.uri("runs", "h2")
    expiry = 4.0
    # Holders "on another host": a dead pid there cannot be seen from here, only the expiry frees it.
    winner = winner_of(start_holders(run, count=2, expiry_s=expiry, host="other-host", endpoint=s3.endpoint_url))
    kill(winner)
    killed_at = time.monotonic()
    with pytest.raises(LeaseHeld, match=f"pid {winner.pid}"):
        with acquire(run, s3.storage, expiry_s=expiry):
            pass
    time.sleep(max(0.0, expiry + 1.5 - (time.monotonic() - killed_at)))
    with caplog.at_level(logging.WARNING, logger="omni_ray.launch.lease"):
        with acquire(run, s3.storage, expiry_s=expiry):
            body = s3.client().get_object(Bucket=s3.bucket, Key=f"runs/h2/{LEASE_NAME}")["Body"].read().decode()
            assert f'"pid": {os.getpid()}' in body
    assert any("took over" in r.getMessage() and "not renewed" in r.getMessage() for r in caplog.records)


def test_s3_dead_holder_on_this_host_is_taken_over_at_once(s3):
    run = s3.uri("runs", "h3")
    (holder,) = start_holders(run, expiry_s=600.0, endpoint=s3.endpoint_url, delay_s=0.0)
    assert first_line(holder) == "held"
    kill(holder)
    with acquire(run, s3.storage, expiry_s=600.0):  # same host, pid gone: no 600 s wait
        pass


# --- the CLI ------------------------------------------------------------------------------------


def test_second_train_driver_exits_1_naming_the_holder(tmp_path, tiny_minicpmv, color_data, capsys):
    from omni_ray.launch.cli import main

    runs = tmp_path / "runs"
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"path": str(tiny_minicpmv)}, "data": {"train": str(color_data[0])},
        "run": {"name": "shared", "storage_path": str(runs)}}))
    (holder,) = start_holders(str(runs / "shared"), delay_s=0.0)
    try:
        assert first_line(holder) == "held"
        code = main(["train", str(cfg)])
    finally:
        kill(holder)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1, err
    assert err[-1].startswith("error: run.name: ") and f"pid {holder.pid}" in err[-1], err
    assert "--set run.name=" in err[-1] and not any("Traceback" in line for line in err), err
