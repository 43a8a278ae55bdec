"""One optimizer step, the function training runs and the benchmarks time.

``train_step`` takes the micro-batches of one optimizer step on this rank and the number of
label tokens in the whole step on all ranks (the loop all-reduces it while checking that some
rank still has data), and returns what the step measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omni_ray.data.batch import Batch
from omni_ray.strategies.base import StepStats, Strategy
from omni_ray.train.loss import head_loss, token_loss_sum
from omni_ray.train.packing import packed_model_inputs


@dataclass(frozen=True)
class StepResult:
    loss_sum: float
    """Summed token loss of this rank's micro-batches (divide by label tokens for the mean)."""
    label_tokens: int
    samples: int
    """Samples with at least one label token (keep-alive rows and empty batches do not count)."""
    tokens: int
    """Real tokens processed (not padding), image tokens and keep-alive rows included."""
    keep_alive_batches: int
    stats: StepStats
    positions: int = 0
    """Sequence positions the model computed: rows x padded length, so ``tokens / positions`` is the
    useful fraction (1.0 when packed, lower for padded batches of mixed lengths)."""


def model_loss(engine: Strategy, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    """The token-sum loss of one micro-batch, computed inside the model's forward.

    The output projection returns the loss instead of the logits (``head_loss``: chunked, or
    liger's fused kernel on CUDA), so the [tokens, vocab] logits are never held. A model
    without a standard output projection (remote code) takes the loss from its full logits.
    """
    head = engine.unwrapped().get_output_embeddings()
    if head is None:
        return token_loss_sum(engine.forward(inputs).logits, labels)
    with head_loss(head, labels):
        return engine.forward(inputs).logits


def train_step(engine: Strategy, micro_batches: list[dict], step_tokens: float, world_size: int,
               device: torch.device) -> StepResult:
    """Forward and backward every micro-batch, then clip and update.

    Each micro-batch's token-sum loss is divided by ``step_tokens``, the label tokens of the
    whole optimizer step on all ranks, and multiplied by ``world_size`` because the engines
    average gradients over ranks: every token weighs the same whatever the batch split, the
    world size or the engine. Gradients are dropped at the start, not the end, so the freeze
    audit after the first step sees the real ones.
    """
    engine.zero_grad()
    loss_sum, label_tokens, samples, tokens, keep_alive, positions = 0.0, 0, 0, 0, 0, 0
    for batch in map(Batch, micro_batches):
        if batch.packed:  # omni_ray.data.packing: samples end to end in one row
            inputs = packed_model_inputs(engine.unwrapped(), batch, device)
        else:
            inputs = batch.model_inputs(device)
        loss = model_loss(engine, inputs, batch.labels)
        engine.backward(loss * world_size / max(step_tokens, 1.0))
        loss_sum += float(loss.detach())
        label_tokens += batch.label_tokens
        samples += batch.samples()
        tokens += batch.real_tokens()
        positions += batch["input_ids"].numel()
        keep_alive += int(batch.keep_alive)
    return StepResult(loss_sum, label_tokens, samples, tokens, keep_alive, engine.step(), positions)
