"""Reading AUTOMATIC1111's txt2img / img2img bodies into the engine's own requests, and writing
A1111's answers (`info`, png-info, progress) back: the mapping behind /sdapi/v1 (a1111.py).

The field names, base64 images and `info` JSON are the SD web UI's (its modules/api/models.py,
api.py and processing.py's Processed.js()), so clients written for it (the `webuiapi` package,
scripts, image browsers) work unchanged. A body is mapped INTO the engine's own request types
(pipelines.params), never into a parallel parameter set, and runs as an ordinary job:

    prompt, negative_prompt, steps, width, height, eta   the request's fields of the same name
    cfg_scale                                            guidance_scale
    seed (-1 or absent: random)                          seed, resolved here, sent back in info
    sampler_name (or sampler_index) + scheduler          sampler (pipelines.sampler_names)
    batch_size x n_iter                                  num_images (image k: seed + k, as A1111)
    override_settings.CLIP_stop_at_last_layers           clip_skip
    override_settings.sd_model_checkpoint                which served model ("name [hash]" too)
    enable_hr, hr_scale, hr_upscaler, hr_second_pass_steps, denoising_strength    HiresFix
    img2img: init_images, denoising_strength, resize_mode  ImageToImageParams
    img2img with a mask: mask_blur, inpaint_full_res(_padding), inpainting_mask_invert
                                                         InpaintParams

A field left out takes the request type's default (defaults live there only), except the seed:
A1111 clients leave it out to get a new image each call. Fields that change nothing here are
accepted only at the values where ignoring them is exact (restore_faces false, subseed_strength
0, styles [], ...); any other value, and any field A1111 does not have, is a 400 naming it, so
no request is quietly answered with a different image than it asked for.
"""

from __future__ import annotations

import base64
import io
import json
import math
import random
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ldm_engine.errors import UserInputError
from pipelines.jsonform import decode_image, json_type
from pipelines.params import GenerationParams, HiresFix, ImageToImageParams, InpaintParams
from pipelines.pnginfo import (RESIZE_NAMES, UPSCALER_NAMES, engine_version,
                               parse_parameters)
from pipelines.sampler_names import (A1111_AUTOMATIC, SCHEDULE_SUFFIXES, STEPPER_NAMES,
                                     a1111_fields, from_a1111, split_name)
from pipelines.prompts import check_clip_skip
from schedulers import SAMPLERS

from .jobs import JobView

PREFIX = "/sdapi/v1"
# A1111's random seed: random.randrange(4294967294) (processing.get_fixed_seed).
SEED_RANGE = 4294967294
# img2img "resize_mode": 0 just resize, 1 crop and resize, 2 resize and fill (3, "just resize
# (latent upscale)", resizes the latents: this engine has no such mode).
RESIZE_MODES = {0: "just-resize", 1: "crop", 2: "fill"}
# inpainting_fill: what A1111 puts under the mask before noising. This engine's inpainting
# noises the original image there, A1111's 1 ("original"); 0 fill, 2 latent noise and 3 latent
# nothing have no counterpart.
INPAINT_ORIGINAL = 1
# A1111's hires upscaler names -> HiresFix.upscaler.
HIRES_UPSCALERS = {name: key for key, name in UPSCALER_NAMES.items()}
# A1111's "same as the first pass" spellings of the hires-only overrides.
SAME = {"hr_checkpoint_name": "Use same checkpoint", "hr_sampler_name": "Use same sampler",
        "hr_scheduler": "Use same scheduler"}


# --- values -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class A1111Job:
    """What one txt2img / img2img body asks for, in the engine's terms."""

    request: GenerationParams
    num_images: int                 # batch_size x n_iter
    batch_size: int                 # A1111's, only reported back (info's batch_size)
    model: str | None               # a served model's name; None: the current default
    send_images: bool


@dataclass(frozen=True)
class Options:
    """The settings /options reads and writes: the model used when a body names none (None:
    the service's default) and the Clip skip used when override_settings gives none."""

    model: str | None = None
    clip_skip: int = 1


