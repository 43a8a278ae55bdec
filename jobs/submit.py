#!/usr/bin/env python
"""Submit an omni_ray config to a running Ray cluster as a Ray job, and wait for its result.

    python jobs/submit.py CONFIG [--address http://127.0.0.1:8265] [--set k=v ...] [--no-wait]
                                 [--working-dir DIR] [--pip-install-self] [--pip PKG ...]
                                 [--timeout S] [--dry-run]

What it does, in order:

1. Loads and checks CONFIG (with the ``--set`` overrides) through ``omni_ray.config.load_config``:
   a bad key fails here, in a second, with exit code 2 and nothing submitted.
2. Picks the submission id from the run name: ``omni-ray-<run.name>``. Ray keeps finished jobs
   and rejects a submission id it already has, so when jobs of this run exist and all have
   ended, the next one is ``omni-ray-<run.name>-<n+1>`` (the first is n=1). Because the run name
   (and so Ray Train's run directory under ``run.storage_path``) is the same, the resubmitted
   job resumes from the run's latest checkpoint. If one of them is still PENDING or RUNNING,
   it says so and exits 1: two drivers must not train into the same run directory.
3. Builds the runtime env: ``working_dir`` is the repository root (configs are addressed
   relative to it; ``.venv``, ``.git``, wheels, ``tests``, ``bench`` and files that hold
   secrets, ``*.env`` such as ``s3.env``, keys, ``.aws/``, auth tokens, are excluded), and
   ``env_vars`` is ``StorageConfig.worker_env()``: endpoint and region only. Credentials are
   never sent: Ray writes a job's runtime env into its logs and shows it in the job API, so
   the cluster's nodes use their own (an instance profile, IRSA, a Kubernetes Secret mounted
   into the pods; see the README's Security section). A runtime env that would carry a
   secret-looking variable is refused before anything is submitted.
   It also sets ``RAY_OVERRIDE_JOB_RUNTIME_ENV=1``: the driver passes the same variables to its
   own ``ray.init(runtime_env=...)``, and without it Ray 2.60 fails the job ("Failed to merge
   the Job's runtime env ... because of a conflict").
   No ``pip``: the cluster image (Dockerfile) already has omni_ray and its pinned
   dependencies. Ray puts ``working_dir`` first on PYTHONPATH, so the job runs this checkout's
   ``omni_ray/`` over the image's copy; only the dependencies come from the image.
   ``--pip-install-self`` is for a bare Ray image: it ships ``omni_ray/`` as a ``py_modules``
   entry, asks Ray to pip-install the dependencies from pyproject.toml into the job's
   environment (slow the first time on every node; a built image is the better fix) and runs
   ``python -m omni_ray.launch.cli`` instead of the ``omni-ray`` script. ``--pip PKG`` adds
   single packages.
4. Submits ``omni-ray train <config relative to the working dir> --set ...`` with
   ``JobSubmissionClient(address).submit_job(entrypoint, submission_id, runtime_env, metadata)``.
5. Unless ``--no-wait``: streams the job's log and exits 0 only if the job ended SUCCEEDED;
   FAILED or STOPPED exit 1 (so CI and schedulers see failures), a ``--timeout`` exits 1
   (the job keeps running), Ctrl-C exits 130 and leaves the job running.

Token authentication (checked against Ray 2.60's code, ``ray/_private/authentication``):

* The dashboard's HTTP API (the job server) accepts ``Authorization: Bearer <token>`` (or
  ``X-Ray-Authorization``, or the ``ray-authentication-token`` cookie) and answers 401 without
  a token and 403 with a wrong one when the cluster runs with ``RAY_AUTH_MODE=token``.
* Ray's token loader looks, in this order, at ``RAY_AUTH_TOKEN`` (the token itself),
  ``RAY_AUTH_TOKEN_PATH`` (a file holding it), then ``~/.ray/auth_token``.
* ``JobSubmissionClient`` (and ``ray job submit``) attach the token only when token auth is
  enabled *in the client process*, i.e. ``RAY_AUTH_MODE=token`` is set in its environment; a
  token file alone is not enough, and the request then fails with 401. This module does not
  depend on that: it loads the token itself with the same precedence and passes the header
  explicitly (``headers=``), unless ``RAY_AUTH_MODE=disabled``. No token found: no header.
* ``ray start --head`` does not create a token. With ``RAY_AUTH_MODE`` unset it turns token
  auth on if a token already exists (env var or file) and warns that auth is off otherwise;
  with ``RAY_AUTH_MODE=token`` and no token it refuses to start. ``ray get-auth-token
  --generate`` writes ``~/.ray/auth_token``. (A plain ``ray.init()`` that starts a local
  cluster is different: it enables token auth by default and generates the file.)
* On a cluster, give every node and every submitter the same token: KubeRay from a Secret
  (``RAY_AUTH_TOKEN``, cluster/kuberay/rayjob.yaml), the cluster launcher by copying
  ``~/.ray/auth_token`` (cluster/aws/spot-cluster.yaml).

Importable: ``main(argv)`` returns the exit code; ``build_runtime_env``, ``entrypoint_for``,
``resolve_submission_id``, ``auth_headers`` and ``wait_for_job`` are the pieces.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shlex
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python jobs/submit.py` from a checkout without `pip install -e .`
    sys.path.insert(1, str(REPO_ROOT))

from omni_ray.config import Config, ConfigError, load_config  # noqa: E402
from omni_ray.storage import secret_env_names  # noqa: E402

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
EXCLUDES = [".venv", ".git", "*.whl", ".whl", "tests", "bench", "__pycache__", "*.egg-info", ".pytest_cache"]
# Files that hold secrets never go into the job's working dir (Ray uploads it to the cluster's
# GCS and unpacks it on every node): s3.env, which the KubeRay instructions create for
# `kubectl create secret --from-env-file`, private keys, AWS credentials, Ray auth tokens.
SECRET_FILE_EXCLUDES = ["*.env", ".env", ".env.*", "*.pem", "*.key", "*.p12", "id_rsa*", "id_ed25519*", ".aws",
                        "credentials", "auth_token", ".netrc", ".ray", "*.kubeconfig", "kubeconfig"]
ID_PREFIX = "omni-ray-"
EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_INTERRUPTED = 0, 1, 2, 130


class SubmitError(RuntimeError):
    """Something about the submission (not the config) is wrong; the message says what to do."""


# --- pieces ------------------------------------------------------------------------------------


def entrypoint_for(config_path: str | Path, working_dir: str | Path, overrides: list[str],
                   self_install: bool = False) -> str:
    """The job's shell command: ``omni-ray train <config relative to working_dir> --set ...``."""
    config_path, working_dir = Path(config_path).resolve(), Path(working_dir).resolve()
    try:
        rel = config_path.relative_to(working_dir).as_posix()
    except ValueError:
        raise ConfigError(
            f"{config_path} is outside the working dir {working_dir}, so the cluster would not get it; "
            "put the config under jobs/ or pass --working-dir DIR that contains it"
        ) from None
    command = ["python", "-m", "omni_ray.launch.cli"] if self_install else ["omni-ray"]
    command += ["train", rel]
    for item in overrides:
        command += ["--set", item]
    return shlex.join(command)


