"""Export where it cannot or must not go: one line, exit 2, and never a half-written export that
looks whole.

One real checkpoint (two steps in one plain process, LocalSession) is exported into a read-only
directory, onto a file, into a directory that already holds files, from a checkpoint still
being written (no manifest yet), and from one whose files change while the export runs. After
each, ``--out`` either does not exist or holds a whole export, and nothing partial is left
beside it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from omni_ray.config import load_config
from omni_ray.launch.cli import main
from trainkit import local_run, processed_rows


@pytest.fixture(scope="module")
def checkpoint(tiny_minicpmv, color_data) -> str:
    train_jsonl, _ = color_data
    cfg = load_config({
        "model": {"path": str(tiny_minicpmv), "dtype": "float32"},
        "data": {"train": str(train_jsonl), "model_max_length": 64},
        "freeze": {"vision": "frozen", "projector": "full", "llm": "lora"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 2, "micro_batch_size": 2, "lr": 1e-2, "precision": "fp32"},
        "run": {"name": "hostile-export"},
    })
    session = local_run(cfg, processed_rows(cfg, train_jsonl)[:8])
    return [r["checkpoint"] for r in session.reports if r["checkpoint"]][-1]


def one_line_exit_2(argv: list[str], capsys, *words: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
    return err


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name)


@contextlib.contextmanager
def read_only(path: Path):
    """A directory nobody can write into: mode 0555, and immutable when this runs as root."""
    path.mkdir()
    path.chmod(0o555)
    immutable = False
    try:
        if os.geteuid() == 0:  # root writes through 0555
            if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)]).returncode != 0:
                pytest.skip("running as root without chattr +i: no way to make a read-only directory")
            immutable = True
        yield path
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o755)


def test_export_into_a_read_only_directory(checkpoint, tmp_path, capsys):
    with read_only(tmp_path / "ro") as ro:
        one_line_exit_2(["export", checkpoint, "--out", str(ro / "merged")], capsys, str(ro))
        assert list(ro.iterdir()) == []


def test_export_onto_a_file_or_a_full_directory(checkpoint, tmp_path, capsys):
    (tmp_path / "taken").write_text("someone's file")
    one_line_exit_2(["export", checkpoint, "--out", str(tmp_path / "taken")], capsys, "taken", "a file is already")
    assert (tmp_path / "taken").read_text() == "someone's file"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep me")
    one_line_exit_2(["export", checkpoint, "--out", str(tmp_path / "full")], capsys, "full", "already holds files")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["notes.txt"]


def test_export_of_a_checkpoint_still_being_written(checkpoint, tmp_path, capsys):
    writing = tmp_path / "checkpoint_000002"
    shutil.copytree(checkpoint, writing)
    (writing / "manifest.json").unlink()  # written last: not there yet
    one_line_exit_2(["export", str(writing), "--out", str(tmp_path / "out")], capsys, "no manifest.json")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_checkpoint_changed_during_export_leaves_no_export(checkpoint, tmp_path, capsys, monkeypatch):
    import omni_ray.export as export_module

    changing = tmp_path / "checkpoint_000003"
    shutil.copytree(checkpoint, changing)
    write_export = export_module._write_export

    def written_while_exporting(*args, **kwargs):
        write_export(*args, **kwargs)  # the export is complete in its staging directory, then a writer strikes
        with open(changing / "weights.safetensors", "ab") as f:
            f.write(b"\0")

    monkeypatch.setattr(export_module, "_write_export", written_while_exporting)
    one_line_exit_2(["export", str(changing), "--out", str(tmp_path / "out")], capsys, "weights.safetensors",
                    "checksum")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_whole_export_appears_at_once(checkpoint, tmp_path, capsys):
    (tmp_path / "empty").mkdir()  # an empty directory is taken as the place to write
    assert main(["export", checkpoint, "--out", str(tmp_path / "empty")]) == 0
    names = {p.name for p in (tmp_path / "empty").iterdir()}
    assert {"config.json", "model.safetensors"} <= names or {"config.json", "model.safetensors.index.json"} <= names
    assert leftovers(tmp_path) == []
    assert oct((tmp_path / "empty").stat().st_mode & 0o777) != oct(0o700)  # readable like any new directory
