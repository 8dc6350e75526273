"""How well a shapes-world CLIP sees what its captions say, on scenes it never trained on.

- Zero-shot classification (Radford et al. 2021, Sec. 3.1.4) of held-out one-object scenes: the
  object's colour among the 7 object colours, and its shape among the 3 shapes, each label's text
  embedding averaged over prompt templates (CLIP's ensembling; for colours the templates name each
  shape, "a {} circle", ..., and for shapes each colour, "a red {}", ...).
- Binding: on held-out two-object scenes, how often the image scores its caption above the same
  caption with the two colours swapped (or the two shapes), the bag-of-words failure NegCLIP
  targets; 50 % is chance.

    python -m train.clip_eval ldm_engine/models/default
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import torch

from ldm_engine.clip import ClipModel, load_clip

from .negatives import negative
from .shapes import OBJECT_COLOURS, SHAPES, Scene, Split, caption, render, sample_scene

EVAL_SEED = 20261201


@dataclass(frozen=True)
class ClipEval:
    colour: float             # zero-shot colour accuracy, one-object scenes of the split
    shape: float              # zero-shot shape accuracy, same scenes
    binding_colours: float    # P(caption beats its colour swap), two-object scenes
    binding_shapes: float     # P(caption beats its shape swap), same
    n_single: int
    n_pairs: int

    def table(self) -> str:
        return "\n".join([
            "| measure | scenes | result |", "|---|---|---|",
            f"| zero-shot colour (7 labels) | {self.n_single} one-object | {self.colour:.1%} |",
            f"| zero-shot shape (3 labels) | {self.n_single} one-object | {self.shape:.1%} |",
            f"| caption beats colour swap | {self.n_pairs} two-object | "
            f"{self.binding_colours:.1%} |",
            f"| caption beats shape swap | {self.n_pairs} two-object | "
            f"{self.binding_shapes:.1%} |"])


def scenes_with(n: int, objects: int, seed: int = EVAL_SEED,
                   split: Split = "heldout") -> list[Scene]:
    """n scenes of `split` with `objects` objects each (seeded; the same list every call)."""
    rng = np.random.default_rng(seed + objects)
    out: list[Scene] = []
    while len(out) < n:
        scene = sample_scene(rng, split=split)
        if len(scene.objects) == objects:
            out.append(scene)
    return out


@torch.no_grad()
def evaluate_clip(clip: ClipModel, *, size: int = 64, n_single: int = 300, n_pairs: int = 300,
                  seed: int = EVAL_SEED, split: Split = "heldout") -> ClipEval:
    rng = np.random.default_rng(seed)
    singles = scenes_with(n_single, 1, seed, split)
    images = [render(s, size, rng=rng) for s in singles]
    colour_probs = clip.classify(images, list(OBJECT_COLOURS),
                                 templates=[f"a {{}} {shape}" for shape in SHAPES])
    shape_probs = clip.classify(images, list(SHAPES),
                                templates=[f"a {colour} {{}}" for colour in OBJECT_COLOURS])
    colour_ok = [OBJECT_COLOURS[int(k)] == s.objects[0].colour
                 for k, s in zip(colour_probs.argmax(-1), singles)]
    shape_ok = [SHAPES[int(k)] == s.objects[0].shape
                for k, s in zip(shape_probs.argmax(-1), singles)]

    pairs = scenes_with(n_pairs, 2, seed, split)
    pair_images = [render(s, size, rng=rng) for s in pairs]
    wins = {}
    for kind in ("swap_colours", "swap_shapes"):
        ok = []
        for scene, image in zip(pairs, pair_images):
            text = caption(scene, rng)
            wrong = negative(text, kind, rng)
            if wrong is None:           # two objects of one shape: nothing to swap
                continue
            sim = clip.similarity([image], [text, wrong])[0]
            ok.append(bool(sim[0] > sim[1]))
        wins[kind] = float(np.mean(ok)) if ok else float("nan")
    return ClipEval(colour=float(np.mean(colour_ok)), shape=float(np.mean(shape_ok)),
                    binding_colours=wins["swap_colours"], binding_shapes=wins["swap_shapes"],
                    n_single=n_single, n_pairs=n_pairs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.clip_eval", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("clip", help="a model folder with its CLIP, or any CLIP ldm_engine.clip loads")
    p.add_argument("--size", type=int, default=64, help="rendered scene size (px)")
    p.add_argument("--split", choices=("heldout", "train"), default="heldout",
                   help="the scenes: held-out combinations (default) or training ones")
    args = p.parse_args(argv)
    print(evaluate_clip(load_clip(args.clip), size=args.size, split=args.split).table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
