"""Shared fixtures: a real S3 endpoint and a small local Ray cluster.

``s3`` (session): a real ``moto_server`` process on 127.0.0.1 at a free port, the way
Ray's own test suite tests S3. Nothing is mocked inside the process under test: boto3,
pyarrow's S3 filesystem (C++ AWS SDK) and Ray workers all talk HTTP to it, so endpoint,
credential and retry handling are exercised for real. The fixture sets fake credentials
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY=testing``, ``AWS_DEFAULT_REGION=us-east-1``,
EC2 metadata lookups off) in ``os.environ`` for the session, restores the previous values
at the end, and creates one bucket. It yields a :class:`MotoS3` with ``endpoint_url``,
``bucket``, ``storage`` (an ``omni_ray.storage.StorageConfig``), ``uri(*parts)``,
``client()`` and ``stop()``/``start()``: stopping simulates an endpoint outage (e.g. in the
middle of a checkpoint upload); starting brings it back on the same port. moto keeps
state in memory, so a restart loses every object; ``start()`` recreates the bucket.

``ray_local`` (session): ``ray.init(num_cpus=4)`` (logical CPUs) without dashboard (the test machine has
two cores shared with others), with ``RAY_ENABLE_UV_RUN_RUNTIME_ENV=0`` so Ray does not
try to rebuild the uv environment for workers. The "node" it starts has its own (fake) AWS
credentials in its environment, set before ``ray.init`` whichever fixture comes first: that
is how a cluster node gets them (instance profile, IRSA, a mounted Secret), and code under
test must never forward credentials to workers itself (tests/dist/test_secrets.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Optional

import pytest

# Models fetched from S3 are cached per node; tests get a fresh cache (Ray workers inherit it).
os.environ.setdefault("OMNI_RAY_CACHE", tempfile.mkdtemp(prefix="omni_ray_cache_"))

_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    # Unset anything from the developer's machine that could point elsewhere.
    "AWS_SESSION_TOKEN": None,
    "AWS_PROFILE": None,
    "AWS_ENDPOINT_URL": None,
    "AWS_ENDPOINT_URL_S3": None,
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Environ:
    """Set/unset environment variables and put the old values back (session scope)."""

    def __init__(self, changes: dict[str, Optional[str]]):
        self._saved = {name: os.environ.get(name) for name in changes}
        for name, value in changes.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    def restore(self) -> None:
        for name, value in self._saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class MotoS3:
    """A ``moto_server`` subprocess serving one bucket; restartable on the same port."""

    def __init__(self, bucket: str = "omni-ray-test", port: Optional[int] = None):
        self.bucket = bucket
        self.port = port or _free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._proc: Optional[subprocess.Popen] = None
        self._log = tempfile.NamedTemporaryFile(prefix="moto-", suffix=".log", delete=False)

    @property
    def storage(self):
        from omni_ray.storage import StorageConfig

        return StorageConfig(endpoint_url=self.endpoint_url, region="us-east-1")

    def uri(self, *parts: str) -> str:
        """``s3://BUCKET/part/part``."""
        return "/".join([f"s3://{self.bucket}", *(p.strip("/") for p in parts)])

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        """Start the server (state is empty after a restart) and create the bucket."""
        if self.running:
            return
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"moto_server exited with {self._proc.returncode}; see {self._log.name}"
                )
            try:
                urllib.request.urlopen(self.endpoint_url, timeout=1).close()
                break
            except urllib.error.HTTPError:
                break  # any HTTP answer means it is serving
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"moto_server did not answer on {self.endpoint_url} within "
                        f"{timeout}s; see {self._log.name}"
                    )
                time.sleep(0.1)
        self.client().create_bucket(Bucket=self.bucket)

    def stop(self) -> None:
        """Kill the server, like an endpoint outage; in-memory objects are lost."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None


@pytest.fixture(scope="session")
def s3():
    environ = _Environ(_AWS_ENV)
    server = MotoS3()
    try:
        server.start()
        yield server
    finally:
        server.stop()
        environ.restore()


@pytest.fixture(scope="session")
def ray_local():
    import ray

    environ = _Environ({"RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", **_AWS_ENV})
    # 4 logical CPUs on a 2-core machine: two training workers (1 CPU each) plus Ray Data's
    # preprocessing actors must fit at once, or the pipeline waits forever for a free CPU.
    ray.init(address="local", num_cpus=4, include_dashboard=False, ignore_reinit_error=True)
    try:
        yield ray
    finally:
        ray.shutdown()
        environ.restore()


@pytest.fixture(scope="session")
def tiny_minicpmv(tmp_path_factory):
    """A tiny random MiniCPM-V 4.6 checkpoint (save_pretrained), loaded like a real one."""
    from omni_ray.models.tiny import build_tiny_minicpmv

    return build_tiny_minicpmv(tmp_path_factory.mktemp("models") / "minicpmv4_6")


@pytest.fixture(scope="session")
def color_data(tmp_path_factory):
    """MiniCPM-V-format JSONL of colour questions (train: 64 samples, eval: 12) with PNG files."""
    from omni_ray.data.synthetic import make_color_dataset

    return make_color_dataset(tmp_path_factory.mktemp("colors"), n_train=64, n_eval=12)
