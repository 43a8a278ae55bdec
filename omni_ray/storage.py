"""One way to reach local disk and S3-compatible object storage.

Fine-tuners that only read local files force users to copy datasets and models to every
node by hand (pain 10). omni_ray addresses everything by URI instead: ``s3://bucket/key``
for object storage (AWS S3, MinIO, Ceph, a local ``moto_server`` in tests) and a plain or
``file://`` path for local disk. Every function here takes the URI plus an optional
:class:`StorageConfig` and resolves both to a :mod:`pyarrow.fs` filesystem, the same kind
of object Ray Data and Ray Train take, so there is one code path for data, models and
checkpoints.

Credentials are never config fields, and they never travel: not in a runtime env (Ray writes
runtime envs into its session logs and shows them in the job API), not inside a pickled
filesystem object, not in a checkpoint. Every process, driver or worker, gets them from its own
node through the AWS SDK's default chain: the ``AWS_*`` environment of the node (on a local Ray,
workers inherit the driver's), a credentials file, an instance profile (cluster/aws) or IRSA /
a mounted Kubernetes Secret (cluster/kuberay). The driver forwards only what is not secret
(:meth:`StorageConfig.worker_env`: endpoint and region).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import posixpath
import re
import uuid
from collections.abc import Iterator
from typing import Optional
from urllib.parse import urlsplit

import pyarrow.fs as pafs
from pydantic import BaseModel, Field, field_validator

from omni_ray.errors import UserError

__all__ = [
    "CREDENTIAL_ENV_VARS",
    "RunLocation",
    "StorageError",
    "secret_env_names",
    "COMPLETE_MARKER",
    "StorageConfig",
    "is_remote",
    "join",
    "resolve",
    "s3_filesystem",
    "read_bytes",
    "write_bytes",
    "open_input_stream",
    "exists",
    "list_files",
    "delete",
    "download_dir",
]

#: Environment variables that carry S3 credentials; read by the AWS SDK on each node, never
#: stored in config and never forwarded to workers.
CREDENTIAL_ENV_VARS: tuple[str, ...] = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)

#: Names of environment variables that hold secrets (storage and experiment-tracker keys, tokens):
#: nothing omni_ray builds for a Ray runtime env may carry one (see :func:`secret_env_names`).
SECRET_ENV_PATTERN = re.compile(r"SECRET|PASSWORD|TOKEN|API_KEY|ACCESS_KEY|CREDENTIAL|PRIVATE_KEY", re.IGNORECASE)


def secret_env_names(env: dict[str, str]) -> list[str]:
    """The keys of ``env`` that look like secrets (AWS keys, WANDB_API_KEY, MLFLOW_TRACKING_TOKEN ...)."""
    return sorted(name for name in env if name in CREDENTIAL_ENV_VARS or SECRET_ENV_PATTERN.search(name))

#: File written last by :func:`download_dir`; its presence means the copy is whole.
COMPLETE_MARKER = ".complete"

_LOCK_FILE = ".lock"
_CHUNK = 8 << 20  # 8 MiB: stream big files (model shards) instead of reading them whole


# A URL's user-info part (scheme://user:password@host): credentials never belong in a config,
# which is copied into checkpoints and shown in logs.
_URL_CREDENTIALS = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://[^/@\s]*@")


def url_credentials_error(value: str) -> Optional[str]:
    """The fix for a URL that embeds credentials, or None. Never repeats the value (it is a secret)."""
    if not _URL_CREDENTIALS.match(value):
        return None
    return ("holds credentials in the URL (user:password@); remove them: storage credentials come from "
            "the node (AWS_* environment, instance profile, IRSA, a mounted Secret or credentials file)")


class StorageConfig(BaseModel, extra="forbid", strict=True, allow_inf_nan=False):
    """Where object storage lives. Holds no secrets; see the module docstring."""

    endpoint_url: Optional[str] = Field(
        default=None,
        description=(
            "URL of an S3-compatible endpoint, e.g. http://127.0.0.1:9000 for MinIO or "
            "a local moto_server. Leave unset for AWS S3. The scheme (http/https) picks "
            "whether TLS is used."
        ),
    )
    """URL of an S3-compatible endpoint (MinIO, Ceph, moto); ``None`` means AWS S3."""

    region: str = Field(
        default="us-east-1",
        description="S3 region. MinIO and moto accept any value; AWS needs the bucket's region.",
    )
    """S3 region; must match the bucket's region on AWS."""

    max_attempts: int = Field(
        8,
        ge=1,
        description=(
            "Attempts per S3 request, with the AWS SDK's exponential backoff between them; a "
            "checkpoint upload that still fails stops the run with the error and leaves the "
            "previous checkpoint as the latest."
        ),
    )
    anonymous: bool = Field(
        default=False,
        description="Access public buckets without credentials (no request signing).",
    )
    """Do not sign requests; for public buckets only."""

    @field_validator("endpoint_url")
    @classmethod
    def _check_endpoint(cls, value: Optional[str]) -> Optional[str]:
        if value is None:
            return None
        problem = url_credentials_error(value)
        if problem:
            raise ValueError(problem)
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(
                f"storage.endpoint_url={value!r} is not an http(s) URL: write it as "
                "http://HOST:PORT (or https://HOST) including the scheme"
            )
        if parts.path not in ("", "/") or parts.query:
            raise ValueError(
                f"storage.endpoint_url={value!r} has a path or query: give only "
                "scheme://host[:port]; the bucket goes into the s3:// URI"
            )
        return value.rstrip("/")

    def worker_env(self) -> dict[str, str]:
        """The non-secret settings a Ray worker needs to reach this storage: endpoint and region.

        Pass it as ``runtime_env={"env_vars": ...}``. Credentials are deliberately absent (see
        the module docstring): workers read their own node's.
        """
        env = {"AWS_REGION": self.region, "AWS_DEFAULT_REGION": self.region}
        if self.endpoint_url:
            env["AWS_ENDPOINT_URL"] = self.endpoint_url
        return env


