"""Preference pairs in the formats users have, into one normalized pair (pure, like ``formats``).

Accepted shapes (detected per record by :func:`pair_format`)::

    RLAIF-V        {"image": "a.jpg", "question": "...", "chosen": "...", "rejected": "..."}
    LLaMA-Factory  {"conversations" | "messages": [... ending with a user turn], "system": "...",
                    "chosen": {"from": "gpt", "value": "..."} | "...", "rejected": {...} | "...",
                    "images": [...]}
    ms-swift       {"messages": [... ending with the chosen assistant turn],
                    "rejected_response": "..." (or "rejected_messages": [... same prompt, rejected answer]),
                    "images": [...]}
    TRL            {"prompt": "..." | [messages], "chosen": "..." | [assistant message],
                    "rejected": ..., "images": [...]}      (conversational or plain; without "prompt",
                                                          the shared turns of chosen and rejected)

Every pair becomes::

    {"id": str, "prompt": [{"role": "system"|"user"|"assistant", "content": str}, ...],  # ends with user
     "chosen": str, "rejected": str, "image_refs": [str], "video_refs": [str], "tools": list | None}

The prompt is validated exactly as an SFT sample is (``formats.normalize_record`` on the prompt
plus each answer: roles, placeholders bound to images in order, text, media never in an answer),
so a pair is a valid SFT sample with either answer. Problems raise ``DataError``: a missing or
empty answer is ``missing_response``, equal answers are ``identical_responses`` (no preference to
learn), placeholders that do not match the images are ``placeholder_mismatch``, and the rest as
for SFT samples.

:func:`objective_mismatch` tells a pair file given to SFT (or SFT rows given to DPO) from its first
records, for ``omni-ray validate`` and the driver to raise a ``ConfigError`` naming the data key.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from omni_ray.data.errors import DataError
from omni_ray.data.formats import normalize_record

__all__ = ["PAIR_FORMATS", "normalize_pair", "objective_mismatch", "pair_format"]

PAIR_FORMATS = ("rlaif_v", "llamafactory", "swift", "trl")
_MEDIA_KEYS = ("image", "images", "video", "videos")
_EMPTY = (None, "", [], {})


def pair_format(record: Any) -> Optional[str]:
    """Which pair format a record is in, or None for a record that is not a preference pair."""
    if not isinstance(record, dict):
        return None
    if "rejected_response" in record or "rejected_messages" in record:
        return "swift"
    if "chosen" not in record and "rejected" not in record:
        return None
    if "question" in record:
        return "rlaif_v"
    if "prompt" in record:
        return "trl"
    if "conversations" in record or "messages" in record:
        return "llamafactory"
    return "trl"  # implicit prompt: chosen and rejected carry the whole conversation


def normalize_pair(record: Any, index: int) -> dict:
    """Validate one raw pair record and return the normalized pair (see the module docstring)."""
    fmt = pair_format(record)
    sample_id = record.get("id") if isinstance(record, dict) else None
    sample_id = f"sample-{index}" if sample_id in (None, "") else str(sample_id)
    if fmt is None:
        raise DataError("missing_response", f"sample {sample_id}: not a preference pair (no chosen/rejected answer, "
                        "no rejected_response); give both answers, or train it with train.objective: sft")
    prompt, chosen, rejected = _PARTS[fmt](record, sample_id)
    chosen = _answer(chosen, "chosen", sample_id)
    rejected = _answer(rejected, "rejected" if fmt != "swift" else "rejected_response", sample_id)
    base = {k: record[k] for k in (*_MEDIA_KEYS, "system", "tools") if k in record}
    with_chosen = normalize_record({**base, "id": sample_id, "messages": [*prompt, chosen]}, index)
    with_rejected = normalize_record({**base, "id": sample_id, "messages": [*prompt, rejected]}, index)
    if with_chosen["messages"][:-1] != with_rejected["messages"][:-1]:  # cannot differ: same prompt, same media
        raise DataError("malformed_conversation", f"sample {sample_id}: the two answers do not share one prompt")
    chosen_text, rejected_text = with_chosen["messages"][-1]["content"], with_rejected["messages"][-1]["content"]
    if chosen_text.strip() == rejected_text.strip():
        raise DataError("identical_responses", f"sample {sample_id}: chosen and rejected answers are the same text, "
                        "so there is no preference to learn; fix or remove the pair")
    return {"id": sample_id, "prompt": [{k: m[k] for k in ("role", "content")} for m in with_chosen["messages"][:-1]],
            "chosen": chosen_text, "rejected": rejected_text, "image_refs": with_chosen["image_refs"],
            "video_refs": with_chosen["video_refs"], "tools": with_chosen["tools"]}


def _answer(value: Any, key: str, sample_id: str) -> dict:
    """One answer as an assistant turn: a string, a {from/role, value/content} turn or a one-turn list."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        role = value.get("role", value.get("from", "assistant"))
        if role not in ("assistant", "gpt"):
            raise DataError("malformed_conversation", f"sample {sample_id}: {key!r} is a {role!r} turn; an answer "
                            "is one assistant turn")
        value = value.get("content", value.get("value"))
        value = _placeholders([{"content": value}])[0]["content"]
    if isinstance(value, list) and value and all(isinstance(b, dict) and "type" in b for b in value):
        text = "".join(b.get("text", "") for b in value if b.get("type") == "text")
        value = value if text.strip() else ""  # blocks with text: normalize_record joins them
    elif isinstance(value, list):
        raise DataError("malformed_conversation", f"sample {sample_id}: {key!r} holds {len(value)} turns; an answer "
                        "is one assistant turn (put earlier turns in the prompt)")
    if value in _EMPTY or (isinstance(value, str) and not value.strip()):
        raise DataError("missing_response", f"sample {sample_id}: {key!r} answer is missing or empty; give both "
                        "answers or remove the pair")
    return {"role": "assistant", "content": value}


