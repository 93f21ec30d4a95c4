"""Every Redis and S3 key is named in sdfarm/layout.py, and only the boards (sdfarm/progress.py,
sdfarm/workers.py) talk to Redis directly: the rest of the code asks them."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BOARDS = {ROOT / "sdfarm" / "progress.py", ROOT / "sdfarm" / "workers.py"}
CODE = [p for d in ("sdfarm", "producer", "worker") for p in sorted((ROOT / d).rglob("*.py"))]


def test_only_the_boards_use_the_redis_client() -> None:
    raw = re.compile(r"\.r\.[a-z_]+\(|\bboard\.r\b")
    users = [f"{p.relative_to(ROOT)}:{n}" for p in CODE if p not in BOARDS
             for n, line in enumerate(p.read_text().splitlines(), 1) if raw.search(line)]
    assert users == []


def test_keys_are_spelled_only_in_the_layout() -> None:
    spelled = re.compile(r"""["'](sdfarm:[a-z_]+[:{*]|renders/|thumbs/|batches/|inputs/|dead-letters/"""
                         r"""|compile-cache/)""")
    elsewhere = [f"{p.relative_to(ROOT)}:{n}" for p in CODE if p.name != "layout.py"
                 for n, line in enumerate(p.read_text().splitlines(), 1) if spelled.search(line)]
    assert elsewhere == []
