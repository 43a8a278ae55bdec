"""DeepSpeed ZeRO-2/3 behind the same seam as FSDP2; the DeepSpeed config is generated, never a file.

What happens where:

    wrap             move to the device; under bf16/fp16 cast the parameters (not the buffers) to
                     the compute dtype, as DeepSpeed's engine would; under ZeRO-3 partition them
                     now with ``deepspeed.zero.Init(module=...)``, so the model the loop holds is
                     already in its training layout (the loop fingerprints the frozen weights
                     right after ``wrap``; ``freeze.frozen_fingerprint`` reads ZeRO-3 partitions)
    setup_optimizer  a torch AdamW over the trainable parameters only, the LR schedule, and
                     ``deepspeed.initialize``: the engine exists from here on
    backward/step    ``engine.backward`` / ``engine.step``; gradient norm, clipping and fp16 loss
                     scaling are DeepSpeed's

Gradient accumulation. The loop accumulates by itself: ``backward`` once per micro-batch, ``step``
once per optimizer step, and it already divides the loss by the label tokens of the whole
optimizer step. DeepSpeed's own accumulation counts micro-steps in ``engine.step()`` and divides
the loss by ``gradient_accumulation_steps`` in ``engine.backward``. The generated config sets
``gradient_accumulation_steps: 1`` (so ``engine.backward`` divides by 1, i.e. not at all) and
``managed_gradient_accumulation: false`` (DeepSpeed >= 0.19): every ``engine.step()`` is then the
accumulation boundary, whatever number of ``engine.backward`` calls came before it. Under ZeRO-2/3
each backward reduces its gradients into this rank's partition, where they add up, and ``step``
finalises and updates. With the default (managed) mode and GAS 1 every backward would be a
boundary, and ``engine.step()`` after several backwards would be wrong for grad_accum > 1.

Precision. ``train.precision`` picks DeepSpeed's ``bf16`` / ``fp16`` section (fp16 with dynamic
loss scaling; a step whose gradients overflow is skipped and counted). Module parameters are held
in 16 bits, the optimizer keeps fp32 master weights of the trainable ones (its partition of them),
and gradients are reduced in fp32 (``communication_data_type``), like FSDP2's
``reduce_dtype=float32``. Checkpoints take trainable tensors from the fp32 masters
(``deepspeed.utils.safe_get_full_fp32_param``); frozen ones, when written at all
(``checkpoint.trainable_only: false``), are the 16-bit values the model computed with. So frozen
weights are stored in the precision's dtype (``train.frozen_dtype: auto``); fp32 frozen weights
beside 16-bit compute are FSDP2's alone (``deepspeed_config`` says so).

fp16 on CPU. DeepSpeed's CPU accelerator reports fp16 as supported when oneDNN has fp16 kernels
for this CPU (``torch.ops.mkldnn._is_mkldnn_fp16_supported()``, AVX512-FP16 / AMX-FP16); elsewhere
the engine cannot run fp16, and this strategy raises a ``ConfigError`` naming ``train.precision``
before building anything. On GPUs fp16 works as usual.

Offloading. ``strategy.offload_optimizer`` (ZeRO-Offload) keeps the optimizer state and step on
the CPU, which DeepSpeed runs with its ``DeepSpeedCPUAdam`` (a C++ op). Unless DeepSpeed was
installed with it prebuilt (``DS_BUILD_CPU_ADAM=1``), the op is compiled on first use, on GPU and
CPU hosts alike: it needs a C++ compiler, ``ninja`` and the Python headers, and takes a minute or
more. If it cannot be built the error says so and how to fix it. ``strategy.offload_params``
(ZeRO-3 only) also keeps the partitioned parameters in CPU memory. On a CPU-only host offloading
changes nothing useful (everything is in CPU memory already) but still works.

Checkpoints and resume. Checkpoints are sharded (``save_sharded``/``load_sharded``, layout
``zero-sharded``): every rank writes the fp32 masters and Adam moments of the parameter slices it
owns into its own safetensors file, keyed by parameter name and offset (``zero_state.local_shard``),
so no rank ever holds more than its own partitions (gathering them would cost rank 0 twelve bytes
per trained parameter: about 96 GB of host memory for an 8B full tune). ``load_sharded`` reassembles
the ranges this rank owns from all ranks' files, whatever world size or ZeRO stage wrote them.
``gather`` (full tensors by name) and ``save_state`` (the Adam moments as full fp32 tensors by
name, in the layout of FSDP2's full optimizer state dict) remain for the gathered layout and the
tests; ``load_trainable``/``load_state`` also read FSDP2's gathered checkpoints. All loading runs
after ``setup_optimizer``, on every rank (``tests/dist/test_deepspeed_resume.py``).

CPU hosts. On its CPU accelerator DeepSpeed would compile a shared-memory all-reduce op when it
first sets up communication (minutes on a small machine); training does not use it (gloo does
the collectives), so the strategy marks it unavailable first (``skip_cpu_shm_comm_build``).

The freeze audit. Under ZeRO the torch optimizer holds flat partitions, not the parameters;
``optimizer_state()`` translates them back (``zero_state.local_state``: each parameter's
fragment of the Adam state on this rank), and ``optimizer_params`` lists the parameters
DeepSpeed's ZeRO optimizer actually manages (its fp16/bit16 groups, read back from the engine
after ``initialize``). A frozen parameter in either, or with a ``.grad``, fails the audit.
Frozen parameters are never handed to the optimizer (``freeze.param_groups`` skips them, and
``setup_optimizer`` checks it), so ZeRO allocates neither fp32 master copies, gradient
partitions nor Adam state for them. The translation to and from full per-name tensors for
checkpoints lives in ``omni_ray.strategies.zero_state``.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.distributed as dist

from omni_ray.config import ConfigError, StrategyConfig, TrainConfig
from omni_ray.models.spec import ModelSpec
from omni_ray.strategies import zero_state
from omni_ray.strategies.base import StepStats, Strategy, make_scheduler

log = logging.getLogger(__name__)

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}

# fp16 dynamic loss scaling: start at 2**16, halve on overflow (after `hysteresis` overflows),
# double after `loss_scale_window` clean steps, never below `min_loss_scale`.
FP16_LOSS_SCALING = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                     "min_loss_scale": 1}


def deep_merge(base: dict, extra: dict) -> dict:
    """``extra`` over ``base``: nested dicts merge key by key, anything else replaces (new dict)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def deepspeed_config(strategy: StrategyConfig, train: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed config for these settings (pure: no process group, no DeepSpeed import)."""
    stage = strategy.zero_stage
    if train.precision in HALF and train.frozen_storage != train.precision:
        # DeepSpeed's bf16/fp16 engine holds every module parameter in 16 bits (trained ones get fp32
        # masters in the optimizer): fp32 frozen weights would meet 16-bit activations.
        raise ConfigError(f"train.frozen_dtype: DeepSpeed holds all weights in train.precision ({train.precision}) "
                          f"and cannot keep frozen ones in {train.frozen_storage}; set train.frozen_dtype: auto, or "
                          "strategy.name: fsdp")
    if strategy.offload_params and stage != 3:
        raise ConfigError(f"strategy.offload_params: ZeRO-{stage} keeps full parameters on every rank and cannot "
                          "offload them; set strategy.zero_stage: 3, or offload_params: false")
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        # Keep torch's own F.linear: DeepSpeed's memory-efficient replacement is patched into
        # torch.nn.functional for the whole process and computes in a different order.
        zero["memory_efficient_linear"] = False
        if train.objective == "dpo":
            # The DPO reference swaps trained values into each partition (train.reference): a parameter
            # kept gathered between forwards would be read without them.
            zero["stage3_param_persistence_threshold"] = 0
    if strategy.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if strategy.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    precision = train.precision
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        # The loop accumulates (see the module docstring): DeepSpeed steps on every engine.step().
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": float(train.max_grad_norm or 0.0),
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", **(FP16_LOSS_SCALING if precision == "fp16" else {})},
        "steps_per_print": 1 << 30,  # the loop prints its own progress
        "wall_clock_breakdown": False,
    }
    if precision in HALF:
        config["communication_data_type"] = "fp32"  # reduce gradients in fp32, as FSDP2 does
    return deep_merge(config, strategy.deepspeed_extra)


def check_precision_supported(precision: str, device: torch.device) -> None:
    """fp16 needs an accelerator that runs it; DeepSpeed's CPU accelerator often does not."""
    if precision != "fp16" or device.type != "cpu":
        return
    from deepspeed.accelerator import get_accelerator

    if not get_accelerator().is_fp16_supported():
        raise ConfigError("train.precision: fp16 with DeepSpeed on CPU needs fp16 oneDNN kernels, which this CPU "
                          "lacks (DeepSpeed's CPU accelerator reports fp16 unsupported); use train.precision: bf16 "
                          "or fp32, or train on GPUs")


def skip_cpu_shm_comm_build() -> None:
    """Do not compile DeepSpeed's shared-memory all-reduce op on CPU hosts.

    On its CPU accelerator DeepSpeed compiles a C++ op (``deepspeed_shm_comm``) the first time
    it sets up communication: minutes on a small machine, before the first step. The op only
    serves ``inference_all_reduce`` (tensor-parallel inference); ZeRO training communicates
    through torch.distributed (gloo). DeepSpeed keeps its op-compatibility table in one dict
    that it reads when the backend is created, so marking the op incompatible skips the build.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_cpu_adam(groups: list[dict], train: TrainConfig):
    """DeepSpeed's CPU Adam (AdamW mode) for ZeRO-Offload; builds its C++ op if it is not prebuilt."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=train.lr, weight_decay=train.weight_decay, betas=train.betas,
                                adamw_mode=True)
    except Exception as err:  # the JIT build raises all sorts (RuntimeError, CalledProcessError, ImportError)
        raise RuntimeError(
            "strategy.offload_optimizer: ZeRO-Offload runs the optimizer with DeepSpeed's DeepSpeedCPUAdam, whose C++ "
            f"op could not be built or loaded here ({type(err).__name__}: {err}). Install deepspeed with the op "
            "prebuilt (DS_BUILD_CPU_ADAM=1 pip install deepspeed), or provide a C++ compiler, ninja and the Python "
            "headers for the build on first use, or set strategy.offload_optimizer: false"
        ) from err


