"""Per-worker memory: an estimate before launch, and a tracker that measures a real step.

The estimate is built from the model's config and the freeze plan, never from weights:

    weights      by storage dtype (frozen groups in ``train.frozen_dtype``, bf16 under bf16;
                 trained ones as fp32 masters; DeepSpeed also keeps a compute-dtype copy of
                 those), divided by the world size where the engine shards them (FSDP2, ZeRO-3)
    gathered     the unsharded compute-dtype copies FSDP2 / ZeRO-3 make while computing: the
                 root group (embeddings, head) for the whole forward+backward, two layers at once
    gradients    fp32, trained parameters only, sharded (FSDP2 reduce-scatters, ZeRO-2/3)
    optimizer    AdamW's two fp32 moments per trained parameter, sharded
    activations  what autograd keeps for the backward plus the transients around it: measured
                 by running one forward and backward of the real transformers class on *fake*
                 tensors (``FakeTensorMode``: shapes and dtypes, no data, no memory), with the
                 plan applied (so frozen prefixes keep nothing), at the configured micro-batch
                 and sequence length (image tokens are part of the sequence), with and without
                 gradient checkpointing, through the configured loss (chunked or full logits)

``LiveTensorBytes`` is the tracker both sides use: a dispatch mode that sees every tensor an op
creates and adds its storage's bytes while any tensor still refers to it. On real CPU tensors it
is the "measured" side (``bench/memory.py``, tests); on fake tensors it is the estimate's
activation term. On a GPU the measured side is ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import logging
import weakref
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

log = logging.getLogger(__name__)

GiB = 2**30
ADAM_STATE_BYTES = 8  # exp_avg + exp_avg_sq, fp32
MASTER_BYTES = 4  # trained parameters, their gradients and optimizer math stay fp32


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storage alive now (``live``) and at most (``peak``) since entering.

    Tensors that existed before entering (the weights) are the baseline and not counted.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[tuple, int] = {}
        self._tracked: set[int] = set()

    def _forget(self, key: tuple, tensor_id: int, nbytes: int) -> None:
        self._tracked.discard(tensor_id)
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.live -= nbytes

    def _track(self, tensor: torch.Tensor, aliases_input: bool) -> None:
        if id(tensor) in self._tracked:  # in-place ops return their input
            return
        storage = tensor.untyped_storage()
        key = (tensor.device.type, storage._cdata)
        if aliases_input and key not in self._refs:  # a view of a baseline tensor (a weight's .t())
            return
        self._tracked.add(id(tensor))
        if key in self._refs:  # a view of a storage already counted
            self._refs[key] += 1
        else:
            self._refs[key] = 1
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        weakref.finalize(tensor, self._forget, key, id(tensor), storage.nbytes())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views and in-place ops return tensors on their input's storage: no new bytes.
        aliases = any(r.alias_info is not None for r in func._schema.returns)
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._track(item, aliases)
        return out


def measured_peak(model, ids: torch.Tensor, *, chunked: bool, steps: int = 2) -> int:
    """The estimate's reference: peak live tensor bytes above the weights over ``steps`` real
    training steps (forward, token loss, backward, AdamW) on ``ids``, chunked loss or full logits."""
    from omni_ray.train.loss import head_loss, token_loss_sum

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], foreach=False)
    tracker = LiveTensorBytes()
    with tracker:
        for _ in range(steps):
            if chunked:
                with head_loss(model.get_output_embeddings(), ids):
                    loss = model(input_ids=ids, use_cache=False).logits
            else:
                loss = token_loss_sum(model(input_ids=ids, use_cache=False).logits, ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del loss
    return tracker.peak


@dataclass(frozen=True)
class Layout:
    """How one worker holds the model: from the strategy and train sections (``layout_of``)."""

    world: int = 1
    shard_weights: bool = True  # FSDP2, ZeRO-3
    compute_dtype: torch.dtype = torch.float32
    frozen_dtype: torch.dtype = torch.float32
    chunked_loss: bool = True
    gradient_checkpointing: bool = False
    engine: str = "fsdp"
    optimizer_foreach: bool = False  # the engines use torch's foreach AdamW on GPUs, per tensor on CPUs


@dataclass(frozen=True)
class MemoryEstimate:
    weights: dict[str, int]  # storage dtype -> bytes on this worker
    gradients: int
    optimizer: int
    optimizer_step: int  # AdamW's temporaries during the step (activations are gone by then)
    activations: int  # with the configured gradient checkpointing setting
    activations_other: int | None  # with the opposite setting, for comparison (None: not estimated)
    logits: int  # the loss's share: full logits, or one chunk
    gradient_checkpointing: bool
    gathered: int = 0  # unsharded copies FSDP2 / ZeRO-3 gather for compute (freed before the optimizer step)
    notes: tuple[str, ...] = field(default_factory=tuple)
    reference: int = 0  # DPO's reference snapshot (reference_snapshot_bytes), held for the whole run

    @property
    def total(self) -> int:
        return sum(self.weights.values()) + self.reference + self.step_bytes

    @property
    def step_bytes(self) -> int:
        """What one step adds above the loaded weights (the measured side's baseline): the
        optimizer state and gradients, plus the larger of the forward/backward's share (activations
        and the gathered unsharded weights) and the optimizer's temporaries (its step, after both
        are freed)."""
        return self.gradients + self.optimizer + max(self.activations + self.gathered, self.optimizer_step)

    def format(self) -> str:
        ckpt = "on" if self.gradient_checkpointing else "off"
        other = "" if self.activations_other is None else (
            f"; {'off' if self.gradient_checkpointing else 'on'}: {self.activations_other / GiB:.2f} GiB")
        lines = [f"memory per worker (estimate): {self.total / GiB:.2f} GiB"]
        lines += [f"  weights {dtype:<9} {n / GiB:8.2f} GiB" for dtype, n in sorted(self.weights.items())]
        lines += [f"  gradients         {self.gradients / GiB:8.2f} GiB",
                  f"  optimizer state   {self.optimizer / GiB:8.2f} GiB (+{self.optimizer_step / GiB:.2f} GiB "
                  f"temporaries in its step)",
                  f"  activations       {self.activations / GiB:8.2f} GiB (gradient checkpointing {ckpt}{other})",
                  f"  gathered weights  {self.gathered / GiB:8.2f} GiB (unsharded while computing)",
                  f"    of which loss   {self.logits / GiB:8.2f} GiB"]
        if self.reference:
            lines.insert(1 + len(self.weights), f"  DPO reference     {self.reference / GiB:8.2f} GiB (initial values of "
                         "the fully trained parameters; LoRA and frozen ones are shared)")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _numels(plan) -> tuple[int, int]:
    """(frozen, trained) parameter counts of the plan; LoRA adapters count as trained."""
    trained = plan.trainable_numel()
    frozen = sum(p.numel for p in plan.params if p.mode != "full")
    return frozen, trained


def _weights(plan, layout: Layout) -> dict[str, int]:
    """Weight bytes by storage dtype on one worker.

    FSDP2: frozen tensors in ``frozen_dtype``, trained ones in fp32 (its master weights), both
    sharded. DeepSpeed: the module holds every parameter in the compute dtype (sharded under
    ZeRO-3 only), and the optimizer fp32 masters of the trained ones, partitioned over all ranks
    (ZeRO-1 and up).
    """
    frozen, trained = _numels(plan)
    module_shard = layout.world if layout.shard_weights else 1
    out: dict[str, int] = defaultdict(int)
    out[_dtype_name(layout.frozen_dtype)] += frozen * layout.frozen_dtype.itemsize // module_shard
    if layout.engine == "deepspeed":
        out[_dtype_name(layout.compute_dtype)] += trained * layout.compute_dtype.itemsize // module_shard
        out["float32"] += trained * MASTER_BYTES // layout.world
    else:
        out["float32"] += trained * MASTER_BYTES // module_shard
    return {k: v for k, v in out.items() if v}


def _gathered(layout: Layout, root: int, largest_layer: int) -> int:
    """Unsharded compute-dtype copies FSDP2 / ZeRO-3 make while computing (also at world size 1:
    the all-gather writes into a new buffer): the root group's parameters (embeddings, head,
    norms: outside every repeated layer, kept from the forward to the end of the backward) and
    two layers (the one running and the one prefetched)."""
    if not layout.shard_weights:
        return 0
    return (root + 2 * largest_layer) * layout.compute_dtype.itemsize


def _fake_step(build_model: Callable, apply: Callable, batch: int, seq_len: int, layout: Layout,
               checkpointing: bool) -> tuple[int, int]:
    """(peak live bytes, trained-gradient bytes) of one forward+backward on fake tensors."""
    # Fake parameters cannot be swapped in place by Module.to (peft moves its adapters): assign.
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        return _fake_forward_backward(build_model, apply, batch, seq_len, layout, checkpointing)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)


def _fake_forward_backward(build_model: Callable, apply: Callable, batch: int, seq_len: int, layout: Layout,
                           checkpointing: bool) -> tuple[int, int]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from omni_ray.train.loss import head_loss, token_loss_sum

    with torch.device("meta"):  # the skeleton: shapes only; fake mode converts its tensors on use
        model = apply(build_model()).to(layout.compute_dtype)
    model.train()
    with FakeTensorMode(allow_non_fake_inputs=True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids = torch.zeros(batch, seq_len, dtype=torch.long, device="meta")
        labels = torch.zeros(batch, seq_len, dtype=torch.long, device="meta")
        inputs = {"input_ids": ids, "use_cache": False}
        tracker = LiveTensorBytes()
        with tracker:
            if layout.chunked_loss:
                with head_loss(model.get_output_embeddings(), labels):
                    loss = model(**inputs).logits
            else:
                loss = token_loss_sum(model(**inputs).logits, labels)
            if loss.requires_grad:
                loss.backward()
        grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return tracker.peak, grads


# Fake steps cost ~1 ms per op, and the torch fallback of linear attention runs a Python loop per
# 64-token chunk: long sequences are measured at two shorter lengths and extrapolated.
GDN_CHUNK = 64


def measure_lengths(vocab: int, chunked: bool) -> tuple[int, int]:
    """Two lengths where memory is affine in the length: the chunked loss's chunk is full at both."""
    from omni_ray.train.loss import chunk_tokens

    short = max(GDN_CHUNK, -(-chunk_tokens(vocab) // GDN_CHUNK) * GDN_CHUNK) if chunked else GDN_CHUNK
    return short, 2 * short


def _activations(build_model: Callable, apply: Callable, batch: int, seq_len: int, vocab: int, layout: Layout,
                 checkpointing: bool) -> int:
    """Activation bytes (gradients excluded) of one step at ``seq_len``.

    Above ``measure_lengths`` the bytes are an affine function of the length (attention runs
    through SDPA, which keeps no [seq, seq] scores, and the loss's chunk is full), so two
    shorter fake steps fix the line.
    """
    def measure(tokens: int) -> int:
        peak, grads = _fake_step(build_model, apply, batch, tokens, layout, checkpointing)
        return max(0, peak - grads)  # gradients are counted on their own

    short, long = measure_lengths(vocab, layout.chunked_loss)
    if seq_len <= long:
        return measure(seq_len)
    at_short, at_long = measure(short), measure(long)
    return int(at_long + (at_long - at_short) * (seq_len - long) / (long - short))


def _adam_temporaries(plan, trained: int, layout: Layout) -> int:
    """torch AdamW's step: foreach takes sqrt(exp_avg_sq) of every tensor at once; per tensor,
    sqrt and its quotient of the largest tensor exist together."""
    if layout.optimizer_foreach:
        return trained * MASTER_BYTES
    largest = max((p.numel for p in plan.params if p.mode == "full"), default=0)
    return 2 * largest * MASTER_BYTES


def loss_bytes(tokens: int, vocab: int, compute_dtype: torch.dtype, chunked: bool) -> int:
    """The loss's own memory: full logits (+ their fp32 copy and softmax) or one chunk's worth."""
    from omni_ray.train.loss import chunk_tokens

    if chunked:
        return 3 * 4 * min(tokens, chunk_tokens(vocab)) * vocab
    return tokens * vocab * (compute_dtype.itemsize + 4 + 4)


def estimate_memory(build_model: Callable, apply: Callable, plan, layout: Layout, *, batch: int, seq_len: int,
                    vocab: int, largest_layer: int = 0, root: int = 0,
                    compare_checkpointing: bool = True) -> MemoryEstimate:
    """Per-worker bytes by component for one training step (see the module docstring).

    ``build_model()`` returns the transformers model from its config (it runs on the meta
    device: no weights are read or allocated); ``apply(model)`` applies the freeze plan. Each
    fake forward+backward costs about a millisecond per op (seconds for a model);
    ``compare_checkpointing=False`` skips the one with the other checkpointing setting.
    ``largest_layer`` and ``root`` (``unsharded_numels``) size what a sharding engine gathers;
    0 for a model run as is (no engine).
    """
    frozen, trained = _numels(plan)
    shard = layout.world  # FSDP2 and ZeRO-2/3 all shard gradients and optimizer state
    runs = {}
    settings = (layout.gradient_checkpointing, not layout.gradient_checkpointing)
    for checkpointing in settings if compare_checkpointing else settings[:1]:
        runs[checkpointing] = _activations(build_model, apply, batch, seq_len, vocab, layout, checkpointing)
    notes = []
    if layout.shard_weights and layout.world > 1 and not largest_layer:
        notes.append("the unsharded layer FSDP2/ZeRO-3 gathers at a time is not counted (largest_layer=0)")
    return MemoryEstimate(
        weights=_weights(plan, layout),
        gathered=_gathered(layout, root, largest_layer),
        gradients=trained * MASTER_BYTES // shard,
        optimizer=trained * ADAM_STATE_BYTES // shard,
        optimizer_step=_adam_temporaries(plan, trained, layout) // shard,
        activations=runs[layout.gradient_checkpointing],
        activations_other=runs.get(not layout.gradient_checkpointing),
        logits=loss_bytes(batch * seq_len, vocab, layout.compute_dtype, layout.chunked_loss),
        gradient_checkpointing=layout.gradient_checkpointing,
        notes=tuple(notes),
    )


PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def unsharded_numels(plan, spec) -> dict[str, int]:
    """``estimate_memory``'s ``largest_layer`` (parameters of the biggest repeated layer, gathered
    one at a time) and ``root`` (parameters outside every repeated layer: FSDP2's root group)."""
    sizes: dict[tuple[str, int], int] = {}
    root = 0
    for p in plan.params:
        index = spec.layer_index(p.group, p.name)
        if index is None:
            root += p.numel
        else:
            sizes[(p.group, index)] = sizes.get((p.group, index), 0) + p.numel
    return {"largest_layer": max(sizes.values(), default=0), "root": root}



def layout_of(train, strategy, scaling) -> Layout:
    """How the configured engine holds the model (train, strategy and scaling sections): frozen
    weights in ``train.frozen_storage``, trained ones as fp32 masters (see the strategies)."""
    return Layout(world=scaling.num_workers,
                  shard_weights=strategy.name == "fsdp" or strategy.zero_stage == 3,
                  compute_dtype=PRECISION_DTYPES[train.precision],
                  frozen_dtype=PRECISION_DTYPES[train.frozen_storage],
                  gradient_checkpointing=train.gradient_checkpointing, engine=strategy.name,
                  optimizer_foreach=scaling.use_gpu)


def memory_report(model_cfg, hf_config: dict, spec, plan, lora, layout: Layout, *, batch: int, seq_len: int,
                  gpu_memory_gb: float | None, dpo: bool = False,
                  reference_free: bool = False) -> tuple[str, str | None]:
    """The estimate by component (text) and, if it is above the device's memory, a warning (else None).

    ``dpo``: each pair is two rows (chosen, rejected) in one forward, and the reference snapshot is
    held (none when ``reference_free``, SimPO)."""
    if spec.remote_code:
        return "memory: no estimate for remote-code models (their classes are not run before training)", None
    estimate = run_estimate(model_cfg, hf_config, spec, plan, lora, layout, batch=batch, seq_len=seq_len, dpo=dpo,
                            reference_free=reference_free)
    limit, source = device_memory_bytes(gpu_memory_gb)
    return estimate.format(), fits_warning(estimate, limit, source)


def run_estimate(model_cfg, hf_config: dict, spec, plan, lora, layout: Layout, *, batch: int, seq_len: int,
                 dpo: bool = False, reference_free: bool = False) -> MemoryEstimate:
    """``estimate_memory`` for a configured run (``memory_report``'s numbers)."""
    from omni_ray.freeze import apply_plan
    from omni_ray.models.loading import build_skeleton

    text = hf_config.get("text_config", hf_config)
    estimate = estimate_memory(lambda: build_skeleton(model_cfg, spec, hf_config), lambda m: apply_plan(m, plan, lora),
                               plan, layout, batch=2 * batch if dpo else batch, seq_len=seq_len,
                               vocab=int(text["vocab_size"]), **unsharded_numels(plan, spec), compare_checkpointing=False)
    if dpo:
        estimate = replace(estimate, reference=reference_snapshot_bytes(plan, layout, reference_free))
    return estimate


def device_memory_bytes(configured_gb: float | None) -> tuple[int | None, str]:
    """The memory one worker may use: ``scaling.gpu_memory_gb`` if set, else the detected GPU."""
    if configured_gb:
        return int(configured_gb * GiB), "scaling.gpu_memory_gb"
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, torch.cuda.get_device_name(0)
    return None, "no GPU detected and scaling.gpu_memory_gb not set"


def reference_snapshot_bytes(plan, layout: Layout, reference_free: bool = False) -> int:
    """Bytes one worker holds for DPO's reference policy (``omni_ray.train.reference``): a copy of the
    fully trained parameters' initial values, as the module stores them (FSDP2: fp32, sharded;
    DeepSpeed: the compute dtype, sharded under ZeRO-3). LoRA adapters (disabled for the reference)
    and frozen parameters (shared) cost nothing; a reference-free loss (simpo) keeps nothing. The
    reference forward stashes the current values for its duration (the same size again), while no
    activations are held; that transient is below the step's peak and is not added."""
    if reference_free:
        return 0
    full = sum(p.numel for p in plan.params if p.mode == "full")
    itemsize = layout.compute_dtype.itemsize if layout.engine == "deepspeed" else MASTER_BYTES
    return full * itemsize // (layout.world if layout.shard_weights else 1)


def fits_warning(estimate: MemoryEstimate, limit: int | None, source: str) -> str | None:
    """A warning line when the estimate is above the device's memory, else None."""
    if limit is None or estimate.total <= limit:
        return None
    return (f"memory: the estimate {estimate.total / GiB:.1f} GiB per worker is above {limit / GiB:.1f} GiB "
            f"({source}); enable train.gradient_checkpointing, freeze more, use more workers, "
            f"or lower train.micro_batch_size / data.model_max_length")


__all__ = ["Layout", "LiveTensorBytes", "MemoryEstimate", "device_memory_bytes", "estimate_memory",
           "fits_warning", "layout_of", "loss_bytes", "memory_report", "reference_snapshot_bytes",
           "run_estimate", "unsharded_numels"]
