"""The server's job queue (ldm_engine.apps.server: jobs, worker, service) on the bundled model.

What a client relies on: a submitted job is durable and ends DONE with PNGs that carry its
request; batching changes nothing in the images; cancel, queue limits, failures and dead
workers each end the way the API promises, and the worker goes on serving.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

from ldm_engine.apps.server.config import Limits, ServerConfig
from ldm_engine.apps.server.jobs import JobState, JobStore, batch_key
from ldm_engine.apps.server.service import JobService, QueueFull, UnknownModel
from ldm_engine.errors import UserInputError
from ldm_engine.paths import BUNDLED_MODEL
from pipelines import GenerationParams, TextToImage, read_png_params
from pipelines.jsonform import request_to_json
from pipelines.pnginfo import read_png_text

pytestmark = pytest.mark.usefixtures("deadline")
DEADLINE_SECONDS = 60

# 150 steps (the server's step limit) of the bundled model take over a second: long enough to
# cancel a job while it runs.
SLOW = GenerationParams(prompt="a slow one", steps=150, seed=7)


def request(prompt: str = "a red circle", seed: int = 1, steps: int = 4) -> GenerationParams:
    return GenerationParams(prompt=prompt, steps=steps, seed=seed)


@pytest.fixture(scope="module")
def pipe():
    return TextToImage.from_folder(BUNDLED_MODEL)


@pytest.fixture
def config(tmp_path):
    return ServerConfig(models=(BUNDLED_MODEL,), out_dir=tmp_path / "out", preview_every=0)


def service(config, pipe, **kw) -> JobService:
    return JobService(config, pipelines={"default": pipe}, **kw)


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def wait_running(svc: JobService, job_id: str, timeout: float = 20) -> None:
    """Until the job has made at least one step."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        view = svc.get(job_id)
        if view.state is JobState.RUNNING and view.step >= 1:
            return
        assert view.state in (JobState.QUEUED, JobState.RUNNING), view
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} never started")


def test_submit_runs_to_done_with_pngs_carrying_the_request(config, pipe):
    r = request(prompt="a blue square, (sharp:1.2)", seed=11)
    with service(config, pipe) as svc:
        job = svc.submit(r, num_images=2)
        assert job.state is JobState.QUEUED and job.num_images == 2
        done = svc.wait(job.id, timeout=20)
    assert done.state is JobState.DONE, done.error
    assert done.seeds == (11, 12)
    assert [os.path.basename(p) for p in done.outputs] == ["0.png", "1.png"]
    for k, path in enumerate(done.outputs):
        assert os.path.dirname(path) == str(config.out_dir / job.id)
        back = read_png_params(path)
        # What the run resolved (size, eta, model) is recorded; the rest is the request's.
        assert back == r.replace(seed=11 + k, height=64, width=64, eta=0.0, model="default",
                                 model_hash=pipe.model_hash)
        assert done.infos[k] == read_png_text(path)
    as_json = json.loads(json.dumps(done.to_json()))
    assert as_json["state"] == "done"
    assert as_json["outputs"] == [f"{job.id}/0.png", f"{job.id}/1.png"]
    assert as_json["request"]["prompt"] == r.prompt and as_json["request"]["mode"] == "txt2img"
    assert done.step == done.total == 4 and done.attempts == 1 and done.preview is None


