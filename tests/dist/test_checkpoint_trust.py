"""Checkpoints are data: nothing in one runs code, nothing unchecked is read, resume is explicit.

One module fixture trains a tiny MiniCPM-V for 2 steps in one plain process (LocalSession: the
real loop and checkpoint writer, no Ray), then each test tampers with a copy the way an
attacker with write access to the bucket would (rewriting the manifest's checksums too, where
that is the stronger attack) or changes the config under a resume.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist
import torch

from omni_ray import storage as st
from omni_ray.config import GroupFreeze, load_config
from omni_ray.data.pipeline import Preprocess, json_rows
from omni_ray.export import ExportError, export
from omni_ray.train import checkpoint as ckpt
from omni_ray.train.loop import run
from omni_ray.train.session import ListIterator, LocalSession

PAYLOAD_MARKER = "omni_ray_payload_ran"


class _Payload:
    """Unpickling this creates a marker file: proof that a load path ran the checkpoint's code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _config(model_dir, train_jsonl, run_dir, **changes):
    raw = {
        "model": {"path": str(model_dir), "dtype": "float32"},
        "data": {"train": str(train_jsonl), "model_max_length": 64},
        "freeze": {"vision": "frozen", "projector": "full", "llm": "lora"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 2, "micro_batch_size": 4, "lr": 1e-2, "precision": "fp32"},
        "run": {"name": "trust", "storage_path": str(run_dir)},
    }
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        raw[section][key] = value
    return load_config(raw)


def _train(cfg, rows, resume_from=None):
    session = LocalSession(datasets={"train": ListIterator(rows)}, checkpoint_dir=resume_from)
    run(cfg, session, num_rows=len(rows))
    return session


@pytest.fixture(scope="module")
def trained(tiny_minicpmv, color_data, tmp_path_factory):
    train_jsonl, _ = color_data
    cfg = _config(tiny_minicpmv, train_jsonl, tmp_path_factory.mktemp("runs"))
    pre = Preprocess(cfg.model, None, cfg.data.model_max_length)
    rows = [pre.process_row(r) for r in itertools.islice(json_rows(str(train_jsonl), None), 16)]  # not all 64
    session = _train(cfg, rows)
    checkpoint = [r["checkpoint"] for r in session.reports if r["checkpoint"]][-1]
    return cfg, rows, Path(checkpoint)


@pytest.fixture
def copy(trained, tmp_path):
    _, _, checkpoint = trained
    return Path(shutil.copytree(checkpoint, tmp_path / "checkpoint"))


def _reseal(path: Path, name: str) -> None:
    """Rewrite the manifest's checksum for ``name``: the attacker controls the whole directory."""
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    manifest["files"][name] = hashlib.sha256((path / name).read_bytes()).hexdigest()
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest))


def _identity(cfg, plan_cfg=None):
    from omni_ray.train.checkpoint import restore_model, run_identity

    cfg = plan_cfg or cfg
    _, spec, plan = restore_model(cfg.model, cfg.freeze, cfg.lora, cfg.train, cfg.storage)
    return run_identity(cfg.model.path, spec.name, plan, cfg.lora)


# ----------------------------------------------------------------------------- no pickle


def test_pickle_payload_in_train_state_is_refused_and_does_not_run(trained, copy, tmp_path):
    cfg, _, _ = trained
    marker = tmp_path / PAYLOAD_MARKER
    state = torch.load(copy / ckpt.STATE, weights_only=True)
    state["engine"] = _Payload(str(marker))
    torch.save(state, copy / ckpt.STATE)
    _reseal(copy, ckpt.STATE)
    with pytest.raises(pickle.UnpicklingError):
        ckpt.load(copy, _identity(cfg))
    assert not marker.exists(), "the checkpoint's pickle payload ran"


def test_train_state_changed_without_the_manifest_fails_the_checksum(trained, copy):
    cfg, _, _ = trained
    with open(copy / ckpt.STATE, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ckpt.CheckpointError, match=r"train_state.pt: missing or its checksum"):
        ckpt.load(copy, _identity(cfg))


