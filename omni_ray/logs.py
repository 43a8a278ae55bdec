"""Logging for the package: one handler on the ``omni_ray`` logger, set up by entry points.

Library code only calls ``logging.getLogger(__name__)``; the CLI, the Ray Train worker entry
point and the demo call ``setup_logging`` once, so each line appears once, on stderr, prefixed
with ``[omni-ray]``.
"""

from __future__ import annotations

import logging
import sys


def setup_logging(verbose: bool = False) -> None:
    logger = logging.getLogger("omni_ray")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not any(getattr(h, "_omni_ray", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[omni-ray] %(message)s"))
        handler._omni_ray = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