def test_batched_jobs_make_the_same_images_as_single_jobs(tmp_path, pipe):
    """4 jobs with different prompts and seeds share one batch with max_batch 8 and run one by
    one with max_batch 1. Tolerance: at most 1 of 255 per channel (the UNet's batched matmuls
    may round differently; measured max 1e-6 in float before quantising)."""
    jobs = [request(prompt=f"shape number {i}", seed=100 + 7 * i) for i in range(4)]
    images = {}
    for max_batch in (8, 1):
        cfg = ServerConfig(models=(BUNDLED_MODEL,), out_dir=tmp_path / f"b{max_batch}",
                           max_batch=max_batch, preview_every=0)
        with service(cfg, pipe, start_workers=False) as svc:
            # Queued before any worker runs, so the batched service sees all four at once.
            ids = [svc.submit(r).id for r in jobs]
            svc.start()
            views = [svc.wait(i, timeout=30) for i in ids]
            stats = svc.stats()
        assert all(v.state is JobState.DONE for v in views)
        assert stats["batches"] == (1 if max_batch == 8 else 4)
        assert stats["batched_images"] == 4 and stats["images_done"] == 4
        images[max_batch] = [pixels(v.outputs[0]) for v in views]
    for a, b in zip(images[8], images[1]):
        assert np.abs(a - b).max() <= 1
    # Different prompts and seeds do make different images (the comparison means something).
    assert np.abs(images[1][0] - images[1][1]).max() > 10


def test_incompatible_jobs_do_not_share_a_batch(config, pipe):
    with service(config, pipe, start_workers=False) as svc:
        a = svc.submit(request(steps=4))
        b = svc.submit(request(steps=5))
        c = svc.submit(GenerationParams(prompt="x", steps=4, seed=3, guidance_scale=3.0))
        svc.start()
        for j in (a, b, c):
            assert svc.wait(j.id, timeout=20).state is JobState.DONE
        assert svc.stats()["batches"] == 3


def test_jobs_too_many_for_one_batch_run_one_by_one(tmp_path, pipe):
    """Two 33-image jobs each pass the model's limit of 64 images a call; together they are
    over it, so they run as two batches rather than failing."""
    cfg = ServerConfig(models=(BUNDLED_MODEL,), out_dir=tmp_path, max_batch=100,
                       preview_every=0, limits=Limits(max_images=40))
    with service(cfg, pipe, start_workers=False) as svc:
        ids = [svc.submit(request(seed=s, steps=2), num_images=33).id for s in (0, 1000)]
        svc.start()
        views = [svc.wait(i, timeout=40) for i in ids]
        assert svc.stats()["batches"] == 2
    assert [v.state for v in views] == [JobState.DONE] * 2, [v.error for v in views]
    assert len(views[1].outputs) == 33 and views[1].seeds[-1] == 1032


def test_cancel_queued_job_is_cancelled_at_once(config, pipe):
    with service(config, pipe, start_workers=False) as svc:
        job = svc.submit(request())
        other = svc.submit(request(seed=2))
        assert svc.get(other.id).queue_position == 1
        view = svc.cancel(job.id)
        assert view.state is JobState.CANCELLED and view.finished is not None
        assert svc.get(other.id).queue_position == 0
        assert svc.cancel("0" * 32) is None
        events = svc.events(job.id)
        assert events.get(timeout=1)["state"] == "cancelled"


def test_cancel_running_job_and_the_worker_goes_on(config, pipe):
    with service(config, pipe) as svc:
        slow = svc.submit(SLOW)
        wait_running(svc, slow.id)
        nxt = svc.submit(request(seed=5))
        assert svc.cancel(slow.id).state is JobState.RUNNING      # stops at its next step
        ended = svc.wait(slow.id, timeout=20)
        assert ended.state is JobState.CANCELLED
        assert ended.step < SLOW.steps and "cancelled" in ended.error
        assert not (config.out_dir / slow.id / "0.png").exists()
        assert svc.wait(nxt.id, timeout=20).state is JobState.DONE


def test_one_cancelled_job_of_a_batch_leaves_the_others_running(config, pipe):
    slow = SLOW.replace(steps=60)
    with service(config, pipe, start_workers=False) as svc:
        a = svc.submit(slow)
        b = svc.submit(slow.replace(prompt="another slow one", seed=8))
        svc.start()
        wait_running(svc, a.id)
        svc.cancel(a.id)
        va, vb = svc.wait(a.id, timeout=30), svc.wait(b.id, timeout=30)
        assert svc.stats()["batches"] == 1
    assert va.state is JobState.CANCELLED and not va.outputs
    assert not (config.out_dir / a.id / "0.png").exists()
    assert vb.state is JobState.DONE and len(vb.outputs) == 1


