"""A1111 prompt syntax and long prompts: the parser, the chunked weighted encoder, one render."""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from sdfarm.jobs import RenderJob
from sdfarm.models import Registry
from sdfarm.prompt_syntax import parse_prompt_attention
from worker.pipeline import LoadedModel, load_model
from worker.prompts import chunk_prompt, encode_prompts
from worker.render import render

# --- the parser -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    # A1111's own doctest examples (modules/prompt_parser.py), verbatim
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
        (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
])
def test_a1111_doctest_examples(text: str, expected: list[tuple[str, float]]) -> None:
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("", [("", 1.0)]),
    ("\\(a\\) \\[b\\] c\\\\d", [("(a) [b] c\\d", 1.0)]),
    ("(\\(a\\))", [("(a)", 1.1)]),
    ("a \\(b:1.5\\)", [("a (b:1.5)", 1.0)]),       # escaped: no weight
    ("a\\b", [("ab", 1.0)]),                       # a lone backslash is dropped, as in A1111
    ("((a))", [("a", 1.1 * 1.1)]),
    ("[[a]]", [("a", (1 / 1.1) * (1 / 1.1))]),
    ("((a:1.5))", [("a", 1.5 * 1.1)]),
    ("(a (b:2) c)", [("a ", 1.1), ("b", 2 * 1.1), (" c", 1.1)]),
    ("(a:0.5) (b : 1.5 )", [("a", 0.5), (" ", 1.0), ("b ", 1.5)]),  # spaces around the weight
    ("a (b:1.2", [("a ", 1.0), ("b:1.2", 1.1)]),  # unclosed: the weight is text, the bracket 1.1
    ("[a", [("a", 1 / 1.1)]),
    ("a) b] c:1.2)", [("a) b] c:1.2)", 1.0)]),    # stray closers are text
    ("(a]", [("a]", 1.1)]),                        # a ] cannot close a (
    ("a (b) c (d)", [("a ", 1.0), ("b", 1.1), (" c ", 1.0), ("d", 1.1)]),
])
def test_weights_escapes_nesting_and_unbalanced_brackets(text: str, expected: list[tuple[str, float]]) -> None:
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("a fox BREAK in snow", [("a fox", 1.0), ("BREAK", -1.0), ("in snow", 1.0)]),
    ("BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("a (fox) BREAK snow", [("a ", 1.0), ("fox", 1.1), ("", 1.0), ("BREAK", -1.0), ("snow", 1.0)]),
    ("a break b, BREAKFAST, aBREAK", [("a break b, BREAKFAST, aBREAK", 1.0)]),  # only the uppercase word
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),  # A1111: inside brackets it is weighted text
])
def test_break(text: str, expected: list[tuple[str, float]]) -> None:
    assert parse_prompt_attention(text) == expected


def test_malformed_weight_is_an_error_as_in_a1111() -> None:
    with pytest.raises(ValueError, match=r"1\.2\.3"):
        parse_prompt_attention("(a:1.2.3)")


# --- the encoder ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe() -> Any:
    from worker.testing import build_tiny_sd15

    return build_tiny_sd15()


def old_encode(pipe: Any, prompts: list[str], clip_skip: int) -> torch.Tensor:
    """The encoder this module replaced (77 tokens, truncated, no weights), kept as the reference."""
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(text_encoder.device)
    if clip_skip <= 1:
        hidden: torch.Tensor = text_encoder(ids)[0]
    else:
        out = text_encoder(ids, output_hidden_states=True)
        hidden = out.hidden_states[-clip_skip]
        final_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
        hidden = final_norm(hidden)
    return hidden.to(dtype=text_encoder.dtype)


def encode1(pipe: Any, prompt: str, clip_skip: int = 1) -> torch.Tensor:
    with torch.inference_mode():
        return encode_prompts(pipe, [prompt], [""], clip_skip)[0][0]


