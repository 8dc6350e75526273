"""The Gradio web UI (ldm_engine.apps.server.webui, its handlers in webui_handlers): the handlers
over a real JobService on the bundled model, and (slow) the page itself in headless Chromium
driven by Playwright."""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from ldm_engine.apps.server import webui  # noqa: E402
from ldm_engine.apps.server import webui_handlers as handlers  # noqa: E402
from ldm_engine.apps.server.config import ServerConfig, hash_key  # noqa: E402
from ldm_engine.apps.server.jobs import JobState  # noqa: E402
from ldm_engine.apps.server.service import JobService  # noqa: E402
from ldm_engine.paths import BUNDLED_MODEL  # noqa: E402
from pipelines.jsonform import decode_image  # noqa: E402
from pipelines.params import image_hash  # noqa: E402
from pipelines.pnginfo import parse_parameters, read_png_text  # noqa: E402

pytestmark = pytest.mark.usefixtures("deadline")
# The browser test takes ~35 s on a quiet machine; the handlers' tests a few seconds each.
DEADLINE_SECONDS = 150
CHROMIUM = Path("/usr/bin/chromium")
# Fast polling: the bundled model makes a 12-step image in a fraction of a second.
POLL = 0.01


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    config = ServerConfig(models=(BUNDLED_MODEL,), out_dir=tmp_path_factory.mktemp("out"),
                          preview_every=1, ui=True)
    with JobService(config) as s:
        yield s


def run(service, mode="txt2img", **kwargs):
    """Every update of one generation, its settings from kwargs (images passed through)."""
    extra = {k: kwargs.pop(k) for k in ("image", "editor", "strength") if k in kwargs}
    settings = handlers.Settings(**{"prompt": "a red circle", "steps": 4, "seed": 5} | kwargs)
    return list(handlers.generate(service, mode, settings, poll=POLL, **extra))


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_txt2img_yields_progress_then_images_whose_parameters_match(service):
    updates = run(service, prompt="a blue square", negative_prompt="blurry", steps=12, seed=42,
                  guidance_scale=6.5, sampler="euler_a_normal")
    *during, last = updates
    assert during and all(u.state in (JobState.QUEUED, JobState.RUNNING) for u in during)
    running = [u for u in during if u.state is JobState.RUNNING]
    assert running and running[-1].status.startswith("running: step ")
    # preview_every=1: a running job shows its x0 estimate.
    assert any(u.preview is not None and u.preview.size == (64, 64) for u in running)
    assert last.state is JobState.DONE and last.status.startswith("done: 1 image(s)")
    ((path, caption),) = last.images
    assert caption == "seed 42" and Path(path).is_file()
    text = read_png_text(path)
    assert text == last.info
    params = parse_parameters(text)
    assert (params.prompt, params.negative_prompt, params.steps, params.seed,
            params.guidance_scale, params.sampler, params.width, params.height) == (
        "a blue square", "blurry", 12, 42, 6.5, "euler_a_normal", 64, 64)


def test_batch_makes_consecutive_seeds(service):
    last = run(service, batch=2, seed=100)[-1]
    assert [c for _, c in last.images] == ["seed 100", "seed 101"]
    a, b = (pixels(p) for p, _ in last.images)
    assert not np.array_equal(a, b)
    # Image 1 of the batch is the single image of seed 101 (to float rounding: a batch of two
    # takes other matmul paths than a batch of one, which can move a pixel by one level).
    (single, _), = run(service, seed=101)[-1].images
    assert np.abs(b.astype(int) - pixels(single)).max() <= 2


def test_random_seed_is_drawn_and_recorded(service):
    last = run(service, seed=-1)[-1]
    seed = parse_parameters(last.info).seed
    assert 0 <= seed < 2**32 and last.images[0][1] == f"seed {seed}"


