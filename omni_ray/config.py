"""The run configuration: one YAML file, typed and checked once when it is loaded.

Every section is a pydantic model that forbids unknown keys, so a typo is an error that names
the key instead of a setting that silently does nothing. Functions below the loader take the
section they need (``FreezeConfig``, ``StrategyConfig`` ...), never the whole ``Config``.

MiniCPM-V's own finetune flags (``tune_vision``, ``tune_llm``, ``use_lora``, ``lora_*``,
``model_max_length``, ``max_slice_nums``) are accepted at the top level and mapped onto the
sections, so its users can bring their scripts' settings unchanged.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from omni_ray.errors import UserError
from omni_ray.storage import StorageConfig, url_credentials_error

Mode = Literal["frozen", "full", "lora"]
GROUPS = ("vision", "projector", "llm", "embeddings", "lm_head")


class ConfigError(UserError, ValueError):
    """A configuration problem, phrased as ``key: what is wrong; how to fix it``."""


def _strings(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


class Section(BaseModel):
    """Base of every config section: unknown keys, wrong types and non-finite numbers are errors.

    ``strict``: YAML 1.1 reads ``yes``/``on`` as booleans and pydantic's lax mode would turn
    ``micro_batch_size: yes`` into 1 and ``use_gpu: "no"`` into False; strict types make each
    of those an error naming the key. ``allow_inf_nan=False``: ``lr: .inf`` is a typo, not a rate.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _no_url_credentials(cls, value: Any) -> Any:
        for text in _strings(value):
            problem = url_credentials_error(text)
            if problem:
                raise ValueError(problem)
        return value


class ModelConfig(Section):
    path: str = Field(description="Local directory or s3:// prefix of a Hugging Face checkpoint.")
    arch: str | None = Field(
        None, description="Spec name (see `omni-ray validate --list-archs`); default: from config.json model_type."
    )
    trust_remote_code: bool = Field(
        False, description="Allow the checkpoint's own Python code (MiniCPM-V 2.x, MiniCPM-o). Off by default."
    )
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "float32", description="dtype the weights are loaded in; training precision is train.precision, storage "
        "while training train.frozen_dtype (frozen) and fp32 (trained)."
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = "sdpa"
    max_slice_nums: int | None = Field(
        None, ge=1, description="Most slices one image is cut into (MiniCPM-V); more slices, more image tokens."
    )
    processor: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments for the image processor (e.g. scale_resolution)."
    )


class GroupFreeze(Section):
    mode: Mode
    last_n_layers: int | None = Field(
        None, ge=1, description="Apply `mode` only to the group's last N layers; the rest of the group is frozen."
    )


class Override(Section):
    pattern: str = Field(description="Regular expression searched in parameter names (base model names).")
    mode: Literal["frozen", "full"]

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"not a valid regular expression ({err}); escape dots as '\\.'") from None
        return value


def _as_group(value: Any) -> Any:
    return {"mode": value} if isinstance(value, str) else value


