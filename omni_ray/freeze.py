"""The freeze map: decide from parameter names what trains, then apply it, then prove it.

Three steps, kept apart so each can be printed and tested on its own:

1. ``plan_freeze`` is a pure function of (parameter names and shapes, model spec, freeze and
   LoRA config). It runs on a meta-device skeleton, so ``omni-ray validate`` prints the plan
   of a 9B model in seconds without weights or a GPU.
2. ``apply_plan`` sets ``requires_grad`` and injects LoRA adapters (peft) where the plan says.
3. ``audit`` runs on every rank after the model is wrapped (FSDP2, ZeRO) and after the first
   optimizer step: exactly the planned parameters are trainable, frozen ones hold no gradient
   and no optimizer state, and their fingerprint has not moved.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

from omni_ray.config import GROUPS, ConfigError, FreezeConfig, LoraConfig
from omni_ray.models.spec import ModelSpec

PEFT_PREFIX = "base_model.model."
_LORA_PARAM = re.compile(r"\.(lora_A|lora_B|lora_magnitude_vector|lora_embedding_A|lora_embedding_B)\.[^.]+(\.weight)?$")


@dataclass(frozen=True)
class ParamPlan:
    name: str
    group: str
    mode: str  # frozen | full | lora (a frozen base weight under a LoRA adapter)
    numel: int
    lr: float
    why: str


@dataclass(frozen=True)
class FreezePlan:
    params: tuple[ParamPlan, ...]
    lora_modules: tuple[str, ...]
    lora_numel: dict[str, int]  # group -> adapter parameters the plan adds
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def full_names(self) -> set[str]:
        return {p.name for p in self.params if p.mode == "full"}

    @property
    def frozen_names(self) -> set[str]:
        return {p.name for p in self.params if p.mode != "full"}

    def lr_of_group(self, group: str) -> float:
        return next((p.lr for p in self.params if p.group == group), 0.0)

    def trainable_numel(self) -> int:
        return sum(p.numel for p in self.params if p.mode == "full") + sum(self.lora_numel.values())

    def rows(self) -> list[dict]:
        """One row per group: parameters total and trainable, mode, learning rate."""
        rows: dict[str, dict] = {}
        for p in self.params:
            row = rows.setdefault(p.group, {"group": p.group, "total": 0, "trainable": 0, "modes": set(), "lr": p.lr})
            row["total"] += p.numel
            row["modes"].add(p.mode)
            if p.mode == "full":
                row["trainable"] += p.numel
        for group, n in self.lora_numel.items():
            rows[group]["trainable"] += n
        ordered = [rows[g] for g in (*GROUPS, "other") if g in rows]
        for row in ordered:
            row["mode"] = "+".join(sorted(row.pop("modes")))
        return ordered


def _target_matcher(targets: list[str] | str) -> callable:
    if isinstance(targets, str):  # peft semantics: one regex, full match over the module name
        pattern = re.compile(targets)
        return lambda module: pattern.fullmatch(module) is not None
    suffixes = tuple(targets)
    return lambda module: any(module == s or module.endswith("." + s) for s in suffixes)


def _examples(names: Iterable[str], n: int = 4) -> str:
    """A few names, spread over the list, so an error shows what a pattern was matched against."""
    names = list(names)
    picked = names if len(names) <= n else [names[i * (len(names) - 1) // (n - 1)] for i in range(n)]
    return ", ".join(repr(x) for x in picked)


def _layer_counts(named_shapes: list, spec: ModelSpec, freeze: FreezeConfig) -> dict[str, int]:
    """Layers per group's layer list; checks every last_n_layers against them."""
    counts: dict[str, int] = defaultdict(int)
    for name, _ in named_shapes:
        for group in spec.layer_lists:
            idx = spec.layer_index(group, name)
            if idx is not None:
                counts[group] = max(counts[group], idx + 1)
    for group in GROUPS:
        n = freeze.group(group).last_n_layers
        if n is not None and group not in spec.layer_lists:
            raise ConfigError(f"freeze.{group}.last_n_layers: {spec.name} has no layer list for {group}; "
                              f"last_n_layers works for {sorted(spec.layer_lists)}")
        if n is not None and n > counts[group]:
            raise ConfigError(f"freeze.{group}.last_n_layers={n}, but {spec.name} has {counts[group]} "
                              f"{group} layers; use at most {counts[group]}")
    return counts


