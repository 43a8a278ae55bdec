"""Secrets never travel: not in Ray's runtime envs or logs, not in configs, shards or checkpoints.

A fresh process with distinctive fake credentials in its environment (AWS keys, as a node or a
laptop has them, plus experiment-tracker keys) runs what a user runs against S3 (moto_server):
``data prepare`` -> ``data check`` -> ``train`` (1 worker, 2 steps, run storage and shards in
S3), on its own local Ray whose temp dir (``RAY_TMPDIR``) is this test's. Then every file under
that Ray temp dir (session logs, runtime-env agent logs, Ray Data logs), the process's output
and every object the run wrote to S3 are searched for the secret values. A positive control
shows the search looks in the right place: the non-secret endpoint URL, which the driver does
forward, is found in Ray's logs.

The job API's answers are checked in tests/e2e/test_ray_job_submit.py (jobs/submit.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist

REPO_ROOT = Path(__file__).resolve().parents[2]

SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAOMNIRAYLEAKTEST7",
    "AWS_SECRET_ACCESS_KEY": "omniRayLeakTestSecret0123456789abcdefXYZ",
    "AWS_SESSION_TOKEN": "omniRayLeakTestSessionToken0123456789",
    "WANDB_API_KEY": "omniRayLeakTestWandbKey0123456789abcdef",
    "MLFLOW_TRACKING_PASSWORD": "omniRayLeakTestMlflowPassword",
    "MLFLOW_TRACKING_TOKEN": "omniRayLeakTestMlflowToken",
}

# Runs in the child: the real driver start (ensure_ray: the local Ray and the runtime env the
# driver builds, started first so that prepare and check use it too) and the real CLI commands.
SCRIPT = """
import sys
from omni_ray.config import load_config
from omni_ray.launch.cli import main
from omni_ray.launch.driver import ensure_ray
config, raw, shards, endpoint = sys.argv[1:5]
cfg = load_config(config)
ensure_ray(cfg.scaling, cfg.data, cfg.storage)
codes = [main(["data", "prepare", raw, "--out", shards, "--endpoint-url", endpoint, "--rows-per-shard", "16"])]
codes.append(main(["data", "check", shards, "--config", config]))
codes.append(main(["train", config]))
print("CODES", codes, flush=True)
sys.exit(max(codes))
"""


def _files_holding(root: Path, needles: dict[str, str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:  # sockets, vanished temp files
                continue
            for name, value in needles.items():
                if value.encode() in data:
                    found.setdefault(name, []).append(str(path))
    return found


@pytest.fixture(scope="module")
def leak_run(s3, tiny_minicpmv, color_data, tmp_path_factory):
    train_jsonl, _ = color_data
    client = s3.client()
    for line in train_jsonl.read_text().splitlines()[:8]:
        rec = json.loads(line)
        client.put_object(Bucket=s3.bucket, Key=f"leak/raw/{rec['image']}",
                          Body=(train_jsonl.parent / rec["image"]).read_bytes())
    client.put_object(Bucket=s3.bucket, Key="leak/raw/train.jsonl",
                      Body="\n".join(train_jsonl.read_text().splitlines()[:8]).encode() + b"\n")
    work = tmp_path_factory.mktemp("leak")
    config = work / "config.yaml"
    config.write_text(json.dumps({
        "model": {"path": str(tiny_minicpmv), "dtype": "float32"},
        "data": {"train": s3.uri("leak/shards"), "model_max_length": 64},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 2, "micro_batch_size": 2, "precision": "fp32"},
        "checkpoint": {"async_upload": False},
        "scaling": {"num_workers": 1, "max_failures": 0},
        "run": {"name": "leak", "storage_path": s3.uri("leak/runs")},
        "storage": {"endpoint_url": s3.endpoint_url},
    }))
    ray_tmp = Path(tempfile.mkdtemp(prefix="orleak", dir="/tmp"))  # short: Ray's socket paths are limited
    env = {**os.environ, **SECRETS, "RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": str(REPO_ROOT),
           "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "AWS_EC2_METADATA_DISABLED": "true"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(config), s3.uri("leak/raw/train.jsonl"),
                           s3.uri("leak/shards"), s3.endpoint_url],
                          env=env, capture_output=True, text=True, timeout=600, cwd=work)
    (work / "output.txt").write_text(proc.stdout + proc.stderr)
    objects = work / "s3"
    objects.mkdir()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix="leak/"):
        for obj in page.get("Contents", []):
            # Flattened names: S3 may hold both "a/b" (a directory marker) and "a/b/c".
            target = objects / obj["Key"].replace("/", "__")
            target.write_bytes(client.get_object(Bucket=s3.bucket, Key=obj["Key"])["Body"].read())
    return proc, ray_tmp, work, objects


def test_the_run_itself_worked(leak_run):
    proc, ray_tmp, _, objects = leak_run
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "CODES [0, 0, 0]" in proc.stdout
    manifests = [p for p in objects.iterdir() if p.name.startswith("leak__runs__") and p.name.endswith("manifest.json")]
    assert manifests, "training wrote no checkpoint to S3"
    assert list(ray_tmp.rglob("session_*")), f"Ray did not use RAY_TMPDIR={ray_tmp}"


def test_no_secret_in_ray_logs_output_shards_or_checkpoints(leak_run, s3):
    _, ray_tmp, work, _ = leak_run
    leaks = _files_holding(work, SECRETS)
    leaks.update({k: leaks.get(k, []) + v for k, v in _files_holding(ray_tmp, SECRETS).items()})
    assert not leaks, f"secret values found in: {json.dumps(leaks, indent=1)[:3000]}"
    # Positive control: what the driver does forward (the endpoint) is where the search looks.
    control = _files_holding(ray_tmp, {"endpoint": s3.endpoint_url})
    assert control, "the endpoint URL is in no Ray log: the search is not looking where runtime envs land"
