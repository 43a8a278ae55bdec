"""Errors for samples that cannot be trained on.

Other fine-tuners either crash on the first bad sample or (MiniCPM-V's ``finetune/``)
swap it for a random other one behind a bare ``except:``, so broken paths, text-only rows
and truncated image tokens vanish without a trace. omni_ray instead rejects each bad
sample with a :class:`DataError` whose ``reason`` is a short, stable code from
:data:`REASONS`. Codes are what ``rejects.jsonl`` and the manifest's ``by_reason``
counts are keyed by, so they must not change meaning once released; add new ones at the
end.
"""

from __future__ import annotations

from omni_ray.errors import UserError

__all__ = ["REASONS", "DataError"]

#: Every reason a sample can be rejected for. Stable, snake_case, machine-readable.
REASONS: tuple[str, ...] = (
    # images
    "missing_image",  # the file or object an image reference names does not exist
    "corrupt_image",  # the bytes are not an image PIL can identify
    "truncated_image",  # the header is fine but the pixel data was cut short
    "decompression_bomb",  # width * height above the configured pixel limit
    "zero_size_image",  # empty file, or an image with width or height 0
    "unsupported_image_mode",  # a pixel format that cannot be turned into RGB soundly
    # conversations
    "empty_conversation",  # no turns at all
    "malformed_conversation",  # not a list of {role, content} dicts, or not JSON at all
    "wrong_role_order",  # not user/assistant alternating, ending with assistant
    "placeholder_mismatch",  # number of <image> placeholders != number of images
    "non_utf8_text",  # text that came from bytes that are not valid UTF-8
    "missing_field",  # a required key (conversations/messages) is absent
    # tokenization (raised by omni_ray.data's tokenizer code)
    "too_long",  # the sample does not fit model_max_length even after safe truncation
    "image_tokens_truncated",  # truncation would cut an image's placeholder tokens
)


class DataError(UserError, ValueError):
    """One sample is unusable; ``reason`` says why in a word, ``detail`` in a sentence.

    Subclasses :class:`ValueError` so code that does not know about omni_ray still treats
    it as bad input rather than a bug. ``str(err)`` is ``"reason: detail"``.

    >>> str(DataError("missing_image", "no such file: a.jpg"))
    'missing_image: no such file: a.jpg'
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(
                f"unknown DataError reason {reason!r}: use one of {', '.join(REASONS)} "
                "(or add it to omni_ray.data.errors.REASONS)"
            )
        self.reason = reason
        self.detail = detail
        super().__init__(reason, detail)

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason

    def __repr__(self) -> str:
        return f"DataError({self.reason!r}, {self.detail!r})"

    def __reduce__(self):
        # Keeps the error picklable across Ray task boundaries with both fields intact.
        return (type(self), (self.reason, self.detail))