class FreezeConfig(Section):
    """What trains, per module group. Overrides are applied last, in order."""

    vision: GroupFreeze = GroupFreeze(mode="frozen")
    projector: GroupFreeze = GroupFreeze(mode="full")
    llm: GroupFreeze = GroupFreeze(mode="lora")
    embeddings: GroupFreeze = GroupFreeze(mode="frozen")
    lm_head: GroupFreeze = GroupFreeze(mode="frozen")
    overrides: list[Override] = Field(default_factory=list)
    lr: dict[str, float] = Field(
        default_factory=dict, description="Per-group learning rate; groups not named use train.lr."
    )

    @field_validator(*GROUPS, mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:  # `llm: lora` means `llm: {mode: lora}`
        return _as_group(value)

    @field_validator("lr")
    @classmethod
    def _known_groups(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(GROUPS))
        if unknown:
            raise ValueError(f"unknown group(s) {unknown}; use one of {list(GROUPS)}")
        return value

    def group(self, name: str) -> GroupFreeze:
        return getattr(self, name)


class LoraConfig(Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | str | None = Field(
        None,
        description="Module names (suffixes like q_proj) or one regex over full module names; "
        "default: the architecture's targets.",
    )
    bias: Literal["none", "all", "lora_only"] = Field(
        "none", description="Biases that train beside the adapters (peft's meaning): none, all of the model's, "
        "or those of the adapted modules."
    )
    dora: bool = False
    rslora: bool = False
    qlora: bool = Field(
        False, description="Hold the frozen base in 4-bit NF4 (bitsandbytes; CUDA GPUs only) under the adapters."
    )
    per_group: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="Rank/alpha per group, e.g. {vision: {r: 8, alpha: 16}}."
    )

    @field_validator("per_group")
    @classmethod
    def _per_group_keys(cls, value: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        for group, settings in value.items():
            if group not in GROUPS:
                raise ValueError(f"unknown group {group!r}; use one of {list(GROUPS)}")
            extra = sorted(set(settings) - {"r", "alpha"})
            if extra:
                raise ValueError(f"{group}: unknown key(s) {extra}; only r and alpha can be set per group")
        return value


# Annotation files we read; anything else named as data.train is a mistake we can name early.
ANNOTATION_SUFFIXES = (".json", ".jsonl")
_OTHER_DATA_SUFFIXES = (".csv", ".tsv", ".txt", ".arrow", ".xlsx", ".yaml", ".yml", ".zip")
#: What data.train accepts, for the errors that name it (omni_ray.data.sources reads each).
DATA_FORMS_HELP = ("a .json file (a list of records), .jsonl (one record per line), hub .parquet, WebDataset "
                   ".tar shards, a folder, s3:// prefix or glob of those, or a prepared prefix (manifest.json)")


def _check_source(value: str) -> str:
    """Cheap checks on one data.train path; existence, form and layout are omni_ray.data.sources'."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a non-empty path, s3:// URI or prefix")
    if value.lower().endswith(_OTHER_DATA_SUFFIXES):
        raise ValueError(f"{value!r} is not a data form omni_ray reads; give {DATA_FORMS_HELP}")
    return value


class ColumnsConfig(Section):
    """Which Parquet columns hold a layout no preset knows (see README, Data forms)."""

    conversation: str = Field(description="Column holding the list of turns (each a struct/object).")
    images: str | None = Field(
        None, description="Column holding the image(s): {bytes, path} structs, a list of them, or paths. "
        "Default: the datasets Image() columns found in the file's schema."
    )
    id: str | None = Field(None, description="Column holding the sample id (reports only).")
    role_key: str = Field("role", description="Key of a turn's role.")
    content_key: str = Field("content", description="Key of a turn's text.")
    user: str = Field("user", description="The role name of user turns in this file.")
    assistant: str = Field("assistant", description="The role name of assistant turns in this file.")
    system: str = Field("system", description="The role name of system turns in this file.")


_SHORTHAND = re.compile(r"(.+)#([0-9]+)")  # ms-swift's `path#N`: N samples of path per epoch
_ENTRY_KEYS = ("path", "weight", "samples", "name", "columns")


class SourceEntry(Section):
    """One source of a ``data.train`` mixture (see ``omni_ray.data.mixture`` for the exact meaning)."""

    path: str | list[str] = Field(description="The source: any form data.train takes (a list: one source read in order).")
    weight: float | None = Field(None, description="Relative sampling ratio among the weighted sources (default 1).")
    samples: int | None = Field(None, description="Rows of this source per epoch, repeated or subsampled to fit.")
    name: str | None = Field(None, description="What reports call the source; default: its path.")
    columns: ColumnsConfig | None = Field(None, description="data.columns for this source only.")

    def label(self) -> str:
        return self.name or (self.path if isinstance(self.path, str) else " + ".join(self.path))


def _entry(item: Any, index: int) -> SourceEntry:
    """One mixture item as a SourceEntry; every mistake names the entry by index and path."""
    if isinstance(item, str):
        item = {"path": item}
    if not isinstance(item, dict):
        raise ValueError(f"[{index}]: {item!r} is not a path or a {{path: ..., weight: ...}} entry; write a path, "
                         "`{path: P, weight: W}` or `{path: P, samples: N}`")
    where = f"[{index}] ({item.get('path')})"
    unknown = sorted(set(item) - set(_ENTRY_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; an entry takes {', '.join(_ENTRY_KEYS)}")
    path = item.get("path")
    if isinstance(path, str) and (match := _SHORTHAND.fullmatch(path.strip())):
        if "samples" in item or "weight" in item:
            raise ValueError(f"{where}: `path#N` already gives samples; drop the #N or the samples/weight key")
        item = {**item, "path": match.group(1), "samples": int(match.group(2))}
    paths = path if isinstance(path, list) else [item.get("path")]
    if not paths or not all(isinstance(p, str) for p in paths):
        raise ValueError(f"{where}: path must be a path or a list of paths; add `path: ...` to the entry")
    for p in paths:
        try:
            _check_source(p)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
    weight, samples = item.get("weight"), item.get("samples")
    if weight is not None and samples is not None:
        raise ValueError(f"{where}: both weight and samples; give one (weight: a ratio among weighted sources, "
                         "samples: rows per epoch)")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))
                               or not math.isfinite(weight) or weight <= 0):
        raise ValueError(f"{where}: weight must be a number > 0, got {weight!r}; give a ratio such as 1 or 2, or "
                         "remove the entry")
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples <= 0):
        raise ValueError(f"{where}: samples must be a whole number > 0, got {samples!r}; give rows per epoch, or "
                         "remove the entry")
    return SourceEntry.model_validate({**item, "weight": None if weight is None else float(weight)})


def parse_train(value: Any) -> Any:
    """``data.train`` as given -> a path, a plain list of paths (one dataset), or mixture entries.

    A list is a mixture as soon as one item is an entry (a mapping) or ``path#N``; its plain
    path items are then sources of weight 1. A single entry or ``path#N`` is a mixture of one.
    """
    if isinstance(value, SourceEntry) or (isinstance(value, list) and any(isinstance(v, SourceEntry) for v in value)):
        return value
    if isinstance(value, dict) or (isinstance(value, str) and _SHORTHAND.fullmatch(value.strip())):
        value = [value]
    if not isinstance(value, list):
        return value
    if not any(isinstance(v, dict) or (isinstance(v, str) and _SHORTHAND.fullmatch(v.strip())) for v in value):
        return value
    entries = [_entry(item, i) for i, item in enumerate(value)]
    names = [e.label() for e in entries]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"two entries are both called {twice[0]!r}; give them distinct `name:`s (reports count "
                         "samples per source by name)")
    return entries


class DataConfig(Section):
    train: str | list[str] | list[SourceEntry] = Field(
        description="Prepared shard prefix (manifest.json), JSON/JSONL annotation files, hub Parquet or WebDataset "
        ".tar shards, each a file, folder, s3:// prefix or glob (a list is read in order, as one dataset); or a "
        "mixture: a list of {path, weight} / {path, samples} entries or `path#N` (see README, Mixtures)."
    )
    eval: str | None = None
    columns: ColumnsConfig | None = Field(
        None, description="Hub Parquet in a layout no preset recognises: which columns hold the conversation and "
        "images, and the role/content keys and role names (see README, Data forms)."
    )
    model_max_length: int = Field(2048, ge=16, description="Tokens per sample, image tokens included.")
    max_bad_fraction: float = Field(
        0.01, ge=0.0, le=1.0, description="Stop when more than this fraction of samples is rejected."
    )
    max_image_pixels: int = Field(
        89_478_485, ge=1, description="Images with more pixels are rejected as decompression_bomb (PIL's default)."
    )
    max_image_bytes: int = Field(
        64 << 20, ge=1, description="Image (and video) files larger than this are rejected as image_too_large."
    )
    read_timeout_s: float = Field(
        60.0, gt=0, description="Seconds one image read may take before the sample is rejected as read_timeout."
    )
    image_root: str | None = Field(
        None,
        description="Folder (or s3:// prefix) relative image paths resolve against, and the only place images may "
        "come from; default: each annotation file's own folder.",
    )
    allow_absolute_paths: bool = Field(
        False, description="Accept absolute image paths and `..` leaving the image root (off: rejected as unsafe_path)."
    )
    max_json_depth: int = Field(64, ge=4, description="Deeper-nested records are rejected as record_too_deep.")
    max_record_bytes: int = Field(
        16 << 20, ge=1024, description="Larger records (one JSON object) are rejected as record_too_large."
    )
    video_fps: float = Field(
        2.0, gt=0, description="Video frames sampled per second of video (decoded with PyAV before the processor)."
    )
    video_max_frames: int = Field(
        16, ge=1, description="At most this many frames per video, spread evenly; their tokens count in model_max_length."
    )
    shuffle: bool = True
    shuffle_buffer: int = Field(
        256, ge=1, description="Rows in each worker's shuffle buffer; the order is a function of train.seed and the epoch."
    )
    num_cpus_per_preprocess_task: float = Field(
        0.5, gt=0, description="Logical CPUs each preprocessing actor reserves; fractional so a small machine "
        "fits its training workers and several actors."
    )
    preprocess_actors_per_worker: float = Field(
        1.0, gt=0, description="Preprocessing actors kept per training worker: the pool's lower bound."
    )
    preprocess_max_actors_per_worker: float = Field(
        2.0, gt=0, description="The pool grows under load (Ray Data autoscaling) up to this many per training worker."
    )
    packing: bool = Field(
        False, description="Pack whole samples end to end into rows of data.pack_tokens tokens instead of padding "
        "each micro-batch; attention and linear-attention state stay inside each sample (see README, Packing)."
    )
    pack_tokens: int | None = Field(
        None, gt=0, description="Token budget of one packed row (image tokens included); at least "
        "data.model_max_length so every sample fits whole. Default: data.model_max_length."
    )

    @model_validator(mode="after")
    def _pack_rows_hold_a_sample(self) -> "DataConfig":
        if self.pack_tokens is not None and self.pack_tokens < self.model_max_length:
            raise ValueError(
                f"data.pack_tokens: {self.pack_tokens} is below data.model_max_length ({self.model_max_length}), so "
                "a sample of that length could not be packed whole; raise data.pack_tokens to at least "
                f"{self.model_max_length} or lower data.model_max_length")
        return self

    def row_tokens(self) -> int | None:
        """Tokens per packed row when packing, else None."""
        return (self.pack_tokens or self.model_max_length) if self.packing else None

    @field_validator("train", mode="before")
    @classmethod
    def _mixture_entries(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("an empty list; give at least one annotation file or a prepared prefix")
        return parse_train(value)

    @field_validator("train")
    @classmethod
    def _known_sources(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [v if isinstance(v, SourceEntry) else _check_source(v) for v in value]
        return _check_source(value)

    def sources(self) -> list[str]:
        """``train`` as a list of paths (one entry when it is a string; every entry's paths for a mixture)."""
        if self.is_mixture():
            return [p for e in self.train for p in ([e.path] if isinstance(e.path, str) else e.path)]
        return list(self.train) if isinstance(self.train, list) else [self.train]

    def is_mixture(self) -> bool:
        return isinstance(self.train, list) and any(isinstance(v, SourceEntry) for v in self.train)

    def entries(self) -> list[SourceEntry]:
        """The sources of the epoch: the mixture's entries, or the one plain source (a path or a list of them)."""
        return list(self.train) if self.is_mixture() else [SourceEntry(path=self.train)]


class TrainConfig(Section):
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs when set.")
    micro_batch_size: int = Field(4, ge=1, description="Samples per worker per forward pass.")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW's second-moment decay (MiniCPM-V's scripts: 0.95).")
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    frozen_dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Storage dtype of frozen parameters (trained ones always keep fp32 master weights and "
        "optimizer state); auto: the precision's dtype (bf16 under bf16), so frozen weights take half the memory. "
        "fp32 keeps them in full precision (FSDP2 only, when precision is bf16/fp16)."
    )
    gradient_checkpointing: bool = False
    objective: Literal["sft", "dpo"] = Field(
        "sft", description="sft: next-token loss on the answers; dpo: preference pairs (chosen vs rejected "
        "answer), configured in the dpo section."
    )
    seed: int = 0
    log_every: int = Field(1, ge=1)
    eval_every: int | None = Field(
        None, ge=1, description="Evaluate on data.eval every N optimizer steps (and at the end); none: only at the end."
    )
    max_nonfinite_steps: int = Field(
        25, ge=0, description="Most optimizer steps in a row whose gradients are not finite (NaN/inf: a diverged "
        "loss, an fp16 overflow) before the run stops naming the step. Such a step is skipped (weights untouched) and "
        "counted as skipped_steps; 25 leaves room for fp16's loss scale to come down from 2**16."
    )

    @property
    def betas(self) -> tuple[float, float]:
        """AdamW's (beta1, beta2)."""
        return (self.adam_beta1, self.adam_beta2)

    @property
    def frozen_storage(self) -> str:
        """The storage dtype of frozen parameters: ``frozen_dtype`` with auto resolved (bf16 | fp16 | fp32)."""
        return self.precision if self.frozen_dtype == "auto" else self.frozen_dtype

    @model_validator(mode="after")
    def _frozen_dtype_computes(self) -> "TrainConfig":
        # Frozen 16-bit weights are used as they are stored: a matmul of bf16 weights with fp16
        # or fp32 activations fails (or silently upcasts a copy of every weight at every step).
        if self.frozen_storage not in (self.precision, "fp32"):
            raise ValueError(f"train.frozen_dtype: {self.frozen_dtype} frozen weights cannot compute with "
                             f"train.precision: {self.precision}; set train.frozen_dtype: auto (the precision's "
                             "dtype) or fp32")
        return self


# DeepSpeed's top-level config keys (https://www.deepspeed.ai/docs/config-json/ and
# deepspeed/runtime/config.py); tests/unit/test_config_strict.py checks each appears in the
# installed DeepSpeed, so the list cannot drift into names DeepSpeed never reads.
DEEPSPEED_TOP_LEVEL_KEYS = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer",
    "scheduler", "fp16", "bf16", "amp", "torch_autocast", "gradient_clipping", "prescale_gradients",
    "gradient_predivide_factor", "sparse_gradients", "zero_optimization", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "activation_checkpointing", "flops_profiler", "comms_logger",
    "wall_clock_breakdown", "memory_breakdown", "steps_per_print", "dump_state", "tensorboard", "wandb",
    "csv_monitor", "comet", "aio", "elasticity", "data_efficiency", "curriculum_learning",
    "compression_training", "checkpoint", "data_types", "communication_data_type",
    "seq_parallel_communication_data_type", "dataloader_drop_last", "autotuning", "eigenvalue",
    "progressive_layer_drop", "pipeline", "sparse_attention", "disable_allgather", "graph_harvesting",
    "use_data_before_expert_parallelism", "compile", "hybrid_engine", "weight_quantization",
    "gradient_allreduce_op", "disable_python_gc", "timers", "nebula",
})


