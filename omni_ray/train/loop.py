"""The training recipe, top to bottom: one worker's view of a run.

    build    build_trainable_model (load, freeze plan, LoRA) -> engine.wrap -> engine.setup_optimizer
    resume   the newest whole checkpoint: trained tensors, optimizer, schedule, RNG, data position
    loop     EpochBatches.next_step -> train_step -> FreezeGuard.after_step (audit after step 1)
    report   every train.log_every steps: metrics over all ranks (+ evaluation on data.eval when
             due) -> policy: stop for bad data? checkpoint now (on schedule, on a preemption
             notice, at the end)?

Ray Train starts ``train_loop_per_worker`` once per worker; ``run`` takes any session (see
``omni_ray.train.session``), so the same loop runs as a single plain process::

    from omni_ray.train.loop import run; from omni_ray.train.session import LocalSession
    run(cfg, LocalSession(datasets={"train": ListIterator(rows)}), num_rows=len(rows))
"""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from omni_ray.config import Config, dump_config
from omni_ray.data.conversation import SampleProcessor
from omni_ray.data.pair_processor import PairProcessor
from omni_ray.data.errors import REASONS
from omni_ray.data.position import PositionSet
from omni_ray.freeze import param_groups
from omni_ray.models.loading import load_processor
from omni_ray.strategies import build_strategy
from omni_ray.train import checkpoint as ckpt
from omni_ray.train.batches import Batcher, EpochBatches, PairBatcher, TrainState
from omni_ray.train.build import build_trainable_model
from omni_ray.train.evaluation import Evaluator
from omni_ray.train.guard import FiniteGuard, FreezeGuard
from omni_ray.train.loss import fast_paths
from omni_ray.train.policy import bad_data_error, checkpoint_due, schedule_done, should_log, total_optimizer_steps
from omni_ray.train.resume import gather_positions, pick_checkpoint
from omni_ray.train.preference import mean_metrics
from omni_ray.train.step import StepResult, step_for_run

log = logging.getLogger(__name__)


def memory_gb(device) -> float:
    """This process's peak accelerator memory (GB), or its resident memory on a CPU worker."""
    if getattr(device, "type", "cpu") == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kilobytes on Linux


def train_loop_per_worker(loop_config: dict) -> None:
    from omni_ray.logs import setup_logging
    from omni_ray.train.session import RaySession

    setup_logging()
    run(Config.model_validate(loop_config["config"]), RaySession(loop_config.get("stop_box")), loop_config["num_rows"],
        loop_config["run_uri"])