@pytest.mark.parametrize("change, words", [
    ({"steps": 0}, "steps"),
    ({"steps": 2.5}, "steps must be a whole number"),
    ({"steps": 151}, "limit of 150"),
    ({"sampler": "nope"}, "unknown sampler"),
    ({"width": 70}, "70"),
    ({"model": "missing"}, "unknown model"),
    ({"batch": 17}, "at most 16"),
])
def test_bad_input_is_a_gr_error_and_queues_nothing(service, change, words):
    before = len(service.list_jobs(limit=10_000))
    with pytest.raises(gr.Error) as e:
        run(service, **change)
    assert words in e.value.message and "\n" not in e.value.message
    assert len(service.list_jobs(limit=10_000)) == before


def test_png_info_and_replay_remake_the_same_image(service):
    first = run(service, prompt="a cat, (on a mat:1.2)", negative_prompt="dog", steps=6,
                seed=9, guidance_scale=5.0, sampler="dpmpp_2m_karras")[-1]
    path = first.images[0][0]
    text = handlers.png_info(path)
    assert text == first.info
    settings, notes = handlers.replay(service, text)
    assert notes == []
    assert (settings.prompt, settings.seed, settings.steps, settings.sampler) == (
        "a cat, (on a mat:1.2)", 9, 6, "dpmpp_2m_karras")
    again = list(handlers.generate(service, "txt2img", settings, poll=POLL))[-1]
    np.testing.assert_array_equal(pixels(path), pixels(again.images[0][0]))
    assert again.info == first.info


