"""What we train on equals what the model's own processor and chat template produce at inference.

Per architecture, conversations written in the OpenAI content-block form go through
``processor.apply_chat_template(..., tokenize=True)`` (the model's own inference path) and, as our
normalized samples (``<image>``/``<video>`` placeholders), through ``SampleProcessor``: the token ids
must be equal, and labels must cover exactly the assistant answers and their end-of-turn token.
The tiny processors carry each family's published chat template, byte for byte (checked here too).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from omni_ray.data.conversation import IGNORE_INDEX, SampleProcessor
from omni_ray.models.spec import get_spec
from omni_ray.models.tiny import TEMPLATES_DIR, build_tiny_processor, published_chat_template

FAMILIES = ["minicpmv4_6", "minicpmv4_7", "qwen2_vl", "qwen2_5_vl", "llava", "qwen3_vl", "internvl", "gemma3",
            "idefics3", "smolvlm", "llava_onevision"]
# Families whose processor and chat template take video (SmolVLM's published template renders no video;
# InternVL's processor fails on numpy video tensors, so its video samples are rejected: tested below).
VIDEO_FAMILIES = {"minicpmv4_6", "minicpmv4_7", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision"}
# Families whose tiny model carries the published template (the others keep a marked stand-in).
PUBLISHED = [f for f in FAMILIES if f not in ("minicpmv4_7", "idefics3")]
# What the template writes right after an answer, and so is labelled with it.
END_OF_TURN = {"llava": "", "gemma3": "<end_of_turn>", "idefics3": "<|im_end|>", "smolvlm": "<end_of_utterance>"}


def _user(*blocks):
    return {"role": "user", "content": [b if isinstance(b, dict) else {"type": "text", "text": b} for b in blocks]}


def _assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


IMG, VID = {"type": "image"}, {"type": "video"}
CASES = {
    "zero_images": [_user("what is two plus two?"), _assistant("4")],
    "single_image": [_user(IMG, "\nwhat color is the shape?"), _assistant("red")],
    "multiple_images": [_user(IMG, " left, ", IMG, " right: which is blue?"), _assistant("right")],
    "adjacent_images": [_user(IMG, IMG, "are they the same?"), _assistant("no")],
    "system_prompt": [{"role": "system", "content": [{"type": "text", "text": "answer in one word."}]},
                      _user(IMG, "\ndescribe the image."), _assistant("a cat")],
    "multi_turn": [_user(IMG, "\nwhat is it?"), _assistant("a dog"), _user("and the color?"), _assistant("brown"),
                   _user(IMG, "\nand this one?"), _assistant("a horse")],
    "video": [_user(VID, "\nwhat happens?"), _assistant("the color changes")],
}


def _ours(conversation):
    """The same conversation in our normalized schema: placeholders in one string per turn."""
    marks = {"image": "<image>", "video": "<video>"}
    return [{"role": m["role"], "content": "".join(marks.get(b["type"]) or b["text"] for b in m["content"])}
            for m in conversation]


def _media(conversation):
    images, videos = [], []
    for block in (b for m in conversation for b in m["content"]):
        if block["type"] == "image":
            # Different sizes and colours, so a swapped or merged image shows in the pixels and ids.
            images.append(Image.new("RGB", (56 + 28 * len(images), 56), (60 * len(images), 200, 30)))
        elif block["type"] == "video":
            frames = np.zeros((4, 56, 56, 3), np.uint8)
            frames[..., 0] = np.arange(4)[:, None, None] * 60
            videos.append(frames)
    return images, videos


def _with_media(conversation, images, videos):
    """The OpenAI form with the decoded image/video objects in the blocks, as a user passes them."""
    it_images, it_videos = iter(images), iter(videos)
    fill = {"image": lambda: {"type": "image", "image": next(it_images)},
            "video": lambda: {"type": "video", "video": next(it_videos)}}
    return [{**m, "content": [fill[b["type"]]() if b["type"] in fill else b for b in m["content"]]}
            for m in conversation]


@pytest.fixture(scope="module")
def processors():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = build_tiny_processor(family)
        return cache[family]

    return get


def _label_runs(labels, ids):
    runs, current = [], []
    for label, token in zip(labels, ids):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(int(token))
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("family, case", [(f, c) for f in FAMILIES for c in sorted(CASES)
                                          if c != "video" or f in VIDEO_FAMILIES])
def test_ids_equal_the_processors_own_chat_template(processors, family, case):
    processor = processors(family)
    conversation = CASES[case]
    images, videos = _media(conversation)
    kwargs = {"processor_kwargs": {"do_sample_frames": False}} if videos else {}
    reference = processor.apply_chat_template(_with_media(conversation, images, videos), tokenize=True,
                                              return_dict=True, return_tensors="np", **kwargs)
    ours = SampleProcessor(processor, 4096, get_spec(family).image_inputs)(_ours(conversation), images, videos)

    assert ours["input_ids"].tolist() == reference["input_ids"][0].tolist()
    for key in get_spec(family).image_inputs:
        assert (key in ours) == (key in reference), key
        if key in ours:
            np.testing.assert_array_equal(ours[key], reference[key])
    answers = [m["content"][0]["text"] for m in conversation if m["role"] == "assistant"]
    decoded = [processor.tokenizer.decode(run).strip() for run in _label_runs(ours["labels"], ours["input_ids"])]
    assert decoded == [a + END_OF_TURN.get(family, "<|im_end|>") for a in answers]


def test_qwen2_vl_adjacent_images_are_framed_apart(processors):
    """Defect 2: <image><image> must give two <|vision_start|>...<|vision_end|> runs, not one merged run."""
    processor = processors("qwen2_vl")
    images, _ = _media(CASES["adjacent_images"])
    out = SampleProcessor(processor, 4096, get_spec("qwen2_vl").image_inputs)(_ours(CASES["adjacent_images"]), images)
    tokens = processor.tokenizer.convert_ids_to_tokens(out["input_ids"].tolist())
    text = "".join(t if t.startswith("<|") else " " for t in tokens)
    assert text.count("<|vision_start|><|image_pad|>") == 2
    assert "<|image_pad|><|vision_end|><|vision_start|><|image_pad|>" in text
    assert int(out["image_grid_thw"].prod(-1).sum()) // 4 == tokens.count("<|image_pad|>")


def test_minicpmv46_template_renders_the_empty_think_block_of_its_instruct_mode(processors):
    """The published MiniCPM-V 4.6 template marks the answer after the last question with an empty
    think block, as its generation prompt does with enable_thinking false: trained text = served text."""
    processor = processors("minicpmv4_6")
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "q"}]},
                                          {"role": "assistant", "content": [{"type": "text", "text": "a"}]}],
                                         tokenize=False)
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "q"}]}],
                                           tokenize=False, add_generation_prompt=True)
    assert text == prompt + "a<|im_end|>\n"


def test_tiny_processors_carry_the_published_template(processors):
    for family in PUBLISHED:
        assert processors(family).chat_template == published_chat_template(family)
        assert processors(family).tokenizer.chat_template == published_chat_template(family)


def test_template_files_match_their_recorded_sha256():
    provenance = json.loads((TEMPLATES_DIR / "PROVENANCE.json").read_text())
    checked = 0
    for family, entry in provenance.items():
        for name, record in (entry.get("files") or {}).items() if isinstance(entry, dict) else ():
            data = (TEMPLATES_DIR / family / name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == record["sha256"], f"{family}/{name} changed"
            if "git_blob_sha1" in record:  # the Hub's etag of the published file
                blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
                assert blob == record["git_blob_sha1"], f"{family}/{name} is not the published file"
            checked += 1
    assert checked >= 10
    # Every family either carries a recorded published template or says plainly that it does not.
    for family in FAMILIES:
        entry = provenance[family]
        assert entry.get("files") or entry["status"].startswith("NOT FOUND"), family
        assert (family in PUBLISHED) == bool(entry.get("files")), family


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_template_is_the_published_json_value(family):
    published = json.loads((TEMPLATES_DIR / family / "chat_template.json").read_bytes())
    assert published["chat_template"] == published_chat_template(family)


def test_internvl_video_is_rejected_by_reason(processors):
    from omni_ray.data.errors import DataError

    _, videos = _media(CASES["video"])
    with pytest.raises(DataError, match="InternVLProcessor cannot prepare video") as err:
        SampleProcessor(processors("internvl"), 4096, get_spec("internvl").image_inputs)(_ours(CASES["video"]), [], videos)
    assert err.value.reason == "unsupported_modality"
