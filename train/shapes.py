"""The "shapes world": a synthetic text-to-image dataset small enough to learn on 2 CPU cores.

A scene is one or two flat-coloured shapes on a flat background. Every attribute a caption names
(colour, shape, size, position, background) is drawn from a small closed vocabulary, so a pixel
oracle (`train.oracle`) can check a generated image against its prompt without a learned detector.

Generalisation is measured on a held-out split defined by *attribute combination*: some
(colour, shape) pairs and some (colour, shape, position) triples never occur in training, although
each of their attributes does, in other combinations. `heldout_eval_prompts()` is the fixed prompt
list that `ldm eval` generates for.

Geometry is in normalised image coordinates (x right, y down, both in [0, 1]), so every image size
draws the same scene; pixels only appear in `render`.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Literal, get_args

import numpy as np
from PIL import Image, ImageDraw

Colour = Literal["red", "orange", "yellow", "green", "blue", "purple", "white", "black", "gray"]
ObjectColour = Literal["red", "orange", "yellow", "green", "blue", "purple", "white"]
BackgroundColour = Literal["black", "gray", "white", "blue", "green"]
Shape = Literal["circle", "square", "triangle"]
Size = Literal["small", "large"]
Position = Literal["left", "right", "top", "bottom", "centre"]
Split = Literal["train", "heldout"]
RGB = tuple[int, int, int]

# Tuned so that every pair is >= 43 apart in CIELAB (Delta E 1976): the closest pairs are
# white/gray, red/orange and black/gray. Purple leans magenta and blue leans azure because the
# obvious (128, 0, 128) / (0, 0, 255) pair is only ~30 apart, which a blurry sample could cross.
COLOURS: MappingProxyType[Colour, RGB] = MappingProxyType(
    {
        "red": (220, 30, 30),
        "orange": (250, 140, 20),
        "yellow": (245, 220, 40),
        "green": (40, 170, 60),
        "blue": (30, 110, 220),
        "purple": (160, 40, 180),
        "white": (245, 245, 245),
        "black": (20, 20, 20),
        "gray": (128, 128, 128),
    }
)
OBJECT_COLOURS: tuple[ObjectColour, ...] = get_args(ObjectColour)
# Backgrounds share some names with objects (white, blue, green) so captions such as "a white
# circle on a green background" and "a green square on a white background" both occur; a scene
# never uses its background colour for an object (`Scene` enforces it).
BACKGROUND_COLOURS: tuple[BackgroundColour, ...] = get_args(BackgroundColour)
SHAPES: tuple[Shape, ...] = get_args(Shape)
SIZES: tuple[Size, ...] = get_args(Size)
POSITIONS: tuple[Position, ...] = get_args(Position)

# Side of the shape's bounding box as a fraction of the image side. 0.20 is ~13 px at 64 px, the
# smallest at which a circle, a square and a triangle still differ in more than a few pixels; the
# 1.6x ratio (2.6x in area) keeps the classes apart after +/- SIZE_JITTER and a pixel of blur.
SIZE_EXTENTS: MappingProxyType[Size, float] = MappingProxyType({"small": 0.20, "large": 0.32})
# Every shape is placed by the centre of its bounding box (a triangle's area centroid sits 1/6 of
# its height lower), and the oracle reads position from the same box centre.
POSITION_CENTRES: MappingProxyType[Position, tuple[float, float]] = MappingProxyType(
    {
        "left": (0.26, 0.50),
        "right": (0.74, 0.50),
        "top": (0.50, 0.26),
        "bottom": (0.50, 0.74),
        "centre": (0.50, 0.50),
    }
)
# The largest box (0.32 * 1.05) at the most outward jitter still starts 0.05 inside the image; in a
# two-object scene the facing edges stay >= 0.06 (4 px at 64) apart; and a box centre stays 0.08
# from the half-way line (0.38) between two region centres, where the oracle's regions meet.
POSITION_JITTER = 0.04
SIZE_JITTER = 0.05
# Two objects only ever sit in opposite regions: any other pair of regions can overlap once
# jittered, and overlapping shapes would make both the caption and the oracle ambiguous.
TWO_OBJECT_LAYOUTS: tuple[tuple[Position, Position], ...] = (("left", "right"), ("top", "bottom"))
# Drawing at 4x and box-downsampling gives each edge pixel its exact coverage (anti-aliasing).
SUPERSAMPLE = 4
TWO_OBJECT_PROBABILITY = 0.5
# Captions omit the background ("any background") and the sizes ("any size") this often, so the
# model learns those words are optional and the unconditional mode of each attribute.
MENTION_BACKGROUND_PROBABILITY = 0.6
MENTION_SIZE_PROBABILITY = 0.5

# The held-out rule. A scene is held out when any of its objects is one of these combinations; the
# training split contains none of them. Each pair uses a different colour and a different shape,
# and each triple a different position, so every colour, shape and position (and every pair the
# triples build on) is still trained, only never in these combinations.
HELDOUT_PAIRS: frozenset[tuple[ObjectColour, Shape]] = frozenset(
    {("purple", "triangle"), ("orange", "circle"), ("yellow", "square")}
)
HELDOUT_TRIPLES: frozenset[tuple[ObjectColour, Shape, Position]] = frozenset(
    {
        ("green", "square", "right"),
        ("red", "triangle", "top"),
        ("blue", "circle", "left"),
        ("yellow", "circle", "bottom"),
        ("white", "triangle", "centre"),
    }
)

POSITION_PHRASES: MappingProxyType[Position, str] = MappingProxyType(
    {
        "left": "on the left",
        "right": "on the right",
        "top": "at the top",
        "bottom": "at the bottom",
        "centre": "in the centre",
    }
)
# "<first> to the left of <second>" etc.: the position of the object named first, then the other.
RELATION_PHRASES: MappingProxyType[tuple[Position, Position], str] = MappingProxyType(
    {
        ("left", "right"): "to the left of",
        ("right", "left"): "to the right of",
        ("top", "bottom"): "above",
        ("bottom", "top"): "below",
    }
)


@dataclass(frozen=True)
class ShapeObject:
    shape: Shape
    colour: ObjectColour
    size: Size
    position: Position

    def __post_init__(self) -> None:
        _check("shape", self.shape, SHAPES)
        _check("colour", self.colour, OBJECT_COLOURS)
        _check("size", self.size, SIZES)
        _check("position", self.position, POSITIONS)


@dataclass(frozen=True)
class Scene:
    """One or two objects; two objects sit in a TWO_OBJECT_LAYOUTS pair and differ in colour."""

    objects: tuple[ShapeObject, ...]
    background: BackgroundColour

    def __post_init__(self) -> None:
        _check("background", self.background, BACKGROUND_COLOURS)
        if len(self.objects) not in (1, 2):
            raise ValueError(f"a scene has 1 or 2 objects, got {len(self.objects)}")
        if any(o.colour == self.background for o in self.objects):
            raise ValueError(f"an object has the background colour {self.background!r}")
        if len(self.objects) == 2:
            a, b = self.objects
            if a.colour == b.colour:
                raise ValueError("the two objects of a scene must differ in colour")
            pair = {a.position, b.position}
            if not any(pair == set(layout) for layout in TWO_OBJECT_LAYOUTS):
                raise ValueError(f"two objects must be left/right or top/bottom, got {pair}")


@dataclass(frozen=True)
class ObjectSpec:
    """What a caption says about one object; size None means the caption leaves it open."""

    shape: Shape
    colour: ObjectColour
    position: Position
    size: Size | None


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption pins down; background None means "any background"."""

    objects: tuple[ObjectSpec, ...]
    background: BackgroundColour | None

    def describes(self, scene: Scene) -> bool:
        """True when every stated attribute agrees with `scene` (object order does not matter)."""
        if self.background is not None and self.background != scene.background:
            return False
        if len(self.objects) != len(scene.objects):
            return False
        # Positions are distinct within a scene, so they pair caption objects with scene objects.
        by_position = {o.position: o for o in scene.objects}
        for spec in self.objects:
            obj = by_position.get(spec.position)
            if obj is None or (obj.shape, obj.colour) != (spec.shape, spec.colour):
                return False
            if spec.size is not None and spec.size != obj.size:
                return False
        return True


