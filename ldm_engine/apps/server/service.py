"""JobService: what every front end (the /v1 API, the A1111 API, the web UI, Ray) calls.

It checks a request against the server's limits and the model's own (without running it),
queues it durably in the JobStore, runs config.workers_per_device workers on config.device, and
answers questions about jobs from the store, which stays the only authority: another process
sharing the database sees the same jobs. Live events (progress, previews) come straight from
this process's workers; for a job another process runs, a poller turns the store's changes into
the same events.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from ldm_engine.errors import UserInputError
from pipelines.base import Pipeline
from pipelines.jsonform import request_to_json
from pipelines.params import GenerationParams
from pipelines.registry import mode_of

from .config import ServerConfig, model_name
from .jobs import FINAL_STATES, JobState, JobStore, JobView, QueueFullError, batch_key
from .worker import Worker, worker_is_dead

log = logging.getLogger("ldm_engine.server")

# Recent per-step times kept for /metrics.
STEP_HISTORY = 200
# How often a subscriber's job is read from the store (for jobs other processes run, and as a
# safety net) and how often await_job polls.
POLL_SECONDS = 0.05
# A first guess at a job's run time before any has finished (QueueFull's Retry-After).
DEFAULT_JOB_SECONDS = 5.0


class QueueFull(Exception):
    """config.queue_size jobs already wait; retry_after: seconds a client should wait."""

    def __init__(self, retry_after: float, depth: int):
        super().__init__(f"the queue is full ({depth} jobs waiting); retry in "
                         f"{retry_after:.0f} s")
        self.retry_after = retry_after
        self.depth = depth


class UnknownModel(UserInputError):
    """A model name the server does not serve; the message lists the ones it does."""


@dataclass
class _Subscriber:
    queue: "queue.Queue[dict]"
    step: int = -1
    state: str | None = None
    closed: bool = False


@dataclass
class _Stats:
    started: float = field(default_factory=time.time)
    batches: int = 0
    batched_images: int = 0
    step_seconds: collections.deque = field(
        default_factory=lambda: collections.deque(maxlen=STEP_HISTORY))


class JobService:
    """Jobs over the pipelines of config.models; a context manager (start / stop)."""

    def __init__(self, config: ServerConfig, *, pipelines: Mapping[str, Pipeline] | None = None,
                 start_workers: bool = True):
        config.check()
        self.config = config
        self._names = config.model_names()
        self._paths = dict(zip(self._names, config.models))
        self._pipelines: dict[str, Pipeline] = dict(pipelines or {})
        unknown = set(self._pipelines) - set(self._names)
        if unknown:
            raise UserInputError(f"pipelines given for models the config does not name: "
                                 f"{', '.join(sorted(unknown))}")
        self._load_lock = threading.Lock()
        config.out_dir.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(config.database, out_dir=config.out_dir)
        self._workers: list[Worker] = []
        self._subs: dict[str, list[_Subscriber]] = {}
        self._subs_lock = threading.Lock()
        self._cancels: set[str] = set()
        self._finished_cv = threading.Condition()
        self._stats = _Stats()
        self._stats_lock = threading.Lock()
        self._poller: threading.Thread | None = None
        self._stopping = threading.Event()
        self._start_workers = start_workers
        if start_workers:
            self.start()

    # --- life -----------------------------------------------------------------------------

    def start(self) -> None:
        """Load the default model, put jobs of dead workers back in the queue, start the
        workers and the event poller. Idempotent."""
        self._stopping.clear()
        if self._poller is None or not self._poller.is_alive():
            self._poller = threading.Thread(target=self._poll_events, daemon=True,
                                            name="ldm-events")
            self._poller.start()
        if any(w.alive for w in self._workers):
            return
        self.pipeline(None)
        dead = {w for w in self.store.running_workers() if worker_is_dead(w)}
        for job_id in self.store.requeue_workers(dead):
            log.warning("job %s was running when its server stopped: queued again", job_id)
        self._workers = [Worker(self.store, self) for _ in range(self.config.workers_per_device)]
        for w in self._workers:
            w.start()

    def stop(self, timeout: float = 10) -> None:
        """Stop the workers (a running batch finishes if it can within `timeout`, else goes
        back to the queue) and the poller; the database stays as it is."""
        self._stopping.set()
        for w in self._workers:
            w._stop.set()
            w.wake.set()
        for w in self._workers:
            w.stop(timeout)
        self._workers = []
        if self._poller is not None:
            self._poller.join(timeout)
            self._poller = None

    def close(self) -> None:
        self.stop()
        self.store.close()

    def __enter__(self) -> "JobService":
        if self._start_workers:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- models ---------------------------------------------------------------------------

    def _name(self, model: str | None) -> str:
        if model is None or model == "":
            return self._names[0]
        if model not in self._paths:
            raise UnknownModel(f"unknown model {str(model)[:80]!r}; this server has: "
                               f"{', '.join(self._names)}")
        return model

    def pipeline(self, model: str | None) -> Pipeline:
        """The loaded pipeline of a model (None: the default), loaded on first use."""
        name = self._name(model)
        pipe = self._pipelines.get(name)
        if pipe is None:
            with self._load_lock:
                pipe = self._pipelines.get(name)
                if pipe is None:
                    cfg = self.config
                    log.info("loading model %s from %s", name, self._paths[name])
                    pipe = Pipeline.from_folder(self._paths[name], device=cfg.device,
                                                dtype=cfg.dtype, compile=cfg.compile)
                    self._pipelines[name] = pipe
        return pipe

    def models(self) -> list[dict]:
        out = []
        for i, name in enumerate(self._names):
            pipe = self.pipeline(name)
            c = pipe.components
            out.append({"name": name, "path": str(self._paths[name]), "hash": pipe.model_hash,
                        "native_size": c.unet.config.sample_size * c.vae_factor,
                        "default": i == 0})
        return out

    # --- submitting -----------------------------------------------------------------------

    def check(self, request: GenerationParams, *, num_images: int = 1,
              model: str | None = None) -> None:
        """Every limit, and the model's own checks (size, steps, sampler, memory), without
        running anything: one-line UserInputError."""
        self._checked(request, num_images, model)

    def _checked(self, request, num_images, model) -> tuple[str, list[GenerationParams]]:
        if not isinstance(request, GenerationParams):
            raise UserInputError(f"a job runs a request (pipelines.params), got "
                                 f"{type(request).__name__}")
        limits = self.config.limits
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise UserInputError(f"num_images must be a positive integer, got {num_images!r}")
        if num_images > limits.max_images:
            raise UserInputError(f"{num_images} images asked; this server makes at most "
                                 f"{limits.max_images} per request")
        if isinstance(request.seed, bool) or not isinstance(request.seed, int):
            raise UserInputError(f"seed must be an integer, got {request.seed!r}")
        for name in ("prompt", "negative_prompt", "end_prompt", "target_prompt"):
            text = getattr(request, name, None)
            if isinstance(text, str) and len(text) > limits.max_prompt_chars:
                raise UserInputError(f"{name.replace('_', ' ')} is {len(text)} characters; the "
                                     f"limit is {limits.max_prompt_chars}")
        steps = [("steps", request.steps)]
        if request.hires is not None:
            steps.append(("hires steps", request.hires.steps))
        for what, n in steps:
            if isinstance(n, int) and n > limits.max_steps:
                raise UserInputError(f"{what} {n} is over this server's limit of "
                                     f"{limits.max_steps}")
        name = self._name(model)
        pipe = self.pipeline(name)
        mode = mode_of(request)
        images = mode.expand(request, num_images)
        if len(images) > limits.max_images:
            raise UserInputError(f"this request makes {len(images)} images; this server makes "
                                 f"at most {limits.max_images} per request")
        # Reranking generates every candidate: they count against the image limit, and the
        # model must have a CLIP to score them (refused here, not when the job runs).
        rerank = request.rerank if isinstance(request.rerank, int) else 1
        if rerank > 1 and len(images) * rerank > limits.max_images:
            raise UserInputError(f"rerank {rerank} makes {len(images) * rerank} candidates; this "
                                 f"server makes at most {limits.max_images} images per request")
        if rerank > 1 and pipe.clip is None:
            raise UserInputError(f"rerank needs a CLIP image encoder: model {name} has none")
        height, width = mode.size(pipe, images[0])
        for h, w in {(height, width), mode.largest(pipe, images[0], height, width)}:
            if max(h, w) > limits.max_side:
                raise UserInputError(f"width x height {w}x{h} is larger than this server's "
                                     f"limit of {limits.max_side} px a side")
        # Every check Pipeline.run makes before compute, the model's included.
        pipe._batch(mode, images, None, False)
        return name, images

    def submit(self, request: GenerationParams, *, num_images: int = 1,
               model: str | None = None) -> JobView:
        """check(), then queue the job (durable when this returns); QueueFull when
        config.queue_size jobs already wait."""
        name, images = self._checked(request, num_images, model)
        as_json = request_to_json(request)
        key = batch_key(as_json, request_to_json(mode_of(request).shared(request)), name)
        try:
            job_id = self.store.insert(mode=request.mode, model=name, num_images=num_images,
                                       images=len(images), request=as_json, key=key,
                                       limit=self.config.queue_size)
        except QueueFullError as e:
            raise QueueFull(self._retry_after(e.depth), e.depth) from None
        for w in self._workers:
            w.wake.set()
        return self.store.get(job_id)

    def _retry_after(self, depth: int) -> float:
        """Roughly when a place frees up: recent job time x jobs waiting / workers (>= 1 s)."""
        recent = self.store.recent_durations()
        per_job = sum(recent) / len(recent) if recent else DEFAULT_JOB_SECONDS
        workers = max(1, len(self._workers) or self.config.workers_per_device)
        # A job's run time is its batch's: the queue drains as many jobs per run as recent
        # batches held (images per batch, as most jobs are one image).
        with self._stats_lock:
            s = self._stats
            per_batch = s.batched_images / s.batches if s.batches else 1.0
        return max(1.0, per_job * depth / workers / max(1.0, per_batch))

    # --- reading and cancelling -----------------------------------------------------------

    def get(self, job_id: str) -> JobView | None:
        return self.store.get(job_id)

    def list_jobs(self, state: JobState | None = None, limit: int = 100) -> list[JobView]:
        if state is not None:
            state = JobState(state)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise UserInputError(f"limit must be a positive integer, got {limit!r}")
        return self.store.list(state, min(limit, 10_000))

    def cancel(self, job_id: str) -> JobView | None:
        """A queued job is cancelled at once; a running one at its next step (its worker
        ends it CANCELLED). None: no such job."""
        state = self.store.request_cancel(job_id)
        if state is None:
            return None
        if state is JobState.RUNNING:
            self._cancels.add(job_id)
        elif state is JobState.CANCELLED:
            self._finished(job_id)
        return self.store.get(job_id)

    def interrupt(self) -> int:
        """A1111's /interrupt: cancel every running job; how many were asked to stop."""
        ids = self.store.cancel_running()
        self._cancels.update(ids)
        return len(ids)

    def wait(self, job_id: str, timeout: float | None = None) -> JobView:
        """Block until the job is DONE, FAILED or CANCELLED; TimeoutError after `timeout` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            view = self.store.get(job_id)
            if view is None:
                raise KeyError(f"no job {job_id}")
            if view.state in FINAL_STATES:
                return view
            left = 4 * POLL_SECONDS
            if deadline is not None:
                left = min(left, deadline - time.monotonic())
                if left <= 0:
                    raise TimeoutError(f"job {job_id} is still {view.state.value} after "
                                       f"{timeout} s")
            with self._finished_cv:
                # Woken by this process's workers; the timeout covers other processes'.
                self._finished_cv.wait(left)

    async def await_job(self, job_id: str, timeout: float | None = None) -> JobView:
        """wait() for asyncio: polls the store every POLL_SECONDS (a read: never blocks on a
        writer in WAL mode), so the event loop is never held."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            state = self.store.state(job_id)
            if state is None:
                raise KeyError(f"no job {job_id}")
            if state in FINAL_STATES:
                return self.store.get(job_id)
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is still {state.value} after {timeout} s")
            await asyncio.sleep(POLL_SECONDS)

    # --- live events ----------------------------------------------------------------------

    def events(self, job_id: str) -> "queue.Queue[dict]":
        """Live events of one job: {"type": "progress", "job", "step", "total"}, {"type":
        "preview", "job", "step", "image": base64 PNG}, {"type": "state", "job", "state", "job_view"
        (final states: the view's to_json())}. The queue ends with a "state" event of a final
        state (at once for a finished job); KeyError for an unknown job."""
        view = self.store.get(job_id)
        if view is None:
            raise KeyError(f"no job {job_id}")
        sub = _Subscriber(queue.Queue())
        with self._subs_lock:
            self._subs.setdefault(job_id, []).append(sub)
        # Subscribed first, then read: a change between the two is seen by the poller.
        self._emit_view(job_id, self.store.get(job_id))
        return sub.queue

    def unsubscribe(self, job_id: str, events: "queue.Queue[dict]") -> None:
        """Stop feeding a queue events() returned (its client went away before the end)."""
        with self._subs_lock:
            subs = [s for s in self._subs.get(job_id, []) if s.queue is not events]
            if subs:
                self._subs[job_id] = subs
            else:
                self._subs.pop(job_id, None)

    def _publish(self, job_id: str, event: dict) -> None:
        """An event from a worker to this job's subscribers (each gets it once, in order)."""
        with self._subs_lock:
            subs = self._subs.get(job_id)
            if not subs:
                return
            for sub in subs:
                self._deliver(sub, event)
            self._subs[job_id] = [s for s in subs if not s.closed]
            if not self._subs[job_id]:
                del self._subs[job_id]

    @staticmethod
    def _deliver(sub: _Subscriber, event: dict) -> None:
        if sub.closed:
            return
        kind = event["type"]
        if kind == "progress":
            if event["step"] <= sub.step:
                return
            sub.step = event["step"]
        elif kind == "state":
            if event["state"] == sub.state:
                return
            sub.state = event["state"]
            sub.closed = JobState(event["state"]) in FINAL_STATES
            if sub.state == JobState.QUEUED.value:
                sub.step = -1       # re-queued: its steps start again
        sub.queue.put(event)

    def _emit_view(self, job_id: str, view: JobView | None) -> None:
        if view is None:
            return
        if view.state is JobState.RUNNING:
            self._publish(job_id, {"type": "state", "job": job_id, "state": view.state.value})
            if view.total:
                self._publish(job_id, {"type": "progress", "job": job_id, "step": view.step,
                                       "total": view.total})
        elif view.state in FINAL_STATES:
            self._publish(job_id, {"type": "state", "job": job_id, "state": view.state.value,
                                   "job_view": view.to_json()})
        else:
            self._publish(job_id, {"type": "state", "job": job_id, "state": view.state.value})

    def _finished(self, job_id: str) -> None:
        """A worker (or a queued cancel) ended a job: tell subscribers and waiters."""
        self._cancels.discard(job_id)
        self._emit_view(job_id, self.store.get(job_id))
        with self._finished_cv:
            self._finished_cv.notify_all()

    def _poll_events(self) -> None:
        """The store's view of subscribed jobs, turned into events (what other processes'
        workers did; and a final state this process missed)."""
        while not self._stopping.wait(POLL_SECONDS * 4):
            with self._subs_lock:
                ids = list(self._subs)
            for job_id in ids:
                try:
                    self._emit_view(job_id, self.store.get(job_id))
                except Exception:
                    log.exception("event poll of job %s failed", job_id)

    def _cancel_wanted(self, job_id: str) -> bool:
        return job_id in self._cancels

    # --- metrics --------------------------------------------------------------------------

    def _record_batch(self, images: int, step_seconds: float | None) -> None:
        with self._stats_lock:
            self._stats.batches += 1
            self._stats.batched_images += images
            if step_seconds is not None:
                self._stats.step_seconds.append(step_seconds)

    def stats(self) -> dict:
        """For /metrics: jobs per state (all processes), this process's batches and steps."""
        counts = self.store.counts()
        with self._stats_lock:
            s = self._stats
            return {"jobs": counts, "queue_depth": counts[JobState.QUEUED.value],
                    "images_done": self.store.images_done(),
                    "step_seconds": list(s.step_seconds), "batches": s.batches,
                    "batched_images": s.batched_images, "started": s.started}


__all__ = ["JobService", "JobState", "JobView", "QueueFull", "UnknownModel", "model_name"]
