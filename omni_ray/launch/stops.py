"""Clean stops: SIGINT (Ctrl-C) or SIGTERM (``ray job stop``, a scheduler) to the driver.

The first signal asks the workers, through the run's inbox actor (observe.watch), to checkpoint
at their next step boundary and end; the driver then exits 130 (SIGINT) or 143 (SIGTERM) and the
same command resumes at the next step. A second signal, or no checkpoint within
``checkpoint.stop_deadline_s``, stops at once and says which steps were not saved.

Ray Train's ``fit`` installs its own SIGINT handler (abort the run, no checkpoint) when it runs in
the main thread, so ``fit`` runs in a thread of its own and the main thread keeps these handlers.

    with Stopper(watcher.request_stop, cfg.checkpoint.stop_deadline_s) as stopper:
        result = stopper.run(trainer.fit)
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Callable

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopNow(Exception):
    """Stop at once (a second signal, or the deadline passed); ``signum`` picks the exit code."""

    def __init__(self, signum: int, why: str):
        super().__init__(why)
        self.signum = signum


class Stopped(Exception):
    """The run ended on a signal; the CLI prints the message and exits with ``exit_code``."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class Stopper:
    """Turns the first SIGINT/SIGTERM into a stop request, the second into StopNow (main thread only)."""

    def __init__(self, request_stop: Callable[[], None], deadline_s: float,
                 say: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True), poll_s: float = 0.2):
        self.request_stop, self.deadline_s, self.say, self.poll_s = request_stop, deadline_s, say, poll_s
        self.signum: int | None = None
        self.requested_at: float | None = None
        self._saved: dict = {}

    def __enter__(self) -> "Stopper":
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._saved[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)
        self._saved = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise StopNow(signum, f"{signal_name(signum)} again")
        self.signum, self.requested_at = signum, time.monotonic()
        self.request_stop()
        self.say(f"[omni-ray] {signal_name(signum)}: the workers checkpoint at the next step boundary and stop "
                 f"(up to checkpoint.stop_deadline_s={self.deadline_s:g}s); send it again to stop at once without "
                 "saving the steps since the last checkpoint")

    def run(self, fn: Callable[[], object]):
        """``fn()`` in a thread; the main thread waits, handling signals and the stop deadline."""
        box: dict = {}

        def target() -> None:
            try:
                box["result"] = fn()
            except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
                box["error"] = err

        thread = threading.Thread(target=target, name="omni-ray-fit", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(self.poll_s)
            if self.requested_at is not None and time.monotonic() - self.requested_at > self.deadline_s:
                raise StopNow(self.signum or signal.SIGINT, f"no checkpoint within checkpoint.stop_deadline_s="
                                                            f"{self.deadline_s:g}s")
        if "error" in box:
            raise box["error"]
        return box["result"]


def stopped_message(signum: int, saved: int, reported: int, at_once: str | None = None) -> str:
    """What a stop left behind, for the console: where the run resumes, and what was lost, if anything."""
    resume = f"run the same command to resume from step {saved + 1}" if saved else "run the same command to start again"
    if at_once is None:
        if saved:
            return f"stopped on {signal_name(signum)}: steps up to {saved} are in a checkpoint; {resume}"
        return f"stopped on {signal_name(signum)} before the first step; nothing to save; {resume}"
    lost = (f"steps {saved + 1}..{reported} (and any after, not yet reported) were not saved" if reported > saved
            else f"steps after {saved} were not saved")
    return f"stopped at once ({at_once}): {lost}; {resume}"
