"""The web UI's handlers: plain functions of a JobService, so tests call them without a browser
(webui.py lays out the page and wires its components to these).

Every generation builds the mode's own request type (pipelines.params) and goes through
`service.submit`, so the UI has exactly the limits, queue, batching and durability of
/v1 and /sdapi: it is one more client, not a second engine. A generation handler is a generator
that polls `service.get(job_id)` and yields progress, a preview and, at the end, the PNGs. Bad
input reaches the page as gr.Error, the one thing these need from Gradio.
"""

from __future__ import annotations

import io
import math
import secrets
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any

import gradio as gr
from PIL import Image, ImageChops

from ldm_engine.errors import UserInputError
from pipelines.params import GenerationParams, ImageToImageParams, InpaintParams
from pipelines.pnginfo import parse_parameters, read_png_text
from schedulers import SAMPLERS, get_sampler

from .jobs import FINAL_STATES, JobState
from .service import JobService, JobView, QueueFull

# How often a generation handler looks at its job: smooth enough for a step counter, and
# 5 SQLite reads a second per watching browser cost nothing next to a UNet step.
POLL_SECONDS = 0.2
# A1111's "-1": a fresh random seed per click (drawn here, so the job and its PNG record it).
RANDOM_SEED = -1
# A1111 draws random seeds below 2**32; they stay short enough to type back in.
SEED_RANGE = 2**32
# The request type of each tab.
MODES: dict[str, type[GenerationParams]] = {
    "txt2img": GenerationParams, "img2img": ImageToImageParams, "inpaint": InpaintParams}


def default(cls: type[GenerationParams], name: str) -> Any:
    """A request field's default: the request type is where defaults live (never the UI)."""
    return next(f.default for f in fields(cls) if f.name == name)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """What one tab's controls hold: the fields common to every mode, as the user set them."""

    prompt: str
    negative_prompt: str = ""
    sampler: str = default(GenerationParams, "sampler")       # registry name
    steps: int = default(GenerationParams, "steps")
    guidance_scale: float = default(GenerationParams, "guidance_scale")
    seed: int = RANDOM_SEED
    width: int | None = None                                  # None: the model's native size
    height: int | None = None
    batch: int = 1
    model: str | None = None                                  # None: the server's default


@dataclass(frozen=True, kw_only=True)
class Update:
    """One state of a followed job, as the UI shows it."""

    job_id: str
    state: JobState
    status: str                              # the progress line
    preview: Image.Image | None = None       # the latest x0 estimate while running
    images: tuple[tuple[str, str], ...] = ()  # (PNG path, caption) when done
    info: str = ""                           # the first image's A1111 parameters text


# --- building requests ---------------------------------------------------------------------

def _whole(name: str, value: Any) -> int:
    """A count from a control: Gradio sends numbers as floats; 20.0 is 20, 20.5 is refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserInputError(f"{name} must be a whole number, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise UserInputError(f"{name} must be a whole number, got {value!r}")
        value = int(value)
    return value


def _number(name: str, value: Any) -> float:
    """A decimal from a control (the request checks its range)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserInputError(f"{name} must be a number, got {value!r}")
    return float(value)


def resolve_seed(seed: Any) -> int:
    """-1 (or an empty box) draws a seed; anything else is checked by the request."""
    if seed is None or (not isinstance(seed, bool) and seed == RANDOM_SEED):
        return secrets.randbelow(SEED_RANGE)
    return _whole("seed", seed)


def build_request(mode: str, settings: Settings, *, image: Image.Image | None = None,
                  mask: Image.Image | None = None, strength: float | None = None
                  ) -> GenerationParams:
    """The mode's request for these settings (validated: one-line UserInputError)."""
    if mode not in MODES:
        raise UserInputError(f"unknown mode {mode!r}; the web UI has {', '.join(MODES)}")
    cls = MODES[mode]
    fields_: dict[str, Any] = dict(
        prompt=settings.prompt or "", negative_prompt=settings.negative_prompt or "",
        sampler=settings.sampler, steps=_whole("steps", settings.steps),
        guidance_scale=_number("CFG scale", settings.guidance_scale),
        seed=resolve_seed(settings.seed),
        width=None if settings.width is None else _whole("width", settings.width),
        height=None if settings.height is None else _whole("height", settings.height))
    if mode != "txt2img":
        if image is None:
            raise UserInputError(f"{mode} needs an image: upload one first")
        fields_["init_image"] = image
        if strength is not None:
            fields_["strength"] = _number("denoising strength", strength)
    if mode == "inpaint":
        fields_["mask"] = mask
    request = cls(**fields_)
    request.validate()
    return request


