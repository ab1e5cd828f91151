"""An exported folder as an MLflow pyfunc model: raw text in, label and probabilities out.

``log_model(folder)`` logs, into the active MLflow run:

- the folder (ONNX file, tokenizer files, labels.json, export.json, records) as the artifact
  ``model_folder``, which ``TextClassifier`` serves through ``kdpipe.serve.Predictor``;
- the model as code (``model_code.py``, MLflow's models-from-code): loading runs that file
  instead of unpickling an object, so no pickle is ever read;
- the kdpipe modules serving imports (``SERVING_MODULES``, copied beside the model as
  ``code/kdpipe``), so loading needs no kdpipe install, no PyTorch, and only the pinned
  ``REQUIREMENTS`` (given explicitly: MLflow's inference of them is slow and over-broad);
  a torch_dynamic folder (int8 PyTorch student) also ships the student modules and needs
  PyTorch (``TORCH_SERVING_MODULES``, ``TORCH_REQUIREMENTS``);
- a signature and an input example: input one string column ``text``; output ``label``,
  ``score`` (its probability) and ``prob_<label>`` per label, all JSON-friendly.

``predict`` takes a DataFrame with a ``text`` column, a list of strings, a string or a dict
``{"text": [...]}``; anything else (or a missing text) is an
``MlflowException(INVALID_PARAMETER_VALUE)``, which ``mlflow models serve`` answers with
HTTP 400. MLflow checks the signature before ``predict`` sees anything: through
``mlflow.pyfunc.load_model(...).predict`` only named input passes (a DataFrame with
``text``, or ``{"text": [...]}``; a bare list is refused by MLflow itself), while the scoring
server also takes ``{"inputs": [...]}`` and, for ``inputs``, turns every value (null
included) into a string before the model sees it.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Mapping
from importlib import metadata
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
MODEL_CODE = Path(__file__).with_name("model_code.py")
EXAMPLE_TEXTS = ["a lovely film", "the service was awful"]
# What kdpipe.serve imports (transformers for AutoTokenizer, which needs tokenizers), pinned
# to the versions the model was logged with; MLflow adds itself.
REQUIREMENTS = ("onnxruntime", "transformers", "tokenizers", "numpy", "pandas")
# The kdpipe modules loading imports, relative to the package; a test loads the model in a
# fresh process with PyTorch blocked and kdpipe taken from this copy.
SERVING_MODULES = ("__init__.py", "telemetry.py", "errors.py", "ort.py", "serve.py",
                   "batching.py", "word_cache.py", "registry/__init__.py",
                   "registry/pyfunc.py")
# A torch_dynamic folder (an int8 PyTorch student, kdpipe.torch_int8) is served by PyTorch:
# its model also needs these modules and packages (a test loads one in a fresh process).
TORCH_SERVING_MODULES = ("atomic.py", "config.py", "threads.py", "onnx_utils.py",
                         "pruning.py", "torch_int8.py", "models/__init__.py",
                         "models/students.py", "models/teacher.py", "models/textcnn.py",
                         "models/bilstm.py", "models/tiny_transformer.py")
TORCH_REQUIREMENTS = ("torch", "safetensors", "pydantic", "PyYAML")
# Left out of the artifact: a TensorRT plan is built for one GPU, and serving is CPU ORT.
NOT_SHIPPED = ("*.plan",)


class TextClassifier(mlflow.pyfunc.PythonModel):
    """Serves the ``model_folder`` artifact with ``kdpipe.serve.Predictor``."""

    def load_context(self, context: Any) -> None:
        from kdpipe.serve import Predictor

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


def signature(labels: list[str]) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    outputs = [ColSpec("string", LABEL), ColSpec("double", SCORE)]
    outputs += [ColSpec("double", PROB_PREFIX + name) for name in labels]
    return ModelSignature(inputs=Schema([ColSpec("string", TEXT)]), outputs=Schema(outputs))


def requirements(torch_model: bool = False) -> list[str]:
    """Pinned pip requirements; ``torch_model``: for a torch_dynamic folder."""
    names = REQUIREMENTS + (TORCH_REQUIREMENTS if torch_model else ())
    return [f"{name}=={metadata.version(name)}" for name in names]


def log_model(folder: Path, name: str = "model") -> Any:
    """Log ``folder`` (an exported or quantized model folder) into the active run as a
    pyfunc model named ``name``; returns MLflow's ``ModelInfo``. A folder that
    ``Predictor`` cannot load is a ``KdpipeError`` before anything is logged."""
    from kdpipe.serve import Predictor

    predictor = Predictor(Path(folder), threads=1)
    modules = SERVING_MODULES + (TORCH_SERVING_MODULES if predictor.on_torch else ())
    with tempfile.TemporaryDirectory(prefix="kdpipe-pyfunc-") as scratch:
        staged = Path(scratch) / "model"
        shutil.copytree(folder, staged, ignore=shutil.ignore_patterns(*NOT_SHIPPED))
        code = ship_code(Path(scratch) / "code", modules)
        return mlflow.pyfunc.log_model(
            name=name, python_model=str(MODEL_CODE), artifacts={ARTIFACT: str(staged)},
            code_paths=[str(code)], pip_requirements=requirements(predictor.on_torch),
            signature=signature(predictor.labels),
            input_example=pd.DataFrame({TEXT: EXAMPLE_TEXTS}))


def ship_code(target: Path, modules: tuple[str, ...] = SERVING_MODULES) -> Path:
    """Copy ``modules`` (paths in the kdpipe package) into ``target/kdpipe``; returns that
    folder."""
    package = Path(__file__).resolve().parent.parent
    root = target / "kdpipe"
    for relative in modules:
        source = package / relative
        if not source.is_file():
            raise KdpipeError(f"{source}: missing from the kdpipe package; reinstall kdpipe")
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, root / relative)
    return root


def _invalid(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)
