"""Hard negative captions for the contrastive CLIP loss (NegCLIP, Yuksekgonul et al., ICLR 2023).

A CLIP trained only against the other captions of its batch can match images to captions as bags
of words: "a red circle above a blue square" and "a blue circle above a red square" contain the
same words, and a random batch almost never holds both, so nothing teaches the towers which colour
goes with which shape. NegCLIP adds, for each image, a caption that is wrong in exactly one
attribute binding (two objects' colours or shapes swapped, one colour or shape replaced, the
relation reversed), so the image must score its own caption above a near copy.

A negative never names a held-out combination (train/shapes.py): the held-out pairs stay unseen
in text as well as in images, so `ldm eval` still measures composition.

Negatives are made by rewriting the caption's words, not by re-captioning a scene, so a caption
from any template keeps its template. Captions outside the shapes grammar (an imagefolder) get no
negative (they are marked invalid and masked out of the loss).
"""

from __future__ import annotations

import re
import zlib

import numpy as np

from .shapes import (HELDOUT_PAIRS, HELDOUT_TRIPLES, OBJECT_COLOURS, RELATION_PHRASES, SHAPES,
                     parse_caption)

# One object's words: article, optional size, colour, shape ("an orange circle", "a small red
# square"). Background colours are never matched: they are not followed by a shape word.
_OBJECT = re.compile(r"\b(an?) (?:(small|large) )?(" + "|".join(OBJECT_COLOURS) + r") ("
                     + "|".join(SHAPES) + r")\b")
# Relations and absolute positions, each with its mirror image.
_MIRROR = {**{phrase: RELATION_PHRASES[(b, a)] for (a, b), phrase in RELATION_PHRASES.items()},
           "on the left": "on the right", "on the right": "on the left",
           "at the top": "at the bottom", "at the bottom": "at the top"}
_MIRROR_RE = re.compile("|".join(re.escape(p) for p in sorted(_MIRROR, key=len, reverse=True)))

KINDS = ("swap_colours", "swap_shapes", "replace_colour", "replace_shape", "mirror")


def _phrase(size: str | None, colour: str, shape: str) -> str:
    words = ([size] if size else []) + [colour, shape]
    return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


def negative(caption: str, kind: str, rng: np.random.Generator) -> str | None:
    """`caption` with one binding broken as `kind` says, or None when that kind does not apply
    (a one-object caption has nothing to swap) or the caption is not a shapes-world caption."""
    objects = list(_OBJECT.finditer(caption))
    if not objects:
        return None
    parts = [(m.group(2), m.group(3), m.group(4)) for m in objects]
    if kind in ("swap_colours", "swap_shapes"):
        if len(parts) != 2:
            return None
        (s1, c1, h1), (s2, c2, h2) = parts
        if kind == "swap_colours":
            parts = [(s1, c2, h1), (s2, c1, h2)]
        else:
            if h1 == h2:
                return None
            parts = [(s1, c1, h2), (s2, c2, h1)]
    elif kind in ("replace_colour", "replace_shape"):
        k = int(rng.integers(len(parts)))
        size, colour, shape = parts[k]
        if kind == "replace_colour":
            # Not a colour of the scene: replacing one object's colour by the other's would
            # describe a different but also wrong scene, which swap_colours already covers.
            used = {c for _, c, _ in parts}
            colour = str(rng.choice([c for c in OBJECT_COLOURS if c not in used]))
        else:
            shape = str(rng.choice([s for s in SHAPES if s != shape]))
        parts[k] = (size, colour, shape)
    elif kind == "mirror":
        if not _MIRROR_RE.search(caption):
            return None
        return _MIRROR_RE.sub(lambda m: _MIRROR[m.group(0)], caption)
    else:
        raise ValueError(f"unknown negative kind {kind!r}; expected one of {', '.join(KINDS)}")
    out, last = [], 0
    for m, (size, colour, shape) in zip(objects, parts):
        out += [caption[last:m.start()], _phrase(size, colour, shape)]
        last = m.end()
    text = "".join(out) + caption[last:]
    return None if text == caption else text


def names_held_out(caption: str) -> bool:
    """Whether a shapes-world caption names a held-out (colour, shape) or (colour, shape,
    position) combination."""
    try:
        spec = parse_caption(caption)
    except ValueError:
        return False
    return any((o.colour, o.shape) in HELDOUT_PAIRS or
               (o.colour, o.shape, o.position) in HELDOUT_TRIPLES for o in spec.objects)


def negatives_for(caption: str, count: int, seed: int = 0) -> list[str | None]:
    """`count` hard negatives of one caption, deterministic in (caption, seed): the kinds that
    apply, taken in a seeded order and cycled; None where no kind applies."""
    rng = np.random.default_rng(zlib.crc32(f"{seed}/{caption}".encode()))
    kinds = [KINDS[k] for k in rng.permutation(len(KINDS))]
    found = []
    for kind in kinds:
        text = negative(caption, kind, rng)
        if text is not None and not names_held_out(text):
            found.append(text)
    if not found:
        return [None] * count
    return [found[k % len(found)] for k in range(count)]