def n_tokens(pipe: Any, text: str) -> int:
    return len(pipe.tokenizer(text, add_special_tokens=False).input_ids)


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_unweighted_short_prompts_are_bit_for_bit_the_old_embeddings(pipe: Any, clip_skip: int) -> None:
    prompts, negatives = ["a red fox in snow", "café, 東京"], ["blurry, ugly", ""]
    with torch.inference_mode():
        cond, uncond = encode_prompts(pipe, prompts, negatives, clip_skip)[:2]
        assert torch.equal(cond, old_encode(pipe, prompts, clip_skip))
        assert torch.equal(uncond, old_encode(pipe, negatives, clip_skip))


def test_bit_for_bit_and_dtype_in_bfloat16_on_a_pipe_without_textual_inversion(pipe: Any) -> None:
    bf16 = SimpleNamespace(tokenizer=pipe.tokenizer, text_encoder=copy.deepcopy(pipe.text_encoder).to(torch.bfloat16))
    with torch.inference_mode():
        cond, uncond = encode_prompts(bf16, ["a red fox"], ["a (blurry:1.4) photo"], 2)[:2]
        assert cond.dtype == uncond.dtype == torch.bfloat16
        assert torch.equal(cond, old_encode(bf16, ["a red fox"], 2))


def test_explicit_weight_one_is_the_plain_word(pipe: Any) -> None:
    assert torch.equal(encode1(pipe, "a (fox:1.0) in snow"), encode1(pipe, "a fox in snow"))


