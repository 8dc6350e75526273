"""GenerationParams in a PNG: the AUTOMATIC1111 ``parameters`` text chunk.

Saved PNGs carry the parameters in the layout that image browsers and other UIs already read::

    a red circle on the left
    Negative prompt: blurry
    Steps: 20, Sampler: ddim, CFG scale: 7.5, Seed: 42, Size: 512x512, Eta: 0.0, Model: default

so ``ldm generate --from-image x.png`` can make the same image again.
"""

from __future__ import annotations

import os
import re

from PIL import Image, PngImagePlugin

from ldm_engine.errors import UserInputError
from ldm_engine.fsutil import atomic_path

from .params import GenerationParams


def format_parameters(params: GenerationParams) -> str:
    lines = [params.prompt]
    if params.negative_prompt:
        lines.append(f"Negative prompt: {params.negative_prompt}")
    fields = [("Steps", params.steps), ("Sampler", params.sampler),
              ("CFG scale", _num(params.guidance_scale)), ("Seed", params.seed),
              ("Size", f"{params.width}x{params.height}"), ("Eta", _num(params.eta))]
    if params.model:
        fields.append(("Model", params.model))
    lines.append(", ".join(f"{k}: {v}" for k, v in fields))
    return "\n".join(lines)


def parse_parameters(text: str) -> GenerationParams:
    lines = text.rstrip("\n").split("\n")
    if not lines or not _SETTINGS_LINE.match(lines[-1]):
        raise UserInputError("PNG parameters have no settings line (Steps: ..., Seed: ...)")
    settings = dict(_parse_settings(lines[-1]))
    body = lines[:-1]
    negative = ""
    for k, line in enumerate(body):
        if line.startswith("Negative prompt: "):
            negative = "\n".join([line[len("Negative prompt: "):]] + body[k + 1:])
            body = body[:k]
            break
    try:
        width, height = (int(v) for v in settings["Size"].split("x"))
        return GenerationParams(
            prompt="\n".join(body), negative_prompt=negative, steps=int(settings["Steps"]),
            guidance_scale=float(settings["CFG scale"]), sampler=settings["Sampler"].lower(),
            eta=float(settings.get("Eta", 0.0)), height=height, width=width,
            seed=int(settings["Seed"]), model=settings.get("Model", ""))
    except (KeyError, ValueError) as e:
        raise UserInputError(f"PNG parameters are incomplete or malformed ({e})") from None


_SETTINGS_LINE = re.compile(r"^(?:[A-Za-z][\w ]*: [^,]*)(?:, [A-Za-z][\w ]*: [^,]*)*$")


def _parse_settings(line: str):
    for part in line.split(", "):
        key, _, value = part.partition(": ")
        yield key.strip(), value.strip()


def _num(x: float) -> str:
    return repr(float(x))


def save_png(image: Image.Image, path: str | os.PathLike, params: GenerationParams) -> None:
    """Write a PNG with its parameters chunk, atomically (temp file, fsync, rename)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", format_parameters(params))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def read_png_params(path: str | os.PathLike) -> GenerationParams:
    try:
        with Image.open(path) as im:
            text = im.text.get("parameters") if hasattr(im, "text") else None
    except (OSError, FileNotFoundError) as e:
        raise UserInputError(f"cannot read image {path}: {e}") from None
    if not text:
        raise UserInputError(f"{path} carries no generation parameters (no 'parameters' PNG chunk)")
    return parse_parameters(text)
