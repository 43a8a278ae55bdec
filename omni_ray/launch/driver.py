"""The driver: check the config, build the data pipeline, start Ray Train, return the result.

Runs the same on a laptop (no RAY_ADDRESS: a local Ray starts) and as a Ray job driver on a
cluster (``ray job submit`` sets RAY_ADDRESS). Credentials never travel in the config.

The run's location comes from one place, ``omni_ray.storage.RunLocation``: the URI workers
resume from and the (storage_path, filesystem) pair Ray Train writes to; the config itself is
never rewritten.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from omni_ray.config import Config, ConfigError, DataConfig, ScalingConfig
from omni_ray.errors import UserError
from omni_ray.freeze import FreezePlan, plan_freeze
from omni_ray.launch import lease
from omni_ray.launch.stops import Stopped, StopNow, Stopper, stopped_message
from omni_ray.data.packing import check_packing
from omni_ray.data.pipeline import preprocess_pool
from omni_ray.models.loading import build_skeleton, named_shapes_from_index, read_hf_config, resolve_spec
from omni_ray.models.processor_check import check_processor_kwargs
from omni_ray.models.spec import ModelSpec
from omni_ray.observe.loggers import check_loggers
from omni_ray.storage import RunLocation, StorageConfig
from omni_ray.train.sequence import check_sequence_parallel

log = logging.getLogger(__name__)


@dataclass
class Validated:
    spec: ModelSpec
    plan: FreezePlan
    hf_config: dict


def validate(cfg: Config) -> Validated:
    """Everything that can be checked without weights: spec, skeleton on meta, freeze plan."""
    hf_config = read_hf_config(cfg.model, cfg.storage)
    spec = resolve_spec(cfg.model, hf_config)
    check_processor_kwargs(cfg.model, cfg.storage)  # transformers drops unknown ones silently
    if spec.remote_code:
        # The model class is the checkpoint's own code: plan from the stored tensors' names and
        # shapes (index + safetensors headers), without running that code or fetching weights.
        named_shapes = named_shapes_from_index(cfg.model.path, cfg.storage)
    else:
        skeleton = build_skeleton(cfg.model, spec, hf_config)
        named_shapes = [(n, tuple(p.shape)) for n, p in skeleton.named_parameters()]
    plan = plan_freeze(named_shapes, spec, cfg.freeze, cfg.lora, cfg.train.lr)
    check_loggers(cfg.run.loggers)
    check_packing(spec.name, cfg.data.packing)
    check_sequence_parallel(cfg.strategy.sequence_parallel, spec, hf_config)
    if cfg.train.eval_every and not cfg.data.eval:
        raise ConfigError("train.eval_every: set, but data.eval is not; point data.eval at a JSON/JSONL file or a "
                          "prepared prefix (same formats as data.train), or remove train.eval_every")
    if cfg.data.eval:
        check_eval(cfg, hf_config)
    check_objective(cfg)
    if cfg.lora.qlora and not cfg.scaling.use_gpu:
        raise ConfigError("lora.qlora: 4-bit QLoRA needs CUDA GPUs (bitsandbytes kernels); set "
                          "scaling.use_gpu: true, or lora.qlora: false to train LoRA on a full-precision base")
    if plan.trainable_numel() == 0:
        raise ConfigError("freeze: the plan trains nothing; set at least one group to full or lora")
    return Validated(spec, plan, hf_config)


def check_objective(cfg: Config) -> None:
    """Pairs given to SFT, or SFT conversations given to DPO, are refused from the first records of each
    data.train source (and data.eval), naming the key; evaluation over pairs is not wired yet."""
    from omni_ray.data.mixture import check_sources
    from omni_ray.data.pairs import objective_mismatch
    from omni_ray.data.sources import first_records

    if cfg.train.objective == "dpo" and cfg.data.eval:
        raise ConfigError("data.eval: evaluation over preference pairs is not supported yet with train.objective: "
                          "dpo; remove data.eval (and train.eval_every), or train with train.objective: sft")
    mixture = cfg.data.is_mixture()
    try:
        heads = [(source, first_records(source, cfg.storage)) for source in check_sources(cfg.data, cfg.storage)]
    except UserError:  # a missing or unreadable source: the data checks name it (describe_data, plan_data)
        return
    for i, (source, records) in enumerate(heads):
        key = f"data.train[{i}]" if mixture else "data.train"
        problem = objective_mismatch(records, cfg.train.objective, source.units[0].uri if source.units else key, key)
        if problem:
            raise ConfigError(problem)


def check_eval(cfg: Config, hf_config: dict) -> None:
    """What evaluation asks of the model must fit it, refused before the run (not mid-run).

    A prompt is at most ``data.model_max_length`` tokens and generation adds ``eval.max_new_tokens``:
    past the model's position range the answers are garbage (or the rope tables run out). An eval
    batch larger than a training micro-batch is warned about: without gradients it often fits, but
    the run was sized for training's batch (at eval.batch_size unset, evaluation never needs more).
    """
    text = hf_config.get("text_config") or {}
    limit = text.get("max_position_embeddings") or hf_config.get("max_position_embeddings")
    if limit and cfg.data.model_max_length + cfg.eval.max_new_tokens > limit:
        raise ConfigError(f"eval.max_new_tokens: {cfg.eval.max_new_tokens} new tokens after a prompt of up to "
                          f"data.model_max_length={cfg.data.model_max_length} pass the model's {limit} positions; "
                          f"lower eval.max_new_tokens to {max(limit - cfg.data.model_max_length, 1)} or less")
    if cfg.eval.batch_size and cfg.eval.batch_size > cfg.train.micro_batch_size:
        log.warning("eval.batch_size: %d samples per eval forward is more than a training micro-batch "
                    "(train.micro_batch_size=%d), which the memory estimate is for; if evaluation runs out of "
                    "memory, lower eval.batch_size or leave it unset", cfg.eval.batch_size, cfg.train.micro_batch_size)


def memory_estimate(cfg: Config, checked: Validated) -> tuple[str, str | None]:
    """The per-worker memory estimate for this run (text by component) and a warning when it is
    above the device (``scaling.gpu_memory_gb`` or the detected GPU), else None. No weights are
    read: one forward and backward on fake tensors (seconds for a small model, about a minute at 9B)."""
    from omni_ray.memory import layout_of, memory_report

    return memory_report(cfg.model, checked.hf_config, checked.spec, checked.plan, cfg.lora,
                         layout_of(cfg.train, cfg.strategy, cfg.scaling), batch=cfg.train.micro_batch_size,
                         seq_len=cfg.data.model_max_length, gpu_memory_gb=cfg.scaling.gpu_memory_gb,
                         dpo=cfg.train.objective == "dpo", reference_free=cfg.dpo is not None and cfg.dpo.loss_type == "simpo")


def log_memory_estimate(cfg: Config, checked: Validated) -> None:
    """Log the estimate (and its warning). It only advises: an architecture whose forward cannot
    run on fake tensors gets a warning that says so, and the run goes on."""
    try:
        estimate, warning = memory_estimate(cfg, checked)
    except Exception as err:  # noqa: BLE001 - any model code can fail under fake tensors
        log.warning("memory: no estimate for this model (%s: %s); `omni-ray validate CONFIG --memory` shows the "
                    "error in full", type(err).__name__, err)
        return
    log.info("%s", estimate)
    if warning:
        log.warning("%s", warning)


def ensure_ray(scaling: ScalingConfig, data: DataConfig, storage: StorageConfig) -> None:
    """Connect to the cluster in RAY_ADDRESS, or start a local Ray sized for this run."""
    from omni_ray.ray_init import connect_or_start, is_local

    if is_local():
        check_local_gpus(scaling)
    env = {"RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", **storage.worker_env()}
    connect_or_start(local_cpus(scaling, data, os.cpu_count() or 1), env)


def local_cpus(scaling: ScalingConfig, data: DataConfig, cores: int) -> int:
    """Logical CPUs for a local Ray: one per training worker, plus room beside them for the
    preprocessing actors and a Parquet read task. Sized exactly to workers and actors, Ray Data's
    read tasks never get a CPU and training from prepared shards waits forever."""
    per_worker = scaling.resources_per_worker.get("CPU", 1.0)
    actors = preprocess_pool(data, scaling.num_workers)[0]  # the pool's lower bound must start
    needed = scaling.num_workers * per_worker + actors * data.num_cpus_per_preprocess_task + 1
    return max(cores, int(needed + 0.999))


def worker_bundle(scaling: ScalingConfig) -> dict[str, float]:
    """What one training worker reserves, the way Ray Train's ScalingConfig computes it."""
    bundle = {k: v for k, v in scaling.resources_per_worker.items() if v}
    if not bundle:
        bundle = {"GPU": 1.0} if scaling.use_gpu else {"CPU": 1.0}
    if scaling.use_gpu:
        bundle.setdefault("GPU", 1.0)
    return bundle


