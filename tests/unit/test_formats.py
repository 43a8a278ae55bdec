"""Annotation formats -> normalized samples, and every reason a record is rejected."""

from __future__ import annotations

import json

import pytest

from omni_ray.data.errors import REASONS, DataError, DataSourceError
from omni_ray.data.formats import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, normalize_record, resolve_ref
from omni_ray.data.reader import iter_records


def U(text):  # noqa: N802 - short helpers keep the tables readable
    return {"role": "user", "content": text}


def A(text):  # noqa: N802
    return {"role": "assistant", "content": text}


# ------------------------------------------------------------------------ good records

GOOD = [
    (
        "minicpm single image with placeholder",
        {"id": "a", "image": "x.jpg", "conversations": [U("<image>\nWhat?"), A("A cat.")]},
        {"id": "a", "messages": [U("<image>\nWhat?"), A("A cat.")], "image_refs": ["x.jpg"]},
    ),
    (
        "minicpm single image without placeholder: put before the first user turn",
        {"id": "b", "image": "x.jpg", "conversations": [U("What?"), A("A cat.")]},
        {"id": "b", "messages": [U("<image>\nWhat?"), A("A cat.")], "image_refs": ["x.jpg"]},
    ),
    (
        "placeholder inserted after a system turn, into the first user turn",
        {
            "image": "x.jpg",
            "conversations": [{"role": "system", "content": "Be brief."}, U("Q"), A("R")],
        },
        {
            "id": "sample-7",
            "messages": [{"role": "system", "content": "Be brief."}, U("<image>\nQ"), A("R")],
            "image_refs": ["x.jpg"],
        },
    ),
    (
        "minicpm multi-image dict: refs follow text order, not key order",
        {
            "id": 12,
            "image": {"<image_00>": "a.jpg", "<image_01>": "b.jpg"},
            "conversations": [U("<image_01> then <image_00>?"), A("ok"), U("again"), A("no")],
        },
        {
            "id": "12",
            "messages": [U("<image> then <image>?"), A("ok"), U("again"), A("no")],
            "image_refs": ["b.jpg", "a.jpg"],
        },
    ),
    (
        "placeholders spread over several turns",
        {
            "image": {"<image_00>": "a.jpg", "<image_01>": "b.jpg"},
            "conversations": [U("<image_00> this?"), A("yes"), U("and <image_01>?"), A("no")],
        },
        {
            "id": "sample-7",
            "messages": [U("<image> this?"), A("yes"), U("and <image>?"), A("no")],
            "image_refs": ["a.jpg", "b.jpg"],
        },
    ),
    (
        "dict with the single key <image> is the single-image form",
        {"image": {"<image>": "x.jpg"}, "conversations": [U("Q"), A("R")]},
        {"id": "sample-7", "messages": [U("<image>\nQ"), A("R")], "image_refs": ["x.jpg"]},
    ),
    (
        "sharegpt from/value keys with MiniCPM-V image",
        {
            "image": "x.jpg",
            "conversations": [
                {"from": "human", "value": "<image>Q"},
                {"from": "gpt", "value": "R"},
            ],
        },
        {"id": "sample-7", "messages": [U("<image>Q"), A("R")], "image_refs": ["x.jpg"]},
    ),
    (
        "llama-factory messages + images",
        {"messages": [U("<image><image>Compare."), A("Same.")], "images": ["1.png", "2.png"]},
        {
            "id": "sample-7",
            "messages": [U("<image><image>Compare."), A("Same.")],
            "image_refs": ["1.png", "2.png"],
        },
    ),
    (
        "llama-factory images without placeholders: one per image, before first user turn",
        {"messages": [U("Compare."), A("Same.")], "images": ["1.png", "2.png"]},
        {
            "id": "sample-7",
            "messages": [U("<image>\n<image>\nCompare."), A("Same.")],
            "image_refs": ["1.png", "2.png"],
        },
    ),
    (
        "text-only minicpm sample (no image field)",
        {"id": "t", "conversations": [U("Hi"), A("Hello")]},
        {"id": "t", "messages": [U("Hi"), A("Hello")], "image_refs": []},
    ),
    (
        "text-only sharegpt sample with empty images list",
        {"messages": [U("Hi"), A("Hello")], "images": []},
        {"id": "sample-7", "messages": [U("Hi"), A("Hello")], "image_refs": []},
    ),
    (
        "image: null is text-only",
        {"image": None, "conversations": [U("Hi"), A("Hello")]},
        {"id": "sample-7", "messages": [U("Hi"), A("Hello")], "image_refs": []},
    ),
    (
        "llava: from/value, <image> in the first human turn",
        {"id": "llava-1", "image": "coco/1.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A bus."},
            {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Red."}]},
        {"id": "llava-1", "messages": [U("<image>\nWhat is shown?"), A("A bus."), U("Colour?"), A("Red.")],
         "image_refs": ["coco/1.jpg"]},
    ),
    (
        "llama-factory sharegpt: top-level system and tools (JSON string), images",
        {"conversations": [{"from": "human", "value": "<image>Weather?"}, {"from": "gpt", "value": "Sunny."}],
         "system": "You are helpful.", "tools": '[{"name": "get_weather", "parameters": {}}]',
         "images": ["a.jpg"]},
        {"id": "sample-7", "messages": [{"role": "system", "content": "You are helpful."}, U("<image>Weather?"),
                                        A("Sunny.")],
         "image_refs": ["a.jpg"], "tools": [{"name": "get_weather", "parameters": {}}]},
    ),
    (
        "llama-factory videos with <video> placeholders",
        {"messages": [U("<video>What happens?"), A("A dog runs.")], "videos": ["clip.mp4"]},
        {"id": "sample-7", "messages": [U("<video>What happens?"), A("A dog runs.")], "image_refs": [],
         "video_refs": ["clip.mp4"]},
    ),
    (
        "ms-swift content blocks keep block order; per-turn loss kept",
        {"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image", "image": "a.jpg"}, {"type": "text", "text": "and"},
                                         {"type": "image_url", "image_url": {"url": "b.png"}},
                                         {"type": "video", "video": "c.mp4"}, {"type": "text", "text": "?"}]},
            {"role": "assistant", "content": "Same.", "loss": False},
            {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes.", "loss": True}]},
        {"id": "sample-7", "messages": [{"role": "system", "content": "Be brief."},
                                        U("<image>and<image><video>?"),
                                        {"role": "assistant", "content": "Same.", "loss": False}, U("Sure?"),
                                        {"role": "assistant", "content": "Yes.", "loss": True}],
         "image_refs": ["a.jpg", "b.png"], "video_refs": ["c.mp4"]},
    ),
    (
        "ms-swift query/response/history with system and images",
        {"system": "S", "query": "<image>Now?", "response": "Later.", "history": [["Hi", "Hello"]],
         "images": ["x.jpg"]},
        {"id": "sample-7", "messages": [{"role": "system", "content": "S"}, U("Hi"), A("Hello"), U("<image>Now?"),
                                        A("Later.")], "image_refs": ["x.jpg"]},
    ),
    (
        "multi-turn with non-ascii text",
        {"conversations": [U("Grüße 你好"), A("ok"), U("más"), A("sí")]},
        {"id": "sample-7", "messages": [U("Grüße 你好"), A("ok"), U("más"), A("sí")],
         "image_refs": []},
    ),
]


