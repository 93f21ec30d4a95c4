"""Prompt text -> text-encoder embeddings for SD 1.x and SDXL, the way AUTOMATIC1111 builds them.

A1111 (modules/sd_hijack_clip.py) lifts CLIP's 77-token cap by cutting a prompt into chunks of 75
tokens, each wrapped as BOS + 75 tokens + EOS (padded with EOS), encoding every chunk on its own
and concatenating the results. Attention weights (sdfarm.prompt_syntax) scale each token's output
vector, then the chunk is rescaled to keep its mean ("Original" emphasis). Prompts written for
A1111 therefore render here as they do there.

"Clip skip: N" takes the hidden state N layers from the end (1 = the last layer) and applies the
final layer norm. Computed here rather than by the pipeline so the same path serves every text
encoder layout.

SDXL has two encoders (CLIP-L and OpenCLIP-G). As in A1111 (and SDXL's own conditioner), each
tokenizes and chunks the prompt itself, pads after the end token with its own pad id (OpenCLIP: 0),
takes its penultimate hidden state without the final norm, and applies the emphasis to its own
output; the two are joined feature-wise. The pooled embedding (SDXL's second conditioning) is
OpenCLIP-G's projected end-token state of the prompt's first chunk, unweighted. An empty
negative prompt is zeros (both embeddings), as in A1111 and diffusers for SDXL.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from sdfarm.prompt_syntax import BREAK, parse_prompt_attention

CHUNK_TOKENS = 75
COMMA_BACKTRACK = 20
"""A1111's comma_padding_backtrack: an overflowing chunk is cut after its last comma if that comma
is at most this many tokens back, so a phrase is not split across chunks."""


@dataclass
class Chunk:
    """77 token ids (BOS, 75 prompt or padding tokens, EOS) and one weight per id."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


class Conditioning(NamedTuple):
    """What the pipeline call takes instead of prompt text. The pooled pair is SDXL's only. lengths:
    the tokens each row's own chunks span, prompts then negatives; past them, a row is padding to the
    batch's length, which the UNet does not attend to (own_lengths)."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    lengths: tuple[int, ...] = ()

    def kwargs(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self._asdict().items() if v is not None and k != "lengths"}


@contextmanager
def own_lengths(unet: Any, conditioning: Conditioning) -> Iterator[None]:
    """While the pipeline runs, the UNet attends to each row's own tokens only: A1111's default
    (modules/sd_samplers_cfg_denoiser.py, CFGDenoiser.forward, pad_cond_uncond off) runs cond and
    uncond of different lengths as separate UNet calls, and cross-attention with the padding masked
    out (encoder_attention_mask) is that call. The pipeline stacks [uncond; cond] for CFG, cond alone
    without it. Nothing is installed when every row is full length."""
    total = conditioning.prompt_embeds.shape[1]
    if all(length == total for length in conditioning.lengths):
        yield
        return
    rows = len(conditioning.lengths) // 2
    keep = torch.arange(total)[None, :] < torch.tensor(conditioning.lengths)[:, None]
    cond, uncond = keep[:rows], keep[rows:]

    def mask(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        hidden = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[2]
        layout = torch.cat([uncond, cond]) if hidden.shape[0] == 2 * rows else cond
        if layout.shape != hidden.shape[:2]:
            raise RuntimeError(f"UNet conditioning of shape {tuple(hidden.shape)} is not the chunk's"
                               f" {rows} prompts of {total} tokens")
        return args, {**kwargs, "encoder_attention_mask": layout.to(hidden.device)}

    hook = unet.register_forward_pre_hook(mask, with_kwargs=True)
    try:
        yield
    finally:
        hook.remove()


def encoders(pipe: Any) -> list[tuple[Any, Any]]:
    """(tokenizer, text encoder) pairs: one for SD 1.x, two for SDXL, one (OpenCLIP-G) for SDXL's refiner."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)] if getattr(pipe, "text_encoder", None) is not None else []
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def is_sdxl(pipe: Any) -> bool:
    """Whether the pipeline encodes as SDXL's conditioner does (OpenCLIP-G's penultimate state, a pooled
    embedding): SDXL and its refiner."""
    return getattr(pipe, "text_encoder_2", None) is not None


