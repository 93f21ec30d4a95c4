from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sdfarm.datasets import Schedule, expand, load_spec, plan_run
from sdfarm.errors import InvalidInput
from sdfarm.models import HashCache, Registry, parse_registry

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "examples" / "nightly.yaml"
DAY = dt.date(2026, 11, 20)


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    text = "models:\n  tiny-sd15:\n    hub: test/tiny\n    sha256: '" + "9" * 64 + "'\n"
    return Registry(parse_registry(text, "test", tmp_path), HashCache(tmp_path))


def test_same_spec_and_date_give_identical_jobs_in_two_processes(registry: Registry) -> None:
    code = ("import datetime, json, sys; from sdfarm.datasets import expand, load_spec; "
            "print(json.dumps(expand(load_spec(__import__('pathlib').Path(sys.argv[1])), "
            "datetime.date.fromisoformat(sys.argv[2]))))")
    runs = [json.loads(subprocess.run([sys.executable, "-c", code, str(SPEC), DAY.isoformat()], capture_output=True,
                                      text=True, check=True).stdout) for _ in range(2)]
    assert runs[0] == runs[1] == expand(load_spec(SPEC), DAY)
    assert len(runs[0]) == 200
    assert plan_run(load_spec(SPEC), DAY, registry, 10**6).batch_id == plan_run(load_spec(SPEC), DAY, registry,
                                                                                 10**6).batch_id


def test_another_date_gives_other_jobs(registry: Registry) -> None:
    a = plan_run(load_spec(SPEC), DAY, registry, 10**6)
    b = plan_run(load_spec(SPEC), DAY + dt.timedelta(days=1), registry, 10**6)
    assert a.batch_id != b.batch_id
    assert {j.id for j in a.jobs}.isdisjoint({j.id for j in b.jobs})


def test_templates_are_filled_from_inline_lists_and_word_files() -> None:
    items = expand(load_spec(SPEC), DAY)
    places = (ROOT / "examples" / "words" / "places.txt").read_text().split("\n")
    assert all("{" not in i["prompt"] for i in items)
    assert any(any(p and p in i["prompt"] for p in places) for i in items)
    assert len({i["seed"] for i in items}) > 190


def copy_spec(tmp_path: Path, text: str | None = None) -> Path:
    (tmp_path / "words").mkdir(exist_ok=True)
    (tmp_path / "words" / "places.txt").write_text((ROOT / "examples" / "words" / "places.txt").read_text())
    path = tmp_path / "spec.yaml"
    path.write_text(text if text is not None else SPEC.read_text())
    return path


def test_editing_the_spec_or_a_word_file_changes_the_batch_id(tmp_path: Path, registry: Registry) -> None:
    path = copy_spec(tmp_path)
    base = plan_run(load_spec(path), DAY, registry, 10**6).batch_id
    path.write_text(SPEC.read_text().replace("steps: 12", "steps: 13"))
    assert plan_run(load_spec(path), DAY, registry, 10**6).batch_id != base
    path.write_text(SPEC.read_text())  # back to the original
    assert plan_run(load_spec(path), DAY, registry, 10**6).batch_id == base
    (tmp_path / "words" / "places.txt").write_text("the moon\n")
    assert plan_run(load_spec(path), DAY, registry, 10**6).batch_id != base


def test_fixed_seeds_repeat_across_dates(tmp_path: Path) -> None:
    path = copy_spec(tmp_path, SPEC.read_text().replace("seeds: per-run", "seeds: fixed"))
    seeds = [[i["seed"] for i in expand(load_spec(path), DAY + dt.timedelta(days=d))] for d in range(2)]
    assert seeds[0] == seeds[1]


def test_quota_caps_a_run(tmp_path: Path) -> None:
    path = copy_spec(tmp_path, SPEC.read_text().replace("quota: 200", "quota: 7"))
    assert len(expand(load_spec(path), DAY)) == 7


@pytest.mark.parametrize(("change", "message"), [
    (("{animal} in {place}", "{animal} in {planet}"), "uses {planet}, which is not a wildcard"),
    (("cron: \"0 3 * * *\"", "cron: \"every night\""), "'every night' is not a cron expression"),
    (("timezone: Europe/Berlin", "timezone: Mars/Olympus"), "unknown time zone 'Mars/Olympus'"),
    (("images_per_run: 200", "images_per_run: 0"), "images_per_run: Input should be greater than or equal to 1"),
    (("steps: 12", "steps: 12\n  prompt: x"), "render: unknown field 'prompt'"),
    (("words/places.txt", "../../etc/passwd"), "is outside the spec's folder"),
    (("name: animals", "name: Animals!"), "name: String should match pattern"),
])
def test_spec_validation_names_the_problem(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    path = copy_spec(tmp_path, SPEC.read_text().replace(*change))
    with pytest.raises(InvalidInput, match=r"spec\.yaml") as info:
        load_spec(path)
    assert message in str(info.value)


def test_the_scheduler_signs_only_with_a_webhook_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch.json changed in the bucket cannot make the scheduler sign (and so reveal) another secret."""
    from producer.scheduler import webhook_secret

    monkeypatch.setenv("SDFARM_S3_SECRET_ACCESS_KEY", "not for webhooks")
    monkeypatch.setenv("SDFARM_WEBHOOK_SECRET", "hmac key")
    assert webhook_secret("b1", "SDFARM_S3_SECRET_ACCESS_KEY") is None
    assert webhook_secret("b1", "SDFARM_WEBHOOK_SECRET") == b"hmac key"
    assert webhook_secret("b1", "SDFARM_WEBHOOK_UNSET") is None


def test_due_times_between_two_moments_name_each_due_time_as_the_fire_does() -> None:
    """The ledger claims missed due times by the same name as the fire claims its due time
    (Schedule.latest): one due time, one claim, whichever comes first. Across a DST change too."""
    nightly = Schedule(cron="30 2 * * *", timezone="Europe/Berlin")  # 02:30 does not exist on 2026-03-29
    after = dt.datetime(2026, 3, 26, 12, 0, tzinfo=dt.timezone.utc)
    before = dt.datetime(2026, 3, 31, 0, 30, tzinfo=dt.timezone.utc)  # 02:30 in Berlin on the 31st
    between = nightly.due_between(after, before, limit=100)
    assert [d.date().isoformat() for d in between] == ["2026-03-27", "2026-03-28", "2026-03-29", "2026-03-30"]
    for due in between:  # as a tick just after each would see it, and claim it
        assert nightly.latest(due + dt.timedelta(minutes=1)).isoformat() == due.isoformat()
    assert nightly.latest(before + dt.timedelta(minutes=1)) == before
    assert nightly.due_between(after, before, limit=2) == between[:2]
    assert nightly.due_between(before, before, limit=100) == []