def project_dependencies() -> list[str]:
    import tomllib

    return list(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"])


def build_runtime_env(cfg: Config, working_dir: str | Path = REPO_ROOT, pip_install_self: bool = False,
                      pip: list[str] | None = None) -> dict:
    """Ray runtime env for the job: code, S3 env for driver and workers, optional pip."""
    env: dict = {
        "working_dir": str(Path(working_dir).resolve()),
        "excludes": EXCLUDES + SECRET_FILE_EXCLUDES,
        # The driver (omni_ray.launch.driver.ensure_ray) calls ray.init(runtime_env={"env_vars":
        # worker_env()}) again inside the job; Ray refuses to merge a job's and a driver's runtime
        # env that set the same env var (AWS_ENDPOINT_URL ...) unless this is set. The values
        # are the same ones (the driver reads them from the env this job gives it).
        "env_vars": {**cfg.storage.worker_env(), "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"},
    }
    leaked = secret_env_names(env["env_vars"])
    if leaked:  # defence in depth: worker_env() never returns these
        raise SubmitError(f"the job's runtime env would carry secrets {leaked}; Ray logs runtime envs and shows "
                          "them in its job API. Give the cluster's nodes their own credentials instead")
    packages = list(pip or [])
    if pip_install_self:
        env["py_modules"] = [str(REPO_ROOT / "omni_ray")]
        # ray itself is already in the job's environment (it runs the job); installing it
        # again into the pip virtualenv would shadow the cluster's Ray.
        packages = [d for d in project_dependencies() if not re.match(r"ray\b", d)] + packages
    if packages:
        env["pip"] = {"packages": packages, "pip_check": False}
    return env


def _read_token() -> str | None:
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    for path in (os.environ.get("RAY_AUTH_TOKEN_PATH"), Path.home() / ".ray" / "auth_token"):
        if path and Path(path).is_file():
            token = Path(path).read_text().strip()
            if token:
                return token
    return None


def auth_headers() -> dict[str, str]:
    """``{"Authorization": "Bearer <token>"}`` from Ray's token sources, or {} (see the module doc)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = _read_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _id_pattern(run_name: str) -> re.Pattern:
    return re.compile(re.escape(ID_PREFIX + run_name) + r"(?:-(\d+))?")


def resolve_submission_id(client, run_name: str) -> str:
    """``omni-ray-<run>`` or, after earlier finished jobs of the run, ``omni-ray-<run>-<n+1>``.

    Raises SubmitError when a job of this run is still pending or running.
    """
    pattern = _id_pattern(run_name)
    highest, active = 0, []
    for job in client.list_jobs():
        match = pattern.fullmatch(job.submission_id or "")
        if not match:
            continue
        metadata = job.metadata or {}
        if metadata.get("omni_ray_run", run_name) != run_name:  # e.g. run "a-2" vs run "a", job 2
            continue
        highest = max(highest, int(match.group(1) or 1))
        if not job.status.is_terminal():
            active.append(f"{job.submission_id} ({job.status.value})")
    if active:
        raise SubmitError(
            f"run {run_name!r} already has a job that has not ended: {', '.join(active)}. Two drivers must not "
            f"train into one run directory; wait for it (ray job logs -f {active[0].split()[0]}) or stop it "
            f"(ray job stop {active[0].split()[0]}) and submit again to resume from its last checkpoint"
        )
    return ID_PREFIX + run_name if highest == 0 else f"{ID_PREFIX}{run_name}-{highest + 1}"


def _redacted(runtime_env: dict) -> dict:
    shown = dict(runtime_env)
    shown["env_vars"] = {k: ("***" if ("SECRET" in k or "TOKEN" in k or "KEY" in k) else v)
                         for k, v in runtime_env.get("env_vars", {}).items()}
    return shown


async def _tail(client, submission_id: str) -> None:
    async for lines in client.tail_job_logs(submission_id):
        print(lines, end="", flush=True)


def wait_for_job(client, submission_id: str, timeout: float | None = None, tail: bool = True,
                 poll_s: float = 2.0) -> int:
    """Stream the job's log until it ends; 0 only for SUCCEEDED."""
    from ray.job_submission import JobStatus

    deadline = None if timeout is None else time.monotonic() + timeout
    if tail:
        try:
            asyncio.run(asyncio.wait_for(_tail(client, submission_id), timeout))
        except (asyncio.TimeoutError, TimeoutError):
            pass
        except Exception as err:  # noqa: BLE001 - the log stream is a convenience; status decides
            print(f"[submit] log stream ended early ({err!r}); polling the job status", file=sys.stderr)
    while True:
        status = client.get_job_status(submission_id)
        if status.is_terminal():
            break
        if deadline is not None and time.monotonic() > deadline:
            print(f"[submit] {submission_id} is still {status.value} after {timeout:.0f}s; it keeps running "
                  f"(ray job logs -f {submission_id})", file=sys.stderr)
            return EXIT_FAILED
        time.sleep(poll_s)
    info = client.get_job_info(submission_id)
    print(f"[submit] {submission_id}: {status.value}" + (f" ({info.message})" if info.message else ""), flush=True)
    return EXIT_OK if status == JobStatus.SUCCEEDED else EXIT_FAILED


# --- command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python jobs/submit.py",
        description="Submit `omni-ray train CONFIG` to a Ray cluster as a Ray job and wait for its result "
                    "(exit 0 only when the job SUCCEEDED).",
        epilog="Token auth: the token is read from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token "
               "and sent as a bearer header. The cluster image must have omni_ray's dependencies; the "
               "code itself travels in the working dir (see --pip-install-self for a bare Ray image).",
    )
    p.add_argument("config", help="YAML config inside the working dir, e.g. jobs/minicpmv46_lora.yaml")
    p.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", DEFAULT_ADDRESS),
                   help=f"Ray dashboard (job API) address; default $RAY_API_SERVER_ADDRESS or {DEFAULT_ADDRESS}")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override, checked here and passed on to the job (repeatable)")
    p.add_argument("--no-wait", action="store_true", help="submit and exit 0 without waiting for the result")
    p.add_argument("--timeout", type=float, default=None, help="stop waiting after S seconds (exit 1)")
    p.add_argument("--working-dir", default=str(REPO_ROOT),
                   help="directory shipped to the cluster as the job's working dir (default: the repo root)")
    p.add_argument("--pip-install-self", action="store_true",
                   help="for a Ray image without omni_ray: ship omni_ray/ via py_modules and pip-install its "
                        "dependencies from pyproject.toml in the job's runtime env")
    p.add_argument("--pip", action="append", default=[], metavar="PKG",
                   help="extra pip requirement for the job's runtime env (repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the submission (id, entrypoint, runtime env with secrets masked) and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        entrypoint = entrypoint_for(args.config, args.working_dir, args.set, args.pip_install_self)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        runtime_env = build_runtime_env(cfg, args.working_dir, args.pip_install_self, args.pip)
    except SubmitError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    metadata = {"omni_ray_run": cfg.run.name, "omni_ray_config": Path(args.config).name}

    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(args.address, headers=auth_headers())
        submission_id = resolve_submission_id(client, cfg.run.name)
    except SubmitError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as err:  # noqa: BLE001 - ConnectionError, AuthenticationError (401/403), HTTP errors
        print(f"error: cannot use the Ray job API at {args.address}: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_FAILED
    if args.dry_run:
        print(f"submission_id: {submission_id}\nentrypoint: {entrypoint}\nruntime_env: {_redacted(runtime_env)}")
        return EXIT_OK
    submitted = client.submit_job(entrypoint=entrypoint, submission_id=submission_id, runtime_env=runtime_env,
                                  metadata=metadata)
    print(f"[submit] {submitted}: {entrypoint}  (run {cfg.run.name!r} -> {cfg.run.storage_path})", flush=True)
    if args.no_wait:
        print(f"[submit] follow: ray job logs -f --address {args.address} {submitted}")
        return EXIT_OK
    try:
        return wait_for_job(client, submitted, timeout=args.timeout)
    except KeyboardInterrupt:
        print(f"\n[submit] stopped waiting; {submitted} keeps running. Stop it with: "
              f"ray job stop --address {args.address} {submitted}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
