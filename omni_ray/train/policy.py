"""Decisions the loop acts on, as pure functions: they return a verdict, the loop carries it out."""

from __future__ import annotations

from omni_ray.config import TrainConfig


def total_optimizer_steps(train: TrainConfig, num_rows: int, world_size: int) -> int:
    """``train.max_steps``, or enough steps for ``train.epochs`` passes over ``num_rows``.

    world_size workers each take micro_batch_size samples grad_accum times per optimizer step;
    the last step of an epoch may be short.
    """
    if train.max_steps:
        return train.max_steps
    samples_per_step = world_size * train.micro_batch_size * train.grad_accum
    return max(1, -(-num_rows // samples_per_step)) * train.epochs


def schedule_done(step: int, epoch: int, total_steps: int, train: TrainConfig) -> bool:
    """The run ends at ``total_steps``, or when the epochs run out first (rejected rows, ragged ends)."""
    return step >= total_steps or (not train.max_steps and epoch >= train.epochs)


def should_log(step: int, total_steps: int, log_every: int) -> bool:
    return step % log_every == 0 or step == total_steps


def checkpoint_due(step: int, total_steps: int, every_n_steps: int | None, preempted: bool) -> bool:
    """Checkpoint on schedule, on a preemption notice (a spot node about to go) and at the last step."""
    return bool(every_n_steps and step % every_n_steps == 0) or preempted or step == total_steps


def bad_data_error(rejected: dict[str, int], seen: int, max_bad_fraction: float) -> str | None:
    """The message to stop with when too large a share of the samples seen was rejected, else None."""
    bad = sum(rejected.values()) / max(seen, 1)
    if bad <= max_bad_fraction:
        return None
    return (f"data.max_bad_fraction: {bad:.1%} of samples rejected ({rejected}), above {max_bad_fraction:.1%}; "
            "run `omni-ray data check` to see which and why, fix or drop them, or raise data.max_bad_fraction")
