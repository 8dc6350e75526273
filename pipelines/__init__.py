"""Pipelines: each prepares starting latents and runs the one shared denoising loop."""

from .base import GenerationResult, Pipeline
from .img2img import ImageToImage
from .inpaint import Inpaint, Outpaint
from .observe import CancelToken, Observer, Previews, Progress, ProgressBar
from .params import (GenerationParams, HiresFix, ImageToImageParams, InpaintParams,
                     OutpaintParams)
from .pnginfo import InexactRemakeWarning, read_png_params, save_png
from .registry import PIPELINES, get_pipeline
from .txt2img import TextToImage
from .unclip import Edit, Interpolate, Vary, save_sequence

__all__ = ["CancelToken", "GenerationParams", "GenerationResult", "HiresFix", "ImageToImage",
           "ImageToImageParams", "InexactRemakeWarning", "Inpaint", "InpaintParams", "Observer",
           "Outpaint", "OutpaintParams", "PIPELINES", "Pipeline", "Previews", "Progress",
           "ProgressBar", "TextToImage", "get_pipeline",
           "Edit", "Interpolate", "Vary", "save_sequence", "read_png_params", "save_png"]