def test_png_info_refuses_a_png_without_parameters(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    with pytest.raises(gr.Error, match="no generation parameters"):
        handlers.png_info(str(plain))
    assert handlers.png_info(None) == ""


def test_replay_names_what_txt2img_cannot_reproduce(service):
    text = ("a tree\nSteps: 5, Sampler: DDIM, CFG scale: 7.0, Seed: 3, Size: 64x64, "
            "Model: elsewhere, Clip skip: 2")
    settings, notes = handlers.replay(service, text)
    assert settings.model is None and (settings.width, settings.height) == (64, 64)
    assert any("clip skip is 2" in n for n in notes)
    assert any("'elsewhere' is not served" in n for n in notes)
    bf16 = text.replace("Model: elsewhere", "Model: default, Dtype: bf16")
    _, notes = handlers.replay(service, bf16)
    assert any("dtype is bf16, this server's is fp32" in n for n in notes)
    with pytest.raises(gr.Error, match="settings line"):
        handlers.replay(service, "just a prompt")


def square(image_size=64, box=(16, 16, 40, 40)) -> Image.Image:
    """A transparent layer with one opaque painted square, as the ImageMask brush leaves it."""
    layer = Image.new("RGBA", (image_size, image_size), (0, 0, 0, 0))
    ImageDraw.Draw(layer).rectangle(box, fill=(255, 0, 255, 255))
    return layer


def test_inpaint_uses_the_painted_layer_as_mask(service):
    background = Image.new("RGBA", (64, 64), (20, 120, 200, 255))
    editor = {"background": background, "layers": [square()], "composite": None}
    last = run(service, "inpaint", editor=editor, strength=1.0)[-1]
    assert last.state is JobState.DONE
    image, mask = handlers.editor_images(editor)
    assert mask.getbbox() == (16, 16, 41, 41)
    params = parse_parameters(last.info)
    assert params.mode == "inpaint" and params.mask_hash == image_hash(mask)
    assert params.init_image_hash == image_hash(image)


def test_inpaint_refuses_no_image_and_an_empty_mask(service):
    with pytest.raises(gr.Error, match="needs an image"):
        run(service, "inpaint", editor={"background": None, "layers": []})
    empty = {"background": Image.new("RGBA", (64, 64), "white"),
             "layers": [Image.new("RGBA", (64, 64), (0, 0, 0, 0))]}
    with pytest.raises(gr.Error, match="mask is empty"):
        run(service, "inpaint", editor=empty)


def test_img2img_and_send_to_img2img(service):
    first = run(service)[-1]
    path = handlers.selected_image([(p, c) for p, c in first.images], 0)
    with Image.open(path) as im:
        image = im.convert("RGB")
    last = run(service, "img2img", image=image, strength=0.5)[-1]
    params = parse_parameters(last.info)
    assert params.mode == "img2img" and params.strength == 0.5
    assert params.init_image_hash == image_hash(image)
    with pytest.raises(gr.Error, match="needs an image"):
        run(service, "img2img", image=None)
    with pytest.raises(gr.Error, match="generate one first"):
        handlers.selected_image(None, None)


def test_cancel_ends_the_followed_job(service):
    settings = handlers.Settings(prompt="long", steps=150, seed=1)
    updates = handlers.generate(service, "txt2img", settings, poll=POLL)
    first = next(updates)
    for update in updates:
        if update.state is JobState.RUNNING:
            assert handlers.cancel(service, update.job_id) == "cancelling..."
            break
    rest = list(updates)
    assert rest[-1].state is JobState.CANCELLED and rest[-1].images == ()
    assert rest[-1].status.startswith("cancelled after ")
    assert service.get(first.job_id).state is JobState.CANCELLED
    assert handlers.cancel(service, None) == "nothing to cancel"


def test_closing_the_handler_cancels_its_job(service):
    updates = handlers.generate(service, "txt2img", handlers.Settings(prompt="left", steps=150),
                                poll=POLL)
    job_id = next(updates).job_id
    updates.close()                     # what Gradio does when the browser goes away
    assert service.wait(job_id, timeout=30).state is JobState.CANCELLED


def test_a_full_queue_is_a_message_not_a_wait(tmp_path):
    config = ServerConfig(models=(BUNDLED_MODEL,), out_dir=tmp_path, queue_size=1)
    with JobService(config, start_workers=False) as idle:      # nothing runs: jobs wait
        idle.submit(handlers.build_request("txt2img",
                                           handlers.Settings(prompt="first", steps=4)))
        with pytest.raises(gr.Error, match=r"queue is full; try again in \d+ s"):
            run(idle)
        assert len(idle.list_jobs()) == 1


def test_the_page_mounts_beside_the_api(service):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()

    @app.get("/v1/ping")
    def ping():
        return {"ok": True}

    webui.mount_ui(app, service)
    assert webui.build_ui(service).analytics_enabled is False     # no calls to Gradio's servers
    with TestClient(app) as client:
        assert client.get("/v1/ping").json() == {"ok": True}
        page = client.get("/")
        assert page.status_code == 200 and "gradio" in page.text
        config = client.get("/config").json()
        assert config["title"] == "ldm-engine"
        ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
        assert {"txt2img-prompt", "txt2img-generate", "inpaint-editor", "pnginfo-replay",
                "send-to-img2img"} <= ids
        # The gallery may show the jobs' PNGs (bytes as written: parameters and all); the job
        # database beside them is not served.
        png = Path(run(service)[-1].images[0][0]).resolve()
        served = client.get(f"/gradio_api/file={png}")
        assert served.status_code == 200 and served.content == png.read_bytes()
        db = service.config.database.resolve()
        assert db.parent == png.parent.parent
        assert client.get(f"/gradio_api/file={db}").status_code == 403
        # Nor anything else on the machine: the working directory, the model's weights.
        for other in (Path("setup.cfg").resolve(), *BUNDLED_MODEL.rglob("*.json")):
            assert client.get(f"/gradio_api/file={other}").status_code == 403, other


# --- in a real browser ---------------------------------------------------------------------

BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run",
                "--disable-quic"]


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (Debian's "
                    "chromium package); Playwright's own browsers are never downloaded")
