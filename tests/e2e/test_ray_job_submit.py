"""Run where users run: a real Ray head started with `ray start --head`, jobs sent to its job API.

One module-scoped head (4 logical CPUs, token auth with a token made for this test, its own
ports and temp dir) serves every test here, in file order:

* the README's demo through the real ``ray job submit`` CLI, waited for until SUCCEEDED, and
  its checkpoint (``runs/*/checkpoint_*/manifest.json``) found on disk;
* ``python jobs/submit.py`` on a tiny MiniCPM-V config: exit 0 only after the job SUCCEEDED,
  a second submission of the same run while the first runs is refused (exit 1), the next
  submission id after it ended is ``omni-ray-<run>-2``;
* a config whose data is missing: the job FAILS and ``jobs/submit.py`` exits 1 (a launcher
  that exits 0 on failure hides broken runs from CI and schedulers);
* a config with an unknown key: exit 2 and nothing submitted;
* Ray 2.60's own client sends no token unless ``RAY_AUTH_MODE=token`` is set (what
  jobs/submit.py works around by sending the header itself).

Teardown kills the head's process group and every process it started, by pid. It does not
run ``ray stop --force``: that kills every Ray process on the machine by name, including
other people's clusters and test runs on a shared host.

Run: python -m pytest -q tests/e2e/test_ray_job_submit.py   (about 4 minutes on 2 cores)
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RAY_CLI = str(BIN / "ray")
SUBMIT_PY = REPO_ROOT / "jobs" / "submit.py"
JOB_TIMEOUT_S = 480
EXCLUDES = [".venv", ".git", "*.whl", "tests", "bench"]
SUBMITTER_SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAOMNIRAYSUBMIT123",
    "AWS_SECRET_ACCESS_KEY": "omniRaySubmitLeakTestSecret0123456789",
    "WANDB_API_KEY": "omniRaySubmitLeakTestWandb0123456789",
    "MLFLOW_TRACKING_PASSWORD": "omniRaySubmitLeakTestMlflow",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _load_submit():
    spec = importlib.util.spec_from_file_location("omni_ray_jobs_submit", SUBMIT_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


submit = _load_submit()


class RayHead:
    """``ray start --head --block`` in its own session; stopped by pid, never by name."""

    def __init__(self):
        self.token = uuid.uuid4().hex + uuid.uuid4().hex
        self.dashboard_port = _free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        # Short path: Ray's unix sockets live under it and must stay below 108 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="ray-e2e-", dir="/tmp")
        self.log = Path(self.temp_dir) / "head.log"
        self.proc: subprocess.Popen | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def env(self, auth_mode: bool = True) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
        env.update(RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_TOKEN=self.token,
                   PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
        if auth_mode:
            env["RAY_AUTH_MODE"] = "token"
        return env

    def start(self, timeout: float = 120.0) -> None:
        ports = {name: str(_free_port()) for name in
                 ("--port", "--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                  "--node-manager-port", "--object-manager-port", "--metrics-export-port")}
        cmd = [RAY_CLI, "start", "--head", "--block", "--num-cpus", "4", "--node-ip-address", "127.0.0.1",
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
               "--disable-usage-stats", "--temp-dir", self.temp_dir]
        for flag, port in ports.items():
            cmd += [flag, port]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                request = urllib.request.Request(f"{self.address}/api/version", headers=self.headers)
                urllib.request.urlopen(request, timeout=2).close()
                return
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the dashboard did not answer within {timeout}s:\n{self.log_tail()}")
                time.sleep(1)

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address, headers=self.headers)

    def stop(self) -> None:
        """SIGKILL the head's process group and all its descendants (workers set their own groups)."""
        if self.proc is not None:
            import psutil

            for _ in range(2):  # a second pass catches anything forked during the first
                try:
                    victims = psutil.Process(self.proc.pid).children(recursive=True)
                except psutil.NoSuchProcess:
                    victims = []
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                for proc in victims:
                    try:
                        proc.kill()
                    except psutil.NoSuchProcess:
                        pass
                psutil.wait_procs(victims, timeout=10)
            self.proc.wait(timeout=10)
            self.proc = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def head():
    ray_head = RayHead()
    try:
        ray_head.start()
        yield ray_head
    finally:
        ray_head.stop()


