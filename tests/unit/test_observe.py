"""The run's console, loggers, curves, eval page and report, fed with reports as a run sends them.

No Ray, no servers: RunWatcher.handle gets the dicts Ray Train's callback would forward; the
TensorBoard files are read back with TensorBoard's own reader and MLflow with a local file store.
"""

from __future__ import annotations

import io
import json
import os

import pytest

from omni_ray.config import ConfigError
from omni_ray.observe.console import Progress, is_noise
from omni_ray.train.evaluation import render_page
from omni_ray.observe.loggers import TensorBoardLogger, check_loggers, scalars
from omni_ray.observe.report import build_report, format_report
from omni_ray.observe.watch import RunWatcher

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def report(step: int, total: int = 8, checkpoint: str | None = None, **extra) -> dict:
    return {"step": step, "total_steps": total, "epoch": 0, "loss": 5.0 / step, "lr": 1e-3 * step,
            "grad_norm": 1.5, "tokens_per_s": 100.0 + step, "samples_per_s": 4.0, "skipped_steps": 0,
            "memory_gb": 0.5, "rejected": {"too_long": 1} if step > 2 else {},
            "audit": {"llm": {"planned": 10, "trainable": 10}, "vision": {"planned": 0, "trainable": 0}},
            "checkpoint": checkpoint, **extra}


