"""The chunked loss equals the plain logits loss, with its gradients, under FSDP2 and ZeRO-3.

2 workers on a local Ray (gloo), a tiny MiniCPM-V 4.6 whose lm_head is tied to the input
embeddings (as the real one), fp32. The engines shard the head's weight: the chunked loss must
run inside the model's forward (``head_loss``) for them to gather it, and its weight gradient
must reach the right shards. Each rank gets different labels, so the gradients are reduced
across ranks. One Ray Train run covers the four cases (~20 s of fixed cost each otherwise).
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

pytestmark = pytest.mark.dist

RTOL = 1e-4
CASES = [("fsdp", False), ("fsdp", True), ("zero3", False), ("zero3", True)]


def _model():
    from transformers.models.minicpmv4_6 import MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration

    from omni_ray.models.tiny import _text_config

    torch.manual_seed(0)  # the same model on every rank
    text = {**_text_config("qwen3_5_text", 300, 4), "tie_word_embeddings": True}
    cfg = MiniCPMV4_6Config(text_config=text, tie_word_embeddings=True,
                            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, patch_size=14, image_size=56))
    return MiniCPMV4_6ForConditionalGeneration(cfg)


def _grads(strategy, engine: str, params: list) -> list[torch.Tensor]:
    """This rank's view of each trained parameter's reduced gradient."""
    if engine == "zero3":
        from deepspeed.utils import safe_get_full_grad

        return [safe_get_full_grad(p).clone() for p in params]
    return [p.grad.to_local().clone() for p in params]


def _clear(strategy, engine: str) -> None:
    if engine == "zero3":
        strategy.engine.optimizer.zero_grad(set_to_none=True)
    else:
        strategy.optimizer.zero_grad(set_to_none=True)


def _case(engine: str, head_trained: bool, rank: int) -> dict:
    from omni_ray.config import StrategyConfig, TrainConfig
    from omni_ray.data.conversation import IGNORE_INDEX
    from omni_ray.models.spec import get_spec
    from omni_ray.strategies import build_strategy
    from omni_ray.train.loss import head_loss, token_loss_sum

    model = _model()
    for name, p in model.named_parameters():
        p.requires_grad_(".layers.3." in name)
    model.lm_head.weight.requires_grad_(head_trained)
    strategy_cfg = StrategyConfig(name="fsdp") if engine == "fsdp" else StrategyConfig(name="deepspeed", zero_stage=3)
    strategy = build_strategy(strategy_cfg, TrainConfig(precision="fp32", max_grad_norm=None), torch.device("cpu"))
    model = strategy.wrap(model, get_spec("minicpmv4_6"))
    trained = [p for p in model.parameters() if p.requires_grad]
    strategy.setup_optimizer([{"params": trained, "names": [], "lr": 1e-3, "weight_decay": 0.0}], 10)
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, 300, (2, 17), generator=g)
    labels = torch.randint(0, 300, (2, 17), generator=g)
    labels[:, :5] = IGNORE_INDEX
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}

    plain = token_loss_sum(strategy.forward(inputs).logits, labels)
    strategy.backward(plain)
    plain_grads = _grads(strategy, engine, trained)
    _clear(strategy, engine)
    with head_loss(strategy.unwrapped().lm_head, labels, chunk=5):
        chunked = strategy.forward(inputs).logits
    strategy.backward(chunked)
    chunked_grads = _grads(strategy, engine, trained)
    grad_err = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
                   for a, b in zip(chunked_grads, plain_grads, strict=True))
    return {"loss_err": abs(float(chunked.detach()) - float(plain.detach())) / abs(float(plain.detach())), "grad_err": grad_err,
            "n_grads": len(trained), "grad_norm": float(sum(x.norm() for x in plain_grads))}


def _worker(config: dict) -> None:
    import json

    import ray.train

    rank = ray.train.get_context().get_world_rank()
    out = {f"{e}-{'head' if h else 'frozen'}": _case(e, h, rank) for e, h in CASES}
    # Ray Train keeps reported metrics only with a checkpoint: the ranks write theirs to a file.
    with open(f"{config['out']}/rank{rank}.json", "w") as f:
        json.dump(out, f)


def test_chunked_loss_matches_plain_under_fsdp2_and_zero3(ray_local, tmp_path):
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    trainer = TorchTrainer(_worker, train_loop_config={"out": str(tmp_path)}, scaling_config=ScalingConfig(num_workers=2),
                           torch_config=TorchConfig(backend="gloo"),
                           run_config=RunConfig(name="loss-engines", storage_path=str(tmp_path)))
    result = trainer.fit()
    assert result.error is None, result.error
    for rank in (0, 1):
        check_cases(json.loads((tmp_path / f"rank{rank}.json").read_text()))


def check_cases(cases: dict) -> None:
    assert set(cases) == {f"{e}-{'head' if h else 'frozen'}" for e, h in CASES}
    for name, case in cases.items():
        print(name, case)
        assert case["loss_err"] < RTOL and case["grad_err"] < RTOL, (name, case)
        assert case["grad_norm"] > 0, name
        # the tied head/embedding weight is one more trained tensor when the head trains
        assert case["n_grads"] == cases[name.replace("head", "frozen")]["n_grads"] + name.endswith("head")
