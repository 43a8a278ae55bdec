"""Packed rows on real tiny models: the loss equals the unpacked loss, and nothing crosses samples.

One process, fp32, the tiny checkpoints of ``omni_ray.models.tiny`` (real transformers classes).
For each architecture that packs (``PACKING_RULES``):

- the token-sum loss of one packed row of three samples (two with images of different sizes, one
  text only) equals the sum of each sample's loss alone and the loss of the padded batch;
- leakage: in packed rows [A, B] and [A', B] (A' another sample, of another length), B's per-token
  logits are the same, and equal to B's logits alone. MiniCPM-V 4.6 has Gated DeltaNet
  (linear-attention) layers 0-2 and full attention in layer 3, so the state and conv window of
  those layers are covered as well as the attention mask;
- controls that show the leakage check can fail: with the per-sample linear-attention layers
  disabled (MiniCPM-V 4.6) or with a full attention mask instead of the packed one (LLaVA), B's
  logits do change with A.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from omni_ray.data.batch import Batch
from omni_ray.data.collate import collate
from omni_ray.data.conversation import SampleProcessor
from omni_ray.data.packing import PACKING_RULES, pack_samples
from omni_ray.models.spec import get_spec
from omni_ray.models.tiny import build_tiny
from omni_ray.train import packing as model_packing
from omni_ray.train.loss import token_loss_sum
from omni_ray.train.packing import packed_model_inputs

ARCHS = ["minicpmv4_6", "qwen2_vl", "qwen2_5_vl", "llava", "qwen3_vl", "internvl", "idefics3", "smolvlm", "llava_onevision"]
RTOL = 1e-4
@pytest.fixture(scope="module", params=ARCHS)
def arch(request, tmp_path_factory):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    name = request.param
    path = build_tiny(name, tmp_path_factory.mktemp("packing") / name)
    spec = get_spec(name)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    processor = SampleProcessor(AutoProcessor.from_pretrained(path), 512, spec.image_inputs)
    return name, model, processor, spec.image_inputs, _samples(processor)


def _samples(processor) -> dict:
    def conv(question, answer):
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]

    return {
        "a": processor(conv("<image>\nwhat is the color of the shape?", "it is red"), [Image.new("RGB", (56, 56), "red")]),
        "a2": processor(conv("<image>\nhow many objects are there in the picture? describe the image.",
                             "there are 3 objects: a cat a dog and a horse"),
                        [Image.new("RGB", (84, 56), (0, 90, 200))]),
        "b": processor(conv("<image>\nwhat is the color?", "blue"), [Image.new("RGB", (56, 84), "blue")]),
        "text": processor(conv("yes or no? left or right?", "left"), []),
    }


def _run(model, batch: dict) -> torch.Tensor:
    batch = Batch(batch)
    inputs = packed_model_inputs(model, batch) if batch.packed else batch.model_inputs()
    with torch.no_grad():
        return model(**inputs).logits


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float = RTOL) -> bool:
    return float((got - want).abs().max()) <= rtol * float(want.abs().max())


def test_packed_loss_equals_unpacked(arch):
    name, model, processor, image_inputs, s = arch
    samples = [s["a"], s["text"], s["b"]]
    pad = processor.tokenizer.pad_token_id or 0
    alone = sum(token_loss_sum(_run(model, collate([x], image_inputs, pad)), collate([x], image_inputs)["labels"])
                for x in samples)
    padded_batch = collate(samples, image_inputs, pad)
    padded = token_loss_sum(_run(model, padded_batch), padded_batch["labels"])
    rows = pack_samples(samples, 512, image_inputs)
    assert len(rows) == 1 and rows[0]["input_ids"].shape[1] == sum(len(x["input_ids"]) for x in samples)
    packed = token_loss_sum(_run(model, rows[0]), rows[0]["labels"])
    assert int(rows[0]["num_label_tokens"]) == int(padded_batch["num_label_tokens"])
    assert _close(packed, alone), (name, float(packed), float(alone))
    assert _close(packed, padded), (name, float(packed), float(padded))


def _b_logits(model, s: dict, image_inputs, first: str) -> torch.Tensor:
    row = pack_samples([s[first], s["b"]], 512, image_inputs)[0]
    return _run(model, row)[0, len(s[first]["input_ids"]):]


def test_no_leakage_between_samples(arch):
    name, model, processor, image_inputs, s = arch
    after_a = _b_logits(model, s, image_inputs, "a")
    after_a2 = _b_logits(model, s, image_inputs, "a2")
    alone = _run(model, collate([s["b"]], image_inputs))[0]
    assert _close(after_a, after_a2, 1e-5), name
    assert _close(after_a, alone, 1e-5), name


@pytest.mark.parametrize("arch", ["minicpmv4_6"], indirect=True)
def test_leakage_check_catches_linear_attention_state(arch, monkeypatch):
    """Control: without the per-sample Gated DeltaNet layers, A's state reaches B (and the check sees it).

    transformers refuses ``cu_seq_lens_q`` on the PyTorch fallback (it needs flash-linear-attention),
    so the control also drops the varlen kwargs: the row is then "packed" for the attention mask
    (restarting position ids) but not for the linear-attention layers.
    """
    name, model, processor, image_inputs, s = arch
    monkeypatch.setattr(model_packing, "segment_recurrent_layers", lambda m: 0)
    real = packed_model_inputs
    monkeypatch.setattr(f"{__name__}.packed_model_inputs",
                        lambda m, inputs: {k: v for k, v in real(m, inputs).items() if not k.startswith(("cu_", "max_"))})
    restore = {}
    for module in model.modules():
        if "forward" in vars(module) and getattr(module.forward, "omni_ray_per_sequence", False):
            restore[module] = vars(module).pop("forward")
    try:
        assert not _close(_b_logits(model, s, image_inputs, "a"),
                          _b_logits(model, s, image_inputs, "a2"), 1e-5)
    finally:
        for module, forward in restore.items():
            module.forward = forward


@pytest.mark.parametrize("arch", ["llava"], indirect=True)
def test_leakage_check_catches_attention(arch, monkeypatch):
    """Control: with a full attention mask instead of the packed one, A reaches B through attention."""
    name, model, processor, image_inputs, s = arch
    real = packed_model_inputs
    monkeypatch.setattr(f"{__name__}.packed_model_inputs",
                        lambda m, inputs: {**real(m, inputs), "attention_mask": torch.ones_like(inputs["input_ids"])})
    assert not _close(_b_logits(model, s, image_inputs, "a"),
                      _b_logits(model, s, image_inputs, "a2"), 1e-5)


def test_every_tested_architecture_has_a_rule():
    assert set(ARCHS) == set(PACKING_RULES)
