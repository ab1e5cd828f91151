"""Read one labeled text file (CSV, TSV, JSONL, Parquet) into a ``RawSplit``.

Errors name the file and, where one is to blame, the row: the CSV/TSV reader decodes the bytes
itself so a bad byte is reported with its line, and JSONL is read line by line for the same
reason; pandas and pyarrow do the parsing.

A .csv whose header names the wanted columns only when split at tabs (or ``;``, ``|``) is read
with that delimiter, with a one-line notice: see ``_delimiter``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdpipe.errors import DataError

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet"}
DELIMITERS = {",": "comma", "\t": "tab", ";": "semicolon", "|": "pipe"}
_USUAL_DELIMITER = {"csv": ",", "tsv": "\t"}
# The header is looked for in this much of the file, so a huge file costs nothing extra.
_HEADER_CHARS = 64 * 1024

log = logging.getLogger(__name__)


@dataclass
class RawSplit:
    """Texts and raw labels of one split, with where each row came from.

    ``rows[i]`` is the 1-based data row of ``texts[i]`` in ``origin`` (the header not
    counted), so an error about it can point there.
    """

    origin: str
    texts: list[Any]
    labels: list[Any]
    rows: list[int | str] = field(default_factory=list)  # str: "file:row" in a folder
    label_names: list[str] | None = None

    def __post_init__(self) -> None:
        if not self.rows:
            self.rows = list(range(1, len(self.texts) + 1))


def file_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        known = ", ".join(sorted(FORMATS))
        raise DataError(f"{path}: unknown format {path.suffix or '(no extension)'!r}; use {known}")
    return fmt


def read_file(path: Path, text_column: str, label_column: str | None) -> RawSplit:
    """Read ``path`` by its extension; the named columns must exist. ``label_column`` None:
    texts without labels (every label None)."""
    fmt = file_format(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    wanted = (text_column,) if label_column is None else (text_column, label_column)
    read_as = ""
    if fmt in _USUAL_DELIMITER:
        text = _decode(path)
        delimiter = _delimiter(path, text, fmt, wanted)
        columns = _read_delimited(path, text, delimiter)
        if delimiter != _USUAL_DELIMITER[fmt]:
            read_as = f"; read as {DELIMITERS[delimiter]}-separated"
    elif fmt == "jsonl":
        columns = _read_jsonl(path)
    else:
        columns = _read_parquet(path)
    for name, option in zip(wanted, ("text_column", "label_column"), strict=False):
        if name not in columns:
            have = ", ".join(map(str, columns)) or "none"
            raise DataError(
                f"{path}: no column {name!r} (columns: {have}{read_as}); "
                f"set -S data.{option}=NAME"
            )
    texts = columns[text_column]
    labels = columns[label_column] if label_column is not None else [None] * len(texts)
    return RawSplit(str(path), texts, labels)


def _delimiter(path: Path, text: str, fmt: str, wanted: tuple[str, ...]) -> str:
    """The delimiter to read ``text`` with: the extension's, unless the header is one column
    at it and names the ``wanted`` columns at another (tab, comma, ``;``, ``|``): then that
    one, with a one-line notice.

    Such a file is read, not refused: its header leaves no doubt which delimiter was meant
    (read with the extension's, it would be one column and only an error), there is no
    setting to name a delimiter, and renaming is not always the user's to do (an object in a
    bucket, a file in someone's DVC repository). A header that splits at the extension's
    delimiter is never second-guessed, so no file that reads today changes meaning.
    """
    usual = _USUAL_DELIMITER[fmt]
    head = text[:_HEADER_CHARS]
    fields = {d: _header_fields(head, d) for d in DELIMITERS}
    if all(name in fields[usual] for name in wanted) or len(fields[usual]) > 1:
        return usual
    found = next((d for d in DELIMITERS if all(name in fields[d] for name in wanted)), None)
    if found is None:
        # Split the header where it has the most columns; read_file's missing-column error
        # then lists them and says how the file was split, and naming one of them makes the
        # next read find this delimiter above. Not csv.Sniffer: its regexes took 5 s on
        # 64 KB of quoted one-column text (measured), and it guesses from the rows too.
        widest = max(DELIMITERS, key=lambda d: len(fields[d]))
        return widest if len(fields[widest]) > 1 else usual
    header = head.splitlines()[0] if head else ""
    log.warning("%s: read as %s-separated, not %s-separated as %s says (header %s)", path,
                DELIMITERS[found], DELIMITERS[usual], path.suffix, repr(header[:80]))
    return found


def _header_fields(head: str, delimiter: str) -> list[str]:
    try:
        return next(csv.reader(io.StringIO(head), delimiter=delimiter), [])
    except csv.Error:
        return []


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        byte = data[exc.start : exc.start + 1].hex()
        raise DataError(
            f"{path}: line {line}: not valid UTF-8 (byte 0x{byte}); save the file as UTF-8"
        ) from None


def _read_delimited(path: Path, text: str, delimiter: str) -> dict[str, list[Any]]:
    import pandas as pd

    try:
        frame = pd.read_csv(
            io.StringIO(text),
            sep=delimiter,
            dtype=str,
            keep_default_na=False,
            quoting=csv.QUOTE_MINIMAL,
        )
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty (no header row)") from None
    except pd.errors.ParserError as exc:
        raise DataError(f"{path}: {_parser_message(str(exc))}") from None
    return {str(name): frame[name].tolist() for name in frame.columns}


def _parser_message(message: str) -> str:
    found = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", message)
    if found:
        want, line, got = found.groups()
        return (
            f"line {line}: expected {want} fields, saw {got} "
            "(quote texts that contain the delimiter)"
        )
    first = message.strip().splitlines()[0] if message.strip() else "unknown error"
    return f"malformed file: {first}"


def _read_jsonl(path: Path) -> dict[str, list[Any]]:
    text = _decode(path)
    records: list[dict[str, Any]] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {line_no}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {line_no}: expected a JSON object per line")
        records.append(record)
    names: dict[str, None] = {}
    for record in records:
        names.update(dict.fromkeys(record))
    return {name: [r.get(name) for r in records] for name in names}


def _read_parquet(path: Path) -> dict[str, list[Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    return {name: table.column(name).to_pylist() for name in table.column_names}


@dataclass
class Source:
    """The splits found in a source (train always; validation/test when present)."""

    splits: dict[str, RawSplit]
    provenance: dict[str, Any] = field(default_factory=dict)
