"""The training recipe, top to bottom: one worker's view of a run.

    setup    load the checkpoint, plan and apply the freeze map, wrap (FSDP2 | ZeRO), optimizer
    loop     shard iterator -> collate -> forward/backward x grad_accum -> clip, step -> report
    audit    after the first step: the freeze map held under the engine (every rank)
    save     trainable-only checkpoint at every_n_steps and at the end

Ray Train starts ``train_loop_per_worker`` once per worker; ``run`` takes any session (see
``omni_ray.train.session``), so the same loop runs as a single plain process:

    from omni_ray.train.loop import run; from omni_ray.train.session import LocalSession
"""

from __future__ import annotations

import time
from collections import Counter

import torch
import torch.distributed as dist
import torch.nn.functional as F

from omni_ray.config import Config, dump_config
from omni_ray.data.collate import collate
from omni_ray.data.conversation import IGNORE_INDEX, SampleProcessor, decode
from omni_ray.data.errors import REASONS
from omni_ray.freeze import apply_plan, audit, format_audit, frozen_fingerprint, param_groups, plan_freeze
from omni_ray.models.loading import load_model, load_processor, local_model_dir, read_hf_config, resolve_spec
from omni_ray.strategies import build_strategy
from omni_ray.train import checkpoint as ckpt

NON_MODEL_KEYS = ("labels", "num_label_tokens", "keep_alive")


def train_loop_per_worker(loop_config: dict) -> None:
    from omni_ray.train.session import RaySession

    run(Config.model_validate(loop_config["config"]), RaySession(), loop_config["num_rows"])


def keep_alive_sample(sample_processor: SampleProcessor) -> dict:
    """A processed one-image sample used to run the vision path in image-free batches (see collate)."""
    from PIL import Image

    image = Image.new("RGB", (28, 28))
    messages = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "."}]
    return sample_processor(messages, [image])


