"""GenerationParams in a PNG: AUTOMATIC1111's ``parameters`` text chunk, written and read.

The layout is A1111's "infotext", which image browsers, civitai and sd-parsers read::

    a red circle on the left
    Negative prompt: blurry
    Steps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 1a2b3c4d5e, \
Model: default, Eta DDIM: 0.3, Dtype: bf16, Deep cache: 3, VAE tiling: True, Version: ldm-engine 0.1.0

(the settings line is one line). Fields are A1111's names, order and spelling: the sampler's
A1111 display name (``Euler a``, ``DPM++ 2M Karras``, read back in any case, and A1111 1.9's
``Sampler: DPM++ 2M, Schedule type: Karras`` too: see pipelines.sampler_names), the eta as A1111
names it: ``Eta DDIM`` for DDIM / DDPM / UniPC / LCM and the ODE samplers when it is not 0, ``Eta``
("eta for ancestral samplers") for euler_a, dpm2_a, dpmpp_2s_a, dpmpp_sde and dpmpp_2m_sde when
it is not 1 (each read only with its own kind of sampler, the other named in the warning below),
``Model hash`` as
ldm_engine.modelhash defines it, ``Clip skip`` only when it is not 1, and ``Version``. Three fields are ours, for what changes pixels
beyond A1111's fields, written only when not the exact default: ``Dtype`` (fp32), ``Deep cache``
(1) and ``VAE tiling`` (False). So is ``Rerank`` (candidates per image, pipelines.rerank; written
when not 1), which reads back into the request; a reranked image also records what the
reranking chose, ``Rerank score`` (the CLIP cosine of image and prompt, 4 decimals) and ``Rerank
seed`` (the chosen candidate's seed), which the reader accepts and leaves out of the request
(read_rerank_choice returns them): ``Seed`` stays the image's own, so the request re-played
makes the same candidates and the same choice.

Escaping, so that every prompt round-trips exactly:

- a settings value holding ``,`` ``:`` ``"``, a control character, or leading/trailing blanks is
  written as a JSON string, as A1111 quotes its own values (``Model: "my, model"``);
- in the prompt and the negative prompt, ``Negative prompt:`` anywhere, and ``Steps:`` at the start
  of a line, get one more backslash before the colon (``Negative prompt\\:``; text that already
  had k backslashes there gets k + 1, and the reader removes one, so the mapping is one-to-one).
  Then the one line that starts with ``Negative prompt:`` is the negative prompt's, and the one
  that starts with ``Steps:`` is the settings line, whichever way a reader splits: A1111 (the
  first ``Negative prompt:`` line, the last line as settings), its PNG-info regexes (the last
  ``Negative prompt:`` and ``Steps:`` lines), or sd-parsers (every ``Negative prompt:``). A1111's
  prompt syntax reads ``\\:`` as a plain ``:``, so the prompt it conditions on is unchanged.
- a carriage return cannot be told from a CRLF line break, so prompts holding one are refused
  before generating (check_storable), and text holding one is refused when read.

Reading is strict: the last line must be a settings line in exactly the grammar above, with
Steps, Sampler, CFG scale, Seed and Size, no key twice, numbers in ASCII digits of bounded length
and range; anything else is a one-line UserInputError. Fields this engine cannot honour (A1111's
``Denoising strength``, ``Lora hashes``, ...) are not dropped silently: they are
named in an InexactRemakeWarning. Only text chunks before the image data are read (where PIL,
A1111 and this engine write them), within PIL's text limits, and the pixels are never decoded.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import math
import os
import re
import struct
import warnings
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from PIL import Image, PngImagePlugin

from ldm_engine.errors import UserInputError
from ldm_engine.fsutil import atomic_path

from schedulers import get_sampler

from .params import (MAX_RERANK, EditParams, GenerationParams, HiresFix, ImageToImageParams,
                     InpaintParams, InterpolationParams, OutpaintParams, VariationParams)
from .sampler_names import a1111_fields, from_a1111, sampler_names


class InexactRemakeWarning(UserWarning):
    """An image read back cannot be re-made exactly as described (the message says why).

    Raised by parse_parameters / read_png_params for fields this engine cannot honour, and by
    TextToImage.regenerate when the pipeline differs from what made the image (model, dtype,
    approximations).
    """


# Registry name -> A1111 display name, for every registered sampler (pipelines.sampler_names:
# both A1111 forms are read, "DPM++ 2M Karras" and "DPM++ 2M" + "Schedule type: Karras").
SAMPLER_NAMES = sampler_names()
DTYPE_NAMES = ("fp32", "bf16", "fp16")
# What a PNG describes must be an image PIL would open again without a decompression-bomb
# warning (89.5 M pixels, about 9459 x 9459). The model's own size limits are the pipeline's.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
MAX_SEED = 2**64 - 1                                # torch.Generator.manual_seed's range
MAX_TEXT = PngImagePlugin.MAX_TEXT_CHUNK            # 1 MiB, PIL's limit for a compressed chunk
_NEGATIVE = "Negative prompt:"
# Every A1111 settings line has these; the optional fields this engine honours (or, for Model
# and Version, that never change pixels) follow. Any other field is named in a warning.
REQUIRED = ("Steps", "Sampler", "CFG scale", "Seed", "Size")
OPTIONAL = ("Schedule type", "Model hash", "Model", "Eta DDIM", "Eta", "Clip skip", "Dtype",
            "Deep cache", "VAE tiling", "Rerank", "Rerank score", "Rerank seed", "Version")
# The fields of each mode beyond those (A1111's names where A1111 has the setting).
HIRES = ("Hires upscale", "Hires steps", "Hires upscaler", "Denoising strength")
IMG2IMG = ("Denoising strength", "Init image hash", "Resize mode", "Init latents")
INPAINT = IMG2IMG + ("Mask blur", "Mask hash", "Inpaint area", "Masked area padding",
                     "Inpaint overlay")
OUTPAINT = INPAINT + ("Outpaint", "Outpaint fill", "Outpaint color", "Outpaint overlap")
# The unCLIP modes (pipelines.unclip): a variation's strength is its own key, which marks it.
VARY = ("Variation strength", "Init image hash", "Resize mode", "Init latents")
INTERPOLATE = ("Interpolate to", "Interpolate seed", "Frames", "Frame", "Init image hash",
               "End image hash", "Resize mode")
EDIT = IMG2IMG + ("Edit target", "Edit amounts", "Edit amount")
# A1111's upscaler names; its img2img "Resize mode" names.
UPSCALER_NAMES = {"latent": "Latent", "latent-bicubic": "Latent (bicubic)",
                  "latent-nearest": "Latent (nearest)", "lanczos": "Lanczos"}
RESIZE_NAMES = {"just-resize": "Just resize", "crop": "Crop and resize",
                "fill": "Resize and fill"}
SIDES = ("left", "right", "top", "bottom")


@functools.cache
def engine_version() -> str:
    """The ``Version`` field: ``ldm-engine X.Y.Z``."""
    try:
        return f"ldm-engine {importlib.metadata.version('ldm-engine')}"
    except importlib.metadata.PackageNotFoundError:
        return "ldm-engine (not installed)"


# --- prompts -------------------------------------------------------------------------------

# `Negative prompt` anywhere, `Steps` at a line start, then k >= 0 backslashes and a colon.
_MARKS = re.compile(r"(Negative prompt|(?m:^)Steps)(\\*):")
_ESCAPED_MARKS = re.compile(r"(Negative prompt|(?m:^)Steps)\\(\\*):")


def escape_prompt(text: str) -> str:
    """One more backslash before the colon of every marker (see the module docstring)."""
    return _MARKS.sub(lambda m: f"{m[1]}\\{m[2]}:", text)


def unescape_prompt(text: str) -> str:
    return _ESCAPED_MARKS.sub(lambda m: f"{m[1]}{m[2]}:", text)


def check_storable(texts: Iterable[str], what: str = "prompt") -> None:
    """Refuse text the parameters chunk cannot hold exactly, before any compute."""
    for text in texts:
        if "\r" in text:
            raise UserInputError(f"{what} contains a carriage return (\\r), which a PNG's A1111 "
                                 "parameters cannot tell from a line break: use \\n")
        if "\0" in text:
            raise UserInputError(f"{what} contains a NUL character, which PNG text cannot hold")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise UserInputError(f"{what} is not valid Unicode (it holds a lone surrogate)"
                                 ) from None


# --- writing -------------------------------------------------------------------------------

@dataclass(frozen=True)
class RerankChoice:
    """What reranking chose for one image: its CLIP score and the chosen candidate's seed."""

    score: float                      # cosine similarity of image and prompt embeddings
    seed: int


