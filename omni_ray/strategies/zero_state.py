"""ZeRO's optimizer state, translated to and from the per-parameter layout the rest of omni_ray uses.

Under ZeRO the torch optimizer steps flat fp32 partitions (one per parameter group per rank),
not the model's parameters. Checkpoints and the freeze audit want the state by parameter:

* ``full_state_by_name``: full fp32 Adam moments by parameter name on rank 0, in the layout of
  FSDP2's full optimizer state dict, so a checkpoint loads onto any world size, ZeRO stage or
  FSDP2 (collective under ZeRO-3);
* ``load_full_state``: every rank copies its partitions out of such full tensors (local);
* ``local_state``: parameter -> this rank's fragment of its state, for the audit (local).

Torch's Adam creates its state lazily at the first step; ``ensure_state`` creates zeros before
that, because DeepSpeed's per-parameter accessors need it to exist.
"""

from __future__ import annotations

import torch

ADAM_STATE = ("exp_avg", "exp_avg_sq")


def flat_partitions(zero_optimizer) -> list[torch.Tensor]:
    """This rank's flat fp32 partitions: the tensors the torch optimizer steps and keeps state for."""
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):  # ZeRO-3, ZeRO-1/2
        flats = getattr(zero_optimizer, attr, None)
        if flats:
            return list(flats)
    raise RuntimeError(f"{type(zero_optimizer).__name__}: no flat fp32 partitions found; is ZeRO enabled?")


def ensure_state(torch_optimizer, zero_optimizer, int_step: bool) -> None:
    """Create the (zero) Adam state of every flat partition if no step has run yet.

    ``int_step``: DeepSpeedCPUAdam (ZeRO-Offload) counts steps in a Python int, torch in a tensor.
    """
    state = torch_optimizer.state
    for flat in flat_partitions(zero_optimizer):
        if not state.get(flat):
            state[flat] = {"step": 0 if int_step else torch.tensor(0.0), "exp_avg": torch.zeros_like(flat),
                           "exp_avg_sq": torch.zeros_like(flat)}
    if hasattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO-1/2 maps each parameter's fragment of the Adam state once, right after the first
        # group's first step, when later groups have no state yet; map again now that all have.
        zero_optimizer._hp_optimizer_states_linked = False
        zero_optimizer._lazy_init_hp_params_optimizer_state()


def adam_step(torch_optimizer) -> float:
    steps = [float(s["step"]) for s in torch_optimizer.state.values() if "step" in s]
    return max(steps, default=0.0)


def full_state_by_name(named_params: list, rank: int, step: float) -> dict[str, dict]:
    """{name: {step, exp_avg, exp_avg_sq}} of the trainable parameters, full fp32, on rank 0. Collective."""
    from deepspeed.utils import safe_get_full_optimizer_state

    per_param = {}
    for name, param in named_params:
        if not param.requires_grad:
            continue
        entry = {"step": torch.tensor(step)}
        for key in ADAM_STATE:
            value = safe_get_full_optimizer_state(param, key)  # collective under ZeRO-3
            if rank == 0:
                entry[key] = value.detach().to("cpu").clone()
        per_param[name] = entry
    return per_param


def load_full_state(named_params: list, saved: dict[str, dict], torch_optimizer, device) -> None:
    """Copy full per-name moments into this rank's partitions and set the Adam step count."""
    from deepspeed.utils import safe_set_full_optimizer_state

    missing = [n for n, p in named_params if p.requires_grad and n not in saved]
    if missing:
        raise ValueError(f"the checkpoint's optimizer state has no entry for trained parameters {missing[:3]}; "
                         "was it written with another freeze map?")
    for name, param in named_params:
        if param.requires_grad:
            for key in ADAM_STATE:
                safe_set_full_optimizer_state(param, saved[name][key].to(device, torch.float32), key)
    step = max((float(e["step"]) for e in saved.values()), default=0.0)
    for flat_state in torch_optimizer.state.values():
        old = flat_state["step"]
        flat_state["step"] = int(step) if isinstance(old, int) else torch.tensor(step, dtype=old.dtype)


def local_state(params: list) -> dict:
    """Parameter -> {key: this rank's fragment} for every parameter ZeRO holds optimizer state for.

    A parameter whose fragment lies wholly on other ranks has none here; the audit runs on every
    rank, so each parameter with state is seen by the rank that holds it.
    """
    out = {}
    for param in params:
        if hasattr(param, "ds_id"):  # ZeRO-3
            # Not the public safe_get_local_optimizer_state: it answers None for a parameter whose
            # requires_grad is off, which is exactly the parameter the audit has to see.
            fragments = {k: param._z3_optimizer._get_fp32_opt_state_partition(
                param, release_swap_buffers=True, optim_state_key=k)[0] for k in ADAM_STATE}
        else:
            mapping = getattr(param, "_hp_mapping", None)
            fragments = {k: mapping.get_optim_state_fragment(k) for k in ADAM_STATE} if mapping and \
                mapping.optim_fragment else {}
        fragments = {k: v for k, v in fragments.items() if v is not None and v.numel()}
        if fragments:
            out[param] = fragments
    return out
