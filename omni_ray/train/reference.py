"""The DPO reference policy without a second model: the training model, computing as it started.

What the reference costs, by freeze map (``ReferencePolicy.nbytes`` is the exact figure):

* frozen parameters: nothing. Policy and reference share them; they never change.
* LoRA adapters: nothing. The reference is the same forward with the adapters disabled (peft's
  ``disable_adapter()``), which is the base model, because fresh adapters start as a no-op (B = 0).
* fully trained parameters (``projector: full``, ``llm: full``, overrides ...): one copy of their
  *initial* values (the snapshot, in their storage dtype), swapped in for the reference forward
  and swapped back after it. A full-LLM tune therefore holds one extra copy of the LLM's trained
  weights, sharded as the weights are; LoRA + a full projector holds only the projector.

The reference forward runs under ``torch.no_grad()`` in eval mode (no dropout: the reference is
deterministic), before the policy forward of the same micro-batch, so the swap's transient copy
(the current values, stashed while the snapshot is in) is alive only while no activations are
kept. After the block the policy's values are back bit for bit (copies, no arithmetic).

Sharded engines (not exercised by the unit tests, which run one process): the snapshot and the
swap work on each rank's *local* storage, so the snapshot is sharded exactly as the weights are.
Build the policy after the engine wrapped the model:

* FSDP2: parameters are DTensors; their local shard (``param.to_local()``) is snapshotted and
  written in place (``copy_``), which keeps FSDP2's views into its flat shard buffer intact, and
  the next all-gather (in the reference forward's pre-forward hooks) sees the reference values.
  Unsharded parameters left from a forward without backward (``reshard_after_forward: false``,
  the root module) are dropped (``FSDPModule.reshard()``) before and after the reference forward,
  so neither forward reuses the other's gathered values. Tested at world size 1 (one process,
  a real ``fully_shard``); the collectives at larger world sizes are the next session's tests.
* DeepSpeed ZeRO-3 (not tested yet): each parameter's partition is ``param.ds_tensor``
  (``param.data`` is an empty placeholder outside a forward); that partition is snapshotted and
  swapped. Parameters below ``stage3_param_persistence_threshold`` stay gathered between forwards
  and a forward reads them without gathering from the partition: a DPO run with a reference must
  set that threshold to 0 in the generated DeepSpeed config (norms and biases are small, the cost
  is a few more all-gathers). ZeRO-2 keeps whole parameters in the module, in the compute dtype,
  and its fp32 masters in the optimizer: the module's tensors are what the forward reads, so
  those are snapshotted.

On resume the snapshot must be taken from the *base* checkpoint's values, i.e. build this object
before the run's checkpoint is loaded into the model (LoRA-only runs do not care: the adapters are
simply switched off).
"""

from __future__ import annotations

import contextlib

import torch

from omni_ray.freeze import base_name


def local_storage(param: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds for ``param``: a ZeRO-3 partition, an FSDP2 local shard, or itself."""
    partition = getattr(param, "ds_tensor", None)
    if partition is not None:
        return partition
    return param.to_local() if hasattr(param, "to_local") else param


def _reshard(model: torch.nn.Module) -> None:
    """Drop FSDP2's unsharded parameters: with ``reshard_after_forward: false`` (and for the root
    module) they outlive a forward that has no backward, and the next forward would reuse them
    instead of gathering the values just swapped in or back."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _lazy_init(model: torch.nn.Module) -> None:
    """Run FSDP2's lazy init now, outside the reference: it fixes each group's gradient dtype from the
    parameters that require grad at that moment, and peft's ``disable_adapter`` turns ``requires_grad``
    off on the adapters (a first forward inside it, over bf16 frozen weights, gave LoRA bf16 gradients
    for fp32 parameters and failed)."""
    from torch.distributed.fsdp import FSDPModule

    root = next((m for m in model.modules() if isinstance(m, FSDPModule)), None)
    if root is not None:
        root._get_fsdp_state()._lazy_init()  # noqa: SLF001 - a no-op once the first forward ran


class ReferencePolicy:
    """``with reference.active(): model(...)`` computes the initial model's outputs.

    Construct it before the first optimizer step. ``reference_free`` (SimPO): nothing is
    snapshotted and ``active`` must not be used.
    """

    def __init__(self, model: torch.nn.Module, reference_free: bool = False):
        self.model = model
        named = list(model.named_parameters())
        self.adapters = any(p.requires_grad and base_name(n)[1] for n, p in named)
        if self.adapters and not hasattr(model, "disable_adapter"):
            raise TypeError("LoRA parameters train but the model is not a peft model: cannot disable its adapters")
        # Trained parameters other than LoRA's: their initial values are the reference's.
        self.trained = {n: p for n, p in named if p.requires_grad and not base_name(n)[1]}
        self.snapshot = {} if reference_free else {
            n: local_storage(p).detach().clone() for n, p in self.trained.items()}
        self.reference_free = reference_free

    @property
    def nbytes(self) -> int:
        """Bytes this rank holds for the reference (the snapshot; LoRA and frozen parameters cost none)."""
        return sum(t.numel() * t.element_size() for t in self.snapshot.values())

    @contextlib.contextmanager
    def active(self):
        """Within the block the model is the reference: initial trained values, adapters off, eval, no grad."""
        if self.reference_free:
            raise RuntimeError("a reference-free objective (simpo) has no reference policy")
        was_training = self.model.training
        stash = {}
        _lazy_init(self.model)
        with torch.no_grad():
            try:
                _reshard(self.model)
                for name, param in self.trained.items():
                    storage = local_storage(param)
                    stash[name] = storage.clone()
                    storage.copy_(self.snapshot[name])
                self.model.eval()
                with self.model.disable_adapter() if self.adapters else contextlib.nullcontext():
                    yield self.model
            finally:
                self.model.train(was_training)
                _reshard(self.model)
                for name, current in stash.items():
                    local_storage(self.trained[name]).copy_(current)


__all__ = ["ReferencePolicy", "local_storage"]