def format_parameters(params: GenerationParams, choice: RerankChoice | None = None) -> str:
    """The ``parameters`` text; `choice`, for a reranked image, adds Rerank score and seed."""
    check_storable([params.prompt])
    check_storable([params.negative_prompt], "negative prompt")
    lines = [escape_prompt(params.prompt)]
    if params.negative_prompt:
        lines.append(f"{_NEGATIVE} {escape_prompt(params.negative_prompt)}")
    lines.append(", ".join(f"{k}: {v}" for k, v in _settings(params, choice)))
    return "\n".join(lines)


def _settings(p: GenerationParams, choice: RerankChoice | None = None
              ) -> Iterator[tuple[str, str]]:
    yield "Steps", str(p.steps)
    sampler, schedule_type = a1111_fields(p.sampler)
    yield "Sampler", _quote(sampler)
    if schedule_type is not None:
        yield "Schedule type", schedule_type
    yield "CFG scale", _num(p.guidance_scale)
    yield "Seed", str(p.seed)
    if p.width is None or p.height is None:
        raise UserInputError("a PNG records a concrete size: resolve height and width first")
    yield "Size", f"{p.width}x{p.height}"
    if p.model_hash:
        yield "Model hash", _quote(p.model_hash)
    if p.model:
        yield "Model", _quote(p.model)
    if p.eta is None:               # the sampler's own: nothing to write
        pass
    elif _ancestral(p.sampler):     # A1111's "Eta": the ancestral / SDE samplers', default 1
        if p.eta != 1:
            yield "Eta", _num(p.eta)
    elif p.eta:
        yield "Eta DDIM", _num(p.eta)
    if p.clip_skip != 1:
        yield "Clip skip", str(p.clip_skip)
    if p.dtype != "fp32":
        yield "Dtype", _quote(p.dtype)
    if p.deep_cache != 1:
        yield "Deep cache", str(p.deep_cache)
    if p.vae_tiling:
        yield "VAE tiling", "True"
    yield from _mode_settings(p)
    if p.rerank != 1:
        yield "Rerank", str(p.rerank)
    if choice is not None:
        yield "Rerank score", f"{choice.score:.4f}"
        yield "Rerank seed", str(choice.seed)
    yield "Version", _quote(engine_version())


