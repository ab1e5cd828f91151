"""An exported folder as an MLflow pyfunc model (``kdpipe.serving.pyfunc_model``).

``log_model(folder)`` logs, into the active MLflow run:

- the folder (ONNX file, tokenizer files, labels.json, export.json, records) as the artifact
  ``model_folder``, which ``TextClassifier`` serves through ``kdpipe.serving.Predictor``;
- the model as code (``kdpipe/serving/model_code.py``, MLflow's models-from-code): loading
  runs that file instead of unpickling an object, so no pickle is ever read;
- the package ``kdpipe/serving/`` whole, with the few foundation modules it imports
  (``SHIPPED``), copied beside the model as ``code/kdpipe``, so loading needs no kdpipe
  install, no PyTorch, and only the pinned ``REQUIREMENTS`` (given explicitly: MLflow's
  inference of them is slow and over-broad); a torch_dynamic folder (int8 PyTorch student)
  also ships the model and compression packages and needs PyTorch (``TORCH_SHIPPED``,
  ``TORCH_REQUIREMENTS``);
- a signature and an input example: input one string column ``text``; output ``label``,
  ``score`` (its probability) and ``prob_<label>`` per label, all JSON-friendly.
"""

from __future__ import annotations

import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

from kdpipe.errors import KdpipeError
from kdpipe.serving.pyfunc_model import ARTIFACT, LABEL, PROB_PREFIX, SCORE, TEXT

MODEL_CODE = Path(__file__).resolve().parent.parent / "serving" / "model_code.py"
EXAMPLE_TEXTS = ["a lovely film", "the service was awful"]
# What serving imports (transformers for AutoTokenizer, which needs tokenizers), pinned
# to the versions the model was logged with; MLflow adds itself.
REQUIREMENTS = ("onnxruntime", "transformers", "tokenizers", "numpy", "pandas")
# What the model ships of kdpipe, relative to the package: the serving package whole and
# the foundation modules it imports (a test loads the model in a fresh process with PyTorch
# blocked and kdpipe taken from this copy, and another checks serving's imports).
SHIPPED = ("__init__.py", "errors.py", "telemetry.py", "serving")
# A torch_dynamic folder (an int8 PyTorch student, kdpipe.compression.torch_int8) is served
# by PyTorch: its model also needs the student architectures and their loaders.
# atomic imports interrupts and owner.
TORCH_SHIPPED = ("atomic.py", "interrupts.py", "owner.py", "config.py", "threads.py", "models",
                 "compression")
TORCH_REQUIREMENTS = ("torch", "safetensors", "pydantic", "PyYAML")
# Left out of the artifact: a TensorRT plan is built for one GPU, and serving is CPU ORT.
NOT_SHIPPED = ("*.plan",)


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
    from kdpipe.serving.predictor import Predictor

    predictor = Predictor(Path(folder), threads=1)
    shipped = SHIPPED + (TORCH_SHIPPED if predictor.on_torch else ())
    with tempfile.TemporaryDirectory(prefix="kdpipe-pyfunc-") as scratch:
        staged = Path(scratch) / "model"
        shutil.copytree(folder, staged, ignore=shutil.ignore_patterns(*NOT_SHIPPED))
        code = ship_code(Path(scratch) / "code", shipped)
        return mlflow.pyfunc.log_model(
            name=name, python_model=str(MODEL_CODE), artifacts={ARTIFACT: str(staged)},
            code_paths=[str(code)], pip_requirements=requirements(predictor.on_torch),
            signature=signature(predictor.labels),
            input_example=pd.DataFrame({TEXT: EXAMPLE_TEXTS}))


def ship_code(target: Path, shipped: tuple[str, ...] = SHIPPED) -> Path:
    """Copy ``shipped`` (modules and packages of kdpipe, relative to it) into
    ``target/kdpipe``, Python sources only; returns that folder."""
    package = Path(__file__).resolve().parent.parent
    root = target / "kdpipe"
    for relative in shipped:
        source = package / relative
        if source.is_dir():
            shutil.copytree(source, root / relative,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif source.is_file():
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, root / relative)
        else:
            raise KdpipeError(f"{source}: missing from the kdpipe package; reinstall kdpipe")
    return root
