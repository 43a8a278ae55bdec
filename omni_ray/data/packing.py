"""Padding-free packing: whole samples laid end to end in rows of at most ``data.pack_tokens`` tokens.

A padded batch computes ``rows x longest`` positions; with a long-tailed length mix most of them
are padding. A packed row holds several samples one after another and nothing else. Each sample
stays a sample:

- position ids restart at 0 for every sample, and the row has no ``attention_mask``; transformers
  (``masking_utils.find_packed_sequence_indices``) then sees the restarts and builds a
  block-diagonal causal mask for sdpa/eager, and flash-attention-2 goes varlen (from the position
  ids, or from ``cu_seq_lens_q/k`` where the architecture may be given them: see ``PackingRule``);
- the label of each sample's first token is ignored, so the last token of one sample never
  learns to predict the next sample (the unpacked loss never takes a sample's first token either);
- a sample's images go along whole (their pixel arrays concatenate as in a padded batch) and a
  sample is never split, so an image's tokens never straddle two rows;
- layers with state along the sequence (MiniCPM-V 4.6's Gated DeltaNet linear attention and its
  causal conv1d) are run sample by sample on the packed row (``omni_ray.train.packing``).

    rows = pack_samples(samples, pack_tokens=4096, image_inputs=spec.image_inputs)
    train_step(engine, rows, step_tokens, world_size, device)

This module is pure (numpy + torch tensors, no model); the model side is ``omni_ray.train.packing``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from omni_ray.config import ConfigError
from omni_ray.data.batch import TOKEN_PADDING, Batch
from omni_ray.data.collate import _concat_padded, _has_vision
from omni_ray.data.conversation import IGNORE_INDEX

# Per-token arrays of a processed sample that a packed row concatenates (a packed row has no
# attention mask: position_ids and the sequence lengths mark the samples).
TOKEN_KEYS = tuple(k for k in TOKEN_PADDING if k != "attention_mask")


@dataclass(frozen=True)
class PackingRule:
    """What an architecture needs beyond restarting position ids (checked against transformers 5.24)."""

    varlen_kwargs: bool
    """Pass ``cu_seq_lens_q/k`` and ``max_length_q/k`` to the forward (flash-attention-2 varlen on GPU).
    Only where the vision encoder does not receive the text forward's keyword arguments: Qwen-VL and
    LLaVA hand them to their vision towers, whose own varlen attention would then take the text's
    boundaries. Those rely on flash-attention's detection of packed rows from the position ids."""
    mrope: bool = False
    """Rope positions are 3-D (temporal, height, width): the model's ``get_rope_index`` runs once per
    sample and the rows are concatenated, under a plain restarting row for the mask (4 x T in all)."""


PACKING_RULES: dict[str, PackingRule] = {
    # Qwen3.5 text layers: 1-D positions; the vision tower is called without the text kwargs.
    # (MiniCPM-V 4.7 is not here: it computes 3-D positions over its slice layout, not yet done per sample.)
    "minicpmv4_6": PackingRule(varlen_kwargs=True),
    "qwen2_vl": PackingRule(varlen_kwargs=False, mrope=True),
    "qwen2_5_vl": PackingRule(varlen_kwargs=False, mrope=True),
    "llava": PackingRule(varlen_kwargs=False),
    "qwen3_vl": PackingRule(varlen_kwargs=False, mrope=True),
    "internvl": PackingRule(varlen_kwargs=False),
    "idefics3": PackingRule(varlen_kwargs=False),
    "smolvlm": PackingRule(varlen_kwargs=False),
    "llava_onevision": PackingRule(varlen_kwargs=False),
}


def check_packing(arch: str, packing: bool) -> None:
    """Refuse ``data.packing`` for an architecture whose packed loss is not tested equal to the unpacked one."""
    if packing and arch not in PACKING_RULES:
        raise ConfigError(
            f"data.packing: not supported for {arch!r} (packing is tested equal to unpadded training only for "
            f"{sorted(PACKING_RULES)}); set data.packing: false")


def plan_rows(lengths: list[int], pack_tokens: int) -> list[list[int]]:
    """First fit in stream order: each sample goes into the first row with room, else a new row.

    Returns rows of sample indices, each row's samples in stream order. A sample longer than
    ``pack_tokens`` is an error (it would have to be cut or split, and neither is done silently).
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        if n > pack_tokens:
            raise ValueError(f"data.pack_tokens: a sample of {n} tokens does not fit a row of {pack_tokens}; "
                             "raise data.pack_tokens to at least data.model_max_length")
        for r, left in enumerate(room):
            if n <= left:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(pack_tokens - n)
    return rows


def pack_row(samples: list[dict], image_inputs: dict[str, int], keep_alive: dict | None = None) -> Batch:
    """One packed row [1, sum of lengths] from whole processed samples (numpy arrays, as collate takes).

    ``keep_alive``: a processed one-image sample appended (labels ignored) when no sample in the row
    has an image, so the vision tower runs in every forward (see ``omni_ray.data.collate``).
    """
    samples = list(samples)
    needs_keep_alive = keep_alive is not None and not any(_has_vision(s) for s in samples)
    if needs_keep_alive:
        samples.append({**keep_alive, "labels": np.full_like(keep_alive["input_ids"], IGNORE_INDEX)})
    lengths = [len(s["input_ids"]) for s in samples]
    batch = Batch()
    for key in (k for k in TOKEN_KEYS if k in samples[0]):
        batch[key] = torch.from_numpy(np.concatenate([np.asarray(s[key], dtype=np.int64) for s in samples]))[None]
    starts = np.cumsum([0, *lengths[:-1]])
    batch["labels"][0, torch.from_numpy(starts)] = IGNORE_INDEX  # no sample learns the next one's first token
    batch["position_ids"] = torch.from_numpy(np.concatenate([np.arange(n) for n in lengths]))[None]
    for key, dim in image_inputs.items():
        parts = [s[key] for s in samples if key in s and _has_vision(s)]
        if parts:
            batch[key] = torch.from_numpy(_concat_padded(parts, dim))
    batch["seq_lens"] = torch.tensor(lengths, dtype=torch.int64)
    batch["seq_images"] = torch.tensor([int(s.get("num_images", 0)) for s in samples], dtype=torch.int64)
    batch["seq_videos"] = torch.tensor([int(s.get("num_videos", 0)) for s in samples], dtype=torch.int64)
    batch["num_label_tokens"] = (batch["labels"] != IGNORE_INDEX).sum()
    batch["keep_alive"] = torch.tensor(int(needs_keep_alive))
    return batch


def pack_samples(samples: list[dict], pack_tokens: int, image_inputs: dict[str, int], *,
                 keep_alive: dict | None = None) -> list[Batch]:
    """Pack processed samples into rows of at most ``pack_tokens`` tokens: one batch dict per row.

    Each dict goes to ``train_step`` like a collated micro-batch. A row that needed the vision
    keep-alive sample is longer than ``pack_tokens`` by that sample's few tokens.
    """
    samples = list(samples)
    rows = plan_rows([len(s["input_ids"]) for s in samples], pack_tokens)
    return [pack_row([samples[i] for i in row], image_inputs, keep_alive) for row in rows]


__all__ = ["PACKING_RULES", "PackingRule", "check_packing", "pack_row",
           "pack_samples", "plan_rows"]
