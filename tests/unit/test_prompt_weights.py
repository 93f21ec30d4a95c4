"""Attention weights are bounded at submit: each explicit (text:w) and each run's weight after nesting
within -100..100. Past that the text encoder's output overflows and the image is NaN."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from sdfarm.batchfile import plan_batch
from sdfarm.errors import BatchInvalid
from sdfarm.jobs import RECORDED, RenderJob
from sdfarm.models import HashCache, Registry, parse_registry
from sdfarm.prompt_syntax import check_attention_weights, parse_prompt_attention

SHA = "9" * 64
HUGE = "1" + "0" * 45  # 1e45: infinity in float32


@pytest.mark.parametrize("prompt", ["a (boat:100)", "a (boat:-100)", "(" * 48 + "boat", "[" * 300 + "boat",
                                    "((boat:10):9.9)", "(boat:1e45)", "boat:1000)", "a [boat:1000]"])
def test_weights_up_to_a_hundred_pass(prompt: str) -> None:
    check_attention_weights(prompt)


def test_what_is_not_a_weight_in_a1111_is_not_one_here() -> None:
    # `1e45` is no number to A1111's parser: the colon and the digits are text, weighed 1.1
    assert parse_prompt_attention("(boat:1e45)") == [("boat:1e45", 1.1)]


def test_an_explicit_weight_past_a_hundred_is_refused_with_what_is_allowed() -> None:
    with pytest.raises(ValueError, match=r"^attention weight 1e\+45 is out of range \(allowed: -100 to 100\)$"):
        check_attention_weights(f"a (boat:{HUGE}) at sea")
    with pytest.raises(ValueError, match=r"^attention weight -100.5 is out of range \(allowed: -100 to 100\)$"):
        check_attention_weights("(boat:-100.5)")


def test_nesting_past_a_hundred_is_refused_with_the_run_and_its_weight() -> None:
    expected = ("nested brackets weigh 'boat' 106.7 (allowed: -100 to 100 after nesting; each ( multiplies by 1.1,"
                " each (text:w) by w)")
    with pytest.raises(ValueError, match=r"^nested brackets") as info:
        check_attention_weights("(" * 49 + "boat" + ")" * 49)
    assert str(info.value) == expected
    with pytest.raises(ValueError, match=r"^nested brackets weigh 'a very long run of text that goes on and\.\.\.'"
                                         r" 2\.617e\+12 "):
        check_attention_weights("(" * 300 + "a very long run of text that goes on and on" + ")" * 300)
    with pytest.raises(ValueError, match="weigh 'boat' 110 "):
        check_attention_weights("((boat:10):11)")


def job(prompt: str, **changes: object) -> dict[str, object]:
    return {"model": "tiny-sd15", "model_hash": SHA, "prompt": prompt, "seed": 1, **changes}


def test_a_job_refuses_them_in_the_prompt_and_the_negative() -> None:
    for fields in (job(f"(boat:{HUGE})"), job("a boat", negative_prompt="(" * 60 + "blur")):
        with pytest.raises(ValidationError, match=r"out of range|nested brackets weigh"):
            RenderJob.model_validate(fields)


def test_a_job_read_back_as_recorded_keeps_them() -> None:
    """A message queued, or a batch recorded, before the bound still reads (its job fails alone, NaN)."""
    assert RenderJob.model_validate(job(f"(boat:{HUGE})"), context=RECORDED).prompt == f"(boat:{HUGE})"


def test_a_batch_file_names_the_item_and_the_field(tmp_path: Path) -> None:
    registry = Registry(parse_registry(f"models:\n  tiny-sd15:\n    hub: test/tiny\n    sha256: '{SHA}'\n",
                                       "test", tmp_path), HashCache(tmp_path))
    text = f"defaults: {{model: tiny-sd15}}\nitems:\n  - a calm sea\n  - 'a (boat:{HUGE})'\n"
    with pytest.raises(BatchInvalid) as info:
        plan_batch(text, "batch.yaml", "yaml", registry, 100)
    assert [str(p) for p in info.value.problems] == [
        "batch.yaml:4: item 2: prompt: attention weight 1e+45 is out of range (allowed: -100 to 100)"]
