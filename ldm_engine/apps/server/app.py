"""The HTTP app of `ldm serve`: the native /v1 API, /healthz, /metrics, API keys and body limits.

    POST   /v1/jobs                 {"request": {...}, "num_images": 1, "model": null} -> 202 + job
    GET    /v1/jobs/{id}            the job (JobView JSON)
    GET    /v1/jobs/{id}/images/{k} its k-th PNG (k an index, never a path)
    GET    /v1/jobs/{id}/events     server-sent events: progress, preview, state (to a final one)
    DELETE /v1/jobs/{id}            cancel
    POST   /v1/generate             the same body (+ "timeout"), answered when the job has finished
    GET    /v1/models, /v1/samplers, /healthz, /metrics (Prometheus text), /docs (OpenAPI)

A "request" is a pipelines request in its JSON form (pipelines.jsonform): the server has no
parameter set of its own. Every front end (this API, the A1111 routes, the web UI) goes through
the same JobService, so the same limits and checks apply to all of them.

/v1/generate waits up to the body's "timeout" (default 600 s); past it the answer is 504 with the
job's id, and the job goes on.

Every 4xx answer is {"error": "<one line>"}. Bodies are read here, as bytes, so size limits and
messages are ours rather than a framework's: an oversized body is refused (413) from its
Content-Length before any of it is read, or as soon as the bytes streamed pass the limit.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import math
import re
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from ldm_engine.errors import UserInputError
from pipelines.jsonform import json_type, request_from_json

from .config import Limits, key_matches
from .service import JobService, QueueFull, UnknownModel

log = logging.getLogger(__name__)

# Paths that answer without an API key: a load balancer's health check has no key to send.
OPEN_PATHS = frozenset({"/healthz"})
# Job ids are uuid4 hex; anything else is refused before it reaches the database.
JOB_ID = re.compile(r"[0-9a-f]{32}")
FINAL_STATES = frozenset({"done", "failed", "cancelled"})
# POST /v1/generate waits this long by default (and at most MAX_WAIT): past it the job goes on
# and the answer is 504 with the job's id, to be polled at /v1/jobs/{id}.
DEFAULT_WAIT = 600.0
MAX_WAIT = 3600.0
# An SSE stream with nothing to say sends a comment this often, so proxies keep it open.
KEEPALIVE_SECONDS = 15.0
JOB_FIELDS = ("request", "num_images", "model")
# Path prefixes of the APIs (with the web UI mounted at "/", everything else is the UI's).
API_PREFIXES = ("/v1", "/sdapi")

_BODY_SCHEMA = {
    "type": "object", "required": ["request"], "additionalProperties": False,
    "properties": {
        "request": {"type": "object", "description": "a pipelines request in its JSON form "
                    "(pipelines/jsonform.py): \"mode\" (default txt2img), \"prompt\", and any "
                    "field of that mode's request type; images as base64 PNG",
                    "example": {"mode": "txt2img", "prompt": "a red circle", "steps": 20,
                                "seed": 1}},
        "num_images": {"type": "integer", "minimum": 1, "default": 1,
                       "description": "images of the request; image j uses seed + j"},
        "model": {"type": ["string", "null"], "default": None,
                  "description": "a name from GET /v1/models; null: the default model"},
    },
}
_GENERATE_SCHEMA = {**_BODY_SCHEMA, "properties": {
    **_BODY_SCHEMA["properties"],
    "timeout": {"type": "number", "default": DEFAULT_WAIT, "maximum": MAX_WAIT,
                "description": "seconds to wait; past it: 504 with the job's id (it goes on)"}}}


def _body_doc(schema: dict) -> dict:
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": schema}}}}


def one_line(text: object) -> str:
    """A message as one line (a client shows it as it is; a newline would split a log line)."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def error(status: int, message: object, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse({"error": one_line(message), **extra}, status_code=status,
                        headers=headers)


# --- body limit and API keys: ASGI middleware, so the A1111 routes and the UI get them too ------

class BodyTooLarge(Exception):
    """The request body streamed past Limits.max_body_bytes (raised from `receive`)."""

    def __init__(self, limit: int):
        super().__init__(f"the request body is larger than the limit of {limit} bytes")


