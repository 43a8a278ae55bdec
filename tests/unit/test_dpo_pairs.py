"""Preference pairs: four formats into one normalized pair, bad pairs rejected by reason, the objective
check for config validation, and tokenisation that equals the model's own chat template per side."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from omni_ray.data.conversation import IGNORE_INDEX
from omni_ray.data.errors import REASONS, DataError
from omni_ray.data.pair_processor import PairProcessor
from omni_ray.data.pairs import normalize_pair, objective_mismatch, pair_format
from omni_ray.models.spec import get_spec
from omni_ray.models.tiny import build_tiny_processor

Q = "what is the color of the shape?"
EXPECTED = {"prompt": [{"role": "user", "content": f"<image>\n{Q}"}], "chosen": "it is red",
            "rejected": "it is blue", "image_refs": ["a.jpg"], "video_refs": [], "tools": None}
SAME_PAIR = {
    "rlaif_v": {"id": "p", "image": "a.jpg", "question": Q, "chosen": "it is red", "rejected": "it is blue",
                "ds_name": "x", "origin_dataset": "y"},
    "llamafactory": {"id": "p", "conversations": [{"from": "human", "value": f"<image>\n{Q}"}],
                     "chosen": {"from": "gpt", "value": "it is red"}, "rejected": {"from": "gpt", "value": "it is blue"},
                     "images": ["a.jpg"]},
    "llamafactory_messages": {"id": "p", "messages": [{"role": "user", "content": f"<image>\n{Q}"}],
                              "chosen": "it is red", "rejected": "it is blue", "images": ["a.jpg"]},
    "swift": {"id": "p", "messages": [{"role": "user", "content": f"<image>\n{Q}"},
                                      {"role": "assistant", "content": "it is red"}],
              "rejected_response": "it is blue", "images": ["a.jpg"]},
    "swift_rejected_messages": {"id": "p", "messages": [{"role": "user", "content": f"<image>\n{Q}"},
                                                        {"role": "assistant", "content": "it is red"}],
                                "rejected_messages": [{"role": "user", "content": f"<image>\n{Q}"},
                                                      {"role": "assistant", "content": "it is blue"}],
                                "images": ["a.jpg"]},
    "trl_plain": {"id": "p", "prompt": f"<image>\n{Q}", "chosen": "it is red", "rejected": "it is blue",
                  "images": ["a.jpg"]},
    "trl_conversational": {"id": "p", "prompt": [{"role": "user", "content": [{"type": "image"},
                                                                              {"type": "text", "text": f"\n{Q}"}]}],
                           "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "it is red"}]}],
                           "rejected": [{"role": "assistant", "content": "it is blue"}], "images": ["a.jpg"]},
    "trl_implicit_prompt": {"id": "p", "chosen": [{"role": "user", "content": f"<image>\n{Q}"},
                                                  {"role": "assistant", "content": "it is red"}],
                            "rejected": [{"role": "user", "content": f"<image>\n{Q}"},
                                         {"role": "assistant", "content": "it is blue"}], "images": ["a.jpg"]},
}


@pytest.mark.parametrize("name", sorted(SAME_PAIR))
def test_every_format_gives_the_same_pair(name):
    pair = normalize_pair(SAME_PAIR[name], 0)
    assert pair == {"id": "p", **EXPECTED}
    assert pair_format(SAME_PAIR[name]) == next(f for f in ("rlaif_v", "llamafactory", "swift", "trl")
                                                 if name.startswith(f))


def test_multi_turn_prompt_with_system_and_two_images():
    record = {"system": "answer briefly.", "images": ["a.jpg", "b.jpg"],
              "conversations": [{"from": "human", "value": "<image> left"}, {"from": "gpt", "value": "a cat"},
                                {"from": "human", "value": "<image> and this?"}],
              "chosen": {"from": "gpt", "value": "a dog"}, "rejected": {"from": "gpt", "value": "a cat"}}
    pair = normalize_pair(record, 3)
    assert pair["id"] == "sample-3" and pair["image_refs"] == ["a.jpg", "b.jpg"]
    assert [m["role"] for m in pair["prompt"]] == ["system", "user", "assistant", "user"]


BAD = [
    ("rejected missing", {"image": "a.jpg", "question": Q, "chosen": "red"}, "missing_response"),
    ("chosen empty", {"prompt": "hi", "chosen": "  ", "rejected": "no"}, "missing_response"),
    ("swift without rejected", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
                                "rejected_response": ""}, "missing_response"),
    ("identical", {"image": "a.jpg", "question": Q, "chosen": "it is red", "rejected": "it is red "},
     "identical_responses"),
    ("placeholders vs images", {"prompt": "<image><image> which?", "chosen": "a", "rejected": "b", "images": ["a.jpg"]},
     "placeholder_mismatch"),
    ("image in an answer", {"prompt": "<image> q", "chosen": "<image> a", "rejected": "b",
                            "images": ["a.jpg", "b.jpg"]},
     "media_in_assistant_turn"),
    ("prompt ends with the answer", {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                                     "chosen": "b", "rejected": "c"}, "wrong_role_order"),
    ("two-turn answer", {"prompt": "q", "chosen": [{"role": "assistant", "content": "a"},
                                                   {"role": "assistant", "content": "b"}], "rejected": "c"},
     "malformed_conversation"),
    ("sft row", {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
     "missing_response"),
    ("prompts differ", {"chosen": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"}],
                        "rejected": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]},
     "malformed_conversation"),
]


@pytest.mark.parametrize(("record", "reason"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_pairs_are_rejected_by_reason(record, reason):
    assert reason in REASONS
    with pytest.raises(DataError) as err:
        normalize_pair(record, 0)
    assert err.value.reason == reason, str(err.value)


def test_objective_mismatch_names_the_key():
    sft_rows = [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}] * 3
    pairs = list(SAME_PAIR.values())
    message = objective_mismatch(iter(pairs), "sft", "s3://b/pairs.jsonl")
    assert message.startswith("data.train: s3://b/pairs.jsonl holds preference pairs") and "objective: dpo" in message
    message = objective_mismatch(sft_rows, "dpo", "train.jsonl", key="data.eval")
    assert message.startswith("data.eval: train.jsonl holds conversations without a rejected answer")
    assert objective_mismatch(sft_rows, "sft", "x") is None and objective_mismatch(pairs, "dpo", "x") is None
    assert objective_mismatch([sft_rows[0], pairs[0]], "dpo", "x") is not None  # a mixed file is no pair file


# --- tokenisation ------------------------------------------------------------------------------


def _openai(prompt, answer, image):
    blocks = [{"type": "image", "image": image}, {"type": "text", "text": prompt[0]["content"].removeprefix("<image>")}]
    return [{"role": "user", "content": blocks}, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


@pytest.fixture(scope="module", params=["minicpmv4_6", "qwen2_5_vl"])
def family(request):
    return request.param, build_tiny_processor(request.param)


def test_each_side_equals_the_processors_chat_template(family, monkeypatch):
    name, processor = family
    image = Image.new("RGB", (84, 56), (200, 30, 30))
    pair = normalize_pair({"image": "a.jpg", "question": Q, "chosen": "it is red", "rejected": "it is blue, not red"}, 0)
    calls = []
    monkeypatch.setattr(processor, "_process_images",
                        lambda *a, _f=processor._process_images, **k: calls.append(1) or _f(*a, **k))
    out = PairProcessor(processor, 512, get_spec(name).image_inputs)(pair["prompt"], pair["chosen"], pair["rejected"],
                                                                     [image])
    assert len(calls) == 1  # the image is processed once per pair
    monkeypatch.undo()
    for side in ("chosen", "rejected"):
        reference = processor.apply_chat_template(_openai(pair["prompt"], pair[side], image), tokenize=True,
                                                  return_dict=True, return_tensors="np")
        assert out[f"{side}_input_ids"].tolist() == reference["input_ids"][0].tolist(), side
        labelled = out[f"{side}_input_ids"][out[f"{side}_labels"] != IGNORE_INDEX]
        assert processor.tokenizer.decode(labelled).strip() == pair[side] + "<|im_end|>"
    for key in get_spec(name).image_inputs:
        if key in reference:
            np.testing.assert_array_equal(out[key], reference[key])
    ids = out["chosen_input_ids"]
    image_tokens = int((ids == processor.tokenizer.convert_tokens_to_ids(processor.image_token)).sum())
    assert image_tokens > 0 and int(out["prompt_tokens"]) > image_tokens and int(out["num_images"]) == 1
    assert np.array_equal(ids[: int(out["prompt_tokens"])], out["rejected_input_ids"][: int(out["prompt_tokens"])])


def test_truncation_cuts_both_answers_alike_and_never_the_prompt(family):
    name, processor = family
    image = Image.new("RGB", (56, 56), (30, 200, 30))
    long_a, long_b = " ".join(["red"] * 40), " ".join(["blue"] * 30)
    pair = normalize_pair({"image": "a.jpg", "question": Q, "chosen": long_a, "rejected": long_b}, 0)
    full = PairProcessor(processor, 4096, get_spec(name).image_inputs)(pair["prompt"], pair["chosen"],
                                                                       pair["rejected"], [image])
    prompt = int(full["prompt_tokens"])
    limit = prompt + 5
    cut = PairProcessor(processor, limit, get_spec(name).image_inputs)(pair["prompt"], pair["chosen"],
                                                                       pair["rejected"], [image])
    for side in ("chosen", "rejected"):
        assert cut[f"{side}_input_ids"].tolist() == full[f"{side}_input_ids"][:limit].tolist()
        assert int((cut[f"{side}_labels"] != IGNORE_INDEX).sum()) == 5
    assert int(cut["truncated"]) > 0 and int(full["truncated"]) == 0
    with pytest.raises(DataError) as err:
        PairProcessor(processor, prompt, get_spec(name).image_inputs)(pair["prompt"], pair["chosen"],
                                                                      pair["rejected"], [image])
    assert err.value.reason == "too_long" and "image/video tokens" in str(err.value)


def test_text_only_pair(family):
    name, processor = family
    out = PairProcessor(processor, 512, get_spec(name).image_inputs)([{"role": "user", "content": "2+2?"}], "4", "5",
                                                                     [])
    assert int(out["num_images"]) == 0 and "pixel_values" not in out
    assert out["chosen_input_ids"][:-3].tolist() == out["rejected_input_ids"][:-3].tolist()