def run(cfg: Config, session, num_rows: int, run_uri: str | None = None) -> dict:
    """Train on this rank until the schedule ends; returns the last metrics reported."""
    built = build_trainable_model(cfg.model, cfg.freeze, cfg.lora, cfg.train, cfg.storage)
    engine = build_strategy(cfg.strategy, cfg.train, session.device)
    model = engine.wrap(built.model, built.spec)
    total_steps = total_optimizer_steps(cfg.train, num_rows, session.world_size)
    engine.setup_optimizer(param_groups(model, built.plan, cfg.train.weight_decay), total_steps)
    guard = FreezeGuard(engine, built.plan, session.rank)
    finite = FiniteGuard(cfg.train.max_nonfinite_steps)
    step = step_for_run(cfg, engine)  # DPO: the reference snapshot holds the base values, so before resume
    if session.rank == 0:
        log.info("kernels: %s", fast_paths(session.device))
    # What the trained state depends on (base weights, architecture, freeze plan, LoRA, tokenizer):
    # recorded in every checkpoint, compared on resume.
    record = ckpt.run_record(cfg.run, cfg.model, dump_config(cfg),
                             ckpt.run_identity(built.local_dir, built.spec.name, built.plan, cfg.lora), run_uri)
    state = resume(session, engine, run_uri, cfg, record)
    if state.reports:  # the resumed checkpoint's reports once more: the driver logs those it never got
        session.report({"step": state.step, "resumed_from_step": state.step, "replayed": state.reports})

    batcher = make_batcher(cfg, built)
    batches = EpochBatches(session.dataset_shard("train"), batcher, cfg.train, cfg.data, state)
    evaluator = Evaluator.for_run(cfg.data, cfg.eval, cfg.train, cfg.model, cfg.storage, batcher.keep_alive, run_uri)
    meter = Meter([e.label() for e in cfg.data.entries()], cfg.data.is_mixture(), cfg.train.objective == "dpo")
    last = {}
    while not schedule_done(state.step, state.epoch, total_steps, cfg.train):
        # The driver got SIGINT/SIGTERM: checkpoint here, between steps, and end (every rank asks at
        # every boundary and all follow rank 0, so all stop at the same step).
        if _all_reduce([session.stop_requested()])[0]:
            return stop_here(session, engine, guard, cfg, state, meter, batches, last, record, total_steps)
        micro = batches.next_step(cfg.train.grad_accum)
        # Ranks run in lockstep: a rank whose stream ended early (uneven split, skipped rows
        # after a resume onto another world size) trains on an empty batch until all are done.
        # The step's counts (label tokens; DPO: pairs, chosen tokens) are summed over all ranks.
        *counts, ranks_with_data = _all_reduce([*step.counts(micro), bool(micro)])
        if ranks_with_data == 0:  # the epoch is over on every rank
            batches.next_epoch()
            continue
        # Every rank runs as many forwards as the busiest one: packed rows per step differ from rank
        # to rank, and FSDP2 / ZeRO-3 gather and reduce once per forward and backward.
        (forwards,) = _all_reduce([len(micro)], dist.ReduceOp.MAX)
        micro = micro + [batcher.empty] * (int(forwards) - len(micro))
        result = step(engine, micro, counts, session.world_size, session.device)
        meter.add(result)
        state.step += 1
        # A non-finite step was skipped; too many in a row, or a run that applied none, stop here.
        finite.after_step(state.step, result.stats, last=schedule_done(state.step, state.epoch, total_steps, cfg.train))
        guard.after_step()
        evaluating = evaluator is not None and evaluator.due(state.step, total_steps)
        if evaluating or should_log(state.step, total_steps, cfg.train.log_every):
            last = meter.report(state, batches, engine, guard, total_steps, session.device,
                                (session.rank, session.world_size))
            if evaluating:  # every rank: eval loss over the whole eval set, answers -> eval/step-N.html
                last.update(evaluator(engine, state.step, session.rank, session.world_size, session.device))
                meter.since = time.perf_counter()  # evaluation time is not training throughput
            state.reports.append(last)
            if session.rank == 0:
                log_step(last)
            stop = bad_data_error(last["rejected"], last["samples_seen"], cfg.data.max_bad_fraction)
            if stop:
                raise RuntimeError(stop)
            # A spot node about to go: checkpoint once per notice, so at most the steps since the
            # last report are lost (every rank asks equally often: it is a barrier).
            notice = session.preemption_notice()
            new_notice, state.under_notice = notice and not state.under_notice, notice
            if checkpoint_due(state.step, total_steps, cfg.checkpoint.every_n_steps, new_notice):
                save_checkpoint(session, engine, guard, cfg, state, last, record, total_steps)
            else:
                session.report(last)
    if state.saved_at != state.step:  # the epochs ran out before total_steps (rejected rows, ragged ends)
        last = {**last, "step": state.step, "epoch": state.epoch}
        if evaluator is not None and evaluator.due(state.step, state.step):
            last.update(evaluator(engine, state.step, session.rank, session.world_size, session.device))
        save_checkpoint(session, engine, guard, cfg, state, last, record, state.step)
    return last


def make_batcher(cfg: Config, built) -> Batcher | PairBatcher:
    """Collates this run's samples: rows for SFT, pairs of rows for DPO (``micro_batch_size`` counts pairs)."""
    processor, spec = load_processor(cfg.model, built.local_dir), built.spec
    if cfg.train.objective == "dpo":
        return PairBatcher(PairProcessor(processor, cfg.data.model_max_length, spec.image_inputs), spec)
    return Batcher(SampleProcessor(processor, cfg.data.model_max_length, spec.image_inputs), spec,
                   cfg.data.row_tokens())


