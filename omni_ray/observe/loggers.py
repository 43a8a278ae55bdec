"""Metric loggers the driver writes from the workers' reports: TensorBoard, MLflow, W&B.

Workers only call ``ray.train.report``; the driver turns each report into flat scalars and hands
them to every logger named in ``run.loggers``. Tracker credentials (``MLFLOW_TRACKING_URI``,
``WANDB_API_KEY`` ...) are read from the driver's environment by the trackers' own libraries
and never travel to workers.

    loggers = open_loggers(["tensorboard", "mlflow"], local_dir="/runs/x", run_name="x", config={...})
    loggers.log(scalars(report), step); loggers.close()
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import time

from omni_ray.config import ConfigError
from omni_ray.train.metrics import logged_as

logger = logging.getLogger(__name__)

TB_DIR = "tensorboard"
# The library each logger needs, and how to get it.
LIBRARIES = {"tensorboard": ("tensorboardX", "pip install tensorboardX"),
             "mlflow": ("mlflow", "pip install 'omni_ray[mlflow]'"),
             "wandb": ("wandb", "pip install 'omni_ray[wandb]'")}


def check_loggers(names: list[str]) -> None:
    """run.loggers: fail at validate time, on the driver, when a logger's library is missing."""
    for name in names:
        module, fix = LIBRARIES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"run.loggers: {name} needs the {module} package, which is not installed; "
                              f"{fix}, or remove {name} from run.loggers")


_UNSAFE = re.compile(r"[^A-Za-z0-9_.\- /]")  # outside MLflow's metric-name alphabet


def scalars(report: dict) -> dict[str, float]:
    """The loggable numbers of one report: fixed names, rejects by reason, nothing non-numeric."""
    out = {}
    for key, name in logged_as().items():
        value = report.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    rejected = report.get("rejected") or {}
    for reason, count in rejected.items():
        out[f"data/rejected/{reason}"] = float(count)
    if "rejected" in report:
        out["data/rejected_total"] = float(sum(rejected.values()))
    # A mixture: rows seen and rejected per source (names made safe for MLflow's key alphabet).
    for key, prefix in (("samples_by_source", "data/samples"), ("rejected_by_source", "data/rejected_by_source")):
        for name, count in (report.get(key) or {}).items():
            out[f"{prefix}/{_UNSAFE.sub('_', name)}"] = float(count)
    return out


def trainable_counts(report: dict) -> dict[str, float]:
    """Per-group trainable parameter counts from the freeze audit (logged once, at the first report)."""
    audit = report.get("audit") or {}
    return {f"params/trainable/{group}": float(row.get("trainable", 0)) for group, row in audit.items()}


class TensorBoardLogger:
    def __init__(self, local_dir: str):
        from tensorboardX import SummaryWriter

        self.dir = os.path.join(local_dir, TB_DIR)
        os.makedirs(self.dir, exist_ok=True)
        self._before = set(os.listdir(self.dir))  # earlier processes' files: already in storage
        # One new event file per driver process; a resumed run adds a file to the same folder,
        # and TensorBoard reads the folder as one series, in file-name order. tensorboardX names a
        # file by the second it was opened, so a driver restarted within that second would
        # overwrite the first file: the nanosecond suffix keeps names unique and in time order.
        self.writer = SummaryWriter(logdir=self.dir, flush_secs=30, filename_suffix=f".{time.time_ns()}")

    def log(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, global_step=step)

    def flush(self) -> None:
        self.writer.flush()

    def files(self) -> list[str]:
        """Event files this process wrote (to upload)."""
        return [os.path.join(self.dir, f) for f in sorted(set(os.listdir(self.dir)) - self._before)]

    def close(self) -> None:
        self.writer.close()


class MLflowLogger:
    """MLflow through its own library: MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME etc. as usual."""

    def __init__(self, run_name: str, config: dict):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "omni-ray"))
        # A resumed run (same run.name) continues the MLflow run of that name when there is one.
        found = mlflow.search_runs(filter_string=f"tags.mlflow.runName = '{run_name}'", max_results=1,
                                   output_format="list")
        self.run = mlflow.start_run(run_id=found[0].info.run_id) if found else mlflow.start_run(run_name=run_name)
        if not found:
            mlflow.log_params(_flat(config))

    def log(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(values, step=step)

    def flush(self) -> None:
        pass

    def files(self) -> list[str]:
        return []

    def close(self) -> None:
        self.mlflow.end_run()


class WandbLogger:
    """W&B through its own library: WANDB_API_KEY, WANDB_PROJECT, WANDB_MODE etc. as usual."""

    def __init__(self, run_name: str, config: dict):
        import wandb

        # id=run_name + resume="allow": a resumed run continues the same W&B run.
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "omni-ray"), name=run_name,
                              id=run_name, resume="allow", config=config)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def flush(self) -> None:
        pass

    def files(self) -> list[str]:
        return []

    def close(self) -> None:
        self.run.finish()


def _flat(config: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)[:500]  # MLflow caps parameter values
    return out


class Loggers:
    """All loggers of a run, called as one."""

    def __init__(self, members: list):
        self.members = members

    def log(self, values: dict[str, float], step: int) -> None:
        if values:
            for member in self.members:
                member.log(values, step)

    def flush(self) -> None:
        for member in self.members:
            member.flush()

    def files(self) -> list[str]:
        return [path for member in self.members for path in member.files()]

    def close(self) -> None:
        for member in self.members:
            member.close()


def open_loggers(names: list[str], local_dir: str, run_name: str, config: dict) -> Loggers:
    check_loggers(names)
    members = []
    for name in names:
        if name == "tensorboard":
            members.append(TensorBoardLogger(local_dir))
        elif name == "mlflow":
            members.append(MLflowLogger(run_name, config))
        elif name == "wandb":
            members.append(WandbLogger(run_name, config))
    return Loggers(members)
