"""Rank 0's peak host memory while a ZeRO checkpoint is written: gathered vs sharded.

Two gloo workers (torch.multiprocessing, CPU) fully train a stack of linear layers under ZeRO-2
and ZeRO-3, take one step (so Adam's moments exist), then write the same checkpoint through
omni_ray's real save path (``omni_ray.train.checkpoint.save``) twice:

* gathered: what omni_ray did before, and still does for engines without a sharded path: the
  full fp32 weights and both Adam moments of every trained parameter are assembled on rank 0
  (``gather`` + ``save_state``), then written as one file;
* sharded: every rank writes the fragments it owns (``DeepSpeedStrategy.save_sharded``).

"Peak" is rank 0's allocation peak during the save, above what it held before: bytes of tensor
storage created in the save (``omni_ray.memory.LiveTensorBytes``) plus Python heap allocations
(``tracemalloc``: pickling, buffers). Both trackers see only what the save allocates, not RSS.
Their sum is reported (an upper bound of the combined peak).

On a CPU host the sharded save writes views of the optimizer's own partitions, so it allocates
almost nothing; on a GPU host it also copies this rank's partitions to host memory, i.e. about
12 bytes x trained parameters / world size (the "rank-0 wrote" column), against 12 bytes x
trained parameters (and more: the full-size reduce buffers) for the gathered save.

    python bench/checkpoint_zero.py [--hidden 1024] [--layers 8] [--world 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import tempfile
import time
import tracemalloc
import types
from pathlib import Path


def build(stage: int, hidden: int, layers: int, world: int):
    import torch

    from omni_ray.config import StrategyConfig, TrainConfig
    from omni_ray.strategies.deepspeed import DeepSpeedStrategy

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(hidden, hidden) for _ in range(layers)])
    train = TrainConfig(micro_batch_size=4, lr=1e-3, precision="fp32", max_grad_norm=1.0)
    strategy = DeepSpeedStrategy(StrategyConfig(name="deepspeed", zero_stage=stage), train, torch.device("cpu"))
    model = strategy.wrap(model, types.SimpleNamespace(layer_classes=("Linear",), name="mlp", zero3_leaf_modules=()))
    named = list(model.named_parameters())
    strategy.setup_optimizer([{"params": [p for _, p in named], "names": [n for n, _ in named], "lr": 1e-3,
                               "weight_decay": 0.0}], 10)
    loss = strategy.engine(torch.randn(4, hidden)).pow(2).mean()
    strategy.backward(loss)
    strategy.step()
    return strategy


def measured_save(strategy, sharded: bool, rank: int) -> tuple[int, int, float, str | None]:
    """(tensor bytes peak, Python heap peak, seconds, path) of one real checkpoint save on this rank."""
    import torch.distributed as dist

    from omni_ray.config import CheckpointConfig
    from omni_ray.data.position import PositionSet
    from omni_ray.memory import LiveTensorBytes
    from omni_ray.train import checkpoint as ckpt

    strategy.supports_sharded_checkpoint = sharded  # False: the gathered path every engine has
    plan = types.SimpleNamespace(frozen_names=())  # everything trains
    record = ckpt.RunRecord("bench", "mlp", "{}", {})
    dist.barrier()
    tracemalloc.start()
    tracker = LiveTensorBytes()
    start = time.perf_counter()
    with tracker:
        path = ckpt.save(strategy, plan, record, CheckpointConfig(trainable_only=True), 1, rank,
                         {"epoch": 0, "consumed": PositionSet().to_json(), "rng": {}})
    seconds = time.perf_counter() - start
    _, heap_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    dist.barrier()
    return tracker.peak, heap_peak, seconds, path


def worker(rank: int, args, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(args.world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(args.world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=args.world)
    rows = []
    for stage in (2, 3):
        strategy = build(stage, args.hidden, args.layers, args.world)
        trained = sum(p.ds_numel if hasattr(p, "ds_id") else p.numel() for p in strategy.optimizer_params)
        for sharded in (False, True):
            tensors, heap, seconds, path = measured_save(strategy, sharded, rank)
            written = sum(p.stat().st_size for p in Path(path).iterdir()) if path else 0
            if path:
                shutil.rmtree(path, ignore_errors=True)
            rows.append({"stage": stage, "layout": "sharded" if sharded else "gathered", "tensors": tensors,
                         "heap": heap, "seconds": seconds, "trained": trained, "written": written})
        del strategy
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args()

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(tempfile.mkdtemp(prefix="omni_ray_bench_zero_"), "rows.json")
    mp.spawn(worker, args=(args, port, out), nprocs=args.world)
    with open(out) as f:
        rows = json.load(f)

    mib = 2**20
    print(f"model: {args.layers} x Linear({args.hidden}, {args.hidden}), all trained "
          f"({rows[0]['trained']:,} parameters), fp32, AdamW, {args.world} gloo workers on CPU")
    print(f"{'ZeRO':<5} {'save':<9} {'rank-0 tensors MiB':>19} {'heap MiB':>9} {'total MiB':>10} "
          f"{'rank-0 wrote MiB':>17} {'save s':>7}")
    totals = {}
    for r in rows:
        total = r["tensors"] + r["heap"]
        totals[(r["stage"], r["layout"])] = total
        print(f"{r['stage']:<5} {r['layout']:<9} {r['tensors'] / mib:>19.1f} {r['heap'] / mib:>9.1f} "
              f"{total / mib:>10.1f} {r['written'] / mib:>17.1f} {r['seconds']:>7.2f}")
    print(f"state of the trained parameters (fp32 weight + 2 Adam moments): {12 * rows[0]['trained'] / mib:.1f} MiB")
    ratios = {stage: totals[(stage, "gathered")] / max(1, totals[(stage, "sharded")]) for stage in (2, 3)}
    print("rank-0 peak host memory during a save, gathered/sharded = "
          + ", ".join(f"{ratio:.1f} (ZeRO-{stage})" for stage, ratio in ratios.items()))


if __name__ == "__main__":
    main()
