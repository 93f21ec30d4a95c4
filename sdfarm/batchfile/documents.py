"""YAML and JSON documents read within limits: values counted (aliases expanded), depth, duplicate
keys and integer length; mappings and lists of a YAML document carry their lines."""

from __future__ import annotations

import json
from typing import Any, Final

import yaml

from ..errors import BatchInvalid, Problem, brief

# values of a YAML or JSON document, aliases expanded: YAML costs about 15 us a value (libyaml and
# PyYAML's resolver and constructors on a loaded machine), so a document at the cap reads in ~4 s
MAX_DOCUMENT_NODES: Final = 250_000
MAX_DEPTH: Final = 32  # nesting of a YAML or JSON document (a batch needs about 7)
MAX_INT_DIGITS: Final = 100  # an integer literal longer than this is refused as it is read
_MERGE_TAG: Final = "tag:yaml.org,2002:merge"
_JSON_LINES_NODES: Final = 50_000  # a JSON document of up to this many values is read again as YAML for lines


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
