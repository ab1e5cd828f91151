"""kdpipe: distil a large text classifier into a small, fast one and ship it."""

from kdpipe.telemetry import disable_telemetry

disable_telemetry()

__version__ = "0.1.0"
