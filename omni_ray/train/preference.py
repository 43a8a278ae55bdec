"""Preference objectives (DPO and its variants) over per-sequence log-probs, and those log-probs.

Pure tensors in, tensors out: nothing here touches a process group, an engine or Ray, so the
losses are tested against TRL's own code on the same numbers (tests/unit/test_dpo_losses.py).

**Log-probs without the [tokens, vocab] logits.** ``sequence_logps(hidden, weight, labels)``
gives each row's summed next-token log-probability over its label positions, chunk by chunk
of tokens like ``omni_ray.train.loss`` (only labelled positions are projected; the backward
recomputes each chunk's logits). ``head_logps`` makes the model's output projection return
those sums instead of logits for one forward, the way ``head_loss`` does for SFT, so FSDP2 and
ZeRO-3 gather a sharded head inside the forward as usual.

**Losses** (``Delta = (pi_c - ref_c) - (pi_r - ref_r)``, summed log-probs over answer tokens):

=========  ===========================================================================
sigmoid    DPO (Rafailov et al. 2023): ``-log s(beta Delta)``; with label_smoothing e,
           cDPO (Mitchell 2023): ``-(1-e) log s(beta Delta) - e log s(-beta Delta)``
robust     rDPO (Chowdhury et al. 2024): ``(-(1-e) log s(beta Delta) + e log s(-beta Delta)) / (1-2e)``
hinge      SLiC-style (Zhao et al. 2023): ``max(0, 1 - beta Delta)``
ipo        IPO (Azar et al. 2023, eq. 17): ``(Delta' - 1/(2 beta))^2`` where Delta' uses log-ratios
           averaged per answer token (as TRL does, confirmed by the IPO authors)
simpo      SimPO (Meng et al. 2024, eq. 6), no reference: ``-log s(beta (pi_c/|y_c| - pi_r/|y_r|) - gamma)``
           with gamma the target reward margin (``dpo.simpo_gamma``) and beta the reward scale
           (the paper uses beta 2.0-2.5, gamma 0.5-1.6); label_smoothing as in cDPO
=========  ===========================================================================

Rewards (logged) are ``beta (pi - ref)`` per answer, ``beta pi/|y|`` for SimPO; reward accuracy
is the fraction of pairs with the chosen reward strictly above the rejected one.

**sft_weight** adds the chosen answers' NLL as RPO does (Pang et al. 2024), normalised like the
SFT objective: summed over chosen answer tokens and divided by the chosen answer tokens of the
whole optimizer step on all ranks, so ``sft_weight: 1`` adds exactly the SFT loss of the chosen
halves (RPO's paper divides per answer by its length; the two agree when answers are equally
long; TRL's ``loss_type: [sigmoid, sft]`` is the same token mean).

**Normalisation in a step.** ``PairLoss`` keeps sums, so micro-batches and ranks add up: the
step divides the pair-loss sum by the pairs of the whole step on all ranks and the NLL sum by
the chosen tokens of the step (both all-reduced before the step, as SFT does with label
tokens), and multiplies by the world size because the engines average gradients over ranks:
``objective(...)`` does this.

**Wiring it into a run** (the next session; every piece named here exists and is unit-tested):

1. Validate (``launch/driver.py``): read the first records of ``data.train`` and ``data.eval``
   and raise ``ConfigError(pairs.objective_mismatch(records, cfg.train.objective, uri, key))`` when
   it returns a message. ``memory_estimate`` already passes ``dpo=`` / ``reference_free=``.
2. Read (``data/reader.py``): with ``objective: dpo`` normalise each record with
   ``pairs.normalize_pair`` instead of ``formats.normalize_record`` and carry ``prompt`` (JSON
   messages) plus ``chosen`` / ``rejected`` (strings) beside the row's media columns; rejects
   (``missing_response``, ``identical_responses``, ...) flow on as rejected rows, counted by reason.
3. Preprocess (``data/pipeline.Preprocess.process_row``): ``PairProcessor(processor,
   model_max_length, spec.image_inputs)(prompt, chosen, rejected, images, videos, tools)`` instead
   of ``SampleProcessor``; its arrays travel as one ``encode``d blob as SFT's do; ``num_tokens`` =
   both sides' tokens (``too_long`` when the prompt leaves no room for an answer).
4. Batch (``train/batches.Batcher``): ``micro_batch_size`` counts pairs; ``collate_pairs(pairs,
   spec.image_inputs, pad_id)`` lays out 2P rows [chosen_0..chosen_P-1, rejected_0..rejected_P-1]
   with each pair's pixels once and the per-image sizes twice. A vision keep-alive for an
   image-free pair batch is one extra *pair* whose labels are all IGNORE_INDEX (drop its two rows'
   log-probs before ``pair_loss``, e.g. ``PairLogps`` fields sliced to the real P).
5. Build (``train/loop.run``): after ``engine.wrap`` and ``setup_optimizer``, and BEFORE
   ``resume`` loads a checkpoint (the snapshot must hold the base values):
   ``reference = ReferencePolicy(engine.unwrapped(), reference_free=loss_type in REFERENCE_FREE)``.
   ZeRO-3: set ``stage3_param_persistence_threshold: 0`` in the generated DeepSpeed config (see
   ``omni_ray.train.reference``).
6. Count (``train/loop.run``): the all-reduce before a step sums ``batch["pairs"]`` and the chosen
   answer tokens (``answer_tokens(labels)[:P].sum()``) over the step's micro-batches on all ranks,
   instead of label tokens; ``step_pairs == 0`` on every rank ends the epoch as today.
7. Step (``train/step.train_step``), per micro-batch, instead of ``model_loss``::

       logps = pair_logps(engine.forward, engine.unwrapped(), batch, reference)  # ref forward first
       part = pair_loss(logps, dpo.loss_type, dpo.beta, dpo.label_smoothing, dpo.gamma())
       engine.backward(objective(part, dpo.sft_weight, step_pairs, step_chosen_tokens, world_size))

   and add ``part.metrics`` (sums) to the ``StepResult``. ``pair_logps`` runs ``shared_vision``
   (vision tower once per pair, inside the model's forward, so FSDP2 / ZeRO-3 gather as usual) and
   ``head_logps`` (no [tokens, vocab] logits), for the reference forward (no grad, eval, trained
   values swapped, adapters off) and the policy forward alike.
8. Report (``train/loop.Meter``): all-reduce the metric sums with the other totals and report
   ``mean_metrics(sums)``: ``loss`` (mean pair loss), ``rewards_chosen``, ``rewards_rejected``,
   ``rewards_margin``, ``rewards_accuracy``, ``logps_chosen``, ``logps_rejected``; the console,
   metrics.jsonl, TensorBoard and curves.png read them from the report like the SFT keys.
9. Eval (``train/evaluation.Evaluator``): over eval pairs, ``pair_logps`` under ``torch.no_grad()``
   and ``mean_metrics`` -> ``eval_rewards_accuracy``; the page shows each pair's two log-probs
   beside the greedy answer to its prompt.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from omni_ray.config import DPO_LOSS_TYPES as LOSS_TYPES, DPO_SMOOTHED as SMOOTHED
from omni_ray.data.batch import Batch
from omni_ray.data.conversation import IGNORE_INDEX
from omni_ray.train.loss import chunk_tokens, is_plain_head

#: Loss types without a reference policy (no reference forward, no snapshot).
REFERENCE_FREE = ("simpo",)


# --- per-sequence log-probs --------------------------------------------------------------------


class ChunkedLinearLogProbs(torch.autograd.Function):
    """log_softmax(hidden_i @ weight.T)[target_i] per row, chunk by chunk; recomputed in backward.

    hidden [N, H], weight [V, H], targets [N] -> [N] fp32. The matmul runs in the inputs' dtype
    and the softmax in fp32, as ``lm_head`` followed by ``logits.float()`` would.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):  # noqa: D102 - autograd protocol
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            logits = (hidden[start:start + chunk] @ weight.t()).float()
            out[start:start + chunk] = logits.log_softmax(-1).gather(1, targets[start:start + chunk, None])[:, 0]
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102 - autograd protocol
        hidden, weight, targets = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        hidden_parts, weight_sum = [], torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, hidden.shape[0], ctx.chunk):
            h, t = hidden[start:start + ctx.chunk], targets[start:start + ctx.chunk, None]
            g = grad_out[start:start + ctx.chunk, None].float()
            # d logp_t / d logits = onehot(t) - softmax, scaled by each row's incoming gradient.
            d_logits = torch.softmax((h @ weight.t()).float(), dim=-1).mul_(-g).scatter_add_(1, t, g).to(hidden.dtype)
            if want_hidden:
                hidden_parts.append(d_logits @ weight)
            if want_weight:  # summed in fp32: a bf16 head gets one rounding, not one per chunk
                weight_sum += (d_logits.t() @ h).float()
        grad_hidden = (torch.cat(hidden_parts) if hidden_parts else torch.zeros_like(hidden)) if want_hidden else None
        return grad_hidden, weight_sum.to(weight.dtype) if want_weight else None, None, None


def sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   chunk: int | None = None) -> torch.Tensor:
    """Summed next-token log-probs of each row's label positions: hidden [B, T, H], labels [B, T] -> [B] fp32."""
    targets = labels[:, 1:].to(hidden.device)
    rows = torch.arange(targets.shape[0], device=hidden.device)[:, None].expand_as(targets)
    keep = torch.ones_like(targets, dtype=torch.bool) if is_fake(hidden) else targets != IGNORE_INDEX
    h, t, row = hidden[:, :-1][keep], targets[keep].clamp_min(0), rows[keep]
    token = ChunkedLinearLogProbs.apply(h, weight, t, chunk or chunk_tokens(weight.shape[0]))
    return torch.zeros(targets.shape[0], dtype=torch.float32, device=hidden.device).index_add(0, row, token)


def logits_sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference: ``sequence_logps`` from full logits [B, T, V] (fp32 log-softmax)."""
    logp = logits[:, :-1].float().log_softmax(-1)
    target = labels[:, 1:].to(logits.device)
    keep = target != IGNORE_INDEX
    picked = logp.gather(-1, target.clamp_min(0)[..., None])[..., 0]
    return (picked * keep).sum(-1)


def answer_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Label tokens per row (the positions ``sequence_logps`` sums over): [B] int64."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(-1)


@contextlib.contextmanager
def head_logps(head: torch.nn.Module, labels: torch.Tensor, chunk: int | None = None):
    """Within the block, ``head(hidden)`` returns each row's summed label log-probs [B] instead of logits.

    As ``omni_ray.train.loss.head_loss``: the head still runs inside the model's forward (FSDP2 /
    ZeRO-3 gather it there); a head that is not a bias-free Linear keeps its own forward and the
    log-probs come from its full logits.
    """
    if is_plain_head(head):
        head.forward = lambda hidden: sequence_logps(hidden, head.weight, labels, chunk)
    else:
        original = head.forward
        head.forward = lambda hidden: logits_sequence_logps(original(hidden), labels)
    try:
        yield head
    finally:
        del head.forward


# --- one forward for both answers -------------------------------------------------------------


def _vision_module(model: torch.nn.Module) -> torch.nn.Module:
    """The inner VLM module whose forward calls ``get_image_features``: the innermost one holding the
    language model (the ...ForConditionalGeneration wrapper above it only delegates to it)."""
    found = [m for m in model.modules() if hasattr(type(m), "get_image_features") and hasattr(m, "language_model")]
    if not found:
        raise TypeError(f"{type(model).__name__} has no inner module with get_image_features and a language_model")
    return found[-1]


def _twice(features):
    """Features of the pairs' images, repeated for the rejected rows (per-image tuples or one tensor)."""
    pooled = features.pooler_output
    features.pooler_output = (torch.cat([pooled, pooled]) if isinstance(pooled, torch.Tensor)
                              else type(pooled)([*pooled, *pooled]) if isinstance(pooled, tuple) else [*pooled, *pooled])
    return features


