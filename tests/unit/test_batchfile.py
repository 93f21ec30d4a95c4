from __future__ import annotations

from pathlib import Path

import pytest

from sdfarm.batchfile import derive_seed, plan_batch, plan_file
from sdfarm.errors import BatchInvalid
from sdfarm.models import HashCache, Registry, parse_registry

ROOT = Path(__file__).resolve().parents[2]
SHA = "9" * 64


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    text = f"models:\n  tiny-sd15:\n    hub: test/tiny\n    sha256: '{SHA}'\n  other:\n    hub: test/other\n"
    return Registry(parse_registry(text, "test", tmp_path), HashCache(tmp_path))


def plan(text: str, registry: Registry, fmt: str = "yaml", max_jobs: int = 1000, **kw: object):  # type: ignore[no-untyped-def]
    return plan_batch(text, f"batch.{fmt}", fmt, registry, max_jobs, **kw)  # type: ignore[arg-type]


def problems(text: str, registry: Registry, fmt: str = "yaml", **kw: object) -> list[str]:
    with pytest.raises(BatchInvalid) as info:
        plan(text, registry, fmt, **kw)
    return [str(p) for p in info.value.problems]


# ------------------------------------------------------------------ every format parses


@pytest.mark.parametrize(("name", "count"), [("demo.yaml", 20), ("batch.jsonl", 6), ("batch.csv", 3)])
def test_example_files_parse(name: str, count: int, registry: Registry) -> None:
    p = plan_file(ROOT / "examples" / name, registry, 1000)
    assert len(p.jobs) == count
    assert all(j.model == "tiny-sd15" and j.model_hash == SHA for j in p.jobs)


def test_txt_takes_everything_else_from_flags(registry: Registry) -> None:
    p = plan_file(ROOT / "examples" / "prompts.txt", registry, 1000, overrides={"model": "tiny-sd15", "steps": 8})
    assert [j.prompt for j in p.jobs] == ["a quiet harbour at dawn", "a robot tending a vegetable garden",
                                          "an ink drawing of a dragon"]
    assert {j.steps for j in p.jobs} == {8}


def test_json_format(registry: Registry) -> None:
    text = '{"defaults": {"model": "tiny-sd15"}, "items": [{"prompt": "a", "count": 2}, "b"]}'
    assert len(plan(text, registry, "json").jobs) == 3


def test_csv_values_are_typed(registry: Registry) -> None:
    p = plan("model,prompt,steps,guidance_scale,seed\ntiny-sd15,\"a, b\",12,6.5,3\n", registry, "csv")
    job = p.jobs[0]
    assert (job.prompt, job.steps, job.guidance_scale, job.seed) == ("a, b", 12, 6.5, 3)


# ------------------------------------------------------------------ sweeps and seeds


def test_matrix_is_a_cartesian_product_sharing_seeds(registry: Registry) -> None:
    text = """
defaults: {model: tiny-sd15}
items:
  - prompt: teapot
    count: 2
    matrix: {sampler: [Euler, DDIM, LMS], guidance_scale: [5, 9]}
"""
    p = plan(text, registry)
    assert len(p.jobs) == 3 * 2 * 2
    combos = {(j.sampler, j.guidance_scale) for j in p.jobs}
    assert len(combos) == 6
    assert {j.seed for j in p.jobs} == {derive_seed(0, 0, 0), derive_seed(0, 0, 1)}


def test_top_level_matrix_applies_to_every_item(registry: Registry) -> None:
    text = "defaults: {model: tiny-sd15}\nmatrix: {steps: [10, 20]}\nitems: [a, b]\n"
    assert sorted((j.prompt, j.steps) for j in plan(text, registry).jobs) == [
        ("a", 10), ("a", 20), ("b", 10), ("b", 20)]


def test_seeds_explicit_sequential_or_derived_and_recorded(registry: Registry) -> None:
    text = """
seed: 99
defaults: {model: tiny-sd15}
items:
  - {prompt: a, seeds: [5, 6]}
  - {prompt: b, seed: 10, count: 3}
  - {prompt: c, count: 2}
"""
    p = plan(text, registry)
    assert [j.seed for j in p.jobs] == [5, 6, 10, 11, 12, derive_seed(99, 2, 0), derive_seed(99, 2, 1)]
    assert p.spec["seed"] == 99