def test_interrupt_cancels_every_running_job(config, pipe):
    with service(config, pipe) as svc:
        job = svc.submit(SLOW)
        wait_running(svc, job.id)
        assert svc.interrupt() == 1
        assert svc.wait(job.id, timeout=20).state is JobState.CANCELLED
        assert svc.interrupt() == 0


def test_queue_full_says_when_to_retry(tmp_path, pipe):
    cfg = ServerConfig(models=(BUNDLED_MODEL,), out_dir=tmp_path, queue_size=2)
    with service(cfg, pipe, start_workers=False) as svc:
        svc.submit(request(seed=1))
        svc.submit(request(seed=2))
        with pytest.raises(QueueFull) as caught:
            svc.submit(request(seed=3))
        assert caught.value.retry_after >= 1
        assert "queue is full" in str(caught.value)
        assert svc.stats()["queue_depth"] == 2


def test_failing_job_fails_in_one_line_and_the_next_job_runs(config, pipe, monkeypatch):
    real = pipe.decode
    failures = iter([RuntimeError("boom\nsecond line"), UserInputError("this model needs bf16")])

    def decode_failing_twice(latents):
        error = next(failures, None)
        if error is not None:
            raise error
        return real(latents)

    monkeypatch.setattr(pipe, "decode", decode_failing_twice)
    with service(config, pipe, start_workers=False) as svc:
        # Different steps: three batches, one job each.
        ids = [svc.submit(request(steps=s)).id for s in (3, 4, 5)]
        svc.start()
        internal, user, ok = (svc.wait(i, timeout=20) for i in ids)
    assert internal.state is JobState.FAILED
    assert internal.error == "internal error: RuntimeError: boom second line"
    assert user.state is JobState.FAILED and user.error == "this model needs bf16"
    assert ok.state is JobState.DONE and len(ok.outputs) == 1


def test_check_refuses_bad_requests_without_running(config, pipe, trap):
    small = config.replace(limits=Limits(max_steps=20, max_images=4, max_prompt_chars=50,
                                         max_side=128))
    with service(small, trap(pipe), start_workers=False) as svc:
        cases = [
            (dict(request=request(steps=21)), "steps 21"),
            (dict(request=request(), num_images=5), "at most 4"),
            (dict(request=request(prompt="x" * 51)), "51 characters"),
            (dict(request=request().replace(height=192)), "limit of 128"),
            (dict(request=request().replace(height=66)), "66"),
            (dict(request=request(), model="sd15"), "unknown model 'sd15'"),
            (dict(request=request().replace(sampler="nope")), "nope"),
        ]
        for kwargs, words in cases:
            r = kwargs.pop("request")
            with pytest.raises(UserInputError, match=words) as caught:
                svc.submit(r, **kwargs)
            assert "\n" not in str(caught.value)
        with pytest.raises(UnknownModel):
            svc.check(request(), num_images=1, model="sd15")
        assert svc.stats()["jobs"]["queued"] == 0


def test_expired_lease_job_is_requeued_and_makes_the_same_image(tmp_path, pipe):
    r = request(prompt="recovered", seed=42)
    cfg = ServerConfig(models=(BUNDLED_MODEL,), out_dir=tmp_path / "a", preview_every=0)
    with service(cfg, pipe, start_workers=False) as svc:
        job = svc.submit(r)
        # A worker on another machine claimed it and died: its lease ran out a second ago.
        claims = svc.store.claim_batch("elsewhere:1234:1", max_images=8, lease_seconds=-1)
        assert [c.id for c in claims] == [job.id]
        assert svc.get(job.id).state is JobState.RUNNING
        svc.start()
        again = svc.wait(job.id, timeout=20)
    assert again.state is JobState.DONE and again.attempts == 2

    ref_cfg = ServerConfig(models=(BUNDLED_MODEL,), out_dir=tmp_path / "b", preview_every=0)
    with service(ref_cfg, pipe) as svc:
        ref = svc.wait(svc.submit(r).id, timeout=20)
    assert np.array_equal(pixels(again.outputs[0]), pixels(ref.outputs[0]))


