"""The model side of packed rows (``omni_ray.data.packing``): what each architecture needs at forward time.

``packed_model_inputs`` turns a packed batch (already on the device) into the forward's keyword
arguments:

- ``use_cache=False`` and no ``attention_mask``: transformers looks for restarting position ids
  (and builds the block-diagonal mask) only when there is neither (``masking_utils``);
- ``cu_seq_lens_q/k``, ``max_length_q/k`` where the architecture may take them (``PackingRule``):
  flash-attention-2 runs varlen over the row;
- Qwen2-VL / 2.5-VL: the 3-D rope positions of each sample from the model's own
  ``get_rope_index``, concatenated, under a restarting text row (the [4, 1, T] layout the Qwen-VL
  text models read as "packed");
- layers whose state runs along the sequence (``RECURRENT_LAYERS``: Qwen3.5's Gated DeltaNet in
  MiniCPM-V 4.6/4.7) run once per sample of the row. Their PyTorch fallback takes no sequence
  boundaries (``torch_chunk_gated_delta_rule`` and ``causal_conv1d_fn`` ignore ``cu_seqlens``),
  so on a packed row the recurrent state and the causal conv1d window would carry one sample into
  the next. Running the layer per sample starts each with a zero state and a zero-padded
  window, exactly as the sample alone, with or without the fused kernels.
"""

from __future__ import annotations

import functools

import torch

from omni_ray.config import ConfigError
from omni_ray.data.batch import Batch
from omni_ray.data.packing import PACKING_RULES

RECURRENT_LAYERS = ("Qwen3_5GatedDeltaNet",)
"""Class names of layers with state along the sequence; checked in transformers 5.24 (qwen3_5)."""


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (the module holding ``config`` and ``get_rope_index``)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def packed_model_inputs(model: torch.nn.Module, batch: Batch, device: torch.device | str | None = None) -> dict:
    """Forward kwargs for one packed row (``batch.packed``), on ``device``."""
    base = base_model(model)
    model_type = base.config.model_type
    rule = PACKING_RULES.get(model_type)
    if rule is None:
        raise ConfigError(f"data.packing: not supported for {model_type!r} (supported: {sorted(PACKING_RULES)}); "
                          "set data.packing: false")
    seq_lens, seq_images, seq_videos = batch.packing(device)
    out = {k: v for k, v in batch.model_inputs(device).items() if k != "attention_mask"}
    out["use_cache"] = False
    recurrent = segment_recurrent_layers(base)
    if recurrent and not rule.varlen_kwargs:
        raise RuntimeError(f"{model_type}: recurrent layers find sample boundaries in cu_seq_lens_q; "
                           "its PackingRule must pass varlen_kwargs")
    if rule.mrope:
        out["position_ids"] = mrope_positions(base, out, seq_lens, seq_images, seq_videos)
    if rule.varlen_kwargs:
        out.update(varlen_kwargs(seq_lens))
    return out


def varlen_kwargs(seq_lens: torch.Tensor) -> dict:
    """flash-attention's varlen arguments for one row of sequences of these lengths."""
    cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int32, device=seq_lens.device)
    cu[1:] = torch.cumsum(seq_lens, 0)
    longest = int(seq_lens.max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def mrope_positions(model: torch.nn.Module, inputs: dict, seq_lens: torch.Tensor, seq_images: torch.Tensor,
                    seq_videos: torch.Tensor) -> torch.Tensor:
    """[4, 1, T]: a text row restarting per sample, then each sample's own 3-D rope positions.

    Each sample's images and videos are its own rows of ``image_grid_thw`` / ``video_grid_thw``, in
    order, so sample i's grids follow the images of the samples before it.
    """
    rope_owner = next(m for m in model.modules() if hasattr(m, "get_rope_index"))
    parts, start, image, video = [], 0, 0, 0
    for n, n_img, n_vid in zip(seq_lens.tolist(), seq_images.tolist(), seq_videos.tolist()):
        ids = inputs["input_ids"][:, start:start + n]
        if n_img or n_vid:
            grids = {"image_grid_thw": inputs["image_grid_thw"][image:image + n_img] if n_img else None,
                     "video_grid_thw": inputs["video_grid_thw"][video:video + n_vid] if n_vid else None}
            pos, _ = rope_owner.get_rope_index(input_ids=ids, attention_mask=None,
                                               mm_token_type_ids=inputs["mm_token_type_ids"][:, start:start + n],
                                               **grids)
        else:  # text only: the model's own default, one position per token on all three axes
            pos = torch.arange(n, device=ids.device).view(1, 1, n).expand(3, 1, n)
        parts.append(pos.to(ids.device))
        start, image, video = start + n, image + n_img, video + n_vid
    text = torch.cat([torch.arange(n, device=inputs["input_ids"].device) for n in seq_lens.tolist()])
    return torch.cat([text.view(1, 1, -1), torch.cat(parts, dim=-1)], dim=0)


def segment_recurrent_layers(model: torch.nn.Module) -> int:
    """Make every ``RECURRENT_LAYERS`` module run per sample when given ``cu_seq_lens_q``; idempotent.

    Returns how many such layers the model has. Only the instance's ``forward`` is replaced (the
    class is untouched), so FSDP2/ZeRO-3 hooks, LoRA on its projections and gradient
    checkpointing of the decoder layer around it work as before.
    """
    count = 0
    for module in model.modules():
        if type(module).__name__ in RECURRENT_LAYERS:
            count += 1
            if not getattr(module.forward, "omni_ray_per_sequence", False):
                module.forward = _per_sequence(module.forward)
    return count


def _per_sequence(forward):
    @functools.wraps(forward)
    def run(hidden_states, cache=None, attention_mask=None, **kwargs):
        bounds = kwargs.pop("cu_seq_lens_q", None)
        if bounds is None or hidden_states.shape[0] != 1:
            return forward(hidden_states=hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
        if cache is not None:
            raise RuntimeError("a packed row ran with a cache: packed rows are for training (use_cache=False)")
        for key in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
            kwargs.pop(key, None)
        bounds = bounds.tolist()
        outs = [forward(hidden_states=hidden_states[:, a:b], cache=None,
                        attention_mask=None if attention_mask is None else attention_mask[:, a:b], **kwargs)
                for a, b in zip(bounds[:-1], bounds[1:])]
        return torch.cat(outs, dim=1)

    run.omni_ray_per_sequence = True
    return run


__all__ = ["RECURRENT_LAYERS", "base_model", "mrope_positions", "packed_model_inputs", "segment_recurrent_layers",
           "varlen_kwargs"]
