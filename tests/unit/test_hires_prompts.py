"""The hires pass's own prompt and negative prompt (A1111's Hires prompt, Hires negative prompt;
modules/processing.py, StableDiffusionProcessingTxt2Img: an empty one is the first pass's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdfarm.batchfile import stream_file
from sdfarm.infotext import job_infotext, parse_infotext
from sdfarm.jobs import RenderJob
from sdfarm.models import Registry
from tests.unet_spy import unet_kwargs
from worker.pipeline import LoadedModel, load_model
from worker.prompts import encode_prompts

HIRES = {"scale": 2, "steps": 2, "denoising_strength": 0.5}


@pytest.fixture(scope="module")
def loaded(registry: Registry) -> LoadedModel:
    return load_model(registry, "tiny-sd15", "cpu")


def job(loaded: LoadedModel | None = None, **changes: Any) -> RenderJob:
    return RenderJob.model_validate({"model": "tiny-sd15", "model_hash": loaded.identity if loaded else "ab" * 32,
                                     "prompt": "a fox", "negative_prompt": "blurry", "seed": 3, "width": 64,
                                     "height": 64, "steps": 2, "sampler": "Euler", **changes})


def test_the_hires_pass_renders_its_own_prompt_and_negative(loaded: LoadedModel) -> None:
    j = job(loaded, hires={**HIRES, "prompt": "a hen", "negative_prompt": "dark"})
    seen = unet_kwargs(loaded, [j], "encoder_hidden_states")
    with torch.inference_mode():
        first = encode_prompts(loaded.pipe, ["a fox"], ["blurry"], 1)
        second = encode_prompts(loaded.pipe, ["a hen"], ["dark"], 1)
    assert len(seen) == 4
    for call in seen[:2]:  # [uncond; cond]
        torch.testing.assert_close(call, torch.cat([first.negative_prompt_embeds, first.prompt_embeds]))
    for call in seen[2:]:
        torch.testing.assert_close(call, torch.cat([second.negative_prompt_embeds, second.prompt_embeds]))


def test_an_empty_or_equal_hires_prompt_is_the_first_passs() -> None:
    plain = job(hires=HIRES)
    for same in ({"prompt": ""}, {"prompt": "a fox"}, {"negative_prompt": "blurry"}, {"negative_prompt": ""}):
        assert job(hires={**HIRES, **same}).id == plain.id
    assert job(hires={**HIRES, "prompt": "a hen"}).id != plain.id
    with pytest.raises(ValueError, match="a LoRA tag in a hires prompt is not supported"):
        job(hires={**HIRES, "prompt": "a hen <lora:x:1>"})
    assert job(hires={**HIRES, "prompt": "a [hen:fox:1.5]"}).scheduled  # the hires prompt's edits too


def test_hires_prompts_are_recorded_and_read_back(tmp_path: Path, registry: Registry) -> None:
    j = job(model_hash=registry.identity("tiny-sd15"), hires={**HIRES, "prompt": "a hen, sharp",
                                                               "negative_prompt": "dark"})
    text = job_infotext(j, registry.identity("tiny-sd15")[:10])
    info = parse_infotext(text)
    assert (info["Hires prompt"], info["Hires negative prompt"]) == ("a hen, sharp", "dark")
    assert 'Hires prompt: "a hen, sharp"' in text  # quoted as A1111 quotes a value with a comma
    meta = PngInfo()
    meta.add_text("parameters", text)
    Image.new("RGB", (8, 8)).save(tmp_path / "hires.png", pnginfo=meta)
    back, = stream_file(tmp_path / "hires.png", registry, 10).plan().jobs
    assert back.id == j.id
