"""The pipelines by name, the way samplers have one registry (schedulers.SAMPLERS).

Each entry is a Pipeline subclass whose MODE says what it adds to the shared Pipeline.run, and
whose request type (MODE.request) holds everything that decides its images. Any loaded pipeline
runs any mode's request: ``pipe.run(InpaintParams(...))`` on a TextToImage shares its networks.
"""

from __future__ import annotations

from ldm_engine.errors import UserInputError

from .base import Pipeline
from .modes import Mode
from .img2img import ImageToImage
from .inpaint import Inpaint, Outpaint
from .params import GenerationParams
from .txt2img import TextToImage
from .unclip import Edit, Interpolate, Vary

PIPELINES: dict[str, type[Pipeline]] = {
    "txt2img": TextToImage,
    "img2img": ImageToImage,
    "inpaint": Inpaint,
    "outpaint": Outpaint,
    "vary": Vary,
    "interpolate": Interpolate,
    "edit": Edit,
}


def get_pipeline(name: str) -> type[Pipeline]:
    """The Pipeline class registered as `name`; a clear error lists the valid names."""
    try:
        return PIPELINES[name]
    except (KeyError, TypeError):
        raise UserInputError(f"unknown pipeline {name!r}; valid pipelines: "
                             f"{', '.join(PIPELINES)}") from None


def mode_of(request: GenerationParams) -> Mode:
    """The mode that runs a request (by its type's `mode` name)."""
    mode = get_pipeline(request.mode).MODE
    if type(request) is not mode.request:
        raise UserInputError(f"a {type(request).__name__} is not a {mode.name} request "
                             f"({mode.request.__name__})")
    return mode
