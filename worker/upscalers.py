"""Upscalers: the plain resamplers (Lanczos, Nearest) and registered upscaler models.

An upscaler model is a super-resolution network file (ESRGAN and its relatives: 4x-UltraSharp,
RealESRGAN, SwinIR, HAT, ... anything spandrel reads). As in A1111, the model runs until the image
is at least the target size (at most three times), and Lanczos then resizes it to exactly the target.
Large images run in tiles, each with a margin of context that is cut off again, so memory stays
bounded. Up to `keep` models stay loaded, least recently used out first.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdfarm.errors import AssetError, RenderError
from sdfarm.jobs import IMAGE_UPSCALERS, RenderJob

log = logging.getLogger("sdfarm.worker")

RESAMPLE = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
assert set(RESAMPLE) == set(IMAGE_UPSCALERS)
MAX_PASSES = 3  # A1111 applies a model at most three times to reach the target size
TILE_MARGIN = 32  # input pixels of context around each tile
MIN_TILE = 64  # out of memory below this: the image cannot be upscaled on this device


def model_dtype(model: Any, device: torch.device) -> torch.dtype:
    """fp16 on CUDA where the architecture supports it (bf16 next, where the GPU has it), fp32
    otherwise. A pass that overflows in half precision is redone in fp32 (run_model)."""
    if device.type != "cuda":
        return torch.float32
    if model.supports_half:
        return torch.float16
    return torch.bfloat16 if model.supports_bfloat16 and torch.cuda.is_bf16_supported() else torch.float32


def load_upscaler(path: Path, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """A super-resolution model from a weights file, on `device` (in `dtype`; by default
    model_dtype's choice). Raises ValueError for a file that is not one (an unknown architecture, a
    restoration or inpainting model)."""
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
    return model.to(device=device, dtype=dtype or model_dtype(model, device)).eval()


def _to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(1, 3, h, w) in [0, 1] on any device -> (h, w, 3) uint8 on the host; RenderError on NaN."""
    if not torch.isfinite(pixels).all():
        raise RenderError("the upscaler model produced NaN or infinite pixels; nothing was stored")
    array: np.ndarray = (pixels[0].float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return array


def run_model(model: Any, image: Image.Image, tile: int) -> Image.Image:
    """One pass of the model over the image (scale x), in tiles of `tile` input pixels (0: whole),
    each run with TILE_MARGIN pixels of context around it that are cut off again. Each tile goes to
    the host as 8-bit pixels as soon as it is done: device memory is one tile's."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    x = pixels.permute(2, 0, 1).unsqueeze(0).to(device=model.device, dtype=model.dtype)
    _, _, height, width = x.shape
    s = model.scale
    out = np.empty((height * s, width * s, 3), dtype=np.uint8)
    tile = tile if tile > 0 else max(height, width)
    with torch.inference_mode():
        for top in range(0, height, tile):
            for left in range(0, width, tile):
                bottom, right = min(top + tile, height), min(left + tile, width)
                t, le = max(top - TILE_MARGIN, 0), max(left - TILE_MARGIN, 0)
                piece = model(x[:, :, t:min(bottom + TILE_MARGIN, height), le:min(right + TILE_MARGIN, width)])
                out[top * s:bottom * s, left * s:right * s] = _to_uint8(
                    piece[:, :, (top - t) * s:(bottom - t) * s, (left - le) * s:(right - le) * s])
    return Image.fromarray(out)


class Upscalers:
    """The upscaler models a worker has loaded, and the resize every upscale goes through."""

    def __init__(self, device: torch.device, keep: int = 2, tile: int = 512) -> None:
        self.device = device
        self.keep = keep
        self.tile = tile
        self.loaded: OrderedDict[str, Any] = OrderedDict()  # sha256 -> model, oldest use first
        self.files: dict[str, Path] = {}  # sha256 -> the verified file of a loaded model (to reload in fp32)

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
            path = self.files[sha256] = files[sha256]
            try:
                self.loaded[sha256] = load_upscaler(path, self.device)
            except torch.OutOfMemoryError:
                raise  # this node's memory, not the file
            except Exception as e:
                raise AssetError(f"upscaler {spec.upscaler!r}: cannot load {path.name}: {e}") from e
            while len(self.loaded) > self.keep:
                evicted, _ = self.loaded.popitem(last=False)
                self.files.pop(evicted, None)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            log.info("upscaler %s loaded (%s, %dx)", spec.upscaler, sha256[:12], self.loaded[sha256].scale)

    def resize(self, image: Image.Image, size: tuple[int, int], upscaler: str, sha256: str | None) -> Image.Image:
        """The image at `size` (width, height), by a resampler's name or a prepared model's sha256."""
        if sha256 is None:
            return image.resize(size, RESAMPLE[upscaler])
        for _ in range(MAX_PASSES):
            if image.width >= size[0] and image.height >= size[1]:
                break
            image = self._pass(sha256, image)
        return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)

    def _pass(self, sha256: str, image: Image.Image) -> Image.Image:
        """One model pass. Architectures that tile badly (spandrel says so) run whole unless memory
        runs out; out of memory, the tiles halve (down to MIN_TILE); NaN in half precision is redone
        with the model loaded again in fp32, which it stays in from then on."""
        from spandrel import ModelTiling

        model = self.loaded[sha256]
        tile = self.tile if model.tiling == ModelTiling.SUPPORTED else 0
        while True:
            try:
                return run_model(model, image, tile)
            except torch.OutOfMemoryError:
                if model.device.type == "cuda":
                    torch.cuda.empty_cache()
                tile = (tile or max(image.size)) // 2
                if tile < MIN_TILE:
                    raise RenderError(f"the upscaler model ran out of memory even in {MIN_TILE * 2}-pixel"
                                      " tiles; nothing was stored") from None
                log.warning("upscaler out of memory on a %dx%d image: tiles of %d", *image.size, tile)
            except RenderError:
                if model.dtype == torch.float32:
                    raise
                log.warning("upscaler gave NaN in %s: running it in float32 from now on", model.dtype)
                model = self.loaded[sha256] = load_upscaler(self.files[sha256], self.device, torch.float32)
