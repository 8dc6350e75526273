"""AUTOMATIC1111's web API (/sdapi/v1/*) over the server's jobs, for its existing clients.

How a body becomes one of the engine's own requests, and what each answer holds, is
a1111_fields.py; this is the router. Errors are 4xx with one line in A1111's shape
{"error": ..., "detail": ...}; a full queue is 429 with Retry-After. The synchronous endpoints
submit a job and await it, so the server keeps serving (progress, interrupt, other clients)
meanwhile. Authentication is the app's (HTTP Basic with the API key as password is what
webuiapi's set_auth sends).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import threading

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ldm_engine.errors import UserInputError
from pipelines.jsonform import json_type

from .a1111_fields import (PREFIX, A1111Job, HTTPFailure, Options, clip_skip_of, echo_body,
                           img2img_job, info_json, png_info, progress_json, read_images,
                           samplers_list, schedulers_list, sd_model_json, served_model,
                           sha256_of, title, txt2img_job)
from .jobs import JobState

log = logging.getLogger("ldm_engine.apps.server.a1111")


class _Holder:
    """The current Options, replaced whole under a lock (values are frozen; only the slot
    changes), per router: one process's setting, as A1111's are."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._options = Options()

    def get(self) -> Options:
        with self._lock:
            return self._options

    def set(self, options: Options) -> None:
        with self._lock:
            self._options = options


