"""bench/serve_load.py, small: a tiny registered model served by `mlflow models serve` on
loopback answers 4 concurrent clients without an error, refuses every abuse case (too many
texts, too long a text, non-strings, a 2 MB body, four of them at once) with a 4xx and a
one-line message, and answers a normal request after each; the limits come from the
server's environment."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from test_registry import keyword_model, sqlite_store

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import serve_load  # noqa: E402

NAME = "serve-load-clf"


@pytest.fixture(scope="module")
def registered(tmp_path_factory, tiny_bert):
    """(model URI, tracking URI): the keyword model logged as kdpipe logs its models and
    registered as NAME@champion in a SQLite store (artifacts under the test's folder)."""
    import mlflow

    from kdpipe.registry.pyfunc import log_model

    root = tmp_path_factory.mktemp("serve-load")
    uri = sqlite_store(root / "mlflow.db", tmp_path_factory.getbasetemp())
    folder = keyword_model(root / "model", tiny_bert, ["neg", "pos"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        client = mlflow.MlflowClient(uri)
        experiment = client.create_experiment("serve-load",
                                              artifact_location=(root / "mlruns").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            info = log_model(folder)
        version = mlflow.register_model(info.model_uri, NAME).version
        client.set_registered_model_alias(NAME, "champion", version)
    return f"models:/{NAME}@champion", uri


@pytest.mark.slow
def test_served_model_under_load_and_abuse(registered, tmp_path, monkeypatch):
    model_uri, tracking_uri = registered
    # Smaller limits than the defaults, to show the server reads them (the batch of 32 fits).
    monkeypatch.setenv("KDPIPE_SERVE_MAX_TEXTS", "64")
    monkeypatch.setenv("KDPIPE_SERVE_MAX_CHARS", "5000")
    out = tmp_path / "serve_load.json"
    doc = serve_load.main(["--model-uri", model_uri, "--tracking-uri", tracking_uri,
                           "--clients", "4", "--requests", "200", "--big-body-mb", "2",
                           "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(doc, default=str))
    assert doc["limits"] == {"max_texts": 64, "max_chars": 5000}
    for batch in (1, 32):
        phase = doc["phases"][f"b{batch}"]
        assert (phase["requests"], phase["errors"]) == (100, 0), phase["first_error"]
        assert 0 < phase["p50_ms"] <= phase["p99_ms"]
    # The largest requests the limits let through are answered.
    for name in ("64_texts", "5000_chars", "64x5000_chars", "64x5000_chars_not_ascii"):
        assert doc["at_limits"][name]["status"] == 200, doc["at_limits"][name]
    assert set(doc["abuse"]) == {"10k_texts", "1mb_text", "number", "nested_list_dict",
                                 "dict_in_a_cell", "2mb_one_text", "2mb_many_texts",
                                 "2mb_one_text_x4_at_once"}
    for name, case in doc["abuse"].items():
        assert case["refused"] and case["one_line"], (name, case)
        assert case["message_chars"] < 300, (name, case["message"])
        assert case["normal_request_after"] == 200, name
    messages = {name: case["message"] for name, case in doc["abuse"].items()}
    assert messages["10k_texts"].startswith(
        "10,000 texts in one request; the limit is 64 (KDPIPE_SERVE_MAX_TEXTS)")
    assert messages["1mb_text"].startswith(
        "text 0 has 1,000,000 characters; the limit is 5,000 (KDPIPE_SERVE_MAX_CHARS)")
    assert messages["2mb_one_text"].startswith("text 0 has 2,000,000 characters")
    assert messages["2mb_many_texts"].startswith("64,516 texts in one request")
    assert messages["number"] == "text 0 is int, not a string"
    assert messages["dict_in_a_cell"] == "text 0 is dict, not a string"
    assert messages["nested_list_dict"].startswith("Invalid input.")  # MLflow's own refusal
    assert doc["server_alive"]
    assert all(mb > 0 for mb in doc["rss_mb"].values())
    assert any("uvicorn" in p["command"] for p in doc["server_processes"])
