"""Every data form through the commands a user runs: hub Parquet written by ``datasets`` and
WebDataset shards written by ``webdataset``, on local disk and on (moto) S3.

* ``omni-ray validate`` resolves each form (a folder of .parquet / .tar, an s3:// prefix);
* ``data check`` counts rows and rejects per source, a truncated shard and a corrupt image member
  among them (by reason, the run completes);
* ``data prepare`` turns S3 tars into prepared shards with the images embedded;
* ``omni-ray train`` (tiny MiniCPM-V, 2 workers, 2 steps) from hub Parquet and from S3 tars;
* the bad-input list: an unusable whole file is one error line (exit 2), ``prepare`` with nothing
  accepted exits 2, and training on that prefix says "nothing to train".

One local Ray for the in-process commands (the session's ``ray_local``); each training run is a
CLI process of its own, as on a user's machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from omni_ray.config import DataConfig, ModelConfig
from omni_ray.launch.cli import main

pytestmark = pytest.mark.dist
N = 8  # samples per form (from the colour set: real PNGs, answers only the image gives)


def _samples(color_data) -> list[dict]:
    train_jsonl, _ = color_data
    records = [json.loads(line) for line in train_jsonl.read_text().splitlines()[:N]]
    for r in records:
        r["png"] = (train_jsonl.parent / r["image"]).read_bytes()
    return records


def _parquet(path: Path, samples: list[dict]) -> None:
    """LLaVA-OneVision-Data's layout: an `image` Image() column and from/value conversations."""
    import datasets

    ds = datasets.Dataset.from_dict({
        "id": [s["id"] for s in samples],
        "image": [{"bytes": s["png"], "path": None} for s in samples],
        "conversations": [[{"from": "human" if t["role"] == "user" else "gpt", "value": t["content"]}
                           for t in s["conversations"]] for s in samples],
    }).cast_column("image", datasets.Image())
    ds.to_parquet(str(path))


def _tar(path: Path, samples: list[dict], corrupt_image: bool = False) -> None:
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for i, s in enumerate(samples):
            image = b"not a png" if corrupt_image and i == 0 else s["png"]
            sink.write({"__key__": s["id"], "png": image, "json": {"id": s["id"], "conversations": s["conversations"]}})


