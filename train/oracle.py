"""Pixel oracle for the shapes world: read an image back into objects and grade it against a prompt.

Plain numpy, no learned detector, so a score cannot be inflated by a detector that shares the
generator's biases. The pipeline, each step chosen to survive the blur, noise and colour drift of a
small diffusion model:

1. Denoise with a 3x3 box filter (divides i.i.d. pixel noise by 3).
2. Background = the named colour most of the border votes for; its reference colour is the median
   of those border pixels, so a tinted background still segments cleanly.
3. Foreground = pixels more than FOREGROUND_DELTA_E from that reference in CIELAB; 4-connected
   components of it, minus specks under MIN_OBJECT_AREA, are the objects.
4. Colour = majority nearest named colour of the object's purest pixels (those farthest from the
   background; the rest are edge blends, which can land on a third named colour).
5. Position = nearest region centre to the bounding-box centre of the object re-cut at the midpoint
   between its own colour and the background's.
6. Shape and size from moments of the object's soft coverage alpha (how far each pixel is from the
   background towards the object's colour). A symmetric blur adds its own cumulants to the shape's,
   and a blur kernel's third and (for a Gaussian) fourth cumulants are zero, so the two shape
   features below barely move under blur, where the outline of a thresholded mask does:
   - vertical (or horizontal) skewness: 0 for a circle or a square, 2*sqrt(2)/5 = 0.57 for the
     world's triangle, whose width grows linearly from apex to base;
   - the fourth cumulant along the axes over that along the diagonals: 2 for an axis-aligned
     square, 1 for a circle (isotropic).
   Size reads the area sum(alpha), which blur preserves, as the side of the box the shape fills.

Colours are classified among *all* named colours, backgrounds included: a gray blob is "gray", not
the nearest object colour, so it cannot pass for "white".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from train.shapes import (
    COLOURS,
    POSITION_CENTRES,
    SIZE_EXTENTS,
    Colour,
    EvalPrompt,
    Position,
    Shape,
    ShapeObject,
    Size,
)

DetectedShape = Shape | Literal["unknown"]
ImageLike = Image.Image | np.ndarray

# Half the smallest CIELAB distance between two named colours (~43): any object's own colour clears
# it against any other background, with room for drift, and its anti-aliased edge pixels are cut
# roughly half-way through the blend.
FOREGROUND_DELTA_E = 20.0
# A quarter of the smallest object (a small triangle covers >= 1.8 % of the image): anything
# smaller is a speck of sampling noise, not an object a prompt asked for.
MIN_OBJECT_AREA = 0.005
# A pixel at least this fraction of the object's largest distance from the background counts as
# the object's own colour, not an edge blend, when the colour is voted.
PURE_FRACTION = 0.8
# Coverage below this is background noise; cutting it keeps the noise floor of a wide window out of
# the moments (after the box filter, sigma=0.05 noise is < 0.03 in alpha for every colour pair).
MIN_ALPHA = 0.1
# Skewness above this is a triangle: clean triangles measure 0.45-0.55, a radius-2 Gaussian blur at
# the small size brings them down to 0.2 (white on gray), circles and squares stay under 0.03.
TRIANGLE_SKEW = 0.15
# Axis/diagonal fourth-cumulant ratio above this is a square (clean 1.9-2.0, 1.5 under a radius-2
# blur at the small size), between MIN_KURTOSIS_RATIO and this a circle (0.94-1.08); 1.25 is their
# geometric midpoint.
SQUARE_KURTOSIS_RATIO = 1.25
# Below this the blob is no circle: a diamond (a square turned 45 degrees, never drawn) scores 0.5.
MIN_KURTOSIS_RATIO = 0.7
# (var_x + var_y) / area of each ideal shape: 1/(2 pi) for a disc (the minimum over all shapes),
# 1/6 for a square, 7/36 for the world's triangle. Blur raises it by 2 sigma^2 / area (a small
# triangle under a radius-2 blur reaches 0.28); a ring, a scatter of blobs or a smear goes far
# higher, and a shape scoring over COMPACTNESS_SLACK times its ideal is not that shape.
IDEAL_COMPACTNESS: dict[Shape, float] = {
    "circle": 1 / (2 * math.pi),
    "square": 1 / 6,
    "triangle": 7 / 36,
}
COMPACTNESS_SLACK = 1.5
# sqrt of the covariance eigenvalue ratio; 1 for a circle or a square, 1.15 for the triangle.
MAX_ELONGATION = 1.5
# Fraction of its bounding box each shape fills: converts an area back into a box side.
FILL: dict[Shape, float] = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
# Geometric mean of the two nominal extents: the size classes meet half-way in log scale.
SIZE_THRESHOLD = math.sqrt(SIZE_EXTENTS["small"] * SIZE_EXTENTS["large"])

_NAMES: tuple[Colour, ...] = tuple(COLOURS)


@dataclass(frozen=True)
class ShapeFeatures:
    skewness: float  # the larger of |skew_x|, |skew_y|
    kurtosis_ratio: float  # fourth cumulant along x, y over that along the diagonals
    compactness: float  # (var_x + var_y) / area
    elongation: float  # sqrt(largest / smallest covariance eigenvalue)


@dataclass(frozen=True)
class DetectedObject:
    colour: Colour
    shape: DetectedShape
    size: Size
    position: Position
    centroid: tuple[float, float]  # coverage-weighted centroid (x, y), normalised to [0, 1]
    box_centre: tuple[float, float]  # bounding-box centre (x, y): what position is read from
    extent: float  # side of the shape's bounding box / image side, from its area
    area: float  # sum of coverage / image area
    features: ShapeFeatures


@dataclass(frozen=True)
class DetectedScene:
    background: Colour
    objects: tuple[DetectedObject, ...]  # largest first


# ---------------------------------------------------------------------------------------------
# Colour


def _as_rgb(image: ImageLike) -> np.ndarray:
    """(H, W, 3) float64 in [0, 1] from a PIL image, a uint8 array or a float array in [0, 1]."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    return np.clip(array.astype(np.float64), 0.0, 1.0)


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1], (..., 3) -> CIELAB (D65 white), (..., 3). IEC 61966-2-1 and CIE 15."""
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array(
        [[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]
    )
    xyz = linear @ to_xyz.T / np.array([0.95047, 1.0, 1.08883])
    epsilon, kappa = 216 / 24389, 24389 / 27
    f = np.where(xyz > epsilon, np.cbrt(xyz), (kappa * xyz + 16) / 116)
    L = 116 * f[..., 1] - 16
    a = 500 * (f[..., 0] - f[..., 1])
    b = 200 * (f[..., 1] - f[..., 2])
    return np.stack([L, a, b], axis=-1)


_PALETTE_LAB = srgb_to_lab(np.array([COLOURS[n] for n in _NAMES], dtype=np.float64) / 255.0)


def _nearest_colour(lab: np.ndarray) -> np.ndarray:
    """Index into _NAMES of the nearest named colour (Delta E 1976), per pixel of (..., 3)."""
    distances = np.linalg.norm(lab[..., None, :] - _PALETTE_LAB, axis=-1)  # (..., n_colours)
    return distances.argmin(axis=-1)


def _box_filter_3x3(rgb: np.ndarray) -> np.ndarray:
    """Mean over each pixel's 3x3 neighbourhood, (H, W, 3); edges repeat the border pixels."""
    padded = np.pad(rgb, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = rgb.shape[:2]
    return sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)) / 9.0


