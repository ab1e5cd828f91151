"""Switch off the phone-home behaviour of the libraries kdpipe drives.

Set before those libraries are imported: MLflow reads its switch at import time.
"""

import os

_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
}


def disable_telemetry() -> None:
    """Turn telemetry off for MLflow, DVC, Hugging Face and (if used) ONNX Runtime.

    A value the user set explicitly is kept.
    """
    for key, value in _ENV.items():
        os.environ.setdefault(key, value)


def disable_onnxruntime_telemetry() -> None:
    """ONNX Runtime has no environment switch; call this right after importing it."""
    import onnxruntime

    onnxruntime.disable_telemetry_events()