def chunk_prompt(pipe: Any, text: str, tokenizer: Any = None, embeddings: Collection[str] | None = None
                 ) -> list[Chunk]:
    """A1111's tokenize_line (modules/sd_hijack_clip.py): weighted runs -> chunks. BREAK closes the
    current chunk (even an empty one). Each run is tokenized as if no embedding were loaded; an
    embedding is found where its name's tokens stand in the run (so at token boundaries:
    `easynegatives` is not `easynegative`) and put in whole, all of its vectors, moving to the next
    chunk when they do not fit in this one. embeddings: the (lower-cased) names of those the job uses
    (None: every one loaded), so an embedding loaded for another job never changes this one. After
    the end token, the tokenizer's pad id (A1111: everything after the first end token is padding)."""
    tokenizer = tokenizer or encoders(pipe)[0][0]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    comma = tokenizer.get_vocab().get(",</w>")
    lookup = _embedding_lookup(tokenizer, embeddings)
    runs = parse_prompt_attention(text)

    chunks: list[Chunk] = []
    current = Chunk()
    last_comma = -1

    def close() -> None:
        nonlocal current, last_comma
        fill = CHUNK_TOKENS - len(current.tokens)
        chunks.append(Chunk([bos, *current.tokens, eos, *[pad] * fill], [1.0, *current.weights, 1.0, *[1.0] * fill]))
        current, last_comma = Chunk(), -1

    for part, weight in runs:
        if (part, weight) == BREAK:
            close()
            continue
        ids = _base_ids(tokenizer, part)
        position = 0
        while position < len(ids):
            token = ids[position]
            if token == comma:
                last_comma = len(current.tokens)
            elif len(current.tokens) == CHUNK_TOKENS and last_comma != -1 \
                    and CHUNK_TOKENS - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                tail = Chunk(current.tokens[cut:], current.weights[cut:])
                current = Chunk(current.tokens[:cut], current.weights[:cut])
                close()
                current = tail
            if len(current.tokens) == CHUNK_TOKENS:
                close()
            found = _embedding_at(lookup, ids, position)
            if found is None:
                current.tokens.append(token)
                current.weights.append(weight)
                position += 1
                continue
            name_length, vectors = found
            if len(current.tokens) + len(vectors) > CHUNK_TOKENS:
                close()
            current.tokens.extend(vectors)
            current.weights.extend([weight] * len(vectors))
            position += name_length
    if current.tokens or not chunks:
        close()
    return chunks


