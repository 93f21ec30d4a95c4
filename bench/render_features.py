# mypy: disallow-untyped-calls=False
"""Images/s and peak memory per chunk size, SD1.5 and SDXL, with a LoRA active, with and without
hires fix: through the worker's own render path (worker.render.render, LoRAs via Adapters). Then
an ESRGAN upscaler model (loaded through spandrel, as the worker does): seconds per image and peak
memory per tile size.

Random weights: compute does not depend on weight values. On CUDA the pipelines have the real
SD1.5 / SDXL-base architectures (fp16; 512 and 1024 px, hires 1.5x) and the 4x ESRGAN architecture
(64 filters, 23 blocks; 512 -> 2048 px); on a CPU, or with --tiny, the tiny test models (64 px).
Prints one JSON line per measurement (also appended to $OUT/results.jsonl when OUT is set).

    python -m bench.render_features                          # tiny, CPU: a smoke run
    python -m bench.render_features --chunks 1,4,8           # on a GPU node: the real figures
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from sdfarm.jobs import LoraRef, RenderJob
from sdfarm.models import ModelEntry
from worker.pipeline import LoadedModel
from worker.render import render
from worker.testing import (
    SD_SCHEDULER,
    build_tiny,
    build_tokenizer,
    peft_to_kohya,
    random_lora_layers,
    write_tiny_upscaler,
)
from worker.upscalers import load_upscaler, run_model

T0 = time.time()
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "projection_dim": 768, "hidden_act": "quick_gelu"}
CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
          "projection_dim": 1280, "hidden_act": "gelu"}
VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
       "block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
       "up_block_types": ("UpDecoderBlock2D",) * 4}
SD15_UNET = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
             "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
             "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
             "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768, "attention_head_dim": 8}
SDXL_UNET = {"sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
             "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
             "block_out_channels": (320, 640, 1280), "cross_attention_dim": 2048, "attention_head_dim": (5, 10, 20),
             "transformer_layers_per_block": (1, 2, 10), "addition_embed_type": "text_time",
             "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
             "use_linear_projection": True}


def log(**fields: Any) -> None:
    fields["t"] = round(time.time() - T0, 1)
    line = json.dumps(fields)
    print(line, flush=True)
    if os.environ.get("OUT"):
        with open(Path(os.environ["OUT"]) / "results.jsonl", "a") as f:
            f.write(line + "\n")


def _text_encoder(spec: dict[str, Any], with_projection: bool) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
                            pad_token_id=513, **spec)  # the bench tokenizer's ids (worker.testing's vocabulary)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def build_full(family: str) -> Any:
    """A real-size SD1.5 or SDXL-base pipeline with random weights (fp32, CPU)."""
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(0)
    scheduler = DPMSolverMultistepScheduler.from_config(SD_SCHEDULER)
    if family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=AutoencoderKL(**VAE, scaling_factor=0.13025), text_encoder=_text_encoder(CLIP_L, False),
            text_encoder_2=_text_encoder(CLIP_G, True), tokenizer=build_tokenizer(), tokenizer_2=build_tokenizer("!"),
            unet=UNet2DConditionModel(**SDXL_UNET), scheduler=scheduler, add_watermarker=False)
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**VAE), text_encoder=_text_encoder(CLIP_L, False), tokenizer=build_tokenizer(),
        unet=UNet2DConditionModel(**SD15_UNET), scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def lora_file(family: str, tiny: bool, folder: Path) -> Path:
    """A random rank-4 LoRA (kohya layout) on a second copy of the architecture."""
    from safetensors.torch import save_file

    donor = build_tiny(family, seed=1) if tiny else build_full(family)
    layers = random_lora_layers(donor, seed=1, strength=0.01)
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_text_model_" if family == "sdxl"
                else "lora_te_text_model_", "text_encoder_2": "lora_te2_text_model_"}
    path = folder / f"bench-{family}.safetensors"
    save_file({k: v for part, sd in layers.items() for k, v in peft_to_kohya(sd, prefixes[part]).items()}, str(path))
    return path


def measure(loaded: LoadedModel, jobs: list[RenderJob], reps: int) -> tuple[float, float | None]:
    """(images/s, peak CUDA memory MiB of this chunk; None on a CPU) of rendering `jobs` as one chunk."""
    cuda = loaded.device.type == "cuda"
    render(loaded, jobs)  # warm-up at this shape
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(reps):
        render(loaded, jobs)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t) / reps
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return len(jobs) / seconds, peak


def measure_upscaler(device: torch.device, tiny: bool, folder: Path, reps: int) -> None:
    """Seconds per image and peak CUDA memory of a 4x ESRGAN pass, whole and in tiles."""
    from PIL import Image

    path = write_tiny_upscaler(folder / "esrgan.safetensors", seed=0, scale=4,
                               **({} if tiny else {"filters": 64, "blocks": 23}))
    model = load_upscaler(path, device)
    size = 64 if tiny else 512
    image = Image.effect_noise((size, size), 64).convert("RGB")
    for tile in (0, 32) if tiny else (0, 512, 256):
        run_model(model, image, tile)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        for _ in range(reps):
            run_model(model, image, tile)
        if device.type == "cuda":
            torch.cuda.synchronize()
        log(stage="upscale", model="ESRGAN 4x", dtype=str(model.dtype), size=size, final_size=size * 4, tile=tile,
            seconds_per_image=round((time.perf_counter() - t) / reps, 3),
            peak_vram_mib=round(torch.cuda.max_memory_allocated() / 2**20) if device.type == "cuda" else None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="tiny test pipelines (default on a CPU)")
    parser.add_argument("--families", default="sd15,sdxl")
    parser.add_argument("--chunks", default="1,2,4")
    parser.add_argument("--steps", type=int, default=None, help="default 30 (GPU), 4 (tiny)")
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    tiny = args.tiny or not cuda
    device, dtype = (torch.device("cuda:0"), torch.float16) if cuda else (torch.device("cpu"), torch.float32)
    steps = args.steps or (4 if tiny else 30)
    log(stage="env", device=torch.cuda.get_device_name(0) if cuda else "cpu", torch=torch.__version__, tiny=tiny)
    folder = Path(tempfile.mkdtemp(prefix="sdfarm-bench-"))
    for family in args.families.split(","):
        size = 64 if tiny else {"sd15": 512, "sdxl": 1024}[family]
        lora = lora_file(family, tiny, folder)
        pipe = (build_tiny(family) if tiny else build_full(family)).to(device, dtype)
        pipe.set_progress_bar_config(disable=True)
        entry = ModelEntry(name=f"bench-{family}", family=family, hub="bench/random", sha256="0" * 64)
        loaded = LoadedModel(entry, "0" * 64, pipe, device, dtype, dict(pipe.scheduler.config), 0.0)
        ref = LoraRef(name="bench", weight=0.8, sha256="1" * 64)
        loaded.adapters.activate((ref,), (), {ref.sha256: lora})
        log(stage="built", family=family, unet_params=sum(p.numel() for p in pipe.unet.parameters()), size=size)
        for hires in (None, {"scale": 1.5, "steps": steps // 2, "denoising_strength": 0.5, "upscaler": "Latent"}):
            for n in (int(c) for c in args.chunks.split(",")):
                jobs = [RenderJob(model=entry.name, model_hash="0" * 64, prompt=f"a lighthouse at dusk, photo {i}",
                                  negative_prompt="blurry", seed=i, width=size, height=size, steps=steps,
                                  loras=(ref,), hires=hires) for i in range(n)]
                try:
                    ips, peak = measure(loaded, jobs, args.reps)
                except torch.OutOfMemoryError:
                    log(stage="render", family=family, chunk=n, hires=bool(hires), error="out of memory")
                    break
                log(stage="render", family=family, chunk=n, size=size, hires=bool(hires),
                    final_size=jobs[0].output_size[0], steps=steps, lora=True, images_per_s=round(ips, 3),
                    peak_vram_mib=None if peak is None else round(peak),
                    max_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
        del loaded, pipe
        if cuda:
            torch.cuda.empty_cache()
    measure_upscaler(device, tiny, folder, args.reps)
    log(stage="done")


if __name__ == "__main__":
    main()
