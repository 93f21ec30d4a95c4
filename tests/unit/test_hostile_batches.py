"""Malformed and hostile batch files under tests/hostile/: each gives its message, nothing runs.

Beyond the corpus: files that cannot live in a repository (a FIFO, /dev/zero, fifteen million
lines), values that used to be rounded or taken as numbers, what reaches a terminal, and the other
files a user names (dataset specs and word files, local input images). The real command line on
the worst of them, with its time and memory, is in tests/integration/test_hostile_submit.py."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import pytest
from PIL import Image

from sdfarm.batchfile import MAX_DOCUMENT_NODES, load_yaml, plan_batch, plan_file
from sdfarm.datasets import load_spec
from sdfarm.errors import MAX_SHOWN_PROBLEMS, BatchInvalid, InvalidInput, Problem, brief, printable
from sdfarm.inputs import MAX_INPUT_BYTES, Inputs
from sdfarm.models import HashCache, Registry, parse_registry

HOSTILE = Path(__file__).resolve().parents[1] / "hostile"
EXPECTED: dict[str, str] = json.loads((HOSTILE / "expected.json").read_text())


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    text = "models:\n  tiny-sd15:\n    hub: test/tiny\n    sha256: '" + "9" * 64 + "'\n"
    return Registry(parse_registry(text, "test", tmp_path), HashCache(tmp_path))


def refusal(path: Path, registry: Registry, max_jobs: int = 100, inputs: Inputs | None = None) -> str:
    with pytest.raises(BatchInvalid) as info:
        plan_file(path, registry, max_jobs, inputs=inputs)
    return str(info.value)


def test_there_are_at_least_seventy() -> None:
    assert len(EXPECTED) >= 70
    assert {p.name for p in HOSTILE.iterdir()} == {*EXPECTED, "expected.json"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_hostile_file_is_refused_with_its_message(name: str, registry: Registry) -> None:
    start = time.monotonic()
    text = refusal(HOSTILE / name, registry)
    assert EXPECTED[name] in text, text
    assert str(HOSTILE / name) in text  # the message names the file
    assert printable(text, newlines=True) == text  # nothing in it a terminal would act on
    assert len(text.splitlines()) <= MAX_SHOWN_PROBLEMS + 2
    assert len(text) < 60_000
    assert time.monotonic() - start < 5
    assert not Path("/tmp/sdfarm-pwned").exists()


# ------------------------------------------------------------------ files that are not files


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path, registry: Registry) -> None:
    fifo = tmp_path / "batch.txt"
    os.mkfifo(fifo)
    assert "batch.txt: file is a FIFO (allowed: a regular file)" in refusal(fifo, registry)


@pytest.mark.parametrize("target", ["/dev/zero", "/dev/urandom"])
def test_a_symlink_to_an_endless_device_is_refused(target: str, tmp_path: Path, registry: Registry) -> None:
    link = tmp_path / "batch.yaml"
    link.symlink_to(target)
    assert link.stat().st_size == 0  # what a size check alone would have let through
    assert "batch.yaml: file is a character device (allowed: a regular file)" in refusal(link, registry)


def test_a_directory_is_refused(tmp_path: Path, registry: Registry) -> None:
    folder = tmp_path / "batch.json"
    folder.mkdir()
    assert "batch.json: file is a directory (allowed: a regular file)" in refusal(folder, registry)


def test_fifteen_million_lines_are_counted_not_kept(tmp_path: Path, registry: Registry) -> None:
    path = tmp_path / "lines.txt"
    with path.open("w") as f:
        for _ in range(150):
            f.write("a\n" * 100_000)
    start = time.monotonic()
    text = refusal(path, registry, max_jobs=1_000_000)
    assert "the batch expands to more than 1000000 jobs" in text
    assert time.monotonic() - start < 5


def test_a_document_of_too_many_values_is_refused_before_it_is_built(tmp_path: Path, registry: Registry) -> None:
    path = tmp_path / "wide.yaml"
    path.write_text("items:\n" + "  - a\n" * (MAX_DOCUMENT_NODES + 10))
    assert f"the document holds more than {MAX_DOCUMENT_NODES} values" in refusal(path, registry, 10**6)


# ------------------------------------------------------------------ values taken for others


@pytest.mark.parametrize(("item", "expected"), [
    ("{prompt: a, count: 2.9}", "count: 2.9 is not allowed"),
    ("{prompt: a, count: 2.0}", "count: 2.0 is not allowed"),
    ("{prompt: a, count: true}", "count: True is not allowed"),
    ("{prompt: a, count: .inf}", "count: inf is not allowed"),
    ("{prompt: a, seed: 1.9}", "seed: 1.9 is not allowed (allowed: an integer 0..4294967295)"),
    ("{prompt: a, seed: true}", "seed: True is not allowed"),
    ("{prompt: a, seed: .nan}", "seed: nan is not allowed"),
    ("{prompt: a, seeds: [1, true]}", "seeds: expected a non-empty list of integers"),
    ("{prompt: a, width: true}", "width: True is not allowed (allowed: a number, not true or false)"),
    ("{prompt: a, guidance_scale: false}", "guidance_scale: False is not allowed"),
    ("{prompt: a, upscale: {factor: true}}", "upscale.factor: True is not allowed"),
    ("{prompt: a, loras: [{name: x, weight: true}]}", "loras.0.weight: True is not allowed"),
    ("{prompt: a, matrix: {seed: [1, true]}}", "seed: True is not allowed"),
])
def test_numbers_are_strict(item: str, expected: str, registry: Registry) -> None:
    with pytest.raises(BatchInvalid) as info:
        plan_batch(f"defaults: {{model: tiny-sd15}}\nitems:\n  - {item}\n", "b.yaml", "yaml", registry, 100)
    assert expected in str(info.value)


def test_integers_from_csv_cells_and_yaml_still_count(registry: Registry) -> None:
    csv = plan_batch("model,prompt,seed,count,steps\ntiny-sd15,a,7,3, 12 \n", "b.csv", "csv", registry, 100)
    assert [(j.seed, j.steps) for j in csv.jobs] == [(7, 12), (8, 12), (9, 12)]
    yaml_ = plan_batch("items: [{model: tiny-sd15, prompt: a, seed: 7, count: 2}]\n", "b.yaml", "yaml", registry, 9)
    assert [j.seed for j in yaml_.jobs] == [7, 8]


def test_a_yaml_merge_key_is_not_a_duplicate(registry: Registry) -> None:
    text = ("defaults: {model: tiny-sd15}\nbase: &base {prompt: a, steps: 20, width: 64}\n"
            "items:\n  - {<<: *base, steps: 12}\n")
    with pytest.raises(BatchInvalid) as info:  # `base` is no top-level key; the item itself is fine
        plan_batch(text, "b.yaml", "yaml", registry, 100)
    assert [p.field for p in info.value.problems] == ["base"]
    item = load_yaml(text, "b.yaml")["items"][0]
    assert (item["steps"], item["width"], item.key_lines["steps"]) == (12, 64, 4)


def test_a_csv_saved_by_excel_with_a_bom_reads(tmp_path: Path, registry: Registry) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfmodel,prompt,steps\r\ntiny-sd15,a cat,12\r\n")
    jobs = plan_file(path, registry, 100).jobs
    assert [(j.prompt, j.steps) for j in jobs] == [("a cat", 12)]
    assert plan_batch("\ufeffmodel,prompt\ntiny-sd15,a dog\n", "b.csv", "csv", registry, 100).jobs[0].prompt == "a dog"


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_a_bom_before_a_document_reads(fmt: str, tmp_path: Path, registry: Registry) -> None:
    path = tmp_path / f"bom.{fmt}"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"items": [{"model": "tiny-sd15", "prompt": "a"}]}')
    assert len(plan_file(path, registry, 100).jobs) == 1


def test_tabs_and_line_breaks_in_prompts_are_text(registry: Registry) -> None:
    text = 'items: [{model: tiny-sd15, prompt: "a cat\\ton a mat\\nBREAK\\nsunset", negative_prompt: "x\\ty"}]\n'
    job = plan_batch(text, "b.yaml", "yaml", registry, 100).jobs[0]
    assert job.prompt == "a cat\ton a mat\nBREAK\nsunset"


@pytest.mark.parametrize(("char", "name"), [("\r", "U+000D (CR)"), ("\x7f", "U+007F (DEL)"),
                                            ("\x9b", "U+009B (a C1 control)"), ("\x07", "U+0007 (BEL)")])
def test_other_control_characters_in_prompts_are_refused(char: str, name: str, registry: Registry) -> None:
    items = [{"model": "tiny-sd15", "prompt": "ok"}, {"model": "tiny-sd15", "prompt": "fine",
                                                       "negative_prompt": f"ab{char}c"}]
    with pytest.raises(BatchInvalid) as info:
        plan_batch(json.dumps({"items": items}), "b.json", "json", registry, 100)
    assert [str(p) for p in info.value.problems] == [
        f"b.json:1: item 2: negative_prompt: control character {name} at character 3 is not allowed"
        " (allowed: text, tabs and line breaks)"]


# ------------------------------------------------------------------ what reaches a terminal


def test_brief_never_expands_a_shared_structure() -> None:
    value: object = ["lol"] * 9
    for _ in range(30):  # 9**31 strings if expanded
        value = [value] * 9
    start = time.monotonic()
    text = brief(value)
    assert time.monotonic() - start < 0.1
    assert len(text) <= 80
    assert text.startswith("[[[[")
    assert brief(int("7" * 4000) ** 3) == "<an integer of about 12000 digits>"
    assert brief("\x1b[2J" + "x" * 10_000).startswith("'\\x1b[2J")
    assert len(brief("x" * 10_000)) == 80
    assert (brief([1, 2]), brief("lucky"), brief(True), brief(None)) == ("[1, 2]", "'lucky'", "True", "None")


def test_printable_escapes_controls_and_reordering() -> None:
    assert printable("ok\x1b[2J\r\u202egnp.exe\x00") == "ok\\x1b[2J\\x0d\\u202egnp.exe\\x00"
    assert printable("two\nlines", newlines=True) == "two\nlines"
    assert printable("two\nlines") == "two\\x0alines"
    assert printable("ünïcode ☃ 猫") == "ünïcode ☃ 猫"


def test_error_output_lists_fifty_problems_and_counts_the_rest(registry: Registry) -> None:
    text = "defaults: {model: tiny-sd15}\nitems:\n" + "  - {prompt: a, width: 100}\n" * 120
    with pytest.raises(BatchInvalid) as info:
        plan_batch(text, "b.yaml", "yaml", registry, 1000)
    lines = str(info.value).splitlines()
    assert lines[0] == "120 problems in batch; nothing was enqueued"
    assert len(lines) == 1 + MAX_SHOWN_PROBLEMS + 1
    assert lines[-1] == "  ... and 70 more"
    assert len(info.value.problems) == 120


def test_validation_stops_after_a_thousand_problems(registry: Registry) -> None:
    text = "defaults: {model: tiny-sd15}\nitems:\n" + "  - {prompt: a, width: 100}\n" * 5000
    with pytest.raises(BatchInvalid) as info:
        plan_batch(text, "b.yaml", "yaml", registry, 10_000)
    assert info.value.stopped
    assert len(info.value.problems) == 1000
    assert str(info.value).startswith("at least 1000 problems in batch (validation stopped there)")
    assert str(info.value).endswith("  ... and 950+ more")


def test_a_problem_prints_on_one_bounded_line() -> None:
    problem = Problem("a\nb.yaml", 3, 1, "\x1b[31m" + "k" * 5000, "m" * 10_000 + "\n")
    text = str(problem)
    assert "\n" not in text
    assert "\x1b" not in text
    assert len(text) < 2300


# ------------------------------------------------------------------ dataset specs, word files, inputs


def spec(tmp_path: Path, template: str, extra: str = "") -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(f"name: animals\ntemplates: [{json.dumps(template)}]\nwildcards: {{animal: [cat, dog]}}\n"
                    f"images_per_run: 2\n{extra}")
    return path


@pytest.mark.parametrize(("template", "shown"), [
    ("{animal:>100000000}", "{animal:>100000000}"),
    ("{animal!r}", "{animal!r}"),
    ("{animal.__class__}", "{animal.__class__}"),
    ("{animal[0]}", "{animal[0]}"),
    ("{}", "{}"),
])
def test_templates_take_names_only(template: str, shown: str, tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(InvalidInput) as info:
        load_spec(spec(tmp_path, template))
    assert shown in str(info.value)
    assert time.monotonic() - start < 2


def test_a_webhook_key_comes_only_from_a_webhook_variable(tmp_path: Path) -> None:
    hook = "webhook: {url: 'https://example.invalid/hook', secret_env: %s}\n"
    assert load_spec(spec(tmp_path, "{animal}", hook % "SDFARM_WEBHOOK_NIGHTLY")).spec.webhook is not None
    for name in ("SDFARM_S3_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY", "SDFARM_WEBHOOK_", "SDFARM_WEBHOOK_a-b"):
        with pytest.raises(InvalidInput, match="allowed: a variable named SDFARM_WEBHOOK_"):
            load_spec(spec(tmp_path, "{animal}", hook % name))


def test_a_spec_of_aliases_is_refused_at_once(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))
        + "name: animals\ntemplates: *i\nimages_per_run: 1\n")
    start = time.monotonic()
    with pytest.raises(InvalidInput, match=r"spec\.yaml:.*the document holds more than"):
        load_spec(path)
    assert time.monotonic() - start < 2


def test_a_word_file_that_is_a_fifo_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "words.txt")
    path = spec(tmp_path, "{animal}")
    path.write_text(path.read_text().replace("{animal: [cat, dog]}", "{animal: {file: words.txt}}"))
    with pytest.raises(InvalidInput, match=r"wildcards\.animal: words\.txt: is a FIFO \(allowed: a regular file\)"):
        load_spec(path)


def test_local_inputs_are_sized_before_they_are_read(tmp_path: Path, registry: Registry) -> None:
    folder = tmp_path / "inputs"
    folder.mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    (folder / "big.png").write_bytes(buf.getvalue())
    os.truncate(folder / "big.png", MAX_INPUT_BYTES + 1)  # sparse: costs no disk
    os.mkfifo(folder / "fifo.png")
    (folder / "zero.png").symlink_to("/dev/zero")
    path = tmp_path / "b.yaml"
    path.write_text("defaults: {model: tiny-sd15, prompt: a}\nitems:\n" + "".join(
        f"  - {{init_image: 'local:{name}'}}\n" for name in ("big.png", "fifo.png", "zero.png")))
    text = refusal(path, registry, inputs=Inputs(None, folder))
    assert f"item 1: init_image: 'local:big.png': is {MAX_INPUT_BYTES + 1} bytes (allowed: at most" in text
    assert "item 2: init_image: 'local:fifo.png': is a FIFO (allowed: a regular file)" in text
    assert "item 3: init_image: 'local:zero.png' is outside SDFARM_INPUTS_DIR" in text  # where it points