def _rlaif_v(record: dict, sample_id: str) -> tuple[list, Any, Any]:
    question = record.get("question")
    if question in _EMPTY:
        raise DataError("missing_field", f"sample {sample_id}: RLAIF-V pair without a 'question'")
    return [{"role": "user", "content": question}], record.get("chosen"), record.get("rejected")


def _llamafactory(record: dict, sample_id: str) -> tuple[list, Any, Any]:
    key = "conversations" if "conversations" in record else "messages"
    return _prompt_turns(record[key], key, sample_id), record.get("chosen"), record.get("rejected")


def _swift(record: dict, sample_id: str) -> tuple[list, Any, Any]:
    turns = record.get("messages")
    if not isinstance(turns, list) or not turns:
        raise DataError("missing_field", f"sample {sample_id}: ms-swift pair without 'messages'")
    rejected = record.get("rejected_response")
    if rejected in _EMPTY and isinstance(record.get("rejected_messages"), list) and record["rejected_messages"]:
        if record["rejected_messages"][:-1] != turns[:-1]:
            raise DataError("malformed_conversation", f"sample {sample_id}: 'rejected_messages' does not share "
                            "'messages' turns before the answer; one prompt per pair")
        rejected = record["rejected_messages"][-1]
    if _role(turns[-1]) not in ("assistant", "gpt"):
        raise DataError("missing_response", f"sample {sample_id}: 'messages' must end with the chosen answer "
                        "(an assistant turn)")
    return _prompt_turns(turns[:-1], "messages", sample_id), turns[-1], rejected


def _trl(record: dict, sample_id: str) -> tuple[list, Any, Any]:
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if "prompt" not in record:  # implicit prompt: the turns chosen and rejected share
        if not (isinstance(chosen, list) and isinstance(rejected, list) and chosen and rejected):
            raise DataError("missing_field", f"sample {sample_id}: TRL pair without 'prompt'; give the prompt, or "
                            "chosen and rejected as whole conversations")
        if chosen[:-1] != rejected[:-1]:
            raise DataError("malformed_conversation", f"sample {sample_id}: chosen and rejected conversations "
                            "differ before their last turn; one prompt per pair")
        return _prompt_turns(chosen[:-1], "chosen", sample_id), chosen[-1], rejected[-1]
    prompt = record["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip() and not any(record.get(k) not in _EMPTY for k in _MEDIA_KEYS):
            raise DataError("missing_field", f"sample {sample_id}: TRL pair with an empty 'prompt'")
        return [{"role": "user", "content": prompt}], chosen, rejected
    return _prompt_turns(prompt, "prompt", sample_id), chosen, rejected


def _placeholders(turns: list) -> list:
    """Image/video blocks that carry no ref (TRL's form: refs in "images") as placeholder text blocks."""
    def block(b: Any) -> Any:
        kind = b.get("type") if isinstance(b, dict) else None
        if kind in ("image", "video") and b.get(kind) in _EMPTY and b.get(f"{kind}_url") in _EMPTY:
            return {"type": "text", "text": f"<{kind}>"}
        return b

    return [{**t, "content": [block(b) for b in t["content"]]} if isinstance(t, dict)
            and isinstance(t.get("content"), list) else t for t in turns]


def _role(turn: Any) -> Any:
    return turn.get("role", turn.get("from")) if isinstance(turn, dict) else None


def _prompt_turns(turns: Any, key: str, sample_id: str) -> list:
    if not isinstance(turns, list) or not turns:
        raise DataError("missing_field" if turns in _EMPTY else "malformed_conversation",
                        f"sample {sample_id}: {key!r} must be a non-empty list of turns ending with the user's")
    if _role(turns[-1]) not in ("user", "human"):
        raise DataError("wrong_role_order", f"sample {sample_id}: {key!r} must end with a user turn (the answers "
                        f"follow it), not {_role(turns[-1])!r}")
    return _placeholders(turns)


_PARTS = {"rlaif_v": _rlaif_v, "llamafactory": _llamafactory, "swift": _swift, "trl": _trl}


def objective_mismatch(records: Iterable[Any], objective: str, where: str, key: str = "data.train",
                       look: int = 16) -> Optional[str]:
    """A ``ConfigError`` message when the first ``look`` records do not fit ``objective``, else None.

    ``where`` names the file (or source) in the message; records that are not objects are left to
    the per-record checks. Pairs are told by their keys (:func:`pair_format`).
    """
    kinds = [pair_format(r) for _, r in zip(range(look), records) if isinstance(r, dict)]
    if not kinds:
        return None
    pairs = [k for k in kinds if k is not None]
    if objective == "sft" and pairs:
        return (f"{key}: {where} holds preference pairs ({pairs[0]} format) but train.objective is sft; set "
                "train.objective: dpo to train on them, or give conversations with one answer")
    if objective == "dpo" and len(pairs) < len(kinds):
        return (f"{key}: {where} holds conversations without a rejected answer, not preference pairs, but "
                f"train.objective is dpo; set train.objective: sft, or give pairs ({', '.join(PAIR_FORMATS)} "
                "formats, see README)")
    return None
