"""FSDP2: ``fully_shard`` on every repeated layer, then on the root; a torch AdamW.

Frozen and trainable parameters may share a layer: FSDP2 shards per parameter, and only the
trainable ones are handed to the optimizer, so frozen weights get neither gradients nor state.

Storage dtypes. Trained parameters are held in fp32 (the optimizer's master weights, its state
and the reduced gradients are fp32); frozen ones in ``train.frozen_storage`` (bf16 under bf16
precision: half the bytes, and the values the forward computes with anyway). FSDP2 requires one
original dtype per ``fully_shard`` group only among the parameters that require gradients
(``FSDPParamGroup._init_mp_dtypes``), so frozen bf16 and trained fp32 tensors may share a layer:
``MixedPrecisionPolicy(param_dtype=...)`` casts the fp32 ones at all-gather and leaves the frozen
ones, already in the compute dtype, as they are (an all-gather of one dtype).
"""

from __future__ import annotations

import math

import torch

from omni_ray.config import StrategyConfig, TrainConfig
from omni_ray.models.spec import ModelSpec
from omni_ray.strategies.base import StepStats, Strategy, make_scheduler

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cast_storage(model, frozen_dtype: torch.dtype) -> None:
    """Trained parameters to fp32 (master weights), frozen floating ones to ``frozen_dtype``; buffers
    (rotary frequencies) and integer (quantized) parameters keep their dtype."""
    for param in model.parameters():
        want = torch.float32 if param.requires_grad else frozen_dtype
        # QLoRA's 4-bit weights may be stored in a float dtype (bnb_4bit_quant_storage): never cast them.
        if param.is_floating_point() and param.dtype != want and type(param).__name__ != "Params4bit":
            param.data = param.data.to(want)


class FSDPStrategy(Strategy):
    name = "fsdp"
    supports_sharded_checkpoint = True
    sharded_layout = "sharded"  # DCP

    def __init__(self, cfg: StrategyConfig, train: TrainConfig, device: torch.device):
        self.cfg, self.train, self.device = cfg, train, device
        self.scaler = None
        self.optimizer_params: list = []
        self.skipped_total = 0

    def wrap(self, model, spec: ModelSpec):
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        precision = self.train.precision
        mp = MixedPrecisionPolicy(param_dtype=DTYPES[precision], reduce_dtype=torch.float32)
        kwargs = {"mp_policy": mp, "reshard_after_forward": self.cfg.reshard_after_forward}
        if self.cfg.offload_params:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        # Cast before the move: the device never holds frozen weights at their loaded (wider) dtype.
        cast_storage(model, DTYPES[self.train.frozen_storage])
        model.to(self.device)
        layers = [m for m in model.modules() if type(m).__name__ in spec.layer_classes]
        if not layers:
            raise RuntimeError(f"{spec.name}: no module of classes {spec.layer_classes} found to shard")
        for layer in layers:
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        # generate() calls the inner model's forward, not the root's: without this the root's own
        # parameters (embeddings, lm_head, norms) would stay sharded during generation.
        register_fsdp_forward_method(model, "generate")
        self.model = model
        if precision == "fp16":
            # fp16 has too little range for raw gradients: scale the loss, skip steps that overflow.
            from torch.amp import GradScaler

            self.scaler = GradScaler(self.device.type)
        return model

    def setup_optimizer(self, param_groups: list[dict], total_steps: int) -> None:
        groups = [{k: v for k, v in g.items() if k not in ("names", "group")} for g in param_groups]
        self.optimizer = torch.optim.AdamW(groups, lr=self.train.lr, weight_decay=self.train.weight_decay, betas=self.train.betas,
                                           foreach=self.device.type != "cpu")
        self.scheduler = make_scheduler(self.optimizer, self.train, total_steps)
        self.optimizer_params = [p for g in groups for p in g["params"]]

    def forward(self, batch: dict):
        return self.model(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> StepStats:
        """Clip, step, advance the schedule; a step whose gradients are not finite is skipped.

        The gradient norm is global (all ranks), so every rank makes the same decision. Under fp16
        the scaler skips an overflowed step and lowers its scale; otherwise a NaN/inf norm (a
        diverged loss) skips the update here. As in DeepSpeed, a skipped step leaves the weights,
        the optimizer state and the schedule as they were.
        """
        params = self.optimizer_params
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.train.max_grad_norm or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if self.scaler:
            before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = self.scaler.get_scale() < before
        else:
            skipped = not math.isfinite(norm)
            if not skipped:
                self.optimizer.step()
        if not skipped:
            self.scheduler.step()
        self.skipped_total += int(skipped)
        return StepStats(norm, skipped, self.skipped_total)

    def local_trained_tensors(self) -> list[torch.Tensor]:
        return [p.to_local() if hasattr(p, "to_local") else p for p in self.optimizer_params]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def gather(self, rank: int, trainable_only: bool = True) -> dict[str, torch.Tensor]:
        """Full (unsharded) tensors on rank 0, by parameter name. Collective: all ranks call it."""
        out = {}
        for name, param in self.model.named_parameters():
            if param.requires_grad or not trainable_only:
                full = param.full_tensor() if hasattr(param, "full_tensor") else param.data
                if rank == 0:
                    out[name] = full.detach().to("cpu").clone()
        return out

    def load_trainable(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy full tensors into this rank's shards of the trainable parameters."""
        from torch.distributed.tensor import distribute_tensor

        for name, param in self.model.named_parameters():
            if name in tensors:
                value = tensors[name].to(param.dtype)
                if hasattr(param, "device_mesh"):
                    value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
                    param.data.to_local().copy_(value.to_local())
                else:
                    param.data.copy_(value)

    def save_sharded(self, path: str, trainable_only: bool = False) -> None:
        """Every rank writes its shards of the model and optimizer (DCP; rank-unique file names).

        Only whole-model checkpoints take this path (``shards_trainable_only`` is False)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)

    def load_sharded(self, path: str) -> None:
        """Read a DCP checkpoint into this rank's shards; DCP reshards across world sizes."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def save_state(self, rank: int, include_optimizer: bool = True) -> dict | None:
        """Optimizer (full, keyed by parameter name: loads onto any world size) and scheduler. Collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optim = get_optimizer_state_dict(self.model, self.optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True)
                                         ) if include_optimizer else None
        state = {"optimizer": optim, "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler else None, "skipped_total": self.skipped_total}
        return state if rank == 0 else None

    def load_state(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if state.get("optimizer") is not None:  # a sharded checkpoint restored it with the model
            set_optimizer_state_dict(self.model, self.optimizer, optim_state_dict=state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.skipped_total = int(state.get("skipped_total", 0))

    def optimizer_state(self) -> dict:
        return self.optimizer.state

    def current_lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def unwrapped(self):
        return self.model

