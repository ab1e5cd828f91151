"""The pyfunc model: serving imports no PyTorch; predict takes raw text in the accepted shapes
and refuses others with MLflow's INVALID_PARAMETER_VALUE; the registered champion loads in a
fresh process (PyTorch blocked, kdpipe taken from the model's own code copy) and answers
with labels and probabilities; ``mlflow models serve`` answers /invocations with raw text
and a malformed body with a 4xx."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from server_stack import models_serve, post_json
from test_registry import (
    keyword_model,
    metrics_entry,
    prepared_labels,
    registry_config,
    sqlite_store,
    write_metrics,
)

NAME = "served-clf"
TEXTS = ["a lovely film", "the phone was broken and sad", "good"]
EXPECTED = ["pos", "neg", "pos"]


def run_python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300, env=env)


def test_serving_modules_do_not_import_torch():
    done = run_python("""
        import sys
        import kdpipe.serving.predictor, kdpipe.serving.ort, kdpipe.registry.pyfunc
        print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def keyword_folder(tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp("pyfunc")
    return keyword_model(root / "model", tiny_bert, ["neg", "pos"])


@pytest.fixture(scope="module")
def classifier(keyword_folder):
    from kdpipe.serving.pyfunc_model import ARTIFACT, TextClassifier

    model = TextClassifier()
    model.load_context(SimpleNamespace(artifacts={ARTIFACT: str(keyword_folder)}))
    return model


@pytest.mark.parametrize("given", [
    pd.DataFrame({"text": TEXTS}),
    TEXTS,
    {"text": TEXTS},
    np.array(TEXTS),
    pd.DataFrame({"text": [TEXTS]}),  # what MLflow's schema enforcement makes of a dict
])
def test_predict_accepts_raw_text_shapes(classifier, given):
    out = classifier.predict(None, given)
    assert list(out.columns) == ["label", "score", "prob_neg", "prob_pos"]
    assert out["label"].tolist() == EXPECTED
    np.testing.assert_allclose(out[["prob_neg", "prob_pos"]].sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out["score"], out[["prob_neg", "prob_pos"]].max(axis=1))


def test_no_texts_give_no_rows_with_the_same_columns(classifier):
    for empty in ([], {"text": []}, pd.DataFrame({"text": [[]]})):
        out = classifier.predict(None, empty)
        assert len(out) == 0 and list(out.columns) == ["label", "score", "prob_neg", "prob_pos"]


@pytest.mark.parametrize("given,message", [
    (5, "expected a DataFrame with a 'text' column, a list of strings or {'text': [...]}, "
        "got int"),
    (pd.DataFrame({"body": ["x"]}), "input has no 'text' column (columns: ['body'])"),
    ({"body": ["x"]}, "input has no 'text' key (keys: ['body'])"),
    (["fine", 3], "text 1 is int, not a string"),
    ({"text": 3}, "'text' must be a string or a list of strings, got int"),
    (pd.DataFrame({"text": ["ok", None]}), "text 1 is missing (null)"),
    ([None], "text 0 is missing (null)"),
])
def test_predict_refuses_other_input_as_invalid_parameter(classifier, given, message):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as caught:
        classifier.predict(None, given)
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
    assert caught.value.message == message


@pytest.fixture(scope="module")
def champion_store(tmp_path_factory, tiny_bert):
    """A SQLite store whose NAME@champion is the keyword model, registered by the step."""
    from kdpipe.steps import register

    root = tmp_path_factory.mktemp("served")
    uri = sqlite_store(root / "mlflow.db", tmp_path_factory.getbasetemp())
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        cfg = registry_config(root, tiny_bert, uri, registry={"model_name": NAME})
        folder = keyword_model(root / "model", tiny_bert, prepared_labels(cfg))
        evaluation = write_metrics(root / "evaluation", {"quantized": metrics_entry(1.0)})
        result = register.run(cfg, folder, evaluation, cfg.paths.prepared, root / "register")
    assert result.metrics["promoted"] == 1.0
    return uri


def test_signature_and_requirements_are_minimal(champion_store):
    import mlflow

    mlflow.set_tracking_uri(champion_store)
    uri = f"models:/{NAME}@champion"
    info = mlflow.models.get_model_info(uri)
    assert info.signature.inputs.input_names() == ["text"]
    assert info.signature.outputs.input_names() == ["label", "score", "prob_neg", "prob_pos"]
    requirements = Path(mlflow.pyfunc.get_model_dependencies(uri)).read_text().split()
    names = sorted(r.split("==")[0] for r in requirements)
    assert names == ["mlflow", "numpy", "onnxruntime", "pandas", "tokenizers", "transformers"]
    assert all("==" in r for r in requirements)


def test_champion_loads_in_a_fresh_process_without_torch(champion_store, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": champion_store,
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    done = run_python(f"""
        import json, sys
        sys.modules["torch"] = None  # loading must not need PyTorch
        import mlflow.pyfunc, pandas as pd
        model = mlflow.pyfunc.load_model("models:/{NAME}@champion")
        out = model.predict(pd.DataFrame({{"text": {TEXTS!r}}}))
        import kdpipe
        print(json.dumps({{"rows": out.to_dict("records"), "kdpipe": kdpipe.__file__}}))
    """, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert [row["label"] for row in result["rows"]] == EXPECTED
    for row in result["rows"]:
        assert row["prob_neg"] + row["prob_pos"] == pytest.approx(1.0)
        assert row["score"] == max(row["prob_neg"], row["prob_pos"])
    # kdpipe came from the copy shipped inside the model, not from this checkout.
    assert "/code/kdpipe/" in result["kdpipe"]
    assert not result["kdpipe"].startswith(str(Path(__file__).resolve().parents[2] / "src"))


@pytest.mark.slow
def test_mlflow_models_serve_answers_raw_text(champion_store, tmp_path):
    with models_serve(f"models:/{NAME}@champion", {"MLFLOW_TRACKING_URI": champion_store},
                      tmp_path) as base:
        split = {"dataframe_split": {"columns": ["text"], "data": [[t] for t in TEXTS]}}
        status, answer = post_json(f"{base}/invocations", json.dumps(split).encode())
        assert status == 200, answer
        rows = answer["predictions"]
        assert [row["label"] for row in rows] == EXPECTED
        assert all(row["prob_neg"] + row["prob_pos"] == pytest.approx(1.0) for row in rows)
        status, answer = post_json(f"{base}/invocations",
                                   json.dumps({"inputs": {"text": TEXTS}}).encode())
        assert status == 200 and [r["label"] for r in answer["predictions"]] == EXPECTED
        status, answer = post_json(f"{base}/invocations", b"{this is not json")
        assert 400 <= status < 500 and answer["error_code"] == "BAD_REQUEST"
        wrong = {"dataframe_split": {"columns": ["body"], "data": [["x"]]}}
        status, answer = post_json(f"{base}/invocations", json.dumps(wrong).encode())
        assert 400 <= status < 500 and "text" in answer["message"]
        # Past MLflow's schema check, the model's own refusal is a 400 too.
        status, answer = post_json(f"{base}/invocations",
                                   json.dumps({"dataframe_records": [{"text": None}]}).encode())
        assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE"
        assert "text 0 is missing (null)" in answer["message"]


@pytest.mark.slow
def test_kdpipe_serve_works_from_a_plain_shell(champion_store, tmp_path):
    """`kdpipe serve` run by its full path with no environment activated (PATH without
    the venv, where plain `mlflow models serve` fails: uvicorn not found) answers raw text;
    with no champion it is one line."""
    import signal

    from server_stack import _answers, free_port

    port = free_port()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_TRACKING_URI": champion_store}
    kdpipe = [sys.executable, "-m", "kdpipe", "serve", "--port", str(port),
              "-S", f"registry.model_name={NAME}"]
    log = tmp_path / "serve.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(kdpipe, env=env, cwd=tmp_path, stdout=handle,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not _answers(f"http://127.0.0.1:{port}/ping"):
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        status, answer = post_json(f"http://127.0.0.1:{port}/invocations",
                                   json.dumps({"inputs": {"text": TEXTS}}).encode())
        assert status == 200 and [r["label"] for r in answer["predictions"]] == EXPECTED
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    assert f"serving models:/{NAME}@champion" in log.read_text()
    none = subprocess.run([*kdpipe[:-1], "registry.model_name=nobody"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert none.returncode == 1 and "Traceback" not in none.stderr
    assert none.stderr.strip().startswith("error: registered model 'nobody'")


TORCH_NAME = "served-int8-torch"
BILSTM = {"arch": "bilstm", "embedding_dim": 16, "bilstm": {"hidden_size": 8}}


@pytest.fixture(scope="module")
def torch_champion(tmp_path_factory, tiny_bert):
    """(store URI, folder): a BiLSTM quantized by torch_dynamic, registered by the step."""
    from conftest import save_fresh_student

    from kdpipe.config import StudentConfig
    from kdpipe.models.teacher import load_tokenizer
    from kdpipe.steps import export, quantize, register

    root = tmp_path_factory.mktemp("served-torch")
    uri = sqlite_store(root / "mlflow.db", tmp_path_factory.getbasetemp())
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        # An untrained student (accuracy 0.5 against the teacher's 0.9): the gate's
        # retention minimum off, since this is about loading, not quality.
        cfg = registry_config(root, tiny_bert, uri, registry={
            "model_name": TORCH_NAME, "gate": {"min_teacher_retention": 0.0}},
            quantize={"method": "torch_dynamic", "max_accuracy_drop": 1.0})
        save_fresh_student(root / "student", StudentConfig.model_validate(BILSTM), tiny_bert,
                           load_tokenizer(str(tiny_bert)))
        export.run(cfg, root / "student", cfg.paths.prepared, root / "export")
        quantize.run(cfg, root / "export", cfg.paths.prepared, root / "quantized",
                     root / "student")
        evaluation = write_metrics(root / "evaluation", {
            "quantized": {**metrics_entry(0.5), "kind": "pytorch-int8"}})
        result = register.run(cfg, root / "quantized", evaluation, cfg.paths.prepared,
                              root / "register")
    assert result.metrics["promoted"] == 1.0
    return uri, root / "quantized"


def test_torch_int8_champion_loads_in_a_fresh_process(torch_champion):
    import mlflow

    from kdpipe.serving.predictor import Predictor

    uri, folder = torch_champion
    mlflow.set_tracking_uri(uri)
    requirements = Path(mlflow.pyfunc.get_model_dependencies(
        f"models:/{TORCH_NAME}@champion")).read_text().split()
    assert {"torch", "safetensors"} <= {r.split("==")[0] for r in requirements}
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true"}
    done = run_python(f"""
        import json
        import mlflow.pyfunc, pandas as pd
        model = mlflow.pyfunc.load_model("models:/{TORCH_NAME}@champion")
        out = model.predict(pd.DataFrame({{"text": {TEXTS!r}}}))
        import kdpipe.compression.torch_int8
        print(json.dumps({{"rows": out.to_dict("records"),
                           "kdpipe": kdpipe.compression.torch_int8.__file__}}))
    """, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "/code/kdpipe/" in result["kdpipe"]  # the student modules were shipped too
    predictor = Predictor(folder, threads=1)
    expected = predictor.predict_proba(TEXTS)
    got = np.array([[row[f"prob_{n}"] for n in predictor.labels] for row in result["rows"]])
    np.testing.assert_allclose(got, expected, atol=1e-6)
