"""Every bad input the ingest step can meet: one line naming the file/row/key, exit 1, no
traceback, and no output written."""

import json

import pytest
from conftest import separable_rows, write_csv
from typer.testing import CliRunner

from kdpipe.cli import app

GOOD = separable_rows(30)


def _folder(root, train, validation=None, test=None):
    write_csv(root / "train.csv", train)
    write_csv(root / "validation.csv", validation if validation is not None else GOOD[:6])
    write_csv(root / "test.csv", test if test is not None else GOOD[6:12])
    return root


def _case_missing_file(tmp):
    return tmp / "nope.csv", r"nope\.csv: file not found"


def _case_unknown_format(tmp):
    path = tmp / "data.xlsx"
    path.write_bytes(b"PK\x03\x04")
    return path, r"data\.xlsx: unknown format '\.xlsx'; use \.csv, \.jsonl, \.parquet, \.tsv"


def _case_missing_text_column(tmp):
    return write_csv(tmp / "d.csv", GOOD, header="sentence,label"), \
        r"d\.csv: no column 'text' \(columns: sentence, label\); set -S data\.text_column=NAME"


def _case_missing_label_column(tmp):
    return write_csv(tmp / "d.csv", GOOD, header="text,y"), \
        r"d\.csv: no column 'label' .*data\.label_column"


def _case_empty_text(tmp):
    rows = GOOD[:4] + [("", "pos")] + GOOD[4:]
    return write_csv(tmp / "d.csv", rows), r"d\.csv: row 5: text is empty or whitespace only"


def _case_whitespace_text(tmp):
    rows = GOOD[:2] + [("   \t ", "neg")] + GOOD[2:]
    return write_csv(tmp / "d.csv", rows), r"d\.csv: row 3: text is empty or whitespace only"


def _case_empty_label(tmp):
    rows = GOOD[:7] + [("fine text", "")] + GOOD[7:]
    return write_csv(tmp / "d.csv", rows), r"d\.csv: row 8: label is missing"


def _case_null_label_jsonl(tmp):
    path = tmp / "d.jsonl"
    lines = [json.dumps({"text": t, "label": lab}) for t, lab in GOOD[:3]]
    lines.append(json.dumps({"text": "ok text", "label": None}))
    path.write_text("\n".join(lines) + "\n")
    return path, r"d\.jsonl: row 4: label is missing \(None\)"


def _case_nan_label_parquet(tmp):
    import pandas as pd

    frame = pd.DataFrame({"text": [t for t, _ in GOOD],
                          "label": [1.0, 0.0] * 14 + [float("nan"), 1.0]})
    frame.to_parquet(tmp / "d.parquet")
    return tmp / "d.parquet", r"d\.parquet: row 29: label is missing"


def _case_unseen_label(tmp):
    folder = _folder(tmp / "f", GOOD, validation=GOOD[:3] + [("so so", "meh")])
    return folder, r"validation\.csv: row 4: label 'meh' never seen in train"


def _case_one_class(tmp):
    rows = [(t, "pos") for t, _ in GOOD]
    return write_csv(tmp / "d.csv", rows), r"d\.csv: only one class \('pos'\) in train"


def _case_non_utf8(tmp):
    path = tmp / "d.csv"
    write_csv(path, GOOD)
    data = path.read_bytes().splitlines(keepends=True)
    data[5] = b"caf\xe9 latin-1 text,pos\n"
    path.write_bytes(b"".join(data))
    return path, r"d\.csv: line 6: not valid UTF-8 \(byte 0xe9\); save the file as UTF-8"


def _case_malformed_row(tmp):
    path = tmp / "d.csv"
    write_csv(path, GOOD)
    with open(path, "a") as handle:
        handle.write("one,two,three\n")
    return path, rf"d\.csv: line {len(GOOD) + 2}: expected 2 fields, saw 3"


def _case_empty_split(tmp):
    folder = _folder(tmp / "f", GOOD, test=[])
    return folder, r"test\.csv: no rows"


def _case_empty_file(tmp):
    path = tmp / "d.csv"
    path.write_text("")
    return path, r"d\.csv: file is empty \(no header row\)"


def _case_bad_jsonl(tmp):
    path = tmp / "d.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": \n')
    return path, r"d\.jsonl: line 2: not valid JSON"


CASES = {name.removeprefix("_case_"): fn for name, fn in globals().items()
         if name.startswith("_case_")}


@pytest.fixture
def cli(tmp_path, monkeypatch, tiny_bert):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def invoke(*args):
        base = ["-S", f"teacher.checkpoint={tiny_bert}", "-S", "tracking.enabled=false",
                "-S", f"work_dir={tmp_path / 'work'}"]
        return runner.invoke(app, [*args, *base])

    return invoke


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_clear_line(cli, tmp_path, case):
    import re

    source, expected = CASES[case](tmp_path)
    result = cli("ingest", "-S", f"data.source={source}")
    assert result.exit_code == 1, result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.output
    assert re.search(expected, error_lines[0]), error_lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "work" / "prepared").exists()
    if (tmp_path / "work").exists():
        assert not list((tmp_path / "work").glob(".prepared*"))


def test_unknown_key_in_params_file(cli, tmp_path):
    (tmp_path / "params.yaml").write_text("ingest:\n  max_lenght: 3\n")
    result = cli("ingest")
    assert result.exit_code == 1
    assert "error: params.yaml with -S overrides: ingest.max_lenght: unknown key" in result.output


def test_wrong_type_in_override(cli):
    result = cli("ingest", "-S", "ingest.max_length=long")
    assert result.exit_code == 1
    assert "ingest.max_length: Input should be a valid integer" in result.output
    assert "got 'long'" in result.output


def test_real_cli_process_prints_one_line_and_no_traceback(tmp_path):
    import os
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "kdpipe", "ingest", "-S", f"data.source={tmp_path}/missing.csv",
         "-S", "tracking.enabled=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == f"error: {tmp_path}/missing.csv: file not found"
    assert "Traceback" not in done.stderr + done.stdout