def test_dcp_metadata_with_foreign_classes_is_refused_unread(tmp_path):
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": {"w": torch.ones(2, 3)}}, checkpoint_id=str(tmp_path / "good"))
    ckpt.screen_dcp_metadata(tmp_path / "good")  # real DCP metadata passes
    marker = tmp_path / PAYLOAD_MARKER
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / ".metadata").write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(ckpt.CheckpointError, match="not checkpoint metadata"):
        ckpt.screen_dcp_metadata(tmp_path / "bad")
    assert not marker.exists()


# -------------------------------------------------------------------- config and export


def test_config_yaml_is_covered_by_the_manifest(trained, copy, tmp_path):
    manifest = ckpt.read_manifest(copy)
    assert ckpt.CONFIG in manifest["files"]
    text = (copy / ckpt.CONFIG).read_text()
    (copy / ckpt.CONFIG).write_text(text.replace("trust_remote_code: false", "trust_remote_code: true"))
    with pytest.raises(ckpt.CheckpointError, match=r"config.yaml: missing or its checksum"):
        ckpt.checkpoint_config_text(copy)
    with pytest.raises(ExportError, match="checksum"):
        export(str(copy), str(tmp_path / "out"))


def test_export_never_enables_remote_code_on_the_checkpoints_word(trained, copy, tmp_path):
    text = (copy / ckpt.CONFIG).read_text()
    assert "trust_remote_code: false" in text
    (copy / ckpt.CONFIG).write_text(text.replace("trust_remote_code: false", "trust_remote_code: true"))
    _reseal(copy, ckpt.CONFIG)  # a consistent, but hostile, checkpoint
    with pytest.raises(ExportError, match="--trust-remote-code"):
        export(str(copy), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    from omni_ray.launch.cli import main

    assert main(["export", str(copy), "--out", str(tmp_path / "out")]) == 2  # one line, no traceback
    # The user's own flag is what enables it (the tiny model is native, so the export then works).
    assert main(["export", str(copy), "--out", str(tmp_path / "out"), "--trust-remote-code"]) == 0


def test_export_out_onto_a_file_is_an_error(trained, copy, tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(ExportError, match="a file is already there"):
        export(str(copy), str(tmp_path / "taken"))


# ------------------------------------------------------------------------- resume identity


def test_resume_after_a_config_change_names_the_keys_and_the_options(trained):
    cfg, rows, checkpoint = trained
    changed = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"alpha": 16})})
    with pytest.raises(ckpt.ResumeMismatch) as info:
        _train(changed, rows, resume_from=str(checkpoint))
    message = str(info.value)
    for words in ("lora.alpha: 8 -> 16", "new run.name", "checkpoint.resume: weights_only"):
        assert words in message, message

    refrozen = cfg.model_copy(update={"freeze": cfg.freeze.model_copy(update={"projector": GroupFreeze(mode="frozen")})})
    with pytest.raises(ckpt.ResumeMismatch, match=r"freeze_plan: 0 parameters newly trained \[\], \d+ no longer"):
        ckpt.load(checkpoint, _identity(refrozen))


def test_weights_only_loads_the_tensors_into_a_changed_setup(trained):
    cfg, rows, checkpoint = trained
    changed = cfg.model_copy(update={
        "lora": cfg.lora.model_copy(update={"alpha": 16}),
        "checkpoint": cfg.checkpoint.model_copy(update={"resume": "weights_only"}),
        "train": cfg.train.model_copy(update={"max_steps": 1}),
    })
    state = ckpt.load(checkpoint, _identity(changed), "weights_only")
    assert state["weights_only"] and state["step"] == 0 and state["train_state"] is None
    assert set(state["tensors"]) == set(ckpt.load_trainable(checkpoint))
    session = _train(changed, rows, resume_from=str(checkpoint))
    assert [r["step"] for r in session.reports] == [1], "weights_only starts a fresh schedule at step 0"
    # The same identity resumes whole even under weights_only (a restart within the new run).
    again = ckpt.load(checkpoint, _identity(cfg), "weights_only")
    assert not again["weights_only"] and again["step"] == 2


