"""One writer per run: the driver holds a lease on ``run.storage_path/run.name`` while it trains.

Two drivers on one run name (two ``ray job submit`` of one job file, a resumed run started while
the first still runs) would both train and both write into one run: interleaved metrics.jsonl,
interleaved checkpoints. The lease makes the second one stop before it starts Ray, naming the
holder (host, pid, start time) and the key to change (``run.name``).

* Local disk: ``RUN/.omni_ray.lease``, locked with ``flock`` and holding the holder's details. The
  kernel drops the lock when the holding process ends however it ends (SIGKILL included), so a
  dead driver never blocks the next one; the file itself is never deleted (a deleted lock file
  lets two processes lock two different files).
* S3: the object ``RUN/.omni_ray.lease``, created with ``If-None-Match: *`` (exactly one of two
  concurrent creators succeeds), renewed by a heartbeat thread every ``expiry_s / 3`` with
  ``If-Match: <etag>`` and deleted with ``If-Match`` on release. A lease not renewed for
  ``run.lease_expiry_s`` (its LastModified against the endpoint's own clock) is taken over, again
  with ``If-Match`` on the stale version so only one contender wins; a holder on this host whose
  pid is gone is taken over at once.

    with acquire(location, expiry_s=cfg.run.lease_expiry_s):
        ... train ...
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable, Optional

from omni_ray import storage as st

log = logging.getLogger(__name__)

LEASE_NAME = ".omni_ray.lease"


class LeaseHeld(Exception):
    """Another live driver holds this run's lease. Not a config error: the CLI exits 1."""