def _mode_settings(p: GenerationParams) -> Iterator[tuple[str, str]]:
    """The fields of the image modes and the hires fix (written only where they apply)."""
    if p.hires is not None:
        yield "Hires upscale", _num(p.hires.scale)
        if p.hires.steps:
            yield "Hires steps", str(p.hires.steps)
        yield "Hires upscaler", _quote(UPSCALER_NAMES[p.hires.upscaler])
        yield "Denoising strength", _num(p.hires.strength)
    if isinstance(p, InterpolationParams):
        check_storable([p.end_prompt], "end prompt")
        yield "Interpolate to", _quote(p.end_prompt)
        if p.end_seed is not None:
            yield "Interpolate seed", str(p.end_seed)
        yield "Frames", str(p.frames)
        if p.frame is not None:
            yield "Frame", str(p.frame)
        if p.init_image_hash:
            yield "Init image hash", p.init_image_hash
        if p.end_image_hash:
            yield "End image hash", p.end_image_hash
        if p.resize_mode != "just-resize":
            yield "Resize mode", _quote(RESIZE_NAMES[p.resize_mode])
        return
    if not isinstance(p, ImageToImageParams):
        return
    yield ("Variation strength" if isinstance(p, VariationParams) else "Denoising strength",
           _num(p.strength))
    if p.init_image_hash:
        yield "Init image hash", p.init_image_hash
    if p.resize_mode != "just-resize":
        yield "Resize mode", _quote(RESIZE_NAMES[p.resize_mode])
    if p.init_latents != "sample":
        yield "Init latents", p.init_latents
    if isinstance(p, EditParams):
        check_storable([p.target_prompt], "target prompt")
        yield "Edit target", _quote(p.target_prompt)
        yield "Edit amounts", " ".join(_num(a) for a in p.amounts)
        if p.amount is not None:
            yield "Edit amount", _num(p.amount)
    if not isinstance(p, InpaintParams):
        return
    yield "Mask blur", str(p.mask_blur)
    if p.mask_hash:
        yield "Mask hash", p.mask_hash
    if p.only_masked:
        yield "Inpaint area", _quote("Only masked")
        yield "Masked area padding", str(p.padding)
    elif p.overlay:
        yield "Inpaint overlay", "True"
    if not isinstance(p, OutpaintParams):
        return
    yield "Outpaint", " ".join(f"{side} {getattr(p, side)}" for side in SIDES
                               if getattr(p, side))
    yield "Outpaint fill", p.fill
    if p.fill == "color":
        yield "Outpaint color", "#%02x%02x%02x" % p.color
    yield "Outpaint overlap", str(p.overlap)