class StorageError(UserError, OSError):
    """Storage that exists but cannot be used (credentials, network, a missing bucket).

    Kept apart from :class:`FileNotFoundError` so that callers never read an outage as
    "nothing there" (e.g. "no checkpoint yet: start from step 0"). A :class:`UserError`: the
    CLI prints its one-line message and exits 2.
    """


class RunLocation(BaseModel, frozen=True):
    """Where one run lives (``base/name``, local or S3): the one place that works it out.

    Made once on the driver with :meth:`of` (a local ``base`` becomes absolute there, because
    workers do not share the driver's working directory) and handed to workers as is; the
    config is never rewritten to carry it.
    """

    base: str
    name: str
    storage: StorageConfig = StorageConfig()

    @classmethod
    def of(cls, run, storage: Optional[StorageConfig] = None) -> "RunLocation":
        """From a RunConfig (``storage_path``, ``name``) and the StorageConfig."""
        base = run.storage_path
        if not is_remote(base):
            base = _local_path(base)
        return cls(base=base, name=run.name, storage=storage or StorageConfig())

    @property
    def uri(self) -> str:
        """The run's directory: ``base/name``."""
        return join(self.base, self.name)

    def for_ray(self) -> tuple[str, Optional[pafs.FileSystem]]:
        """``(storage_path, storage_filesystem)`` for ``ray.train.RunConfig`` (the fs None locally)."""
        if is_remote(self.base):
            fs, path = resolve(self.base, self.storage)
            return path, fs
        return self.base, None


# ----------------------------------------------------------------------------- URIs


def is_remote(uri: str) -> bool:
    """True for ``s3://`` URIs, the only remote scheme omni_ray speaks."""
    return uri.startswith("s3://")