# --- preference tuning (train.objective: dpo) -------------------------------------------------
# The losses live in omni_ray/train/preference.py (their formulas and papers in its docstring).
DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "simpo")
DPO_SMOOTHED = ("sigmoid", "robust", "simpo")


class DpoConfig(Section):
    """Preference tuning on chosen/rejected answer pairs; read only with ``train.objective: dpo``."""

    loss_type: Literal["sigmoid", "robust", "hinge", "ipo", "simpo"] = Field(
        "sigmoid", description="sigmoid: DPO (cDPO with label_smoothing); robust: rDPO; hinge: SLiC-style; ipo: IPO; "
        "simpo: SimPO (reference-free, length-normalised)."
    )
    beta: float = Field(
        0.1, gt=0, description="DPO's KL strength / IPO's tau (typically 0.1); SimPO's reward scale (its paper "
        "uses 2.0-2.5)."
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, validate_default=True, description="Assumed fraction of flipped labels: cDPO with sigmoid and simpo, the noise "
        "rate of robust (required there); hinge and ipo take none."
    )
    simpo_gamma: float | None = Field(
        None, ge=0, description="SimPO's target reward margin gamma (its paper uses 0.5-1.6); loss_type simpo only. "
        "Default: 0.5 under simpo."
    )
    sft_weight: float = Field(
        0.0, ge=0, description="Weight of the chosen answers' NLL added to the loss (RPO), a mean over the step's "
        "chosen answer tokens as in SFT: 1.0 adds exactly the SFT loss of the chosen halves."
    )

    @field_validator("label_smoothing")
    @classmethod
    def _smoothing_of_the_loss_type(cls, value: float, info: ValidationInfo) -> float:
        loss_type = info.data.get("loss_type")
        if value and loss_type not in DPO_SMOOTHED:
            raise ValueError(f"loss_type {loss_type} takes no label smoothing; remove it or use loss_type "
                             f"{', '.join(DPO_SMOOTHED)}")
        if loss_type == "robust" and not value:
            raise ValueError("loss_type robust needs the assumed label-noise rate, in (0, 0.5); set it (e.g. 0.1) "
                             "or use loss_type sigmoid")
        return value

    @field_validator("simpo_gamma")
    @classmethod
    def _gamma_is_simpo_only(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and info.data.get("loss_type") != "simpo":
            raise ValueError(f"only loss_type simpo has a target margin, not {info.data.get('loss_type')}; remove "
                             "it or set dpo.loss_type: simpo")
        return value

    def gamma(self) -> float:
        """SimPO's target margin in use (0 for the other loss types)."""
        if self.loss_type != "simpo":
            return 0.0
        return 0.5 if self.simpo_gamma is None else self.simpo_gamma


def dpo_problems(train: TrainConfig, data: DataConfig, dpo_given: bool) -> list[str]:
    """Settings that contradict the objective (pure): a dpo section under SFT, packing under DPO."""
    if train.objective == "sft":
        return ["dpo: set, but train.objective is sft, so it would do nothing; set train.objective: dpo or remove "
                "the dpo section"] if dpo_given else []
    if data.packing:
        return ["data.packing: not supported with train.objective: dpo (each pair's chosen and rejected rows share "
                "one prompt); set data.packing: false"]
    return []


class EvalConfig(Section):
    """Evaluation on data.eval: loss over the whole set, and greedy answers written to eval/step-N.html."""

    num_samples: int = Field(4, ge=0, description="Eval prompts (the first N of data.eval) answered by the model.")
    max_new_tokens: int = Field(32, ge=1, description="Most tokens generated per answer (greedy decoding).")
    batch_size: int | None = Field(None, ge=1, description="Eval samples per forward pass; default: train.micro_batch_size.")


class StrategyConfig(Section):
    name: Literal["fsdp", "deepspeed"] = "fsdp"
    zero_stage: Literal[2, 3] = 3
    offload_optimizer: bool = False
    offload_params: bool = False
    reshard_after_forward: bool = True
    sequence_parallel: int = Field(
        1, ge=1, description="Ranks that split each sample's tokens between them (Ulysses sequence parallelism, "
        "for samples too long for one GPU); divides scaling.num_workers. See README, Sequence parallelism."
    )
    deepspeed_extra: dict[str, Any] = Field(
        default_factory=dict, description="Extra DeepSpeed config keys, merged over the generated config."
    )

    @field_validator("deepspeed_extra")
    @classmethod
    def _known_deepspeed_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        # A misspelt key would be ignored by DeepSpeed without a word.
        unknown = sorted(set(value) - DEEPSPEED_TOP_LEVEL_KEYS)
        if unknown:
            raise ValueError(f"{unknown} are not DeepSpeed config keys; check the spelling against "
                             "https://www.deepspeed.ai/docs/config-json/ (e.g. zero_optimization, gradient_clipping)")
        return value


class CheckpointConfig(Section):
    resume: Literal["auto", "weights_only"] = Field(
        "auto",
        description="auto: continue this run.name from its newest whole checkpoint, refused when what the "
        "trained state depends on (base weights, architecture, freeze plan, LoRA settings, tokenizer) changed; "
        "weights_only: load only the checkpoint's trained tensors into the changed setup, with a new optimizer "
        "and schedule from step 0. To start fresh instead, pick a new run.name.",
    )
    every_n_steps: int | None = Field(None, ge=1, description="Checkpoint every N optimizer steps; none: at the end.")
    keep: int | None = Field(2, ge=1)
    async_upload: bool = True
    stop_deadline_s: float = Field(
        300.0, gt=0, description="After SIGINT/SIGTERM to the driver, how long the workers have to reach the next "
        "step boundary and write their checkpoint before the driver stops at once (as on a second SIGINT) and "
        "names the steps that were not saved.",
    )
    trainable_only: bool | None = Field(
        None, description="Save only trained parameters; default: yes when any parameter is frozen."
    )


class ScalingConfig(Section):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="What one training worker reserves (Ray Train's resources_per_worker), "
        "e.g. {CPU: 4, GPU: 1}, or a custom resource only some node type has ({CPU: 1, spot_gpu: 1}); on a cluster "
        "the driver asks the autoscaler for such nodes and waits scaling.gpu_wait_timeout_s. Default: one CPU, "
        "or one GPU with use_gpu.",
    )
    max_failures: int = Field(
        3, ge=-1, description="Worker failures (errors, killed processes, lost nodes) to recover from; -1: unlimited."
    )
    max_preemption_failures: int = Field(
        -1, ge=-1, description="Announced node preemptions (spot reclaims with a notice) to recover from; -1: unlimited."
    )
    gpu_memory_gb: float | None = Field(
        None, gt=0, description="Memory of one worker's GPU; `omni-ray validate` warns when its estimate is above "
        "it. Default: the GPU detected on the machine that runs validate."
    )
    gpu_wait_timeout_s: float = Field(
        900.0, gt=0, description="On a cluster, how long to wait for nodes with the workers' GPUs or custom "
        "resources to join (scale from zero) before failing with a named error instead of waiting silently.",
    )

    @field_validator("resources_per_worker")
    @classmethod
    def _worker_resources(cls, value: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        # Ray Train raises these only once Ray is up; here they name the key before anything starts.
        negative = sorted(k for k, v in value.items() if v < 0)
        if negative:
            raise ValueError(f"{negative} below 0; give each resource one worker reserves as 0 or more")
        use_gpu = info.data.get("use_gpu", False)
        if value and not use_gpu and value.get("GPU", 0) > 0:
            raise ValueError("GPU set but scaling.use_gpu is false; set scaling.use_gpu: true or remove GPU "
                             "(a custom resource, e.g. {CPU: 1, spot_gpu: 1}, places workers on a node type "
                             "without CUDA)")
        if value and use_gpu and value.get("GPU", 1) == 0:
            raise ValueError("GPU is 0 but scaling.use_gpu is true; remove GPU (one per worker) or set "
                             "scaling.use_gpu: false")
        return value


class RunConfig(Section):
    name: str = Field("omni-ray-run", pattern=r"^[A-Za-z0-9_.\-]+$")
    storage_path: str = Field(
        "~/omni_ray_runs", description="Where runs and checkpoints live: a local path or s3://bucket/prefix."
    )
    loggers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Where the driver logs metrics: TensorBoard event files in the run directory, MLflow and "
        "W&B (optional extras, configured by their own environment variables).",
    )
    lease_expiry_s: float = Field(
        60.0, gt=0, description="One driver per run: it holds a lease on run.storage_path/run.name while it "
        "trains, and a second driver on the same run stops naming the holder. On S3 the holder renews the lease "
        "every third of this; one not renewed for this long (its driver died) is taken over. On local disk a "
        "dead driver's lease is free at once (the OS drops its lock).",
    )


