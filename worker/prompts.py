"""Prompt text -> text-encoder embeddings for SD 1.x, the way AUTOMATIC1111 builds them.

A1111 (modules/sd_hijack_clip.py) lifts CLIP's 77-token cap by cutting a prompt into chunks of 75
tokens, each wrapped as BOS + 75 tokens + EOS (padded with EOS), encoding every chunk on its own
and concatenating the results. Attention weights (sdfarm.prompt_syntax) scale each token's output
vector, then the chunk is rescaled to keep its mean ("Original" emphasis). Prompts written for
A1111 therefore render here as they do there.

"Clip skip: N" takes the hidden state N layers from the end (1 = the last layer) and applies the
final layer norm. Computed here rather than by the pipeline so the same path serves every text
encoder layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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


def chunk_prompt(pipe: Any, text: str) -> list[Chunk]:
    """A1111's tokenize_line: weighted runs -> chunks. BREAK closes the current chunk (even an empty
    one). Multi-vector textual-inversion tokens are expanded first when the pipe can do it."""
    tokenizer = pipe.tokenizer
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    comma = tokenizer.get_vocab().get(",</w>")
    runs = parse_prompt_attention(text)
    convert = getattr(pipe, "maybe_convert_prompt", None)
    # CLIP tokenizers lower-case text, and embedding tokens are lower-case (worker/adapters.py):
    # lower-casing first lets "EasyNegative" expand to all of its vectors, not just the first
    texts = [convert(part.lower(), tokenizer) if convert else part for part, _ in runs]
    tokenized: list[list[int]] = tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    chunks: list[Chunk] = []
    current = Chunk()
    last_comma = -1

    def close() -> None:
        nonlocal current, last_comma
        pad = CHUNK_TOKENS - len(current.tokens)
        chunks.append(Chunk([bos, *current.tokens, *[eos] * pad, eos], [1.0, *current.weights, *[1.0] * pad, 1.0]))
        current, last_comma = Chunk(), -1

    for ids, run in zip(tokenized, runs, strict=True):
        if run == BREAK:
            close()
            continue
        weight = run[1]
        for token in ids:
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
            current.tokens.append(token)
            current.weights.append(weight)
    if current.tokens or not chunks:
        close()
    return chunks


def chunk_counts(pipe: Any, prompts: list[str], negatives: list[str]) -> list[int]:
    """How many 75-token chunks each (prompt, negative) pair needs: jobs that need different counts
    are encoded in separate calls, so no job is padded to a chunk-mate's length."""
    return [max(len(chunk_prompt(pipe, p)), len(chunk_prompt(pipe, n))) for p, n in zip(prompts, negatives,
                                                                                          strict=True)]


def encode_prompts(pipe: Any, prompts: list[str], negatives: list[str],
                   clip_skip: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings [B, 77*k, D] for prompts and for negatives, in the text encoder's dtype and on its
    device. Every row gets the same k, the most chunks any prompt or negative needs: shorter ones are
    padded with encoded empty chunks, as A1111 pads cond and uncond, so both stack into one batch."""
    rows = [chunk_prompt(pipe, text) for text in [*prompts, *negatives]]
    count = max(len(row) for row in rows)
    empty = chunk_prompt(pipe, "")[0]
    rows = [row + [empty] * (count - len(row)) for row in rows]
    # two encoder calls, as before: a prompt's embedding does not depend on the negatives' batch
    return _encode(pipe, rows[:len(prompts)], clip_skip), _encode(pipe, rows[len(prompts):], clip_skip)


def _encode(pipe: Any, rows: list[list[Chunk]], clip_skip: int) -> torch.Tensor:
    text_encoder = pipe.text_encoder
    chunks = [chunk for row in rows for chunk in row]
    ids = torch.tensor([chunk.tokens for chunk in chunks], device=text_encoder.device)
    weights = torch.tensor([chunk.weights for chunk in chunks], device=text_encoder.device)
    z = _hidden(text_encoder, ids, clip_skip).float()
    # "Original" emphasis. A1111 takes the mean over its whole batch of distinct prompts; per chunk
    # of one prompt here, so an image does not depend on the jobs batched with it. All weights 1
    # gives a factor of exactly 1: an unweighted prompt's embedding is the plain encoder output.
    weighted = z * weights[..., None]
    original, new = z.mean(dim=(1, 2), keepdim=True), weighted.mean(dim=(1, 2), keepdim=True)
    # a chunk without weights keeps its output exactly; a mean of (about) zero cannot be restored
    # (0/0 would poison the image with NaN): such chunks keep the plain weighting
    keep = (weights == 1).all(dim=1)[:, None, None] | (new.abs() <= 1e-6 * z.abs().mean(dim=(1, 2), keepdim=True))
    weighted = weighted * torch.where(keep, torch.ones_like(new), original / new)
    return weighted.to(dtype=text_encoder.dtype).reshape(len(rows), -1, z.shape[-1])


def _hidden(text_encoder: Any, ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
    if clip_skip <= 1:
        hidden: torch.Tensor = text_encoder(ids)[0]
        return hidden
    out = text_encoder(ids, output_hidden_states=True)
    final_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
    normed: torch.Tensor = final_norm(out.hidden_states[-clip_skip])
    return normed
