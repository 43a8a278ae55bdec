"""What a person watching the run sees: one progress display, each line once, no Ray noise.

* ``Progress`` turns rank 0's reports into one tqdm bar on a terminal, or into a plain line at
  most every ``every_s`` seconds elsewhere (CI, ``ray job logs``), where bar redraws would pile up.
* ``quiet_worker_logs`` filters the lines Ray forwards from workers and actors to the driver:
  Ray Train's per-report ``TrainingReport(...)`` dumps and warnings known to be harmless go, the
  rest is printed as before (above the bar). ``--verbose`` leaves everything as Ray prints it.
* ``ray_logging_config`` keeps Ray Train's own INFO chatter (worker group start, each report)
  out of the console unless verbose; it still goes to Ray's session log files.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import time
from typing import IO, Callable, ContextManager

logger = logging.getLogger(__name__)

# Lines Ray forwards from workers/actors that say nothing a user can act on. Each has a reason.
NOISE = [
    # Ray Train prints every report's full metric dict from every rank ("Reporting training result").
    r"TrainingReport\(", r"Reporting training result", r"Checkpoint successfully created at",
    # Our own per-step lines from rank 0: the driver's progress display shows the same numbers.
    r"\[omni-ray\] step \d+/\d+", r"\bstep \d+/\d+ epoch \d+ loss ",
    # The placement-group cleaner polls the state API; on a busy machine a poll times out, harmlessly.
    r"Failed to query Ray Train Controller actor state",
    # Ray core: actors with constructor args in the object store (ray-project/ray#53727).
    r"has constructor arguments in the object store and max_restarts > 0",
    # Ray Data's per-execution notes (progress bars are off on purpose: training shows its own).
    r"Starting execution of Dataset", r"Execution plan of Dataset", r"Progress bars disabled",
    r"Dataset \S+ execution finished in", r"Registered dataset logger for dataset",
    # Library notices with no action for the user: missing optional kernels, deprecations inside
    # transformers / Ray, DeepSpeed choosing the CPU accelerator, weight-loading bars.
    r"falling back to its reference PyTorch implementation", r"is_gradient_checkpointing` is deprecated",
    r"RayDeprecationWarning", r"^\s*warnings\.warn\(", r"^\s*self\.exclude_resources = exclude_resources",
    r"Setting accelerator to CPU", r"Loading weights:", r"Writing model shards:",
    # The driver's own Ray notices: token auth on a local Ray, a deprecation inside our pinned Ray.
    r"Token authentication is enabled", r"Generated new authentication token", r"``concurrency`` is deprecated",
    # Ray's address auto-detection in its own actors (the state API of Ray Train's placement-group
    # cleaner) sees every Ray on a shared machine; ours is never chosen that way (address="local").
    r"Found multiple active Ray instances",
]
_NOISE = re.compile("|".join(f"(?:{p})" for p in NOISE))

# Tracebacks from Ray's own background threads and polls that Ray retries, or that change nothing
# for the run: a poll of the train controller timing out on a loaded machine, the state API
# failing to pick one of several local Rays. They stay in Ray's session logs
# (/tmp/ray/session_latest/logs, the actor's .err file) and on the console with --verbose.
# Ray Train's placement-group cleaner catches only RayStateApiException in its poll; any other
# error in it (an RpcError "Timed out while waiting for GCS" on a busy machine, seen in CI after a
# clean SIGINT stop) ends its monitor thread with a traceback. The cleaner only matters if the
# controller itself crashes, which Ray Train reports on its own, so its thread's death is noise.
TRANSIENT = [r"GetTimeoutError", r"Get timed out: some object\(s\) not ready", r"Found multiple active Ray instances",
             r"RayStateApiException", r"Could not find any running Ray instance",
             r"placement_group_cleaner\.py\", line \d+, in _monitor_loop"]
_TRANSIENT = re.compile("|".join(f"(?:{p})" for p in TRANSIENT))
_BLOCK_START = re.compile(r"^(?:Traceback \(most recent call last\):|Exception in thread )")
_CHAINED = re.compile(r"^(?:During handling of the above exception|The above exception was the direct cause)")


def is_noise(line: str) -> bool:
    return bool(_NOISE.search(line))


def _traceback_end(lines: list[str], start: int) -> int | None:
    """Index after the traceback starting at ``start`` (its exception line, chained ones too); None if cut off."""
    i = start + 1
    while i < len(lines):
        line = lines[i]
        if not line.strip() or line[0].isspace() or _BLOCK_START.match(line) or _CHAINED.match(line):
            i += 1
            continue
        # The exception line; a chained traceback may follow ("During handling ...") after a blank line.
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        if j < len(lines) and _CHAINED.match(lines[j]):
            i = j + 1
            continue
        return i + 1
    return None


def drop_transient(lines: list[str], held: list[str] | None = None) -> tuple[list[str], list[str]]:
    """``lines`` without the tracebacks of Ray's transient internal errors; returns (kept, held).

    A traceback cut off at the end of ``lines`` is held back (returned second) so the caller can
    put it before the next lines of the same process; the caller prints one too long to finish.
    """
    lines = [*(held or []), *lines]
    kept: list[str] = []
    i = 0
    while i < len(lines):
        if not _BLOCK_START.match(lines[i]):
            kept.append(lines[i])
            i += 1
            continue
        end = _traceback_end(lines, i)
        if end is None:
            return kept, lines[i:]
        if not _TRANSIENT.search("\n".join(lines[i:end])):
            kept.extend(lines[i:end])
        i = end
    return kept, []


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if is_noise(record.getMessage()):
            return False
        if record.exc_info and record.exc_info[1] is not None:  # logger.exception(...) of a transient error
            return not _TRANSIENT.search(f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}")
        return True



def quiet_driver(verbose: bool) -> None:
    """This process's own known-harmless output off (unless verbose): Ray/DeepSpeed notices,
    transformers' weight-loading bars, kernel-fallback notes and deprecation warnings."""
    if verbose:
        return
    import warnings

    for name in ("ray", "DeepSpeed"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _DropNoise) for f in handler.filters):
                handler.addFilter(_DropNoise())
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def ray_logging_config(verbose: bool):
    """Ray Train's LoggingConfig: its INFO lines (each report, worker-group start) only when verbose."""
    import ray.train

    return ray.train.LoggingConfig(log_level="INFO" if verbose else "WARNING")