def node_resources_wanted(scaling: ScalingConfig) -> dict[str, float]:
    """Run-wide totals of what only some nodes have: GPUs and custom resources (a node type's
    accelerator label, e.g. ``spot_gpu``). These are what a cluster may scale up from zero for."""
    return {k: v * scaling.num_workers for k, v in worker_bundle(scaling).items()
            if k not in ("CPU", "memory", "object_store_memory")}


def check_local_gpus(scaling: ScalingConfig) -> None:
    """A local Ray has exactly this machine's GPUs and no custom resources: asking for more would wait forever."""
    wanted = node_resources_wanted(scaling)
    custom = sorted(k for k in wanted if k != "GPU")
    if custom:
        raise ConfigError(f"scaling.resources_per_worker: {custom} are resources of a cluster's node types and a "
                          "local Ray has none; remove them to train on this machine, or submit to the cluster whose "
                          "nodes declare them (RAY_ADDRESS)")
    if not scaling.use_gpu:
        return
    import torch

    have = torch.cuda.device_count()
    want = wanted["GPU"]
    if have < want:
        raise ConfigError(f"scaling.use_gpu: {scaling.num_workers} workers need {want:g} GPUs but this machine has "
                          f"{have}; set scaling.use_gpu: false to train on CPUs, lower scaling.num_workers, or "
                          "submit to a GPU cluster (RAY_ADDRESS)")


