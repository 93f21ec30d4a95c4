"""Half precision on CUDA, where it really overflows: the VAE decode redone in fp32 (and SDXL's VAE
upcast from the start), and upscaler models in fp16 with the fp32 fallback."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from safetensors.torch import load_file, save_file

from sdfarm.errors import RenderError
from sdfarm.jobs import RenderJob
from sdfarm.models import Registry
from tests.conftest import SDXL, TINY
from tests.gpu.conftest import differences
from worker.pipeline import load_model
from worker.render import render
from worker.testing import write_tiny_upscaler
from worker.upscalers import Upscalers, load_upscaler, run_model
from worker.vae import decode

CUDA = torch.device("cuda")


def test_an_fp16_vae_decode_that_overflows_on_cuda_is_redone_in_fp32(registry: Registry,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    loaded = load_model(registry, TINY, "cuda", compile=False)  # its own copy: the VAE is made to overflow
    vae = loaded.pipe.vae
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e5)  # still within fp16; its outputs (~1e6) are not
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(CUDA, torch.float16)
    with torch.inference_mode():
        assert not torch.isfinite(vae.decode(latents / vae.config.scaling_factor).sample).all()
        vae.float()
        reference = decode(loaded.pipe, latents)  # fp32 throughout
        vae.half()
        with caplog.at_level(logging.WARNING, logger="sdfarm.worker"):
            images = decode(loaded.pipe, latents)
    assert "decoding again in float32" in caplog.text
    assert vae.dtype == torch.float16  # back to fp16 for the next chunk
    for image, ref in zip(images, reference, strict=True):
        assert differences(image, ref)[1] <= 1


def test_sdxl_renders_on_cuda_with_its_vae_upcast_from_the_start(registry: Registry,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    loaded = load_model(registry, SDXL, "cuda", compile=False)
    assert loaded.pipe.vae.config.force_upcast
    job = RenderJob.model_validate({"model": SDXL, "model_hash": loaded.identity, "prompt": "a glass teapot",
                                    "seed": 7, "width": 64, "height": 64, "steps": 4})
    with caplog.at_level(logging.WARNING, logger="sdfarm.worker"):
        image, = render(loaded, [job])
    assert "decoding again" not in caplog.text  # fp32 was used at once, not after a NaN
    assert loaded.pipe.vae.dtype == torch.float16
    assert np.asarray(image).std() > 1


def picture(width: int = 96, height: int = 80) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(2))


def test_an_esrgan_upscaler_runs_in_fp16_on_cuda_close_to_fp32(tmp_path: Path) -> None:
    path = write_tiny_upscaler(tmp_path / "x2.safetensors", seed=4)
    half = load_upscaler(path, CUDA)
    assert (half.dtype, half.device.type) == (torch.float16, "cuda")
    full = load_upscaler(path, CUDA, torch.float32)
    image = picture()
    out = run_model(half, image, tile=0)
    assert out.size == (192, 160)
    assert differences(out, run_model(full, image, tile=0))[1] <= 2
    assert differences(run_model(half, image, tile=32), out)[1] <= 2  # tiles with a margin: the whole image's


def test_an_upscaler_that_overflows_fp16_on_cuda_is_run_again_in_fp32(tmp_path: Path) -> None:
    state = load_file(str(write_tiny_upscaler(tmp_path / "x2.safetensors", seed=4)))
    state["model.0.weight"] *= 6e4  # fits in fp16, but the first features overflow it: inf - inf = NaN
    hot = tmp_path / "hot.safetensors"
    save_file(state, str(hot))
    sha256 = hashlib.sha256(hot.read_bytes()).hexdigest()
    job = RenderJob.model_validate({"model": "m", "model_hash": "0" * 64, "prompt": "p", "seed": 1, "width": 80,
                                    "height": 64, "upscale": {"factor": 2, "upscaler": "hot",
                                                              "upscaler_sha256": sha256}})
    upscalers = Upscalers(CUDA, tile=0)
    upscalers.prepare(job, {sha256: hot})
    assert upscalers.loaded[sha256].dtype == torch.float16
    bright = Image.new("RGB", (80, 64), (250, 240, 245))
    with pytest.raises(RenderError):  # what fp16 gives by itself
        run_model(upscalers.loaded[sha256], bright, tile=0)
    out = upscalers.resize(bright, (160, 128), "hot", sha256)
    assert upscalers.loaded[sha256].dtype == torch.float32  # and it stays so
    assert differences(out, run_model(load_upscaler(hot, CUDA, torch.float32), bright, tile=0))[1] <= 1
