"""The driver: check the config, build the data pipeline, start Ray Train, return the result.

Runs the same on a laptop (no RAY_ADDRESS: a local Ray starts) and as a Ray job driver on a
cluster (``ray job submit`` sets RAY_ADDRESS). Credentials never travel in the config: the
S3 environment variables are handed to the workers explicitly through the runtime env.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from omni_ray.config import Config, ConfigError
from omni_ray.freeze import FreezePlan, plan_freeze
from omni_ray.models.loading import build_skeleton, named_shapes_from_index, read_hf_config, resolve_spec
from omni_ray.models.spec import ModelSpec


@dataclass
class Validated:
    spec: ModelSpec
    plan: FreezePlan
    hf_config: dict


def validate(cfg: Config) -> Validated:
    """Everything that can be checked without weights: spec, skeleton on meta, freeze plan."""
    hf_config = read_hf_config(cfg.model, cfg.storage)
    spec = resolve_spec(cfg.model, hf_config)
    if spec.remote_code:
        # The model class is the checkpoint's own code: plan from the stored tensors' names and
        # shapes (index + safetensors headers), without running that code or fetching weights.
        named_shapes = named_shapes_from_index(cfg.model.path, cfg.storage)
    else:
        skeleton = build_skeleton(cfg.model, spec, hf_config)
        named_shapes = [(n, tuple(p.shape)) for n, p in skeleton.named_parameters()]
    plan = plan_freeze(named_shapes, spec, cfg.freeze, cfg.lora, cfg.train.lr)
    if cfg.lora.qlora and not cfg.scaling.use_gpu:
        raise ConfigError("lora.qlora: 4-bit QLoRA needs CUDA GPUs (bitsandbytes kernels); set "
                          "scaling.use_gpu: true, or lora.qlora: false to train LoRA on a full-precision base")
    if plan.trainable_numel() == 0:
        raise ConfigError("freeze: the plan trains nothing; set at least one group to full or lora")
    if cfg.train.precision == "fp16" and cfg.strategy.name == "fsdp" and cfg.model.dtype != "float32":
        raise ConfigError("model.dtype: fp16 training with FSDP2 keeps fp32 master weights; set model.dtype: float32")
    return Validated(spec, plan, hf_config)


def ensure_ray(cfg: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    env = {"RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", **cfg.storage.worker_env()}
    address = os.environ.get("RAY_ADDRESS")  # set by `ray job submit` and on cluster nodes
    if address:
        # Under `ray job submit` the job's runtime env is already set, and Ray refuses to merge
        # another one into it; workers get credentials from RunConfig.worker_runtime_env.
        ray.init(address=address)
        return
    # A local Ray on a small machine: the training workers take one logical CPU each and the
    # preprocessing actors need room beside them, or Ray Data waits forever for a free CPU.
    per_worker = cfg.scaling.resources_per_worker.get("CPU", 1.0)
    needed = cfg.scaling.num_workers * per_worker + cfg.data.num_cpus_per_preprocess_task
    ray.init(num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)), runtime_env={"env_vars": env},
             include_dashboard=False)


def storage_for_ray(cfg: Config) -> tuple[str, object | None]:
    """(storage_path, filesystem) for Ray Train's RunConfig."""
    from omni_ray import storage as st

    if st.is_remote(cfg.run.storage_path):
        fs, path = st.resolve(cfg.run.storage_path, cfg.storage)
        return path, fs
    return str(Path(cfg.run.storage_path).expanduser().resolve()), None


def count_rows(source: str | list[str], cfg: Config) -> int:
    from omni_ray.data.pipeline import count_rows as count_source_rows

    return count_source_rows(source, cfg.data, cfg.storage)


def train(cfg: Config):
    """Run training under Ray Train; returns Ray's Result (metrics, checkpoint, path)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from omni_ray.data.pipeline import build_dataset
    from omni_ray.train.loop import train_loop_per_worker

    validate(cfg)
    ensure_ray(cfg)
    num_rows = count_rows(cfg.data.train, cfg)
    dataset = build_dataset(cfg.data.train, cfg.data, cfg.model, cfg.storage)
    storage_path, filesystem = storage_for_ray(cfg)
    if filesystem is None:  # workers do not share the driver's working directory
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"storage_path": storage_path})})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "num_rows": num_rows},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=cfg.scaling.resources_per_worker or None,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures,
                                                   max_preemption_failures=cfg.scaling.max_preemption_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            # Workers get S3 credentials explicitly: on a cluster they do not share the driver's env.
            worker_runtime_env={"env_vars": cfg.storage.worker_env()},
        ),
        datasets={"train": dataset},
    )
    return trainer.fit()
