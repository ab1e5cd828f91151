"""The MLflow pyfunc model kdpipe registers: raw text in, label and probabilities out.

``TextClassifier`` serves the ``model_folder`` artifact through ``Predictor``.
``predict`` takes a DataFrame with a ``text`` column, a list of strings, a string or a dict
``{"text": [...]}``; anything else (or a missing text) is an
``MlflowException(INVALID_PARAMETER_VALUE)``, which ``mlflow models serve`` answers with
HTTP 400, its message one line (``InputRefused``). MLflow checks the signature before
``predict`` sees anything: through ``mlflow.pyfunc.load_model(...).predict`` only named
input passes (a DataFrame with ``text``, or ``{"text": [...]}``; a bare list is refused by
MLflow itself), while the scoring server also takes ``{"inputs": [...]}`` and, for
``inputs``, turns every value (null and numbers included) into a string before the model
sees it.

Limits, read from the environment when the model loads (``load_context``), so that an
oversized request is a 400 at once instead of minutes of tokenizing or an out-of-memory:

- ``KDPIPE_SERVE_MAX_TEXTS`` (default ``MAX_TEXTS``): the most texts in one request;
- ``KDPIPE_SERVE_MAX_CHARS`` (default ``MAX_CHARS``): the most characters in one text.

Past either, ``predict`` refuses the whole request (INVALID_PARAMETER_VALUE, one line naming
the limit and its variable); nothing is cut silently. A value that is not a whole number
>= 1 is a ``KdpipeError`` at load, so the server does not start. MLflow's scoring server
itself has no limit on a request's size: it reads and parses the whole body before the
model sees it (``docs/benchmarks.md`` has what a 20 MB body costs).

Logging it is ``kdpipe.registry.pyfunc.log_model``; this module ships inside the model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from kdpipe.errors import KdpipeError

ARTIFACT = "model_folder"
TEXT = "text"
LABEL = "label"
SCORE = "score"
PROB_PREFIX = "prob_"
MAX_TEXTS_VAR = "KDPIPE_SERVE_MAX_TEXTS"
MAX_CHARS_VAR = "KDPIPE_SERVE_MAX_CHARS"
# The two limits bound one request's work at MAX_TEXTS x MAX_CHARS characters (~10 MB of
# ASCII JSON). Measured with the demo student on 2 cores (docs/benchmarks.md, "Serving under
# load"): 1,024 demo texts take about 0.1-0.3 s, and a caller with more sends several
# requests. 10,000 characters per text: texts are cut to max_length tokens (128 by default,
# a few hundred characters of English; a BERT's 512, a few thousand), so nothing past this
# changes a prediction, but the tokenizer still reads the whole text first: a text that is
# not plain ASCII costs ~1 us a character, so 1,024 texts of 100,000 characters ran past the
# scoring server's 60 s timeout (a 504, the work going on behind it).
MAX_TEXTS = 1024
MAX_CHARS = 10_000


@dataclass(frozen=True)
class Limits:
    """The most texts one request may hold and the most characters one text may have."""

    max_texts: int = MAX_TEXTS
    max_chars: int = MAX_CHARS

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Limits:
        """The limits ``KDPIPE_SERVE_MAX_TEXTS`` and ``KDPIPE_SERVE_MAX_CHARS`` set in
        ``environ`` (default ``os.environ``), the defaults where unset or empty."""
        environ = os.environ if environ is None else environ
        return cls(max_texts=_positive_int(environ, MAX_TEXTS_VAR, MAX_TEXTS),
                   max_chars=_positive_int(environ, MAX_CHARS_VAR, MAX_CHARS))


class TextClassifier(mlflow.pyfunc.PythonModel):
    """Serves the ``model_folder`` artifact with ``kdpipe.serving.predictor.Predictor``."""

    def load_context(self, context: Any) -> None:
        from kdpipe.serving.predictor import Predictor

        self.limits = Limits.from_environment()
        self.predictor = Predictor(Path(context.artifacts[ARTIFACT]))

    # Annotated DataFrame because MLflow turns most other hints into a schema of its own
    # (and warns when there is none); the signature is the schema, and lists and dicts are
    # accepted too, for callers that skip MLflow's conversion.
    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        texts = input_texts(model_input)
        check_limits(texts, self.limits)
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


def check_limits(texts: list[str], limits: Limits) -> None:
    """An ``MlflowException(INVALID_PARAMETER_VALUE)`` when ``texts`` are more than
    ``limits.max_texts`` or one is longer than ``limits.max_chars`` characters."""
    if len(texts) > limits.max_texts:
        raise _invalid(f"{len(texts):,} texts in one request; the limit is "
                       f"{limits.max_texts:,} ({MAX_TEXTS_VAR}): send them in several requests")
    for i, text in enumerate(texts):
        if len(text) > limits.max_chars:
            raise _invalid(f"text {i} has {len(text):,} characters; the limit is "
                           f"{limits.max_chars:,} ({MAX_CHARS_VAR}), and the model reads only "
                           "its first tokens anyway: send a shorter text")


def output_frame(labels: list[str], probabilities: np.ndarray) -> pd.DataFrame:
    """One row per text: ``label``, ``score`` and ``prob_<label>`` (float64, label order)."""
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(-1, len(labels))
    best = probabilities.argmax(axis=1)
    frame = pd.DataFrame({LABEL: [labels[i] for i in best],
                          SCORE: probabilities.max(axis=1, initial=0.0)})
    for column, name in enumerate(labels):
        frame[PROB_PREFIX + name] = probabilities[:, column]
    return frame


def _positive_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise KdpipeError(f"{name}={raw!r}: expected a whole number >= 1 (default {default})")
    return value


class InputRefused(MlflowException):
    """INVALID_PARAMETER_VALUE (HTTP 400 from the scoring server) whose message stays the
    one line it was raised with.

    MLflow's scoring server rewrites a model's error as ``Failed to predict data
    '<the input>'. Error: ...``, the input printed whole: refusing a 1 MB text would answer
    with a 1 MB message, a 20 MB body with a 20 MB one. The rewrite is dropped here."""

    def __init__(self, message: str) -> None:
        self._line = message
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._line

    @message.setter
    def message(self, value: str) -> None:
        pass  # MlflowException.__init__ and the scoring server's rewrite: the line stays


def _invalid(message: str) -> MlflowException:
    return InputRefused(message)