def quiet_worker_logs(verbose: bool, around: Callable[[], ContextManager] = contextlib.nullcontext) -> bool:
    """Filter what Ray forwards from workers to this driver (call after ray.init). True if installed.

    Uses the driver's log dispatcher (``ray._private``: Ray 2.60 has no public hook): the stock
    handler is wrapped, so dropping lines is all this changes (Ray's de-duplication stays).
    ``around()`` is entered while a batch prints (the progress bar clears itself and redraws).
    """
    try:
        from ray._private import worker as ray_worker
    except ImportError:  # pragma: no cover - a Ray without the private module: print as Ray does
        return False
    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    current = dict(dispatcher.handlers).get("ray_print_logs")
    original = getattr(current, "ray_printer", current)  # ours wraps Ray's printer: unwrap it
    if original is None:  # ray.init(log_to_driver=False): nothing is forwarded
        return False
    dispatcher.remove_handler("ray_print_logs")
    if verbose:
        dispatcher.add_handler("ray_print_logs", original)
        return False

    held: dict = {}  # per process: a traceback cut off between two batches of its lines

    def handler(data: dict) -> None:
        key = (data.get("ip"), data.get("pid"))
        lines, held[key] = drop_transient(data.get("lines", []), held.pop(key, None))
        if len(held[key]) > 500:  # not a traceback that ends: print it as it is
            lines, held[key] = lines + held[key], []
        lines = [line for line in lines if not is_noise(line)]
        if lines:
            with around():
                original({**data, "lines": lines})

    handler.ray_printer = original  # type: ignore[attr-defined]
    dispatcher.add_handler("ray_print_logs", handler)
    return True


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def status_text(report: dict) -> str:
    """The numbers one report adds to the progress display (``train.metrics``: each metric's ``status``)."""
    from omni_ray.train.metrics import status_parts

    return " ".join(status_parts(report))


class Progress:
    """The run's progress from rank 0's reports: a bar on a terminal, plain periodic lines elsewhere."""

    def __init__(self, stream: IO | None = None, tty: bool | None = None, every_s: float = 30.0):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.every_s = every_s
        self.bar = None
        self._last_line = -float("inf")
        self._start: tuple[float, int] | None = None  # (time, step) of the first report seen

    def update(self, report: dict) -> None:
        step, total = int(report.get("step", 0)), report.get("total_steps")
        now = time.monotonic()
        if self._start is None:
            self._start = (now, step)
        if self.tty:
            self._update_bar(step, total, report)
            return
        done = total is not None and step >= total
        if now - self._last_line >= self.every_s or done or report.get("eval_loss") is not None:
            self._last_line = now
            print(self.line(step, total, report, now), file=self.stream, flush=True)

    def line(self, step: int, total: int | None, report: dict, now: float) -> str:
        text = f"[omni-ray] step {step}" + (f"/{total}" if total else "") + " " + status_text(report)
        t0, s0 = self._start or (now, step)
        if total and step > s0:
            text += f" ETA {_fmt_eta((now - t0) / (step - s0) * (total - step))}"
        return text

    def _update_bar(self, step: int, total: int | None, report: dict) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, initial=step, unit="step", file=self.stream, dynamic_ncols=True,
                            desc="train")
        self.bar.set_postfix_str(status_text(report), refresh=False)
        self.bar.update(step - self.bar.n)

    def around_output(self) -> ContextManager:
        """Enter while something else prints: the bar steps aside and comes back below it."""
        if self.bar is None:
            return contextlib.nullcontext()
        from tqdm import tqdm

        return tqdm.external_write_mode(file=self.stream)

    def write(self, text: str, is_err: bool = False) -> None:
        """Print a line without breaking the bar."""
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=sys.stderr if is_err else sys.stdout, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def sample_progress(total: int | None, desc: str, stream: IO | None = None):
    """A progress bar over samples (``data check``; ``data prepare`` has its own): drawn on a
    terminal, silent elsewhere, where the final counts are printed anyway."""
    from tqdm import tqdm

    stream = stream or sys.stderr
    return tqdm(total=total, desc=desc, unit="sample", file=stream, disable=not stream.isatty(), mininterval=0.5)