def _num(x: float) -> str:
    # repr is the shortest text that reads back as the same float.
    return repr(float(x))


_NEEDS_QUOTES = re.compile(r'[,:"\x00-\x1f\x7f]|^[\s{]|\s$|^$')


def _quote(value: str) -> str:
    """A1111's quoting: a JSON string when the plain value would not read back as itself."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:          # e.g. a folder name that is not valid UTF-8: \udcxx
        return json.dumps(value)
    return json.dumps(value, ensure_ascii=False) if _NEEDS_QUOTES.search(value) else value


# --- reading -------------------------------------------------------------------------------

_KEY = r"[A-Za-z0-9_](?:[A-Za-z0-9_ /-]*[A-Za-z0-9_/-])?"
# A JSON string (A1111's quoting), a JSON object without nesting (the civitai extension's
# `Hashes: {...}`), or a plain value: no comma, no quote or brace first, no blank at either end.
_VALUE = r'"(?:[^"\\]|\\.)*"|\{[^{}]*\}|[^\s",{](?:[^,]*[^\s,])?'
_ITEM = re.compile(rf"({_KEY}): ({_VALUE})(, |$)")
_COUNT = re.compile(r"0|[1-9][0-9]{0,19}")            # ASCII digits only: int() takes "4_0", "٤"
_FLOAT = re.compile(r"-?(?:0|[1-9][0-9]{0,15})(?:\.[0-9]{1,17})?(?:e[-+]?[0-9]{1,3})?")
_SIZE = re.compile(r"([1-9][0-9]{0,5})x([1-9][0-9]{0,5})")
_HASH = re.compile(r"[0-9a-f]{8,64}")


def parse_parameters(text: str) -> GenerationParams:
    """The GenerationParams an A1111 ``parameters`` text describes (see the module docstring).

    Bounds that do not depend on the model are checked here; the model's own (sizes, steps
    against its training timesteps) are checked by the pipeline before any compute. Fields that
    cannot be honoured are named in an InexactRemakeWarning.
    """
    if len(text) > MAX_TEXT:
        raise UserInputError(f"PNG parameters are {len(text)} characters long, over the "
                             f"{MAX_TEXT} this reader accepts")
    if "\r" in text:
        raise UserInputError("PNG parameters contain a carriage return (CRLF line breaks?); "
                             "A1111's format separates lines with \\n only")
    if "\0" in text:
        raise UserInputError("PNG parameters contain a NUL character")
    *body, last = text.split("\n")
    settings = _parse_settings(last)
    prompt, negative = _split_prompts(body)
    sampler = _sampler(settings)
    # A1111 writes "Eta DDIM" for DDIM and "Eta" for the ancestral samplers; each is honoured
    # only with its own kind of sampler.
    ancestral = _ancestral(sampler)
    eta_key = "Eta" if ancestral else "Eta DDIM"
    ignored = {"Eta", "Eta DDIM"} - {eta_key}
    cls = _mode_class(settings)
    known = OPTIONAL + {GenerationParams: HIRES, ImageToImageParams: IMG2IMG,
                        InpaintParams: INPAINT, OutpaintParams: OUTPAINT, VariationParams: VARY,
                        InterpolationParams: INTERPOLATE, EditParams: EDIT}[cls]
    unknown = [k for k in settings
               if k not in REQUIRED and (k not in known or k in ignored)]
    if unknown:
        warnings.warn(InexactRemakeWarning(
            "the PNG's parameters name settings this engine does not have, ignored (the image "
            f"will differ): {', '.join(unknown)}"), stacklevel=2)
    width, height = _size(settings["Size"])
    return cls(
        **_mode_fields(cls, settings),
        prompt=prompt, negative_prompt=negative, steps=_count(settings, "Steps", low=1),
        guidance_scale=_float(settings, "CFG scale"),
        sampler=sampler,
        eta=_float(settings, eta_key, default=1.0 if ancestral else 0.0, low=0.0),
        clip_skip=_count(settings, "Clip skip", default=1, low=1, high=1000),
        height=height, width=width, seed=_count(settings, "Seed", high=MAX_SEED),
        model=settings.get("Model", ""), model_hash=_model_hash(settings),
        dtype=_choice(settings, "Dtype", DTYPE_NAMES, "fp32"),
        deep_cache=_count(settings, "Deep cache", default=1, low=1),
        vae_tiling=_choice(settings, "VAE tiling", ("True", "False"), "False") == "True",
        rerank=_count(settings, "Rerank", default=1, low=1, high=MAX_RERANK))


def read_rerank_choice(text: str) -> RerankChoice | None:
    """What the reranking of the image chose (Rerank score, Rerank seed), None if the PNG's
    parameters record no choice; malformed values are one-line errors as everywhere else."""
    *_, last = text.split("\n")
    settings = _parse_settings(last)
    if "Rerank score" not in settings and "Rerank seed" not in settings:
        return None
    if "Rerank score" not in settings or "Rerank seed" not in settings:
        raise UserInputError("PNG parameters give one of Rerank score and Rerank seed: "
                             "a reranked image records both")
    return RerankChoice(score=_float(settings, "Rerank score", low=-1.0),
                        seed=_count(settings, "Rerank seed", high=MAX_SEED))


def _mode_class(settings: dict[str, str]) -> type:
    """Which request a settings line describes: outpaint, inpaint (A1111's "Mask blur"), img2img
    ("Denoising strength" without a hires fix), else text to image."""
    if "Outpaint" in settings:
        return OutpaintParams
    if "Variation strength" in settings:
        return VariationParams
    if "Frames" in settings:
        return InterpolationParams
    if "Edit target" in settings:
        return EditParams
    if "Mask blur" in settings or "Mask hash" in settings:
        return InpaintParams
    if "Denoising strength" in settings and "Hires upscale" not in settings:
        return ImageToImageParams
    return GenerationParams


def _mode_fields(cls: type, settings: dict[str, str]) -> dict:
    """The mode's own fields, read with the same strictness as the rest."""
    if cls is InterpolationParams:
        if "Interpolate to" not in settings:
            raise UserInputError("PNG parameters: an interpolation (Frames) needs Interpolate to")
        return {"end_prompt": settings["Interpolate to"],
                "end_seed": (_count(settings, "Interpolate seed", high=MAX_SEED)
                             if "Interpolate seed" in settings else None),
                "frames": _count(settings, "Frames", low=2, high=100_000),
                "frame": (_count(settings, "Frame", high=100_000)
                          if "Frame" in settings else None),
                "init_image_hash": _image_hash(settings, "Init image hash"),
                "end_image_hash": _image_hash(settings, "End image hash"),
                "resize_mode": _named(settings, "Resize mode", RESIZE_NAMES, "just-resize")}
    if cls is VariationParams:
        return {"strength": _float(settings, "Variation strength", low=0.0),
                "init_image_hash": _image_hash(settings, "Init image hash"),
                "resize_mode": _named(settings, "Resize mode", RESIZE_NAMES, "just-resize"),
                "init_latents": _choice(settings, "Init latents", ("sample", "mode"), "sample")}
    if cls is EditParams:
        return _edit_fields(settings)
    if cls is GenerationParams:
        if "Hires upscale" not in settings:
            return {}
        return {"hires": HiresFix(
            scale=_float(settings, "Hires upscale", low=1.0),
            steps=_count(settings, "Hires steps", default=0),
            upscaler=_named(settings, "Hires upscaler", UPSCALER_NAMES, "latent"),
            strength=_float(settings, "Denoising strength", default=0.7, low=0.0))}
    out = {"strength": _float(settings, "Denoising strength",
                              default=1.0 if cls is not ImageToImageParams else 0.75, low=0.0),
           "init_image_hash": _image_hash(settings, "Init image hash"),
           "resize_mode": _named(settings, "Resize mode", RESIZE_NAMES, "just-resize"),
           "init_latents": _choice(settings, "Init latents", ("sample", "mode"), "sample")}
    if cls is ImageToImageParams:
        return out
    area = _choice(settings, "Inpaint area", ("Whole picture", "Only masked"), "Whole picture")
    out |= {"mask_blur": _count(settings, "Mask blur", default=4, high=1000),
            "mask_hash": _image_hash(settings, "Mask hash"),
            "only_masked": area == "Only masked",
            "padding": _count(settings, "Masked area padding", default=32, high=100_000),
            "overlay": _choice(settings, "Inpaint overlay", ("True", "False"), "False") == "True"}
    if cls is InpaintParams:
        return out
    words = settings["Outpaint"].split(" ")
    if len(words) % 2 or not words[::2] or any(w not in SIDES for w in words[::2]):
        raise UserInputError(f"PNG parameters: Outpaint must be 'left N top N ...', got "
                             f"{_clip(settings['Outpaint'])!r}")
    for side, n in zip(words[::2], words[1::2]):
        out[side] = _count({"Outpaint": n}, "Outpaint", high=100_000)
    out["fill"] = _choice(settings, "Outpaint fill", ("edge", "noise", "color"), "edge")
    color = settings.get("Outpaint color", "#7f7f7f")
    if not re.fullmatch(r"#[0-9a-f]{6}", color):
        raise UserInputError(f"PNG parameters: Outpaint color must be #rrggbb, got {_clip(color)!r}")
    out["color"] = tuple(int(color[k:k + 2], 16) for k in (1, 3, 5))
    out["overlap"] = _count(settings, "Outpaint overlap", default=8, high=100_000)
    return out


def _edit_fields(settings: dict[str, str]) -> dict:
    """A text-diff edit's fields: image to image's, the target caption and the amounts."""
    raw = settings.get("Edit amounts", "")
    words = raw.split(" ")
    if not raw or len(words) > 1000:
        raise UserInputError(f"PNG parameters: Edit amounts must be 1 to 1000 numbers "
                             f"separated by spaces, got {_clip(raw)!r}")
    return {"strength": _float(settings, "Denoising strength", default=1.0, low=0.0),
            "init_image_hash": _image_hash(settings, "Init image hash"),
            "resize_mode": _named(settings, "Resize mode", RESIZE_NAMES, "just-resize"),
            "init_latents": _choice(settings, "Init latents", ("sample", "mode"), "sample"),
            "target_prompt": settings["Edit target"],
            "amounts": tuple(_float({"Edit amounts": w}, "Edit amounts") for w in words),
            "amount": (_float(settings, "Edit amount") if "Edit amount" in settings else None)}


def _named(settings: dict[str, str], key: str, names: dict[str, str], default: str) -> str:
    """A value written by its display name (A1111's), back to the request's name."""
    if key not in settings:
        return default
    by_name = {v.lower(): k for k, v in names.items()}
    value = settings[key].lower()
    if value not in by_name:
        raise UserInputError(f"PNG parameters: {key} must be one of "
                             f"{', '.join(names.values())}, got {_clip(settings[key])!r}")
    return by_name[value]


def _image_hash(settings: dict[str, str], key: str) -> str:
    value = settings.get(key, "")
    if value and not re.fullmatch(r"[0-9a-f]{10}", value):
        raise UserInputError(f"PNG parameters: {key} must be 10 lowercase hex digits, got "
                             f"{_clip(value)!r}")
    return value


def _ancestral(sampler: str) -> bool:
    """Whether A1111's "Eta" (eta for ancestral samplers, default 1) is this sampler's eta."""
    try:
        return get_sampler(sampler).default_eta == 1.0
    except ValueError:
        return False


def _sampler(settings: dict[str, str]) -> str:
    """The registry name; a sampler this engine lacks stays as written (``DPM fast``, with its
    schedule type: ``DPM++ 2M SGM Uniform``), refused by the pipeline's check, listing the
    valid names, unless the request overrides it."""
    name, schedule_type = settings["Sampler"], settings.get("Schedule type")
    try:
        return from_a1111(name, schedule_type)
    except UserInputError:
        if schedule_type is None or schedule_type.lower() in ("automatic", "uniform"):
            return name
        return f"{name} {schedule_type}"


def _parse_settings(line: str) -> dict[str, str]:
    """`Key: value, Key: value, ...` -> {key: value} with JSON-quoted values decoded."""
    if not line.startswith("Steps: "):
        raise UserInputError("PNG parameters do not end with a settings line "
                             "(Steps: ..., Sampler: ..., Seed: ...)")
    settings: dict[str, str] = {}
    pos = 0
    while pos < len(line):
        m = _ITEM.match(line, pos)
        if m is None:
            raise UserInputError(f"PNG parameters: malformed settings at column {pos + 1}: "
                                 f"{_clip(line[pos:])!r}")
        key, raw, sep = m.groups()
        if key in settings:
            raise UserInputError(f"PNG parameters give {key!r} twice")
        settings[key] = _unquote(key, raw)
        pos = m.end()
        if sep and pos == len(line):
            raise UserInputError("PNG parameters: the settings line ends with a comma")
    missing = [k for k in REQUIRED if k not in settings]
    if missing:
        raise UserInputError(f"PNG parameters lack {', '.join(missing)}")
    return settings


def _unquote(key: str, raw: str) -> str:
    if not raw.startswith('"'):
        return raw
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, str):
        raise UserInputError(f"PNG parameters: {key} is not a valid quoted string: {_clip(raw)!r}")
    return value


