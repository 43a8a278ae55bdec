"""The reference policy is the initial model after the policy trained, without a second model.

A tiny MiniCPM-V 4.6 (saved and loaded through build_trainable_model, as a run does) trains a few
steps; then the reference's per-sequence log-probs (through ``head_logps``, the chunked path DPO
uses) equal the initial model's, the policy's own values are back after the reference forward, and
the snapshot holds exactly the bytes of the fully trained parameters (none for LoRA alone).
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from omni_ray.config import FreezeConfig, LoraConfig, ModelConfig, TrainConfig
from omni_ray.data.collate import collate
from omni_ray.data.conversation import SampleProcessor
from omni_ray.models.spec import get_spec
from omni_ray.train.build import build_trainable_model
from omni_ray.train.loss import token_loss_sum
from omni_ray.train.preference import head_logps, logits_sequence_logps
from omni_ray.train.reference import ReferencePolicy

LORA = LoraConfig(r=4, alpha=8, dropout=0.0)
FREEZE = {
    "lora llm": {"vision": "frozen", "projector": "frozen", "llm": "lora"},
    "projector full + lora llm": {"vision": "frozen", "projector": "full", "llm": "lora"},
    "full llm": {"vision": "frozen", "projector": "frozen", "llm": "full", "embeddings": "full", "lm_head": "full"},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from omni_ray.models.tiny import build_tiny_minicpmv

    path = build_tiny_minicpmv(tmp_path_factory.mktemp("dpo-ref") / "m", vision_layers=1)  # 4 text layers: one full attention, so answers see the image
    spec = get_spec("minicpmv4_6")
    from omni_ray.models.tiny import tiny_minicpmv_processor

    processor = SampleProcessor(tiny_minicpmv_processor("4_6"), 256, spec.image_inputs)
    samples = [processor([{"role": "user", "content": "<image>\nwhat is the color of the shape?"},
                          {"role": "assistant", "content": answer}], [Image.new("RGB", (112, 112), colour)])
               for answer, colour in (("it is red", (200, 30, 30)), ("it is blue", (30, 30, 200)))]
    return str(path), collate(samples, spec.image_inputs)


def _inputs(batch):
    return {"use_cache": False, **{k: v for k, v in batch.items() if k not in ("labels", "num_label_tokens", "keep_alive")}}


def _logps(model, batch):
    with head_logps(model.get_output_embeddings(), batch["labels"]):
        return model(**_inputs(batch)).logits


@pytest.mark.parametrize("case", sorted(FREEZE))
def test_reference_equals_the_initial_model_after_training(tiny, case):
    path, batch = tiny
    built = build_trainable_model(ModelConfig(path=path), FreezeConfig(**FREEZE[case]), LORA, TrainConfig(seed=0))
    model = built.model
    model.eval()
    with torch.no_grad():
        initial = _logps(model, batch)
        full = logits_sequence_logps(model(**_inputs(batch)).logits, batch["labels"])
    torch.testing.assert_close(initial, full, atol=1e-5, rtol=1e-5)  # the chunked path is the direct one
    model.train()

    reference = ReferencePolicy(model)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    full_trained = [p for n, p in trained.items() if "lora_" not in n]
    assert reference.nbytes == sum(p.numel() * p.element_size() for p in full_trained)
    assert (reference.nbytes == 0) == (case == "lora llm")
    assert reference.nbytes < sum(p.numel() * p.element_size() for p in model.parameters()) / 2 or case == "full llm"

    optimizer = torch.optim.AdamW(list(trained.values()), lr=3e-2)
    for _ in range(2):
        token_loss_sum(model(**_inputs(batch)).logits, batch["labels"]).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    before = {n: p.detach().clone() for n, p in trained.items()}
    with torch.no_grad():
        policy = _logps(model, batch)
    with reference.active():
        ref = _logps(model, batch)
        assert not torch.is_grad_enabled() and not model.training
    model.train()
    assert float((policy - initial).abs().max()) > 1e-2, "training moved the policy"
    torch.testing.assert_close(ref, initial, atol=1e-5, rtol=1e-5)
    for name, param in trained.items():  # the policy's values are back exactly
        assert torch.equal(param, before[name]), name
    with torch.no_grad():
        torch.testing.assert_close(_logps(model.eval(), batch), policy, atol=0, rtol=0)


def test_reference_free_keeps_nothing(tiny):
    path, _ = tiny
    built = build_trainable_model(ModelConfig(path=path), FreezeConfig(**FREEZE["full llm"]), LORA, TrainConfig())
    reference = ReferencePolicy(built.model, reference_free=True)
    assert reference.nbytes == 0
    with pytest.raises(RuntimeError, match="reference-free"):
        with reference.active():
            pass


def test_reference_under_fsdp2_at_world_size_one(tiny, tmp_path):
    """A real fully_shard (one process, gloo): the snapshot is of the local shards, and with
    reshard_after_forward false neither forward reuses the other's gathered parameters."""
    import torch.distributed as dist

    from omni_ray.config import StrategyConfig
    from omni_ray.freeze import param_groups
    from omni_ray.strategies import build_strategy

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        path, batch = tiny
        built = build_trainable_model(ModelConfig(path=path), FreezeConfig(**FREEZE["projector full + lora llm"]),
                                      LORA, TrainConfig(seed=0, precision="fp32"))
        engine = build_strategy(StrategyConfig(reshard_after_forward=False), TrainConfig(precision="fp32", lr=3e-2),
                                torch.device("cpu"))
        model = engine.wrap(built.model, built.spec)
        engine.setup_optimizer(param_groups(model, built.plan, 0.0), 10)
        reference = ReferencePolicy(model)
        assert reference.nbytes > 0 and all(hasattr(p, "to_local") for p in reference.trained.values())
        with reference.active():
            initial = _logps(model, batch)
        for _ in range(2):
            engine.zero_grad()
            engine.backward(token_loss_sum(engine.forward(_inputs(batch)).logits, batch["labels"]))
            engine.step()
        model.eval()
        with torch.no_grad():
            policy = _logps(model, batch)
        with reference.active():
            ref = _logps(model, batch)
        with torch.no_grad():
            again = _logps(model, batch)
        assert float((policy - initial).abs().max()) > 1e-2
        torch.testing.assert_close(ref, initial, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(again, policy, atol=0, rtol=0)
    finally:
        dist.destroy_process_group()
