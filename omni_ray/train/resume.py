"""Which checkpoint a (re)started run continues from, decided by rank 0 and followed by all.

Ray Train hands a restarted worker group its latest *registered* checkpoint. A checkpoint whose
upload finished but whose registration did not (the endpoint failed right after, the head went
away) is still whole when its manifest and files are there, and is the better place to resume
from: the newer of the two wins.
"""

from __future__ import annotations

import tempfile

import torch.distributed as dist

from omni_ray import storage as st
from omni_ray.data.position import PositionSet
from omni_ray.storage import StorageConfig
from omni_ray.train import checkpoint as ckpt


def pick_checkpoint(registered: str | None, run_uri: str | None, storage: StorageConfig | None,
                    rank: int) -> str | None:
    """The checkpoint to resume from as a local directory, the same on every rank (collective)."""
    choice = "registered"  # rank 0 decides: "registered", "none" (nothing whole), or a URI in storage
    if rank == 0:
        # A registered directory without a manifest (a write cut short) is skipped with a warning.
        picked = ckpt.choose_resume(registered, ckpt.find_latest(run_uri, storage) if run_uri else None)
        choice = "none" if picked is None else "registered" if picked == registered else picked
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [choice]
        dist.broadcast_object_list(box, src=0)
        choice = box[0]
    if choice == "none":
        return None
    if choice == "registered":
        return registered
    return st.download_dir(choice, tempfile.mkdtemp(prefix="omni_ray_resume_"), storage)


def gather_positions(local: PositionSet) -> PositionSet:
    """The union of every rank's consumed row positions (collective)."""
    merged = PositionSet()
    merged.update(local)
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local.to_json())
        for part in parts:
            merged.update(PositionSet.from_json(part))
    return merged
