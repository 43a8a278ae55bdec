"""DeepSpeed strategy state round trip: save_state/gather on one engine, load into a fresh one.

Two gloo processes (torch.multiprocessing, no Ray: this checks the strategy, not the loop) train
a toy model with a frozen layer and two parameter groups under ZeRO-3, save after one step
(Adam state of later groups only exists after the first step), load the tensors and optimizer
state into a fresh ZeRO-2 engine (state is keyed by parameter name, full tensors: stage and world
size do not matter) and continue. The losses must equal those of a run that never stopped, and
the grad_accum=2 run must equal a single-process reference of the same optimizer steps.
"""

from __future__ import annotations

import json
import os
import socket
import types

import pytest
import torch

pytestmark = pytest.mark.dist

WORLD, MB, GA, STEPS, LR = 2, 3, 2, 4, 1e-2


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(8, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def toy_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, GA, WORLD, MB, 8, generator=g), torch.randn(STEPS, GA, WORLD, MB, 4, generator=g)


def toy_model():
    torch.manual_seed(0)
    model = Toy()
    model.a.requires_grad_(False)
    return model


def groups_of(model):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if n.startswith(prefix)],
             "names": [n for n, _ in named if n.startswith(prefix)], "lr": LR, "weight_decay": wd}
            for prefix, wd in (("b.", 0.0), ("c.", 0.1))]


def make(stage: int):
    from omni_ray.config import StrategyConfig, TrainConfig
    from omni_ray.strategies.deepspeed import DeepSpeedStrategy

    train = TrainConfig(micro_batch_size=MB, grad_accum=GA, lr=LR, precision="fp32", max_grad_norm=1.0)
    strategy = DeepSpeedStrategy(StrategyConfig(name="deepspeed", zero_stage=stage), train, torch.device("cpu"))
    model = strategy.wrap(toy_model(), types.SimpleNamespace(layer_classes=("Linear",), name="toy"))
    strategy.setup_optimizer(groups_of(model), STEPS)
    return strategy


def train_steps(strategy, rank, first, last):
    import torch.distributed as dist

    X, Y = toy_data()
    losses = []
    for s in range(first, last):
        total = 0.0
        for k in range(GA):  # the loop's normalisation: the whole step's elements, every rank
            loss = ((strategy.forward({"x": X[s, k, rank]}) - Y[s, k, rank]) ** 2).sum()
            strategy.backward(loss * WORLD / (GA * WORLD * MB * 4))
            total += float(loss.detach())
        strategy.step()
        strategy.zero_grad()
        t = torch.tensor([total])
        dist.all_reduce(t)
        losses.append(t.item() / (GA * WORLD * MB * 4))
    return losses


def worker(rank, port, out):
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    straight = train_steps(make(3), rank, 0, STEPS)
    first = make(3)
    losses = train_steps(first, rank, 0, 1)
    tensors, state = first.gather(rank, trainable_only=True), first.save_state(rank)
    box = [(tensors, state)]
    dist.broadcast_object_list(box, src=0)  # what a checkpoint gives every rank
    second = make(2)
    second.load_trainable(box[0][0])
    second.load_state(box[0][1])
    losses += train_steps(second, rank, 1, STEPS)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"straight": straight, "resumed": losses, "saved": sorted(box[0][1]["optimizer"]["state"]),
                       "tensors": sorted(box[0][0])}, f)
    dist.destroy_process_group()


def reference_losses():
    """One process, whole optimizer-step batches, torch AdamW + clipping + the same schedule."""
    from omni_ray.config import TrainConfig
    from omni_ray.strategies.base import make_scheduler

    model = toy_model()
    X, Y = toy_data()
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups_of(model)], lr=LR)
    schedule = make_scheduler(opt, TrainConfig(lr=LR), STEPS)
    losses = []
    for s in range(STEPS):
        loss = ((model(X[s].reshape(-1, 8)) - Y[s].reshape(-1, 4)) ** 2).sum() / (GA * WORLD * MB * 4)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_zero3_state_resumes_into_zero2_exactly(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "losses.json"
    mp.spawn(worker, args=(port, str(out)), nprocs=WORLD)
    result = json.loads(out.read_text())
    assert result["saved"] == ["b.bias", "b.weight", "c.bias", "c.weight"]  # trained ones only, by name
    assert result["tensors"] == ["b.bias", "b.weight", "c.bias", "c.weight"]
    assert result["resumed"] == pytest.approx(result["straight"], rel=1e-6, abs=0)
    # grad_accum 2 on 2 ranks under ZeRO-3 == the same optimizer steps in one process
    assert result["straight"] == pytest.approx(reference_losses(), rel=1e-6, abs=0)