# --- MiniCPM-V's own finetune flags ------------------------------------------------------------
#
# MiniCPM-V's finetune/finetune.py (OpenBMB/MiniCPM-V) is driven by finetune_ds.sh (full) and
# finetune_lora.sh (LoRA). Their flags may sit at the top level of a config, spelled and valued
# as the scripts write them, and mean what finetune.py makes them mean:
#
#   tune_vision (default true)   the vision tower (vpm) trains in full, else it is frozen
#   tune_llm    (default true)   the whole LLM trains, its embeddings and lm_head included
#   use_lora                     LoRA on the LLM (lora_target_modules), and embed_tokens trains
#                                in full (finetune.py sets its requires_grad after get_peft_model);
#                                finetune.py refuses use_lora with tune_llm true: we do too when
#                                both are given, and read use_lora alone as tune_llm false
#   the resampler (here: projector) always trains in finetune.py: freeze.projector keeps its
#   default (full) unless the config's own freeze section says otherwise.
#   These defaults apply when any of the three flags is given; other flags alone leave the
#   config's freeze map as it is.
#   lora_modules_to_save: finetune.py declares it but never hands it to peft; here it has
#   peft's meaning (those modules train in full beside the adapters), as a freeze override.
#   lora_bias: peft's meaning (lora.bias): none, all biases, or those of adapted modules train.
#   lora_weight_path, lora_layer_replication: finetune.py declares them but never reads them (LoRA
#   always starts fresh, no layer is replicated). lora_layers_to_transform: finetune.py passes it to
#   peft with its *string* lora_target_modules, and peft filters layers only for a list of names
#   (peft 0.21 refuses the pair outright), so it never selects anything there. Their empty
#   defaults are accepted; any other value is an error saying so and what to write instead,
#   rather than a setting that silently does nothing.
#
# Flags that set one key here: _FLAG_KEYS. Flags handled together (precision, schedule, the freeze
# map): map_minicpmv_flags. Flags of the scripts that steer Hugging Face Trainer plumbing with no
# counterpart here are accepted, type-checked and documented in _FLAG_ACCEPTED.