def test_same_shape_different_base_model_is_caught(trained, tmp_path):
    cfg, _, checkpoint = trained
    other = Path(shutil.copytree(cfg.model.path, tmp_path / "other-model"))
    weights = next(other.glob("*.safetensors"))
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1.0  # same names, shapes and dtypes: only the content differs
    save_file(tensors, str(weights), metadata={"format": "pt"})
    moved = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": str(other)})})
    with pytest.raises(ckpt.ResumeMismatch, match="base_weights"):
        ckpt.load(checkpoint, _identity(moved))


def test_weight_hashes_are_cached_per_file_and_redone_when_a_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("OMNI_RAY_CACHE", str(tmp_path / "cache"))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.safetensors").write_bytes(b"a" * 100)
    (tmp_path / "m" / "b.safetensors").write_bytes(b"b" * 100)
    calls = []
    real = ckpt._sha256
    monkeypatch.setattr(ckpt, "_sha256", lambda p: calls.append(Path(p).name) or real(p))
    names = ["a.safetensors", "b.safetensors"]
    first = ckpt.content_digest(tmp_path / "m", names)
    assert sorted(calls) == names
    calls.clear()
    assert ckpt.content_digest(tmp_path / "m", names) == first and calls == []  # no re-read
    (tmp_path / "m" / "b.safetensors").write_bytes(b"c" * 100)  # same size, new content and mtime
    os.utime(tmp_path / "m" / "b.safetensors", ns=(1, 1))
    assert ckpt.content_digest(tmp_path / "m", names) != first and calls == ["b.safetensors"]


# ----------------------------------------------------------------------- which checkpoint


def test_newest_checkpoint_without_manifest_is_skipped_with_a_warning(trained, tmp_path, caplog):
    _, _, checkpoint = trained
    run_dir = tmp_path / "run"
    shutil.copytree(checkpoint, run_dir / "checkpoint_000001")
    broken = Path(shutil.copytree(checkpoint, run_dir / "checkpoint_000002"))
    (broken / ckpt.MANIFEST).unlink()
    with caplog.at_level(logging.WARNING, logger="omni_ray.train.checkpoint"):
        found = ckpt.find_latest(str(run_dir))
        assert found == (2, str(run_dir / "checkpoint_000001"))
        # Ray registered the broken one as its latest: the whole one is used, not a FileNotFoundError.
        assert ckpt.choose_resume(str(broken), found) == found[1]
        assert ckpt.choose_resume(str(broken), None) is None
    assert "checkpoint_000002" in caplog.text and "no manifest" in caplog.text
    assert ckpt.find_latest(str(tmp_path / "no-such-run")) is None


def test_newest_checkpoint_cut_short_mid_copy_is_skipped(trained, tmp_path, caplog):
    """A node lost while Ray Train copied a checkpoint onto a shared filesystem leaves every file
    under its name, one of them short: that is no checkpoint to resume from (spot test found it)."""
    _, _, checkpoint = trained
    run_dir = tmp_path / "run"
    shutil.copytree(checkpoint, run_dir / "checkpoint_000001")
    cut = Path(shutil.copytree(checkpoint, run_dir / "checkpoint_000002"))
    manifest = json.loads((cut / ckpt.MANIFEST).read_text())
    (cut / ckpt.MANIFEST).write_text(json.dumps({**manifest, "step": manifest["step"] + 1}))
    weights = (cut / ckpt.WEIGHTS).read_bytes()
    (cut / ckpt.WEIGHTS).write_bytes(weights[: len(weights) // 2])
    with caplog.at_level(logging.WARNING, logger="omni_ray.train.checkpoint"):
        assert ckpt.find_latest(str(run_dir)) == (manifest["step"], str(run_dir / "checkpoint_000001"))
    assert "checkpoint_000002" in caplog.text and "cut short" in caplog.text


def test_storage_errors_are_not_read_as_no_checkpoint():
    # Nothing listens on port 1: a network error, which must not become "start from step 0".
    dead = st.StorageConfig(endpoint_url="http://127.0.0.1:1", max_attempts=1)
    with pytest.raises(st.StorageError, match=r"s3://bucket/runs/x: cannot list .*credentials") as info:
        ckpt.find_latest("s3://bucket/runs/x", dead)
    from omni_ray.errors import UserError

    assert isinstance(info.value, UserError)  # the CLI prints it on one line and exits 2
