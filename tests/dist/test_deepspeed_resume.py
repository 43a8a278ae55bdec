"""DeepSpeed's sharded checkpoints resume exactly, onto another world size and ZeRO stage.

gloo processes (torch.multiprocessing, no Ray: this checks the strategy, not the loop) train a toy
model with a frozen layer and two parameter groups. Checkpoints are written with
``save_sharded`` (every rank its own file, nothing gathered) by ZeRO-2 on one rank and by ZeRO-3
and ZeRO-2 on two ranks, after one step (Adam state of later groups only exists after the first
step), and resumed into the other stage on two and on one rank: the trained tensors, Adam
moments, step and schedule must be those before the save, bit for bit. The two-rank ZeRO-3 run
resumed into ZeRO-2 continues with the same losses as a run that never stopped, and that
grad_accum=2 run equals a single-process reference of the same optimizer steps.
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
    model = strategy.wrap(toy_model(), types.SimpleNamespace(layer_classes=("Linear",), name="toy", zero3_leaf_modules=()))
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


def snapshot(strategy, rank) -> dict:
    """Trained tensors and Adam state as full tensors by name, plus the schedule (rank 0). Collective."""
    tensors, state = strategy.gather(rank, trainable_only=True), strategy.save_state(rank)
    if rank != 0:
        return {}
    out = {f"param/{n}": t for n, t in tensors.items()}
    for name, entry in state["optimizer"]["state"].items():
        out.update({f"{k}/{name}": v.reshape(-1) if k == "step" else v for k, v in entry.items()})
    out["scheduler"] = torch.tensor(state["scheduler"]["last_epoch"])
    return out


def resume_into(stage: int, path, schedule):
    strategy = make(stage)
    strategy.load_sharded(str(path))
    strategy.load_state(schedule)
    return strategy


def shard_numels(path) -> dict:
    """{file name: {parameter: numel of its fragment in that file}}."""
    from safetensors import safe_open

    out = {}
    for file in sorted(path.glob("zero_rank*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out[file.name] = {k.split("/", 1)[1]: f.get_slice(k).get_shape()[0] for k in f.keys()
                              if k.startswith("param/")}
    return out


def init(rank, world, port):
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)


def save_checkpoint(strategy, rank, path, ref_file):
    """save_sharded on every rank into one directory (as Ray Train's upload merges them), the
    snapshot it must reproduce beside it."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    before = snapshot(strategy, rank)
    path.mkdir(exist_ok=True)
    strategy.save_sharded(str(path), trainable_only=True)
    schedule = strategy.save_state(rank, include_optimizer=False)
    if rank == 0:
        save_file(before, str(ref_file))
        torch.save(schedule, path.parent / f"{path.name}.schedule.pt")
    dist.barrier()  # every rank's file and the reference are written before anyone reads them


def check_resumed(strategy, rank, ref_file) -> bool | None:
    from safetensors.torch import load_file

    after = snapshot(strategy, rank)
    if rank != 0:
        return None
    ref = load_file(str(ref_file))
    return sorted(after) == sorted(ref) and all(torch.equal(after[k], ref[k]) for k in ref)


def schedule_of(path):
    return torch.load(path.parent / f"{path.name}.schedule.pt", weights_only=True)


def world1_save(rank, port, tmp):
    """World size 1, ZeRO-2: one step, then a sharded save for the world-size-2 phase to resume."""
    init(rank, 1, port)
    strategy = make(2)
    train_steps(strategy, rank, 0, 1)
    save_checkpoint(strategy, rank, tmp / "w1_zero2", tmp / "w1_zero2.ref.safetensors")


def world2(rank, port, tmp):
    """World size 2: the straight run; ZeRO-3 saved sharded at step 1, resumed into ZeRO-2 (exact state,
    same losses as the straight run); ZeRO-2 saved sharded too; the world-1 checkpoint resumed here."""
    import torch.distributed as dist

    init(rank, WORLD, port)
    straight = train_steps(make(3), rank, 0, STEPS)
    first = make(3)
    losses = train_steps(first, rank, 0, 1)
    save_checkpoint(first, rank, tmp / "w2_zero3", tmp / "w2_zero3.ref.safetensors")
    second = resume_into(2, tmp / "w2_zero3", schedule_of(tmp / "w2_zero3"))
    exact = {"w2_zero3 -> zero2 x2": check_resumed(second, rank, tmp / "w2_zero3.ref.safetensors")}
    save_checkpoint(second, rank, tmp / "w2_zero2", tmp / "w2_zero2.ref.safetensors")
    losses += train_steps(second, rank, 1, STEPS)
    from_w1 = resume_into(3, tmp / "w1_zero2", schedule_of(tmp / "w1_zero2"))
    exact["w1_zero2 -> zero3 x2"] = check_resumed(from_w1, rank, tmp / "w1_zero2.ref.safetensors")
    dist.barrier()
    if rank == 0:
        (tmp / "world2.json").write_text(json.dumps({"straight": straight, "resumed": losses, "exact": exact}))


def world1_load(rank, port, tmp):
    """World size 1: both world-size-2 checkpoints resumed, each into the other ZeRO stage."""
    init(rank, 1, port)
    exact = {"w2_zero3 -> zero2 x1": check_resumed(resume_into(2, tmp / "w2_zero3", schedule_of(tmp / "w2_zero3")),
                                                  rank, tmp / "w2_zero3.ref.safetensors"),
             "w2_zero2 -> zero3 x1": check_resumed(resume_into(3, tmp / "w2_zero2", schedule_of(tmp / "w2_zero2")),
                                                  rank, tmp / "w2_zero2.ref.safetensors")}
    (tmp / "world1.json").write_text(json.dumps(exact))


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sharded_zero_checkpoints_resume_exactly_onto_other_world_sizes_and_stages(tmp_path):
    """Saved sharded by ZeRO-2 and ZeRO-3 on 1 and 2 ranks, resumed on 2 and 1 ranks into the other
    stage: the same trained tensors, Adam moments, step and schedule, bit for bit; and the run
    continued after the resume equals one that never stopped."""
    import torch.multiprocessing as mp

    mp.spawn(world1_save, args=(free_port(), tmp_path), nprocs=1)
    mp.spawn(world2, args=(free_port(), tmp_path), nprocs=WORLD)
    mp.spawn(world1_load, args=(free_port(), tmp_path), nprocs=1)
    result = json.loads((tmp_path / "world2.json").read_text())
    exact = {**result["exact"], **json.loads((tmp_path / "world1.json").read_text())}
    assert exact == {k: True for k in exact} and len(exact) == 4
    assert result["resumed"] == pytest.approx(result["straight"], rel=1e-6, abs=0)
    # grad_accum 2 on 2 ranks under ZeRO-3 == the same optimizer steps in one process
    assert result["straight"] == pytest.approx(reference_losses(), rel=1e-6, abs=0)

    trained = {"b.weight": 256, "b.bias": 16, "c.weight": 64, "c.bias": 4}
    for name in ("w2_zero3", "w2_zero2"):
        files = shard_numels(tmp_path / name)
        assert sorted(files) == ["zero_rank00000-of-00002.safetensors", "zero_rank00001-of-00002.safetensors"]
        for param, numel in trained.items():  # each element written once, by the rank that owns it
            assert sum(f.get(param, 0) for f in files.values()) == numel, (name, param)
        for numels in files.values():  # every rank wrote a part, no rank the whole
            assert 0 < sum(numels.values()) < sum(trained.values()), (name, numels)
        assert set(files["zero_rank00000-of-00002.safetensors"]) <= set(trained)  # trainable only: no frozen a.*