def error_response(status: int, message: object,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """A1111's error body, one line: {"error": message, "detail": message}."""
    line = " ".join(str(message).split())
    return JSONResponse({"error": line, "detail": line}, status_code=status, headers=headers)


# --- the router -------------------------------------------------------------------------------

def a1111_router(service) -> APIRouter:
    """The /sdapi/v1 routes over a JobService (ldm_engine.apps.server.service)."""
    from .service import QueueFull, UnknownModel

    limits = service.config.limits
    holder = _Holder()
    router = APIRouter(prefix=PREFIX, tags=["AUTOMATIC1111 API"])

    def guarded(handler):
        """One-line A1111 errors from any route, also outside create_app's handlers."""
        @functools.wraps(handler)
        async def run(*args, **kwargs):
            try:
                return await handler(*args, **kwargs)
            except HTTPFailure as e:
                return error_response(e.status, e, e.headers)
            except QueueFull as e:
                seconds = max(1, math.ceil(e.retry_after))
                return error_response(429, f"the queue is full; retry in {seconds} s",
                                      {"Retry-After": str(seconds)})
            except UnknownModel as e:
                return error_response(404, e)
            except UserInputError as e:
                return error_response(400, e)
        return run

    async def body_of(request: Request) -> object:
        raw = await request.body()
        if len(raw) > limits.max_body_bytes:
            raise HTTPFailure(413, f"the request body is over {limits.max_body_bytes} bytes")
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise UserInputError(f"the body is not valid JSON: {e}") from None

    def default_model(options: Options) -> str:
        models = service.models()
        if options.model is not None:
            return options.model
        return next((m["name"] for m in models if m.get("default")), models[0]["name"])

    def nine_channels(name: str) -> bool:
        unet = service.pipeline(name).components.unet
        return getattr(unet.config, "in_channels", 4) == 9

    def model_entry(name: str) -> dict | None:
        return next((m for m in service.models() if m["name"] == name), None)

    async def generate(data: object, job: A1111Job) -> JSONResponse:
        # None: the service's default model, unless /options chose another.
        model = job.model or holder.get().model
        view = await run_in_threadpool(service.submit, job.request, num_images=job.num_images,
                                       model=model)
        view = await service.await_job(view.id)
        if view.state is JobState.FAILED:
            raise HTTPFailure(500, view.error or "the job failed")
        images = (await run_in_threadpool(read_images, view)
                  if view.state is JobState.DONE and job.send_images else [])
        info = info_json(view, job, await run_in_threadpool(model_entry, view.model),
                         inpainting_unet=await run_in_threadpool(nine_channels, view.model))
        keep = isinstance(data, dict) and data.get("include_init_images") is True
        return JSONResponse({"images": images, "parameters": echo_body(data, images=keep),
                             "info": info})

    @router.post("/txt2img", summary="Text to image (A1111's fields; waits for the image)")
    @guarded
    async def txt2img(request: Request):
        data = await body_of(request)
        job = await run_in_threadpool(
            lambda: txt2img_job(data, holder.get(), service.models()))
        return await generate(data, job)

    @router.post("/img2img", summary="Image to image / inpainting (A1111's fields)")
    @guarded
    async def img2img(request: Request):
        data = await body_of(request)
        job = await run_in_threadpool(
            lambda: img2img_job(data, holder.get(), service.models(),
                                max_pixels=limits.max_image_pixels,
                                max_bytes=limits.max_image_bytes))
        return await generate(data, job)

    @router.get("/progress", summary="The running job's progress and preview")
    @guarded
    async def progress(skip_current_image: bool = False):
        running = await run_in_threadpool(service.list_jobs, JobState.RUNNING)
        waiting = (await run_in_threadpool(service.stats))["queue_depth"]
        return progress_json(running, waiting, skip_current_image=skip_current_image)

    @router.post("/interrupt", summary="Cancel every running job")
    @guarded
    async def interrupt():
        await run_in_threadpool(service.interrupt)
        return {}

    @router.post("/skip", summary="Cancel every running job (queued jobs go on)")
    @guarded
    async def skip():
        # A1111's skip ends the current image of a batch and goes on with the next; here every
        # image of a job is one generation, so skipping it is cancelling it, and the queue
        # goes on as it does after an interrupt.
        await run_in_threadpool(service.interrupt)
        return {}

    @router.get("/sd-models", summary="The served models")
    @guarded
    async def sd_models():
        return await run_in_threadpool(lambda: [sd_model_json(m) for m in service.models()])

    @router.get("/samplers", summary="Samplers by their A1111 names")
    @guarded
    async def samplers():
        return samplers_list()

    @router.get("/schedulers", summary="Schedule types of the scheduler field")
    @guarded
    async def schedulers():
        return schedulers_list()

    @router.get("/scripts", summary="Scripts (none: scripts are not supported)")
    @guarded
    async def scripts():
        return {"txt2img": [], "img2img": []}

    @router.get("/options", summary="The current model and Clip skip")
    @guarded
    async def get_options():
        options = holder.get()
        name = await run_in_threadpool(default_model, options)
        entry = await run_in_threadpool(model_entry, name)
        return {"sd_model_checkpoint": title(entry) if entry else name,
                "sd_checkpoint_hash": await run_in_threadpool(sha256_of, entry),
                "CLIP_stop_at_last_layers": options.clip_skip, "eta_noise_seed_delta": 0,
                "sd_vae": "Automatic", "samples_format": "png"}

    @router.post("/options", summary="Switch the default model (among served ones) or Clip skip")
    @guarded
    async def set_options(request: Request):
        data = await body_of(request)
        if not isinstance(data, dict):
            raise UserInputError(f"the options must be a JSON object, got {json_type(data)}")
        options = holder.get()
        for key, value in data.items():
            if key == "sd_model_checkpoint":
                if not isinstance(value, str):
                    raise UserInputError("sd_model_checkpoint must be a model title")
                models = await run_in_threadpool(service.models)
                options = dataclasses.replace(options, model=served_model(models, value))
            elif key == "CLIP_stop_at_last_layers":
                options = dataclasses.replace(options, clip_skip=clip_skip_of(value, key))
            else:
                # A1111 stores any option; ones that mean nothing here are dropped, said once
                # in the log rather than failing a client that sets many at a time.
                log.warning("A1111 option %r ignored: not a setting of this server", key[:80])
        holder.set(options)
        return {}

    @router.post("/png-info", summary="The generation parameters in a PNG")
    @guarded
    async def png_info_route(request: Request):
        data = await body_of(request)
        return await run_in_threadpool(png_info, data, max_bytes=limits.max_image_bytes)

    return router
