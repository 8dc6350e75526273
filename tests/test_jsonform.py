"""The JSON form of requests (pipelines.jsonform): exact round trips for every mode, strict reading."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import pytest
from PIL import Image

from ldm_engine.errors import UserInputError
from pipelines.jsonform import (HASH_FIELDS, decode_image, encode_image, request_from_json,
                                request_to_json, request_types)
from pipelines.params import (EditParams, GenerationParams, HiresFix, ImageToImageParams,
                              InpaintParams, InterpolationParams, OutpaintParams, VariationParams)


def _image(colour=(10, 200, 30), size=(24, 16)) -> Image.Image:
    im = Image.new("RGB", size, colour)
    im.putpixel((3, 4), (255, 0, 255))
    return im


def _mask(size=(24, 16)) -> Image.Image:
    m = Image.new("L", size, 0)
    m.paste(255, (0, 0, 8, 8))
    return m


REQUESTS = [
    GenerationParams(prompt="a red circle", negative_prompt="blur", steps=12, guidance_scale=3.5,
                     sampler="dpmpp_2m_karras", eta=0.25, height=64, width=128, seed=7,
                     clip_skip=2, hires=HiresFix(scale=1.5, upscaler="lanczos", steps=4,
                                                 strength=0.4)),
    ImageToImageParams(prompt="x", init_image=_image(), strength=0.3, resize_mode="crop",
                       init_latents="mode"),
    InpaintParams(prompt="x", init_image=_image(), mask=_mask(), mask_blur=0, only_masked=True,
                  padding=8, overlay=True),
    OutpaintParams(prompt="x", init_image=_image(), left=8, bottom=16, fill="color",
                   color=(1, 2, 3), overlap=4),
    VariationParams(prompt="x", init_image=_image(), eta=0.9),
    InterpolationParams(prompt="x", end_prompt="y", end_seed=9, frames=3,
                        init_image=_image(), end_image=_image((0, 0, 0))),
    EditParams(prompt="x", target_prompt="y", init_image=_image(), amounts=(0.5, -1.0)),
]


def test_every_mode_has_a_request_here():
    assert {r.mode for r in REQUESTS} == set(request_types())


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: r.mode)
def test_round_trip_through_json_text_is_exact(request_):
    text = json.dumps(request_to_json(request_))        # really JSON: no tuples, no PIL objects
    back = request_from_json(json.loads(text))
    assert type(back) is type(request_) and back == request_
    for name in ("init_image", "mask", "end_image"):
        if getattr(request_, name, None) is not None:
            assert getattr(back, name).tobytes() == getattr(request_, name).tobytes()
            assert getattr(back, name + "_hash" if name != "mask" else "mask_hash")


def test_left_out_fields_take_the_request_types_defaults():
    assert request_from_json({"prompt": "a"}) == GenerationParams(prompt="a")
    assert request_from_json({"mode": "vary", "prompt": "a",
                              "init_image": encode_image(_image())}).eta == VariationParams(
        prompt="a").eta


def test_json_numbers_that_are_whole_count_as_integers_and_data_urls_are_read():
    r = request_from_json({"prompt": "a", "steps": 20.0, "guidance_scale": 7})
    assert r.steps == 20 and isinstance(r.steps, int) and r.guidance_scale == 7.0
    url = "data:image/png;base64," + encode_image(_image())
    assert request_from_json({"mode": "img2img", "prompt": "a", "init_image": url}
                             ).init_image.tobytes() == _image().tobytes()


def _bomb_png(width: int, height: int) -> bytes:
    """A valid-looking PNG whose header claims width x height but holds almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("data, words", [
    ([], "must be a JSON object"),
    ({"prompt": "a", "mode": "paint"}, "unknown mode 'paint'; valid modes: txt2img"),
    ({"steps": 3}, "needs a prompt"),
    ({"prompt": 1}, "prompt must be a string, got number 1"),
    ({"prompt": "a", "steps": True}, "steps must be an integer, got boolean true"),
    ({"prompt": "a", "steps": 2.5}, "steps must be an integer"),
    ({"prompt": "a", "guidance_scale": "7"}, "guidance_scale must be a number, got string"),
    ({"prompt": "a", "guidance_scale": float("nan")}, "finite"),
    ({"prompt": "a", "vae_tiling": 1}, "vae_tiling must be true or false"),
    ({"prompt": "a", "dtype": "fp64"}, "dtype must be one of fp32, bf16, fp16"),
    ({"prompt": "a", "colour": 1}, "unknown field 'colour' for a txt2img request"),
    ({"prompt": "a", "frame": 1}, "unknown field 'frame'"),
    ({"mode": "interpolate", "prompt": "a", "frame": 3, "frames": 3}, "frame 3 is out of range"),
    ({"mode": "img2img", "prompt": "a", "init_image": encode_image(_image()),
      "init_image_hash": "0123456789"}, "init_image_hash '0123456789' is not the hash of the"),
    ({"prompt": "a", "init_image_hash": "x"}, "unknown field 'init_image_hash'"),
    ({"prompt": "a", "hires": 2}, "hires must be an object or null"),
    ({"prompt": "a", "hires": {"scale": 2, "size": 1}}, "unknown field hires.size"),
    ({"prompt": "a", "sampler": "nope"}, "unknown sampler 'nope'"),
    ({"prompt": "a", "steps": 0}, "steps"),
    ({"mode": "img2img", "prompt": "a", "init_image": "@@@"}, "init_image is not valid base64"),
    ({"mode": "img2img", "prompt": "a", "init_image": 5}, "init_image must be a base64"),
    ({"mode": "img2img", "prompt": "a", "init_image": base64.b64encode(b"GIF89a").decode()},
     "cannot read the init_image"),
    ({"mode": "img2img", "prompt": "a",
      "init_image": base64.b64encode(_bomb_png(5000, 5000)).decode()},
     "init_image is 5000x5000 = 25000000 pixels; the limit is 16777216"),
    ({"mode": "outpaint", "prompt": "a", "init_image": encode_image(_image()), "left": 8,
      "color": [1, 2]}, "color must be a list of 3 values"),
    ({"mode": "edit", "prompt": "a", "init_image": encode_image(_image()), "target_prompt": "b",
      "amounts": "0.5"}, "amounts must be a list"),
])
def test_bad_json_is_one_line_naming_the_field(data, words):
    with pytest.raises(UserInputError) as e:
        request_from_json(data)
    message = str(e.value)
    assert words in message and "\n" not in message


