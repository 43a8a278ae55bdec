"""Turn one normalized sample into model inputs: chat template, image/video processing, labels.

One rule for every architecture: our ``<image>``/``<video>`` placeholders become image/video content
blocks (the OpenAI form ``processor.apply_chat_template`` takes), the model's own chat template renders
them exactly as at inference (Qwen2-VL frames each image as ``<|vision_start|><|image_pad|><|vision_end|>``,
LLaVA writes ``<image>\\n``, ...), and the model's own processor expands, frames and tokenises them.
So the ids we train on equal ``processor.apply_chat_template(conversation, tokenize=True)``; tests check it
per architecture. On top of that:

* labels cover the assistant turns (each answer and the end-of-turn token after it), except turns marked
  ``"loss": false`` (ms-swift); any turn marked ``"loss": true`` is labelled;
* ``tools`` go to the template (``apply_chat_template(tools=...)``); a template that ignores them rejects
  the sample instead of dropping them;
* truncation is image- and video-safe: a sample over ``model_max_length`` loses whole trailing rounds
  (user + assistant), never part of an image's or a video's tokens; when even the first round does not
  fit the sample is rejected with ``too_long`` instead of being cut or silently replaced.

Processed samples travel through Ray Data as one binary column (``encode``/``decode``: numpy
``.npz`` without pickle), because image tensors differ in shape from sample to sample.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np

from omni_ray.data.batch import IGNORE_INDEX, TOKEN_PADDING
from omni_ray.data.errors import DataError
from omni_ray.data.formats import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER

_PLACEHOLDER = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")
_BLOCK_TYPE = {IMAGE_PLACEHOLDER: "image", VIDEO_PLACEHOLDER: "video"}
# Processors whose video path breaks on return_tensors="np" (InternVL flattens with torch's
# ``flatten(0, 1)``): a video sample for them is rejected by reason, never a crash mid-epoch.
_VIDEO_NOT_NUMPY = ("InternVLProcessor",)


def encode(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def decode(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def content_blocks(text: str) -> list[dict]:
    """``"<image>\\nWhat is it?"`` -> ``[{"type": "image"}, {"type": "text", "text": "\\nWhat is it?"}]``."""
    blocks = []
    for part in _PLACEHOLDER.split(text):
        if part in _BLOCK_TYPE:
            blocks.append({"type": _BLOCK_TYPE[part]})
        elif part:
            blocks.append({"type": "text", "text": part})
    return blocks


def to_openai(messages: list[dict]) -> list[dict]:
    """Our normalized messages as the content-block conversation a processor's chat template takes."""
    return [{"role": m["role"], "content": content_blocks(m["content"])} for m in messages]


def is_labelled(message: dict) -> bool:
    """Assistant turns learn unless marked ``loss: false``; any turn marked ``loss: true`` learns."""
    loss = message.get("loss")
    return loss is True or (message["role"] == "assistant" and loss is not False)


def _rounds(messages: list[dict]) -> list[int]:
    """Message counts at which a round (ending in an assistant turn) closes."""
    return [i + 1 for i, m in enumerate(messages) if m["role"] == "assistant"]


def _first_row(value) -> list:
    """Row 0 of a batched processor output that may be absent, a list, or an (empty) numpy array."""
    return list(value[0]) if value is not None and len(value) else []


def _count(messages: list[dict], placeholder: str) -> int:
    return sum(m["content"].count(placeholder) for m in messages)


