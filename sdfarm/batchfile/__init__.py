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

from .documents import MAX_DEPTH, MAX_DOCUMENT_NODES, MAX_INT_DIGITS, load_yaml
from .formats import FORMATS, MAX_FILE_BYTES, TOP_KEYS, Entry, Lines, read_batch
from .items import ITEM_KEYS, MAX_COUNT, MAX_NAME_CHARS, RawItem, cap_problem, control_character, strict_int
from .planner import TEXT_FIELDS, derive_seed
from .stream import (
    BatchPlan,
    BatchRecord,
    BatchStream,
    plan_batch,
    plan_file,
    plan_items,
    stream_batch,
    stream_file,
)

__all__ = [
    "FORMATS",
    "ITEM_KEYS",
    "MAX_COUNT",
    "MAX_DEPTH",
    "MAX_DOCUMENT_NODES",
    "MAX_FILE_BYTES",
    "MAX_INT_DIGITS",
    "MAX_NAME_CHARS",
    "TEXT_FIELDS",
    "TOP_KEYS",
    "BatchPlan",
    "BatchRecord",
    "BatchStream",
    "Entry",
    "Lines",
    "RawItem",
    "cap_problem",
    "control_character",
    "derive_seed",
    "load_yaml",
    "plan_batch",
    "plan_file",
    "plan_items",
    "read_batch",
    "stream_batch",
    "stream_file",
    "strict_int",
]
