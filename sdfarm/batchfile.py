"""Batch files in, validated RenderJobs out: all or nothing.

Formats, chosen by suffix:
- .yaml/.yml/.json: {name, seed, defaults, matrix, items}; an item is a mapping or a bare prompt
- .jsonl: one item (a JSON object) per line
- .csv: a header of field names, one item per row (empty cell = not set)
- .txt: one prompt per line; blank lines and lines starting with # are skipped

Every item may set any job field (sdfarm.jobs.USER_FIELDS) plus:
- count: N images with N seeds; seeds: [s1, s2, ...] explicit seeds
- matrix: {field: [values...]} expanded as a cartesian product (YAML/JSON; also top level)
Seeds not given are derived from the batch seed and the item's position, and always recorded.

Hostile files cost little: only a regular file is read, up to MAX_FILE_BYTES, decoded as UTF-8
(a byte-order mark is skipped). .jsonl, .csv and .txt are read line by line, twice: a scan that
keeps nothing (encoding, CSV syntax, the jobs counted against the cap), then the items one at a
time as the stream is consumed, so a file of fifteen million lines, or of a million bad items,
is refused without being held. A YAML or JSON document is parsed whole, so it may hold at most
MAX_DOCUMENT_NODES values, aliases counted at their expanded size, nested at most MAX_DEPTH deep,
with no key twice and no integer longer than MAX_INT_DIGITS. The job cap is counted before any
job is validated, and validation stops after MAX_PROBLEMS problems. No user value enters a
message but through `brief`; numbers are strict (no true/false, no 2.9 for an integer); a prompt
may hold tabs and line breaks but no other control character.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import hashlib
import itertools
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml
from pydantic import BaseModel, ValidationError

from .errors import MAX_PROBLEMS, BatchInvalid, InvalidInput, Problem, brief
from .extra_networks import lora_tags
from .inputs import Inputs, open_regular
from .jobs import (
    DEFAULT_MASK_MODEL,
    HIRES_UPSCALERS,
    IMAGE_UPSCALERS,
    MAX_LORAS,
    MAX_SEED,
    USER_FIELDS,
    HiresFix,
    LoraRef,
    RenderJob,
    SeedSweep,
    Upscale,
    parse_loras,
)
from .models import Registry

ITEM_KEYS: Final = (*USER_FIELDS, "count", "seeds", "matrix")
TOP_KEYS: Final = ("name", "seed", "defaults", "matrix", "items")
FORMATS: Final = {".yaml": "yaml", ".yml": "yaml", ".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".txt": "txt"}
MAX_COUNT: Final = 10_000
MAX_FILE_BYTES: Final = 64 * 1024 * 1024
# values of a YAML or JSON document, aliases expanded: YAML costs about 15 us a value (libyaml and
# PyYAML's resolver and constructors on a loaded machine), so a document at the cap reads in ~4 s
MAX_DOCUMENT_NODES: Final = 250_000
MAX_DEPTH: Final = 32  # nesting of a YAML or JSON document (a batch needs about 7)
MAX_INT_DIGITS: Final = 100  # an integer literal longer than this is refused as it is read
MAX_NAME_CHARS: Final = 200
TEXT_FIELDS: Final = ("prompt", "negative_prompt", "mask_prompt")
# in a prompt, as in A1111's text boxes, tabs and line breaks are text; any other control character
# (NUL, ESC, CR, DEL, C1) is refused: the PNG text chunk that records the prompt forbids them
_CONTROL: Final = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_C0_NAMES: Final = ("NUL", "SOH", "STX", "ETX", "EOT", "ENQ", "ACK", "BEL", "BS", "HT", "LF", "VT", "FF", "CR", "SO",
                    "SI", "DLE", "DC1", "DC2", "DC3", "DC4", "NAK", "SYN", "ETB", "CAN", "EM", "SUB", "ESC", "FS",
                    "GS", "RS", "US")
_INTEGER: Final = re.compile(r"\s*-?[0-9]{1,20}\s*")  # an integer as a CSV cell or a --set value spells it
_MERGE_TAG: Final = "tag:yaml.org,2002:merge"
_JSON_LINES_NODES: Final = 50_000  # a JSON document of up to this many values is read again as YAML for lines


def _numeric_fields(model: type[BaseModel]) -> frozenset[str]:
    """Fields pydantic would fill from true/false (as 1/0), which a batch must not."""
    return frozenset(name for name, f in model.model_fields.items() if f.annotation in (int, float))


_NUMERIC: Final = {"": _numeric_fields(RenderJob), "hires": _numeric_fields(HiresFix),
                   "upscale": _numeric_fields(Upscale), "loras": _numeric_fields(LoraRef)}


@dataclass(slots=True)
class RawItem:
    data: dict[str, Any]
    item: int  # 1-based
    line: int | None = None
    key_lines: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class BatchPlan:
    """A validated batch: its jobs in order, and the normalised spec recorded in S3."""

    batch_id: str
    name: str
    seed: int
    jobs: tuple[RenderJob, ...]
    spec: dict[str, Any]
    uploads: dict[str, bytes] = field(default_factory=dict)  # local input images: key -> bytes

    @property
    def record(self) -> BatchRecord:
        return BatchRecord(batch_id=self.batch_id, name=self.name, seed=self.seed, job_count=len(self.jobs),
                           spec=self.spec, uploads=self.uploads)


def cap_problem(source: str, max_jobs: int) -> Problem:
    return Problem(source, None, None, "", f"the batch expands to more than {max_jobs} jobs"
                   f" (allowed: at most {max_jobs}; the cap is SDFARM_MAX_JOBS_PER_BATCH)")


def strict_int(value: Any) -> int | None:
    """An integer as a batch may give it: an int (not true/false, not 2.0 or 2.9), or a string of
    digits (a CSV cell). None for anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _INTEGER.fullmatch(value):
        return int(value)
    return None