_FLAG_KEYS: dict[str, tuple[type, str]] = {
    "model_name_or_path": (str, "model.path"),
    "data_path": (str, "data.train"),
    "eval_data_path": (str, "data.eval"),
    "model_max_length": (int, "data.model_max_length"),
    "max_slice_nums": (int, "model.max_slice_nums"),
    # The image processor's slice size (MiniCPM-V 2.x slice_config.scale_resolution).
    "scale_resolution": (int, "model.processor.scale_resolution"),
    "lora_r": (int, "lora.r"),
    "lora_alpha": (int, "lora.alpha"),
    "lora_dropout": (float, "lora.dropout"),
    # One regex, full match over module names (peft's meaning of a string target_modules).
    "lora_target_modules": (str, "lora.target_modules"),
    "lora_bias": (str, "lora.bias"),
    "q_lora": (bool, "lora.qlora"),
    "learning_rate": (float, "train.lr"),
    "max_steps": (int, "train.max_steps"),
    "num_train_epochs": (int, "train.epochs"),
    "per_device_train_batch_size": (int, "train.micro_batch_size"),
    "gradient_accumulation_steps": (int, "train.grad_accum"),
    "weight_decay": (float, "train.weight_decay"),
    "warmup_steps": (int, "train.warmup_steps"),
    "max_grad_norm": (float, "train.max_grad_norm"),
    "adam_beta1": (float, "train.adam_beta1"),
    "adam_beta2": (float, "train.adam_beta2"),
    "gradient_checkpointing": (bool, "train.gradient_checkpointing"),
    "seed": (int, "train.seed"),
    "logging_steps": (int, "train.log_every"),
    "save_steps": (int, "checkpoint.every_n_steps"),
    "save_total_limit": (int, "checkpoint.keep"),
    # Trainer's output_dir holds the checkpoints: here they go to run.storage_path/run.name.
    "output_dir": (str, "run.storage_path"),
}
_FLAG_ACCEPTED: dict[str, tuple[type, str]] = {
    "llm_type": (str, "picks finetune.py's chat template; here the checkpoint's own processor and chat template "
                      "are used, whatever the LLM"),
    "do_train": (bool, "omni-ray train always trains"),
    "do_eval": (bool, "evaluation is `omni-ray eval` on data.eval"),
    "eval_steps": (int, "evaluation is `omni-ray eval` on data.eval"),
    "evaluation_strategy": (str, "evaluation is `omni-ray eval` on data.eval"),
    "eval_strategy": (str, "evaluation is `omni-ray eval` on data.eval"),
    "per_device_eval_batch_size": (int, "evaluation is `omni-ray eval` on data.eval"),
    "prediction_loss_only": (bool, "evaluation is `omni-ray eval` on data.eval"),
    "bf16_full_eval": (bool, "evaluation runs in the training precision"),
    "fp16_full_eval": (bool, "evaluation runs in the training precision"),
    "remove_unused_columns": (bool, "the processed columns are fixed here (input_ids, labels, pixels)"),
    "label_names": (str, "labels are always the `labels` column"),
    "logging_dir": (str, "metrics go to Ray Train's reports and the run's log"),
    "logging_strategy": (str, "metrics are reported every train.log_every steps"),
    "report_to": (str, "metrics go to Ray Train's reports and the run's log"),
    "save_strategy": (str, "checkpoints are saved every checkpoint.every_n_steps steps and at the end"),
}
_FLAG_CHOICES = {
    "llm_type": ("minicpm", "llama3", "qwen", "qwen2"),
    "lora_bias": ("none", "all", "lora_only"),
    "lr_scheduler_type": ("cosine",),
    "evaluation_strategy": ("no", "steps", "epoch"),
    "eval_strategy": ("no", "steps", "epoch"),
    "save_strategy": ("steps",),
    "logging_strategy": ("steps",),
}
# Handled in map_minicpmv_flags, several keys at once.
_FLAG_SPECIAL: dict[str, type] = {
    "tune_vision": bool, "tune_llm": bool, "use_lora": bool, "bf16": bool, "fp16": bool,
    "lora_modules_to_save": str, "deepspeed": str, "warmup_ratio": float, "lr_scheduler_type": str,
    # Lists in finetune.py and without effect there: any value is taken as given (and refused, see below).
    "lora_weight_path": object, "lora_layer_replication": object, "lora_layers_to_transform": object,
}
# LoraArguments of finetune.py that change nothing in its recipe: what to write instead.
_FLAG_UNUSED = {
    "lora_weight_path": "MiniCPM-V's finetune.py declares it but never uses it (LoRA starts from fresh adapters); "
                        "to continue a run use checkpoint resume (the run's storage path), or merge the adapters "
                        "into the model (omni-ray export) and train from that",
    "lora_layer_replication": "MiniCPM-V's finetune.py declares it but never hands it to peft (no layer is "
                              "replicated); remove it",
    "lora_layers_to_transform": "finetune.py hands it to peft beside its regex lora_target_modules, and peft "
                                "applies layers_to_transform only to a list of module names (recent peft refuses "
                                "the pair), so it selects nothing there; to adapt some layers only, put their "
                                r"indices in lora_target_modules (e.g. llm\..*layers\.(3|7)\.self_attn\."
                                "(q_proj|k_proj|v_proj)) or set freeze.llm: {mode: lora, last_n_layers: N}",
}
MINICPMV_FLAGS = tuple([*_FLAG_SPECIAL, *_FLAG_KEYS, *_FLAG_ACCEPTED])
_log = logging.getLogger(__name__)
# finetune.py's default LoRA targets (q/k/v of the LLM's self-attention), as suffixes so they
# match MiniCPM-V 2.x's `llm.model.layers.N.self_attn.q_proj` and 4.x's `model.language_model...`.
MINICPMV_DEFAULT_LORA_TARGETS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]


