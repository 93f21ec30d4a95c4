"""LoRAs and textual-inversion embeddings inside the pinned pipeline.

LoRAs are switched between chunks (a chunk shares one LoRA set, so never between images): each
file is loaded once as a named peft adapter and kept for reuse, least recently used first out
beyond `keep`, so a worker that sees many LoRAs does not grow without bound; each switch and load is
told to `on_swap` (the worker's metrics). Embeddings become
tokens in the tokenizer, loaded the first time a job names them and kept: a prompt that does not
contain an embedding's name never meets its token. Tokens are the lower-cased name: CLIP
tokenizers lower-case prompts, so "EasyNegative" and "easynegative" both name it, as in A1111.
SDXL embeddings hold one tensor per text encoder (`clip_l`, `clip_g`, as A1111 saves them); each
goes into its own encoder under the same token.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from sdfarm.errors import AssetError
from sdfarm.jobs import AssetRef, LoraRef, RenderJob
from sdfarm.models import lora_refusal

from .prompts import CHUNK_TOKENS, encoders

log = logging.getLogger("sdfarm.worker")


def adapter_name(sha256: str) -> str:
    return f"lora_{sha256[:16]}"


def _unheard(kind: str) -> None:
    """No one listens for swaps (a model outside a worker)."""


class Adapters:
    def __init__(self, pipe: Any, keep: int = 4, on_swap: Callable[[str], None] = _unheard) -> None:
        self.pipe = pipe
        self.keep = keep
        self.on_swap = on_swap  # told "lora" when the active set changes, "lora-load" when a file loads
        self.loras: OrderedDict[str, str] = OrderedDict()  # sha256 -> adapter name, oldest use first
        self.embeddings: dict[str, str] = {}  # token -> sha256
        self._active: tuple[tuple[str, float, float | None], ...] | None = ()  # None: unknown (a switch failed)

    def activate(self, loras: tuple[LoraRef, ...], embeddings: tuple[AssetRef, ...],
                 files: dict[str, Path]) -> None:
        """Make the pipeline render with exactly these LoRAs and have these embeddings' tokens."""
        for emb in embeddings:
            self._embedding(emb, files[emb.sha256])
        wanted = tuple((lora.sha256, lora.weight, lora.unet_weight) for lora in loras)
        if wanted == self._active:
            return
        self._active = None  # unknown until the switch below has fully succeeded
        if not loras:
            if self.loras:
                self.pipe.disable_lora()
            self._active = ()
            self.on_swap("lora")
            return
        for lora in loras:
            self._load(lora, files[lora.sha256])
        self._evict({lora.sha256 for lora in loras})
        self.pipe.enable_lora()
        names = [self.loras[lora.sha256] for lora in loras]
        self.pipe.set_adapters(names, adapter_weights=[self._weights(n, lora)
                                                       for n, lora in zip(names, loras, strict=True)])
        self._active = wanted
        self.on_swap("lora")

    def _weights(self, adapter: str, lora: LoraRef) -> float | dict[str, float]:
        """One weight, or per component where the UNet's differs from the text encoders' (A1111's
        <lora:name:te:unet>), for the components this adapter has layers in."""
        if lora.unet_weight is None:
            return lora.weight
        has = [part for part, adapters in self.pipe.get_list_adapters().items() if adapter in adapters]
        return {part: lora.unet_weight if part == "unet" else lora.weight for part in has}

    def _load(self, lora: LoraRef, path: Path) -> None:
        if lora.sha256 in self.loras:
            self.loras.move_to_end(lora.sha256)
            return
        name = adapter_name(lora.sha256)
        if (refusal := lora_refusal(path)) is not None:  # a LyCORIS type diffusers cannot load (S3-sourced files)
            raise AssetError(f"lora {lora.name!r}: {refusal}")
        try:
            self.pipe.load_lora_weights(str(path), adapter_name=name)
        except Exception as e:
            self._drop(name)
            raise AssetError(f"lora {lora.name!r}: cannot load {path.name}: {type(e).__name__}: {e}") from e
        self.loras[lora.sha256] = name
        self.on_swap("lora-load")
        log.info("lora %s loaded as %s (%d held)", lora.name, name, len(self.loras))

    def _evict(self, needed: set[str]) -> None:
        for sha in list(self.loras):
            if len(self.loras) <= self.keep:
                return
            if sha not in needed:
                self._drop(self.loras.pop(sha))

    def _drop(self, name: str) -> None:
        adapters = self.pipe.get_list_adapters()
        if any(name in names for names in adapters.values()):
            self.pipe.delete_adapters([name])

    def _embedding(self, emb: AssetRef, path: Path) -> None:
        token = embedding_token(emb.name)
        if self.embeddings.get(token) == emb.sha256:
            return
        pairs = encoders(self.pipe)
        sdxl = len(pairs) == 2
        if token in self.embeddings:  # the registry now names another file: replace its tokens
            self._unload(token, pairs)
            del self.embeddings[token]
        try:
            if not sdxl:
                self.pipe.load_textual_inversion(str(path), token=token)
            else:
                tensors = (load_file(str(path)) if path.suffix == ".safetensors"  # else an opted-in pickle
                           else torch.load(str(path), map_location="cpu", weights_only=True))
                if set(tensors) != {"clip_l", "clip_g"}:
                    raise ValueError("an SDXL embedding holds clip_l and clip_g, this one"
                                     f" {', '.join(sorted(tensors))}")
                for (tokenizer, text_encoder), key in zip(pairs, ("clip_l", "clip_g"), strict=True):
                    self.pipe.load_textual_inversion(tensors[key], token=token, tokenizer=tokenizer,
                                                     text_encoder=text_encoder)
            vectors = len(_vector_tokens(pairs[0][0], token))
            if vectors > CHUNK_TOKENS:  # A1111 puts an embedding in one chunk, whole
                raise ValueError(f"it has {vectors} vectors (allowed: at most {CHUNK_TOKENS}, one prompt chunk)")
        except Exception as e:
            self._unload(token, pairs)  # no half-loaded embedding (SDXL: one encoder only) stays behind
            raise AssetError(f"embedding {emb.name!r}: cannot load {path.name}: {type(e).__name__}: {e}") from e
        self.embeddings[token] = emb.sha256
        log.info("embedding %s loaded (%s)", emb.name, emb.sha256[:12])

    def _unload(self, token: str, pairs: list[tuple[Any, Any]]) -> None:
        for tokenizer, text_encoder in pairs:
            tokens = _vector_tokens(tokenizer, token)
            if tokens:
                self.pipe.unload_textual_inversion(tokens, tokenizer=tokenizer, text_encoder=text_encoder)


def _vector_tokens(tokenizer: Any, token: str) -> list[str]:
    """An embedding's added tokens: `token`, `token_1`, ... (diffusers' load_textual_inversion)."""
    vectors = re.compile(re.escape(token) + r"(_\d+)?")
    return [t for t in tokenizer.get_added_vocab() if vectors.fullmatch(t)]


def embedding_token(name: str) -> str:
    """The tokenizer token of a registered embedding: its lower-cased name (CLIP tokenizers lower-case
    prompts, so "EasyNegative" and "easynegative" both name it, as in A1111)."""
    return name.lower()


def embedding_tokens(job: RenderJob) -> frozenset[str]:
    """The tokens of the embeddings a job uses: only these are found in its prompts."""
    return frozenset(embedding_token(e.name) for e in job.embeddings)