def _split_prompts(body: list[str]) -> tuple[str, str]:
    marks = [k for k, line in enumerate(body) if line.startswith(_NEGATIVE)]
    if len(marks) > 1:
        raise UserInputError(f"PNG parameters have {len(marks)} lines starting with "
                             f"{_NEGATIVE!r}; there can be one")
    if not marks:
        return unescape_prompt("\n".join(body)), ""
    k = marks[0]
    first = body[k][len(_NEGATIVE):]
    negative = "\n".join([first[1:] if first.startswith(" ") else first] + body[k + 1:])
    return unescape_prompt("\n".join(body[:k])), unescape_prompt(negative)


def _count(settings: dict[str, str], key: str, *, default: int | None = None, low: int = 0,
           high: int | None = None) -> int:
    if key not in settings:
        assert default is not None
        return default
    raw = settings[key]
    if not _COUNT.fullmatch(raw):
        raise UserInputError(f"PNG parameters: {key} must be a whole number in ASCII digits "
                             f"(at most 20), got {_clip(raw)!r}")
    value = int(raw)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise UserInputError(f"PNG parameters: {key} must be {bound}, got {value}")
    return value


def _float(settings: dict[str, str], key: str, *, default: float | None = None,
           low: float | None = None) -> float:
    if key not in settings:
        assert default is not None
        return default
    raw = settings[key]
    value = float(raw) if _FLOAT.fullmatch(raw) else math.nan
    if not math.isfinite(value):
        raise UserInputError(f"PNG parameters: {key} must be a finite decimal number, "
                             f"got {_clip(raw)!r}")
    if low is not None and value < low:
        raise UserInputError(f"PNG parameters: {key} must be >= {low}, got {value!r}")
    return value