def test_a_weight_scales_only_its_own_tokens_up_to_the_chunk_mean_rescale(pipe: Any) -> None:
    plain, weighted = encode1(pipe, "a fox in snow"), encode1(pipe, "a (fox:1.3) in snow")
    # Both tokenize to [BOS, a</w>, f, o, x</w>, i, n</w>, ...]: fox is at positions 2..4. The text
    # encoder runs before the weights, so A1111's emphasis is exactly
    #     weighted = c * plain * m,   m = 1.3 at fox's positions and 1 elsewhere,
    # with ONE scalar c = mean(plain) / mean(plain * m) restoring the chunk's mean. So: every other
    # position is the plain vector times c (changed only by the common factor), fox's are times 1.3 c,
    # and c != 1 shows the rescale happened.
    fox = torch.zeros(77, dtype=torch.bool)
    fox[2:5] = True
    m = torch.where(fox, 1.3, 1.0)[:, None]
    c = plain.mean() / (plain * m).mean()
    assert abs(float(c) - 1) > 1e-3
    torch.testing.assert_close(weighted[~fox], c * plain[~fox], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(weighted[fox], 1.3 * c * plain[fox], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(weighted[fox], c * plain[fox], rtol=1e-3)


def test_a_prompt_over_75_tokens_gets_a_second_chunk_that_carries_its_tail(pipe: Any) -> None:
    head = "a_red_fox_in_deep_snow_under_a_pale_winter_sky_" * 2   # one token per character, no comma
    assert n_tokens(pipe, head) > 75
    dawn, dusk = encode1(pipe, head + " at dawn"), encode1(pipe, head + " at dusk")
    assert dawn.shape == dusk.shape == (154, 32)
    assert torch.equal(dawn[:77], dusk[:77])
    assert not torch.allclose(dawn[77:], dusk[77:])


def test_an_overflowing_chunk_is_cut_after_a_comma_at_most_20_tokens_back(pipe: Any) -> None:
    eos, comma = pipe.tokenizer.eos_token_id, pipe.tokenizer.get_vocab()[",</w>"]
    near = chunk_prompt(pipe, "b" * 60 + ", " + "c" * 20)  # comma at 61 of 75: 15 back
    assert [len(c.tokens) for c in near] == [77, 77]
    assert near[0].tokens[61] == comma
    assert near[0].tokens[62:] == [eos] * 15
    assert near[1].tokens[1:21] == pipe.tokenizer("c" * 20, add_special_tokens=False).input_ids
    far = chunk_prompt(pipe, "b" * 50 + ", " + "c" * 30)  # comma 25 back: a hard cut at 75 tokens
    assert eos not in far[0].tokens[1:76]
    assert eos not in far[1].tokens[1:7]
    assert far[1].tokens[7:] == [eos] * 70


def test_break_starts_a_new_chunk(pipe: Any) -> None:
    chunks = chunk_prompt(pipe, "a fox BREAK in snow")
    assert len(chunks) == 2
    assert all(len(c.tokens) == len(c.weights) == 77 for c in chunks)
    broken = encode1(pipe, "a fox BREAK in snow")
    # the same as encoding the two halves as prompts of their own
    torch.testing.assert_close(broken, torch.cat([encode1(pipe, "a fox"), encode1(pipe, "in snow")]))


def test_prompts_and_negatives_of_different_lengths_stack_to_one_shape(pipe: Any) -> None:
    long = "x" * 160  # 3 chunks
    with torch.inference_mode():
        cond, uncond = encode_prompts(pipe, ["short", long], ["", "blurry BREAK ugly"], 1)[:2]
        empty = encode_prompts(pipe, [""], [""], 1)[0][0]
    assert cond.shape == uncond.shape == (2, 3 * 77, 32)
    # the padding is the encoded empty prompt, as A1111 pads cond and uncond
    for padding in (cond[0, 77:154], cond[0, 154:], uncond[0, 77:154], uncond[1, 154:]):
        torch.testing.assert_close(padding, empty)
    torch.testing.assert_close(cond[0, :77], encode1(pipe, "short"))


def test_a_weighted_prompt_does_not_depend_on_its_batchmates(pipe: Any) -> None:
    # A1111 rescales to the mean of its whole batch; sdfarm per prompt, so a job's image does not
    # depend on the chunk it was rendered in
    with torch.inference_mode():
        cond, _ = encode_prompts(pipe, ["a (fox:1.3) in snow", "[[[dark]]] forest " * 9], ["", ""], 1)[:2]
    torch.testing.assert_close(cond[0, :77], encode1(pipe, "a (fox:1.3) in snow"))


def test_multi_vector_textual_inversion_tokens_expand_and_take_the_weight() -> None:
    from worker.testing import build_tiny_sd15

    ti_pipe: Any = build_tiny_sd15()
    ti_pipe.load_textual_inversion({"<shiny>": torch.randn(3, 32)})
    ids = [ti_pipe.tokenizer.convert_tokens_to_ids(t) for t in ("<shiny>", "<shiny>_1", "<shiny>_2")]
    chunk = chunk_prompt(ti_pipe, "a (<shiny>:1.2) fox")[0]
    start = chunk.tokens.index(ids[0])
    assert chunk.tokens[start:start + 3] == ids
    assert chunk.weights[start:start + 3] == [1.2] * 3


# --- one render -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(registry: Registry) -> LoadedModel:
    return load_model(registry, "tiny-sd15", "cpu")


def test_words_after_the_77th_token_change_the_image(loaded: LoadedModel) -> None:
    head = ("red_fox_in_snow," * 5)[:80]
    assert n_tokens(loaded.pipe, head) > 75  # the old encoder truncated everything after the head
    base = {"model": "tiny-sd15", "model_hash": loaded.identity, "seed": 11, "width": 64, "height": 64, "steps": 6}
    jobs = [RenderJob.model_validate({**base, "prompt": head + tail}) for tail in (" at dawn", " at dusk")]
    dawn, dusk = (np.asarray(image.convert("RGB")).astype(np.int16) for image in render(loaded, jobs))
    assert np.abs(dawn - dusk).max() > 0


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_embeddings_are_finite_even_when_a_chunk_mean_is_zero(pipe: Any, clip_skip: int) -> None:
    """The tiny encoder's final layer norm gives hidden states of mean ~0: A1111's mean restoring
    would divide 0 by 0 there. Every prompt must still give finite embeddings (no black images)."""
    prompts = ["a castle in the clouds", "an origami owl, studio light", "a (red:1.3) fox BREAK [snow]"]
    pos, neg = encode_prompts(pipe, prompts, ["blurry"] * 3, clip_skip)[:2]
    assert torch.isfinite(pos).all()
    assert torch.isfinite(neg).all()
