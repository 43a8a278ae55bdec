"""``omni-ray report RUN``: what a finished (or running) run did, from its directory alone.

Reads only files in the run directory (local or s3://): ``metrics.jsonl`` (written by the
driver), the checkpoints' manifests and ``config.yaml``, ``eval/`` and ``curves.png``. No model
is loaded and no Ray is started.
"""

from __future__ import annotations

import errno
import json

import yaml

from omni_ray import storage as st
from omni_ray.observe.watch import CURVES, HISTORY
from omni_ray.observe.loggers import TB_DIR
from omni_ray.train.metrics import final_keys



def _history(run_uri: str, storage) -> list[dict]:
    uri = st.join(run_uri, HISTORY)
    if not st.exists(uri, storage):
        return []
    return [json.loads(line) for line in st.read_bytes(uri, storage).decode().splitlines() if line.strip()]


def _checkpoints(run_uri: str, files: list[str], storage) -> list[dict]:
    found = []
    for rel in files:
        parts = rel.split("/")
        if len(parts) == 2 and parts[0].startswith("checkpoint_") and parts[1] == "manifest.json":
            uri = st.join(run_uri, parts[0])
            manifest = json.loads(st.read_bytes(st.join(uri, "manifest.json"), storage))
            found.append({"step": int(manifest["step"]), "uri": uri})
    return sorted(found, key=lambda c: c["step"])


def _best(checkpoints: list[dict], history: list[dict]) -> dict | None:
    """The kept checkpoint with the lowest eval loss (train loss when the run had no eval set)."""
    by_step = {int(r["step"]): r for r in history}
    scored = []
    for c in checkpoints:
        record = by_step.get(c["step"], {})
        key = "eval_loss" if record.get("eval_loss") is not None else "loss"
        if record.get(key) is not None:
            scored.append((key != "eval_loss", record[key], {**c, key: record[key]}))
    return min(scored, key=lambda s: (s[0], s[1]))[2] if scored else None


def build_report(run_uri: str, storage=None) -> dict:
    files = st.list_files(run_uri, storage) if st.exists(run_uri, storage) else []
    if not files:
        raise FileNotFoundError(errno.ENOENT, "no run there; give run.storage_path/run.name of a run "
                                "(e.g. ~/omni_ray_runs/my-run or s3://bucket/runs/my-run)", run_uri)
    history = _history(run_uri, storage)
    checkpoints = _checkpoints(run_uri, files, storage)
    config = None
    if checkpoints:
        config = yaml.safe_load(st.read_bytes(st.join(checkpoints[-1]["uri"], "config.yaml"), storage))
    audit = next((r["audit"] for r in history if r.get("audit")), {})
    freeze = {}
    for group, counts in audit.items():
        mode = ((config or {}).get("freeze") or {}).get(group) or {}
        freeze[group] = {"mode": mode.get("mode") if isinstance(mode, dict) else mode, **counts}
    last = history[-1] if history else {}
    pages = sorted((f for f in files if f.startswith("eval/") and f.endswith(".html")),
                   key=lambda f: int(f.rsplit("-", 1)[-1].split(".")[0]))
    return {
        "run": run_uri,
        "config": config,
        "freeze": freeze,
        "checkpoints": checkpoints,
        "last_checkpoint": checkpoints[-1] if checkpoints else None,
        "best_checkpoint": _best(checkpoints, history),
        "final_metrics": {k: last[k] for k in final_keys() if k in last},
        "eval_losses": {int(r["step"]): r["eval_loss"] for r in history if r.get("eval_loss") is not None},
        "rejected": last.get("rejected", {}),
        "samples_by_source": last.get("samples_by_source", {}),
        "rejected_by_source": last.get("rejected_by_source", {}),
        "curves": st.join(run_uri, CURVES) if CURVES in files else None,
        "tensorboard": st.join(run_uri, TB_DIR) if any(f.startswith(TB_DIR + "/") for f in files) else None,
        "eval_pages": [st.join(run_uri, p) for p in pages],
    }


def format_report(report: dict) -> str:
    lines = [f"run: {report['run']}"]
    cfg = report["config"] or {}
    if cfg:
        model, strategy, scaling = cfg.get("model", {}), cfg.get("strategy", {}), cfg.get("scaling", {})
        engine = strategy.get("name", "?") + (f" ZeRO-{strategy.get('zero_stage')}" if strategy.get("name") == "deepspeed" else "")
        lines.append(f"model: {model.get('path')}  strategy: {engine}, {scaling.get('num_workers')} workers, "
                     f"precision {cfg.get('train', {}).get('precision')}")
        lines.append(f"data: train {cfg.get('data', {}).get('train')}  eval {cfg.get('data', {}).get('eval')}")
    if report["freeze"]:
        lines.append("freeze plan (trainable parameters):")
        lines += [f"  {g:<12} {str(r.get('mode') or ''):<7} {r.get('trainable', 0):>14,}" for g, r in report["freeze"].items()]
    final = report["final_metrics"]
    if final:
        lines.append("final: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in final.items()))
    if report["eval_losses"]:
        lines.append("eval loss by step: " + ", ".join(f"{s}: {v:.4f}" for s, v in sorted(report["eval_losses"].items())))
    rejected = report["rejected"]
    lines.append("rejected samples: " + (", ".join(f"{k} {v}" for k, v in rejected.items()) if rejected else "none"))
    by_source, rejected_by_source = report.get("samples_by_source") or {}, report.get("rejected_by_source") or {}
    if by_source:  # a mixture
        lines.append("samples by source: " + ", ".join(f"{name} {n} (rejected {rejected_by_source.get(name, 0)})"
                                                       for name, n in by_source.items()))
    for label in ("last_checkpoint", "best_checkpoint"):
        c = report[label]
        if c:
            extra = "".join(f", {k} {c[k]:.4f}" for k in ("eval_loss", "loss") if k in c)
            lines.append(f"{label.replace('_', ' ')}: step {c['step']}{extra}  {c['uri']}")
    lines.append(f"curves: {report['curves'] or '(none yet)'}")
    if report["tensorboard"]:
        lines.append(f"tensorboard: tensorboard --logdir {report['tensorboard']}")
    lines.append("eval pages: " + (", ".join(report["eval_pages"]) if report["eval_pages"] else "(none)"))
    return "\n".join(lines)