def _split_s3(uri: str) -> str:
    """``s3://bucket/key`` -> ``bucket/key`` (pyarrow's path form), checked."""
    path = uri[len("s3://") :].strip("/")
    if not path:
        raise ValueError(f"{uri!r} names no bucket: write s3://BUCKET/KEY")
    return path


def _local_path(uri: str) -> str:
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise ValueError(
            f"unsupported URI scheme {scheme!r} in {uri!r}: use s3://BUCKET/KEY for object "
            "storage (any S3-compatible endpoint via storage.endpoint_url) or a local path"
        )
    return os.path.abspath(os.path.expanduser(uri))


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or an ``s3://`` URI."""
    if is_remote(base):
        return "s3://" + posixpath.join(_split_s3(base), *parts)
    return os.path.join(base, *parts)


def resolve(uri: str, storage: Optional[StorageConfig] = None) -> tuple[pafs.FileSystem, str]:
    """Turn a URI into ``(filesystem, path)`` for :mod:`pyarrow.fs`.

    ``s3://bucket/key`` gives an :class:`pyarrow.fs.S3FileSystem` configured from
    ``storage`` (credentials from the AWS SDK's default chain, in whichever process uses
    it) and ``"bucket/key"``.
    Anything else gives the local filesystem and an absolute path.
    """
    if not is_remote(uri):
        return pafs.LocalFileSystem(), _local_path(uri)
    return s3_filesystem(storage), _split_s3(uri)


def s3_filesystem(storage: Optional[StorageConfig] = None) -> pafs.S3FileSystem:
    """An S3 filesystem for ``storage`` (default: AWS, us-east-1, env credentials).

    Filesystems are cached per (config, credentials), so reading thousands of images reuses
    one client and its pooled connections instead of a TLS handshake per object; a
    changed credential in the environment (rotated session token) gives a new one.
    """
    storage = storage or StorageConfig()
    creds: tuple[Optional[str], ...] = (None, None, None)
    if not storage.anonymous:
        creds = tuple(os.environ.get(name) or None for name in CREDENTIAL_ENV_VARS)
    return _s3_filesystem(storage.endpoint_url, storage.region, storage.anonymous, storage.max_attempts, *creds)


