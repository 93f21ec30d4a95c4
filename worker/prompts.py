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
    """What the pipeline call takes instead of prompt text. The pooled pair is SDXL's only."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None

    def kwargs(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self._asdict().items() if v is not None}


def encoders(pipe: Any) -> list[tuple[Any, Any]]:
    """(tokenizer, text encoder) pairs: one for SD 1.x, two for SDXL."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def chunk_prompt(pipe: Any, text: str, tokenizer: Any = None) -> list[Chunk]:
    """A1111's tokenize_line: weighted runs -> chunks. BREAK closes the current chunk (even an empty
    one). Multi-vector textual-inversion tokens are expanded first when the pipe can do it. After
    the end token, the tokenizer's pad id (A1111: everything after the first end token is padding)."""
    tokenizer = tokenizer or pipe.tokenizer
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id
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
        fill = CHUNK_TOKENS - len(current.tokens)
        chunks.append(Chunk([bos, *current.tokens, eos, *[pad] * fill], [1.0, *current.weights, 1.0, *[1.0] * fill]))
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


def encode_prompts(pipe: Any, prompts: list[str], negatives: list[str], clip_skip: int) -> Conditioning:
    """Embeddings [B, 77*k, D] for prompts and for negatives, in the text encoder's dtype and on its
    device (SDXL: D is both encoders' widths, plus the pooled [B, P]). Every row gets the same k, the
    most chunks any prompt or negative needs: shorter ones are padded with encoded empty chunks, as
    A1111 pads cond and uncond, so both stack into one batch. clip_skip applies to SD 1.x only."""
    pairs = encoders(pipe)
    sdxl = len(pairs) == 2
    per_encoder = [[chunk_prompt(pipe, text, tokenizer) for text in [*prompts, *negatives]] for tokenizer, _ in pairs]
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
    if not sdxl:
        return Conditioning(cond, uncond)
    assert pooled is not None
    pooled_cond, pooled_uncond = pooled[:len(prompts)], pooled[len(prompts):]
    # SDXL: an empty negative prompt is all zeros, not the encoded "" (A1111's force_zero_negative_prompt,
    # diffusers' force_zeros_for_empty_prompt); per job here, so a job does not depend on its chunk-mates
    empty_negative = torch.tensor([n == "" for n in negatives], device=uncond.device)
    uncond = torch.where(empty_negative[:, None, None], torch.zeros_like(uncond), uncond)
    pooled_uncond = torch.where(empty_negative[:, None], torch.zeros_like(pooled_uncond), pooled_uncond)
    return Conditioning(cond, uncond, pooled_cond, pooled_uncond)


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
