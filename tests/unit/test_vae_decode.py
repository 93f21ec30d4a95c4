"""The decode every render ends with: fp16 overflow is redone in fp32 (A1111's "revert VAE to
32-bit"), a VAE marked force_upcast decodes in fp32, and NaN is never stored as a black image: it
fails its own image, not its chunk-mates."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from sdfarm.errors import RenderError
from worker.testing import build_tiny_vae
from worker.vae import decode, decode_each

LATENTS = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def pipe_with(vae: Any, sdxl: bool = False) -> Any:
    return SimpleNamespace(vae=vae, image_processor=VaeImageProcessor(vae_scale_factor=8),
                           text_encoder_2=object() if sdxl else None)


def overflowing_vae(force_upcast: bool) -> Any:
    """Fine in fp32; its first decoder conv reaches ~1e6, past fp16's 65504, so fp16 gives NaN."""
    torch.manual_seed(1)
    vae = build_tiny_vae()
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e5)
    vae.register_to_config(force_upcast=force_upcast)
    return vae.eval()


def test_an_fp16_decode_that_overflows_is_redone_in_fp32(caplog: pytest.LogCaptureFixture) -> None:
    vae = overflowing_vae(force_upcast=False)
    with torch.inference_mode():
        reference = decode(pipe_with(vae), LATENTS)  # fp32 throughout
        vae.half()
        assert not torch.isfinite(vae.decode(LATENTS.half() / vae.config.scaling_factor).sample).all()
        with caplog.at_level(logging.WARNING, logger="sdfarm.worker"):
            images = decode(pipe_with(vae), LATENTS.half())
    assert "decoding again in float32" in caplog.text
    assert vae.dtype == torch.float16  # the VAE goes back to fp16 for the next chunk
    for image, ref in zip(images, reference, strict=True):
        assert np.abs(np.asarray(image).astype(int) - np.asarray(ref).astype(int)).max() <= 1


def test_an_sdxl_vae_marked_force_upcast_decodes_in_fp32_from_the_start(caplog: pytest.LogCaptureFixture) -> None:
    vae = overflowing_vae(force_upcast=True).half()
    with torch.inference_mode(), caplog.at_level(logging.WARNING, logger="sdfarm.worker"):
        images = decode(pipe_with(vae, sdxl=True), LATENTS.half())
        assert "decoding again" not in caplog.text
        decode(pipe_with(vae, sdxl=False), LATENTS.half())  # SD 1.x: fp16 first (the flag is only a default)
        assert "decoding again in float32" in caplog.text
    assert len(images) == 2
    assert vae.dtype == torch.float16


def test_nan_fails_only_its_own_image_with_the_reason_instead_of_a_black_image() -> None:
    vae = build_tiny_vae().eval()
    bad = LATENTS.clone()
    bad[1, 0, 0, 0] = float("nan")
    with torch.inference_mode():
        good, failed = decode_each(pipe_with(vae), bad)
        alone = decode(pipe_with(vae), LATENTS[:1])[0]
    assert isinstance(good, Image.Image)
    # its chunk-mate's NaN did not touch it (within a batch size's float rounding)
    assert np.abs(np.asarray(good).astype(int) - np.asarray(alone).astype(int)).max() <= 1
    assert isinstance(failed, RenderError)
    assert "NaN or infinite latents" in str(failed)
    with torch.inference_mode(), pytest.raises(RenderError, match="NaN or infinite latents"):
        decode(pipe_with(vae), bad)  # the all-or-nothing form
    with torch.no_grad():
        vae.decoder.conv_out.bias.fill_(float("nan"))
    with torch.inference_mode():
        images = decode_each(pipe_with(vae), LATENTS)
    assert [str(i) for i in images] == ["the VAE produced NaN or infinite pixels even in float32; nothing was"
                                        " stored"] * 2
