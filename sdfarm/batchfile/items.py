"""A batch item as read from any format, how many jobs it expands to (counted against the cap
before any is validated), and the checks on values shared by reading and planning."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ..errors import Problem
from ..jobs import USER_FIELDS

ITEM_KEYS: Final = (*USER_FIELDS, "count", "seeds", "matrix")
MAX_COUNT: Final = 10_000
MAX_NAME_CHARS: Final = 200
# in a prompt, as in A1111's text boxes, tabs and line breaks are text; any other control character
# (NUL, ESC, CR, DEL, C1) is refused: the PNG text chunk that records the prompt forbids them
_CONTROL: Final = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_C0_NAMES: Final = ("NUL", "SOH", "STX", "ETX", "EOT", "ENQ", "ACK", "BEL", "BS", "HT", "LF", "VT", "FF", "CR", "SO",
                    "SI", "DLE", "DC1", "DC2", "DC3", "DC4", "NAK", "SYN", "ETB", "CAN", "EM", "SUB", "ESC", "FS",
                    "GS", "RS", "US")
_INTEGER: Final = re.compile(r"\s*-?[0-9]{1,20}\s*")  # an integer as a CSV cell or a --set value spells it


@dataclass(slots=True)
class RawItem:
    data: dict[str, Any]
    item: int  # 1-based
    line: int | None = None
    key_lines: dict[str, int] = field(default_factory=dict)


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