def tied_lm_head(names: Iterable[str], spec: ModelSpec) -> tuple[str, str] | None:
    """(lm_head weight, embedding weight) when the model ties them, i.e. stores one tensor for both.

    ``named_parameters()`` lists a tied tensor once, under the input embedding's name (a
    checkpoint's index does the same), so a spec whose lm_head has no parameter of its own while
    its embedding matrix is present has a tied lm_head (MiniCPM-V 4.6, Gemma 3, Qwen2-VL-2B ...).
    """
    names = set(names)
    heads, embeds = spec.groups.get("lm_head", ()), spec.groups.get("embeddings", ())
    if not heads or not embeds or any(spec.group_of(n) == "lm_head" for n in names):
        return None
    owner = embeds[0] + ".weight"
    return (heads[0] + ".weight", owner) if owner in names else None


def _base_mode(name: str, shape: tuple, group: str, spec: ModelSpec, freeze: FreezeConfig,
               counts: dict[str, int], tied: tuple[str, str] | None) -> tuple[str, str]:
    """(mode, why) from the group's setting alone: before LoRA targets, biases and overrides."""
    if group not in GROUPS:
        return "frozen", "not in any group of " + spec.name
    setting = freeze.group(group)
    mode, why = setting.mode, group
    if tied and name == tied[1]:
        head = freeze.lm_head.mode
        if head == "lora":
            raise ConfigError(f"freeze.lm_head: {spec.name} ties lm_head to the input embeddings ({tied[1]}); "
                              "LoRA cannot adapt a tied matrix here: use full (trains the shared matrix) or frozen")
        if head == "full" and mode != "full":
            return "full", f"lm_head: full ({tied[0]} is tied to this tensor)"
    if setting.last_n_layers is not None and mode != "frozen":
        idx = spec.layer_index(group, name)
        if idx is None or idx < counts[group] - setting.last_n_layers:
            return "frozen", f"{group}: outside last {setting.last_n_layers} layers"
    return mode, why


def plan_freeze(
    named_shapes: Iterable[tuple[str, tuple[int, ...]]],
    spec: ModelSpec,
    freeze: FreezeConfig,
    lora: LoraConfig,
    base_lr: float,
) -> FreezePlan:
    """Decide, per parameter, its group, mode and learning rate. Pure: names and shapes in."""
    named_shapes = [(n, tuple(s)) for n, s in named_shapes]
    counts = _layer_counts(named_shapes, spec, freeze)
    tied = tied_lm_head((n for n, _ in named_shapes), spec)
    default_targets = sorted({t for ts in spec.lora_targets.values() for t in ts})
    is_target = _target_matcher(lora.target_modules if lora.target_modules is not None else default_targets)
    overrides = [(re.compile(o.pattern), o.mode, o.pattern) for o in freeze.overrides]
    override_hits = [0] * len(overrides)

    params: list[ParamPlan] = []
    lora_modules: list[str] = []
    ignored_targets: set[str] = set()
    for name, shape in named_shapes:
        group = spec.group_of(name) or "other"
        mode, why = _base_mode(name, shape, group, spec, freeze, counts, tied)
        module, _, leaf = name.rpartition(".")
        linear_target = leaf == "weight" and len(shape) == 2 and is_target(module)
        if mode == "lora":
            mode, why = ("lora", f"{group}: lora") if linear_target else ("frozen", f"{group}: lora base")
        elif linear_target and lora.target_modules is not None:
            ignored_targets.add(group)
        for i, (pattern, override_mode, text) in enumerate(overrides):
            if pattern.search(name):
                mode, why = override_mode, f"override {text!r} -> {override_mode}"
                override_hits[i] += 1
        params.append(ParamPlan(name, group, mode, _numel(shape), freeze.lr.get(group, base_lr), why))
        if mode == "lora":
            lora_modules.append(module)
    params = _train_biases(params, set(lora_modules), lora.bias)
    _check_matches(named_shapes, params, spec, freeze, lora, override_hits)
    shapes = dict(named_shapes)
    lora_numel: dict[str, int] = defaultdict(int)
    for p in params:
        if p.mode == "lora":
            r = lora.per_group.get(p.group, {}).get("r", lora.r)
            rows, cols = shapes[p.name]
            lora_numel[p.group] += r * (rows + cols) + (rows if lora.dora else 0)
    rank_pattern, alpha_pattern = _lora_patterns(spec, lora, lora_modules)
    return FreezePlan(tuple(params), tuple(lora_modules), dict(lora_numel), rank_pattern, alpha_pattern,
                      _plan_notes(ignored_targets, tied, params))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _train_biases(params: list[ParamPlan], adapted: set[str], bias: str) -> list[ParamPlan]:
    """lora.bias (peft's meaning): "all" trains every bias, "lora_only" those of adapted modules.

    Applied after the overrides too, as peft marks biases trainable after everything else.
    """
    if bias == "none" or not adapted:
        return params
    out = []
    for p in params:
        module, _, leaf = p.name.rpartition(".")
        if leaf == "bias" and p.mode != "full" and (bias == "all" or module in adapted):
            p = ParamPlan(p.name, p.group, "full", p.numel, p.lr, f"lora.bias: {bias}")
        out.append(p)
    return out


