"""A1111 extra-network tags in prompts: `<lora:name:weight>`.

A1111 users put LoRAs in the prompt text; the web UI takes the tags out before the text is
encoded and records the prompt with its tags. sdfarm does the same: the job keeps the prompt as
written, its `loras` field lists every LoRA (from tags and from the field), and the worker encodes
the prompt with the tags removed.
"""

from __future__ import annotations

import re
from typing import Final

# modules/extra_networks.py: re_extra_net
_TAG_RE: Final = re.compile(r"<(\w+):([^>]+)>")
LORA_TAGS: Final = ("lora", "lyco")  # A1111 reads both as LoRA


def lora_tags(text: str) -> list[tuple[str, float]]:
    """(name, weight) for each `<lora:name[:weight]>` tag. A weight that is not a number, or a tag
    of an extra network sdfarm does not run, raises ValueError naming the tag."""
    found: list[tuple[str, float]] = []
    for match in _TAG_RE.finditer(text):
        kind, args = match.group(1), match.group(2).split(":")
        if kind not in LORA_TAGS:
            raise ValueError(f"extra network tag {match.group(0)!r} is not supported (allowed: <lora:name:weight>)")
        if len(args) > 2:
            raise ValueError(f"tag {match.group(0)!r}: separate text-encoder/UNet weights are not supported"
                             " (allowed: <lora:name:weight>)")
        name = args[0].strip()
        try:
            weight = float(args[1]) if len(args) > 1 and args[1].strip() else 1.0
        except ValueError:
            raise ValueError(f"tag {match.group(0)!r}: weight {args[1]!r} is not a number") from None
        found.append((name, weight))
    return found


def strip_tags(text: str) -> str:
    """The prompt as the text encoder sees it: tags removed, as A1111 does."""
    return _TAG_RE.sub("", text)


def lora_tag(name: str, weight: float) -> str:
    return f"<lora:{name}:{weight:g}>"
