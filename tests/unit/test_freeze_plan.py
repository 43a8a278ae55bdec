"""The freeze plan is a pure function of names: table-driven over every registered spec.

Each spec is exercised on its real parameter names (the architecture's default config built on
the meta device: no weights, no memory), so a renamed module in a transformers release breaks
these tests instead of silently training the wrong thing.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from omni_ray.config import FreezeConfig, LoraConfig, ConfigError, load_config
from omni_ray.freeze import apply_plan, audit, base_name, param_groups, plan_freeze, FreezeAuditError
from omni_ray.models.spec import all_specs, get_spec

NATIVE = [s.name for s in all_specs()]
REFERENCE_46 = Path(__file__).resolve().parents[2] / "omni_ray/models/reference/MiniCPM-V-4_6/config.json"


@lru_cache(maxsize=None)
def names_and_shapes(arch: str) -> tuple:
    import transformers
    from transformers import AutoModelForImageTextToText

    config = transformers.CONFIG_MAPPING[arch]()
    if arch == "minicpmv4_6":  # the published model (1.3B), not transformers' 9.1B default
        config = transformers.AutoConfig.for_model(**json.loads(REFERENCE_46.read_text()))
    if not arch.startswith("minicpmv"):  # defaults are 7B-72B models: a few layers keep the test quick
        for sub in (config.text_config, config.vision_config):
            for key in ("num_hidden_layers", "depth"):
                if hasattr(sub, key):
                    setattr(sub, key, 4)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    return tuple((n, tuple(p.shape)) for n, p in model.named_parameters())


def plan_for(arch, freeze=None, lora=None, lr=1e-4):
    return plan_freeze(names_and_shapes(arch), get_spec(arch), FreezeConfig.model_validate(freeze or {}),
                       LoraConfig.model_validate(lora or {}), lr)


def modes(plan, group):
    return {p.mode for p in plan.params if p.group == group}


@pytest.mark.parametrize("arch", NATIVE)
def test_every_parameter_has_a_group(arch):
    plan = plan_for(arch)
    assert {p.group for p in plan.params} == {"vision", "projector", "llm", "embeddings", "lm_head"} - (
        {"lm_head"} if not any(p.name.startswith("lm_head") for p in plan.params) else set()
    )
    assert not [p.name for p in plan.params if p.group == "other"]


@pytest.mark.parametrize("arch", NATIVE)
@pytest.mark.parametrize(
    "freeze, expect",
    [
        ({"vision": "frozen", "projector": "full", "llm": "frozen"}, {"vision": {"frozen"}, "projector": {"full"}, "llm": {"frozen"}}),
        ({"vision": "full", "projector": "frozen", "llm": "full"}, {"vision": {"full"}, "projector": {"frozen"}, "llm": {"full"}}),
        ({"vision": "lora", "projector": "full", "llm": "lora"}, {"vision": {"lora", "frozen"}, "llm": {"lora", "frozen"}}),
        ({"vision": "frozen", "projector": "frozen", "llm": "frozen", "embeddings": "full"}, {"embeddings": {"full"}, "llm": {"frozen"}}),
    ],
    ids=["projector-only", "vision+llm", "lora-both", "embeddings-only"],
)
def test_group_modes(arch, freeze, expect):
    plan = plan_for(arch, freeze)
    for group, wanted in expect.items():
        assert modes(plan, group) == wanted, group
    # The embeddings are their own group even though they sit inside the language model.
    emb = [p for p in plan.params if "embed_tokens" in p.name]
    assert emb and all(p.group == "embeddings" for p in emb)


@pytest.mark.parametrize("arch", NATIVE)
def test_last_n_layers_trains_only_the_tail(arch):
    spec = get_spec(arch)
    plan = plan_for(arch, {"llm": {"mode": "full", "last_n_layers": 2}, "projector": "frozen"})
    indices = {spec.layer_index("llm", p.name) for p in plan.params if p.group == "llm"} - {None}
    n = max(indices) + 1
    for p in plan.params:
        if p.group != "llm":
            continue
        idx = spec.layer_index("llm", p.name)
        assert (p.mode == "full") == (idx is not None and idx >= n - 2), p.name


def test_last_n_layers_on_vision_with_lora():
    spec = get_spec("minicpmv4_6")
    plan = plan_for("minicpmv4_6", {"vision": {"mode": "lora", "last_n_layers": 1}, "llm": "frozen"})
    lora_layers = {spec.layer_index("vision", m + ".weight") for m in plan.lora_modules}
    assert lora_layers == {max(spec.layer_index("vision", p.name) or 0 for p in plan.params)}


def test_last_n_layers_too_many_names_the_count():
    with pytest.raises(ConfigError, match=r"freeze.llm.last_n_layers=999.*use at most"):
        plan_for("minicpmv4_6", {"llm": {"mode": "full", "last_n_layers": 999}})


def test_overrides_apply_last_in_order():
    plan = plan_for("minicpmv4_6", {
        "llm": "frozen",
        "overrides": [
            {"pattern": r"language_model\.norm\.", "mode": "full"},
            {"pattern": r"merger\.mlp\.0\.pre_norm", "mode": "frozen"},
            {"pattern": r"language_model\.norm\.", "mode": "frozen"},
            {"pattern": r"language_model\.norm\.", "mode": "full"},
        ],
    })
    by = {p.name: p for p in plan.params}
    assert by["model.language_model.norm.weight"].mode == "full"
    assert "override" in by["model.language_model.norm.weight"].why
    assert by["model.merger.mlp.0.pre_norm.weight"].mode == "frozen"
    assert by["model.merger.mlp.0.linear_1.weight"].mode == "full"


def test_override_can_take_a_lora_module_out_of_lora():
    plan = plan_for("minicpmv4_6", {"overrides": [{"pattern": r"layers\.3\.self_attn\.q_proj", "mode": "full"}]})
    assert "model.language_model.layers.3.self_attn.q_proj" not in plan.lora_modules
    assert "model.language_model.layers.3.self_attn.q_proj.weight" in plan.full_names


def test_per_group_learning_rates():
    plan = plan_for("minicpmv4_6", {"vision": "full", "lr": {"projector": 1e-3, "vision": 2e-6}}, lr=2e-5)
    assert plan.lr_of_group("projector") == 1e-3
    assert plan.lr_of_group("vision") == 2e-6
    assert plan.lr_of_group("llm") == 2e-5


def test_lora_targets_regex_and_names():
    plan = plan_for("minicpmv4_6", lora={"target_modules": r".*language_model\.layers\.3\.self_attn\.(q_proj|v_proj)"})
    assert sorted(plan.lora_modules) == [
        "model.language_model.layers.3.self_attn.q_proj", "model.language_model.layers.3.self_attn.v_proj"]
    plan = plan_for("minicpmv4_6", lora={"target_modules": ["down_proj"]})
    assert plan.lora_modules and all(m.endswith("down_proj") for m in plan.lora_modules)


def test_lora_mode_with_no_matching_target_is_an_error():
    with pytest.raises(ConfigError, match=r"freeze.llm: mode is lora but lora.target_modules .*matches no") as err:
        plan_for("minicpmv4_6", lora={"target_modules": ["does_not_exist"]})
    # The error shows real module names, so the user sees what the targets were matched against.
    assert "'model.language_model.layers." in str(err.value)


def test_minicpmv2_lora_regex_on_native_46_is_an_error_that_shows_real_names():
    """finetune_lora.sh's regex names MiniCPM-V 2.x modules (llm.model.layers...): on 4.6 it matches nothing."""
    with pytest.raises(ConfigError, match=r"matches no Linear module in llm of minicpmv4_6") as err:
        plan_for("minicpmv4_6", lora={"target_modules": r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"})
    assert "model.language_model.layers." in str(err.value)


def test_override_matching_nothing_is_an_error_that_shows_real_names():
    with pytest.raises(ConfigError, match=r"freeze.overrides: pattern .*norm' matches no parameter of minicpmv4_6") as err:
        plan_for("minicpmv4_6", {"overrides": [{"pattern": r"llm\.model\.norm", "mode": "full"}]})
    assert "'model.vision_tower." in str(err.value) and "'model.language_model." in str(err.value)


def test_lora_param_count_and_per_group_rank():
    plan = plan_for("minicpmv4_6", {"vision": "lora", "llm": "frozen"},
                    lora={"r": 4, "per_group": {"vision": {"r": 2, "alpha": 4}}})
    shapes = dict(names_and_shapes("minicpmv4_6"))
    expected = sum(2 * sum(shapes[m + ".weight"]) for m in plan.lora_modules)
    assert plan.lora_numel["vision"] == expected
    assert set(plan.rank_pattern.values()) == {2} and len(plan.rank_pattern) == len(plan.lora_modules)


# --- MiniCPM-V flag mapping and config errors ------------------------------------------------

BASE = {"model": {"path": "/m"}, "data": {"train": "/d.jsonl"}}


@pytest.mark.parametrize(
    "flags, expect",
    [
        ({"tune_vision": True, "tune_llm": False}, {"vision": "full", "llm": "frozen"}),
        ({"tune_vision": False, "tune_llm": True}, {"vision": "frozen", "llm": "full"}),
        ({"tune_vision": False, "tune_llm": False, "use_lora": True}, {"vision": "frozen", "llm": "lora"}),
    ],
)
def test_minicpmv_flags_map_onto_the_freeze_map(flags, expect):
    cfg = load_config({**BASE, **flags})
    for group, mode in expect.items():
        assert cfg.freeze.group(group).mode == mode


def test_minicpmv_lora_and_length_flags():
    cfg = load_config({**BASE, "use_lora": True, "lora_r": 64, "lora_alpha": 64, "lora_dropout": 0.1,
                       "lora_target_modules": r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj)",
                       "model_max_length": 2048, "max_slice_nums": 9})
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (64, 64, 0.1)
    assert cfg.lora.target_modules.startswith("llm")
    assert cfg.data.model_max_length == 2048 and cfg.model.max_slice_nums == 9


def test_minicpmv_flags_through_set_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {path: /m}\ndata: {train: /d.jsonl}\n")
    cfg = load_config(path, ["tune_vision=true", "use_lora=true", "tune_llm=false", "freeze.llm.last_n_layers=2"])
    assert cfg.freeze.vision.mode == "full" and cfg.freeze.llm.mode == "lora" and cfg.freeze.llm.last_n_layers == 2


@pytest.mark.parametrize(
    "raw, message",
    [
        ({**BASE, "trian": {}}, r"trian: unknown key"),
        ({**BASE, "train": {"lr": -1}}, r"train.lr: Input should be greater than 0"),
        ({**BASE, "freeze": {"vision": "freeze"}}, r"freeze.vision.mode: Input should be 'frozen', 'full' or 'lora'"),
        ({**BASE, "freeze": {"lr": {"vison": 1e-4}}}, r"freeze.lr: unknown group\(s\) \['vison'\]"),
        ({**BASE, "freeze": {"overrides": [{"pattern": "(", "mode": "full"}]}}, r"freeze.overrides.0.pattern: not a valid regular expression"),
        ({"data": {"train": "/d"}}, r"model: required"),
        ({**BASE, "use_lora": True, "tune_llm": True}, r"tune_llm and use_lora are both true"),
        ({**BASE, "tune_vision": True, "freeze": {"vision": "frozen"}}, r"tune_vision conflicts with freeze.vision"),
        ({**BASE, "strategy": {"name": "deepspeed", "zero_stage": 1}}, r"strategy.zero_stage"),
        ({**BASE, "lora": {"per_group": {"llm": {"rank": 4}}}}, r"only r and alpha"),
    ],
)
def test_config_errors_name_the_key_and_the_fix(raw, message):
    with pytest.raises(ConfigError, match=message):
        load_config(raw)


def test_set_requires_key_value():
    with pytest.raises(ConfigError, match=r"expected section.key=value"):
        load_config(BASE, ["train.lr"])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/config.yaml")


# --- applying and auditing on a real (tiny) model ---------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from omni_ray.models.tiny import build_tiny_minicpmv

    return build_tiny_minicpmv(tmp_path_factory.mktemp("tiny") / "m")


def _tiny(tiny_model_dir, freeze, lora=None):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    names = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    plan = plan_freeze(names, get_spec("minicpmv4_6"), FreezeConfig.model_validate(freeze),
                       LoraConfig.model_validate(lora or {}), 1e-3)
    return apply_plan(model, plan, LoraConfig.model_validate(lora or {})), plan


def test_apply_matches_plan_and_audit_passes(tiny_model_dir):
    model, plan = _tiny(tiny_model_dir, {"vision": "frozen", "projector": "full", "llm": {"mode": "lora", "last_n_layers": 2}})
    trainable = {base_name(n) for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, lora in trainable if not lora} == plan.full_names
    assert {n for n, lora in trainable if lora} == set(plan.lora_modules)
    groups = param_groups(model, plan, weight_decay=0.1)
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k not in ("names", "group")} for g in groups])
    rows = audit(model, plan, [p for g in groups for p in g["params"]], opt.state)
    by = {r.group: r for r in rows}
    assert by["vision"].trainable == 0 and by["projector"].trainable == by["projector"].planned_trainable > 0
    assert by["llm"].trainable == by["llm"].planned_trainable > 0
    assert {g["group"]: g["lr"] for g in groups}.keys() == {"projector", "llm"}


def test_audit_catches_a_frozen_parameter_that_trains(tiny_model_dir):
    model, plan = _tiny(tiny_model_dir, {"vision": "frozen", "projector": "full", "llm": "frozen"})
    leak = dict(model.named_parameters())["model.vision_tower.post_layernorm.weight"]
    leak.requires_grad_(True)
    with pytest.raises(FreezeAuditError, match=r"vision: .*post_layernorm.weight trains but the plan freezes it"):
        audit(model, plan, [])


def test_audit_catches_gradient_and_optimizer_state_on_frozen(tiny_model_dir):
    model, plan = _tiny(tiny_model_dir, {"vision": "frozen", "projector": "full", "llm": "frozen"})
    frozen = dict(model.named_parameters())["model.vision_tower.post_layernorm.weight"]
    frozen.grad = torch.zeros_like(frozen)
    with pytest.raises(FreezeAuditError, match=r"1 frozen tensors hold a gradient"):
        audit(model, plan, [])
    frozen.grad = None
    with pytest.raises(FreezeAuditError, match=r"1 frozen tensors have optimizer state"):
        audit(model, plan, [frozen])
