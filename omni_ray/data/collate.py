"""Batch processed samples: right-pad token arrays, concatenate image arrays.

Image inputs are concatenated along the dim the model spec names (MiniCPM-V packs all slices
of a batch into one row of patches; Qwen-VL stacks patch rows; LLaVA stacks images).

A batch without any image gets one extra row, the "vision keep-alive": a processed dummy image
sample whose labels are all ignored. It runs the vision path at zero weight, so under FSDP2 or
ZeRO-3 with a trainable vision encoder every rank takes part in the same collectives every step
(a rank that skipped the vision forward would hang the others) and the loss is unchanged.
"""

from __future__ import annotations

import numpy as np
import torch

from omni_ray.data.batch import TOKEN_PADDING, Batch
from omni_ray.data.conversation import IGNORE_INDEX


def _concat_padded(parts: list[np.ndarray], dim: int) -> np.ndarray:
    """Concatenate along ``dim``, zero-padding the other dims to the largest (LLaVA-OneVision's
    anyres tiles per image differ from sample to sample; the model slices each image's real ones)."""
    shape = np.max([p.shape for p in parts], axis=0)
    padded = []
    for p in parts:
        widths = [(0, 0 if d == dim % p.ndim else int(shape[d]) - p.shape[d]) for d in range(p.ndim)]
        padded.append(np.pad(p, widths) if any(w for _, w in widths) else p)
    return np.concatenate(padded, axis=dim)


def collate(samples: list[dict], image_inputs: dict[str, int], pad_token_id: int = 0,
            keep_alive: dict | None = None, pad_to_multiple: int = 1) -> Batch:
    samples = list(samples)
    needs_keep_alive = keep_alive is not None and not any(_has_vision(s) for s in samples)
    if needs_keep_alive:
        samples.append({**keep_alive, "labels": np.full_like(keep_alive["input_ids"], IGNORE_INDEX)})
    length = max(len(s["input_ids"]) for s in samples)
    length = -(-length // pad_to_multiple) * pad_to_multiple
    batch = Batch()
    token_keys = [k for k in TOKEN_PADDING if k in samples[0] or k == "attention_mask"]
    for key in token_keys:
        pad = pad_token_id if key == "input_ids" else TOKEN_PADDING[key]
        out = np.full((len(samples), length), pad, dtype=np.int64)
        for i, s in enumerate(samples):
            row = s["input_ids"] if key == "attention_mask" else s[key]
            out[i, : len(row)] = 1 if key == "attention_mask" else row
        batch[key] = torch.from_numpy(out)
    for key, dim in image_inputs.items():
        parts = [s[key] for s in samples if key in s and _has_vision(s)]
        if parts:
            batch[key] = torch.from_numpy(_concat_padded(parts, dim))
    batch["num_label_tokens"] = (batch["labels"] != IGNORE_INDEX).sum()
    batch["keep_alive"] = torch.tensor(int(needs_keep_alive))
    return batch


def _has_vision(sample: dict) -> bool:
    """The sample runs the vision tower: it has an image or a video (each carries its own pixel arrays)."""
    return int(sample.get("num_images", 0)) + int(sample.get("num_videos", 0)) > 0
