"""What one generated image was made with, validated before any compute, and its PNG form.

Saved PNGs carry the parameters in a ``parameters`` text chunk in the AUTOMATIC1111 layout that
image browsers and other UIs already read::

    a red circle on the left
    Negative prompt: blurry
    Steps: 20, Sampler: ddim, CFG scale: 7.5, Seed: 42, Size: 512x512, Eta: 0.0, Model: default

so ``ldm generate --from-image x.png`` can make the same image again.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass

from PIL import Image, PngImagePlugin

from ldm_engine.errors import UserInputError
from ldm_engine.fsutil import atomic_path
from schedulers import SAMPLERS


@dataclass(frozen=True, kw_only=True)
class GenerationParams:
    prompt: str
    negative_prompt: str = ""
    steps: int = 50
    guidance_scale: float = 7.5
    sampler: str = "ddim"
    eta: float = 0.0
    height: int = 512
    width: int = 512
    seed: int = 0
    model: str = ""

    def validate(self, vae_factor: int = 8) -> None:
        check_request(steps=self.steps, guidance_scale=self.guidance_scale, sampler=self.sampler,
                      eta=self.eta, height=self.height, width=self.width, vae_factor=vae_factor)

    def to_png_text(self) -> str:
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        fields = [("Steps", self.steps), ("Sampler", self.sampler),
                  ("CFG scale", _num(self.guidance_scale)), ("Seed", self.seed),
                  ("Size", f"{self.width}x{self.height}"), ("Eta", _num(self.eta))]
        if self.model:
            fields.append(("Model", self.model))
        lines.append(", ".join(f"{k}: {v}" for k, v in fields))
        return "\n".join(lines)

    @classmethod
    def from_png_text(cls, text: str) -> "GenerationParams":
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
            return cls(prompt="\n".join(body), negative_prompt=negative,
                       steps=int(settings["Steps"]), guidance_scale=float(settings["CFG scale"]),
                       sampler=settings["Sampler"].lower(), eta=float(settings.get("Eta", 0.0)),
                       height=height, width=width, seed=int(settings["Seed"]),
                       model=settings.get("Model", ""))
        except (KeyError, ValueError) as e:
            raise UserInputError(f"PNG parameters are incomplete or malformed ({e})") from None

    def replace(self, **changes) -> "GenerationParams":
        return dataclasses.replace(self, **changes)


_SETTINGS_LINE = re.compile(r"^(?:[A-Za-z][\w ]*: [^,]*)(?:, [A-Za-z][\w ]*: [^,]*)*$")


def _parse_settings(line: str):
    for part in line.split(", "):
        key, _, value = part.partition(": ")
        yield key.strip(), value.strip()


def _num(x: float) -> str:
    return repr(float(x))


def check_request(*, steps: int, guidance_scale: float, sampler: str, eta: float, height: int,
                  width: int, vae_factor: int = 8) -> None:
    """Every input error the pipeline can know about before touching a network."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
        raise UserInputError(f"steps must be a positive integer, got {steps!r}")
    for name, side in (("height", height), ("width", width)):
        if not isinstance(side, int) or isinstance(side, bool) or side <= 0:
            raise UserInputError(f"{name} must be a positive integer, got {side!r}")
        if side % vae_factor:
            lower = max(vae_factor, side - side % vae_factor)
            raise UserInputError(
                f"{name} {side} is not a multiple of {vae_factor} (the VAE's downsampling factor);"
                f" use {lower} or {lower + vae_factor}")
    if not math.isfinite(guidance_scale):
        raise UserInputError(f"guidance scale must be a finite number, got {guidance_scale!r}")
    if not math.isfinite(eta) or eta < 0:
        raise UserInputError(f"eta must be a finite number >= 0, got {eta!r}")
    if sampler not in SAMPLERS:
        raise UserInputError(
            f"unknown sampler {sampler!r}; valid samplers: {', '.join(sorted(SAMPLERS))}")


def save_png(image: Image.Image, path: str | os.PathLike, params: GenerationParams) -> None:
    """Write a PNG with its parameters chunk, atomically (temp file, fsync, rename)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", params.to_png_text())
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
    return GenerationParams.from_png_text(text)
