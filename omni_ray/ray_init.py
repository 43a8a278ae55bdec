"""Connect to Ray the one way every entry point does: the running one, RAY_ADDRESS, or a local one."""

from __future__ import annotations

import os


def connect_or_start(num_cpus: int, env: dict[str, str]) -> None:
    """Use the initialised Ray, the cluster at ``RAY_ADDRESS``, or start a local Ray of ``num_cpus``.

    Under `ray job submit` (RAY_ADDRESS set) the job's runtime env is already set and Ray refuses
    to merge another into it, so ``env`` is only given to a local Ray. address="local": a new Ray
    of this size, never a stray `ray start` found on this machine.
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")  # set by `ray job submit` and on cluster nodes
    if address:
        ray.init(address=address)
        return
    ray.init(address="local", num_cpus=num_cpus, runtime_env={"env_vars": env}, include_dashboard=False)


def is_local() -> bool:
    """True when the next connect_or_start would start a local Ray (nothing running, no RAY_ADDRESS)."""
    import ray

    return not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