class HTTPFailure(Exception):
    """A request refused with a status other than 400 (404 unknown model, 429, 500)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers


# --- reading a body ---------------------------------------------------------------------------

class _Fields:
    """A JSON body read field by field; a field never read is an unknown one. A null field is
    an absent one (A1111's models make every field Optional, None meaning its default)."""

    def __init__(self, data: dict, where: str):
        self.data, self.where, self.seen = data, where, set()

    def raw(self, key: str) -> Any:
        self.seen.add(key)
        return self.data.get(key)

    def integer(self, key: str, default: int | None = None, *,
                low: int | None = None) -> int | None:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserInputError(f"{key} must be an integer, got {json_type(value)}")
        if low is not None and value < low:
            raise UserInputError(f"{key} must be >= {low}, got {value}")
        return value

    def number(self, key: str) -> float | None:
        value = self.raw(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
                value):
            raise UserInputError(f"{key} must be a finite number, got {json_type(value)}")
        return float(value)

    def text(self, key: str) -> str | None:
        value = self.raw(key)
        if value is not None and not isinstance(value, str):
            raise UserInputError(f"{key} must be a string, got {json_type(value)}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        """A boolean; 0 and 1 too (A1111's UI sends some of these as radio-button indices)."""
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        raise UserInputError(f"{key} must be true or false, got {json_type(value)}")

    def neutral(self, table: tuple[tuple[str, Callable[[Any], bool], str], ...]) -> None:
        """Fields accepted and ignored, each only at values where ignoring it is exact."""
        for key, exact, why in table:
            value = self.raw(key)
            if value is not None and not exact(value):
                raise UserInputError(f"{key}={json.dumps(value)[:60]} is not supported: {why}")

    def finish(self, ignored: tuple[str, ...]) -> None:
        self.seen.update(ignored)
        unknown = [k for k in self.data if k not in self.seen]
        if unknown:
            raise UserInputError(f"unknown field {unknown[0][:60]!r} for {self.where}")


def _off(v: object) -> bool:
    return v is False or v == 0


def _empty(v: object) -> bool:
    return v in ("", [], {}, ())


def _zero(v: object) -> bool:
    return not isinstance(v, bool) and v == 0


def _one(v: object) -> bool:
    return not isinstance(v, bool) and v == 1


def _no_seed_resize(v: object) -> bool:
    # A1111 resizes the seed's noise only for seed_resize_from_w/h > 0; 0 and -1 mean off.
    return not isinstance(v, bool) and v in (0, -1)


def _no_refiner(v: object) -> bool:
    return v in ("", "None")


# Accepted and ignored at exactly these values; any other asks for something not done here.
NEUTRAL = (
    ("restore_faces", _off, "face restoration (GFPGAN / CodeFormer) is not part of this engine"),
    ("tiling", _off, "tileable (seamless) images are not supported"),
    ("styles", _empty, "saved prompt styles are not supported: put their text in the prompt"),
    ("subseed_strength", _zero, "variation seeds (subseed_strength > 0) are not supported"),
    ("seed_resize_from_h", _no_seed_resize, "resizing the seed's noise is not supported"),
    ("seed_resize_from_w", _no_seed_resize, "resizing the seed's noise is not supported"),
    ("s_churn", _zero, "stochastic churn (s_churn > 0) is not supported"),
    ("s_noise", _one, "an ancestral noise multiplier other than 1 is not supported"),
    ("s_min_uncond", _zero, "skipping the negative prompt at low sigma is not supported"),
    ("script_name", _empty, "scripts are not supported"),
    ("script_args", _empty, "scripts are not supported"),
    ("alwayson_scripts", _empty, "extension scripts are not supported"),
    ("refiner_checkpoint", _no_refiner, "a refiner model is not supported"),
    ("disable_extra_networks", _off, "extra networks are not read from prompts here, so "
     "there is nothing to disable"),
    ("infotext", _empty, "send the fields themselves rather than an infotext"),
)
# Fields that never change the pixels: where A1111 saves files, what it restores afterwards,
# a task id for its UI; subseed only acts with subseed_strength > 0, s_tmin/s_tmax only with
# s_churn > 0, refiner_switch_at only with a refiner (each refused above).
NO_EFFECT = ("save_images", "do_not_save_samples", "do_not_save_grid", "force_task_id",
             "override_settings_restore_afterwards", "subseed", "s_tmin", "s_tmax",
             "refiner_switch_at", "comments", "sampler_index")
TXT2IMG_NEUTRAL = (
    ("firstphase_width", _zero, "firstphase_width is A1111's old hires fix: use hr_scale"),
    ("firstphase_height", _zero, "firstphase_height is A1111's old hires fix: use hr_scale"),
)
IMG2IMG_NEUTRAL = (
    ("initial_noise_multiplier", _one, "an initial noise multiplier other than 1 is not "
     "supported"),
    ("latent_mask", _empty, "a separate latent mask is not supported"),
    ("mask_round", lambda v: v is True, "an unrounded latent mask is not supported"),
)
# image_cfg_scale acts only for instruct-pix2pix models, which this engine does not load.
IMG2IMG_NO_EFFECT = ("image_cfg_scale", "include_init_images")
# override_settings accepted at the values that change nothing: the seed delta (ENSD) 0, the
# model's own VAE, PNG output.
NEUTRAL_SETTINGS = {
    "eta_noise_seed_delta": lambda v: _zero(v),
    "sd_vae": lambda v: v in ("Automatic", "None"),
    "samples_format": lambda v: v == "png",
}


def _seed(fields: _Fields) -> int:
    seed = fields.integer("seed", -1)
    if seed == -1:
        return random.SystemRandom().randrange(SEED_RANGE)
    if seed < -1:
        raise UserInputError(f"seed must be -1 (random) or >= 0, got {seed}")
    return seed


def _sampler(fields: _Fields) -> dict:
    """The registry sampler of sampler_name (else the deprecated sampler_index) + scheduler."""
    name = fields.text("sampler_name") or fields.text("sampler_index")
    scheduler = fields.text("scheduler")
    if not name:
        if scheduler not in (None, "", "automatic", "Automatic"):
            raise UserInputError("scheduler needs a sampler_name")
        return {}                   # the request type's default sampler
    return {"sampler": from_a1111(name, scheduler or None)}


def served_model(models: list[dict], wanted: str) -> str:
    """A served model's name from any of A1111's spellings: the name, the title "name [hash]",
    the name with a .safetensors / .ckpt extension, or the hash. 404 for anything else."""
    for m in models:
        spellings = {m["name"], title(m), f"{m['name']}.safetensors", f"{m['name']}.ckpt"}
        if wanted.strip() in spellings or (m.get("hash") and wanted.strip() == m["hash"]):
            return m["name"]
    titles = ", ".join(title(m) for m in models)
    raise HTTPFailure(404, f"model {wanted[:80]!r} not found; served models: {titles}")


def title(model: dict) -> str:
    """A1111's checkpoint title: "name [shorthash]"."""
    return f"{model['name']} [{model['hash']}]" if model.get("hash") else model["name"]


def _overrides(fields: _Fields, options: Options, models: list[dict]) -> tuple[str | None, int]:
    """(model, clip skip) from override_settings, else /options' current ones."""
    settings = fields.raw("override_settings")
    if settings is None:
        settings = {}
    if not isinstance(settings, dict):
        raise UserInputError(f"override_settings must be an object, got {json_type(settings)}")
    model, clip_skip = options.model, options.clip_skip
    for key, value in settings.items():
        if key == "sd_model_checkpoint":
            if not isinstance(value, str):
                raise UserInputError(f"override_settings.sd_model_checkpoint must be a model "
                                     f"title, got {json_type(value)}")
            model = served_model(models, value)
        elif key == "CLIP_stop_at_last_layers":
            clip_skip = clip_skip_of(value, "override_settings.CLIP_stop_at_last_layers")
        elif key in NEUTRAL_SETTINGS:
            if not NEUTRAL_SETTINGS[key](value):
                raise UserInputError(f"override_settings.{key}={json.dumps(value)[:60]} is "
                                     "not supported")
        else:
            raise UserInputError(f"override_settings.{key[:60]} is not supported; supported: "
                                 f"sd_model_checkpoint, CLIP_stop_at_last_layers, "
                                 f"{', '.join(NEUTRAL_SETTINGS)}")
    return model, clip_skip


def clip_skip_of(value: object, name: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserInputError(f"{name} must be an integer, got {json_type(value)}")
    check_clip_skip(value)
    return value


def _common(fields: _Fields, options: Options, models: list[dict]) -> tuple[dict, dict]:
    """(request fields, job fields) of what txt2img and img2img share."""
    fields.neutral(NEUTRAL)
    request: dict[str, Any] = {"prompt": fields.text("prompt") or "",
                               "negative_prompt": fields.text("negative_prompt") or "",
                               "seed": _seed(fields), **_sampler(fields)}
    for ours, theirs, read in (("steps", "steps", fields.integer),
                               ("width", "width", fields.integer),
                               ("height", "height", fields.integer),
                               ("guidance_scale", "cfg_scale", fields.number),
                               ("eta", "eta", fields.number)):
        value = read(theirs)
        if value is not None:
            request[ours] = value
    model, request["clip_skip"] = _overrides(fields, options, models)
    batch_size = fields.integer("batch_size", 1, low=1)
    n_iter = fields.integer("n_iter", 1, low=1)
    job = {"num_images": batch_size * n_iter, "batch_size": batch_size, "model": model,
           "send_images": fields.flag("send_images", True)}
    return request, job


def _hires(fields: _Fields, request: dict) -> HiresFix | None:
    """A1111's hires fix -> HiresFix; with enable_hr false its fields change nothing."""
    hires_fields = ("hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x",
                    "hr_resize_y", "hr_prompt", "hr_negative_prompt", "denoising_strength",
                    *SAME)
    if not fields.flag("enable_hr", False):
        fields.seen.update(hires_fields)
        return None
    for key in ("hr_resize_x", "hr_resize_y"):
        if fields.integer(key, 0):
            raise UserInputError(f"{key} is not supported: give hr_scale (the factor)")
    for key, same in SAME.items():
        value = fields.text(key)
        if value not in (None, "", same):
            raise UserInputError(f"{key} is not supported: the second pass uses the first "
                                 f"pass's ({same!r})")
    for key, ours in (("hr_prompt", "prompt"), ("hr_negative_prompt", "negative_prompt")):
        value = fields.text(key)
        if value and value != request[ours]:
            raise UserInputError(f"{key} is not supported: the second pass uses the {ours}")
    kwargs: dict[str, Any] = {}
    if (scale := fields.number("hr_scale")) is not None:
        kwargs["scale"] = scale
    upscaler = fields.text("hr_upscaler")
    if upscaler:
        if upscaler not in HIRES_UPSCALERS:
            raise UserInputError(f"hr_upscaler {upscaler[:60]!r} is not supported; supported: "
                                 f"{', '.join(HIRES_UPSCALERS)}")
        kwargs["upscaler"] = HIRES_UPSCALERS[upscaler]
    if (steps := fields.integer("hr_second_pass_steps", low=0)) is not None:
        kwargs["steps"] = steps
    if (strength := fields.number("denoising_strength")) is not None:
        kwargs["strength"] = strength
    return HiresFix(**kwargs)


def txt2img_job(data: object, options: Options, models: list[dict]) -> A1111Job:
    """A /txt2img body -> the job it asks for (GenerationParams); UserInputError otherwise."""
    fields = _body(data, "/sdapi/v1/txt2img")
    request, job = _common(fields, options, models)
    fields.neutral(TXT2IMG_NEUTRAL)
    hires = _hires(fields, request)
    fields.finish(NO_EFFECT)
    params = GenerationParams(**request, hires=hires)
    params.validate()
    return A1111Job(request=params, **job)


def img2img_job(data: object, options: Options, models: list[dict], *, max_pixels: int,
                max_bytes: int) -> A1111Job:
    """An /img2img body -> ImageToImageParams, or InpaintParams when it has a mask."""
    fields = _body(data, "/sdapi/v1/img2img")
    request, job = _common(fields, options, models)
    fields.neutral(IMG2IMG_NEUTRAL)
    images = fields.raw("init_images")
    if not isinstance(images, list) or len(images) != 1:
        got = f"{len(images)} images" if isinstance(images, list) else json_type(images)
        raise UserInputError(f"init_images must be a list of one base64 image, got {got}")
    request["init_image"] = decode_image(images[0], "init_images[0]", max_pixels=max_pixels,
                                         max_bytes=max_bytes)
    if (strength := fields.number("denoising_strength")) is not None:
        request["strength"] = strength
    resize = fields.integer("resize_mode", 0)
    if resize not in RESIZE_MODES:
        raise UserInputError(f"resize_mode {resize} is not supported; supported: "
                             + ", ".join(f"{k} ({RESIZE_NAMES[v]})"
                                         for k, v in RESIZE_MODES.items()))
    request["resize_mode"] = RESIZE_MODES[resize]
    mask = fields.raw("mask")
    inpaint_fields = ("mask_blur", "mask_blur_x", "mask_blur_y", "inpainting_fill",
                      "inpaint_full_res", "inpaint_full_res_padding", "inpainting_mask_invert")
    if mask is None:
        fields.seen.update(inpaint_fields)      # A1111 reads them only with a mask
        fields.finish(NO_EFFECT + IMG2IMG_NO_EFFECT)
        params: GenerationParams = ImageToImageParams(**request)
    else:
        request.update(_inpaint(fields, mask, max_pixels=max_pixels, max_bytes=max_bytes))
        fields.finish(NO_EFFECT + IMG2IMG_NO_EFFECT)
        params = InpaintParams(**request)
    params.validate()
    return A1111Job(request=params, **job)


def _inpaint(fields: _Fields, mask: object, *, max_pixels: int, max_bytes: int) -> dict:
    from pipelines.images import load_mask

    fill = fields.integer("inpainting_fill", 0)
    if fill != INPAINT_ORIGINAL:
        raise UserInputError(f"inpainting_fill {fill} is not supported: this engine inpaints "
                             f"from the original image under the mask, inpainting_fill "
                             f"{INPAINT_ORIGINAL} (\"original\")")
    out: dict[str, Any] = {}
    blur = fields.integer("mask_blur", low=0)
    blur_x, blur_y = fields.integer("mask_blur_x", low=0), fields.integer("mask_blur_y", low=0)
    if blur is None and blur_x is not None and blur_x == blur_y:
        blur = blur_x
    elif (blur_x is not None or blur_y is not None) and {blur_x, blur_y} - {None, blur}:
        raise UserInputError("mask_blur_x and mask_blur_y must equal mask_blur: only a round "
                             "blur is supported")
    if blur is not None:
        out["mask_blur"] = blur
    out["only_masked"] = fields.flag("inpaint_full_res", False)
    if (padding := fields.integer("inpaint_full_res_padding", low=0)) is not None:
        out["padding"] = padding
    invert = fields.flag("inpainting_mask_invert", False)
    image = decode_image(mask, "mask", max_pixels=max_pixels, max_bytes=max_bytes)
    with warnings.catch_warnings():
        # How a coloured / transparent mask was read is the client's to know, not an error.
        warnings.simplefilter("ignore")
        out["mask"] = load_mask(image, invert=invert)
    return out


def _body(data: object, where: str) -> _Fields:
    if not isinstance(data, dict):
        raise UserInputError(f"the body of {where} must be a JSON object, got {json_type(data)}")
    return _Fields(data, where)


# --- answering --------------------------------------------------------------------------------

def timestamp(t: float | None) -> str:
    """A1111's job_timestamp: local time as YYYYmmddHHMMSS."""
    return time.strftime("%Y%m%d%H%M%S", time.localtime(t if t is not None else time.time()))


def info_json(view: JobView, job: A1111Job, model: dict | None, *,
              inpainting_unet: bool = False) -> str:
    """Processed.js(): the `info` string of a finished job (what made image 0, and each
    image's PNG parameters text in infotexts). inpainting_unet: the model's UNet reads the mask
    and masked image (9 input channels), A1111's is_using_inpainting_conditioning."""
    first = job.request
    if view.infos:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            first = parse_parameters(view.infos[0])      # concrete size, sampler, eta
    n = len(view.seeds) or job.num_images
    sampler, schedule = a1111_fields(first.sampler)
    strength = (first.strength if isinstance(first, ImageToImageParams)
                else first.hires.strength if first.hires is not None else None)
    seeds = list(view.seeds)
    obj = {
        "prompt": first.prompt, "all_prompts": [first.prompt] * n,
        "negative_prompt": first.negative_prompt,
        "all_negative_prompts": [first.negative_prompt] * n,
        "seed": seeds[0] if seeds else first.seed, "all_seeds": seeds,
        # No variation seeds here (subseed_strength 0 is the only one accepted).
        "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0,
        "width": first.width, "height": first.height,
        "sampler_name": sampler, "cfg_scale": first.guidance_scale, "steps": first.steps,
        "batch_size": job.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": view.model, "sd_model_hash": (model or {}).get("hash") or None,
        "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": strength,
        "extra_generation_params": {"Schedule type": schedule} if schedule else {},
        "index_of_first_image": 0, "infotexts": list(view.infos), "styles": [],
        "job_timestamp": timestamp(view.created), "clip_skip": first.clip_skip,
        "is_using_inpainting_conditioning": inpainting_unet, "version": engine_version(),
        # Ours: the job behind the answer (GET /v1/jobs/{id}).
        "job_id": view.id, "job_state": view.state.value,
    }
    return json.dumps(obj)


def read_images(view: JobView) -> list[str]:
    out = []
    for path in view.outputs:
        with open(path, "rb") as f:
            out.append(base64.b64encode(f.read()).decode("ascii"))
    return out


def echo_body(data: dict, *, images: bool) -> dict:
    """The body as "parameters" (A1111 returns its request); init images and mask only with
    include_init_images, as A1111 drops them."""
    if images:
        return data
    return {**data, **{k: None for k in ("init_images", "mask") if k in data}}


def png_info(data: object, *, max_bytes: int) -> dict:
    """POST /png-info: {"image": b64} -> {"info", "items", "parameters"} from its text chunks
    (the pixels are never decoded)."""
    from PIL import Image

    if not isinstance(data, dict) or not isinstance(data.get("image"), str):
        raise UserInputError('/png-info needs {"image": "<base64 PNG>"}')
    text = data["image"].strip()
    if text.startswith("data:"):
        text = text.partition(",")[2]
    if len(text) > max_bytes * 4 // 3 + 4:
        raise UserInputError(f"image is over the limit of {max_bytes} bytes")
    try:
        raw = base64.b64decode(text, validate=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as im:
                items = {k: v for k, v in im.info.items()
                         if isinstance(k, str) and isinstance(v, str)}
    except (ValueError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserInputError(f"image is not a readable base64 image: {e}") from None
    info = items.pop("parameters", "")
    if not info:
        return {"info": "", "items": items, "parameters": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params = parse_parameters(info)
    return {"info": info, "items": items, "parameters": a1111_parameters(params)}


def a1111_parameters(p: GenerationParams) -> dict:
    """A parsed request in A1111's parse_generation_parameters keys (Prompt, Steps, Size-1,
    ...), plus "request": the engine's JSON form of it."""
    from pipelines.jsonform import request_to_json

    sampler, schedule = a1111_fields(p.sampler)
    out: dict[str, Any] = {"Prompt": p.prompt, "Negative prompt": p.negative_prompt,
                           "Steps": p.steps, "Sampler": sampler,
                           "Schedule type": schedule or "Automatic",
                           "CFG scale": p.guidance_scale, "Seed": p.seed,
                           "Size-1": p.width, "Size-2": p.height, "Clip skip": p.clip_skip}
    if p.model_hash:
        out["Model hash"] = p.model_hash
    if p.model:
        out["Model"] = p.model
    if isinstance(p, ImageToImageParams):
        out["Denoising strength"] = p.strength
    elif p.hires is not None:
        out |= {"Hires upscale": p.hires.scale, "Hires steps": p.hires.steps,
                "Hires upscaler": UPSCALER_NAMES[p.hires.upscaler],
                "Denoising strength": p.hires.strength}
    out["request"] = request_to_json(p)
    return out


def samplers_list() -> list[dict]:
    """GET /samplers: A1111 1.9+'s list, one entry per stepper (the spacing is the scheduler);
    the older combined names ("DPM++ 2M Karras") are read as well."""
    steppers: dict[str, list[str]] = {}
    for name in SAMPLERS:
        stepper, _ = split_name(name)
        if stepper in STEPPER_NAMES:
            steppers.setdefault(stepper, []).append(name)
    out = []
    for stepper, names in steppers.items():
        aliases = sorted({stepper, *names})
        options = ({"scheduler": A1111_AUTOMATIC[stepper].lower()}
                   if stepper in A1111_AUTOMATIC else {})
        out.append({"name": STEPPER_NAMES[stepper], "aliases": aliases, "options": options})
    return out


def schedulers_list() -> list[dict]:
    """GET /schedulers: the schedule types the scheduler field takes (A1111 1.9's shape)."""
    spaced = {split_name(name)[1] for name in SAMPLERS}
    labels = [("automatic", "Automatic")] + [
        (label.lower(), label) for suffix, label in SCHEDULE_SUFFIXES.items()
        if suffix in spaced] + [("normal", "Normal")]
    return [{"name": name, "label": label, "aliases": None, "default_rho": -1,
             "need_inner_model": False} for name, label in labels]


def progress_json(running: list[JobView], waiting: int, *, skip_current_image: bool) -> dict:
    """A1111's ProgressResponse for the oldest running job; job_count counts the running and
    queued jobs, so a client waiting for "idle" (progress 0, job_count 0) waits for the queue."""
    state = {"skipped": False, "interrupted": False, "job": "", "job_count": len(running) + waiting,
             "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    if not running:
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None,
                "textinfo": None}
    view = min(running, key=lambda v: v.started or v.created)
    done = view.step / view.total if view.total else 0.0
    elapsed = time.time() - (view.started or view.created)
    eta = elapsed / done - elapsed if done > 0 else 0.0
    state |= {"job": view.id, "job_timestamp": timestamp(view.started),
              "sampling_step": view.step, "sampling_steps": view.total}
    image = (base64.b64encode(view.preview).decode("ascii")
             if view.preview and not skip_current_image else None)
    return {"progress": min(done, 1.0), "eta_relative": max(eta, 0.0), "state": state,
            "current_image": image, "textinfo": f"{view.mode} step {view.step}/{view.total}"}


def sd_model_json(model: dict) -> dict:
    """A1111's SDModelItem. filename is the model's file or folder name: clients pick models by
    title, and the server's paths are not theirs to see."""
    from pathlib import Path

    path = Path(model["path"])
    return {"title": title(model), "model_name": model["name"], "hash": model.get("hash"),
            "sha256": sha256_of(model), "filename": path.name, "config": None}


_SHA256: dict[str, str] = {}
_SHA256_LOCK = threading.Lock()


def sha256_of(model: dict | None) -> str | None:
    """The model's full SHA-256 (ldm_engine.modelhash; A1111's sha256 field), computed once per
    path: it reads every weights file."""
    from ldm_engine.modelhash import model_sha256

    if model is None:
        return None
    key = str(model["path"])
    with _SHA256_LOCK:
        if key not in _SHA256:
            try:
                _SHA256[key] = model_sha256(key)
            except (OSError, UserInputError):
                return None
        return _SHA256[key]