def _all_reduce(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over label positions (float32 for a stable softmax)."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:].to(logits.device)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def run(cfg: Config, session, num_rows: int) -> dict:
    rank, world = session.rank, session.world_size
    device = session.device
    torch.manual_seed(cfg.train.seed)  # same seed on every rank: LoRA adapters start identical

    # --- model: load, freeze map, engine ----------------------------------------------------
    local_dir = local_model_dir(cfg.model, cfg.storage)
    spec = resolve_spec(cfg.model, read_hf_config(cfg.model, cfg.storage))
    model = load_model(cfg.model, spec, local_dir, qlora=cfg.lora.qlora)
    if cfg.lora.qlora:  # norms in fp32, input grads on, for training adapters over a 4-bit base
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    plan = plan_freeze(((n, tuple(p.shape)) for n, p in model.named_parameters()), spec, cfg.freeze, cfg.lora,
                       cfg.train.lr)
    model = apply_plan(model, plan, cfg.lora)
    # What the trained state depends on, recorded in every checkpoint and checked on resume.
    record = ckpt.run_record(cfg.run, cfg.model, dump_config(cfg), ckpt.run_identity(local_dir, spec.name, plan, cfg.lora))
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    strategy = build_strategy(cfg.strategy, cfg.train, device)
    model = strategy.wrap(model, spec)
    fingerprint = frozen_fingerprint(model)

    # world_size workers each take micro_batch_size samples grad_accum times per optimizer step.
    samples_per_step = world * cfg.train.micro_batch_size * cfg.train.grad_accum
    steps_per_epoch = max(1, -(-num_rows // samples_per_step))  # the last step of an epoch may be short
    total_steps = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs
    strategy.setup_optimizer(param_groups(model, plan, cfg.train.weight_decay), total_steps)

    processor = load_processor(cfg.model, local_dir)
    sample_processor = SampleProcessor(processor, cfg.data.model_max_length, spec.image_inputs)
    keep_alive = keep_alive_sample(sample_processor)
    pad_id = sample_processor.tokenizer.pad_token_id or 0

    # --- resume -------------------------------------------------------------------------------
    # After a lost worker, or when the same command runs again with the same run name: the newer
    # of Ray Train's registered checkpoint and the newest whole one in storage (_pick_checkpoint);
    # ckpt.load checks every file against the manifest and the base model's fingerprint.
    step, epoch, consumed = 0, 0, set()
    resumed = _pick_checkpoint(session, cfg)
    resumed_step = None
    if resumed:
        state = ckpt.load(resumed, record.identity, cfg.checkpoint.resume)
        if state["sharded_dir"]:
            strategy.load_sharded(state["sharded_dir"])
        else:
            strategy.load_trainable(state["tensors"])
        if not state["weights_only"]:
            strategy.load_state(state["train_state"])
            torch.set_rng_state(state["rng"]["torch"])
        step, epoch, consumed = state["step"], state["epoch"], set(state["consumed_ids"])
        resumed_step = step
        if rank == 0:
            print(f"[omni-ray] resumed from {resumed}: step {step}, epoch {epoch}, "
                  f"{len(consumed)} samples of this epoch already trained", flush=True)

    # --- data ---------------------------------------------------------------------------------
    shard = session.dataset_shard("train")
    rejected: Counter = Counter()
    seen = 0

    def epoch_batches(epoch: int, skip: set):
        """This rank's micro-batches for one epoch: (ids, batch); rows trained before a resume skipped.

        The shuffle is a function of (seed, epoch) over this rank's stream, and skipping happens
        after it, so a resumed run sees exactly the rows the interrupted one had not reached.
        """
        nonlocal seen
        for rows in shard.iter_batches(batch_size=cfg.train.micro_batch_size, batch_format="numpy",
                                       prefetch_batches=2, local_shuffle_buffer_size=(
                                           cfg.data.shuffle_buffer if cfg.data.shuffle else None),
                                       local_shuffle_seed=cfg.train.seed + epoch if cfg.data.shuffle else None):
            ids, samples = [], []
            for i, reason in enumerate(rows["reason"]):
                sample_id = str(rows["id"][i])
                if sample_id in skip:
                    continue
                ids.append(sample_id)
                seen += 1
                if reason:
                    rejected[str(reason)] += 1
                else:
                    samples.append(decode(rows["sample"][i]))
            if ids:
                yield ids, collate(samples, spec.image_inputs, pad_id, keep_alive)

    empty_batch = collate([], spec.image_inputs, pad_id, keep_alive)  # a rank out of data runs this

    # --- loop ---------------------------------------------------------------------------------
    audited = False
    window_start, window_samples, window_tokens = time.perf_counter(), 0, 0
    keep_alive_batches = 0  # image-free batches that ran the vision path on the dummy row
    last: dict = {}
    batches = epoch_batches(epoch, consumed)
    max_epochs = None if cfg.train.max_steps else cfg.train.epochs
    saved_at = step if resumed else -1

    def save_and_report(metrics: dict, final: bool) -> None:
        nonlocal saved_at
        metrics["frozen_unchanged"] = frozen_fingerprint(model) == fingerprint
        train_state = {"epoch": epoch, "consumed_ids": _gather_ids(consumed), "rng": {"torch": torch.get_rng_state()}}
        path = ckpt.save(strategy, plan, record, cfg.checkpoint, step, rank, train_state)
        # The last one uploads synchronously so the run ends with it in storage.
        session.report(metrics, checkpoint_dir=path, async_upload=cfg.checkpoint.async_upload and not final)
        saved_at = step

    while step < total_steps and (max_epochs is None or epoch < max_epochs):
        micro, ids = [], []
        for _ in range(cfg.train.grad_accum):
            item = next(batches, None)
            if item is not None:
                ids += item[0]
                micro.append(item[1])
        # Ranks run in lockstep: a rank whose stream ended early (uneven split, skipped rows
        # after a resume onto another world size) trains on an empty batch until all are done.
        local_tokens = float(sum(int(b["num_label_tokens"]) for b in micro))
        global_tokens, ranks_with_data = _all_reduce([local_tokens, float(bool(micro))])
        if ranks_with_data == 0:  # epoch over on every rank
            epoch, consumed = epoch + 1, set()
            batches = epoch_batches(epoch, consumed)
            continue
        consumed.update(ids)
        micro = micro or [empty_batch]
        # Normalise by the label tokens of the whole optimizer step on all ranks, so every
        # token weighs the same whatever the batch split, world size or engine.
        loss_sum = 0.0
        for batch in micro:
            labels = batch["labels"]
            inputs = {k: v.to(device) for k, v in batch.items() if k not in NON_MODEL_KEYS}
            logits = strategy.forward(inputs).logits
            loss = token_loss_sum(logits, labels)
            strategy.backward(loss * world / max(global_tokens, 1.0))
            loss_sum += float(loss.detach())
            keep_alive_batches += int(batch["keep_alive"])
            window_samples += int((batch["labels"] != IGNORE_INDEX).any(1).sum())
            window_tokens += int(batch["attention_mask"].sum())
        stats = strategy.step()
        step += 1
        if not audited:  # gradients and optimizer state exist now: check the freeze map held
            rows = audit(strategy.unwrapped(), plan, strategy.optimizer_params, strategy.optimizer_state())
            if rank == 0:
                print(format_audit(rows), flush=True)
            audit_summary = {r.group: {"planned": r.planned_trainable, "trainable": r.trainable} for r in rows}
            audited = True
        strategy.zero_grad()

        if step % cfg.train.log_every == 0 or step == total_steps:
            reasons = REASONS  # a fixed vector: every rank all-reduces the same shape
            totals = _all_reduce([loss_sum, local_tokens, window_samples, window_tokens, seen, keep_alive_batches]
                                 + [rejected[r] for r in reasons])
            elapsed = time.perf_counter() - window_start
            last = {
                "step": step, "epoch": epoch,
                "loss": totals[0] / max(totals[1], 1.0),
                "lr": strategy.current_lr(), "grad_norm": stats["grad_norm"],
                "skipped_steps": stats.get("skipped_total", int(stats.get("skipped", False))),
                "samples_per_s": totals[2] / elapsed, "tokens_per_s": totals[3] / elapsed,
                "samples_seen": int(totals[4]), "vision_keep_alive_batches": int(totals[5]),
                "rejected": {r: int(v) for r, v in zip(reasons, totals[6:]) if v},
                "audit": audit_summary, "resumed_from_step": resumed_step,
            }
            if rank == 0:
                print(f"[omni-ray] step {step}/{total_steps} epoch {epoch} loss {last['loss']:.4f} "
                      f"lr {last['lr']:.2e} grad_norm {last['grad_norm']:.3f} "
                      f"{last['samples_per_s']:.1f} samples/s {last['tokens_per_s']:.0f} tokens/s"
                      + (f" rejected {last['rejected']}" if last["rejected"] else ""), flush=True)
            bad = sum(last["rejected"].values()) / max(totals[4], 1.0)
            if bad > cfg.data.max_bad_fraction:
                raise RuntimeError(
                    f"data.max_bad_fraction: {bad:.1%} of samples rejected ({last['rejected']}), above "
                    f"{cfg.data.max_bad_fraction:.1%}; run `omni-ray data check` to see which and why"
                )
            window_start, window_samples, window_tokens = time.perf_counter(), 0, 0
            # A spot node about to go: checkpoint now, so at most the steps since the last
            # report are lost (every rank calls this equally often: it is a barrier).
            preempted = session.preemption_notice()
            due = bool(cfg.checkpoint.every_n_steps and step % cfg.checkpoint.every_n_steps == 0)
            if due or preempted or step == total_steps:
                save_and_report(last, final=step == total_steps)
            else:
                session.report(last)
    if saved_at != step:  # the epochs ran out before total_steps (rejected rows, ragged ends)
        last = {**last, "step": step, "epoch": epoch}
        save_and_report(last, final=True)
    return last


def _pick_checkpoint(session, cfg: Config) -> str | None:
    """The checkpoint to resume from, as a local directory, the same on every rank.

    The newer of Ray Train's latest registered checkpoint and the newest complete one in the
    run's storage (see ckpt.find_latest): rank 0 decides, the others follow.
    """
    import tempfile

    from omni_ray import storage as st

    registered = session.latest_checkpoint()
    choice = "registered"  # rank 0 decides: "registered", "none" (nothing whole), or a URI in storage
    if session.rank == 0 and getattr(session, "run_uri", None):
        picked = ckpt.choose_resume(registered, ckpt.find_latest(session.run_uri(cfg), cfg.storage))
        choice = "none" if picked is None else "registered" if picked == registered else picked
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [choice]
        dist.broadcast_object_list(box, src=0)
        choice = box[0]
    if choice == "none":
        return None
    if choice == "registered":
        return registered
    return st.download_dir(choice, tempfile.mkdtemp(prefix="omni_ray_resume_"), cfg.storage)


def _gather_ids(ids: set) -> list[str]:
    """The union of every rank's consumed sample ids (collective)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return sorted(ids)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, sorted(ids))
    return sorted(set().union(*parts))


__all__ = ["run", "train_loop_per_worker", "token_loss_sum"]
