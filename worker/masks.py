"""Inpainting masks: from an image, or from text through CLIPSeg, then grown and blurred as A1111 does.

White (255) is repainted, black is kept. A text mask is computed from the job's own init image:
CLIPSeg's probability for the text at each pixel, above `mask_threshold`, counts as masked.

As A1111 v1.10 (modules/processing.py, StableDiffusionProcessingImg2Img.init, and
modules/images.py, create_binary_mask): an RGBA mask that is not fully opaque is its alpha channel,
rounded; any other mask is read as grey levels, not binarised; the blur is OpenCV's Gaussian at the
mask's own resolution (kernel 2*int(2.5 sigma + 0.5) + 1, reflected border), then the mask is
resized to the job's size; the result is composited through clip(mask x 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from sdfarm.jobs import RenderJob

from .assets import AssetFiles
from .fit import fit
from .noise import seed_noise
from .only_masked import OnlyMasked, prepare


class MaskModels:
    """CLIPSeg models by folder, loaded once per process on first use (on the worker's device)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._loaded: dict[Path, tuple[Any, Any]] = {}

    def get(self, folder: Path) -> tuple[Any, Any]:
        if folder not in self._loaded:
            from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

            model: Any = CLIPSegForImageSegmentation.from_pretrained(folder, local_files_only=True,
                                                                     use_safetensors=True)
            processor = CLIPSegProcessor.from_pretrained(folder, local_files_only=True)
            model.to(self.device)
            self._loaded[folder] = (model.eval(), processor)
        return self._loaded[folder]

    def text_mask(self, folder: Path, image: Image.Image, text: str, threshold: float) -> Image.Image:
        """A binary mask at the image's size: 255 where CLIPSeg finds `text` above `threshold`."""
        model, processor = self.get(folder)
        inputs = processor(text=[text], images=[image], padding="max_length", return_tensors="pt").to(self.device)
        with torch.inference_mode():
            logits = model(**inputs).logits  # (H, W) for one image: CLIPSeg squeezes the batch
        logits = logits.reshape(1, 1, *inputs["pixel_values"].shape[-2:])
        probs = torch.sigmoid(logits.float())
        probs = torch.nn.functional.interpolate(probs, size=(image.height, image.width), mode="bilinear")
        binary = (probs[0, 0] > threshold).to(torch.uint8).mul(255).cpu().numpy()
        return Image.fromarray(binary, mode="L")


def finish_mask(mask: Image.Image, job: RenderJob) -> Image.Image:
    """The mask as A1111 reads it, brought to the job's size by its resize mode, as the init image is."""
    return fit(shape_mask(mask, job), job.resize_mode, job.width, job.height)


def shape_mask(mask: Image.Image, job: RenderJob) -> Image.Image:
    """The mask as A1111 reads it (alpha of a translucent RGBA mask, else grey levels), inverted for
    "Inpaint not masked", grown by mask_dilate pixels (sdfarm's own), blurred by mask_blur at its own
    resolution."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        mask = mask.getchannel("A").point(lambda v: 255 if v > 128 else 0)
    else:
        mask = mask.convert("L")
    if job.inpaint_invert:  # "Inpaint not masked"
        mask = ImageOps.invert(mask)
    if job.mask_dilate:
        mask = mask.filter(ImageFilter.MaxFilter(2 * job.mask_dilate + 1))
    if job.mask_blur:
        mask = gaussian_blur(mask, job.mask_blur)
    return mask


def gaussian_blur(mask: Image.Image, sigma: float) -> Image.Image:
    """cv2.GaussianBlur of an 8-bit mask as A1111 calls it: a separable kernel of
    2*int(2.5 sigma + 0.5) + 1 taps (getGaussianKernel's), OpenCV's default border (reflect without
    repeating the edge: scipy's "mirror")."""
    from scipy.ndimage import correlate1d

    size = 2 * int(2.5 * sigma + 0.5) + 1
    taps = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma * sigma))
    taps /= taps.sum()
    out = np.asarray(mask, dtype=np.float64)
    for axis in (1, 0):  # x, then y
        out = correlate1d(out, taps, axis=axis, mode="mirror")
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode="L")


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill" of the masked area (modules/masking.py, fill): the kept pixels, blurred ever less
    (radii 256, 64, 16, 16, 4, 4, 4, 4, 2, 2, 0), laid over each other, so the masked area takes the
    colours around it. Before encoding, for every masked content but "original"."""
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    out = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")


def encode_input(job: RenderJob, init: Image.Image, mask: Image.Image | None) -> Image.Image:
    """What an img2img or inpaint job's init latents are encoded from: the init image, its masked
    area filled unless the masked content is "original"."""
    if mask is None or job.inpaint_fill == "original":
        return init
    return fill(init, mask)


def masked_content(job: RenderJob, latents: torch.Tensor, mask: Image.Image | None) -> torch.Tensor:
    """One job's (C, h, w) init latents with A1111's masked content in the masked area: "latent
    noise" is the seed's noise there, "latent nothing" zeros (modules/processing.py,
    StableDiffusionProcessingImg2Img.init: the mask at latent size, bicubic, rounded)."""
    if mask is None or job.inpaint_fill not in ("latent noise", "latent nothing"):
        return latents
    small = mask.convert("RGB").resize((latents.shape[2], latents.shape[1]), Image.Resampling.BICUBIC)
    repaint = torch.from_numpy(np.around(np.asarray(small, dtype=np.float32)[..., 0] / 255)).to(latents)
    kept = latents * (1 - repaint)
    if job.inpaint_fill == "latent nothing":
        return kept
    return kept + seed_noise(tuple(latents.shape), job.seed).to(latents) * repaint


def overlay(init: Image.Image, rendered: Image.Image, mask: Image.Image) -> Image.Image:
    """The inpainted image as A1111 keeps it: the init image over the render wherever the mask is
    below half, through A1111's overlay mask clip(mask x 2) (the kept area is the init image itself,
    not a VAE round trip)."""
    doubled = mask.point(lambda v: min(2 * v, 255))
    kept = Image.new("RGBa", init.size)
    kept.paste(init.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(doubled))
    out = rendered.convert("RGBA")
    out.alpha_composite(kept.convert("RGBA"))
    return out.convert("RGB")


class JobInput(NamedTuple):
    """An img2img or inpaint job's init image and mask at its size; for "Only masked", how to put the
    render back into the image."""

    init: Image.Image
    mask: Image.Image | None
    only_masked: OnlyMasked | None = None


Inputs = dict[str, JobInput]  # job id -> its input


def job_inputs(assets: AssetFiles, masks: MaskModels, jobs: list[RenderJob]) -> Inputs:
    """Each img2img/inpaint job's init image (brought to the job's size by its resize mode) and
    finished mask. Raises AssetError when an input is missing or changed since planning."""
    out: Inputs = {}
    for job in jobs:
        if job.init_image is None:
            continue
        original = assets.image(job.init_image)
        mask = None
        if job.mask_image is not None:
            mask = assets.image(job.mask_image, mask=True)
        elif job.mask_prompt is not None and job.mask_model is not None:
            folder = assets.path("mask_model", job.mask_model.name, job.mask_model.sha256)
            mask = masks.text_mask(folder, original, job.mask_prompt, job.mask_threshold)
        out[job.id] = job_input(job, original, mask)
    return out


def job_input(job: RenderJob, original: Image.Image, mask: Image.Image | None) -> JobInput:
    """A job's input from its init image and its raw mask (an image's, or CLIPSeg's for its text)."""
    if mask is not None and job.inpaint_full_res:
        return JobInput(*prepare(job, original, shape_mask(mask, job)))
    init = fit(original, job.resize_mode, job.width, job.height)
    return JobInput(init, finish_mask(mask, job) if mask is not None else None)
