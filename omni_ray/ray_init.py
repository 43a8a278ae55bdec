"""Connect to Ray the one way every entry point does: the running one, RAY_ADDRESS, or a local one."""

from __future__ import annotations

import os

from omni_ray.errors import UserError


class RayStartError(UserError):
    """Ray did not start (local) or could not be reached (RAY_ADDRESS): the cause and what to try."""


def connect_or_start(num_cpus: int, env: dict[str, str]) -> None:
    """Use the initialised Ray, the cluster at ``RAY_ADDRESS``, or start a local Ray of ``num_cpus``.

    Under `ray job submit` (RAY_ADDRESS set) the job's runtime env is already set and Ray refuses
    to merge another into it, so ``env`` is only given to a local Ray. address="local": a new Ray
    of this size, never a stray `ray start` found on this machine. A Ray that does not come up
    is a RayStartError naming the cause and what to try (one line; ``--verbose`` shows Ray's own
    traceback), not a traceback from inside Ray.
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")  # set by `ray job submit` and on cluster nodes
    try:
        if address:
            ray.init(address=address)
        else:
            ray.init(address="local", num_cpus=num_cpus, runtime_env={"env_vars": env}, include_dashboard=False)
    except Exception as err:  # noqa: BLE001 - whatever Ray raises, the run cannot go on without it
        ray.shutdown()  # what a half-started local Ray left running
        raise RayStartError(start_failure(err, address)) from err


def start_failure(err: BaseException, address: str | None) -> str:
    """One line: which Ray, Ray's own words for why, and what to try."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    cause = f"{type(err).__name__}: {lines[0] if lines else 'no message'}"
    if address:
        return (f"RAY_ADDRESS={address}: could not connect to that Ray cluster ({cause}); check that it is up "
                f"(`ray status --address {address}`) and reachable from here, or unset RAY_ADDRESS to train on a "
                "local Ray; --verbose shows Ray's traceback")
    return (f"ray: a local Ray did not start ({cause}); this happens on a machine short of memory or CPU, with a "
            "full or unwritable temp directory (Ray's session files: $RAY_TMPDIR or /tmp/ray), or while many Ray "
            "instances start at once: free memory or /tmp space and try again, or set RAY_ADDRESS to a running "
            "cluster; --verbose shows Ray's traceback")


def is_local() -> bool:
    """True when the next connect_or_start would start a local Ray (nothing running, no RAY_ADDRESS)."""
    import ray

    return not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