def wait_terminal(head: RayHead, submission_id: str, timeout: float = JOB_TIMEOUT_S):
    client = head.client()
    deadline = time.monotonic() + timeout
    while True:
        status = client.get_job_status(submission_id)
        if status.is_terminal():
            return status
        if time.monotonic() > deadline:
            client.stop_job(submission_id)
            pytest.fail(f"{submission_id} still {status.value} after {timeout}s:\n"
                        + client.get_job_logs(submission_id)[-4000:])
        time.sleep(3)


# --- the demo through the real `ray job submit` CLI ------------------------------------------------


def test_demo_through_ray_job_submit(head, tmp_path):
    submission_id = f"omni-ray-e2e-demo-{uuid.uuid4().hex[:6]}"
    cmd = [RAY_CLI, "job", "submit", "--address", head.address, "--submission-id", submission_id,
           "--working-dir", str(REPO_ROOT), "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
           "--no-wait", "--",
           "omni-ray", "demo", "--workdir", str(tmp_path), "--min-accuracy", "0.0", "--steps", "6"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=head.env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    from ray.job_submission import JobStatus

    status = wait_terminal(head, submission_id)
    logs = head.client().get_job_logs(submission_id)
    assert status == JobStatus.SUCCEEDED, logs[-5000:]
    assert "[demo] held-out accuracy after training" in logs
    manifests = sorted(tmp_path.glob("runs/*/checkpoint_*/manifest.json"))
    assert manifests, f"no checkpoint manifest under {tmp_path}/runs:\n{logs[-3000:]}"
    manifest = json.loads(manifests[-1].read_text())
    assert manifest, manifests[-1]


# --- jobs/submit.py ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory):
    """(working dir, write_config(name, **changes) -> path) for a tiny MiniCPM-V run on 2 CPU workers."""
    from omni_ray.data.synthetic import make_color_dataset
    from omni_ray.models.tiny import build_tiny_minicpmv

    root = tmp_path_factory.mktemp("tiny-job")
    model = build_tiny_minicpmv(root / "model")
    train_jsonl, _ = make_color_dataset(root / "data", n_train=32, n_eval=4)
    workdir = root / "wd"
    (workdir / "jobs").mkdir(parents=True)

    def write_config(name: str, extra: dict | None = None, **sections) -> Path:
        cfg = {
            "model": {"path": str(model), "dtype": "float32"},
            "data": {"train": str(train_jsonl), "model_max_length": 64, "max_bad_fraction": 0.0},
            "freeze": {"vision": "frozen", "projector": "full", "llm": "lora"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"max_steps": 2, "micro_batch_size": 4, "lr": 1e-3, "precision": "fp32", "log_every": 1},
            "strategy": {"name": "fsdp"},
            "scaling": {"num_workers": 2, "resources_per_worker": {"CPU": 1}, "max_failures": 0},
            "run": {"name": f"{name}-{uuid.uuid4().hex[:6]}", "storage_path": str(root / "runs")},
        }
        for section, values in sections.items():
            cfg[section] = {**cfg.get(section, {}), **values}
        cfg.update(extra or {})
        path = workdir / "jobs" / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    return root, workdir, write_config


def _submit_cmd(head: RayHead, config: Path, workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SUBMIT_PY), str(config), "--address", head.address, "--working-dir", str(workdir),
            *extra]


