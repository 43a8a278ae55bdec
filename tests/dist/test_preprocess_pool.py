"""The preprocessing pool grows with the training workers: more than one actor for 2 workers.

Ray Data runs ``Preprocess`` in an autoscaling actor pool sized by ``preprocess_pool`` (bounds
per training worker, fractional CPUs per actor). The actors Ray actually started for the
dataset are read from the cluster's actor table (GCS; no dashboard needed).
"""

from __future__ import annotations

import pytest

from omni_ray.config import load_config
from omni_ray.data.pipeline import build_dataset, preprocess_pool

pytestmark = pytest.mark.dist


def _map_workers(ray) -> set[str]:
    from ray._private.state import actors

    return {aid for aid, a in actors().items()
            if "MapWorker" in str(a.get("ActorClassName", a.get("ClassName", ""))) and a.get("State") != "DEAD"}


def test_pool_bounds_scale_with_workers(tiny_minicpmv):
    cfg = load_config({"model": {"path": str(tiny_minicpmv)}, "data": {"train": "x.jsonl"}})
    assert preprocess_pool(cfg.data, 1) == (1, 2)
    assert preprocess_pool(cfg.data, 2) == (2, 4)
    assert preprocess_pool(cfg.data, 64) == (64, 128)
    assert cfg.data.num_cpus_per_preprocess_task < 1  # a 2-CPU machine fits 2 workers' actors


def test_two_workers_get_more_than_one_actor(ray_local, tiny_minicpmv, color_data):
    train_jsonl, _ = color_data
    cfg = load_config({"model": {"path": str(tiny_minicpmv), "dtype": "float32"},
                       "data": {"train": str(train_jsonl), "model_max_length": 64}})
    before = _map_workers(ray_local)
    ds = build_dataset(str(train_jsonl), cfg.data, cfg.model, None, num_workers=2)
    seen, during = 0, set()
    for batch in ds.iter_batches(batch_size=4, batch_format="numpy"):
        seen += len(batch["id"])
        during |= _map_workers(ray_local) - before
    assert seen == 64
    assert len(during) >= 2, f"preprocessing ran in {len(during)} actor(s)"
