"""Cond and uncond at their own lengths, A1111's default (issue 10, item 3): with the "pad
prompt/negative prompt" option off, modules/sd_samplers_cfg_denoiser.py (CFGDenoiser.forward) runs a
cond and an uncond of different token lengths as separate UNet calls. sdfarm stacks them padded to one
length and masks the padding out of cross-attention: the same numbers, one call."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from sdfarm.jobs import RenderJob
from sdfarm.models import Registry
from tests.unet_spy import unet_kwargs
from worker.pipeline import LoadedModel, load_model
from worker.prompts import Conditioning, encode_prompts, own_lengths

LONG = "a lighthouse on a cliff at dusk, storm clouds, crashing waves, seagulls, " * 2  # two 75-token chunks


@pytest.fixture(scope="module")
def loaded(registry: Registry) -> LoadedModel:
    return load_model(registry, "tiny-sd15", "cpu")


def test_a_masked_padded_row_is_the_row_at_its_own_length(loaded: LoadedModel) -> None:
    unet = loaded.pipe.unet
    # (an empty negative padded with empty chunks attends to copies of its own keys: the same numbers
    # either way; a negative with words is another uncond once padded)
    cond = encode_prompts(loaded.pipe, [LONG], ["blurry, lowres"], 1)
    full, own = cond.prompt_embeds.shape[1], 77
    assert full == 154
    assert cond.lengths == (154, 77)
    x = torch.randn((1, unet.config.in_channels, 8, 8), generator=torch.Generator().manual_seed(1))
    t = torch.tensor(500)
    with torch.inference_mode():
        # A1111: cond alone at 154 tokens, uncond alone at 77
        alone = torch.cat([unet(x, t, encoder_hidden_states=cond.negative_prompt_embeds[:, :own]).sample,
                           unet(x, t, encoder_hidden_states=cond.prompt_embeds).sample])
        with own_lengths(unet, cond):
            stacked = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat(
                [cond.negative_prompt_embeds, cond.prompt_embeds])).sample
        padded = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat(
            [cond.negative_prompt_embeds, cond.prompt_embeds])).sample
    masked_error, padded_error = (stacked - alone).abs().max(), (padded - alone).abs().max()
    assert masked_error < 1e-5
    assert padded_error > 100 * masked_error  # the padded uncond is another uncond


def seen_masks(loaded: LoadedModel, jobs: list[RenderJob]) -> list[Any]:
    return unet_kwargs(loaded, jobs, "encoder_attention_mask")


def job(loaded: LoadedModel, **changes: Any) -> RenderJob:
    return RenderJob.model_validate({"model": "tiny-sd15", "model_hash": loaded.identity, "prompt": "a fox",
                                     "seed": 3, "width": 64, "height": 64, "steps": 2, **changes})


def test_the_render_masks_the_shorter_side_and_only_when_lengths_differ(loaded: LoadedModel) -> None:
    masks = seen_masks(loaded, [job(loaded, prompt=LONG, negative_prompt="blurry")])
    assert len(masks) == 2
    for mask in masks:  # [uncond; cond]: the negative's 77 tokens of 154, the prompt's all
        assert mask.tolist() == [[True] * 77 + [False] * 77, [True] * 154]
    masks = seen_masks(loaded, [job(loaded, prompt="a fox", negative_prompt=LONG)])
    assert all(m.tolist() == [[True] * 154, [True] * 77 + [False] * 77] for m in masks)
    assert seen_masks(loaded, [job(loaded)]) == [None, None]  # one length: nothing to mask
    # the hires pass too
    masks = seen_masks(loaded, [job(loaded, prompt=LONG, hires={"scale": 2, "steps": 2, "denoising_strength": 0.5})])
    assert len(masks) == 4
    assert all(m is not None for m in masks)


def test_without_cfg_the_cond_alone_is_masked(loaded: LoadedModel) -> None:
    cond = Conditioning(torch.zeros((1, 154, 8)), torch.zeros((1, 154, 8)), lengths=(77, 154))
    seen: list[Any] = []
    module = torch.nn.Module()
    module.forward = lambda *a, **k: seen.append(k["encoder_attention_mask"])  # type: ignore[method-assign]
    with own_lengths(module, cond):
        module(None, None, encoder_hidden_states=torch.zeros((1, 154, 8)))  # guidance 1: no uncond rows
    assert seen[0].tolist() == [[True] * 77 + [False] * 77]