def _amounts(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {'GPUs' if k == 'GPU' else k}" for k, v in sorted(resources.items()))


def wait_for_gpus(scaling: ScalingConfig, poll_s: float = 1.0) -> bool:
    """On a cluster, ask the autoscaler for the workers' GPU (or custom-resource) nodes and wait for
    them, up to a named timeout. Returns whether it asked (``release_nodes`` undoes the request).

    GPU node groups often scale from zero: the GPUs appear only after the autoscaler sees a
    request. Without a bound, a cluster that cannot get those nodes (quota, no spot capacity, a
    wrong node type) leaves the run pending forever with no word.
    """
    import time

    import ray
    from ray.autoscaler.sdk import request_resources

    wanted = node_resources_wanted(scaling)

    def short() -> dict[str, float]:
        total = ray.cluster_resources()
        return {k: total.get(k, 0.0) for k, v in wanted.items() if total.get(k, 0.0) < v}

    if not short():
        return False
    log.info("waiting up to %gs for nodes with %s (scaling.gpu_wait_timeout_s)", scaling.gpu_wait_timeout_s,
                _amounts(wanted))
    # The request stays while the run lasts: a node lost mid-run is replaced even before Ray
    # Train asks again.
    request_resources(bundles=[worker_bundle(scaling)] * scaling.num_workers)
    deadline = time.monotonic() + scaling.gpu_wait_timeout_s
    while time.monotonic() < deadline:
        time.sleep(poll_s)
        if not short():
            return True
    raise ConfigError(
        f"scaling.gpu_wait_timeout_s: waited {scaling.gpu_wait_timeout_s:g}s for {_amounts(wanted)} and the cluster "
        f"has {_amounts(short())}; check the cluster's GPU worker group (max replicas, instance type, spot "
        "capacity, quota) and that a node type declares these resources, lower scaling.num_workers, or raise "
        "scaling.gpu_wait_timeout_s")


def release_nodes() -> None:
    """Withdraw wait_for_gpus's request, so the autoscaler may scale the nodes down once idle.

    Ray keeps one such request per cluster (each call replaces the last): a run that asked clears it.
    """
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[])


