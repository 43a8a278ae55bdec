"""A 2-worker run with evaluation on, under FSDP2 and under ZeRO-3: what a person watching it gets.

One short run per engine (6 steps, eval and checkpoint every 3) is checked for everything issue 13
asks of a run: TensorBoard scalars (read back with TensorBoard's reader), curves.png rewritten at
each checkpoint, eval/step-N.html with one entry per eval sample (image embedded, answer not
empty), eval loss equal to a single-process evaluation of the same checkpoint, the same page from
that second evaluation, and eval loss falling on the colour task.
"""

from __future__ import annotations

import os
import re
import threading

import pytest

from omni_ray.config import load_config
from omni_ray.evaluate import evaluate_checkpoint
from omni_ray.launch.driver import train

pytestmark = pytest.mark.dist

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ENGINES = {"fsdp": {"name": "fsdp"}, "zero3": {"name": "deepspeed", "zero_stage": 3}}


def run_config(tiny_minicpmv, color_data, storage_path: str, engine: str):
    train_jsonl, eval_jsonl = color_data
    return load_config({
        "model": {"path": str(tiny_minicpmv), "dtype": "float32"},
        "data": {"train": str(train_jsonl), "eval": str(eval_jsonl), "model_max_length": 64, "max_bad_fraction": 0.0},
        "freeze": {"vision": "frozen", "projector": "full", "llm": "lora"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 6, "micro_batch_size": 4, "lr": 1e-2, "precision": "fp32", "log_every": 1,
                  "eval_every": 3},
        "eval": {"num_samples": 2, "max_new_tokens": 4},
        "strategy": ENGINES[engine],
        "checkpoint": {"every_n_steps": 3, "async_upload": False},
        "scaling": {"num_workers": 2, "max_failures": 0},
        "run": {"name": f"observe-{engine}", "storage_path": storage_path},
    })


class FileVersions:
    """Every distinct content a file had while a run ran (polled; the run rewrites it in place)."""

    def __init__(self, path: str):
        self.path, self.versions, self.stop = path, [], threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self):
        while not self.stop.wait(0.1):
            self._read()

    def _read(self):
        try:
            data = open(self.path, "rb").read()
        except FileNotFoundError:
            return
        if data and (not self.versions or self.versions[-1] != data):
            self.versions.append(data)

    def finish(self) -> list[bytes]:
        self.stop.set()
        self.thread.join()
        self._read()
        return self.versions


@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_run_with_eval_is_watchable_and_eval_is_exact(engine, ray_local, tiny_minicpmv, color_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = run_config(tiny_minicpmv, color_data, str(tmp_path / "runs"), engine)
    run_dir = os.path.join(cfg.run.storage_path, cfg.run.name)
    curves = FileVersions(os.path.join(run_dir, "curves.png"))
    result = train(cfg)
    versions = curves.finish()
    assert result.error is None and result.metrics["step"] == 6

    # TensorBoard: every step's loss, lr, grad norm, throughput and memory; eval loss at 3 and 6.
    acc = EventAccumulator(os.path.join(run_dir, "tensorboard")).Reload()
    for tag in ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/samples_per_s",
                "perf/memory_gb", "data/rejected_total"):
        assert [e.step for e in acc.Scalars(tag)] == list(range(1, 7)), tag
    evals = {e.step: e.value for e in acc.Scalars("eval/loss")}
    assert sorted(evals) == [3, 6]
    assert evals[6] < evals[3], f"eval loss did not fall: {evals}"
    assert acc.Scalars("params/trainable/projector")[0].value > 0

    # curves.png: a PNG, redrawn at the second checkpoint.
    assert len(versions) >= 2 and all(v.startswith(PNG_MAGIC) for v in versions)

    # The eval page: one entry per eval sample, image inline, an answer from the model.
    page = open(os.path.join(run_dir, "eval", "step-6.html")).read()
    entries = re.findall(r"<div class='sample'.*?</div></div>", page, flags=re.S) or page.split("class='sample'")[1:]
    assert len(entries) == cfg.eval.num_samples
    for entry in entries:
        assert "src='data:image/png;base64,iVBORw0KGgo" in entry
        assert re.search(r"<pre class='answer'>[^<]+</pre>", entry), entry[-300:]

    # The same checkpoint evaluated again, in one plain process: same loss, same page.
    single = evaluate_checkpoint(cfg, result.checkpoint.to_directory(), step=6)
    assert single["eval_loss"] == pytest.approx(evals[6], rel=1e-5)
    assert single["eval_loss"] == pytest.approx(result.metrics["eval_loss"], rel=1e-6)
    assert single["eval_tokens"] == result.metrics["eval_tokens"]
    assert single["page"] == page
