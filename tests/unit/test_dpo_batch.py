"""A batch of pairs is one forward of 2P rows with each pair's pixels once and the vision tower run
once per pair, and it computes exactly what the 2P rows as separate SFT samples compute.

Tiny MiniCPM-V 4.6 (NaViT-packed pixels, target_sizes) and tiny Qwen2.5-VL (patch rows,
image_grid_thw, 3-D rope positions from the grid), loaded through build_trainable_model.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from omni_ray.config import FreezeConfig, LoraConfig, ModelConfig, TrainConfig
from omni_ray.data.collate import collate
from omni_ray.data.pair_processor import PairProcessor, collate_pairs
from omni_ray.data.pairs import normalize_pair
from omni_ray.models.spec import get_spec
from omni_ray.models.tiny import build_tiny, build_tiny_processor
from omni_ray.train.build import build_trainable_model
from omni_ray.train.preference import PairLogps, answer_tokens, head_logps, logits_sequence_logps, shared_vision

VISION = {"minicpmv4_6": "vision_tower", "qwen2_5_vl": "visual"}
PAIRS = [({"image": "a.jpg", "question": "what is the color of the shape?", "chosen": "it is red",
           "rejected": "it is blue"}, Image.new("RGB", (112, 84), (200, 30, 30))),
         ({"image": "b.jpg", "question": "how many objects are there?", "chosen": "2",
           "rejected": "there are 3 objects"}, Image.new("RGB", (56, 56), (30, 30, 200)))]


def _model_inputs(batch):
    return {"use_cache": False, **{k: v for k, v in batch.items()
                                   if k not in ("labels", "num_label_tokens", "keep_alive", "pairs")}}


@pytest.mark.parametrize("family", sorted(VISION))
def test_pair_batch_equals_separate_rows_with_vision_once(tmp_path, family):
    spec = get_spec(family)
    path = build_tiny(family, tmp_path / family)
    model = build_trainable_model(ModelConfig(path=str(path)), FreezeConfig(), LoraConfig(r=4, alpha=8, dropout=0.0),
                                  TrainConfig()).model.eval()
    pair_processor = PairProcessor(build_tiny_processor(family), 512, spec.image_inputs)
    pairs, rows = [], {"chosen": [], "rejected": []}
    for record, image in PAIRS:
        pair = normalize_pair(record, 0)
        out = pair_processor(pair["prompt"], pair["chosen"], pair["rejected"], [image])
        pairs.append(out)
        pixels = {k: out[k] for k in spec.image_inputs if k in out}
        for side in rows:
            tokens = {k.removeprefix(f"{side}_"): v for k, v in out.items() if k.startswith(f"{side}_")}
            rows[side].append({**tokens, "num_images": 1, **pixels})  # mm_token_type_ids: Qwen's 3-D rope
    batch = collate_pairs(pairs, spec.image_inputs)
    separate = collate(rows["chosen"] + rows["rejected"], spec.image_inputs)  # each row with its own pixels
    for key in ("input_ids", "labels", "attention_mask", "mm_token_type_ids"):
        assert (key in batch) == (key in separate) and (key not in batch or torch.equal(batch[key], separate[key]))

    seen = []
    vision = getattr(model.get_base_model().model, VISION[family])
    hook = vision.register_forward_pre_hook(lambda module, args, kwargs: seen.append(
        (args[0] if args else next(iter(kwargs.values()))).shape), with_kwargs=True)
    with torch.no_grad():
        expected = model(**_model_inputs(separate)).logits
        calls_separate = len(seen)
        with shared_vision(model):
            logits = model(**_model_inputs(batch)).logits
            with head_logps(model.get_output_embeddings(), batch["labels"]):
                logps = model(**_model_inputs(batch)).logits
    hook.remove()
    assert calls_separate == 1 and len(seen) == 3  # one vision call per forward (two shared ones), with ...
    assert seen[1].numel() * 2 == seen[2].numel() * 2 == seen[0].numel()  # ... each pair's pixels once
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[mask], expected[mask], atol=1e-5, rtol=1e-5)

    split = PairLogps.split(logps, answer_tokens(batch["labels"]))
    direct = logits_sequence_logps(expected, separate["labels"])
    torch.testing.assert_close(split.chosen, direct[:2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split.rejected, direct[2:], atol=1e-5, rtol=1e-5)
    assert split.chosen_tokens.tolist() != split.rejected_tokens.tolist()  # answers of different lengths


def test_dpo_steps_on_a_pair_batch_learn_the_preference(tmp_path):
    """At step 0 the policy is the reference (loss ln 2, rewards 0); a few DPO steps make every chosen
    answer's reward the higher one. Projector full + LoRA: both kinds of reference at once."""
    from omni_ray.train.preference import mean_metrics, objective, pair_logps, pair_loss
    from omni_ray.train.reference import ReferencePolicy

    spec = get_spec("minicpmv4_6")
    path = build_tiny("minicpmv4_6", tmp_path / "m", vision_layers=1)
    model = build_trainable_model(ModelConfig(path=str(path)), FreezeConfig(projector="full", llm="lora"),
                                  LoraConfig(r=4, alpha=8, dropout=0.0), TrainConfig()).model
    pair_processor = PairProcessor(build_tiny_processor("minicpmv4_6"), 512, spec.image_inputs)
    pairs = [pair_processor(p["prompt"], p["chosen"], p["rejected"], [image])
             for p, image in ((normalize_pair(record, 0), image) for record, image in PAIRS)]
    batch = collate_pairs(pairs, spec.image_inputs)
    reference = ReferencePolicy(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    forward = lambda inputs: model(use_cache=False, **inputs)  # noqa: E731 - the engine's forward, unwrapped
    history = []
    for _ in range(4):
        logps = pair_logps(forward, model, batch, reference)
        part = pair_loss(logps, "sigmoid", beta=0.5)
        loss = objective(part, sft_weight=0.1, step_pairs=2, step_chosen_tokens=float(logps.chosen_tokens.sum()))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append((float(part.loss_sum.detach()) / 2, mean_metrics(part.metrics)))
    first, last = history[0][1], history[-1][1]
    assert abs(history[0][0] - torch.log(torch.tensor(2.0)).item()) < 1e-4  # policy == reference at step 0
    assert abs(first["rewards_margin"]) < 1e-4
    assert last["rewards_accuracy"] == 1.0 and last["rewards_margin"] > first["rewards_margin"] + 0.1
    assert history[-1][0] < history[0][0]
