"""The Gradio web UI mounted at "/": txt2img, img2img, inpaint (mask painted in the browser) and
PNG info, over the same JobService the HTTP API uses.

This module only lays out components (`build_ui`) and mounts the page (`mount_ui`); what the
buttons do is webui_handlers.py's plain functions (`generate`, `cancel`, `png_info`, `replay`,
...), wired here to the components.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import gradio as gr

from pipelines.params import GenerationParams
from pipelines.sampler_names import sampler_names

from .jobs import JobState
from .service import JobService
from .webui_handlers import (
    MODES, RANDOM_SEED, Settings, cancel, default, generate, native_size, png_info, replay,
    selected_image)

# Gradio's default theme loads Google Fonts; the page must render with no network but the
# server's own, so the fonts are the browser's.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "monospace"])


@dataclass(frozen=True)
class _Controls:
    """The Gradio components of one tab's Settings, in Settings' order (model aside)."""

    prompt: gr.Textbox
    negative_prompt: gr.Textbox
    sampler: gr.Dropdown
    steps: gr.Slider
    guidance_scale: gr.Slider
    seed: gr.Number
    width: gr.Slider
    height: gr.Slider
    batch: gr.Slider

    def inputs(self) -> list:
        return [getattr(self, f.name) for f in fields(self)]

    def settings(self, values: tuple, model: str | None) -> Settings:
        return Settings(**dict(zip([f.name for f in fields(self)], values)), model=model)


@dataclass(frozen=True)
class _Tab:
    """One generation tab's components."""

    controls: _Controls
    image: gr.components.Component | None   # img2img's image, inpaint's mask editor
    strength: gr.Slider | None
    run: gr.Button
    stop: gr.Button
    status: gr.Textbox
    preview: gr.Image
    gallery: gr.Gallery
    info: gr.Textbox


def _controls(mode: str, service: JobService) -> _Controls:
    limits = service.config.limits
    width, height = native_size(service, None)
    samplers = [(display, name) for name, display in sampler_names().items()]
    prompt = gr.Textbox(label="Prompt", lines=3, elem_id=f"{mode}-prompt",
                        max_length=limits.max_prompt_chars)
    negative = gr.Textbox(label="Negative prompt", lines=2, elem_id=f"{mode}-negative",
                          max_length=limits.max_prompt_chars)
    with gr.Row():
        sampler = gr.Dropdown(samplers, value=default(GenerationParams, "sampler"),
                              label="Sampling method", elem_id=f"{mode}-sampler")
        steps = gr.Slider(1, limits.max_steps, value=default(GenerationParams, "steps"),
                          step=1, label="Sampling steps", elem_id=f"{mode}-steps")
    with gr.Row():
        w = gr.Slider(8, limits.max_side, value=width, step=8, label="Width",
                      elem_id=f"{mode}-width")
        h = gr.Slider(8, limits.max_side, value=height, step=8, label="Height",
                      elem_id=f"{mode}-height")
    with gr.Row():
        cfg = gr.Slider(1, 30, value=default(GenerationParams, "guidance_scale"), step=0.5,
                        label="CFG scale", elem_id=f"{mode}-cfg")
        seed = gr.Number(RANDOM_SEED, precision=0, label="Seed (-1: random)",
                         elem_id=f"{mode}-seed")
        batch = gr.Slider(1, limits.max_images, value=1, step=1, label="Batch size",
                          elem_id=f"{mode}-batch")
    return _Controls(prompt, negative, sampler, steps, cfg, seed, w, h, batch)


def _image_input(mode: str) -> gr.components.Component | None:
    if mode == "img2img":
        return gr.Image(type="pil", image_mode="RGB", label="Image", elem_id="img2img-image",
                        sources=["upload", "clipboard"])
    if mode == "inpaint":
        # RGBA: the painted layer's alpha is the mask. PNG, not Gradio's default WebP, whose
        # lossy coding would smear the mask's edge. Any colour will do; magenta shows on most.
        return gr.ImageMask(type="pil", image_mode="RGBA", format="png", layers=False,
                            label="Image (paint the part to repaint)", elem_id="inpaint-editor",
                            sources=["upload", "clipboard"],
                            brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed",
                                           default_size=8))
    return None


def _tab(mode: str, service: JobService) -> _Tab:
    with gr.Row():
        with gr.Column():
            image = _image_input(mode)
            controls = _controls(mode, service)
            strength = None
            if mode != "txt2img":
                strength = gr.Slider(0, 1, value=default(MODES[mode], "strength"), step=0.01,
                                     label="Denoising strength", elem_id=f"{mode}-strength")
        with gr.Column():
            with gr.Row():
                run = gr.Button("Generate", variant="primary", elem_id=f"{mode}-generate")
                stop = gr.Button("Cancel", elem_id=f"{mode}-cancel")
            status = gr.Textbox(label="Progress", interactive=False, elem_id=f"{mode}-status")
            preview = gr.Image(label="Preview", interactive=False, height=160,
                               elem_id=f"{mode}-preview")
            gallery = gr.Gallery(label="Images", columns=4, type="filepath",
                                 elem_id=f"{mode}-gallery")
            info = gr.Textbox(label="Generation info", interactive=False, lines=3,
                              elem_id=f"{mode}-info")
    return _Tab(controls, image, strength, run, stop, status, preview, gallery, info)