def editor_images(value: Mapping | None) -> tuple[Image.Image, Image.Image]:
    """(image, mask) from a gr.ImageMask value: the uploaded background, and white wherever
    any painted layer is not transparent (the brush's colour does not matter)."""
    background = None if value is None else value.get("background")
    if background is None:
        raise UserInputError("inpaint needs an image: upload one, then paint over the part to "
                             "repaint")
    image = background.convert("RGB")
    mask = Image.new("L", image.size, 0)
    for layer in value.get("layers") or ():
        if layer is None:
            continue
        alpha = layer.convert("RGBA").getchannel("A")
        if alpha.size != image.size:          # a layer is the canvas; the canvas is the image
            alpha = alpha.resize(image.size, Image.Resampling.NEAREST)
        mask = ImageChops.lighter(mask, alpha.point(lambda a: 255 if a else 0))
    if mask.getbbox() is None:
        raise UserInputError("the mask is empty: paint over the part of the image to repaint")
    return image, mask


def check_upload(image: Image.Image | None, service: JobService) -> None:
    """The server's pixel limit on an uploaded image (the HTTP API checks the same number)."""
    limit = service.config.limits.max_image_pixels
    if image is not None and image.width * image.height > limit:
        raise UserInputError(f"the image is {image.width}x{image.height}, over the "
                             f"{limit}-pixel limit of this server")


# --- following a job -----------------------------------------------------------------------

def _status(view: JobView) -> str:
    if view.state is JobState.QUEUED:
        ahead = view.queue_position or 0
        return "queued: next" if ahead == 0 else f"queued: {ahead} job(s) ahead"
    if view.state is JobState.RUNNING:
        pct = 100 * view.step // view.total if view.total else 0
        return f"running: step {view.step}/{view.total} ({pct}%)"
    if view.state is JobState.DONE:
        took = (view.finished or 0) - (view.started or view.created)
        return f"done: {len(view.outputs)} image(s) in {took:.1f} s"
    if view.state is JobState.CANCELLED:
        return f"cancelled after {view.step}/{view.total} steps"
    return f"failed: {view.error}"


def _update(view: JobView, preview: Image.Image | None) -> Update:
    images = ()
    if view.state is JobState.DONE:
        images = tuple((path, f"seed {seed}") for path, seed in zip(view.outputs, view.seeds))
    return Update(job_id=view.id, state=view.state, status=_status(view), preview=preview,
                  images=images, info=view.infos[0] if view.infos else "")


def follow(service: JobService, job_id: str, *, poll: float = POLL_SECONDS) -> Iterator[Update]:
    """Updates of a job until it finishes (the last one is DONE or CANCELLED; FAILED raises
    gr.Error with the job's one-line error). Closing the generator (the browser left, or Gradio
    cancelled the event) cancels the job: nobody is waiting for its images."""
    shown: bytes | None = None
    preview = None
    last = None
    try:
        while True:
            view = service.get(job_id)
            if view is None:
                raise gr.Error(f"job {job_id} is gone", print_exception=False)
            if view.preview is not None and view.preview != shown:
                shown = view.preview
                preview = Image.open(io.BytesIO(view.preview))
                preview.load()
            if view.state in FINAL_STATES:
                break
            update = _update(view, preview)
            if update != last:
                yield update
                last = update
            time.sleep(poll)
    except GeneratorExit:
        service.cancel(job_id)
        raise
    if view.state is JobState.FAILED:
        raise gr.Error(view.error or "the generation failed", print_exception=False)
    yield _update(view, None)