def test_job_of_a_dead_local_process_is_requeued_at_start(config, pipe):
    """A server restarted on the same host does not wait out the lease of its previous
    process's jobs: that process is gone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket
    with service(config, pipe, start_workers=False) as svc:
        job = svc.submit(request())
        svc.store.claim_batch(f"{socket.gethostname()}:{dead.pid}:1", max_images=8,
                              lease_seconds=3600)
        svc.start()
        assert svc.wait(job.id, timeout=20).state is JobState.DONE


def test_submit_is_durable_when_it_returns(config, pipe):
    """A process that queues a job and dies at once (no close, no atexit) leaves it queued.
    The child runs the store's insert, which is all of submit after check(): importing torch
    for check() would cost the child 5-20 s."""
    r = GenerationParams(prompt="survives", steps=4, seed=9)
    body = request_to_json(r)
    key = batch_key(body, request_to_json(r.replace(prompt="", seed=0)), "default")
    code = textwrap.dedent(f"""
        import json, os, sys
        from ldm_engine.apps.server.jobs import JobStore
        store = JobStore({str(config.database)!r}, out_dir={str(config.out_dir)!r})
        job_id = store.insert(mode="txt2img", model="default", num_images=1, images=1,
                              request=json.loads(sys.argv[1]), key={key!r}, limit=64)
        print(job_id, flush=True)
        os._exit(0)
    """)
    out = subprocess.run([sys.executable, "-c", code, json.dumps(body)], capture_output=True,
                         text=True, timeout=50)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.split()[-1]
    view = JobStore(config.database, out_dir=config.out_dir).get(job_id)
    assert view is not None and view.state is JobState.QUEUED
    assert view.request == body
    with service(config, pipe) as svc:
        done = svc.wait(job_id, timeout=20)
    assert done.state is JobState.DONE
    assert read_png_params(done.outputs[0]).prompt == "survives"


def test_events_stream_progress_previews_and_end_with_the_final_state(tmp_path, pipe):
    cfg = ServerConfig(models=(BUNDLED_MODEL,), out_dir=tmp_path, preview_every=2)
    with service(cfg, pipe, start_workers=False) as svc:
        job = svc.submit(request(steps=6))
        events = svc.events(job.id)
        svc.start()
        seen = []
        while True:
            e = events.get(timeout=20)
            seen.append(e)
            if e["type"] == "state" and e["state"] in ("done", "failed", "cancelled"):
                break
    kinds = [e["type"] for e in seen]
    assert [e["state"] for e in seen if e["type"] == "state"] == ["queued", "running", "done"]
    steps = [e["step"] for e in seen if e["type"] == "progress"]
    assert steps == sorted(steps) and steps[-1] == 6
    assert kinds.count("preview") == 2          # steps 2 and 4 (the last step is the result)
    assert seen[-1]["job_view"]["outputs"] == [f"{job.id}/0.png"]
    assert events.empty()


def test_list_and_stats(config, pipe):
    with service(config, pipe) as svc:
        ids = [svc.submit(request(seed=s)).id for s in (1, 2)]
        for i in ids:
            svc.wait(i, timeout=20)
        listed = svc.list_jobs()
        assert [v.id for v in listed] == ids[::-1]
        assert svc.list_jobs(JobState.QUEUED) == []
        stats = svc.stats()
        assert stats["jobs"]["done"] == 2 and stats["images_done"] == 2
        assert stats["step_seconds"] and all(s > 0 for s in stats["step_seconds"])
        (m,) = svc.models()
        assert m == {"name": "default", "path": str(BUNDLED_MODEL), "hash": pipe.model_hash,
                     "native_size": 64, "default": True}