@dataclass
class Holder:
    """Who holds a lease; shown to the driver that is refused."""

    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    started: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    def to_bytes(self, expiry_s: float) -> bytes:
        return json.dumps({**asdict(self), "expiry_s": expiry_s,
                           "renewed": datetime.now(timezone.utc).isoformat(timespec="seconds")}).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Optional["Holder"]:
        try:
            raw = json.loads(data.decode() or "null")
            return cls(host=str(raw["host"]), pid=int(raw["pid"]), started=str(raw["started"]), token=str(raw["token"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None  # being written, or not ours: treated as no holder details

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started}"


#: Tokens of the leases this process holds now. A lease naming this very process whose token is not
#: here was left by one of its earlier runs (a release that could not reach S3): it is stale.
_HELD_HERE: set[str] = set()


def pid_gone(holder: Holder) -> bool:
    """True when the holder ran on this host and its process no longer exists (or no longer holds it:
    the same process, as when one Python process trains the same run again after a failed release)."""
    if holder.host != socket.gethostname():
        return False
    if holder.pid == os.getpid():
        return holder.token not in _HELD_HERE
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def held_message(run_uri: str, holder: Optional[Holder], detail: str) -> str:
    who = holder.describe() if holder else "details not readable"
    return (f"run.name: {run_uri} is being trained by another driver ({who}{detail}); two drivers on one run "
            "would interleave its checkpoints and metrics. Wait for that run to end or stop it, or set another "
            "run.name (--set run.name=NEW_NAME) to start a separate run")


# --- local disk ----------------------------------------------------------------------------------


class LocalLease:
    """An flock on ``RUN/.omni_ray.lease`` for as long as this object is open."""

    def __init__(self, run_uri: str, holder: Holder):
        self.run_uri, self.holder = run_uri, holder
        self.path = os.path.join(run_uri, LEASE_NAME)
        self._fd: Optional[int] = None

    def acquire(self) -> "LocalLease":
        import fcntl

        os.makedirs(self.run_uri, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LeaseHeld(held_message(self.run_uri, self._read_holder(), "")) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, self.holder.to_bytes(0), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def _read_holder(self) -> Optional[Holder]:
        for _ in range(20):  # the holder writes its details right after locking
            with contextlib.suppress(FileNotFoundError):
                with open(self.path, "rb") as f:
                    holder = Holder.from_bytes(f.read())
                if holder:
                    return holder
            time.sleep(0.05)
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


# --- S3 ------------------------------------------------------------------------------------------


def _s3_client(storage: st.StorageConfig):
    import boto3
    from botocore.config import Config as BotoConfig

    return boto3.client("s3", endpoint_url=storage.endpoint_url, region_name=storage.region,
                        config=BotoConfig(retries={"max_attempts": storage.max_attempts, "mode": "standard"}))


def _code(err) -> str:
    return str(getattr(err, "response", {}).get("Error", {}).get("Code", ""))


class S3Lease:
    """A conditionally created object, renewed by a heartbeat thread, deleted on release."""

    def __init__(self, run_uri: str, holder: Holder, storage: st.StorageConfig, expiry_s: float,
                 on_lost: Callable[[str], None] | None = None):
        self.run_uri, self.holder, self.expiry_s = run_uri, holder, expiry_s
        self.bucket, _, prefix = st.join(run_uri, LEASE_NAME)[len("s3://"):].partition("/")
        self.key = prefix
        self.client = _s3_client(storage)
        self.on_lost = on_lost or (lambda message: log.error("%s", message))
        self.etag: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def acquire(self) -> "S3Lease":
        from botocore.exceptions import ClientError

        try:
            self.etag = self._put(IfNoneMatch="*")
        except ClientError as err:
            if _code(err) not in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise
            self._take_over()
        self._thread = threading.Thread(target=self._heartbeat, name="omni-ray-lease", daemon=True)
        self._thread.start()
        return self

    def _put(self, **condition) -> str:
        answer = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=self.holder.to_bytes(self.expiry_s),
                                        ContentType="application/json", **condition)
        return answer["ETag"]

    def _take_over(self) -> None:
        """The lease exists: take it if its holder is gone or it expired, else refuse naming the holder."""
        from botocore.exceptions import ClientError

        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as err:
            if _code(err) in ("NoSuchKey", "404"):  # released between our create and our read: try again
                self.etag = self._put(IfNoneMatch="*")
                return
            raise
        holder = Holder.from_bytes(answer["Body"].read())
        age = _age_s(answer)
        if not (holder and pid_gone(holder)) and age < self.expiry_s:
            raise LeaseHeld(held_message(self.run_uri, holder, f", lease renewed {age:.0f}s ago, taken over after "
                                         f"{self.expiry_s:g}s without renewal (run.lease_expiry_s)"))
        why = "its process is gone" if holder and pid_gone(holder) else f"not renewed for {age:.0f}s"
        try:
            self.etag = self._put(IfMatch=answer["ETag"])  # only one contender replaces this version
        except ClientError as err:
            if _code(err) not in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
                raise
            raise LeaseHeld(held_message(self.run_uri, None, ", it took over the stale lease a moment ago")) from None
        log.warning("took over the lease on %s from %s: %s", self.run_uri,
                    holder.describe() if holder else "an unreadable holder", why)

    def _heartbeat(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        while not self._stop.wait(self.expiry_s / 3):
            try:
                self.etag = self._put(IfMatch=self.etag)
            except ClientError as err:
                if _code(err) in ("PreconditionFailed", "NoSuchKey", "ConditionalRequestConflict"):
                    self.etag = None
                    self.on_lost(f"run.name: lost the lease on {self.run_uri} (not renewed within "
                                 f"run.lease_expiry_s={self.expiry_s:g}s, another driver took it over); this "
                                 "driver is no longer the run's one writer")
                    return
                log.warning("lease on %s: renewal failed (%s), retrying", self.run_uri, _code(err) or err)
            except BotoCoreError as err:  # network: the next beat tries again, expiry is the bound
                log.warning("lease on %s: renewal failed (%s), retrying", self.run_uri, err)

    def release(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.etag is None:
            return
        try:  # only our own version: a lease taken over meanwhile stays
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        except (ClientError, BotoCoreError) as err:
            log.warning("lease on %s: not released (%s); the next driver takes it over after %gs",
                        self.run_uri, _code(err) or err, self.expiry_s)
        self.etag = None


def _age_s(answer: dict) -> float:
    """Seconds since the object was last written, by the endpoint's clock when it sends one."""
    modified = answer["LastModified"].timestamp()
    date = answer.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    now = email.utils.parsedate_to_datetime(date).timestamp() if date else time.time()
    return max(0.0, now - modified)


@contextlib.contextmanager
def acquire(run_uri: str, storage: Optional[st.StorageConfig] = None, expiry_s: float = 60.0,
            holder: Optional[Holder] = None, on_lost: Callable[[str], None] | None = None):
    """Hold the run's lease for the ``with`` block; LeaseHeld when a live driver has it."""
    holder = holder or Holder()
    if st.is_remote(run_uri):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            lease = S3Lease(run_uri, holder, storage or st.StorageConfig(), expiry_s, on_lost).acquire()
        except (ClientError, BotoCoreError) as err:
            raise st.StorageError(f"{st.join(run_uri, LEASE_NAME)}: could not take the run's lease "
                                  f"({_code(err) or err}); check run.storage_path, storage.endpoint_url and this "
                                  "machine's credentials") from None
    else:
        lease = LocalLease(run_uri, holder).acquire()
    _HELD_HERE.add(holder.token)
    try:
        yield lease
    finally:
        _HELD_HERE.discard(holder.token)
        lease.release()
