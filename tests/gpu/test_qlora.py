"""QLoRA: a 4-bit base under LoRA trains on a CUDA GPU; on CPU the config is refused by name."""

from __future__ import annotations

import pytest
import torch

from omni_ray.config import ConfigError, load_config
from omni_ray.launch.driver import validate

BASE = {"data": {"train": "unused.jsonl"}, "lora": {"qlora": True}, "freeze": {"llm": "lora"}}


def test_qlora_without_gpus_is_refused_by_name(tiny_minicpmv):
    cfg = load_config({**BASE, "model": {"path": str(tiny_minicpmv)}})
    with pytest.raises(ConfigError, match=r"lora.qlora: 4-bit QLoRA needs CUDA GPUs"):
        validate(cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs a CUDA GPU")
def test_qlora_trains_on_gpu(tiny_minicpmv, color_data):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes")
    from omni_ray.data.pipeline import Preprocess, json_rows
    from omni_ray.train.loop import run
    from omni_ray.train.session import ListIterator, LocalSession

    train_jsonl, _ = color_data
    cfg = load_config({**BASE, "model": {"path": str(tiny_minicpmv), "dtype": "bfloat16"},
                       "data": {"train": str(train_jsonl), "model_max_length": 64},
                       "train": {"max_steps": 3, "micro_batch_size": 4, "precision": "bf16"},
                       "scaling": {"use_gpu": True}})
    pre = Preprocess(cfg.model, None, cfg.data.model_max_length)
    rows = [pre.process_row(r) for r in json_rows(str(train_jsonl), None)]
    session = LocalSession(datasets={"train": ListIterator(rows)})
    last = run(cfg, session, num_rows=len(rows))
    assert last["step"] == 3 and last["frozen_unchanged"] is True
