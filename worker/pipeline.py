"""Load one pipeline per process from a registry entry: fp16 on CUDA, fp32 on the CPU, offline."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdfarm.errors import WorkerFatal
from sdfarm.jobs import AssetRef
from sdfarm.models import ModelEntry, Registry

from . import compile as compiling
from .adapters import Adapters
from .assets import AssetFiles
from .upscalers import Upscalers
from .vae import Vaes

log = logging.getLogger("sdfarm.worker")

_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")


def check_device(device: str) -> str:
    """Validate a device name without touching CUDA (the parent process must not init CUDA)."""
    if device == "auto":
        return device
    if not _DEVICE_RE.match(device):
        raise WorkerFatal(f"device {device!r} is not allowed (allowed: auto, cpu, cuda, cuda:N, mps)")
    return device


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise WorkerFatal(f"device {device} requested but CUDA is not available")
        if (dev.index or 0) >= torch.cuda.device_count():
            raise WorkerFatal(f"device {device} does not exist ({torch.cuda.device_count()} CUDA devices)")
    return dev


@dataclass
class LoadedModel:
    entry: ModelEntry
    identity: str  # sha256 of the weights: jobs must name the same
    pipe: Any
    device: torch.device
    dtype: torch.dtype
    base_scheduler_config: Any
    load_s: float
    # compiled: the UNet and VAE decoder run through torch.compile, and every pipeline call renders
    # exactly static_batch images (worker/render.py pads a short chunk); None: any batch, eager
    static_batch: int | None = None
    compile_s: float = 0.0  # of load_s, compiling at start-up (compiled only)
    adapters: Adapters = field(init=False)  # LoRAs and embeddings in the pipeline
    vaes: Vaes = field(init=False)  # the model's VAE and registered ones
    upscalers: Upscalers = field(init=False)  # registered upscaler models (hires and final upscale)
    refiner: LoadedModel | None = field(default=None, init=False)  # the one held beside it (worker/refiner.py)
    _variants: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.adapters = Adapters(self.pipe)
        self.vaes = Vaes(self.pipe.vae)
        self.upscalers = Upscalers(self.device)

    def use_vae(self, ref: AssetRef | None, files: dict[str, Path]) -> None:
        """Render the next chunk with this VAE (None: the model's own), in every mode's pipeline."""
        vae = self.vaes.select(ref, files)
        if vae.dtype != self.dtype:  # diffusers' SDXL img2img upcasts it to encode, and a failure skips the way back
            vae.to(dtype=self.dtype)
        if self.pipe.vae is not vae:
            self.vaes.on_swap("vae")
        for pipe in (self.pipe, *self._variants.values()):
            if pipe.vae is not vae:
                pipe.vae = vae

    def count_swaps(self, count: Callable[[str], None]) -> None:
        """Tell `count` of every LoRA and VAE switch and load from now on (worker/metrics.py SWAP_KINDS)."""
        self.adapters.on_swap = count
        self.vaes.on_swap = count

    def variant(self, mode: str) -> Any:
        """The pipeline for txt2img, img2img or inpaint: the last two are built on first use over the
        same modules (no second copy of the weights; LoRAs and embeddings apply to all)."""
        if mode == "txt2img":
            return self.pipe
        if mode not in self._variants:
            pipe = pipeline_class(self.entry.family, mode)(**{**self.pipe.components, **_extra(self.entry.family)})
            pipe.set_progress_bar_config(disable=True)
            self._variants[mode] = pipe
        return self._variants[mode]

    @property
    def compiled(self) -> bool:
        return self.static_batch is not None

    @property
    def short_hash(self) -> str:
        return self.identity[:10]

    @property
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return str(torch.cuda.get_device_name(self.device))
        return self.device.type


_CLASSES: dict[str, dict[str, str]] = {
    "sd15": {"txt2img": "StableDiffusionPipeline", "img2img": "StableDiffusionImg2ImgPipeline",
             "inpaint": "StableDiffusionInpaintPipeline"},
    "sdxl": {"txt2img": "StableDiffusionXLPipeline", "img2img": "StableDiffusionXLImg2ImgPipeline",
             "inpaint": "StableDiffusionXLInpaintPipeline"},
    # SDXL's refiner (no CLIP-L, aesthetic-score conditioning) has no text-to-image pipeline: it loads as
    # its own img2img one, and only ever takes over another model's render (worker/refiner.py)
    "sdxl-refiner": {"txt2img": "StableDiffusionXLImg2ImgPipeline", "img2img": "StableDiffusionXLImg2ImgPipeline",
                     "inpaint": "StableDiffusionXLInpaintPipeline"},
}


def pipeline_class(family: str, mode: str) -> Any:
    """The diffusers pipeline class for a model family (the registry's) and a job's mode."""
    import diffusers

    return getattr(diffusers, _CLASSES[family][mode])


def _extra(family: str) -> dict[str, Any]:
    """Constructor arguments beyond the modules: no safety checker (SD 1.x), no watermark (SDXL;
    A1111 adds none either)."""
    if family == "sdxl":
        return {"add_watermarker": False}
    if family == "sdxl-refiner":
        return {"add_watermarker": False, "requires_aesthetics_score": True}
    return {"safety_checker": None, "requires_safety_checker": False}


def _from_entry(entry: ModelEntry, dtype: torch.dtype, fetched: Path | None) -> Any:
    """fetched: an s3: entry's checkpoint, downloaded and verified."""
    cls = pipeline_class(entry.family, "txt2img")
    common: dict[str, Any] = {"dtype": dtype, **_extra(entry.family)}
    file = fetched or entry.file
    if entry.path is not None:
        return cls.from_pretrained(
            str(entry.path), local_files_only=True, use_safetensors=True, **common
        )
    if file is not None:
        if entry.config is None:
            raise WorkerFatal(
                f"model {entry.name!r}: a single-file checkpoint needs 'config:' (a diffusers-format folder"
                " with the model's configs and tokenizer) to load offline"
            )
        return cls.from_single_file(
            str(file), config=str(entry.config), local_files_only=True, **common
        )
    return cls.from_pretrained(entry.hub, revision=entry.revision, use_safetensors=True, **common)


def load_model(registry: Registry, name: str, device: str, files: AssetFiles | None = None, *,
               compile: bool | None = None, static_batch: int = 8, compile_mode: str = "default",
               cache_root: Path | None = None, shared_cache: compiling.SharedCache | None = None) -> LoadedModel:
    """Load, place and warm up the pipeline. Any failure is fatal for the worker. `files` fetches
    a checkpoint that lives in the bucket (an s3: entry) into the cache and verifies it.

    compile (None: on CUDA only) runs the UNet and VAE decoder through torch.compile, with every
    call at `static_batch` images; its graphs are cached under `cache_root`, and the warm-up's
    also in the bucket through `shared_cache` (worker/compile.py)."""
    t0 = time.perf_counter()
    try:
        registry.renderable(name)
    except Exception as e:
        raise WorkerFatal(f"cannot serve model {name!r}: {e}") from e
    loaded = _place(registry, name, resolve_device(device), files)
    dev = loaded.device
    pipe = loaded.pipe
    compiling_since = time.perf_counter()
    if compiling.wanted(compile, dev):
        if cache_root is not None:
            compiling.cache_dir(cache_root)
        compiling.compile_pipeline(pipe, compile_mode)
        loaded.static_batch = static_batch
    shared_key = None
    if shared_cache is not None and loaded.compiled:
        shared_key = shared_cache.key(loaded.identity, loaded.device_name,
                                      f"{native_size(pipe)}px-b{static_batch}-{compile_mode}")
        if shared_cache.fetch(shared_key):
            shared_key = None  # warm from the bucket: nothing new to publish
    warm_up(loaded)
    if loaded.compiled:  # the warm-up compiled (or loaded the graphs): what compiling costs this start
        loaded.compile_s = time.perf_counter() - compiling_since
    if shared_cache is not None and shared_key is not None:
        shared_cache.publish(shared_key)
    loaded.load_s = time.perf_counter() - t0
    log.info("model=%s hash=%s device=%s dtype=%s compiled=%s loaded in %.1fs", name, loaded.short_hash, dev,
             loaded.dtype, loaded.compiled, loaded.load_s)
    return loaded


def _place(registry: Registry, name: str, dev: torch.device, files: AssetFiles | None) -> LoadedModel:
    """The registered model's pipeline on the device, eager (fp16 on CUDA). Raises WorkerFatal."""
    t0 = time.perf_counter()
    try:
        entry = registry.get(name)
        identity = registry.identity(name)
        fetched = None
        if entry.s3 is not None:
            if files is None:
                raise WorkerFatal("its checkpoint lives in S3, and this worker has no bucket")
            fetched = files.checkpoint(entry)
    except Exception as e:
        raise WorkerFatal(f"cannot serve model {name!r}: {e}") from e
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    try:
        pipe = _from_entry(entry, dtype, fetched)
    except WorkerFatal:
        raise
    except Exception as e:
        raise WorkerFatal(f"cannot load model {name!r}: {type(e).__name__}: {e}") from e
    pipe = pipe.to(dev)
    if dev.type == "cuda":
        pipe.unet.to(memory_format=torch.channels_last)
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(entry, identity, pipe, dev, dtype, dict(pipe.scheduler.config), time.perf_counter() - t0)


def load_refiner(registry: Registry, name: str, device: torch.device, files: AssetFiles | None = None
                 ) -> LoadedModel:
    """A model that takes over renders of the worker's own (worker/refiner.py): loaded beside it on the
    same device, eager (its calls are a fraction of a render's), with no warm-up of its own."""
    loaded = _place(registry, name, device, files)
    log.info("refiner=%s hash=%s device=%s loaded in %.1fs", name, loaded.short_hash, device, loaded.load_s)
    return loaded


def warm_up(loaded: LoadedModel) -> None:
    """One call so the first real chunk does not pay for lazy initialisation. Eager: a tiny one.
    Compiled: a full static batch at the model's native size, which compiles (or loads from the
    cache) the graphs most chunks use, before the worker takes work."""
    pipe = loaded.pipe
    with torch.inference_mode():
        if loaded.static_batch is None:
            pipe(prompt="warm up", num_inference_steps=1, width=64, height=64, output_type="latent")
            return
        from .vae import decode

        size = native_size(pipe)
        t0 = time.perf_counter()
        latents = pipe(prompt=["warm up"] * loaded.static_batch, num_inference_steps=2, width=size, height=size,
                       output_type="latent").images
        decode(pipe, latents)
        log.info("compiled for %dx%d, batch %d, in %.1fs", size, size, loaded.static_batch, time.perf_counter() - t0)


def native_size(pipe: Any) -> int:
    """The side the model was trained at: 512 for SD 1.x, 1024 for SDXL."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
