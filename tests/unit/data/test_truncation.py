"""Texts longer than ingest.max_length tokens: counted per split in the summary and the data
card (ingest.truncation: keep), or refused with the file, row and length (refuse). Counting
tokenizes a bounded prefix of each text, never a huge text whole unless the prefix cannot
decide. The tiny teacher's tokenizer makes "good" one token, plus [CLS] and [SEP]."""

import json
import re

import pytest
from conftest import separable_rows, write_csv
from typer.testing import CliRunner

from kdpipe.cli import app
from kdpipe.errors import DataError
from kdpipe.steps import ingest

SHORT = separable_rows(40)  # at most 8 words + a number: under 16 tokens
LONG_20 = "good " * 20  # 22 tokens, 99 characters once stripped
LONG_40 = "good " * 40  # 42 tokens, 199 characters


@pytest.fixture
def folder(tmp_path):
    """train row 3 and row 5, and test row 2, are over 16 tokens."""
    root = tmp_path / "ds"
    train = SHORT[:2] + [(LONG_20, "pos")] + SHORT[2:3] + [(LONG_40, "neg")] + SHORT[3:20]
    write_csv(root / "train.csv", train)
    write_csv(root / "validation.csv", SHORT[20:30])
    write_csv(root / "test.csv", SHORT[30:31] + [(LONG_20, "pos")] + SHORT[31:])
    return root


def _card(cfg):
    return json.loads((cfg.paths.prepared / "data_card.json").read_text())


def test_long_texts_are_counted_per_split(make_config, folder):
    cfg = make_config(**{"data.source": str(folder), "ingest.max_length": 16})
    result = ingest.run(cfg, cfg.paths.prepared)
    lengths = _card(cfg)["token_length"]
    assert lengths["train"]["truncated"] == {"texts": 2, "longest_tokens": 42,
                                             "longest_chars": 199}
    assert lengths["validation"]["truncated"] == {"texts": 0, "longest_tokens": None,
                                                  "longest_chars": None}
    assert lengths["test"]["truncated"] == {"texts": 1, "longest_tokens": 22,
                                            "longest_chars": 99}
    assert result.summary.endswith(
        ", 3 texts cut at 16 tokens (train 2, test 1; longest 42 tokens, 199 chars)")
    assert (result.metrics["truncated_train"], result.metrics["truncated_test"]) == (2, 1)


def test_no_long_text_is_said_too(make_config, folder):
    cfg = make_config(**{"data.source": str(folder)})
    assert ingest.run(cfg, cfg.paths.prepared).summary.endswith(", no text over 128 tokens")
    assert _card(cfg)["token_length"]["train"]["truncated"]["texts"] == 0


def test_refuse_names_the_file_row_and_length(make_config, folder):
    cfg = make_config(**{"data.source": str(folder), "ingest.max_length": 16,
                         "ingest.truncation": "refuse"})
    with pytest.raises(DataError, match=re.escape(
            f"{folder / 'train.csv'}: row 3: text is 22 tokens (99 characters), more than "
            "ingest.max_length=16 (3 texts in all); shorten it, raise ingest.max_length to 22, "
            "or set -S ingest.truncation=keep to let the tokenizer cut it")):
        ingest.run(cfg, cfg.paths.prepared)
    assert not cfg.paths.prepared.exists()


def test_refuse_does_not_advise_a_max_length_beyond_the_limit(make_config, tmp_path):
    rows = SHORT[:5] + [("good " * 10_000, "pos")] + SHORT[5:]  # over 8,192 tokens
    source = write_csv(tmp_path / "d.csv", rows)
    cfg = make_config(**{"data.source": str(source), "ingest.truncation": "refuse"})
    with pytest.raises(DataError, match=re.escape(
            f"{source}: row 6: text is 8,192+ tokens (49,999 characters), more than "
            "ingest.max_length=128; shorten it, or set -S ingest.truncation=keep")):
        ingest.run(cfg, cfg.paths.prepared)


def test_refuse_is_one_line_from_the_cli(tmp_path, tiny_bert, folder, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [
        "ingest", "-S", f"data.source={folder}", "-S", "ingest.max_length=16",
        "-S", "ingest.truncation=refuse", "-S", f"teacher.checkpoint={tiny_bert}",
        "-S", "tracking.enabled=false", "-S", f"work_dir={tmp_path / 'work'}"])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "train.csv: row 3: text is 22 tokens" in errors[0]
    assert "Traceback" not in result.output


def test_text_over_the_largest_max_length_is_still_counted(make_config, tmp_path):
    rows = SHORT + [("good " * 9_000, "pos")]  # 9,002 tokens, max_length at its limit 8,192
    cfg = make_config(**{"data.source": str(write_csv(tmp_path / "d.csv", rows)),
                         "ingest.max_length": 8192})
    ingest.run(cfg, cfg.paths.prepared)
    lengths = _card(cfg)["token_length"]
    assert sum(lengths[s]["truncated"]["texts"] for s in ("train", "validation", "test")) == 1


class _Spy:
    """The tiny tokenizer, recording the longest text it was given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, 0

    def __call__(self, texts, **kwargs):
        self.longest = max(self.longest, *map(len, texts))
        return self.tokenizer(texts, **kwargs)


def test_counting_tokenizes_a_bounded_prefix(tiny_tokenizer):
    spy = _Spy(tiny_tokenizer)
    lengths = ingest.count_tokens(["good " * 100, "good bad"], spy, cap=16)
    assert lengths.tolist() == [16, 4]  # 16: at least 16
    assert spy.longest == 16 * 12  # 500 characters, 192 of them tokenized


def test_a_prefix_that_cannot_decide_is_counted_whole(tiny_tokenizer):
    # The first 384 characters (32 * 12) hold 20 tokens, fewer than the cap, so the prefix
    # cannot tell the whole text's count: it is tokenized whole.
    text = "x" * 300 + " good" * 20
    assert ingest.count_tokens([text], tiny_tokenizer, cap=32).tolist() == [23]
