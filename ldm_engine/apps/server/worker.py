"""Worker: a thread that claims batches of compatible jobs from the store and runs each batch as
one Pipeline.run (dynamic batching), writing PNGs and results back.

Image j of a job is its request with seed + j (Mode.expand), so a job's images are the same
whether it ran alone, in a batch with others, or again after its first worker died.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ldm_engine.errors import GenerationCancelled, UserInputError
from pipelines.base import Pipeline
from pipelines.jsonform import request_from_json
from pipelines.observe import Observer, Progress
from pipelines.params import GenerationParams
from pipelines.pnginfo import save_png
from pipelines.registry import mode_of

from .config import ServerConfig
from .jobs import Claim, JobState, JobStore, one_line

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger("ldm_engine.server")

# A job claimed this many times never finished: each time its worker died (killed for memory,
# say). Running it again would kill the next one too.
MAX_ATTEMPTS = 3
# Without a wake-up from this process, a worker looks for jobs other processes queued this often.
IDLE_POLL_SECONDS = 0.2
# Steps are ~10 ms for tiny models: the database hears of progress at most this often (live
# events go out every step), and cancels made by other processes are read at most this often.
PROGRESS_WRITE_SECONDS = 0.1
CANCEL_POLL_SECONDS = 0.1

_WORKER_COUNTER = iter(range(1, 1 << 62))
_COUNTER_LOCK = threading.Lock()
# The ids of this process's running workers (any JobService's).
LIVE_WORKERS: set[str] = set()


def new_worker_id() -> str:
    """host:pid:n, unique among live workers (pid + n within a host)."""
    with _COUNTER_LOCK:
        n = next(_WORKER_COUNTER)
    return f"{socket.gethostname()}:{os.getpid()}:{n}"


def worker_is_dead(worker_id: str) -> bool:
    """True when worker_id is certainly not running: it was on this host, and its process is
    gone, or it is this process and not one of its live workers. Other hosts' workers are
    left to their leases."""
    host, _, rest = worker_id.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        with _COUNTER_LOCK:
            return worker_id not in LIVE_WORKERS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:         # alive, another user's
        return False
    return False


class Host(Protocol):
    """What a worker needs from the service that runs it."""

    config: ServerConfig

    def pipeline(self, model: str | None) -> Pipeline: ...
    def _cancel_wanted(self, job_id: str) -> bool: ...
    def _publish(self, job_id: str, event: dict) -> None: ...
    def _finished(self, job_id: str) -> None: ...
    def _record_batch(self, images: int, step_seconds: float | None) -> None: ...


def decode_request(obj: dict) -> GenerationParams:
    """A stored request_to_json dict back into its request (the JSON form round-trips every
    field; the images are PNG, lossless)."""
    # Already checked when submitted: the stored images are ours, whatever their size.
    return request_from_json(obj, max_pixels=1 << 62, max_bytes=1 << 62)


@dataclass
class _Job:
    claim: Claim
    images: list[GenerationParams]
    first: int = 0                  # index of its first image in the batch


def png_bytes(image: "Image.Image") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class _BatchObserver(Observer):
    """Progress, previews, lease and cancellation of one running batch."""

    def __init__(self, worker: "Worker", jobs: list[_Job]):
        self.worker, self.jobs = worker, jobs
        self.ids = [j.claim.id for j in jobs]
        self.done_passes = 0            # steps of the passes already finished
        self.last_write = 0.0
        self.last_poll = 0.0
        self.cancelled_ids: set[str] = set()
        self.step_times: list[float] = []
        self._last_step_at: float | None = None
        # A reranked batch steps through chunks of candidates (pipelines.rerank), whose rows
        # are not the jobs' images: no previews then, only progress.
        self.reranked = any(r.rerank > 1 for j in jobs for r in j.images)

    def on_start(self, passes: int) -> None:
        self._last_step_at = time.perf_counter()

    def on_step(self, progress: Progress) -> None:
        now = time.perf_counter()
        if self._last_step_at is not None:
            self.step_times.append(now - self._last_step_at)
        self._last_step_at = now
        step = self.done_passes + progress.step
        # Later passes (hires fix) are counted at this pass's length until they start.
        total = self.done_passes + progress.total * (progress.passes - progress.pass_index)
        if progress.step == progress.total:
            self.done_passes += progress.total
        host, store, wid = self.worker.host, self.worker.store, self.worker.worker_id
        every = host.config.preview_every
        previews: dict[str, bytes] = {}
        if (every and not self.reranked and progress.step % every == 0
                and progress.step < progress.total):
            # One VAE pass over each job's first image only, not the whole batch.
            firsts = [j.first for j in self.jobs]
            seen = dataclasses.replace(
                progress, latents=progress.latents[firsts],
                denoised=None if progress.denoised is None else progress.denoised[firsts])
            images = seen.preview()
            previews = {j.claim.id: png_bytes(im) for j, im in zip(self.jobs, images)}
        if previews or step == total or time.monotonic() - self.last_write >= \
                PROGRESS_WRITE_SECONDS:
            store.progress(self.ids, wid, step, total, previews)
            self.last_write = time.monotonic()
        for j in self.ids:
            host._publish(j, {"type": "progress", "job": j, "step": step, "total": total})
        for j, png in previews.items():
            host._publish(j, {"type": "preview", "job": j, "step": step,
                              "image": base64.b64encode(png).decode("ascii")})

    def cancelled(self) -> bool:
        if self.worker._abort.is_set():
            return True
        host = self.worker.host
        self.cancelled_ids |= {j for j in self.ids if host._cancel_wanted(j)}
        if time.monotonic() - self.last_poll >= CANCEL_POLL_SECONDS:
            self.cancelled_ids |= self.worker.store.cancelled_ids(self.ids)
            self.last_poll = time.monotonic()
        # One job of a batch cancelled: the batch goes on for the others.
        return len(self.cancelled_ids) == len(self.ids)


class Worker:
    """One thread on one device: claim a batch, run it, write its results; forever, until stop().

    Any failure of a batch ends its jobs FAILED with one line; the worker itself goes on.
    """

    def __init__(self, store: JobStore, host: Host, *, worker_id: str | None = None,
                 models: list[str] | None = None):
        self.store, self.host = store, host
        self.worker_id = worker_id or new_worker_id()
        self.models = models
        self._stop = threading.Event()
        self._abort = threading.Event()      # stop now: the running batch goes back to the queue
        self.wake = threading.Event()
        self._busy = threading.Event()      # holds claimed jobs: the heartbeat renews
        self._ended = threading.Event()     # the loop has returned
        self._thread: threading.Thread | None = None
        self._beat: threading.Thread | None = None
        self._last_requeue = 0.0

    # --- life -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name=f"ldm-worker {self.worker_id}",
                                        daemon=True)
        self._beat = threading.Thread(target=self._heartbeat, daemon=True,
                                      name=f"ldm-lease {self.worker_id}")
        self._thread.start()
        self._beat.start()

    def stop(self, timeout: float = 10) -> None:
        """Finish the running batch if it ends within `timeout`, else stop it at its next step
        and put its jobs back in the queue."""
        self._stop.set()
        self.wake.set()
        if self._thread is None:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._abort.set()
            self._thread.join(max(timeout, 5))
        if self._beat is not None:
            self._beat.join(5)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _heartbeat(self) -> None:
        """Renew the lease of what this worker runs, from its own thread: a single long step
        or decode must not lose the claim; a killed process stops renewing with everything."""
        period = max(self.host.config.lease_seconds / 3, 0.05)
        while not self._ended.wait(period):
            if self._busy.is_set():
                try:
                    self.store.renew(self.worker_id, self.host.config.lease_seconds)
                except Exception:           # a busy database: try again next period
                    log.exception("lease renewal failed")

    def _loop(self) -> None:
        with _COUNTER_LOCK:
            LIVE_WORKERS.add(self.worker_id)
        try:
            self._serve()
        finally:
            with _COUNTER_LOCK:
                LIVE_WORKERS.discard(self.worker_id)
            self._ended.set()

    def _serve(self) -> None:
        cfg = self.host.config
        while not self._stop.is_set():
            try:
                now = time.monotonic()
                if now - self._last_requeue >= min(1.0, cfg.lease_seconds / 3):
                    self._last_requeue = now
                    for job_id in self.store.requeue_expired():
                        log.warning("job %s lost its worker (lease expired): queued again",
                                    job_id)
                self._busy.set()
                claims = self.store.claim_batch(self.worker_id, max_images=cfg.max_batch,
                                                lease_seconds=cfg.lease_seconds,
                                                models=self.models)
                if not claims:
                    self._busy.clear()
                    self.wake.wait(IDLE_POLL_SECONDS)
                    self.wake.clear()
                    continue
                self.run_batch(claims)
            except Exception:
                # The database itself failed (disk full, locked too long): keep serving.
                log.exception("worker %s: unexpected error", self.worker_id)
                time.sleep(IDLE_POLL_SECONDS)
            finally:
                self._busy.clear()

    # --- one batch ------------------------------------------------------------------------

    def run_batch(self, claims: list[Claim]) -> None:
        jobs: list[_Job] = []
        for claim in claims:
            if claim.attempts > MAX_ATTEMPTS:
                self._end([claim.id], JobState.FAILED,
                          f"the worker died {MAX_ATTEMPTS} times running this job")
                continue
            try:
                request = decode_request(claim.request)
                images = mode_of(request).expand(request, claim.num_images)
            except UserInputError as e:
                self._end([claim.id], JobState.FAILED, one_line(str(e)))
                continue
            except Exception as e:
                log.exception("job %s: cannot read its request", claim.id)
                self._end([claim.id], JobState.FAILED, internal_error(e))
                continue
            jobs.append(_Job(claim, images))
        if jobs:
            self._run(jobs)

    def _run(self, jobs: list[_Job]) -> None:
        batch: list[GenerationParams] = []
        for job in jobs:
            job.first = len(batch)
            batch.extend(job.images)
        if len(jobs) > 1 and not self._fits(jobs[0].claim.model, batch):
            # Each job passed the model's checks alone, but together they are over a limit
            # (the memory estimate, the images per call): run them one by one.
            for job in jobs:
                self._run([job])
            return
        for job in jobs:
            self.host._publish(job.claim.id, {"type": "state", "job": job.claim.id,
                                              "state": JobState.RUNNING.value})
        ids = [j.claim.id for j in jobs]
        observer = _BatchObserver(self, jobs)
        try:
            pipe = self.host.pipeline(jobs[0].claim.model)
            # Already expanded: one image per request (sequence modes keep their frame).
            result = pipe.run(batch, num_images=1, observer=[observer])
        except GenerationCancelled as e:
            if self._abort.is_set():
                for job_id in self.store.release(ids, self.worker_id):
                    self.host._publish(job_id, {"type": "state", "job": job_id,
                                                "state": JobState.QUEUED.value})
                return
            self._end(ids, JobState.CANCELLED, one_line(str(e)))
            return
        except UserInputError as e:
            self._end(ids, JobState.FAILED, one_line(str(e)))
            return
        except Exception as e:
            log.exception("batch of jobs %s failed", ", ".join(ids))
            self._end(ids, JobState.FAILED, internal_error(e))
            return
        steps = observer.step_times
        self.host._record_batch(len(batch), sum(steps) / len(steps) if steps else None)
        cancelled = observer.cancelled_ids | self.store.cancelled_ids(ids)
        for job in jobs:
            job_id = job.claim.id
            if job_id in cancelled:
                self._end([job_id], JobState.CANCELLED, None)
                continue
            try:
                names, infos, seeds = self._write(job, result.images, result.params)
            except Exception as e:
                log.exception("job %s: cannot write its images", job_id)
                self._end([job_id], JobState.FAILED, internal_error(e))
                continue
            if self.store.finish(job_id, self.worker_id, outputs=names, infos=infos,
                                 seeds=seeds):
                self._announce(job_id)

    def _fits(self, model: str, batch: list[GenerationParams]) -> bool:
        """Whether Pipeline.run would take these images as one batch (its checks only)."""
        try:
            pipe = self.host.pipeline(model)
            pipe._batch(mode_of(batch[0]), batch, None, False)
        except UserInputError:
            return False
        return True

    def _write(self, job: _Job, images: list, params: list[GenerationParams]
               ) -> tuple[list[str], list[str], list[int]]:
        """Its PNGs at <out_dir>/<job id>/<k>.png (each atomic), before the job is DONE."""
        folder = Path(self.host.config.out_dir) / job.claim.id
        folder.mkdir(parents=True, exist_ok=True)
        names, infos, seeds = [], [], []
        for k in range(len(job.images)):
            image, p = images[job.first + k], params[job.first + k]
            save_png(image, folder / f"{k}.png", p)
            names.append(f"{job.claim.id}/{k}.png")
            infos.append(p.to_png_text())
            seeds.append(int(p.seed))
        return names, infos, seeds

    def _end(self, ids: list[str], state: JobState, error: str | None) -> None:
        for job_id in self.store.end(ids, self.worker_id, state, error):
            self._announce(job_id)

    def _announce(self, job_id: str) -> None:
        self.host._finished(job_id)


def internal_error(e: BaseException) -> str:
    return one_line(f"internal error: {type(e).__name__}: {e}")

