"""`ldm eval`: how well a shapes-world model draws prompts whose attribute combinations it never saw.

Every held-out prompt (train/shapes.py) is generated with a few fixed seeds, with and without
classifier-free guidance, and graded by the pixel oracle (train/oracle.py): colour, shape, their
conjunction, position, and for two-object prompts whether each colour is bound to the right shape.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines import TextToImage

from .oracle import evaluate
from .shapes import EvalPrompt, heldout_eval_prompts

# Categories reported, in order; the targets are the bars for the bundled model.
CATEGORIES = ("colour_shape", "colour", "shape", "position", "one_object.position",
              "two_object.position", "binding", "background")
TARGETS = {"colour_shape": 0.90, "position": 0.85, "binding": 0.60}


@dataclass(frozen=True)
class EvalSettings:
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 25
    guidances: tuple[float, ...] = (1.0, 5.0)
    sampler: str = "ddim"
    batch: int = 16
    # Candidates per image, the best by the model's CLIP kept (pipelines.rerank); 1: no rerank.
    rerank: int = 1


def generate_for(pipe: TextToImage, prompts: list[EvalPrompt], guidance: float,
                 settings: EvalSettings) -> dict[EvalPrompt, list[Image.Image]]:
    out: dict[EvalPrompt, list[Image.Image]] = {p: [] for p in prompts}
    for seed in settings.seeds:
        for start in range(0, len(prompts), settings.batch):
            chunk = prompts[start:start + settings.batch]
            # Prompt k of the list always gets seed 10_000 * seed + k, whatever the batching
            # (and with rerank its candidates the seeds pipelines.rerank derives from it).
            res = pipe([p.prompt for p in chunk], num_inference_steps=settings.steps,
                       guidance_scale=guidance, sampler=settings.sampler,
                       seed=10_000 * seed + start, rerank=settings.rerank, progress=False)
            for p, image in zip(chunk, res.images):
                out[p].append(image)
    return out


def run_eval(model: str | os.PathLike, settings: EvalSettings = EvalSettings(),
             grid: str | os.PathLike | None = None) -> dict[float, dict[str, float]]:
    pipe = TextToImage.from_folder(model)
    prompts = heldout_eval_prompts()
    results = {}
    for g in settings.guidances:
        images = generate_for(pipe, prompts, g, settings)
        results[g] = evaluate(images)
        if grid is not None and g == max(settings.guidances):
            save_grid(images, Path(grid))
    return results


def save_grid(images: dict[EvalPrompt, list[Image.Image]], path: Path, columns: int = 12) -> None:
    """The first image of each prompt, tiled, for the README."""
    tiles = [np.asarray(v[0]) for v in images.values()]
    rows = [np.concatenate(tiles[k:k + columns] + [np.zeros_like(tiles[0])] *
                           (columns - len(tiles[k:k + columns])), axis=1)
            for k in range(0, len(tiles), columns)]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def format_results(results: dict[float, dict[str, float]]) -> str:
    gs = sorted(results)
    n_prompts = len(heldout_eval_prompts())
    n = int(results[gs[0]].get("n_images", 0))
    head = "| category | " + " | ".join(
        "no guidance" if g == 1.0 else f"guidance {g:g}" for g in gs) + " | target |"
    lines = [f"held-out prompts: {n_prompts}, images per guidance setting: {n}", "", head,
             "|---" * (len(gs) + 2) + "|"]
    for cat in CATEGORIES:
        if cat not in results[gs[0]]:
            continue
        target = f"{TARGETS[cat]:.0%}" if cat in TARGETS else ""
        lines.append(f"| {cat} | " + " | ".join(f"{results[g][cat]:.1%}" for g in gs) +
                     f" | {target} |")
    return "\n".join(lines)