def tb_events(logdir: str) -> list[tuple[str, int, float]]:
    """Every (tag, step, value) in every event file of a folder, with TensorBoard's own loader."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    out = []
    for name in sorted(os.listdir(logdir)):
        for event in EventFileLoader(os.path.join(logdir, name)).Load():
            for v in event.summary.value:
                value = v.simple_value if v.HasField("simple_value") else float(tensor_util.make_ndarray(v.tensor))
                out.append((v.tag, event.step, value))
    return out


RAY_NOISE = [
    "Reporting training result 2: TrainingReport(checkpoint=None, metrics={'step': 10, 'loss': 2.06})",
    "Failed to query Ray Train Controller actor state. State API may be temporarily unavailable. Continuing to monitor.",
    "[2026-11-28 16:58:03,505 E 7743 7801] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: "
    "'ef72' has constructor arguments in the object store and max_restarts > 0. If the arguments",
    "[omni-ray] step 5/10 epoch 0 loss 4.2798 lr 1.00e-02 grad_norm 5.771 5.1 samples/s 164 tokens/s",
    "Starting execution of Dataset train_0355_0. Full logs are in /tmp/ray/session/logs/ray-data",
    "[transformers] `causal_conv1d_fn` is falling back to its reference PyTorch implementation because ...",
    "  warnings.warn(",
    "\rLoading weights:   0%|          | 0/115 [00:00<?, ?it/s]\rLoading weights: 100%|##| 115/115",
]
KEPT = [
    "freeze audit: group            planned    trainable  grad on frozen  opt state on frozen",
    "Traceback (most recent call last):",
    "RuntimeError: data.max_bad_fraction: 5.0% of samples rejected",
    "[omni-ray] resumed from /tmp/ckpt: step 4, epoch 0",
]


def test_known_ray_noise_is_filtered_and_everything_else_kept():
    assert [line for line in RAY_NOISE if not is_noise(line)] == []
    assert [line for line in KEPT if is_noise(line)] == []


def test_plain_progress_lines_are_periodic_and_show_eta_and_rejects():
    out = io.StringIO()
    progress = Progress(stream=out, tty=False, every_s=3600)
    for step in range(1, 9):
        progress.update(report(step, eval_loss=0.5 if step == 4 else None))
    lines = out.getvalue().splitlines()
    # The first report, the one with an eval result and the last; none in between (rate-limited).
    assert [line.split()[2] for line in lines] == ["1/8", "4/8", "8/8"], lines
    assert "eval_loss 0.5000" in lines[1] and "ETA" in lines[1] and "rejected 1" in lines[1]
    assert "\r" not in out.getvalue()


def test_terminal_progress_is_one_bar():
    out = io.StringIO()
    progress = Progress(stream=out, tty=True)
    for step in range(3, 9):  # a resumed run starts mid-way
        progress.update(report(step))
    assert progress.bar.n == 8 and progress.bar.total == 8
    progress.close()
    assert "8/8" in out.getvalue() and "loss 0.6250" in out.getvalue()


def test_scalars_and_missing_logger_library():
    values = scalars(report(4))
    assert values["train/loss"] == 1.25 and values["data/rejected/too_long"] == 1.0
    assert "train/epoch" in values and not any("audit" in k for k in values)
    check_loggers(["tensorboard"])
    with pytest.raises(ConfigError, match=r"run\.loggers: wandb needs the wandb package.*pip install"):
        check_loggers(["wandb"])


def test_a_driver_restarted_within_the_same_second_keeps_the_first_event_file(tmp_path):
    # tensorboardX names event files by the second; the second writer used to overwrite the first.
    first = TensorBoardLogger(str(tmp_path))
    first.log({"train/loss": 1.0}, step=1)
    first.close()
    second = TensorBoardLogger(str(tmp_path))
    second.log({"train/loss": 0.5}, step=2)
    second.close()
    assert first.files() != second.files()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(str(tmp_path), "tensorboard")).Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]


def test_watcher_writes_tensorboard_curves_history_and_resumes_without_duplicates(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind a flag
    run = str(tmp_path / "runs" / "r1")
    progress = Progress(stream=io.StringIO(), tty=False)
    watcher = RunWatcher(run, ["tensorboard", "mlflow"], progress=progress, config={"train": {"lr": 1e-3}})
    curves = []
    for step in range(1, 7):
        watcher.handle(report(step, checkpoint=f"{run}/ckpt{step}" if step % 3 == 0 else None,
                              eval_loss=3.0 / step if step % 3 == 0 else None))
        if step % 3 == 0:
            curves.append(open(os.path.join(run, "curves.png"), "rb").read())
    watcher.close()  # the driver died after step 6; the run resumes from the checkpoint at step 3
    assert all(c.startswith(PNG_MAGIC) for c in curves) and curves[0] != curves[1]

    again = RunWatcher(run, ["tensorboard"], progress=Progress(stream=io.StringIO(), tty=False))
    # The resumed run first re-sends what its checkpoint (step 3) had reported, then steps 4..6
    # come again: each is logged once only.
    again.handle({"step": 3, "resumed_from_step": 3, "replayed": [report(2), report(3)]})
    for step in range(4, 9):
        again.handle(report(step, resumed_from_step=3))
    again.close()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run, "tensorboard")).Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 9))
    assert [e.step for e in acc.Scalars("eval/loss")] == [3, 6]
    assert acc.Scalars("params/trainable/llm")[0].value == 10
    events = [(tag, step) for tag, step, _ in tb_events(os.path.join(run, "tensorboard"))]
    assert len(events) == len(set(events)), "a step was logged twice"
    assert len(os.listdir(os.path.join(run, "tensorboard"))) == 2  # one event file per driver process
    history = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in history] == list(range(1, 9))

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"file://{tmp_path / 'mlruns'}")
    (run_info,) = client.search_runs([client.get_experiment_by_name("omni-ray").experiment_id])
    assert [m.step for m in client.get_metric_history(run_info.info.run_id, "train/loss")] == list(range(1, 7))
    assert run_info.data.params["train.lr"] == "0.001"


def test_eval_page_embeds_each_image_and_escapes_text():
    answers = [{"id": f"s{i}", "question": "user: <image>\nWhat color?", "reference": "red", "answer": "r<e>d",
                "images_png": [PNG_MAGIC + bytes([i])]} for i in range(3)]
    page = render_page(answers, step=4, eval_loss=1.25)
    assert page == render_page(answers, step=4, eval_loss=1.25)
    assert page.count("class='sample'") == 3 and page.count("src='data:image/png;base64,") == 3
    assert "r&lt;e&gt;d" in page and "&lt;image&gt;" in page and "1.2500" in page


def test_report_names_checkpoints_metrics_rejects_and_files(tmp_path):
    run = str(tmp_path / "r2")
    watcher = RunWatcher(run, ["tensorboard"], progress=Progress(stream=io.StringIO(), tty=False))
    for step in (2, 4):
        ckpt = os.path.join(run, f"checkpoint_{step}")
        os.makedirs(ckpt)
        open(os.path.join(ckpt, "manifest.json"), "w").write(json.dumps({"step": step}))
        open(os.path.join(ckpt, "config.yaml"), "w").write("model: {path: m}\nfreeze: {llm: {mode: lora}}\n")
        watcher.handle(report(step, checkpoint=ckpt, eval_loss={2: 0.5, 4: 0.7}[step],
                              eval_page=f"eval/step-{step}.html"))
        os.makedirs(os.path.join(run, "eval"), exist_ok=True)
        open(os.path.join(run, "eval", f"step-{step}.html"), "w").write("<html></html>")
    watcher.close()
    rep = build_report(run)
    assert rep["last_checkpoint"]["step"] == 4 and rep["best_checkpoint"]["step"] == 2
    assert rep["rejected"] == {"too_long": 1} and rep["final_metrics"]["step"] == 4
    assert rep["freeze"]["llm"] == {"mode": "lora", "planned": 10, "trainable": 10}
    assert rep["eval_pages"][-1].endswith("eval/step-4.html") and rep["curves"].endswith("curves.png")
    text = format_report(rep)
    assert "best checkpoint: step 2, eval_loss 0.5000" in text and "too_long 1" in text
    with pytest.raises(FileNotFoundError, match="no run there"):
        build_report(str(tmp_path / "nothing"))


def test_worker_log_filter_wraps_rays_printer_and_verbose_restores_it():
    from ray._private import worker as ray_worker

    from omni_ray.observe.console import quiet_worker_logs

    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    saved = list(dispatcher.handlers)  # a Ray started earlier in this process keeps its printer
    printed: list[list[str]] = []
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", lambda data: printed.append(data["lines"]))  # Ray's printer
    try:
        assert quiet_worker_logs(verbose=False)
        dispatcher.emit({"lines": RAY_NOISE + KEPT, "pid": 1, "is_err": False})
        dispatcher.emit({"lines": RAY_NOISE[:2], "pid": 1, "is_err": False})  # nothing left: nothing printed
        assert printed == [KEPT]
        assert not quiet_worker_logs(verbose=True)  # --verbose: Ray's own printer, every line
        dispatcher.emit({"lines": RAY_NOISE, "pid": 1, "is_err": False})
        assert printed[-1] == RAY_NOISE
        assert quiet_worker_logs(verbose=False) and quiet_worker_logs(verbose=False)  # twice: wraps once
        dispatcher.emit({"lines": KEPT, "pid": 1, "is_err": False})
        assert printed[-1] == KEPT and len(dispatcher.handlers) == 1
    finally:
        dispatcher.handlers = saved


def test_report_command_prints_the_run_and_fails_in_one_line_without_one(tmp_path, capsys):
    from omni_ray.launch.cli import main

    run = str(tmp_path / "r3")
    watcher = RunWatcher(run, ["tensorboard"], progress=Progress(stream=io.StringIO(), tty=False))
    watcher.handle(report(1))
    watcher.close()
    assert main(["report", run]) == 0
    out = capsys.readouterr().out
    assert f"run: {run}" in out and "curves: " in out and "tensorboard --logdir" in out
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no run there" in err[0]


def test_eval_is_due_every_n_steps_and_at_the_end_once():
    from omni_ray.config import EvalConfig
    from omni_ray.train.evaluation import Evaluator

    ev = Evaluator(evalset=None, eval_cfg=EvalConfig(), every=4, batch_size=2, run_uri=None, storage=None)
    assert [s for s in range(1, 11) if ev.due(s, 10)] == [4, 8, 10]
    ev.done_at = 10
    assert not ev.due(10, 10)  # the end of a run that ran out of epochs: not evaluated twice
    never = Evaluator(evalset=None, eval_cfg=EvalConfig(), every=None, batch_size=2, run_uri=None, storage=None)
    assert [s for s in range(1, 11) if never.due(s, 10)] == [10]
