"""AUTOMATIC1111's API (/sdapi/v1, ldm_engine/apps/server/a1111.py) over a real uvicorn on
loopback, driven by the unmodified `webuiapi` client: txt2img and img2img / inpainting give the
pixels our own request gives, the PNG's parameters read back (ours and sd-parsers), progress
while a job runs, interrupt, the listings and options, the API key, and the refusals."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import warnings

import httpx
import numpy as np
import pytest
import webuiapi
from PIL import Image

from ldm_engine.apps.server.config import ServerConfig, hash_key
from ldm_engine.apps.server.jobs import JobState
from ldm_engine.paths import BUNDLED_MODEL
from pipelines import GenerationParams, ImageToImageParams, InpaintParams
from pipelines.pnginfo import parse_parameters
from tests.server_util import serving

pytestmark = pytest.mark.usefixtures("deadline")
DEADLINE_SECONDS = 60
PROMPT = "a red circle on a blue square"
SIZE = dict(width=64, height=64)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_dir):
    """The bundled model (the default) and the tiny random one, behind the A1111 router alone
    (no create_app: the router must answer in A1111's shape by itself)."""
    import fastapi

    from ldm_engine.apps.server.a1111 import a1111_router
    from ldm_engine.apps.server.service import JobService

    config = ServerConfig(models=(BUNDLED_MODEL, tiny_dir), preview_every=1,
                          out_dir=tmp_path_factory.mktemp("a1111"))
    service = JobService(config)
    app = fastapi.FastAPI()
    app.include_router(a1111_router(service))
    with serving(app) as url:
        yield url, service
    service.close()


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=int(server[0].rsplit(":", 1)[1]))


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server[0] + "/sdapi/v1", timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def pipe(server):
    return server[1].pipeline("default")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def png_bytes(result: webuiapi.WebUIApiResult, k: int = 0) -> bytes:
    return base64.b64decode(result.json["images"][k])


