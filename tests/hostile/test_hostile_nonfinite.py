"""A diverging run never ends as a success and never saves NaN/inf weights (issue 19, item 9).

Each case trains the tiny MiniCPM-V 4.6 through the real loop in this process (``LocalSession``,
world size 1) with a learning rate that blows the weights up:

* fp32 at lr 1e30 (FSDP2 and DeepSpeed): step 1 applies, the weights are then ~1e30 and every
  later loss is NaN; those steps are skipped and counted, and past ``train.max_nonfinite_steps``
  the run stops naming the step. Every checkpoint written before is finite.
* NaN in the trained weights of a real engine (no lr gets there through the loop now): the save
  is refused.
* fp16 at a huge lr (FSDP2's GradScaler, DeepSpeed's loss scaler): every step overflows; with
  the default limit the run ends without one applied step, and that final save is refused.

Run: python -m pytest -q tests/hostile/test_hostile_nonfinite.py
"""

from __future__ import annotations

import math

import pytest
import torch

from local_training import write_dataset
from omni_ray.config import load_config
from omni_ray.models.tiny import build_tiny_minicpmv
from omni_ray.train import checkpoint as ckpt
from omni_ray.train.guard import NonFiniteError
from omni_ray.train.loop import run
from omni_ray.train.session import ListIterator, LocalSession
from trainkit import processed_rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nonfinite")
    model = build_tiny_minicpmv(tmp / "model")
    data = write_dataset(tmp)
    rows = processed_rows(_config(model, data, tmp, "fsdp", "fp32", 1e-3), data)
    return model, data, tmp, rows


def _config(model, data, tmp, strategy: str, precision: str, lr: float, **train):
    return load_config({
        "model": {"path": str(model), "dtype": "float32"},
        "data": {"train": str(data), "model_max_length": 512, "shuffle": False},
        "freeze": {"vision": "frozen", "projector": "full", "llm": "full"},
        "train": {"max_steps": 6, "micro_batch_size": 2, "lr": lr, "precision": precision, **train},
        "strategy": {"name": strategy, "zero_stage": 2},
        "checkpoint": {"every_n_steps": 1},
        "run": {"name": "nonfinite", "storage_path": str(tmp / "runs")},
    })


def _train(cfg, rows) -> tuple[LocalSession, Exception | None]:
    session = LocalSession(datasets={"train": ListIterator(rows)})
    try:
        run(cfg, session, num_rows=len(rows))
    except NonFiniteError as err:
        return session, err
    return session, None


def _saved(session: LocalSession) -> list[dict]:
    return [r for r in session.reports if r.get("checkpoint")]


def _all_finite(checkpoint_dir: str) -> bool:
    tensors = ckpt.load_tensors(checkpoint_dir)
    return bool(tensors) and all(bool(torch.isfinite(t).all()) for t in tensors.values())


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_fp32_divergence_stops_naming_the_step(setup, strategy):
    model, data, tmp, rows = setup
    session, err = _train(_config(model, data, tmp, strategy, "fp32", 1e30, max_nonfinite_steps=2), rows)
    # Step 1 applies (finite gradients); steps 2, 3, 4 have NaN losses; the third in a row is past the limit.
    assert err is not None, [(r.get("step"), r.get("loss")) for r in session.reports]
    assert "stopped at step 4: 3 optimizer steps in a row (steps 2-4)" in str(err)
    assert "train.max_nonfinite_steps" in str(err)
    steps = [r for r in session.reports if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert math.isfinite(steps[0]["loss"]) and not math.isfinite(steps[1]["loss"])
    assert [r["skipped_steps"] for r in steps] == [0, 1, 2]  # skipped and counted
    saved = _saved(session)
    assert [r["step"] for r in saved] == [1, 2, 3]
    assert all(_all_finite(r["checkpoint"]) for r in saved)


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_nan_weights_are_never_saved(setup, strategy, monkeypatch):
    """The backstop behind the skips: a trained tensor turned NaN (by a bug, a bad kernel) refuses the save.

    No lr reaches it through the loop any more (a NaN step is skipped), so the test trains one
    real step, writes a NaN into this rank's master weights of the real engine, and saves again.
    """
    from omni_ray.train import loop
    from omni_ray.train.guard import check_finite_weights

    model, data, tmp, rows = setup
    engines, build = [], loop.build_strategy
    monkeypatch.setattr(loop, "build_strategy", lambda *a, **k: engines.append(build(*a, **k)) or engines[-1])
    cfg = _config(model, data, tmp, strategy, "fp32", 1e-3, max_steps=1)
    session, err = _train(cfg, rows)
    assert err is None and _all_finite(_saved(session)[-1]["checkpoint"])
    engine = engines[-1]
    with torch.no_grad():
        engine.local_trained_tensors()[0].view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteError, match="step 1: trained weights hold NaN or inf"):
        check_finite_weights(engine, 1)
    # The checkpoint writer checks first, before it makes a directory or gathers anything.
    with pytest.raises(NonFiniteError, match="step 2: trained weights hold NaN or inf"):
        ckpt.save(engine, None, None, cfg.checkpoint, 2, 0, {})


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_fp16_run_that_never_applies_a_step_fails(setup, strategy):
    model, data, tmp, rows = setup
    cfg = _config(model, data, tmp, strategy, "fp16", 1e30, max_steps=3)
    cfg.checkpoint.every_n_steps = None
    session, err = _train(cfg, rows)
    assert err is not None, [(r.get("step"), r.get("skipped_steps")) for r in session.reports]
    assert "all 3 optimizer steps since step 1 were skipped for non-finite gradients" in str(err)
    assert [r["skipped_steps"] for r in session.reports if "loss" in r] == [1, 2]  # step 3 ends in the refusal
    assert _saved(session) == []


def test_fp16_overflow_streak_past_the_limit_stops(setup):
    model, data, tmp, rows = setup
    session, err = _train(_config(model, data, tmp, "deepspeed", "fp16", 1e30, max_nonfinite_steps=1), rows)
    assert err is not None and "stopped at step 2: 2 optimizer steps in a row (steps 1-2)" in str(err)
    assert all(_all_finite(r["checkpoint"]) for r in _saved(session))