def _check_matches(named_shapes: list, params: list[ParamPlan], spec: ModelSpec, freeze: FreezeConfig,
                   lora: LoraConfig, override_hits: list[int]) -> None:
    """A LoRA target or an override that matches nothing is a mistake: say what it was matched against."""
    for hits, override in zip(override_hits, freeze.overrides):
        if not hits:
            raise ConfigError(
                f"freeze.overrides: pattern {override.pattern!r} matches no parameter of {spec.name}; it is "
                f"searched in parameter names such as {_examples(n for n, _ in named_shapes)}")
    for group in GROUPS:
        if freeze.group(group).mode != "lora" or any(p.group == group and p.mode == "lora" for p in params):
            continue
        linear = [n.rpartition(".")[0] for n, s in named_shapes
                  if n.endswith(".weight") and len(s) == 2 and spec.group_of(n) == group]
        targets = lora.target_modules if lora.target_modules is not None else "the default targets"
        raise ConfigError(
            f"freeze.{group}: mode is lora but lora.target_modules ({targets!r}) matches no Linear module in "
            f"{group} of {spec.name}; a regex must match a whole module name, a list entry a name's tail. "
            f"{group}'s Linear modules are named like {_examples(linear) or '(none)'}; {spec.name} targets "
            f"{list(spec.lora_targets.get(group, ()))} there by default")


def _lora_patterns(spec: ModelSpec, lora: LoraConfig, lora_modules: list[str]) -> tuple[dict, dict]:
    rank_pattern, alpha_pattern = {}, {}
    for group, settings in lora.per_group.items():
        for module in lora_modules:
            if spec.group_of(module + ".weight") == group:
                key = "^" + re.escape(module) + "$"
                if "r" in settings:
                    rank_pattern[key] = settings["r"]
                if "alpha" in settings:
                    alpha_pattern[key] = settings["alpha"]
    return rank_pattern, alpha_pattern


def _plan_notes(ignored_targets: set[str], tied: tuple[str, str] | None, params: list[ParamPlan]) -> tuple[str, ...]:
    notes = [f"lora.target_modules also matches modules in {g}, which is not in lora mode; they are not adapted"
             for g in sorted(ignored_targets)]
    if tied:
        mode = next(p.mode for p in params if p.name == tied[1])
        notes.append(f"lm_head is tied to the input embeddings: {tied[0]} and {tied[1]} are one tensor "
                     f"(counted under embeddings), so the output projection is {mode} with it")
    return tuple(notes)


def storage_label(frozen: Iterable[str], trained: Iterable[str]) -> str:
    """A group's storage dtypes as ``frozen/trained`` ("bf16/fp32"), one side when the other is empty."""
    frozen, trained = "+".join(sorted(set(frozen))), "+".join(sorted(set(trained)))
    return f"{frozen}/{trained}" if frozen and trained else frozen or trained or "-"