def test_same_file_same_jobs_and_batch_id_other_seed_differs(registry: Registry) -> None:
    text = "seed: 1\ndefaults: {model: tiny-sd15}\nitems: [a, b]\n"
    assert plan(text, registry).batch_id == plan(text, registry).batch_id
    assert [j.id for j in plan(text, registry).jobs] == [j.id for j in plan(text, registry).jobs]
    other = plan(text.replace("seed: 1", "seed: 2"), registry)
    assert other.batch_id != plan(text, registry).batch_id


# ------------------------------------------------------------------ validation: file, line, field, value, allowed

CASES = [
    ("items:\n  - {model: tiny-sd15, prompt: a, colour: red}\n",
     "batch.yaml:2: item 1: colour: unknown field (allowed: model, prompt,"),
    ("items:\n  - {model: tiny-sd15, prompt: a, width: 100}\n",
     "batch.yaml:2: item 1: width: 100 is not allowed (allowed: a multiple of 8 from 64 to 2048)"),
    ("items:\n  - {model: tiny-sd15, prompt: a, height: 4096}\n",
     "batch.yaml:2: item 1: height: 4096 is not allowed (allowed: a multiple of 8 from 64 to 2048)"),
    ("items:\n  - {model: tiny-sd15, prompt: a, width: 56}\n",
     "batch.yaml:2: item 1: width: 56 is not allowed (allowed: a multiple of 8 from 64 to 2048)"),
    ("items:\n  - {model: tiny-sd15, prompt: a, steps: 0}\n",
     "batch.yaml:2: item 1: steps: 0 is out of range (allowed: 1..150)"),
    ("items:\n  - {model: tiny-sd15, prompt: a, steps: 151}\n",
     "batch.yaml:2: item 1: steps: 151 is out of range (allowed: 1..150)"),
    ("items:\n  - {model: tiny-sd15, prompt: a, guidance_scale: 30.5}\n",
     "batch.yaml:2: item 1: guidance_scale: 30.5 is out of range (allowed: 0..30)"),
    ("items:\n  - {model: tiny-sd15, prompt: a, guidance_scale: -1}\n",
     "batch.yaml:2: item 1: guidance_scale: -1 is out of range (allowed: 0..30)"),
    ("items:\n  - {model: tiny-sd15, prompt: a, sampler: Euler b}\n",
     "batch.yaml:2: item 1: sampler: unknown sampler 'Euler b' (allowed: Euler, Euler Karras,"),
    ("items:\n  - {model: sd-9000, prompt: a}\n",
     "batch.yaml:2: item 1: model: unknown model 'sd-9000' (allowed: other, tiny-sd15)"),
    ("items:\n  - {model: ../../etc/passwd, prompt: a}\n",
     "batch.yaml:2: item 1: model: unknown model '../../etc/passwd' (allowed: other, tiny-sd15)"),
    ("items:\n  - {prompt: a}\n",
     "batch.yaml:2: item 1: model: missing (allowed: other, tiny-sd15)"),
    ("items:\n  - {model: tiny-sd15, prompt: '  '}\n",
     "batch.yaml:2: item 1: prompt: must not be empty"),
    ("items:\n  - {model: tiny-sd15, prompt: " + "x" * 4001 + "}\n",
     "batch.yaml:2: item 1: prompt: is 4001 characters long (allowed: at most 4000)"),
    ("items:\n  - {model: tiny-sd15, prompt: a, seed: -1}\n",
     "batch.yaml:2: item 1: seed: -1 is out of range (allowed: 0..4294967295)"),
    ("items:\n  - {model: tiny-sd15, prompt: a, steps: many}\n",
     "batch.yaml:2: item 1: steps: Input should be a valid integer, unable to parse string as an integer (got 'many')"),
    ("items:\n  - {model: tiny-sd15, prompt: a, count: 0}\n",
     "batch.yaml:2: item 1: count: 0 is not allowed (allowed: an integer 1..10000)"),
    ("items:\n  - {model: tiny-sd15, prompt: a, count: 2, seeds: [1, 2]}\n",
     "batch.yaml:2: item 1: seeds: set either count or seeds, not both"),
    ("items:\n  - {model: tiny-sd15, prompt: a, matrix: {flavour: [1]}}\n",
     "batch.yaml:2: item 1: matrix.flavour: unknown field (allowed: model, prompt,"),
    ("items:\n  - {model: tiny-sd15, prompt: a, clip_skip: 13}\n",
     "batch.yaml:2: item 1: clip_skip: 13 is out of range (allowed: 1..12)"),
    ("colour: red\nitems: [a]\n", "batch.yaml:1: colour: unknown top-level key (allowed: name, seed, defaults"),
    ("items: []\n", "batch.yaml:1: items: expected a non-empty list of items"),
    ("items:\n  - [1, 2]\n", "batch.yaml:2: item 1: expected a mapping or a prompt string, got [1, 2]"),
    ("items: [a\n  b: c\n", "batch.yaml:2: malformed YAML, column"),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_each_problem_names_file_line_item_field_value_and_allowed(text: str, expected: str,
                                                                    registry: Registry) -> None:
    found = problems(text, registry)
    assert any(p.startswith(expected) for p in found), found


def test_every_invalid_item_is_reported_at_once(registry: Registry) -> None:
    text = """
defaults: {model: tiny-sd15}
items:
  - {prompt: ok}
  - {prompt: a, width: 100}
  - {prompt: b, steps: 0, sampler: Nope}
  - {prompt: c, model: sd-9000, guidance_scale: 99}
"""
    found = problems(text, registry)
    assert len(found) == 5
    assert [p.split(": ")[0] for p in found] == ["batch.yaml:5", "batch.yaml:6", "batch.yaml:6", "batch.yaml:7",
                                                 "batch.yaml:7"]


def test_item_cap(registry: Registry) -> None:
    text = "defaults: {model: tiny-sd15}\nitems:\n  - {prompt: a, count: 6}\n"
    found = problems(text, registry, max_jobs=5)
    assert found == ["batch.yaml: the batch expands to more than 5 jobs (allowed: at most 5;"
                     " the cap is SDFARM_MAX_JOBS_PER_BATCH)"]


def test_malformed_csv_reports_the_parser_position(registry: Registry) -> None:
    found = problems('model,prompt\ntiny-sd15,"unterminated\n', registry, "csv")
    assert found == ["batch.csv:2: malformed CSV: unexpected end of data"]


def test_csv_unknown_column_and_ragged_row(registry: Registry) -> None:
    assert problems("model,prompt,colour\n", registry, "csv")[0].startswith("batch.csv:1: colour: unknown column")
    found = problems("model,prompt\ntiny-sd15,a,extra\n", registry, "csv")
    assert found == ["batch.csv:2: item 1: expected 2 cells, got 3"]


def test_malformed_jsonl_line(registry: Registry) -> None:
    found = problems('{"model": "tiny-sd15", "prompt": "a"}\n{"model": \n', registry, "jsonl")
    assert found == ["batch.jsonl:2: item 2: malformed JSON, column 11: Expecting value"]


def test_malformed_json(registry: Registry) -> None:
    found = problems('{"items": [\n  {"prompt": "a",}\n]}', registry, "json")
    assert found[0].startswith("batch.json:2: malformed JSON, column")


def test_jsonl_field_problem_names_its_line(registry: Registry) -> None:
    text = '{"model": "tiny-sd15", "prompt": "a"}\n\n{"model": "tiny-sd15", "prompt": "b", "steps": 0}\n'
    assert problems(text, registry, "jsonl") == ["batch.jsonl:3: item 2: steps: 0 is out of range (allowed: 1..150)"]


def test_unknown_file_type(tmp_path: Path, registry: Registry) -> None:
    f = tmp_path / "batch.toml"
    f.write_text("x = 1")
    with pytest.raises(BatchInvalid, match=r"unknown file type '\.toml'"):
        plan_file(f, registry, 10)


def test_not_utf8(tmp_path: Path, registry: Registry) -> None:
    f = tmp_path / "batch.txt"
    f.write_bytes(b"\xff\xfe a cat")
    with pytest.raises(BatchInvalid, match="not UTF-8 text"):
        plan_file(f, registry, 10)
