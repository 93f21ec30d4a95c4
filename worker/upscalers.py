"""Upscalers: the plain resamplers (Lanczos, Nearest) and registered upscaler models.

An upscaler model is a super-resolution network file (ESRGAN and its relatives: 4x-UltraSharp,
RealESRGAN, SwinIR, HAT, ... anything spandrel reads). As in A1111, the model runs until the image
is at least the target size (at most three times), and Lanczos then resizes it to exactly the target.
Large images run in tiles, each with a margin of context that is cut off again, so the seams do not
show and memory stays bounded. Up to `keep` models stay loaded, least recently used out first.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdfarm.errors import AssetError
from sdfarm.jobs import IMAGE_UPSCALERS, RenderJob

log = logging.getLogger("sdfarm.worker")

RESAMPLE = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
assert set(RESAMPLE) == set(IMAGE_UPSCALERS)
MAX_PASSES = 3  # A1111 applies a model at most three times to reach the target size
TILE_MARGIN = 32  # input pixels of context around each tile


def model_dtype(model: Any, device: torch.device) -> torch.dtype:
    """fp16 on CUDA where the architecture supports it (bf16 next), fp32 otherwise."""
    if device.type != "cuda":
        return torch.float32
    if model.supports_half:
        return torch.float16
    return torch.bfloat16 if model.supports_bfloat16 else torch.float32


def load_upscaler(path: Path, device: torch.device) -> Any:
    """A super-resolution model from a weights file, on `device`. Raises ValueError for a file that
    is not one (an unknown architecture, a restoration or inpainting model)."""
    from spandrel import ImageModelDescriptor, ModelLoader, UnsupportedModelError

    try:
        model = ModelLoader().load_from_file(path)
    except UnsupportedModelError as e:
        raise ValueError("not an upscaler model spandrel knows (ESRGAN, RealESRGAN, SwinIR, HAT, ...)") from e
    if not isinstance(model, ImageModelDescriptor) or model.purpose != "SR" or model.scale < 2:
        raise ValueError(f"a {model.architecture.name} {model.purpose} model of scale {model.scale}x, not an"
                         " upscaler (super-resolution, 2x or more)")
    if (model.input_channels, model.output_channels) != (3, 3):
        raise ValueError(f"it takes {model.input_channels} and gives {model.output_channels} channels, not RGB")
    return model.to(device=device, dtype=model_dtype(model, device)).eval()


def run_model(model: Any, image: Image.Image, tile: int) -> Image.Image:
    """One pass of the model over the image (scale x), in tiles of `tile` input pixels (0: whole)."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    x = pixels.permute(2, 0, 1).unsqueeze(0).to(device=model.device, dtype=model.dtype)
    _, _, height, width = x.shape
    s = model.scale
    with torch.inference_mode():
        if tile <= 0 or max(height, width) <= tile:
            out = model(x).float()
        else:
            out = torch.empty((1, 3, height * s, width * s), dtype=torch.float32, device=x.device)
            for top in range(0, height, tile):
                for left in range(0, width, tile):
                    bottom, right = min(top + tile, height), min(left + tile, width)
                    t, le = max(top - TILE_MARGIN, 0), max(left - TILE_MARGIN, 0)
                    piece = model(x[:, :, t:min(bottom + TILE_MARGIN, height), le:min(right + TILE_MARGIN, width)])
                    out[:, :, top * s:bottom * s, left * s:right * s] = piece[
                        :, :, (top - t) * s:(bottom - t) * s, (left - le) * s:(right - le) * s].float()
    array = (out[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(array)


class Upscalers:
    """The upscaler models a worker has loaded, and the resize every upscale goes through."""

    def __init__(self, device: torch.device, keep: int = 2, tile: int = 512) -> None:
        self.device = device
        self.keep = keep
        self.tile = tile
        self.loaded: OrderedDict[str, Any] = OrderedDict()  # sha256 -> model, oldest use first

    def prepare(self, job: RenderJob, files: dict[str, Path]) -> None:
        """Load the models a chunk's jobs upscale with (all share hires and upscale). Raises
        AssetError for a file that is not an upscaler model."""
        for spec in (job.hires, job.upscale):
            if spec is None or spec.upscaler_sha256 is None:
                continue
            sha256 = spec.upscaler_sha256
            if sha256 in self.loaded:
                self.loaded.move_to_end(sha256)
                continue
            path = files[sha256]
            try:
                self.loaded[sha256] = load_upscaler(path, self.device)
            except Exception as e:
                raise AssetError(f"upscaler {spec.upscaler!r}: cannot load {path.name}: {e}") from e
            while len(self.loaded) > self.keep:
                self.loaded.popitem(last=False)
            log.info("upscaler %s loaded (%s, %dx)", spec.upscaler, sha256[:12], self.loaded[sha256].scale)

    def resize(self, image: Image.Image, size: tuple[int, int], upscaler: str, sha256: str | None) -> Image.Image:
        """The image at `size` (width, height), by a resampler's name or a prepared model's sha256."""
        if sha256 is None:
            return image.resize(size, RESAMPLE[upscaler])
        model = self.loaded[sha256]
        for _ in range(MAX_PASSES):
            if image.width >= size[0] and image.height >= size[1]:
                break
            image = run_model(model, image, self.tile)
        return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)