@pytest.mark.parametrize("record,expected", [c[1:] for c in GOOD], ids=[c[0] for c in GOOD])
def test_normalize_good(record, expected):
    expected = {"video_refs": [], "tools": None, **expected}
    before = json.dumps(record, sort_keys=True)
    assert normalize_record(record, 7) == expected
    assert json.dumps(record, sort_keys=True) == before, "input record must not be mutated"
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in expected["messages"])
    assert placeholders == len(expected["image_refs"])
    videos = sum(m["content"].count(VIDEO_PLACEHOLDER) for m in expected["messages"])
    assert videos == len(expected["video_refs"])


# ------------------------------------------------------------------------- bad records

BAD = [
    ("not an object", ["x"], "malformed_conversation", "JSON list"),
    ("no turns key", {"id": "x", "image": "a.jpg"}, "missing_field", "'conversations'"),
    ("empty turns", {"conversations": []}, "empty_conversation", "is empty"),
    ("only a system turn", {"conversations": [{"role": "system", "content": "s"}]},
     "empty_conversation", "no user turn"),
    ("turns not a list", {"conversations": "hi"}, "malformed_conversation", "expected a list"),
    ("turn not an object", {"conversations": ["hi", A("x")]}, "malformed_conversation",
     "conversations[0]"),
    ("content not a string", {"conversations": [U(3), A("b")]}, "malformed_conversation",
     "content is int"),
    ("content list of non-blocks", {"conversations": [U(["a"]), A("b")]}, "malformed_conversation",
     "content[0] is not a text/image"),
    ("content missing", {"conversations": [{"role": "user"}, A("b")]},
     "malformed_conversation", "content is NoneType"),
    ("unknown role", {"messages": [{"role": "tool", "content": "x"}, A("b")]},
     "malformed_conversation", "'tool'"),
    ("both image and images", {"image": "a", "images": ["a"], "conversations": [U("q"), A("a")]},
     "malformed_conversation", "both"),
    ("image path not a string", {"image": 3, "conversations": [U("q"), A("a")]},
     "malformed_conversation", "expected a path"),
    ("empty image path", {"images": [""], "messages": [U("<image>q"), A("a")]},
     "malformed_conversation", "non-empty path"),
    ("starts with assistant", {"conversations": [A("x"), U("y")]}, "wrong_role_order",
     "starting with user"),
    ("ends with user", {"conversations": [U("x"), A("y"), U("z")]}, "wrong_role_order",
     "ending with assistant"),
    ("two users in a row", {"conversations": [U("x"), U("y"), A("z")]}, "wrong_role_order", ""),
    ("system in the middle",
     {"conversations": [U("x"), {"role": "system", "content": "s"}, A("z")]},
     "wrong_role_order", ""),
    ("only a user turn", {"conversations": [U("x")]}, "wrong_role_order", ""),
    ("placeholder without image", {"conversations": [U("<image> q"), A("a")]},
     "placeholder_mismatch", "no images"),
    ("two placeholders, one image", {"image": "a.jpg", "conversations": [U("<image><image>"), A("a")]},
     "placeholder_mismatch", "2 <image>"),
    ("three placeholders, two images",
     {"images": ["a", "b"], "messages": [U("<image><image>"), A("<image>")]},
     "placeholder_mismatch", "3 <image>"),
    ("numbered placeholder with a string image",
     {"image": "a.jpg", "conversations": [U("<image_00>"), A("a")]},
     "placeholder_mismatch", "<image_00>"),
    ("dict key without its placeholder",
     {"image": {"<image_00>": "a", "<image_01>": "b"}, "conversations": [U("<image_00>"), A("a")]},
     "placeholder_mismatch", "<image_01> appears 0 times"),
    ("dict key used twice",
     {"image": {"<image_00>": "a"}, "conversations": [U("<image_00><image_00>"), A("a")]},
     "placeholder_mismatch", "appears 2 times"),
    ("placeholder without dict key",
     {"image": {"<image_00>": "a"}, "conversations": [U("<image_00><image_01>"), A("a")]},
     "placeholder_mismatch", "<image_01>"),
    ("plain placeholder with dict images",
     {"image": {"<image_00>": "a"}, "conversations": [U("<image_00><image>"), A("a")]},
     "placeholder_mismatch", "<image_XX>"),
    ("dict key of the wrong shape",
     {"image": {"cat": "a"}, "conversations": [U("cat"), A("a")]},
     "placeholder_mismatch", "'cat'"),
    ("lone surrogate in content", {"conversations": [U("bad \udcff byte"), A("a")]},
     "non_utf8_text", "conversations[0]"),
    ("replacement character in content", {"conversations": [U("q"), A("bad \ufffd")]},
     "non_utf8_text", "conversations[1]"),
    ("llama-factory audios", {"messages": [U("<audio>What is said?"), A("Hi")], "audios": ["a.wav"]},
     "unsupported_modality", "audio"),
    ("audio placeholder without audios", {"messages": [U("<audio>hm"), A("Hi")]}, "unsupported_modality",
     "<audio>"),
    ("ms-swift audio block", {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]},
                                           A("x")]}, "unsupported_modality", "audio block"),
    ("ms-swift grounding objects",
     {"messages": [U("<image>Find <ref-object>"), A("<bbox>")], "images": ["a.jpg"],
      "objects": {"ref": ["cat"], "bbox": [[0, 0, 1, 1]]}}, "unsupported_field", "objects"),
    ("image placeholder in an assistant turn",
     {"messages": [U("q"), A("here: <image>")], "images": ["a.jpg"]}, "media_in_assistant_turn", "<image>"),
    ("numbered image placeholder in an assistant turn",
     {"image": {"<image_00>": "a", "<image_01>": "b"},
      "conversations": [U("<image_00>"), A("<image_01>")]}, "media_in_assistant_turn", "<image>"),
    ("video placeholder in an assistant turn",
     {"messages": [U("<video>"), A("<video>")], "videos": ["a.mp4", "b.mp4"]}, "media_in_assistant_turn",
     "<video>"),
    ("two video placeholders, one video", {"messages": [U("<video><video>"), A("a")], "videos": ["a.mp4"]},
     "placeholder_mismatch", "video"),
    ("video placeholder without videos", {"messages": [U("<video>"), A("a")]}, "placeholder_mismatch",
     "no videos"),
    ("tool-call turn", {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{}"},
                                          {"from": "observation", "value": "r"}, {"from": "gpt", "value": "a"}]},
     "malformed_conversation", "tool-call turns"),
    ("loss is not a boolean", {"messages": [U("q"), {"role": "assistant", "content": "a", "loss": "no"}]},
     "malformed_conversation", "loss"),
    ("loss on a user turn", {"messages": [{"role": "user", "content": "q", "loss": True}, A("a")]},
     "malformed_conversation", "assistant turns only"),
    ("system twice", {"system": "s", "messages": [{"role": "system", "content": "t"}, U("q"), A("a")]},
     "malformed_conversation", "system"),
    ("tools not a list", {"tools": "not json", "messages": [U("q"), A("a")]}, "malformed_conversation", "tools"),
    ("images in blocks and in images", {"messages": [{"role": "user", "content": [{"type": "image", "image": "a"}]},
                                                     A("x")], "images": ["b"]}, "malformed_conversation", "both"),
    ("unknown content block", {"messages": [{"role": "user", "content": [{"type": "file", "file": "a"}]}, A("x")]},
     "malformed_conversation", "content[0]"),
    ("history not pairs", {"query": "q", "response": "r", "history": [["only one"]]}, "malformed_conversation",
     "history"),
    ("lone surrogate in image path", {"image": "a\udce9.jpg", "conversations": [U("q"), A("a")]},
     "non_utf8_text", "image path"),
]


