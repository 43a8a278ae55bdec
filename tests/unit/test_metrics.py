"""Every key a training report holds is declared once (``omni_ray.train.metrics``), and each
consumer (loggers, metrics.jsonl, ``omni-ray report``, curves, console) takes its keys from there.

The reports come from real training in this process (``loop.run`` + ``LocalSession``) with
evaluation and checkpoints on, then a resumed run (its replayed report).
"""

from __future__ import annotations

import pytest

from omni_ray.config import load_config
from omni_ray.models.tiny import build_tiny_minicpmv
from omni_ray.observe.console import status_text
from omni_ray.observe.loggers import scalars
from omni_ray.train import metrics
from omni_ray.train.loop import run
from omni_ray.train.session import ListIterator, LocalSession
from trainkit import processed_rows


@pytest.fixture(scope="module")
def reports(tmp_path_factory, color_data):
    tmp = tmp_path_factory.mktemp("metrics")
    model = build_tiny_minicpmv(tmp / "model")
    cfg = load_config({
        "model": {"path": str(model), "dtype": "float32"},
        "data": {"train": str(color_data[0]), "eval": str(color_data[1]), "model_max_length": 128},
        "eval": {"num_samples": 1, "max_new_tokens": 2},
        "train": {"max_steps": 4, "micro_batch_size": 2, "precision": "fp32", "eval_every": 2},
        "checkpoint": {"every_n_steps": 2},
        "run": {"name": "metrics", "storage_path": str(tmp / "runs")},
    })
    rows = processed_rows(cfg, color_data[0])[:16]
    first = LocalSession(datasets={"train": ListIterator(rows)})
    run(cfg, first, num_rows=len(rows))
    saved = next(r["checkpoint"] for r in reversed(first.reports) if r.get("checkpoint"))
    longer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 6})})
    resumed = LocalSession(datasets={"train": ListIterator(rows)}, checkpoint_dir=saved)
    run(longer, resumed, num_rows=len(rows))
    return first.reports + resumed.reports


def test_every_reported_key_is_declared(reports):
    assert any("eval_loss" in r for r in reports) and any("replayed" in r for r in reports)
    for report in reports:
        assert metrics.undeclared(report) == [], f"declare these in omni_ray/train/metrics.py: {metrics.undeclared(report)}"


def test_consumers_read_the_declaration(reports):
    last = next(r for r in reversed(reports) if "eval_loss" in r)
    logged = scalars(last)
    for key, name in metrics.logged_as().items():
        if isinstance(last.get(key), (int, float)) and not isinstance(last.get(key), bool):
            assert logged[name] == pytest.approx(float(last[key])), key
    assert status_text(last).startswith(f"loss {last['loss']:.4f} lr ")
    assert f"eval_loss {last['eval_loss']:.4f}" in status_text(last)
    assert [k for k in metrics.final_keys() if k not in metrics.history_keys()] == [], \
        "omni-ray report reads metrics.jsonl: a final metric must be kept there"
    assert {k for _, keys in metrics.panels() for k in keys} <= set(metrics.history_keys())


def test_an_undeclared_key_is_named():
    assert metrics.undeclared({"loss": 1.0, "tokens_per_joule": 3.0}) == ["tokens_per_joule"]