def format_plan(plan: FreezePlan, frozen_dtype: str = "fp32") -> str:
    """The plan by group; ``storage`` is frozen/trained dtype (``train.frozen_storage`` / fp32 masters)."""
    lines = [f"{'group':<11} {'mode':<18} {'params':>14} {'trainable':>14} {'lr':>10} {'storage':>10}"]
    for row in plan.rows():
        frozen = [frozen_dtype] if row["trainable"] < row["total"] + plan.lora_numel.get(row["group"], 0) else []
        lines.append(
            f"{row['group']:<11} {row['mode']:<18} {row['total']:>14,} {row['trainable']:>14,} "
            + (f"{row['lr']:>10.2e}" if row["trainable"] else f"{'-':>10}")
            + f" {storage_label(frozen, ['fp32'] if row['trainable'] else []):>10}"
        )
    total = sum(p.numel for p in plan.params)
    trainable = plan.trainable_numel()
    lines.append(f"{'total':<11} {'':<18} {total:>14,} {trainable:>14,}   ({100 * trainable / max(total, 1):.3f}%)")
    lines.extend(f"note: {n}" for n in plan.notes)
    return "\n".join(lines)


# --- applying the plan -----------------------------------------------------------------------


def base_name(name: str) -> tuple[str, bool]:
    """Map a (peft-)wrapped parameter name to (base model name, is_lora_param)."""
    name = name.removeprefix(PEFT_PREFIX)
    name = name.replace("_checkpoint_wrapped_module.", "").replace("_fsdp_wrapped_module.", "")
    m = _LORA_PARAM.search(name)
    if m:
        return name[: m.start()], True
    return name.replace(".base_layer.", "."), False


def apply_plan(model, plan: FreezePlan, lora: LoraConfig):
    """Set requires_grad per the plan and add LoRA adapters; returns the (possibly peft) model."""
    full = plan.full_names
    if plan.lora_modules:
        from peft import LoraConfig as PeftLoraConfig, get_peft_model

        peft_config = PeftLoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(plan.lora_modules),
            use_dora=lora.dora,
            use_rslora=lora.rslora,
            rank_pattern=plan.rank_pattern,
            alpha_pattern=plan.alpha_pattern,
        )
        model = get_peft_model(model, peft_config)
    for name, param in model.named_parameters():
        base, is_lora = base_name(name)
        param.requires_grad_(is_lora or base in full)
    return model