@contextlib.contextmanager
def shared_vision(model: torch.nn.Module):
    """Within the block, a forward of a ``collate_pairs`` batch runs the vision tower once per pair.

    The batch holds each pair's pixels once and the per-image sizes twice (chosen rows, then
    rejected rows). The model's ``get_image_features(pixels, sizes, ...)`` / ``get_video_features``
    is called inside its forward (so FSDP2 and ZeRO-3 gather the vision weights as usual) with
    the first half of the sizes, and its features are returned twice: the chosen rows' image
    tokens take them first, the rejected rows' after, which is the order of the rows.
    """
    inner = _vision_module(model)
    patched = []
    for name in ("get_image_features", "get_video_features"):
        original = getattr(inner, name, None)
        if original is None:
            continue

        def once(pixels, sizes=None, *args, _original=original, **kwargs):
            sizes = sizes[: sizes.shape[0] // 2] if sizes is not None else None
            return _twice(_original(pixels, sizes, *args, **kwargs))

        setattr(inner, name, once)
        patched.append(name)
    try:
        yield model
    finally:
        for name in patched:
            delattr(inner, name)  # the class's method again


def pair_logps(forward, model: torch.nn.Module, batch: Batch, reference=None, device=None) -> PairLogps:
    """Policy (and reference) log-probs of a ``collate_pairs`` batch: one forward of its 2P rows each.

    ``forward(inputs)`` runs the (wrapped) model, e.g. ``engine.forward``; ``model`` is the unwrapped
    one (its output projection and vision module are patched for the block). ``reference`` is a
    ``ReferencePolicy`` (None for SimPO); its forward runs first, without gradients.
    """
    inputs = batch.model_inputs(device)
    labels, head = batch.labels, model.get_output_embeddings()
    ref = None
    if reference is not None:
        with reference.active(), shared_vision(model), head_logps(head, labels):
            ref = forward(inputs).logits.detach()
    with shared_vision(model), head_logps(head, labels):
        logps = forward(inputs).logits
    return PairLogps.split(logps, answer_tokens(labels).to(logps.device), ref)


# --- losses ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairLogps:
    """Per-pair summed answer log-probs ([P] fp32) and answer lengths ([P]); ``ref_*`` None for SimPO."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None

    @classmethod
    def split(cls, logps: torch.Tensor, tokens: torch.Tensor, ref: torch.Tensor | None = None) -> "PairLogps":
        """From one forward of 2P rows laid out [chosen_0..chosen_P-1, rejected_0..rejected_P-1]."""
        c, r = logps.chunk(2)
        ct, rt = tokens.chunk(2)
        rc, rr = ref.chunk(2) if ref is not None else (None, None)
        return cls(c, r, ct, rt, rc, rr)

    def first(self, pairs: int) -> "PairLogps":
        """The first ``pairs`` pairs (a batch's real ones, before its vision keep-alive pair)."""
        return PairLogps(*(t[:pairs] if t is not None else None for t in (
            self.chosen, self.rejected, self.chosen_tokens, self.rejected_tokens, self.ref_chosen, self.ref_rejected)))


@dataclass(frozen=True)
class PairLoss:
    """Sums over this micro-batch's pairs (add across micro-batches and ranks; divide for means)."""

    loss_sum: torch.Tensor
    """Sum of the per-pair preference losses (carries the graph)."""
    nll_sum: torch.Tensor
    """Chosen answers' summed NLL (carries the graph; weighted by dpo.sft_weight in ``objective``)."""
    metrics: dict[str, float]
    """Sums, detached: pairs, chosen_tokens, rewards_chosen, rewards_rejected, rewards_margin,
    rewards_correct, logps_chosen, logps_rejected."""


def pair_losses(logps: PairLogps, loss_type: str, beta: float, label_smoothing: float = 0.0,
                simpo_gamma: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss [P] and the chosen / rejected rewards [P] (not detached) for ``loss_type``."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r}: use one of {list(LOSS_TYPES)}")
    eps = label_smoothing
    if loss_type == "simpo":
        chosen = beta * logps.chosen / logps.chosen_tokens.clamp_min(1)
        rejected = beta * logps.rejected / logps.rejected_tokens.clamp_min(1)
        margin = chosen - rejected - simpo_gamma
        return -(1 - eps) * F.logsigmoid(margin) - eps * F.logsigmoid(-margin), chosen, rejected
    chosen_ratio = logps.chosen - logps.ref_chosen
    rejected_ratio = logps.rejected - logps.ref_rejected
    z = beta * (chosen_ratio - rejected_ratio)
    if loss_type == "sigmoid":
        loss = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    elif loss_type == "robust":
        loss = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        loss = torch.relu(1 - z)
    else:  # ipo: log-ratios averaged per answer token
        delta = (chosen_ratio / logps.chosen_tokens.clamp_min(1)
                 - rejected_ratio / logps.rejected_tokens.clamp_min(1))
        loss = (delta - 1 / (2 * beta)) ** 2
    return loss, beta * chosen_ratio, beta * rejected_ratio


def pair_loss(logps: PairLogps, loss_type: str, beta: float, label_smoothing: float = 0.0,
              simpo_gamma: float = 0.0) -> PairLoss:
    """The sums one micro-batch contributes: preference loss, chosen NLL and the metrics' sums."""
    loss, chosen_reward, rejected_reward = pair_losses(logps, loss_type, beta, label_smoothing, simpo_gamma)
    c, r = chosen_reward.detach(), rejected_reward.detach()
    metrics = {
        "pairs": float(loss.numel()),
        "chosen_tokens": float(logps.chosen_tokens.sum()),
        "rewards_chosen": float(c.sum()),
        "rewards_rejected": float(r.sum()),
        "rewards_margin": float((c - r).sum()),
        "rewards_correct": float((c > r).sum()),
        "logps_chosen": float(logps.chosen.detach().sum()),
        "logps_rejected": float(logps.rejected.detach().sum()),
    }
    return PairLoss(loss.sum(), -logps.chosen.sum(), metrics)


def objective(part: PairLoss, sft_weight: float, step_pairs: float, step_chosen_tokens: float,
              world_size: int = 1) -> torch.Tensor:
    """What a micro-batch backpropagates: its share of the step's mean pair loss (+ weighted chosen NLL).

    ``step_pairs`` / ``step_chosen_tokens``: pairs and chosen answer tokens of the whole optimizer
    step on all ranks; ``world_size`` undoes the engines' gradient averaging over ranks.
    """
    loss = part.loss_sum / max(step_pairs, 1.0)
    if sft_weight:
        loss = loss + sft_weight * part.nll_sum / max(step_chosen_tokens, 1.0)
    return loss * world_size


def mean_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Per-pair means of summed metrics (after adding micro-batches and all-reducing ranks)."""
    pairs = max(sums.get("pairs", 0.0), 1.0)
    out = {k: v / pairs for k, v in sums.items() if k not in ("pairs", "chosen_tokens", "rewards_correct")}
    out["rewards_accuracy"] = sums.get("rewards_correct", 0.0) / pairs
    return out


__all__ = ["ChunkedLinearLogProbs", "LOSS_TYPES", "PairLogps", "PairLoss", "REFERENCE_FREE", "SMOOTHED",
           "answer_tokens", "head_logps", "logits_sequence_logps", "mean_metrics", "objective", "pair_loss",
           "pair_losses", "sequence_logps", "shared_vision"]