class Config(Section):
    model: ModelConfig
    data: DataConfig
    freeze: FreezeConfig = FreezeConfig()
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    strategy: StrategyConfig = StrategyConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    scaling: ScalingConfig = ScalingConfig()
    run: RunConfig = RunConfig()
    storage: StorageConfig = StorageConfig()
    dpo: DpoConfig | None = None  # filled with the defaults under train.objective: dpo

    @model_validator(mode="before")
    @classmethod
    def _map_minicpmv_flags(cls, raw: Any) -> Any:
        if not isinstance(raw, dict) or not any(flag in raw for flag in MINICPMV_FLAGS):
            return raw
        return map_minicpmv_flags(raw)

    @model_validator(mode="after")
    def _no_settings_on_frozen_groups(self) -> "Config":
        # Runs after MiniCPM-V's flags are mapped, so `tune_llm: false` + `use_lora: true`
        # (LoRA on the LLM) is judged by the mode it maps to, not by the flag's name.
        problems = frozen_group_problems(self.freeze, self.lora)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _dpo_matches_the_objective(self) -> "Config":
        problems = dpo_problems(self.train, self.data, self.dpo is not None)
        if problems:
            raise ValueError("; ".join(problems))
        if self.train.objective == "dpo" and self.dpo is None:
            self.dpo = DpoConfig()
        return self

    @model_validator(mode="after")
    def _sequence_parallel_fits(self) -> "Config":
        problem = sequence_parallel_problem(self.strategy, self.scaling.num_workers)
        if problem:
            raise ValueError(problem)
        return self


def sequence_parallel_problem(strategy: StrategyConfig, num_workers: int) -> str | None:
    """Why ``strategy.sequence_parallel`` cannot run on this strategy and world size, or None (pure)."""
    n = strategy.sequence_parallel
    if n == 1:
        return None
    if strategy.name == "deepspeed":
        return (f"strategy.sequence_parallel: {n} is not supported with strategy.name: deepspeed; set "
                "strategy.name: fsdp, or strategy.sequence_parallel: 1")
    if num_workers % n:
        fits = [d for d in range(2, num_workers + 1) if num_workers % d == 0]
        return (f"strategy.sequence_parallel: {n} does not divide scaling.num_workers ({num_workers}): the world is "
                f"data-parallel groups x sequence-parallel ranks; set strategy.sequence_parallel to one of "
                f"{fits or [1]} or scaling.num_workers to a multiple of {n}")
    return None


def frozen_group_problems(freeze: FreezeConfig, lora: LoraConfig) -> list[str]:
    """Settings that would do nothing because their group does not train that way (pure)."""
    problems = []
    unfrozen_by_override = any(o.mode == "full" for o in freeze.overrides)
    for group in GROUPS:
        mode = freeze.group(group).mode
        if mode == "frozen" and freeze.group(group).last_n_layers is not None:
            problems.append(f"freeze.{group}.last_n_layers: the group is frozen, so it selects nothing; remove "
                            f"it or set freeze.{group}.mode to full or lora")
        if mode == "frozen" and group in freeze.lr and not unfrozen_by_override:
            problems.append(f"freeze.lr.{group}: the group is frozen and no override trains any of it; remove "
                            f"the rate or set freeze.{group} to full or lora")
        if mode != "lora" and group in lora.per_group:
            problems.append(f"lora.per_group.{group}: freeze.{group} is {mode}, not lora; remove the entry or "
                            f"set freeze.{group}: lora")
    return problems


