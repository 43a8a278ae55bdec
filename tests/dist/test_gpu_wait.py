"""Asking for GPUs that never come is a named error, locally at once and on a cluster after a bound."""

from __future__ import annotations

import time

import pytest
import torch

from omni_ray.config import ConfigError, ScalingConfig
from omni_ray.launch.driver import check_local_gpus, wait_for_gpus

pytestmark = pytest.mark.dist


def test_local_ray_without_gpus_refuses_at_once(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # this machine, or a GPU host, seen as GPU-less
    with pytest.raises(ConfigError, match=r"scaling.use_gpu: 2 workers need 2 GPUs but this machine has 0"):
        check_local_gpus(ScalingConfig(num_workers=2, use_gpu=True))
    check_local_gpus(ScalingConfig(num_workers=2, use_gpu=False))  # nothing asked, nothing checked


def test_cluster_without_gpu_nodes_fails_after_the_named_timeout(ray_local):
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"scaling.gpu_wait_timeout_s: waited 2s for 1 GPUs and the cluster has 0"):
        wait_for_gpus(ScalingConfig(num_workers=1, use_gpu=True, gpu_wait_timeout_s=2), poll_s=0.2)
    assert time.monotonic() - start < 60
