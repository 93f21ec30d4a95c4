"""AUTOMATIC1111's prompt attention syntax, parsed exactly as its web UI does.

`(text)` multiplies the weight of text by 1.1, `[text]` divides it by 1.1, `(text:1.3)` multiplies
it by 1.3; nesting multiplies. `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are literal characters. A bracket
left open weighs everything after it; a stray closing bracket is plain text. `BREAK` (uppercase, a
word of its own) ends the current 75-token chunk.

Pure Python, no torch: the producer can check prompts before they are queued.

Weights are bounded at submit (check_attention_weights): every explicit `(text:w)` and every run's
weight after nesting (the product of its brackets) within -MAX_ATTENTION_WEIGHT..MAX_ATTENTION_WEIGHT.
A1111's useful range is about 0..2; far past it the text encoder's output overflows (a weight of
1e45 is infinity in float32) and the image is NaN. Smaller weights, `[]` nesting included, pass.
"""

from __future__ import annotations

import functools
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
MAX_ATTENTION_WEIGHT = 100.0
_SHOWN_CHARS = 40  # of a run's text, in a message


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split text into (text, weight) runs; adjacent runs of equal weight are merged.

    A1111's own algorithm, step for step (modules/prompt_parser.py), so weights match its float
    rounding too: `((a))` is 1.1 * 1.1, not 1.21. A malformed explicit weight such as `(a:1.2.3)`
    raises ValueError, as it does in A1111.
    """
    runs = _Runs(text)
    for m in _ATTENTION.finditer(text):
        runs.take(m.group(0), m.group(1))
    runs.close_open_brackets()
    return runs.merged()


def check_attention_weights(text: str) -> None:
    """Refuse weights no model renders (ValueError saying which and what is allowed): an explicit
    `(text:w)` with |w| > MAX_ATTENTION_WEIGHT, or a run whose weight after nesting is past it
    (`(` 49 deep is 1.1**49 = 106.7). Parses as parse_prompt_attention does, so a `:w)` that closes
    no bracket is text, as there."""
    runs = _Runs(text)
    for m in _ATTENTION.finditer(text):
        weight = m.group(1)
        if weight is not None and runs.round_brackets and abs(runs.explicit_weight(weight)) > MAX_ATTENTION_WEIGHT:
            raise ValueError(f"attention weight {runs.explicit_weight(weight):g} is out of range (allowed:"
                             f" -{MAX_ATTENTION_WEIGHT:g} to {MAX_ATTENTION_WEIGHT:g})")
        runs.take(m.group(0), weight)
    runs.close_open_brackets()
    for part, weight in runs.merged():
        if abs(weight) > MAX_ATTENTION_WEIGHT:
            shown = part if len(part) <= _SHOWN_CHARS else part[:_SHOWN_CHARS] + "..."
            raise ValueError(f"nested brackets weigh {shown!r} {weight:.4g} (allowed: -{MAX_ATTENTION_WEIGHT:g} to"
                             f" {MAX_ATTENTION_WEIGHT:g} after nesting; each ( multiplies by 1.1, each"
                             " (text:w) by w)")


class _Runs:
    """The runs parsed so far, as parallel lists of texts and weights, and the brackets still open
    (each the index of the first run it weighs)."""

    def __init__(self, text: str) -> None:
        self.text = text  # the whole prompt, for error messages
        self.parts: list[str] = []
        self.weights: list[float] = []
        self.round_brackets: list[int] = []
        self.square_brackets: list[int] = []

    def take(self, token: str, weight: str | None) -> None:
        """One token of `_ATTENTION`; `weight` is the number of a `:1.3)` closer."""
        if token.startswith("\\"):
            self.add(token[1:], 1.0)
        elif token == "(":
            self.round_brackets.append(len(self.parts))
        elif token == "[":
            self.square_brackets.append(len(self.parts))
        elif weight is not None and self.round_brackets:
            self.multiply_range(self.round_brackets.pop(), self.explicit_weight(weight))
        elif token == ")" and self.round_brackets:
            self.multiply_range(self.round_brackets.pop(), _ROUND)
        elif token == "]" and self.square_brackets:
            self.multiply_range(self.square_brackets.pop(), _SQUARE)
        else:
            self.add_text(token)

    def explicit_weight(self, weight: str) -> float:
        try:
            return float(weight)
        except ValueError:
            raise ValueError(f"bad attention weight {weight!r} in prompt {self.text!r}") from None

    def add(self, part: str, weight: float) -> None:
        self.parts.append(part)
        self.weights.append(weight)

    def add_text(self, token: str) -> None:
        """Plain text at weight 1, with a BREAK run for each `BREAK` word in it."""
        for i, part in enumerate(_BREAK.split(token)):
            if i > 0:
                self.add(*BREAK)
            self.add(part, 1.0)

    def multiply_range(self, start: int, multiplier: float) -> None:
        for i in range(start, len(self.weights)):
            self.weights[i] *= multiplier

    def close_open_brackets(self) -> None:
        """A bracket left open weighs everything after it."""
        for start in self.round_brackets:
            self.multiply_range(start, _ROUND)
        for start in self.square_brackets:
            self.multiply_range(start, _SQUARE)

    def merged(self) -> list[tuple[str, float]]:
        """The runs, adjacent runs of equal weight merged; an empty prompt is one empty run."""
        merged: list[tuple[str, float]] = []
        for part, weight in zip(self.parts, self.weights, strict=True):
            if merged and merged[-1][1] == weight:
                merged[-1] = (merged[-1][0] + part, weight)
            else:
                merged.append((part, weight))
        return merged or [("", 1.0)]


@functools.cache
def embedding_pattern(name: str) -> re.Pattern[str]:
    """Where a textual-inversion embedding's name stands in a prompt, as A1111 finds it by CLIP
    tokens: case-insensitively, not inside a longer word (CLIP's pre-tokeniser splits letters from
    digits and punctuation, so `easynegative,` and `my_easynegative` name it, `easynegatives` does
    not). The worker matches the tokens themselves; this is the producer's view of it."""
    head = r"(?<![^\W\d_])" if name[:1].isalpha() else ""
    tail = r"(?![^\W\d_])" if name[-1:].isalpha() else ""
    return re.compile(head + re.escape(name) + tail, re.IGNORECASE)
