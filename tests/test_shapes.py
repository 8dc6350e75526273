"""The shapes-world dataset (train/shapes.py) and its pixel oracle (train/oracle.py).

The oracle is checked both ways: it must pass every rendered ground-truth scene, clean and under
the kinds of damage a small generative model does (noise, blur, colour drift), and it must fail
images that break the prompt (wrong colour, shape, position, binding; an empty image).
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image, ImageFilter

from train import oracle, shapes
from train.shapes import EvalPrompt, Scene, ShapeObject

PROMPTS = shapes.heldout_eval_prompts()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _training_scenes(n: int, seed: int = 0) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [shapes.sample_scene(rng, split="train") for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Dataset


def test_same_seed_same_bytes_different_seed_different_data():
    first = list(shapes.generate(6, seed=5))
    again = list(shapes.generate(6, seed=5))
    other = list(shapes.generate(6, seed=6))
    assert [t for _, t, _ in first] == [t for _, t, _ in again]
    assert [_png(i) for i, _, _ in first] == [_png(i) for i, _, _ in again]
    assert [s for _, _, s in first] == [s for _, _, s in again]
    assert [t for _, t, _ in first] != [t for _, t, _ in other]
    assert [i.tobytes() for i, _, _ in first] != [i.tobytes() for i, _, _ in other]
    # Random access agrees with sequential generation.
    image, text, scene = shapes.example(5, 3)
    assert (image.tobytes(), text, scene) == (first[3][0].tobytes(), first[3][1], first[3][2])


def test_render_size_mode_and_jitter():
    scene = Scene((ShapeObject("circle", "red", "large", "centre"),), "white")
    a = shapes.render(scene, 48, rng=np.random.default_rng(0))
    b = shapes.render(scene, 48, rng=np.random.default_rng(1))
    assert a.size == (48, 48) and a.mode == "RGB"
    assert a.tobytes() != b.tobytes()  # jitter moves or resizes the object
    pixels = np.asarray(a).reshape(-1, 3)
    # Anti-aliased: some edge pixels are neither the object's nor the background's colour.
    pure = {shapes.COLOURS["red"], shapes.COLOURS["white"]}
    assert sum(tuple(p) not in pure for p in pixels) > 10


def test_scene_rejects_ambiguous_layouts():
    red_left = ShapeObject("circle", "red", "small", "left")
    with pytest.raises(ValueError, match="background colour"):
        Scene((ShapeObject("circle", "white", "small", "left"),), "white")
    with pytest.raises(ValueError, match="left/right or top/bottom"):
        Scene((red_left, ShapeObject("square", "blue", "small", "top")), "white")
    with pytest.raises(ValueError, match="differ in colour"):
        Scene((red_left, ShapeObject("square", "red", "small", "right")), "white")
    with pytest.raises(ValueError, match="unknown colour"):
        ShapeObject("circle", "teal", "small", "left")


def _uses_held_out_combination(scene: Scene) -> bool:
    """The held-out rule restated from its constants, independently of `shapes.is_held_out`."""
    return any(
        (o.colour, o.shape) in shapes.HELDOUT_PAIRS
        or (o.colour, o.shape, o.position) in shapes.HELDOUT_TRIPLES
        for o in scene.objects
    )


def test_training_split_excludes_held_out_and_mixes_object_counts():
    scenes = _training_scenes(3000)
    assert not any(_uses_held_out_combination(s) for s in scenes)
    assert not any(shapes.is_held_out(s) for s in scenes)
    two = sum(len(s.objects) == 2 for s in scenes) / len(scenes)
    assert 0.45 < two < 0.55
    rng = np.random.default_rng(1)
    held_out = [shapes.sample_scene(rng, split="heldout") for _ in range(300)]
    assert all(_uses_held_out_combination(s) and shapes.is_held_out(s) for s in held_out)


def test_held_out_combinations_have_trained_attributes():
    seen: set[tuple] = set()
    for scene in _training_scenes(3000):
        for o in scene.objects:
            seen |= {
                ("colour", o.colour),
                ("shape", o.shape),
                ("colour+shape", o.colour, o.shape),
                ("colour+position", o.colour, o.position),
                ("shape+position", o.shape, o.position),
            }
    for colour, shape in shapes.HELDOUT_PAIRS:
        for position in shapes.POSITIONS:
            assert ("colour+position", colour, position) in seen
            assert ("shape+position", shape, position) in seen
    for colour, shape, position in shapes.HELDOUT_TRIPLES:
        assert ("colour+shape", colour, shape) in seen
        assert ("colour+position", colour, position) in seen
        assert ("shape+position", shape, position) in seen
    for colour in shapes.OBJECT_COLOURS:
        for shape in shapes.SHAPES:
            trained = ("colour+shape", colour, shape) in seen
            assert trained == ((colour, shape) not in shapes.HELDOUT_PAIRS)


def test_eval_prompts_are_fixed_held_out_and_match_their_scenes():
    assert shapes.heldout_eval_prompts() == PROMPTS  # deterministic
    counts = [len(p.scene.objects) for p in PROMPTS]
    assert (counts.count(1), counts.count(2)) == (40, 48)
    assert len({p.prompt for p in PROMPTS}) == len(PROMPTS)
    for p in PROMPTS:
        assert _uses_held_out_combination(p.scene) and shapes.is_held_out(p.scene), p.prompt
        spec = shapes.parse_caption(p.prompt)
        assert spec.describes(p.scene), p.prompt
        assert p.background_specified == (spec.background is not None)
        assert p.size_specified == all(o.size is not None for o in spec.objects)
        if len(p.scene.objects) == 2:
            a, b = p.scene.objects
            assert a.shape != b.shape and a.colour != b.colour  # binding is testable
    # Every held-out combination is asked for, alone and (unless in the centre) beside a partner.
    combos = [(c, s, p) for c, s in shapes.HELDOUT_PAIRS for p in shapes.POSITIONS]
    for combo in combos + sorted(shapes.HELDOUT_TRIPLES):
        asked = {
            len(p.scene.objects)
            for p in PROMPTS
            if combo in {(o.colour, o.shape, o.position) for o in p.scene.objects}
        }
        assert asked == ({1} if combo[2] == "centre" else {1, 2}), combo
    assert any(p.background_specified for p in PROMPTS)
    assert any(not p.background_specified for p in PROMPTS)


def test_captions_name_every_object_and_parse_back():
    rng = np.random.default_rng(3)
    forms = set()
    for scene in _training_scenes(1500, seed=2):
        text = shapes.caption(scene, rng)
        for o in scene.objects:
            assert f"{o.colour} {o.shape}" in text, text
        spec = shapes.parse_caption(text)
        assert len(spec.objects) == len(scene.objects)
        assert spec.describes(scene), text
        forms.add((len(scene.objects), spec.background is not None, " above " in text))
    assert len(forms) >= 5  # templates vary: with/without background, absolute/relative
    left = ShapeObject("circle", "red", "small", "left")
    right = ShapeObject("square", "blue", "large", "right")
    scene = Scene((left, right), "white")
    swapped_colours = (
        dataclasses.replace(left, colour="blue"),
        dataclasses.replace(right, colour="red"),
    )
    swapped = Scene(swapped_colours, "white")
    for text in (
        "a red circle to the left of a blue square",
        "a blue square to the right of a red circle",
        "a blue square on the right and a small red circle on the left, white background",
        "white background with a red circle on the left and a large blue square on the right",
    ):
        spec = shapes.parse_caption(text)
        assert spec.describes(scene) and not spec.describes(swapped), text
    for bad in (
        "a red circle",
        "a red blob on the left",
        "a red circle on the left and a blue square at the top",  # not an opposite pair
    ):
        with pytest.raises(ValueError):
            shapes.parse_caption(bad)


def test_write_imagefolder_metadata(tmp_path):
    metadata = shapes.write_imagefolder(tmp_path / "data", 5, 11, "train", 32)
    assert metadata == tmp_path / "data" / "metadata.jsonl"
    rows = [json.loads(line) for line in metadata.read_text().splitlines()]
    expected = list(shapes.generate(5, 11, split="train", size=32))
    assert len(rows) == 5
    for row, (image, text, _) in zip(rows, expected):
        assert set(row) == {"file_name", "text"}
        assert row["text"] == text
        with Image.open(metadata.parent / row["file_name"]) as stored:
            assert stored.size == (32, 32)
            assert stored.convert("RGB").tobytes() == image.tobytes()
    assert sorted(p.name for p in metadata.parent.iterdir()) == sorted(
        [r["file_name"] for r in rows] + ["metadata.jsonl"]
    )  # no temporary files left behind
    before = metadata.read_bytes()
    shapes.write_imagefolder(tmp_path / "data", 5, 11, "train", 32)
    assert metadata.read_bytes() == before


# ---------------------------------------------------------------------------------------------
# Oracle: ground truth passes


def _noise(image: Image.Image, rng: np.random.Generator) -> np.ndarray:
    pixels = np.asarray(image, dtype=np.float64) / 255
    return np.clip(pixels + rng.normal(0.0, 0.05, pixels.shape), 0, 1)


def _blur(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(1))


def _colour_shift(image: Image.Image, rng: np.random.Generator) -> np.ndarray:
    pixels = np.asarray(image, dtype=np.float64) / 255
    grey = pixels.mean(axis=-1, keepdims=True)
    pixels = grey + 0.8 * (pixels - grey)  # 20 % less saturated
    return np.clip(0.9 * pixels + np.array([0.04, -0.03, 0.03]), 0, 1)  # darker, tinted


PERTURBATIONS: dict[str, Callable] = {
    "clean": lambda image, rng: image,
    "noise": _noise,
    "blur": _blur,
    "colour_shift": _colour_shift,
}


@pytest.mark.parametrize("perturbation", list(PERTURBATIONS))
def test_oracle_passes_rendered_ground_truth(perturbation):
    perturb = PERTURBATIONS[perturbation]
    images = {}
    for k, prompt in enumerate(PROMPTS):
        rngs = [np.random.default_rng([k, jitter]) for jitter in range(3)]
        images[prompt] = [perturb(shapes.render(prompt.scene, rng=rng), rng) for rng in rngs]
    assert set(oracle.grade(PROMPTS[0], images[PROMPTS[0]][0])) == set(oracle.GRADE_KEYS)
    scores = oracle.evaluate(images)
    assert scores.pop("n_images") == 3 * len(PROMPTS)
    for key in ("colour_shape", "binding", "position", "size", "background", "count"):
        assert key in scores
    assert scores == {key: 1.0 for key in scores}, scores


@pytest.mark.parametrize("size", [32, 128])
def test_oracle_works_at_other_image_sizes(size):
    for k, prompt in enumerate(PROMPTS[::4]):
        image = shapes.render(prompt.scene, size, rng=np.random.default_rng(k))
        grades = oracle.grade(prompt, image)
        assert all(v for v in grades.values() if v is not None), (prompt.prompt, grades)


def test_read_scene_reports_geometry():
    top = ShapeObject("triangle", "purple", "large", "top")
    bottom = ShapeObject("circle", "yellow", "small", "bottom")
    scene = Scene((top, bottom), "gray")
    detected = oracle.read_scene(shapes.render(scene, 64, rng=np.random.default_rng(0)))
    assert detected.background == "gray"
    big, small = detected.objects  # largest first
    for found, want in ((big, top), (small, bottom)):
        assert (found.colour, found.shape, found.size, found.position) == (
            want.colour,
            want.shape,
            want.size,
            want.position,
        )
    # A triangle's area centroid lies below its box centre, a disc's on it.
    assert big.centroid[1] > big.box_centre[1] + 0.03
    assert abs(small.centroid[1] - small.box_centre[1]) < 0.01
    assert abs(big.extent - shapes.SIZE_EXTENTS["large"]) < 0.03


def test_label_components_is_four_connected():
    mask = np.zeros((7, 9), dtype=bool)
    mask[1:3, 1:4] = True  # a block
    mask[3, 4] = True  # touches the block only at a corner: its own component
    mask[5, 0:9] = True  # a bar across
    mask[4, 8] = True  # attached to the bar
    labels, count = oracle.label_components(mask)
    assert count == 3
    assert len(np.unique(labels[1:3, 1:4])) == 1
    assert labels[3, 4] not in (labels[1, 1], labels[5, 0]) and labels[3, 4] > 0
    assert labels[4, 8] == labels[5, 0]
    assert (labels[~mask] == 0).all()


# ---------------------------------------------------------------------------------------------
# Oracle: wrong images fail


def _grade_rendered(prompt: EvalPrompt, scene: Scene, seed: int) -> dict[str, bool | None]:
    return oracle.grade(prompt, shapes.render(scene, rng=np.random.default_rng(seed)))


def _replace_object(scene: Scene, index: int, **changes) -> Scene:
    objects = list(scene.objects)
    objects[index] = dataclasses.replace(objects[index], **changes)
    return Scene(tuple(objects), scene.background)


def test_oracle_fails_wrong_colour_shape_and_position():
    for k, prompt in enumerate(PROMPTS):
        scene = prompt.scene
        target = scene.objects[0]
        two = len(scene.objects) == 2
        taken = {o.colour for o in scene.objects} | {scene.background}
        colour = next(c for c in shapes.OBJECT_COLOURS if c not in taken)
        shape = next(s for s in shapes.SHAPES if s not in {o.shape for o in scene.objects})
        grades = _grade_rendered(prompt, _replace_object(scene, 0, colour=colour), k)
        assert grades["colour"] is False, prompt.prompt
        assert grades["binding" if two else "colour_shape"] is False, prompt.prompt
        grades = _grade_rendered(prompt, _replace_object(scene, 0, shape=shape), k)
        assert grades["shape"] is False, prompt.prompt
        assert grades["binding" if two else "colour_shape"] is False, prompt.prompt
        if two:  # mirror the layout: both objects change sides
            mirrored = {a: b for pair in shapes.TWO_OBJECT_LAYOUTS for a, b in (pair, pair[::-1])}
            moved = Scene(
                tuple(dataclasses.replace(o, position=mirrored[o.position]) for o in scene.objects),
                scene.background,
            )
        else:
            elsewhere = "centre" if target.position != "centre" else "left"
            moved = _replace_object(scene, 0, position=elsewhere)
        grades = _grade_rendered(prompt, moved, k)
        assert grades["position"] is False, prompt.prompt
        assert grades["colour"] and grades["shape"], prompt.prompt  # only the position is wrong


def test_oracle_fails_swapped_binding():
    for k, prompt in enumerate(p for p in PROMPTS if len(p.scene.objects) == 2):
        a, b = prompt.scene.objects
        swapped = Scene(
            (dataclasses.replace(a, colour=b.colour), dataclasses.replace(b, colour=a.colour)),
            prompt.scene.background,
        )
        grades = _grade_rendered(prompt, swapped, k)
        # Both colours and both shapes are present, bound the wrong way round.
        assert grades["colour"] and grades["shape"], prompt.prompt
        assert grades["binding"] is False, prompt.prompt


def test_oracle_fails_blank_images():
    for prompt in PROMPTS:
        other = next(c for c in shapes.BACKGROUND_COLOURS if c != prompt.scene.background)
        blank = Image.new("RGB", (64, 64), shapes.COLOURS[other])
        grades = oracle.grade(prompt, blank)
        assert not any(grades.values()), (prompt.prompt, grades)
        # On the asked-for background only the background is right.
        same = Image.new("RGB", (64, 64), shapes.COLOURS[prompt.scene.background])
        grades = oracle.grade(prompt, same)
        assert grades.pop("background") is (True if prompt.background_specified else None)
        assert not any(grades.values()), (prompt.prompt, grades)


def test_oracle_is_below_chance_on_random_smooth_images():
    rng = np.random.default_rng(0)

    def smooth_noise() -> Image.Image:
        coarse = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
        return Image.fromarray(coarse).resize((64, 64), Image.Resampling.BICUBIC)

    scores = oracle.evaluate({prompt: [smooth_noise() for _ in range(3)] for prompt in PROMPTS})
    # A blind guess names the right colour and shape 1 time in 21 (7 colours x 3 shapes); blobs of
    # colour noise mostly read as no shape at all, so the oracle credits them less often still.
    assert scores.get("colour_shape", 0.0) < 1 / 21
    assert scores.get("binding", 0.0) < 1 / 21


def test_evaluate_counts_only_applicable_prompts():
    one = next(p for p in PROMPTS if len(p.scene.objects) == 1)
    two = next(p for p in PROMPTS if len(p.scene.objects) == 2)
    blank = Image.new("RGB", (64, 64), (128, 128, 128))
    good_one = shapes.render(one.scene, rng=np.random.default_rng(0))
    good_two = shapes.render(two.scene, rng=np.random.default_rng(0))
    scores = oracle.evaluate({one: [good_one, blank], two: [good_two]})
    assert scores["n_images"] == 3
    assert scores["colour_shape"] == 0.5  # one-object prompts only
    assert scores["binding"] == 1.0  # two-object prompts only
    assert scores["position"] == pytest.approx(2 / 3)
    assert scores["one_object.position"] == 0.5 and scores["two_object.position"] == 1.0