def stop_here(session, engine, guard: FreezeGuard, cfg: Config, state: TrainState, meter: "Meter",
              batches: EpochBatches, last: dict, record: ckpt.RunRecord, total_steps: int) -> dict:
    """End the run early with every trained step in a checkpoint; the same command resumes at the next step.

    Steps not yet reported are reported now (so the history has every step's loss); nothing is
    saved when the newest checkpoint already holds this step, or before the first step.
    """
    if meter.results:
        last = meter.report(state, batches, engine, guard, total_steps, session.device)
        state.reports.append(last)
    if state.step > 0 and state.saved_at != state.step:
        save_checkpoint(session, engine, guard, cfg, state, {**last, "stopped": True}, record, total_steps,
                        final=True)
    if session.rank == 0:
        log.info("stopped at step %d on the driver's request", state.step)
    return last


def resume(session, engine, run_uri: str | None, cfg: Config, record: ckpt.RunRecord) -> TrainState:
    """Restore the newest whole checkpoint into the engine; the fresh state when there is none.

    After a lost worker, or when the same command runs again with the same run name: the newer
    of Ray Train's registered checkpoint and the newest whole one in storage; ``ckpt.load``
    checks every file against the manifest and refuses a checkpoint of another setup (another
    base model, freeze plan, LoRA settings, tokenizer) unless ``checkpoint.resume: weights_only``,
    which loads the trained tensors alone and keeps the fresh optimizer, schedule and step 0.
    """
    path = pick_checkpoint(session.latest_checkpoint(), run_uri, cfg.storage, session.rank)
    if path is None:
        return TrainState()
    saved = ckpt.load(path, record.identity, cfg.checkpoint.resume, engine.sharded_layout)
    if saved["sharded_dir"]:
        engine.load_sharded(saved["sharded_dir"])
    else:
        engine.load_trainable(saved["tensors"])
    if saved["weights_only"]:
        return TrainState()
    engine.load_state(saved["train_state"])
    torch.set_rng_state(saved["rng"]["torch"])
    state = TrainState(step=saved["step"], epoch=saved["epoch"], consumed=PositionSet.from_json(saved["consumed"]),
                       resumed_from=saved["step"], saved_at=saved["step"],
                       reports=saved["reports"])
    if session.rank == 0:
        log.info("resumed from %s: step %d, epoch %d, %d row positions of this epoch already trained",
                 path, state.step, state.epoch, len(state.consumed))
    return state


def save_checkpoint(session, engine, guard: FreezeGuard, cfg: Config, state: TrainState, metrics: dict,
                    record: ckpt.RunRecord, total_steps: int, final: bool = False) -> None:
    """Check the frozen weights, write the checkpoint (collective) and report it to Ray Train."""
    guard.check_frozen()
    metrics["frozen_unchanged"] = True  # check_frozen raised otherwise
    # The data position: a compact set of row positions, not ids (a 10M-row epoch is a few bytes).
    train_state = {"epoch": state.epoch, "consumed": gather_positions(state.consumed).to_json(),
                   "rng": {"torch": torch.get_rng_state()}, "reports": state.reports}
    path = ckpt.save(engine, guard.plan, record, cfg.checkpoint, state.step, session.rank, train_state)
    state.reports = []
    # The last one (the end of the schedule, or a stop) uploads synchronously so the run ends with it in storage.
    final = final or state.step >= total_steps
    session.report(metrics, checkpoint_dir=path, async_upload=cfg.checkpoint.async_upload and not final)
    state.saved_at = state.step