def test_the_page_in_chromium(tmp_path):
    """Generate from the txt2img tab, paint a mask and inpaint, in headless Chromium.
    LDM_SCREENSHOTS=docs also saves docs/webui-txt2img.png and docs/webui-inpaint.png."""
    playwright = pytest.importorskip("playwright.sync_api")
    import httpx
    from ldm_engine.apps.server.app import create_app
    from server_util import serving

    # Behind an API key, as a server off loopback runs: the browser logs in with HTTP Basic
    # (the key as password), and every request the page makes must carry it.
    key = "test-key-0123456789"
    config = ServerConfig(models=(BUNDLED_MODEL,), out_dir=tmp_path / "out", ui=True,
                          preview_every=1, api_key_hashes=(hash_key(key),))
    shots = os.environ.get("LDM_SCREENSHOTS")
    outside: list[str] = []
    with JobService(config) as service, serving(create_app(service)) as url, \
            playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        assert httpx.get(url + "/").status_code == 401
        page = browser.new_page(viewport={"width": 1280, "height": 1100},
                                http_credentials={"username": "me", "password": key})
        page.set_default_timeout(30_000)

        def only_loopback(route):
            # The page must work with no network but this server's.
            if route.request.url.startswith(url):
                return route.continue_()
            outside.append(route.request.url)
            return route.abort()
        page.route("**/*", only_loopback)
        page.goto(url)

        page.locator("#txt2img-prompt textarea").fill("a red circle on a white background")
        set_number(page, "#txt2img-steps", 6)
        set_number(page, "#txt2img-seed", 11)
        page.locator("#txt2img-generate").click()
        image = page.locator("#txt2img-gallery img").first
        image.wait_for(state="visible")
        page.wait_for_function("() => { const i = document.querySelector('#txt2img-gallery img');"
                               " return i && i.complete && i.naturalWidth > 0; }")
        assert "done: 1 image(s)" in page.locator("#txt2img-status textarea").input_value()
        shown = Image.open(io.BytesIO(image.screenshot())).convert("L")
        assert np.asarray(shown).std() > 5          # an image, not a blank box
        info = page.locator("#txt2img-info textarea").input_value()
        assert "Seed: 11" in info and "Steps: 6" in info
        if shots:
            page.screenshot(path=str(Path(shots) / "webui-txt2img.png"), full_page=True)
        done = service.list_jobs(JobState.DONE)
        assert len(done) == 1 and done[0].request["prompt"] == "a red circle on a white background"

        # PNG info: the PNG's parameters are shown; Re-play fills txt2img, which re-makes it.
        source = tmp_path / "source.png"
        shutil.copy(done[0].outputs[0], source)
        page.get_by_role("tab", name="PNG info").click()
        with page.expect_file_chooser() as chooser:
            page.locator("#pnginfo-image").get_by_text("Drop Image Here").click()
        chooser.value.set_files(str(source))
        page.wait_for_function("() => document.querySelector('#pnginfo-text textarea')"
                               ".value.includes('Seed: 11')")
        assert page.locator("#pnginfo-text textarea").input_value() == done[0].infos[0]
        page.get_by_role("tab", name="txt2img").click()
        page.locator("#txt2img-prompt textarea").fill("something else")
        set_number(page, "#txt2img-steps", 9)
        page.get_by_role("tab", name="PNG info").click()
        page.locator("#pnginfo-replay").click()
        page.locator("#txt2img-prompt textarea").wait_for(state="visible")
        page.wait_for_function("() => document.querySelector('#txt2img-prompt textarea').value"
                               " === 'a red circle on a white background'")
        page.locator("#txt2img-generate").click()
        page.wait_for_function("() => document.querySelector('#txt2img-status textarea').value"
                               ".startsWith('done') && document.querySelectorAll("
                               "'#txt2img-gallery img').length > 0", polling=200)
        remade = wait_done(service, 2)
        assert remade[0].infos[0] == done[0].infos[0]
        np.testing.assert_array_equal(pixels(remade[0].outputs[0]), pixels(done[0].outputs[0]))

        # Inpaint: upload the image made first, paint one stroke over its middle, generate.
        page.get_by_role("tab", name="Inpaint").click()
        with page.expect_file_chooser() as chooser:
            page.locator("#inpaint-editor").get_by_text("Upload an image").click()
        chooser.value.set_files(str(source))
        page.locator("#inpaint-editor button[aria-label='Brush']").wait_for(state="visible")
        page.wait_for_timeout(500)          # the canvas lays the image out
        box = page.locator("#inpaint-editor canvas").first.bounding_box()
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(cx - 40, cy)        # one horizontal stroke through the middle
        page.mouse.down()
        for k in range(11):
            page.mouse.move(cx - 40 + 8 * k, cy, steps=2)
        page.mouse.up()
        page.locator("#inpaint-prompt textarea").fill("a green square")
        set_number(page, "#inpaint-steps", 6)
        page.locator("#inpaint-generate").click()
        page.wait_for_function("() => { const i = document.querySelector('#inpaint-gallery img');"
                               " return i && i.complete && i.naturalWidth > 0; }")
        assert "done: 1 image(s)" in page.locator("#inpaint-status textarea").input_value()
        if shots:
            page.screenshot(path=str(Path(shots) / "webui-inpaint.png"), full_page=True)

        # Cancel stops the tab's running job at its next step.
        page.get_by_role("tab", name="txt2img").click()
        set_number(page, "#txt2img-steps", 150)
        page.locator("#txt2img-generate").click()
        page.wait_for_function("() => document.querySelector('#txt2img-status textarea').value"
                               ".startsWith('running')", polling=50)
        page.locator("#txt2img-cancel").click()
        page.wait_for_function("() => document.querySelector('#txt2img-status textarea').value"
                               ".startsWith('cancelled after')")
        assert [j.request["steps"] for j in service.list_jobs(JobState.CANCELLED)] == [150]

        # Send to img2img: the image last clicked (the second of a batch of two) lands in the
        # img2img tab, which opens, and is what img2img starts from.
        set_number(page, "#txt2img-steps", 4)
        set_number(page, "#txt2img-batch", 2)
        page.locator("#txt2img-generate").click()
        page.wait_for_function("() => document.querySelector('#txt2img-status textarea').value"
                               ".startsWith('done: 2 image(s)')")
        pair = wait_done(service, 4)[0]
        page.locator("#txt2img-gallery button.thumbnail-item").nth(1).click()
        page.locator("#send-to-img2img").click()
        page.locator("#img2img-image img").wait_for(state="visible")
        assert page.get_by_role("tab", name="img2img").get_attribute("aria-selected") == "true"
        set_number(page, "#img2img-steps", 4)
        page.locator("#img2img-generate").click()
        page.wait_for_function("() => document.querySelector('#img2img-status textarea').value"
                               ".startsWith('done')")
        (varied,) = [j for j in service.list_jobs(JobState.DONE) if j.mode == "img2img"]
        with Image.open(pair.outputs[1]) as im:
            sent = parse_parameters(varied.infos[0]).init_image_hash
            assert sent == image_hash(im.convert("RGB"))
        browser.close()
    inpainted = [j for j in service.list_jobs(JobState.DONE) if j.mode == "inpaint"]
    assert len(inpainted) == 1
    params = parse_parameters(inpainted[0].infos[0])
    with Image.open(source) as im:
        assert params.init_image_hash == image_hash(im.convert("RGB"))
    # The stroke is the mask: a band across the middle, not the whole image, not nothing.
    mask = np.asarray(decode_image(inpainted[0].request["mask"], "mask").convert("L")) > 127
    rows, cols = np.nonzero(mask)
    assert 0.02 < mask.mean() < 0.5
    assert rows.min() > 16 and rows.max() < 48 and cols.min() > 4 and cols.max() < 60
    assert outside == [], f"the page asked for something off this server: {outside[:3]}"


def wait_done(service, n: int, timeout: float = 30) -> list:
    """The DONE jobs, newest first, once there are n."""
    deadline = time.monotonic() + timeout
    while len(done := service.list_jobs(JobState.DONE)) < n:
        assert time.monotonic() < deadline, f"{len(done)} of {n} jobs done"
        time.sleep(0.05)
    return sorted(done, key=lambda j: j.created, reverse=True)


def set_number(page, elem_id: str, value) -> None:
    """Type into a slider's or number's box (Gradio applies it on change)."""
    box = page.locator(f"{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")