class BodyLimit:
    """413 for a body over `limit` bytes: at once from Content-Length, else while it streams
    (a chunked upload has no length to check), so a client cannot make the server buffer more."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length")
        if length is not None:
            if not (length.isascii() and length.isdigit()):
                return await error(400, f"bad Content-Length {length[:40]!r}")(scope, receive,
                                                                                send)
            if int(length) > self.limit:
                return await error(413, BodyTooLarge(self.limit))(scope, receive, send)
        seen = 0
        started = False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def watched_send(message):
            nonlocal started
            started |= message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLarge as e:
            # Raised where no handler of the app caught it (a mounted sub-application).
            if started:
                raise
            await error(413, e)(scope, receive, send)


def presented_keys(headers: Headers) -> list[str]:
    """The keys a request offers: `Authorization: Bearer KEY`, `X-API-Key: KEY`, or HTTP Basic
    with the key as password (what webuiapi's set_auth and a browser's login prompt send)."""
    keys = []
    scheme, _, value = headers.get("authorization", "").partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        keys.append(value)
    elif scheme.lower() == "basic" and value:
        try:
            user_pass = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            user_pass = ""
        if ":" in user_pass:
            keys.append(user_pass.partition(":")[2])
    if headers.get("x-api-key"):
        keys.append(headers["x-api-key"])
    return keys


class ApiKeyAuth:
    """Every path but OPEN_PATHS needs one of the configured keys (compared as hashes, in
    constant time: config.key_matches). Outermost, so nothing runs for an unauthenticated
    client: not even its body is read."""

    # Basic first: a browser opening the web UI then shows its login prompt (password = key).
    CHALLENGE = [(b"www-authenticate", b'Basic realm="ldm serve", charset="UTF-8"'),
                 (b"www-authenticate", b'Bearer realm="ldm serve"')]

    def __init__(self, app, hashes: tuple[str, ...]):
        self.app, self.hashes = app, hashes

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        keys = presented_keys(Headers(scope=scope))
        if path in OPEN_PATHS or any(key_matches(k, self.hashes) for k in keys):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        message = ("wrong API key" if keys else "an API key is needed") + (
            ": send Authorization: Bearer KEY, X-API-Key: KEY, or HTTP Basic with the key as "
            "password")
        response = error(401, message)
        response.raw_headers.extend(self.CHALLENGE)
        await response(scope, receive, send)


# --- reading bodies ----------------------------------------------------------------------------

def _reject_constant(name: str):
    raise UserInputError(f"{name} is not JSON (numbers must be finite)")


async def read_json(request: Request) -> object:
    """The body as JSON: application/json only, read as bytes under BodyLimit, one-line errors."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise UnsupportedMediaType(media_type)
    body = await request.body()
    if not body.strip():
        raise UserInputError("the request body is empty; send a JSON object")
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise UserInputError("the request body is not UTF-8 text") from None
    except RecursionError:
        raise UserInputError("the request body's JSON is nested too deeply") from None
    except json.JSONDecodeError as e:
        raise UserInputError(f"malformed JSON in the request body: {e}") from None


class UnsupportedMediaType(Exception):
    def __init__(self, media_type: str):
        got = f"got {media_type[:60]!r}" if media_type else "none was given"
        super().__init__(f"send the body as Content-Type: application/json ({got})")


def job_body(data: object, limits: Limits, *, extra: tuple[str, ...] = ()) -> dict:
    """{"request", "num_images", "model"} of a job body, checked; the request parsed strictly."""
    allowed = JOB_FIELDS + extra
    if not isinstance(data, dict):
        raise UserInputError('the body must be a JSON object {"request": {...}, "num_images": '
                             f'1, "model": null}}, got {json_type(data)}')
    unknown = [k for k in data if k not in allowed]
    if unknown:
        raise UserInputError(f"unknown field {unknown[0][:60]!r} in the body; valid fields: "
                             f"{', '.join(allowed)}")
    if "request" not in data:
        raise UserInputError('the body needs a "request": the request\'s JSON form, e.g. '
                             '{"mode": "txt2img", "prompt": "..."}')
    num_images = data.get("num_images", 1)
    if isinstance(num_images, float) and num_images.is_integer():
        num_images = int(num_images)
    if isinstance(num_images, bool) or not isinstance(num_images, int):
        raise UserInputError(f"num_images must be an integer, got {json_type(num_images)}")
    if not 1 <= num_images <= limits.max_images:
        raise UserInputError(f"num_images must be 1-{limits.max_images}, got {num_images}")
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise UserInputError(f"model must be a model name (GET /v1/models) or null, got "
                             f"{json_type(model)}")
    request = request_from_json(data["request"], max_pixels=limits.max_image_pixels,
                                max_bytes=limits.max_image_bytes)
    return {"request": request, "num_images": num_images, "model": model}




