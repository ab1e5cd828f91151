"""The served model's limits: texts per request and characters per text, read from
KDPIPE_SERVE_MAX_TEXTS and KDPIPE_SERVE_MAX_CHARS when the model loads; past either, the
whole request is refused with INVALID_PARAMETER_VALUE and a one-line message that MLflow's
scoring server cannot turn into a copy of the input."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from test_registry import keyword_model

from kdpipe.errors import KdpipeError
from kdpipe.serving.pyfunc_model import (
    ARTIFACT,
    MAX_CHARS,
    MAX_CHARS_VAR,
    MAX_TEXTS,
    MAX_TEXTS_VAR,
    InputRefused,
    Limits,
    TextClassifier,
    check_limits,
)


def test_limits_default_where_the_variables_are_unset_or_empty():
    assert Limits.from_environment({}) == Limits(MAX_TEXTS, MAX_CHARS) == Limits()
    assert Limits.from_environment({MAX_TEXTS_VAR: "", MAX_CHARS_VAR: " "}) == Limits()
    assert (MAX_TEXTS, MAX_CHARS) == (1024, 10_000)


def test_limits_come_from_the_variables():
    limits = Limits.from_environment({MAX_TEXTS_VAR: "8", MAX_CHARS_VAR: " 50 "})
    assert limits == Limits(max_texts=8, max_chars=50)


@pytest.mark.parametrize("raw", ["0", "-3", "ten", "1.5"])
def test_a_limit_that_is_not_a_whole_number_from_1_is_an_error_naming_it(raw):
    with pytest.raises(KdpipeError) as caught:
        Limits.from_environment({MAX_CHARS_VAR: raw})
    assert str(caught.value) == (f"{MAX_CHARS_VAR}={raw!r}: expected a whole number >= 1 "
                                 "(default 10000)")


def test_texts_at_the_limits_pass():
    check_limits(["abcde", "", "xy"], Limits(max_texts=3, max_chars=5))
    check_limits([], Limits(max_texts=1, max_chars=1))


def test_one_text_too_many_refuses_the_request():
    with pytest.raises(InputRefused) as caught:
        check_limits(["a"] * 1025, Limits())
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
    assert caught.value.message == ("1,025 texts in one request; the limit is 1,024 "
                                    "(KDPIPE_SERVE_MAX_TEXTS): send them in several requests")


def test_one_character_too_many_refuses_the_request_and_names_the_text():
    with pytest.raises(InputRefused) as caught:
        check_limits(["fine", "abcdef"], Limits(max_texts=3, max_chars=5))
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
    assert caught.value.message == (
        "text 1 has 6 characters; the limit is 5 (KDPIPE_SERVE_MAX_CHARS), and the model "
        "reads only its first tokens anyway: send a shorter text")


def test_a_refusal_keeps_its_one_line_when_the_scoring_server_rewrites_it():
    refusal = InputRefused("text 0 is int, not a string")
    # What mlflow.pyfunc.scoring_server.invocations does to a model's MlflowException.
    refusal.message = f"Failed to predict data '{'x' * 1000}'. \nError: {refusal.message}"
    assert refusal.message == "text 0 is int, not a string"
    assert refusal.get_http_status_code() == 400
    assert json.loads(refusal.serialize_as_json())["message"] == "text 0 is int, not a string"


@pytest.fixture(scope="module")
def keyword_folder(tmp_path_factory, tiny_bert):
    return keyword_model(tmp_path_factory.mktemp("limits") / "model", tiny_bert, ["neg", "pos"])


def loaded(folder) -> TextClassifier:
    model = TextClassifier()
    model.load_context(SimpleNamespace(artifacts={ARTIFACT: str(folder)}))
    return model


def test_the_model_reads_its_limits_when_it_loads(keyword_folder, monkeypatch):
    monkeypatch.setenv(MAX_TEXTS_VAR, "2")
    monkeypatch.setenv(MAX_CHARS_VAR, "12")
    model = loaded(keyword_folder)
    monkeypatch.setenv(MAX_TEXTS_VAR, "1")  # after loading: no effect
    assert model.limits == Limits(max_texts=2, max_chars=12)
    assert model.predict(None, ["good", "lovely film"])["label"].tolist() == ["pos", "pos"]
    with pytest.raises(InputRefused, match="3 texts in one request; the limit is 2"):
        model.predict(None, ["good", "bad", "fine"])
    with pytest.raises(InputRefused, match="text 0 has 13 characters; the limit is 12"):
        model.predict(None, {"text": ["a" * 13]})


def test_a_bad_limit_stops_the_model_loading(keyword_folder, monkeypatch):
    monkeypatch.setenv(MAX_TEXTS_VAR, "none")
    with pytest.raises(KdpipeError, match="KDPIPE_SERVE_MAX_TEXTS='none'"):
        loaded(keyword_folder)
