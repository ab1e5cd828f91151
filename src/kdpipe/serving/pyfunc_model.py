"""The MLflow pyfunc model kdpipe registers: raw text in, label and probabilities out.

``TextClassifier`` serves the ``model_folder`` artifact through ``Predictor``.
``predict`` takes a DataFrame with a ``text`` column, a list of strings, a string or a dict
``{"text": [...]}``; anything else (or a missing text) is an
``MlflowException(INVALID_PARAMETER_VALUE)``, which ``mlflow models serve`` answers with
HTTP 400. MLflow checks the signature before ``predict`` sees anything: through
``mlflow.pyfunc.load_model(...).predict`` only named input passes (a DataFrame with
``text``, or ``{"text": [...]}``; a bare list is refused by MLflow itself), while the scoring
server also takes ``{"inputs": [...]}`` and, for ``inputs``, turns every value (null
included) into a string before the model sees it.

Logging it is ``kdpipe.registry.pyfunc.log_model``; this module ships inside the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

ARTIFACT = "model_folder"
TEXT = "text"
LABEL = "label"
SCORE = "score"
PROB_PREFIX = "prob_"


class TextClassifier(mlflow.pyfunc.PythonModel):
    """Serves the ``model_folder`` artifact with ``kdpipe.serving.predictor.Predictor``."""

    def load_context(self, context: Any) -> None:
        from kdpipe.serving.predictor import Predictor

        self.predictor = Predictor(Path(context.artifacts[ARTIFACT]))

    # Annotated DataFrame because MLflow turns most other hints into a schema of its own
    # (and warns when there is none); the signature is the schema, and lists and dicts are
    # accepted too, for callers that skip MLflow's conversion.
    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        texts = input_texts(model_input)
        return output_frame(self.predictor.labels, self.predictor.predict_proba(texts))


def input_texts(model_input: Any) -> list[str]:
    """The texts in ``model_input`` (see the module docstring for the accepted shapes)."""
    if isinstance(model_input, pd.DataFrame):
        if TEXT not in model_input.columns:
            raise _invalid(f"input has no {TEXT!r} column (columns: "
                           f"{[str(c) for c in model_input.columns]})")
        values = model_input[TEXT].tolist()
        # MLflow's schema enforcement turns {"text": [a, b]} into one row holding the list.
        if len(values) == 1 and isinstance(values[0], (list, tuple, np.ndarray)):
            values = list(values[0])
    elif isinstance(model_input, Mapping):
        if TEXT not in model_input:
            raise _invalid(f"input has no {TEXT!r} key (keys: {[str(k) for k in model_input]})")
        values = model_input[TEXT]
        values = [values] if isinstance(values, str) else values
    elif isinstance(model_input, str):
        values = [model_input]
    elif isinstance(model_input, np.ndarray):
        values = model_input.astype(object).ravel().tolist()
    elif isinstance(model_input, (list, tuple, pd.Series)):
        values = list(model_input)
    else:
        raise _invalid(f"expected a DataFrame with a {TEXT!r} column, a list of strings or "
                       f"{{{TEXT!r}: [...]}}, got {type(model_input).__name__}")
    if not isinstance(values, (list, tuple, np.ndarray, pd.Series)):
        raise _invalid(f"{TEXT!r} must be a string or a list of strings, got "
                       f"{type(values).__name__}")
    values = list(values)
    for i, value in enumerate(values):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise _invalid(f"text {i} is missing (null)")
        if not isinstance(value, str):
            raise _invalid(f"text {i} is {type(value).__name__}, not a string")
    return values


def output_frame(labels: list[str], probabilities: np.ndarray) -> pd.DataFrame:
    """One row per text: ``label``, ``score`` and ``prob_<label>`` (float64, label order)."""
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(-1, len(labels))
    best = probabilities.argmax(axis=1)
    frame = pd.DataFrame({LABEL: [labels[i] for i in best],
                          SCORE: probabilities.max(axis=1, initial=0.0)})
    for column, name in enumerate(labels):
        frame[PROB_PREFIX + name] = probabilities[:, column]
    return frame


def _invalid(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)