def control_character(text: str) -> str | None:
    """The first character of a prompt that is refused, described with its 1-based position."""
    found = _CONTROL.search(text)
    if found is None:
        return None
    code = ord(found.group())
    name = _C0_NAMES[code] if code < 32 else "DEL" if code == 0x7F else "a C1 control"
    return f"control character U+{code:04X} ({name}) at character {found.start() + 1}"


# ---------------------------------------------------------------- YAML, bounded, with line numbers


class _Refused(yaml.YAMLError):
    """A document that parses but is not accepted (too large, too deep, a key twice)."""

    def __init__(self, line: int | None, fld: str, message: str) -> None:
        super().__init__(message)
        self.line, self.field, self.message = line, fld, message


class _LineDict(dict[str, Any]):
    line: int
    key_lines: dict[str, int]


class _LineList(list[Any]):
    item_lines: list[int]


class _LineLoader(yaml.CSafeLoader):
    """libyaml's parser (fast; it refuses nesting past 1000 levels itself) with Python constructors
    that record each value's line, refuse a key given twice and over-long integers."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _LineDict:
    own = 0
    for key_node, _ in node.value:
        if key_node.tag == _MERGE_TAG:
            continue
        if not isinstance(key_node, yaml.ScalarNode):
            raise _Refused(key_node.start_mark.line + 1, "", "a key must be a plain value, not a list or mapping")
        own += 1
    loader.flatten_mapping(node)  # merged (<<) pairs first: a key of the mapping's own overrides them
    merged = len(node.value) - own
    result = _LineDict()
    result.line = node.start_mark.line + 1
    result.key_lines = {}
    for n, (key_node, value_node) in enumerate(node.value):
        key = loader.construct_object(key_node, deep=True)
        name = key if isinstance(key, str) else str(key)
        line = key_node.start_mark.line + 1
        if n >= merged and name in result and result.key_lines.get(name, 0) > 0:
            raise _Refused(line, name, f"duplicate key (also on line {result.key_lines[name]};"
                                       " each key may appear once)")
        result[name] = loader.construct_object(value_node, deep=True)
        result.key_lines[name] = line if n >= merged else -line  # negative: merged from elsewhere
    result.key_lines = {k: abs(v) for k, v in result.key_lines.items()}
    return result


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> _LineList:
    result = _LineList(loader.construct_object(child, deep=True) for child in node.value)
    result.item_lines = [child.start_mark.line + 1 for child in node.value]
    return result


def _construct_int(loader: _LineLoader, node: yaml.ScalarNode) -> int:
    if len(node.value) > MAX_INT_DIGITS:
        raise _Refused(node.start_mark.line + 1, "", f"an integer of {len(node.value)} digits"
                       f" (allowed: at most {MAX_INT_DIGITS})")
    value: int = loader.construct_yaml_int(node)
    return value


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)
_LineLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


class _Shape:
    """Counts a document's values as it is read (aliases at their expanded size) and its depth:
    checked before anything is built, so a file of aliases that would expand to billions of
    values, or a recursive one, is refused at once."""

    def __init__(self) -> None:
        self.nodes = 0
        self.open: list[tuple[str | None, int]] = []  # collections being read: (anchor, nodes before)
        self.sizes: dict[str, int] = {}  # anchor -> expanded size of its value

    def add(self, event: yaml.Event) -> None:
        line = event.start_mark.line + 1 if event.start_mark is not None else None
        if isinstance(event, yaml.AliasEvent):
            if any(anchor == event.anchor for anchor, _ in self.open):
                raise _Refused(line, "", f"alias *{brief(event.anchor, 40)[1:-1]} refers to a value that contains"
                                         " it (allowed: aliases of finished values)")
            self.nodes += self.sizes.get(str(event.anchor), 1)
        elif isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            if len(self.open) >= MAX_DEPTH:
                raise _Refused(line, "", f"nested more than {MAX_DEPTH} levels deep (allowed: at most {MAX_DEPTH})")
            self.open.append((event.anchor, self.nodes))
            self.nodes += 1
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            anchor, before = self.open.pop()
            if anchor is not None:
                self.sizes[anchor] = self.nodes - before
        elif isinstance(event, yaml.ScalarEvent):
            self.nodes += 1
            if event.anchor is not None:
                self.sizes[event.anchor] = 1
        if self.nodes > MAX_DOCUMENT_NODES:
            raise _Refused(line, "", f"the document holds more than {MAX_DOCUMENT_NODES} values, aliases"
                                     f" expanded (allowed: at most {MAX_DOCUMENT_NODES}; use .jsonl, .csv or"
                                     " .txt for larger batches, or count and matrix)")


def _yaml_problem(source: str, e: yaml.YAMLError | RecursionError) -> Problem:
    if isinstance(e, _Refused):
        return Problem(source, e.line, None, e.field, e.message)
    if isinstance(e, RecursionError):
        return Problem(source, None, None, "", f"nested too deeply (allowed: at most {MAX_DEPTH} levels)")
    mark = getattr(e, "problem_mark", None)
    line = mark.line + 1 if mark is not None else None
    column = f", column {mark.column + 1}" if mark is not None else ""
    what = getattr(e, "problem", None) or str(e)
    return Problem(source, line, None, "", f"malformed YAML{column}: {what}")


def load_yaml(text: str, source: str) -> Any:
    """A YAML document (a batch file, a dataset spec, a --set value) within the limits above;
    mappings and lists carry their lines. BatchInvalid with the one problem otherwise."""
    try:
        shape, events = _Shape(), _LineLoader(text)
        try:
            while (event := events.get_event()) is not None:
                shape.add(event)
        finally:
            events.dispose()
        loader = _LineLoader(text)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except (yaml.YAMLError, RecursionError) as e:
        raise BatchInvalid([_yaml_problem(source, e)]) from None


# ---------------------------------------------------------------- JSON, bounded


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Refused(None, key, "duplicate key (each key may appear once)")
            seen.add(key)
    return data


def _json_int(digits: str) -> int:
    if len(digits) > MAX_INT_DIGITS:
        raise _Refused(None, "", f"an integer of {len(digits)} digits (allowed: at most {MAX_INT_DIGITS})")
    return int(digits)


def _json_shape(data: Any) -> int:
    """The limits _Shape puts on YAML, for a parsed JSON value (which has no aliases): its values."""
    nodes, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > MAX_DOCUMENT_NODES:
            raise _Refused(None, "", f"the document holds more than {MAX_DOCUMENT_NODES} values (allowed: at most"
                                     f" {MAX_DOCUMENT_NODES}; use .jsonl for larger batches, or count and matrix)")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth >= MAX_DEPTH:
                    raise _Refused(None, "", f"nested more than {MAX_DEPTH} levels deep"
                                             f" (allowed: at most {MAX_DEPTH})")
                stack.append((child, depth + 1))
            else:
                nodes += 1
    return nodes


def _load_json(text: str, source: str, line: int | None = None) -> tuple[Any, int]:
    """A JSON value within the limits, and how many values it holds. BatchInvalid with the one
    problem otherwise."""
    try:
        data = json.loads(text, object_pairs_hook=_json_object, parse_int=_json_int)
        return data, _json_shape(data)
    except json.JSONDecodeError as e:
        problem = Problem(source, line or e.lineno, None, "", f"malformed JSON, column {e.colno}: {e.msg}")
    except RecursionError:
        problem = Problem(source, line, None, "", f"nested too deeply (allowed: at most {MAX_DEPTH} levels)")
    except _Refused as e:
        problem = Problem(source, line, None, e.field, e.message) if line else _located(text, source, e)
    raise BatchInvalid([problem])


def _located(text: str, source: str, e: _Refused) -> Problem:
    """A refused JSON document's problem where the YAML reading of the same text finds it: that
    one knows lines (of both keys, for a key given twice)."""
    if len(text) <= _JSON_LINES_NODES * 4:  # a value takes some characters: the YAML reading stays short
        try:
            load_yaml(text, source)
        except BatchInvalid as found:
            if found.problems[0].message.startswith(e.message.split(" (")[0]):
                return found.problems[0]
    return Problem(source, None, None, e.field, e.message)


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


# ---------------------------------------------------------------- expansion and validation


def derive_seed(batch_seed: int, item: int, k: int) -> int:
    """The seed of the k-th image of item (0-based positions) when none is given."""
    digest = hashlib.sha256(f"sdfarm-seed:{batch_seed}:{item}:{k}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def _item_size(data: Mapping[str, Any], defaults: Mapping[str, Any], top_matrix: Mapping[str, Any]) -> int:
    """How many jobs an item expands to, counted without validating any: as the planner's expand
    gives them, where what it refuses counts as one."""
    seeds = data.get("seeds", defaults.get("seeds"))
    count = strict_int(data.get("count", defaults.get("count", 1)))
    per_combination = len(seeds) if isinstance(seeds, list) and seeds else \
        count if count is not None and 1 <= count <= MAX_COUNT else 1
    matrix = {**top_matrix, **(data["matrix"] if isinstance(data.get("matrix"), dict) else {})}
    combinations = 1
    for values in matrix.values():
        combinations *= len(values) if isinstance(values, list) and values else 1
    return combinations * (1 if "seed" in matrix else per_combination)


class _Planner:
    def __init__(self, source: str, registry: Registry, max_jobs: int, inputs: Inputs | None) -> None:
        self.source = source
        self.registry = registry
        self.max_jobs = max_jobs
        self.inputs = inputs or Inputs(None, None)
        self.problems: list[Problem] = []
        self._seen: set[tuple[int, str, str]] = set()

    @property
    def stopped(self) -> bool:
        """Enough problems to refuse the batch: validation stops here."""
        return len(self.problems) >= MAX_PROBLEMS

    def problem(self, raw: RawItem | None, fld: str, message: str) -> None:
        item = raw.item if raw else None
        key = (item or 0, fld, message)
        if key in self._seen:
            return
        self._seen.add(key)
        line = (raw.key_lines.get(fld.split(".")[0], raw.line) if raw else None) or (raw.line if raw else None)
        self.problems.append(Problem(self.source, line, item, fld, message))

    def check_matrix(self, raw: RawItem | None, matrix: Any, where: str) -> dict[str, list[Any]]:
        if not isinstance(matrix, dict):
            self.problem(raw, where, f"expected a mapping of field to list of values, got {brief(matrix)}")
            return {}
        good: dict[str, list[Any]] = {}
        for key, values in matrix.items():
            if key not in USER_FIELDS:
                self.problem(raw, f"{where}.{key}", f"unknown field (allowed: {', '.join(USER_FIELDS)})")
            elif not isinstance(values, list) or not values:
                self.problem(raw, f"{where}.{key}", f"expected a non-empty list of values, got {brief(values)}")
            else:
                good[key] = values
        return good

    def seeds_of(self, raw: RawItem, values: dict[str, Any], batch_seed: int) -> list[int] | None:
        count, seeds = values.get("count"), values.get("seeds")
        if count is not None and seeds is not None:
            self.problem(raw, "seeds", "set either count or seeds, not both")
            return None
        if seeds is not None:
            if not isinstance(seeds, list) or not seeds or not all(
                isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_SEED for s in seeds
            ):
                self.problem(raw, "seeds", f"expected a non-empty list of integers 0..{MAX_SEED}, got {brief(seeds)}")
                return None
            return list(seeds)
        n = 1 if count is None else strict_int(count)
        if n is None or not 1 <= n <= MAX_COUNT:  # 2.9, true, .inf: refused, never rounded
            self.problem(raw, "count", f"{brief(count)} is not allowed (allowed: an integer 1..{MAX_COUNT})")
            return None
        if "seed" in values:  # A1111's batch convention: seed, seed+1, ...
            first = strict_int(values["seed"])
            if first is None:
                self.problem(raw, "seed", f"{brief(values['seed'])} is not allowed (allowed: an integer 0..{MAX_SEED})")
                return None
            return [first + k for k in range(n)]  # out of range: the job model reports it
        return [derive_seed(batch_seed, raw.item - 1, k) for k in range(n)]

    def expand(self, raw: RawItem, defaults: dict[str, Any], top_matrix: dict[str, list[Any]], batch_seed: int
               ) -> Iterator[tuple[dict[str, Any], list[Any]]]:
        """Each combination of the item's matrix, with its seeds: one job per seed, the combination's
        values plus that seed."""
        for key in raw.data:
            if key not in ITEM_KEYS:
                self.problem(raw, str(key), f"unknown field (allowed: {', '.join(ITEM_KEYS)})")
        values = {**defaults, **{k: v for k, v in raw.data.items() if k != "matrix"}}
        matrix = dict(top_matrix)
        if "matrix" in raw.data:
            matrix.update(self.check_matrix(raw, raw.data["matrix"], "matrix"))
        seeds = self.seeds_of(raw, values, batch_seed)
        if seeds is None:
            return
        keys = list(matrix)
        for combo in itertools.product(*(matrix[k] for k in keys)):
            base = {k: v for k, v in values.items() if k in USER_FIELDS and k != "seed"}
            base.update(zip(keys, combo, strict=True))
            if "seed" in base:  # the matrix swept the seed itself: one job
                yield base, [base["seed"]]
            else:
                yield base, seeds

    def job(self, raw: RawItem, values: dict[str, Any]) -> RenderJob | None:
        model = values.get("model")
        model_hash, family = None, None
        strict = self.strict(raw, values)
        if model is None:
            self.problem(raw, "model", f"missing (allowed: {', '.join(self.registry.names()) or 'none registered'})")
        elif not isinstance(model, str) or len(model) > MAX_NAME_CHARS:
            self.problem(raw, "model", f"unknown model {brief(model)}"
                                       f" (allowed: {', '.join(self.registry.names()) or 'none registered'})")
        else:
            try:
                model_hash = self.registry.identity(model)
                family = self.registry.get(model).family
            except InvalidInput as e:
                self.problem(raw, "model", str(e))
        if family == "sdxl" and values.get("clip_skip", 1) not in (1, "1"):
            self.problem(raw, "clip_skip", f"does not apply to SDXL (model {model!r} always uses the penultimate"
                                           " layer, as A1111 does); leave it out")
            return None
        values, assets_ok = self.assets(raw, values, family)
        try:  # check the other fields even when the model is bad: report everything at once
            job = RenderJob.model_validate({**values, "model": "unknown", "model_hash": "0" * 64}
                                           if model_hash is None else {**values, "model_hash": model_hash})
            return job if model_hash is not None and assets_ok and strict else None
        except ValidationError as e:
            for err in e.errors():
                fld = ".".join(str(p) for p in err["loc"])
                msg = err["msg"].removeprefix("Value error, ")
                if err["type"] != "value_error":
                    msg = f"{msg} (got {brief(err['input'])})"
                self.problem(raw, fld, msg)
            return None

    def strict(self, raw: RawItem, values: dict[str, Any]) -> bool:
        """What pydantic would let through but a batch must not: true/false for a number (pydantic
        reads it as 1/0), and control characters in a prompt (they would reach the PNG's text).
        One pass over the job's values: it runs for every job validated in full."""
        ok = True
        for key, value in values.items():
            if value is True or value is False:
                ok = self._not_bool(raw, key, "", value) and ok
            elif isinstance(value, str):
                found = control_character(value) if key in TEXT_FIELDS else None
                if found:
                    self.problem(raw, key, f"{found} is not allowed (allowed: text, tabs and line breaks)")
                    ok = False
            elif isinstance(value, dict) and key in _NUMERIC:
                ok = all([self._not_bool(raw, f"{key}.{k}", key, v) for k, v in value.items() if isinstance(v, bool)]
                         ) and ok
            elif key == "loras" and isinstance(value, list):
                ok = all([self._not_bool(raw, f"loras.{i}.{k}", key, v) for i, x in enumerate(value)
                          if isinstance(x, dict) for k, v in x.items() if isinstance(v, bool)]) and ok
        return ok

    def _not_bool(self, raw: RawItem, where: str, section: str, value: bool) -> bool:
        if where.rsplit(".", 1)[-1] not in _NUMERIC[section]:
            return True  # not a number field: the job model says what it wants
        self.problem(raw, where, f"{value} is not allowed (allowed: a number, not true or false)")
        return False

    def assets(self, raw: RawItem, values: dict[str, Any], family: str | None) -> tuple[dict[str, Any], bool]:
        """Fill in the registry's hashes: LoRAs from the loras field and the prompt's <lora:...> tags,
        embeddings named in the prompts, the VAE, upscaler models. Unknown names, and LoRAs and VAEs
        made for another model family, are reported here; shapes by RenderJob. As in A1111, an
        embedding of another family is not one: its name in an SDXL prompt is plain text."""
        out = dict(values)
        oks = [self._loras(raw, values, family, out), self._embeddings(raw, values, family, out),  # each reports
               self._vae(raw, values, family, out), self._upscalers(raw, values, out),
               self._inputs(raw, values, out), self._mask_model(raw, values, out)]
        return out, all(oks)

    def _loras(self, raw: RawItem, values: dict[str, Any], family: str | None, out: dict[str, Any]) -> bool:
        ok = True
        prompt = values.get("prompt")
        try:
            tags = lora_tags(prompt) if isinstance(prompt, str) else []
        except ValueError:
            tags = []  # RenderJob reports the malformed tag against the prompt
        given = parse_loras(values.get("loras", []))
        if isinstance(given, list) and len(given) <= MAX_LORAS \
                and all(isinstance(x, dict) and isinstance(x.get("name"), str) for x in given):
            loras = [dict(x) for x in given]  # a name given twice is RenderJob's to report
            for name, weight in tags:
                if all(x["name"] != name for x in loras):
                    loras.append({"name": name, "weight": weight})
            for i, item in enumerate(loras):
                try:
                    item["sha256"] = self.registry.asset_identity("lora", item["name"], family)
                except InvalidInput as e:
                    self.problem(raw, f"loras.{i}.name", str(e))
                    item["sha256"], ok = "0" * 64, False
            if loras:
                out["loras"] = loras
        return ok

    def _embeddings(self, raw: RawItem, values: dict[str, Any], family: str | None, out: dict[str, Any]) -> bool:
        ok = True
        texts = [t.lower() for t in (values.get("prompt"), values.get("negative_prompt")) if isinstance(t, str)]
        embeddings = []
        for name in self.registry.asset_names("embedding", family):
            # the tokenizer matches an embedding's (lower-cased) name anywhere in the lower-cased text
            if any(name.lower() in text for text in texts):
                try:
                    embeddings.append({"name": name, "sha256": self.registry.asset_identity("embedding", name)})
                except InvalidInput as e:
                    self.problem(raw, "prompt", str(e))
                    ok = False
        if embeddings:
            out["embeddings"] = embeddings
        return ok

    def _vae(self, raw: RawItem, values: dict[str, Any], family: str | None, out: dict[str, Any]) -> bool:
        if values.get("vae") is None:
            return True
        if not isinstance(values["vae"], str) or len(values["vae"]) > MAX_NAME_CHARS:
            self.problem(raw, "vae", f"unknown vae {brief(values['vae'])} (allowed: a registered VAE's name)")
            out.pop("vae")
            return False
        try:
            sha256 = self.registry.asset_identity("vae", values["vae"], family)
            out["vae"] = {"name": values["vae"], "sha256": sha256}
            return True
        except InvalidInput as e:
            self.problem(raw, "vae", str(e))
            out.pop("vae")
            return False

    def _upscalers(self, raw: RawItem, values: dict[str, Any], out: dict[str, Any]) -> bool:
        ok = True
        for fld, builtin in (("hires", HIRES_UPSCALERS), ("upscale", IMAGE_UPSCALERS)):
            spec = values.get(fld)
            if not isinstance(spec, dict) or not isinstance(spec.get("upscaler"), str) or spec["upscaler"] in builtin:
                continue  # RenderJob reports the shapes
            registered = self.registry.asset_names("upscaler")
            try:
                if spec["upscaler"] not in registered:
                    raise InvalidInput(f"unknown upscaler {spec['upscaler']!r}"
                                       f" (allowed: {', '.join([*builtin, *registered])})")
                out[fld] = {**spec, "upscaler_sha256": self.registry.asset_identity("upscaler", spec["upscaler"])}
            except InvalidInput as e:
                self.problem(raw, f"{fld}.upscaler", str(e))
                out[fld] = {k: v for k, v in spec.items() if k != "upscaler"}
                ok = False
        return ok

    def _inputs(self, raw: RawItem, values: dict[str, Any], out: dict[str, Any]) -> bool:
        ok = True
        for fld in ("init_image", "mask_image"):
            if isinstance(values.get(fld), str):
                try:
                    out[fld] = self.inputs.resolve(values[fld])
                except InvalidInput as e:
                    self.problem(raw, fld, str(e))
                    out.pop(fld)
                    ok = False
        return ok

    def _mask_model(self, raw: RawItem, values: dict[str, Any], out: dict[str, Any]) -> bool:
        if values.get("mask_prompt") is not None:
            name = values.get("mask_model", DEFAULT_MASK_MODEL)
            if not isinstance(name, str) or len(name) > MAX_NAME_CHARS:
                self.problem(raw, "mask_model", f"unknown mask_model {brief(name)} (allowed: a registered name)")
                out["mask_model"] = {"name": "unknown", "sha256": "0" * 64}
                return False
            try:
                out["mask_model"] = {"name": name, "sha256": self.registry.asset_identity("mask_model", name)}
                return True
            except InvalidInput as e:
                self.problem(raw, "mask_model", str(e))
                out["mask_model"] = {"name": "unknown", "sha256": "0" * 64}
                return False
        if isinstance(values.get("mask_model"), str):
            self.problem(raw, "mask_model", "goes with mask_prompt")
            out.pop("mask_model")
            return False
        return True


@dataclass(frozen=True)
class BatchRecord:
    """A validated batch less its jobs: the normalised spec recorded in S3 as batch.json, and the
    local input images to upload."""

    batch_id: str
    name: str
    seed: int
    job_count: int
    spec: dict[str, Any]
    uploads: dict[str, bytes]


class _BatchIdHash:
    """The batch id, sha256 of `json.dumps([name, job_ids])` (so the same file gives the same batch),
    fed one job id at a time: the ids of a million jobs are never held together."""

    def __init__(self, name: str) -> None:
        self._hash = hashlib.sha256(("[" + json.dumps(name) + ", [").encode())
        self._pending: list[str] = []
        self._first = True

    def add(self, job_id: str) -> None:
        self._pending.append(job_id)
        if len(self._pending) >= 4096:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            text = ('"' if self._first else ', "') + '", "'.join(self._pending) + '"'
            self._hash.update(text.encode())
            self._pending.clear()
            self._first = False

    def hexdigest(self) -> str:
        self._flush()
        self._hash.update(b"]]")
        return self._hash.hexdigest()[:20]


class BatchStream:
    """A batch planned while it is consumed, so that its jobs never sit in memory all at once:
    iterate it once for its valid jobs in batch order (the index of a job is its position), then
    take `record()`. Validation stays all or nothing: the iteration ends by raising BatchInvalid,
    listing every problem, when there is any, so a consumer writes nothing before it ends.

    `items` is a list (a parsed document, a dataset run), whose jobs are counted against the cap
    before any is validated, or the entries a line file gives as it is read (`counted`: its scan
    counted them), problems with single lines among them; either way validation, and the reading,
    stop after MAX_PROBLEMS problems."""

    def __init__(
        self,
        header: dict[str, Any],
        items: Iterable[RawItem | Problem],
        source: str,
        fmt: str,
        registry: Registry,
        max_jobs: int,
        overrides: Mapping[str, Any] | None = None,
        name: str | None = None,
        inputs: Inputs | None = None,
        counted: bool = False,
    ) -> None:
        planner = _Planner(source, registry, max_jobs, inputs)
        defaults: dict[str, Any] = {**header.get("defaults", {}), **(overrides or {})}
        for key in defaults:
            if key not in ITEM_KEYS or key == "matrix":
                planner.problem(None, f"defaults.{key}", f"unknown field (allowed: {', '.join(ITEM_KEYS[:-1])})")
        batch_seed = header.get("seed", 0)
        if isinstance(batch_seed, bool) or not isinstance(batch_seed, int) or not 0 <= batch_seed <= MAX_SEED:
            planner.problem(None, "seed", f"{brief(batch_seed)} is not allowed (allowed: an integer 0..{MAX_SEED})")
            batch_seed = 0
        batch_name = name or header.get("name") or Path(source).stem
        if not isinstance(batch_name, str) or len(batch_name) > MAX_NAME_CHARS or control_character(batch_name):
            planner.problem(None, "name", f"expected a string of at most {MAX_NAME_CHARS} characters, without"
                                          f" control characters, got {brief(batch_name)}")
            batch_name = Path(source).stem
        top_matrix = planner.check_matrix(None, header["matrix"], "matrix") if "matrix" in header else {}
        self.name: str = batch_name
        self.seed: int = batch_seed
        self._planner, self._items, self._source, self._fmt = planner, items, source, fmt
        self._defaults, self._matrix, self._counted = defaults, top_matrix, counted
        self._raw: list[dict[str, Any]] = []  # each item's data as given: the record keeps it
        self._unread = 0  # lines of a line file that gave a problem, not an item
        self._started = False
        self._record: BatchRecord | None = None

    def __iter__(self) -> Iterator[RenderJob]:
        if self._started:
            raise RuntimeError("a BatchStream is read once")
        self._started = True
        planner = self._planner
        if self._over_cap():  # counted before anything is validated: an explosion costs nothing
            planner.problem(None, "", cap_problem(self._source, planner.max_jobs).message)
            raise BatchInvalid(planner.problems)
        batch_id = _BatchIdHash(self.name)
        models: dict[str, str] = {}
        count = 0
        for job in self._valid_jobs():
            count += 1
            batch_id.add(job.id)
            models[job.model] = job.model_hash
            yield job
        if not self._raw and not self._unread and not planner.stopped:
            planner.problem(None, "", "the batch holds no items")
        if planner.problems:
            raise BatchInvalid(planner.problems[:MAX_PROBLEMS], stopped=planner.stopped)
        digest = batch_id.hexdigest()
        spec = {
            "schema_version": 1,
            "batch_id": digest,
            "name": self.name,
            "seed": self.seed,
            "source": Path(self._source).name,
            "format": self._fmt,
            "defaults": self._defaults,
            "matrix": self._matrix,
            "items": self._raw,
            "job_count": count,
            "models": models,
        }
        self._record = BatchRecord(batch_id=digest, name=self.name, seed=self.seed, job_count=count,
                                   spec=spec, uploads=dict(planner.inputs.uploads))

    def _over_cap(self) -> bool:
        max_jobs = self._planner.max_jobs
        if self._counted or not isinstance(self._items, list):
            return False
        if len(self._items) > max_jobs:
            return True
        plain = _item_size({}, self._defaults, self._matrix)  # an item that sets no count, seeds or matrix
        total = 0
        for raw in self._items:
            data = raw.data if isinstance(raw, RawItem) else {}
            total += _item_size(data, self._defaults, self._matrix) \
                if "count" in data or "seeds" in data or "matrix" in data else plain
            if total > max_jobs:
                return True
        return False

    def _valid_jobs(self) -> Iterator[RenderJob]:
        """Every job in batch order, validated; after the first problem none is given (the rest
        are only checked, until MAX_PROBLEMS)."""
        planner, max_jobs = self._planner, self._planner.max_jobs
        total = 0
        for raw in self._items:
            if isinstance(raw, Problem):
                self._unread += 1
                planner.problems.append(raw)
                if planner.stopped:
                    return
                continue
            self._raw.append(raw.data)
            for base, seeds in planner.expand(raw, self._defaults, self._matrix, self.seed):
                first: RenderJob | None = None  # the combination's first valid job: the others copy it
                sweep: SeedSweep | None = None
                for seed in seeds:
                    total += 1
                    if total > max_jobs:  # the count before said otherwise: a safety net
                        planner.problem(None, "", cap_problem(self._source, max_jobs).message)
                        return
                    if first is not None and isinstance(seed, int) and not isinstance(seed, bool) \
                            and 0 <= seed <= MAX_SEED:
                        sweep = sweep or SeedSweep(first)
                        job: RenderJob | None = sweep.job(seed)
                    else:
                        job = planner.job(raw, {**base, "seed": seed})
                        first = first or job
                    if job is not None and not planner.problems:
                        yield job
                    elif planner.stopped:
                        return
            if planner.stopped:
                return

    def record(self) -> BatchRecord:
        """The batch id, spec and uploads: known once every job has been read."""
        if self._record is None:
            raise RuntimeError("a batch's record is known once all its jobs have been read")
        return self._record

    def plan(self) -> BatchPlan:
        """Every job at once: for batches that fit in memory."""
        jobs = tuple(self)
        r = self.record()
        return BatchPlan(batch_id=r.batch_id, name=r.name, seed=r.seed, jobs=jobs, spec=r.spec, uploads=r.uploads)


def stream_batch(
    text: str,
    source: str,
    fmt: str,
    registry: Registry,
    max_jobs: int,
    overrides: Mapping[str, Any] | None = None,
    name: str | None = None,
    inputs: Inputs | None = None,
) -> BatchStream:
    """Parse one batch file's text; its jobs are expanded and validated as the stream is read.
    Raises BatchInvalid on syntax errors at once."""
    text = text.removeprefix("\ufeff")
    if fmt in _LINE_READERS:
        return _line_stream(_text_lines(text), source, fmt, registry, max_jobs, overrides, name, inputs)
    header, items = read_batch(text, source, fmt, max_jobs)
    return BatchStream(header, items, source, fmt, registry, max_jobs, overrides, name, inputs)


def _line_stream(lines: Lines, source: str, fmt: str, registry: Registry, max_jobs: int,
                 overrides: Mapping[str, Any] | None, name: str | None, inputs: Inputs | None) -> BatchStream:
    """A line format: scanned once (encoding, CSV syntax, the job cap), then read again as the
    stream is consumed, one item at a time."""
    _scan(fmt, lines, source, dict(overrides or {}), max_jobs)
    return BatchStream({}, _LINE_READERS[fmt](lines, source), source, fmt, registry, max_jobs, overrides, name,
                       inputs, counted=True)


def plan_batch(
    text: str,
    source: str,
    fmt: str,
    registry: Registry,
    max_jobs: int,
    overrides: Mapping[str, Any] | None = None,
    name: str | None = None,
    inputs: Inputs | None = None,
) -> BatchPlan:
    """Parse, expand and validate a whole batch. Raises BatchInvalid listing every problem."""
    return stream_batch(text, source, fmt, registry, max_jobs, overrides, name, inputs).plan()


def plan_items(
    header: dict[str, Any],
    items: list[RawItem],
    source: str,
    fmt: str,
    registry: Registry,
    max_jobs: int,
    overrides: Mapping[str, Any] | None = None,
    name: str | None = None,
    inputs: Inputs | None = None,
) -> BatchPlan:
    """Expand and validate parsed items (from a batch file, or generated from a dataset spec).
    `inputs` reads init images and masks (the bucket, SDFARM_INPUTS_DIR); without it they are refused."""
    return BatchStream(header, items, source, fmt, registry, max_jobs, overrides, name, inputs).plan()



def plan_file(
    path: Path,
    registry: Registry,
    max_jobs: int,
    overrides: Mapping[str, Any] | None = None,
    name: str | None = None,
    inputs: Inputs | None = None,
) -> BatchPlan:
    return stream_file(path, registry, max_jobs, overrides, name, inputs).plan()


def stream_file(
    path: Path,
    registry: Registry,
    max_jobs: int,
    overrides: Mapping[str, Any] | None = None,
    name: str | None = None,
    inputs: Inputs | None = None,
) -> BatchStream:
    """Read a batch file (format from its suffix); its jobs are planned as the stream is read.
    Only a regular file is read (not a FIFO, not /dev/zero through a symlink), at most
    MAX_FILE_BYTES; .jsonl, .csv and .txt line by line, never whole."""
    source = str(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        allowed = ", ".join(FORMATS)
        raise BatchInvalid([_file_problem(source, f"unknown file type {brief(path.suffix)} (allowed: {allowed})")])
    if fmt in _LINE_READERS:
        try:  # refused now, as a document would be: not a regular file, too large
            open_regular(path, MAX_FILE_BYTES).close()
        except InvalidInput as e:
            message = str(e)
            raise BatchInvalid([_file_problem(source, ("file " if message.startswith("is ") else "cannot read: ")
                                              + message)]) from None
        return _line_stream(_file_lines(path, source), source, fmt, registry, max_jobs, overrides, name, inputs)
    header, items = read_batch(_read_document(path, source), source, fmt, max_jobs)
    return BatchStream(header, items, source, fmt, registry, max_jobs, overrides, name, inputs)
