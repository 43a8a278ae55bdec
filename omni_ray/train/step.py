"""One optimizer step, the function training runs and the benchmarks time.

``train_step`` takes the micro-batches of one optimizer step on this rank and the number of
label tokens in the whole step on all ranks (the loop all-reduces it while checking that some
rank still has data), and returns what the step measured.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from omni_ray.config import Config, DpoConfig
from omni_ray.data.batch import Batch
from omni_ray.strategies.base import StepStats, Strategy
from omni_ray.train.loss import head_loss, token_loss_sum
from omni_ray.train.packing import packed_model_inputs
from omni_ray.train.preference import REFERENCE_FREE, answer_tokens, objective, pair_logps, pair_loss
from omni_ray.train.reference import ReferencePolicy


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
    metrics: dict[str, float] = field(default_factory=dict)
    """DPO: the preference metrics' sums (``preference.pair_loss``); empty for SFT."""


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


# --- the step by objective ---------------------------------------------------------------------


class SftStep:
    """``train.objective: sft``: the step is normalised by the label tokens of the whole step."""

    def counts(self, micro_batches: list[Batch]) -> list[float]:
        """What the loop sums over all ranks before the step."""
        return [sum(b.label_tokens for b in micro_batches)]

    def __call__(self, engine: Strategy, micro_batches: list[dict], counts: list[float], world_size: int,
                 device: torch.device) -> StepResult:
        return train_step(engine, micro_batches, counts[0], world_size, device)


@dataclass
class PreferenceStep:
    """``train.objective: dpo``: one forward of each micro-batch's 2P rows (and one of the reference
    before it), the pair loss normalised by the pairs of the whole step (``preference.objective``).

    Its ``StepResult`` counts pairs as samples and as ``label_tokens`` (so the reported ``loss`` is
    the mean pair loss) and carries the metrics' sums.
    """

    dpo: DpoConfig
    reference: ReferencePolicy | None

    @classmethod
    def build(cls, dpo: DpoConfig, engine: Strategy) -> "PreferenceStep":
        """Snapshot the reference now: after ``engine.wrap``, before a checkpoint is loaded into the model."""
        reference_free = dpo.loss_type in REFERENCE_FREE  # SimPO: no reference forward, no snapshot
        return cls(dpo, None if reference_free else ReferencePolicy(engine.unwrapped()))

    def counts(self, micro_batches: list[Batch]) -> list[float]:
        """Pairs and chosen answer tokens of this rank's micro-batches (the keep-alive pair has none)."""
        return [sum(int(b["pairs"]) for b in micro_batches),
                sum(int(answer_tokens(b.labels).chunk(2)[0].sum()) for b in micro_batches)]

    def __call__(self, engine: Strategy, micro_batches: list[dict], counts: list[float], world_size: int,
                 device: torch.device) -> StepResult:
        engine.zero_grad()
        dpo, (step_pairs, step_chosen_tokens) = self.dpo, counts
        loss_sum, pairs, tokens, keep_alive, positions, sums = 0.0, 0, 0, 0, 0, Counter()
        for batch in map(Batch, micro_batches):
            logps = pair_logps(engine.forward, engine.unwrapped(), batch, self.reference, device)
            logps = logps.first(int(batch["pairs"]))  # without the vision keep-alive pair
            part = pair_loss(logps, dpo.loss_type, dpo.beta, dpo.label_smoothing, dpo.gamma())
            engine.backward(objective(part, dpo.sft_weight, step_pairs, step_chosen_tokens, world_size))
            loss_sum += float(part.loss_sum.detach())
            sums.update(part.metrics)
            pairs += int(batch["pairs"])
            tokens += batch.real_tokens()
            positions += batch["input_ids"].numel()
            keep_alive += int(batch.keep_alive)
        return StepResult(loss_sum, pairs, pairs, tokens, keep_alive, engine.step(), positions, dict(sums))


def step_for_run(cfg: Config, engine: Strategy) -> SftStep | PreferenceStep:
    """The step of ``train.objective`` (built after the engine wrapped the model and before resume)."""
    return PreferenceStep.build(cfg.dpo, engine) if cfg.train.objective == "dpo" else SftStep()