def train(cfg: Config, verbose: bool = False):
    """Run training under Ray Train; returns Ray's Result (metrics, checkpoint, path).

    The console shows one progress display from rank 0's reports, and the driver writes the
    run's metrics (TensorBoard, MLflow, W&B), metrics.jsonl and curves.png (see observe.watch);
    ``verbose`` brings back Ray Train's own per-report output and known-harmless warnings.
    """
    from omni_ray.observe.console import quiet_driver

    quiet_driver(verbose)
    checked = validate(cfg)
    location = RunLocation.of(cfg.run, cfg.storage)  # the one owner of where the run lives
    # One writer per run: a second driver on this run stops here, naming the holder (LeaseHeld).
    with lease.acquire(location.uri, cfg.storage, cfg.run.lease_expiry_s):
        return _train(cfg, checked, location, verbose)


def _train(cfg: Config, checked: Validated, location: RunLocation, verbose: bool):
    import ray.train
    from ray.train.torch import TorchTrainer

    from omni_ray.data.mixture import plan_data
    from omni_ray.data.pipeline import build_dataset
    from omni_ray.observe.console import ray_logging_config
    from omni_ray.observe.watch import RunWatcher
    from omni_ray.train.loop import train_loop_per_worker

    # Before Ray is asked for anything: a run that cannot fit is named now, not after GPU nodes
    # have scaled up and every worker has run out of memory.
    log_memory_estimate(cfg, checked)
    # Sources resolved and counted once, before Ray starts (a missing or unusable source is one line,
    # not a cluster started for nothing); the plan (a mixture's rows per source, their positions and
    # read order, seeded by train.seed) gives the epoch's rows and the dataset.
    plan = plan_data(cfg.data, cfg.storage, cfg.train.seed)
    ensure_ray(cfg.scaling, cfg.data, cfg.storage)
    asked = wait_for_gpus(cfg.scaling)
    num_rows = plan.rows
    dataset = build_dataset(plan, cfg.data, cfg.model, cfg.storage, num_workers=cfg.scaling.num_workers,
                            pairs=cfg.train.objective == "dpo")
    storage_path, filesystem = location.for_ray()
    watcher = RunWatcher(location.uri, cfg.run.loggers, cfg.storage, cfg.model_dump(mode="json"), verbose)
    forwarder = watcher.callback()  # starts the inbox actor, which also carries a stop request to rank 0
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "num_rows": num_rows, "run_uri": location.uri,
                           "stop_box": watcher.inbox},
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
            callbacks=[forwarder],
            logging_config=ray_logging_config(verbose),
        ),
        datasets={"train": dataset},
    )
    stopper = Stopper(watcher.request_stop, cfg.checkpoint.stop_deadline_s,
                      say=lambda text: watcher.progress.write(text, is_err=True))
    at_once = None
    try:
        with watcher, stopper:
            try:
                result = stopper.run(trainer.fit)
            except StopNow as err:  # a second signal, or the deadline: the workers end with the driver
                at_once = err
    finally:
        if asked:
            release_nodes()
    if stopper.signum is not None:  # after the watcher closed: every report it got is in its history
        signum = at_once.signum if at_once else stopper.signum
        raise Stopped(signum, stopped_message(signum, *watcher.saved_and_reported(), at_once and str(at_once)))
    return result