@functools.lru_cache(maxsize=16)
def _s3_filesystem(
    endpoint_url: Optional[str],
    region: str,
    anonymous: bool,
    max_attempts: int,
    key: Optional[str],
    secret: Optional[str],
    token: Optional[str],
) -> pafs.S3FileSystem:
    kwargs: dict = {"region": region, "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts)}
    if endpoint_url:
        parts = urlsplit(endpoint_url)
        kwargs["endpoint_override"] = parts.netloc
        kwargs["scheme"] = parts.scheme
    if anonymous:
        kwargs["anonymous"] = True
    # Credentials are left to the AWS SDK's default chain (environment, profile, instance role,
    # IRSA), resolved in the process that uses the filesystem: passing them explicitly would
    # pickle them into every Ray task and actor that receives this object. key/secret/token are
    # only part of the cache key, so a rotated credential gives a fresh client.
    del key, secret, token
    return pafs.S3FileSystem(**kwargs)


# ------------------------------------------------------------------------------ I/O


def read_bytes(uri: str, storage: Optional[StorageConfig] = None) -> bytes:
    """The whole content of a file or object; :class:`FileNotFoundError` if absent."""
    with open_input_stream(uri, storage) as f:
        return f.read()


@contextlib.contextmanager
def open_input_stream(uri: str, storage: Optional[StorageConfig] = None) -> Iterator:
    """A sequential reader, for files too big to hold in memory at once (large JSONL).

    Raises :class:`FileNotFoundError` naming ``uri`` when nothing is there. No extra
    existence check is made first: on S3 that would double the requests per image.
    """
    fs, path = resolve(uri, storage)
    try:
        f = fs.open_input_stream(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no such file or object: {uri}") from e
    with f:
        yield f


def write_bytes(uri: str, data: bytes, storage: Optional[StorageConfig] = None) -> None:
    """Write ``data`` so that readers see the old content or the new one, never a part.

    Locally that takes a temporary file in the same directory and :func:`os.replace`;
    on S3 a PUT (or a completed multipart upload) is already all-or-nothing.
    """
    fs, path = resolve(uri, storage)
    if isinstance(fs, pafs.LocalFileSystem):
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def exists(uri: str, storage: Optional[StorageConfig] = None) -> bool:
    """Whether a file, object or non-empty prefix exists at ``uri``."""
    fs, path = resolve(uri, storage)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(prefix_uri: str, storage: Optional[StorageConfig] = None) -> list[str]:
    """Paths (relative to the prefix, ``/``-separated, sorted) of all files under it."""
    fs, root = resolve(prefix_uri, storage)
    return [rel for rel, _ in _walk(fs, root)]


def list_file_infos(prefix_uri: str, storage: Optional[StorageConfig] = None) -> list[tuple[str, pafs.FileInfo]]:
    """(relative path, pyarrow FileInfo with size) of all files under a prefix, sorted; one listing."""
    fs, root = resolve(prefix_uri, storage)
    return _walk(fs, root)


def _walk(fs: pafs.FileSystem, root: str) -> list[tuple[str, pafs.FileInfo]]:
    selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    out = []
    for info in fs.get_file_info(selector):
        if info.type != pafs.FileType.File:
            continue
        rel = posixpath.relpath(info.path.replace(os.sep, "/"), root.replace(os.sep, "/"))
        out.append((rel, info))
    return sorted(out, key=lambda item: item[0])


def delete(uri: str, storage: Optional[StorageConfig] = None) -> None:
    """Delete one file or object; a missing one is not an error."""
    fs, path = resolve(uri, storage)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)


def download_dir(
    prefix_uri: str, local_dir: str, storage: Optional[StorageConfig] = None
) -> str:
    """Copy every file under ``prefix_uri`` into ``local_dir`` once per node; return it.

    Used to fetch a model from S3 into a node-local cache before the workers on that node
    load it. ``local_dir/.complete`` is written last, so its presence means a whole copy
    and later calls return at once. An exclusive :func:`fcntl.flock` on
    ``local_dir/.lock`` makes concurrent workers on one node wait for the first one
    instead of downloading in parallel; a worker that dies mid-copy releases the lock and
    leaves no marker, so the next caller starts over. Files stream in 8 MiB chunks to a
    temporary name and are renamed into place, so memory stays flat for large shards.
    """
    local_dir = os.path.abspath(os.path.expanduser(local_dir))
    marker = os.path.join(local_dir, COMPLETE_MARKER)
    if os.path.exists(marker):
        return local_dir
    os.makedirs(local_dir, exist_ok=True)
    with open(os.path.join(local_dir, _LOCK_FILE), "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            if os.path.exists(marker):  # another worker finished while we waited
                return local_dir
            fs, root = resolve(prefix_uri, storage)
            files = [
                (rel, info)
                for rel, info in _walk(fs, root)
                if rel not in (COMPLETE_MARKER, _LOCK_FILE)
            ]
            if not files:
                raise FileNotFoundError(
                    f"nothing to download under {prefix_uri}: check the URI (a prefix, not "
                    "a file) and that the storage endpoint/credentials point at the right bucket"
                )
            for rel, info in files:
                _copy_to_local(fs, info.path, os.path.join(local_dir, *rel.split("/")))
            with open(marker, "w") as f:
                f.write(f"{prefix_uri}\n{len(files)} files\n")
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return local_dir


def _copy_to_local(fs: pafs.FileSystem, src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = f"{dst}.part-{uuid.uuid4().hex}"
    try:
        with fs.open_input_stream(src) as fin, open(tmp, "wb") as fout:
            while chunk := fin.read(_CHUNK):
                fout.write(chunk)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
