"""Reading a user's table, .xlsx workbook or CSV text, into a DataFrame with one-line errors that
name the file, sheet, row and column; the rules every format with a table shares."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from hpo_peft.core.errors import UserError

HEADER_ROWS = 2  # a table's first data row is row 2 of the file: its header is row 1


def _not_a_workbook(path: Path) -> str | None:
    """Why the file cannot be an .xlsx workbook, judged from its first bytes; None if it may be one."""
    with path.open("rb") as file:
        head = file.read(4096)
    if not head:
        return "it is empty"
    if head.startswith(b"PK"):  # a zip archive, as every .xlsx is
        return None
    if head.startswith(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"):
        return "it looks like an old Excel .xls workbook"
    if b"\0" in head:
        return "its content is not a spreadsheet"
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    if text[:15].lower().startswith(("<!doctype", "<html")):
        return "it looks like an HTML page"
    first_line = text.splitlines()[0] if text else ""
    return "it looks like CSV text" if any(sep in first_line for sep in ",;\t") else "it looks like plain text"


def is_csv_text(path: Path) -> bool:
    """Whether the file's first bytes look like CSV text (False for a workbook, or a missing file)."""
    try:
        return _not_a_workbook(path) == "it looks like CSV text"
    except OSError:
        return path.suffix.lower() in (".csv", ".tsv", ".txt")


def _open_workbook(path: Path) -> pd.ExcelFile:
    try:
        reason = _not_a_workbook(path)
    except OSError as err:
        raise UserError(f"{path}: cannot read the table ({err.strerror or err})") from None
    if reason is not None:
        raise UserError(f"{path}: cannot read the table: not an Excel .xlsx workbook ({reason}); save it as .xlsx")
    try:
        return pd.ExcelFile(path, engine="openpyxl")
    except Exception as err:  # zipfile and openpyxl raise many types for a damaged file
        raise UserError(f"{path}: cannot read the table: not a readable .xlsx workbook ({type(err).__name__}: {err})") from None


def read_first_sheet(path: Path, required: list[str]) -> pd.DataFrame:
    """The first sheet (the one the package reads); if it lacks columns, says which sheet was read
    and which other sheet, if any, has them."""
    with _open_workbook(path) as book:
        try:
            sheets = book.sheet_names
            table = pd.read_excel(book, sheet_name=sheets[0])
        except Exception as err:  # a damaged sheet inside a valid zip
            raise UserError(f"{path}: cannot read the table: not a readable .xlsx workbook ({type(err).__name__}: {err})") from None
        missing = [c for c in required if c not in table.columns]
        if not missing:
            return table
        message = (f"{path}: missing column(s) {missing} in sheet {sheets[0]!r}, the first sheet (the only one read); "
                   f"found {[plain(c) for c in table.columns]}")
        for other in sheets[1:]:
            try:
                header = pd.read_excel(book, sheet_name=other, nrows=0)
            except Exception:
                continue
            if all(c in header.columns for c in required):
                message += f"; sheet {other!r} has them: move it to be the first sheet"
                break
    raise UserError(message)


def read_any_table(path: Path, required: list[str]) -> pd.DataFrame:
    """An .xlsx workbook's first sheet, or CSV text (comma, semicolon or tab separated, as its
    header line shows), with the `required` columns; every cell of CSV text is read as text."""
    if not path.is_file():
        raise UserError(f"{path}: table not found")
    try:
        reason = _not_a_workbook(path)
    except OSError as err:
        raise UserError(f"{path}: cannot read the table ({err.strerror or err})") from None
    if reason is None:
        return read_first_sheet(path, required)
    if reason != "it looks like CSV text":
        raise UserError(f"{path}: cannot read the table: neither an .xlsx workbook nor CSV text ({reason})")
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:
            header = file.readline()
        separator = max(",;\t", key=header.count)
        table = pd.read_csv(path, sep=separator, dtype=str, keep_default_na=False, na_values=[""],
                            encoding="utf-8-sig")
    except (UnicodeDecodeError, pd.errors.ParserError, OSError) as err:
        raise UserError(f"{path}: cannot read the table as CSV text ({' '.join(str(err).split())})") from None
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {missing}; found {list(table.columns)}")
    return table


def plain(value: object) -> object:
    """A cell value as the user typed it: numpy scalars as Python values, 2.0 as 2."""
    value = value.item() if isinstance(value, np.generic) else value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def describe_cell(value: object) -> str:
    return "an empty cell" if pd.isna(value) else repr(plain(value))


def check_unique_names(path: Path, names: pd.Series, image_column: str) -> None:
    """Image names must be unique among all rows, used or skipped: a name listed twice could put
    one image in both the training and the validation shots, or under two labels."""
    given = names.notna().to_numpy()
    text = names.astype(str).to_numpy()
    repeated = pd.Series(text[given]).duplicated(keep=False).to_numpy()
    if not repeated.any():
        return
    rows = np.flatnonzero(given)[repeated] + HEADER_ROWS
    first = text[rows[0] - HEADER_ROWS]
    same = [str(r) for r in rows if text[r - HEADER_ROWS] == first]
    others = len({text[r - HEADER_ROWS] for r in rows}) - 1
    raise UserError(
        f"{path}: {image_column} {first!r} appears in rows {', '.join(same[:-1])} and {same[-1]}; image names must "
        f"be unique in a table (all rows count, used or skipped): keep one row per image"
        + (f" ({others} more name{'s' * (others > 1)} repeated)" if others else "")
    )


def check_names_given(path: Path, names: pd.Series, used: np.ndarray, column: str) -> None:
    """No used row has an empty `column` cell."""
    empty = (names.isna().to_numpy() | (names.astype(str).str.strip() == "").to_numpy()) & used
    if empty.any():
        raise UserError(f"{path}: row {int(np.flatnonzero(empty)[0]) + HEADER_ROWS}: empty {column!r}")


_NOTED: set[str] = set()


def note(message: str) -> None:
    """A one-line notice on stderr (what a reader skipped), once per process for the same line."""
    import sys

    if message not in _NOTED:
        _NOTED.add(message)
        print(f"hpo-peft: {message}", file=sys.stderr, flush=True)
