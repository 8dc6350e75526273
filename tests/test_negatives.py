"""NegCLIP hard negatives (train/negatives.py): each breaks one binding of its caption, stays in
the caption grammar, and never names a held-out combination."""

import numpy as np
import pytest

from train import negatives
from train.shapes import caption, is_held_out, parse_caption, sample_scene


def scenes(n=400, seed=3):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = sample_scene(rng, split="train")
        out.append((scene, caption(scene, rng)))
    return out


def test_every_negative_is_a_wrong_caption_of_the_scene():
    made = 0
    for scene, text in scenes():
        for neg in negatives.negatives_for(text, 4):
            if neg is None:
                continue
            made += 1
            spec = parse_caption(neg)          # still in the grammar
            assert not spec.describes(scene), (text, neg)
            assert not negatives.names_held_out(neg), neg
            assert parse_caption(text).describes(scene)
    assert made > 1000


@pytest.mark.parametrize("kind, text, want", [
    ("swap_colours", "a red circle above a green square",
     "a green circle above a red square"),
    ("swap_shapes", "a small red circle on the left and a large blue square on the right",
     "a small red square on the left and a large blue circle on the right"),
    ("mirror", "a red circle to the left of a green square, white background",
     "a red circle to the right of a green square, white background"),
    ("mirror", "an orange square at the top", "an orange square at the bottom"),
])
def test_kinds(kind, text, want):
    assert negatives.negative(text, kind, np.random.default_rng(0)) == want


def test_replacements_fix_the_article_and_avoid_the_scene_colours():
    rng = np.random.default_rng(0)
    for _ in range(50):
        neg = negatives.negative("a red circle above a green square", "replace_colour", rng)
        colours = {o.colour for o in parse_caption(neg).objects}
        assert len(colours) == 2 and colours != {"red", "green"}
        assert "a orange" not in neg and "an red" not in neg
    assert negatives.negative("a red circle in the centre", "swap_colours", rng) is None
    assert negatives.negative("a red circle in the centre", "mirror", rng) is None


def test_not_a_shapes_caption_gets_no_negative():
    assert negatives.negatives_for("a photo of a dog", 3) == [None, None, None]


def test_negatives_are_deterministic_and_never_held_out():
    text = "a red circle to the left of a blue square, green background"
    assert negatives.negatives_for(text, 5, seed=1) == negatives.negatives_for(text, 5, seed=1)
    # Swapping these colours would name the held-out (blue, circle, left): it is never made.
    assert all("a blue circle to the left" not in n for n in negatives.negatives_for(text, 5))
    assert negatives.names_held_out("an orange circle on the left")
    assert not negatives.names_held_out("an orange square on the left")
    rng = np.random.default_rng(0)
    assert not any(is_held_out(sample_scene(rng, split="train")) for _ in range(50))
