"""What a training report holds: every metric declared once, with everywhere it goes.

Rank 0 reports one dict per logged step (``train/loop.py``), with eval's metrics when eval ran
(``train/evaluation.py``); the driver's watcher adds the checkpoint it was saved with. Each key is
a :class:`Metric` in :data:`METRICS`, and every consumer reads this table instead of keeping its
own key list:

* ``logged_as``: the scalar's name in TensorBoard, MLflow and W&B (``observe/loggers.py``);
* ``history``: kept in ``metrics.jsonl`` (``observe/watch.py``), which ``omni-ray report`` and
  ``curves.png`` read back;
* ``final``: among ``omni-ray report``'s final metrics (``observe/report.py``);
* ``panel``: the ``curves.png`` panel it is drawn in (``observe/curves.py``);
* ``status``: how the console's progress display shows it (``observe/console.py``), in this order.

``tests/unit/test_metrics.py`` trains for real in one process (eval and a mixture on) and fails
on any reported key that is not declared here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Metric:
    key: str
    doc: str
    logged_as: str | None = None
    history: bool = True
    final: bool = False
    panel: str | None = None
    status: Callable[[Any], str | None] | None = None


def _by_name(label: str) -> Callable[[dict], str]:
    return lambda counts: f"{label} " + ", ".join(f"{name} {n}" for name, n in counts.items())


METRICS: dict[str, Metric] = {m.key: m for m in (
    Metric("step", "optimizer steps taken", final=True),
    Metric("total_steps", "optimizer steps in the schedule", final=True),
    Metric("epoch", "passes over the training data begun", logged_as="train/epoch", final=True),
    Metric("loss", "mean token loss over the logged steps, all ranks (DPO: mean pair loss)", logged_as="train/loss", final=True,
           panel="loss", status=lambda v: f"loss {v:.4f}"),
    Metric("lr", "learning rate of the first parameter group for the next step", logged_as="train/lr",
           final=True, panel="learning rate", status=lambda v: f"lr {v:.2e}"),
    Metric("grad_norm", "global L2 norm of the trainable gradients before clipping", logged_as="train/grad_norm",
           final=True),
    Metric("skipped_steps", "updates skipped for non-finite gradients since the run began",
           logged_as="train/skipped_steps", final=True),
    Metric("samples_per_s", "samples with labels per second, all ranks", logged_as="perf/samples_per_s", final=True),
    Metric("tokens_per_s", "real tokens (not padding) per second, all ranks", logged_as="perf/tokens_per_s",
           final=True, panel="tokens/s", status=lambda v: f"{v:.0f} tok/s"),
    Metric("tokens_per_step", "real tokens per optimizer step, all ranks", logged_as="perf/tokens_per_step"),
    Metric("useful_token_fraction", "real tokens / computed positions (1.0 when packed)",
           logged_as="perf/useful_token_fraction"),
    Metric("samples_seen", "training rows read so far, rejected ones included", final=True),
    Metric("vision_keep_alive_batches", "batches that ran the vision keep-alive row (no image in them)"),
    Metric("memory_gb", "peak accelerator memory (GB), or resident memory on a CPU worker",
           logged_as="perf/memory_gb", final=True),
    Metric("rejected", "rejected samples by reason, all ranks (logged as data/rejected/REASON)",
           status=lambda counts: f"rejected {sum((counts or {}).values())}"),
    Metric("samples_by_source", "rows read per mixture source (logged as data/samples/NAME)",
           status=lambda counts: _by_name("samples")(counts) if counts else None),
    Metric("rejected_by_source", "rejected rows per mixture source (logged as data/rejected_by_source/NAME)"),
    Metric("audit", "the freeze audit per group (kept once, in the first line of metrics.jsonl)", history=False),
    Metric("resumed_from_step", "the checkpoint step this run resumed from; None for a fresh start"),
    Metric("replayed", "reports re-sent after a resume (the driver may have lost them)", history=False),
    Metric("data_order", "per rank, a digest of the row positions read, in order"),
    Metric("frozen_unchanged", "frozen weights' fingerprint unchanged at the last save", final=True),
    Metric("stopped", "the run stopped on a signal at this step, after its checkpoint", history=False),
    # train.objective: dpo (omni_ray.train.preference: rewards are beta * (policy - reference) log-prob sums)
    Metric("rewards_chosen", "DPO: mean reward of the chosen answers over the logged steps' pairs, all ranks",
           logged_as="train/rewards_chosen", final=True, panel="rewards"),
    Metric("rewards_rejected", "DPO: mean reward of the rejected answers", logged_as="train/rewards_rejected",
           final=True, panel="rewards"),
    Metric("rewards_margin", "DPO: mean chosen minus rejected reward", logged_as="train/rewards_margin", final=True,
           panel="rewards"),
    Metric("rewards_accuracy", "DPO: fraction of pairs whose chosen reward is above the rejected one",
           logged_as="train/rewards_accuracy", final=True, panel="reward accuracy",
           status=lambda v: f"reward acc {v:.3f}"),
    Metric("logps_chosen", "DPO: mean summed log-prob of the chosen answers under the policy",
           logged_as="train/logps_chosen", final=True, panel="log-probs"),
    Metric("logps_rejected", "DPO: mean summed log-prob of the rejected answers under the policy",
           logged_as="train/logps_rejected", final=True, panel="log-probs"),
    Metric("eval_loss", "mean token loss over the whole eval set", logged_as="eval/loss", final=True,
           panel="loss", status=lambda v: f"eval_loss {v:.4f}"),
    Metric("eval_tokens", "label tokens in the eval set"),
    Metric("eval_seconds", "wall time of this evaluation (loss over the set and the answers)",
           logged_as="perf/eval_seconds"),
    Metric("eval_samples", "eval samples the loss covered"),
    Metric("eval_answers", "eval prompts answered (eval.num_samples, or fewer usable)"),
    Metric("eval_page", "the eval page of this step, relative to the run directory"),
    Metric("checkpoint", "the checkpoint saved at this step (added by the driver)"),
)}


def undeclared(report: dict) -> list[str]:
    """Keys of ``report`` that :data:`METRICS` does not declare."""
    return sorted(set(report) - set(METRICS))


def logged_as() -> dict[str, str]:
    return {m.key: m.logged_as for m in METRICS.values() if m.logged_as}


def history_keys() -> tuple[str, ...]:
    return tuple(m.key for m in METRICS.values() if m.history)


def final_keys() -> tuple[str, ...]:
    return tuple(m.key for m in METRICS.values() if m.final)


def panels() -> tuple[tuple[str, tuple[str, ...]], ...]:
    order: dict[str, list[str]] = {}
    for m in METRICS.values():
        if m.panel:
            order.setdefault(m.panel, []).append(m.key)
    return tuple((panel, tuple(keys)) for panel, keys in order.items())


def status_parts(report: dict) -> list[str]:
    """The console's pieces for one report, in declaration order (a metric absent from it is left out,
    except the reject count, which shows 0)."""
    parts = []
    for m in METRICS.values():
        if m.status is None or (m.key not in report and m.key != "rejected") or (
                m.key != "rejected" and report.get(m.key) is None):
            continue
        text = m.status(report.get(m.key))
        if text:
            parts.append(text)
    return parts


__all__ = ["METRICS", "Metric", "final_keys", "history_keys", "logged_as", "panels", "status_parts", "undeclared"]
