"""The load-test client (ldm_engine.apps.server.loadtest): its counts and percentiles.

A scripted in-process server decides each request's fate from its seed (429, a FAILED job, a DONE
job whose PNG is gone, a job that never ends), so the expected counts are known exactly.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time

import pytest
from PIL import Image

from ldm_engine.apps.server.loadtest import (LoadSpec, Outcome, markdown_table, percentile,
                                             run_load, summarise)
from tests.server_util import serving

fastapi = pytest.importorskip("fastapi")
# At module level: FastAPI resolves the handlers' (string) annotations in this module's globals.
from fastapi import Request  # noqa: E402


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()


def fate_of(seed: int) -> str:
    """The scripted server's answer to the request with this seed."""
    if seed % 5 == 0:
        return "rejected"
    if seed % 7 == 3:
        return "failed"
    if seed == 13:
        return "lost-png"
    if seed == 19:
        return "lost-hang"
    return "completed"


def scripted_app(*, events: bool = True):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    app = FastAPI()
    jobs: dict[str, dict] = {}
    lock = threading.Lock()

    def view(job_id):
        job = jobs[job_id]
        seed = job["seed"]
        ended = time.monotonic() >= job["ends"]
        state = "running"
        if ended and fate_of(seed) != "lost-hang":
            state = "failed" if fate_of(seed) == "failed" else "done"
        return {"id": job_id, "state": state, "num_images": 1,
                "outputs": [f"{job_id}/0.png"] if state == "done" else [],
                "error": "internal error: scripted" if state == "failed" else None}

    @app.post("/v1/jobs", status_code=202)
    async def submit(request: Request):
        body = json.loads(await request.body())
        seed = body["request"]["seed"]
        if fate_of(seed) == "rejected":
            return JSONResponse({"error": "queue full"}, status_code=429,
                                headers={"Retry-After": "1"})
        with lock:
            job_id = f"{len(jobs):032x}"
            jobs[job_id] = {"seed": seed, "ends": time.monotonic() + 0.05}
        return view(job_id)

    @app.get("/v1/jobs/{job_id}")
    async def get(job_id: str):
        return view(job_id)

    @app.get("/v1/jobs/{job_id}/events")
    async def stream(job_id: str):
        if not events:
            return JSONResponse({"error": "no"}, status_code=404)

        async def gen():
            yield "event: progress\ndata: {\"type\": \"progress\", \"step\": 1}\n\n"
            while view(job_id)["state"] == "running":
                await asyncio.sleep(0.02)
            yield f"event: state\ndata: {json.dumps({'type': 'state', **view(job_id)})}\n\n"
        return StreamingResponse(gen(), media_type="text/event-stream")

    @app.get("/v1/jobs/{job_id}/images/{k}")
    async def image(job_id: str, k: int):
        if fate_of(jobs[job_id]["seed"]) == "lost-png":
            return JSONResponse({"error": "gone"}, status_code=404)
        return Response(PNG, media_type="image/png")

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request):
        import base64
        seed = json.loads(await request.body())["seed"]
        if fate_of(seed) == "rejected":
            return JSONResponse({"error": "queue full"}, status_code=429)
        if fate_of(seed) == "failed":
            return JSONResponse({"error": "bad"}, status_code=500)
        return {"images": [base64.b64encode(PNG).decode()], "parameters": {}, "info": "{}"}

    return app


def expected(requests: int) -> dict[str, int]:
    fates = [fate_of(i) for i in range(requests)]
    return {"rejected": fates.count("rejected"), "failed": fates.count("failed"),
            "lost": fates.count("lost-png") + fates.count("lost-hang"),
            "completed": fates.count("completed")}


@pytest.mark.parametrize("events", [True, False], ids=["event-stream", "polling"])
def test_native_counts_add_up(events):
    with serving(scripted_app(events=events)) as url:
        spec = LoadSpec(url=url, requests=40, concurrency=8, job_timeout=2.0, warmup=0,
                        poll_seconds=0.02)
        report = asyncio.run(run_load(spec, label="scripted"))
    want = expected(40)
    assert (report.completed, report.rejected, report.failed, report.lost) == (
        want["completed"], want["rejected"], want["failed"], want["lost"])
    assert report.completed + report.rejected + report.failed + report.lost == 40
    # Everything but the 429s was accepted (the scripted failures are FAILED jobs).
    assert report.accepted == 40 - want["rejected"]
    assert report.images == want["completed"]
    assert report.images_per_second > 0
    # A job takes >= 50 ms; a hung one is given up on at the 2 s timeout, not before.
    assert report.p50 >= 0.05
    assert any("not finished within 2 s" in p for p in report.problems)
    assert any("image 0 missing" in p for p in report.problems)
    # 429s are answered at once.
    assert report.reject_max < 1.0


def test_a1111_counts():
    with serving(scripted_app()) as url:
        spec = LoadSpec(url=url, requests=30, concurrency=6, mode="a1111", warmup=0)
        report = asyncio.run(run_load(spec))
    fates = [fate_of(i) for i in range(30)]
    assert report.rejected == fates.count("rejected")
    assert report.failed == fates.count("failed")
    # The A1111 answer carries its images: the native-only "lost" scripts complete here.
    assert report.completed == 30 - report.rejected - report.failed
    assert report.lost == 0


def test_percentiles_nearest_rank():
    values = [float(v) for v in range(100, 0, -1)]        # 100 .. 1, unsorted on purpose
    assert percentile(values, 50) == 50.0
    assert percentile(values, 95) == 95.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1.0], 0)


def test_summary_and_table():
    outcomes = ([Outcome("completed", t, images=1, job_id="a") for t in (1.0, 2.0, 3.0, 4.0)]
                + [Outcome("rejected", 0.01), Outcome("rejected", 0.03)]
                + [Outcome("failed", 0.5, detail="HTTP 500: boom")]
                + [Outcome("lost", 9.0, detail="not finished", job_id="b")])
    report = summarise(outcomes, label="x", mode="native", concurrency=4, steps=8,
                       wall_seconds=2.0)
    assert (report.completed, report.rejected, report.failed, report.lost) == (4, 2, 1, 1)
    assert report.accepted == 5            # completed + lost; the failure was never accepted
    assert report.images_per_second == 2.0
    assert (report.p50, report.p95, report.p99) == (2.0, 4.0, 4.0)
    assert (report.reject_p50, report.reject_max) == (0.01, 0.03)
    table = markdown_table([report])
    assert "| x |" in table and "| 2.00 |" in table and "HTTP 500: boom" in table


def test_real_server_counts(tiny_dir, tmp_path):
    """The real app and job service (tiny model): a queue of one place and 8 clients at once,
    so some get 429; every request is completed or rejected, none lost."""
    from ldm_engine.apps.server.app import create_app
    from ldm_engine.apps.server.config import ServerConfig
    from ldm_engine.apps.server.service import JobService

    config = ServerConfig(models=(tiny_dir,), out_dir=tmp_path, queue_size=1, max_batch=1)
    with serving(create_app(JobService(config, start_workers=False))) as url:
        spec = LoadSpec(url=url, requests=8, concurrency=8, steps=20, job_timeout=120, warmup=0)
        report = asyncio.run(run_load(spec))
    assert (report.failed, report.lost) == (0, 0), report.problems
    assert report.completed + report.rejected == 8
    assert report.rejected >= 1 and report.completed >= 1
    assert report.images == report.completed
