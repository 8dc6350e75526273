"""Grade the image modes on a shapes-world model with the pixel oracle, and draw their grids.

``python -m train.mode_eval --out docs/mode-eval.md --grids docs/`` (the bundled model).

Three modes have a check the oracle (train/oracle.py) can read, each on fixed cases built from the
world's own renderer and caption grammar (train/shapes.py), never from the training data:

1. Inpainting: a rendered one-object scene, an empty region on the opposite side masked, and the
   caption of the scene with a second object there. It passes when the oracle finds both objects,
   each with its colour and shape, in its region: the new one drawn, the old one kept.
2. Text-diff edit (unCLIP Sec. 3.3 on DDIM-inverted noise): a rendered "red circle" scene edited
   toward the same caption with "blue". It passes at an amount when the oracle reads a blue
   circle in the same region.
3. Hires fix 64 -> 128: among txt2img images the oracle reads right, the share still right after
   the second, image-to-image pass at twice the size.

Only seen (colour, shape, position) combinations are used: the bundled model does not compose
held-out ones (README, "held-out category"), and these checks are about the modes, not that.
Image-to-image, outpainting and interpolation get grids only.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .oracle import grade, read_scene
from .shapes import (
    BACKGROUND_COLOURS,
    OBJECT_COLOURS,
    POSITION_CENTRES,
    POSITION_JITTER,
    POSITION_PHRASES,
    POSITIONS,
    SHAPES,
    SIZE_EXTENTS,
    SIZE_JITTER,
    SIZES,
    TWO_OBJECT_LAYOUTS,
    EvalPrompt,
    Position,
    Scene,
    ShapeObject,
    caption,
    is_held_out_object,
    parse_caption,
    render,
)

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "ldm_engine" / "models" / "default"
COMMAND = "make eval-modes  (.venv/bin/python -m train.mode_eval --out docs/mode-eval.md --grids docs/)"

# Seeds of the case builders: distinct from every training seed (train/configs use small ones),
# and changing one changes the benchmark.
_INPAINT_SEED = 7_100_001
_EDIT_SEED = 7_100_002
_HIRES_SEED = 7_100_003
_GRID_SEED = 7_100_004

# The bars.
TARGETS = {"inpaint": 0.80, "edit": 0.70, "hires": 0.90}
# What the bundled model measured (docs/mode-eval.md) less about 15 points, so that arithmetic
# differences between machines flipping a few borderline cases do not fail the slow test: a
# regression check (tests/test_mode_eval.py), not the targets above, two of which are missed.
FLOORS = {"inpaint": 0.35, "inpaint_kept": 0.70, "hires": 0.60}

# The world's image side and the bundled VAE's factor: a latent is a 4x4 pixel block at 64 px.
SIZE = 64
LATENT_CELL = 4
# Half the side of an inpainting mask, as a fraction of the image. The largest object box at the
# most outward jitter reaches SIZE_EXTENTS["large"] * (1 + SIZE_JITTER) / 2 + POSITION_JITTER =
# 0.208 from its region centre; 0.25 leaves a margin for the model to draw inside, and still
# stops short of the object on the opposite side (whose box ends 0.032 before the half-way line).
MASK_HALF_SIDE = 0.25


@dataclass(frozen=True)
class ModeEvalSettings:
    """How many cases per mode and what they run with; the defaults are the reported figures."""

    inpaint_cases: int = 24
    edit_cases: int = 20
    hires_cases: int = 32
    # What the README's held-out evaluation runs with (train/evaluate.py): DDIM, 25 steps.
    steps: int = 25
    sampler: str = "ddim"
    # Inpainting and txt2img (hires) use guidance 5, as the README eval; the edit keeps
    # EditParams' own scale (1: guidance amplifies DDIM-inversion error, Mokady et al. 2023).
    guidance: float = 5.0
    edit_amounts: tuple[float, ...] = (0.5, 0.75, 1.0)
    # The amount the edit's headline figure is read at (the full text difference).
    edit_headline: float = 1.0
    # Second-pass strengths and upscalers swept; the headline is lanczos at 0.3, chosen after
    # a first sweep (latent upscales need more strength to hide their blur, and every strength
    # lets the 64 px-trained UNet redraw objects at 128 px: see docs/mode-eval.md).
    # 0.01 runs no second-pass step (int(25 x 0.01) = 0): what the VAE's round trip at 128 px
    # alone keeps, the ceiling of every other row.
    hires_strengths: tuple[float, ...] = (0.01, 0.2, 0.3, 0.5)
    hires_upscalers: tuple[str, ...] = ("latent", "lanczos")
    hires_headline: tuple[str, float] = ("lanczos", 0.3)
    # Requests per Pipeline.run call: the UNet batch (doubled by guidance).
    batch: int = 16
    grid_rows: int = 4


# ---------------------------------------------------------------------------------------------
# Cases


@dataclass(frozen=True)
class InpaintCase:
    before: Scene              # the one-object scene that is rendered
    after: Scene               # the same plus the target object
    target: ShapeObject
    image: Image.Image = field(repr=False, compare=False)
    mask: Image.Image = field(repr=False, compare=False)   # white = repaint
    prompt: EvalPrompt         # the caption of `after` (both objects)
    # What is inpainted, the "a <colour> <shape>": the target object alone, with its
    # position and the background ("a blue square on the right, black background").
    new_prompt: EvalPrompt
    kept_prompt: EvalPrompt    # the kept object alone, to grade that it survived


@dataclass(frozen=True)
class EditCase:
    scene: Scene               # a red circle
    edited: Scene              # the same circle in blue
    image: Image.Image = field(repr=False, compare=False)
    prompt: str
    target_prompt: EvalPrompt


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _eval_prompt(scene: Scene, text: str) -> EvalPrompt:
    spec = parse_caption(text)
    return EvalPrompt(prompt=text, scene=scene, background_specified=spec.background is not None,
                      size_specified=spec.objects[0].size is not None)


def _seen_object(rng: np.random.Generator, position: Position,
                 avoid_colours: set[str]) -> ShapeObject:
    """A random object at `position` whose colour/shape pair and triple were both trained."""
    while True:
        obj = ShapeObject(_pick(rng, SHAPES), _pick(rng, OBJECT_COLOURS), _pick(rng, SIZES),
                          position)
        if obj.colour not in avoid_colours and not is_held_out_object(obj):
            return obj


def mask_box(position: Position, size: int = SIZE, cell: int = LATENT_CELL
             ) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) in pixels of the mask over `position`'s region: the region centre
    +/- MASK_HALF_SIDE, snapped to whole latents, so the mask the UNet sees (one value per
    latent, read at its top-left pixel) is this box exactly."""
    cx, cy = POSITION_CENTRES[position]
    cells = size // cell

    def snap(v: float) -> int:
        return int(np.clip(round(v * cells), 0, cells)) * cell

    return (snap(cx - MASK_HALF_SIDE), snap(cy - MASK_HALF_SIDE),
            snap(cx + MASK_HALF_SIDE), snap(cy + MASK_HALF_SIDE))


