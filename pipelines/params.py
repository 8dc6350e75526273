"""What one generated image was made with, validated before any compute.

Its PNG form (the AUTOMATIC1111 ``parameters`` text) is in ``pipelines.pnginfo``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ldm_engine.errors import UserInputError
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
        """The A1111 ``parameters`` text (see pipelines.pnginfo)."""
        from .pnginfo import format_parameters
        return format_parameters(self)

    @classmethod
    def from_png_text(cls, text: str) -> "GenerationParams":
        from .pnginfo import parse_parameters
        return parse_parameters(text)

    def replace(self, **changes) -> "GenerationParams":
        return dataclasses.replace(self, **changes)


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