def test_image_limits_are_the_callers():
    text = encode_image(_image(size=(64, 64)))
    with pytest.raises(UserInputError, match="64x64 = 4096 pixels; the limit is 4095"):
        decode_image(text, "init_image", max_pixels=4095)
    with pytest.raises(UserInputError, match="the limit is 10"):
        decode_image(text, "init_image", max_bytes=10)
    assert decode_image(text, "init_image", max_pixels=4096).size == (64, 64)


def test_hash_fields_are_recomputed_not_taken_from_the_client():
    j = request_to_json(REQUESTS[1])
    assert set(HASH_FIELDS) & set(j)                 # written out, for the reader's information
    j = {k: v for k, v in j.items() if k not in HASH_FIELDS}
    assert request_from_json(j).init_image_hash == REQUESTS[1].init_image_hash
    buf = io.BytesIO()
    _image((1, 1, 1)).save(buf, format="PNG")
    j["init_image"] = base64.b64encode(buf.getvalue()).decode()
    assert request_from_json(j).init_image_hash != REQUESTS[1].init_image_hash
    # A request read back from a PNG has the hash and no image: the hash is kept as it is.
    assert request_from_json({"mode": "img2img", "prompt": "a", "init_image_hash": "0123456789"}
                             ).init_image_hash == "0123456789"