def target_reach(position: Position) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1), normalised: where any object at `position` can be drawn (its largest
    box at the most outward jitter, shapes.render)."""
    half = SIZE_EXTENTS["large"] * (1 + SIZE_JITTER) / 2 + POSITION_JITTER
    cx, cy = POSITION_CENTRES[position]
    return cx - half, cy - half, cx + half, cy + half


def inpaint_cases(n: int, size: int = SIZE) -> list[InpaintCase]:
    """n fixed cases: one object rendered, the opposite region (TWO_OBJECT_LAYOUTS) empty and
    masked, the two-object caption as the prompt. Both objects are seen combinations."""
    cases = []
    for k in range(n):
        rng = np.random.default_rng([_INPAINT_SEED, k])
        layout = TWO_OBJECT_LAYOUTS[k % len(TWO_OBJECT_LAYOUTS)]
        kept_at, new_at = layout if rng.random() < 0.5 else layout[::-1]
        kept = _seen_object(rng, kept_at, set())
        target = _seen_object(rng, new_at, {kept.colour})
        background = _pick(rng, [c for c in BACKGROUND_COLOURS
                                 if c not in (kept.colour, target.colour)])
        before = Scene((kept,), background)
        objects = tuple(sorted((kept, target), key=lambda o: POSITIONS.index(o.position)))
        after = Scene(objects, background)
        image = render(before, size, rng=rng)
        mask = Image.new("L", (size, size), 0)
        mask.paste(255, mask_box(new_at, size))
        alone = Scene((target,), background)
        new_text = (f"a {target.colour} {target.shape} {POSITION_PHRASES[target.position]}, "
                    f"{background} background")
        cases.append(InpaintCase(before=before, after=after, target=target, image=image,
                                 mask=mask, prompt=_eval_prompt(after, caption(after, rng)),
                                 new_prompt=_eval_prompt(alone, new_text),
                                 kept_prompt=_eval_prompt(before, caption(before, rng))))
    return cases


def edit_cases(n: int, size: int = SIZE) -> list[EditCase]:
    """n fixed red-circle scenes over the backgrounds, positions and sizes, each with its caption
    and the caption with "blue". Left is left out: a blue circle on the left is a held-out
    triple (shapes.HELDOUT_TRIPLES), which the model does not compose; blue and red backgrounds
    are left out because the circle (before or after) would vanish into them."""
    backgrounds = [c for c in BACKGROUND_COLOURS if c not in ("red", "blue")]
    positions = [p for p in POSITIONS if p != "left"]
    combos = [(b, p, s) for b in backgrounds for p in positions for s in SIZES]
    cases = []
    for k in range(n):
        rng = np.random.default_rng([_EDIT_SEED, k])
        background, position, size_class = combos[k % len(combos)]
        red = ShapeObject("circle", "red", size_class, position)
        blue = ShapeObject("circle", "blue", size_class, position)
        scene, edited = Scene((red,), background), Scene((blue,), background)
        image = render(scene, size, rng=rng)
        text = caption(scene, rng)
        target = text.replace("red", "blue")
        cases.append(EditCase(scene=scene, edited=edited, image=image, prompt=text,
                              target_prompt=_eval_prompt(edited, target)))
    return cases


def hires_cases(n: int) -> list[EvalPrompt]:
    """n fixed seen one-object prompts (distinct texts)."""
    prompts: list[EvalPrompt] = []
    seen: set[str] = set()
    k = 0
    while len(prompts) < n:
        rng = np.random.default_rng([_HIRES_SEED, k])
        k += 1
        obj = _seen_object(rng, _pick(rng, POSITIONS), set())
        scene = Scene((obj,), _pick(rng, [c for c in BACKGROUND_COLOURS if c != obj.colour]))
        text = caption(scene, rng)
        if text not in seen:
            seen.add(text)
            prompts.append(_eval_prompt(scene, text))
    return prompts


# ---------------------------------------------------------------------------------------------
# Grading


def has_object(image: Image.Image, obj: ShapeObject, background: str) -> bool:
    """Whether the oracle finds an object of obj's colour and shape in obj's region, whatever
    else the image holds (grade() of a one-object prompt wants exactly one object)."""
    scene = read_scene(image, expected_background=background)
    return any((o.colour, o.shape, o.position) == (obj.colour, obj.shape, obj.position)
               for o in scene.objects)


def reads_right(prompt: EvalPrompt, image: Image.Image) -> bool:
    """Every named object found with its colour and shape, in its region (oracle.grade)."""
    g = grade(prompt, image)
    both = g["binding"] if len(prompt.scene.objects) == 2 else g["colour_shape"]
    return bool(both and g["position"])


@dataclass(frozen=True)
class Rate:
    passed: int
    n: int

    @property
    def rate(self) -> float:
        return self.passed / self.n if self.n else float("nan")


@dataclass(frozen=True)
class ModeEvalResult:
    inpaint: Rate | None = None                 # the new object: its colour + shape, in place
    inpaint_kept: Rate | None = None            # the kept object still read right
    inpaint_both: Rate | None = None            # both (the two-object caption read right)
    inpaint_overlay: Rate | None = None         # both, with overlay=True (A1111's paste)
    inpaint_txt2img: Rate | None = None         # the new object's prompt by txt2img: the ceiling
    edit_by_amount: dict[float, Rate] = field(default_factory=dict)
    edit_any: Rate | None = None
    edit_headline: float = 1.0
    hires_base: Rate | None = None              # txt2img images read right (of all)
    hires: dict[str, Rate] = field(default_factory=dict)   # by upscaler, of the base-right ones
    seconds: dict[str, float] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()


def _chunks(items: Sequence, n: int):
    for start in range(0, len(items), n):
        yield items[start:start + n]


def run_inpaint(pipe, cases: list[InpaintCase], s: ModeEvalSettings, overlay: bool = False
                ) -> list[Image.Image]:
    from pipelines.params import InpaintParams

    out = []
    for chunk in _chunks(cases, s.batch):
        requests = [InpaintParams(prompt=c.new_prompt.prompt, init_image=c.image, mask=c.mask,
                                  steps=s.steps, guidance_scale=s.guidance, sampler=s.sampler,
                                  seed=i, overlay=overlay)
                    for i, c in enumerate(chunk, start=len(out))]
        out += pipe.run(requests).images       # one batch: each request its own image, mask
    return out


def run_edit(pipe, cases: list[EditCase], s: ModeEvalSettings) -> list[list[Image.Image]]:
    """Per case, one image per s.edit_amounts."""
    from pipelines.params import EditParams

    per_batch = max(1, s.batch // len(s.edit_amounts))
    out = []
    for chunk in _chunks(cases, per_batch):
        requests = [EditParams(prompt=c.prompt, target_prompt=c.target_prompt.prompt,
                               init_image=c.image, amounts=s.edit_amounts, steps=s.steps,
                               seed=i)
                    for i, c in enumerate(chunk, start=len(out))]
        images = _run_each(pipe, requests)
        a = len(s.edit_amounts)
        out += [images[j * a:(j + 1) * a] for j in range(len(chunk))]
    return out


def _run_each(pipe, requests) -> list[Image.Image]:
    """One batch when the mode allows it (requests differing in prompt and seed only); image
    modes whose images differ may refuse that, so fall back to one run per request."""
    from ldm_engine.errors import UserInputError

    try:
        return pipe.run(requests).images
    except UserInputError as e:
        if "may differ only" not in str(e):
            raise
        return [im for r in requests for im in pipe.run(r).images]


def run_hires(pipe, prompts: list[EvalPrompt], s: ModeEvalSettings, hires=None
              ) -> list[Image.Image]:
    from pipelines.params import GenerationParams

    out = []
    for chunk in _chunks(prompts, s.batch):
        requests = [GenerationParams(prompt=p.prompt, steps=s.steps, guidance_scale=s.guidance,
                                     sampler=s.sampler, seed=i, hires=hires)
                    for i, p in enumerate(chunk, start=len(out))]
        out += pipe.run(requests).images
    return out


def _registered(name: str) -> bool:
    from pipelines.registry import PIPELINES
    return name in PIPELINES


def evaluate_modes(model=DEFAULT_MODEL, settings: ModeEvalSettings = ModeEvalSettings(),
                   grids: Path | None = None,
                   log: Callable[[str], None] = print) -> ModeEvalResult:
    """Run the three graded modes (and, with `grids`, save every mode's grid there)."""
    from pipelines import TextToImage
    from pipelines.params import GenerationParams, HiresFix

    pipe = TextToImage.from_folder(model)
    s = settings
    seconds: dict[str, float] = {}
    skipped = []
    result: dict = {"edit_headline": s.edit_headline}

    t = time.perf_counter()
    cases = inpaint_cases(s.inpaint_cases)
    if _registered("inpaint"):
        images = run_inpaint(pipe, cases, s)
        overlaid = run_inpaint(pipe, cases, s, overlay=True)

        def rate(prompt_of, ims):
            return Rate(sum(reads_right(prompt_of(c), im) for c, im in zip(cases, ims)),
                        len(cases))

        def found(obj_of, ims):
            return Rate(sum(has_object(im, obj_of(c), c.before.background)
                            for c, im in zip(cases, ims)), len(cases))

        result["inpaint"] = found(lambda c: c.target, images)
        result["inpaint_kept"] = found(lambda c: c.before.objects[0], images)
        result["inpaint_both"] = rate(lambda c: c.prompt, images)
        result["inpaint_overlay"] = rate(lambda c: c.prompt, overlaid)
        # The same prompt and seed by text to image: how often the model draws it at all.
        plain = [im for chunk in _chunks(list(enumerate(cases)), s.batch)
                 for im in pipe.run([GenerationParams(
                     prompt=c.new_prompt.prompt, steps=s.steps, guidance_scale=s.guidance,
                     sampler=s.sampler, seed=i) for i, c in chunk]).images]
        result["inpaint_txt2img"] = rate(lambda c: c.new_prompt, plain)
        if grids is not None:
            save_grid(grids / "modes-inpaint.png",
                      [[c.image, c.mask.convert("RGB"), im]
                       for c, im in list(zip(cases, images))[:s.grid_rows]])
        seconds["inpaint"] = time.perf_counter() - t
        log(f"inpaint: {result['inpaint'].passed}/{len(cases)} ({seconds['inpaint']:.0f} s)")
    else:
        skipped.append("inpaint")

    t = time.perf_counter()
    if _registered("edit"):
        cases_e = edit_cases(s.edit_cases)
        images_e = run_edit(pipe, cases_e, s)
        hits = [[reads_right(c.target_prompt, im) for im in ims]
                for c, ims in zip(cases_e, images_e)]
        result["edit_by_amount"] = {a: Rate(sum(h[j] for h in hits), len(hits))
                                    for j, a in enumerate(s.edit_amounts)}
        result["edit_any"] = Rate(sum(any(h) for h in hits), len(hits))
        if grids is not None:
            save_grid(grids / "modes-edit.png",
                      [[c.image, *ims] for c, ims in list(zip(cases_e, images_e))[:s.grid_rows]])
        seconds["edit"] = time.perf_counter() - t
        log(f"edit: {result['edit_by_amount']} ({seconds['edit']:.0f} s)")
    else:
        skipped.append("edit")

    t = time.perf_counter()
    prompts = hires_cases(s.hires_cases)
    base = run_hires(pipe, prompts, s)
    right = [i for i, (p, im) in enumerate(zip(prompts, base)) if reads_right(p, im)]
    result["hires_base"] = Rate(len(right), len(prompts))
    kept = [prompts[i] for i in right]
    hires_rates = {}
    hires_images = {}
    for upscaler, strength in ((u, st) for u in s.hires_upscalers for st in s.hires_strengths):
        hires = HiresFix(scale=2.0, upscaler=upscaler, strength=strength)
        # Seeds are the case's index in `prompts`, so each first pass is its base image.
        images = []
        for chunk in _chunks(right, s.batch):
            requests = [GenerationParams(prompt=prompts[i].prompt, steps=s.steps,
                                         guidance_scale=s.guidance, sampler=s.sampler, seed=i,
                                         hires=hires) for i in chunk]
            images += pipe.run(requests).images
        hires_images[upscaler, strength] = images
        hires_rates[upscaler, strength] = Rate(sum(reads_right(p, im) for p, im in zip(kept, images)),
                                     len(kept))
    result["hires"] = hires_rates
    if grids is not None and right:
        rows = []
        for row, i in enumerate(right[:s.grid_rows]):
            big = base[i].resize((2 * SIZE, 2 * SIZE), Image.Resampling.NEAREST)
            rows.append([big, *(hires_images[u, s.hires_headline[1]][row]
                                for u in s.hires_upscalers)])
        save_grid(grids / "modes-hires.png", rows)
    seconds["hires"] = time.perf_counter() - t
    log(f"hires: base {len(right)}/{len(prompts)}, "
        f"{ {k: f'{r.passed}/{r.n}' for k, r in hires_rates.items()} } ({seconds['hires']:.0f} s)")

    if grids is not None:
        t = time.perf_counter()
        skipped += save_ungraded_grids(pipe, grids, s)
        seconds["grids"] = time.perf_counter() - t
    return ModeEvalResult(seconds=seconds, skipped=tuple(skipped), **result)


# ---------------------------------------------------------------------------------------------
# Grids


def save_grid(path: Path, rows: list[list[Image.Image]], gap: int = 2) -> None:
    """Rows of tiles (each row's tiles of one height), on a dark gray ground with `gap` px."""
    rows = [[im.convert("RGB") for im in row] for row in rows]
    width = max(sum(im.width for im in row) + gap * (len(row) + 1) for row in rows)
    height = sum(max(im.height for im in row) for row in rows) + gap * (len(rows) + 1)
    grid = Image.new("RGB", (width, height), (40, 40, 40))
    y = gap
    for row in rows:
        x = gap
        for im in row:
            grid.paste(im, (x, y))
            x += im.width + gap
        y += max(im.height for im in row) + gap
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def save_ungraded_grids(pipe, grids: Path, s: ModeEvalSettings) -> list[str]:
    """Image to image (strengths 0.5 / 0.75 toward another colour), outpainting (64 -> 96 wide),
    interpolation (between two prompts) and variations (eta 0.6 and 1): grids only. Returns the modes not registered."""
    from pipelines.params import ImageToImageParams, OutpaintParams

    skipped = []
    scenes = inpaint_cases(s.grid_rows, SIZE)   # one-object scenes with an empty side
    rows = []
    for k, c in enumerate(scenes[:3]):
        kept = c.before.objects[0]
        other = next(o for o in OBJECT_COLOURS if o not in (kept.colour, c.before.background)
                     and not is_held_out_object(ShapeObject(kept.shape, o, kept.size,
                                                            kept.position)))
        text = caption(Scene((ShapeObject(kept.shape, other, kept.size, kept.position),),
                             c.before.background), np.random.default_rng([_GRID_SEED, k]))
        row = [c.image]
        for strength in (0.5, 0.75):
            row += pipe.run(ImageToImageParams(prompt=text, init_image=c.image,
                                               strength=strength, steps=s.steps,
                                               guidance_scale=s.guidance, seed=k)).images
        rows.append(row)
    save_grid(grids / "modes-img2img.png", rows)

    if _registered("outpaint"):
        rows = []
        for k, c in enumerate(scenes[:3]):
            out = pipe.run(OutpaintParams(prompt=caption(c.before, np.random.default_rng(
                [_GRID_SEED, 10 + k])), init_image=c.image, right=32, steps=s.steps,
                guidance_scale=s.guidance, seed=k)).images
            rows.append([c.image, *out])
        save_grid(grids / "modes-outpaint.png", rows)
    else:
        skipped.append("outpaint")

    if _registered("interpolate"):
        from pipelines.params import InterpolationParams

        pairs = [("a red circle on the left", "a green square on the right"),
                 ("a large white triangle at the bottom, black background",
                  "a large blue square at the top, black background")]
        rows = [pipe.run(InterpolationParams(prompt=a, end_prompt=b, frames=6, steps=s.steps,
                                             guidance_scale=s.guidance, seed=k)).images
                for k, (a, b) in enumerate(pairs)]
        save_grid(grids / "modes-interpolate.png", rows)
    else:
        skipped.append("interpolate")

    if _registered("vary"):
        from pipelines.params import VariationParams

        # Input, then variants at eta 0.6 (the default) and 1: content kept, details re-drawn.
        rows = []
        for k, c in enumerate(scenes[:3]):
            row = [c.image]
            for eta in (0.6, 1.0):
                row += pipe.run(VariationParams(prompt=caption(c.before, np.random.default_rng(
                    [_GRID_SEED, 20 + k])), init_image=c.image, eta=eta, steps=s.steps,
                    seed=k), num_images=2).images
            rows.append(row)
        save_grid(grids / "modes-vary.png", rows)
    else:
        skipped.append("vary")
    return skipped


# ---------------------------------------------------------------------------------------------
# Report


def format_results(r: ModeEvalResult, s: ModeEvalSettings) -> str:
    def pct(rate: Rate | None) -> str:
        return "not run" if rate is None else f"{rate.rate:.1%} ({rate.passed}/{rate.n})"

    def verdict(rate: Rate | None, mode: str) -> str:
        if rate is None:
            return ""
        return "met" if rate.rate >= TARGETS[mode] else "missed"

    lines = ["| mode | what passes | n | rate | target | |", "|---|---|---|---|---|---|"]
    if r.inpaint is not None:
        lines.append(f"| inpaint \"a <colour> <shape> <position>\" | the new object: its "
                     f"colour + shape, in the masked region | {r.inpaint.n} | {pct(r.inpaint)} "
                     f"| {TARGETS['inpaint']:.0%} | {verdict(r.inpaint, 'inpaint')} |")
        for label, rate in (("inpaint: the kept object", r.inpaint_kept),
                            ("inpaint: both objects", r.inpaint_both),
                            ("inpaint with overlay: both objects", r.inpaint_overlay),
                            ("(txt2img, same prompts and seeds: the new object)",
                             r.inpaint_txt2img)):
            lines.append(f"| {label} | | {rate.n} | {pct(rate)} | | |")
    if r.edit_by_amount:
        head = r.edit_by_amount.get(r.edit_headline)
        lines.append(f"| edit, amount {r.edit_headline:g} | blue circle in the same region | "
                     f"{head.n} | {pct(head)} | {TARGETS['edit']:.0%} | "
                     f"{verdict(head, 'edit')} |")
        for a, rate in r.edit_by_amount.items():
            if a != r.edit_headline:
                lines.append(f"| edit, amount {a:g} | (same) | {rate.n} | {pct(rate)} | | |")
        lines.append(f"| edit, any amount | (same) | {r.edit_any.n} | {pct(r.edit_any)} | | |")
    for (upscaler, strength), rate in sorted(r.hires.items(),
                                             key=lambda kv: kv[0] != s.hires_headline):
        headline = (upscaler, strength) == s.hires_headline
        lines.append(f"| hires 64 -> 128, {upscaler}, strength {strength:g}"
                     f"{' (headline)' if headline else ''} | still right, of the base images "
                     f"read right | {rate.n} | {pct(rate)} | "
                     + (f"{TARGETS['hires']:.0%} | {verdict(rate, 'hires')} |" if headline
                        else "| |"))
    if r.hires_base is not None:
        lines.append(f"| (txt2img base, 64 px) | colour + shape in its region | "
                     f"{r.hires_base.n} | {pct(r.hires_base)} | | |")
    lines += ["", f"Settings: {s.steps} steps, {s.sampler}; inpaint and txt2img guidance "
              f"{s.guidance:g}, the edit EditParams' own guidance (1) and amounts "
              f"{', '.join(f'{a:g}' for a in s.edit_amounts)}; hires scale 2, strengths "
              f"{', '.join(f'{a:g}' for a in s.hires_strengths)}.",
              "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in r.seconds.items()) + "."]
    if r.skipped:
        lines.append(f"Not registered, so not run: {', '.join(r.skipped)}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.mode_eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--out", help="write the markdown table here")
    parser.add_argument("--grids", help="save docs-style grids (modes-*.png) in this folder")
    args = parser.parse_args(argv)
    settings = ModeEvalSettings()
    start = time.perf_counter()
    result = evaluate_modes(args.model, settings, Path(args.grids) if args.grids else None)
    total = time.perf_counter() - start
    text = (format_results(result, settings) + f"\nTotal: {total:.0f} s.\n\nCommand: `{COMMAND}`\n")
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