@pytest.fixture(scope="module")
def forms(color_data, s3, tmp_path_factory):
    samples = _samples(color_data)
    root = tmp_path_factory.mktemp("forms")
    (root / "hub").mkdir()
    _parquet(root / "hub" / "train-00000.parquet", samples[:5])
    _parquet(root / "hub" / "train-00001.parquet", samples[5:])
    (root / "wds").mkdir()
    _tar(root / "wds" / "shard-0.tar", samples[:4], corrupt_image=True)
    _tar(root / "wds" / "shard-1.tar", samples[4:])
    full = (root / "wds" / "shard-1.tar").read_bytes()
    client = s3.client()
    for name in ("shard-0.tar", "shard-1.tar"):
        client.put_object(Bucket=s3.bucket, Key=f"wds/{name}", Body=(root / "wds" / name).read_bytes())
    # A third shard cut short mid-member (a partial upload): counted, never a crash or a hang.
    client.put_object(Bucket=s3.bucket, Key="wds/shard-2.tar", Body=full[: len(full) // 2 + 700])
    return {"parquet": str(root / "hub"), "tars": str(root / "wds"), "s3_tars": s3.uri("wds") + "/", "root": root}


def _config(path: Path, model, train, s3, **data) -> str:
    path.write_text(yaml.safe_dump({
        "model": {"path": str(model), "dtype": "float32"},
        "data": {"train": train, "model_max_length": 128, "max_bad_fraction": 0.5, **data},
        "train": {"max_steps": 2, "micro_batch_size": 2, "precision": "fp32"},
        "scaling": {"num_workers": 2, "max_failures": 0},
        "storage": {"endpoint_url": s3.endpoint_url},
        "run": {"name": path.stem, "storage_path": str(path.parent / "runs")},
    }))
    return str(path)


def test_validate_resolves_every_form(forms, tiny_minicpmv, s3, tmp_path, capsys):
    for name, want in (("parquet", "2 parquet unit(s)"), ("tars", "2 webdataset unit(s)"),
                       ("s3_tars", "3 webdataset unit(s)")):
        assert main(["validate", _config(tmp_path / f"{name}.yaml", tiny_minicpmv, forms[name], s3)]) == 0, name
        out = capsys.readouterr().out
        assert f"data: {forms[name]}: {want}" in out, out
    (tmp_path / "odd.bin").write_bytes(b"\0")
    assert main(["validate", _config(tmp_path / "odd.yaml", tiny_minicpmv, str(tmp_path / "odd.bin"), s3)]) == 2
    err = capsys.readouterr().err
    assert "odd.bin: not a data form omni_ray reads" in err and "WebDataset .tar" in err


def test_check_counts_each_form_and_damaged_shards_by_reason(ray_local, forms, tiny_minicpmv, s3):
    from omni_ray.data.check import check, format_report

    model = ModelConfig(path=str(tiny_minicpmv))
    report = check(forms["parquet"], DataConfig(train=forms["parquet"], model_max_length=128), model, None)
    assert (report["total"], report["ok"], report["rejected"]) == (N, N, 0)
    assert report["images_per_sample"] == {1: N}
    report = check(forms["s3_tars"], DataConfig(train=forms["s3_tars"], model_max_length=128), model, s3.storage)
    assert report["by_reason"] == {"corrupt_image": 1, "truncated_shard": 1}, report["examples"]
    # shard-2 holds the first samples of shard-1 up to the cut: read, then one row for what was lost
    assert report["ok"] == N - 1 + (report["total"] - N - 1) and report["total"] > N + 1
    assert report["sources"] == [{"name": forms["s3_tars"], "units": 3, "total": report["total"], "ok": report["ok"],
                                  "rejected": 2, "by_reason": report["by_reason"]}]
    assert f"source {forms['s3_tars']} (3 unit(s))" in format_report(report)


def test_prepare_turns_s3_tars_into_shards_with_the_images(ray_local, forms, s3, capsys):
    out = s3.uri("prepared-from-tars")
    assert main(["data", "prepare", forms["s3_tars"], "--out", out, "--endpoint-url", s3.endpoint_url,
                 "--rows-per-shard", "4"]) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert counts["by_reason"] == {"corrupt_image": 1, "truncated_shard": 1}
    assert counts["accepted"] == counts["total"] - 2
    from omni_ray.data.prepare import read_manifest

    manifest = read_manifest(out, s3.storage)
    assert manifest["image_count"] == counts["accepted"], "every accepted sample kept its embedded image"


def test_unusable_input_is_one_line_and_nothing_accepted_is_exit_2(ray_local, tiny_minicpmv, s3, tmp_path, capsys):
    broken = tmp_path / "list.json"
    broken.write_text('[\n {"conversations": []},\n]\n')  # a trailing comma
    config = _config(tmp_path / "c.yaml", tiny_minicpmv, str(broken), s3)
    assert main(["data", "check", str(broken), "--config", config]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "line 3 column 1" in err and "Traceback" not in err, err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("".join(json.dumps({"id": str(i), "conversations": []}) + "\n" for i in range(3)))
    prefix = tmp_path / "none"
    assert main(["data", "prepare", str(empty), "--out", str(prefix)]) == 2
    err = capsys.readouterr().err
    assert "nothing was accepted: all 3 samples were rejected" in err and "empty_conversation" in err, err
    assert main(["data", "check", str(prefix), "--config", config]) == 2
    assert "nothing to train" in capsys.readouterr().err


@pytest.mark.parametrize("form", ["parquet", "s3_tars"])
def test_train_reads_the_form(form, forms, tiny_minicpmv, s3, tmp_path):
    config = _config(tmp_path / f"train-{form}.yaml", tiny_minicpmv, forms[form], s3)
    proc = subprocess.run([sys.executable, "-m", "omni_ray.launch.cli", "train", config], capture_output=True,
                          text=True, timeout=480, env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(next(line for line in reversed(proc.stdout.splitlines()) if line.startswith('{"metrics"')))
    assert result["metrics"]["step"] == 2 and result["checkpoint"]