def _timeout_of(data: dict) -> float:
    timeout = data.get("timeout", DEFAULT_WAIT)
    if (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
            or not 0 < timeout <= MAX_WAIT):
        raise UserInputError(f"timeout must be a number of seconds in (0, {MAX_WAIT:g}], got "
                             f"{timeout!r}"[:120])
    return float(timeout)


# --- the app -----------------------------------------------------------------------------------

def create_app(service: JobService) -> FastAPI:
    """The FastAPI app over a JobService: native API, A1111 routes, web UI (config.ui)."""
    config = service.config
    limits = config.limits

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await run_in_threadpool(service.start)
        try:
            yield
        finally:
            await run_in_threadpool(service.stop)

    app = FastAPI(title="ldm serve", version="1", lifespan=lifespan,
                  description=__doc__.split("\n\n")[1])
    app.state.service = service

    # Handlers: every failure is one JSON line, never a traceback or an HTML page.
    @app.exception_handler(UnknownModel)
    async def unknown_model(request, e):
        return error(404, e)

    @app.exception_handler(UserInputError)
    async def bad_input(request, e):
        return error(400, e)

    @app.exception_handler(UnsupportedMediaType)
    async def media_type(request, e):
        return error(415, e)

    @app.exception_handler(BodyTooLarge)
    async def too_large(request, e):
        return error(413, e)

    @app.exception_handler(QueueFull)
    async def queue_full(request, e):
        seconds = max(1, math.ceil(e.retry_after))
        return error(429, f"the queue is full; retry in {seconds} s",
                     headers={"Retry-After": str(seconds)})

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return error(422, f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e):
        if e.status_code == 404 and e.detail == "Not Found":
            message = f"no such path: {request.url.path[:200]}"
        elif e.status_code == 405 and e.detail == "Method Not Allowed":
            message = f"{request.method} is not allowed on {request.url.path[:200]}"
        else:
            message = e.detail
        return error(e.status_code, message, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request, e):
        log.exception("internal error in %s %s", request.method, request.url.path)
        return JSONResponse({"error": "internal server error (logged by the server)"},
                            status_code=500)

    def job_or_404(job_id: str):
        view = service.get(job_id) if JOB_ID.fullmatch(job_id) else None
        if view is None:
            raise StarletteHTTPException(404, f"no job {job_id[:64]!r}")
        return view

    @app.post("/v1/jobs", status_code=202, openapi_extra=_body_doc(_BODY_SCHEMA),
              summary="Queue a job")
    async def submit(request: Request):
        body = job_body(await read_json(request), limits)
        view = await run_in_threadpool(lambda: service.submit(**body))
        return JSONResponse(view.to_json(), status_code=202,
                            headers={"Location": f"/v1/jobs/{view.id}"})

    @app.post("/v1/generate", openapi_extra=_body_doc(_GENERATE_SCHEMA),
              summary="Make images and answer with them (504 + job id on timeout)")
    async def generate(request: Request):
        data = await read_json(request)
        body = job_body(data, limits, extra=("timeout",))
        timeout = _timeout_of(data)
        view = await run_in_threadpool(lambda: service.submit(**body))
        try:
            view = await service.await_job(view.id, timeout)
        except TimeoutError:                # it goes on; the client may poll it
            view = await run_in_threadpool(service.get, view.id)
        location = {"Location": f"/v1/jobs/{view.id}"}
        if view.state.value not in FINAL_STATES:
            return JSONResponse({"error": f"job {view.id} did not finish in {timeout:g} s; it "
                                 f"goes on: poll /v1/jobs/{view.id}", "id": view.id},
                                status_code=504, headers=location)
        if view.state.value == "cancelled":
            return error(409, f"job {view.id} was cancelled", headers=location)
        if view.state.value == "failed":
            return JSONResponse({"error": one_line(view.error), "id": view.id},
                                status_code=500, headers=location)
        images = await run_in_threadpool(
            lambda: [base64.b64encode(Path(p).read_bytes()).decode("ascii")
                     for p in view.outputs])
        return JSONResponse({**view.to_json(), "images": images}, headers=location)

    @app.get("/v1/jobs/{job_id}", summary="A job's state and results")
    async def get_job(job_id: str):
        return (await run_in_threadpool(job_or_404, job_id)).to_json()

    @app.delete("/v1/jobs/{job_id}", summary="Cancel a job (a running one stops at its next step)")
    async def cancel_job(job_id: str):
        await run_in_threadpool(job_or_404, job_id)
        view = await run_in_threadpool(service.cancel, job_id)
        if view is None:
            raise StarletteHTTPException(404, f"no job {job_id!r}")
        return view.to_json()

    @app.get("/v1/jobs/{job_id}/images/{k}", response_class=FileResponse,
             summary="A finished job's k-th PNG (k = 0, 1, ...)")
    async def get_image(job_id: str, k: int):
        view = await run_in_threadpool(job_or_404, job_id)
        if view.state.value != "done":
            raise StarletteHTTPException(409, f"job {job_id} has no images: it is "
                                              f"{view.state.value}")
        if not 0 <= k < len(view.outputs):
            raise StarletteHTTPException(404, f"job {job_id} has images 0-"
                                              f"{len(view.outputs) - 1}, not {k}")
        # The path comes from the database, never from the client; still, only files under
        # out_dir are served.
        path = Path(view.outputs[k]).resolve()
        if not path.is_relative_to(Path(config.out_dir).resolve()) or not path.is_file():
            raise StarletteHTTPException(404, f"image {k} of job {job_id} is gone")
        return FileResponse(path, media_type="image/png", filename=f"{job_id}-{k}.png",
                            content_disposition_type="inline")

    @app.get("/v1/jobs/{job_id}/events", response_class=StreamingResponse,
             summary="Server-sent events: progress, preview (base64 PNG), state")
    async def job_events(job_id: str):
        await run_in_threadpool(job_or_404, job_id)
        try:
            events = await run_in_threadpool(service.events, job_id)
        except KeyError:
            raise StarletteHTTPException(404, f"no job {job_id!r}") from None
        return StreamingResponse(_sse(events), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    @app.get("/v1/models", summary="The models this server runs (pick one by name)")
    async def models():
        # Paths stay on the server: clients name models, they never point at files.
        return [{k: v for k, v in m.items() if k != "path"} for m in service.models()]

    @app.get("/v1/samplers", summary="Sampler registry names and their A1111 display names")
    async def samplers():
        from pipelines.sampler_names import sampler_names
        return [{"name": n, "display_name": d} for n, d in sampler_names().items()]

    @app.get("/healthz", summary="Liveness (needs no API key)")
    async def healthz():
        return {"status": "ok"}

    registry = _metrics_registry(service)

    @app.get("/metrics", response_class=Response, summary="Prometheus metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        text = await run_in_threadpool(generate_latest, registry)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    _include_optional(app, service, config.ui)
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    if config.api_key_hashes:
        app.add_middleware(ApiKeyAuth, hashes=config.api_key_hashes)   # outermost: added last
    return app


async def _sse(events):
    """A service event queue as text/event-stream, until a final "state" event."""
    import queue

    import anyio

    def next_event():
        try:
            return events.get(timeout=1.0)
        except queue.Empty:
            return None

    idle = 0.0
    while True:
        # A blocking get in a worker thread, 1 s at a time: a client that went away frees its
        # thread within a second (Starlette cancels this generator on disconnect).
        event = await anyio.to_thread.run_sync(next_event)
        if event is None:
            idle += 1.0
            if idle >= KEEPALIVE_SECONDS:
                idle = 0.0
                yield ": keepalive\n\n"
            continue
        idle = 0.0
        event = {k: base64.b64encode(v).decode("ascii") if isinstance(v, bytes) else v
                 for k, v in event.items()}
        kind = str(event.get("type", "message"))
        yield f"event: {kind}\ndata: {json.dumps(event, default=str)}\n\n"
        if kind == "state" and str(_state_of(event)) in FINAL_STATES:
            return


def _state_of(event: dict) -> str:
    state = event.get("state")
    return getattr(state, "value", state)


def _include_optional(app: FastAPI, service, ui: bool) -> None:
    """The A1111 routes and (config.ui) the web UI, from their own modules; a module not
    written yet is skipped, any other import error is a bug and surfaces."""
    try:
        from .a1111 import a1111_router
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}.a1111":
            raise
        log.warning("no A1111 API: %s", e)
    else:
        app.include_router(a1111_router(service))
    if ui:
        # The UI's mount at "/" would answer every unknown path with its own 404; in the API's
        # namespaces the answer stays ours ({"error"}, and 405 for a known path).
        for prefix in API_PREFIXES:
            app.add_api_route(prefix + "/{rest:path}", _no_route(app), include_in_schema=False,
                              methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"])
        # Mounted at "/" after every route, so /v1, /sdapi and /docs keep theirs.
        from .webui import mount_ui
        mount_ui(app, service)


def _no_route(app: FastAPI):
    from starlette.routing import Match

    async def no_route(request: Request):
        allowed = sorted({m for route in app.routes
                          if route.matches(request.scope)[0] is Match.PARTIAL
                          for m in getattr(route, "methods", None) or ()})
        if allowed:
            raise StarletteHTTPException(405, headers={"Allow": ", ".join(allowed)})
        raise StarletteHTTPException(404)
    return no_route


def _metrics_registry(service):
    """A CollectorRegistry of its own (not the process-global one: two apps in one process,
    as in the tests, must not collide) whose values are read from service.stats() per scrape."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class ServiceCollector:
        def describe(self):
            return []

        def collect(self):
            stats = service.stats()
            yield GaugeMetricFamily("ldm_queue_depth", "jobs waiting to run",
                                    value=stats["queue_depth"])
            jobs = GaugeMetricFamily("ldm_jobs", "jobs in the database by state",
                                     labels=["state"])
            for state, count in sorted(stats["jobs"].items()):
                jobs.add_metric([str(getattr(state, "value", state))], count)
            yield jobs
            yield CounterMetricFamily("ldm_images", "images made", value=stats["images_done"])
            yield CounterMetricFamily("ldm_batches", "UNet batches run (Pipeline.run calls)",
                                      value=stats["batches"])
            yield CounterMetricFamily("ldm_batched_images", "images run through those batches",
                                      value=stats["batched_images"])
            yield GaugeMetricFamily("ldm_started_time_seconds", "when the service started "
                                    "(unix time)", value=stats["started"])
            yield from _step_metrics(stats["step_seconds"])

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector())
    return registry


def _step_metrics(recent: list[float]):
    """Step latency over the service's recent window: quantiles, and the window's count and
    sum as gauges (a window shrinks and grows, so they are not Prometheus counters)."""
    from prometheus_client.core import GaugeMetricFamily

    quantiles = GaugeMetricFamily("ldm_step_seconds", "seconds per denoising step over the "
                                  "recent window", labels=["quantile"])
    ordered = sorted(recent)
    for q in (0.5, 0.9, 0.99):
        if ordered:
            # Nearest rank: the smallest value with at least q of the window at or below it.
            quantiles.add_metric([str(q)], ordered[max(0, math.ceil(q * len(ordered)) - 1)])
    yield quantiles
    yield GaugeMetricFamily("ldm_step_seconds_window_count", "steps in the recent window",
                            value=len(ordered))
    yield GaugeMetricFamily("ldm_step_seconds_window_sum", "seconds of the steps in the "
                            "recent window", value=sum(ordered))
