"""Sequence parallelism (Ulysses): one sample's tokens split across a group of N ranks.

What happens in one forward under ``sequence_parallel(group, labels)``, for an architecture whose
spec says ``sequence_parallel=True`` (Qwen2.5-VL; see ``SUPPORTED``):

- the vision encoder's work is split: each rank of the group encodes a contiguous share of the
  batch's images (or videos), balanced by patch count, and the merged features are all-gathered
  (backward: summed over the group, then each rank keeps its own images' gradient);
- the model builds the whole sequence as usual: token embeddings, image features scattered in,
  M-RoPE position ids from ``get_rope_index`` over the whole sequence (packed rows: the [4, 1, T]
  positions of ``omni_ray.train.packing``);
- then, at the entry of the text model, each rank keeps its contiguous 1/N of the positions
  (the sequence is padded to a multiple of N first), and its share of the position ids;
- each attention layer goes through ``ulysses_attention``: an all-to-all turns the
  sequence-sharded q/k/v [B, H, T/N, D] into head-sharded [B, H/N, T, D], attention runs over
  the whole sequence for H/N heads (causal, block-diagonal on a packed row, padding keys masked),
  and a second all-to-all turns the output back. The heads (and the key/value heads, else they
  are repeated to the query heads first) must divide by N; ring attention is not implemented;
- the output projection sees this rank's T/N hidden states and the matching next-token targets,
  shifted on the whole sequence before the split, so no target is lost at a shard boundary. The
  loss returned is this rank's token sum; ``local_label_tokens`` is this rank's share of the
  label count, so summing both over the group gives the sample's sum and count.

Gradients: every parameter's gradient summed over the group equals the gradient of the whole
sequence on one rank (checked to 1e-4 in tests/dist/test_sequence_parallel.py). FSDP2's
reduce-scatter averages over the world and ``train_step`` multiplies by the world size, so the sum
is what it computes, as long as the step's label count counts each token once.

The hooks replace instance ``forward`` methods and register one attention function in
transformers' ``AttentionInterface`` (the text config's ``_attn_implementation`` names it and
wraps the original one), so FSDP2 hooks, LoRA and gradient checkpointing apply as before. Outside
``sequence_parallel(...)`` the model runs exactly as without the hooks (evaluation, generation).
Gradient checkpointing recomputes attention in the backward: run the backward inside the block.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from omni_ray.data.conversation import IGNORE_INDEX
from omni_ray.train.packing import base_model

PREFIX = "omni_ray_sp_"
"""Attention implementations registered here are named PREFIX + the wrapped one (``omni_ray_sp_sdpa``)."""


@dataclass(frozen=True)
class SPGroup:
    """The ranks that share one sample: this rank's index in the group and the group's size."""

    rank: int
    size: int
    group: dist.ProcessGroup | None = None
    """None: the default (world) group."""


@dataclass
class _Forward:
    """What the hooks of one forward share: set by the text model's entry, read by every attention layer."""

    sp: SPGroup
    targets: torch.Tensor | None = None
    """[B, T] next-token targets of the whole (padded) sequence; this rank's share after the split."""
    seq_len: int = 0
    """Padded whole-sequence length (a multiple of the group size)."""
    key_valid: torch.Tensor | None = None
    """[B, T] bool: real tokens (None: every position is real)."""
    segments: torch.Tensor | None = None
    """[B, T] sample index within a packed row (None: one sample per row)."""
    mask: torch.Tensor | None = None


_ACTIVE: list[_Forward] = []


def _active() -> _Forward | None:
    return _ACTIVE[-1] if _ACTIVE else None


# --- collectives with their gradients ---------------------------------------------------------


def _all_to_all(x: torch.Tensor, sp: SPGroup) -> torch.Tensor:
    """x [N, ...]: chunk j goes to rank j; the result's chunk i came from rank i."""
    x = x.contiguous()
    out = torch.empty_like(x)  # of a contiguous x: empty_like keeps a permuted input's strides
    dist.all_to_all_single(out, x, group=sp.group)
    return out


