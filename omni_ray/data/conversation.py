"""Turn one normalized sample into model inputs: chat template, image processing, labels.

The model's own processor does the image work (slicing, resizing, placeholder expansion), so
what the model sees here is what it sees at inference. On top of it:

* labels cover the assistant turns only (each answer and the end-of-turn token after it);
* truncation is image-safe: a sample over ``model_max_length`` loses whole trailing rounds
  (user + assistant), never part of an image's tokens; when even the first round does not fit
  the sample is rejected with ``too_long`` instead of being cut or silently replaced.

Processed samples travel through Ray Data as one binary column (``encode``/``decode``: numpy
``.npz`` without pickle), because image tensors differ in shape from sample to sample.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from omni_ray.data.errors import DataError
from omni_ray.data.formats import IMAGE_PLACEHOLDER

IGNORE_INDEX = -100
TOKEN_KEYS = ("input_ids", "labels", "attention_mask", "mm_token_type_ids", "token_type_ids")


def encode(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def decode(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _rounds(messages: list[dict]) -> list[int]:
    """Message counts at which a round (ending in an assistant turn) closes."""
    return [i + 1 for i, m in enumerate(messages) if m["role"] == "assistant"]


def _first_row(value) -> list:
    """Row 0 of a batched processor output that may be absent, a list, or an (empty) numpy array."""
    return list(value[0]) if value is not None and len(value) else []


@dataclass
class SampleProcessor:
    """Callable: (messages, images) -> dict of numpy arrays for one sample.

    ``image_inputs`` are the processor outputs that carry pixels (from the model spec).
    """

    processor: object
    model_max_length: int
    image_inputs: dict[str, int]

    def __post_init__(self):
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.image_token = getattr(self.processor, "image_token", None) or IMAGE_PLACEHOLDER
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self._end_markers = sorted({t for t in self.tokenizer.all_special_tokens if t}, key=len, reverse=True)

    def render(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """Chat-template text and the character spans the loss is taken on."""
        messages = [{**m, "content": m["content"].replace(IMAGE_PLACEHOLDER, self.image_token)} for m in messages]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        spans, pos = [], 0
        for m in messages:
            start = text.find(m["content"], pos)
            if start < 0:  # a template that rewrites content (strips, escapes) cannot be labelled safely
                raise DataError("malformed_conversation", "chat template does not reproduce a turn's text")
            end = start + len(m["content"])
            pos = end
            if m["role"] == "assistant":
                marker = next((t for t in self._end_markers if text.startswith(t, end)), "")
                spans.append((start, end + len(marker)))
        return text, spans

    def _run(self, messages: list[dict], images: list) -> dict:
        text, spans = self.render(messages)
        kwargs = dict(text=[text], return_tensors="np", return_offsets_mapping=True,
                      return_text_replacement_offsets=True)
        if images:
            kwargs["images"] = [images]
        out = self.processor(**kwargs)
        # Shift assistant spans from the template text into the placeholder-expanded text.
        shifts = [(r["span"][1], (r["new_span"][1] - r["new_span"][0]) - (r["span"][1] - r["span"][0]))
                  for r in _first_row(out.get("text_replacement_offsets"))]
        expanded = [(s + sum(d for e, d in shifts if e <= s), t + sum(d for e, d in shifts if e <= t)) for s, t in spans]
        ids = np.asarray(out["input_ids"][0], dtype=np.int64)
        offsets = np.asarray(out["offset_mapping"][0])
        in_answer = np.zeros(len(ids), dtype=bool)
        for s, t in expanded:
            in_answer |= (offsets[:, 0] >= s) & (offsets[:, 1] <= t) & (offsets[:, 1] > offsets[:, 0])
        labels = np.where(in_answer, ids, IGNORE_INDEX)
        result = {"input_ids": ids, "labels": labels}
        for key in ("mm_token_type_ids", "token_type_ids"):  # Gemma 3 marks image tokens in token_type_ids
            if key in out:
                result[key] = np.asarray(out[key][0], dtype=np.int64)
        for key in self.image_inputs:
            if images and key in out:
                result[key] = np.asarray(out[key])
        return result

    def __call__(self, messages: list[dict], images: list) -> dict:
        full = self._run(messages, images)
        if len(full["input_ids"]) <= self.model_max_length:
            return self._finish(full, len(images), dropped=0)
        # Too long: keep the longest prefix of whole rounds that fits. The images of the rounds
        # that remain are exactly the first k placeholders, so pixels and tokens stay matched.
        rounds = _rounds(messages)
        for keep in range(len(rounds) - 1, 0, -1):
            kept = messages[: rounds[keep - 1]]
            n_images = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in kept)
            part = self._run(kept, images[:n_images])
            if len(part["input_ids"]) <= self.model_max_length:
                return self._finish(part, n_images, dropped=len(rounds) - keep)
        n_image_tokens = int((full["input_ids"] == self.image_token_id).sum())
        raise DataError(
            "too_long",
            f"{len(full['input_ids'])} tokens ({n_image_tokens} of them image tokens) and the first round alone "
            f"exceeds model_max_length={self.model_max_length}; raise data.model_max_length or lower "
            "model.max_slice_nums",
        )

    def _finish(self, arrays: dict, n_images: int, dropped: int) -> dict:
        if not (arrays["labels"] != IGNORE_INDEX).any():
            raise DataError("malformed_conversation", "no assistant tokens to learn from")
        arrays["num_images"] = np.array(n_images)
        arrays["dropped_rounds"] = np.array(dropped)
        return arrays
