"""Malformed and hostile batch files under tests/hostile/: each gives its message, nothing runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdfarm.batchfile import plan_file
from sdfarm.errors import BatchInvalid
from sdfarm.models import HashCache, Registry, parse_registry

HOSTILE = Path(__file__).resolve().parents[1] / "hostile"
EXPECTED: dict[str, str] = json.loads((HOSTILE / "expected.json").read_text())


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    text = "models:\n  tiny-sd15:\n    hub: test/tiny\n    sha256: '" + "9" * 64 + "'\n"
    return Registry(parse_registry(text, "test", tmp_path), HashCache(tmp_path))


def test_there_are_at_least_forty() -> None:
    assert len(EXPECTED) >= 40
    assert {p.name for p in HOSTILE.iterdir()} == {*EXPECTED, "expected.json"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_hostile_file_is_refused_with_its_message(name: str, registry: Registry) -> None:
    with pytest.raises(BatchInvalid) as info:
        plan_file(HOSTILE / name, registry, max_jobs=100)
    text = str(info.value)
    assert EXPECTED[name] in text, text
    assert str(HOSTILE / name) in text  # the message names the file
    assert not Path("/tmp/sdfarm-pwned").exists()
