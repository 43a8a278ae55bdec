"""One micro-batch, declared once: what the model takes, and what only the training loop reads.

``collate`` (padded rows), ``pack_row`` (samples end to end in one row) and ``collate_pairs``
(preference pairs) build a :class:`Batch`; ``train_step``, evaluation and the preference loss
read it through its members, and hand the engines ``model_inputs`` (never a key list of their own).

Everything not in :data:`LOOP_KEYS` is a model input: the per-token arrays of
:data:`TOKEN_PADDING` and the image arrays the model spec names (``pixel_values``,
``image_grid_thw``, ...), which differ from family to family.
"""

from __future__ import annotations

import torch

#: The label of a position that takes no loss (prompt, image and padding tokens): PyTorch's
#: cross-entropy ignore_index, as transformers uses it.
IGNORE_INDEX = -100

#: Per-token arrays [rows, tokens] and the value ``collate`` pads them with (input_ids: the tokenizer's pad).
TOKEN_PADDING = {"input_ids": 0, "labels": IGNORE_INDEX, "attention_mask": 0, "mm_token_type_ids": 0,
                 "token_type_ids": 0}

#: A packed row's per-sample lengths and image / video counts (``omni_ray.data.packing``).
PACKING_KEYS = ("seq_lens", "seq_images", "seq_videos")

#: Entries the loop reads and the model never receives as they are.
LOOP_KEYS = {
    "labels": "next-token targets, IGNORE_INDEX where no loss is taken (the loss reads them, not the model)",
    "num_label_tokens": "label positions in the batch (the step's loss is normalised by their sum)",
    "keep_alive": "1 when collate added the vision keep-alive row (a batch without images)",
    "pairs": "preference pairs in the batch: rows [0, P) chosen, [P, 2P) rejected (collate_pairs)",
    "seq_lens": "packed row: each sample's length",
    "seq_images": "packed row: each sample's image count",
    "seq_videos": "packed row: each sample's video count",
}


class Batch(dict):
    """A collated micro-batch (a dict of tensors, so it pickles and prints as one)."""

    @property
    def labels(self) -> torch.Tensor:
        return self["labels"]

    @property
    def label_tokens(self) -> int:
        return int(self["num_label_tokens"])

    @property
    def keep_alive(self) -> bool:
        return bool(int(self.get("keep_alive", 0)))

    @property
    def packed(self) -> bool:
        return "seq_lens" in self

    def model_inputs(self, device: torch.device | str | None = None) -> dict:
        """What the model's forward takes, on ``device`` (packed rows add positions: ``train.packing``)."""
        return {k: v if device is None else v.to(device) for k, v in self.items() if k not in LOOP_KEYS}

    def packing(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(seq_lens, seq_images, seq_videos) of a packed row."""
        return tuple(self[k] if device is None else self[k].to(device) for k in PACKING_KEYS)

    def samples(self) -> int:
        """Samples with at least one label token: one per row, or one per segment of a packed row."""
        labelled = self.labels != IGNORE_INDEX
        if not self.packed:
            return int(labelled.any(1).sum())
        return sum(int(part.any()) for part in torch.split(labelled[0], self["seq_lens"].tolist()))

    def real_tokens(self) -> int:
        """Tokens that are not padding (image tokens and keep-alive rows included)."""
        return int(self["attention_mask"].sum()) if "attention_mask" in self else self["input_ids"].numel()


__all__ = ["Batch", "IGNORE_INDEX", "LOOP_KEYS", "PACKING_KEYS", "TOKEN_PADDING"]
