"""Property-based tests: whatever text and labels arrive, ingest either prepares the data or
stops with a one-line ``KdpipeError`` (never another exception), and ``Predictor.predict``
answers every string with a probability distribution over the labels."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import prepared_config, save_fresh_student
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kdpipe.config import validate
from kdpipe.errors import KdpipeError
from kdpipe.models.teacher import load_tokenizer
from kdpipe.serving.predictor import Predictor
from kdpipe.steps import export, ingest

QUICK = settings(max_examples=40, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture,
                                        HealthCheck.too_slow])
# Any code point Python can encode as UTF-8 (no lone surrogates), control characters included.
ANY_TEXT = st.text(st.characters(codec="utf-8"), max_size=300)
LABEL = st.one_of(st.sampled_from(["pos", "neg", "neutral"]), st.integers(-3, 3),
                  st.floats(allow_nan=True, allow_infinity=True), st.none(), st.booleans(),
                  ANY_TEXT)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_bert):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("hostile")
    cfg = prepared_config(root, tiny_bert, student={"arch": "textcnn", "embedding_dim": 16,
                                                    "textcnn": {"num_filters": 4}})
    save_fresh_student(root / "student", cfg.student, tiny_bert, load_tokenizer(str(tiny_bert)))
    export.run(cfg, root / "student", cfg.paths.prepared, root / "export")
    return root / "export"


@QUICK
@given(texts=st.lists(ANY_TEXT, min_size=1, max_size=8))
def test_predictor_answers_any_unicode(folder, texts):
    predictions = Predictor(folder, threads=1).predict(texts)
    assert len(predictions) == len(texts)
    for p in predictions:
        assert p.label in p.probabilities
        assert abs(sum(p.probabilities.values()) - 1) < 1e-5
        assert all(np.isfinite(v) and 0 <= v <= 1 for v in p.probabilities.values())


def test_predictor_edge_cases(folder):
    predictor = Predictor(folder, threads=1)
    long_text = "word " * 50_000  # cut to max_length by the tokenizer
    cases = ["", " ", "\x00\x01\x1b[31m", "\u200b\ufeff", "🙂" * 500, long_text, "a\r\nb\tc"]
    probs = predictor.predict_proba(cases)
    assert probs.shape == (len(cases), 2)
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    assert predictor.predict("") == predictor.predict([""])
    for bad in (None, 3, [b"bytes"], ["ok", None], {"text": "x"}):
        with pytest.raises(KdpipeError):
            predictor.predict(bad)


# Mostly well-formed rows (two labels, non-blank texts of any script), so that both outcomes
# occur: ingest must prepare what it can, not only refuse.
PLAUSIBLE = st.lists(st.tuples(ANY_TEXT.map(lambda t: "w" + t), st.sampled_from(["pos", "neg"])),
                     min_size=20, max_size=40)


@QUICK
@given(rows=st.one_of(st.lists(st.tuples(ANY_TEXT, LABEL), max_size=40), PLAUSIBLE),
       fmt=st.sampled_from(["jsonl", "csv"]))
def test_ingest_prepares_or_says_why(tmp_path_factory, tiny_bert, rows, fmt):
    root = tmp_path_factory.mktemp("ingest")
    source = root / f"data.{fmt}"
    if fmt == "jsonl":
        source.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows),
                          encoding="utf-8")
    else:
        import pandas as pd

        pd.DataFrame({"text": [t for t, _ in rows], "label": [y for _, y in rows]}).to_csv(
            source, index=False)
    cfg = validate({"work_dir": str(root / "work"), "tracking": {"enabled": False},
                    "data": {"source": str(source)}, "teacher": {"checkpoint": str(tiny_bert)},
                    "ingest": {"max_length": 32}}, "test")
    try:
        result = ingest.run(cfg, cfg.paths.prepared)
    except KdpipeError as exc:
        event("refused")
        message = str(exc)
        assert message and "\n" not in message.strip()
        assert not cfg.paths.prepared.exists()  # nothing half-written
    else:
        event("prepared")
        assert result.metrics["rows_train"] >= 1
        assert (cfg.paths.prepared / "train.parquet").is_file()
    finally:
        shutil.rmtree(root, ignore_errors=True)