@pytest.mark.parametrize("record,reason,detail", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_normalize_bad(record, reason, detail):
    with pytest.raises(DataError) as info:
        normalize_record(record, 3)
    assert info.value.reason == reason
    assert detail in info.value.detail
    assert str(info.value).startswith(f"{reason}: ")


def test_every_format_reason_is_covered():
    tested = {reason for _, _, reason, _ in BAD}
    # missing_image is only known once files are opened; images/tokenizer reasons elsewhere.
    format_reasons = {
        "empty_conversation", "malformed_conversation", "wrong_role_order",
        "placeholder_mismatch", "non_utf8_text", "missing_field", "unsupported_modality",
        "unsupported_field", "media_in_assistant_turn",
    }
    assert format_reasons <= tested
    assert format_reasons <= set(REASONS)


def test_data_error_contract():
    err = DataError("missing_image", "no image at a.jpg")
    assert isinstance(err, ValueError)
    assert (err.reason, err.detail, str(err)) == ("missing_image", "no image at a.jpg",
                                                  "missing_image: no image at a.jpg")
    import pickle

    again = pickle.loads(pickle.dumps(err))
    assert (again.reason, again.detail) == (err.reason, err.detail)
    with pytest.raises(ValueError, match="unknown DataError reason 'oops'"):
        DataError("oops", "x")
    assert "image_tokens_truncated" not in REASONS  # truncation drops whole rounds: it never cuts an image


# ----------------------------------------------------------------------------- files


def test_iter_jsonl_reports_bad_lines_only(tmp_path):
    path = tmp_path / "data.jsonl"
    good = json.dumps({"id": "g", "conversations": [U("q"), A("a")]}).encode()
    path.write_bytes(
        b"\xef\xbb\xbf" + good + b"\n"  # BOM on the first line
        + b"\n"  # blank lines are skipped and do not take an index
        + b'{"id": "latin1", "conversations": [{"role": "user", "content": "caf\xe9"}]}\n'
        + b"{not json\n"
        + good  # no trailing newline
    )
    out = list(iter_records(str(path)))
    assert [i for i, _ in out] == [0, 1, 2, 3]
    assert out[0][1]["id"] == "g" and out[3][1]["id"] == "g"
    assert isinstance(out[1][1], DataError) and out[1][1].reason == "non_utf8_text"
    assert "line 3" in out[1][1].detail
    assert isinstance(out[2][1], DataError) and out[2][1].reason == "malformed_conversation"
    assert "line 4" in out[2][1].detail


def test_iter_json_list_with_bad_bytes_rejects_only_that_record(tmp_path):
    path = tmp_path / "data.json"
    path.write_bytes(
        b'[{"id": "ok", "conversations": [{"role": "user", "content": "q"},'
        b' {"role": "assistant", "content": "a"}]},'
        b' {"id": "bad", "conversations": [{"role": "user", "content": "caf\xe9"},'
        b' {"role": "assistant", "content": "a"}]}]'
    )
    records = list(iter_records(str(path)))
    assert [i for i, _ in records] == [0, 1]
    assert normalize_record(records[0][1], 0)["id"] == "ok"
    with pytest.raises(DataError) as info:
        normalize_record(records[1][1], 1)
    assert info.value.reason == "non_utf8_text"


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("bad.json", b"[{", "not valid JSON"),
        ("obj.json", b'{"a": 1}', "must be a list"),
        ("data.csv", b"a,b", "unknown annotation format"),
        ("trailing.json", b'[{"a": 1}] x', "not valid JSON"),
    ],
)
def test_iter_records_whole_file_errors(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=match):
        list(iter_records(str(tmp_path / name)))