def _base_ids(tokenizer: Any, text: str) -> list[int]:
    """The text's token ids from the tokenizer's own vocabulary: its normaliser, pre-tokeniser and BPE
    model without the added (embedding) tokens, which it would otherwise split out of a word."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (pure Python) tokenizer, as transformers 4 loads CLIP's
        unknown = tokenizer.encoder.get(tokenizer.unk_token, tokenizer.eos_token_id)
        return [tokenizer.encoder.get(t, unknown) for t in tokenizer._tokenize(text)] if text else []
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    splits = [split for split, _ in backend.pre_tokenizer.pre_tokenize_str(text)] if backend.pre_tokenizer else [text]
    return [token.id for split in splits for token in backend.model.tokenize(split)]


def _embedding_lookup(tokenizer: Any, only: Collection[str] | None) -> dict[int, list[tuple[list[int], list[int]]]]:
    """Loaded embeddings by the first token of their name: (the name's tokens, the vectors' added
    token ids), longest names first, as A1111's EmbeddingDatabase.ids_lookup. An embedding of n
    vectors is the added tokens `name`, `name_1` .. `name_{n-1}` (diffusers' load_textual_inversion)."""
    added = {t: i for t, i in tokenizer.get_added_vocab().items() if t not in tokenizer.all_special_tokens}
    lookup: dict[int, list[tuple[list[int], list[int]]]] = {}
    for name, first in added.items():
        vector = re.fullmatch(r"(.+)_\d+", name)
        if (vector and vector.group(1) in added) or (only is not None and name not in only):
            continue  # a further vector of an embedding, or one the job does not use
        vectors = [first]
        while f"{name}_{len(vectors)}" in added:
            vectors.append(added[f"{name}_{len(vectors)}"])
        name_ids = _base_ids(tokenizer, name)
        if name_ids:
            lookup.setdefault(name_ids[0], []).append((name_ids, vectors))
    for candidates in lookup.values():
        candidates.sort(key=lambda c: len(c[0]), reverse=True)
    return lookup


def _embedding_at(lookup: dict[int, list[tuple[list[int], list[int]]]], ids: list[int],
                  position: int) -> tuple[int, list[int]] | None:
    """(how many tokens the name spans, the vectors) of the embedding named at `position`, or None."""
    for name_ids, vectors in lookup.get(ids[position], ()):
        if ids[position:position + len(name_ids)] == name_ids:
            return len(name_ids), vectors
    return None


def chunk_counts(pipe: Any, prompts: list[str], negatives: list[str],
                 embeddings: Sequence[Collection[str] | None] | None = None) -> list[int]:
    """How many 75-token chunks each (prompt, negative) pair needs: jobs that need different counts
    are encoded in separate calls, so no job is padded to a chunk-mate's length. embeddings: each
    job's, as chunk_prompt takes them."""
    uses = embeddings or [None] * len(prompts)
    return [max(len(chunk_prompt(pipe, p, embeddings=e)), len(chunk_prompt(pipe, n, embeddings=e)))
            for p, n, e in zip(prompts, negatives, uses, strict=True)]


def encode_prompts(pipe: Any, prompts: list[str], negatives: list[str], clip_skip: int,
                   embeddings: Sequence[Collection[str] | None] | None = None) -> Conditioning:
    """Embeddings [B, 77*k, D] for prompts and for negatives, in the text encoder's dtype and on its
    device (SDXL: D is both encoders' widths, plus the pooled [B, P]). Every row gets the same k, the
    most chunks any prompt or negative needs: shorter ones are padded with encoded empty chunks, so
    both stack into one batch, and own_lengths keeps the UNet off the padding, so each renders at its
    own length as in A1111. clip_skip applies to SD 1.x only.
    embeddings: each job's, as chunk_prompt takes them."""
    pairs = encoders(pipe)
    sdxl = is_sdxl(pipe)
    uses = list(embeddings or [None] * len(prompts)) * 2  # a job's prompt and negative use its embeddings
    texts = list(zip([*prompts, *negatives], uses, strict=True))
    per_encoder = [[chunk_prompt(pipe, text, tokenizer, e) for text, e in texts] for tokenizer, _ in pairs]
    count = max(len(row) for rows in per_encoder for row in rows)
    embeds: list[torch.Tensor] = []
    pooled: torch.Tensor | None = None
    for (tokenizer, text_encoder), rows in zip(pairs, per_encoder, strict=True):
        empty = chunk_prompt(pipe, "", tokenizer)[0]
        rows = [row + [empty] * (count - len(row)) for row in rows]
        # one encoder call per side: a prompt's embedding does not depend on the negatives' batch
        halves = [_encode(text_encoder, part, clip_skip, sdxl, tokenizer.eos_token_id)
                  for part in (rows[:len(prompts)], rows[len(prompts):])]
        embeds.append(torch.cat([h[0] for h in halves]))
        if halves[0][1] is not None:  # OpenCLIP-G, the encoder with a projection
            pooled = torch.cat([h[1] for h in halves if h[1] is not None])
    joined = torch.cat(embeds, dim=-1)
    cond, uncond = joined[:len(prompts)], joined[len(prompts):]
    lengths = tuple(max(len(rows[i]) for rows in per_encoder) * (CHUNK_TOKENS + 2) for i in range(len(texts)))
    if not sdxl:
        return Conditioning(cond, uncond, lengths=lengths)
    assert pooled is not None
    pooled_cond, pooled_uncond = pooled[:len(prompts)], pooled[len(prompts):]
    # SDXL: an empty negative prompt is all zeros, not the encoded "" (A1111's force_zero_negative_prompt,
    # diffusers' force_zeros_for_empty_prompt); per job here, so a job does not depend on its chunk-mates
    empty_negative = torch.tensor([n == "" for n in negatives], device=uncond.device)
    uncond = torch.where(empty_negative[:, None, None], torch.zeros_like(uncond), uncond)
    pooled_uncond = torch.where(empty_negative[:, None], torch.zeros_like(pooled_uncond), pooled_uncond)
    return Conditioning(cond, uncond, pooled_cond, pooled_uncond, lengths)


def _encode(text_encoder: Any, rows: list[list[Chunk]], clip_skip: int, sdxl: bool,
            eos: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One encoder over rows of chunks: ([rows, 77*k, D], the first chunks' pooled [rows, P] or None)."""
    chunks = [chunk for row in rows for chunk in row]
    ids = torch.tensor([chunk.tokens for chunk in chunks], device=text_encoder.device)
    weights = torch.tensor([chunk.weights for chunk in chunks], device=text_encoder.device)
    if sdxl:
        out = text_encoder(ids, output_hidden_states=True)
        z = out.hidden_states[-2].float()  # penultimate, no final norm: SDXL's conditioner
        pooled = None
        if hasattr(text_encoder, "text_projection"):
            # the end token's final state, projected: found by the end id (not argmax, which an
            # embedding's added token ids would win), from each prompt's first chunk
            first = ids[::len(rows[0])]
            at = (first == eos).int().argmax(dim=-1)
            state = out.last_hidden_state[::len(rows[0])][torch.arange(len(rows), device=ids.device), at]
            pooled = text_encoder.text_projection(state)
    else:
        z, pooled = _hidden(text_encoder, ids, clip_skip).float(), None
    # "Original" emphasis. A1111 takes the mean over its whole batch of distinct prompts; per chunk
    # of one prompt here, so an image does not depend on the jobs batched with it. All weights 1
    # gives a factor of exactly 1: an unweighted prompt's embedding is the plain encoder output.
    weighted = z * weights[..., None]
    original, new = z.mean(dim=(1, 2), keepdim=True), weighted.mean(dim=(1, 2), keepdim=True)
    # a chunk without weights keeps its output exactly; a mean of (about) zero cannot be restored
    # (0/0 would poison the image with NaN): such chunks keep the plain weighting
    keep = (weights == 1).all(dim=1)[:, None, None] | (new.abs() <= 1e-6 * z.abs().mean(dim=(1, 2), keepdim=True))
    weighted = weighted * torch.where(keep, torch.ones_like(new), original / new)
    return weighted.to(dtype=text_encoder.dtype).reshape(len(rows), -1, z.shape[-1]), pooled


def _hidden(text_encoder: Any, ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
    if clip_skip <= 1:
        hidden: torch.Tensor = text_encoder(ids)[0]
        return hidden
    out = text_encoder(ids, output_hidden_states=True)
    final_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
    normed: torch.Tensor = final_norm(out.hidden_states[-clip_skip])
    return normed