def _wire_generation(service: JobService, mode: str, tab: _Tab, model: gr.Dropdown) -> None:
    """Generate and Cancel of one tab; the tab's own job id lives in a State."""
    job_id = gr.State(None)
    n = len(fields(_Controls))

    def clicked(*values):
        settings = tab.controls.settings(values[:n], values[n])
        kwargs = {}
        if mode == "img2img":
            kwargs = {"image": values[n + 1], "strength": values[n + 2]}
        elif mode == "inpaint":
            kwargs = {"editor": values[n + 1], "strength": values[n + 2]}
        sent = None
        for update in generate(service, mode, settings, **kwargs):
            if update.state is JobState.DONE:
                yield list(update.images), update.status, None, update.info, update.job_id
                continue
            # A preview is sent once: each one sent is a file written to Gradio's cache.
            preview = gr.skip() if update.preview is sent else update.preview
            sent = update.preview
            yield gr.skip(), update.status, preview, gr.skip(), update.job_id

    extra = [tab.image, tab.strength] if tab.image is not None else []
    # No Gradio-side concurrency limit: the service has the queue (and QueueFull); a handler
    # following a job mostly sleeps between polls.
    tab.run.click(clicked, [*tab.controls.inputs(), model, *extra],
                  [tab.gallery, tab.status, tab.preview, tab.info, job_id],
                  concurrency_limit=None)
    tab.stop.click(lambda j: cancel(service, j), job_id, tab.status)


def _select_index(evt: gr.SelectData) -> int:
    return evt.index


def build_ui(service: JobService) -> gr.Blocks:
    """The page: a model picker over the tabs, every handler bound to `service`."""
    models = service.models()
    names = [m["name"] for m in models]
    first = next((m["name"] for m in models if m.get("default")), names[0])
    # Files Gradio caches (previews, copies of shown PNGs) older than a day go, hourly; the
    # jobs' own PNGs stay in out_dir.
    # analytics_enabled=False: no version check or usage report to Gradio's servers (every
    # call Gradio would make for this page asks the Blocks' flag; the engine sets environment
    # variables in one place only, ldm_engine/__init__.py, so GRADIO_ANALYTICS_ENABLED is the
    # user's to set).
    with gr.Blocks(title="ldm-engine", analytics_enabled=False,
                   delete_cache=(3600, 86400)) as ui:
        model = gr.Dropdown(names, value=first, label="Model", elem_id="model")
        tabs: dict[str, _Tab] = {}
        with gr.Tabs(elem_id="tabs") as tab_set:
            for mode, title in (("txt2img", "txt2img"), ("img2img", "img2img"),
                                ("inpaint", "Inpaint")):
                with gr.Tab(title, id=mode, elem_id=f"tab-{mode}"):
                    tabs[mode] = _tab(mode, service)
                    if mode == "txt2img":
                        send = gr.Button("Send to img2img", elem_id="send-to-img2img")
                    _wire_generation(service, mode, tabs[mode], model)
            with gr.Tab("PNG info", id="pnginfo", elem_id="tab-pnginfo"):
                with gr.Row():
                    png = gr.Image(type="filepath", image_mode=None, label="PNG", height=320,
                                   sources=["upload"], elem_id="pnginfo-image")
                    with gr.Column():
                        text = gr.Textbox(label="Parameters", lines=6, interactive=False,
                                          elem_id="pnginfo-text")
                        again = gr.Button("Re-play in txt2img", elem_id="pnginfo-replay")

        # "Send to img2img": the txt2img image last clicked (else the first).
        selected = gr.State(None)
        tabs["txt2img"].gallery.select(_select_index, None, selected)
        tabs["txt2img"].gallery.change(lambda: None, None, selected)    # new images: none yet
        send.click(lambda g, i: (selected_image(g, i), gr.Tabs(selected="img2img")),
                   [tabs["txt2img"].gallery, selected], [tabs["img2img"].image, tab_set])

        # type="filepath" with no image_mode hands over the uploaded file untouched (its text
        # chunks included); a converted copy would have lost them.
        png.change(png_info, png, text)
        target = tabs["txt2img"].controls

        def replay_clicked(text: str):
            settings, notes = replay(service, text)
            if notes:
                gr.Warning("The image may differ: " + "; ".join(notes))
            values = [getattr(settings, f.name) for f in fields(_Controls)]
            return (*values, settings.model or gr.skip(), gr.Tabs(selected="txt2img"))

        again.click(replay_clicked, text, [*target.inputs(), model, tab_set])
        # The sizes follow the model the user picks (not one Re-play sets: the PNG has its
        # size): its native size is what it makes best.
        model.input(lambda m: [*native_size(service, m)] * len(tabs), model,
                    [c for t in tabs.values() for c in (t.controls.width, t.controls.height)])
    return ui


def mount_ui(app, service: JobService):
    """Mount the UI at "/" on a FastAPI app and return the app. Routes the app already has
    (/v1, /sdapi, /docs) keep priority over the mount, so call this after adding them."""
    config = service.config
    database = config.database.resolve()
    return gr.mount_gradio_app(
        app, build_ui(service), path="/", theme=THEME,
        # The gallery shows the jobs' own PNGs (parameters text included, for download); the
        # job database beside them stays private.
        allowed_paths=[str(config.out_dir.resolve())],
        blocked_paths=[str(database), f"{database}-wal", f"{database}-shm"],
        max_file_size=config.limits.max_image_bytes, footer_links=[], run_history=False,
        ssr_mode=False, mcp_server=False)
