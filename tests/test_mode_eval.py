"""train/mode_eval: its cases are fixed and well-formed; a reduced run clears the targets (slow)."""

import numpy as np
import pytest
from PIL import Image

from train import mode_eval
from train.mode_eval import (
    LATENT_CELL,
    SIZE,
    FLOORS,
    TARGETS,
    ModeEvalSettings,
    edit_cases,
    evaluate_modes,
    hires_cases,
    inpaint_cases,
    mask_box,
    reads_right,
    target_reach,
)
from train.shapes import COLOURS, POSITIONS, is_held_out_object, render


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_case_builders_are_deterministic():
    a, b = inpaint_cases(6), inpaint_cases(6)
    assert a == b
    assert all(np.array_equal(_pixels(x.image), _pixels(y.image)) for x, y in zip(a, b))
    assert all(np.array_equal(_pixels(x.mask), _pixels(y.mask)) for x, y in zip(a, b))
    e1, e2 = edit_cases(5), edit_cases(5)
    assert e1 == e2
    assert all(np.array_equal(_pixels(x.image), _pixels(y.image)) for x, y in zip(e1, e2))
    assert hires_cases(8) == hires_cases(8)
    # A prefix of a longer run is the shorter run: n only decides how many.
    assert inpaint_cases(3) == a[:3] and edit_cases(2) == e1[:2]


def test_inpaint_masks_cover_only_background_and_all_of_the_target_region():
    for case in inpaint_cases(24):
        mask = np.asarray(case.mask) > 127
        image = _pixels(case.image)
        background = np.array(COLOURS[case.before.background])
        # Every masked pixel is exactly the background: no pixel (not even an anti-aliased
        # edge) of the kept object is under the mask.
        assert (image[mask] == background).all(), case.prompt.prompt
        # The mask holds every place the target object can be drawn (its largest box at the most
        # outward jitter), so the model has room to draw it whole.
        x0, y0, x1, y1 = (v * SIZE for v in target_reach(case.target.position))
        ys, xs = np.nonzero(mask)
        assert xs.min() <= x0 and xs.max() + 1 >= x1 and ys.min() <= y0 and ys.max() + 1 >= y1
        # And the target region is empty in the input: nothing but background in its reach.
        rx0, ry0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
        rx1, ry1 = min(SIZE, int(np.ceil(x1))), min(SIZE, int(np.ceil(y1)))
        assert (image[ry0:ry1, rx0:rx1] == background).all()


def test_inpaint_cases_use_seen_combinations_and_their_prompt_names_both_objects():
    for case in inpaint_cases(24):
        assert not any(is_held_out_object(o) for o in case.after.objects)
        assert set(case.before.objects) < set(case.after.objects)
        assert case.target in case.after.objects and case.target not in case.before.objects
        assert case.prompt.scene == case.after
        # The oracle reads the world's own rendering of the target scene as right, and the
        # input (target missing) as wrong: the grade can pass and can fail.
        rng = np.random.default_rng(0)
        assert reads_right(case.prompt, render(case.after, SIZE, rng=rng))
        assert not reads_right(case.prompt, case.image)


def test_mask_boxes_are_whole_latents():
    for position in POSITIONS:
        box = mask_box(position)
        assert all(v % LATENT_CELL == 0 and 0 <= v <= SIZE for v in box)
        assert box[2] - box[0] == box[3] - box[1] == SIZE // 2


def test_edit_cases_are_red_circles_whose_target_is_the_blue_caption():
    cases = edit_cases(20)
    assert len({(c.scene.background, c.scene.objects[0].position, c.scene.objects[0].size)
                for c in cases}) == 20                      # all different scenes
    for c in cases:
        (red,), (blue,) = c.scene.objects, c.edited.objects
        assert (red.colour, red.shape, blue.colour, blue.shape) == ("red", "circle", "blue",
                                                                    "circle")
        assert red.position == blue.position and red.size == blue.size
        assert c.target_prompt.prompt == c.prompt.replace("red", "blue") != c.prompt
        assert not is_held_out_object(red) and not is_held_out_object(blue)
        assert not reads_right(c.target_prompt, c.image)    # the red input fails the target
        assert reads_right(c.target_prompt, render(c.edited, SIZE, rng=np.random.default_rng(1)))


def test_hires_prompts_are_seen_and_distinct():
    prompts = hires_cases(32)
    assert len({p.prompt for p in prompts}) == 32
    assert not any(is_held_out_object(o) for p in prompts for o in p.scene.objects)


@pytest.mark.slow
def test_mode_evaluation_holds_its_measured_rates():
    """The bundled model's graded modes, at the reported settings (hires: the headline only),
    must not fall below FLOORS: the rates docs/mode-eval.md reports, less a margin for
    arithmetic differences between machines flipping a few borderline cases. FLOORS are a
    regression check, not the issue's targets (TARGETS; the edit meets its target, inpainting
    and the hires fix miss theirs: README, "Image modes on the bundled model")."""
    settings = ModeEvalSettings(hires_strengths=(0.3,), hires_upscalers=("lanczos",))
    result = evaluate_modes(settings=settings, grids=None, log=lambda _: None)
    assert not result.skipped
    assert result.inpaint.rate >= FLOORS["inpaint"]
    assert result.inpaint_kept.rate >= FLOORS["inpaint_kept"]
    assert result.edit_by_amount[settings.edit_headline].rate >= TARGETS["edit"]
    assert result.hires[settings.hires_headline].rate >= FLOORS["hires"]
    assert mode_eval.format_results(result, settings).count("|") > 0