def flag_value(flag: str, value: Any, kind: type) -> Any:
    """A flag's value as MiniCPM-V's shell scripts write it, checked and converted to ``kind``.

    Booleans are true/false in any case, quoted or not (YAML reads a bare `true` as a bool and a
    quoted "false" as a string: both are accepted, and a quoted "false" means false).
    """
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise ValueError(f"{flag}: {value!r} is not a boolean; write true or false")
    if kind is object:
        return None if value in ("", [], None) else value
    if kind is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError(f"{flag}: {value!r} is not a string")
        value = str(value)
        choices = _FLAG_CHOICES.get(flag)
        if choices and value not in choices:
            raise ValueError(f"{flag}: {value!r} is not supported; use one of {list(choices)}")
        return value
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
        if kind is int:
            if number != int(number):
                raise ValueError
            return int(number)
        return number
    except (TypeError, ValueError):
        raise ValueError(f"{flag}: {value!r} is not {'an integer' if kind is int else 'a number'}") from None


def _setdefault_path(raw: dict, dotted: str, value: Any, flag: str) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"{flag}: cannot map onto {dotted} because {key} is not a section")
    if leaf in node and node[leaf] != value:
        raise ValueError(f"{flag} conflicts with {dotted}={node[leaf]!r}; set one of them, not both")
    node[leaf] = value


def _set_mode(raw: dict, group: str, mode: str, flag: str) -> None:
    """Set freeze.<group>'s mode from a flag; a dict setting (e.g. last_n_layers) keeps its other keys."""
    current = raw["freeze"].get(group)
    if isinstance(current, dict):
        if current.get("mode", mode) != mode:
            raise ValueError(f"{flag} conflicts with freeze.{group}.mode={current['mode']!r}; set one of them, not both")
        raw["freeze"][group] = {**current, "mode": mode}
    else:
        _setdefault_path(raw, f"freeze.{group}", mode, flag)


def _map_freeze_flags(raw: dict, flags: dict) -> None:
    """tune_vision / tune_llm / use_lora as finetune.py applies them (see the table above)."""
    if not {"tune_vision", "tune_llm", "use_lora"} & set(flags):
        return  # only the other flags are used: the freeze map is the config's own
    use_lora = flags.get("use_lora", False)
    if use_lora and flags.get("tune_llm"):
        raise ValueError("tune_llm and use_lora are both true; MiniCPM-V's finetune.py trains the LLM either fully "
                         "or with LoRA: set tune_llm: false with use_lora: true")
    tune_llm = flags.get("tune_llm", not use_lora)
    vision_flag = "tune_vision" if "tune_vision" in flags else "tune_vision (default true in finetune.py)"
    _set_mode(raw, "vision", "full" if flags.get("tune_vision", True) else "frozen", vision_flag)
    llm_flag = "use_lora" if use_lora else "tune_llm" if "tune_llm" in flags else "tune_llm (default true in finetune.py)"
    _set_mode(raw, "llm", "lora" if use_lora else ("full" if tune_llm else "frozen"), llm_flag)
    _set_mode(raw, "embeddings", "full" if (tune_llm or use_lora) else "frozen", llm_flag)
    _set_mode(raw, "lm_head", "full" if tune_llm else "frozen", llm_flag)
    if use_lora and "lora_target_modules" not in flags:
        raw["lora"].setdefault("target_modules", list(MINICPMV_DEFAULT_LORA_TARGETS))
    for name in filter(None, (m.strip() for m in flags.get("lora_modules_to_save", "").split(","))):
        # peft's modules_to_save: the named modules train in full beside the adapters.
        overrides = raw["freeze"].setdefault("overrides", [])
        overrides.append({"pattern": rf"(^|\.){re.escape(name)}\.", "mode": "full"})


def _map_lora_flags(raw: dict, flags: dict) -> None:
    """LoRA arguments finetune.py declares but that have no effect in its recipe: refused unless unset."""
    for flag, instead in _FLAG_UNUSED.items():
        if flags.get(flag) not in (None, ""):
            raise ValueError(f"{flag}: {instead}")


def _map_train_flags(raw: dict, flags: dict) -> None:
    """Precision, DeepSpeed config and LR schedule flags, which set several keys or need each other."""
    if "bf16" in flags or "fp16" in flags:
        if flags.get("bf16") and flags.get("fp16"):
            raise ValueError("bf16 and fp16 are both true; set one of them")
        precision = "bf16" if flags.get("bf16") else "fp16" if flags.get("fp16") else "fp32"
        _setdefault_path(raw, "train.precision", precision, "bf16" if "bf16" in flags else "fp16")
    if "deepspeed" in flags:
        stage = re.search(r"zero_?([0-9])", flags["deepspeed"])
        if not stage or stage.group(1) not in ("2", "3"):
            raise ValueError(f"deepspeed: cannot tell a ZeRO stage 2 or 3 from {flags['deepspeed']!r}; set "
                             "strategy: {name: deepspeed, zero_stage: 2} (or 3) instead")
        _setdefault_path(raw, "strategy.name", "deepspeed", "deepspeed")
        _setdefault_path(raw, "strategy.zero_stage", int(stage.group(1)), "deepspeed")
    if "warmup_ratio" in flags:
        max_steps = raw["train"].get("max_steps")
        if not isinstance(max_steps, int):
            raise ValueError("warmup_ratio: needs max_steps to turn the ratio into steps; set max_steps, or "
                             "train.warmup_steps instead")
        _setdefault_path(raw, "train.warmup_steps", math.ceil(flags["warmup_ratio"] * max_steps), "warmup_ratio")


