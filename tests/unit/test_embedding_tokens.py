"""Textual-inversion embeddings in a prompt as A1111 finds and places them (issue 10, item 11):
modules/sd_hijack_clip.py, tokenize_line, and modules/textual_inversion/textual_inversion.py,
EmbeddingDatabase.find_embedding_at_position. A1111 tokenizes the prompt with the plain tokenizer and
finds an embedding where the tokens of its name stand, so a name matches at token boundaries only;
an embedding that does not fit in the current 75-token chunk moves, whole, into the next one."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from sdfarm.errors import AssetError
from sdfarm.jobs import AssetRef
from sdfarm.models import Registry
from sdfarm.prompt_syntax import embedding_pattern
from worker.pipeline import load_model
from worker.prompts import CHUNK_TOKENS, chunk_prompt
from worker.testing import build_tokenizer, write_tiny_embedding


@pytest.fixture
def tokenizer() -> Any:
    """The tiny byte-level CLIP tokenizer with a 4-vector embedding "sparkle" added as diffusers'
    load_textual_inversion adds one: the tokens sparkle, sparkle_1, sparkle_2, sparkle_3."""
    tok = build_tokenizer()
    tok.add_tokens(["sparkle", "sparkle_1", "sparkle_2", "sparkle_3"])
    return tok


def vectors(tok: Any) -> list[int]:
    return [tok.convert_tokens_to_ids(t) for t in ("sparkle", "sparkle_1", "sparkle_2", "sparkle_3")]


def body(tok: Any, text: str) -> list[list[int]]:
    return body_of(chunk_prompt(None, text, tok), tok)


def body_of(chunks: list[Any], tok: Any) -> list[list[int]]:
    """Each chunk's tokens between its start and end token, padding left out."""
    return [c.tokens[1:][:c.tokens[1:].index(tok.eos_token_id)] for c in chunks]


def plain(tok: Any, text: str) -> list[int]:
    ids: list[int] = tok(text, add_special_tokens=False)["input_ids"]
    return ids


@pytest.mark.parametrize("text", ["sparkle", "sparkle, a cat", "a cat,sparkle", "my_sparkle", "(sparkle:1.2)",
                                  "SPARKLE", "a [sparkle] cat"])
def test_an_embedding_is_found_where_its_names_tokens_stand(tokenizer: Any, text: str) -> None:
    tokens, = body(tokenizer, text)
    emb = vectors(tokenizer)
    assert any(tokens[i:i + 4] == emb for i in range(len(tokens)))


@pytest.mark.parametrize("text", ["sparkles", "sparklewing", "a sparkly cat"])
def test_a_name_inside_a_longer_word_is_text(tokenizer: Any, text: str) -> None:
    # "sparkles" tokenizes to ... l, e, s</w>; the name to ... l, e</w>: no match, as in A1111 (the
    # tokenizer alone would split the added token "sparkle" out of the word)
    tokens, = body(tokenizer, text)
    assert not set(tokens) & set(vectors(tokenizer))
    assert tokens == plain(build_tokenizer(), text)


def test_a_multi_vector_embedding_at_a_chunk_boundary_moves_whole_into_the_next_chunk(tokenizer: Any) -> None:
    # 73 tokens, then 4 vectors: 73 + 4 > 75, so the first chunk closes at 73 (padded) and the
    # embedding opens the second: A1111's `if len(chunk.tokens) + emb_len > self.chunk_length: next_chunk()`
    words = "b" * 73
    first, second = body(tokenizer, f"{words} sparkle")
    assert first == plain(tokenizer, words)
    assert len(first) == 73
    assert second == vectors(tokenizer)
    # with room for it, it stays: 71 + 4 = 75
    only, = body(tokenizer, f"{'b' * 71} sparkle")
    assert only[-4:] == vectors(tokenizer)
    assert len(only) == CHUNK_TOKENS


def test_an_embeddings_weight_applies_to_all_of_its_vectors(tokenizer: Any) -> None:
    chunk, = chunk_prompt(None, "a (sparkle:1.3) cat", tokenizer)
    at = chunk.tokens.index(vectors(tokenizer)[0])
    assert chunk.weights[at:at + 4] == [1.3] * 4
    assert chunk.tokens[at:at + 4] == vectors(tokenizer)


def test_an_embedding_of_more_vectors_than_a_chunk_is_refused_at_load(tmp_path: Path, registry: Registry) -> None:
    loaded = load_model(registry, "tiny-sd15", "cpu")
    path = write_tiny_embedding(tmp_path / "huge.safetensors", seed=3, vectors=CHUNK_TOKENS + 1)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(AssetError, match=f"embedding 'huge': cannot load huge.safetensors: ValueError: it has"
                                         f" {CHUNK_TOKENS + 1} vectors \\(allowed: at most {CHUNK_TOKENS}"):
        loaded.adapters.activate((), (AssetRef(name="huge", sha256=sha),), {sha: path})
    assert not [t for t in loaded.pipe.tokenizer.get_added_vocab() if t.startswith("huge")]  # nothing left behind


def test_only_the_jobs_own_embeddings_are_found(tokenizer: Any) -> None:
    # a worker keeps embeddings loaded for earlier jobs: a job that does not use one renders its name as text
    tokens, = body_of(chunk_prompt(None, "a sparkle cat", tokenizer, embeddings=frozenset()), tokenizer)
    assert tokens == plain(build_tokenizer(), "a sparkle cat")
    tokens, = body_of(chunk_prompt(None, "a sparkle cat", tokenizer, embeddings={"sparkle"}), tokenizer)
    assert set(vectors(tokenizer)) <= set(tokens)



@pytest.mark.parametrize(("text", "named"), [
    ("EasyNegative", True), ("easynegative, lowres", True), ("(easynegative:1.2)", True), ("my_easynegative", True),
    ("easynegative2", True), ("easynegatives", False), ("noteasynegative", False), ("easy negative", False)])
def test_the_producer_records_an_embedding_where_a1111_would_find_it(text: str, named: bool) -> None:
    # the producer has no tokenizer: a name not inside a longer word (CLIP's pre-tokeniser splits
    # letters from digits and punctuation), case-insensitively
    assert bool(embedding_pattern("EasyNegative").search(text)) is named
