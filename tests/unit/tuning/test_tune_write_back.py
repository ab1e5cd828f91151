"""The best settings written into the params file: comments and order kept, nothing written
when the result would not load."""

from __future__ import annotations

import pytest

from kdpipe.config import load_config
from kdpipe.errors import ConfigError
from kdpipe.tuning.write_back import write_settings

PARAMS = """\
# why these settings
seed: 7
distill:
  lr: 0.002  # the default
  epochs: 2
student:
  arch: bilstm
"""


def test_values_replace_the_old_ones_and_comments_stay(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS)
    changed = write_settings(path, {"distill.lr": 0.0031, "distill.epochs": 2,
                                    "student.dropout": 0.1})
    assert changed == ["distill.lr 0.002 → 0.0031", "student.dropout (default) → 0.1"]
    text = path.read_text()
    assert "# why these settings" in text and "# the default" in text
    assert text.index("seed") < text.index("distill") < text.index("student")
    cfg = load_config(path)
    assert (cfg.seed, cfg.distill.lr, cfg.distill.epochs, cfg.student.dropout) == (
        7, 0.0031, 2, 0.1)


def test_a_missing_params_file_is_made_with_the_values_alone(tmp_path):
    path = tmp_path / "params.yaml"
    write_settings(path, {"fractionate.fraction": 0.4})
    assert path.read_text() == "fractionate:\n  fraction: 0.4\n"


def test_a_result_that_would_not_load_leaves_the_file_as_it_was(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS)
    with pytest.raises(ConfigError, match="distill.alpha"):
        write_settings(path, {"distill.alpha": 3.0})
    assert path.read_text() == PARAMS


def test_a_value_where_a_section_is_needed_is_named(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("distill: 3\n")
    with pytest.raises(ConfigError, match="distill is a value, not a section"):
        write_settings(path, {"distill.lr": 0.1})
    assert path.read_text() == "distill: 3\n"
