"""A .csv that is really tab- (or ;-, |-) separated is read with the delimiter its header
shows, with a one-line notice; a file whose header already fits its extension is never
re-split; a missing-column error lists the columns as the file really splits."""

import logging
import re

import pytest
from conftest import separable_rows, write_csv

from kdpipe.data.readers import read_file
from kdpipe.errors import DataError

ROWS = separable_rows(12) + [("commas, in a text", "pos")]


def _write(path, rows, delimiter, header=("text", "label")):
    lines = [delimiter.join(header)] + [delimiter.join(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(("delimiter", "name"), [("\t", "tab"), (";", "semicolon"),
                                                 ("|", "pipe")])
def test_csv_with_another_delimiter_is_read_with_a_notice(tmp_path, caplog, delimiter, name):
    path = _write(tmp_path / "reviews.csv", ROWS, delimiter)
    with caplog.at_level(logging.WARNING, logger="kdpipe.data.readers"):
        split = read_file(path, "text", "label")
    assert list(zip(split.texts, split.labels, strict=True)) == ROWS
    [record] = caplog.records
    assert record.getMessage() == (
        f"{path}: read as {name}-separated, not comma-separated as .csv says "
        f"(header {'text' + delimiter + 'label'!r})")


def test_tsv_that_is_comma_separated_is_read_with_a_notice(tmp_path, caplog):
    path = write_csv(tmp_path / "reviews.tsv", ROWS)
    split = read_file(path, "text", "label")
    assert list(zip(split.texts, split.labels, strict=True)) == ROWS
    assert "read as comma-separated, not tab-separated as .tsv says" in caplog.text


def test_a_csv_whose_header_fits_is_not_re_split(tmp_path, caplog):
    rows = [("a\tb; c|d", "pos"), ("e\tf", "neg")]
    split = read_file(write_csv(tmp_path / "d.csv", rows), "text", "label")
    assert split.texts == ["a\tb; c|d", "e\tf"]
    assert not caplog.records


def test_missing_column_error_lists_the_columns_as_the_file_splits(tmp_path):
    path = _write(tmp_path / "reviews.csv", ROWS, "\t", header=("sentence", "label"))
    with pytest.raises(DataError, match=re.escape(
            f"{path}: no column 'text' (columns: sentence, label; read as tab-separated); "
            "set -S data.text_column=NAME")):
        read_file(path, "text", "label")
    # ... and the advice works:
    assert read_file(path, "sentence", "label").texts == [t for t, _ in ROWS]


def test_one_column_csv_is_not_split_at_a_delimiter_in_its_texts(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text\na;b\nc;d\ne;f\n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}: no column 'label' (columns: text);")):
        read_file(path, "text", "label")
