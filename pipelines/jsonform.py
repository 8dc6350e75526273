"""A request's JSON form: what the HTTP API takes and returns (its PNG form is pipelines.pnginfo).

    {"mode": "inpaint", "prompt": "a red circle", "steps": 20,
     "init_image": "<base64 PNG>", "mask": "<base64 PNG>", "hires": null, ...}

The value is the same frozen request the CLI, the Python call and the PNG reader build
(pipelines.params), so a field means one thing everywhere and its default is defined once: a
field left out takes the request type's default. Reading is strict, because the input comes from
a client: an unknown mode or field, a value of the wrong type (JSON's true is not an integer, a
string is not a number), an unreadable or oversized image, each is one UserInputError line that
names the field, raised before anything is computed. Images travel as base64-encoded PNG (or
JPEG/WebP) strings; a "data:image/...;base64," prefix, as browsers and A1111 clients send, is
accepted.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import math
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from PIL import Image

from ldm_engine.errors import UserInputError

from . import params
from .images import read_image_bytes
from .params import GenerationParams, HiresFix

# Hashes of the images a request holds, computed by the request itself from the image. A client
# may send one (the JSON form of a result carries them); with the image it must agree.
HASH_FIELDS = {"init_image_hash": "init_image", "mask_hash": "mask", "end_image_hash": "end_image"}

# Default limits on an uploaded image: 16 MP (4096 x 4096) decoded, 32 MB encoded.
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_IMAGE_BYTES = 32 * 2**20


def request_types() -> dict[str, type[GenerationParams]]:
    """The request type of every mode, by mode name (the keys of pipelines.registry.PIPELINES)."""
    from .registry import PIPELINES
    return {name: cls.MODE.request for name, cls in PIPELINES.items()}


def encode_image(image: Image.Image) -> str:
    """An image as the base64 PNG string requests and responses carry."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_image(text: object, what: str, *, max_pixels: int = MAX_IMAGE_PIXELS,
                 max_bytes: int = MAX_IMAGE_BYTES) -> Image.Image:
    """A base64 image string (optionally a data: URL) -> PIL image; one-line errors."""
    if not isinstance(text, str):
        raise UserInputError(f"{what} must be a base64-encoded image string, got "
                             f"{json_type(text)}")
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or ";base64" not in head:
            raise UserInputError(f"{what} is a data: URL without base64 data")
    # base64 grows data by 4/3: refuse an oversized string before decoding it.
    if len(text) > max_bytes * 4 // 3 + 4:
        raise UserInputError(f"{what} is {len(text) * 3 // 4} bytes; the limit is {max_bytes}")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise UserInputError(f"{what} is not valid base64") from None
    return read_image_bytes(data, what, max_pixels=max_pixels)


def request_to_json(request: GenerationParams) -> dict[str, Any]:
    """The JSON form of a request: every field, images as base64 PNG, plus its "mode"."""
    out: dict[str, Any] = {"mode": request.mode}
    for f in dataclasses.fields(request):
        value = getattr(request, f.name)
        if isinstance(value, Image.Image):
            value = encode_image(value)
        elif isinstance(value, HiresFix):
            value = dataclasses.asdict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def request_from_json(data: object, *, max_pixels: int = MAX_IMAGE_PIXELS,
                      max_bytes: int = MAX_IMAGE_BYTES) -> GenerationParams:
    """The request a JSON object describes, checked field by field and as a whole.

    "mode" (default "txt2img") picks the request type; any field may be left out but "prompt".
    The request's own validate() runs too, so every error a model-free check can find is found
    here; the pipeline adds the model's own (size limits, steps of its schedule).
    """
    if not isinstance(data, dict):
        raise UserInputError(f"a request must be a JSON object, got {json_type(data)}")
    types_ = request_types()
    mode = data.get("mode", "txt2img")
    if mode not in types_:
        raise UserInputError(f"unknown mode {mode!r}; valid modes: {', '.join(types_)}")
    cls = types_[mode]
    hints = typing.get_type_hints(cls, vars(params))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    allowed = list(fields)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key == "mode":
            continue
        if key not in allowed:
            raise UserInputError(f"unknown field {key!r} for a {mode} request; valid fields: "
                                 f"{', '.join(allowed)}")
        kwargs[key] = _value(key, value, hints[key], max_pixels=max_pixels, max_bytes=max_bytes)
    if "prompt" not in kwargs:
        raise UserInputError(f"a {mode} request needs a prompt")
    try:
        request = cls(**kwargs)
    except TypeError as e:                          # a required field of the type is missing
        raise UserInputError(f"bad {mode} request: {e}") from None
    for hash_field, image_field in HASH_FIELDS.items():
        if (hash_field in kwargs and kwargs.get(image_field) is not None
                and kwargs[hash_field] not in ("", getattr(request, hash_field))):
            raise UserInputError(f"{hash_field} {kwargs[hash_field]!r} is not the hash of the "
                                 f"{image_field} sent ({getattr(request, hash_field)})")
    request.validate()
    return request


def _value(name: str, value: object, hint: object, **limits) -> object:
    """`value` checked against (and converted to) the field's annotated type."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _value(name, value, inner, **limits)
    if hint is Image.Image:
        return decode_image(value, name, **limits)
    if hint is HiresFix:
        return _hires(value)
    if origin is Literal:
        if value not in args or not isinstance(value, str):
            raise UserInputError(f"{name} must be one of {', '.join(map(str, args))}; got "
                                 f"{value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise UserInputError(f"{name} must be a list, got {json_type(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_value(f"{name}[{i}]", v, args[0], **limits) for i, v in enumerate(value))
        if len(value) != len(args):
            raise UserInputError(f"{name} must be a list of {len(args)} values, got "
                                 f"{len(value)}")
        return tuple(_value(f"{name}[{i}]", v, a, **limits)
                     for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if not isinstance(value, bool):
            raise UserInputError(f"{name} must be true or false, got {json_type(value)}")
        return value
    if hint is int:
        # JSON has one number type: 20 and 20.0 are both an integer count; 20.5 is not.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserInputError(f"{name} must be an integer, got {json_type(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserInputError(f"{name} must be a number, got {json_type(value)}")
        if not math.isfinite(value):
            raise UserInputError(f"{name} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise UserInputError(f"{name} must be a string, got {json_type(value)}")
        return value
    raise TypeError(f"no JSON form for field {name} of type {hint!r}")   # a new field type


def _hires(value: object) -> HiresFix:
    if not isinstance(value, dict):
        raise UserInputError(f"hires must be an object or null, got {json_type(value)}")
    hints = typing.get_type_hints(HiresFix, vars(params))
    unknown = sorted(set(value) - set(hints))
    if unknown:
        raise UserInputError(f"unknown field hires.{unknown[0]}; valid fields: "
                             f"{', '.join(hints)}")
    return HiresFix(**{k: _value(f"hires.{k}", v, hints[k]) for k, v in value.items()})


def json_type(value: object) -> str:
    """How JSON would name the type of a decoded value (messages speak the client's terms)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {value[:40]!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
