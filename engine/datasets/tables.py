"""Reading operators' files one record at a time: csv, xlsx, docx, txt and json.

Each reader yields ``Record``s (where in the file, and the text of each known column)
without holding the file: csv and txt are read line by line, xlsx in openpyxl's
read-only mode. A docx is a zipped XML document python-docx reads whole (such files are
small); json is decoded whole too, and is meant for device and settings profiles.
"""

from __future__ import annotations

import contextlib
import csv
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import msgspec

from engine.datasets.columns import REQUIRED, field_of, normalised
from schemas.events import DatasetFormat, DatasetKind

SNIFF_BYTES = 64 * 1024
MAX_LINE = 1024 * 1024  # characters in one line of a csv or txt file
MAX_JSON = 64 * 1024 * 1024  # json is decoded whole (device and settings profiles are small)
MAX_UNZIPPED = 1024 * 1024 * 1024  # xlsx: rows stream, shared strings are held
MAX_UNZIPPED_DOCX = 256 * 1024 * 1024  # docx: python-docx holds the document whole
csv.field_size_limit(1024 * 1024)  # one cell of a big file may be long, not unbounded


class Problem(msgspec.Struct, frozen=True):
    """What is wrong with one place of a file: ``row`` (1-based, a table's header is row
    1; a txt file's line; a json list's item), ``field`` and ``rule``."""

    row: int
    field: str
    rule: str
    place: str = ""  # "row 7", "line 7", "cell B7", "item 7", "file"


class FileRefused(Exception):
    """The file cannot be read as a table of this kind at all (no URL column, not UTF-8)."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(f"{problem.field}: {problem.rule}")
        self.problem = problem


def _file_problem(rule: str) -> Problem:
    return Problem(0, "file", rule, "file")


@dataclass(frozen=True, slots=True)
class Record:
    row: int
    place: str
    values: dict[str, Any]  # row field -> cell text (tables) or value (json)
    problem: Problem | None = None  # what makes the record unreadable as a row


def records(
    path: Path, kind: DatasetKind, fmt: DatasetFormat, notes: list[Problem]
) -> Iterator[Record]:
    """The file's records; ``notes`` gets what is worth a warning (columns not read)."""
    if fmt == "csv":
        return _csv(path, kind, notes)
    if fmt == "txt":
        return _txt(path, kind)
    if fmt == "xlsx":
        return _xlsx(path, kind, notes)
    if fmt == "docx":
        return _docx(path, kind, notes)
    return _json(path, kind)


# -- tables -------------------------------------------------------------------------


def _table(
    rows: Iterable[list[str]], kind: DatasetKind, place: str, notes: list[Problem]
) -> Iterator[Record]:
    """Rows of cells with a header row naming the columns (the first row that is not
    empty); a table of one column whose first cell is a URL is a list of URLs (targets)
    or of proxy URLs (proxies). Rows are numbered as the file has them, from 1."""
    numbered = enumerate(rows, start=1)
    first = next(((n, row) for n, row in numbered if any(cell.strip() for cell in row)), None)
    if first is None:
        return
    at, header = first
    fields = [field_of(kind, cell) for cell in header]
    if not any(fields):
        if _looks_like_url(header):
            yield from _lines(_chain([(at, header)], numbered), kind, place)
            return
        example = ", ".join(REQUIRED[kind])
        rule = f"must name the columns, e.g. {example}"
        raise FileRefused(Problem(at, "header", rule, f"{place} {at}"))
    missing = [name for name in REQUIRED[kind] if name not in fields]
    if missing:
        raise FileRefused(Problem(at, missing[0], "column is required", f"{place} {at}"))
    for cell, name in zip(header, fields, strict=True):
        if name is None and cell.strip():
            rule = f"is not a column of {kind}: not read"
            notes.append(Problem(at, cell.strip(), rule, f"{place} {at}"))
    width = len(header)
    for n, cells in numbered:
        values = {
            name: cell.strip()
            for name, cell in zip(fields, cells, strict=False)
            if name is not None and cell.strip()
        }
        if any(cell.strip() for cell in cells[width:]):
            # a delimiter inside a cell that was not quoted: the row's values are shifted
            rule = f"has {len(cells)} cells, the header {width} (quote cells with delimiters)"
            yield Record(n, f"{place} {n}", {}, Problem(n, "", rule, f"{place} {n}"))
        elif values or any(cell.strip() for cell in cells):
            yield Record(n, f"{place} {n}", values)


def _chain(
    first: list[tuple[int, list[str]]], rest: Iterator[tuple[int, list[str]]]
) -> Iterator[tuple[int, list[str]]]:
    yield from first
    yield from rest


def _looks_like_url(cells: list[str]) -> bool:
    text = [cell.strip() for cell in cells if cell.strip()]
    return len(text) == 1 and "://" in text[0]


