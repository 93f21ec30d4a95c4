"""The VAE: registered VAEs swapped in between chunks, and the decode every render ends with.

A job's `vae` names a registered VAE (a diffusers folder, or a single .safetensors file in the
original LDM layout or diffusers' own, read with the model's VAE config); no `vae` is the model's
own. Up to `keep` registered VAEs stay loaded, least recently used out first; each load and swap is
told to `on_swap` (the worker's metrics).

fp16 VAEs overflow: SDXL's own VAE turns to NaN (black images) at fp16, so diffusers marks it
`force_upcast` and decodes in fp32. This does the same, and like A1111's "revert VAE to 32-bit"
redoes a decode in fp32 when fp16 gave NaN anyway. A non-finite result is never stored: NaN in an
image's latents (the UNet) or after an fp32 decode fails that image with a RenderError saying which;
the other images of its chunk are stored.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sdfarm.errors import AssetError, RenderError
from sdfarm.jobs import AssetRef

log = logging.getLogger("sdfarm.worker")


def _unheard(kind: str) -> None:
    """No one listens for swaps (a model outside a worker)."""


class Vaes:
    def __init__(self, own: Any, keep: int = 2, on_swap: Callable[[str], None] = _unheard) -> None:
        self.own = own  # the model's VAE
        self.keep = keep
        self.on_swap = on_swap  # told "vae-load" when a registered VAE loads, "vae" when the pipeline's changes
        self.loaded: OrderedDict[str, Any] = OrderedDict()  # sha256 -> AutoencoderKL, oldest use first

    def select(self, ref: AssetRef | None, files: dict[str, Path]) -> Any:
        """The VAE module a chunk renders with."""
        if ref is None:
            return self.own
        if ref.sha256 in self.loaded:
            self.loaded.move_to_end(ref.sha256)
            return self.loaded[ref.sha256]
        try:
            vae = load_vae(files[ref.sha256], self.own)
        except Exception as e:
            raise AssetError(f"vae {ref.name!r}: cannot load {files[ref.sha256].name}: {type(e).__name__}: {e}") from e
        self.loaded[ref.sha256] = vae
        self.on_swap("vae-load")
        while len(self.loaded) > self.keep:
            self.loaded.popitem(last=False)
        log.info("vae %s loaded (%s)", ref.name, ref.sha256[:12])
        return vae


def load_vae(path: Path, own: Any) -> Any:
    """A registered VAE on the model's device and dtype. Its layers must fit the model's VAE."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors.torch import load_file

    if path.is_dir():
        vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
    else:
        state = load_file(str(path))
        if not any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in state):
            state = convert_ldm_vae_checkpoint(state, dict(own.config))  # the original layout
        vae = AutoencoderKL.from_config(own.config)
        vae.load_state_dict(state, strict=True)
    if vae.config.latent_channels != own.config.latent_channels:
        raise ValueError(f"it has {vae.config.latent_channels} latent channels, the model {own.config.latent_channels}")
    return vae.to(device=own.device, dtype=own.dtype).eval()


LATENTS_NAN = ("the denoising produced NaN or infinite latents (an fp16 overflow in the UNet, or extreme prompt"
               " weights); nothing was stored")
PIXELS_NAN = "the VAE produced NaN or infinite pixels even in float32; nothing was stored"


def decode(pipe: Any, latents: torch.Tensor) -> list[Image.Image]:
    """decode_each, all or nothing: the first image's RenderError is raised."""
    images = decode_each(pipe, latents)
    return [or_raise(image) for image in images]


