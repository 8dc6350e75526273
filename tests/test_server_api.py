"""The native /v1 API of `ldm serve` over a real uvicorn on loopback, with the bundled model:
jobs from submit to PNG, server-sent events, cancelling, the synchronous /v1/generate, the
listings, /metrics as Prometheus text, and 429 with Retry-After from a full queue."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from ldm_engine.apps.server.config import ServerConfig
from ldm_engine.paths import BUNDLED_MODEL
from pipelines import GenerationParams, read_png_params
from pipelines.jsonform import request_from_json
from pipelines.sampler_names import sampler_names
from tests.server_util import serving

pytestmark = pytest.mark.usefixtures("deadline")
DEADLINE_SECONDS = 60


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from ldm_engine.apps.server.app import create_app
    from ldm_engine.apps.server.service import JobService

    config = ServerConfig(models=(BUNDLED_MODEL,), out_dir=tmp_path_factory.mktemp("api"),
                          preview_every=2)
    service = JobService(config)
    with serving(create_app(service)) as url:
        yield url, service


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server[0], timeout=30) as client:
        yield client


def body(num_images: int = 1, **request) -> dict:
    return {"request": {"prompt": "a red circle", "steps": 4, "seed": 1, **request},
            "num_images": num_images}


def submit(http, **kw) -> dict:
    r = http.post("/v1/jobs", json=body(**kw))
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    return r.json()


def wait(http, job_id: str, until=("done", "failed", "cancelled"), timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while (job := http.get(f"/v1/jobs/{job_id}").json())["state"] not in until:
        assert time.monotonic() < deadline, job
        time.sleep(0.03)
    return job


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_submit_poll_download(http, server, tmp_path):
    job = submit(http, num_images=2, prompt="a blue square", seed=11, guidance_scale=6.0)
    assert job["state"] in ("queued", "running") and len(job["id"]) == 32
    done = wait(http, job["id"])
    assert done["state"] == "done", done["error"]
    assert done["seeds"] == [11, 12] and done["num_images"] == 2
    assert done["outputs"] == [f"{job['id']}/0.png", f"{job['id']}/1.png"]
    asked = request_from_json(done["request"])
    native = server[1].models()[0]["native_size"]
    for k in range(2):
        r = http.get(f"/v1/jobs/{job['id']}/images/{k}")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        path = tmp_path / f"{k}.png"
        path.write_bytes(r.content)
        back = read_png_params(path)
        # What the run resolved (seed of image k, size, eta, model) is recorded; the rest is
        # exactly the request's.
        assert back == asked.replace(seed=11 + k, height=native, width=native, eta=0.0,
                                     model=BUNDLED_MODEL.name, model_hash=back.model_hash)
        assert back.prompt == "a blue square" and back.guidance_scale == 6.0
        assert done["infos"][k] == back.to_png_text()
        assert pixels(r.content).shape == (native, native, 3)
    assert http.get(f"/v1/jobs/{job['id']}/images/2").status_code == 404
    assert http.get(f"/v1/jobs/{job['id']}/images/-1").status_code == 404


def read_events(http, job_id: str) -> list[tuple[str, dict]]:
    events, kind = [], None
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((kind, json.loads(line.removeprefix("data: "))))
    return events


def test_events_show_progress_in_order_and_end_with_done(http):
    # Behind a longer job, the watched one is still queued when its stream opens: all of its
    # steps are seen.
    blocker = submit(http, steps=30, seed=2)
    job = submit(http, steps=6, seed=3)
    events = read_events(http, job["id"])
    kinds = [k for k, _ in events]
    assert kinds[0] == "state" and events[0][1]["state"] == "queued"
    steps = [e["step"] for k, e in events if k == "progress"]
    assert steps == sorted(set(steps)) and steps[-1] == 6
    assert all(e["total"] == 6 for k, e in events if k == "progress")
    previews = [e for k, e in events if k == "preview"]
    assert previews and pixels(base64.b64decode(previews[0]["image"])).shape[2] == 3
    assert kinds[-1] == "state" and events[-1][1]["state"] == "done"
    assert events[-1][1]["job_view"]["id"] == job["id"]
    assert "running" in [e["state"] for k, e in events if k == "state"]
    wait(http, blocker["id"])
    # A finished job's stream is its final state alone.
    assert [(k, e["state"]) for k, e in read_events(http, job["id"])] == [("state", "done")]


def test_delete_cancels_queued_and_running_jobs(http):
    running = submit(http, steps=150, seed=4)
    wait(http, running["id"], until=("running",))
    queued = submit(http, steps=5, seed=5)
    r = http.delete(f"/v1/jobs/{queued['id']}")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert http.get(f"/v1/jobs/{queued['id']}/images/0").status_code == 409
    r = http.delete(f"/v1/jobs/{running['id']}")
    assert r.status_code == 200
    done = wait(http, running["id"])
    assert done["state"] == "cancelled" and done["step"] < 150
    assert http.get(f"/v1/jobs/{queued['id']}").json()["state"] == "cancelled"


def test_generate_answers_with_the_images(http):
    r = http.post("/v1/generate", json=body(num_images=2, prompt="a green triangle", seed=21))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["state"] == "done" and out["seeds"] == [21, 22] and len(out["images"]) == 2
    # The same request through the queue makes the same pixels.
    job = wait(http, submit(http, num_images=2, prompt="a green triangle", seed=21)["id"])
    for k in range(2):
        queued = http.get(f"/v1/jobs/{job['id']}/images/{k}").content
        assert np.array_equal(pixels(base64.b64decode(out["images"][k])), pixels(queued))
    assert not np.array_equal(pixels(base64.b64decode(out["images"][0])), pixels(queued))


def test_generate_timeout_is_504_with_the_job_id(http):
    r = http.post("/v1/generate", json={**body(steps=150, seed=6), "timeout": 0.05})
    assert r.status_code == 504 and r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    http.delete(f"/v1/jobs/{r.json()['id']}")
    assert wait(http, r.json()["id"])["state"] in ("cancelled", "done")


def test_listings_and_health(http):
    models = http.get("/v1/models").json()
    assert [m["name"] for m in models] == [BUNDLED_MODEL.name]
    assert models[0]["default"] and models[0]["native_size"] == 64 and "path" not in models[0]
    samplers = http.get("/v1/samplers").json()
    assert {s["name"]: s["display_name"] for s in samplers} == sampler_names()
    assert http.get("/healthz").json() == {"status": "ok"}
    assert "/v1/jobs" in http.get("/openapi.json").json()["paths"]
    assert http.get("/docs").status_code == 200


def metrics(http) -> dict:
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_metrics_count_what_was_done(http):
    before = metrics(http)
    jobs = [submit(http, num_images=2, prompt="m", seed=31), submit(http, prompt="n", seed=40)]
    for job in jobs:
        assert wait(http, job["id"])["state"] == "done"
    after = metrics(http)
    done = (("state", "done"),)
    assert after[("ldm_jobs", done)] == before[("ldm_jobs", done)] + 2
    assert after[("ldm_images_total", ())] == before[("ldm_images_total", ())] + 3
    assert after[("ldm_batches_total", ())] >= before[("ldm_batches_total", ())] + 1
    assert after[("ldm_batched_images_total", ())] >= before[("ldm_batched_images_total", ())] + 3
    assert after[("ldm_queue_depth", ())] == 0
    assert after[("ldm_step_seconds", (("quantile", "0.5"),))] > 0
    assert after[("ldm_step_seconds_window_count", ())] >= 1


def test_full_queue_is_429_with_retry_after(tmp_path):
    from fastapi.testclient import TestClient

    from ldm_engine.apps.server.app import create_app
    from ldm_engine.apps.server.service import JobService

    config = ServerConfig(models=(BUNDLED_MODEL,), out_dir=tmp_path, queue_size=2)
    # No lifespan (no `with`): the workers never start, so the queue only fills.
    client = TestClient(create_app(JobService(config, start_workers=False)))
    for seed in range(2):
        assert client.post("/v1/jobs", json=body(seed=seed)).status_code == 202
    started = time.monotonic()
    r = client.post("/v1/jobs", json=body(seed=9))
    assert time.monotonic() - started < 5              # refused at once, not after a wait
    assert r.status_code == 429 and set(r.json()) == {"error"} and "full" in r.json()["error"]
    assert int(r.headers["retry-after"]) >= 1
    assert r.json()["error"] == f"the queue is full; retry in {r.headers['retry-after']} s"


def test_a_request_is_the_pipelines_request():
    # The server takes pipelines' own JSON form: nothing to translate, one set of defaults.
    assert request_from_json({"prompt": "x"}) == GenerationParams(prompt="x")


def test_with_the_web_ui_the_api_paths_stay_the_apis(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from ldm_engine.apps.server.app import create_app
    from ldm_engine.apps.server.service import JobService

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    config = ServerConfig(models=(BUNDLED_MODEL,), out_dir=tmp_path, ui=True)
    client = TestClient(create_app(JobService(config, start_workers=False)))
    assert client.get("/").headers["content-type"].startswith("text/html")
    r = client.get("/v1/no-such-thing")
    assert r.status_code == 404 and r.json() == {"error": "no such path: /v1/no-such-thing"}
    r = client.put("/v1/jobs")
    assert r.status_code == 405 and r.json()["error"] == "PUT is not allowed on /v1/jobs"
    assert r.headers["allow"] == "POST"
    assert client.get("/v1/models").json()[0]["name"] == BUNDLED_MODEL.name
    assert client.get("/sdapi/v1/no-such-thing").status_code == 404