def test_iter_records_missing_file(tmp_path):
    with pytest.raises(DataSourceError, match="nope.jsonl: does not exist; check the path"):
        list(iter_records(str(tmp_path / "nope.jsonl")))


@pytest.mark.parametrize(
    "ref,base,kwargs,expected",
    [
        ("img/a.jpg", "/data/set/train.json", {}, "/data/set/img/a.jpg"),
        ("./img/../a.jpg", "/data/set/train.json", {}, "/data/set/a.jpg"),
        ("/data/set/img/a.jpg", "/data/set/train.json", {}, "/data/set/img/a.jpg"),  # absolute but inside
        ("../img/a.jpg", "/data/set/train.json", {"allow_absolute": True}, "/data/img/a.jpg"),
        ("/abs/a.jpg", "/data/set/train.json", {"allow_absolute": True}, "/abs/a.jpg"),
        ("s3://other/a.jpg", "/data/set/train.json", {"allow_absolute": True}, "s3://other/a.jpg"),
        ("img/a.jpg", "s3://bkt/sets/train.jsonl", {}, "s3://bkt/sets/img/a.jpg"),
        ("./img/../a.jpg", "s3://bkt/sets/train.jsonl", {}, "s3://bkt/sets/a.jpg"),
        ("a.jpg", "s3://bkt/train.jsonl", {}, "s3://bkt/a.jpg"),
        ("img/a.jpg", "file:///data/set/train.json", {}, "/data/set/img/a.jpg"),
        ("a.jpg", "/data/set/train.json", {"root": "/images"}, "/images/a.jpg"),  # data.image_root
        ("a.jpg", "/data/set/train.json", {"root": "s3://bkt/imgs/"}, "s3://bkt/imgs/a.jpg"),
    ],
)
def test_resolve_ref(ref, base, kwargs, expected):
    assert resolve_ref(ref, base, **kwargs) == expected