@dataclass
class SampleProcessor:
    """Callable: (messages, images, videos, tools) -> dict of numpy arrays for one sample.

    ``image_inputs`` are the processor outputs that carry pixels (from the model spec); video
    outputs (``pixel_values_videos``, ...) are kept when the spec lists them there too. Videos are
    arrays of frames already sampled (``omni_ray.data.video``), so the processor samples none.
    """

    processor: object
    model_max_length: int
    image_inputs: dict[str, int]

    def __post_init__(self):
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.image_token = getattr(self.processor, "image_token", None) or IMAGE_PLACEHOLDER
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        video_token = getattr(self.processor, "video_token", None)
        self.video_token_id = self.tokenizer.convert_tokens_to_ids(video_token) if video_token else None
        # End-of-turn markers are special tokens, but not always named ones: Gemma's <end_of_turn> is an
        # added special token outside all_special_tokens, and must be labelled so the model learns to stop.
        added = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        specials = {*self.tokenizer.all_special_tokens, *(t.content for t in added.values() if t.special)}
        self._end_markers = sorted({t for t in specials if t}, key=len, reverse=True)

    def template(self, conversation: list[dict], tools: list | None = None, generation: bool = False) -> str:
        return self.processor.apply_chat_template(conversation, tools=tools, tokenize=False,
                                                  add_generation_prompt=generation)

    def render(self, messages: list[dict], tools: list | None = None) -> tuple[str, list[tuple[int, int]]]:
        """Chat-template text and the character spans the loss is taken on."""
        conversation = to_openai(messages)
        text = self.template(conversation, tools)
        if tools and text == self.template(conversation):
            raise DataError("tools_unsupported", "this model's chat template does not render `tools`; remove "
                            "`tools` from the sample or train a model whose template takes them")
        spans, pos = [], 0
        for i, (message, turn) in enumerate(zip(messages, conversation)):
            start = pos
            if is_labelled(message):
                # The text the template renders before this turn, when it is a prefix of the whole, is
                # where the turn's text starts; this keeps a short answer ("user") from matching a header.
                before = self.template(conversation[:i], tools, generation=message["role"] == "assistant")
                start = max(pos, len(before)) if text.startswith(before) else pos
            found = self._find(text, turn["content"], start)
            if found is None:
                continue
            pos = found[1]
            if is_labelled(message):
                marker = next((t for t in self._end_markers if text.startswith(t, pos)), "")
                spans.append((found[0], pos + len(marker)))
        return text, spans

    @staticmethod
    def _find(text: str, blocks: list[dict], pos: int) -> tuple[int, int] | None:
        """Where a turn's text blocks appear, in order, from ``pos`` (None for a turn without text)."""
        first, end = None, pos
        for block in blocks:
            if block["type"] != "text":
                continue
            needle = block["text"]
            start = text.find(needle, end)
            if start < 0 and needle.strip() != needle:  # templates that trim turns (MiniCPM-V 4.6, Qwen3.5)
                needle = needle.strip()
                if not needle:
                    continue
                start = text.find(needle, end)
            if start < 0:  # a template that rewrites content (escapes, reorders) cannot be labelled safely
                raise DataError("malformed_conversation", "chat template does not reproduce a turn's text")
            first = start if first is None else first
            end = start + len(needle)
        return None if first is None else (first, end)

    def _processor_kwargs(self, text: str, images: list, videos: list) -> dict:
        kwargs = dict(text=[text], return_tensors="np", return_offsets_mapping=True,
                      return_text_replacement_offsets=True)
        bos = self.tokenizer.bos_token
        if bos and text.startswith(bos):  # as processor.apply_chat_template: never a second BOS
            kwargs["add_special_tokens"] = False
        if images:
            kwargs["images"] = [images]
        if videos:
            kwargs["videos"] = [videos]
            kwargs["do_sample_frames"] = False
        return kwargs

    def _run(self, messages: list[dict], images: list, videos: list, tools: list | None) -> dict:
        text, spans = self.render(messages, tools)
        out = self.processor(**self._processor_kwargs(text, images, videos))
        # Shift assistant spans from the template text into the placeholder-expanded text.
        shifts = [(r["span"][1], (r["new_span"][1] - r["new_span"][0]) - (r["span"][1] - r["span"][0]))
                  for r in _first_row(out.get("text_replacement_offsets"))]
        expanded = [(s + sum(d for e, d in shifts if e <= s), t + sum(d for e, d in shifts if e <= t)) for s, t in spans]
        ids = np.asarray(out["input_ids"][0], dtype=np.int64)
        offsets = np.asarray(out["offset_mapping"][0])
        in_answer = np.zeros(len(ids), dtype=bool)
        for s, t in expanded:
            # Overlap, not containment: byte-level BPE glues the space before an answer's first word to it
            # (" red"), and that token is the answer's to generate. Special tokens added by the tokenizer
            # (BOS) have empty offsets and never overlap.
            in_answer |= (offsets[:, 0] < t) & (offsets[:, 1] > s)
        # An image inside a labelled turn is input, never something to predict.
        in_answer &= ~np.isin(ids, [t for t in (self.image_token_id, self.video_token_id) if t is not None])
        result = {"input_ids": ids, "labels": np.where(in_answer, ids, IGNORE_INDEX)}
        # Other per-token arrays the processor gives (Qwen-VL's mm_token_type_ids; Gemma 3 marks image
        # tokens in token_type_ids); the attention mask is collate's to make.
        for key in (k for k in TOKEN_PADDING if k in out and k not in result and k != "attention_mask"):
            result[key] = np.asarray(out[key][0], dtype=np.int64)
        for key in self.image_inputs:
            if key in out and (images or videos):
                result[key] = np.asarray(out[key])
        return result

    def __call__(self, messages: list[dict], images: list, videos: list | None = None,
                 tools: list | None = None) -> dict:
        videos = list(videos or [])
        self._check_inputs(messages, images, videos)
        full = self._run(messages, images, videos, tools)
        if len(full["input_ids"]) <= self.model_max_length:
            return self._finish(full, len(images), len(videos), dropped=0)
        # Too long: keep the longest prefix of whole rounds that fits. The images and videos of the
        # rounds that remain are exactly the first k placeholders of each kind, so pixels and tokens
        # stay matched and no image's or video's tokens are ever cut.
        rounds = _rounds(messages)
        for keep in range(len(rounds) - 1, 0, -1):
            kept = messages[: rounds[keep - 1]]
            n_images, n_videos = _count(kept, IMAGE_PLACEHOLDER), _count(kept, VIDEO_PLACEHOLDER)
            part = self._run(kept, images[:n_images], videos[:n_videos], tools)
            if len(part["input_ids"]) <= self.model_max_length:
                return self._finish(part, n_images, n_videos, dropped=len(rounds) - keep)
        raise DataError(
            "too_long",
            f"{len(full['input_ids'])} tokens ({self.visual_tokens(full['input_ids'])} of them image/video "
            f"tokens) and the first round alone exceeds model_max_length={self.model_max_length}; raise "
            "data.model_max_length, or lower model.max_slice_nums / data.video_max_frames",
        )

    def _check_inputs(self, messages: list[dict], images: list, videos: list) -> None:
        for placeholder, items, kind in ((IMAGE_PLACEHOLDER, images, "image"), (VIDEO_PLACEHOLDER, videos, "video")):
            if _count(messages, placeholder) != len(items):
                raise DataError("placeholder_mismatch", f"text has {_count(messages, placeholder)} {placeholder} "
                                f"placeholder(s) but the sample has {len(items)} {kind}(s)")
        if videos and getattr(self.processor, "video_processor", None) is None:
            raise DataError("unsupported_modality", f"{type(self.processor).__name__} takes no video; drop the "
                            "sample's videos or train a model with video input (Qwen2-VL, Qwen2.5-VL, MiniCPM-V 4.x)")
        if videos and type(self.processor).__name__ in _VIDEO_NOT_NUMPY:
            raise DataError("unsupported_modality", f"{type(self.processor).__name__} cannot prepare video for "
                            "training here (transformers' processor fails on numpy video tensors); drop the "
                            "sample's videos or train a model whose video path works (Qwen2-VL, Qwen2.5-VL, "
                            "Qwen3-VL, MiniCPM-V 4.x, LLaVA-OneVision)")
        if any("<audio>" in m["content"] for m in messages):
            raise DataError("unsupported_modality", "audio is not supported: no model family here takes audio input")

    def visual_tokens(self, ids: np.ndarray) -> int:
        """Tokens that stand for image or video content (the processor's expanded placeholders)."""
        count = int((ids == self.image_token_id).sum())
        if self.video_token_id is not None and self.video_token_id != self.image_token_id:
            count += int((ids == self.video_token_id).sum())
        return count

    def _finish(self, arrays: dict, n_images: int, n_videos: int, dropped: int) -> dict:
        if not (arrays["labels"] != IGNORE_INDEX).any():
            raise DataError("malformed_conversation", "no assistant tokens to learn from")
        arrays["num_images"] = np.array(n_images)
        arrays["num_videos"] = np.array(n_videos)
        arrays["dropped_rounds"] = np.array(dropped)
        return arrays