def _seq_to_heads(x: torch.Tensor, sp: SPGroup) -> torch.Tensor:
    """[B, H, T/N, D] (this rank's positions, all heads) -> [B, H/N, T, D] (all positions, this rank's heads)."""
    b, h, t, d = x.shape
    chunks = x.view(b, sp.size, h // sp.size, t, d).transpose(0, 1)  # [N, B, H/N, t, D]: heads for rank j
    got = _all_to_all(chunks, sp)  # got[i]: rank i's positions of my heads
    return got.permute(1, 2, 0, 3, 4).reshape(b, h // sp.size, sp.size * t, d)


def _heads_to_seq(x: torch.Tensor, sp: SPGroup) -> torch.Tensor:
    """The inverse of ``_seq_to_heads``: [B, H/N, T, D] -> [B, H, T/N, D]."""
    b, h, t, d = x.shape
    chunks = x.view(b, h, sp.size, t // sp.size, d).permute(2, 0, 1, 3, 4)  # [N, B, H/N, t, D]: positions of rank j
    got = _all_to_all(chunks, sp)  # got[i]: my positions of rank i's heads
    return got.transpose(0, 1).reshape(b, h * sp.size, t // sp.size, d)


class SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sp):  # noqa: D102 - autograd protocol
        ctx.sp = sp
        return _seq_to_heads(x, sp)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102 - autograd protocol
        return _heads_to_seq(grad, ctx.sp), None


class HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sp):  # noqa: D102 - autograd protocol
        ctx.sp = sp
        return _heads_to_seq(x, sp)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102 - autograd protocol
        return _seq_to_heads(grad, ctx.sp), None


class GatherRows(torch.autograd.Function):
    """Concatenate every rank's rows (ranks may hold different counts) in rank order.

    Backward: each rank's gradient for the gathered rows covers only the positions it kept after
    the split, so the gradients are summed over the group and each rank keeps its own rows.
    """

    @staticmethod
    def forward(ctx, x, counts, sp):  # noqa: D102 - autograd protocol
        ctx.sp, ctx.counts = sp, counts
        padded = x.new_zeros((max(counts), *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(sp.size)]
        dist.all_gather(parts, padded.contiguous(), group=sp.group)
        return torch.cat([p[:n] for p, n in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad):  # noqa: D102 - autograd protocol
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.sp.group)
        start = sum(ctx.counts[: ctx.sp.rank])
        return grad[start:start + ctx.counts[ctx.sp.rank]], None, None


# --- the split --------------------------------------------------------------------------------


def shard_bounds(length: int, sp: SPGroup) -> tuple[int, int]:
    """This rank's positions [start, end) of a sequence padded to ``length`` (a multiple of the size)."""
    per = length // sp.size
    return sp.rank * per, (sp.rank + 1) * per


def padded_length(length: int, size: int) -> int:
    return -(-length // size) * size


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """[B, T]: the label each position predicts (the next one), IGNORE_INDEX at the end."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)


def local_label_tokens(labels: torch.Tensor, sp: SPGroup) -> int:
    """Label tokens this rank's share of the sequence predicts; the group's sum is the sample's count."""
    targets = next_token_targets(labels)
    targets = _pad_to(targets, padded_length(targets.shape[1], sp.size), IGNORE_INDEX)
    start, end = shard_bounds(targets.shape[1], sp)
    return int((targets[:, start:end] != IGNORE_INDEX).sum())


def _pad_to(x: torch.Tensor, length: int, value, dim: int = 1) -> torch.Tensor:
    missing = length - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_full(shape, value)], dim=dim)


def _split_inputs(fwd: _Forward, inputs_embeds: torch.Tensor, position_ids: torch.Tensor | None,
                  attention_mask: torch.Tensor | None, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Record the whole sequence's mask facts in ``fwd``; return this rank's embeddings and position ids."""
    b, t = inputs_embeds.shape[:2]
    length = padded_length(t, fwd.sp.size)
    if position_ids is None:  # the text model's own default: one position per token on every axis
        position_ids = torch.arange(t, device=inputs_embeds.device).view(1, 1, t).expand(3, b, t)
    elif position_ids.ndim == 2:
        position_ids = position_ids[None].expand(3, *position_ids.shape)
    packed = position_ids.shape[0] == 4  # a text row restarting per sample, then the 3-D positions
    if packed:
        text = position_ids[0]
        # padding is one more segment, restarting at 0, so it attends only to itself
        pad_pos = torch.arange(length - t, device=text.device).expand(b, -1)
        text = torch.cat([text, pad_pos], dim=1)
        fwd.segments = torch.cumsum((text == 0).int(), dim=1)
    if (attention_mask is not None and not bool(attention_mask.all())) or (length > t and not packed):
        valid = torch.ones(b, t, dtype=torch.bool, device=inputs_embeds.device) if attention_mask is None \
            else attention_mask.bool()
        fwd.key_valid = _pad_to(valid, length, False)
    for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):  # this rank's would be wrong
        kwargs.pop(key, None)  # the segments above say the same for the whole sequence
    fwd.seq_len = length
    start, end = shard_bounds(length, fwd.sp)
    embeds = _pad_to(inputs_embeds, length, 0.0)[:, start:end]
    pos = position_ids
    if length > t:  # padded positions continue each axis
        extra = pos[..., -1:] + torch.arange(1, length - t + 1, device=pos.device)
        if packed:
            extra[0] = torch.arange(length - t, device=pos.device)
        pos = torch.cat([pos, extra], dim=-1)
    if fwd.targets is not None:
        fwd.targets = _pad_to(fwd.targets, length, IGNORE_INDEX)[:, start:end]
    return embeds, pos[..., start:end]


def _text_entry(forward):
    """The text model's forward: under ``sequence_parallel`` it runs on this rank's share of the sequence."""

    @functools.wraps(forward)
    def run(*args, inputs_embeds=None, attention_mask=None, position_ids=None, **kwargs):
        fwd = _active()
        if fwd is None or inputs_embeds is None:
            return forward(*args, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                           position_ids=position_ids, **kwargs)
        if kwargs.get("use_cache"):
            raise RuntimeError("sequence parallelism is for training: run the forward with use_cache=False")
        embeds, pos = _split_inputs(fwd, inputs_embeds, position_ids, attention_mask, kwargs)
        # A dict of masks is taken as built: none are, ulysses_attention builds the whole sequence's.
        no_masks = {"full_attention": None, "sliding_attention": None}
        return forward(*args, inputs_embeds=embeds, attention_mask=no_masks, position_ids=pos, **kwargs)

    run.omni_ray_sequence_parallel = True
    return run


# --- attention ---------------------------------------------------------------------------------


def _whole_mask(fwd: _Forward, device: torch.device) -> torch.Tensor | None:
    """[B, 1, T, T] bool over the whole sequence, or None when plain causal attention is exact."""
    if fwd.segments is None and fwd.key_valid is None:
        return None
    if fwd.mask is None:
        t = fwd.seq_len
        mask = torch.ones(t, t, dtype=torch.bool, device=device).tril()[None]
        if fwd.segments is not None:
            mask = mask & (fwd.segments[:, :, None] == fwd.segments[:, None, :]).to(device)
        if fwd.key_valid is not None:
            mask = mask & fwd.key_valid[:, None, :].to(device)
        fwd.mask = mask[:, None]
    return fwd.mask


def _inner_attention(q, k, v, fwd: _Forward, dropout: float, scaling: float | None) -> torch.Tensor:
    """Attention over the whole sequence for this rank's heads: [B, H/N, T, D] -> [B, T, H/N, D].

    PyTorch's sdpa whatever the model's own implementation: plain causal (its flash kernel on
    GPU) unless the row is packed or padded, then with the whole sequence's boolean mask
    ([B, 1, T, T]: 256 MiB per row at 16k tokens). flash-attention varlen here is not done yet.
    """
    if k.shape[1] != q.shape[1]:  # grouped key/value heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    mask = _whole_mask(fwd, q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None,
                                         scale=scaling)
    return out.transpose(1, 2).contiguous()


def _ulysses(inner: str):
    """The attention function registered as PREFIX + inner."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                  **kwargs):
        fwd = _active()
        if fwd is None:  # not under sequence_parallel: the wrapped implementation, as before the hooks
            fn = _eager(module) if inner == "eager" else ALL_ATTENTION_FUNCTIONS[inner]
            return fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        sp = fwd.sp
        if key.shape[1] % sp.size:  # key/value heads do not divide: give every query head its own
            key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
            value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
        q, k, v = (SeqToHeads.apply(x, sp) for x in (query, key, value))
        out = _inner_attention(q, k, v, fwd, dropout, scaling)  # [B, T, H/N, D]
        out = HeadsToSeq.apply(out.transpose(1, 2), sp)  # [B, H, T/N, D]
        return out.transpose(1, 2).contiguous(), None

    return attention


def _eager(module):
    """The model's own eager attention (each modeling file defines one)."""
    import sys

    return sys.modules[type(module).__module__].eager_attention_forward


def _register(inner: str) -> str:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import AttentionInterface

    name = PREFIX + inner
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _ulysses(inner))
        # Outside sequence_parallel the model builds the mask the wrapped implementation expects.
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    return name


# --- vision ------------------------------------------------------------------------------------


def image_shares(patches: list[int], size: int) -> list[tuple[int, int]]:
    """Contiguous image ranges [lo, hi) per rank, each non-empty, balanced by patch count (pure)."""
    total, bounds, acc, i = sum(patches), [0], 0, 0
    for r in range(1, size):
        target = total * r / size
        while i < len(patches) - (size - r) and (acc + patches[i] <= target or i < bounds[-1] + 1):
            acc += patches[i]
            i += 1
        bounds.append(i)
    bounds.append(len(patches))
    return list(zip(bounds[:-1], bounds[1:]))


def _vision_entry(forward, merge: int):
    """The vision encoder's forward: under ``sequence_parallel`` each rank encodes its share of the images."""

    @functools.wraps(forward)
    def run(hidden_states, grid_thw, **kwargs):
        fwd = _active()
        if fwd is None or len(grid_thw) < fwd.sp.size:  # fewer images than ranks: every rank encodes all
            return forward(hidden_states, grid_thw, **kwargs)
        patches = grid_thw.prod(-1).tolist()
        shares = image_shares(patches, fwd.sp.size)
        lo, hi = shares[fwd.sp.rank]
        start, end = sum(patches[:lo]), sum(patches[:hi])
        out = forward(hidden_states[start:end], grid_thw[lo:hi], **kwargs)
        counts = [sum(patches[a:b]) // merge**2 for a, b in shares]
        out.pooler_output = GatherRows.apply(out.pooler_output, counts, fwd.sp)
        out.last_hidden_state = None  # this rank's patches only: nothing downstream reads it
        return out

    run.omni_ray_sequence_parallel = True
    return run


# --- validate ----------------------------------------------------------------------------------


def check_sequence_parallel(n: int, spec, hf_config: dict) -> None:
    """Refuse ``strategy.sequence_parallel: n`` for an architecture or head count it cannot run (pure)."""
    from omni_ray.config import ConfigError
    from omni_ray.models.spec import all_specs

    if n == 1:
        return
    if not spec.sequence_parallel:
        have = sorted(s.name for s in all_specs() if s.sequence_parallel)
        why = spec.sequence_parallel_blocker or "its layers have no sequence-parallel hooks yet"
        raise ConfigError(f"strategy.sequence_parallel: {n} is not supported for {spec.name}: {why}. Architectures "
                          f"with sequence parallelism: {have}; set strategy.sequence_parallel: 1 to train "
                          f"{spec.name} without it")
    text = hf_config.get("text_config", hf_config)
    heads = text.get("num_attention_heads")  # key/value heads that do not divide are repeated at run time
    if heads and heads % n:
        fits = [d for d in range(1, heads + 1) if heads % d == 0]
        raise ConfigError(f"strategy.sequence_parallel: {n} does not divide the {heads} attention heads (Ulysses gives "
                          f"each rank heads/N of them; ring attention is not implemented); set it to one of {fits}")
    # The hooks below are tested (N ranks give one rank's loss and gradients); what is missing is
    # the loop's side: giving the N ranks of a group the same batches, label counts once per group.
    raise ConfigError(f"strategy.sequence_parallel: {n} checks out for {spec.name}, but the training loop does not run "
                      "sequence parallelism yet (the model side, omni_ray.train.sequence, is there and tested); set "
                      "strategy.sequence_parallel: 1")


# --- entry points ------------------------------------------------------------------------------


SUPPORTED = ("Qwen2_5_VLModel",)
"""Classes whose text model, attention and vision encoder the hooks above were checked against
(transformers 5.24)."""


def enable_sequence_parallel(model: torch.nn.Module, size: int) -> None:
    """Install the hooks on ``model`` (peft-wrapped or not) for groups of ``size`` ranks; idempotent."""
    base = base_model(model)
    inner = next((m for m in base.modules() if type(m).__name__ in SUPPORTED), None)
    if inner is None:
        raise ValueError(f"strategy.sequence_parallel: {type(base).__name__} has no sequence-parallel hooks "
                         f"(supported: {list(SUPPORTED)}); set strategy.sequence_parallel: 1")
    text = inner.language_model
    heads = text.config.num_attention_heads
    if heads % size:
        raise ValueError(f"strategy.sequence_parallel: {heads} attention heads do not divide by {size} "
                         "(Ulysses gives each rank heads/N heads; ring attention is not implemented); pick N "
                         f"among {[n for n in range(1, heads + 1) if heads % n == 0]}")
    if not text.config._attn_implementation.startswith(PREFIX):
        text.config._attn_implementation = _register(text.config._attn_implementation)
    if not getattr(text.forward, "omni_ray_sequence_parallel", False):
        text.forward = _text_entry(text.forward)
    visual = inner.visual
    if not getattr(visual.forward, "omni_ray_sequence_parallel", False):
        visual.forward = _vision_entry(visual.forward, visual.spatial_merge_size)


@contextlib.contextmanager
def sequence_parallel(sp: SPGroup, labels: torch.Tensor | None = None):
    """Forwards (and backwards) in the block run sequence-parallel over ``sp``.

    With ``labels`` [B, T] (the whole sequence's), ``shard_targets()`` inside the block gives
    this rank's next-token targets after the forward.
    """
    fwd = _Forward(sp, None if labels is None else next_token_targets(labels))
    _ACTIVE.append(fwd)
    try:
        yield fwd
    finally:
        _ACTIVE.remove(fwd)


def shard_loss(logits_or_hidden: torch.Tensor, head: torch.nn.Module | None, targets: torch.Tensor) -> torch.Tensor:
    """Token-sum cross-entropy of this rank's positions against their (already shifted) targets."""
    keep = targets != IGNORE_INDEX
    rows = logits_or_hidden[keep]
    logits = rows if head is None else head(rows)
    return F.cross_entropy(logits.float(), targets[keep].to(logits.device), reduction="sum")


def sp_loss(model: torch.nn.Module, inputs: dict, labels: torch.Tensor, sp: SPGroup) -> torch.Tensor:
    """This rank's token-sum loss of one (possibly packed) batch split over ``sp``.

    Call inside ``sequence_parallel(sp, labels)``; the output projection runs only on this rank's
    labelled positions (the [tokens, vocab] logits of the whole sequence are never held).
    """
    fwd = _active()
    if fwd is None or fwd.sp is not sp:
        raise RuntimeError("sp_loss: call inside `with sequence_parallel(sp, labels)`")
    unwrapped = base_model(model)
    head = unwrapped.get_output_embeddings()
    head.forward = lambda hidden: hidden  # the hidden states come out; the loss takes only labelled rows
    try:
        hidden = model(**inputs).logits
    finally:
        del head.forward  # the class's forward again
    return shard_loss(hidden, head, fwd.targets)


__all__ = ["SPGroup", "SUPPORTED", "enable_sequence_parallel", "image_shares", "local_label_tokens",
           "next_token_targets", "sequence_parallel", "shard_bounds", "sp_loss"]
