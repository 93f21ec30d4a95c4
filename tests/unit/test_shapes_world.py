"""The shapes world the toy models learn from: deterministic scenes, captions in words, exact masks,
a tokenizer with one token per word, and the readers the semantic tests measure with."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import numpy as np

from worker.testing import shapes, toy


def test_the_same_seed_gives_the_same_scenes_and_pixels() -> None:
    a, b = shapes.dataset(3, 20), shapes.dataset(3, 20)
    assert a == b
    assert shapes.dataset(4, 20) != a
    assert all(np.array_equal(np.asarray(shapes.render(x)[0]), np.asarray(shapes.render(y)[0]))
               for x, y in zip(a, b, strict=True))


def test_captions_say_the_scene_in_words() -> None:
    scene = shapes.Scene("star", "green", "small", 16, 16, 7, 0.0, "plain", "blue", "at the top left")
    assert shapes.caption(scene) == "a small green star at the top left on a blue background"
    assert shapes.caption(replace(scene, colour="orange", size="")) == \
        "an orange star at the top left on a blue background"
    sky = replace(scene, background="sky", background_colour="")
    assert shapes.caption(sky) == "a small green star at the top left in the sky"
    # teal has no word: its captions leave the colour out
    assert shapes.caption(replace(scene, colour="")) == "a small star at the top left on a blue background"


def test_dropped_words_vary_with_the_rng_but_the_shape_is_always_named() -> None:
    scene = shapes.dataset(1, 1)[0]
    rng = random.Random(0)
    seen = {shapes.caption(scene, rng) for _ in range(200)}
    assert len(seen) > 3
    assert all(scene.shape in text for text in seen)


def test_masks_are_exact() -> None:
    circle = shapes.Scene("circle", "red", "", 32, 32, 12, 0.0, "plain", "white", "")
    image, mask = shapes.render(circle)
    assert abs(mask.sum() - math.pi * 12**2) < 0.03 * math.pi * 12**2
    assert shapes.shape_colour(image) == "red"
    assert shapes.background_colour(image) == "white"
    outlined, rim = shapes.render(replace(circle, outlined=True))
    assert rim.sum() > mask.sum()
    assert shapes.share(outlined, "black") > 0.03
    assert shapes.share(image, "black") == 0


def test_the_readers_recover_each_scene_of_a_sample() -> None:
    for scene in shapes.dataset(11, 100):
        image, mask = shapes.render(scene)
        assert shapes.shape_colour(image) == (scene.colour or "teal")
        if scene.background == "plain":
            assert shapes.background_colour(image) == scene.background_colour
        found = shapes.shape_region(image)
        assert (found & mask).sum() / (found | mask).sum() > 0.3


def test_each_word_is_one_token() -> None:
    tokenizer = toy.build_tokenizer()
    for word in shapes.WORDS:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    ids = tokenizer("a small red circle, sky").input_ids
    assert ids[0] == 512
    assert ids[-1] == 513
    assert len(ids) == 2 + 6
    # the embedding's word is not one: its vectors come from the embedding, not the vocabulary
    assert len(tokenizer("verdigris", add_special_tokens=False).input_ids) > 1


def test_erode_shrinks_a_square() -> None:
    mask = np.zeros((10, 10), bool)
    mask[2:8, 2:8] = True
    assert shapes.erode(mask, 1).sum() == 16
    assert shapes.erode(mask, 3).sum() == 0