def _image(seed=0):
    """A gradient plus noise (structure for the VAE), 64 x 64."""
    yy, xx = np.mgrid[0:64, 0:64]
    base = np.stack([xx * 4, yy * 4, (xx + yy) * 2], -1)
    noise = np.random.default_rng(seed).integers(-20, 21, (64, 64, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _mask():
    m = np.zeros((64, 64), np.uint8)
    m[16:48, 24:56] = 255
    return Image.fromarray(m)


# --- txt2img -----------------------------------------------------------------------------------

def test_txt2img_matches_our_own_request(api, pipe):
    r = api.txt2img(prompt=PROMPT, negative_prompt="blurry", seed=1234, steps=4,
                    cfg_scale=7.5, sampler_name="Euler a", **SIZE)
    assert len(r.images) == 1 and r.image.size == (64, 64)
    assert r.info["seed"] == 1234 and r.info["all_seeds"] == [1234]
    assert r.info["sampler_name"] == "Euler a" and r.info["sd_model_name"] == "default"
    assert r.info["sd_model_hash"] == pipe.model_hash
    [text] = r.info["infotexts"]
    # The PNG carries the same text, and it reads back to the request we ran.
    assert r.image.info["parameters"] == text
    params = parse_parameters(text)
    assert type(params) is GenerationParams
    assert (params.prompt, params.negative_prompt, params.seed, params.steps,
            params.guidance_scale, params.sampler, params.width, params.height, params.model) == (
        PROMPT, "blurry", 1234, 4, 7.5, "euler_a_normal", 64, 64, "default")
    # Our own request with the same seed, run on the pipeline itself: the same pixels.
    native = GenerationParams(prompt=PROMPT, negative_prompt="blurry", seed=1234, steps=4,
                              guidance_scale=7.5, sampler="euler_a_normal", **SIZE)
    [ours] = pipe.run(native).images
    assert np.array_equal(pixels(r.image), pixels(ours))
    # ... and what the PNG describes re-makes it.
    assert np.array_equal(pixels(r.image), pixels(pipe.run(params).images[0]))


def test_random_seed_is_resolved_and_batches_count_up(api):
    r = api.txt2img(prompt=PROMPT, seed=-1, steps=2, batch_size=2, n_iter=2, **SIZE)
    seed = r.info["seed"]
    assert isinstance(seed, int) and seed >= 0
    assert r.info["all_seeds"] == [seed, seed + 1, seed + 2, seed + 3]
    assert r.info["batch_size"] == 2 and len(r.images) == 4
    assert [parse_parameters(t).seed for t in r.info["infotexts"]] == r.info["all_seeds"]
    assert r.parameters["seed"] == -1            # the request, echoed as sent (as A1111 does)


def test_sd_parsers_reads_the_returned_png(api, tmp_path):
    from sd_parsers import ParserManager
    from sd_parsers.data import Generators

    r = api.txt2img(prompt=PROMPT, seed=77, steps=3, cfg_scale=6.0,
                    sampler_name="DPM++ 2M", scheduler="karras", **SIZE)
    path = tmp_path / "out.png"
    path.write_bytes(png_bytes(r))
    info = ParserManager().parse(path)
    assert info.generator == Generators.AUTOMATIC1111
    [sampler] = info.samplers
    assert sampler.name == "DPM++ 2M Karras"
    assert sampler.parameters == {"steps": "3", "cfg_scale": "6.0", "seed": "77"}
    assert sampler.model.name == "default"


def test_hires_fix_and_clip_skip_and_model_choice(api):
    r = api.txt2img(prompt=PROMPT, seed=3, steps=2, enable_hr=True, hr_scale=2,
                    hr_upscaler=webuiapi.HiResUpscaler.Latent, denoising_strength=0.6,
                    override_settings={"CLIP_stop_at_last_layers": 2}, **SIZE)
    assert r.image.size == (128, 128)
    params = parse_parameters(r.info["infotexts"][0])
    assert params.hires.scale == 2.0 and params.hires.strength == 0.6
    assert params.hires.upscaler == "latent" and params.clip_skip == 2
    assert r.info["denoising_strength"] == 0.6 and r.info["clip_skip"] == 2
    # The other served model by its A1111 title, "name [hash]".
    [tiny] = [m for m in api.get_sd_models() if m["model_name"] == "tiny"]
    r = api.txt2img(prompt=PROMPT, seed=3, steps=2,
                    override_settings={"sd_model_checkpoint": tiny["title"]}, **SIZE)
    assert r.info["sd_model_name"] == "tiny"
    assert parse_parameters(r.info["infotexts"][0]).model == "tiny"


# --- img2img -----------------------------------------------------------------------------------

def test_inpaint_with_a_mask_matches_our_own_request(api, pipe):
    image, mask = _image(), _mask()
    r = api.img2img(images=[image], mask_image=mask, prompt=PROMPT, seed=9, steps=4,
                    denoising_strength=0.8, mask_blur=2, inpainting_fill=1,
                    inpaint_full_res=False, **SIZE)
    assert r.image.size == (64, 64)
    params = parse_parameters(r.info["infotexts"][0])
    assert type(params) is InpaintParams
    assert (params.strength, params.mask_blur, params.only_masked, params.seed) == (0.8, 2,
                                                                                    False, 9)
    assert r.parameters["init_images"] is None       # not echoed without include_init_images
    native = InpaintParams(prompt=PROMPT, init_image=image, mask=mask, strength=0.8,
                           mask_blur=2, seed=9, steps=4, sampler="euler_a_normal",
                           guidance_scale=7.0, **SIZE)
    assert (params.init_image_hash, params.mask_hash) == (native.init_image_hash,
                                                          native.mask_hash)
    assert np.array_equal(pixels(r.image), pixels(pipe.run(native).images[0]))


def test_inverted_mask_and_plain_img2img(api, pipe):
    image, mask = _image(1), _mask()
    r = api.img2img(images=[image], mask_image=mask, inpainting_mask_invert=1, prompt=PROMPT,
                    seed=4, steps=3, inpainting_fill=1, inpaint_full_res=False, **SIZE)
    inverted = Image.fromarray(255 - np.asarray(mask))
    native = InpaintParams(prompt=PROMPT, init_image=image, mask=inverted, seed=4, steps=3,
                           strength=0.75, sampler="euler_a_normal", guidance_scale=7.0, **SIZE)
    assert parse_parameters(r.info["infotexts"][0]).mask_hash == native.mask_hash
    assert np.array_equal(pixels(r.image), pixels(pipe.run(native).images[0]))
    r = api.img2img(images=[image], prompt=PROMPT, seed=4, steps=4, resize_mode=1,
                    denoising_strength=0.5, **SIZE)
    params = parse_parameters(r.info["infotexts"][0])
    assert type(params) is ImageToImageParams
    assert (params.strength, params.resize_mode) == (0.5, "crop")


# --- progress, interrupt -----------------------------------------------------------------------

def test_progress_rises_while_a_job_runs_and_interrupt_cancels_it(api, server):
    service = server[1]
    results = []
    worker = threading.Thread(target=lambda: results.append(
        api.txt2img(prompt=PROMPT, seed=1, steps=150, **SIZE)))
    worker.start()
    steps = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (len(steps) < 2 or steps[-1] <= steps[0]):
        p = api.get_progress()
        if p["state"]["sampling_step"] > 0:
            steps.append(p["state"]["sampling_step"])
            assert p["state"]["sampling_steps"] == 150 and p["state"]["job_count"] >= 1
            assert 0 < p["progress"] < 1
        time.sleep(0.1)
    assert len(steps) >= 2 and steps[-1] > steps[0], steps
    job_id = p["state"]["job"]
    assert p["current_image"] is not None        # preview_every=1: a preview by now
    Image.open(io.BytesIO(base64.b64decode(p["current_image"]))).load()
    assert api.get_progress()["state"]["job"] == job_id
    assert api.interrupt() == {}
    worker.join(20)
    assert not worker.is_alive()
    assert service.get(job_id).state is JobState.CANCELLED
    [r] = results
    assert r.images == [] and r.info["job_state"] == "cancelled"
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    assert api.skip() == {}                      # nothing running: nothing to skip


# --- listings, options, png-info ---------------------------------------------------------------

def test_models_samplers_schedulers(api, pipe):
    models = api.get_sd_models()
    assert [m["model_name"] for m in models] == ["default", "tiny"]
    assert models[0]["title"] == f"default [{pipe.model_hash}]"
    assert models[0]["sha256"].startswith(pipe.model_hash) and len(models[0]["sha256"]) == 64
    assert "/" not in models[0]["filename"]                # no server path
    assert api.util_get_model_names() == sorted(m["title"] for m in models)
    names = api.util_get_sampler_names()
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "UniPC"} <= set(names)
    [dpm] = [s for s in api.get_samplers() if s["name"] == "DPM++ 2M"]
    assert dpm["options"] == {"scheduler": "karras"} and "dpmpp_2m_karras" in dpm["aliases"]
    assert {"automatic", "karras", "exponential", "uniform"} <= set(
        api.util_get_scheduler_names())


def test_options_switch_the_default_model(api, http):
    assert api.util_get_current_model().startswith("default [")
    try:
        api.util_set_model("tiny")                           # webuiapi's closest-name match
        assert api.util_get_current_model().startswith("tiny [")
        r = api.txt2img(prompt=PROMPT, seed=2, steps=2, **SIZE)
        assert r.info["sd_model_name"] == "tiny"
        # Unknown options are ignored (A1111 stores them); an unknown model is refused.
        assert http.post("/options", json={"some_ui_setting": 3}).status_code == 200
        response = http.post("/options", json={"sd_model_checkpoint": "nope"})
        assert response.status_code == 404 and "nope" in response.json()["error"]
    finally:
        api.set_options({"sd_model_checkpoint": "default"})
    assert api.get_options()["sd_model_checkpoint"].startswith("default [")


def test_png_info_reads_our_parameters(api):
    r = api.txt2img(prompt=PROMPT, seed=55, steps=2, **SIZE)
    info = api.png_info(r.image)
    assert info.info == r.info["infotexts"][0]
    p = info.json["parameters"]
    assert (p["Prompt"], p["Seed"], p["Steps"], p["Size-1"], p["Sampler"]) == (
        PROMPT, 55, 2, 64, "Euler a")
    assert p["request"]["mode"] == "txt2img" and p["request"]["seed"] == 55


# --- refusals ----------------------------------------------------------------------------------

BASE = {"prompt": PROMPT, "steps": 2, **SIZE}


@pytest.mark.parametrize("fields, status, words", [
    ({"restore_faces": True}, 400, "restore_faces"),
    ({"tiling": True}, 400, "tiling"),
    ({"subseed_strength": 0.5}, 400, "subseed_strength"),
    ({"styles": ["my style"]}, 400, "styles"),
    ({"alwayson_scripts": {"ControlNet": {"args": []}}}, 400, "alwayson_scripts"),
    ({"script_name": "x/y/z plot"}, 400, "script_name"),
    ({"s_churn": 0.5}, 400, "s_churn"),
    ({"no_such_field": 1}, 400, "no_such_field"),
    ({"sampler_name": "DPM fast"}, 400, "DPM fast"),
    ({"sampler_name": "Euler", "scheduler": "sgm_uniform"}, 400, "sgm_uniform"),
    ({"override_settings": {"sd_model_checkpoint": "nope [0123456789]"}}, 404, "nope"),
    ({"override_settings": {"randn_source": "GPU"}}, 400, "randn_source"),
    ({"seed": -7}, 400, "seed"),
    ({"steps": "20"}, 400, "steps"),
    ({"steps": 1000}, 400, "steps"),
    ({"cfg_scale": "high"}, 400, "cfg_scale"),
    ({"batch_size": 0}, 400, "batch_size"),
    ({"batch_size": 8, "n_iter": 8}, 400, "images"),
    ({"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, 400, "hr_upscaler"),
    ({"enable_hr": True, "hr_resize_x": 300}, 400, "hr_resize_x"),
    ({"width": 65}, 400, "width"),
])
def test_txt2img_refusals_are_one_line(http, fields, status, words):
    response = http.post("/txt2img", json={**BASE, **fields})
    assert response.status_code == status, response.text
    body = response.json()
    assert words in body["error"] and "\n" not in body["error"]
    assert body["detail"] == body["error"]


@pytest.mark.parametrize("fields, words", [
    ({"inpainting_fill": 0}, "inpainting_fill"),
    ({"inpainting_fill": 2}, "inpainting_fill"),
    ({"resize_mode": 3}, "resize_mode"),
    ({"initial_noise_multiplier": 0.9}, "initial_noise_multiplier"),
    ({"mask_blur_x": 2, "mask_blur_y": 6}, "mask_blur"),
    ({"mask": "not base64!"}, "mask"),
    ({"init_images": []}, "init_images"),
    ({"denoising_strength": 0}, "strength"),
])
def test_img2img_refusals_are_one_line(http, fields, words):
    def b64(image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    body = {**BASE, "init_images": [b64(_image())], "mask": b64(_mask()), "inpainting_fill": 1,
            **fields}
    response = http.post("/img2img", json=body)
    assert response.status_code == 400, response.text
    assert words in response.json()["error"] and "\n" not in response.json()["error"]


def test_malformed_json_and_webuiapi_sees_the_error(http, api):
    response = http.post("/txt2img", content=b"{not json", headers={
        "content-type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]
    response = http.post("/txt2img", json=[1, 2])
    assert response.status_code == 400 and "object" in response.json()["error"]
    with pytest.raises(RuntimeError) as e:
        api.txt2img(prompt=PROMPT, restore_faces=True, steps=2, **SIZE)
    assert e.value.args[0] == 400 and "restore_faces" in e.value.args[1]


def test_full_queue_is_429_with_retry_after(tmp_path, pipe):
    import fastapi

    from ldm_engine.apps.server.a1111 import a1111_router
    from ldm_engine.apps.server.service import JobService

    config = ServerConfig(models=(BUNDLED_MODEL,), out_dir=tmp_path, queue_size=1)
    service = JobService(config, pipelines={"default": pipe}, start_workers=False)
    try:
        service.submit(GenerationParams(prompt=PROMPT, steps=2))
        app = fastapi.FastAPI()
        app.include_router(a1111_router(service))
        with serving(app) as url:
            response = httpx.post(url + "/sdapi/v1/txt2img", json=BASE, timeout=30)
        assert response.status_code == 429
        assert int(response.headers["retry-after"]) >= 1
        assert "queue is full" in response.json()["error"]
    finally:
        service.close()


# --- the API key (create_app's authentication, which the A1111 routes are behind) --------------

def test_webuiapi_set_auth_with_the_server_key(tmp_path, pipe):
    from ldm_engine.apps.server.app import create_app
    from ldm_engine.apps.server.service import JobService

    key = "s3cret-" + "k" * 24
    config = ServerConfig(models=(BUNDLED_MODEL,), out_dir=tmp_path,
                          api_key_hashes=(hash_key(key),))
    service = JobService(config, pipelines={"default": pipe})
    try:
        with serving(create_app(service)) as url:
            port = int(url.rsplit(":", 1)[1])
            anonymous = webuiapi.WebUIApi(host="127.0.0.1", port=port)
            with pytest.raises(RuntimeError) as e:
                anonymous.txt2img(prompt=PROMPT, steps=2, **SIZE)
            assert e.value.args[0] == 401
            wrong = webuiapi.WebUIApi(host="127.0.0.1", port=port)
            wrong.set_auth("user", "not-the-key")
            assert wrong.session.get(wrong.baseurl + "/sd-models").status_code == 401
            client = webuiapi.WebUIApi(host="127.0.0.1", port=port)
            client.set_auth("anyone", key)
            r = client.txt2img(prompt=PROMPT, seed=8, steps=2, **SIZE)
            assert r.image.size == (64, 64) and r.info["seed"] == 8
            assert client.util_get_model_names() == [f"default [{pipe.model_hash}]"]
    finally:
        service.close()


def test_the_info_has_a1111s_keys(api):
    r = api.txt2img(prompt=PROMPT, seed=6, steps=2, **SIZE)
    for key in ("prompt", "all_prompts", "negative_prompt", "seed", "all_seeds", "subseed",
                "width", "height", "sampler_name", "cfg_scale", "steps", "batch_size",
                "sd_model_name", "sd_model_hash", "infotexts", "job_timestamp", "clip_skip",
                "restore_faces", "denoising_strength", "styles", "version"):
        assert key in r.info, key
    assert json.loads(r.json["info"]) == r.info
    assert len(r.info["job_timestamp"]) == 14 and r.info["job_timestamp"].isdigit()
    assert (r.info["width"], r.info["height"], r.info["steps"]) == (64, 64, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # our own text reads back cleanly
        parse_parameters(r.info["infotexts"][0])