def _size(raw: str) -> tuple[int, int]:
    m = _SIZE.fullmatch(raw)
    if m is None:
        raise UserInputError(f"PNG parameters: Size must be WIDTHxHEIGHT in pixels, got "
                             f"{_clip(raw)!r}")
    width, height = int(m[1]), int(m[2])
    if width * height > MAX_PIXELS:
        raise UserInputError(f"PNG parameters: Size {width}x{height} is over {MAX_PIXELS} "
                             "pixels (PIL's decompression-bomb limit)")
    return width, height


def _choice(settings: dict[str, str], key: str, choices: tuple[str, ...], default: str) -> str:
    value = settings.get(key, default)
    if value not in choices:
        raise UserInputError(f"PNG parameters: {key} must be one of {', '.join(choices)}, "
                             f"got {_clip(value)!r}")
    return value


def _model_hash(settings: dict[str, str]) -> str:
    value = settings.get("Model hash", "")
    if value and not _HASH.fullmatch(value):
        raise UserInputError(f"PNG parameters: Model hash must be lowercase hex digits, got "
                             f"{_clip(value)!r}")
    return value


def _clip(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[:n] + "..."


# --- files ---------------------------------------------------------------------------------

def save_png(image: Image.Image, path: str | os.PathLike, params: GenerationParams,
             choice: RerankChoice | None = None) -> None:
    """Write a PNG with its parameters chunk, atomically (temp file, fsync, rename); `choice`:
    what reranking chose (see format_parameters)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", format_parameters(params, choice))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def read_png_text(path: str | os.PathLike) -> str:
    """The ``parameters`` text of a PNG, read from its header chunks; the pixels stay encoded.

    PIL's limits apply: a compressed text chunk over MAX_TEXT_CHUNK (1 MiB) decompressed, text
    chunks over MAX_TEXT_MEMORY (64 MiB) together, and an image header over twice
    Image.MAX_IMAGE_PIXELS (a decompression bomb) are refused.
    """
    try:
        with warnings.catch_warnings():
            # Between one and two times the limit PIL only warns; the pixels are never decoded.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=["PNG"]) as im:
                # im.info holds the chunks before the image data; im.text would decode the pixels.
                text = im.info.get("parameters")
    except FileNotFoundError:
        raise UserInputError(f"image not found: {path}") from None
    except Image.DecompressionBombError as e:
        raise UserInputError(f"refusing {path}: {e}") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error) as e:
        raise UserInputError(f"cannot read the PNG {path}: {e}") from None
    if not isinstance(text, str) or not text:
        raise UserInputError(f"{path} carries no generation parameters (no 'parameters' PNG "
                             "text chunk)")
    return text


def read_png_params(path: str | os.PathLike) -> GenerationParams:
    """The GenerationParams saved in a PNG (warns InexactRemakeWarning for fields not honoured)."""
    text = read_png_text(path)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", InexactRemakeWarning)
            params = parse_parameters(text)
    except UserInputError as e:
        raise UserInputError(f"{path}: {e}") from None
    for w in caught:
        warnings.warn(InexactRemakeWarning(f"{path}: {w.message}"), stacklevel=2)
    return params
