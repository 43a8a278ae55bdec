"""Tokenise one preference pair: the prompt rendered once, its images processed once, two answers.

Each side is what SFT trains on for ``prompt + answer`` (``SampleProcessor``: the model's own chat
template, its processor, labels on the answer and its end-of-turn token), so the chosen ids equal
``processor.apply_chat_template(prompt + [chosen], tokenize=True)`` and likewise the rejected ones
(tests/unit/test_dpo_pairs.py checks both on MiniCPM-V 4.6 and Qwen2.5-VL).

The images are processed once per pair: the chosen side runs the real processor, which expands
each placeholder into its image's token string (``text_replacement_offsets[...]["replacement"]``);
the rejected side replays those strings into its own rendered text and runs only the tokenizer,
which is what the processor itself does after expanding. A processor that does not report its
replacements (a custom ``__call__``) gets the rejected side processed in full: correct, slower.

Truncation: the prompt is never cut (so its image tokens never are); both answers are cut to the
same ``model_max_length`` (identical prompts, so both keep the same number of leading positions);
a prompt that leaves no room for one answer token is ``too_long``.

Output (numpy arrays, one dict per pair; ``encode``/``decode`` carry it through Ray Data)::

    chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels   [T_c], [T_r]
    (chosen_|rejected_)mm_token_type_ids / token_type_ids                  when the processor gives them
    pixel arrays (spec.image_inputs keys: pixel_values, image_grid_thw, target_sizes ...)   once
    num_images, num_videos, prompt_tokens, truncated (answer tokens cut, summed over both sides)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from omni_ray.data.batch import TOKEN_PADDING, Batch
from omni_ray.data.conversation import IGNORE_INDEX, SampleProcessor
from omni_ray.data.errors import DataError

_TOKEN_KEYS = tuple(k for k in TOKEN_PADDING if k != "attention_mask")  # a processed sample has no mask


class _Recorder:
    """The processor, remembering its last output (the chosen side's replacements and pixels)."""

    def __init__(self, processor):
        self.processor = processor
        self.last = None

    def __getattr__(self, name):
        return getattr(self.processor, name)

    def __call__(self, **kwargs):
        self.last = self.processor(**kwargs)
        return self.last


class _Replay:
    """The processor for the rejected side: the recorded replacement strings instead of image processing."""

    def __init__(self, processor):
        self.processor = processor
        self.recorded = None

    def __getattr__(self, name):
        return getattr(self.processor, name)

    def __call__(self, text, images=None, videos=None, do_sample_frames=None, return_text_replacement_offsets=False,
                 **kwargs):
        offsets = self.recorded["text_replacement_offsets"][0]
        by_type = {kind: [r["replacement"] for r in offsets if r["type"] == kind] for kind in ("image", "video")}
        expanded, new_offsets = self.processor.get_text_with_replacements(list(text), by_type["image"],
                                                                         by_type["video"], [])
        out = dict(self.processor.tokenizer(expanded, **kwargs))
        out["text_replacement_offsets"] = new_offsets
        if "mm_token_type_ids" in self.recorded:
            out["mm_token_type_ids"] = np.asarray(self.processor.create_mm_token_type_ids(out["input_ids"]))
        return out


def _replayable(out) -> bool:
    offsets = out.get("text_replacement_offsets") if out is not None else None
    return bool(offsets) and all("replacement" in r for r in offsets[0])


@dataclass
class PairProcessor:
    """Callable: (prompt, chosen, rejected, images, videos, tools) -> the pair's arrays (module docstring)."""

    processor: object
    model_max_length: int
    image_inputs: dict[str, int]

    def __post_init__(self):
        self._recorder, self._replay = _Recorder(self.processor), _Replay(self.processor)
        # No length limit inside: the pair is cut here, answers alike, never the prompt.
        self.checks = SampleProcessor(self.processor, 1 << 30, self.image_inputs)
        self._chosen = SampleProcessor(self._recorder, 1 << 30, self.image_inputs)
        self._rejected = SampleProcessor(self._replay, 1 << 30, self.image_inputs)

    def __call__(self, prompt: list[dict], chosen: str, rejected: str, images: list, videos: list | None = None,
                 tools: list | None = None) -> dict:
        videos = list(videos or [])
        self.checks._check_inputs([*prompt, {"role": "assistant", "content": chosen}], images, videos)  # noqa: SLF001
        sides = {"chosen": self._chosen._run([*prompt, {"role": "assistant", "content": chosen}],  # noqa: SLF001
                                             images, videos, tools)}
        rejected_turns = [*prompt, {"role": "assistant", "content": rejected}]
        if _replayable(self._recorder.last) and (images or videos):
            self._replay.recorded = self._recorder.last
            sides["rejected"] = self._rejected._run(rejected_turns, images, videos, tools)  # noqa: SLF001
        else:  # text only, or a processor that does not report its replacements
            sides["rejected"] = self.checks._run(rejected_turns, images, videos, tools)  # noqa: SLF001
        return self._finish(sides, len(images), len(videos))

    def _finish(self, sides: dict[str, dict], n_images: int, n_videos: int) -> dict:
        starts = [int(np.argmax(s["labels"] != IGNORE_INDEX)) for s in sides.values()]
        if any(not (s["labels"] != IGNORE_INDEX).any() for s in sides.values()):
            raise DataError("missing_response", "an answer renders to no tokens to learn from")
        prompt_tokens = min(starts)
        chosen, rejected = sides["chosen"], sides["rejected"]
        if not np.array_equal(chosen["input_ids"][:prompt_tokens], rejected["input_ids"][:prompt_tokens]):
            raise DataError("malformed_conversation", "the chat template renders the prompt differently before "
                            "the two answers")
        if prompt_tokens + 1 > self.model_max_length:
            raise DataError("too_long", f"the prompt alone is {prompt_tokens} tokens "
                            f"({self.checks.visual_tokens(chosen['input_ids'])} of them image/video tokens), leaving no "
                            f"room for an answer within model_max_length={self.model_max_length}; raise "
                            "data.model_max_length, or lower model.max_slice_nums / data.video_max_frames")
        out, cut = {}, 0
        for side, arrays in sides.items():
            cut += int((arrays["labels"][self.model_max_length:] != IGNORE_INDEX).sum())
            for key in _TOKEN_KEYS:
                if key in arrays:
                    out[f"{side}_{key}"] = arrays[key][: self.model_max_length]
        out.update({k: v for k, v in chosen.items() if k in self.image_inputs})
        out["num_images"], out["num_videos"] = np.array(n_images), np.array(n_videos)
        out["prompt_tokens"], out["truncated"] = np.array(prompt_tokens), np.array(cut)
        return out


__all__ = ["PER_IMAGE_KEYS", "PairProcessor", "collate_pairs"]


# --- batches of pairs ---------------------------------------------------------------------------

#: Per-image (per-frame) size arrays: the language model needs one entry per image *occurrence* in
#: the rows (Qwen-VL's 3-D rope positions), so they are repeated for the rejected rows; the pixels
#: are not (``omni_ray.train.preference.shared_vision`` runs the vision tower on them once).
PER_IMAGE_KEYS = ("image_grid_thw", "video_grid_thw", "target_sizes", "target_sizes_videos")


def collate_pairs(pairs: list[dict], image_inputs: dict[str, int], pad_token_id: int = 0,
                  pad_to_multiple: int = 1) -> Batch:
    """One batch of 2P rows, [chosen_0 .. chosen_P-1, rejected_0 .. rejected_P-1], pixels once.

    Token arrays are padded as SFT's ``collate`` pads them; ``pairs`` = P. Pixel arrays hold each
    pair's images once (in pair order); the per-image size arrays (``PER_IMAGE_KEYS``) are given
    for the chosen rows and repeated for the rejected rows, in row order.
    """
    from omni_ray.data.collate import _concat_padded, collate

    rows = [{k.removeprefix(f"{side}_"): v for k, v in p.items() if k.startswith(f"{side}_")}
            for side in ("chosen", "rejected") for p in pairs]
    batch = collate(rows, {}, pad_token_id, pad_to_multiple=pad_to_multiple)
    with_media = [p for p in pairs if int(p.get("num_images", 0)) + int(p.get("num_videos", 0)) > 0]
    for key, dim in image_inputs.items():
        parts = [p[key] for p in with_media if key in p]
        if parts:
            joined = _concat_padded(parts, dim)
            batch[key] = torch.from_numpy(np.concatenate([joined, joined], axis=dim) if key in PER_IMAGE_KEYS
                                          else joined)
    batch["pairs"] = torch.tensor(len(pairs))
    return batch
