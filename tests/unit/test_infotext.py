from __future__ import annotations

from sdfarm import __version__
from sdfarm.infotext import format_infotext, job_infotext, parse_infotext
from sdfarm.jobs import RenderJob

HASH = "6ce0161689" + "0" * 54


def make(**changes: object) -> RenderJob:
    base = {"model": "v1-5-pruned-emaonly", "model_hash": HASH, "prompt": "a cat", "seed": 1234, "width": 512,
            "height": 512, "steps": 30, "guidance_scale": 7, "sampler": "DPM++ 2M Karras"}
    return RenderJob.model_validate({**base, **changes})


def test_exact_a1111_layout() -> None:
    text = job_infotext(make(negative_prompt="ugly"), HASH[:10])
    assert text == (
        "a cat\n"
        "Negative prompt: ugly\n"
        "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x512, "
        f"Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, RNG: CPU, Version: sdfarm {__version__}"
    )


def test_negative_line_omitted_when_empty_and_clip_skip_only_above_one() -> None:
    text = job_infotext(make(sampler="Euler a"), HASH[:10])
    assert "Negative prompt" not in text
    assert "Schedule type: Uniform" in text  # A1111's Automatic for Euler a, stated
    assert "Clip skip" not in text
    assert "Clip skip: 2" in job_infotext(make(clip_skip=2), HASH[:10])


def test_values_with_commas_or_colons_are_json_quoted() -> None:
    lora = "add_detail: 7c6bad76eb54, style: abc"
    text = format_infotext("p", "", {"Steps": 1, "Sampler": "Euler", "Lora hashes": lora})
    assert text.endswith('Lora hashes: "add_detail: 7c6bad76eb54, style: abc"')
    assert parse_infotext(text)["Lora hashes"] == "add_detail: 7c6bad76eb54, style: abc"


def test_reads_back_through_a1111_rules() -> None:
    job = make(prompt="a cat,\nwith a hat: (red:1.2)", negative_prompt="blurry, ugly\nlow quality",
               guidance_scale=6.5, clip_skip=2)
    parsed = parse_infotext(job_infotext(job, HASH[:10]))
    assert parsed["Prompt"] == job.prompt
    assert parsed["Negative prompt"] == job.negative_prompt
    assert parsed["Steps"] == "30"
    assert parsed["Sampler"] == "DPM++ 2M"
    assert parsed["Schedule type"] == "Karras"
    assert parsed["CFG scale"] == "6.5"
    assert parsed["Seed"] == "1234"
    assert (parsed["Size-1"], parsed["Size-2"]) == ("512", "512")
    assert parsed["Model hash"] == "6ce0161689"
    assert parsed["Model"] == "v1-5-pruned-emaonly"
    assert parsed["Clip skip"] == "2"
    assert parsed["Version"] == f"sdfarm {__version__}"


def test_missing_clip_skip_reads_as_one() -> None:
    assert parse_infotext(job_infotext(make(), HASH[:10]))["Clip skip"] == "1"