def _plain_attrs(obj) -> dict:
    return {k: v for k, v in vars(obj).items() if isinstance(v, (bool, int, float))}


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"
    supports_sharded_checkpoint = True
    sharded_layout = "zero-sharded"
    shards_trainable_only = True

    def __init__(self, cfg: StrategyConfig, train: TrainConfig, device: torch.device):
        self.cfg, self.train, self.device = cfg, train, torch.device(device)
        self.ds_config = deepspeed_config(cfg, train)  # config errors before anything is built
        check_precision_supported(train.precision, self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        else:
            skip_cpu_shm_comm_build()
        self.engine = None
        self.optimizer_params: list = []
        self.skipped_total = 0

    @property
    def stage(self) -> int:
        return int(self.ds_config["zero_optimization"]["stage"])

    @property
    def half_dtype(self) -> torch.dtype | None:
        if self.ds_config.get("bf16", {}).get("enabled"):
            return torch.bfloat16
        if self.ds_config.get("fp16", {}).get("enabled"):
            return torch.float16
        return None

    def wrap(self, model, spec: ModelSpec):
        """Put the model in its training layout; the engine itself is built in ``setup_optimizer``."""
        model.to(self.device)
        dtype = self.half_dtype
        if dtype is not None:  # what the engine would do: parameters to 16 bits, buffers (rotary) kept
            for param in model.parameters():
                if param.is_floating_point() and param.dtype != dtype:
                    param.data = param.data.to(dtype)
        if self.stage == 3:
            import deepspeed

            self._mark_zero3_leaves(model, spec)
            deepspeed.zero.Init(module=model, config_dict_or_path=self.ds_config, dtype=dtype or torch.float32)
        self.model = model
        return model

    def _mark_zero3_leaves(self, model, spec: ModelSpec) -> None:
        """``ModelSpec.zero3_leaf_modules`` as ZeRO-3 leaves (read when ``deepspeed.initialize`` hooks them).

        On a CPU device only leaves with no trained parameter: DeepSpeed's ZeRO-3 ``zero_grad`` calls
        ``record_stream`` on a leaf's gradients, which CPU tensors refuse (DeepSpeed 0.18 with its CPU
        accelerator). A trained one there is left unmarked, with a warning that ranks with different
        image counts can hang.
        """
        from deepspeed.utils import set_z3_leaf_modules

        found = [m for m in model.modules() if type(m).__name__ in spec.zero3_leaf_modules]
        trained = {type(m).__name__ for m in found if any(p.requires_grad for p in m.parameters())}
        if self.device.type != "cuda" and trained:
            log.warning("ZeRO-3 on CPU with %s trained: not marked as a ZeRO-3 leaf (DeepSpeed's CPU path cannot), "
                        "so ranks whose batches hold different image counts can hang; freeze it, use FSDP2, or GPUs",
                        ", ".join(sorted(trained)))
            found = [m for m in found if type(m).__name__ not in trained]
        classes = sorted({type(m) for m in found}, key=lambda cls: cls.__name__)
        if classes:
            set_z3_leaf_modules(model, classes)

    def setup_optimizer(self, param_groups: list[dict], total_steps: int) -> None:
        import deepspeed

        groups = [{k: v for k, v in g.items() if k not in ("names", "group")} for g in param_groups]
        self._group_names = [list(g.get("names", [])) for g in param_groups if g["params"]]
        groups = [g for g in groups if g["params"]]
        frozen = [n for g in param_groups for n, p in zip(g.get("names", []), g["params"]) if not p.requires_grad]
        if frozen:
            raise RuntimeError(f"parameters {frozen[:3]} are frozen but were handed to the optimizer")
        if self.cfg.offload_optimizer:
            optimizer = build_cpu_adam(groups, self.train)
        else:
            optimizer = torch.optim.AdamW(groups, lr=self.train.lr, weight_decay=self.train.weight_decay, betas=self.train.betas,
                                          foreach=self.device.type != "cpu")
        # The schedule drives the torch optimizer's param_groups; ZeRO's optimizer reads its lr from them.
        self.scheduler = make_scheduler(optimizer, self.train, total_steps)
        self.torch_optimizer = optimizer  # ZeRO steps it on flat fp32 partitions, one per group
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=self.scheduler, config=self.ds_config)
        self.optimizer_params = self._managed_params(groups)

    def _managed_params(self, groups: list[dict]) -> list:
        """The parameters ZeRO keeps fp32 masters, gradients and optimizer state for."""
        zero = self.engine.optimizer
        for attr in ("fp16_groups", "bit16_groups"):  # ZeRO-3, ZeRO-1/2
            managed = getattr(zero, attr, None)
            if managed:
                return [p for group in managed for p in group]
        return [p for g in groups for p in g["params"]]

    def storage_dtype(self, param) -> torch.dtype:
        """Trained: the dtype of ZeRO's flat master partitions (the tensors the torch optimizer steps);
        the module's own copy is only the compute copy. Frozen: the module's tensor."""
        if param.requires_grad:
            return zero_state.flat_partitions(self.engine.optimizer)[0].dtype
        return param.dtype

    def _cast(self, batch: dict) -> dict:
        dtype = self.half_dtype
        if dtype is not None:  # floating inputs (pixel values) in the compute dtype, as FSDP2's policy does
            batch = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
        return batch

    def forward(self, batch: dict):
        return self.engine(**self._cast(batch))

    def generate(self, batch: dict, **kwargs):
        # ZeRO-3 gathers each submodule's parameters in its own forward hooks, so the module's
        # generate() (which never calls the engine) still sees whole weights, as HF Trainer uses it.
        return self.unwrapped().generate(**self._cast(batch), **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        # The loop has normalised the loss for the whole optimizer step; GAS is 1, so no rescaling.
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> StepStats:
        """One optimizer step (DeepSpeed clips; fp16 overflow skips it)."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        skipped = not self.engine.was_step_applied()
        self.skipped_total += int(skipped)
        return StepStats(norm, skipped, self.skipped_total)

    def local_trained_tensors(self) -> list[torch.Tensor]:
        """ZeRO's flat fp32 master partitions on this rank (what the torch optimizer steps)."""
        return [p for group in self.torch_optimizer.param_groups for p in group["params"]]

    def zero_grad(self) -> None:
        pass  # the engine zeroes gradients in step(); module .grad stays None under ZeRO-2/3

    def _named_params(self):
        return list(self.engine.module.named_parameters())

    def gather(self, rank: int, trainable_only: bool = True) -> dict[str, torch.Tensor]:
        """Full tensors on rank 0, by name in ``engine.module``. Collective: all ranks call it.

        Trainable tensors come from the optimizer's fp32 masters; frozen ones from the module
        (under ZeRO-3 gathered with ``deepspeed.zero.GatheredParameters``).
        """
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, param in self._named_params():
            if not (param.requires_grad or not trainable_only):
                continue
            full = safe_get_full_fp32_param(param) if param.requires_grad else None
            if full is None:
                full = self._gathered(param)
            if rank == 0:
                out[name] = full.detach().to("cpu").clone()
        return out

    def _gathered(self, param) -> torch.Tensor:
        if not hasattr(param, "ds_id"):
            return param.data
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            return param.data.detach().clone()

    def load_trainable(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy full tensors into the trainable parameters: fp32 masters and the module's copy.

        Call it after ``setup_optimizer`` (the masters exist from then on), on every rank.
        """
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param

        for name, param in self._named_params():
            if name not in tensors:
                continue
            value = tensors[name].to(self.device)
            if param.requires_grad:
                safe_set_full_fp32_param(param, value.float())
            if hasattr(param, "ds_id"):
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    if dist.get_rank() == 0:
                        param.data.copy_(value.to(param.dtype))
            else:
                param.data.copy_(value.to(param.dtype))

    def save_state(self, rank: int, include_optimizer: bool = True) -> dict | None:
        """Optimizer state by parameter name, full fp32 tensors (loads onto any world size, and has the
        layout of FSDP2's full optimizer state dict), scheduler, fp16 loss scaler. Collective."""
        optimizer = None
        # Hyperparameters and parameter names per group: what a full optimizer state dict needs beside
        # the moments, so a sharded checkpoint can also be resumed by FSDP2 (checkpoint.load converts).
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": names}
                  for g, names in zip(self.torch_optimizer.param_groups, self._group_names)]
        if include_optimizer:
            self._ensure_state()
            per_param = zero_state.full_state_by_name(self._named_params(), rank, zero_state.adam_step(self.torch_optimizer))
            optimizer = {"state": per_param, "param_groups": groups}
        if rank != 0:
            return None
        scaler = getattr(self.engine.optimizer, "loss_scaler", None) if self.half_dtype == torch.float16 else None
        return {"optimizer": optimizer, "optimizer_groups": groups, "scheduler": self.scheduler.state_dict(),
                "ds_loss_scaler": _plain_attrs(scaler) if scaler is not None else None,
                "skipped_total": self.skipped_total}

    def load_state(self, state: dict) -> None:
        """Restore what ``save_state`` wrote (or FSDP2's full optimizer state). Every rank, after
        ``setup_optimizer``; local (each rank copies its partitions out of the full tensors)."""
        if state.get("optimizer") is not None:
            self._ensure_state()
            zero_state.load_full_state(self._named_params(), state["optimizer"]["state"], self.torch_optimizer,
                                       self.device)
        self.scheduler.load_state_dict(state["scheduler"])
        # LambdaLR.load_state_dict restores its counters, not the groups' lr: set the lr of the next step.
        for group, lr in zip(self.torch_optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        scaler = getattr(self.engine.optimizer, "loss_scaler", None)
        if scaler is not None and state.get("ds_loss_scaler"):
            for key, value in state["ds_loss_scaler"].items():
                setattr(scaler, key, value)
        self.skipped_total = int(state.get("skipped_total", 0))

    def save_sharded(self, path: str, trainable_only: bool = True) -> None:
        """This rank's fragments of the trained parameters (fp32 master, Adam moments), and of the
        frozen ones unless ``trainable_only``, into its own file in ``path``: nothing is gathered,
        so no rank holds more than its own partitions (``zero_state.local_shard``). Local, but
        every rank must call it."""
        self._ensure_state()
        zero_state.save_local_shard(path, self._named_params(), self.torch_optimizer, trainable_only)

    def load_sharded(self, path: str) -> None:
        """Fill this rank's partitions from every rank's file in ``path``, written on any world size
        or ZeRO stage; the schedule and loss scaler follow with ``load_state``. Local."""
        self._ensure_state()
        zero_state.load_shards(self._named_params(), zero_state.ShardReader.from_dir(path), self.torch_optimizer)

    def _ensure_state(self) -> None:
        zero_state.ensure_state(self.torch_optimizer, self.engine.optimizer, int_step=self.cfg.offload_optimizer)

    def optimizer_state(self) -> dict:
        """Parameter -> this rank's fragment of its Adam state (ZeRO keeps it per flat partition)."""
        if not self.torch_optimizer.state:  # torch's Adam creates state at the first step
            return {}
        self._ensure_state()  # links every group's per-parameter fragments, not only the first's
        return zero_state.local_state(self.optimizer_params)

    def current_lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def unwrapped(self):
        return self.engine.module if self.engine is not None else self.model

