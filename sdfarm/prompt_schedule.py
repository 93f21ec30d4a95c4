"""A1111's prompt editing, alternation and composable AND (v1.10, modules/prompt_parser.py).

- `[from:to:when]` renders `from` up to step `when`, then `to`; `[to:when]` adds `to` after `when`,
  `[from::when]` removes `from` after it. An integer `when` is a step; a number with a point is a
  fraction of the steps. In the hires pass, an integer counts on from the first pass's steps and a
  fraction runs from 1 to 2, so `[a:b:1.5]` switches half-way through the hires pass.
- `[a|b|c]` alternates a, b, c, a, ... step by step.
- `a AND b:0.5` (positive prompt only) renders both and combines them, each with its weight:
  denoised = uncond + cfg x sum(weight x (cond - uncond)).

Brackets that are neither (`[word]`, `(word:1.2)`) stay as they are, for the attention parser. A
prompt the grammar cannot read is rendered as written, with no schedule, as A1111 does. Steps count
the sampler's model calls from 0: a step is "at or before `when`" while the call number is <= when.

Pure Python: the producer decides whether a job needs the worker's scheduled path (may_vary)
without parsing; the worker computes the schedules.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from typing import Any, Final

# The language of A1111's schedule grammar: text made of weighted groups (kept as written), edits,
# alternations, plain runs and whitespace; at the top level, stray brackets and colons are text too.
_GRAMMAR: Final = r"""
start: (text | STRAY)*
text: (weighted | edit | alternation | PLAIN | SPACE)*
!weighted: "(" text ")" | "(" text ":" text ")" | "[" text "]"
edit: "[" [text ":"] text ":" [SPACE] NUMBER [SPACE] "]"
alternation: "[" text ("|" [text])+ "]"
STRAY: /[][():]+/
SPACE: /\s+/
PLAIN: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
"""
_AND: Final = re.compile(r"\bAND\b")
_WEIGHT: Final = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


@functools.cache
def _parser() -> Any:
    import lark

    return lark.Lark(_GRAMMAR)


def split_and(prompt: str) -> list[tuple[str, float]]:
    """The subprompts of a positive prompt and their weights (`text:w` at a subprompt's end; 1 without)."""
    parts = []
    for sub in _AND.split(prompt):
        match = _WEIGHT.search(sub)
        text, weight = match.groups() if match else (sub, None)
        parts.append((text, float(weight) if weight is not None else 1.0))
    return parts


def may_vary(text: str) -> bool:
    """Whether a prompt might hold AND or a schedule (a cheap, conservative look: no parse): an edit or
    an alternation needs a `[`, then a `:` or `|`, then a `]`. Jobs that might render through the
    worker's scheduled path, those that cannot through the plain one."""
    if _AND.search(text):
        return True
    opened = text.find("[")
    marks = [at for at in (text.find(":", opened), text.find("|", opened)) if at >= 0] if opened >= 0 else []
    return bool(marks) and text.find("]", min(marks)) >= 0


def schedule(prompt: str, steps: int, hires_of: int | None = None) -> list[tuple[int, str]]:
    """(last step, text) pairs covering `steps` model calls: the text in force up to and including that
    step. hires_of: the first pass's steps, when this schedule is the hires pass's."""
    import lark

    try:
        tree = _parser().parse(prompt)
    except lark.exceptions.LarkError:
        return [(steps, prompt)]
    whens: dict[int, int] = {}  # id of an edit node -> its step
    points = {steps}
    for node in tree.iter_subtrees():
        if node.data == "edit":
            whens[id(node)] = when = _when(str(node.children[-2]), steps, hires_of)
            if when >= 1:
                points.add(when)
        elif node.data == "alternation":
            points.update(range(1, steps + 1))
    return [(point, "".join(_render(tree, point, whens))) for point in sorted(points)]


def _when(number: str, steps: int, hires_of: int | None) -> int:
    """The step of an edit's `when` (A1111's new scheduling: a fraction if it has a point)."""
    value = float(number)
    if "." in number:
        value = (value - (1.0 if hires_of is not None else 0.0)) * steps
    elif hires_of is not None:
        value -= hires_of
    return min(steps, int(value))


def _render(node: Any, step: int, whens: dict[int, int]) -> Iterator[str]:
    """The text of a (sub)tree at a step."""
    import lark

    if isinstance(node, lark.Token):
        yield str(node)
        return
    if node.data == "edit":
        before, after = node.children[0], node.children[1]
        chosen = before if step <= whens[id(node)] else after
        if chosen is not None:
            yield from _render(chosen, step, whens)
        return
    if node.data == "alternation":
        options = node.children
        chosen = options[(step - 1) % len(options)]
        if chosen is not None:
            yield from _render(chosen, step, whens)
        return
    for child in node.children:
        if child is not None:
            yield from _render(child, step, whens)


def at_step(entries: list[tuple[int, Any]], step: int) -> Any:
    """The entry in force at a (0-based) model call: the first whose last step is >= it."""
    return next((value for last, value in entries if step <= last), entries[0][1])
