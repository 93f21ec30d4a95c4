"""torch.compile for the render path: the UNet and the VAE decoder, static shapes, persistent caches.

Compiling is the lever that remains once chunks are batched (eager fp16 kernels are the limit on a
GPU). Each (size, batch, prompt length) is one graph, compiled on first use: minutes cold, seconds
from a warm cache. So a compiled worker renders every chunk at one static batch size (the padding is
in worker/render.py), and inductor's caches live under SDFARM_CACHE_DIR/compile, which survives a
restart and is shared by the workers of a node. The modules are compiled in place
(`nn.Module.compile`): the pipeline keeps the same objects, so LoRA injection and VAE swaps still
work; they only cost a recompile (the graphs guard on the module structure).

Everything here runs in the pool child, after fork: nothing may touch CUDA before that.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("sdfarm.worker")

# a LoRA switch or a new size is a recompile; dynamo's default of 8 graphs per frame would then
# silently fall back to eager
RECOMPILE_LIMIT = 64


def wanted(setting: bool | None, device: torch.device) -> bool:
    """SDFARM_COMPILE: None compiles on CUDA only (inductor on the CPU gains little and compiles long)."""
    return device.type == "cuda" if setting is None else setting


def cache_dir(root: Path) -> Path:
    """Where inductor and triton keep compiled graphs and kernels (SDFARM_CACHE_DIR decides, over
    any TORCHINDUCTOR_CACHE_DIR). One folder per torch version: another version's are never read."""
    folder = root / "compile" / f"torch-{torch.__version__}"
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")  # read at each cache access
    os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")
    return folder


def compile_pipeline(pipe: Any, mode: str) -> None:
    """Compile the UNet and the VAE decoder in place, with static shapes."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    pipe.unet.compile(mode=mode, dynamic=False)
    pipe.vae.decoder.compile(mode=mode, dynamic=False)
    log.info("compiling the UNet and VAE decoder (mode %s, cache %s)", mode, os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