def generate(service: JobService, mode: str, settings: Settings, *,
             image: Image.Image | None = None, editor: Mapping | None = None,
             strength: float | None = None, poll: float = POLL_SECONDS) -> Iterator[Update]:
    """Submit one tab's generation and follow it: the Generate button's handler.

    Bad input is a gr.Error with the one-line UserInputError message (nothing is queued); a
    full queue is a gr.Error saying when to retry, at once, rather than a wait."""
    try:
        mask = None
        if mode == "inpaint":
            image, mask = editor_images(editor)
        check_upload(image, service)
        request = build_request(mode, settings, image=image, mask=mask, strength=strength)
        view = service.submit(request, num_images=_whole("batch size", settings.batch),
                              model=settings.model or None)
    except UserInputError as e:
        raise gr.Error(str(e), print_exception=False) from None
    except QueueFull as e:
        raise gr.Error(f"the server's queue is full; try again in {math.ceil(e.retry_after)} s",
                       print_exception=False) from None
    yield from follow(service, view.id, poll=poll)


def cancel(service: JobService, job_id: str | None) -> str:
    """The Cancel button: a queued job stops at once, a running one at its next step (the
    generation handler then sees CANCELLED and ends)."""
    if not job_id:
        return "nothing to cancel"
    view = service.cancel(job_id)
    if view is None:
        return "nothing to cancel"
    if view.state in (JobState.DONE, JobState.FAILED):
        return _status(view)
    return "cancelling..."


# --- PNG info ------------------------------------------------------------------------------

def png_info(path: str | None) -> str:
    """The A1111 `parameters` text of an uploaded PNG ("" when the upload was cleared)."""
    if not path:
        return ""
    try:
        return read_png_text(path)
    except UserInputError as e:
        raise gr.Error(str(e), print_exception=False) from None


def replay(service: JobService, text: str) -> tuple[Settings, list[str]]:
    """The txt2img settings a `parameters` text describes, and what the txt2img controls cannot
    reproduce (each a short note). With none, generating again makes the same image."""
    if not (text or "").strip():
        raise gr.Error("no parameters to re-play: upload a PNG made by this engine or A1111",
                       print_exception=False)
    try:
        params = parse_parameters(text)
    except UserInputError as e:
        raise gr.Error(str(e), print_exception=False) from None
    if params.sampler not in SAMPLERS:
        raise gr.Error(f"the image was made with sampler {params.sampler!r}, which this engine "
                       "does not have", print_exception=False)
    notes = []
    if params.mode != "txt2img":
        notes.append(f"it was made by {params.mode}: only its text-to-image settings are filled")
    if params.eta is not None and params.eta != get_sampler(params.sampler).default_eta:
        notes.append(f"its eta {params.eta} is not the sampler's default")
    if params.clip_skip != 1:
        notes.append(f"its clip skip is {params.clip_skip}")
    if params.hires is not None:
        notes.append("it used the hires fix")
    served = {m["name"]: m for m in service.models()}
    model = params.model if params.model in served else None
    if params.model and model is None:
        notes.append(f"its model {params.model!r} is not served here")
    elif model is not None and params.model_hash and params.model_hash != served[model]["hash"]:
        notes.append(f"its model hash {params.model_hash} is not this {model}'s")
    # What the server fixed when it loaded the model (precision, approximations).
    loaded = service.pipeline(model).pixel_settings()
    for name, value in loaded.items():
        if getattr(params, name) != value:
            notes.append(f"its {name.replace('_', ' ')} is {getattr(params, name)}, this "
                         f"server's is {value}")
    settings = Settings(prompt=params.prompt, negative_prompt=params.negative_prompt,
                        sampler=params.sampler, steps=params.steps,
                        guidance_scale=params.guidance_scale, seed=params.seed,
                        width=params.width, height=params.height, batch=1, model=model)
    return settings, notes


def selected_image(gallery: list | None, index: int | None) -> str | None:
    """The path of the gallery image at `index` (Gradio gives a list of (path, caption))."""
    if not gallery:
        raise gr.Error("no image to send: generate one first", print_exception=False)
    item = gallery[index if index is not None and 0 <= index < len(gallery) else 0]
    return item[0] if isinstance(item, (tuple, list)) else item


def native_size(service: JobService, model: str | None) -> tuple[int, int]:
    """(width, height) a model makes by default."""
    models = service.models()
    entry = next((m for m in models if m["name"] == model), None) or next(
        (m for m in models if m.get("default")), models[0])
    size = entry["native_size"]
    if isinstance(size, (int, float)):
        return int(size), int(size)
    height, width = size          # (height, width), as the networks see it
    return int(width), int(height)
