"""Evaluation's generation and loss at the cost of a real model, with the answers of the slow way.

* ``generate_tokens`` (KV cache, prompts batched and left-padded) gives, prompt for prompt, the
  answer of ``generate_recompute`` (a full forward, images included, per new token), for families
  whose caches differ: MiniCPM-V 4.6 (linear-attention layers), Qwen2.5-VL (3-D rope positions
  that left padding shifts), Gemma 3 (per-token ``token_type_ids``), LLaVA.
* The vision encoder runs once per ``generate`` call, not once per new token.
* ``eval_loss`` is training's chunked loss: the same number as the full-logits reference, with
  the output projection never asked for the [tokens, vocab] logits.
"""

from __future__ import annotations

import json

import pytest
import torch

from omni_ray.config import load_config
from omni_ray.data.synthetic import make_color_dataset
from omni_ray.models.tiny import build_tiny
from omni_ray.train.evaluation import EvalSet, SingleProcess, eval_loss, generate_recompute, generate_tokens
from omni_ray.train.checkpoint import restore_model
from omni_ray.train.loss import token_loss_sum

FAMILIES = ["minicpmv4_6", "qwen2_5_vl", "gemma3", "llava"]
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def uneven_eval(tmp_path_factory):
    """Eval prompts of four different lengths (so a batch of them is padded), with their train file."""
    train, eval_file = make_color_dataset(tmp_path_factory.mktemp("gen-colors"), n_train=4, n_eval=4)
    rows = [json.loads(line) for line in eval_file.read_text().splitlines()]
    for i, row in enumerate(rows):
        row["conversations"][0]["content"] += " Please answer briefly." * (3 * i)
    uneven = eval_file.with_name("uneven.jsonl")
    uneven.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return train, uneven


def loaded(arch, tmp_path_factory, data):
    model_dir = build_tiny(arch, tmp_path_factory.mktemp(arch) / arch)
    cfg = load_config({"model": {"path": str(model_dir)},
                       "data": {"train": str(data[0]), "eval": str(data[1]), "model_max_length": 256}})
    model, spec, _ = restore_model(cfg.model, cfg.freeze, cfg.lora, cfg.train, cfg.storage)
    model.eval()
    return model, spec, EvalSet.load(cfg.data, cfg.model, cfg.storage, num_samples=4)


def vision_root(model, spec):
    """The vision tower's outermost module (names carry peft's prefix)."""
    names = [name for name, _ in model.named_modules()
             if any(name == p or name.endswith("." + p) for p in spec.groups["vision"])]
    return model.get_submodule(min(names, key=len))


@pytest.mark.parametrize("arch", FAMILIES)
def test_cached_batched_answers_equal_full_recompute_and_see_each_image_once(arch, tmp_path_factory, uneven_eval):
    model, spec, evalset = loaded(arch, tmp_path_factory, uneven_eval)
    engine = SingleProcess(model)
    lengths = {len(p.arrays["input_ids"]) for p in evalset.prompts}
    assert len(lengths) == 4, "the prompts must differ in length, or left padding goes untested"

    reference = [generate_recompute(engine, p, evalset, "cpu", NEW_TOKENS) for p in evalset.prompts]
    calls = []
    hook = vision_root(model, spec).register_forward_hook(lambda *_: calls.append(1))
    try:
        one_by_one = generate_tokens(engine, evalset.prompts, evalset, "cpu", NEW_TOKENS, batch_size=1)
        assert len(calls) == 4, f"vision ran {len(calls)} times for 4 prompts one by one"
        calls.clear()
        batched = generate_tokens(engine, evalset.prompts, evalset, "cpu", NEW_TOKENS, batch_size=4)
        assert len(calls) == 1, f"vision ran {len(calls)} times for one batch of 4 prompts"
    finally:
        hook.remove()
    assert one_by_one == reference
    assert batched == reference
    assert sum(map(len, reference)) >= 8, f"answers too short to show anything: {reference}"


def test_eval_loss_is_trainings_chunked_loss(tmp_path_factory, uneven_eval, monkeypatch):
    model, _, evalset = loaded("minicpmv4_6", tmp_path_factory, uneven_eval)
    engine = SingleProcess(model)
    # The reference: full logits, the mean token loss over the set.
    from omni_ray.data.collate import collate

    total, tokens = 0.0, 0
    with torch.no_grad():
        for sample in evalset.samples():
            batch = collate([sample], evalset.image_inputs, evalset.pad_id)
            total += float(token_loss_sum(model(**batch.model_inputs("cpu")).logits, batch["labels"]))
            tokens += int(batch["num_label_tokens"])

    head = model.get_output_embeddings()
    full_logits = []
    plain = type(head).forward
    monkeypatch.setattr(type(head), "forward",
                        lambda self, x: (full_logits.append(x.shape) if self is head else None) or plain(self, x))
    got = eval_loss(engine, evalset, 0, 1, "cpu", batch_size=2)
    assert got["eval_tokens"] == tokens
    assert got["eval_loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert full_logits == [], "eval asked the output projection for full logits"


def test_the_eval_set_holds_rows_not_pixels_and_a_vanished_image_is_named(tmp_path, tiny_minicpmv):
    import numpy as np

    from omni_ray.data.errors import DataError

    train, eval_file = make_color_dataset(tmp_path, n_train=2, n_eval=3)
    cfg = load_config({"model": {"path": str(tiny_minicpmv)},
                       "data": {"train": str(train), "eval": str(eval_file), "model_max_length": 128}})
    evalset = EvalSet.load(cfg.data, cfg.model, cfg.storage, num_samples=1)
    assert len(evalset.rows) == 3 and len(evalset.prompts) == 1
    assert not any(isinstance(v, np.ndarray) for row in evalset.rows for v in row.values())
    model, _, _ = restore_model(cfg.model, cfg.freeze, cfg.lora, cfg.train, cfg.storage)
    first = eval_loss(SingleProcess(model), evalset, 0, 1, "cpu", batch_size=2)
    assert first == eval_loss(SingleProcess(model), evalset, 0, 1, "cpu", batch_size=2)  # processed again, same
    image = json.loads(eval_file.read_text().splitlines()[2])["image"]
    (eval_file.parent / image).unlink()
    with pytest.raises(DataError, match=r"data.eval: sample 'eval-2' processed when the run started and does not now"):
        eval_loss(SingleProcess(model), evalset, 0, 1, "cpu", batch_size=2)


def test_eval_settings_beyond_the_model_are_refused_before_the_run(tiny_minicpmv, color_data, caplog):
    from omni_ray.config import ConfigError
    from omni_ray.launch.driver import validate

    limit = json.loads((tiny_minicpmv / "config.json").read_text())["text_config"]["max_position_embeddings"]

    def config(**eval_cfg):
        return load_config({"model": {"path": str(tiny_minicpmv)}, "eval": eval_cfg,
                            "data": {"train": str(color_data[0]), "eval": str(color_data[1]), "model_max_length": 64},
                            "train": {"micro_batch_size": 2}})

    with pytest.raises(ConfigError, match=rf"eval.max_new_tokens: {limit} new tokens .* lower eval.max_new_tokens "
                                          rf"to {limit - 64} or less"):
        validate(config(max_new_tokens=limit))
    validate(config(max_new_tokens=limit - 64))
    with caplog.at_level("WARNING"):
        validate(config(batch_size=8))
    assert "eval.batch_size: 8 samples per eval forward is more than a training micro-batch" in caplog.text