@dataclass(frozen=True)
class EvalPrompt:
    prompt: str
    scene: Scene
    # Whether the prompt names the background / the sizes; the oracle grades only what it names.
    background_specified: bool
    size_specified: bool


def _check(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")


def _pick(rng: np.random.Generator, options: tuple | list):
    return options[int(rng.integers(len(options)))]


# ---------------------------------------------------------------------------------------------
# The held-out rule and scene sampling


def is_held_out_object(obj: ShapeObject) -> bool:
    return (obj.colour, obj.shape) in HELDOUT_PAIRS or (
        obj.colour,
        obj.shape,
        obj.position,
    ) in HELDOUT_TRIPLES


def is_held_out(scene: Scene) -> bool:
    return any(is_held_out_object(o) for o in scene.objects)


def _random_scene(rng: np.random.Generator, n_objects: int) -> Scene:
    if n_objects == 2:
        layout = _pick(rng, TWO_OBJECT_LAYOUTS)
        if rng.random() < 0.5:
            layout = layout[::-1]
        colours = rng.choice(len(OBJECT_COLOURS), size=2, replace=False)
        objects = tuple(
            ShapeObject(_pick(rng, SHAPES), OBJECT_COLOURS[int(c)], _pick(rng, SIZES), position)
            for c, position in zip(colours, layout)
        )
    else:
        shape, colour = _pick(rng, SHAPES), _pick(rng, OBJECT_COLOURS)
        objects = (ShapeObject(shape, colour, _pick(rng, SIZES), _pick(rng, POSITIONS)),)
    used = {o.colour for o in objects}
    background = _pick(rng, [c for c in BACKGROUND_COLOURS if c not in used])
    return Scene(objects, background)


def sample_scene(rng: np.random.Generator, *, split: Split) -> Scene:
    """A uniformly random scene of `split`, one or two objects with equal probability.

    The object count is drawn first and the rejection loop (which keeps the splits disjoint) runs
    within it: rejecting across counts would skew training towards one object, since a two-object
    scene is twice as likely to contain a held-out combination.
    """
    _check("split", split, get_args(Split))
    n_objects = 2 if rng.random() < TWO_OBJECT_PROBABILITY else 1
    want_held_out = split == "heldout"
    # About 1 draw in 5 is held out, so a few hundred draws never all miss; the bound turns a
    # held-out rule that empties a split into an error instead of a hang.
    for _ in range(1000):
        scene = _random_scene(rng, n_objects)
        if is_held_out(scene) == want_held_out:
            return scene
    raise RuntimeError(f"no {split} scene with {n_objects} object(s) in 1000 draws")


# ---------------------------------------------------------------------------------------------
# Rendering


def render(scene: Scene, size: int = 64, *, rng: np.random.Generator) -> Image.Image:
    """Draw `scene` as a size x size RGB image, with a seeded jitter of each object's box."""
    side = size * SUPERSAMPLE
    image = Image.new("RGB", (side, side), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        dx, dy = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
        extent = SIZE_EXTENTS[obj.size] * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER)
        cx, cy = POSITION_CENTRES[obj.position]
        # Box corners in supersampled pixels; PIL's pixel (i, j) covers [i, i+1) x [j, j+1).
        x0, x1 = (cx + dx - extent / 2) * side, (cx + dx + extent / 2) * side
        y0, y1 = (cy + dy - extent / 2) * side, (cy + dy + extent / 2) * side
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:
            # Apex up, base as wide as it is tall: it fills half its box (a square all of it, a
            # circle pi/4), which the oracle relies on to turn an area back into a size.
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image.resize((size, size), Image.Resampling.BOX)


# ---------------------------------------------------------------------------------------------
# Captions


def _object_phrase(obj: ShapeObject, with_size: bool) -> str:
    words = ([obj.size] if with_size else []) + [obj.colour, obj.shape]
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """One of several templates; the background and the sizes are mentioned only sometimes."""
    with_size = bool(rng.random() < MENTION_SIZE_PROBABILITY)
    with_background = bool(rng.random() < MENTION_BACKGROUND_PROBABILITY)
    objects = list(scene.objects)
    if len(objects) == 2 and rng.random() < 0.5:
        objects.reverse()  # either object may be named first
    phrases = [_object_phrase(o, with_size) for o in objects]
    if len(objects) == 1:
        body = f"{phrases[0]} {POSITION_PHRASES[objects[0].position]}"
    elif rng.random() < 0.5:
        first, second = objects
        body = (
            f"{phrases[0]} {POSITION_PHRASES[first.position]} and "
            f"{phrases[1]} {POSITION_PHRASES[second.position]}"
        )
    else:
        relation = RELATION_PHRASES[(objects[0].position, objects[1].position)]
        body = f"{phrases[0]} {relation} {phrases[1]}"
    if not with_background:
        return body
    template = int(rng.integers(3))
    background = scene.background
    return (
        f"{body}, {background} background",
        f"{body} on a {background} background",
        f"{background} background with {body}",
    )[template]


_WORD = {
    "size": "|".join(SIZES),
    "colour": "|".join(OBJECT_COLOURS),
    "shape": "|".join(SHAPES),
    "position": "|".join(re.escape(p) for p in POSITION_PHRASES.values()),
    "relation": "|".join(re.escape(r) for r in RELATION_PHRASES.values()),
    "background": "|".join(BACKGROUND_COLOURS),
}
_OBJECT = rf"an? (?:({_WORD['size']}) )?({_WORD['colour']}) ({_WORD['shape']})"
_POSITION = rf"({_WORD['position']})"
_BACKGROUND_FORMS = (
    re.compile(rf"({_WORD['background']}) background with (.+)"),
    re.compile(rf"(.+?),? (?:on an? )?({_WORD['background']}) background"),
)
_ONE = re.compile(rf"{_OBJECT} {_POSITION}")
_TWO_ABSOLUTE = re.compile(rf"{_OBJECT} {_POSITION} and {_OBJECT} {_POSITION}")
_TWO_RELATIVE = re.compile(rf"{_OBJECT} ({_WORD['relation']}) {_OBJECT}")
_POSITION_OF_PHRASE = {phrase: position for position, phrase in POSITION_PHRASES.items()}
_LAYOUT_OF_RELATION = {phrase: layout for layout, phrase in RELATION_PHRASES.items()}


def parse_caption(text: str) -> CaptionSpec:
    """Invert `caption`: recover the objects, positions and (if stated) sizes and background.

    Strict: anything outside the caption grammar raises ValueError, so a test that parses every
    generated caption also checks that no template produces an ambiguous sentence.
    """
    body = " ".join(text.strip().lower().rstrip(".").split())
    background = None
    if m := _BACKGROUND_FORMS[0].fullmatch(body):
        background, body = m.group(1), m.group(2)
    elif m := _BACKGROUND_FORMS[1].fullmatch(body):
        body, background = m.group(1), m.group(2)

    def spec(size: str | None, colour: str, shape: str, position: Position) -> ObjectSpec:
        return ObjectSpec(shape=shape, colour=colour, position=position, size=size)

    if m := _ONE.fullmatch(body):
        size, colour, shape, phrase = m.groups()
        objects = (spec(size, colour, shape, _POSITION_OF_PHRASE[phrase]),)
    elif m := _TWO_ABSOLUTE.fullmatch(body):
        s1, c1, sh1, p1, s2, c2, sh2, p2 = m.groups()
        objects = (
            spec(s1, c1, sh1, _POSITION_OF_PHRASE[p1]),
            spec(s2, c2, sh2, _POSITION_OF_PHRASE[p2]),
        )
    elif m := _TWO_RELATIVE.fullmatch(body):
        s1, c1, sh1, relation, s2, c2, sh2 = m.groups()
        first, second = _LAYOUT_OF_RELATION[relation]
        objects = (spec(s1, c1, sh1, first), spec(s2, c2, sh2, second))
    else:
        raise ValueError(f"not a shapes-world caption: {text!r}")
    if len(objects) == 2:
        positions = {objects[0].position, objects[1].position}
        if not any(positions == set(layout) for layout in TWO_OBJECT_LAYOUTS):
            raise ValueError(f"two objects must be left/right or top/bottom: {text!r}")
    return CaptionSpec(objects=objects, background=background)


# ---------------------------------------------------------------------------------------------
# The fixed held-out evaluation prompts

# Seeds the choice of sizes, backgrounds, partners and templates; changing it changes the benchmark.
_EVAL_SEED = 20240611
_EVAL_VARIANTS = 2  # prompts per held-out single-object combination
_EVAL_PAIR_VARIANTS = 3  # prompts per held-out combination placed beside a partner object


def _single_object_scene(
    rng: np.random.Generator, colour: ObjectColour, shape: Shape, position: Position
) -> Scene:
    obj = ShapeObject(shape, colour, _pick(rng, SIZES), position)
    return Scene((obj,), _pick(rng, [c for c in BACKGROUND_COLOURS if c != colour]))


def _two_object_scene(
    rng: np.random.Generator, colour: ObjectColour, shape: Shape, position: Position
) -> Scene:
    opposite = {a: b for layout in TWO_OBJECT_LAYOUTS for a, b in (layout, layout[::-1])}
    # The partner differs in colour and in shape, so swapping the colours (or the shapes) gives a
    # different scene: that is what makes the binding score meaningful.
    partner = ShapeObject(
        _pick(rng, [s for s in SHAPES if s != shape]),
        _pick(rng, [c for c in OBJECT_COLOURS if c != colour]),
        _pick(rng, SIZES),
        opposite[position],
    )
    obj = ShapeObject(shape, colour, _pick(rng, SIZES), position)
    objects = tuple(sorted((obj, partner), key=lambda o: POSITIONS.index(o.position)))
    used = {colour, partner.colour}
    return Scene(objects, _pick(rng, [c for c in BACKGROUND_COLOURS if c not in used]))


@lru_cache(maxsize=1)
def _heldout_eval_prompts() -> tuple[EvalPrompt, ...]:
    combos: list[tuple[ObjectColour, Shape, Position]] = [
        (colour, shape, position)
        for colour, shape in sorted(HELDOUT_PAIRS)
        for position in POSITIONS
    ]
    combos += sorted(HELDOUT_TRIPLES)
    plan = [(1, combo, _EVAL_VARIANTS) for combo in combos]
    # Two-object scenes have no centre.
    plan += [(2, combo, _EVAL_PAIR_VARIANTS) for combo in combos if combo[2] != "centre"]
    prompts: list[EvalPrompt] = []
    seen: set[str] = set()
    for index, (n_objects, combo, variants) in enumerate(plan):
        for variant in range(variants):
            # Redraw until the text is new: a repeated prompt would weigh twice in the scores
            # (and collapse into one key of the mapping `oracle.evaluate` takes).
            for attempt in range(100):
                rng = np.random.default_rng([_EVAL_SEED, index, variant, attempt])
                make = _single_object_scene if n_objects == 1 else _two_object_scene
                scene = make(rng, *combo)
                text = caption(scene, rng)
                if text not in seen:
                    break
            else:
                raise RuntimeError(f"no new prompt for {combo} after 100 draws")
            seen.add(text)
            spec = parse_caption(text)
            prompts.append(
                EvalPrompt(
                    prompt=text,
                    scene=scene,
                    background_specified=spec.background is not None,
                    size_specified=spec.objects[0].size is not None,
                )
            )
    return tuple(prompts)


def heldout_eval_prompts() -> list[EvalPrompt]:
    """The fixed benchmark: 40 one-object and 48 two-object prompts, all held out of training."""
    return list(_heldout_eval_prompts())


# ---------------------------------------------------------------------------------------------
# Datasets

_SPLIT_STREAM: MappingProxyType[Split, int] = MappingProxyType({"train": 0, "heldout": 1})


def example(
    seed: int, index: int, *, split: Split = "train", size: int = 64
) -> tuple[Image.Image, str, Scene]:
    """Example `index` of the dataset `seed`, computed on its own (random access, no state).

    Each example has its own generator, seeded by (seed, split, index), so a data loader can fetch
    any index in any order or worker and still get the bytes `generate` would.
    """
    _check("split", split, get_args(Split))
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split], index])
    scene = sample_scene(rng, split=split)
    image = render(scene, size, rng=rng)
    return image, caption(scene, rng), scene


def generate(
    n: int, seed: int, *, split: Split = "train", size: int = 64
) -> Iterator[tuple[Image.Image, str, Scene]]:
    """The first `n` examples of dataset `seed`: the same seed always yields the same bytes."""
    for index in range(n):
        yield example(seed, index, split=split, size=size)


def _write_atomic(path: Path, data: bytes) -> None:
    # Written beside the destination and renamed over it, so a reader (or a crash) never sees a
    # half-written file; os.replace is atomic within one filesystem.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_imagefolder(
    directory: str | os.PathLike, n: int, seed: int, split: Split = "train", size: int = 64
) -> Path:
    """Write `n` PNGs and a Hugging Face imagefolder `metadata.jsonl`; returns the metadata path.

    metadata.jsonl is written last, so a folder whose metadata exists has all its images.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, (image, text, _) in enumerate(generate(n, seed, split=split, size=size)):
        name = f"{index:06d}.png"
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        _write_atomic(root / name, buffer.getvalue())
        lines.append(json.dumps({"file_name": name, "text": text}) + "\n")
    metadata = root / "metadata.jsonl"
    _write_atomic(metadata, "".join(lines).encode("utf-8"))
    return metadata
