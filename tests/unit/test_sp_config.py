"""strategy.sequence_parallel: the config checks, the refusals by architecture, and the pure pieces of the split."""

from __future__ import annotations

import pytest
import torch

from omni_ray.config import ConfigError, load_config
from omni_ray.data.conversation import IGNORE_INDEX
from omni_ray.models.spec import all_specs, get_spec
from omni_ray.train.sequence import (SPGroup, check_sequence_parallel, image_shares, local_label_tokens,
                                     next_token_targets, shard_bounds)

BASE = {"model": {"path": "/m"}, "data": {"train": "/d.jsonl"}}


def _cfg(strategy: dict, workers: int):
    return load_config({**BASE, "strategy": strategy, "scaling": {"num_workers": workers}})


def test_default_is_off_and_a_divisor_of_the_world_is_accepted():
    assert _cfg({}, 1).strategy.sequence_parallel == 1
    assert _cfg({"sequence_parallel": 2}, 4).strategy.sequence_parallel == 2
    assert _cfg({"sequence_parallel": 4}, 4).strategy.sequence_parallel == 4


def test_n_that_does_not_divide_the_workers_is_refused_with_the_choices():
    with pytest.raises(ConfigError) as err:
        _cfg({"sequence_parallel": 4}, 6)
    msg = str(err.value)
    assert "strategy.sequence_parallel: 4 does not divide scaling.num_workers (6)" in msg
    assert "[2, 3, 6]" in msg


def test_deepspeed_is_refused():
    with pytest.raises(ConfigError) as err:
        _cfg({"name": "deepspeed", "sequence_parallel": 2}, 2)
    assert "strategy.sequence_parallel" in str(err.value) and "strategy.name: fsdp" in str(err.value)
    assert _cfg({"name": "deepspeed"}, 2).strategy.sequence_parallel == 1


def test_zero_is_refused():
    with pytest.raises(ConfigError, match="sequence_parallel"):
        _cfg({"sequence_parallel": 0}, 2)


def test_architectures_without_it_are_refused_by_name_with_the_list():
    supported = sorted(s.name for s in all_specs() if s.sequence_parallel)
    assert supported == ["qwen2_5_vl"]
    for name in ("llava", "minicpmv4_6"):
        with pytest.raises(ConfigError) as err:
            check_sequence_parallel(2, get_spec(name), {})
        msg = str(err.value)
        assert f"not supported for {name}" in msg and str(supported) in msg
        assert "strategy.sequence_parallel: 1" in msg
    with pytest.raises(ConfigError, match="Gated DeltaNet"):  # the reason, not just "no"
        check_sequence_parallel(2, get_spec("minicpmv4_6"), {})
    check_sequence_parallel(1, get_spec("llava"), {})  # N=1 is always fine


def test_heads_that_do_not_divide_are_refused():
    spec = get_spec("qwen2_5_vl")
    with pytest.raises(ConfigError, match="training loop does not run sequence parallelism yet"):
        check_sequence_parallel(2, spec, {"text_config": {"num_attention_heads": 28, "num_key_value_heads": 4}})
    with pytest.raises(ConfigError) as err:
        check_sequence_parallel(8, spec, {"text_config": {"num_attention_heads": 28}})
    assert "28 attention heads" in str(err.value) and "[1, 2, 4, 7, 14, 28]" in str(err.value)


@pytest.mark.parametrize("patches,size", [([4, 4], 2), ([100, 1, 1, 1], 2), ([1, 1, 1, 100], 2), ([5] * 7, 3),
                                          ([3, 9, 1, 1, 2], 4)])
def test_image_shares_cover_every_image_once_and_none_is_empty(patches, size):
    shares = image_shares(patches, size)
    assert len(shares) == size and shares[0][0] == 0 and shares[-1][1] == len(patches)
    assert all(lo < hi for lo, hi in shares)
    assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))


def test_image_shares_balance_by_patches():
    assert image_shares([4, 4, 4, 4], 2) == [(0, 2), (2, 4)]
    assert image_shares([12, 1, 1, 1, 1], 2) == [(0, 1), (1, 5)]


def test_label_counts_over_the_group_sum_to_the_sample():
    labels = torch.full((2, 7), IGNORE_INDEX)
    labels[0, 3:6] = 5
    labels[1, 1:7] = 9
    whole = int((labels[:, 1:] != IGNORE_INDEX).sum())
    for n in (1, 2, 3, 4):
        assert sum(local_label_tokens(labels, SPGroup(r, n)) for r in range(n)) == whole


def test_targets_are_shifted_before_the_split():
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, 3]])
    assert next_token_targets(labels).tolist() == [[1, 2, 3, IGNORE_INDEX]]
    assert [shard_bounds(8, SPGroup(r, 2)) for r in range(2)] == [(0, 4), (4, 8)]


def test_validate_refuses_n_above_one_until_the_loop_runs_it(tmp_path):
    """`omni-ray validate`'s own check, on a real tiny checkpoint of the supported architecture; N=1 validates."""
    from omni_ray.launch.driver import validate
    from omni_ray.models.tiny import build_tiny

    arch = "qwen2_5_vl"
    path = str(build_tiny(arch, tmp_path / arch))
    cfg = {"model": {"path": path}, "data": {"train": "/d.jsonl"}, "scaling": {"num_workers": 2}}
    assert validate(load_config(cfg)).spec.name == arch
    with pytest.raises(ConfigError, match="training loop does not run sequence parallelism yet"):
        validate(load_config({**cfg, "strategy": {"sequence_parallel": 2}}))