def _lines(
    rows: Iterable[tuple[int, list[str]]], kind: DatasetKind, place: str
) -> Iterator[Record]:
    """One URL per (numbered) row: a target URL, or a proxy as scheme://user:pass@host:port."""
    key = "url" if kind == "targets" else "proxy_url"
    for n, cells in rows:
        text = next((cell.strip() for cell in cells if cell.strip()), "")
        if text and not text.startswith("#"):
            yield Record(n, f"{place} {n}", {key: text})


def _bounded_lines(f: TextIO) -> Iterator[str]:
    """The file's lines, refusing one longer than ``MAX_LINE`` before it is read whole."""
    while line := f.readline(MAX_LINE + 1):
        if len(line) > MAX_LINE:
            raise FileRefused(_file_problem(f"has a line longer than {MAX_LINE} characters"))
        yield line


def _csv(path: Path, kind: DatasetKind, notes: list[Problem]) -> Iterator[Record]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        try:
            sample = f.read(SNIFF_BYTES)
            f.seek(0)
            dialect: type[csv.Dialect] | csv.Dialect = csv.excel
            with contextlib.suppress(csv.Error):  # one column, or too little to tell: commas
                dialect = csv.Sniffer().sniff(sample, delimiters=",;\t|")
            yield from _table(csv.reader(_bounded_lines(f), dialect), kind, "row", notes)
        except UnicodeDecodeError as err:
            raise FileRefused(
                Problem(0, "file", f"must be UTF-8 text ({err.reason})", "file")
            ) from None
        except csv.Error as err:
            raise FileRefused(_file_problem(f"is not valid CSV ({err})")) from None


def _txt(path: Path, kind: DatasetKind) -> Iterator[Record]:
    with open(path, encoding="utf-8-sig") as f:
        try:
            lines = enumerate(([line] for line in _bounded_lines(f)), start=1)
            yield from _lines(lines, kind, "line")
        except UnicodeDecodeError as err:
            raise FileRefused(
                Problem(0, "file", f"must be UTF-8 text ({err.reason})", "file")
            ) from None


def _cell_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # a port typed as 8080 is stored as 8080.0
    return str(value)


def _unzipped_within(path: Path, limit: int, what: str) -> None:
    """A zipped document (xlsx, docx) whose parts unpack beyond ``limit`` is refused before
    it is opened: python-docx (and openpyxl for shared strings) hold parts whole."""
    try:
        with zipfile.ZipFile(path) as z:
            unpacked = sum(info.file_size for info in z.infolist())
    except (zipfile.BadZipFile, OSError):
        raise FileRefused(_file_problem(f"is not an {what} file (not a zip archive)")) from None
    if unpacked > limit:
        raise FileRefused(_file_problem(f"unpacks to more than {limit // 2**20} MiB"))


def _xlsx(path: Path, kind: DatasetKind, notes: list[Problem]) -> Iterator[Record]:
    import openpyxl  # type: ignore[import-untyped]  # imported when needed: most API processes never read a workbook

    _unzipped_within(path, MAX_UNZIPPED, "xlsx")
    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as err:  # openpyxl raises many kinds for a file that is no workbook
        raise FileRefused(
            Problem(0, "file", f"is not an xlsx workbook ({type(err).__name__})", "file")
        ) from None
    try:
        sheet = book.worksheets[0]
        rows = ([_cell_text(v) for v in row] for row in sheet.iter_rows(values_only=True))
        yield from _table(rows, kind, "row", notes)
    finally:
        book.close()


def _docx(path: Path, kind: DatasetKind, notes: list[Problem]) -> Iterator[Record]:
    import docx  # imported when needed, as openpyxl

    _unzipped_within(path, MAX_UNZIPPED_DOCX, "docx")
    try:
        document = docx.Document(str(path))
    except Exception as err:  # python-docx raises many kinds for a file that is no document
        raise FileRefused(
            Problem(0, "file", f"is not a docx document ({type(err).__name__})", "file")
        ) from None
    if document.tables:
        rows = ([cell.text for cell in row.cells] for row in document.tables[0].rows)
        yield from _table(rows, kind, "row", notes)
        return
    paragraphs = ([paragraph.text] for paragraph in document.paragraphs)
    yield from _lines(enumerate(paragraphs, start=1), kind, "paragraph")


def _json(path: Path, kind: DatasetKind) -> Iterator[Record]:
    if path.stat().st_size > MAX_JSON:
        limit = MAX_JSON // 2**20
        raise FileRefused(_file_problem(f"json files are read whole: at most {limit} MiB"))
    try:
        loaded = msgspec.json.decode(path.read_bytes())
    except msgspec.DecodeError as err:
        raise FileRefused(_file_problem(f"is not JSON ({err})")) from None
    items = loaded if isinstance(loaded, list) else [loaded]
    for n, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            yield Record(n, f"item {n}", {"": item})
            continue
        if kind != "settings":  # a settings profile's fields are the job settings' own
            item = {field_of(kind, str(k)) or normalised(str(k)): v for k, v in item.items()}
        yield Record(n, f"item {n}", item)