def test_submit_py_waits_for_success_and_refuses_a_second_driver(head, tiny_job, monkeypatch, capsys):
    root, workdir, write_config = tiny_job
    config = write_config("e2e-submit")
    run_name = yaml.safe_load(config.read_text())["run"]["name"]
    first_id = f"omni-ray-{run_name}"
    # No RAY_AUTH_MODE in the submitter's environment, only the token: jobs/submit.py must send
    # the header itself (Ray's client would not; see test_ray_client_needs_auth_mode). Secrets
    # in the submitter's shell (S3 and tracker keys) must not travel with the job: not in its
    # runtime env, the job API's answers or the head's logs (checked below).
    env = {**head.env(auth_mode=False), **SUBMITTER_SECRETS}
    proc = subprocess.Popen(_submit_cmd(head, config, workdir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        client = head.client()
        deadline = time.monotonic() + 120
        while first_id not in {j.submission_id for j in client.list_jobs()}:
            assert proc.poll() is None, "".join(output)[-4000:]
            assert time.monotonic() < deadline, "jobs/submit.py did not submit within 120 s:\n" + "".join(output)
            time.sleep(1)

        # A second submission of the same run while the first is pending/running: refused, exit 1.
        monkeypatch.setenv("RAY_AUTH_TOKEN", head.token)
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
        capsys.readouterr()
        assert submit.main([str(config), "--address", head.address, "--working-dir", str(workdir)]) == 1
        err = capsys.readouterr().err
        assert "has not ended" in err and first_id in err, err

        rc = proc.wait(timeout=JOB_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    text = "".join(output)
    assert rc == 0, text[-5000:]
    assert f"[submit] {first_id}: SUCCEEDED" in text, text[-3000:]
    assert "Reporting training result" in text or "step" in text  # the log was streamed
    info = client.get_job_info(first_id)
    assert info.entrypoint == f"omni-ray train jobs/{config.name}"
    assert info.metadata.get("omni_ray_run") == run_name
    assert "AWS_ACCESS_KEY_ID" not in info.runtime_env["env_vars"], info.runtime_env
    _assert_no_submitter_secrets(head, first_id)
    assert sorted((root / "runs" / run_name).glob("checkpoint_*/manifest.json")), sorted((root / "runs").rglob("*"))
    # The run ended: the next submission of it gets the next id (and resumes, same run.name).
    assert submit.resolve_submission_id(client, run_name) == f"{first_id}-2"


def test_submit_py_exits_nonzero_when_the_job_fails(head, tiny_job):
    root, workdir, write_config = tiny_job
    config = write_config("e2e-fail", data={"train": str(root / "data" / "missing.jsonl")})
    run_name = yaml.safe_load(config.read_text())["run"]["name"]
    proc = subprocess.run(_submit_cmd(head, config, workdir, "--timeout", str(JOB_TIMEOUT_S)), capture_output=True,
                          text=True, timeout=JOB_TIMEOUT_S + 60, env=head.env(auth_mode=False))
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text[-4000:]
    assert f"[submit] omni-ray-{run_name}: FAILED" in text, text[-4000:]
    assert "missing.jsonl" in text, text[-4000:]  # it failed for the reason we gave it

    from ray.job_submission import JobStatus

    assert head.client().get_job_status(f"omni-ray-{run_name}") == JobStatus.FAILED


def test_submit_py_rejects_a_bad_key_without_submitting(head, tiny_job, monkeypatch, capsys):
    _, workdir, write_config = tiny_job
    config = write_config("e2e-badkey", extra={"trian": {"lr": 1e-4}})
    monkeypatch.setenv("RAY_AUTH_TOKEN", head.token)
    before = {j.submission_id for j in head.client().list_jobs()}
    assert submit.main([str(config), "--address", head.address, "--working-dir", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert "trian" in err and "unknown key" in err, err
    # And a bad --set is caught the same way.
    config = write_config("e2e-badset")
    assert submit.main([str(config), "--address", head.address, "--working-dir", str(workdir),
                        "--set", "train.lr=-1"]) == 2
    assert "train.lr" in capsys.readouterr().err
    assert {j.submission_id for j in head.client().list_jobs()} == before


def test_submit_py_dry_run_masks_secrets(head, tiny_job, monkeypatch, capsys):
    _, workdir, write_config = tiny_job
    config = write_config("e2e-dry")
    monkeypatch.setenv("RAY_AUTH_TOKEN", head.token)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret")
    before = {j.submission_id for j in head.client().list_jobs()}
    assert submit.main([str(config), "--address", head.address, "--working-dir", str(workdir), "--dry-run",
                        "--set", "train.lr=0.002"]) == 0
    out = capsys.readouterr().out
    run_name = yaml.safe_load(config.read_text())["run"]["name"]
    assert f"submission_id: omni-ray-{run_name}" in out
    assert "entrypoint: omni-ray train jobs/e2e-dry.yaml --set train.lr=0.002" in out
    assert "very-secret" not in out and "AKIAEXAMPLE" not in out
    assert {j.submission_id for j in head.client().list_jobs()} == before


def test_ray_client_needs_auth_mode(head):
    """Ray 2.60: a token in RAY_AUTH_TOKEN is not sent unless RAY_AUTH_MODE=token is set."""
    code = ("from ray.job_submission import JobSubmissionClient as C\n"
            f"try:\n    C({head.address!r}).list_jobs(); print('OK')\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    without = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             env=head.env(auth_mode=False))
    assert "AuthenticationError" in without.stdout and "Missing authentication token" in without.stdout, without
    with_mode = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                               env=head.env(auth_mode=True))
    assert with_mode.stdout.strip().endswith("OK"), with_mode


def _assert_no_submitter_secrets(head, submission_id: str) -> None:
    """The job API's answers (list and one job) and every file of the head's temp dir hold no secret."""
    answers = []
    for path in ("/api/jobs/", f"/api/jobs/{submission_id}"):
        request = urllib.request.Request(head.address + path, headers=head.headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            answers.append(response.read().decode())
    assert submission_id in answers[0]  # the answer is the real job list
    for name, value in SUBMITTER_SECRETS.items():
        assert all(value not in answer for answer in answers), f"{name} in the job API's answer"
    for file in Path(head.temp_dir).rglob("*"):
        if file.is_file() and not file.is_symlink():
            try:
                data = file.read_bytes()
            except OSError:
                continue
            for name, value in SUBMITTER_SECRETS.items():
                assert value.encode() not in data, f"{name} in {file}"


# --- pieces of jobs/submit.py that need no cluster ---------------------------------------------------


def test_runtime_env_and_entrypoint(monkeypatch):
    from omni_ray.config import ConfigError, load_config

    for name, value in SUBMITTER_SECRETS.items():
        monkeypatch.setenv(name, value)
    cfg = load_config(REPO_ROOT / "jobs" / "minicpmv46_lora.yaml", ["storage.endpoint_url=http://minio:9000"])
    env = submit.build_runtime_env(cfg)
    assert env["working_dir"] == str(REPO_ROOT)
    assert {".venv", ".git", "*.whl", "tests", "bench", "*.env"} <= set(env["excludes"])
    assert env["env_vars"] == {"AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
                               "AWS_ENDPOINT_URL": "http://minio:9000", "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}
    assert not any(value in json.dumps(env) for value in SUBMITTER_SECRETS.values())
    assert "pip" not in env and "py_modules" not in env
    self_env = submit.build_runtime_env(cfg, pip_install_self=True, pip=["flash-attn"])
    assert self_env["py_modules"] == [str(REPO_ROOT / "omni_ray")]
    packages = self_env["pip"]["packages"]
    assert "transformers==5.24.0" in packages and packages[-1] == "flash-attn"
    assert not any(p.startswith("ray") for p in packages)

    entry = submit.entrypoint_for(REPO_ROOT / "jobs" / "minicpmv46_lora.yaml", REPO_ROOT,
                                  ["train.lr=2e-5", "run.name=a b"])
    assert entry == "omni-ray train jobs/minicpmv46_lora.yaml --set train.lr=2e-5 --set 'run.name=a b'"
    assert submit.entrypoint_for(REPO_ROOT / "jobs" / "x.yaml", REPO_ROOT, [], self_install=True).startswith(
        "python -m omni_ray.launch.cli train jobs/x.yaml")
    with pytest.raises(ConfigError, match="outside the working dir"):
        submit.entrypoint_for("/tmp/elsewhere.yaml", REPO_ROOT, [])


def test_secret_files_stay_out_of_the_working_dir(tmp_path):
    """Ray's own packaging of the working dir, with jobs/submit.py's excludes: no secret file in the zip."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    from omni_ray.config import load_config

    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "run.yaml").write_text("x: 1\n")
    secret_files = ["s3.env", ".env", "deploy/prod.env", "id_rsa", "tls.key", ".aws/credentials", ".ray/auth_token"]
    for rel in secret_files:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("AWS_SECRET_ACCESS_KEY=omniRayLeakTestSecret\n")
    cfg = load_config({"model": {"path": "/m"}, "data": {"train": "/d.jsonl"}})
    env = submit.build_runtime_env(cfg, tmp_path)
    create_package(str(tmp_path), tmp_path / "pkg.zip", include_gitignore=True, excludes=env["excludes"])
    shipped = set(zipfile.ZipFile(tmp_path / "pkg.zip").namelist())
    assert "jobs/run.yaml" in shipped, shipped
    assert not [name for name in shipped if any(name.rstrip("/").endswith(rel) for rel in secret_files)], shipped


def test_a_secret_in_the_runtime_env_is_refused(monkeypatch):
    from omni_ray.config import load_config

    cfg = load_config({"model": {"path": "/m"}, "data": {"train": "/d.jsonl"}})
    monkeypatch.setattr(type(cfg.storage), "worker_env", lambda self: {"WANDB_API_KEY": "x"})
    with pytest.raises(submit.SubmitError, match="WANDB_API_KEY"):
        submit.build_runtime_env(cfg)


def test_auth_header_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    assert submit.auth_headers() == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert submit.auth_headers() == {"Authorization": "Bearer from-home"}
    (tmp_path / "tok").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert submit.auth_headers() == {"Authorization": "Bearer from-path"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert submit.auth_headers() == {"Authorization": "Bearer from-env"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert submit.auth_headers() == {}


def test_submission_ids_follow_the_run():
    from ray.job_submission import JobStatus

    class Job:
        def __init__(self, submission_id, status, run=None):
            self.submission_id, self.status = submission_id, status
            self.metadata = {"omni_ray_run": run} if run else {}

    class Client:
        def __init__(self, jobs):
            self.jobs = jobs

        def list_jobs(self):
            return self.jobs

    assert submit.resolve_submission_id(Client([]), "r") == "omni-ray-r"
    done = [Job("omni-ray-r", JobStatus.FAILED, "r"), Job("omni-ray-r-2", JobStatus.SUCCEEDED, "r"),
            Job("omni-ray-r-x", JobStatus.RUNNING), Job("omni-ray-rr", JobStatus.RUNNING)]
    assert submit.resolve_submission_id(Client(done), "r") == "omni-ray-r-3"
    # Job "omni-ray-r-2" of a run named "r-2" is not job 2 of run "r" (metadata tells them apart).
    other = [Job("omni-ray-r-2", JobStatus.RUNNING, "r-2")]
    assert submit.resolve_submission_id(Client(other), "r") == "omni-ray-r"
    with pytest.raises(submit.SubmitError, match="has not ended"):
        submit.resolve_submission_id(Client(done + [Job("omni-ray-r-3", JobStatus.PENDING, "r")]), "r")
