"""A1111 extra-network tags in prompts: `<lora:name:weight>`, `<lora:name:te:unet>`.

A1111 users put LoRAs in the prompt text; the web UI takes the tags out before the text is
encoded and records the prompt with its tags. sdfarm does the same: the job keeps the prompt as
written, its `loras` field lists every LoRA (from tags and from the field), and the worker encodes
the prompt with the tags removed.
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple

# modules/extra_networks.py: re_extra_net
_TAG_RE: Final = re.compile(r"<(\w+):([^>]+)>")
LORA_TAGS: Final = ("lora", "lyco")  # A1111 reads both as LoRA


class LoraTag(NamedTuple):
    name: str
    weight: float  # A1111's text-encoder multiplier, and the UNet's unless unet_weight says otherwise
    unet_weight: float | None = None


def lora_tags(text: str) -> list[LoraTag]:
    """Each `<lora:name[:te[:unet]]>` (or `<lyco:...>`) tag, with A1111's named forms `te=` and
    `unet=` (extensions-builtin/Lora/extra_networks_lora.py): the text encoder's multiplier (default
    1), and the UNet's when it differs. A weight that is not a number, a dynamic dimension (`dyn`),
    or a tag of an extra network sdfarm does not run raises ValueError naming the tag."""
    found: list[LoraTag] = []
    for match in _TAG_RE.finditer(text):
        tag, kind, items = match.group(0), match.group(1), match.group(2).split(":")
        if kind not in LORA_TAGS:
            raise ValueError(f"extra network tag {tag!r} is not supported (allowed: <lora:name:weight>)")
        positional = [x for x in items if "=" not in x]
        named = dict(x.split("=", 1) for x in items if "=" in x)
        if len(positional) > 3 or "dyn" in named:
            raise ValueError(f"tag {tag!r}: a dynamic dimension (dyn) is not supported"
                             " (allowed: <lora:name:te:unet>, te=, unet=)")
        if unknown := set(named) - {"te", "unet"}:
            raise ValueError(f"tag {tag!r}: unknown parameter {sorted(unknown)[0]!r} (allowed: te=, unet=)")
        te = _number(tag, named.get("te", positional[1] if len(positional) > 1 else ""), 1.0)
        unet = _number(tag, named.get("unet", positional[2] if len(positional) > 2 else ""), te)
        found.append(LoraTag(positional[0].strip(), te, None if unet == te else unet))
    return found


def _number(tag: str, text: str, default: float) -> float:
    if not text.strip():
        return default
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"tag {tag!r}: weight {text!r} is not a number") from None


def strip_tags(text: str) -> str:
    """The prompt as the text encoder sees it: tags removed, as A1111 does."""
    return _TAG_RE.sub("", text)


def lora_tag(name: str, weight: float, unet_weight: float | None = None) -> str:
    return f"<lora:{name}:{weight:g}" + (f":{unet_weight:g}>" if unet_weight is not None else ">")