def decode_each(pipe: Any, latents: torch.Tensor) -> list[Image.Image | RenderError]:
    """The pipeline's latents -> PIL images, with the VAE and image processor the pipeline holds;
    an image whose latents or pixels are not finite is a RenderError saying which, in its place
    (every op is per image, so its chunk-mates are whole). The batch is decoded whole, as the
    static batch of a compiled VAE needs. An SDXL VAE that says `force_upcast` decodes in fp32
    (_force_upcast); any fp16 decode that gives NaN is redone in fp32."""
    bad_latents = _not_finite(latents)
    vae = pipe.vae
    fp32 = vae.dtype == torch.float32
    pixels = _decode(vae, latents, upcast=_force_upcast(pipe))
    if (_not_finite(pixels) & ~bad_latents).any() and not fp32:
        log.warning("VAE decode in %s gave NaN: decoding again in float32", vae.dtype)
        pixels = _decode(vae, latents, upcast=True)
    bad_pixels: list[bool] = _not_finite(pixels).tolist()
    good = [i for i, bad in enumerate(bad_pixels) if not bad]
    decoded: list[Image.Image] = pipe.image_processor.postprocess(pixels[good], output_type="pil") if good else []
    images: list[Image.Image | RenderError] = [RenderError(LATENTS_NAN if latents_bad else PIXELS_NAN)
                                               for latents_bad in bad_latents.tolist()]
    for i, image in zip(good, decoded, strict=True):
        images[i] = image
    return images


def _not_finite(batch: torch.Tensor) -> torch.Tensor:
    """Per image of the batch: True where any value is NaN or infinite."""
    return ~torch.isfinite(batch).flatten(1).all(dim=1).cpu()


def or_raise(image: Image.Image | RenderError) -> Image.Image:
    """The image, or its RenderError raised."""
    if isinstance(image, RenderError):
        raise image
    return image


def encode(pipe: Any, images: list[Image.Image], width: int, height: int) -> torch.Tensor:
    """Init images (resized to width x height, A1111's "Just resize") -> the latents img2img and
    inpainting start from: the VAE posterior's mean, scaled as the pipeline's own encode scales.
    diffusers' own encode samples the posterior with the job's generator, which spends the seed's
    first draw there; A1111's init noise is the seed's first draw. Handed to the pipeline as its
    `image`, these latents leave that draw to the noise. Upcast as decode_each does."""
    vae = pipe.vae
    dtype = vae.dtype
    with _working_dtype(vae, _force_upcast(pipe)) as work:
        pixels = pipe.image_processor.preprocess(images, height=height, width=width)
        mean = vae.encode(pixels.to(device=vae.device, dtype=work)).latent_dist.mode()
        stats = _latent_stats(vae, work, mean.shape[1])
        scaled = (mean - stats[0]) / stats[1] if stats else mean
        latents: torch.Tensor = (scaled * vae.config.scaling_factor).to(dtype=dtype)
        return latents


def _force_upcast(pipe: Any) -> bool:
    """An fp16 SDXL VAE whose config says `force_upcast` works in fp32 (diffusers' pipelines honour
    it for SDXL only: SD 1.x VAE configs never set it, and SD 1.x runs its VAE in fp16, as A1111)."""
    vae = pipe.vae
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    return vae.dtype != torch.float32 and sdxl and bool(getattr(vae.config, "force_upcast", False))


@contextmanager
def _working_dtype(vae: Any, upcast: bool) -> Iterator[torch.dtype]:
    """The VAE in float32 for the block when upcast (then back in its own dtype); yields the dtype it works in."""
    dtype = vae.dtype
    if not upcast:
        yield dtype
        return
    vae.to(dtype=torch.float32)
    try:
        yield torch.float32
    finally:
        vae.to(dtype=dtype)


def _latent_stats(vae: Any, work: torch.dtype, channels: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The VAE config's per-channel latents_mean and latents_std, shaped to broadcast; None without them."""
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return None
    shape = (1, channels, 1, 1)
    return (torch.tensor(mean, dtype=work, device=vae.device).view(shape),
            torch.tensor(std, dtype=work, device=vae.device).view(shape))


def _decode(vae: Any, latents: torch.Tensor, upcast: bool) -> torch.Tensor:
    with _working_dtype(vae, upcast) as work:
        latents = latents.to(device=vae.device, dtype=work) / vae.config.scaling_factor
        stats = _latent_stats(vae, work, latents.shape[1])
        if stats:
            latents = latents * stats[1] + stats[0]
        pixels: torch.Tensor = vae.decode(latents, return_dict=False)[0]
        return pixels.float()
