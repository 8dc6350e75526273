"""Pipelines: each prepares starting latents and runs the one shared denoising loop."""

import ldm_engine  # noqa: F401  (first: sets torch's allocator options before torch loads)

from .base import GenerationResult, Pipeline
from .params import GenerationParams
from .pnginfo import InexactRemakeWarning, read_png_params, save_png
from .txt2img import TextToImage

__all__ = ["GenerationParams", "GenerationResult", "InexactRemakeWarning", "Pipeline",
           "TextToImage", "read_png_params", "save_png"]
