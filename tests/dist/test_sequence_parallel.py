"""Sequence parallelism on 2 CPU ranks (gloo): N=2 gives the loss and gradients of N=1.

Two processes (torch.multiprocessing spawn, one group for the whole module) load the same tiny
Qwen2.5-VL checkpoint (``omni_ray.models.tiny``, real transformers classes, fp32). For each case,
each rank first computes the reference on the whole sequence alone (no hooks: the model as
transformers builds it), then installs the hooks (``enable_sequence_parallel``) and runs the same
batch split over both ranks. The test compares:

- loss: the group's summed token loss / the group's summed label count (``local_label_tokens``)
  against the reference mean loss;
- gradients: every parameter's gradient summed over the group (what FSDP2's reduce over the
  world computes) against the reference gradient, within 1e-4 relative to the largest entry;
- the work was split: each rank's decoder layers saw half of the positions, and its vision
  encoder a share of the patches, never all of them.

Cases: a padded batch of two image samples; a packed row of three samples (two images, one
text only) through ``omni_ray.data.packing`` and ``train.packing``; a video sample; a long sample
(many images) under a per-rank cap on the positions a decoder layer may hold, which the whole
sequence exceeds (the reference runs with the cap lifted; a control shows the cap fires); and the
packed case again with gradient checkpointing and LoRA on the LLM (peft).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from trainkit import free_port

CASES = ["padded", "packed", "video", "long", "packed_lora_checkpointing"]
TOL = 1e-4
CAP = 160
"""Positions one decoder layer may hold on one rank in the "long" case."""


def _samples(processor) -> dict:
    def conv(question, answer):
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]

    frames = np.zeros((4, 56, 56, 3), np.uint8)
    frames[..., 1] = np.arange(4)[:, None, None] * 50
    images = [Image.new("RGB", (56 + 28 * (i % 3), 56), (40 * i, 90, 200)) for i in range(6)]
    return {
        "a": processor(conv("<image>\nwhat is the color of the shape?", "it is red"), [Image.new("RGB", (56, 56), "red")]),
        "b": processor(conv("<image>\nhow many objects are there? describe the image.",
                            "there are 3 objects: a cat a dog and a horse"), [Image.new("RGB", (84, 56), "blue")]),
        "text": processor(conv("yes or no? left or right?", "left"), []),
        "video": processor(conv("<video>\nwhat happens in the video?", "the screen turns green"), [], [frames]),
        "long": processor(conv("".join(f"<image>\npicture {i}. " for i in range(6)) + "compare them all.",
                               "they differ in width and in color, from dark to light"), images),
    }


def _batches(path: str) -> dict:
    from transformers import AutoProcessor

    from omni_ray.data.collate import collate
    from omni_ray.data.conversation import SampleProcessor
    from omni_ray.data.packing import pack_samples
    from omni_ray.models.spec import get_spec

    image_inputs = get_spec("qwen2_5_vl").image_inputs
    processor = SampleProcessor(AutoProcessor.from_pretrained(path), 4096, image_inputs)
    s = _samples(processor)
    pad = processor.tokenizer.pad_token_id or 0
    packed = pack_samples([s["a"], s["text"], s["b"]], 4096, image_inputs)
    assert len(packed) == 1
    return {"padded": collate([s["a"], s["b"]], image_inputs, pad), "packed": packed[0],
            "video": collate([s["video"]], image_inputs, pad), "long": collate([s["long"]], image_inputs, pad),
            "packed_lora_checkpointing": packed[0]}


def _model_inputs(model, batch: dict) -> dict:
    from omni_ray.data.batch import Batch
    from omni_ray.train.packing import packed_model_inputs

    batch = Batch(batch)
    return packed_model_inputs(model, batch) if batch.packed else batch.model_inputs()


def _load(path: str, case: str):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    if case == "packed_lora_checkpointing":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                 target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)"))
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # dropout is 0 in the tiny configs: train mode only matters for checkpointing
    return model


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _watch(model, seen: dict, cap: int | None):
    """Record the positions each decoder layer and the patches the vision encoder get; refuse past ``cap``."""
    from omni_ray.train.packing import base_model

    inner = base_model(model).model

    def layer_hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen["positions"] = max(seen.get("positions", 0), hidden.shape[1])
        if cap is not None and hidden.shape[1] > cap:
            raise MemoryError(f"a decoder layer got {hidden.shape[1]} positions, over the per-rank cap {cap}")

    def patch_hook(_module, args):
        seen["patches"] = seen.get("patches", 0) + args[0].shape[0]

    handles = [layer.register_forward_pre_hook(layer_hook, with_kwargs=True) for layer in inner.language_model.layers]
    handles.append(inner.visual.patch_embed.register_forward_pre_hook(patch_hook))
    return handles


def _reference(model, batch: dict) -> tuple[float, dict]:
    from omni_ray.train.loss import token_loss_sum

    model.zero_grad()
    labels = batch["labels"]
    loss = token_loss_sum(model(**_model_inputs(model, batch)).logits, labels) / int(batch["num_label_tokens"])
    loss.backward()
    return float(loss), _grads(model)


def _sequence_parallel(model, batch: dict, sp) -> tuple[float, dict]:
    import torch.distributed as dist

    from omni_ray.train.sequence import local_label_tokens, sequence_parallel, sp_loss

    model.zero_grad()
    labels = batch["labels"]
    count = torch.tensor(float(local_label_tokens(labels, sp)))
    dist.all_reduce(count)  # the label count summed over the group: the sample's, counted once
    with sequence_parallel(sp, labels):
        local = sp_loss(model, _model_inputs(model, batch), labels, sp)
        (local / count).backward()  # inside the block: checkpointed layers recompute their attention
    total = local.detach().clone()
    dist.all_reduce(total)
    grads = _grads(model)
    for g in grads.values():
        dist.all_reduce(g)
    return float(total / count), grads


def _activation_bytes(model, batch: dict, sp) -> int:
    """Tensor bytes one forward leaves alive for the backward on this rank (``omni_ray.memory.LiveTensorBytes``)."""
    from omni_ray.memory import LiveTensorBytes
    from omni_ray.train.sequence import sequence_parallel, sp_loss

    tracker = LiveTensorBytes()
    with sequence_parallel(sp, batch["labels"]):
        with tracker:
            loss = sp_loss(model, _model_inputs(model, batch), batch["labels"], sp)
            kept = tracker.live
        loss.backward()
    model.zero_grad()
    return kept


def _case(path: str, case: str, batch: dict, sp, solo) -> dict:
    from omni_ray.train.sequence import enable_sequence_parallel

    model = _load(path, case)
    seen_ref: dict = {}
    handles = _watch(model, seen_ref, None)
    ref_loss, ref_grads = _reference(model, batch)
    capped = None
    if case == "long":  # control: the whole sequence does not fit under the per-rank cap
        for h in handles:
            h.remove()
        handles = _watch(model, {}, CAP)
        try:
            _reference(model, batch)
        except MemoryError as err:
            capped = str(err)
    for h in handles:
        h.remove()
    enable_sequence_parallel(model, sp.size)
    seen: dict = {}
    handles = _watch(model, seen, CAP if case == "long" else None)
    loss, grads = _sequence_parallel(model, batch, sp)
    for h in handles:
        h.remove()
    if case == "long":  # the same code path on one rank (a group of 1) and on two
        memory = {"activations_n1": _activation_bytes(model, batch, solo), "activations_n2": _activation_bytes(model, batch, sp)}
    worst = max(float((grads[n] - g).abs().max()) / max(float(g.abs().max()), 1e-12) for n, g in ref_grads.items())
    return {"ref_loss": ref_loss, "loss": loss, "grad_rel_err": worst, "same_params": sorted(grads) == sorted(ref_grads),
            "trained_params": len(ref_grads), "tokens": int(batch["input_ids"].shape[1]),
            "ref_positions": seen_ref["positions"], "positions": seen["positions"],
            "ref_patches": seen_ref.get("patches", 0), "patches": seen.get("patches", 0), "capped": capped,
            **(memory if case == "long" else {})}


def _worker(rank: int, path: str, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from omni_ray.train.sequence import SPGroup

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        sp = SPGroup(rank=rank, size=2)
        singles = [dist.new_group([r]) for r in range(2)]  # every rank creates every group, in order
        solo = SPGroup(rank=0, size=1, group=singles[rank])
        batches = _batches(path)
        results = {case: _case(path, case, batches[case], sp, solo) for case in CASES}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    from omni_ray.models.tiny import build_tiny

    root = tmp_path_factory.mktemp("sp")
    path = str(build_tiny("qwen2_5_vl", root / "model"))
    mp.spawn(_worker, args=(path, free_port(), str(root)), nprocs=2, join=True)
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("case", CASES)
def test_loss_and_gradients_equal_one_rank(results, case):
    for rank in (0, 1):
        r = results[rank][case]
        assert r["same_params"] and r["trained_params"] > 0, r
        assert abs(r["loss"] - r["ref_loss"]) <= TOL * abs(r["ref_loss"]), r
        assert r["grad_rel_err"] <= TOL, r


@pytest.mark.parametrize("case", CASES)
def test_each_rank_holds_half_the_sequence_and_a_share_of_the_images(results, case):
    for rank in (0, 1):
        r = results[rank][case]
        assert r["ref_positions"] == r["tokens"]
        assert r["positions"] == -(-r["tokens"] // 2), r
        if case in ("padded", "packed", "long"):  # two or more images: each rank encodes only its share
            assert 0 < r["patches"] < r["ref_patches"], r
    if case in ("padded", "packed", "long"):
        assert results[0][case]["patches"] + results[1][case]["patches"] == results[0][case]["ref_patches"]


def test_a_sample_over_the_per_rank_cap_trains_split(results):
    r = results[0]["long"]
    assert r["tokens"] > CAP >= r["positions"], r
    assert r["capped"] and "over the per-rank cap" in r["capped"], r  # control: alone it does not fit


def test_activation_memory_per_rank_halves(results):
    """Measured on the long sample: bytes the forward keeps for the backward, N=2 / N=1 per rank.

    Tiny widths: the vision encoder's share and the decoder layers' half are most of it; the
    whole-sequence embeddings (built before the split) stay on every rank.
    """
    for rank in (0, 1):
        r = results[rank]["long"]
        ratio = r["activations_n2"] / r["activations_n1"]
        print(f"rank {rank}: activation memory per rank N=2 / N=1 = {ratio:.2f} "
              f"({r['activations_n2']} / {r['activations_n1']} bytes, {r['tokens']} tokens)")
        assert ratio < 0.75, r
