"""Inpainting masks: from an image, or from text through CLIPSeg, then grown and blurred as A1111 does.

White (255) is repainted, black is kept. A text mask is computed from the job's own init image:
CLIPSeg's probability for the text at each pixel, above `mask_threshold`, counts as masked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageFilter

from sdfarm.jobs import RenderJob

from .assets import AssetFiles


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
    """Binarise, grow by mask_dilate pixels, blur by mask_blur (A1111's "Mask blur"), at the job's size."""
    mask = mask.convert("L").point(lambda v: 255 if v >= 128 else 0)
    if job.mask_dilate:
        mask = mask.filter(ImageFilter.MaxFilter(2 * job.mask_dilate + 1))
    mask = mask.resize((job.width, job.height), Image.Resampling.LANCZOS)
    if job.mask_blur:
        mask = mask.filter(ImageFilter.GaussianBlur(job.mask_blur))
    return mask


Inputs = dict[str, tuple[Image.Image, Image.Image | None]]  # job id -> (init image, mask)


def job_inputs(assets: AssetFiles, masks: MaskModels, jobs: list[RenderJob]) -> Inputs:
    """Each img2img/inpaint job's init image (resized to the job's size, A1111's "Just resize") and
    finished mask. Raises AssetError when an input is missing or changed since planning."""
    out: Inputs = {}
    for job in jobs:
        if job.init_image is None:
            continue
        original = assets.image(job.init_image)
        mask = None
        if job.mask_image is not None:
            mask = assets.image(job.mask_image)
        elif job.mask_prompt is not None and job.mask_model is not None:
            folder = assets.path("mask_model", job.mask_model.name, job.mask_model.sha256)
            mask = masks.text_mask(folder, original, job.mask_prompt, job.mask_threshold)
        init = original.resize((job.width, job.height), Image.Resampling.LANCZOS)
        out[job.id] = (init, finish_mask(mask, job) if mask is not None else None)
    return out
