"""Data forms read as users have them: hub Parquet (written by `datasets`), WebDataset tars (written
by `webdataset`), data: URIs, on local disk; the pure normalisers; the bad-input bug list of issue 16."""

from __future__ import annotations

import base64
import io
import json
import pickle
import tarfile

import pytest
from PIL import Image

from omni_ray.data.embedded import decode_data_uri, lift_media
from omni_ray.data.errors import DataError, DataSourceError
from omni_ray.data.reader import InputPolicy, iter_records, iter_rows
from omni_ray.data.sources import count_units, iter_source_rows, resolve_entry

TURNS = [{"role": "user", "content": "<image>\nWhat colour?"}, {"role": "assistant", "content": "red"}]


def png(color=(255, 0, 0), size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def rows_of(entry, **kw) -> list[dict]:
    source = count_units(resolve_entry(entry, **kw))
    return list(iter_source_rows(source))


# ----------------------------------------------------------------------------- pure parts


def test_hf_struct_with_only_a_path_is_a_path_not_a_multi_image_map(tmp_path):
    (tmp_path / "a.jpg").write_bytes(png())
    record = {"image": {"bytes": None, "path": "a.jpg"}, "conversations": TURNS}
    (tmp_path / "d.json").write_text(json.dumps([record]))
    (row,) = iter_rows([str(tmp_path / "d.json")])
    assert row["reason"] == "" and row["image_refs"] == [str(tmp_path / "a.jpg")] and row["images"] == []


def test_lift_media_keeps_bytes_aside_and_markers_in_place():
    record = {"images": [{"bytes": b"AB", "path": "x.png"}, {"bytes": None, "path": "y.png"}], "messages": [
        {"role": "user", "content": [{"type": "image", "image": {"bytes": b"CD", "path": None}}]}]}
    lifted, blobs = lift_media(record)
    assert blobs == [b"AB", b"CD"]
    assert lifted["images"][1] == "y.png" and lifted["images"][0].startswith("\x00")
    assert lifted["messages"][0]["content"][0]["image"].startswith("\x00")
    assert record["images"][0]["bytes"] == b"AB", "the input record is not changed"


def test_data_uri_size_is_checked_before_decoding_and_bad_base64_is_corrupt():
    good = png()
    assert decode_data_uri(data_uri(good), 1 << 20) == good
    with pytest.raises(DataError) as info:
        decode_data_uri("data:image/png;base64," + "A" * 4000, 100)  # never decoded: 3000 bytes > 100
    assert info.value.reason == "image_too_large"
    with pytest.raises(DataError) as info:
        decode_data_uri("data:image/png;base64,@@@@", 1 << 20)
    assert info.value.reason == "corrupt_image"


@pytest.mark.parametrize("form", ["minicpmv", "sharegpt", "swift_blocks", "query_response"])
def test_data_uris_are_images_in_every_record_form(tmp_path, form):
    """Issue 16: 6 of 6 data: URIs were rejected as bad_path; one over 4 KB as "longer than the system allows"."""
    big = png(size=(64, 64)) + b"\0" * 5000  # over 4 KB of base64 (PNG ignores bytes after IEND)
    uri = data_uri(big)
    records = {
        "minicpmv": {"image": uri, "conversations": TURNS},
        "sharegpt": {"images": [uri], "messages": TURNS},
        "swift_blocks": {"messages": [{"role": "user", "content": [{"type": "image", "image": uri},
                                                                   {"type": "text", "text": "colour?"}]},
                                      {"role": "assistant", "content": "red"}]},
        "query_response": {"images": [uri], "query": "<image>colour?", "response": "red"},
    }
    (tmp_path / "d.jsonl").write_text(json.dumps(records[form]) + "\n")
    (row,) = iter_rows([str(tmp_path / "d.jsonl")])
    assert row["reason"] == "", row["detail"]
    assert row["image_refs"] == [""] and row["images"] == [big]
    small = InputPolicy(max_image_bytes=1000)
    (row,) = iter_rows([str(tmp_path / "d.jsonl")], policy=small)
    assert row["reason"] == "image_too_large"


def test_hub_layouts_from_the_schema():
    import pyarrow as pa

    from omni_ray.data.hub import layout_of, to_record

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    turn = pa.struct([("from", pa.string()), ("value", pa.string())])
    ov = pa.schema([("id", pa.string()), ("image", image), ("conversations", pa.list_(turn)), ("data_source", pa.string())])
    assert layout_of(ov).name == "record" and "data_source" not in layout_of(ov).columns
    texts = pa.struct([("user", pa.string()), ("assistant", pa.string()), ("source", pa.string())])
    cauldron = pa.schema([("images", pa.list_(image)), ("texts", pa.list_(texts))])
    layout = layout_of(cauldron)
    assert layout.name == "the_cauldron" and layout.images == ("images",)
    record = to_record({"images": [{"bytes": b"x", "path": None}], "texts": [
        {"user": "q1", "assistant": "a1", "source": "s"}, {"user": "q2", "assistant": "a2", "source": "s"}]}, layout)
    assert [m["role"] for m in record["messages"]] == ["user", "assistant", "user", "assistant"]
    odd = pa.schema([("pic", image), ("dialog", pa.list_(pa.struct([("speaker", pa.string()), ("text", pa.string())])))])
    with pytest.raises(ValueError, match=r"no conversation column among \['pic', 'dialog'\].*data.columns"):
        layout_of(odd)
    mapping = {"conversation": "dialog", "images": "pic", "role_key": "speaker", "content_key": "text",
               "user": "Q", "assistant": "A"}
    mapped = to_record({"pic": {"bytes": b"x"}, "dialog": [{"speaker": "Q", "text": "hi"}, {"speaker": "A", "text": "yo"}]},
                       layout_of(odd, mapping))
    assert mapped["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert mapped["images"] == [{"bytes": b"x"}]


# ----------------------------------------------------------------------------- hub Parquet


def _hf_parquet(path, columns: dict, features: dict):
    import datasets

    ds = datasets.Dataset.from_dict(columns)
    for name, feature in features.items():
        ds = ds.cast_column(name, feature)
    ds.to_parquet(str(path))
    return path


def test_hub_parquet_layouts_written_by_datasets(tmp_path):
    import datasets

    red, blue = png(), png((0, 0, 255))
    folder = tmp_path / "hub"
    folder.mkdir()
    _hf_parquet(folder / "a-onevision.parquet", {
        "id": ["ov0", "ov1"], "image": [{"bytes": red, "path": None}, {"bytes": blue, "path": None}],
        "conversations": [[{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]] * 2,
    }, {"image": datasets.Image()})
    _hf_parquet(folder / "b-cauldron.parquet", {
        "images": [[{"bytes": red, "path": None}, {"bytes": blue, "path": None}]],
        "texts": [[{"user": "Colours?", "assistant": "red, blue", "source": "x"}]],
    }, {"images": datasets.Sequence(datasets.Image())})
    _hf_parquet(folder / "c-trl.parquet", {
        "images": [[{"bytes": blue, "path": None}]],
        "messages": [[{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "Colour?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "blue"}]}]],
    }, {"images": datasets.Sequence(datasets.Image())})
    source = resolve_entry(str(folder))
    assert [u.form for u in source.units] == ["parquet"] * 3, "a folder of .parquet files is read"
    rows = rows_of(str(folder))
    assert [r["reason"] for r in rows] == [""] * 4, [r["detail"] for r in rows]
    assert [r["source_row"] for r in rows] == [0, 1, 2, 3] and [r["row"] for r in rows] == [0, 1, 2, 3]
    assert [r["images"] for r in rows] == [[red], [blue], [red, blue], [blue]]
    assert [r["image_refs"] for r in rows] == [[""], [""], ["", ""], [""]]
    assert json.loads(rows[2]["messages"])[0]["content"] == "<image>\n<image>\nColours?"
    assert json.loads(rows[3]["messages"])[0]["content"] == "<image>Colour?"
    assert [r["source_file"] for r in rows] == [0, 0, 1, 2]
    glob_rows = rows_of(str(folder / "*-cauldron.parquet"))
    assert [r["images"] for r in glob_rows] == [[red, blue]]


def test_hub_parquet_limits_and_unmapped_layouts(tmp_path):
    import datasets

    bomb = png(size=(200, 200))
    path = _hf_parquet(tmp_path / "d.parquet", {
        "image": [{"bytes": bomb, "path": None}, {"bytes": b"not an image", "path": None}],
        "conversations": [[{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "y"}]] * 2,
    }, {"image": datasets.Image()})
    source = count_units(resolve_entry(str(path)))
    rows = list(iter_source_rows(source, policy=InputPolicy(max_image_bytes=len(bomb) - 1)))
    assert [r["reason"] for r in rows] == ["image_too_large", ""]
    odd = _hf_parquet(tmp_path / "odd.parquet", {"pic": [{"bytes": bomb, "path": None}], "talk": ["hi"]},
                      {"pic": datasets.Image()})
    with pytest.raises(DataSourceError, match=r"odd.parquet: no conversation column among \['pic', 'talk'\]"):
        resolve_entry(str(odd))


# ----------------------------------------------------------------------------- WebDataset


def _shard(path, samples, **kw):
    import webdataset as wds

    with wds.TarWriter(str(path), **kw) as sink:
        for sample in samples:
            sink.write(sample)
    return path


def test_webdataset_shards_written_by_webdataset(tmp_path):
    red, blue = png(), png((0, 0, 255))
    shards = tmp_path / "shards"
    shards.mkdir()
    _shard(shards / "s-0.tar", [
        {"__key__": "k0", "jpg": red, "json": {"conversations": TURNS}},
        {"__key__": "k1", "0.png": red, "1.png": blue, "json": {"messages": [
            {"role": "user", "content": "two?"}, {"role": "assistant", "content": "yes"}]}},
    ])
    _shard(shards / "s-1.tar", [{"__key__": "k2", "png": blue, "json": {"image": "k2.png", "conversations": TURNS}}])
    source = count_units(resolve_entry(str(shards)))
    assert [(u.form, u.rows, u.offset) for u in source.units] == [("webdataset", 2, 0), ("webdataset", 1, 2)]
    rows = list(iter_source_rows(source))
    assert [r["reason"] for r in rows] == ["", "", ""], [r["detail"] for r in rows]
    assert [r["images"] for r in rows] == [[red], [red, blue], [blue]]
    assert json.loads(rows[1]["messages"])[0]["content"] == "<image>\n<image>\ntwo?", "bound like MiniCPM-V's"


def test_truncated_and_corrupt_shards_are_counted_rejects_not_crashes(tmp_path):
    good = _shard(tmp_path / "good.tar", [{"__key__": f"k{i}", "png": png(), "json": {"conversations": TURNS}}
                                          for i in range(4)])
    data = good.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    bad_header = tmp_path / "bad.tar"
    broken = bytearray(data)
    with tarfile.open(good) as tf:
        third = tf.getmembers()[4].offset  # the first member of the third sample
    broken[third: third + 512] = b"\x07" * 512
    bad_header.write_bytes(bytes(broken))
    for path, reason in ((cut, "truncated_shard"), (bad_header, "corrupt_member")):
        source = count_units(resolve_entry(str(path)))
        rows = list(iter_source_rows(source))
        assert len(rows) == source.rows, "count and read agree"
        assert rows[-1]["reason"] == reason, [r["reason"] for r in rows]
        assert all(r["reason"] == "" for r in rows[:-1])
    gz = tmp_path / "cut.tar.gz"
    _shard(tmp_path / "full.tar.gz", [{"__key__": f"k{i}", "png": png(size=(64, 64)), "json": {"conversations": TURNS}}
                                      for i in range(4)], compress=True)
    gz.write_bytes((tmp_path / "full.tar.gz").read_bytes()[:-200])
    rows = rows_of(str(gz))
    assert rows[-1]["reason"] == "truncated_shard"


# ----------------------------------------------------------------------------- bad input


def test_data_source_error_survives_pickling():
    err = DataSourceError("/d/x.json", "not valid JSON (at line 3 column 1)", "data.train")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is DataSourceError and str(back) == str(err) and back.path == "/d/x.json"


def test_utf16_jsonl_is_named_and_counted_once_per_record(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes("\n".join(json.dumps({"conversations": TURNS}) for _ in range(8)).encode("utf-16") + "\n".encode("utf-16-le"))
    out = list(iter_records(str(path)))
    assert len(out) == 8
    assert all(isinstance(e, DataError) and e.reason == "non_utf8_text" and "re-encode it as UTF-8" in e.detail
               for _, e in out)


def test_json_parse_error_names_line_and_column(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"conversations": []},\n]\n')  # a trailing comma
    with pytest.raises(DataSourceError, match=r"d.json: not valid JSON \(.* at line 3 column 1\)"):
        list(iter_records(str(path)))


def test_unusable_folders_are_named_at_resolve(tmp_path):
    saved = tmp_path / "saved"
    saved.mkdir()
    for name in ("state.json", "dataset_info.json", "data-00000-of-00001.arrow"):
        (saved / name).write_text("{}")
    with pytest.raises(DataSourceError, match="save_to_disk folder.*to_parquet"):
        resolve_entry(str(saved))
    lf = tmp_path / "data"
    lf.mkdir()
    (lf / "dataset_info.json").write_text("{}")
    (lf / "mllm_demo.json").write_text("[]")
    with pytest.raises(DataSourceError, match="dataset_info.json, LLaMA-Factory's registry"):
        resolve_entry(str(lf))
    untarred = tmp_path / "wds"
    untarred.mkdir()
    (untarred / "k0.json").write_text(json.dumps({"conversations": TURNS}))
    (untarred / "k0.jpg").write_bytes(png())
    with pytest.raises(DataSourceError, match="untarred WebDataset"):
        count_units(resolve_entry(str(untarred)))


def test_source_in_no_known_form_names_the_path_and_the_forms(tmp_path):
    (tmp_path / "d.bin").write_bytes(b"\0")
    with pytest.raises(DataSourceError, match=r"d.bin: not a data form omni_ray reads; give a .json file.*parquet"):
        resolve_entry(str(tmp_path / "d.bin"))


def test_read_tasks_carry_embedded_images_as_arrow_blocks(tmp_path):
    """The training read (one task per unit) over a tar and a Parquet file: Arrow blocks of ROW_COLUMNS."""
    import datasets

    from omni_ray.data.pipeline import UnitsDatasource
    from omni_ray.data.reader import ROW_COLUMNS

    red = png()
    _shard(tmp_path / "a.tar", [{"__key__": f"k{i}", "png": red, "json": {"conversations": TURNS}} for i in range(3)])
    _hf_parquet(tmp_path / "b.parquet", {"image": [{"bytes": red, "path": None}] * 2,
                                         "conversations": [[{"from": "human", "value": "<image>q"},
                                                            {"from": "gpt", "value": "a"}]] * 2},
                {"image": datasets.Image()})
    source = count_units(resolve_entry([str(tmp_path / "a.tar"), str(tmp_path / "b.parquet")]))
    tasks = UnitsDatasource(source, None, InputPolicy(), rows_per_block=2).get_read_tasks(parallelism=1)
    blocks = [[t for t in task()] for task in tasks]
    assert [[t.num_rows for t in b] for b in blocks] == [[2, 1], [2]]
    rows = [r for b in blocks for t in b for r in t.to_pylist()]
    assert all(t.schema == ROW_COLUMNS for b in blocks for t in b)
    assert [r["source_row"] for r in rows] == [0, 1, 2, 3, 4] and [r["id"] for r in rows[:3]] == ["k0", "k1", "k2"]
    assert all(r["images"] == [red] and r["reason"] == "" for r in rows)