# ---------------------------------------------------------------------------------------------
# Connected components


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected labelling of a boolean (H, W) mask: (labels with 0 = background, count).

    Every foreground pixel starts with its own flat index and repeatedly takes the minimum over
    itself and its foreground neighbours; "pointer jumping" (adopting the label of the pixel a
    label names, which is in the same component and has a label at most as small) makes the
    number of sweeps grow with the log of a component's diameter rather than the diameter.
    """
    h, w = mask.shape
    sentinel = h * w
    labels = np.where(mask, np.arange(h * w).reshape(h, w), sentinel)
    while True:
        new = labels.copy()
        np.minimum(new[1:], labels[:-1], out=new[1:])
        np.minimum(new[:-1], labels[1:], out=new[:-1])
        np.minimum(new[:, 1:], labels[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], labels[:, 1:], out=new[:, :-1])
        new[~mask] = sentinel
        new[mask] = new.flat[new[mask]]
        if np.array_equal(new, labels):
            break
        labels = new
    roots, dense = np.unique(labels, return_inverse=True)
    dense = dense.reshape(h, w)
    # roots is sorted, so the sentinel (background) is last; shift the others to 1..n.
    count = len(roots) - (1 if roots[-1] == sentinel else 0)
    out = np.where(mask, dense + 1, 0)
    return out, count


def _components(mask: np.ndarray, min_pixels: int) -> list[np.ndarray]:
    labels, count = label_components(mask)
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    return [labels == k for k in range(1, count + 1) if areas[k] >= min_pixels]


# ---------------------------------------------------------------------------------------------
# Geometry


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """4-neighbour dilation, `steps` times."""
    for _ in range(steps):
        grown = mask.copy()
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= mask[:, :-1]
        grown[:, :-1] |= mask[:, 1:]
        mask = grown
    return mask


def shape_features(alpha: np.ndarray) -> ShapeFeatures:
    """Moment features of a coverage map (H, W) in [0, 1] that holds one object."""
    h, w = alpha.shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    mass = alpha.sum()

    def mean(f: np.ndarray) -> float:
        return float((alpha * f).sum() / mass)

    dx, dy = x - mean(x), y - mean(y)
    # Floored so that a one-pixel-thin line gives a huge elongation rather than a division by 0.
    var_x, var_y, cov = max(mean(dx * dx), 1e-6), max(mean(dy * dy), 1e-6), mean(dx * dy)
    skewness = max(abs(mean(dx**3)) / var_x**1.5, abs(mean(dy**3)) / var_y**1.5)

    def kappa4(p: np.ndarray) -> float:  # fourth cumulant of the projection p
        return mean(p**4) - 3 * mean(p**2) ** 2

    axes = kappa4(dx) + kappa4(dy)
    diagonals = kappa4((dx + dy) / math.sqrt(2)) + kappa4((dx - dy) / math.sqrt(2))
    # A flat shape has negative fourth cumulants in every direction; a positive one (heavy tails)
    # is no flat shape, and the ratio is reported as 0 so that it classifies as unknown.
    ratio = axes / diagonals if axes < 0 and diagonals < 0 else 0.0
    spread = math.sqrt(((var_x - var_y) / 2) ** 2 + cov**2)
    mid = (var_x + var_y) / 2
    elongation = math.sqrt((mid + spread) / max(mid - spread, 1e-9))
    return ShapeFeatures(
        skewness=float(skewness),
        kurtosis_ratio=float(ratio),
        compactness=float((var_x + var_y) / mass),
        elongation=float(elongation),
    )


def classify_shape(features: ShapeFeatures) -> DetectedShape:
    if features.elongation > MAX_ELONGATION:
        return "unknown"
    if features.skewness > TRIANGLE_SKEW:
        shape: DetectedShape = "triangle"
    elif features.kurtosis_ratio > SQUARE_KURTOSIS_RATIO:
        shape = "square"
    elif features.kurtosis_ratio > MIN_KURTOSIS_RATIO:
        shape = "circle"
    else:
        return "unknown"
    if features.compactness > COMPACTNESS_SLACK * IDEAL_COMPACTNESS[shape]:
        return "unknown"
    return shape


def _nearest_position(x: float, y: float) -> Position:
    return min(POSITION_CENTRES, key=lambda p: math.dist((x, y), POSITION_CENTRES[p]))


def _measure(cut: np.ndarray, alpha: np.ndarray, colour: Colour) -> DetectedObject:
    h, w = cut.shape
    side = max(h, w)
    ys, xs = np.nonzero(cut)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box_centre = (float((x0 + x1) / 2 / w), float((y0 + y1) / 2 / h))
    features = shape_features(alpha)
    shape = classify_shape(features)
    mass = float(alpha.sum())
    if shape == "unknown":
        extent = max(x1 - x0, y1 - y0) / side
    else:
        extent = math.sqrt(mass / FILL[shape]) / side
    yy, xx = np.mgrid[0:h, 0:w]
    return DetectedObject(
        colour=colour,
        shape=shape,
        size="large" if extent > SIZE_THRESHOLD else "small",
        position=_nearest_position(*box_centre),
        centroid=(
            float(((alpha * xx).sum() / mass + 0.5) / w),
            float(((alpha * yy).sum() / mass + 0.5) / h),
        ),
        box_centre=box_centre,
        extent=float(extent),
        area=mass / (h * w),
        features=features,
    )


# ---------------------------------------------------------------------------------------------
# Reading a scene


def _background(
    rgb: np.ndarray, lab: np.ndarray, votes: np.ndarray, expected: Colour | None
) -> tuple[int, np.ndarray, np.ndarray]:
    """(named colour index, reference RGB, reference Lab) of the background, from the border."""
    h, w = votes.shape
    ring = max(1, round(min(h, w) / 32))  # 2 px at 64: objects never reach it in the world
    border = np.zeros((h, w), dtype=bool)
    border[:ring], border[-ring:], border[:, :ring], border[:, -ring:] = True, True, True, True
    counts = np.bincount(votes[border], minlength=len(_NAMES))
    index = int(counts.argmax())
    # The prompt's background wins only a genuinely mixed border (a gradient, a shape touching the
    # edge); it cannot turn a clearly different background into the asked-for one.
    if expected is not None and counts[_NAMES.index(expected)] >= 0.25 * counts.sum():
        index = _NAMES.index(expected)
    chosen = border & (votes == index)
    return index, np.median(rgb[chosen], axis=0), np.median(lab[chosen], axis=0)


def read_scene(image: ImageLike, *, expected_background: Colour | None = None) -> DetectedScene:
    """Detect the background and the objects of a shapes-world image of any size.

    `expected_background` (the prompt's, if it names one) only settles a border split between
    colours; a border that is clearly another colour is read as that colour.
    """
    rgb = _box_filter_3x3(_as_rgb(image))
    h, w = rgb.shape[:2]
    lab = srgb_to_lab(rgb)
    votes = _nearest_colour(lab)
    background, background_rgb, background_lab = _background(rgb, lab, votes, expected_background)
    distance = np.linalg.norm(lab - background_lab, axis=-1)  # Delta E from the background
    min_pixels = max(4, round(MIN_OBJECT_AREA * h * w))
    components = _components(distance > FOREGROUND_DELTA_E, min_pixels)

    objects = []
    for k, component in enumerate(components):
        # The pixels nearly as far from the background as the component gets are its pure colour;
        # the rest are edge blends of object and background (widened by blur and by the box
        # filter), which can land on a third named colour (green on blue blends to gray). The 95th
        # percentile rather than the maximum, so that a few noisy pixels do not set the bar.
        farthest = np.percentile(distance[component], 95)
        pure = component & (distance >= PURE_FRACTION * farthest)
        pure_votes = votes[pure]
        pure_votes = pure_votes[pure_votes != background]
        if pure_votes.size == 0:
            continue  # a blob in a background shade (shading, a gradient): not an object
        colour = int(np.bincount(pure_votes).argmax())
        pure &= votes == colour
        object_lab = np.median(lab[pure], axis=0)
        object_rgb = np.median(rgb[pure], axis=0)
        # Re-cut at the midpoint between this object's colour and the background's, so a blurred
        # edge is placed the same way for a low- and a high-contrast pair of colours.
        cut = component & (np.linalg.norm(lab - object_lab, axis=-1) < distance)
        if cut.sum() < min_pixels:
            continue
        # Coverage: where each pixel lies on the line from the background to the object colour
        # (blending is linear in the sRGB values that box downsampling and blur average). The
        # window reaches 2 px past the component for the faint edge, never into another object.
        window = _dilate(component, 2)
        for j, other in enumerate(components):
            if j != k:
                window &= ~other
        direction = object_rgb - background_rgb
        alpha = np.clip((rgb - background_rgb) @ direction / max(direction @ direction, 1e-9), 0, 1)
        alpha = np.where(window & (alpha >= MIN_ALPHA), alpha, 0.0)
        if alpha.sum() < min_pixels / 2:
            continue  # the Lab cut and the RGB coverage disagree: too faint to measure
        objects.append(_measure(cut, alpha, _NAMES[colour]))
    objects.sort(key=lambda o: -o.area)
    return DetectedScene(background=_NAMES[background], objects=tuple(objects))


# ---------------------------------------------------------------------------------------------
# Grading

GRADE_KEYS: tuple[str, ...] = (
    "colour",  # every named colour is present among the N largest detections (N named objects)
    "shape",  # every named shape is present among them
    "colour_shape",  # one-object prompts: the object has the named colour and shape
    "binding",  # two-object prompts: each named object is found with its colour AND its shape
    "position",  # every named object (matched by colour+shape) is in its named region
    "position_0",  # the first object of the scene is in its region
    "position_1",  # the second object (two-object prompts)
    "size",  # every matched object has its named size (only if the prompt names sizes)
    "background",  # the named background (only if the prompt names one)
    "count",  # exactly as many objects as the prompt names
)


def _contains_all(wanted: list[str], found: list[str]) -> bool:
    remaining = list(found)
    for item in wanted:
        if item not in remaining:
            return False
        remaining.remove(item)
    return True


def _match(
    wanted: tuple[ShapeObject, ...], candidates: tuple[DetectedObject, ...]
) -> list[DetectedObject | None]:
    """Greedy one-to-one matching of prompted to detected objects.

    Score 2 for the colour, 2 for the shape and 1 for the region: colour and shape decide who is
    who, the region only breaks ties. Highest score first; ties go to the earlier prompted object
    and then to the larger detection.
    """
    pairs = []
    for i, want in enumerate(wanted):
        for j, got in enumerate(candidates):
            score = (
                2 * (got.colour == want.colour)
                + 2 * (got.shape == want.shape)
                + (got.position == want.position)
            )
            pairs.append((-score, i, j))
    matched: list[DetectedObject | None] = [None] * len(wanted)
    used: set[int] = set()
    for _, i, j in sorted(pairs):
        if matched[i] is None and j not in used:
            matched[i] = candidates[j]
            used.add(j)
    return matched


def grade(prompt: EvalPrompt, image: ImageLike) -> dict[str, bool | None]:
    """Grade one image against its prompt; None marks a category the prompt does not test.

    A prompt naming N objects is graded on the N largest detections only. Matching among all of
    them would let an image full of assorted blobs pass by having one of everything; a stray blob
    smaller than the objects asked for costs nothing here, only `count`.
    """
    expected = prompt.scene.background if prompt.background_specified else None
    detected = read_scene(image, expected_background=expected)
    wanted = prompt.scene.objects
    candidates = detected.objects[: len(wanted)]  # largest first
    matched = _match(wanted, candidates)
    colour = _contains_all([o.colour for o in wanted], [o.colour for o in candidates])
    shape = _contains_all([o.shape for o in wanted], [o.shape for o in candidates])
    both = [
        got is not None and got.colour == want.colour and got.shape == want.shape
        for want, got in zip(wanted, matched)
    ]
    positions = [
        got is not None and got.position == want.position for want, got in zip(wanted, matched)
    ]
    sizes = [got is not None and got.size == want.size for want, got in zip(wanted, matched)]
    two = len(wanted) == 2
    return {
        "colour": colour,
        "shape": shape,
        "colour_shape": None if two else both[0],
        "binding": all(both) if two else None,
        "position": all(positions),
        "position_0": positions[0],
        "position_1": positions[1] if two else None,
        "size": all(sizes) if prompt.size_specified else None,
        "background": (
            detected.background == prompt.scene.background if prompt.background_specified else None
        ),
        "count": len(detected.objects) == len(wanted),
    }


def evaluate(images_by_prompt: Mapping[EvalPrompt, Iterable[ImageLike]]) -> dict[str, float]:
    """Accuracy per grade category over every image, counting only prompts the category applies to.

    Also reports `n_images`, and position split into `one_object.position` and
    `two_object.position`, so that the two can be compared. A category no prompt tests is left out
    rather than reported as 0.
    """
    tallies: dict[str, list[int]] = {}
    n_images = 0
    for prompt, images in images_by_prompt.items():
        group = "two_object" if len(prompt.scene.objects) == 2 else "one_object"
        for image in images:
            n_images += 1
            for key, value in grade(prompt, image).items():
                if value is None:
                    continue
                for name in (key, f"{group}.{key}") if key == "position" else (key,):
                    hits, total = tallies.setdefault(name, [0, 0])
                    tallies[name] = [hits + int(value), total + 1]
    result = {name: hits / total for name, (hits, total) in tallies.items()}
    result["n_images"] = float(n_images)
    return result