def map_minicpmv_flags(raw: dict) -> dict:
    """Translate MiniCPM-V finetune flags into sections (pure; returns a new dict).

    Each flag is checked against its type (booleans as the scripts write them) and mapped as
    finetune.py uses it; an unusable value is an error naming the flag.
    """
    raw = dict(raw)
    kinds = {**_FLAG_SPECIAL, **{f: k for f, (k, _) in _FLAG_KEYS.items()},
             **{f: k for f, (k, _) in _FLAG_ACCEPTED.items()}}
    flags = {f: flag_value(f, raw.pop(f), kinds[f]) for f in MINICPMV_FLAGS if f in raw}
    for section in ("freeze", "lora", "data", "model", "train", "strategy", "checkpoint", "run"):
        raw[section] = dict(raw.get(section) or {})
    raw["model"]["processor"] = dict(raw["model"].get("processor") or {})
    for flag, (_, dotted) in _FLAG_KEYS.items():
        if flag in flags:
            _setdefault_path(raw, dotted, flags[flag], flag)
    _map_freeze_flags(raw, flags)
    _map_lora_flags(raw, flags)
    _map_train_flags(raw, flags)
    for flag in sorted(set(flags) & set(_FLAG_ACCEPTED)):
        _log.info("%s=%r accepted: %s", flag, flags[flag], _FLAG_ACCEPTED[flag][1])
    return raw

# --- loading -------------------------------------------------------------------------------


# Bounds on what a config may cost to read. A job config is a few KB, a few levels deep, with a few
# hundred values; these limits are far above that and far below what hangs or exhausts the loader:
# YAML aliases can repeat an anchor exponentially ("billion laughs": ten nested aliases of ten
# make 10^10 values out of 1 KB), which PyYAML builds as shared objects in microseconds but every
# later walk over the config (validation, dumping) would expand.
MAX_CONFIG_BYTES = 1 << 20
MAX_SET_BYTES = 64 << 10
MAX_YAML_VALUES = 100_000
MAX_YAML_DEPTH = 32


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate keys, reads ``1e-4`` as a number, and bounds size.

    PyYAML keeps the last of two equal keys without a word, so a second ``lr:`` silently wins;
    and YAML 1.1 reads ``1e-4`` (no dot) as a string, which strict number fields would then
    refuse although everyone writes learning rates that way (YAML 1.2 reads it as a float).
    Nesting deeper than MAX_YAML_DEPTH is refused while composing (PyYAML's composer recurses:
    a ``[[[[...`` config would end in RecursionError), and the composed document is measured
    with its aliases expanded before anything is built from it (``expanded_size``).
    """

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise ConfigError(_too_deep())
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node):
        expanded_size(node)
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{key}: set twice (lines {seen[key]} and {line}); keep one of them")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def _too_deep() -> str:
    return (f"nested more than {MAX_YAML_DEPTH} levels deep (the limit on a config's nesting); a config's "
            "sections are a few levels deep, check for runaway brackets or aliases")


def expanded_size(root: yaml.Node) -> int:
    """Values in a composed YAML document once every alias is expanded; ConfigError past the limits.

    Each node is measured once (memoised), so the cost is that of the text even when the
    expansion is exponential; an alias inside its own anchor is refused.
    """
    memo: dict[int, tuple[int, int] | None] = {}

    def measure(node: yaml.Node, depth: int) -> tuple[int, int]:  # (values, height)
        known = memo.get(id(node), ())
        if known is None:
            raise ConfigError(f"line {node.start_mark.line + 1}: an alias refers to the anchor it is inside; "
                              "YAML aliases must not repeat themselves")
        if not known:
            memo[id(node)] = None
            children = node.value if isinstance(node, yaml.SequenceNode) else \
                [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else []
            sizes = [measure(child, depth + 1) for child in children]
            known = memo[id(node)] = (1 + sum(s for s, _ in sizes), 1 + max((h for _, h in sizes), default=0))
        if depth + known[1] > MAX_YAML_DEPTH:
            raise ConfigError(_too_deep())
        if known[0] > MAX_YAML_VALUES:
            raise ConfigError(f"its YAML aliases expand to more than {MAX_YAML_VALUES:,} values (the limit on a "
                              "config's size once aliases (*name) repeat their anchors (&name)); write the values "
                              "out, or use fewer nested aliases")
        return known

    return measure(root, 0)[0]


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass


def parse_override(item: str) -> tuple[list[str], Any]:
    """``section.key=value`` → (["section", "key"], value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set train.lr=1e-4")
    if len(item.encode()) > MAX_SET_BYTES:
        raise ConfigError(f"--set {item[:40]!r}...: {len(item.encode()):,} bytes, above the limit of "
                          f"{MAX_SET_BYTES:,} bytes on one --set; put large values in the config file")
    key, _, value = item.partition("=")
    path = key.strip().split(".")
    if len(path) > MAX_YAML_DEPTH:
        raise ConfigError(f"--set {key[:40]!r}...: the key is {_too_deep()}")
    try:
        return path, parse_yaml(value) if value.strip() else ""
    except ConfigError as err:
        raise ConfigError(f"--set {key.strip()}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key.strip()}: not valid YAML ({' '.join(str(err).split())}); quote the "
                          "value") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for key in path[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                if isinstance(child, str) and key in GROUPS:  # freeze.llm: lora → freeze.llm.last_n_layers=4
                    child = node[key] = {"mode": child}
                else:
                    raise ConfigError(f"--set {item!r}: {'.'.join(path[:-1])} is not a section")
            node = child
        node[path[-1]] = value
    return raw


# Strict-type errors, rephrased with the fix (YAML 1.1 reads yes/no/on/off as booleans).
_TYPE_FIXES = {
    "bool_type": "expected true or false, got {input!r}; write true or false",
    "int_type": "expected a whole number, got {input!r}; write a number (yes/no/on/off are booleans in YAML)",
    "float_type": "expected a number, got {input!r}; write a number such as 1.0e-4",
    "finite_number": "expected a finite number, got {input!r}; .inf and .nan are not allowed",
    "string_type": "expected text, got {input!r}; quote it",
}


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key; check the spelling against `omni-ray validate --schema` or remove it"
        elif e["type"] == "missing":
            msg = "required; add it to the config"
        elif e["type"] in _TYPE_FIXES:
            msg = _TYPE_FIXES[e["type"]].format(input=e.get("input"))
        lines.append(f"  {key}: {msg}" if key else f"  {msg}")  # model-level messages name their keys
    return "invalid config:\n" + "\n".join(lines)


def load_config(source: str | Path | dict, overrides: list[str] | None = None) -> Config:
    """Load and check a config from a YAML path or a dict; raise ConfigError naming each bad key."""
    if isinstance(source, dict):
        raw = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {size:,} bytes, above the limit of {MAX_CONFIG_BYTES:,} bytes on a config "
                              "file; a config names its data and model by path, it does not hold them")
        try:
            raw = parse_yaml(path.read_bytes().decode()) or {}
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, ...)")
    raw = apply_overrides(raw, overrides or [])
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
