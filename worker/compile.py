"""torch.compile for the render path: the UNet and the VAE decoder, static shapes, persistent caches.

Compiling is the lever that remains once chunks are batched (eager fp16 kernels are the limit on a
GPU). Each (size, batch, prompt length) is one graph, compiled on first use: minutes cold, seconds
from a warm cache. So a compiled worker renders every chunk at one static batch size (the padding is
in worker/render.py), and inductor's caches live under SDFARM_CACHE_DIR/compile, which survives a
restart and is shared by the workers of a node. With SDFARM_COMPILE_CACHE_SECRET set, the
warm-up's graphs are also shared through the bucket (SharedCache), so a new node starts warm too.
The modules are compiled in place (`nn.Module.compile`): the pipeline keeps the same objects, so
LoRA injection and VAE swaps still work; they only cost a recompile (the graphs guard on the
module structure).

Everything here runs in the pool child, after fork: nothing may touch CUDA before that.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from pathlib import Path
from typing import Any

import torch

from sdfarm.errors import TransientError
from sdfarm.layout import compile_artifacts_key
from sdfarm.store import MissingObject, Store

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


class SharedCache:
    """Compiled artifacts (torch.compiler.save_cache_artifacts) in the bucket, for every worker of
    the same model, torch build, GPU type and warm-up shape. They hold code the worker runs, so they
    are signed with HMAC-SHA256 under a key only workers hold: the producers' S3 credentials can
    write the bucket, and must not be able to run code on a GPU node. An unsigned or tampered
    object is ignored (the worker compiles itself); a missing one is published after warm-up."""

    def __init__(self, store: Store, secret: bytes) -> None:
        self.store = store
        self.secret = secret

    @staticmethod
    def key(model_sha256: str, device_name: str, shape: str) -> str:
        return compile_artifacts_key(model_sha256, torch.__version__, device_name, shape)

    def _sign(self, data: bytes) -> bytes:
        return hmac.new(self.secret, data, hashlib.sha256).digest()

    def fetch(self, key: str) -> bool:
        """Load the artifacts into this process's compile caches, before anything compiles."""
        try:
            blob = self.store.get(key)
        except MissingObject:
            return False
        except TransientError as e:
            log.warning("compile cache %s not read (%s): compiling here", key, e)
            return False
        signature, data = blob[:32], blob[32:]
        if not hmac.compare_digest(signature, self._sign(data)):
            log.warning("compile cache %s has a bad signature (another key, or tampered): ignored", key)
            return False
        torch.compiler.load_cache_artifacts(data)
        log.info("compile cache %s loaded (%d bytes)", key, len(data))
        return True

    def publish(self, key: str) -> None:
        """What this process compiled so far, for the next worker (first writer wins)."""
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return
        data = saved[0]
        try:
            if self.store.put_if_absent(key, self._sign(data) + data, "application/octet-stream"):
                log.info("compile cache %s published (%d bytes)", key, len(data))
        except TransientError as e:
            log.warning("compile cache %s not published: %s", key, e)
