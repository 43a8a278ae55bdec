"""Export round trip: the merged model and the PEFT adapter reproduce the trained model's logits.

Trains a few steps in one plain process (LocalSession: the same loop, no Ray), so the LoRA
adapters and the fully trained projector hold non-initial values.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.dist
import torch

from omni_ray.config import load_config
from omni_ray.data.collate import collate
from omni_ray.data.conversation import decode
from omni_ray.launch.cli import main
from omni_ray.train.checkpoint import restore_model
from trainkit import local_run, processed_rows


@pytest.fixture(scope="module")
def trained(tiny_minicpmv, color_data, tmp_path_factory):
    train_jsonl, _ = color_data
    cfg = load_config({
        "model": {"path": str(tiny_minicpmv), "dtype": "float32"},
        "data": {"train": str(train_jsonl), "model_max_length": 64},
        "freeze": {"vision": "frozen", "projector": "full", "llm": "lora",
                   "overrides": [{"pattern": r"language_model\.norm\.", "mode": "full"}]},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 4, "micro_batch_size": 4, "lr": 1e-2, "precision": "fp32"},
        "run": {"name": "export"},
    })
    rows = processed_rows(cfg, train_jsonl)
    session = local_run(cfg, rows)
    checkpoint = [r["checkpoint"] for r in session.reports if r["checkpoint"]][-1]
    batch = collate([decode(r["sample"]) for r in rows[:4]], {"pixel_values": -1, "target_sizes": 0})
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_label_tokens", "keep_alive")}
    model, _, _ = restore_model(cfg.model, cfg.freeze, cfg.lora, cfg.train, cfg.storage, checkpoint)
    with torch.no_grad():
        logits = model.eval()(**inputs).logits
    return cfg, checkpoint, inputs, logits


def test_merged_export_reproduces_logits(trained, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cfg, checkpoint, inputs, expected = trained
    assert main(["export", checkpoint, "--out", str(tmp_path / "merged")]) == 0
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in n for n, _ in model.named_parameters())
    AutoProcessor.from_pretrained(tmp_path / "merged")  # a serving tool finds the processor too
    with torch.no_grad():
        got = model(**inputs).logits
    assert torch.allclose(got, expected, atol=1e-4), float((got - expected).abs().max())
    base = AutoModelForImageTextToText.from_pretrained(cfg.model.path).eval()
    with torch.no_grad():
        assert not torch.allclose(base(**inputs).logits, expected, atol=1e-3)  # training changed it


def test_adapter_export_reproduces_logits(trained, tmp_path):
    import json

    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    cfg, checkpoint, inputs, expected = trained
    assert main(["export", checkpoint, "--out", str(tmp_path / "adapter"), "--adapter"]) == 0
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert any("merger" in m for m in adapter_config["modules_to_save"])  # the trained projector goes along
    base = AutoModelForImageTextToText.from_pretrained(cfg.model.path)
    model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        got = model(**inputs).logits
    assert torch.allclose(got, expected, atol=1e-4), float((got - expected).abs().max())


def test_export_of_an_unfinished_checkpoint_is_a_clear_error(trained, tmp_path, capsys):
    # A checkpoint directory that is not one: the error names what is missing.
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.yaml").write_text(open(trained[1] + "/config.yaml").read())
    assert main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "o")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
