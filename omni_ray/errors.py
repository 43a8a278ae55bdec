"""The one base class of expected failures: bad config, unreachable storage, bad data, damaged files.

Every such error's message is one sentence a person can act on: the config key or path, what is
wrong, and what to do. The CLI prints it on one line and exits 2, without a traceback; anything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An expected failure phrased as ``key or path: what is wrong; what to do``."""
