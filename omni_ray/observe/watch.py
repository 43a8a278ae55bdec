"""The driver's view of a run: each report of rank 0 → progress, loggers, history, curves, storage.

Ray Train calls ``after_report`` of a ``UserCallback`` in its controller actor, not in the driver,
so ``ReportForwarder`` only forwards rank 0's metrics to a small inbox actor, and a thread in the
driver drains it into ``RunWatcher.handle``. The driver then writes, under the run directory
(``run.storage_path/run.name``, beside the checkpoints):

    metrics.jsonl      one line per report: the history that curves, `omni-ray report` and a
                       resumed run read
    tensorboard/       event files (one per driver process; TensorBoard reads the folder)
    curves.png         rewritten at each checkpoint and at the end

On S3 they are written to a local folder and uploaded at each checkpoint and at the end.
A resumed run reads metrics.jsonl back and drops reports of steps it has already logged (the
steps between the checkpoint it resumed from and the failure), so every series keeps one value
per step; a checkpoint keeps the reports made since the one before it and a resumed run sends
them again first, so steps whose reports died with a worker (Ray Train collects reports by
polling the workers) are not missing either.

    watcher = RunWatcher(run_uri, cfg.run.loggers, cfg.storage, config=cfg.model_dump(mode="json"))
    with watcher:
        result = TorchTrainer(..., run_config=RunConfig(callbacks=[watcher.callback()], ...)).fit()
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time

import ray.train

from omni_ray import storage as st
from omni_ray.observe.console import Progress, quiet_worker_logs
from omni_ray.observe.curves import render_curves
from omni_ray.observe.loggers import TB_DIR, open_loggers, scalars, trainable_counts
from omni_ray.train.metrics import history_keys

logger = logging.getLogger(__name__)

HISTORY = "metrics.jsonl"
CURVES = "curves.png"


class _Inbox:
    """A tiny actor between Ray Train's controller and the driver (calls run in order).

    Reports go one way (controller -> driver); a stop request the other (driver -> rank 0 of
    the workers, which polls ``stop_requested`` at each step boundary: ``RaySession``).
    """

    def __init__(self):
        self.items: list[dict] = []
        self.stop = False

    def put(self, item: dict) -> None:
        self.items.append(item)

    def drain(self) -> list[dict]:
        items, self.items = self.items, []
        return items

    def request_stop(self) -> None:
        self.stop = True

    def stop_requested(self) -> bool:
        return self.stop


class ReportForwarder(ray.train.UserCallback):
    """Runs in Ray Train's controller: sends rank 0's metrics of each report to the driver."""

    def __init__(self, inbox):
        self.inbox = inbox

    def after_report(self, run_context, metrics, checkpoint):
        item = dict(metrics[0]) if metrics else {}
        item["checkpoint"] = checkpoint.path if checkpoint is not None else None
        self.inbox.put.remote(item)  # fire and forget: the controller never waits on the driver


class RunWatcher:
    def __init__(self, run_uri: str, loggers: list[str], storage=None, config: dict | None = None,
                 verbose: bool = False, progress: Progress | None = None, poll_s: float = 0.5):
        self.run_uri, self.storage, self.verbose, self.poll_s = run_uri, storage, verbose, poll_s
        self.remote = st.is_remote(run_uri)
        self.local_dir = tempfile.mkdtemp(prefix="omni_ray_run_") if self.remote else run_uri
        os.makedirs(self.local_dir, exist_ok=True)
        self.history = self._read_history()
        self.last_step = max((int(r["step"]) for r in self.history), default=0)
        self.loggers = open_loggers(loggers, self.local_dir, os.path.basename(run_uri.rstrip("/")), config or {})
        self.progress = progress or Progress()
        self._inbox = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen_resume = None

    # --- history ------------------------------------------------------------------------------
    def _read_history(self) -> list[dict]:
        uri = st.join(self.run_uri, HISTORY)
        if not st.exists(uri, self.storage):
            return []
        text = st.read_bytes(uri, self.storage).decode()
        if self.remote:  # the local copy grows from here and is uploaded whole
            with open(os.path.join(self.local_dir, HISTORY), "w") as f:
                f.write(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    # --- one report ---------------------------------------------------------------------------
    def handle(self, report: dict) -> None:
        if "replayed" in report:  # a resumed run's first report: what its checkpoint had reported so far
            for earlier in report["replayed"]:
                self.handle({**earlier, "resumed_from_step": report["resumed_from_step"]})
            return
        step = int(report.get("step", 0))
        if report.get("resumed_from_step") is not None and report["resumed_from_step"] != self._seen_resume:
            self._seen_resume = report["resumed_from_step"]
            self.progress.write(f"[omni-ray] resumed from the checkpoint at step {self._seen_resume}")
        if step <= self.last_step:  # re-run after a resume: this step is already in every series
            if report.get("checkpoint") and self.history and step == int(self.history[-1].get("step", -1)):
                self._checkpoint_of_last(report["checkpoint"])
            return
        self.progress.update(report)
        if not self.history:
            self.loggers.log(trainable_counts(report), step)
        self.loggers.log(scalars(report), step)
        record = {k: report[k] for k in history_keys() if k in report}
        record["time"] = round(time.time(), 3)
        if not self.history and report.get("audit"):
            record["audit"] = report["audit"]
        self.history.append(record)
        with open(os.path.join(self.local_dir, HISTORY), "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
        self.last_step = step
        # At a checkpoint, or at the one a resumed run re-announces (its own report may have been lost).
        if report.get("checkpoint") or step == report.get("resumed_from_step"):
            self.publish()

    def _checkpoint_of_last(self, checkpoint: str) -> None:
        """A checkpoint of the step logged last (a clean stop saves after that step's report): noted on
        its line, so metrics.jsonl keeps one line per step and still says where each checkpoint is."""
        if self.history[-1].get("checkpoint") == checkpoint:
            return
        self.history[-1]["checkpoint"] = checkpoint
        with open(os.path.join(self.local_dir, HISTORY), "w") as f:
            f.writelines(json.dumps(record, default=str) + "\n" for record in self.history)
        self.publish()

    def publish(self) -> None:
        """Flush loggers, redraw curves.png, and upload the run's files when the run is on S3."""
        self.loggers.flush()
        name = os.path.basename(self.run_uri.rstrip("/"))
        with open(os.path.join(self.local_dir, CURVES), "wb") as f:
            f.write(render_curves(self.history, title=name))
        if not self.remote:
            return
        paths = [os.path.join(self.local_dir, HISTORY), os.path.join(self.local_dir, CURVES), *self.loggers.files()]
        for path in paths:
            if os.path.exists(path):
                rel = os.path.relpath(path, self.local_dir)
                with open(path, "rb") as f:
                    st.write_bytes(st.join(self.run_uri, *rel.split(os.sep)), f.read(), self.storage)

    # --- wiring to Ray Train ------------------------------------------------------------------
    def callback(self) -> ReportForwarder:
        """The UserCallback for RunConfig(callbacks=[...]); starts the inbox actor (Ray must be up)."""
        import ray

        if self._inbox is None:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            # On the driver's node: a zero-CPU actor may otherwise land on a spot node, and the
            # run's reports would die with it (a lost node ended a finished run with ActorDiedError).
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            self._inbox = ray.remote(num_cpus=0)(_Inbox).options(scheduling_strategy=here).remote()
        return ReportForwarder(self._inbox)

    @property
    def inbox(self):
        """The inbox actor (after ``callback()``): workers poll it for a stop request."""
        return self._inbox

    def request_stop(self) -> None:
        """Ask the workers to checkpoint at their next step boundary and end the run."""
        if self._inbox is not None:
            self._inbox.request_stop.remote()

    def saved_and_reported(self) -> tuple[int, int]:
        """(step of the newest checkpoint reported, newest step reported); 0 when none."""
        saved = max((int(r["step"]) for r in self.history if r.get("checkpoint")), default=0)
        return saved, self.last_step

    def _drain(self) -> None:
        import ray

        for item in ray.get(self._inbox.drain.remote()):
            try:
                self.handle(item)
            except Exception:  # a logger failing must not end a training run; say so loudly
                logger.exception("could not record the report of step %s", item.get("step"))

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._drain()

    def __enter__(self) -> "RunWatcher":
        quiet_worker_logs(self.verbose, around=self.progress.around_output)
        if self._inbox is not None:
            self._thread = threading.Thread(target=self._poll, name="omni-ray-watcher", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        import ray

        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._inbox is not None:
            self._drain()
            ray.kill(self._inbox)
            self._inbox = None
        self.progress.close()
        try:
            self.publish()
        finally:
            self.loggers.close()
        logger.info("curves: %s; TensorBoard: tensorboard --logdir %s", st.join(self.run_uri, CURVES),
                    st.join(self.run_uri, TB_DIR))

    def where(self) -> dict:
        """Where a person finds this run's pictures and pages."""
        pages = sorted({r["eval_page"] for r in self.history if r.get("eval_page")},
                       key=lambda p: int(p.rsplit("-", 1)[-1].split(".")[0]))
        return {"curves": st.join(self.run_uri, CURVES), "tensorboard": st.join(self.run_uri, TB_DIR),
                "eval_pages": [st.join(self.run_uri, p) for p in pages], "metrics": st.join(self.run_uri, HISTORY)}
