"""The one error family kdpipe raises for problems a user can fix.

The CLI prints ``KdpipeError`` as a single line and exits non-zero; anything else is a bug
and keeps its traceback.
"""


class KdpipeError(Exception):
    """A problem with the user's input, config or environment, stated so they can act on it."""


class ConfigError(KdpipeError):
    """params.yaml or a ``-S key=value`` override is invalid."""


class DataError(KdpipeError):
    """A data source is missing, unreadable or does not fit the configured schema."""
