"""SampleProcessor: label spans, per-turn loss, tools, image/video-safe truncation, rejects by reason."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from omni_ray.data.conversation import IGNORE_INDEX, SampleProcessor, to_openai
from omni_ray.data.errors import DataError
from omni_ray.data.video import decode_video, encode_test_video
from omni_ray.models.spec import get_spec
from omni_ray.models.tiny import build_tiny_processor

QWEN = get_spec("qwen2_vl").image_inputs


@pytest.fixture(scope="module")
def qwen():
    return build_tiny_processor("qwen2_vl")


def _image(i=0):
    return Image.new("RGB", (56, 56), (80 * i, 100, 200))


def _frames(n=4):
    frames = np.zeros((n, 56, 56, 3), np.uint8)
    frames[..., 1] = np.arange(n)[:, None, None] * 50
    return frames


def _labelled_text(processor, out):
    ids = out["input_ids"][out["labels"] != IGNORE_INDEX]
    assert (out["labels"][out["labels"] != IGNORE_INDEX] == ids).all()
    return processor.tokenizer.decode(ids)


MULTI = [
    {"role": "system", "content": "be brief."},
    {"role": "user", "content": "<image>\nwhat is it?"},
    {"role": "assistant", "content": "a cat"},
    {"role": "user", "content": "<image>\nand this?"},
    {"role": "assistant", "content": "a dog"},
]


def test_labels_cover_each_answer_and_its_end_of_turn_only(qwen):
    out = SampleProcessor(qwen, 4096, QWEN)(MULTI, [_image(0), _image(1)])
    assert _labelled_text(qwen, out) == "a cat<|im_end|>a dog<|im_end|>"
    # The role headers around answers are not labelled, even though "assistant" is a word in the text.
    assert "assistant" not in _labelled_text(qwen, out)


def test_an_answer_that_repeats_a_header_word_is_labelled_where_it_stands(qwen):
    messages = [{"role": "user", "content": "say assistant"}, {"role": "assistant", "content": "assistant"}]
    out = SampleProcessor(qwen, 4096, QWEN)(messages, [])
    text = qwen.tokenizer.decode(out["input_ids"])
    labelled_from = int(np.argmax(out["labels"] != IGNORE_INDEX))
    assert qwen.tokenizer.decode(out["input_ids"][:labelled_from]) == text[: text.rindex("assistant")]


def test_loss_false_turn_gets_no_labels_and_loss_true_turn_does(qwen):
    messages = [dict(m) for m in MULTI]
    messages[2]["loss"] = False
    messages[1]["loss"] = True  # a user turn the data asks to learn
    out = SampleProcessor(qwen, 4096, QWEN)(messages, [_image(0), _image(1)])
    assert _labelled_text(qwen, out) == "\nwhat is it?<|im_end|>a dog<|im_end|>"


def test_a_sample_whose_turns_all_say_loss_false_is_rejected(qwen):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes", "loss": False}]
    with pytest.raises(DataError) as err:
        SampleProcessor(qwen, 4096, QWEN)(messages, [])
    assert err.value.reason == "malformed_conversation"


TOOLS = [{"type": "function", "function": {"name": "count_objects", "description": "count objects",
                                           "parameters": {"type": "object", "properties": {}}}}]


def test_tools_on_a_template_that_ignores_them_are_rejected_not_dropped(qwen):
    messages = [{"role": "user", "content": "how many?"}, {"role": "assistant", "content": "2"}]
    with pytest.raises(DataError) as err:
        SampleProcessor(qwen, 4096, QWEN)(messages, [], tools=TOOLS)
    assert err.value.reason == "tools_unsupported"


def test_tools_reach_a_template_that_renders_them(qwen):
    processor = build_tiny_processor("qwen2_vl")
    # A template with a tools section (as Qwen2.5/Qwen3 text templates have), prepended to the published one.
    processor.chat_template = "{% if tools %}<|im_start|>system\n{{ tools | tojson }}<|im_end|>\n{% endif %}" + qwen.chat_template
    messages = [{"role": "user", "content": "how many?"}, {"role": "assistant", "content": "2"}]
    out = SampleProcessor(processor, 4096, QWEN)(messages, [], tools=TOOLS)
    reference = processor.apply_chat_template(to_openai(messages), tools=TOOLS, tokenize=True, return_dict=True)
    assert out["input_ids"].tolist() == reference["input_ids"][0]
    assert "count_objects" in processor.tokenizer.decode(out["input_ids"])
    assert _labelled_text(processor, out) == "2<|im_end|>"


def _length(processor, messages, images, videos=()):
    return len(SampleProcessor(processor, 10**6, QWEN)(messages, images, list(videos))["input_ids"])


def test_truncation_drops_whole_trailing_rounds_with_their_images(qwen):
    first_round = _length(qwen, MULTI[:3], [_image(0)])
    full = _length(qwen, MULTI, [_image(0), _image(1)])
    out = SampleProcessor(qwen, full - 1, QWEN)(MULTI, [_image(0), _image(1)])
    assert (int(out["dropped_rounds"]), int(out["num_images"]), len(out["input_ids"])) == (1, 1, first_round)
    assert int(out["image_grid_thw"].shape[0]) == 1  # the dropped round's pixels went with its tokens
    assert (out["input_ids"] == qwen.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum() == \
        out["image_grid_thw"].prod(-1).sum() // 4
    assert _labelled_text(qwen, out) == "a cat<|im_end|>"


def test_truncation_never_splits_a_video(qwen):
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
                {"role": "user", "content": "<video>\nwhat happens?"}, {"role": "assistant", "content": "it fades"}]
    full = _length(qwen, messages, [], [_frames()])
    out = SampleProcessor(qwen, full - 1, QWEN)(messages, [], [_frames()])
    assert int(out["num_videos"]) == 0 and int(out["dropped_rounds"]) == 1
    assert "pixel_values_videos" not in out
    assert not (out["input_ids"] == qwen.tokenizer.convert_tokens_to_ids("<|video_pad|>")).any()


def test_video_frames_count_in_the_token_budget(qwen):
    messages = [{"role": "user", "content": "<video>\nwhat happens?"}, {"role": "assistant", "content": "it fades"}]
    short, long = _length(qwen, messages, [], [_frames(2)]), _length(qwen, messages, [], [_frames(8)])
    assert long - short == 3 * 4  # Qwen2-VL: 2 frames per temporal patch, 4 tokens per 56x56 frame pair
    with pytest.raises(DataError) as err:
        SampleProcessor(qwen, long - 1, QWEN)(messages, [], [_frames(8)])
    assert err.value.reason == "too_long" and "video" in err.value.detail


def test_first_round_too_long_is_rejected_with_the_reason(qwen):
    with pytest.raises(DataError) as err:
        SampleProcessor(qwen, 16, QWEN)(MULTI, [_image(0), _image(1)])
    assert err.value.reason == "too_long" and "model_max_length=16" in err.value.detail


@pytest.mark.parametrize("messages,images,videos,reason", [
    ([{"role": "user", "content": "<audio>\nwhat is said?"}, {"role": "assistant", "content": "hi"}], [], [],
     "unsupported_modality"),
    ([{"role": "user", "content": "<image><image>"}, {"role": "assistant", "content": "x"}], ["one"], [],
     "placeholder_mismatch"),
    ([{"role": "user", "content": "what?"}, {"role": "assistant", "content": "x"}], [], ["clip"],
     "placeholder_mismatch"),
])
def test_inputs_that_cannot_be_honoured_are_rejected_by_reason(qwen, messages, images, videos, reason):
    with pytest.raises(DataError) as err:
        SampleProcessor(qwen, 4096, QWEN)(messages, images, videos)
    assert err.value.reason == reason


def test_video_for_a_model_without_video_input_is_rejected():
    llava = build_tiny_processor("llava")
    messages = [{"role": "user", "content": "<video>\nwhat?"}, {"role": "assistant", "content": "x"}]
    with pytest.raises(DataError) as err:
        SampleProcessor(llava, 4096, get_spec("llava").image_inputs)(messages, [], [_frames()])
    assert err.value.reason == "unsupported_modality"


def test_decode_video_samples_at_fps_and_caps_frames(tmp_path):
    frames = np.zeros((8, 32, 32, 3), np.uint8)
    frames[..., 0] = (np.arange(8) * 30)[:, None, None]
    path = tmp_path / "clip.mp4"
    encode_test_video(str(path), frames, fps=4)  # 2 seconds
    data = path.read_bytes()
    every_half_second = decode_video(data, fps=2, max_frames=16)
    assert every_half_second.shape == (4, 32, 32, 3)
    np.testing.assert_allclose(every_half_second[:, 0, 0, 0], [0, 60, 120, 180], atol=8)  # lossy codec
    assert decode_video(data, fps=4, max_frames=3).shape[0] == 3
    with pytest.raises(DataError) as err:
        decode_video(b"not a video" * 10, fps=2, max_frames=4)
    assert err.value.reason == "corrupt_video"


def test_preprocess_reads_decodes_and_processes_a_video_row(tmp_path):
    from omni_ray.config import ModelConfig
    from omni_ray.data.conversation import decode
    from omni_ray.data.pipeline import Preprocess
    from omni_ray.models.tiny import build_tiny

    model_dir = build_tiny("qwen2_vl", tmp_path / "model")
    encode_test_video(str(tmp_path / "clip.mp4"), _frames(8), fps=4)
    pre = Preprocess(ModelConfig(path=str(model_dir)), None, 4096, video_fps=2.0, video_max_frames=4)
    row = {"id": "v1", "messages": json.dumps([{"role": "user", "content": "<video>\nwhat happens?"},
                                               {"role": "assistant", "content": "it fades"}]),
           "image_refs": [], "video_refs": [str(tmp_path / "clip.mp4")], "tools": ""}
    out = pre.process_row(row)
    assert out["reason"] == "", out["detail"]
    sample = decode(out["sample"])
    assert int(sample["num_videos"]) == 1 and sample["video_grid_thw"].tolist() == [[2, 4, 4]]  # 4 frames / 2
    assert out["num_image_tokens"] == 8
    missing = pre.process_row({**row, "video_refs": [str(tmp_path / "nope.mp4")]})
    assert missing["reason"] == "missing_video"
    audio = pre.process_row({**row, "audio_refs": ["a.wav"]})
    assert audio["reason"] == "unsupported_modality"


@pytest.mark.parametrize("arch", ["qwen2_vl", "minicpmv4_6"])
def test_a_batch_of_video_image_and_text_samples_trains(tmp_path, arch):
    """Video arrays reach the model through collate (concatenated like images) and gradients flow."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from omni_ray.data.collate import collate
    from omni_ray.models.tiny import build_tiny

    model_dir = build_tiny(arch, tmp_path / arch)
    spec = get_spec(arch)
    sp = SampleProcessor(AutoProcessor.from_pretrained(model_dir), 4096, spec.image_inputs)
    samples = [
        sp([{"role": "user", "content": "<video>\nwhat happens?"}, {"role": "assistant", "content": "it fades"}],
           [], [_frames(4)]),
        sp([{"role": "user", "content": "<image>\nwhat?"}, {"role": "assistant", "content": "red"}], [_image()]),
        sp([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}], []),
    ]
    batch = collate(samples, spec.image_inputs, 0, keep_alive=samples[1])
    assert "pixel_values_videos" in batch and int(batch["keep_alive"]) == 0
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    loss = model(**{k: v for k, v in batch.items() if k not in ("num_label_tokens", "keep_alive")}).loss
    loss.backward()
    assert torch.isfinite(loss)
    vision = [p for n, p in model.named_parameters() if spec.group_of(n) == "vision"]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in vision)


def test_image_tokens_inside_a_labelled_turn_are_not_labelled(qwen):
    messages = [{"role": "user", "content": "show me"}, {"role": "assistant", "content": "here <image> it is"}]
    out = SampleProcessor(qwen, 4096, QWEN)(messages, [_image()])
    pad = qwen.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (out["input_ids"] == pad).sum() == 4
    assert not (out["labels"] == pad).any()
    assert _labelled_text(qwen, out).startswith("here ")


def test_a_template_that_trims_turns_still_labels_the_answer():
    """MiniCPM-V 4.6's published template trims each turn's text: an answer with surrounding
    whitespace is labelled as rendered (trimmed), not rejected as a template that rewrites text."""
    from omni_ray.data.conversation import IGNORE_INDEX, SampleProcessor
    from omni_ray.models.tiny import build_tiny_processor

    processor = build_tiny_processor("minicpmv4_6")
    sp = SampleProcessor(processor, 256, {"pixel_values": -1})
    out = sp([{"role": "user", "content": "  what colour?  "}, {"role": "assistant", "content": "red \n"}], [])
    labelled = processor.tokenizer.decode([t for t in out["labels"] if t != IGNORE_INDEX])
    assert labelled == "red<|im_end|>"
