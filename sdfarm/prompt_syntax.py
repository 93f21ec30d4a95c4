"""AUTOMATIC1111's prompt attention syntax, parsed exactly as its web UI does.

`(text)` multiplies the weight of text by 1.1, `[text]` divides it by 1.1, `(text:1.3)` multiplies
it by 1.3; nesting multiplies. `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are literal characters. A bracket
left open weighs everything after it; a stray closing bracket is plain text. `BREAK` (uppercase, a
word of its own) ends the current 75-token chunk.

Pure Python, no torch: the producer can check prompts before they are queued.
"""

from __future__ import annotations

import re

BREAK = ("BREAK", -1.0)
"""The run that marks a BREAK, as A1111 marks it (so `(BREAK:-1)` is one too)."""

_ATTENTION = re.compile(r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_ROUND, _SQUARE = 1.1, 1 / 1.1


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split text into (text, weight) runs; adjacent runs of equal weight are merged.

    A1111's own algorithm, step for step (modules/prompt_parser.py), so weights match its float
    rounding too: `((a))` is 1.1 * 1.1, not 1.21. A malformed explicit weight such as `(a:1.2.3)`
    raises ValueError, as it does in A1111.
    """
    parts: list[str] = []
    weights: list[float] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def add(part: str, weight: float) -> None:
        parts.append(part)
        weights.append(weight)

    def multiply_range(start: int, multiplier: float) -> None:
        for i in range(start, len(weights)):
            weights[i] *= multiplier

    for m in _ATTENTION.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            add(token[1:], 1.0)
        elif token == "(":
            round_brackets.append(len(parts))
        elif token == "[":
            square_brackets.append(len(parts))
        elif weight is not None and round_brackets:
            try:
                multiplier = float(weight)
            except ValueError:
                raise ValueError(f"bad attention weight {weight!r} in prompt {text!r}") from None
            multiply_range(round_brackets.pop(), multiplier)
        elif token == ")" and round_brackets:
            multiply_range(round_brackets.pop(), _ROUND)
        elif token == "]" and square_brackets:
            multiply_range(square_brackets.pop(), _SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i > 0:
                    add(*BREAK)
                add(part, 1.0)

    for start in round_brackets:
        multiply_range(start, _ROUND)
    for start in square_brackets:
        multiply_range(start, _SQUARE)

    merged: list[tuple[str, float]] = []
    for part, weight in zip(parts, weights, strict=True):
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + part, weight)
        else:
            merged.append((part, weight))
    return merged or [("", 1.0)]
