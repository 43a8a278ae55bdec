"""Logging for the package: one handler on the ``omni_ray`` logger, set up by entry points.

Library code only calls ``logging.getLogger(__name__)``; the CLI, the Ray Train worker entry
point and the demo call ``setup_logging`` once, so each line appears once, on stderr, prefixed
with ``[omni-ray]``.
"""

from __future__ import annotations

import logging
import sys


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at each line, not the one present at setup: the CLI can
    run many times in one process (tests, notebooks), and a stream captured then closed would turn
    every later line into a "--- Logging error ---" traceback."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ and setStream assign it; ignored
        pass


def setup_logging(verbose: bool = False) -> None:
    logger = logging.getLogger("omni_ray")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not any(getattr(h, "_omni_ray", False) for h in logger.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("[omni-ray] %(message)s"))
        handler._omni_ray = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
