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

from omni_ray.config import ConfigError
from omni_ray.errors import UserError

__all__ = ["REASONS", "DataError", "DataSourceError"]

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
    # input safety and formats (issues 10 and 11)
    "unsafe_path",  # absolute path, or `..` climbing out of the dataset root (data.image_root)
    "bad_path",  # NUL byte, over-long path or component, symlink loop
    "not_a_regular_file",  # a directory, FIFO, device (/dev/zero) or socket instead of a file
    "image_too_large",  # the file is over data.max_image_bytes
    "read_timeout",  # the read did not finish within data.read_timeout_s
    "unreadable_file",  # any other error reading the file or object (permissions, network)
    "remote_url",  # an http(s) URL: omni_ray does not download from the web
    "record_too_deep",  # JSON nesting deeper than data.max_json_depth
    "record_too_large",  # one record over data.max_record_bytes
    "unsupported_modality",  # audio, or content blocks no model here takes
    "unsupported_field",  # a known field we cannot honour (grounding objects, preference data)
    "media_in_assistant_turn",  # <image>/<video> in an answer would turn pixels into labels
    "processing_error",  # an unexpected exception while processing this one sample
    # chat templates and video (omni_ray.data.conversation, omni_ray.data.video)
    "tools_unsupported",  # the sample has tools but the model's chat template does not render them
    "missing_video",  # the file or object a video reference names does not exist
    "corrupt_video",  # the bytes are not a video the decoder can read, or it has no frames
    # preference pairs (omni_ray.data.pairs, train.objective: dpo)
    "missing_response",  # a pair without its chosen or rejected answer (or a record that is not a pair)
    "identical_responses",  # chosen and rejected are the same text: no preference to learn
    # WebDataset tar shards (omni_ray.data.tars)
    "truncated_shard",  # the tar (or its gzip stream) ends early: the sample being read, or the lost tail
    "corrupt_member",  # a damaged tar header (the members after it are lost) or a key repeated in a shard
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


class DataSourceError(ConfigError):
    """A whole input source is unusable (missing, unreadable, wrong format): no sample in it
    can be trusted, so this stops the command instead of rejecting samples one by one.

    A :class:`~omni_ray.config.ConfigError`, so the CLI exits 2 with the one-line message,
    which names the config key, the path and what to check.
    """

    def __init__(self, path: str, problem: str, key: str = "data.train") -> None:
        self.path, self.problem, self.key = path, problem, key
        super().__init__(f"{key}: {path}: {problem}")

    def __reduce__(self):
        # Ray pickles a read task's error back to the driver; without this it arrives as
        # UnserializableException and the CLI shows tracebacks instead of this one line.
        return (type(self), (self.path, self.problem, self.key))