class Meter:
    """Step results since the last report, turned into metrics summed over all ranks.

    Loss, throughput and grad norm are over the window since the last report; samples seen,
    rejects and keep-alive batches are totals since this process started.
    """

    def __init__(self, sources: list[str] | None = None, mixture: bool = False, preference: bool = False):
        self.sources = sources or [""]  # data.train's sources by name, in order (one without a mixture)
        self.mixture = mixture
        self.preference = preference  # DPO: rewards and log-probs, means over the window's pairs
        self.results: list[StepResult] = []
        self.since = time.perf_counter()
        self.keep_alive_batches = 0

    def add(self, result: StepResult) -> None:
        self.results.append(result)
        self.keep_alive_batches += result.keep_alive_batches

    def report(self, state: TrainState, batches: EpochBatches, engine, guard: FreezeGuard, total_steps: int,
               device: torch.device, rank_world: tuple[int, int] = (0, 1)) -> dict:
        """Metrics over all ranks (collective: every rank calls it at the same step)."""
        r = self.results
        local = [sum(x.loss_sum for x in r), sum(x.label_tokens for x in r), sum(x.samples for x in r),
                 sum(x.tokens for x in r), batches.seen, self.keep_alive_batches, sum(x.positions for x in r)]
        sources = range(len(self.sources))
        totals = _all_reduce(local + [batches.rejected[reason] for reason in REASONS]
                             + [batches.seen_by_source[s] for s in sources]
                             + [batches.rejected_by_source[s] for s in sources])
        by_source = totals[7 + len(REASONS):]
        elapsed = time.perf_counter() - self.since
        stats = r[-1].stats
        metrics = {
            "step": state.step, "epoch": state.epoch, "total_steps": total_steps,
            "loss": totals[0] / max(totals[1], 1.0), "lr": engine.current_lr(), "grad_norm": stats.grad_norm,
            "skipped_steps": stats.skipped_total,
            "samples_per_s": totals[2] / elapsed, "tokens_per_s": totals[3] / elapsed,
            "samples_seen": int(totals[4]), "vision_keep_alive_batches": int(totals[5]),
            # Tokens per optimizer step on all ranks, and the share of computed positions that were
            # real tokens (1.0 when packed): throughput per useful token is tokens_per_s.
            "tokens_per_step": totals[3] / max(len(r), 1), "useful_token_fraction": totals[3] / max(totals[6], 1.0),
            "rejected": {reason: int(v) for reason, v in zip(REASONS, totals[7:7 + len(REASONS)]) if v},
            "audit": guard.summary, "resumed_from_step": state.resumed_from, "memory_gb": memory_gb(device),
            # Per rank, a fingerprint of the row positions it has read, in order (EpochBatches.order_digest).
            "data_order": per_rank_digests(batches.order_digest(), *rank_world),
        }
        if self.mixture:  # a mixture: samples and rejects per source, by name
            metrics["samples_by_source"] = {n: int(v) for n, v in zip(self.sources, by_source)}
            metrics["rejected_by_source"] = {n: int(v) for n, v in zip(self.sources, by_source[len(self.sources):])}
        if self.preference:
            metrics.update(preference_metrics(r))
        self.results, self.since = [], time.perf_counter()
        return metrics


#: The sums ``preference.pair_loss`` gives per micro-batch, all-reduced in this order.
PAIR_SUMS = ("pairs", "chosen_tokens", "rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_correct",
             "logps_chosen", "logps_rejected")


def preference_metrics(results: list[StepResult]) -> dict[str, float]:
    """DPO's metrics over the window on all ranks (collective): per-pair means and the reward accuracy."""
    totals = _all_reduce([sum(x.metrics.get(k, 0.0) for x in results) for k in PAIR_SUMS])
    return mean_metrics(dict(zip(PAIR_SUMS, totals)))


def log_step(m: dict) -> None:
    log.info("step %d/%d epoch %d loss %.4f lr %.2e grad_norm %.3f %.1f samples/s %.0f tokens/s%s",
             m["step"], m["total_steps"], m["epoch"], m["loss"], m["lr"], m["grad_norm"], m["samples_per_s"],
             m["tokens_per_s"], f" rejected {m['rejected']}" if m["rejected"] else "")
    if "rewards_accuracy" in m:
        log.info("step %d rewards: accuracy %.3f margin %.4f chosen %.4f rejected %.4f", m["step"],
                 m["rewards_accuracy"], m["rewards_margin"], m["rewards_chosen"], m["rewards_rejected"])


def per_rank_digests(digest: str, rank: int, world: int) -> list[str]:
    """Every rank's 16-hex-digit digest, in rank order (collective). Sent as 32-bit halves in
    float64, which holds them exactly, through the same all-reduce as the other metrics."""
    halves = [0.0] * (2 * world)
    halves[2 * rank], halves[2 * rank + 1] = int(digest[:8], 16), int(digest[8:], 16)
    summed = _all_reduce(halves)
    return [f"{int(summed[2 * r]):08x}{int(summed[2 * r + 1]):08x}" for r in range(world)]


def _all_reduce(values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t.tolist()


__all__ = ["run", "train_loop_per_worker"]
