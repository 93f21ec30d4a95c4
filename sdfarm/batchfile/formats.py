"""Reading each format into items: YAML and JSON documents whole, .jsonl, .csv and .txt line by line
(a scan that keeps nothing, then the items one at a time); files read only when regular and small."""

from __future__ import annotations

import codecs
import contextlib
import csv
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final

from ..errors import MAX_PROBLEMS, BatchInvalid, InvalidInput, Problem, brief
from ..inputs import open_regular
from ..jobs import USER_FIELDS
from .documents import _JSON_LINES_NODES, _load_json, load_yaml
from .items import RawItem, _item_size, cap_problem

TOP_KEYS: Final = ("name", "seed", "defaults", "matrix", "items")
FORMATS: Final = {".yaml": "yaml", ".yml": "yaml", ".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".txt": "txt"}
MAX_FILE_BYTES: Final = 64 * 1024 * 1024


# ---------------------------------------------------------------- reading each format


def _key_line(data: Mapping[str, Any], key: str) -> int | None:
    lines = getattr(data, "key_lines", {})
    return lines.get(key, getattr(data, "line", None))


def _read_structured(text: str, source: str, fmt: str, max_items: int | None
                     ) -> tuple[dict[str, Any], list[RawItem]]:
    data, nodes = _load_json(text, source) if fmt == "json" else (load_yaml(text, source), 0)
    if fmt == "json" and nodes <= _JSON_LINES_NODES:
        try:  # the same data again, with line numbers (JSON is YAML); fall back to none
            with_lines = load_yaml(text, source)
            if with_lines == data:
                data = with_lines
        except BatchInvalid:
            pass
    if isinstance(data, list):
        data = {"items": data}
    if not isinstance(data, dict):
        raise BatchInvalid([Problem(source, None, None, "", "expected a mapping with 'items' or a list of items")])
    _check_top(data, source, max_items)
    return {k: data[k] for k in ("name", "seed", "defaults", "matrix") if k in data}, _items_of(data["items"], source)


def _check_top(data: dict[str, Any], source: str, max_items: int | None) -> None:
    problems = [
        Problem(source, _key_line(data, k), None, str(k), f"unknown top-level key (allowed: {', '.join(TOP_KEYS)})")
        for k in data
        if k not in TOP_KEYS
    ]
    items_data = data.get("items")
    if not isinstance(items_data, list) or not items_data:
        problems.append(Problem(source, _key_line(data, "items"), None, "items", "expected a non-empty list of items"))
    elif max_items is not None and len(items_data) > max_items:  # each item is at least one job
        problems.append(cap_problem(source, max_items))
    for key in ("defaults", "matrix"):
        if key in data and not isinstance(data[key], dict):
            problems.append(Problem(source, _key_line(data, key), None, key, "expected a mapping"))
    if problems:
        raise BatchInvalid(problems[:MAX_PROBLEMS], stopped=len(problems) > MAX_PROBLEMS)


def _items_of(items_data: list[Any], source: str) -> list[RawItem]:
    items: list[RawItem] = []
    problems: list[Problem] = []
    item_lines = getattr(items_data, "item_lines", [])
    for n, raw in enumerate(items_data, start=1):
        line = item_lines[n - 1] if n <= len(item_lines) else None
        if isinstance(raw, str):
            items.append(RawItem({"prompt": raw}, n, line))
        elif isinstance(raw, dict):
            items.append(RawItem(dict(raw), n, line, dict(getattr(raw, "key_lines", {}))))
        else:
            problems.append(Problem(source, line, n, "", f"expected a mapping or a prompt string, got {brief(raw)}"))
            if len(problems) >= MAX_PROBLEMS:
                raise BatchInvalid(problems, stopped=True)
    if problems:
        raise BatchInvalid(problems)
    return items


Lines = Callable[[], Iterator[tuple[int, str]]]  # (1-based line number, the line with its line break)
Entry = RawItem | Problem  # what reading a line format gives: an item, or a problem with one line


def _text_lines(text: str) -> Lines:
    def lines() -> Iterator[tuple[int, str]]:
        start, number = 0, 0
        while start < len(text):
            end = text.find("\n", start)
            end = len(text) if end < 0 else end + 1
            number += 1
            yield number, text[start:end]
            start = end
    return lines


def _file_lines(path: Path, source: str) -> Lines:
    """A file's lines, decoded one at a time (a UTF-8 sequence never holds a newline byte); each
    call reads the file again from its start, at most MAX_FILE_BYTES of it."""
    def lines() -> Iterator[tuple[int, str]]:
        try:
            f = open_regular(path, MAX_FILE_BYTES)
        except InvalidInput as e:
            raise BatchInvalid([_file_problem(source, f"cannot read: {e}")]) from None
        with f:
            offset, number = 0, 0
            while raw := f.readline(MAX_FILE_BYTES + 1 - offset):
                number += 1
                if offset + len(raw) > MAX_FILE_BYTES:
                    raise BatchInvalid([_file_problem(source, f"file is more than {MAX_FILE_BYTES} bytes"
                                                              f" (allowed: at most {MAX_FILE_BYTES})")])
                skip = len(codecs.BOM_UTF8) if number == 1 and raw.startswith(codecs.BOM_UTF8) else 0
                try:
                    line = raw[skip:].decode()
                except UnicodeDecodeError as e:
                    raise BatchInvalid([Problem(source, number, None, "", f"not UTF-8 text: {e.reason} at byte"
                                                                          f" {offset + skip + e.start}")]) from None
                offset += len(raw)
                yield number, line
    return lines


def _txt_items(lines: Lines, source: str) -> Iterator[Entry]:
    n = 0
    for number, line in lines():
        prompt = line.strip()
        if prompt and not prompt.startswith("#"):
            n += 1
            yield RawItem({"prompt": prompt}, n, number)


def _jsonl_items(lines: Lines, source: str) -> Iterator[Entry]:
    n = 0
    for number, line in lines():
        if not line.strip():
            continue
        n += 1
        try:
            obj, _ = _load_json(line.rstrip("\r\n"), source, number)
        except BatchInvalid as e:
            yield Problem(source, number, n, e.problems[0].field, e.problems[0].message)
            continue
        yield RawItem(obj, n, number) if isinstance(obj, dict) else Problem(source, number, n, "",
                                                                            "expected a JSON object")


def _csv_header(header: list[str] | None, source: str) -> list[str]:
    if not header:
        raise BatchInvalid([Problem(source, 1, None, "", "empty CSV: expected a header of field names")])
    columns = [h.strip() for h in header]
    allowed = (*USER_FIELDS, "count")
    problems = [Problem(source, 1, None, col, f"unknown column (allowed: {', '.join(allowed)})")
                for col in columns if col not in allowed]
    first: dict[str, int] = {}
    for number, col in enumerate(columns, start=1):
        if col in first and col in allowed:
            problems.append(Problem(source, 1, None, col, f"duplicate column (columns {first[col]} and {number};"
                                                          " each field may appear once)"))
        first.setdefault(col, number)
    if problems:
        raise BatchInvalid(problems[:MAX_PROBLEMS], stopped=len(problems) > MAX_PROBLEMS)
    return columns


def _csv_rows(lines: Lines, source: str) -> Iterator[tuple[int, list[str], list[str]]]:
    """(line, header, row) of each row that is not blank; the header checked first."""
    reader = csv.reader((line for _, line in lines()), strict=True)
    try:
        header = _csv_header(next(reader, None), source)
        for row in reader:
            if any(cell.strip() for cell in row):
                yield reader.line_num, header, row
    except csv.Error as e:
        raise BatchInvalid([Problem(source, reader.line_num, None, "", f"malformed CSV: {e}")]) from None


def _csv_items(lines: Lines, source: str) -> Iterator[Entry]:
    for n, (number, header, row) in enumerate(_csv_rows(lines, source), start=1):
        if len(row) != len(header):
            yield Problem(source, number, n, "", f"expected {len(header)} cells, got {len(row)}")
        else:
            yield RawItem({k: v for k, v in zip(header, row, strict=True) if v != ""}, n, number)


_LINE_READERS: Final = {"jsonl": _jsonl_items, "csv": _csv_items, "txt": _txt_items}
_EXPANDING: Final = ('"count"', '"seeds"', '"matrix"')  # a JSON line without these words is one plain item


def _sizes(fmt: str, lines: Lines, source: str, defaults: dict[str, Any]) -> Iterator[int]:
    """The number of jobs of each item of a line format, read without keeping the items."""
    plain = _item_size({}, defaults, {})
    if fmt == "txt":
        for _, line in lines():
            prompt = line.strip()
            if prompt and not prompt.startswith("#"):
                yield plain
    elif fmt == "csv":
        for _, header, row in _csv_rows(lines, source):
            cells = dict(zip(header, row, strict=False))
            yield _item_size({"count": cells["count"]}, defaults, {}) if cells.get("count") else plain
    else:
        for _, line in lines():
            if not line.strip():
                continue
            obj: Any = None
            if any(word in line for word in _EXPANDING):
                with contextlib.suppress(BatchInvalid):
                    obj, _ = _load_json(line, source)
            yield _item_size(obj, defaults, {}) if isinstance(obj, dict) else plain


def _scan(fmt: str, lines: Lines, source: str, defaults: dict[str, Any], max_jobs: int) -> None:
    """The first of two readings of a line format, keeping nothing: every line decoded (so a file
    that is not UTF-8 is refused now), the CSV header and syntax checked, and the jobs counted:
    a file of more than max_jobs, fifteen million lines say, is refused here."""
    total = 0
    for size in _sizes(fmt, lines, source, defaults):
        total += size
        if total > max_jobs:
            raise BatchInvalid([cap_problem(source, max_jobs)])


def read_batch(text: str, source: str, fmt: str, max_items: int | None = None
               ) -> tuple[dict[str, Any], list[RawItem]]:
    """Parse one batch file's text into (header, items). Raises BatchInvalid on syntax errors, and
    when there are more than max_items items (each is at least one job)."""
    text = text.removeprefix("\ufeff")
    if fmt in ("yaml", "json"):
        return _read_structured(text, source, fmt, max_items)
    if fmt not in _LINE_READERS:
        raise InvalidInput(f"{source}: unknown batch format {fmt!r}"
                           f" (allowed: {', '.join(sorted(set(FORMATS.values())))})")
    lines = _text_lines(text)
    if max_items is not None:
        _scan(fmt, lines, source, {}, max_items)
    entries = list(_LINE_READERS[fmt](lines, source))
    problems = [e for e in entries if isinstance(e, Problem)]
    if problems:
        raise BatchInvalid(problems[:MAX_PROBLEMS], stopped=len(problems) > MAX_PROBLEMS)
    return {}, [e for e in entries if isinstance(e, RawItem)]


def _read_document(path: Path, source: str) -> str:
    """A YAML or JSON file's text: a regular file, at most MAX_FILE_BYTES, UTF-8 (BOM skipped)."""
    try:
        with open_regular(path, MAX_FILE_BYTES) as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except InvalidInput as e:
        message = str(e)
        raise BatchInvalid([_file_problem(source, ("file " if message.startswith("is ") else "cannot read: ")
                                          + message)]) from None
    except OSError as e:
        raise BatchInvalid([_file_problem(source, f"cannot read: {e.strerror}")]) from None
    if len(data) > MAX_FILE_BYTES:
        raise BatchInvalid([_file_problem(source, f"file is more than {MAX_FILE_BYTES} bytes"
                                                  f" (allowed: at most {MAX_FILE_BYTES})")])
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BatchInvalid([_file_problem(source, f"not UTF-8 text: {e.reason} at byte {e.start}")]) from None


def _file_problem(source: str, message: str) -> Problem:
    return Problem(source, None, None, "", message)
