"""train.objective and the dpo section: what each setting means, and the errors naming the key."""

from __future__ import annotations

import typing

import pytest

from omni_ray.config import DPO_LOSS_TYPES, ConfigError, DpoConfig, load_config

BASE = {"model": {"path": "/models/m"}, "data": {"train": "/data/pairs.jsonl"}}


def _load(**sections):
    return load_config({**BASE, **sections})


def test_defaults_are_sft_and_dpo_defaults_apply_to_dpo():
    cfg = _load()
    assert cfg.train.objective == "sft"
    cfg = _load(train={"objective": "dpo"})
    assert (cfg.dpo.loss_type, cfg.dpo.beta, cfg.dpo.label_smoothing, cfg.dpo.sft_weight) == ("sigmoid", 0.1, 0.0, 0.0)
    cfg = _load(train={"objective": "dpo"}, dpo={"loss_type": "simpo", "beta": 2.5, "simpo_gamma": 1.4,
                                                 "sft_weight": 0.2})
    assert (cfg.dpo.simpo_gamma, cfg.dpo.sft_weight) == (1.4, 0.2)
    cfg = load_config({**BASE, "train": {"objective": "dpo"}}, ["dpo.loss_type=robust", "dpo.label_smoothing=0.1"])
    assert cfg.dpo.loss_type == "robust"


def test_config_and_losses_know_the_same_loss_types():
    from omni_ray.train.preference import LOSS_TYPES

    assert typing.get_args(DpoConfig.model_fields["loss_type"].annotation) == DPO_LOSS_TYPES == LOSS_TYPES


BAD = [
    ({"dpo": {"beta": 0.2}}, ["dpo:", "train.objective is sft", "train.objective: dpo"]),
    ({"dpo": {}}, ["dpo:", "train.objective is sft"]),
    ({"train": {"objective": "dpo"}, "dpo": {"beta": 0}}, ["dpo.beta", "greater than 0"]),
    ({"train": {"objective": "dpo"}, "dpo": {"beta": -0.1}}, ["dpo.beta", "greater than 0"]),
    ({"train": {"objective": "dpo"}, "dpo": {"loss_type": "hinge", "label_smoothing": 0.1}},
     ["dpo.label_smoothing", "hinge takes no label smoothing"]),
    ({"train": {"objective": "dpo"}, "dpo": {"loss_type": "ipo", "label_smoothing": 0.1}},
     ["dpo.label_smoothing", "ipo"]),
    ({"train": {"objective": "dpo"}, "dpo": {"loss_type": "robust"}}, ["dpo.label_smoothing", "robust needs"]),
    ({"train": {"objective": "dpo"}, "dpo": {"label_smoothing": 0.5}}, ["dpo.label_smoothing", "less than 0.5"]),
    ({"train": {"objective": "dpo"}, "dpo": {"simpo_gamma": 1.0}}, ["dpo.simpo_gamma", "loss_type simpo"]),
    ({"train": {"objective": "dpo"}, "dpo": {"sft_weight": -1}}, ["dpo.sft_weight"]),
    ({"train": {"objective": "dpo"}, "dpo": {"loss_type": "kto"}}, ["dpo.loss_type", "sigmoid"]),
    ({"train": {"objective": "dpo"}, "dpo": {"betta": 0.1}}, ["dpo.betta", "unknown key"]),
    ({"train": {"objective": "ppo"}}, ["train.objective", "'sft'"]),
    ({"train": {"objective": "dpo"}, "data": {"train": "/d.jsonl", "packing": True}}, ["data.packing", "dpo"]),
]


@pytest.mark.parametrize(("sections", "words"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_settings_name_the_key(sections, words):
    with pytest.raises(ConfigError) as err:
        _load(**sections)
    for word in words:
        assert word in str(err.value), (word, str(err.value))
