"""Several sources as one dataset, row positions, and every bad kind through the training reader.

* Two MiniCPM-V files that both number ids from "0" (as its README examples do): prepared
  together through the CLI and read raw, every row keeps a unique position, repeated ids are
  counted by ``data prepare`` and ``data check`` and nothing is skipped (issue 10 defect 1).
* ``data check`` on the raw JSONL of tests/badsamples.py, FIFO and symlinks included: the
  training-side reader and preprocessing report each kind by reason, and nothing hangs.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from badsamples import LOCAL_EXPECTED_REJECTS, MAX_IMAGE_BYTES, MAX_PIXELS, write_local
from omni_ray.config import DataConfig, ModelConfig
from omni_ray.data.check import check, format_report
from omni_ray.data.pipeline import read_source
from omni_ray.launch.cli import main

pytestmark = pytest.mark.dist


def _readme_file(path, images: list[str], answer: str) -> None:
    """A MiniCPM-V finetune file numbering ids from "0", images relative to the file."""
    records = [{"id": str(i), "image": image,
                "conversations": [{"role": "user", "content": "<image>\nWhat is it?"},
                                  {"role": "assistant", "content": f"{answer} {i}"}]} for i, image in enumerate(images)]
    path.write_text(json.dumps(records))


@pytest.fixture(scope="module")
def two_files(tmp_path_factory, color_data):
    train_jsonl, _ = color_data  # real PNGs under its folder
    images = [json.loads(line)["image"] for line in train_jsonl.read_text().splitlines()[:6]]
    a, b = train_jsonl.parent / "a.json", train_jsonl.parent / "b.json"
    _readme_file(a, images, "first")
    _readme_file(b, images[::-1], "second")
    return [str(a), str(b)], len(images)


def test_two_files_with_the_same_ids_keep_every_row(ray_local, two_files, tmp_path, capsys):
    files, n = two_files
    out = str(tmp_path / "shards")
    assert main(["data", "prepare", *files, "--out", out, "--rows-per-shard", "4"]) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (counts["total"], counts["accepted"], counts["duplicate_ids"]) == (2 * n, 2 * n, n)
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["sources"] == files
    assert manifest["duplicate_ids"]["examples"][0] == {"id": "0", "rows": [0, n]}

    data = DataConfig(train=files)
    for source in (out, files):  # prepared shards and the raw files: the same rows, positions 0..N-1
        rows = read_source(source, data, None).select_columns(["row", "id", "messages"]).take_all()
        assert sorted(r["row"] for r in rows) == list(range(2 * n))
        assert Counter(r["id"] for r in rows) == Counter({str(i): 2 for i in range(n)})
        answers = sorted(json.loads(r["messages"])[1]["content"] for r in rows)
        assert answers == sorted([f"first {i}" for i in range(n)] + [f"second {i}" for i in range(n)])


@pytest.mark.timeout(600)  # a FIFO among the images must not hang the check
def test_check_reports_every_bad_kind_and_repeated_ids(ray_local, tiny_minicpmv, two_files, tmp_path_factory):
    """One ``data check`` over the bad samples and the two files numbering ids from "0" (one pipeline,
    not two: each costs a Ray Data start-up): every bad kind by its reason, the good rows all ok, and
    exactly the two files' repeated ids counted (the bad samples' ids are all distinct)."""
    src = write_local(tmp_path_factory.mktemp("bad"))
    files, n = two_files
    sources = [str(src), *files]
    data = DataConfig(train=sources, model_max_length=4096, max_image_pixels=MAX_PIXELS,
                      max_image_bytes=MAX_IMAGE_BYTES, read_timeout_s=20)
    report = check(sources, data, ModelConfig(path=str(tiny_minicpmv)), None)
    assert report["by_reason"] == dict(sorted(Counter(LOCAL_EXPECTED_REJECTS.values()).items()))
    n_bad = report["total"] - 2 * n  # rows of the bad-samples file: positions 0..n_bad-1
    assert report["ok"] == report["total"] - len(LOCAL_EXPECTED_REJECTS)
    assert "root:" not in json.dumps(report), "no /etc/passwd content in the report"
    assert report["duplicate_ids"]["count"] == n
    assert (f"repeated ids (all rows still train): {n}   e.g. '0' (rows {n_bad} and {n_bad + n})"
            in format_report(report))