@pytest.mark.parametrize(
    "ref,base,kwargs,reason",
    [
        ("/etc/passwd", "/data/set/train.json", {}, "unsafe_path"),
        ("../../etc/passwd", "/data/set/train.json", {}, "unsafe_path"),
        ("../../a.jpg", "s3://bkt/sets/train.json", {}, "unsafe_path"),
        ("s3://other/a.jpg", "s3://bkt/sets/train.json", {}, "unsafe_path"),
        ("/data/set/a.jpg", "/data/set/train.json", {"root": "/images"}, "unsafe_path"),
        ("http://example.com/a.jpg", "/data/set/train.json", {}, "remote_url"),
        ("HTTPS://example.com/a.jpg", "/data/set/train.json", {"allow_absolute": True}, "remote_url"),
        ("img/a\x00.jpg", "/data/set/train.json", {}, "bad_path"),
        ("a/" * 2048 + "x.jpg", "/data/set/train.json", {}, "bad_path"),
        ("x" * 300 + ".jpg", "/data/set/train.json", {}, "bad_path"),
        ("ftp://host/a.jpg", "/data/set/train.json", {}, "bad_path"),
        ("data:image/png;base64,iVBORw0KGgo=", "/data/set/train.json", {}, "bad_path"),
    ],
)
def test_resolve_ref_rejects(ref, base, kwargs, reason):
    with pytest.raises(DataError) as info:
        resolve_ref(ref, base, **kwargs)
    assert info.value.reason == reason
    if reason == "remote_url":
        assert ref in info.value.detail, "URLs are reported as the URL, not as a mangled local path"
    if reason == "unsafe_path":
        assert "data.image_root" in info.value.detail and "allow_absolute_paths" in info.value.detail