def param_groups(model, plan: FreezePlan, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups, one per (module group, decay) with the group's learning rate.

    Only trainable parameters go in, so the optimizer never allocates state for frozen ones.
    """
    by_name = {p.name: p for p in plan.params}
    module_lr = {p.name.rpartition(".")[0]: (p.group, p.lr) for p in plan.params if p.mode == "lora"}
    buckets: dict[tuple[str, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        base, is_lora = base_name(name)
        group, lr = module_lr[base] if is_lora else (by_name[base].group, by_name[base].lr)
        decay = param.ndim >= 2 and not is_lora
        bucket = buckets.setdefault(
            (group, decay),
            {"params": [], "names": [], "lr": lr, "group": group, "weight_decay": weight_decay if decay else 0.0},
        )
        bucket["params"].append(param)
        bucket["names"].append(name)
    return list(buckets.values())


# --- auditing what the engine actually did ----------------------------------------------------


class FreezeAuditError(RuntimeError):
    pass


@dataclass
class AuditRow:
    group: str
    planned_trainable: int = 0
    trainable: int = 0
    frozen_with_grad: int = 0
    frozen_with_optimizer_state: int = 0
    unplanned: list[str] = field(default_factory=list)
    frozen_dtypes: set[str] = field(default_factory=set)
    """Storage dtypes of the group's frozen tensors and of its trained ones' master weights."""
    trained_dtypes: set[str] = field(default_factory=set)

    @property
    def storage(self) -> str:
        return storage_label(self.frozen_dtypes, self.trained_dtypes)


SHORT_DTYPES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}


def short_dtype(dtype) -> str:
    return SHORT_DTYPES.get(str(dtype), str(dtype).removeprefix("torch."))


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def frozen_fingerprint(model) -> dict[str, float]:
    """Per-group (sum, sum of squares) over this rank's shard of frozen parameters, in float64."""
    import torch

    sums: dict[str, float] = defaultdict(float)
    for name, param in model.named_parameters():
        if param.requires_grad:
            continue
        t = _local(param.data)
        if getattr(param, "ds_tensor", None) is not None:  # ZeRO-3 keeps this rank's partition here
            t = param.ds_tensor
        if t.numel() == 0 or t.device.type == "meta":
            continue
        t64 = t.detach().to(torch.float64)
        sums[name.split(".")[0]] += float(t64.sum()) + float((t64 * t64).sum())
    return dict(sums)


def audit(model, plan: FreezePlan, optimizer_params: Iterable, optimizer_state: dict | None = None,
          storage_dtype=None) -> list[AuditRow]:
    """Check the wrapped model against the plan. Raises FreezeAuditError with every mismatch.

    ``optimizer_params`` are the tensors handed to the optimizer; ``optimizer_state`` maps a
    parameter to its state (torch optimizers' ``.state``). Gradients are checked as they are now,
    so calling this after ``optimizer.step()`` but before ``zero_grad`` sees the real ones.
    ``storage_dtype(param)`` is the dtype the engine keeps the parameter in (a trained one's
    master weights; ``Strategy.storage_dtype``), recorded per group; default ``param.dtype``.
    """
    storage_dtype = storage_dtype or (lambda param: param.dtype)
    by_name = {p.name: p for p in plan.params}
    planned_lora = set(plan.lora_modules)
    in_optimizer = {id(p) for p in optimizer_params}
    state = optimizer_state or {}
    rows: dict[str, AuditRow] = {}
    for p in plan.params:
        row = rows.setdefault(p.group, AuditRow(p.group))
        row.planned_trainable += p.numel if p.mode == "full" else 0
    for group, n in plan.lora_numel.items():
        rows[group].planned_trainable += n
    seen_lora: set[str] = set()
    for name, param in model.named_parameters():
        base, is_lora = base_name(name)
        if is_lora:
            plan_group = by_name[base + ".weight"].group if base + ".weight" in by_name else "other"
            should_train = base in planned_lora
            seen_lora.add(base)
        else:
            if base not in by_name:
                rows.setdefault("other", AuditRow("other")).unplanned.append(name)
                continue
            plan_group = by_name[base].group
            should_train = by_name[base].mode == "full"
        row = rows.setdefault(plan_group, AuditRow(plan_group))
        numel = getattr(param, "ds_numel", None) or param.numel()
        (row.trained_dtypes if param.requires_grad else row.frozen_dtypes).add(short_dtype(storage_dtype(param)))
        if param.requires_grad:
            row.trainable += numel
            if not should_train:
                row.unplanned.append(f"{name} trains but the plan freezes it")
        else:
            if should_train:
                row.unplanned.append(f"{name} is frozen but the plan trains it")
            if param.grad is not None:
                row.frozen_with_grad += 1
            if id(param) in in_optimizer or param in state:
                row.frozen_with_optimizer_state += 1
    missing = planned_lora - seen_lora
    if missing:
        rows.setdefault("other", AuditRow("other")).unplanned.append(f"LoRA adapters missing on {sorted(missing)[:3]}")
    problems = [
        f"{r.group}: " + "; ".join(
            ([f"{r.frozen_with_grad} frozen tensors hold a gradient"] if r.frozen_with_grad else [])
            + ([f"{r.frozen_with_optimizer_state} frozen tensors have optimizer state"] if r.frozen_with_optimizer_state else [])
            + r.unplanned[:5]
        )
        for r in rows.values()
        if r.frozen_with_grad or r.frozen_with_optimizer_state or r.unplanned
    ]
    if problems:
        raise FreezeAuditError("freeze audit failed:\n  " + "\n  ".join(problems))
    return [rows[g] for g in (*GROUPS, "other") if g in rows]


def format_audit(rows: list[AuditRow]) -> str:
    """Trainable counts are global (FSDP2 DTensors and ZeRO-3 ds_numel report the full size)."""
    lines = [f"freeze audit: {'group':<11} {'planned':>12} {'trainable':>12} {'grad on frozen':>15} "
             f"{'opt state on frozen':>20} {'storage frozen/trained':>23}"]
    for r in rows:
        lines.append(
            f"{'':<14}{r.group:<11} {r.planned_trainable:>12,} {r.trainable:>12,} {r.frozen_with_grad:>15} "
            f"{r.frozen_with_optimizer_state:>20} {r.storage:>23}"
        )
    return "\n".join(lines)
